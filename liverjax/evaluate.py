"""Evaluation of a trained checkpoint: metrics with patient-level intervals, and a report.

    python -m liverjax.evaluate --workdir W --split test [--checkpoint best|latest|STEP]

restores a checkpoint that `liverjax.train` wrote in W, predicts every image of the validation
split and of `--split` once, and writes

    W/operating_point.json   the threshold chosen on validation (read by liverjax.export)
    W/report/metrics.json    everything below, with checkpoint step, split, dataset and config
    W/report/predictions.csv one row per image: ids, label, probability, predicted class
    W/report/patients.csv    one row per patient: label, slices, max and mean probability
    W/report/threshold_predictions.csv, threshold_patients.csv  the same for the split the
                             thresholds were chosen on (when it is not the one evaluated)
    W/report/{roc,pr,calibration,confusion}.png
    W/report/report.html     one self-contained page (liverjax.report)

Method (what a reader of the report needs to know):

* Operating point: the threshold is chosen on the validation split, by Youden's J (default) or as
  the highest threshold whose sensitivity reaches `eval.target_sensitivity`, and applied
  unchanged to the evaluated split. A prediction is "lesion" when probability >= threshold.
* Levels: "slice" is one image; "patient_max" / "patient_mean" aggregate a patient's slice
  probabilities by their maximum / mean, and a patient is "lesion" if any slice is. Each level
  gets its own threshold, chosen on validation at that level by the same rule; when the validation
  patients hold a single class the slice threshold is used, and the report says so.
* Uncertainty, at every level, with patients as the independent units (never slices): sensitivity,
  specificity, PPV, NPV and accuracy get Wilson score intervals on the effective sample size (the
  slices over the Rao-Scott design effect of their clustering in patients, with a t quantile on
  patients - 1 degrees of freedom; each patient counts once where at most one patient holds the
  rarer outcome, as at 0 % or 100 %, still with that t quantile), which stay wide on small sets
  where a bootstrap collapses to a point. AUC, AP, F1, Brier and ECE get percentile bootstrap
  intervals resampling patients, when each class has `eval.bootstrap_min_patients` patients;
  resamples holding one class are left out (their count is reported). Brier and ECE are reported
  for slices only.
* All numbers come from liverjax.metrics; probabilities from the same jitted `predict` as
  training's validation (liverjax.train), so preprocessing is liverjax.preprocess.

Settings come from `config.eval` when the config has it, else from `default_eval_config()`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from liverjax import (
    checkpointing,
    host_memory,
    input_pipeline,
    metrics,
    models,
    parallel,
    preprocess,
    report,
    saliency,
    train,
)

logger = logging.getLogger("liverjax.evaluate")

REPORT_DIR = "report"
OPERATING_POINT_FILE = "operating_point.json"  # liverjax.export reads it from the workdir
# predictions.csv and patients.csv of the split the thresholds were chosen on
THRESHOLD_FILES = ("threshold_predictions.csv", "threshold_patients.csv")
LABEL_NAMES = ("normal", "lesion")
THRESHOLD_RULES = ("youden", "sensitivity")
CHECKPOINT_CHOICES = ("best", "latest")
# Levels of analysis: name → aggregation of slice probabilities per patient (None: per slice).
LEVELS: dict[str, str | None] = {"slice": None, "patient_max": "max", "patient_mean": "mean"}
ID_FIELDS = ("patient_id", "study_uid", "series_uid", "sop_uid", "source", "path")
# Records read at once when collecting the ids of a split.
_ID_SCAN_CHUNK = 256


def default_eval_config() -> ml_collections.ConfigDict:
    """Evaluation settings; a `config.eval` section overrides any of them."""
    return ml_collections.ConfigDict(
        {
            # 'youden' (max sensitivity + specificity - 1) or 'sensitivity' (the highest
            # threshold whose validation sensitivity is >= target_sensitivity).
            "threshold_rule": "youden",
            "target_sensitivity": 0.9,
            # The two-sided interval level, of every interval.
            "confidence": 0.95,
            # Patient bootstrap (intervals of AUC, AP, F1, Brier, ECE): resamples, seed, and the
            # patients each class needs (with a lesion slice / with a normal one) for an interval
            # at all; with fewer, the few distinct resamples make a meaningless one ("CI n/a").
            "bootstrap_resamples": 1000,
            "bootstrap_seed": 0,
            "bootstrap_min_patients": 5,
            # Equal-width bins of the reliability diagram and of the ECE.
            "calibration_bins": metrics.DEFAULT_N_BINS,
            # Highest-probability false positives and lowest-probability false negatives shown
            # with a Grad-CAM overlay (each).
            "worst_cases": 4,
        }
    )


def eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """default_eval_config() updated by `config.eval`; raises naming any unknown or bad key."""
    settings = default_eval_config()
    overrides = config.get("eval") or {}
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(
            f"config.eval has unknown keys {unknown}; the known ones are {sorted(settings)} "
            "(see liverjax.evaluate.default_eval_config)"
        )
    settings.update(dict(overrides))
    s = settings
    if s.threshold_rule not in THRESHOLD_RULES:
        raise ValueError(
            f"config.eval.threshold_rule = {s.threshold_rule!r}: use one of {THRESHOLD_RULES}"
        )
    if not 0.0 < s.target_sensitivity <= 1.0:
        raise ValueError(
            f"config.eval.target_sensitivity = {s.target_sensitivity!r}: must be in (0, 1]"
        )
    if not 0.0 < s.confidence < 1.0:
        raise ValueError(f"config.eval.confidence = {s.confidence!r}: must be in (0, 1), e.g. 0.95")
    for key in ("bootstrap_resamples", "bootstrap_min_patients", "calibration_bins"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise ValueError(f"config.eval.{key} = {s[key]!r}: must be a positive int")
    if not isinstance(s.worst_cases, int) or isinstance(s.worst_cases, bool) or s.worst_cases < 0:
        raise ValueError(f"config.eval.worst_cases = {s.worst_cases!r}: must be an int >= 0")
    return settings


# --------------------------------------------------------------------------- predictions


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One split's lesion probabilities, in record order, with the ids of every image."""

    split: str
    labels: np.ndarray  # (n,) int64, 0 normal / 1 lesion
    probs: np.ndarray  # (n,) float64
    ids: Mapping[str, np.ndarray]  # ID_FIELDS → (n,) str

    def level(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit ids, labels, probs) at level `name`; units are images or patients."""
        if name not in LEVELS:
            raise ValueError(f"unknown level {name!r}; choose from {tuple(LEVELS)}")
        patients = self.ids["patient_id"]
        if LEVELS[name] is None:
            return patients, self.labels, self.probs
        return metrics.aggregate_by_group(patients, self.labels, self.probs, LEVELS[name])


def read_ids(source: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(labels (n,) int64, {id field: (n,) str}) of every record of `source`, in order."""
    n = len(source)
    labels = np.empty(n, np.int64)
    ids: dict[str, list[str]] = {name: [] for name in ID_FIELDS}
    for start in range(0, n, _ID_SCAN_CHUNK):
        idx = list(range(start, min(start + _ID_SCAN_CHUNK, n)))
        records = (
            source.__getitems__(idx)
            if hasattr(source, "__getitems__")
            else [source[i] for i in idx]
        )
        labels[start : start + len(idx)] = [int(r["label"]) for r in records]
        for name in ID_FIELDS:
            ids[name].extend(_text(r.get(name, b"")) for r in records)
    return labels, {name: np.asarray(v, dtype=str) for name, v in ids.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _to_host(x: jax.Array) -> np.ndarray:
    """Host copy of a global array (gathered from every process if it is spread over several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def predict_batches(
    steps: train.Steps,
    state: train.TrainState,
    batches: Iterable[np.ndarray],
    mesh: jax.sharding.Mesh,
) -> np.ndarray:
    """Probabilities (float64, concatenated) of batches of HU images, each this process's rows
    of a global batch of the same size, through training's jitted `predict`."""
    outputs = []
    for images in batches:
        sharded = parallel.global_batch({"image": images}, mesh)["image"]
        outputs.append(_to_host(steps.predict(state, sharded)))
    if not outputs:
        return np.zeros((0,), np.float64)
    return np.concatenate(outputs).astype(np.float64)


def predict_split(
    steps: train.Steps,
    state: train.TrainState,
    source: Sequence[Mapping[str, Any]],
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    split: str,
) -> Predictions:
    """Probabilities of every record of `source` once, through training's jitted `predict`."""
    batches = input_pipeline.eval_dataset(source, config, global_batch_size=config.eval_batch_size)
    # The eval iterator yields the records in order, padded at the end only.
    probs = predict_batches(steps, state, (b["image"] for b in batches), mesh)[: len(source)]
    labels, ids = read_ids(source)
    return Predictions(split=split, labels=labels, probs=probs, ids=ids)


# --------------------------------------------------------------------------- operating point


def choose_threshold(
    labels: np.ndarray, probs: np.ndarray, settings: ml_collections.ConfigDict
) -> float:
    """The threshold by `settings.threshold_rule`, placed halfway down to the next lower of
    `probs` (`metrics.threshold_between`: the same decisions on them, none on the edge); raises
    if (labels, probs) lack a class."""
    if settings.threshold_rule == "youden":
        chosen = metrics.youden_threshold(labels, probs)
    else:
        chosen = metrics.threshold_for_sensitivity(labels, probs, settings.target_sensitivity)
    return metrics.threshold_between(probs, chosen)


def _rule_can_apply(labels: np.ndarray, rule: str) -> bool:
    """Whether `labels` hold the classes the threshold rule needs."""
    has_pos, has_neg = bool((labels == 1).any()), bool((labels == 0).any())
    return has_pos and (has_neg or rule == "sensitivity")


def rule_description(settings: ml_collections.ConfigDict) -> str:
    """The threshold rule in words."""
    between = ", placed halfway down to the next lower probability"
    if settings.threshold_rule == "youden":
        return f"Youden's J: the threshold that maximises sensitivity + specificity − 1{between}"
    return (
        f"target sensitivity: the highest threshold whose sensitivity is at least "
        f"{settings.target_sensitivity:g} (the most specific one reaching it){between}"
    )


def slices_per_patient(predictions: Predictions) -> dict[str, float]:
    """min, median and max of the slices a patient has among `predictions`: the patient-level
    thresholds chosen on them hold for patients of about as many slices (the max of more slices
    is higher by chance)."""
    _, counts = np.unique(predictions.ids["patient_id"], return_counts=True)
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}


