"""`jaxsd compare`: several training runs side by side, as files a browser opens offline.

`runs.py` reads what a run directory holds (metrics.jsonl, config.yaml, samples/step_*.png);
`curves.py` plots one quantity with every run overlaid; `samples.py` puts the runs' sample grids of
one step side by side; `config_diff.py` names the config keys that differ; `report.py` writes
index.html over all of it.
"""
