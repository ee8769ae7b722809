"""Export a classifier for serving: a TF Serving SavedModel, TFLite files, and a parity check.

`python -m liverjax.export --workdir W --out E [--checkpoint best|latest|STEP]` writes

    E/liver/<version>/                 SavedModel in the TF Serving layout; version = highest + 1
        saved_model.pb, variables/     signature `serving_default`: image float32 [batch, H, W, 1]
                                       in Hounsfield units (batch dynamic) → probability float32
                                       [batch], logit float32 [batch]
        assets.extra/liverjax.json     label names, input size, window, threshold, config, step,
                                       and the parity figures measured below
        assets.extra/liverjax.stablehlo + params.npz
                                       the same StableHLO module (jax.export) and its weights: what
                                       `liverjax.serve` runs, so serving needs no tensorflow
    E/liver.tflite                     float32, fixed batch 1 (named after --model_name)
    E/liver_fp16.tflite                float16 weights
    E/liver_int8.tflite                dynamic-range int8 weights

The graph is `liverjax.preprocess.preprocess` (HU window → [0, 1] → resize) followed by the model
and a sigmoid, converted with jax2tf native serialization: the StableHLO that JAX lowers is embedded
as is, so TensorFlow runs the same computation training ran.

Before anything is published, the export checks that the SavedModel, the serving module and the
float TFLite file agree with JAX to `PARITY_TOLERANCE` on the parity images (records of the test
split from the CLI), and that the quantized TFLite files lose at most `AUC_TOLERANCE` ROC AUC
against the float one when the images carry labels of both classes. The checks run on the CPU
(`parity_device`), also on a GPU host, where float32 convolutions may run in TF32. A failure
raises `ParityError` and leaves nothing behind; the version directory appears by one atomic
rename, so a server that polls `E/liver` never sees half a version.

TensorFlow is imported only inside the functions of this module: training never needs it.

jax2tf (`jax.experimental.jax2tf`, JAX 0.10) now only does native serialization (its
`native_serialization` and `enable_xla` arguments are deprecated and not passed here) and, being
under `experimental`, carries no stability promise; the serving module uses the stable
`jax.export` API, so liverjax.serve keeps working whatever becomes of jax2tf.

JAX writes StableHLO of the version four weeks behind its own (JAX 0.12: 1.18.0), which a
TensorFlow release older than that JAX cannot read (TensorFlow 2.21 reads up to 1.13.7 and fails
on the shape assertion JAX 0.12 writes as `vhlo.custom_call_v2`). While converting for
TensorFlow, the module is serialized at the older of the two versions
(`tensorflow_stablehlo_version`); the version is recorded in liverjax.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from liverjax import checkpointing, metrics, preprocess, serve
from liverjax.serve import ASSETS_EXTRA, INPUT, METADATA_FILE, OUTPUTS, SIGNATURE
from tfds_liver.labels import LABEL_NAMES

log = logging.getLogger("liverjax.export")

MODEL_NAME = "liver"
STABLEHLO_FILE = "liverjax.stablehlo"
PARAMS_FILE = "params.npz"
METADATA_FORMAT = 1
TFLITE_SUFFIXES = {"float32": "", "fp16": "_fp16", "int8": "_int8"}


def tflite_files(model_name: str) -> dict[str, str]:
    """The TFLite file names of each variant, after the model: liver.tflite, liver_fp16.tflite..."""
    return {variant: f"{model_name}{suffix}.tflite" for variant, suffix in TFLITE_SUFFIXES.items()}


TFLITE_FILES = tflite_files(MODEL_NAME)
# The SavedModel and the serving module are lowered for CPU and CUDA, so the same version runs on
# a CPU or a GPU TF Serving; TFLite is lowered for CPU only (the converter wants one platform).
PLATFORMS = ("cpu", "cuda")
# Largest |difference| allowed between JAX and the SavedModel / serving module / float TFLite, on
# probabilities and on logits (relative to |logit| once it exceeds 1).
PARITY_TOLERANCE = 1e-5
# Largest ROC AUC a quantized TFLite file may lose against the float one.
AUC_TOLERANCE = 0.01
DEFAULT_THRESHOLD = 0.5
OPERATING_POINT_FILE = "operating_point.json"
# Parity images drawn when no records are given: uniform HU over air..dense bone.
RANDOM_PARITY_IMAGES = 8
RANDOM_HU_RANGE = (-1024.0, 2000.0)
RANDOM_PARITY_SEED = 0
# Records of the parity split used at most (TFLite runs one image per call); a seeded subset beyond.
MAX_PARITY_EXAMPLES = 2000


class ParityError(RuntimeError):
    """An exported artifact does not compute what the JAX model computes."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went and what its parity check measured."""

    version: int
    version_dir: pathlib.Path
    tflite: dict[str, pathlib.Path]
    parity: dict[str, Any]
    metadata: dict[str, Any]  # what the version's assets.extra/liverjax.json holds


