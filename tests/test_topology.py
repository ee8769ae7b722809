"""Resuming on another topology: 8 → 4 → 1 devices, and the data iterator across process counts."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
import training_runs as runs

from liverjax import checkpointing, input_pipeline, parallel, topology, train

SAVED_STEP = 3  # batches the iterator has read when the checkpoint is written
NOISE = 0.01  # moves the parameters away from their initial values before saving

RESTORE = """
import sys
import numpy as np
import jax
sys.path.insert(0, {tests!r})
import training_runs as runs
from liverjax import checkpointing, input_pipeline, parallel, train
config = runs.make_config({data_dir!r})
mesh = parallel.create_mesh()
steps = train.make_steps(config, mesh, train.create_optimizer(config, 6, 6))
ckpt = checkpointing.Checkpointer({ckpt!r}, keep=1, keep_best=0, best_metric="roc_auc")
source = input_pipeline.open_source(config.dataset, "train")
it = iter(input_pipeline.train_dataset(source, config, global_batch_size=config.batch_size))
state, meta = ckpt.restore(steps.abstract_state, it)
ckpt.close()
devices = {{len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state)}}
batch = next(it)
np.savez({out!r}, **runs.host_tree(state), next_label=batch["label"], next_image=batch["image"])
print("restored on devices", sorted(devices), "of", jax.device_count())
"""


def _source_and_config(data_dir):
    config = runs.make_config(data_dir)
    return input_pipeline.open_source(config.dataset, "train"), config


def _iterator(source, config):
    return iter(input_pipeline.train_dataset(source, config, global_batch_size=config.batch_size))


def test_checkpoint_of_8_devices_restores_on_4_and_1_bit_for_bit(
    data_dir, tmp_path, tmp_path_factory
):
    assert jax.device_count() == 8
    source, config = _source_and_config(data_dir)
    mesh = parallel.create_mesh()
    steps = train.make_steps(config, mesh, train.create_optimizer(config, 6, 6))
    initial = steps.init()
    keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(initial.params)))
    noisy = jax.tree.unflatten(
        jax.tree.structure(initial.params),
        [
            p + NOISE * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(jax.tree.leaves(initial.params), keys, strict=True)
        ],
    )
    state = initial.replace(params=noisy, step=initial.step + SAVED_STEP)
    assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state)} == {8}
    it = _iterator(source, config)
    read = [next(it) for _ in range(SAVED_STEP + 1)]  # +1: the batch a resumed run reads next
    fresh = _iterator(source, config)
    for _ in range(SAVED_STEP):
        next(fresh)
    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=1, keep_best=0, best_metric="roc_auc")
    ckpt.save(SAVED_STEP, state, fresh, {"step": SAVED_STEP})
    ckpt.close()
    saved = runs.host_tree(state)

    cache = runs.compilation_cache(tmp_path_factory)
    children = {}
    for devices in (4, 1):
        code = RESTORE.format(
            tests=str(runs.REPO / "tests"),
            data_dir=str(data_dir),
            ckpt=str(tmp_path / "ckpt"),
            out=str(tmp_path / f"restored{devices}.npz"),
        )
        env = runs.child_env(cache, devices)
        log = tmp_path / f"restore{devices}.log"
        children[devices] = (runs.start_python(code, env, log), log)
    for devices, (child, log) in children.items():
        assert child.wait(timeout=600) == 0, log.read_text()[-3000:]
        assert f"restored on devices [{devices}] of {devices}" in log.read_text()
        restored = np.load(tmp_path / f"restored{devices}.npz")
        for key, value in saved.items():
            got = restored[key]
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), (devices, key)
        # The data iterator moved too: the next batch is the one the saving run read next.
        np.testing.assert_array_equal(restored["next_image"], read[SAVED_STEP]["image"])
        np.testing.assert_array_equal(restored["next_label"], read[SAVED_STEP]["label"])
    # Not trivially equal: the saved parameters are not the ones a fresh start would draw.
    start = runs.host_tree(initial.params)
    assert all(not np.array_equal(start[k], v) for k, v in runs.host_tree(noisy).items())


def _write_states(directory, states):
    directory.mkdir(parents=True)
    for i, state in enumerate(states):
        (directory / f"process_{i}-of-{len(states)}.json").write_text(json.dumps(state))


def _position(it) -> int:
    return it.get_state()["next_index"]


def test_iterator_saved_by_two_processes_resumes_exactly_in_one(data_dir, tmp_path, caplog):
    source, config = _source_and_config(data_dir)
    # Two processes in lockstep saved the same position (global batch 4) in step 4's checkpoint.
    item = tmp_path / "4" / "data"
    _write_states(item, [{"next_index": 4}, {"next_index": 4}])
    it = _iterator(source, config)
    with caplog.at_level(logging.WARNING, logger="liverjax"):
        topology.restore_iterator(item, it)
    assert _position(it) == 4
    assert "saved by 2 process(es), restored in 1" in caplog.text
    assert "resumes exactly" in caplog.text
    reference = _iterator(source, config)
    for _ in range(4):
        next(reference)
    np.testing.assert_array_equal(next(it)["image"], next(reference)["image"])


def test_iterator_that_cannot_be_placed_exactly_continues_from_the_step(data_dir, tmp_path, caplog):
    source, config = _source_and_config(data_dir)
    # Positions that disagree: no single state to resume from; the checkpoint is step 7's.
    disagree = tmp_path / "7" / "data"
    _write_states(disagree, [{"next_index": 6}, {"next_index": 7}])
    it = _iterator(source, config)
    with caplog.at_level(logging.WARNING, logger="liverjax"):
        topology.restore_iterator(disagree, it)
    assert _position(it) == 7
    assert "cannot be restored exactly in 1" in caplog.text
    assert "saved different positions" in caplog.text
    assert "Continuing from the checkpoint's step 7" in caplog.text

    # A state of another pipeline (grain worker processes): same fallback, never position 0.
    caplog.clear()
    other = tmp_path / "5" / "data"
    workers_state = {"next_index_in_cycle": 1, "iterators_in_use_states": [{"next_index": 3}]}
    _write_states(other, [workers_state, workers_state])
    it = _iterator(source, config)
    with caplog.at_level(logging.WARNING, logger="liverjax"):
        topology.restore_iterator(other, it)
    assert _position(it) == 5
    assert "does not accept the saved state" in caplog.text

    # The same process count, another pipeline (config.input.num_workers changed): the same
    # fallback, not grain's KeyError.
    caplog.clear()
    same = tmp_path / "9" / "data"
    _write_states(same, [workers_state])
    it = _iterator(source, config)
    with caplog.at_level(logging.WARNING, logger="liverjax"):
        topology.restore_iterator(same, it)
    assert _position(it) == 9
    assert "saved by 1 process(es) cannot be restored exactly in 1" in caplog.text


def test_incomplete_or_mixed_iterator_states_are_errors(tmp_path):
    missing = tmp_path / "a" / "3" / "data"
    missing.mkdir(parents=True)
    (missing / "process_0-of-2.json").write_text(json.dumps({"next_index": 3}))
    with pytest.raises(ValueError, match=r"processes \[1\] of 2 are missing"):
        topology.saved_states(missing)
    mixed = tmp_path / "b" / "3" / "data"
    shutil.copytree(missing, mixed)
    (mixed / "process_0-of-1.json").write_text(json.dumps({"next_index": 3}))
    with pytest.raises(ValueError, match=r"found process counts \[1, 2\]"):
        topology.saved_states(mixed)
