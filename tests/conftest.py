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


@pytest.fixture
def fifo():
    """Makes a FIFO (named pipe) at a path. Opening one to read waits for a writer: should the
    code under test do that, a writer opens and closes it after 60 s, so the read gets an empty
    file and the test fails on what it reports instead of hanging."""
    import threading

    timers = []

    def make(path, replace=False):
        if replace:
            os.unlink(path)
        os.mkfifo(path)

        def unblock():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: nobody waits
            except OSError:
                pass

        timer = threading.Timer(60, unblock)
        timer.daemon = True
        timer.start()
        timers.append(timer)
        return path

    yield make
    for timer in timers:
        timer.cancel()
