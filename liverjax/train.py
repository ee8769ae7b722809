"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

    records (grain, per process) → global batch (Mesh 'data') → jitted train step:
        fold_in(rng, step) → preprocess + augment on device → CNN → BCE → grads → optax update
    every epoch: validation (every example once) → loss, ROC AUC, PR AUC, precision, recall, F1
    checkpoints (Orbax, async): state + data iterator + metadata; resume from the latest

The train state is one pytree (`TrainState`), created sharded by a jitted init and updated by a
jitted step that donates it; the step's random key is `fold_in(base key, step)`, so a run resumed
from a checkpoint replays the same randomness, and the same data (the grain iterator position is
in the checkpoint): resumed and uninterrupted runs end with identical parameters.
"""

# No `from __future__ import annotations`: clu's Collection reads field annotations as classes.
import ast
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from etils import epath
from flax import nnx

from liverjax import (
    checkpointing,
    input_pipeline,
    metric_writers,
    models,
    parallel,
    preprocess,
)
from liverjax import metrics as liver_metrics

logger = logging.getLogger("liverjax")

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Config keys (and key prefixes) that may not change while a workdir holds checkpoints: they set
# the shapes of the parameters or the structure of the optimizer state (the checkpoints would not
# load), or what the network's inputs mean (the HU window: evaluation and export read the
# workdir's config.json, and would feed an older checkpoint inputs it was not trained on).
RESUME_MUST_MATCH = ("model.", "image_size", "optimizer.name", "preprocess.")
# ...except these, which change neither (dropout rate; compute dtype: parameters stay float32).
RESUME_MAY_CHANGE = ("model.dropout", "model.dtype")
# Where the processes are, not what they compute: a resume on another topology is not a change.
TOPOLOGY_KEYS = ("distributed.",)
# Keys that define the stream of global batches the saved data position counts in.
DATA_STREAM_KEYS = ("batch_size", "imbalance.method", "seed", "dataset.train_split")
INIT_PRNG = "rbg"  # PRNG implementation of parameter initialization (see make_steps)


# --------------------------------------------------------------------------- state and metrics


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: nnx.State  # the model's nnx.Param variables
    opt_state: optax.OptState
    model_state: nnx.State  # other model variables (e.g. batch statistics); may be empty
    rng: jax.Array  # uint32 key data of the run's base key (jax.random.key_data)


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Returned by every train step, merged on the host between log steps."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("correct")


def _window_to_json(window: TrainMetrics | None) -> dict[str, Any] | None:
    """The train metrics merged since the last log step, as JSON for the checkpoint: a resumed
    run logs the same averages at its next log step as an uninterrupted one (bit for bit)."""
    if window is None:
        return None
    state = flax.serialization.to_state_dict(window)
    return jax.tree.map(lambda x: np.asarray(x).item(), state)


def _window_from_json(saved: Mapping[str, Any] | None) -> TrainMetrics | None:
    """`_window_to_json`'s output back as TrainMetrics, in the dtypes the train step makes."""
    if saved is None:
        return None
    empty = TrainMetrics.empty()
    template = flax.serialization.to_state_dict(empty)
    state = jax.tree.map(lambda t, v: jnp.asarray(v, jnp.asarray(t).dtype), template, dict(saved))
    return flax.serialization.from_state_dict(empty, state)


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    """Returned by every validation step: mean loss and all labels/probabilities (masked)."""

    loss: clu_metrics.Average.from_output("loss")
    outputs: liver_metrics.BinaryOutputs


class NonFiniteLossError(FloatingPointError):
    """The loss or the parameters became NaN or infinite; `.step` is the first such step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclasses.dataclass
class EarlyStopping:
    """Stops after `patience` evaluations without an improvement of more than `min_delta`.

    Two values are kept. `best`/`best_step` is the best value seen, ranked exactly as the
    checkpointer ranks checkpoints (earlier step on ties), so "best at step N" in the log is the
    checkpoint `evaluate --checkpoint best` loads. `reference` is the last value that beat its
    predecessor by more than `min_delta`; patience counts from it (Keras' rule), so a run that
    creeps up by less than `min_delta` per evaluation still stops.

    Evaluations before `start_step` still record the best value but do not use up patience
    (Keras' `start_from_epoch`): a model that sits at chance for a while before it learns is
    not stopped during that plateau.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.nan  # the best value so far of `metric`, in its own units
    best_step: int = -1
    bad_evals: int = 0
    start_step: int = 0
    metric: str = "roc_auc"  # brier and ece improve downwards (metrics.LOWER_IS_BETTER)
    reference: float = math.nan  # the last improvement by more than min_delta

    def update(self, value: float, step: int) -> bool:
        """Record one validation value of `metric`; returns whether it improved on
        `reference` by more than `min_delta` (which resets patience)."""
        better = liver_metrics.higher_is_better
        if better(self.metric, value) > better(self.metric, self.best):
            self.best, self.best_step = float(value), step
        if better(self.metric, value) > better(self.metric, self.reference) + self.min_delta:
            self.reference, self.bad_evals = float(value), 0
            return True
        if step >= self.start_step:
            self.bad_evals += 1
        return False

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> "EarlyStopping":
        """The state `to_dict` wrote; checkpoints from before `metric` and `reference` were
        saved get roc_auc and their `best` (which was then the reference too)."""
        saved = {"metric": "roc_auc", "reference": saved.get("best", math.nan)} | dict(saved)
        return cls(**saved)

    @property
    def should_stop(self) -> bool:
        """Whether patience ran out (never, with patience 0)."""
        return self.patience > 0 and self.bad_evals >= self.patience

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, for the checkpoint."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunSummary:
    """What `train_and_evaluate` did."""

    step: int  # steps done
    epoch: float
    stop_reason: str  # 'done' | 'early_stopping' | 'preempted'
    validation: dict[str, float]  # the last validation metrics ({} if none ran)
    best_step: int  # step of the best validation metric (-1 if none)
    best_metric: float
    traces: dict[str, int]  # how often each jitted step was traced (1 = compiled once)
    state: TrainState


# --------------------------------------------------------------------------- config


def read_json(path: epath.PathLike) -> Any:
    """The JSON in file `path`; a file that is not JSON is a ValueError naming it."""
    path = epath.Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): a damaged or hand-edited file? Restore it, or "
            "remove it to have it written again"
        ) from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} from nested mappings; sequences become lists (as in JSON)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple | list) else value
    return flat