def _param_leaves(model: nnx.Module) -> tuple[Callable[..., nnx.Module], list[jax.Array]]:
    """(rebuild(leaves) -> model, flat list of the model's parameters)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)

    def rebuild(new_leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, list(new_leaves)), rest)

    return rebuild, leaves


def serving_function(
    model: nnx.Module, config: ml_collections.ConfigDict
) -> tuple[Callable[[list[jax.Array], jax.Array], dict[str, jax.Array]], list[jax.Array]]:
    """(fn(params, hu) -> {"probability", "logit"}, params): the exported computation.

    `hu` is float32 (B, H, W, 1) in Hounsfield units; `fn` runs `liverjax.preprocess.preprocess`
    and the model in inference mode. Parameters are an argument, not constants, so they become
    SavedModel variables and a separate weights file instead of bloating the module.
    """
    rebuild, leaves = _param_leaves(model)

    def fn(params: list[jax.Array], hu: jax.Array) -> dict[str, jax.Array]:
        x = preprocess.preprocess(hu, config)
        logit = rebuild(params)(x, deterministic=True).astype(jnp.float32)
        return {"probability": jax.nn.sigmoid(logit), "logit": logit}

    return fn, leaves


def input_spec(size: int, batch: int | str) -> jax.ShapeDtypeStruct:
    """The `image` argument: float32 (batch, size, size, 1); a str batch is a symbolic dimension."""
    if isinstance(batch, str):
        shape = jax.export.symbolic_shape(f"{batch}, {size}, {size}, 1")
    else:
        shape = (batch, size, size, 1)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def read_threshold(workdir: str | os.PathLike, *, stacklevel: int = 2) -> tuple[float, str]:
    """(threshold, its source) from `W/operating_point.json`; 0.5 with a warning if absent
    (`stacklevel` as for a `warnings.warn` here)."""
    threshold, source, _ = _read_operating_point(workdir, stacklevel + 1)
    return threshold, source


def _read_operating_point(
    workdir: str | os.PathLike, stacklevel: int
) -> tuple[float, str, dict[str, Any]]:
    """(threshold, source, the file's contents), each threshold in it checked; `stacklevel` of
    the warning, as for a `warnings.warn` here."""
    path = epath.Path(workdir) / OPERATING_POINT_FILE
    if not path.exists():
        warnings.warn(
            f"{path} not found: using threshold {DEFAULT_THRESHOLD}. Run the evaluation first "
            f"to choose an operating point on validation data.",
            stacklevel=stacklevel,
        )
        return DEFAULT_THRESHOLD, "default", {}
    try:
        written = json.loads(path.read_text())
        threshold = written["threshold"]
        levels = dict(written.get("patient_level") or {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f'{path}: expected a JSON object with a "threshold" number ({e}); '
            f"rerun the evaluation or fix the file"
        ) from e
    checked = {"threshold": threshold} | {f"patient_level.{k}": v for k, v in levels.items()}
    for key, value in checked.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{path}: {key} = {value!r} is not a probability in [0, 1]")
    return float(threshold), str(path), written


def operating_point(
    workdir: str | os.PathLike,
    step: int,
    note: str,
    allow_other_checkpoint_threshold: bool = False,
    *,
    stacklevel: int = 2,
) -> tuple[float, str, dict[str, Any]]:
    """(threshold, its source, how it was chosen) for checkpoint `step` of the run in `workdir`
    (`note`: how that step was picked, in words). The last is `W/operating_point.json`'s rule,
    split, step, validation figures and patient-level thresholds ({} for the default). A
    threshold chosen for another checkpoint is an error unless `allow_other_checkpoint_threshold`
    (then a warning): the labels would use a cut-off that was never validated for this model.
    `stacklevel`: the warnings', as for a `warnings.warn` here (2: this function's caller)."""
    threshold, source, written = _read_operating_point(workdir, stacklevel + 1)
    if source == "default":
        return threshold, source, {}
    keys = (
        *("rule", "target_sensitivity", "split", "checkpoint_step", "dataset", "validation"),
        "patient_level",  # thresholds on a patient's max / mean probability, for clients
        "slices_per_patient",  # of the patients they were chosen on (min, median, max)
    )
    chosen = {k: written[k] for k in keys if k in written}
    chosen_for = written.get("checkpoint_step")
    if chosen_for is not None and chosen_for != step:
        message = (
            f"{source} was chosen for checkpoint step {chosen_for}, but step {step} is used "
            f"({note}); rerun the evaluation with --checkpoint {step} to get its own threshold"
        )
        if not allow_other_checkpoint_threshold:
            raise ValueError(
                f"{message}, use --checkpoint {chosen_for} (checkpoint={chosen_for} from "
                "Python), or pass --allow_other_checkpoint_threshold "
                "(allow_other_checkpoint_threshold=True)"
            )
        warnings.warn(message, stacklevel=stacklevel)
    return threshold, source, chosen


def parity_device() -> jax.Device | None:
    """Where the parity checks run: the CPU, whose float32 convolutions are float32. On an
    Ampere or newer GPU, XLA's default float32 precision may use TF32 (results about 1e-3 off),
    far beyond PARITY_TOLERANCE, so a check there would compare rounding, not the export. None
    (the default device) when JAX has no CPU backend (JAX_PLATFORMS without cpu)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def random_parity_images(size: int, n: int = RANDOM_PARITY_IMAGES) -> np.ndarray:
    """Seeded uniform HU images (n, size, size, 1), for when no records are at hand."""
    rng = np.random.default_rng(RANDOM_PARITY_SEED)
    return rng.uniform(*RANDOM_HU_RANGE, (n, size, size, 1)).astype(np.float32)


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest |difference| per output (logits relative to |logit| beyond 1)."""
    errors = {}
    for name in OUTPUTS:
        a = np.asarray(got[name], np.float64)
        b = np.asarray(want[name], np.float64)
        if a.shape != b.shape:
            raise ParityError(f"output {name!r}: shape {a.shape} where JAX gives {b.shape}")
        scale = np.maximum(1.0, np.abs(b)) if name == "logit" else 1.0
        errors[name] = float(np.max(np.abs(a - b) / scale))
    return errors


def _check(what: str, errors: dict[str, float], tolerance: float) -> None:
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        raise ParityError(
            f"{what} disagrees with the JAX model: max error {bad} > {tolerance}. The export was "
            f"not published; check that every op of the model and of liverjax.preprocess lowers "
            f"the same way (e.g. no bfloat16 compute for a float32 TFLite file)."
        )


def _tf():
    """TensorFlow, imported on first use (the `export` extra)."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            "exporting needs tensorflow: pip install -e '.[export]' (serving and training do not)"
        ) from e
    return tf


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def tensorflow_stablehlo_version() -> str | None:
    """The newest StableHLO version the installed TensorFlow reads (None if it does not say)."""
    _tf()
    try:
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

        return str(tf_stablehlo.get_current_version())
    except (ImportError, AttributeError):
        return None


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
    """jax2tf conversions inside serialize StableHLO the installed TensorFlow can read.

    Yields the version the module is written in: JAX's target where TensorFlow reads it (or does
    not say what it reads), else TensorFlow's. jax.export has no public setting for the version,
    so its serializer is swapped for one that passes TensorFlow's, and put back on exit.
    """
    from jax._src.export import _export
    from jaxlib.mlir.dialects import stablehlo as jax_stablehlo

    jax_target = str(
        jax_stablehlo.get_version_from_compatibility_requirement(
            jax_stablehlo.StablehloCompatibilityRequirement.WEEK_4
        )
    )
    tf_version = tensorflow_stablehlo_version()
    if tf_version is None or _version(jax_target) <= _version(tf_version):
        yield jax_target
        return
    try:
        original = _export._module_to_bytecode
        serialize = _export._jax.mlir.serialize_portable_artifact
        with_sdy = _export.xb.get_backend().serialize_with_sdy
    except AttributeError:
        log.warning(
            "JAX %s writes StableHLO %s, newer than TensorFlow's %s, and liverjax cannot lower "
            "the version in this JAX: the parity check will tell whether TensorFlow reads it",
            jax.__version__,
            jax_target,
            tf_version,
        )
        yield jax_target
        return
    _export._module_to_bytecode = lambda module: serialize(module, tf_version, with_sdy)
    try:
        yield tf_version
    finally:
        _export._module_to_bytecode = original


