"""The training loop on the synthetic_small records: learning, one compile, errors, early stop."""

import math
import re

import jax
import numpy as np
import pytest
import training_runs as runs

from liverjax import checkpointing, input_pipeline, parallel, train


def test_loss_falls_and_each_step_compiles_once(data_dir, tmp_path):
    config = runs.make_config(data_dir, num_epochs=12, **{"early_stopping.patience": 0})
    summary = train.train_and_evaluate(config, str(tmp_path))

    steps_per_epoch = 48 // config.batch_size  # synthetic_small: 48 training records
    assert summary.step == 12 * steps_per_epoch and summary.stop_reason == "done"
    # Retrace guard: every jitted function was traced (so compiled) exactly once, although
    # validation ran after every epoch with a padded last batch.
    assert summary.traces == {"init": 1, "train_step": 1, "eval_step": 1, "predict": 0}

    # The loss on the training records (no dropout, no augmentation) fell well below where the
    # initial parameters put it.
    mesh = parallel.create_mesh()
    steps = train.make_steps(config, mesh, train.create_optimizer(config, 6, summary.step))
    source = input_pipeline.open_source(config.dataset, "train")
    before = train.evaluate(steps, steps.init(), source, config, mesh)["loss"]
    after = train.evaluate(steps, summary.state, source, config, mesh)["loss"]
    assert after < 0.75 * before, (before, after)

    scalars = runs.read_scalars(tmp_path)
    # Validation ran once per epoch, on all 12 validation records, with every metric written.
    assert [s for s, _ in scalars["validation/roc_auc"]] == [
        steps_per_epoch * e for e in range(1, 13)
    ]
    assert all(n == 12 for _, n in scalars["validation/n"])
    for name in ("loss", "accuracy", "precision", "recall", "f1", "average_precision"):
        assert f"validation/{name}" in scalars
    assert summary.validation["n"] == 12
    assert set(scalars) >= {"train/accuracy", "train/learning_rate", "images_per_sec", "epoch"}

    # The config is saved with the run, and the best checkpoint is kept beside the latest ones.
    assert (tmp_path / train.CONFIG_FILE).exists()
    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    aucs = dict(scalars["validation/roc_auc"])
    best = max(aucs, key=lambda s: (aucs[s], -s))
    assert ckpt.best_step() == best and best in ckpt.all_steps()
    saved = set(range(5, summary.step + 1, 5)) | set(range(6, summary.step + 1, 6))
    assert ckpt.all_steps()[-3:] == sorted(saved)[-3:]  # every 5 steps and every epoch
    ckpt.close()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = runs.make_config(
        data_dir,
        **{
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 1e30,
            "checkpoint.every_steps": 1,
            "num_epochs": 3,
        },
    )
    with pytest.raises(train.NonFiniteLossError) as err:
        train.train_and_evaluate(config, str(tmp_path))
    step = err.value.step
    assert 2 <= step < 18  # step 1 starts from finite parameters
    assert f"at step {step}" in str(err.value) and "last good checkpoint" in str(err.value)

    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    assert ckpt.all_steps() and ckpt.latest_step() == step - 1
    tx = train.create_optimizer(config, 6, 18)
    steps = train.make_steps(config, parallel.create_mesh(), tx)
    state, _ = ckpt.restore(steps.abstract_state, None)
    ckpt.close()
    assert all(np.isfinite(v).all() for v in runs.host_tree(state.params).values())


