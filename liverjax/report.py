"""The evaluation report: ROC, PR, calibration and confusion figures, and one self-contained page.

`write_report(out_dir, result, level_data, cases, curation)` writes roc.png, pr.png,
calibration.png, confusion.png and report.html into `out_dir`. `result` is what
`liverjax.evaluate.evaluate` returns (metrics.json holds it with NaN written as null, which these
functions do not take back: undefined values must be float NaN); every number on the page comes
from it or from `liverjax.metrics` curves. The page embeds its images as data URIs and has no
script and no external resource, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from liverjax import metrics  # noqa: E402
from tfds_liver import curation as curation_lib  # noqa: E402

HTML_FILE = "report.html"
FIGURES = ("roc", "pr", "calibration", "confusion")
LEVEL_TITLES = {"slice": "Slice", "patient_max": "Patient (max)", "patient_mean": "Patient (mean)"}
# Okabe-Ito colours (distinguishable with colour-vision deficiency), one per level.
LEVEL_STYLE = {
    "slice": {"color": "#0072B2", "linestyle": "-"},
    "patient_max": {"color": "#D55E00", "linestyle": "--"},
    "patient_mean": {"color": "#009E73", "linestyle": ":"},
}
CLASS_COLORS = {"normal": "#56B4E9", "lesion": "#E69F00"}
DPI = 110  # PNG resolution: about 600 px for a 5.5-inch figure
FIGSIZE = (5.5, 5.0)  # inches, curves
CAM_ALPHA = 0.6  # overlay opacity at the strongest Grad-CAM value (transparent at 0)
CAM_COLORMAP = "inferno"  # dark = weak, bright yellow = strongest lesion evidence
CASE_DISPLAY_SIZE = 256  # case images are enlarged to about this many pixels per side
CASE_GAP_FRACTION = 16  # white gap between the two panels: 1/16 of the image width
PROB_HIST_BINS = 20  # histogram of predicted probabilities under the reliability diagram
# Fewer patients than this in the evaluated split puts a warning on the page.
SMALL_PATIENT_COUNT = 30

# Rows of the metrics table: (key in metrics.summary, label, whether lower is better).
METRIC_ROWS = (
    ("roc_auc", "ROC AUC", False),
    ("average_precision", "PR AUC (average precision)", False),
    ("recall", "Sensitivity (recall)", False),
    ("specificity", "Specificity", False),
    ("precision", "PPV (precision)", False),
    ("npv", "NPV", False),
    ("f1", "F1 score", False),
    ("accuracy", "Accuracy", False),
    ("brier", "Brier score", True),
    ("ece", "Expected calibration error", True),
)
CASE_TITLES = {
    "false_positive": "False positives: normal slices with the highest lesion probability",
    "false_negative": "False negatives: lesion slices with the lowest lesion probability",
}


# --------------------------------------------------------------------------- figures


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def threshold_text(t: float) -> str:
    """A threshold with the digits that tell it from 0 and 1: 0.635, 0.999960 (not 1.000)."""
    closest = min(t, 1.0 - t)
    if not 0 < closest < 0.01:
        return f"{t:.3f}"
    return f"{t:.{1 - math.floor(math.log10(closest))}f}"


def _with_ci(level: Mapping[str, Any], name: str, confidence: int | None = None) -> str:
    """'0.912 (0.850-0.960)' from a level of the result; with `confidence` (in percent)
    '0.912 (95% CI 0.850-0.960)'."""
    if name not in level["metrics"]:
        return "\u2014"  # not computed at this level (Brier and ECE of patients)
    value = level["metrics"][name]
    low, high = level["ci"].get(name, (None, None))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{_fmt(value)} (CI n/a)"
    label = f"{confidence}% CI " if confidence is not None else ""
    return f"{_fmt(value)} ({label}{_fmt(low)}\u2013{_fmt(high)})"


def _delong_cell(level: Mapping[str, Any]) -> str:
    """'0.850-0.960', the DeLong interval of a level's ROC AUC; a dash for a report from before
    it was computed."""
    delong = level.get("roc_auc_delong")
    if delong is None:
        return "\u2014"
    low, high = delong["ci"]
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "n/a"
    return f"{_fmt(low)}\u2013{_fmt(high)}"


COUNTS_TITLE = "TP / FP / TN / FN"


def _counts(m: Mapping[str, Any]) -> str:
    """'TP / FP / TN / FN' of metrics `m` (liverjax.metrics.summary's counts)."""
    return " / ".join(str(m[k]) for k in ("tp", "fp", "tn", "fn"))


def _both_classes(labels: np.ndarray) -> bool:
    return bool((labels == 1).any() and (labels == 0).any())


def roc_figure(
    level_data: Mapping[str, tuple[np.ndarray, np.ndarray]], result: Mapping[str, Any]
) -> bytes:
    """ROC curves of every level, each with its operating point."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, label="Chance")
    for level, (labels, probs) in level_data.items():
        info = result["levels"][level]
        if not _both_classes(labels):
            ax.plot([], [], **LEVEL_STYLE[level], label=f"{LEVEL_TITLES[level]}: n/a (one class)")
            continue
        fpr, tpr, _ = metrics.roc_curve(labels, probs)
        ax.plot(
            fpr,
            tpr,
            lw=2,
            **LEVEL_STYLE[level],
            label=f"{LEVEL_TITLES[level]}: AUC {_with_ci(info, 'roc_auc')}",
        )
        m = info["metrics"]
        ax.plot(
            1 - m["specificity"],
            m["recall"],
            "o",
            color=LEVEL_STYLE[level]["color"],
            markersize=7,
            markeredgecolor="black",
        )
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="Operating point")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        xlabel="1 \u2212 specificity (false positive rate)",
        ylabel="Sensitivity (true positive rate)",
        title=f"ROC curve, {result['split']} split",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def pr_figure(
    level_data: Mapping[str, tuple[np.ndarray, np.ndarray]], result: Mapping[str, Any]
) -> bytes:
    """Precision-recall curves of every level, with prevalence (a random classifier) and points."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for level, (labels, probs) in level_data.items():
        info = result["levels"][level]
        if not (labels == 1).any():
            ax.plot([], [], **LEVEL_STYLE[level], label=f"{LEVEL_TITLES[level]}: n/a (no lesion)")
            continue
        precision, recall, _ = metrics.pr_curve(labels, probs)
        ax.step(
            recall,
            precision,
            where="post",
            lw=2,
            **LEVEL_STYLE[level],
            label=f"{LEVEL_TITLES[level]}: AP {_with_ci(info, 'average_precision')}",
        )
        prevalence = info["metrics"]["prevalence"]
        ax.axhline(prevalence, color=LEVEL_STYLE[level]["color"], lw=0.8, alpha=0.6)
        m = info["metrics"]
        if not math.isnan(m["precision"]):
            ax.plot(
                m["recall"],
                m["precision"],
                "o",
                color=LEVEL_STYLE[level]["color"],
                markersize=7,
                markeredgecolor="black",
            )
    ax.plot([], [], color="0.5", lw=0.8, label="Prevalence (random classifier)")
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="Operating point")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.05),
        aspect="equal",
        xlabel="Sensitivity (recall)",
        ylabel="Positive predictive value (precision)",
        title=f"Precision-recall curve, {result['split']} split",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def calibration_figure(
    labels: np.ndarray, probs: np.ndarray, result: Mapping[str, Any], n_bins: int
) -> bytes:
    """Reliability diagram (slice level) over the histogram of probabilities by true class."""
    fig, (ax, hist) = plt.subplots(
        2,
        1,
        figsize=(FIGSIZE[0], FIGSIZE[1] * 1.3),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.2]},
    )
    curve = metrics.calibration_curve(labels, probs, n_bins)
    filled = curve.count > 0
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, label="Perfect calibration")
    ax.plot(
        curve.mean_prob[filled],
        curve.frac_positive[filled],
        "o-",
        color=LEVEL_STYLE["slice"]["color"],
        lw=2,
        label="Slices (one point per bin)",
    )
    for x, y, n in zip(
        curve.mean_prob[filled], curve.frac_positive[filled], curve.count[filled], strict=True
    ):
        below = y > 0.5  # keep the label inside the axes
        ax.annotate(
            f"n={n}",
            (x, y),
            textcoords="offset points",
            xytext=(0, -12 if below else 7),
            ha="center",
            fontsize=7,
        )
    m = result["levels"]["slice"]["metrics"]
    ax.set(
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        ylabel="Observed fraction with lesion",
        title=f"Calibration, {result['split']} split (slices)\n"
        f"Brier {_fmt(m['brier'])}, ECE {_fmt(m['ece'])} ({n_bins} equal-width bins)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, PROB_HIST_BINS + 1)
    for value, name in enumerate(("normal", "lesion")):
        hist.hist(
            probs[labels == value],
            bins=edges,
            alpha=0.6,
            color=CLASS_COLORS[name],
            label=f"{name} (n={int((labels == value).sum())})",
        )
    hist.axvline(
        result["levels"]["slice"]["threshold"], color="black", lw=1, ls="--", label="Threshold"
    )
    hist.set(xlabel="Predicted lesion probability", ylabel="Slices")
    hist.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def confusion_figure(result: Mapping[str, Any]) -> bytes:
    """2x2 confusion matrices of every level at its threshold, with counts and row percentages."""
    levels = result["levels"]
    fig, axes = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 3.6))
    for ax, (level, info) in zip(np.atleast_1d(axes), levels.items(), strict=True):
        m = info["metrics"]
        counts = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        rows = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                pct = f"\n{share[i, j]:.0%} of row" if rows[i, 0] else ""
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]}{pct}",
                    ha="center",
                    va="center",
                    fontsize=12,
                    color="white" if share[i, j] > 0.5 else "black",
                )
        unit = "images" if info["unit"] == "image" else "patients"
        ax.set(
            xticks=[0, 1],
            yticks=[0, 1],
            xticklabels=["normal", "lesion"],
            yticklabels=["normal", "lesion"],
            xlabel="Predicted",
            ylabel="True",
            title=f"{LEVEL_TITLES[level]}: {counts.sum()} {unit}\n"
            f"threshold {threshold_text(info['threshold'])}",
        )
    fig.suptitle(f"Confusion matrices, {result['split']} split", y=1.02, fontsize=13)
    fig.tight_layout()
    return _png(fig)