def _tflite_interpreter(content: bytes):
    """A TFLite interpreter: LiteRT if installed, else tf.lite (deprecated there, still works)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = _tf().lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interpreter = Interpreter(model_content=content)
    return interpreter


def run_tflite(content: bytes, images: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of a batch-1 TFLite model over `images` (N, H, W, 1), one image per call."""
    runner = _tflite_interpreter(content).get_signature_runner(SIGNATURE)
    out = {name: [] for name in OUTPUTS}
    for image in np.asarray(images, np.float32):
        result = runner(**{INPUT: image[None]})
        for name in OUTPUTS:
            out[name].append(np.asarray(result[name]).reshape(-1))
    return {name: np.concatenate(v) for name, v in out.items()}


def _save_saved_model(fn, params, size: int, platforms: Sequence[str], path: pathlib.Path):
    """Writes the SavedModel (batch-polymorphic signature) and returns the tf.Module."""
    tf = _tf()
    from jax.experimental import jax2tf

    converted = jax2tf.convert(
        fn,
        polymorphic_shapes=[None, "(b, _, _, _)"],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    module.params = [tf.Variable(np.asarray(p), trainable=False) for p in params]
    spec = tf.TensorSpec([None, size, size, 1], tf.float32, name=INPUT)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(image):
        return converted(module.params, image)

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: serve})
    return module


