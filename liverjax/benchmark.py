"""Training and inference speed: `python -m liverjax.benchmark --config configs/default.py`.

Measures, with the real jitted steps of liverjax.train over all devices:

  train, in memory      one synthetic int16 HU batch already on the devices, the train step
                        (preprocess + augmentation + forward + backward + update) back to back
  train, no augment     the same with config.augment.enabled=False (the model alone)
  inference, in memory  `predict` (preprocess + forward + sigmoid) on the same batch
  train, end to end     batches read from the ArrayRecord records through the grain input
                        pipeline, made global arrays, and trained on: what a run sees

and prints images/s and the ratios end-to-end / in-memory. With `--torch_ref PATH` (the
reference script of the same seed CNN in PyTorch) and torch importable, it runs that script
with the same image size and batch and prints JAX / best-PyTorch ratios, same machine, same run.
"""

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

from liverjax import host_memory, input_pipeline, parallel, train

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
flags.DEFINE_string("torch_ref", None, "Path of the PyTorch reference script (ref_cnn.py).")
flags.DEFINE_enum(
    "torch_host_malloc",
    "system",
    ["system", "reuse", "both"],
    "glibc malloc settings of the PyTorch run: 'system' (the reference as it runs by itself), "
    "'reuse' (liverjax.host_memory's settings, from the environment), or both in turn.",
)
flags.DEFINE_string("json_out", None, "Also write the figures to this JSON file.")
flags.mark_flags_as_required(["config"])

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


def _torch_reference(
    path: str, size: int, batch: int, steps: int, host_malloc: str
) -> dict[str, Any] | None:
    """The reference script's JSON line for PyTorch (None without torch).

    With `host_malloc='reuse'` it runs with liverjax.host_memory's glibc settings, so that
    both sides page-fault (or not) alike.
    """
    if importlib.util.find_spec("torch") is None:
        logging.warning("torch is not importable: no PyTorch comparison")
        return None
    cmd = [sys.executable, path, "--size", str(size), "--batch", str(batch), "--only", "torch"]
    cmd += ["--steps", str(steps)]
    env = {**os.environ, **(host_memory.GLIBC_ENV if host_malloc == "reuse" else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    config: ml_collections.ConfigDict,
    steps: int,
    warmup: int,
    torch_ref: str | None,
    torch_host_malloc: str = "system",
):
    """All measurements; returns the figures as a dict (also printed)."""
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
    }

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

    plain = ml_collections.ConfigDict(config.to_dict())
    plain.augment.enabled = False
    figures["train_in_memory_no_augment"], _, _ = _train_in_memory(
        plain, mesh, batch, steps, warmup
    )

    if torch_ref:
        _print(figures)  # the JAX figures first: the PyTorch script takes minutes (torch.compile)
        malloc_runs = ("system", "reuse") if torch_host_malloc == "both" else (torch_host_malloc,)
        # {"<torch key>" or "<torch key> (malloc reuse)": value}, every run's figures together.
        ref: dict[str, Any] = {}
        for malloc in malloc_runs:
            run_ref = _torch_reference(
                torch_ref, config.image_size, config.batch_size, steps, malloc
            )
            label = "" if malloc == "system" else " (malloc reuse)"
            ref.update({k + label: v for k, v in (run_ref or {}).items() if k.startswith("torch")})
        if ref:
            figures["torch"] = ref
            # The best PyTorch figure of every mode and every malloc setting measured.
            train_keys = [k for k in ref if k.startswith("torch_train_") and "_img_s" in k]
            infer_keys = [k for k in ref if k.startswith("torch_infer_") and "_img_s" in k]
            best_train = max(train_keys, key=ref.get)
            best_infer = max(infer_keys, key=ref.get)
            figures["torch_best_train"] = {best_train: ref[best_train]}
            figures["torch_best_inference"] = {best_infer: ref[best_infer]}
            figures["train_over_torch"] = figures["train_in_memory"] / ref[best_train]
            figures["train_no_augment_over_torch"] = (
                figures["train_in_memory_no_augment"] / ref[best_train]
            )
            figures["inference_over_torch"] = figures["inference_in_memory"] / ref[best_infer]
    return figures


def _print(figures: dict[str, Any]) -> None:
    rows = [
        ("train, in memory (as configured)", "train_in_memory", "img/s"),
        ("train, in memory, no augmentation", "train_in_memory_no_augment", "img/s"),
        ("inference, in memory", "inference_in_memory", "img/s"),
        ("train, end to end from ArrayRecord", "train_end_to_end", "img/s"),
        ("end to end / in memory", "end_to_end_over_in_memory", "x"),
        ("train / best PyTorch train", "train_over_torch", "x"),
        ("train (no augmentation) / best PyTorch train", "train_no_augment_over_torch", "x"),
        ("inference / best PyTorch inference", "inference_over_torch", "x"),
    ]
    print(
        f"\n{figures['devices']} x {figures['device_kind']}, batch {figures['batch']}, "
        f"{figures['image_size']}x{figures['image_size']} input "
        f"({figures['record_size']}x{figures['record_size']} records), {figures['model_dtype']}"
    )
    for label, key, unit in rows:
        if key in figures:
            print(f"  {label:<46} {figures[key]:10.2f} {unit}")
    for key in ("torch_best_train", "torch_best_inference"):
        if key in figures:
            ((name, value),) = figures[key].items()
            print(f"  {name:<46} {value:10.2f} img/s")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    host_memory.keep_freed_memory()  # as `python -m liverjax.main` does
    figures = run(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.torch_ref, FLAGS.torch_host_malloc)
    _print(figures)
    print(json.dumps(figures))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