def operating_points(
    validation: Predictions, settings: ml_collections.ConfigDict
) -> dict[str, dict[str, Any]]:
    """Per level: the threshold chosen on `validation`, how, and its validation metrics."""
    points: dict[str, dict[str, Any]] = {}
    for level in LEVELS:
        _, labels, probs = validation.level(level)
        if _rule_can_apply(labels, settings.threshold_rule):
            threshold = choose_threshold(labels, probs, settings)
            source = f"chosen on {validation.split} ({level.replace('_', ' ')})"
        elif level == "slice":
            raise ValueError(
                f"cannot choose a threshold on split {validation.split!r}: its "
                f"{labels.size} images are all {LABEL_NAMES[int(labels[0])]}; the rule "
                f"{settings.threshold_rule!r} needs lesion and normal images there. Rebuild the "
                "dataset with a larger validation fraction"
            )
        else:
            threshold = points["slice"]["threshold"]
            source = (
                f"slice threshold: the {labels.size} {validation.split} patients are all "
                f"{LABEL_NAMES[int(labels[0])]}, so no patient-level threshold can be chosen"
            )
        s = metrics.summary(labels, probs, threshold, n_bins=settings.calibration_bins)
        points[level] = {
            "threshold": float(threshold),
            "source": source,
            "validation": {k: s[k] for k in ("n", "recall", "specificity", "tp", "fp", "tn", "fn")},
        }
    return points


