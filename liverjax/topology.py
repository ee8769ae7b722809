"""Resuming on another topology: the data iterator's position when the process count changes.

Model and optimizer state are restored onto whatever devices the run now has: the checkpoint's
abstract target carries the new mesh's shardings and Orbax reshards on restore (8 → 4 → 1 devices
give the same parameters bit for bit).

The data iterator is saved per process by grain (`process_<i>-of-<n>.json`). In liverjax every
process reads its rows of the same global batches (`input_pipeline.train_dataset`: batch, then
`[process::processes]`), and all processes advance in lockstep, so each saved state is a position
in the stream of *global* batches, the same in every file and independent of the process count.
`DataIteratorHandler` therefore restores:

1. the file of this process, when the process count is unchanged (grain's own behaviour) and
   this iterator accepts it (else 3);
2. otherwise, when all saved files hold the same state and this iterator accepts it, that state:
   the run resumes exactly where it stopped (logged as a warning naming both counts);
3. otherwise (files that disagree, or a state this pipeline cannot take, e.g. after changing
   `config.input.num_workers`), the iterator continues from the checkpoint's step in the stream
   of global batches, with a warning that the order of the rest of the epoch is not the one an
   uninterrupted run would have seen. It never silently restarts the epoch; a state it cannot
   place is an error that says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger("liverjax")

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
# Key of the stream position in the state of a grain iterator over a MapDataset read in threads.
_POSITION_KEY = "next_index"


def saved_states(directory: epath.PathLike) -> tuple[int, dict[int, dict[str, Any]]]:
    """(process count at save time, {process index: iterator state}) of one checkpoint's item."""
    directory = epath.Path(directory)
    found: dict[int, dict[int, dict[str, Any]]] = {}
    for path in directory.iterdir():
        match = _STATE_FILE.fullmatch(path.name)
        if match:
            index, count = int(match[1]), int(match[2])
            found.setdefault(count, {})[index] = json.loads(path.read_text())
    if len(found) != 1:
        raise ValueError(
            f"{directory}: expected the iterator states of one run (process_<i>-of-<n>.json), "
            f"found process counts {sorted(found)}; restore from another checkpoint step"
        )
    ((count, states),) = found.items()
    missing = sorted(set(range(count)) - set(states))
    if missing:
        raise ValueError(
            f"{directory}: iterator states of processes {missing} of {count} are missing (the "
            "checkpoint is incomplete); restore from another checkpoint step"
        )
    return count, states


def _checkpoint_step(directory: epath.Path) -> int:
    """The step of the checkpoint that holds item `directory` (<checkpoints>/<step>/data)."""
    name = directory.parent.name
    if not name.isdigit():
        raise ValueError(f"{directory}: cannot tell the checkpoint's step from {name!r}")
    return int(name)


class ResumeError(ValueError):
    """The saved data position cannot be taken up by this run's pipeline (the checkpoint is
    whole: another process count or worker count)."""


def continue_from_step(iterator: grain.DatasetIterator, step: int) -> None:
    """Move a fresh iterator to global batch `step` (its state must be a plain stream position)."""
    state = iterator.get_state()
    if set(state) != {_POSITION_KEY}:
        raise ResumeError(
            f"cannot move the data iterator to step {step}: its state {sorted(state)} is not a "
            f"plain stream position. Resume with the process count and config.input.num_workers "
            "the checkpoint was written with, or start a new --workdir"
        )
    iterator.set_state({_POSITION_KEY: step})


def restore_iterator(directory: epath.PathLike, iterator: grain.DatasetIterator) -> None:
    """Set `iterator` from the states saved in `directory`, for this run's process count."""
    directory = epath.Path(directory)
    index, count = jax.process_index(), jax.process_count()
    own = directory / f"process_{index}-of-{count}.json"
    if own.exists():  # the same processes (with another pipeline, it may not be accepted)
        saved_count, state = count, json.loads(own.read_text())
    else:
        saved_count, states = saved_states(directory)
        distinct = {json.dumps(s, sort_keys=True) for s in states.values()}
        state = states[0] if len(distinct) == 1 else None
    if state is None:
        reason = f"the {saved_count} processes saved different positions"
    else:
        try:
            iterator.set_state(state)
        except (KeyError, ValueError, TypeError, IndexError) as e:  # config.input.num_workers?
            reason = f"this pipeline does not accept the saved state ({type(e).__name__}: {e})"
        else:
            if saved_count != count:
                logger.warning(
                    "data iterator saved by %d process(es), restored in %d: all saved the same "
                    "position in the global batch stream (%s), so the data resumes exactly",
                    saved_count,
                    count,
                    json.dumps(state),
                )
            return
    step = _checkpoint_step(directory)
    continue_from_step(iterator, step)
    logger.warning(
        "data iterator saved by %d process(es) cannot be restored exactly in %d: %s. Continuing "
        "from the checkpoint's step %d in the stream of global batches: the rest of this epoch "
        "is not in the order an uninterrupted run would have read it",
        saved_count,
        count,
        reason,
        step,
    )


class DataIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's Orbax handler, restoring across process-count changes (see the module doc)."""

    def restore(
        self, directory: epath.Path, item: Any = None, args: Any = None
    ) -> grain.DatasetIterator:
        """Restores the iterator (`args.item`) from `directory`."""
        item = item or args.item
        if not isinstance(item, grain.DatasetIterator):
            return super().restore(directory, item=item, args=args)
        restore_iterator(directory, item)
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(grain.checkpoint.CheckpointSave):
    """Orbax args: save a grain iterator with `DataIteratorHandler`."""


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(grain.checkpoint.CheckpointRestore):
    """Orbax args: restore a grain iterator with `DataIteratorHandler`."""
