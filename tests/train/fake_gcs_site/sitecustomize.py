"""Puts a `jaxsd` command run by the tests on the fake GCS bucket (tests/train/fake_gcs.py).

Only on the PYTHONPATH that `fake_gcs.command_env` gives, and only with JAXSD_FAKE_GCS_ROOT set."""

import os

if os.environ.get("JAXSD_FAKE_GCS_ROOT"):
    from tests.train.fake_gcs import activate

    activate(os.environ["JAXSD_FAKE_GCS_ROOT"])