# --------------------------------------------------------------------------- metrics


# Metrics of probabilities, not of a decision: shown for slices only. A patient's max or mean of
# slice probabilities ranks patients, but is no probability of the patient's label.
CALIBRATION_NAMES = ("brier", "ece")


def intervals(
    settings: ml_collections.ConfigDict,
    groups: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    names: Sequence[str] = metrics.METRIC_NAMES,
) -> dict[str, Any]:
    """The (1 - alpha) intervals of `names`, and how each was obtained.

    Proportions (sensitivity, specificity, PPV, NPV, accuracy): Wilson score intervals with the
    patient clustering's design effect (`metrics.proportion_intervals`). The rest (AUC, AP, F1,
    Brier, ECE): percentile bootstrap resampling `groups` (patients), when each class has
    `settings.bootstrap_min_patients` patients; else NaN.
    """
    alpha = 1.0 - settings.confidence
    wanted = [n for n in names if n in metrics.PROPORTION_NAMES]
    wilson = metrics.proportion_intervals(
        groups, labels, probs, wanted, alpha=alpha, threshold=threshold
    )
    lesion = np.unique(groups[labels == 1]).size
    normal = np.unique(groups[labels == 0]).size
    enough = min(lesion, normal) >= settings.bootstrap_min_patients
    boot = [n for n in names if n in metrics.BOOTSTRAP_NAMES]
    ci = metrics.bootstrap_ci(
        groups,
        labels,
        probs,
        boot if enough else [],
        n_resamples=settings.bootstrap_resamples,
        seed=settings.bootstrap_seed,
        alpha=alpha,
        threshold=threshold,
        n_bins=settings.calibration_bins,
    )
    bounds = {name: [w.low, w.high] for name, w in wilson.items()}
    bounds |= {name: list(ci.get(name, (math.nan, math.nan))) for name in boot}
    return {
        "ci": {name: bounds[name] for name in names},
        "ci_method": {
            name: "wilson" if name in wilson else ("bootstrap" if enough else "too_few_patients")
            for name in names
        },
        "design_effect": {name: w.design_effect for name, w in wilson.items()},
        "ci_patients": {"with_lesion": int(lesion), "with_normal": int(normal)},
        "ci_resamples_used": dict(ci.n_used),
        "bootstrap_skipped_single_class": ci.n_skipped if enough else None,
    }