def test_early_stopping_stops_and_stays_stopped_on_resume(data_dir, tmp_path):
    # min_delta larger than any AUC change: only the first evaluation counts as an improvement.
    config = runs.make_config(
        data_dir,
        **{"early_stopping.patience": 2, "early_stopping.min_delta": 2.0, "num_epochs": 10},
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary.stop_reason == "early_stopping"
    assert summary.step == 3 * 6  # evaluations at steps 6 (the reference), 12 and 18 (patience 2)
    # The best reported is the best checkpoint, whatever min_delta says about patience.
    ckpt = checkpointing.Checkpointer(
        tmp_path / train.CHECKPOINT_DIR, keep=3, keep_best=1, best_metric="roc_auc"
    )
    assert summary.best_step == ckpt.best_step()
    ckpt.close()

    again = train.train_and_evaluate(config, str(tmp_path))
    assert again.stop_reason == "early_stopping" and again.step == 18
    assert again.traces["train_step"] == 0
    # Today's config decides: with early stopping off, the run trains on to its end.
    config.early_stopping.patience = 0
    config.num_epochs = 4
    more = train.train_and_evaluate(config, str(tmp_path))
    assert (more.stop_reason, more.step) == ("done", 24)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer.name": "rmsprop"}, "config.optimizer.name = 'rmsprop': unknown optimizer"),
        ({"schedule.name": "linear"}, "config.schedule.name = 'linear': unknown schedule"),
        ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate = 0.0: must be > 0"),
        ({"batch_size": 12}, "config.batch_size = 12 must be a positive multiple of the device"),
        ({"eval_batch_size": 4}, "config.eval_batch_size = 4 must be a positive multiple"),
        ({"imbalance.method": "oversample"}, "config.imbalance.method = 'oversample'"),
        ({"best_metric": "auc"}, "config.best_metric = 'auc': not a validation metric"),
        (
            {"best_metric": "recall"},
            "config.best_metric = 'recall': validation measures it at the fixed threshold 0.5",
        ),  # fmt: skip
        ({"model.head": "attention"}, "config.model.head = 'attention'"),
        ({"batch_size": 64}, "config.batch_size = 64: larger than the 48 records"),
        ({"distributed.enabled": "yes"}, "config.distributed.enabled = 'yes'"),
        ({"augment.rotate.prob": 1.5}, "config.augment.rotate.prob = 1.5: must be in [0, 1]"),
        ({"early_stopping.start_epoch": -1.0}, "config.early_stopping.start_epoch = -1.0"),
        ({"early_stopping.min_delta": -0.1}, "config.early_stopping.min_delta = -0.1: must be"),
        ({"imbalance.pos_weight": 3.0}, "config.imbalance.pos_weight = 3.0: is used by"),
        ({"schedule.warmup_epochs": 2.0}, "config.schedule.warmup_epochs = 2.0: is used by"),
        (
            {"schedule.name": "warmup_cosine", "schedule.end_fraction": -0.5},
            "config.schedule.end_fraction = -0.5: must be in [0, 1]",
        ),
        (
            {"schedule.name": "warmup_cosine", "schedule.warmup_epochs": -1.0},
            "config.schedule.warmup_epochs = -1.0: must be >= 0",
        ),
        (
            {"schedule.name": "warmup_cosine", "schedule.warmup_epochs": 2.0},
            "config.schedule.warmup_epochs = 2.0: the warmup (12 steps) is as long as the run",
        ),
        ({"checkpoint.keep": 0}, "config.checkpoint.keep = 0: must keep at least the latest"),
        ({"dataset.eval_split": "valid"}, "no split 'valid'"),
        ({"final_eval_split": "tset"}, "no split 'tset'"),  # before training, not after it
    ],
)
def test_config_errors_name_the_key(data_dir, tmp_path, overrides, message):
    config = runs.make_config(data_dir, **overrides)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        train.train_and_evaluate(config, str(workdir))
    # Nothing was trained or saved: no workdir (it once held a config.json alone).
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_named(data_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("")
    with pytest.raises(FileExistsError, match=r"--workdir .*run is a file, not a folder"):
        train.train_and_evaluate(runs.make_config(data_dir), str(workdir))


def test_early_stopping_counts_evaluations_without_improvement():
    early = train.EarlyStopping(patience=2, min_delta=0.01)
    assert early.update(0.70, 10) and not early.should_stop
    assert not early.update(0.705, 20) and not early.should_stop  # within min_delta
    assert early.update(0.80, 30) and early.bad_evals == 0
    assert not early.update(math.nan, 40)  # one-class validation: AUC NaN, not an improvement
    assert not early.update(0.75, 50) and early.should_stop
    assert (early.best, early.best_step) == (0.80, 30)
    assert train.EarlyStopping.from_dict(early.to_dict()) == early
    assert not train.EarlyStopping(patience=0).should_stop


def test_early_stopping_best_is_the_best_seen_and_patience_counts_from_min_delta():
    # Creeping up by less than min_delta: patience runs out, yet the best is the last value,
    # as the checkpointer ranks it (so the log names the checkpoint evaluate loads).
    early = train.EarlyStopping(patience=2, min_delta=0.01)
    assert early.update(0.700, 10)
    assert not early.update(0.705, 20)
    assert not early.update(0.709, 30) and early.should_stop
    assert (early.best, early.best_step, early.reference) == (0.709, 30, 0.700)
    # Ties keep the earlier step, like the checkpointer's (value, -step) key.
    early.update(0.709, 40)
    assert early.best_step == 30


def test_early_stopping_state_from_older_checkpoints():
    # Saved before 'metric' and 'reference' were: best was the patience reference then.
    old = {"patience": 3, "min_delta": 0.0, "best": 0.8, "best_step": 12, "bad_evals": 1}
    old |= {"start_step": 0}
    early = train.EarlyStopping.from_dict(old)
    assert (early.metric, early.reference, early.best) == ("roc_auc", 0.8, 0.8)


def test_early_stopping_on_a_metric_where_lower_is_better():
    early = train.EarlyStopping(patience=2, min_delta=0.01, metric="brier")
    assert early.update(0.30, 10)
    assert early.update(0.20, 20)
    assert not early.update(0.195, 30)  # within min_delta: the best, but patience runs on
    assert not early.update(0.40, 40) and early.should_stop
    assert (early.best, early.best_step, early.reference) == (0.195, 30, 0.20)


def test_early_stopping_uses_no_patience_before_its_start():
    early = train.EarlyStopping(patience=1, start_step=30)
    assert early.update(0.55, 10)
    assert not early.update(0.50, 20) and not early.should_stop  # before the start: free
    assert not early.update(0.52, 30) and early.should_stop  # from the start on, it counts
    assert (early.best, early.best_step, early.bad_evals) == (0.55, 10, 1)


def test_bce_matches_its_definition_and_weights_positives():
    logits = jax.numpy.array([-3.0, -0.5, 0.0, 2.0, 40.0])
    labels = jax.numpy.array([0, 1, 1, 0, 1])
    z, y = np.asarray(logits, np.float64), np.asarray(labels)
    # -log(sigmoid(z)) = log1p(exp(-z)); -log(1 - sigmoid(z)) = log1p(exp(z))
    expected = np.where(y == 1, 3.0 * np.log1p(np.exp(-z)), np.log1p(np.exp(z)))
    np.testing.assert_allclose(train.bce_with_logits(logits, labels, 3.0), expected, rtol=1e-6)


def test_a_one_class_validation_split_is_warned_of(data_dir, tmp_path, caplog):
    """One record: its ROC AUC is NaN, so nothing can be ranked; said once, not every epoch."""
    config = runs.make_config(data_dir, **{"dataset.eval_split": "validation[:1]"})
    with caplog.at_level("WARNING", logger="liverjax"):
        summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary.step == 12 and math.isnan(summary.validation["roc_auc"])
    assert caplog.text.count("validation roc_auc is NaN at step 6") == 1
    assert "is NaN at step 12" not in caplog.text


BATCHNORM_NET = '''
"""A network of the user's own: conv + BatchNorm, registered at import."""
import jax.numpy as jnp
from flax import nnx

from liverjax import models


class BatchNormNet(nnx.Module):
    def __init__(self, config, rngs):
        self.conv = nnx.Conv(1, config.model.width, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(config.model.width, rngs=rngs)
        self.out = nnx.Linear(config.model.width, 1, rngs=rngs)

    def __call__(self, x, *, deterministic, rngs):  # the contract, no defaults
        h = nnx.relu(self.norm(self.conv(x), use_running_average=deterministic))
        return jnp.squeeze(self.out(h.mean(axis=(1, 2))), -1)


def validate(config):
    if not config.model.get("width", 0) > 0:
        raise ValueError(f"config.model.width = {config.model.get('width')!r}: must be > 0")


models.register_model("batchnorm_net", BatchNormNet, validate)
'''


def test_a_registered_network_with_batch_statistics_trains_and_evaluates(
    data_dir, tmp_path, monkeypatch
):
    # Batch statistics are model state: merged into a module inside jax.grad, they once raised
    # TraceContextError ("Cannot mutate BatchStat from a different trace level").
    from liverjax import evaluate, models

    (tmp_path / "my_networks.py").write_text(BATCHNORM_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = runs.make_config(data_dir, num_train_steps=6)
    config.model = {"name": "batchnorm_net", "module": "my_networks", "width": 0}
    with pytest.raises(ValueError, match="config.model.width = 0: must be > 0"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))
    # The network's own check of the config is a user error (one line), though raised outside
    # liverjax's code.
    monkeypatch.delenv(train.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit, match=r"^training failed: config.model.width = 0: must be > 0"):
        with train.user_errors("training"):
            models.validate(config)
    config.model.width = 4
    workdir = str(tmp_path / "run")
    summary = train.train_and_evaluate(config, workdir)
    assert summary.step == 6 and np.isfinite(summary.validation["loss"])
    (mean,) = [
        leaf for path, leaf in jax.tree_util.tree_leaves_with_path(summary.state.model_state)
        if "mean" in jax.tree_util.keystr(path)
    ]  # fmt: skip
    assert np.abs(np.asarray(mean)).max() > 0  # running statistics were updated
    # Evaluation restores the network from config.json (the module imported again) with its
    # batch statistics; without features()/classify() the report shows the cases without maps.
    result = evaluate.evaluate(evaluate.load_config(workdir), workdir, split="test")
    assert 0 <= result["levels"]["slice"]["metrics"]["roc_auc"] <= 1
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "no saliency maps are shown" in page
    config.model.name = "other_net"
    with pytest.raises(ValueError, match="config.model.name = 'other_net': no network of that"):
        models.validate(config)
