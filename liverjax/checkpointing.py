"""Checkpoints: train state, data iterator and run metadata saved together with Orbax.

One checkpoint (`<dir>/<step>/`) holds three items, written as one `ocp.args.Composite`:

    state  the TrainState pytree (params, optimizer state, step, rng), `StandardSave`
    data   the grain iterator position of every process, `grain.checkpoint.CheckpointSave`
           (restored across process-count changes by liverjax.topology)
    meta   JSON: epoch, early-stopping counters, validation metrics, ...

Saves are asynchronous (training goes on while arrays are written; the iterator and JSON items
are written before `save` returns, so they describe the same step as the arrays). Retention is
one `CheckpointManager` with a union of two preservation policies: the latest `keep` checkpoints,
plus the `keep_best` with the highest validation metric (checkpoints saved between evaluations
carry no metric and count only as latest). `best_fn` is set as well: Orbax stores a checkpoint's
metrics only when it tracks a best metric. A checkpoint is visible only once finalized, so a
run killed mid-save restarts from the previous one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from liverjax import metrics as liver_metrics
from liverjax import topology

logger = logging.getLogger("liverjax")

ORBAX_LOGS_ENV = "LIVERJAX_ORBAX_LOGS"  # "warning" (the default) or "info"
_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"


_ERROR_CHARS = 300  # of a restore error's first line, in CheckpointReadError
# Orbax's words for an array of another shape or dtype than the network asks for
_MISMATCH_SIGNS = ("stored shape", "Requested shape", "not compatible with the stored")


class CheckpointReadError(ValueError):
    """A checkpoint that exists cannot be restored: a damaged or truncated file, or arrays of
    another shape than the network of this config."""


def _damaged_metrics(directory: str) -> str | None:
    """What to do about the first kept checkpoint whose metrics file is not JSON (truncated by
    a full disk or a copy cut short), which stops Orbax from opening the folder at all."""
    if "://" in directory or not os.path.isdir(directory):
        return None
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    for step in steps:
        path = os.path.join(directory, str(step), "metrics", "metrics")
        try:
            with open(path, "rb") as f:
                json.loads(f.read())
        except FileNotFoundError:
            continue
        except ValueError as e:
            return (
                f"checkpoint {step} in {directory} is damaged: {path} is not JSON ({e}), and no "
                f"checkpoint of the folder can be opened while it is there; move "
                f"{os.path.join(directory, str(step))} out of the way (its state may be whole: "
                "the metrics file only ranks it for keep_best)"
            )
    return None


class _OrbaxBelowWarning(logging.Filter):
    """Drops records below WARNING logged from Orbax's source files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _ORBAX_SOURCE not in record.pathname


_ORBAX_FILTER = _OrbaxBelowWarning()
# Where Orbax's records start: absl's logger (most of Orbax) and the root logger (its modules
# that call `logging.info` directly). A logger's filters see only the records logged on it.
_ORBAX_LOGGERS = ("absl", "")


def command_logging() -> None:
    """The evaluate, export and predict commands' logging: liverjax's INFO lines (through a
    root handler of this format, where nothing imported has set one up yet), Orbax's quietened
    (`quiet_orbax_logs`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # basicConfig does nothing once grain or Orbax (imported) gave the root logger a handler
    logging.getLogger("liverjax").setLevel(logging.INFO)
    quiet_orbax_logs()


def quiet_orbax_logs() -> bool:
    """Keep Orbax's warnings and errors, not its INFO lines; returns whether they are dropped.

    Orbax logs about 40 INFO lines for every save (handlers, threads, tmp directories, barrier
    syncs) and 15 when a manager starts, through absl's logger; training logs one line per save
    itself. The command-line entry points call this; LIVERJAX_ORBAX_LOGS=info keeps them all.
    """
    choice = os.environ.get(ORBAX_LOGS_ENV, "warning")
    if choice not in ("warning", "info"):
        raise ValueError(f"{ORBAX_LOGS_ENV}={choice!r}: use 'warning' (the default) or 'info'")
    for name in _ORBAX_LOGGERS:
        named = logging.getLogger(name)
        named.removeFilter(_ORBAX_FILTER)
        if choice == "warning":
            named.addFilter(_ORBAX_FILTER)
    return choice == "warning"


def check_retention(keep: Any, keep_best: Any) -> None:
    """Raise ValueError naming config.checkpoint.keep / keep_best when they cannot be kept."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"config.checkpoint.keep = {keep!r}: must keep at least the latest")
    if not isinstance(keep_best, int) or keep_best < 0:
        raise ValueError(f"config.checkpoint.keep_best = {keep_best!r}: must be >= 0")