# ------------------------------------------------------------------------- command lines

TRACEBACK_ENV = "LIVERJAX_TRACEBACK"  # set (to anything): user errors show their traceback
# Where ml_collections applies a --config.a.b=v override (its errors name the field it lacks).
_OVERRIDE_SOURCE = os.path.join("config_flags", "config_path.py")


# How long process 0 waits before it exits on a user error: its exit (the coordinator's) aborts
# the other processes, which may not have said the error yet.
USER_ERROR_COORDINATOR_WAIT_S = 2.0


# liverjax's own code: a ValueError raised there is one of its checks of the user's input.
_OWN_CODE = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package) + os.sep
    for package in ("liverjax", "tfds_liver")
)


def raised_by_liverjax(e: BaseException) -> bool:
    """Whether `e` was raised in liverjax's (or its dataset builder's) own code: the innermost
    frame of its traceback is there, not in a library it calls."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN_CODE)


def _exit_every_process(message: str | None) -> None:
    """End this process of a multi-process run now, after saying `message` (or the traceback
    of the exception being handled): sys.exit would wait in jax.distributed's shutdown barrier
    for the other processes (minutes, until a timeout); exiting now lets the launcher stop them."""
    sys.stderr.write(message + "\n" if message else traceback.format_exc())
    sys.stderr.flush()
    logging.shutdown()
    if jax.process_index() == 0:
        # The coordinator's exit aborts the others: give them the time to say it too.
        time.sleep(USER_ERROR_COORDINATOR_WAIT_S)
    os._exit(1)


@contextlib.contextmanager
def user_errors(command: str, *also: type[Exception]) -> Iterator[None]:
    """For a command's main: a bad config, path, split or dataset ends the command with its
    message, exit status 1, without a traceback ($LIVERJAX_TRACEBACK shows it). Those are
    OSError, the command's own error types `also`, and ValueError raised by liverjax's checks; a
    ValueError from inside a library (JAX, NumPy, ...) keeps its traceback: it is more likely a
    bug than a bad input. In a multi-process run any error ends every process at once."""
    try:
        yield
    except Exception as e:
        said = isinstance(e, (OSError, *also)) or (
            isinstance(e, ValueError) and raised_by_liverjax(e)
        )
        if os.environ.get(TRACEBACK_ENV) or not said:
            if jax.distributed.is_initialized():
                _exit_every_process(None)
            raise
        message = f"{command} failed: {e} ({TRACEBACK_ENV}=1 shows where)"
        if jax.distributed.is_initialized():
            _exit_every_process(message)
        sys.exit(message)


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=...)`), with a --config.x=y override that
    names no config field said in one line (ml_collections raises KeyError or AttributeError with
    a "did you mean"). `-h` is `--helpshort`, as `-h` is elsewhere (absl knows only the long
    forms)."""
    from absl import app

    argv = [argv[0], *("--helpshort" if a == "-h" else a for a in argv[1:])]
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as e:
        frames = traceback.extract_tb(e.__traceback__)
        from_override = any(f.filename.endswith(_OVERRIDE_SOURCE) for f in frames)
        if os.environ.get(TRACEBACK_ENV) or not from_override:  # the --config file's own error
            raise
        detail = str(e.args[0] if e.args else e)
        with contextlib.suppress(ValueError, SyntaxError):  # the str() of a KeyError, quoted
            detail = str(ast.literal_eval(detail))
        detail = detail.replace("\n", "; ")
        given = " ".join(a for a in argv[1:] if a.startswith("--config.")) or "--flagfile?"
        sys.stderr.write(
            f"FATAL Flags parsing error: {given}: a --config.* override names no field of the "
            f"config ({detail}); the fields are in the --config file\n"
        )
        sys.exit(1)


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
    raise ValueError(f"config.{key} = {value!r}: {problem}; {fix}")


