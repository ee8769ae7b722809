"""Training and inference speed: `python -m liverjax.benchmark --config configs/default.py`.

Measures, with the real jitted steps of liverjax.train over all devices:

  train, in memory      one synthetic int16 HU batch already on the devices, the train step
                        (preprocess + augmentation + forward + backward + update) back to back
  train, no augment     the same with config.augment.enabled=False (the model alone)
  inference, in memory  `predict` (preprocess + forward + sigmoid) on the same batch
  train, end to end     batches read from the ArrayRecord records through the grain input
                        pipeline, made global arrays, and trained on: what a run sees

and prints images/s, model TFLOP/s (`models.flops_per_image`: 2x the multiply-adds of the
convs and dense layers a forward pass, 3x that a training step), model FLOP utilisation against
the chip's peak (`--peak_tflops`, or the vendor's dense figure for known accelerators), and the
ratio end-to-end / in-memory. With `--torch_ref PATH` (the reference script of the same seed CNN
in PyTorch and naive JAX, `--ref_frameworks`) it runs that script with the same image size and
batch and prints liverjax / reference ratios, same machine, same run. `--matmul_peak` measures
a large bf16 matrix product as the achievable ceiling; `--profile_dir` traces a few train steps
with `jax.profiler` and prints where the accelerator's time goes, kernel by kernel.
"""

import collections
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from liverjax import host_memory, input_pipeline, models, parallel, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps per measurement.", lower_bound=1)
flags.DEFINE_integer(
    "warmup",
    20,
    "Untimed steps first, dispatched as the timed ones are (compilation; host memory then has "
    "grown to its steady size: with liverjax.host_memory the first steps dispatched back to "
    "back still page-fault while the reused heap grows).",
    lower_bound=1,
)
flags.DEFINE_string("torch_ref", None, "Path of the reference script (ref_cnn.py).")
flags.DEFINE_list(
    "ref_frameworks",
    ["torch"],
    "Implementations of the reference script to run: torch (eager and torch.compile, fp32 and "
    "bf16) and/or jax (its naive jit-compiled JAX version, fp32 and bf16).",
)
flags.DEFINE_enum(
    "torch_host_malloc",
    "system",
    ["system", "reuse", "both"],
    "glibc malloc settings of the PyTorch run: 'system' (the reference as it runs by itself), "
    "'reuse' (liverjax.host_memory's settings, from the environment), or both in turn.",
)
flags.DEFINE_float(
    "peak_tflops",
    0.0,
    "Peak TFLOP/s of one device in the model's compute dtype, for model FLOP utilisation; 0: the "
    "vendor's dense figure where the device and dtype are in benchmark.PEAK_TFLOPS, else none.",
    lower_bound=0.0,
)
flags.DEFINE_bool(
    "matmul_peak", False, "Also time a bfloat16 matrix product: the achievable ceiling."
)
flags.DEFINE_integer("matmul_size", 8192, "Side of the --matmul_peak product.", lower_bound=1)
flags.DEFINE_string(
    "profile_dir", None, "Trace --profile_steps in-memory train steps into this folder."
)
flags.DEFINE_integer("profile_steps", 5, "Train steps in the profile.", lower_bound=1)
flags.DEFINE_string("json_out", None, "Also write the figures to this JSON file.")
flags.mark_flags_as_required(["config"])
REF_FRAMEWORKS = ("torch", "jax")
flags.register_validator(
    "ref_frameworks",
    lambda names: bool(names) and set(names) <= set(REF_FRAMEWORKS),
    message=f"--ref_frameworks: give one or both of {', '.join(REF_FRAMEWORKS)}",
)
flags.register_validator(  # before the liverjax measurements, not after them
    "torch_ref",
    lambda path: path is None or os.path.isfile(path),
    message="--torch_ref: no such file",
)

# Dense (no sparsity) peak TFLOP/s of one device by compute dtype, from the vendors' datasheets:
# (substring of jax's device_kind, dtype) -> TFLOP/s. The first match wins.
PEAK_TFLOPS = {
    ("H100 PCIe", "bfloat16"): 756.0,
    ("H100", "bfloat16"): 989.4,  # SXM
    ("H200", "bfloat16"): 989.4,  # SXM: the H100's arithmetic, more memory
    ("A100", "bfloat16"): 312.0,
}

# HU of the synthetic in-memory batch: soft tissue around the liver's ~60 HU, body-like spread.
_SYNTHETIC_HU_MEAN, _SYNTHETIC_HU_STD = 60.0, 150.0


