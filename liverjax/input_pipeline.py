"""Input pipeline (grain): ArrayRecord records → per-process int16 HU batches, deterministic.

    tfds.data_source(config.dataset.name, split)             random access, no tensorflow
      → MapDataset.source(...).seed(seed).shuffle().repeat()  new order each epoch, from the seed
        (balanced sampling: one such stream per class, mixed 1:1)
      → batch(per-process batch)[process::processes]          this process's rows of each batch
      → to_iter_dataset(read threads, prefetch) [→ mp_prefetch(workers)]

Process p of n takes rows [p*L, (p+1)*L) of every global batch (L = global batch / n). Those are
exactly the rows its devices hold in the global array (`parallel.global_batch`), so the global
batch, and the training run, is the same whatever the number of processes.

Host batches stay int16 HU: windowing, resizing and augmentation run on the device inside the
jitted step (liverjax.preprocess). The train iterator is a grain `DatasetIterator`, whose state
(a position in the stream) is saved in every checkpoint. Evaluation batches cover every example
exactly once: the last global batch is padded, and `mask` is False on padding rows.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath

# Records read at once when scanning a split's labels.
_LABEL_SCAN_CHUNK = 256

IMBALANCE_METHODS = ("none", "pos_weight", "balanced_sampling")


def _dataset_builder(dataset: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `dataset.name` in `dataset.data_dir`; a ValueError naming the config key
    for a dataset or builder config that does not exist (TFDS's own lists every dataset it has)."""
    import tfds_liver  # (registers the `liver` builder)

    try:
        return tfds.builder(dataset.name, data_dir=data_dir(dataset))
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"config.dataset.name = {dataset.name!r}: no such dataset is registered; liverjax's "
            f"is 'liver/<config>', with configs {_config_names(tfds_liver.Builder)}"
        ) from None
    except ValueError as e:
        if "BuilderConfig" not in str(e):
            raise
        raise ValueError(
            f"config.dataset.name = {dataset.name!r}: the builder has no such config, and none "
            f"of that name is built in data_dir={data_dir(dataset) or 'the TFDS default'}; its "
            f"configs: {_config_names(tfds_liver.Builder)} (a JSON config of your own is found "
            "once built: `tfds build --imports tfds_liver liver --config '{\"name\": ...}' "
            "--data_dir DATA`)"
        ) from None


def data_dir(dataset: ml_collections.ConfigDict) -> str | None:
    """`dataset.data_dir`, None (the TFDS default) for "None" or "": a string field set to None
    on the command line (--config.dataset.data_dir=None) holds the text "None"."""
    value = dataset.get("data_dir")
    return None if value is None or str(value).strip() in ("", "None") else value


def _config_names(builder_class: type[tfds.core.DatasetBuilder]) -> str:
    return ", ".join(repr(c.name) for c in builder_class.BUILDER_CONFIGS)


def data_dir_of(builder: tfds.core.DatasetBuilder) -> str:
    """The data_dir a built dataset is under, as given: for a config it has no code for (one
    given as JSON at build time), TFDS reads the records with a ReadOnlyBuilder, whose
    `data_dir_root` is the version's own folder."""
    depth = 3 if builder.builder_config else 2  # root/name[/config]/version
    return os.fspath(epath.Path(builder.data_dir).parents[depth - 1])


def _needs_manual_dir(builder: tfds.core.DatasetBuilder) -> bool:
    return not getattr(builder.builder_config, "phantom_patients", 0)