class Checkpointer:
    """Saves and restores (state, data iterator, metadata) in `directory`."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int,
        keep_best: int,
        best_metric: str,
        async_save: bool = True,
    ):
        check_retention(keep, keep_best)
        self.best_metric = best_metric
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
        if keep_best:
            policies.append(pp.BestN(get_metric_fn=self._metric_value, n=keep_best))
        # Each item's handler for its save and restore args, registered up front (the deprecated
        # `item_handlers` wraps grain's handler in a legacy adapter whose args do not match).
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, save, restore, handler in (
            (
                "state",
                ocp.args.StandardSave,
                ocp.args.StandardRestore,
                ocp.StandardCheckpointHandler,
            ),
            # The data iterator, also across process counts.
            ("data", topology.DataSave, topology.DataRestore, topology.DataIteratorHandler),
            ("meta", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
        ):
            instance = handler()
            registry.add(item, save, instance)
            registry.add(item, restore, instance)
        directory = os.fspath(directory)
        if "://" not in directory:  # Orbax wants local paths absolute (`--workdir runs/demo`)
            directory = os.path.abspath(directory)
        try:
            self._manager = ocp.CheckpointManager(
                directory,
                handler_registry=registry,
                options=ocp.CheckpointManagerOptions(
                    preservation_policy=pp.AnyPreservationPolicy(policies),
                    best_fn=self._metric_value,
                    best_mode="max",
                    enable_async_checkpointing=async_save,
                    create=True,
                ),
            )
        except ValueError as e:  # Orbax reads every kept step's metrics file as it starts
            raise CheckpointReadError(_damaged_metrics(directory) or str(e)) from e

    def _metric_value(self, metrics: Mapping[str, Any]) -> tuple[float, int]:
        """Ranking key of a checkpoint: its validation metric (negated where lower is better),
        then the earlier step on ties. No metric, or NaN (the AUC of one class), ranks last.
        """
        value = liver_metrics.higher_is_better(
            self.best_metric, metrics.get(self.best_metric, math.nan)
        )
        return (value, -int(metrics.get("step", 0)))

    @property
    def directory(self) -> str:
        """Where the checkpoints are."""
        return os.fspath(self._manager.directory)

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalized checkpoint's step, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept checkpoint with the best validation metric, or None if none has a finite one
        (no evaluation yet, or NaN throughout: the AUC of a validation split of one class)."""
        metrics = {s: self._manager.metrics(s) or {} for s in self.all_steps()}
        scored = [(self._metric_value(m), s) for s, m in metrics.items() if self.best_metric in m]
        if not scored or max(scored)[0][0] == -math.inf:
            return None
        return max(scored)[1]

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator,
        meta: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Start saving checkpoint `step` (no-op if it exists); returns whether it saves."""
        if step in self._manager.all_steps():
            return False
        reason = meta.get("stop_reason")
        logger.info(
            "checkpoint %d: saving in %s%s",
            step,
            self.directory,
            f" ({reason})" if reason else "",
        )
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=topology.DataSave(data_iterator),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
            # {} rather than None: Orbax warns about every save without metrics.
            metrics={**metrics, "step": step} if metrics is not None else {},
            force=True,
        )

    def restore(
        self,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None,
        step: int | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step` (default: latest); moves `data_iterator` there."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = topology.DataRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except topology.ResumeError:
            raise
        except Exception as e:  # a damaged checkpoint: TensorStore's error is pages of JSON
            raise CheckpointReadError(self._unreadable(step, e)) from e
        return restored["state"], dict(restored["meta"])

    def _unreadable(self, step: int, error: Exception) -> str:
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        if len(first) > _ERROR_CHARS:
            first = first[:_ERROR_CHARS] + "..."
        if any(sign in text for sign in _MISMATCH_SIGNS):
            return (
                f"checkpoint {step} in {self.directory} holds another network than this config "
                f"makes ({type(error).__name__}: {first}); the checkpoint is whole: restore it "
                "with the config it was trained with (the run's config.json), or train this "
                "one in a new --workdir"
            )
        older = [s for s in self.all_steps() if s < step]
        what = (
            f"move {os.path.join(self.directory, str(step))} out of the way to resume from "
            f"checkpoint {max(older)}, the newest before it (or --checkpoint {max(older)} to "
            "evaluate it)"
            if older
            else "no older checkpoint is kept: start a new --workdir"
        )
        return (
            f"checkpoint {step} in {self.directory} cannot be read "
            f"({type(error).__name__}: {first}); {what}"
        )

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to stop at `step` (multi-process preemption notice)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending saves are finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.close()
