"""Run monitoring: TensorBoard event files, metrics.jsonl, a console progress bar, MFU.

Scalars written (TensorBoard tags under "train/"): loss, loss_raw, lr, grad_norm,
qk_grads_av (with `train.fused_update` instead: params_finite), skipped, step_time_s, images_per_s and,
with `logging.peak_flops`,
mfu = (XLA cost-analysis FLOPs of one compiled step / step time) / (peak FLOP/s
per device × devices). Every step's metrics also go to <run_dir>/metrics.jsonl
(one JSON object per line) — the exact per-step record the resume test compares.
Sample grids (jaxsd/train/sampling.py) are TensorBoard images under "samples/".
Only process 0 writes. In a remote run dir (gs://) both are written locally and uploaded
(`jaxsd.train.run_dir.RunDir`); tensorboardX's own gs:// writer is not used: it re-uploads the
whole event file at every flush, through google-cloud-storage rather than epath.
A resumed run replays the steps after its checkpoint: their old metrics.jsonl lines are
dropped, and TensorBoard is told to purge its old points from that step on (a SessionLog
START at the resume step, which TensorBoard honours), so a plot shows one curve.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxsd.train.run_dir import RunDir


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled function from XLA's cost analysis (None if unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


class RunLogger:
    """Writes scalars to TensorBoard + metrics.jsonl and drives the tqdm bar (process 0 only)."""

    def __init__(self, run: RunDir, *, total_steps: int, start_step: int, tensorboard: bool, progress_bar: bool,
                 every: int):
        self.active = jax.process_index() == 0
        self.run = run
        self.every = max(every, 1)
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not self.active:
            return
        jsonl = run.local_file("metrics.jsonl")
        if jsonl.exists():
            _drop_records_after(jsonl, start_step)
        self.jsonl = open(jsonl, "a")  # noqa: SIM115  open for the whole run
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            self.writer = SummaryWriter(str(run.local_dir("tensorboard")), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's host-side metrics (step is 1-based: the number of updates done)."""
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.writer is not None and step % self.every == 0:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        self.run.maybe_sync()

    def log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        """A record of named scalars besides the step's own (the validation loss: "val/loss", ...): one
        metrics.jsonl line, and TensorBoard scalars under exactly these names."""
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """One uint8 [H, W, 3] image as a TensorBoard image summary (PNG-encoded by tensorboardX)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: its writer module imports torch when it
    is installed (2 CPU-s of start-up for every `jaxsd train`) only to accept torch tensors, and jaxsd
    hands it floats and numpy arrays. torch is hidden for that one import (it then takes the numpy path),
    unless something already imported it."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only the metrics.jsonl lines of steps <= `step` (a resumed run writes the later ones again)."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)  # atomic: a kill now leaves the old or the new file, never half of one


def _events(logdir: str | Path) -> Iterator[Any]:
    """The Event protos of every TensorBoard event file under `logdir`, file by file.

    Parses the TFRecord framing directly (uint64 length, 4-byte CRC, Event proto, 4-byte CRC),
    so reading back needs neither TensorFlow nor the tensorboard package.
    """
    from tensorboardX.proto import event_pb2

    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            pos += 12
            yield event_pb2.Event.FromString(data[pos:pos + length])
            pos += length + 4


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar summaries of the TensorBoard event files under `logdir`: tag -> [(step, value)].

    As TensorBoard shows them: a SessionLog START at step S (a resumed run) purges the points
    read so far from step S on."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for event in _events(logdir):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


def read_images(logdir: str | Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """All image summaries under `logdir`: tag -> [(step, uint8 [H, W, C] decoded image)]."""
    from PIL import Image

    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for event in _events(logdir):
        for value in event.summary.value:
            if value.HasField("image"):
                pixels = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                out.setdefault(value.tag, []).append((int(event.step), pixels))
    return out