def _tflite_models(fn, params, size: int, module) -> dict[str, bytes]:
    """float32 / fp16 / dynamic-range int8 TFLite flatbuffers at batch 1 (static shapes)."""
    tf = _tf()
    from jax.experimental import jax2tf

    converted = jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=("cpu",))

    @tf.function(
        input_signature=[tf.TensorSpec([1, size, size, 1], tf.float32, name=INPUT)],
        autograph=False,
    )
    def serve(image):
        return converted(module.params, image)

    concrete = serve.get_concrete_function()
    out = {}
    for variant in TFLITE_SUFFIXES:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if variant != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if variant == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        try:
            out[variant] = converter.convert()
        except Exception as e:  # TFLite's ConverterError and the like: one line, what to do
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"the TFLite converter failed on the {variant} variant ({first}); export with "
                "--no-tflite for the SavedModel and the serving module alone"
            ) from e
    return out


def _save_serving_module(fn, params, size: int, platforms: Sequence[str], assets: pathlib.Path):
    """Writes the jax.export module (batch-polymorphic) and its weights for `liverjax.serve`."""
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params], input_spec(size, "b")
    )
    (assets / STABLEHLO_FILE).write_bytes(exported.serialize())
    np.savez(assets / PARAMS_FILE, **{f"{i:05d}": np.asarray(p) for i, p in enumerate(params)})


