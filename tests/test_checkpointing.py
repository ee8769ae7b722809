"""Checkpoints: exact resumption after SIGTERM and after SIGKILL, retention, config changes."""

import json
import logging
import os
import signal
import textwrap
import time

import grain
import jax
import numpy as np
import pytest
import training_runs as runs

from liverjax import checkpointing, metric_writers, train

STEPS = 12  # two epochs of synthetic_small at batch 8; checkpoints every 5 steps and each epoch


@pytest.fixture(scope="module")
def uninterrupted_workdir(data_dir, tmp_path_factory):
    """(workdir, parameters and optimizer state) after STEPS steps without interruption."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = train.train_and_evaluate(runs.make_config(data_dir), str(workdir))
    assert summary.step == STEPS and summary.stop_reason == "done"
    return workdir, runs.host_tree(summary.state)


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: each tag's (step, value), replayed steps' old events dropped."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def _assert_identical(state: train.TrainState, reference: dict[str, np.ndarray]) -> None:
    got = runs.host_tree(state)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        # Bit for bit: same dtype, same bytes (NaN-safe, unlike ==).
        assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key


def _signal_at(step: int, signum: int):
    def hook(current: int) -> None:
        if current == step:
            os.kill(os.getpid(), signum)

    return hook


def test_relative_workdir_trains_and_checkpoints_there(data_dir, tmp_path, monkeypatch):
    """`--workdir runs/demo`, as the README writes it: Orbax itself accepts only absolute paths."""
    monkeypatch.chdir(tmp_path)
    summary = train.train_and_evaluate(runs.make_config(data_dir), os.path.join("runs", "w"))
    assert summary.step == STEPS and summary.stop_reason == "done"
    ckpt = checkpointing.Checkpointer(
        os.path.join("runs", "w", train.CHECKPOINT_DIR), keep=3, keep_best=1, best_metric="roc_auc"
    )
    assert ckpt.directory == str(tmp_path / "runs" / "w" / train.CHECKPOINT_DIR)
    assert ckpt.latest_step() == STEPS
    ckpt.close()


def test_sigterm_saves_exits_and_resume_is_bit_identical(data_dir, tmp_path, uninterrupted_workdir):
    config = runs.make_config(data_dir)
    before = signal.getsignal(signal.SIGTERM)
    stopped = train.train_and_evaluate(config, str(tmp_path), hooks=[_signal_at(3, signal.SIGTERM)])
    # The step in flight finished, was saved (3 is neither a save interval, an epoch end nor a
    # log step), and the run returned normally.
    assert (stopped.step, stopped.stop_reason) == (3, "preempted")
    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    assert ckpt.all_steps() == [3]
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handler is removed again

    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert (resumed.step, resumed.stop_reason) == (STEPS, "done")
    reference_dir, reference = uninterrupted_workdir
    _assert_identical(resumed.state, reference)
    # The logged training averages too: step 4's covers steps 3 and 4, as without the stop.
    got, want = _tensorboard_scalars(tmp_path), _tensorboard_scalars(reference_dir)
    for tag in ("train/loss", "train/accuracy", "validation/roc_auc"):
        assert got[tag] == want[tag], tag


@pytest.mark.parametrize("first_at", [3, None])
def test_a_second_sigterm_while_the_checkpoint_is_written_does_not_lose_it(
    data_dir, tmp_path, tmp_path_factory, first_at
):
    # srun and some launchers send SIGTERM twice: the second comes as the run waits for its
    # preemption save. A child process, as the default SIGTERM would end the test runner.
    # first_at=None: the only SIGTERM comes as a finished run writes its last checkpoint; it
    # is saved, and the run stops as preempted (no final evaluation).
    code = textwrap.dedent(
        f"""
        import os, signal
        from configs import test
        from liverjax import checkpointing, train
        config = test.get_config()
        config.dataset.data_dir = {str(data_dir)!r}
        close = checkpointing.Checkpointer.close
        def close_after_a_second_sigterm(self):
            os.kill(os.getpid(), signal.SIGTERM)
            close(self)
        checkpointing.Checkpointer.close = close_after_a_second_sigterm
        def hook(step):
            if step == {first_at!r}:
                os.kill(os.getpid(), signal.SIGTERM)
        summary = train.train_and_evaluate(config, {str(tmp_path)!r}, hooks=[hook])
        print("stopped", summary.step, summary.stop_reason)
        """
    )
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=8)
    log = tmp_path / "child.log"
    child = runs.start_python(code, env, log)
    assert child.wait(timeout=300) == 0, log.read_text()[-3000:]
    last = first_at or STEPS
    assert f"stopped {last} preempted" in log.read_text()
    said = "SIGTERM again: the checkpoint" if first_at else "SIGTERM: the last checkpoint"
    assert said in log.read_text()
    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    assert ckpt.latest_step() == last
    ckpt.close()
    assert not list((tmp_path / train.CHECKPOINT_DIR).glob("*tmp*"))


def test_a_workdir_another_run_trains_in_is_refused(data_dir, tmp_path):
    import fcntl

    config = runs.make_config(data_dir)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text("{}")  # as the other run left it
    before = sorted(p.name for p in (tmp_path / "w").iterdir())
    other = os.open(tmp_path / "w", os.O_RDONLY)  # the other run's lock (another process's)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(train.WorkdirInUseError, match="is in use by another training run"):
            train.train_and_evaluate(config, str(tmp_path / "w"))
    finally:
        os.close(other)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == before
    for _ in range(2):  # released when a run ends: the next one takes it
        with train._workdir_lock(tmp_path / "w"):
            pass
    # A new workdir: locked once the run has made it.
    with train._workdir_lock(tmp_path / "new") as take:
        (tmp_path / "new").mkdir()
        take()
        other = os.open(tmp_path / "new", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_main_on_sigterm_saves_skips_the_final_evaluation_and_exits_143(
    data_dir, tmp_path, tmp_path_factory
):
    """`python -m liverjax.main` preempted: the grace period goes to the save, not to evaluating a
    half-trained model, and the scheduler sees the run did not finish (status 128 + SIGTERM;
    liverjax.main is not imported here: its absl flags would clash with other CLIs' in-process).
    The signal goes to the whole process group, as Slurm and a terminal send it: the grain
    workers (validation starts new ones) leave the save to the training process."""
    argv = [
        "liverjax.main",
        "--config=configs/test.py",
        f"--workdir={tmp_path}",
        f"--config.dataset.data_dir={data_dir}",
        "--config.num_train_steps=100000",
        "--config.final_eval_split=test",
        "--config.input.num_workers=2",
        "--config.eval_every_steps=2",
    ]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module('liverjax.main', "
    code += "run_name='__main__')"
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=8)
    log = tmp_path / "main.log"
    child = runs.start_python(code, env, log, new_session=True)
    deadline = time.monotonic() + 240
    while "[4] " not in log.read_text() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until step 4 is logged: training is under way
    os.killpg(child.pid, signal.SIGTERM)
    assert child.wait(timeout=240) == 143, log.read_text()[-3000:]
    assert "terminated unexpectedly" not in log.read_text()
    assert "final evaluation skipped" in log.read_text()
    assert not (tmp_path / "report").exists()
    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    assert 4 <= ckpt.latest_step() < 100000
    ckpt.close()


def test_sigkill_between_checkpoints_replays_from_last_and_is_bit_identical(
    data_dir, tmp_path, tmp_path_factory, uninterrupted_workdir
):
    config = runs.make_config(data_dir)
    # A child process trains and is killed with SIGKILL at step 9: after the checkpoints of
    # steps 5 and 6, before the one of step 10. Nothing runs at exit, no save is finished.
    code = textwrap.dedent(
        f"""
        import os, signal
        from configs import test
        from liverjax import train
        config = test.get_config()
        config.dataset.data_dir = {str(data_dir)!r}
        def hook(step):
            if step == 9:
                os.kill(os.getpid(), signal.SIGKILL)
        train.train_and_evaluate(config, {str(tmp_path)!r}, hooks=[hook])
        """
    )
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=8)
    child = runs.start_python(code, env, tmp_path / "child.log")
    assert child.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "child.log").read_text()

    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    last = ckpt.latest_step()
    ckpt.close()
    assert last in (5, 6)  # 6 if its asynchronous save finished before the kill
    # What the killed process logged is on disk (flushed as written), up to its last log step.
    assert [s for s, _ in runs.read_scalars(tmp_path)["train/loss"]] == [2, 4, 6, 8]

    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert resumed.step == STEPS
    reference_dir, reference = uninterrupted_workdir
    _assert_identical(resumed.state, reference)
    # TensorBoard shows each step once: the replayed steps' events of the killed process are
    # dropped (the resumed file starts with a SessionLog START), the earlier ones kept. The
    # values are the uninterrupted run's (from step 5: its window holds step 5, saved).
    scalars = _tensorboard_scalars(tmp_path)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in scalars["validation/roc_auc"]] == [6, 12]
    want = _tensorboard_scalars(reference_dir)
    for tag in ("train/loss", "train/accuracy", "validation/roc_auc"):
        assert scalars[tag] == want[tag], tag


def test_a_run_started_again_from_step_0_shows_each_step_once(tmp_path):
    # Killed before its first checkpoint, the relaunch starts from 0 in a logdir that already
    # holds the first process's events: TensorBoard must drop them, not show steps twice.
    first = metric_writers.TensorBoardWriter(tmp_path)
    for step in (2, 4, 6):
        first.write_scalars(step, {"train/loss": 1.0})
    first.close()
    again = metric_writers.TensorBoardWriter(tmp_path)
    for step in (2, 4, 6, 8):
        again.write_scalars(step, {"train/loss": 0.5})
    again.close()
    assert _tensorboard_scalars(tmp_path)["train/loss"] == [(s, 0.5) for s in (2, 4, 6, 8)]


def test_a_truncated_metrics_file_is_named_with_what_to_do(tmp_path):
    state = {"w": np.zeros(2, np.float32)}
    ckpt = checkpointing.Checkpointer(tmp_path, keep=3, keep_best=1, best_metric="roc_auc")
    it = _iterator()
    for step in (2, 4):
        ckpt.save(step, state, it, {"step": step}, metrics={"roc_auc": 0.5 + step / 10})
    ckpt.close()
    metrics_file = tmp_path / "2" / "metrics" / "metrics"
    metrics_file.write_bytes(metrics_file.read_bytes()[:5])  # a copy cut short
    with pytest.raises(checkpointing.CheckpointReadError) as e:
        checkpointing.Checkpointer(tmp_path, keep=3, keep_best=1, best_metric="roc_auc")
    assert str(e.value).startswith(f"checkpoint 2 in {tmp_path} is damaged: {metrics_file}")
    assert f"move {tmp_path / '2'} out of the way" in str(e.value)
    (tmp_path / "2").rename(tmp_path.parent / "moved")
    ckpt = checkpointing.Checkpointer(tmp_path, keep=3, keep_best=1, best_metric="roc_auc")
    assert ckpt.all_steps() == [4]
    ckpt.close()


def _iterator(length: int = 40) -> grain.DatasetIterator:
    ds = grain.MapDataset.range(length).seed(1).shuffle().repeat().batch(4)
    return iter(ds.to_iter_dataset())


@pytest.mark.parametrize(
    "metric, values, best",
    [
        ("brier", {2: 0.30, 4: 0.20, 6: 0.25, 8: 0.40}, 4),  # lower is better
        ("ece", {2: 0.10, 4: 0.05, 6: 0.05, 8: 0.20}, 4),  # a tie: the earlier
        ("roc_auc", {2: 0.6, 4: 0.8, 6: 0.7, 8: 0.5}, 4),
        ("roc_auc", {2: float("nan"), 4: float("nan")}, None),  # one-class validation throughout
    ],
)
def test_best_checkpoint_follows_the_metric_direction(tmp_path, metric, values, best):
    state = {"w": np.zeros(2, np.float32)}
    ckpt = checkpointing.Checkpointer(tmp_path, keep=1, keep_best=1, best_metric=metric)
    it = _iterator()
    for step, value in values.items():
        ckpt.save(step, state, it, {"step": step}, metrics={metric: value})
    ckpt.wait()
    assert ckpt.best_step() == best
    if best is not None:  # the best is the one retention keeps, beside the latest
        assert ckpt.all_steps() == sorted({best, max(values)})
    ckpt.close()


def test_keeps_latest_and_best_and_restores_iterator(tmp_path):
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(0)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    aucs = {2: 0.9, 4: 0.7, 6: 0.9, 8: 0.6}  # 2 and 6 tie: the earlier one is the best
    ckpt = checkpointing.Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="roc_auc")
    it = _iterator()
    for step in range(1, 10):
        next(it)
        metrics = {"roc_auc": aucs[step]} if step in aucs else None
        state = {"w": state["w"] + 1, "step": np.int32(step)}
        ckpt.save(step, state, it, {"step": step}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 8, 9]  # latest two + best
    assert ckpt.best_step() == 2
    ckpt.close()

    # A new process view: restore step 8's state, metadata and data position.
    reopened = checkpointing.Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="roc_auc")
    assert reopened.best_step() == 2 and reopened.latest_step() == 9
    fresh = _iterator()
    restored, meta = reopened.restore(abstract, fresh, step=8)
    reopened.close()
    assert meta == {"step": 8} and int(restored["step"]) == 8
    np.testing.assert_array_equal(restored["w"], np.arange(6).reshape(2, 3) + 8)
    reference = _iterator()
    for _ in range(8):
        next(reference)
    for _ in range(12):  # through the end of the epoch and into the reshuffled next one
        np.testing.assert_array_equal(next(fresh), next(reference))


def test_resume_refuses_a_different_network_and_warns_on_other_changes(data_dir, tmp_path, caplog):
    config = runs.make_config(data_dir, num_train_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / train.CONFIG_FILE).read_text())
    assert saved["model"]["widths"] == list(config.model.widths)

    wider = runs.make_config(data_dir, num_train_steps=2, **{"model.widths": (8, 32)})
    with pytest.raises(ValueError, match=r"model\.widths: \[8, 16\] -> \[8, 32\]"):
        train.save_config(wider, tmp_path)
    with pytest.raises(ValueError, match=r"optimizer\.name: 'adam' -> 'sgd'"):
        train.save_config(runs.make_config(data_dir, **{"optimizer.name": "sgd"}), tmp_path)
    # Evaluation and export of the older checkpoints would window their inputs differently.
    with pytest.raises(
        ValueError, match=r"preprocessing .*preprocess\.window_center: 40\.0 -> 300"
    ):
        train.save_config(
            runs.make_config(data_dir, **{"preprocess.window_center": 300.0}), tmp_path
        )

    slower = runs.make_config(data_dir, num_train_steps=2, **{"optimizer.learning_rate": 1e-3})
    with caplog.at_level("WARNING", logger="liverjax"):
        train.save_config(slower, tmp_path)
    assert "optimizer.learning_rate: 0.01 -> 0.001" in caplog.text
    assert json.loads((tmp_path / train.CONFIG_FILE).read_text())["optimizer"]["learning_rate"] == (
        1e-3
    )
    # Dropout and the compute dtype change no shape: the run resumes (with the usual warning).
    other = {"model.dropout": 0.3, "model.dtype": "bfloat16", "optimizer.learning_rate": 1e-3}
    caplog.clear()
    with caplog.at_level("WARNING", logger="liverjax"):
        more = train.train_and_evaluate(
            runs.make_config(data_dir, num_train_steps=4, **other), str(tmp_path)
        )
    assert more.step == 4 and more.traces["train_step"] == 1
    assert "model.dropout: 0.1 -> 0.3" in caplog.text
    assert "model.dtype: 'float32' -> 'bfloat16'" in caplog.text
    assert "saved data position" not in caplog.text
    # Where the processes are is not a change of the run.
    caplog.clear()
    moved = runs.make_config(data_dir, num_train_steps=4, **other)
    moved.distributed.coordinator_address = "10.0.0.1:1234"
    with caplog.at_level("WARNING", logger="liverjax"):
        train.save_config(moved, tmp_path)
    assert "distributed" not in caplog.text
    with caplog.at_level("WARNING", logger="liverjax"):
        train.save_config(runs.make_config(data_dir, num_train_steps=4, batch_size=16), tmp_path)
    assert "batch_size changed: the saved data position counts global batches" in caplog.text


@pytest.fixture
def orbax_log_filter():
    """No Orbax log filter before and after the test (in-process CLI mains of other tests set it;
    the test process is shared)."""

    def remove():
        for name in checkpointing._ORBAX_LOGGERS:
            logging.getLogger(name).removeFilter(checkpointing._ORBAX_FILTER)

    remove()
    yield
    remove()


def _save_logs(directory, caplog, state_step: int) -> list[logging.LogRecord]:
    """Records (INFO and up, any logger) of creating a Checkpointer and saving one step."""
    caplog.clear()
    # absl's own level too: TensorFlow's SavedModel writer (test_export, in this process) leaves
    # it at WARNING after muting and restoring absl's verbosity.
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        ckpt = checkpointing.Checkpointer(directory, keep=2, keep_best=0, best_metric="roc_auc")
        state = {"w": np.zeros((2, 3), np.float32), "step": np.int32(state_step)}
        ckpt.save(state_step, state, _iterator(), {"stop_reason": "preempted"})
        ckpt.close()
    return list(caplog.records)


def test_orbax_info_lines_are_dropped_and_one_line_per_save_kept(
    tmp_path, caplog, monkeypatch, orbax_log_filter
):
    def from_orbax(records):
        return [r for r in records if checkpointing._ORBAX_SOURCE in r.pathname]

    loud = _save_logs(tmp_path / "loud", caplog, 1)
    assert len(from_orbax(loud)) > 10  # Orbax as it logs: handlers, threads, directories...

    assert checkpointing.quiet_orbax_logs()
    for name in ("absl", ""):  # Orbax logs through absl, and in a few modules on the root logger
        assert checkpointing._ORBAX_FILTER in logging.getLogger(name).filters, name
    quiet = _save_logs(tmp_path / "quiet", caplog, 2)
    assert from_orbax(quiet) == [], [r.getMessage() for r in from_orbax(quiet)]
    ours = [r.getMessage() for r in quiet if r.name == "liverjax"]
    assert ours == [f"checkpoint 2: saving in {tmp_path / 'quiet'} (preempted)"]
    # Orbax's warnings still come through
    source = f"x{os.sep}orbax{os.sep}y.py"
    warned = logging.LogRecord("absl", logging.WARNING, source, 1, "w", (), None)
    info = logging.LogRecord("absl", logging.INFO, source, 1, "i", (), None)
    assert checkpointing._ORBAX_FILTER.filter(warned)
    assert not checkpointing._ORBAX_FILTER.filter(info)

    monkeypatch.setenv(checkpointing.ORBAX_LOGS_ENV, "info")
    assert not checkpointing.quiet_orbax_logs()
    assert len(from_orbax(_save_logs(tmp_path / "again", caplog, 3))) > 10
    monkeypatch.setenv(checkpointing.ORBAX_LOGS_ENV, "debug")
    with pytest.raises(ValueError, match="LIVERJAX_ORBAX_LOGS='debug'.*'warning'.*'info'"):
        checkpointing.quiet_orbax_logs()


def test_a_damaged_checkpoint_is_named_with_the_one_to_resume_from(tmp_path):
    ckpt = checkpointing.Checkpointer(
        tmp_path, keep=3, keep_best=0, best_metric="roc_auc", async_save=False
    )
    state = {"w": np.arange(4096, dtype=np.float32)}
    for step in (1, 2):
        ckpt.save(step, state, _iterator(), {"stop_reason": None})
    ckpt.wait()
    files = sorted((tmp_path / "2" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:  # the largest file (the array data) cut short
        f.truncate(100)
    abstract = {"w": jax.ShapeDtypeStruct((4096,), np.float32)}
    with pytest.raises(checkpointing.CheckpointReadError) as e:
        ckpt.restore(abstract, _iterator())
    message = str(e.value)
    assert message.startswith(f"checkpoint 2 in {tmp_path} cannot be read (")
    assert f"move {tmp_path / '2'} out of the way to resume from checkpoint 1" in message
    assert len(message) < 1000  # TensorStore's own runs to pages
    restored, _ = ckpt.restore(abstract, _iterator(), step=1)
    np.testing.assert_array_equal(restored["w"], state["w"])
    # a whole checkpoint of another network (a changed config) is not called damaged
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # as training restores
    other = {"w": jax.ShapeDtypeStruct((8192,), np.float32, sharding=one_device)}
    with pytest.raises(checkpointing.CheckpointReadError) as e:
        ckpt.restore(other, _iterator(), step=1)
    assert "checkpoint 1 in" in str(e.value) and "holds another network" in str(e.value)
    assert "out of the way" not in str(e.value)
    ckpt.close()


def test_a_resume_that_fails_keeps_the_saved_config(data_dir, tmp_path):
    # A changed config was once written before the restore failed: evaluation and export then
    # read the new values for checkpoints trained with the old ones.
    config = runs.make_config(data_dir, num_train_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / train.CONFIG_FILE).read_text()
    latest = max(
        int(p.name) for p in (tmp_path / train.CHECKPOINT_DIR).iterdir() if p.name.isdigit()
    )
    state_dir = tmp_path / train.CHECKPOINT_DIR / str(latest) / "state"
    files = sorted((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:
        f.truncate(100)
    changed = runs.make_config(data_dir, num_train_steps=4, **{"optimizer.learning_rate": 1e-3})
    with pytest.raises(checkpointing.CheckpointReadError, match=f"checkpoint {latest} in"):
        train.train_and_evaluate(changed, str(tmp_path))
    assert (tmp_path / train.CONFIG_FILE).read_text() == saved