def _timed(fn, n: int) -> float:
    """Seconds per call of fn() (which returns something to block on), after it is warm."""
    start = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def _synthetic_batch(config: ml_collections.ConfigDict, size: int, mesh) -> dict[str, jax.Array]:
    """One global batch of int16 HU images and 0/1 labels, on the devices."""
    rng = np.random.default_rng(config.seed)
    n = config.batch_size // jax.process_count()
    hu = rng.normal(_SYNTHETIC_HU_MEAN, _SYNTHETIC_HU_STD, (n, size, size, 1))
    local = {"image": hu.astype(np.int16), "label": (np.arange(n) % 2).astype(np.int32)}
    return parallel.global_batch(local, mesh)


def _train_in_memory(config, mesh, batch, steps: int, warmup: int):
    """(images/s, steps, state) of the train step on a batch already on the devices."""
    fns = train.make_steps(config, mesh, train.create_optimizer(config, 1, 1))
    state = fns.init()

    def one():
        nonlocal state
        state, out, _ = fns.train_step(state, batch)
        return out.loss.total

    _timed(one, warmup)
    return config.batch_size / _timed(one, steps), fns, state


def _reference(
    path: str, size: int, batch: int, steps: int, host_malloc: str, frameworks: list[str]
) -> dict[str, Any]:
    """The reference script's figures: its `torch_*` and `jax_*` keys ({} if nothing can run).

    With `host_malloc='reuse'` it runs with liverjax.host_memory's glibc settings, so that
    both sides page-fault (or not) alike.
    """
    frameworks = [f for f in frameworks if f in REF_FRAMEWORKS]
    if "torch" in frameworks and importlib.util.find_spec("torch") is None:
        logging.warning("torch is not importable: no PyTorch comparison")
        frameworks.remove("torch")
    if not frameworks:
        return {}
    cmd = [sys.executable, path, "--size", str(size), "--batch", str(batch)]
    cmd += ["--only", ",".join(frameworks), "--steps", str(steps)]
    env = {**os.environ, **(host_memory.GLIBC_ENV if host_malloc == "reuse" else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(
            f"the reference script failed (exit {done.returncode}): {' '.join(cmd)}\n"
            f"{done.stderr[-3000:]}"
        )
    out: dict[str, Any] = {}
    for line in done.stdout.strip().splitlines():  # one JSON line after each framework
        if line.startswith("{"):
            out.update(json.loads(line))
    return {k: v for k, v in out.items() if k.startswith(("torch_", "jax_"))}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak of PEAK_TFLOPS for this device and compute dtype, or None."""
    for (kind, peak_dtype), peak in PEAK_TFLOPS.items():
        if kind in device_kind and peak_dtype == dtype:
            return peak
    return None


def matmul_tflops(n: int = 8192, steps: int = 10) -> float:
    """TFLOP/s of an n x n x n bfloat16 matrix product on one device (random data)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jax.numpy.bfloat16) for i in range(2))
    product = jax.jit(lambda a, b: a @ b)
    for _ in range(3):
        product(a, b).block_until_ready()
    return 2 * n**3 / _timed(lambda: product(a, b), steps) / 1e12


def profile_summary(trace_dir: str, steps: int, top: int = 25) -> dict[str, Any]:
    """Where the accelerator's time went in a `jax.profiler` trace of `steps` train steps.

    Sums the kernels of every device plane ("/device:..."), on its stream lines where it has
    any: milliseconds a step per kernel name (with its HLO op where the trace names one), each
    kernel's share, and the device time a step against the wall time a step when given.
    """
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = ProfileData.from_file(files[-1])
    time_ns: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    devices = 0
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        devices += 1
        lines = list(plane.lines)
        streams = [line for line in lines if "stream" in line.name.lower()]
        for line in streams or lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op") or stats.get("tf_op")
                name = f"{event.name} [{op}]" if op and op != event.name else event.name
                time_ns[name] += event.duration_ns
                calls[name] += 1
    total = sum(time_ns.values())
    per_step = max(steps * max(devices, 1), 1)
    kernels = [
        {
            "kernel": name,
            "ms_per_step": ns / per_step / 1e6,
            "calls_per_step": calls[name] / per_step,
            "share": ns / total,
        }
        for name, ns in sorted(time_ns.items(), key=lambda kv: -kv[1])[:top]
    ]
    return {
        "trace": files[-1],
        "device_planes": devices,
        "device_ms_per_step": total / per_step / 1e6,
        "kernels": kernels,
    }