# Validation metrics that can choose the best checkpoint: those of the probabilities themselves.
# The rest (recall, F1, ...) depend on a threshold, and validation's is a fixed 0.5.
BEST_METRICS = ("roc_auc", "average_precision", "brier", "ece")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the config key for anything that cannot train (before any work)."""
    for section in ("dataset", "input", "optimizer", "schedule", "imbalance", "checkpoint"):
        if section not in config:
            raise ValueError(f"config has no '{section}' section; start from configs/default.py")
    opt = config.optimizer
    if opt.name not in OPTIMIZERS:
        _fail("optimizer.name", opt.name, "unknown optimizer", f"use one of {OPTIMIZERS}")
    if not opt.learning_rate > 0:
        _fail("optimizer.learning_rate", opt.learning_rate, "must be > 0", "e.g. 0.001")
    if opt.weight_decay < 0:
        _fail("optimizer.weight_decay", opt.weight_decay, "must be >= 0", "e.g. 1e-4, or 0")
    if opt.grad_clip_norm < 0:
        _fail("optimizer.grad_clip_norm", opt.grad_clip_norm, "must be >= 0", "0 turns it off")
    schedule = config.schedule
    if schedule.name not in SCHEDULES:
        _fail("schedule.name", schedule.name, "unknown schedule", f"use one of {SCHEDULES}")
    if not schedule.warmup_epochs >= 0:
        _fail("schedule.warmup_epochs", schedule.warmup_epochs, "must be >= 0", "0 = no warmup")
    if not 0 <= schedule.end_fraction <= 1:
        _fail(
            "schedule.end_fraction",
            schedule.end_fraction,
            "must be in [0, 1] (a negative rate ascends the loss)",
            "0 decays to zero",
        )
    if schedule.name == "constant":
        for key in ("warmup_epochs", "end_fraction"):
            if schedule[key]:
                _fail(
                    f"schedule.{key}",
                    schedule[key],
                    "is used by schedule.name='warmup_cosine' only, and the schedule is 'constant'",
                    "set --config.schedule.name=warmup_cosine, or leave it 0",
                )
    if config.imbalance.method not in input_pipeline.IMBALANCE_METHODS:
        _fail(
            "imbalance.method",
            config.imbalance.method,
            "unknown method",
            f"use one of {input_pipeline.IMBALANCE_METHODS}",
        )
    if config.imbalance.pos_weight < 0:
        _fail("imbalance.pos_weight", config.imbalance.pos_weight, "must be >= 0", "0 = automatic")
    if config.imbalance.pos_weight and config.imbalance.method != "pos_weight":
        _fail(
            "imbalance.pos_weight",
            config.imbalance.pos_weight,
            f"is used by imbalance.method='pos_weight' only, and the method is "
            f"{config.imbalance.method!r}",
            "set --config.imbalance.method=pos_weight, or leave it 0",
        )
    for key in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint.every_steps"):
        value = config[key] if "." not in key else config.checkpoint.every_steps
        if not isinstance(value, int) or value < 1:
            _fail(key, value, "must be a positive int", "e.g. 32")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        _fail("num_epochs", config.num_epochs, "nothing to train", "set it or num_train_steps > 0")
    if config.eval_every_steps < 0:
        _fail("eval_every_steps", config.eval_every_steps, "must be >= 0", "0 = once per epoch")
    if config.best_metric not in liver_metrics.METRIC_NAMES:
        _fail(
            "best_metric",
            config.best_metric,
            "not a validation metric",
            f"use one of {BEST_METRICS}",
        )
    if config.best_metric not in BEST_METRICS:
        _fail(
            "best_metric",
            config.best_metric,
            f"validation measures it at the fixed threshold {liver_metrics.DEFAULT_THRESHOLD}, "
            "not at the operating point evaluation chooses afterwards (e.g. recall there favours "
            "a network that calls every slice a lesion)",
            f"choose the best checkpoint by a threshold-free metric: one of {BEST_METRICS}",
        )
    if config.early_stopping.patience < 0:
        _fail("early_stopping.patience", config.early_stopping.patience, "must be >= 0", "0 = off")
    if not config.early_stopping.min_delta >= 0:
        _fail(
            "early_stopping.min_delta",
            config.early_stopping.min_delta,
            "must be >= 0 (a negative one lets a worse value reset patience)",
            "0 = any improvement counts",
        )
    checkpointing.check_retention(config.checkpoint.keep, config.checkpoint.keep_best)
    if not config.early_stopping.start_epoch >= 0:
        _fail(
            "early_stopping.start_epoch",
            config.early_stopping.start_epoch,
            "must be >= 0",
            "0 = count every evaluation",
        )
    for key in ("num_workers", "read_threads", "prefetch_batches"):
        if config.input[key] < (0 if key == "num_workers" else 1):
            _fail(f"input.{key}", config.input[key], "out of range", "see configs/default.py")
    if not config.preprocess.window_width > 0:
        _fail("preprocess.window_width", config.preprocess.window_width, "must be > 0", "e.g. 400")
    preprocess.validate_augment_config(config.augment)
    models.validate(config)


def save_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Write the config to workdir/config.json; on resume, compare with the one saved there
    first (`check_resumed_config`)."""
    check_resumed_config(config, workdir)
    write_config(config, workdir)


