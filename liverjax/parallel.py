"""Devices, mesh and sharding: data parallelism over every device of every process.

One `jax.sharding.Mesh` with a single axis, `data`, spans all devices of all processes. Batches are
split along `data` (each process feeds the rows its own devices hold), model and optimizer state
are replicated. The train step is one `jax.jit` over this mesh; XLA inserts the gradient
all-reduce.

Multi-process runs call `initialize_distributed(config.distributed)` before any other JAX call.
`jax.distributed.initialize()` then detects SLURM, Open MPI, Kubernetes and Cloud TPU by itself,
or takes the coordinator address, process count and process id from the config (or from
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: JAX reads the first, this module
the other two). On CPU, processes exchange data through gloo collectives.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables that show a multi-process launch which `jax.distributed.initialize()`
# can configure by itself, each with the value that means "more than one process", if any.
_CLUSTER_HINTS = (
    ("JAX_COORDINATOR_ADDRESS", None),  # explicit coordinator (with JAX_NUM_PROCESSES and ..._ID)
    ("SLURM_NTASKS", "count"),  # srun with several tasks
    ("OMPI_COMM_WORLD_SIZE", "count"),  # mpirun (Open MPI)
    ("TPU_WORKER_HOSTNAMES", "hosts"),  # Cloud TPU VM slice with several hosts
    ("MEGASCALE_COORDINATOR_ADDRESS", None),  # multi-slice TPU
)


def _cluster_detected() -> str | None:
    """The environment variable that shows a multi-process launch, or None."""
    for name, kind in _CLUSTER_HINTS:
        value = os.environ.get(name)
        if not value:
            continue
        if kind == "count" and not (value.isdigit() and int(value) > 1):
            continue
        if kind == "hosts" and "," not in value:
            continue
        return name
    return None


def _enabled(value: Any) -> bool | str:
    """config.distributed.enabled as True, False or 'auto'. The config field holds a string (its
    default is 'auto'), so `--config.distributed.enabled=True` arrives as 'True'."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "1", "false", "0", "auto"):
        return {"true": True, "1": True, "false": False, "0": False}.get(word, "auto")
    raise ValueError(
        f"config.distributed.enabled = {value!r}: use True, False or 'auto' "
        "(initialize when a multi-process launch is detected)"
    )


