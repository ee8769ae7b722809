"""Compare two evaluated runs on the same images: paired differences, patient-bootstrap intervals.

    python -m liverjax.compare W_A W_B [--out compare.json]

Each workdir holds an evaluation of the same split of the same records (`python -m
liverjax.evaluate --workdir W --split S`): its report/metrics.json and report/predictions.csv,
which are all this reads (no checkpoint, no records). For each level (slice, patient max, patient
mean) and metric it gives A's and B's value, the difference B - A, its percentile bootstrap
interval and the two-sided bootstrap p-value of no difference; the ROC AUCs also get DeLong's
paired test (`metrics.paired_delong`, clustered in patients at slice level). Each resample draws
the same patients for both runs, so what the two share (the hard and the easy patients) cancels out
of the difference: the interval of a difference is narrower than the two runs' own intervals
suggest. Threshold metrics (sensitivity, specificity) are at each run's own operating point, as its
report gives them, and also get an exact McNemar test over patients (`metrics.paired_mcnemar`:
exact under the null that A and B are equally likely to be the one that is right, patient by
patient; at a patient level, equal sensitivity), which keeps its level with few discordant patients
where the bootstrap p-value does not. At each run's own threshold these test the operating points,
not the models: a lower threshold buys sensitivity with specificity. The p-values are not adjusted
for the number of comparisons: name the one that answers your question before you look.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from liverjax import evaluate, metrics, train

# What is compared at each level: the ranking, then the operating point, then calibration.
SLICE_METRICS = ("roc_auc", "average_precision", "recall", "specificity", "brier", "ece")
LEVEL_METRICS = {
    level: tuple(
        m for m in SLICE_METRICS if level == "slice" or m not in evaluate.CALIBRATION_NAMES
    )
    for level in evaluate.LEVELS
}
# The report's words; lower is better for the errors of the probabilities.
LABELS = {"recall": "sensitivity", "brier": "brier (lower=better)", "ece": "ece (lower=better)"}


def load(workdir: str | os.PathLike) -> tuple[dict[str, Any], evaluate.Predictions]:
    """(metrics.json, its predictions.csv) of the evaluation in `workdir`."""
    report = os.path.join(os.fspath(workdir), evaluate.REPORT_DIR)
    path = os.path.join(report, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: evaluate the run first (python -m liverjax.evaluate "
            f"--workdir {workdir} --split test)"
        )
    result = train.read_json(path)
    predictions = evaluate.read_predictions_csv(
        os.path.join(report, "predictions.csv"), result["split"]
    )
    return result, predictions


def check_same_images(
    a: tuple[dict[str, Any], evaluate.Predictions], b: tuple[dict[str, Any], evaluate.Predictions]
) -> None:
    """A ValueError unless both evaluations scored the same images, with the same labels."""
    (ra, pa), (rb, pb) = a, b
    for what, x, y in (
        ("split", ra["split"], rb["split"]),
        ("dataset", ra["dataset"]["full_name"], rb["dataset"]["full_name"]),
        ("number of images", pa.labels.size, pb.labels.size),
    ):
        if x != y:
            raise ValueError(
                f"the two evaluations are not of the same images: {what} {x!r} in A, {y!r} in "
                "B; evaluate both runs on the same split of the same records"
            )
    for name in ("sop_uid", "path", "patient_id"):
        differ = np.flatnonzero(pa.ids[name] != pb.ids[name])
        if differ.size:
            i = int(differ[0])
            raise ValueError(
                f"the two evaluations are not of the same images: row {i} of predictions.csv "
                f"has {name} {pa.ids[name][i]!r} in A, {pb.ids[name][i]!r} in B "
                f"({differ.size} rows differ)"
            )
    differ = np.flatnonzero(pa.labels != pb.labels)
    if differ.size:
        i = int(differ[0])
        raise ValueError(
            f"the two evaluations label the same image differently: row {i} "
            f"({pa.ids['path'][i]}) is {pa.labels[i]} in A, {pb.labels[i]} in B "
            f"({differ.size} rows differ); were the records rebuilt with another label sheet?"
        )


def compare(
    a: tuple[dict[str, Any], evaluate.Predictions],
    b: tuple[dict[str, Any], evaluate.Predictions],
    *,
    n_resamples: int | None = None,
    seed: int | None = None,
    confidence: float | None = None,
) -> dict[str, Any]:
    """The comparison of two `load`ed evaluations (the bootstrap settings default to A's)."""
    check_same_images(a, b)
    (ra, pa), (rb, pb) = a, b
    boot = ra["bootstrap"]
    n_resamples = boot["n_resamples"] if n_resamples is None else n_resamples
    seed = boot["seed"] if seed is None else seed
    confidence = boot["confidence"] if confidence is None else confidence
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"--confidence {confidence!r}: must be in (0, 1), e.g. 0.95")
    min_patients = boot["min_patients_per_class"]
    levels = {}
    for level, names in LEVEL_METRICS.items():
        units, labels, probs_a = pa.level(level)
        _, _, probs_b = pb.level(level)
        groups = pa.ids["patient_id"] if level == "slice" else units
        thresholds = (ra["levels"][level]["threshold"], rb["levels"][level]["threshold"])
        values = [
            metrics.summary(labels, p, t, n_bins=ra["eval_settings"]["calibration_bins"])
            for p, t in zip((probs_a, probs_b), thresholds, strict=True)
        ]
        lesion = np.unique(groups[labels == 1]).size
        normal = np.unique(groups[labels == 0]).size
        enough = min(lesion, normal) >= min_patients
        ci = metrics.paired_bootstrap_ci(
            groups,
            labels,
            probs_a,
            probs_b,
            names if enough else [],
            n_resamples=n_resamples,
            seed=seed,
            alpha=1.0 - confidence,
            thresholds=thresholds,
            n_bins=ra["eval_settings"]["calibration_bins"],
        )
        tests = {
            name: dataclasses.asdict(
                metrics.paired_mcnemar(
                    groups, labels, probs_a, probs_b, name, thresholds=thresholds
                )
            )
            for name in names
            if name in metrics.MCNEMAR_METRICS
        }
        delong = metrics.paired_delong(groups, labels, probs_a, probs_b, alpha=1.0 - confidence)
        tests["roc_auc"] = dataclasses.asdict(
            delong if enough else evaluate.too_few_for_delong(delong)
        )
        levels[level] = {
            "unit": "image" if level == "slice" else "patient",
            "n": int(labels.size),
            "thresholds": {"a": thresholds[0], "b": thresholds[1]},
            "ci_method": "paired_bootstrap" if enough else "too_few_patients",
            "metrics": {
                name: {
                    "a": values[0][name],
                    "b": values[1][name],
                    "difference": values[1][name] - values[0][name],
                    "ci": list(ci.get(name, (math.nan, math.nan))),
                    "p_value": ci.p_values.get(name, math.nan),
                    "resamples_used": ci.n_used.get(name, 0),
                }
                | ({"mcnemar": tests[name]} if name in metrics.MCNEMAR_METRICS else {})
                | ({"delong": tests[name]} if name == "roc_auc" else {})
                for name in names
            },
            "bootstrap_skipped_single_class": ci.n_skipped if enough else None,
        }
    return {
        "warnings": comparability_warnings(ra, rb),
        "split": ra["split"],
        "dataset": ra["dataset"]["full_name"],
        "images": int(pa.labels.size),
        "patients": int(np.unique(pa.ids["patient_id"]).size),
        "a": _run(ra),
        "b": _run(rb),
        "bootstrap": {
            "unit": "patient",
            "paired": True,
            "method": "percentile",
            "n_resamples": n_resamples,
            "seed": seed,
            "confidence": confidence,
            "min_patients_per_class": min_patients,
            "p_value": "two-sided, 2 * min(P(d <= 0), P(d >= 0)), not adjusted for multiplicity",
        },
        "mcnemar": "sensitivity and specificity: two-sided exact McNemar test over patients "
        "(the sign-flip distribution of each patient's only-A minus only-B right rows; the exact "
        "binomial test where a patient is one row), each run at its own threshold, not adjusted "
        "for multiplicity",
        "delong": "ROC AUC: two-sided DeLong test of the paired AUCs (at slice level Obuchowski's "
        "clustered covariance, patients as the independent units), not adjusted for multiplicity",
        "levels": levels,
    }