def check_resumed_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """On resume, compare the config with the one saved in workdir/config.json.

    Changes to keys in RESUME_MUST_MATCH are refused while checkpoints exist (they would not
    load); other changes are allowed with a warning that lists them.
    """
    path = workdir / CONFIG_FILE
    new = _flatten(json.loads(config.to_json_best_effort()))
    has_checkpoints = (workdir / CHECKPOINT_DIR).exists() and any(
        p.name.isdigit() for p in (workdir / CHECKPOINT_DIR).iterdir()
    )
    if path.exists() and has_checkpoints:
        old = _flatten(read_json(path))
        changed = {
            k: (old.get(k), new.get(k))
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(TOPOLOGY_KEYS)
        }
        fatal = {
            k: v
            for k, v in changed.items()
            if any(k == m or k.startswith(m) for m in RESUME_MUST_MATCH)
            and k not in RESUME_MAY_CHANGE
        }
        if fatal:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fatal.items())
            raise ValueError(
                f"{workdir} holds checkpoints of a different network, preprocessing or optimizer "
                f"({lines}): they cannot be resumed with this config. Use a new --workdir, or "
                "the old values"
            )
        if changed:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            logger.warning(
                "resuming %s with a changed config (%s); the run will differ from an "
                "uninterrupted one with either config",
                workdir,
                lines,
            )
        stream = [k for k in DATA_STREAM_KEYS if k in changed]
        if stream:
            logger.warning(
                "%s changed: the saved data position counts global batches of the old stream, "
                "so from here the rest of the epoch is read in another order, with records "
                "skipped or read twice (and epochs are counted in the new steps)",
                " and ".join(stream),
            )


def write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """workdir/config.json, whole or not at all (process 0 writes it)."""
    path = workdir / CONFIG_FILE
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: other processes read it, and a kill mid-write would leave a
        # truncated file that blocks the next resume.
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(config.to_json_best_effort(indent=2) + "\n")
        partial.replace(path)


# --------------------------------------------------------------------------- optimizer and loss


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Steps of linear warmup of the warmup_cosine schedule."""
    return round(config.schedule.warmup_epochs * steps_per_epoch)


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The learning rate at each step: constant, or linear warmup + cosine decay."""
    lr = config.optimizer.learning_rate
    if config.schedule.name == "constant":
        return optax.constant_schedule(lr)
    warmup = warmup_steps(config, steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=lr * config.schedule.end_fraction,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on kernels (ndim > 1), not on biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
    """Clipping (optional) → L2 weight decay → sgd / momentum / adam, or adamw (decoupled decay).

    The chain has the same state structure whatever the values, so a run resumes with changed
    rates, decay or clipping.
    """
    opt = config.optimizer
    lr = learning_rate_schedule(config, steps_per_epoch, total_steps)
    clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity()
    if opt.name == "adamw":
        adamw = optax.adamw(
            lr, opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask
        )
        return optax.chain(clip, adamw)
    decay = optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask)
    if opt.name == "sgd":
        update = optax.sgd(lr)
    elif opt.name == "momentum":
        update = optax.sgd(lr, momentum=opt.momentum, nesterov=opt.nesterov)
    else:
        update = optax.adam(lr, opt.b1, opt.b2, opt.eps)
    return optax.chain(clip, decay, update)


def bce_with_logits(logits: jax.Array, labels: jax.Array, pos_weight: float = 1.0) -> jax.Array:
    """Per-example binary cross-entropy on logits; lesion (label 1) terms weighted by pos_weight."""
    labels = labels.astype(jnp.float32)
    return -(
        pos_weight * labels * jax.nn.log_sigmoid(logits)
        + (1.0 - labels) * jax.nn.log_sigmoid(-logits)
    )


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the prediction at the metrics module's threshold matches the label."""
    predicted = jax.nn.sigmoid(logits) >= liver_metrics.DEFAULT_THRESHOLD
    return (predicted == (labels > 0)).astype(jnp.float32)


# --------------------------------------------------------------------------- jitted steps


@dataclasses.dataclass
class Steps:
    """The jitted functions of a run over one mesh."""

    init: Callable[[], TrainState]
    # (state, batch) → (new state, metrics, finite: loss and new parameters all finite)
    train_step: Callable[
        [TrainState, dict[str, jax.Array]], tuple[TrainState, TrainMetrics, jax.Array]
    ]
    eval_step: Callable[[TrainState, dict[str, jax.Array]], EvalMetrics]
    predict: Callable[[TrainState, jax.Array], jax.Array]  # int16 HU (B,H,W,1) → probabilities
    abstract_state: TrainState  # shapes, dtypes and shardings, for restoring checkpoints
    traces: dict[str, int]  # times each function was traced


