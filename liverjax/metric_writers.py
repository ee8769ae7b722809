"""Metric writers for the training loop: TensorBoard event files and the log, without tensorflow.

The same interface as `clu.metric_writers` (write_scalars / write_hparams / flush / close,
`create_default_writer(logdir, just_logging=...)`), which the training loop was written against.
clu's own package imports tensorflow on import (its SummaryWriter is `tf.summary`), and training
must run where tensorflow is not installed, so event files are written here with tensorboard's
pure-Python RecordWriter (its EventFileWriter opens files through tensorflow when installed).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

Scalar = int | float | np.number | np.ndarray

logger = logging.getLogger("liverjax")
_file_ids = itertools.count()  # distinguishes event files opened by one process in one second


class MetricWriter(Protocol):
    """What the training loop writes through."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None: ...
    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class LoggingWriter:
    """Writes metrics as log lines: `[step] name=value, ...`."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """One log line with every scalar."""
        values = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        logger.info("[%d] %s", step, values)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """One log line with every hyperparameter."""
        logger.info("[hparams] %s", dict(hparams))

    def flush(self) -> None:
        """Nothing to flush: log lines are written at once."""

    def close(self) -> None:
        """Nothing to close."""


class TensorBoardWriter:
    """Writes scalars and hparams to a TensorBoard event file in `logdir`.

    `resumed_at`: the step a resumed run restarts from. Events of an earlier process past that
    step (written after its last checkpoint, before it was killed) are replayed now, so the new
    file starts with a SessionLog START at the next step, which tells TensorBoard to drop them
    (as `tf.summary` writers do after a restart). A run started again from step 0 (killed
    before its first checkpoint) does the same where an earlier process left event files.
    """

    def __init__(self, logdir: str | os.PathLike, *, resumed_at: int = 0):
        logdir = epath.Path(logdir)  # a gs:// workdir too (os.makedirs would make a local gs:)
        logdir.mkdir(parents=True, exist_ok=True)
        earlier = any(logdir.glob("events.out.tfevents.*"))
        # The file name TensorBoard looks for: events.out.tfevents.<time>.<host>.<pid>.<id>
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_file_ids)}"
        )
        self._writer = RecordWriter((logdir / name).open("wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if resumed_at > 0 or earlier:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(
                event_pb2.Event(wall_time=time.time(), step=resumed_at + 1, session_log=start)
            )
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """One event holding every scalar at `step`."""
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
        ]
        self._write(
            event_pb2.Event(
                wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
            )
        )

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hyperparameters, for TensorBoard's HParams tab (non-scalars as strings)."""
        clean = {
            k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()
        }
        summary = hparams_summary.hparams_pb(clean)
        self._write(event_pb2.Event(wall_time=time.time(), summary=summary))

    def flush(self) -> None:
        """Write pending events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.flush()
        self._writer.close()


class MultiWriter:
    """Writes to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """Scalars to every writer."""
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters to every writer."""
        for w in self._writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        """Flush every writer."""
        for w in self._writers:
            w.flush()

    def close(self) -> None:
        """Close every writer."""
        for w in self._writers:
            w.close()


def create_default_writer(
    logdir: str | os.PathLike | None, *, just_logging: bool = False, resumed_at: int = 0
) -> MultiWriter:
    """Log lines, plus TensorBoard events in `logdir` unless `just_logging` (processes > 0);
    `resumed_at`: see TensorBoardWriter."""
    writers: list[MetricWriter] = [LoggingWriter()]
    if logdir is not None and not just_logging:
        writers.append(TensorBoardWriter(logdir, resumed_at=resumed_at))
    return MultiWriter(writers)