def too_few_for_delong(
    found: metrics.AucInterval | metrics.DeLongTest,
) -> metrics.AucInterval | metrics.DeLongTest:
    """`found` without its interval or test, where a class has fewer than
    `bootstrap_min_patients` patients: its normal approximation would look precise there."""
    nan = {"se": math.nan, "ci": (math.nan, math.nan), "method": "too_few_patients"}
    if isinstance(found, metrics.DeLongTest):
        nan |= {"z": math.nan, "p_value": math.nan, "correlation": math.nan}
    return dataclasses.replace(found, **nan)


def assess(
    predictions: Predictions,
    points: Mapping[str, Mapping[str, Any]],
    settings: ml_collections.ConfigDict,
) -> dict[str, dict[str, Any]]:
    """Per level: metrics at that level's threshold, and their intervals (`intervals`)."""
    out: dict[str, dict[str, Any]] = {}
    patients_of_images = predictions.ids["patient_id"]
    for level in LEVELS:
        units, labels, probs = predictions.level(level)
        threshold = points[level]["threshold"]
        values = metrics.summary(labels, probs, threshold, n_bins=settings.calibration_bins)
        names = metrics.METRIC_NAMES
        if level != "slice":
            values = {k: v for k, v in values.items() if k not in CALIBRATION_NAMES}
            names = tuple(n for n in names if n not in CALIBRATION_NAMES)
        # Patients are the resampling unit (and the clusters) at every level: at slice level a
        # drawn patient brings all of its images.
        groups = patients_of_images if level == "slice" else units
        out[level] = {
            "unit": "image" if level == "slice" else "patient",
            "threshold": threshold,
            "threshold_source": points[level]["source"],
            "patients": int(np.unique(patients_of_images).size),
            "metrics": values,
            **intervals(settings, groups, labels, probs, threshold, names),
        }
        # The interval most papers give beside the bootstrap's: DeLong's, clustered in patients
        # at slice level (Obuchowski); as the bootstrap's, none with too few patients per class.
        delong = metrics.delong_interval(labels, probs, groups, alpha=1.0 - settings.confidence)
        if out[level]["ci_method"]["roc_auc"] == "too_few_patients":
            delong = too_few_for_delong(delong)
        out[level] |= {
            "roc_auc_delong": dataclasses.asdict(delong),
            # float32's sigmoid is exactly 1.0 above a logit of about 16.6: such slices tie
            "probability_one": {
                name: int(np.count_nonzero((probs == 1.0) & (labels == value)))
                for value, name in enumerate(LABEL_NAMES)
            },
        }
    return out


def assess_by_source(
    predictions: Predictions, threshold: float, settings: ml_collections.ConfigDict
) -> dict[str, dict[str, Any]]:
    """Slice-level metrics and their intervals (`intervals`) of each image source (site)."""
    out: dict[str, dict[str, Any]] = {}
    for source in np.unique(predictions.ids["source"]):
        keep = predictions.ids["source"] == source
        labels, probs = predictions.labels[keep], predictions.probs[keep]
        patients = predictions.ids["patient_id"][keep]
        found = intervals(settings, patients, labels, probs, threshold)
        out[str(source)] = {
            "patients": int(np.unique(patients).size),
            "patients_with_lesion": int(np.unique(patients[labels == 1]).size),
            "metrics": metrics.summary(labels, probs, threshold, n_bins=settings.calibration_bins),
            "ci": found["ci"],
            "ci_method": found["ci_method"],
        }
    return out


def _one_per_patient_first(order: np.ndarray, patients: np.ndarray, n: int) -> np.ndarray:
    """The first n of `order`, taking each patient's first image before any patient's second."""
    seen: set[str] = set()
    first, rest = [], []
    for i in order:
        (rest if patients[i] in seen else first).append(int(i))
        seen.add(patients[i])
    return np.asarray((first + rest)[:n], dtype=np.int64)


def worst_cases(predictions: Predictions, threshold: float, n: int) -> dict[str, np.ndarray]:
    """Indices of the n most confident false positives and false negatives, spread over patients.

    False positives by decreasing, false negatives by increasing probability; a patient's next
    error comes only after every patient with such an error has one shown.
    """
    p, y = predictions.probs, predictions.labels
    patients = predictions.ids["patient_id"]
    fp = np.flatnonzero((y == 0) & (p >= threshold))
    fn = np.flatnonzero((y == 1) & (p < threshold))
    return {
        "false_positive": _one_per_patient_first(
            fp[np.argsort(-p[fp], kind="stable")], patients, n
        ),
        "false_negative": _one_per_patient_first(fn[np.argsort(p[fn], kind="stable")], patients, n),
    }


