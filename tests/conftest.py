"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402  (after XLA_FLAGS: training_runs imports jax)
import training_runs as runs  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The built liver/synthetic_small records, with the session's compilation cache turned on."""
    runs.compilation_cache(tmp_path_factory)
    return runs.liver_data(tmp_path_factory)
