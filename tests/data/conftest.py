"""Data tests keep the fingerprint memo (normally ~/.cache/jaxsd) in a temporary directory."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _fingerprint_memo_dir(tmp_path_factory):
    old = os.environ.get("JAXSD_CACHE_DIR")
    os.environ["JAXSD_CACHE_DIR"] = str(tmp_path_factory.mktemp("jaxsd_cache_dir"))
    yield
    if old is None:
        os.environ.pop("JAXSD_CACHE_DIR", None)
    else:
        os.environ["JAXSD_CACHE_DIR"] = old