def saliency_cases(
    model: nnx.Module,
    source: Sequence[Mapping[str, Any]],
    predictions: Predictions,
    indices: Mapping[str, np.ndarray],
    config: ml_collections.ConfigDict,
) -> list[dict[str, Any]]:
    """The images at `indices` as the network sees them, with their Grad-CAM map (None for a
    network without `features` and `classify`) and ids."""
    kinds = [kind for kind, idx in indices.items() for _ in idx]
    flat = [int(i) for idx in indices.values() for i in idx]
    if not flat:
        return []
    hu = np.stack([np.asarray(source[i]["image"]) for i in flat])
    x = preprocess.preprocess(jax.numpy.asarray(hu), config)
    if hasattr(model, "features") and hasattr(model, "classify"):
        maps, logits = saliency.grad_cam(model, x)  # all cases in one batch: one compilation
        maps = list(np.asarray(maps))
    else:
        logits = nnx.jit(lambda m, x: m(x, deterministic=True, rngs=None))(model, x)
        maps = [None] * len(flat)
    x, logits = np.asarray(x), np.asarray(logits)
    return [
        {
            "kind": kind,
            "index": i,
            **{name: str(predictions.ids[name][i]) for name in ID_FIELDS},
            "label": int(predictions.labels[i]),
            "probability": float(predictions.probs[i]),
            "logit": float(logits[j]),
            "image": x[j, ..., 0],
            "cam": maps[j],
        }
        for j, (kind, i) in enumerate(zip(kinds, flat, strict=True))
    ]


