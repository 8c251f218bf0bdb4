"""The data-parallel layout of generation inputs (jaxsd/pipelines/data_parallel.py): padded to a multiple of the
device count, and [uncond; cond] rows regrouped so every device's block is its own images' [uncond; cond]."""

from __future__ import annotations

import numpy as np

from jaxsd.pipelines.data_parallel import padded_size, split_inputs


def test_split_inputs_pads_and_groups_rows_per_device():
    n = 3
    rows = np.arange(2 * n, dtype=np.float32)[:, None]  # uncond 0,1,2; cond 3,4,5
    inputs = {"noise": np.arange(n, dtype=np.float32)[:, None], "context": rows, "added": None, "start": 0,
              "image": np.arange(n, dtype=np.float32)[:, None]}
    out, kept = split_inputs(inputs, 2)
    assert kept == 3 and padded_size(3, 2) == 4 and padded_size(4, 2) == 4
    np.testing.assert_array_equal(out["noise"][:, 0], [0, 1, 2, 2])  # the last image repeated
    np.testing.assert_array_equal(out["image"][:, 0], [0, 1, 2, 2])
    # device 0: uncond 0,1 + cond 3,4; device 1: uncond 2,2 + cond 5,5
    np.testing.assert_array_equal(out["context"][:, 0], [0, 1, 3, 4, 2, 2, 5, 5])
    assert out["added"] is None and out["start"] == 0