def comparability_warnings(ra: dict[str, Any], rb: dict[str, Any]) -> list[str]:
    """What makes the two evaluations' figures less comparable than they look, a sentence each:
    operating points chosen by other rules or on other splits (their sensitivities and
    specificities then differ by construction), thresholds chosen on the evaluated split itself,
    and other bootstrap or calibration settings (A's are used for both)."""
    out = []
    a, b = ra["operating_point"], rb["operating_point"]
    for what, key in (("rule", "rule_description"), ("split", "chosen_on")):
        if a[key] != b[key]:
            out.append(
                f"the operating points were chosen by another {what} (A: {a[key]}; B: "
                f"{b[key]}): sensitivity and specificity differ by construction; compare the "
                "AUCs, or evaluate both with the same --eval threshold_rule"
            )
    for name, op in (("A", a), ("B", b)):
        if op.get("same_split_as_evaluated"):
            out.append(
                f"{name} chose its thresholds on the evaluated split itself: its sensitivity "
                "and specificity are optimistic"
            )
    keys = ("bootstrap_resamples", "bootstrap_seed", "bootstrap_min_patients", "confidence")
    settings_a, settings_b = ra["eval_settings"], rb["eval_settings"]
    differ = [k for k in (*keys, "calibration_bins") if settings_a.get(k) != settings_b.get(k)]
    if differ:
        out.append(
            f"B's report used other settings ({', '.join(differ)}); this comparison uses A's for "
            "both, so B's ECE may differ from its own report's"
        )
    return out