def run(
    config: ml_collections.ConfigDict,
    steps: int,
    warmup: int,
    torch_ref: str | None,
    torch_host_malloc: str = "system",
    *,
    ref_frameworks: tuple[str, ...] = ("torch",),
    peak: float | None = None,
    measure_matmul: bool = False,
    matmul_size: int = 8192,
    profile_dir: str | None = None,
    profile_steps: int = 5,
):
    """All measurements; returns the figures as a dict (also printed).

    peak: TFLOP/s of one device for model FLOP utilisation (None: `peak_tflops()`'s figure).
    """
    parallel.initialize_distributed(config.distributed)
    train.validate_config(config)
    mesh = parallel.create_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    input_pipeline.ensure_built(config.dataset)
    source = input_pipeline.open_source(config.dataset, config.dataset.train_split)
    record_size = int(source[0]["image"].shape[0])
    batch = _synthetic_batch(config, record_size, mesh)
    figures: dict[str, Any] = {
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "batch": config.batch_size,
        "image_size": config.image_size,
        "record_size": record_size,
        "model_dtype": config.model.dtype,
        "model_gflop_per_image": models.flops_per_image(config.model, config.image_size) / 1e9,
    }
    peak = peak or peak_tflops(figures["device_kind"], config.model.dtype)
    if peak:
        figures["peak_tflops_per_device"] = peak
    if measure_matmul:
        figures["matmul_bf16_tflops"] = matmul_tflops(matmul_size)

    figures["train_in_memory"], fns, state = _train_in_memory(config, mesh, batch, steps, warmup)
    images = batch["image"]
    _timed(lambda: fns.predict(state, images), warmup)
    figures["inference_in_memory"] = config.batch_size / _timed(
        lambda: fns.predict(state, images), steps
    )

    # End to end: the records through grain, global arrays, the same compiled step.
    it = iter(input_pipeline.train_dataset(source, config, global_batch_size=config.batch_size))

    def one():
        nonlocal state
        state, out, _ = fns.train_step(state, parallel.global_batch(next(it), mesh))
        return out.loss.total

    _timed(one, warmup)
    figures["train_end_to_end"] = config.batch_size / _timed(one, steps)
    figures["end_to_end_over_in_memory"] = figures["train_end_to_end"] / figures["train_in_memory"]

    if profile_dir:
        wall = _profile(fns, state, batch, profile_dir, profile_steps)
        figures["profile"] = profile_summary(profile_dir, profile_steps)
        figures["profile"]["wall_ms_per_step"] = wall * 1e3

    plain = ml_collections.ConfigDict(config.to_dict())
    plain.augment.enabled = False
    figures["train_in_memory_no_augment"], _, _ = _train_in_memory(
        plain, mesh, batch, steps, warmup
    )

    _add_flop_rates(figures)
    if torch_ref:
        seed = models.default_model_config()
        differs = [
            k
            for k in ("widths", "kernel_size", "dense", "head")
            if str(tuple(config.model[k]) if k == "widths" else config.model[k]) != str(seed[k])
        ]
        if differs:
            logging.warning(
                "the reference script runs the seed CNN; this config's model differs in %s, so "
                "the ratios compare different networks",
                ", ".join(f"{k}={config.model[k]!r}" for k in differs),
            )
        _print(figures)  # liverjax's figures first: the reference takes minutes (torch.compile)
        malloc_runs = ("system", "reuse") if torch_host_malloc == "both" else (torch_host_malloc,)
        # {"<key>" or "<key> (malloc reuse)": value}, every run's figures together.
        ref: dict[str, Any] = {}
        for malloc in malloc_runs:
            try:
                run_ref = _reference(
                    torch_ref,
                    config.image_size,
                    config.batch_size,
                    steps,
                    malloc,
                    list(ref_frameworks),
                )
            except RuntimeError as e:  # liverjax's figures stand (and reach --json_out)
                logging.error("%s", e)
                figures["reference_error"] = str(e)
                break
            label = "" if malloc == "system" else " (malloc reuse)"
            ref.update({k + label: v for k, v in run_ref.items()})
        if ref:
            figures["reference"] = ref
            _add_reference_ratios(figures, ref, config.model.dtype)
    return figures


def _profile(fns, state, batch, profile_dir: str, steps: int) -> float:
    """Traces `steps` train steps into profile_dir; returns the wall seconds a step."""
    with jax.profiler.trace(profile_dir):
        start = time.perf_counter()
        out = None
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, out, _ = fns.train_step(state, batch)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / steps


def _add_flop_rates(figures: dict[str, Any]) -> None:
    """Model TFLOP/s of each rate, and their utilisation of the peak where one is known."""
    flop = figures["model_gflop_per_image"] * 1e9
    rates = {
        "train_in_memory": 3,
        "train_in_memory_no_augment": 3,
        "train_end_to_end": 3,
        "inference_in_memory": 1,
    }
    for key, passes in rates.items():
        if key in figures:
            tflops = passes * flop * figures[key] / 1e12
            figures[f"{key}_tflops"] = tflops
            for ceiling, name in (("peak_tflops_per_device", "mfu"), ("matmul_bf16_tflops", "mmu")):
                if ceiling in figures:
                    figures[f"{key}_{name}"] = tflops / (figures[ceiling] * figures["devices"])


