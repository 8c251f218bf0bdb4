"""The modes of `jaxsd eval` too large to sit in commands/eval.py: `--model` (model.py), `--pairs` (pairs.py)."""