def _quantization_check(
    float_probs: np.ndarray,
    variants: dict[str, np.ndarray],
    labels: np.ndarray | None,
    auc_tolerance: float = AUC_TOLERANCE,
) -> dict[str, Any]:
    """ROC AUC of each TFLite variant and its loss against float; raises beyond AUC_TOLERANCE."""
    if labels is None or len(np.unique(labels)) < 2:
        log.warning("parity images lack labels of both classes: quantized AUC loss not checked")
        return {"checked": False, "reason": "no labels of both classes among the parity images"}
    base = metrics.roc_auc(labels, float_probs)
    report: dict[str, Any] = {
        "checked": True,
        "examples": len(labels),
        "tolerance": auc_tolerance,
        "roc_auc": {"float32": base},
        "auc_loss": {},
    }
    for name, probs in variants.items():
        auc = metrics.roc_auc(labels, probs)
        report["roc_auc"][name] = auc
        report["auc_loss"][name] = base - auc
        report.setdefault("max_abs_probability_change", {})[name] = float(
            np.max(np.abs(probs - float_probs))
        )
    bad = {k: v for k, v in report["auc_loss"].items() if v > auc_tolerance}
    if bad:
        raise ParityError(
            f"quantized TFLite loses too much ROC AUC against float32 ({base:.4f}): {bad} > "
            f"{auc_tolerance}. Ship liver.tflite, or quantize with a representative dataset."
        )
    return report


def export_model(
    model: nnx.Module,
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_source: str = "default",
    step: int | None = None,
    input_size: int | None = None,
    parity_images: np.ndarray | None = None,
    parity_labels: np.ndarray | None = None,
    model_name: str = MODEL_NAME,
    platforms: Sequence[str] = PLATFORMS,
    extra_metadata: dict[str, Any] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    auc_tolerance: float = AUC_TOLERANCE,
    with_tflite: bool = True,
) -> ExportResult:
    """Exports `model` to `out_dir/<model_name>/<next version>/` and `out_dir/*.tflite`.

    `input_size` is the side of the HU images the signature takes (the records' size; default
    `config.image_size`); preprocessing resizes to `config.image_size` inside the graph.
    `parity_images` (N, size, size, 1) HU, with optional 0/1 `parity_labels`, are what the parity
    check runs on (default: seeded random HU images, and no AUC check). `tolerance` and
    `auc_tolerance` are the limits of the parity and quantization checks. `with_tflite=False`
    writes the SavedModel only (for TF Serving / liverjax.serve) and leaves the TFLite files be.
    The model is put in inference mode (`model.eval()`).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold = {threshold} is not a probability in [0, 1]")
    compute = str(config.model.get("dtype", "float32"))
    if with_tflite and compute != "float32":
        raise ValueError(
            f"config.model.dtype = {compute!r}: TFLite has no {compute} kernels (its converter "
            "fails on the network's ops); export with --no-tflite (the SavedModel and the "
            f"serving module compute in {compute}, as the network was trained and evaluated), "
            "or train with float32 compute for a TFLite file"
        )
    size = int(input_size or config.image_size)
    images = random_parity_images(size) if parity_images is None else parity_images
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (size, size, 1):
        raise ValueError(f"parity_images have shape {images.shape}; need (N, {size}, {size}, 1)")
    labels = None if parity_labels is None else np.asarray(parity_labels).astype(np.int64)

    model.eval()
    fn, params = serving_function(model, config)
    device = parity_device()
    want = jax.jit(fn)(jax.device_put(params, device), jax.device_put(images, device))
    want = jax.tree.map(np.asarray, want)

    model_dir = pathlib.Path(out_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        parity: dict[str, Any] = {"images": len(images), "tolerance": tolerance}
        with _stablehlo_for_tensorflow() as stablehlo_version:
            module = _save_saved_model(fn, params, size, platforms, staging)
        signature = _tf().saved_model.load(str(staging)).signatures[SIGNATURE]
        with _tf().device("/CPU:0"):  # a GPU TensorFlow would run it in TF32 too
            outputs = signature(**{INPUT: _tf().constant(images)})
        got = {k: v.numpy() for k, v in outputs.items()}
        parity["saved_model"] = _max_error(got, want)
        _check("the SavedModel", parity["saved_model"], tolerance)

        assets = staging / ASSETS_EXTRA
        assets.mkdir()
        _save_serving_module(fn, params, size, platforms, assets)
        metadata = build_metadata(
            config,
            size=size,
            threshold=threshold,
            threshold_source=threshold_source,
            step=step,
            model_name=model_name,
            platforms=platforms,
            extra=extra_metadata,
        )
        (assets / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        # The server's own loader: what is checked is what `liverjax.serve` will run.
        servable = serve.Servable.load(staging, version=0, warmup=False, device=device)
        parity["serving_module"] = _max_error(servable.predict(images), want)
        _check("the serving module (liverjax.stablehlo)", parity["serving_module"], tolerance)

        with _stablehlo_for_tensorflow():
            tflite = _tflite_models(fn, params, size, module) if with_tflite else {}
        if tflite:
            out = {name: run_tflite(content, images) for name, content in tflite.items()}
            parity["tflite_float32"] = _max_error(out["float32"], want)
            _check("liver.tflite", parity["tflite_float32"], tolerance)
            parity["quantized"] = _quantization_check(
                out["float32"]["probability"],
                {k: v["probability"] for k, v in out.items() if k != "float32"},
                labels,
                auc_tolerance,
            )
        metadata["parity"] = parity
        # What a TF Serving / TensorFlow must read: StableHLO of this version or newer.
        metadata["saved_model_stablehlo_version"] = stablehlo_version
        metadata["tensorflow_version"] = _tf().__version__
        (assets / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

        # mkdtemp made it 0700: published, it is read by servers running as other users.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        version = _publish(staging, model_dir)
        tflite_paths = {}
        for name, content in tflite.items():
            path = pathlib.Path(out_dir) / tflite_files(model_name)[name]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
            tflite_paths[name] = path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s version %d; parity %s", model_name, version, parity)
    metadata["version"] = version  # as _publish wrote it into the file
    return ExportResult(version, model_dir / str(version), tflite_paths, parity, metadata)


def _publish(staging: pathlib.Path, model_dir: pathlib.Path) -> int:
    """Renames `staging` to the next free integer version under `model_dir`; returns it.

    The next version is above every all-digit name there, files included: a stray file `2`
    would otherwise be retried for ever.
    """
    while True:
        taken = [int(p.name) for p in model_dir.iterdir() if p.name.isascii() and p.name.isdigit()]
        version = max(taken, default=0) + 1
        metadata_path = staging / ASSETS_EXTRA / METADATA_FILE
        metadata = json.loads(metadata_path.read_text())
        metadata["version"] = version
        metadata_path.write_text(json.dumps(metadata, indent=2))
        try:
            os.rename(staging, model_dir / str(version))
            return version
        except OSError:
            if not (model_dir / str(version)).exists():
                raise
            # another export took this version meanwhile: take the next one


def window_of(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The HU window the exported graph applies (`config.preprocess`), for liverjax.json."""
    section = config.preprocess
    return {"center": float(section.window_center), "width": float(section.window_width)}


