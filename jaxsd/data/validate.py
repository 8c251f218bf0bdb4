"""The validation pass: open every image and caption once, decide keep / alter / skip, and report.

Nothing here raises for a bad input file: a corrupt or truncated image, an
unreadable file, a missing caption, a duplicate stem or a too-small image becomes
a line in the report (console summary + JSON file) saying what happened and why,
and the run goes on with the rest. Content checks (caption filter, pluggable
per-image check) run here too; what they drop is counted separately.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from jaxsd.data.buckets import target_size
from jaxsd.data.config import CacheConfig, DataConfig
from jaxsd.data.images import to_rgb
from jaxsd.data.sources import Item
from jaxsd.errors import ConfigError

ImageCheck = Callable[[Image.Image, str], "str | None"]


@dataclass(frozen=True)
class Valid:
    """An item that passed: its caption, original (h, w), and target (h, w)."""

    item: Item
    caption: str
    size: tuple[int, int]
    target: tuple[int, int]


@dataclass(frozen=True)
class Finding:
    """One report line. action: "skipped" (invalid), "dropped" (content check) or "altered" (kept, changed)."""

    path: str
    action: str
    reasons: tuple[str, ...]


@dataclass
class Report:
    total: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(f.action for f in self.findings)
        return {"total": self.total, "kept": self.total - c["skipped"] - c["dropped"], "altered": c["altered"],
                "skipped": c["skipped"], "dropped": c["dropped"]}

    def files(self, action: str) -> list[str]:
        return sorted(f.path for f in self.findings if f.action == action)

    def summary(self) -> str:
        c = self.counts
        lines = [(f"validation: {c['total']} images, {c['kept']} kept ({c['altered']} altered), "
                  f"{c['skipped']} skipped, {c['dropped']} dropped by content checks")]
        why = Counter(f"{f.action}: {_kind(r)}" for f in self.findings for r in f.reasons)
        lines += [f"  {n:6d} × {k}" for k, n in why.most_common()]
        return "\n".join(lines)

    def merge(self, other: Report) -> Report:
        return Report(self.total + other.total, self.findings + other.findings)

    def to_json(self) -> dict:
        return {"summary": self.counts,
                "files": [asdict(f) for f in sorted(self.findings, key=lambda f: f.path)]}

    @classmethod
    def from_json(cls, data: dict) -> Report:
        return cls(data["summary"]["total"],
                   [Finding(f["path"], f["action"], tuple(f["reasons"])) for f in data["files"]])

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(self.to_json(), fh, indent=1)
            fh.write("\n")


def _kind(reason: str) -> str:
    """A reason without its file-specific details, for the summary's counts."""
    return re.split(r"[:(]| from | on ", reason, maxsplit=1)[0].strip()


def caption_filter(cfg: CacheConfig) -> Callable[[str], str | None]:
    """f(caption) -> reason it is dropped, or None. Blocklist words match whole words, any case."""
    words = [w for w in cfg.caption_blocklist if w.strip()]
    block = re.compile(r"\b(" + "|".join(re.escape(w.strip()) for w in words) + r")\b", re.IGNORECASE) if words else None
    pattern = re.compile(cfg.caption_regex) if cfg.caption_regex else None

    def check(caption: str) -> str | None:
        if block is not None and (m := block.search(caption)):
            return f"caption filter: blocklisted word {m.group(0)!r}"
        if pattern is not None and pattern.search(caption):
            return f"caption filter: matches {cfg.caption_regex!r}"
        return None

    return check


def load_image_check(spec: str) -> ImageCheck | None:
    """Resolve `package.module:function` (data.cache.image_check); empty = no check."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"data.cache.image_check={spec!r}: use 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.cache.image_check={spec!r} cannot be imported: {e}") from e


def check_one(source, item: Item, cfg: DataConfig, image_check: ImageCheck | None,
              caption_check: Callable[[str], str | None], captions: bool = True) -> tuple[Valid | None, Finding | None]:
    """Validate one item. Returns (Valid or None, Finding or None); never raises for bad files.
    captions=False: images alone (VAE training), captions are neither read nor checked."""
    notes: list[str] = []
    try:
        caption, cap_notes = source.read_caption(item) if captions else ("", [])
    except OSError as e:
        return None, Finding(item.path, "skipped", (f"caption unreadable: {e.strerror or e}",))
    notes += cap_notes
    if captions and not caption:
        missing = "no caption file" if caption is None else "empty caption"
        if cfg.validation.missing_caption == "skip":
            return None, Finding(item.path, "skipped", (missing,))
        notes.append(f"{missing}: trained with an empty caption")
        caption = ""
    try:
        img = source.open_image(item)
        rgb, img_notes = to_rgb(img, cfg.validation.background)
    except PermissionError as e:
        return None, Finding(item.path, "skipped", (f"unreadable: permission denied ({e.strerror or e})",))
    except UnidentifiedImageError:
        return None, Finding(item.path, "skipped", ("cannot decode: not a recognised image file (corrupt or wrong extension)",))
    except Exception as e:  # any decoder failure (PIL raises many types) is a bad file, not a crash
        return None, Finding(item.path, "skipped", (f"cannot decode: {type(e).__name__}: {e}",))
    notes += img_notes
    size = (rgb.height, rgb.width)
    target = target_size(*size, cfg.image)
    if size[0] < target[0] or size[1] < target[1]:
        what = f"too small: {size[1]}x{size[0]} < target {target[1]}x{target[0]}"
        if cfg.validation.too_small == "skip":
            return None, Finding(item.path, "skipped", (what,))
        notes.append(f"{what}; upscaled")
    drop = caption_check(caption) if caption else None
    if drop is None and image_check is not None:
        reason = image_check(rgb, caption)
        drop = f"image check: {reason}" if reason else None
    if drop is not None:
        return None, Finding(item.path, "dropped", (drop,))
    finding = Finding(item.path, "altered", tuple(notes)) if notes else None
    return Valid(item, caption, size, target), finding


def validate(sources: Sequence, items: Sequence[Item], cfg: DataConfig, *, scan_problems: Sequence = (),
             threads: int = 8, captions: bool = True) -> tuple[list[Valid], Report]:
    """Validate `items` (of `sources`, by `item.source`); returns the valid ones in order and the report.

    scan_problems: `Problem`s the source scan found (duplicate stems), reported as skipped.
    captions=False: the images alone (`check_one`).
    """
    image_check = load_image_check(cfg.cache.image_check)
    caption_check = caption_filter(cfg.cache)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
        results = list(pool.map(lambda it: check_one(sources[it.source], it, cfg, image_check, caption_check,
                                                     captions), items))
    report = Report(len(items) + len(scan_problems),
                    [Finding(p.path, "skipped", (p.reason,)) for p in scan_problems])
    valid = []
    for ok, finding in results:
        if ok is not None:
            valid.append(ok)
        if finding is not None:
            report.findings.append(finding)
    return valid, report


def report_path(cfg: DataConfig, sources: Sequence) -> Path:
    """Where the JSON report goes: data.validation.report, else next to the first source's cache."""
    return Path(cfg.validation.report) if cfg.validation.report else Path(sources[0].root) / "jaxsd_validation.json"
