"""A synthetic in-memory data source of the cached-latent loader's batch shape (tests, smoke runs, benchmarks).

`num_examples` fixed (latent, text embedding) pairs: each latent is a smooth
random pattern, and its text embedding is a fixed linear function of it, so the
conditioning carries information and a model can fit the set (the loss falls).
Batch i is a deterministic function of (seed, i) — its iterator state is just
the next batch index, saved with checkpoints. Each process yields only its own
rows of every global batch.
"""

from __future__ import annotations

import numpy as np

from jaxsd.config import SyntheticDataConfig
from jaxsd.errors import ConfigError


class SyntheticSource:
    """Iterator of local batches: dict of numpy arrays (see jaxsd/train/loss.py for the keys)."""

    def __init__(self, cfg: SyntheticDataConfig, *, global_batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if global_batch_size % process_count:
            raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by {process_count} processes")
        self.cfg, self.seed = cfg, seed
        self.global_batch_size = global_batch_size
        self.local = global_batch_size // process_count
        self.offset = process_index * self.local
        rng = np.random.default_rng(seed)
        s, c = cfg.latent_size, cfg.latent_channels
        coarse = rng.standard_normal((cfg.num_examples, 2, 2, c)).astype(np.float32)
        self.latents = np.repeat(np.repeat(coarse, (s + 1) // 2, 1), (s + 1) // 2, 2)[:, :s, :s]
        proj = rng.standard_normal((4 * c, cfg.text_len * cfg.text_dim)).astype(np.float32) / np.sqrt(4 * c)
        self.text = (coarse.reshape(cfg.num_examples, -1) @ proj).reshape(cfg.num_examples, cfg.text_len, cfg.text_dim)
        self.pooled = self.text.mean(axis=1)[:, : cfg.pooled_dim] if cfg.pooled_dim else None
        if cfg.pooled_dim > cfg.text_dim:
            raise ConfigError(f"synthetic.pooled_dim={cfg.pooled_dim} must be <= text_dim={cfg.text_dim}")
        self.index = 0

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def empty_prompt(self) -> dict[str, np.ndarray]:
        """The unconditional embedding conditioning dropout swaps in (zeros for synthetic data)."""
        out = {"encoder_hidden_states": np.zeros((self.cfg.text_len, self.cfg.text_dim), np.float32)}
        if self.pooled is not None:
            out["pooled"] = np.zeros((self.cfg.pooled_dim,), np.float32)
        return out

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `index`."""
        rows = np.random.default_rng([self.seed, index]).integers(0, self.cfg.num_examples, self.global_batch_size)
        rows = rows[self.offset:self.offset + self.local]
        out = {"latents": self.latents[rows], "encoder_hidden_states": self.text[rows]}
        if self.pooled is not None:
            out["pooled"] = self.pooled[rows]
            size = self.cfg.latent_size * 8
            out["time_ids"] = np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (self.local, 1))
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch(self.index)
        self.index += 1
        return b
