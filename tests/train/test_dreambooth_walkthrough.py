"""docs/dreambooth.md's walkthrough, run as written on a tiny pipeline: its `style.yaml` and its commands
(class images → cache → LoRA training with prior preservation and per-draw captions → LoRA export → txt2img and
img2img with --lora), with only sizes and step counts made tiny by overrides."""

from __future__ import annotations

import re
import shlex
import subprocess

import numpy as np
from PIL import Image

from tests.helpers import JAXSD, REPO, jaxsd_env
from tests.train.cli_runs import ENV, records
from tests.train.tiny_pipeline import IMAGE_SIZE, tiny_pipeline

DOC = REPO / "docs" / "dreambooth.md"


def walkthrough() -> tuple[str, list[list[str]]]:
    """(the style.yaml block, the commands of the sh block) of the walkthrough section."""
    section = DOC.read_text().split("## Walkthrough", 1)[1]
    yaml = re.search(r"`style.yaml`:\n\n```yaml\n(.*?)```", section, re.DOTALL).group(1)
    sh = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    return yaml, [shlex.split(line) for line in sh.splitlines() if line.strip()]


def tiny(argv: list[str], work) -> list[str]:
    """The doc's command with tiny sizes: 16-px images, a few steps, 4 class images."""
    if argv[1] == "sample":
        return [*argv, "--steps", "3"]
    if "style.yaml" in argv:
        return [*argv, f"data.image.resolution={IMAGE_SIZE}", "train.steps=2", "checkpoint.every=2",
                "dreambooth.num_class_images=4", "dreambooth.steps=3", "dreambooth.batch_size=2",
                "lora.rank=4", "lora.alpha=4", "data.loader.threads=1", "data.loader.prefetch=1",
                "logging.progress_bar=false", "logging.every=1", f"train.compilation_cache={work / 'xla'}"]
    return argv


def test_the_style_lora_walkthrough_runs_as_documented(tmp_path):
    yaml, commands = walkthrough()
    assert [c[:2] for c in commands] == [["jaxsd", "dreambooth-classes"], ["jaxsd", "cache"], ["jaxsd", "train"],
                                         ["jaxsd", "export"], ["jaxsd", "sample"], ["jaxsd", "sample"]]
    tiny_pipeline(tmp_path / "base")
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a lighthouse, sea, dusk", "a harbour, boats", "a cliff, waves, storm"]):
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / f"{i}.png")
        (tmp_path / "photos" / f"{i}.txt").write_text(caption)
    Image.open(tmp_path / "photos" / "0.png").save(tmp_path / "photo.png")
    (tmp_path / "style.yaml").write_text(yaml)

    for argv in commands:
        proc = subprocess.run([str(JAXSD), *tiny(argv, tmp_path)[1:]], capture_output=True, text=True, cwd=tmp_path,
                              env=jaxsd_env(ENV), timeout=900, check=False)
        assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    assert sorted(p.name for p in (tmp_path / "classes").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    steps = records(tmp_path / "runs" / "style")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # instance + weighted class loss, both logged
        np.testing.assert_allclose(r["loss"], r["loss_instance"] + r["loss_prior"], rtol=1e-5)
        assert r["loss_prior"] > 0 and r["loss_instance"] > 0
    assert (tmp_path / "style.safetensors").stat().st_size > 0
    for out in ("castle.png", "street.png"):
        assert Image.open(tmp_path / out).size == (IMAGE_SIZE, IMAGE_SIZE)