def _add_reference_ratios(figures: dict[str, Any], ref: dict[str, Any], dtype: str) -> None:
    """liverjax / reference ratios: train against PyTorch's best and naive JAX in the same dtype,
    inference against the best of the reference's implementations."""

    def best(prefix: str) -> tuple[str, float] | None:
        keys = [k for k in ref if k.startswith(prefix) and "_img_s" in k]
        return max(((k, ref[k]) for k in keys), key=lambda kv: kv[1]) if keys else None

    torch_train, any_infer = best("torch_train_"), best(("torch_infer_", "jax_infer_"))
    if torch_train:
        figures["torch_best_train"] = dict([torch_train])
        figures["train_over_torch"] = figures["train_in_memory"] / torch_train[1]
        figures["train_no_augment_over_torch"] = (
            figures["train_in_memory_no_augment"] / torch_train[1]
        )
    naive = f"jax_train_{dtype}_img_s"
    if naive in ref:
        figures["train_over_naive_jax"] = figures["train_in_memory"] / ref[naive]
    if any_infer:
        figures["reference_best_inference"] = dict([any_infer])
        figures["inference_over_reference"] = figures["inference_in_memory"] / any_infer[1]
    return figures


def _print(figures: dict[str, Any]) -> None:
    rows = [
        ("train, in memory (as configured)", "train_in_memory", "img/s"),
        ("train, in memory, no augmentation", "train_in_memory_no_augment", "img/s"),
        ("inference, in memory", "inference_in_memory", "img/s"),
        ("train, end to end from ArrayRecord", "train_end_to_end", "img/s"),
        ("end to end / in memory", "end_to_end_over_in_memory", "x"),
        ("train, model TFLOP/s", "train_in_memory_tflops", "TFLOP/s"),
        ("train, model FLOP utilisation of the peak", "train_in_memory_mfu", ""),
        ("train, of the measured bf16 matmul rate", "train_in_memory_mmu", ""),
        ("inference, model TFLOP/s", "inference_in_memory_tflops", "TFLOP/s"),
        ("inference, model FLOP utilisation", "inference_in_memory_mfu", ""),
        ("peak of one device (datasheet or --peak_tflops)", "peak_tflops_per_device", "TFLOP/s"),
        ("bf16 matmul (--matmul_size), one device", "matmul_bf16_tflops", "TFLOP/s"),
        ("train / best PyTorch train", "train_over_torch", "x"),
        ("train (no augmentation) / best PyTorch train", "train_no_augment_over_torch", "x"),
        ("train / the reference's naive JAX train", "train_over_naive_jax", "x"),
        ("inference / best reference inference", "inference_over_reference", "x"),
    ]
    print(
        f"\n{figures['devices']} x {figures['device_kind']}, batch {figures['batch']}, "
        f"{figures['image_size']}x{figures['image_size']} input "
        f"({figures['record_size']}x{figures['record_size']} records), {figures['model_dtype']}"
    )
    for label, key, unit in rows:
        if key in figures:
            print(f"  {label:<46} {figures[key]:10.2f} {unit}")
    for key in ("torch_best_train", "reference_best_inference"):
        if key in figures:
            ((name, value),) = figures[key].items()
            print(f"  {name:<46} {value:10.2f} img/s")
    if "profile" in figures:
        prof = figures["profile"]
        print(
            f"  profile: {prof['device_ms_per_step']:.2f} ms of kernels a step per device, "
            f"{prof['wall_ms_per_step']:.2f} ms wall a step ({prof['device_planes']} device planes)"
        )
        for k in prof["kernels"]:
            print(
                f"    {k['ms_per_step']:8.3f} ms {k['share']:6.1%} x{k['calls_per_step']:<5.1f} "
                f"{k['kernel'][:110]}"
            )
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    host_memory.keep_freed_memory()  # as `python -m liverjax.main` does
    figures = run(
        FLAGS.config,
        FLAGS.steps,
        FLAGS.warmup,
        FLAGS.torch_ref,
        FLAGS.torch_host_malloc,
        ref_frameworks=tuple(FLAGS.ref_frameworks),
        peak=FLAGS.peak_tflops or None,
        measure_matmul=FLAGS.matmul_peak,
        matmul_size=FLAGS.matmul_size,
        profile_dir=FLAGS.profile_dir,
        profile_steps=FLAGS.profile_steps,
    )
    _print(figures)
    print(json.dumps(figures))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(figures, f, indent=2)
    if "reference_error" in figures:
        sys.exit("the reference script failed (above); liverjax's figures are printed")


if __name__ == "__main__":
    app.run(main, flags_parser=train.parse_config_flags)