def make_steps(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    tx: optax.GradientTransformation,
    *,
    pos_weight: float = 1.0,
) -> Steps:
    """Build the init, train, eval and predict functions, jitted over `mesh`."""
    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    traces = {"init": 0, "train_step": 0, "eval_step": 0, "predict": 0}

    def create() -> tuple[TrainState, nnx.State, nnx.GraphDef]:
        # Parameters are drawn with the 'rbg' PRNG: identical across shardings like threefry, but
        # its initializer compiles in seconds where threefry's takes ~20 s on XLA:CPU. The run's
        # key (dropout, augmentation: vmapped over examples) stays threefry, exact under vmap.
        params_key, dropout_key = jax.random.split(jax.random.key(config.seed, impl=INIT_PRNG))
        run_key = jax.random.key(config.seed)
        model = models.create_model(config, rngs=nnx.Rngs(params=params_key, dropout=dropout_key))
        graphdef, params, rng_streams, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state,
            rng=jax.random.key_data(run_key),
        )
        return state, rng_streams, graphdef

    abstract_state, _, graphdef = nnx.eval_shape(create)
    abstract_state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract_state
    )
    # The model's own dropout stream is never drawn from (each step passes its key), but merging
    # the model needs its variables: computed once, outside the checkpoint.
    rng_streams = jax.jit(lambda: create()[1], out_shardings=repl)()

    def forward(state: TrainState, params: nnx.State, x: jax.Array, dropout_key: jax.Array | None):
        # copy: fresh Variables for this trace (jax.grad's); batch statistics are set in them
        model = nnx.merge(graphdef, params, rng_streams, state.model_state, copy=True)
        logits = model(x, deterministic=dropout_key is None, rngs=dropout_key)
        _, _, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
        return logits, model_state

    def init() -> TrainState:
        traces["init"] += 1
        return create()[0]

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        traces["train_step"] += 1
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        augment_key, dropout_key = jax.random.split(step_key)
        x = preprocess.preprocess(batch["image"], config)
        x = preprocess.augment(x, augment_key, config)
        labels = batch["label"]

        def loss_fn(params):
            logits, model_state = forward(state, params, x, dropout_key)
            losses = bce_with_logits(logits, labels, pos_weight)
            return losses.mean(), (logits, losses, model_state)

        grads, (logits, losses, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        metrics = TrainMetrics.single_from_model_output(
            loss=losses, correct=_correct(logits, labels)
        )
        # A finite loss can still produce non-finite parameters (e.g. a huge learning rate):
        # such a state must never be checkpointed.
        finite = jnp.isfinite(losses).all()
        for p in jax.tree.leaves(params):
            finite &= jnp.isfinite(p).all()
        return new_state, metrics, finite

    def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> EvalMetrics:
        traces["eval_step"] += 1
        x = preprocess.preprocess(batch["image"], config)
        logits, _ = forward(state, state.params, x, None)
        return EvalMetrics.single_from_model_output(
            loss=bce_with_logits(logits, batch["label"]),
            labels=batch["label"],
            logits=logits,
            mask=batch["mask"],
        )

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        traces["predict"] += 1
        logits, _ = forward(state, state.params, preprocess.preprocess(images, config), None)
        return jax.nn.sigmoid(logits)

    return Steps(
        init=jax.jit(init, out_shardings=repl),
        train_step=jax.jit(
            train_step, donate_argnums=(0,), in_shardings=(repl, data), out_shardings=repl
        ),
        eval_step=jax.jit(eval_step, in_shardings=(repl, data)),
        predict=jax.jit(predict, in_shardings=(repl, data), out_shardings=data),
        abstract_state=abstract_state,
        traces=traces,
    )


# --------------------------------------------------------------------------- loop helpers


def evaluate(
    steps: Steps,
    state: TrainState,
    source: Sequence[dict[str, Any]],
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Validation metrics over every record of `source` once: loss and liverjax.metrics.summary."""
    collected: EvalMetrics | None = None
    for batch in input_pipeline.eval_dataset(
        source, config, global_batch_size=config.eval_batch_size
    ):
        out = steps.eval_step(state, parallel.global_batch(batch, mesh))
        collected = out if collected is None else collected.merge(out)
    assert collected is not None  # eval_dataset refuses empty splits
    return {"loss": float(collected.loss.compute()), **collected.outputs.compute()}


def _check_finite(
    pending: list[tuple[int, jax.Array, jax.Array]], ckpt: checkpointing.Checkpointer
) -> None:
    """Raise NonFiniteLossError at the first pending (step, loss, finite) that is not finite."""
    if not pending:
        return
    values = jax.device_get([(loss, finite) for _, loss, finite in pending])
    for (step, _, _), (loss, finite) in zip(pending, values, strict=True):
        if not finite:
            ckpt.wait()
            last = ckpt.latest_step()
            kept = (
                f"the last good checkpoint is step {last} in {ckpt.directory}"
                if last is not None
                else "no checkpoint was saved before it"
            )
            what = (
                f"training loss is {float(loss)}"
                if not np.isfinite(loss)
                else f"parameters became NaN or infinite (loss {float(loss):.4g})"
            )
            raise NonFiniteLossError(
                f"{what} at step {step}; the run stopped without saving this state, and {kept}. "
                "Lower config.optimizer.learning_rate, set config.optimizer.grad_clip_norm, or "
                "check the input data",
                step,
            )
    pending.clear()


class _PreemptionNotice:
    """Turns SIGTERM into a request to save and stop after the current step (single process).

    With several processes, JAX's preemption service handles SIGTERM and
    `Checkpointer.reached_preemption` tells all processes at the same step.
    """

    def __enter__(self) -> "_PreemptionNotice":
        self.requested = False
        self.closing = False  # the run is writing its last checkpoint
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.closing and self.requested:
            logger.warning("SIGTERM again: the checkpoint is being written; stopping after it")
        elif self.closing:
            logger.warning("SIGTERM: the last checkpoint is being written; stopping after it")
        else:
            logger.warning("SIGTERM: finishing this step, saving a checkpoint, then stopping")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Progress:
    """images/s, epoch and ETA between log steps."""

    def __init__(self, total_steps: int, step: int, batch_size: int, steps_per_epoch: int):
        self.total, self.batch, self.per_epoch = total_steps, batch_size, steps_per_epoch
        self.step, self.time = step, time.monotonic()

    def __call__(self, step: int) -> dict[str, float]:
        now = time.monotonic()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        eta = (self.total - step) / rate if rate > 0 else math.inf
        epoch = step / self.per_epoch
        logger.info(
            "step %d/%d, epoch %.2f: %.1f images/s, ETA %s",
            step,
            self.total,
            epoch,
            rate * self.batch,
            time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?",
        )
        return {"images_per_sec": rate * self.batch, "steps_per_sec": rate, "epoch": epoch}


# --------------------------------------------------------------------------- the run


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Callable[[int], Any]] = (),
) -> RunSummary:
    """Train, validate every epoch and checkpoint in `workdir`; resumes from its latest checkpoint.

    `hooks` are called with the step number after every train step (e.g. a profiler). The final
    evaluation of `config.final_eval_split` is `liverjax.main`'s: from Python, call
    `liverjax.evaluate.evaluate(config, workdir, split=...)` after this. A workdir another
    training run is using is refused (`WorkdirInUseError`).
    """
    parallel.initialize_distributed(config.distributed)
    with _workdir_lock(workdir) as lock:
        return _train_and_evaluate(config, workdir, hooks=hooks, lock=lock)


class WorkdirInUseError(ValueError):
    """Another training run holds the workdir."""


@contextlib.contextmanager
def _workdir_lock(workdir: str | os.PathLike) -> Iterator[Callable[[], None]]:
    """Holds an exclusive lock on the workdir folder (flock, released by the system however the
    process ends, kill -9 too) while process 0 trains in it, so a second run started in it (a
    double sbatch, a relaunch while the old job is still in its grace period) is refused rather
    than writing checkpoints and logs over the first's. Taken at once on a workdir that exists;
    a new one is locked by the `take()` this yields, called once the run has made the folder.
    Not on a remote file system (gs://), nor on a system or file system without flock (Windows,
    many NFS mounts: a warning says so)."""
    path = os.fspath(workdir)
    try:
        import fcntl
    except ImportError:  # not on Windows
        fcntl = None
    fds: list[int] = []

    def take() -> None:
        if fds or fcntl is None or "://" in path or jax.process_index() != 0:
            return
        if not os.path.isdir(path):
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirInUseError(
                f"--workdir {path} is in use by another training run (it holds the folder's "
                "lock): two runs in one workdir overwrite each other's checkpoints and logs; "
                "wait for it to end or stop it, or train in another --workdir"
            ) from None
        except OSError as e:  # a file system without flock
            logger.warning(
                "--workdir %s cannot be locked (%s): a second run is not refused", path, e
            )
        fds.append(fd)

    take()
    try:
        yield take
    finally:
        for fd in fds:
            os.close(fd)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Callable[[int], Any]] = (),
    lock: Callable[[], None] = lambda: None,
) -> RunSummary:
    # Processes that differ would train apart silently (other seeds, rates) or hang in collectives.
    parallel.check_same_device_counts()
    parallel.check_processes_agree(
        {
            k: v
            for k, v in _flatten(json.loads(config.to_json_best_effort())).items()
            if not k.startswith("distributed.")
        },
        "configs",
        "start every process with the same --config and flags (only the process id differs)",
    )
    validate_config(config)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    workdir_path = epath.Path(workdir)
    if workdir_path.exists() and not workdir_path.is_dir():
        raise FileExistsError(f"--workdir {workdir} is a file, not a folder for the run")

    input_pipeline.ensure_built(config.dataset)
    train_source = input_pipeline.open_source(config.dataset, config.dataset.train_split)
    eval_source = input_pipeline.open_source(config.dataset, config.dataset.eval_split)
    if config.get("final_eval_split"):  # evaluated after training: a typo fails now, not then
        input_pipeline.open_source(config.dataset, config.final_eval_split)
    logger.info(
        "%s: %d train / %d validation records; mesh of %d devices over %d process(es)",
        config.dataset.name,
        len(train_source),
        len(eval_source),
        mesh.devices.size,
        jax.process_count(),
    )
    record_size = input_pipeline.record_size(config.dataset)
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch < 1:
        _fail(
            "batch_size",
            config.batch_size,
            f"larger than the {len(train_source)} records of split "
            f"{config.dataset.train_split!r} of {config.dataset.name}",
            "use a smaller batch or more data",
        )
    total_steps = config.num_train_steps
    if total_steps <= 0:
        total_steps = config.num_epochs * steps_per_epoch
    eval_every = config.eval_every_steps or steps_per_epoch
    warmup = warmup_steps(config, steps_per_epoch)
    if config.schedule.name == "warmup_cosine" and warmup >= total_steps:
        _fail(
            "schedule.warmup_epochs",
            config.schedule.warmup_epochs,
            f"the warmup ({warmup} steps) is as long as the run ({total_steps} steps): "
            "the rate would never reach optimizer.learning_rate nor decay",
            "use a shorter warmup",
        )

    labels, pos_weight = None, 1.0
    if config.imbalance.method != "none":
        labels = input_pipeline.read_labels(train_source)
        n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
        if config.imbalance.method == "pos_weight":
            if config.imbalance.pos_weight > 0:
                pos_weight = float(config.imbalance.pos_weight)
            elif n_pos == 0:
                raise ValueError(
                    f"split {config.dataset.train_split!r} has no lesion record: cannot derive "
                    "config.imbalance.pos_weight; set it, or use imbalance.method='none'"
                )
            elif n_neg == 0:
                raise ValueError(
                    f"split {config.dataset.train_split!r} has no normal record: "
                    "config.imbalance.pos_weight would be 0 and the model would learn nothing; "
                    "set it, or use imbalance.method='none'"
                )
            else:
                pos_weight = n_neg / n_pos
        logger.info(
            "train split: %d normal, %d lesion; imbalance=%s, pos_weight=%.3f",
            n_neg,
            n_pos,
            config.imbalance.method,
            pos_weight,
        )

    # Only a run that can start writes into the workdir: config.json once the model is restored
    # or initialized (a resume that fails keeps the config its checkpoints were trained with).
    parallel.check_shared_folder(workdir_path)  # one checkpoint, written by all processes
    check_resumed_config(config, workdir_path)
    tx = create_optimizer(config, steps_per_epoch, total_steps)
    steps = make_steps(config, mesh, tx, pos_weight=pos_weight)
    train_iter = iter(
        input_pipeline.train_dataset(
            train_source, config, global_batch_size=config.batch_size, labels=labels
        )
    )
    ckpt = checkpointing.Checkpointer(
        workdir_path / CHECKPOINT_DIR,
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        best_metric=config.best_metric,
        async_save=config.checkpoint.async_save,
    )
    lock()  # a new workdir exists now (the checkpoint folder): it is locked from here on
    start_step = round(config.early_stopping.start_epoch * steps_per_epoch)
    early = EarlyStopping(
        config.early_stopping.patience,
        config.early_stopping.min_delta,
        start_step=start_step,
        metric=config.best_metric,
    )
    validation: dict[str, float] = {}
    stop_reason = None
    window = None
    if ckpt.latest_step() is not None:
        with input_pipeline.signals_deferred():  # the data position starts grain's workers
            state, meta = ckpt.restore(steps.abstract_state, train_iter)
        validation = meta.get("validation", {})
        window = _window_from_json(meta.get("train_window"))
        saved = EarlyStopping.from_dict(meta["early_stopping"])
        if saved.metric == config.best_metric:
            # The counts come from the checkpoint; patience and the start from today's config.
            early = dataclasses.replace(
                saved,
                patience=early.patience,
                min_delta=early.min_delta,
                start_step=start_step,
            )
        else:
            logger.warning(
                "best_metric is now %s (was %s): early stopping counts from here",
                config.best_metric,
                saved.metric,
            )
        # An early-stopped run stays stopped while today's patience has run out too; a finished
        # one goes on if the config asks for more steps.
        if meta.get("stop_reason") == "early_stopping":
            if early.should_stop:
                stop_reason = "early_stopping"
                logger.info(
                    "this run stopped early at step %d (no %s improvement in %d evaluations); "
                    "raise config.early_stopping.patience (0: off) to train on, or use a new "
                    "workdir",
                    int(state.step),
                    config.best_metric,
                    early.bad_evals,
                )
            else:
                logger.info(
                    "this run stopped early at step %d; training on, as "
                    "config.early_stopping.patience is now %d",
                    int(state.step),
                    early.patience,
                )
        logger.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
        state = steps.init()
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        logger.info("initialized a new model with %d parameters", n_params)
    write_config(config, workdir_path)
    start = int(state.step)
    if start >= total_steps:
        stop_reason = stop_reason or "done"

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, resumed_at=start
    )
    # Every start: a run killed before its first flush has none, and the config may have changed.
    writer.write_hparams(_flatten(json.loads(config.to_json_best_effort())))
    writer.flush()
    progress = _Progress(total_steps, start, config.batch_size, steps_per_epoch)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    pending: list[tuple[int, jax.Array, jax.Array]] = []  # (step, loss, finite) not yet checked
    # Merged since the last log step (resumed with the checkpoint: see _window_to_json).
    train_metrics: TrainMetrics | None = window
    warned_nan = False  # of a NaN best_metric, once
    step = start
    try:
        with _PreemptionNotice() as preemption:
            try:
                while stop_reason is None:
                    step += 1
                    with jax.profiler.StepTraceAnnotation("train", step_num=step):
                        # The first batch starts grain's workers: a signal waits until
                        # they ignore it.
                        with (
                            input_pipeline.signals_deferred()
                            if step == start + 1
                            else contextlib.nullcontext()
                        ):
                            host_batch = next(train_iter)
                        batch = parallel.global_batch(host_batch, mesh)
                        state, out, finite = steps.train_step(state, batch)
                    pending.append((step, out.loss.total, finite))
                    train_metrics = out if train_metrics is None else train_metrics.merge(out)
                    for hook in hooks:
                        hook(step)
                    last = step >= total_steps
                    if step % config.log_every_steps == 0 or last:
                        _check_finite(pending, ckpt)
                        scalars = {
                            f"train/{k}": float(v) for k, v in train_metrics.compute().items()
                        }
                        scalars["train/learning_rate"] = float(schedule(step - 1))
                        writer.write_scalars(step, scalars | progress(step))
                        writer.flush()  # on disk now: a kill -9 loses nothing logged
                        train_metrics = None
                    evaluated = False
                    if step % eval_every == 0 or last:
                        _check_finite(pending, ckpt)
                        validation = evaluate(steps, state, eval_source, config, mesh)
                        writer.write_scalars(
                            step, {f"validation/{k}": v for k, v in validation.items()}
                        )
                        writer.flush()
                        if math.isnan(validation[config.best_metric]) and not warned_nan:
                            warned_nan = True
                            logger.warning(
                                "validation %s is NaN at step %d (a validation split of one "
                                "class has no ROC AUC): no checkpoint can be ranked best and "
                                "early stopping cannot see improvement; rebuild the dataset with "
                                "a larger validation fraction (its curation report says which "
                                "class it has)",
                                config.best_metric,
                                step,
                            )
                        early.update(validation[config.best_metric], step)
                        evaluated = True
                        if early.should_stop:
                            stop_reason = "early_stopping"
                            logger.info(
                                "early stopping at step %d: no %s improvement in %d evaluations "
                                "(best %.4f at step %d)",
                                step,
                                config.best_metric,
                                early.bad_evals,
                                early.best,
                                early.best_step,
                            )
                    preempted = preemption.requested or (
                        jax.process_count() > 1 and ckpt.reached_preemption(step)
                    )
                    if preempted and stop_reason is None:
                        stop_reason = "preempted"
                    if last and stop_reason is None:
                        stop_reason = "done"
                    if evaluated or stop_reason or step % config.checkpoint.every_steps == 0:
                        _check_finite(pending, ckpt)
                        meta = {
                            "step": step,
                            "epoch": step / steps_per_epoch,
                            "early_stopping": early.to_dict(),
                            "validation": validation,
                            "stop_reason": stop_reason,
                            "train_window": _window_to_json(train_metrics),
                            # the records' side, which the network takes (liverjax.predict)
                            "record_size": record_size,
                        }
                        ckpt.save(
                            step,
                            state,
                            train_iter,
                            meta,
                            metrics=validation if evaluated else None,
                        )
            finally:
                # With the SIGTERM handler still in place: a second SIGTERM (srun and some
                # launchers send two) must not kill the process while this save is written.
                preemption.closing = True
                ckpt.close()  # waits for pending saves: the last good checkpoint is kept
    finally:
        writer.close()
        input_pipeline.close(train_iter)  # its workers now, not at garbage collection
    if preemption.requested and stop_reason != "preempted":
        # SIGTERM while a finished run wrote its last checkpoint: saved; the caller stops now
        # (liverjax.main skips the final evaluation and exits 143), as after any SIGTERM.
        stop_reason = "preempted"
    if steps.traces["train_step"] > 1:
        logger.warning(
            "the train step was traced %d times (expected once): input shapes or dtypes "
            "changed between steps, and each retrace recompiles",
            steps.traces["train_step"],
        )
    logger.info("stopped at step %d (%s)", step, stop_reason)
    return RunSummary(
        step=step,
        epoch=step / steps_per_epoch,
        stop_reason=stop_reason,
        validation=validation,
        best_step=early.best_step,
        best_metric=early.best,
        traces=dict(steps.traces),
        state=state,
    )


__all__ = [
    "EarlyStopping",
    "NonFiniteLossError",
    "RunSummary",
    "Steps",
    "TrainState",
    "bce_with_logits",
    "create_optimizer",
    "evaluate",
    "learning_rate_schedule",
    "make_steps",
    "save_config",
    "train_and_evaluate",
    "validate_config",
]