def _run(result: dict[str, Any]) -> dict[str, Any]:
    op = result["operating_point"]
    return {
        "checkpoint_step": result["checkpoint"]["step"],
        "model": result["config"]["model"].get("name", "cnn"),
        "threshold_rule": op["rule_description"],
        "threshold_chosen_on": op["chosen_on"],
        "evaluated": result["created"],
    }


def format_table(comparison: dict[str, Any]) -> str:
    """The comparison as a plain-text table, a row per level and metric."""
    confidence = comparison["bootstrap"]["confidence"]
    runs = [
        f"{name}: step {comparison[key]['checkpoint_step']}, operating point by "
        f"{comparison[key]['threshold_rule'].split(':')[0]} on "
        f"{comparison[key]['threshold_chosen_on']}"
        for name, key in (("A", "a"), ("B", "b"))
    ]
    lines = [
        f"{comparison['split']} split of {comparison['dataset']}: {comparison['images']} images, "
        f"{comparison['patients']} patients; A at step {comparison['a']['checkpoint_step']}, B "
        f"at step {comparison['b']['checkpoint_step']}; B - A with paired patient-bootstrap "
        f"{confidence:.0%} intervals ({comparison['bootstrap']['n_resamples']} resamples)",
        f"{'level':<13} {'metric':<20} {'A':>7} {'B':>7} {'B - A':>8}  {'interval':<17} {'p':>6}"
        f"  {'test p':>9}  only A/B right",
    ]
    lines[1:1] = runs
    approximate = False
    for level, entry in comparison["levels"].items():
        for name, m in entry["metrics"].items():
            low, high = m["ci"]
            interval = "n/a" if math.isnan(low) else f"{low:+.3f} to {high:+.3f}"
            p = "n/a" if math.isnan(m["p_value"]) else f"{m['p_value']:.3f}"
            if m["p_value"] == 0.0:  # no resample crossed zero
                p = f"<{1 / m['resamples_used']:.3f}"
            test, exact = m.get("mcnemar"), ""
            delong = m.get("delong")
            if delong is not None:
                q = delong["p_value"]
                q = math.nan if q is None else q
                exact = "n/a" if math.isnan(q) else "<0.001" if q < 0.001 else f"{q:.3f}"
                exact = f"{exact:>9}"
            if test is not None:
                q = test["p_value"]
                shown = "n/a" if math.isnan(q) else "<0.001" if q < 0.001 else f"{q:.3f}"
                shown += "~" if test["method"] != "exact" else ""
                approximate = approximate or test["method"] != "exact"
                exact = f"{shown:>9}  {test['only_a']}/{test['only_b']}"
            lines.append(
                f"{level:<13} {LABELS.get(name, name):<20} {m['a']:>7.3f} {m['b']:>7.3f} "
                f"{m['difference']:>+8.3f}  {interval:<17} {p:>6}  {exact}".rstrip()
            )
        lines.append(
            f"{'':<13} (thresholds A {entry['thresholds']['a']:.4g}, B "
            f"{entry['thresholds']['b']:.4g}: sensitivity and specificity at each run's own)"
        )
        if entry["ci_method"] == "too_few_patients":
            lines.append(
                f"{'':<13} (no interval at {level}: fewer than "
                f"{comparison['bootstrap']['min_patients_per_class']} patients in a class)"
            )
    lines.append(
        "test p: for ROC AUC DeLong's test of the paired AUCs (clustered in patients at slice "
        "level, Obuchowski); for sensitivity and specificity the McNemar test."
    )
    lines.append(
        "McNemar: exact sign-flip test over patients (A and B equally likely to be the one "
        "that is right, patient by patient), each run at its own threshold: it tests the "
        "operating points, so read sensitivity and specificity together"
        + ("; ~: its normal approximation (Durkalski)" if approximate else "")
    )
    lines += [f"warning: {w}" for w in comparison["warnings"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: compare two evaluated runs."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.compare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("workdir_a", metavar="W_A", help="the first run (the reference)")
    parser.add_argument("workdir_b", metavar="W_B", help="the second run")
    parser.add_argument("--out", default=None, help="write the comparison to this JSON file")
    parser.add_argument(
        "--n_resamples", type=int, default=None, help="bootstrap resamples (default: A's)"
    )
    parser.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: A's)")
    parser.add_argument(
        "--confidence", type=float, default=None, help="interval level (default: A's, 0.95)"
    )
    args = parser.parse_args(argv)
    with train.user_errors("comparison"):
        comparison = compare(
            load(args.workdir_a),
            load(args.workdir_b),
            n_resamples=args.n_resamples,
            seed=args.seed,
            confidence=args.confidence,
        )
        if args.out:
            evaluate.write_json(args.out, comparison)
    print(format_table(comparison))
    return comparison


if __name__ == "__main__":
    main()