def build_metadata(
    config: ml_collections.ConfigDict,
    *,
    size: int,
    threshold: float,
    threshold_source: str,
    step: int | None,
    model_name: str,
    platforms: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The contents of assets.extra/liverjax.json (parity and version are added later)."""
    return {
        "format": METADATA_FORMAT,
        "model_name": model_name,
        "signature_name": SIGNATURE,
        "inputs": {INPUT: {"dtype": "float32", "shape": [-1, size, size, 1], "units": "HU"}},
        "outputs": {name: {"dtype": "float32", "shape": [-1]} for name in OUTPUTS},
        "label_names": list(LABEL_NAMES),
        "input_size": size,
        "model_image_size": int(config.image_size),
        "window": window_of(config),
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "checkpoint_step": step,
        "config": json.loads(config.to_json_best_effort()),
        "serving_module": {"stablehlo": STABLEHLO_FILE, "params": PARAMS_FILE},
        "platforms": list(platforms),
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def read_parity_records(
    config: ml_collections.ConfigDict, split: str, max_examples: int
) -> tuple[np.ndarray, np.ndarray]:
    """(HU images (N, S, S, 1) float32, labels (N,)) of `split`: all, or a seeded subset."""
    from liverjax import input_pipeline

    name = config.dataset.name
    try:
        source = input_pipeline.open_source(config.dataset, split)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(
            f"{e}. The parity check needs the records; pass --data_dir DATA or --split"
        ) from e
    indices = np.arange(len(source))
    if len(indices) > max_examples:
        indices = np.sort(
            np.random.default_rng(RANDOM_PARITY_SEED).permutation(indices)[:max_examples]
        )
    rows = [source[int(i)] for i in indices]
    if not rows:
        raise ValueError(f"split {split!r} of {name} is empty: no records for the parity check")
    images = np.stack([np.asarray(r["image"], np.float32) for r in rows])
    return images, np.asarray([int(r["label"]) for r in rows])


def export_workdir(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | int = "best",
    split: str = "test",
    data_dir: str | None = None,
    max_parity_examples: int = MAX_PARITY_EXAMPLES,
    model_name: str = MODEL_NAME,
    with_tflite: bool = True,
    allow_other_checkpoint_threshold: bool = False,
) -> ExportResult:
    """Restores checkpoint `checkpoint` of the run in `workdir` and exports it (the CLI).

    The threshold comes from W/operating_point.json; one chosen for another checkpoint is an
    error unless `allow_other_checkpoint_threshold` (then a warning): the served labels would
    use a cut-off that was never validated for this model.
    """
    from liverjax import evaluate  # training's restore path; loaded only when exporting a run

    config = evaluate.load_config(workdir)
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    restored = evaluate.restore(config, workdir, checkpoint)
    threshold, source, chosen = operating_point(
        workdir, restored.step, restored.note, allow_other_checkpoint_threshold, stacklevel=3
    )
    images, labels = read_parity_records(config, split, max_parity_examples)
    return export_model(
        restored.model,
        config,
        out_dir,
        threshold=threshold,
        # the file's name, not this machine's path to it
        threshold_source=OPERATING_POINT_FILE if source != "default" else source,
        step=restored.step,
        input_size=images.shape[1],
        parity_images=images,
        parity_labels=labels,
        model_name=model_name,
        with_tflite=with_tflite,
        extra_metadata={
            "checkpoint": {"requested": checkpoint, "chosen": restored.note},
            "workdir": os.path.basename(os.path.abspath(workdir)),
            "parity_split": split,
            "operating_point": chosen or None,
        },
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> ExportResult:
    """Command line: export a trained run."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument(
        "--out", required=True, help="export root: writes OUT/MODEL_NAME/<version>/ and the TFLite"
    )
    parser.add_argument("--checkpoint", default="best", help="'best' (default), 'latest' or a step")
    parser.add_argument("--split", default="test", help="records for the parity check")
    parser.add_argument("--data_dir", default=None, help="where the records are, if moved")
    parser.add_argument(
        "--max_parity_examples",
        type=_positive_int,
        default=MAX_PARITY_EXAMPLES,
        help=f"records of --split the exported models are checked on (a seeded subset when the "
        f"split holds more; default {MAX_PARITY_EXAMPLES})",
    )
    parser.add_argument(
        "--model_name",
        default=MODEL_NAME,
        help=f"the served model's name and folder (default {MODEL_NAME!r})",
    )
    parser.add_argument(
        "--tflite",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the TFLite files (default); --no-tflite: the SavedModel only",
    )
    parser.add_argument(
        "--allow_other_checkpoint_threshold",
        action="store_true",
        help="export although operating_point.json was chosen for another checkpoint (warns)",
    )
    args = parser.parse_args(argv)
    checkpointing.command_logging()
    from liverjax import train  # its user_errors; the export itself loads it for the restore

    with train.user_errors("export", ParityError):
        result = export_workdir(
            args.workdir,
            args.out,
            checkpoint=args.checkpoint,
            split=args.split,
            data_dir=args.data_dir,
            max_parity_examples=args.max_parity_examples,
            model_name=args.model_name,
            with_tflite=args.tflite,
            allow_other_checkpoint_threshold=args.allow_other_checkpoint_threshold,
        )
    summary = {"version_dir": str(result.version_dir)}
    keys = ("checkpoint_step", "threshold", "threshold_source")
    summary |= {k: result.metadata.get(k) for k in keys}
    print(json.dumps(summary | {"parity": result.parity}, indent=2))
    return result


if __name__ == "__main__":
    main()
