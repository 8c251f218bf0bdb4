"""SafetensorsFile(in_memory=True): the loader's per-sample sidecar reads (one read of the file, no
memory maps) give the arrays the memory-mapped reads give, and refuse the same broken files."""

import ml_dtypes
import numpy as np
import pytest

from jaxsd.convert.safetensors_io import SafetensorsError, SafetensorsFile, save_file


def test_in_memory_reads_what_the_memory_maps_read(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"latent_mean": rng.standard_normal((8, 8, 4)).astype(np.float32),
               "text": rng.standard_normal((16, 32)).astype(ml_dtypes.bfloat16),
               "ids": np.arange(7, dtype=np.int32), "scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float32)}
    path = tmp_path / "sample.safetensors"
    save_file(tensors, path, metadata={"jaxsd_spec": "abc"})
    mapped, held = SafetensorsFile(path), SafetensorsFile(path, in_memory=True)
    assert held.metadata == mapped.metadata == {"jaxsd_spec": "abc"}
    assert list(held) == list(mapped)
    for name, want in tensors.items():
        got = held[name]
        assert got.dtype == want.dtype and got.shape == np.shape(want), name
        np.testing.assert_array_equal(got, mapped[name])
        np.testing.assert_array_equal(got, want)


def test_in_memory_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "sample.safetensors"
    save_file({"x": np.ones((64,), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SafetensorsError, match="truncated"):
        SafetensorsFile(path, in_memory=True)