def initialize_distributed(dist: ml_collections.ConfigDict) -> bool:
    """Start `jax.distributed` if `dist.enabled` is True, or 'auto' and a cluster is detected.

    Returns whether this process is part of a multi-process run. Must run before anything
    touches the devices (jax.devices(), jit, ...).
    """
    enabled = _enabled(dist.enabled)
    explicit = dist.coordinator_address is not None
    hint = None
    if enabled == "auto":
        hint = _cluster_detected()
        enabled = explicit or hint is not None
        if hint:
            logging.info("multi-process launch detected from $%s", hint)
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    # Cross-process collectives on CPU (harmless for GPU/TPU, which have their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    for key in ("coordinator_address", "num_processes", "process_id"):
        if dist.get(key) is not None:
            kwargs[key] = dist[key]
    # JAX reads JAX_COORDINATOR_ADDRESS itself, not these two.
    for key, variable in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and os.environ.get(variable):
            value = os.environ[variable]
            if not value.strip().isdigit():
                raise ValueError(f"${variable} = {value!r}: not a whole number")
            kwargs[key] = int(value)
    if dist.get("initialization_timeout"):
        kwargs["initialization_timeout"] = int(dist.initialization_timeout)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        why = f"${hint} shows a multi-process launch" if hint else "config.distributed asks for it"
        raise ValueError(
            f"jax.distributed did not start ({e}); it was started because {why}. For one "
            "process, set --config.distributed.enabled=False; for several, give "
            "--config.distributed.coordinator_address=HOST:PORT, num_processes and process_id "
            "(or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID)"
        ) from e
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def gather_bytes(data: bytes) -> list[bytes]:
    """`data` of every process, in process order (every process gets the list)."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [data]
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    rows = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [row[:n].tobytes() for row, n in zip(rows, lengths, strict=True)]


def check_same_device_counts() -> None:
    """Raises on every process unless all processes have as many devices: each process feeds an
    equal share of the global batch. From `jax.devices()`, which every process lists whole (an
    exchange of the counts could not even be made: it runs over the devices)."""
    counts = collections.Counter(d.process_index for d in jax.devices())
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"process {i}: {n}" for i, n in sorted(counts.items()))
        raise ValueError(
            f"the processes of this run have different numbers of devices ({shown}); give every "
            "process as many (CUDA_VISIBLE_DEVICES, JAX_LOCAL_DEVICE_IDS, or the launcher's GPUs "
            "per task): each feeds an equal share of the global batch"
        )


def check_processes_agree(settings: Mapping[str, Any], what: str, fix: str) -> None:
    """Raises on every process unless all processes hold the same `settings` (flat, JSON-able):
    a ValueError naming the processes and keys that differ from process 0's. `what` names them
    in the message (e.g. "configs"), `fix` says what to do."""
    import json

    if jax.process_count() == 1:
        return
    mine = json.dumps(dict(settings), sort_keys=True, default=str).encode()
    every = [json.loads(b) for b in gather_bytes(mine)]
    first = every[0]
    differ = {}
    for index, other in enumerate(every[1:], start=1):
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if keys:
            differ[index] = keys
    if differ:

        def listed(i: int, keys: list[str]) -> str:
            pairs = [f"{k} = {every[i].get(k)!r} (process 0: {first.get(k)!r})" for k in keys[:5]]
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            return f"process {i}: {', '.join(pairs)}{more}"

        shown = "; ".join(listed(i, keys) for i, keys in differ.items())
        raise ValueError(f"the processes of this run have different {what} ({shown}); {fix}")


# How long a process looks for process 0's token in the workdir: an NFS client may answer from
# its cache of the folder (up to acdirmin, 30 s by default) that the file is not there.
SHARED_FOLDER_WAIT_ENV = "LIVERJAX_SHARED_FOLDER_WAIT_S"
SHARED_FOLDER_WAIT_S = 60.0


def _sees(marker: Any, token: bytes, wait_s: float) -> bool:
    """Whether `marker` holds `token`, looking again (and listing its folder, which makes an NFS
    client ask the server) for up to `wait_s` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if marker.exists() and marker.read_bytes() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        for folder in (marker.parent, marker.parent.parent):
            try:
                list(folder.iterdir())
            except OSError:
                pass
        time.sleep(1.0)


def check_shared_folder(folder: Any) -> None:
    """Raises on every process unless `folder` (an epath.Path) is one folder that every process
    sees: process 0 writes a token there that each process must read back."""
    import uuid

    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    marker = folder / ".liverjax-shared-check"
    token = gather_bytes(uuid.uuid4().hex.encode())[0]  # process 0's
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_bytes(token)
    multihost_utils.sync_global_devices("liverjax: shared-folder token written")
    seen = _sees(marker, token, float(os.environ.get(SHARED_FOLDER_WAIT_ENV, SHARED_FOLDER_WAIT_S)))
    every = gather_bytes(b"1" if seen else b"0")
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    blind = [i for i, flag in enumerate(every) if flag != b"1"]
    if blind:
        raise ValueError(
            f"--workdir {folder} is not one folder shared by every process: process(es) {blind} "
            "do not see what process 0 wrote there, so the processes cannot write one checkpoint "
            "together; give every process a path on one shared filesystem (or a gs:// path)"
        )


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    # jax.devices() lists each process's devices together, so the rows a process feeds
    # (one contiguous block of the global batch) land on its own devices.
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (model and optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "config.batch_size") -> int:
    """The per-process batch for a global `batch_size`; raises if the devices do not divide it."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if batch_size <= 0 or batch_size % n_dev:
        lower = max(n_dev, batch_size // n_dev * n_dev)
        raise ValueError(
            f"{key} = {batch_size} must be a positive multiple of the device count {n_dev} "
            f"({n_proc} process(es) x {jax.local_device_count()} local devices): each device "
            f"takes an equal share of the global batch; use e.g. {key}={lower} or "
            f"{key}={lower + n_dev}"
        )
    return batch_size // n_proc


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays, split along `data`, from this process's rows of the batch."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