def _not_built(dataset: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> str:
    """What is missing, and the other versions of the same config built there (records of an
    older liverjax: the builder's RELEASE_NOTES say what changed)."""
    message = (
        f"dataset {dataset.name!r} version {builder.version} is not built in "
        f"data_dir={builder.data_dir_root}"
    )
    config_dir = os.path.dirname(builder.data_dir)
    try:
        names = sorted(os.listdir(config_dir)) if os.path.isdir(config_dir) else []
    except OSError:
        names = []
    others = [
        n
        for n in names
        if n != str(builder.version)
        and os.path.isfile(os.path.join(config_dir, n, "dataset_info.json"))
    ]
    if others:
        message += (
            f"; it holds version {', '.join(others)}, which this liverjax does not read (the "
            f"records changed: RELEASE_NOTES of the builder): rebuild to {builder.version}"
        )
    return message


def ensure_built(dataset: ml_collections.ConfigDict) -> None:
    """Build the dataset records if missing and `dataset.build_if_missing` (process 0 builds)."""
    import jax
    from jax.experimental import multihost_utils

    builder = _dataset_builder(dataset)
    if not builder.is_prepared():
        build = (
            f"`tfds build --imports tfds_liver {dataset.name.split('/')[0]} --config "
            f"{builder.builder_config.name} --manual_dir DIR --data_dir DATA` and "
            "--config.dataset.data_dir=DATA"
        )
        if not dataset.build_if_missing:
            raise FileNotFoundError(
                f"{_not_built(dataset, builder)}; build it with {build}, or set "
                "config.dataset.build_if_missing=True"
            )
        default_manual = os.path.join(builder.data_dir_root, "downloads", "manual")
        if (
            _needs_manual_dir(builder)
            and not dataset.get("manual_dir")
            and not os.path.isdir(default_manual)
        ):
            raise FileNotFoundError(
                f"{_not_built(dataset, builder)}, and building it needs your DICOM: set "
                "--config.dataset.manual_dir=DIR (the folder with the DICOM files and "
                f"labels.csv), or build it with {build}"
            )
        if jax.process_index() == 0:
            logging.info("building %s in %s (first use)", dataset.name, builder.data_dir_root)
            download_config = None
            if dataset.get("manual_dir"):
                if not os.path.isdir(dataset.manual_dir):
                    raise FileNotFoundError(
                        f"config.dataset.manual_dir = {dataset.manual_dir!r}: no such folder; "
                        "give the folder that holds your DICOM files and labels.csv"
                    )
                download_config = tfds.download.DownloadConfig(manual_dir=dataset.manual_dir)
            builder.download_and_prepare(download_config=download_config)
    elif dataset.get("manual_dir") and jax.process_index() == 0:
        from tfds_liver import curation

        # Built before from that manual dir as it was then? Refused, not reused silently.
        curation.check_records_current(builder.data_dir, dataset.manual_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dataset {dataset.name} ready")


def record_size(dataset: ml_collections.ConfigDict) -> int:
    """The side S of the (S, S, 1) images `dataset` holds: from the records' dataset info where
    they are built, else from the builder's code (its config's `image_size`)."""
    shape = _dataset_builder(dataset).info.features["image"].shape
    return int(shape[0])


def open_source(dataset: ml_collections.ConfigDict, split: str) -> Sequence[dict[str, Any]]:
    """Random-access records of one split (ArrayRecord through tfds, without tensorflow).

    `split` may be any tfds split expression ('train[:80%]', 'train+validation'). A split that
    the build left out (the plain build writes no empty split) and one with no records (Beam
    writes empty ones; a slice may select none) get the same error, naming the built splits.
    """
    builder = _dataset_builder(dataset)  # also registers the builder before tfds looks it up
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{_not_built(dataset, builder)}; give --config.dataset.data_dir (or evaluate's "
            "--data_dir) where the records are, or build them"
        )
    where = f"dataset {dataset.name!r} in data_dir={data_dir_of(builder)}"
    counts = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
    hint = f"its splits: {counts or 'none'}"
    why = (
        f". {builder.data_dir}/curation_report.json says why a split came out empty (too few "
        "patients for the split fractions, or files excluded)"
    )
    try:
        n = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        # One the build makes but left out for being empty; else a typo.
        built_name = split in ("train", "validation", "test")
        raise ValueError(
            f"{where}: no split {split!r} ({e}); {hint}{why if built_name else ''}"
        ) from e
    if n == 0:
        raise ValueError(f"{where}: split {split!r} has no records; {hint}{why}")
    return tfds.data_source(dataset.name, split=split, data_dir=data_dir(dataset))


def read_labels(source: Sequence[dict[str, Any]]) -> np.ndarray:
    """The label of every record, in order (reads every record once)."""
    labels = np.empty(len(source), np.int64)
    for start in range(0, len(source), _LABEL_SCAN_CHUNK):
        idx = list(range(start, min(start + _LABEL_SCAN_CHUNK, len(source))))
        records = (
            source.__getitems__(idx)
            if hasattr(source, "__getitems__")
            else [source[i] for i in idx]
        )
        labels[start : start + len(idx)] = [int(r["label"]) for r in records]
    return labels


class _Select(grain.transforms.Map):
    """Keeps the fields that go to the device: image (int16 HU) and label (int32)."""

    def __init__(self, with_mask: bool):
        self.with_mask = with_mask

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {
            "image": np.asarray(record["image"], np.int16),
            "label": np.asarray(record["label"], np.int32),
        }
        if self.with_mask:
            out["mask"] = np.asarray(True)
        return out


class _Subset(Sequence):
    """The records of `source` at `indices` (one class, for balanced sampling)."""

    def __init__(self, source: Sequence, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.indices[i])]


def _shard() -> tuple[int, int]:
    """(this process's index, process count), as grain's ShardByJaxProcess sees them."""
    options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return options.shard_index, options.shard_count


def _to_iter(ds: grain.MapDataset, input_config: ml_collections.ConfigDict) -> grain.IterDataset:
    """Threads that read ahead, and worker processes if configured."""
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=input_config.read_threads,
            prefetch_buffer_size=input_config.prefetch_batches,
        )
    )
    if input_config.num_workers > 0:
        # grain's workers read absl flags (their defaults will do); outside an absl app (a
        # notebook, a script calling train_and_evaluate) nothing has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=input_config.num_workers,
                per_worker_buffer_size=input_config.prefetch_batches,
            ),
            worker_init_fn=_worker_init,
        )
    return it


