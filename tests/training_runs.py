"""Shared by the training tests: the synthetic_small records, the test config, child processes.

Compiled programs are cached on disk for the whole test session (JAX's persistent compilation
cache), so the many short runs here, in this process and in child processes, compile each
distinct program once. A cached executable is the one a fresh compile would produce.
"""

import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
from tensorboard.compat.proto import event_pb2

REPO = pathlib.Path(__file__).resolve().parents[1]
DATASET = "liver/synthetic_small"
_build_lock = threading.Lock()

if str(REPO) not in sys.path:  # configs/ is imported as in `python -m liverjax.main` from REPO
    sys.path.insert(0, str(REPO))


def session_dir(tmp_path_factory) -> pathlib.Path:
    """A folder shared by every test of this pytest session."""
    return tmp_path_factory.getbasetemp()


def compilation_cache(tmp_path_factory) -> pathlib.Path:
    """Turn on the persistent compilation cache in this process; returns its folder."""
    path = session_dir(tmp_path_factory) / "jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def liver_data(tmp_path_factory) -> pathlib.Path:
    """data_dir holding the built liver/synthetic_small records (built once per session)."""
    import tensorflow_datasets as tfds

    import tfds_liver  # noqa: F401  (registers the builder)

    path = session_dir(tmp_path_factory) / "liver_data"
    with _build_lock:
        tfds.builder(DATASET, data_dir=str(path)).download_and_prepare()
    return path


def make_config(data_dir: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    """configs/test.py on the synthetic_small records, with `overrides` ('a.b': value)."""
    from configs import test as test_config_module

    config = test_config_module.get_config()
    config.dataset.data_dir = str(data_dir)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[last] = value
    return config


def child_env(cache: pathlib.Path, devices: int) -> dict[str, str]:
    """Environment of a child process with `devices` CPU devices and the shared compile cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    return env


def start_python(
    code: str, env: dict[str, str], log: pathlib.Path, *, new_session: bool = False
) -> subprocess.Popen:
    """Run `code` in a child Python (cwd: the repository), output to `log`; `new_session`: in a
    process group of its own (what `os.killpg` signals, as a scheduler signals a job)."""
    out = open(log, "w")  # noqa: SIM115  (closed with the process by the caller's wait)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_tree(tree) -> dict[str, np.ndarray]:
    """{path: numpy array} of every leaf of a pytree (params, optimizer state)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def read_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files in `logdir`."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, data, data crc
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