def analyse(
    validation: Predictions, test: Predictions, settings: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Operating points chosen on `validation`, and every metric and interval on `test`."""
    points = operating_points(validation, settings)
    return {
        "operating_point": {
            "rule": settings.threshold_rule,
            "rule_description": rule_description(settings),
            "target_sensitivity": (
                settings.target_sensitivity if settings.threshold_rule == "sensitivity" else None
            ),
            "chosen_on": validation.split,
            "same_split_as_evaluated": validation.split == test.split,
            "slices_per_patient": slices_per_patient(validation),
            "levels": points,
        },
        "levels": assess(test, points, settings),
        "by_source": assess_by_source(test, points["slice"]["threshold"], settings),
        "bootstrap": {
            "unit": "patient",
            "method": "percentile",
            "metrics": list(metrics.BOOTSTRAP_NAMES),
            "n_resamples": settings.bootstrap_resamples,
            "seed": settings.bootstrap_seed,
            "min_patients_per_class": settings.bootstrap_min_patients,
            "confidence": settings.confidence,
        },
        "proportion_intervals": {
            "method": "wilson",
            "clusters": "patient",
            "design_effect": "rao_scott",
            "metrics": list(metrics.PROPORTION_NAMES),
            "confidence": settings.confidence,
        },
        "roc_auc_delong": {
            "method": "DeLong et al. (1988) variance; at slice level Obuchowski's (1997) "
            "clustered version, patients as the independent units; auc -/+ z * se, cut to [0, 1]",
            "confidence": settings.confidence,
        },
        "eval_settings": settings.to_dict(),
    }


# --------------------------------------------------------------------------- checkpoint


@dataclasses.dataclass
class Restored:
    """A checkpoint restored for evaluation."""

    step: int
    requested: str
    note: str  # how the step was chosen, in words
    steps: train.Steps
    state: train.TrainState
    model: nnx.Module  # the same parameters as an NNX module (for Grad-CAM), eval mode
    mesh: jax.sharding.Mesh
    meta: dict[str, Any]  # what training saved with the checkpoint (validation metrics, ...)


def resolve_checkpoint(ckpt: checkpointing.Checkpointer, which: str | int) -> tuple[int, str]:
    """(step, how it was chosen) for 'best', 'latest' or a step number (an int, or its digits)."""
    if isinstance(which, int | np.integer) and not isinstance(which, bool):
        which = str(int(which))
    elif not isinstance(which, str):
        raise ValueError(f"checkpoint {which!r}: use 'best', 'latest' or a step number")
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt.directory}: train first (python -m liverjax.main "
            "--config ... --workdir W), or point --workdir at a trained run"
        )
    if which == "latest":
        return available[-1], "the latest checkpoint"
    if which == "best":
        best = ckpt.best_step()
        if best is None:
            return available[-1], (
                f"the latest checkpoint (asked for the best, but no kept checkpoint has a "
                f"finite validation {ckpt.best_metric})"
            )
        return best, f"the best kept checkpoint by validation {ckpt.best_metric}"
    if not which.isdigit():
        raise ValueError(
            f"--checkpoint {which!r}: use 'best', 'latest' or a step number; "
            f"available steps: {available}"
        )
    if int(which) not in available:
        raise FileNotFoundError(
            f"--checkpoint {which}: no such checkpoint in {ckpt.directory}; "
            f"available steps: {available}"
        )
    return int(which), f"step {which}, as requested"


def fit_eval_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Rounds `config.eval_batch_size` up to a multiple of the mesh's devices, in place: a run
    trained on 8 devices is evaluated, exported or scored on 6. It sets how many images go
    through at once (the last batch is padded), not any result."""
    n, size = mesh.devices.size, config.eval_batch_size
    if isinstance(size, int) and size > 0 and size % n:
        config.eval_batch_size = -(-size // n) * n
        logger.info(
            "config.eval_batch_size %d -> %d: a multiple of the %d devices here",
            size,
            config.eval_batch_size,
            n,
        )


def restore(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str | int
) -> Restored:
    """Restore checkpoint `which` ('best' | 'latest' | step) of the run in `workdir`;
    `config.eval_batch_size` is first fitted to the devices here (`fit_eval_batch_size`)."""
    directory = epath.Path(workdir) / train.CHECKPOINT_DIR
    if not directory.exists():
        raise FileNotFoundError(
            f"{directory} does not exist: train first (python -m liverjax.main --config ... "
            f"--workdir {workdir}), or point --workdir at a trained run"
        )
    ckpt = checkpointing.Checkpointer(
        directory,
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        best_metric=config.best_metric,
        async_save=False,
    )
    try:
        step, note = resolve_checkpoint(ckpt, which)
        mesh = parallel.create_mesh()
        fit_eval_batch_size(config, mesh)
        parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
        # The optimizer's state structure does not depend on the schedule's lengths.
        tx = train.create_optimizer(config, steps_per_epoch=1, total_steps=1)
        steps = train.make_steps(config, mesh, tx)
        state, meta = ckpt.restore(steps.abstract_state, None, step)
    finally:
        ckpt.close()
    # Created under jit with training's initialization PRNG (quick to compile); its parameters
    # are then replaced by the restored ones.
    key = jax.random.key(config.seed, impl=train.INIT_PRNG)
    model = nnx.jit(lambda: models.create_model(config, rngs=nnx.Rngs(key)))()
    nnx.update(model, jax.device_get(state.params), jax.device_get(state.model_state))
    model.eval()
    return Restored(step, which, note, steps, state, model, mesh, meta)


# --------------------------------------------------------------------------- files


def _json_safe(value: Any) -> Any:
    """NaN / inf → None, numpy scalars → Python, tuples → lists (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: epath.PathLike, value: Any) -> None:
    """Strict JSON (NaN written as null), indented."""
    epath.Path(path).write_text(json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")


def csv_file(path: epath.PathLike):
    """A UTF-8 text file for the csv module (newline="": it writes its own line ends), on any
    file system epath reaches."""
    return io.TextIOWrapper(epath.Path(path).open("wb"), encoding="utf-8", newline="")


def write_predictions_csv(path: epath.PathLike, predictions: Predictions, threshold: float) -> None:
    """One row per image: index, ids, label, probability, predicted class, outcome."""
    with csv_file(path) as f:
        w = csv.writer(f)
        w.writerow(
            [
                "index",
                *ID_FIELDS,
                "label",
                "label_name",
                "probability",
                "predicted",
                "predicted_name",
                "outcome",
            ]
        )
        for i, (y, p) in enumerate(zip(predictions.labels, predictions.probs, strict=True)):
            predicted = int(p >= threshold)
            w.writerow(
                [
                    i,
                    *(predictions.ids[name][i] for name in ID_FIELDS),
                    int(y),
                    LABEL_NAMES[y],
                    repr(float(p)),
                    predicted,
                    LABEL_NAMES[predicted],
                    _outcome(int(y), predicted),
                ]
            )


def read_predictions_csv(path: epath.PathLike, split: str) -> Predictions:
    """The Predictions of `split` that `write_predictions_csv` wrote to `path`, in its order."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: evaluate the run first")
    with io.TextIOWrapper(path.open("rb"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = ("index", *ID_FIELDS, "label", "probability")
    missing = [c for c in wanted if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(
            f"{path}: not an evaluation's predictions.csv ("
            + (f"no column {', '.join(missing)}" if rows else "no rows")
            + "); evaluate the run again"
        )
    labels, probs = np.empty(len(rows), np.int64), np.empty(len(rows), np.float64)
    for i, row in enumerate(rows):
        try:
            if int(row["index"]) != i:
                raise ValueError(f"index {row['index']} where {i} was expected")
            labels[i], probs[i] = int(row["label"]), float(row["probability"])
        except ValueError as e:
            raise ValueError(f"{path}, line {i + 2}: {e}") from None
    try:
        metrics.check_inputs(labels, probs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    ids = {name: np.asarray([row[name] for row in rows]) for name in ID_FIELDS}
    return Predictions(split=split, labels=labels, probs=probs, ids=ids)


def write_patients_csv(
    path: epath.PathLike, predictions: Predictions, points: Mapping[str, Mapping[str, Any]]
) -> None:
    """One row per patient: label, slices, max and mean probability and the predicted classes."""
    groups, labels, p_max = predictions.level("patient_max")
    _, _, p_mean = predictions.level("patient_mean")
    _, counts = np.unique(predictions.ids["patient_id"], return_counts=True)
    t_max, t_mean = points["patient_max"]["threshold"], points["patient_mean"]["threshold"]
    with csv_file(path) as f:
        w = csv.writer(f)
        w.writerow(
            [
                "patient_id",
                "label",
                "label_name",
                "slices",
                "probability_max",
                "predicted_max",
                "probability_mean",
                "predicted_mean",
            ]
        )
        for g, y, n, a, b in zip(groups, labels, counts, p_max, p_mean, strict=True):
            w.writerow(
                [
                    g,
                    int(y),
                    LABEL_NAMES[y],
                    int(n),
                    repr(float(a)),
                    int(a >= t_max),
                    repr(float(b)),
                    int(b >= t_mean),
                ]
            )


def _outcome(label: int, predicted: int) -> str:
    return {(1, 1): "TP", (0, 1): "FP", (0, 0): "TN", (1, 0): "FN"}[(label, predicted)]


def read_curation_report(source: Any) -> tuple[dict[str, Any] | None, str]:
    """(the dataset's curation_report.json, its path), or (None, path) if it is absent."""
    info = getattr(source, "dataset_info", None)
    if info is None:
        return None, "(records without dataset info)"
    path = epath.Path(info.data_dir) / "curation_report.json"
    if not path.exists():
        return None, os.fspath(path)
    return train.read_json(path), os.fspath(path)


# --------------------------------------------------------------------------- the run


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    split: str = "test",
    checkpoint: str | int = "best",
) -> dict[str, Any]:
    """Evaluate a checkpoint of `workdir` on `split`; writes W/report/ and returns metrics.json."""
    settings = eval_settings(config)
    restored = restore(config, workdir, checkpoint)
    threshold_split = config.dataset.eval_split
    sources = {
        name: input_pipeline.open_source(config.dataset, name)
        for name in dict.fromkeys((threshold_split, split))
    }
    preds = {
        name: predict_split(restored.steps, restored.state, src, config, restored.mesh, name)
        for name, src in sources.items()
    }
    test = preds[split]
    analysis = analyse(preds[threshold_split], test, settings)
    points = analysis["operating_point"]["levels"]
    cases = saliency_cases(
        restored.model,
        sources[split],
        test,
        worst_cases(test, points["slice"]["threshold"], settings.worst_cases),
        config,
    )
    info = sources[split].dataset_info
    curation, curation_path = read_curation_report(sources[split])
    result = {
        "split": split,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dataset": {
            "name": config.dataset.name,
            "version": str(info.version),
            "full_name": info.full_name,
            "data_dir": os.fspath(info.data_dir),
            "images": int(test.labels.size),
            "lesion_images": int(test.labels.sum()),
            "patients": int(np.unique(test.ids["patient_id"]).size),
            "curation_report": curation_path if curation is not None else None,
        },
        "checkpoint": {
            "requested": checkpoint,
            "step": restored.step,
            "chosen": restored.note,
        },
        **analysis,
        "config": json.loads(config.to_json_best_effort()),
        "versions": {"jax": jax.__version__},
    }
    if jax.process_index() == 0:
        chosen_on = preds[threshold_split] if threshold_split != split else None
        _write_outputs(
            epath.Path(workdir), result, test, points, cases, curation, settings, chosen_on
        )
    return result


def _write_outputs(
    workdir: epath.Path,
    result: dict[str, Any],
    test: Predictions,
    points: Mapping[str, Mapping[str, Any]],
    cases: list[dict[str, Any]],
    curation: dict[str, Any] | None,
    settings: ml_collections.ConfigDict,
    chosen_on: Predictions | None = None,
) -> epath.Path:
    """Write operating_point.json and the report folder; with `chosen_on` (the split the
    thresholds were chosen on, when it is not `test`'s) its predictions and patients too, so the
    thresholds can be derived again from the report folder.

    Everything is written into `report.writing/` (and `operating_point.json.writing`) first,
    then renamed into place, so a run killed while writing leaves the earlier evaluation whole,
    never a folder of two checkpoints' files."""
    workdir = epath.Path(workdir)  # a gs:// workdir too (pathlib would make it a local gs:/)
    final, old = workdir / REPORT_DIR, workdir / f"{REPORT_DIR}.old"
    out = workdir / f"{REPORT_DIR}.writing"
    # What an evaluation killed before left: a report half written (dropped), or, killed
    # between its renames, the earlier report moved aside (put back).
    if out.exists():
        out.rmtree()
    if old.exists():
        if final.exists():
            old.rmtree()
        else:
            old.rename(final)
    out.mkdir(parents=True)
    op = result["operating_point"]
    op_file = workdir / f"{OPERATING_POINT_FILE}.writing"
    write_json(
        op_file,
        {
            "threshold": points["slice"]["threshold"],
            "rule": op["rule"],
            "target_sensitivity": op["target_sensitivity"],
            "split": op["chosen_on"],
            "checkpoint_step": result["checkpoint"]["step"],
            "dataset": result["dataset"]["full_name"],
            "validation": points["slice"]["validation"],
            "patient_level": {
                level: points[level]["threshold"] for level in LEVELS if level != "slice"
            },
            "slices_per_patient": op["slices_per_patient"],  # of the patients they were chosen on
        },
    )
    write_json(out / "metrics.json", result)
    write_predictions_csv(out / "predictions.csv", test, points["slice"]["threshold"])
    write_patients_csv(out / "patients.csv", test, points)
    if chosen_on is not None:  # its split is metrics.json's operating_point.chosen_on
        threshold = points["slice"]["threshold"]
        write_predictions_csv(out / THRESHOLD_FILES[0], chosen_on, threshold)
        write_patients_csv(out / THRESHOLD_FILES[1], chosen_on, points)
    report.write_report(
        out,
        result,
        {level: test.level(level)[1:] for level in LEVELS},
        cases,
        curation,
        n_bins=settings.calibration_bins,
    )
    if final.exists():
        final.rename(old)
    out.rename(final)
    op_file.replace(workdir / OPERATING_POINT_FILE)
    if old.exists():
        old.rmtree()
    logger.info("wrote %s", final)
    return final


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config that training saved in `workdir` (config.json)."""
    path = epath.Path(workdir) / train.CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a training run's folder (training writes "
            "config.json there at start)"
        )
    return ml_collections.ConfigDict(train.read_json(path))


def _parse_value(text: str) -> Any:
    """A command-line value: an int, float or bool if it reads as one, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: evaluate a trained run and write its report."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.evaluate",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument(
        "--checkpoint", default="best", help="'best' (default), 'latest', or a step number"
    )
    parser.add_argument(
        "--data_dir", default=None, help="where the records are, if not where training read them"
    )
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config.eval setting of the run, e.g. --eval threshold_rule=sensitivity "
        f"--eval target_sensitivity=0.95 (keys: {', '.join(default_eval_config())})",
    )
    args = parser.parse_args(argv)
    host_memory.keep_freed_memory()
    checkpointing.command_logging()
    with train.user_errors("evaluation"):
        config = load_config(args.workdir)
        if args.data_dir is not None:
            config.dataset.data_dir = args.data_dir
        overrides = dict(config.get("eval") or {})
        for item in args.eval:
            key, sep, text = item.partition("=")
            if not sep:
                parser.error(f"--eval {item!r}: write KEY=VALUE, e.g. threshold_rule=sensitivity")
            overrides[key.strip()] = _parse_value(text.strip())
        with config.unlocked():
            config.eval = overrides
        eval_settings(config)  # a bad key or value fails here, before the checkpoint is read
        result = evaluate(config, args.workdir, split=args.split, checkpoint=args.checkpoint)
    s = result["levels"]["slice"]
    lo, hi = s["ci"]["roc_auc"]
    ci = "CI n/a" if math.isnan(lo) or math.isnan(hi) else f"CI {lo:.3f}-{hi:.3f}"
    print(
        f"{result['split']}: slice ROC AUC {s['metrics']['roc_auc']:.3f} "
        f"({result['bootstrap']['confidence']:.0%} {ci}) at checkpoint step "
        f"{result['checkpoint']['step']}; report in "
        f"{os.path.join(args.workdir, REPORT_DIR, report.HTML_FILE)}"
    )
    return result


if __name__ == "__main__":
    main()