_PARENT_POLL_SECONDS = 1.0
_DEFERRED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT held back in this thread, and delivered when the block ends, around
    what starts grain's worker processes (an iterator's first element). The threads and
    processes started inside inherit the blocked signals, so a signal sent to the process group
    cannot kill a worker before `_worker_init` makes it ignore them."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_init(worker_index: int, worker_count: int) -> None:
    """In each grain worker process: the training process decides when its workers stop.

    SIGTERM and SIGINT sent to the whole process group (a scheduler's preemption, Ctrl-C in a
    terminal) are ignored here: the training process saves a checkpoint and then stops its
    workers itself (grain sets a stop event, then kills). A worker exits once the process that
    started it is gone (SIGKILLed, it cannot stop them), instead of reading records forever.
    """
    del worker_index, worker_count
    for signum in _DEFERRED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # started with them blocked: ignored from here on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED_SIGNALS)
    # The process that started this one (it may be gone already: a worker can still be starting
    # when the training process is killed, and is then the child of another).
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None else os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def train_dataset(
    source: Sequence[dict[str, Any]],
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    labels: np.ndarray | None = None,
) -> grain.IterDataset:
    """Endless shuffled training batches of this process: {'image': (L,S,S,1) int16, 'label'}.

    With `config.imbalance.method == 'balanced_sampling'`, `labels` (of every record) is needed:
    each class is shuffled and repeated on its own, and batches draw from both in turn.
    """
    if len(source) == 0:
        raise ValueError(f"split {config.dataset.train_split!r} of {config.dataset.name} is empty")
    index, count = _shard()
    local_batch = global_batch_size // count

    def stream(src: Sequence) -> grain.MapDataset:
        return grain.MapDataset.source(src).seed(config.seed).shuffle().repeat()

    if config.imbalance.method == "balanced_sampling":
        if labels is None:
            raise ValueError("balanced sampling needs the labels of the training split")
        classes = [np.flatnonzero(labels == c) for c in (0, 1)]
        if any(len(c) == 0 for c in classes):
            raise ValueError(
                f"config.imbalance.method='balanced_sampling' needs both classes in split "
                f"{config.dataset.train_split!r}; it has {len(classes[0])} normal and "
                f"{len(classes[1])} lesion records"
            )
        ds = grain.MapDataset.mix([stream(_Subset(source, c)) for c in classes], [0.5, 0.5])
    else:
        ds = stream(source)
    ds = ds.map(_Select(with_mask=False))
    ds = ds.batch(local_batch, drop_remainder=True)[index::count]
    return _to_iter(ds, config.input)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Global evaluation batches that cover `num_examples` (the last one padded)."""
    return -(-num_examples // global_batch_size)


def eval_dataset(
    source: Sequence[dict[str, Any]],
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
) -> Iterable[dict[str, np.ndarray]]:
    """Every record once, in order, padded to whole global batches; 'mask' marks real rows."""
    if len(source) == 0:
        raise ValueError("cannot evaluate on an empty split")
    index, count = _shard()
    ds = grain.MapDataset.source(source).map(_Select(with_mask=True))
    n_pad = num_eval_batches(len(source), global_batch_size) * global_batch_size - len(source)
    if n_pad:
        pad = {k: np.zeros_like(v) for k, v in ds[0].items()}  # mask False, label 0, image 0
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([pad]).repeat(n_pad)])
    ds = ds.batch(global_batch_size // count)[index::count]
    return _StartsWithSignalsDeferred(_to_iter(ds, config.input))


class _StartsWithSignalsDeferred:
    """An iterable of `ds` whose first element (when grain starts its worker processes and
    threads) is read with `signals_deferred`."""

    def __init__(self, ds: Iterable[dict[str, np.ndarray]]):
        self._ds = ds

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        it = iter(self._ds)
        try:
            with signals_deferred():
                first = next(it, None)
            if first is None:
                return
            yield first
            yield from it
        finally:  # read to the end or abandoned: grain's workers and shared memory go now
            close(it)


def close(it: Iterator[Any]) -> None:
    """Stop a grain iterator's threads and worker processes now rather than when it is garbage
    collected; an error doing so is logged, never raised over the one being handled."""
    try:
        getattr(it, "close", lambda: None)()
    except Exception as e:  # noqa: BLE001
        logging.getLogger("liverjax").warning("closing the input pipeline: %s", e)