def case_figure(image: np.ndarray, cam: np.ndarray | None) -> bytes:
    """PNG: the image as the network sees it (left) and with the Grad-CAM overlay (right); the
    image alone without a map (a network without `features` and `classify`)."""
    gray = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=-1)
    row = gray
    if cam is not None:
        heat = plt.get_cmap(CAM_COLORMAP)(cam)[..., :3]
        alpha = CAM_ALPHA * np.clip(cam, 0.0, 1.0)[..., None]
        overlay = (1.0 - alpha) * gray + alpha * heat
        gap = np.ones((image.shape[0], max(1, image.shape[1] // CASE_GAP_FRACTION), 3))
        row = np.concatenate([gray, gap, overlay], axis=1)
    scale = max(1, CASE_DISPLAY_SIZE // image.shape[0])  # nearest neighbour: no smoothing
    row = row.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    plt.imsave(buf, row, format="png")
    return buf.getvalue()


def figures(
    level_data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    result: Mapping[str, Any],
    n_bins: int = metrics.DEFAULT_N_BINS,
) -> dict[str, bytes]:
    """{name: PNG bytes} of FIGURES."""
    labels, probs = level_data["slice"]
    return {
        "roc": roc_figure(level_data, result),
        "pr": pr_figure(level_data, result),
        "calibration": calibration_figure(labels, probs, result, n_bins),
        "confusion": confusion_figure(result),
    }


# --------------------------------------------------------------------------- page


def _e(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], table_id: str = "") -> str:
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header or ())
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{ident}>{thead}<tbody>{body}</tbody></table>"


def _key_results(result: Mapping[str, Any]) -> str:
    d, s = result["dataset"], result["levels"]["slice"]
    level = int(round(result["bootstrap"]["confidence"] * 100))
    m = s["metrics"]
    text = (
        f"On the <b>{_e(result['split'])}</b> split ({d['images']} images, "
        f"{d['lesion_images']} with a lesion, from {d['patients']} patients), the classifier "
        f"has a slice-level ROC AUC of <b>{_e(_with_ci(s, 'roc_auc', level))}</b>. "
        f"At the threshold {threshold_text(s['threshold'])}, chosen on the "
        f"{_e(result['operating_point']['chosen_on'])} split by "
        f"{_e(result['operating_point']['rule_description'])}, sensitivity is "
        f"<b>{_e(_with_ci(s, 'recall', level))}</b> and specificity "
        f"<b>{_e(_with_ci(s, 'specificity', level))}</b>: {m['tp']} of {m['tp'] + m['fn']} "
        f"lesion slices found, {m['fp']} of {m['fp'] + m['tn']} normal slices flagged."
    )
    warnings = []
    if result["operating_point"]["same_split_as_evaluated"]:
        chosen_on = result["operating_point"]["chosen_on"]
        warnings.append(
            f"The threshold was chosen on the split being evaluated ({chosen_on}), which is "
            "also the split training validated on to choose its best checkpoint: every figure "
            "here is optimistic (AUC, AP and calibration through the checkpoint choice, "
            "sensitivity, specificity, PPV, NPV, F1 and accuracy through the threshold too). "
            "Unbiased figures need a split that chose nothing: the test split."
        )
    saturated = s["probability_one"]
    if saturated["lesion"] and saturated["normal"]:
        warnings.append(
            f"{saturated['lesion']} lesion and {saturated['normal']} normal slices have a "
            "probability of exactly 1.0 (float32's sigmoid rounds every logit above about 16.6 "
            "to 1): no threshold separates them, and AUC and AP count each such pair as a tie. "
            "Their logits still differ; a network this confident on normal slices is "
            "overconfident (see the calibration)."
        )
    per_class = result["levels"]["patient_max"]["ci_patients"]
    lesion, normal = per_class["with_lesion"], per_class["with_normal"]
    if min(lesion, normal) < SMALL_PATIENT_COUNT:
        warnings.append(
            f"Only {d['patients']} patients ({lesion} with a lesion, {normal} without): "
            "intervals are wide, and patient-level figures rest on very few cases."
        )
    minimum = result["bootstrap"]["min_patients_per_class"]
    without = [
        LEVEL_TITLES[name]
        for name, v in result["levels"].items()
        if "too_few_patients" in v.get("ci_method", {}).values()
    ]
    if without:
        warnings.append(
            f"Fewer than {minimum} patients of a class at {', '.join(without)} level: AUC, AP "
            "and F1 there (and Brier and ECE for slices) have no interval, as a bootstrap of so "
            "few patients has too few distinct resamples to mean anything; the proportions keep "
            "their Wilson intervals."
        )
    warn = "".join(f'<p class="warn">{_e(w)}</p>' for w in warnings)
    return f'<section id="summary"><h2>Key results</h2><p>{text}</p>{warn}</section>'


def _metrics_section(result: Mapping[str, Any]) -> str:
    levels = result["levels"]
    level = int(round(result["bootstrap"]["confidence"] * 100))
    header = ["", *(LEVEL_TITLES[name] for name in levels)]
    rows = [
        ["Units", *(f"{v['metrics']['n']} {v['unit']}s" for v in levels.values())],
        ["Prevalence (lesion)", *(_fmt(v["metrics"]["prevalence"]) for v in levels.values())],
        ["Threshold", *(threshold_text(v["threshold"]) for v in levels.values())],
    ]
    for key, label, lower in METRIC_ROWS:
        rows.append(
            [
                label + (" (lower is better)" if lower else ""),
                *(_with_ci(v, key) for v in levels.values()),
            ]
        )
        if key == "roc_auc":
            rows.append(["ROC AUC, DeLong interval", *(_delong_cell(v) for v in levels.values())])
    rows.append([COUNTS_TITLE, *(_counts(v["metrics"]) for v in levels.values())])
    b = result["bootstrap"]
    skipped = ", ".join(
        f"{LEVEL_TITLES[k]} {v['bootstrap_skipped_single_class']}"
        for k, v in levels.items()
        if v["bootstrap_skipped_single_class"] is not None
    )
    note = (
        f"Values are point estimates with {level}% confidence intervals, patients taken as the "
        f"independent units at every level. Sensitivity, specificity, PPV, NPV and accuracy: "
        f"Wilson score intervals on the effective sample size, the slices counted over the "
        f"design effect of their clustering in patients (Rao-Scott, with a t quantile on "
        f"patients - 1 degrees of freedom; 1 at patient level); where at most one patient "
        f"holds the rarer outcome (as at 0% or 100%), the slices cannot show how it clusters, "
        f"and each patient counts once, still with the t quantile (so with one or two "
        f"patients the interval spans nearly 0 to 1: their slices say little more than one "
        f"case each). ROC AUC, PR AUC, F1, Brier and ECE: percentile "
        f"bootstrap intervals from {b['n_resamples']} resamples of patients (seed {b['seed']}), "
        f"every slice of a drawn patient entering the resample; 'CI n/a' where a class has "
        f"fewer than {b['min_patients_per_class']} patients. Resamples holding a single class "
        f"were left out (per level: {skipped or 'none drawn'}); a metric undefined on a "
        f"resample (e.g. F1 with neither a lesion nor a positive prediction) leaves that "
        f"resample out of its own interval only. ROC AUC's DeLong interval: the AUC -/+ the "
        f"normal quantile times DeLong's standard error, cut to [0, 1] (at slice level "
        f"Obuchowski's clustered version, patients as the units; a point at an AUC of 1), the "
        f"interval most papers report; 'n/a' where the bootstrap's is. "
        f"'n/a': not defined on this split (e.g. AUC "
        f"with one class). Patient (max) / (mean): a patient's lesion score is the maximum / "
        f"mean of their slice probabilities, and a patient has a lesion if any slice has; such "
        f"a score ranks patients but is no probability, so Brier and ECE ('\u2014') are for "
        f"slices only."
    )
    return (
        f'<section id="metrics-section"><h2>Performance on the {_e(result["split"])} split</h2>'
        f'{_table(header, rows, "metrics")}<p class="note">{_e(note)}</p></section>'
    )


def _source_section(result: Mapping[str, Any]) -> str:
    by_source = result.get("by_source") or {}
    if not by_source:
        return ""
    header = [
        "Source",
        "Patients",
        "Patients with lesion",
        "Images",
        "Prevalence",
        "ROC AUC",
        "Sensitivity",
        "Specificity",
        COUNTS_TITLE,
    ]
    rows = [
        [
            name,
            v["patients"],
            v["patients_with_lesion"],
            v["metrics"]["n"],
            _fmt(v["metrics"]["prevalence"]),
            _with_ci(v, "roc_auc"),
            _with_ci(v, "recall"),
            _with_ci(v, "specificity"),
            _counts(v["metrics"]),
        ]
        for name, v in by_source.items()
    ]
    if len(by_source) == 1:
        text = (
            f"All images of the {result['split']} split come from one source "
            f"({next(iter(by_source))}): these results say nothing about other scanners, "
            "sites or populations (no external validation)."
        )
    else:
        text = (
            "Slice-level results per image source (the `source` of the label sheet or the "
            "top-level folder), at the same threshold, with intervals as in the table above; "
            "'n/a' where a source lacks a class (no lesion images: no sensitivity or AUC)."
        )
    return (
        f'<section id="by-source"><h2>By source</h2><p>{_e(text)}</p>'
        f"{_table(header, rows, 'sources')}</section>"
    )


def _operating_point_section(result: Mapping[str, Any]) -> str:
    op = result["operating_point"]
    rows = []
    for level, p in op["levels"].items():
        v = p["validation"]
        rows.append(
            [
                LEVEL_TITLES[level],
                threshold_text(p["threshold"]),
                p["source"],
                v["n"],
                _fmt((v["tp"] + v["fn"]) / v["n"]) if v["n"] else "n/a",
                _fmt(v["recall"]),
                _fmt(v["specificity"]),
                _counts(v),
            ]
        )
    header = [
        "Level",
        "Threshold",
        "How",
        f"Units on {op['chosen_on']}",
        "Prevalence (lesion)",
        "Sensitivity",
        "Specificity",
        COUNTS_TITLE,
    ]
    text = (
        f"Rule: {op['rule_description']}. The threshold is chosen on the "
        f"{op['chosen_on']} split and applied unchanged to the {result['split']} split; a "
        f"probability at or above it is called lesion. The thresholds are saved in "
        f"operating_point.json and go with the exported model: the server classifies each image "
        f"at the slice threshold; the patient-level figures hold for a client that takes a "
        f"patient's maximum or mean image probability and applies that level's threshold."
    )
    return (
        f'<section id="operating-point"><h2>Operating point</h2><p>{_e(text)}</p>'
        f"{_table(header, rows, 'thresholds')}</section>"
    )


FIGURE_CAPTIONS = {
    "roc": "ROC curves per level, with the operating point (dot) of each. The legend gives the "
    "AUC with its confidence interval.",
    "pr": "Precision-recall curves. A thin horizontal line marks each level's prevalence, the "
    "precision of a classifier that guesses.",
    "calibration": "Reliability diagram of slice probabilities: points on the diagonal mean "
    "that a predicted probability p is followed by lesions in a fraction p of slices. Below, "
    "the predicted probabilities of normal and lesion slices, with the threshold.",
    "confusion": "Confusion matrices at each level's threshold. Cells show counts and the "
    "share of their row (the true class): the diagonal of the lesion row is sensitivity, of "
    "the normal row specificity.",
}


def _figures_section(figs: Mapping[str, bytes]) -> str:
    items = "".join(
        f'<figure class="{name}"><img id="fig-{name}" class="figure" '
        f'alt="{_e(FIGURE_CAPTIONS[name])}" '
        f'src="{_data_uri(png)}"><figcaption>{_e(FIGURE_CAPTIONS[name])}</figcaption></figure>'
        for name, png in figs.items()
    )
    return f'<section id="figures"><h2>Curves</h2><div class="grid">{items}</div></section>'


CASES_NOTE = (
    "Each case shows the image as the network receives it (after the HU window and resizing) "
    "and a Grad-CAM map of the last convolutional layer for the lesion output: bright regions "
    "raised the lesion probability; the map is relative to its own maximum within the image and "
    "is as coarse as that layer (a few pixels of the input per cell). Grad-CAM shows what the "
    "network used, not where a lesion is, and is not validated for localisation. Each patient's "
    "most confident error is shown before a second one of any patient."
)


def _cases_section(cases: Sequence[Mapping[str, Any]], result: Mapping[str, Any]) -> str:
    threshold = result["levels"]["slice"]["threshold"]
    parts = [
        '<section id="cases"><h2>Errors, with where the network looked</h2>'
        f"<p>{_e(CASES_NOTE)}</p>"
        + (
            '<p class="legend">Left: network input. Right: Grad-CAM overlay; colour scale: none '
            '<span class="ramp"></span> strongest lesion evidence.</p>'
            if all(c["cam"] is not None for c in cases)
            else "<p>The network input; this network has no features() and classify() methods "
            "for Grad-CAM (liverjax.models), so no saliency maps are shown.</p>"
        )
    ]
    for kind, title in CASE_TITLES.items():
        mine = [c for c in cases if c["kind"] == kind]
        parts.append(f"<h3>{_e(title)}</h3>")
        if not mine:
            missing = (
                "normal slice was called lesion"
                if kind == "false_positive"
                else ("lesion slice was missed")
            )
            parts.append(f"<p>None: no {missing} at threshold {threshold_text(threshold)}.</p>")
            continue
        parts.append('<div class="cases">')
        for c in mine:
            no_evidence = (
                " No region raised the lesion score (empty map)."
                if c["cam"] is not None and not c["cam"].any()
                else ""
            )
            caption = (
                f"Lesion probability {c['probability']:.3f} (true: "
                f"{('normal', 'lesion')[c['label']]}). Patient {c['patient_id']}, file "
                f"{c['path'] or 'n/a'}.{no_evidence}"
            )
            parts.append(
                f'<figure class="case"><img class="case" alt="{_e(caption)}" '
                f'src="{_data_uri(c["png"])}"><figcaption>{_e(caption)}<br><span '
                f'class="uid">SOP Instance UID {_e(c["sop_uid"])}</span></figcaption></figure>'
            )
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _dataset_section(result: Mapping[str, Any], curation: Mapping[str, Any] | None) -> str:
    d = result["dataset"]
    head = (
        f"<p>Dataset <b>{_e(d['full_name'])}</b>. "
        f"Evaluated split: {_e(result['split'])}, {d['images']} images from {d['patients']} "
        f"patients.</p>"
    )
    if curation is None:
        return (
            f'<section id="dataset"><h2>Dataset</h2>{head}<p class="warn">No curation report '
            "was found beside the records: the files that were excluded and why are not "
            "known.</p></section>"
        )
    counts = curation.get("counts", {})
    text = (
        f"{curation.get('files_total', 'n/a')} input files: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + "."
    )
    reasons = curation.get("skipped_by_reason") or {}
    if reasons:
        text += " Skipped: " + ", ".join(f"{v} {k}" for k, v in reasons.items()) + "."
    warnings = curation_lib.patient_warnings(curation)
    warnings[:0] = curation_lib.label_warnings(curation)
    warnings.extend(curation_lib.file_warnings(curation))
    warn = "".join(f'<p class="warn">{_e(w)}</p>' for w in warnings)
    warn += "".join(f"<p>{_e(n)}</p>" for n in curation_lib.file_notes(curation))
    split_rows = [
        [
            name,
            s.get("patients"),
            s.get("patients_with_lesion", "n/a"),
            s.get("slices"),
            s.get("lesion"),
            s.get("normal"),
            _fmt(s["lesion"] / s["slices"]) if s.get("slices") else "n/a",
            _spacing_cell(s.get("pixel_spacing_mm")),
        ]
        for name, s in (curation.get("splits") or {}).items()
    ]
    sources = curation.get("slices_by_source") or {}
    spec = curation.get("split_spec") or {}
    split_text = (
        "Patients are assigned to one split only"
        + (
            f" (validation {spec.get('validation')}, test {spec.get('test')}, seed "
            f"{spec.get('seed')})"
            if spec
            else ""
        )
        + ". Slices per source: "
        + (", ".join(f"{k} {v}" for k, v in sources.items()) or "n/a")
        + "."
    )
    by_split = {
        name: s["slices_by_source"]
        for name, s in (curation.get("splits") or {}).items()
        if s.get("slices_by_source")
    }
    if len(sources) > 1 and by_split:  # one source: the same in every split
        split_text += (
            " Per split: "
            + "; ".join(
                f"{name} " + ", ".join(f"{k} {v}" for k, v in counts.items())
                for name, counts in by_split.items()
            )
            + "."
        )
    return (
        f'<section id="dataset"><h2>Dataset</h2>{head}<p>{_e(text)}</p>{warn}'
        + _table(
            [
                "Split",
                "Patients",
                "Patients with lesion",
                "Slices",
                "Lesion slices",
                "Normal slices",
                "Lesion fraction",
                "Pixel spacing, mm (median, range)",
            ],
            split_rows,
            "splits",
        )
        + f"<p>{_e(split_text)}</p></section>"
    )


def _spacing_cell(spacing: Mapping[str, Any] | None) -> str:
    """'0.78 (0.7–0.98)' from a split's pixel_spacing_mm (older reports have none)."""
    if not spacing:
        return "n/a"
    text = (
        f"{spacing['median']:.3g} ({spacing['min']:.3g}–{spacing['max']:.3g})"
        if "median" in spacing
        else "none"
    )
    if spacing.get("missing"):
        text += f", {spacing['missing']} without"
    return text


def _provenance_section(result: Mapping[str, Any]) -> str:
    c = result["checkpoint"]
    rows = [
        ["Checkpoint", f"step {c['step']} ({c['chosen']})"],
        ["Dataset", result["dataset"]["full_name"]],
        ["Records", result["dataset"]["data_dir"]],
        ["Evaluated split", result["split"]],
        ["Threshold chosen on", result["operating_point"]["chosen_on"]],
        ["Created", result["created"]],
        ["JAX", result["versions"]["jax"]],
    ]
    config = json.dumps(result["config"], indent=2, sort_keys=True)
    settings = json.dumps(result["eval_settings"], indent=2, sort_keys=True)
    return (
        '<section id="provenance"><h2>Provenance</h2>'
        + _table(None, rows, "provenance")
        + f"<details><summary>Evaluation settings</summary><pre>{_e(settings)}</pre></details>"
        + f"<details><summary>Training configuration</summary><pre>{_e(config)}</pre></details>"
        + "</section>"
    )


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 1.5em; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
thead th { background: #f1f4f8; } #metrics td:not(:first-child) { font-variant-numeric:
tabular-nums; white-space: nowrap; }
.note { color: #444; font-size: 0.9em; } .warn { background: #fff4e0; border-left: 4px solid
#e69f00; padding: 0.5em 0.8em; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1em; }
figure { margin: 0; } figure.confusion { grid-column: 1 / -1; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.88em; color: #444; }
.cases { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 1em; }
.uid { color: #777; font-size: 0.85em; word-break: break-all; }
.ramp { display: inline-block; width: 9em; height: 0.8em; vertical-align: middle;
        background: linear-gradient(to right, #000004, #57106e, #bc3754, #f98e09, #fcffa4); }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
"""


def render_html(
    result: Mapping[str, Any],
    figs: Mapping[str, bytes],
    cases: Sequence[Mapping[str, Any]],
    curation: Mapping[str, Any] | None,
) -> str:
    """The report page: one HTML document with everything embedded."""
    c = result["checkpoint"]
    sub = (
        f"{result['dataset']['full_name']}, {result['split']} split, checkpoint step "
        f"{c['step']}, {result['created']}"
    )
    body = "".join(
        [
            "<h1>Liver lesion classifier: evaluation report</h1>",
            f'<p class="sub">{_e(sub)}</p>',
            _key_results(result),
            _metrics_section(result),
            _operating_point_section(result),
            _source_section(result),
            _figures_section(figs),
            _cases_section(cases, result),
            _dataset_section(result, curation),
            _provenance_section(result),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Evaluation report: {_e(result['split'])}, step {c['step']}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def write_report(
    out_dir: str | os.PathLike,
    result: Mapping[str, Any],
    level_data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    cases: Sequence[Mapping[str, Any]],
    curation: Mapping[str, Any] | None,
    *,
    n_bins: int = metrics.DEFAULT_N_BINS,
) -> epath.Path:
    """Write the FIGURES as PNG files and the page into `out_dir` (local, or any file system
    epath reaches: gs://...); returns the page's path."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(level_data, result, n_bins)
    for name, png in figs.items():
        (out / f"{name}.png").write_bytes(png)
    shown = [{**c, "png": case_figure(c["image"], c["cam"])} for c in cases]
    path = out / HTML_FILE
    path.write_text(render_html(result, figs, shown, curation), encoding="utf-8")
    return path
