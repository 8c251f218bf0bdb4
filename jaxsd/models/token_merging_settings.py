"""The settings of token merging (`model.token_merging`, `jaxsd sample --tome`), jax-free so the config
loader can hold them without importing jax; the merging itself is jaxsd/models/token_merging.py."""

from __future__ import annotations

from dataclasses import dataclass

from jaxsd.errors import InputError


@dataclass(frozen=True)
class TokenMerging:
    """ToMe settings (the names and defaults of the `tomesd` package's `apply_patch`).

    ratio: fraction of a level's tokens removed by merging (0 = off; at most 1 - 1/(sx·sy)).
    max_downsample: merge only at levels downsampled at most this much from the latent (1, 2, 4, 8).
    sx, sy: the dst stride: one dst token per sy × sx cell.
    use_rand: pick each cell's dst token at random (else its top-left token). Off when the batch
      is odd, as in tomesd (the conditional and unconditional halves must share the choice).
    merge_attn, merge_crossattn, merge_mlp: which of a block's sub-layers run on merged tokens.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self):
        top = 1 - 1 / (self.sx * self.sy) if self.sx > 0 and self.sy > 0 else 0
        if self.sx < 1 or self.sy < 1:
            raise InputError(f"token_merging.sx={self.sx}, sy={self.sy}: strides must be >= 1")
        if not 0 <= self.ratio <= top:
            raise InputError(f"token_merging.ratio={self.ratio} must be in [0, {top:g}] (1 - 1/(sx·sy): every "
                             f"{self.sy}x{self.sx} cell keeps its dst token)")
        if self.max_downsample < 1:
            raise InputError(f"token_merging.max_downsample={self.max_downsample} must be >= 1 (1: only the "
                             "full-resolution levels; 8: every level)")

    @property
    def active(self) -> bool:
        return self.ratio > 0 and (self.merge_attn or self.merge_crossattn or self.merge_mlp)
