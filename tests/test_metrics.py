"""liverjax.metrics: equal to scikit-learn, documented rules for ties, thresholds and degenerate
inputs, patient-level bootstrap, and the clu metric used by the training loop."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from sklearn import calibration as skc
from sklearn import metrics as skm

from liverjax import metrics

TOL = 1e-9  # the issue asks for 1e-6; the implementations agree far closer


def _sk_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """The same metrics computed by scikit-learn (undefined ratios as NaN, like liverjax)."""
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    nan = np.nan
    return {
        "n": y.size,
        "prevalence": y.mean(),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, zero_division=nan),
        "recall": skm.recall_score(y, pred, zero_division=nan),
        "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=nan),
        "npv": skm.precision_score(y, pred, pos_label=0, zero_division=nan),
        "f1": skm.f1_score(y, pred, zero_division=nan),
        "roc_auc": skm.roc_auc_score(y, p),
        "average_precision": skm.average_precision_score(y, p),
        "brier": skm.brier_score_loss(y, p),
    }


def _assert_matches_sklearn(y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    ours = metrics.summary(y, p, threshold)
    theirs = _sk_metrics(y, p, threshold)
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=TOL, err_msg=name)
    single = {
        "accuracy": metrics.accuracy(y, p, threshold),
        "precision": metrics.precision(y, p, threshold),
        "recall": metrics.recall(y, p, threshold),
        "specificity": metrics.specificity(y, p, threshold),
        "npv": metrics.npv(y, p, threshold),
        "f1": metrics.f1(y, p, threshold),
        "roc_auc": metrics.roc_auc(y, p),
        "average_precision": metrics.average_precision(y, p),
        "brier": metrics.brier(y, p),
        "ece": metrics.ece(y, p),
    }
    for name, value in single.items():
        np.testing.assert_allclose(value, ours[name], rtol=0, atol=TOL, err_msg=name)
    assert metrics.confusion(y, p, threshold) == {k: theirs[k] for k in ("tp", "fp", "tn", "fn")}


def _random(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Informative but imperfect scores, so the metrics are away from 0.5 and from 1.
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, p


@pytest.mark.parametrize("seed,n", [(0, 7), (1, 50), (2, 333), (3, 2000)])
@pytest.mark.parametrize("threshold", [0.5, 0.37])
def test_metrics_equal_sklearn_on_random_inputs(seed: int, n: int, threshold: float) -> None:
    y, p = _random(seed, n)
    assert 0 < y.sum() < n
    _assert_matches_sklearn(y, p, threshold)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_equal_sklearn_on_tied_inputs(seed: int, threshold: float) -> None:
    y, p = _random(seed, 400)
    tied = np.round(p, 1)
    assert np.unique(tied).size <= 11
    _assert_matches_sklearn(y, tied, threshold)
    # Ties count half: the rounded scores give a different AUC than the raw ones.
    assert abs(metrics.roc_auc(y, tied) - metrics.roc_auc(y, p)) > 1e-4


def test_all_equal_probs() -> None:
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1])
    p = np.full(8, 0.3)
    _assert_matches_sklearn(y, p, 0.3)
    _assert_matches_sklearn(y, p, 0.5)
    assert metrics.roc_auc(y, p) == 0.5
    assert metrics.average_precision(y, p) == pytest.approx(3 / 8, abs=TOL)


def test_float32_and_jax_inputs_give_the_same_values() -> None:
    y, p = _random(4, 300)
    p32 = p.astype(np.float32)
    expected = metrics.summary(y, p32)
    assert metrics.summary(jnp.asarray(y, jnp.int32), jnp.asarray(p32)) == expected
    assert metrics.summary(y.astype(bool), p32) == expected
    np.testing.assert_allclose(expected["roc_auc"], skm.roc_auc_score(y, p32), atol=TOL)


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 2)])
def test_curves_equal_sklearn(seed: int, decimals: int | None) -> None:
    y, p = _random(seed, 500)
    if decimals is not None:
        p = np.round(p, decimals)
    for ours, theirs in zip(
        metrics.roc_curve(y, p), skm.roc_curve(y, p, drop_intermediate=False), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    for ours, theirs in zip(metrics.pr_curve(y, p), skm.precision_recall_curve(y, p), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    # The AUCs are the areas under these very curves.
    fpr, tpr, _ = metrics.roc_curve(y, p)
    assert metrics.roc_auc(y, p) == pytest.approx(np.trapezoid(tpr, fpr), abs=TOL)
    precision, recall, _ = metrics.pr_curve(y, p)
    ap = -np.sum(np.diff(recall) * precision[:-1])
    assert metrics.average_precision(y, p) == pytest.approx(ap, abs=TOL)


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_calibration_curve_equals_sklearn(n_bins: int) -> None:
    y, p = _random(5, 700)
    p[:4] = [0.0, 1.0, 0.2, 0.6]  # the ends and bin edges
    curve = metrics.calibration_curve(y, p, n_bins)
    frac, mean = skc.calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    used = curve.count > 0
    np.testing.assert_allclose(curve.frac_positive[used], frac, atol=TOL)
    np.testing.assert_allclose(curve.mean_prob[used], mean, atol=TOL)
    assert curve.count.sum() == y.size
    np.testing.assert_allclose(curve.bin_edges, np.linspace(0, 1, n_bins + 1))
    # ECE is the count-weighted gap of this same curve.
    gaps = np.abs(curve.mean_prob[used] - curve.frac_positive[used])
    expected = np.sum(curve.count[used] / y.size * gaps)
    assert metrics.ece(y, p, n_bins) == pytest.approx(expected, abs=TOL)


def test_ece_hand_computed() -> None:
    y = [0, 1, 0, 1, 0, 1, 0, 0]
    p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 1.0, 0.0]
    # 4 bins: (.., 0.25] holds 0.1, 0.2, 0.0: mean 0.1, 1/3 positive, gap 7/30, weight 3/8;
    # (0.25, 0.5] holds 0.3, 0.4, 0.5 (an edge goes left): mean 0.4, 1/3 positive, gap 1/15, 3/8;
    # (0.5, 0.75] is empty; (0.75, 1] holds 0.9, 1.0: mean 0.95, 1/2 positive, gap 0.45, 2/8.
    # (With 0.5 in the third bin instead, ECE would be 0.3.)
    assert metrics.ece(y, p, n_bins=4) == pytest.approx(7 / 80 + 1 / 40 + 0.1125, abs=TOL)
    curve = metrics.calibration_curve(y, p, n_bins=4)
    np.testing.assert_array_equal(curve.count, [3, 3, 0, 2])
    assert np.isnan(curve.mean_prob[2]) and np.isnan(curve.frac_positive[2])
    # Perfectly calibrated bins give 0.
    assert metrics.ece([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], n_bins=4) == 0.0


def test_threshold_is_inclusive() -> None:
    y, p = [0, 1, 1, 0], [0.5, 0.5, 0.2, 0.1]
    assert metrics.confusion(y, p, 0.5) == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert metrics.confusion(y, p, 0.50001) == {"tp": 0, "fp": 0, "tn": 2, "fn": 2}


def test_youden_threshold_hand_cases() -> None:
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # J: 0.8 -> 0.5, 0.4 -> 0, 0.35 -> 0.5, 0.1 -> 0: tie between 0.8 and 0.35, highest wins.
    assert metrics.youden_threshold(y, p) == 0.8
    y, p = [1, 1, 0, 1, 0, 0], [0.9, 0.7, 0.6, 0.55, 0.3, 0.2]
    # J at 0.7 = 2/3 - 0 ties J at 0.55 = 1 - 1/3 (as floats the latter rounds higher).
    assert metrics.youden_threshold(y, p) == 0.7
    y, p = [1, 0, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.3, 0.2]
    # J: 1/3, 0, 1/3, 2/3, 1/3, 0: 0.6 is the unique best.
    assert metrics.youden_threshold(y, p) == 0.6
    # No skill at all: every J is 0, the highest threshold is returned.
    assert metrics.youden_threshold([1, 0, 1, 0], [0.9, 0.9, 0.2, 0.2]) == 0.9
    # J = 1/3 at 0.9, 0.7 and 0.3; as rates, 1 - 2/3 rounds above 1/3 - 0: the tie holds in counts.
    y, p = [1, 0, 1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.3, 0.2]
    assert metrics.youden_threshold(y, p) == 0.9


def test_youden_threshold_matches_exact_fractions_on_random_ties() -> None:
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(4, 30))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        p = rng.integers(0, 8, n) / 8  # few distinct values: many ties
        pos, neg = int(y.sum()), int(n - y.sum())
        candidates = sorted(set(p.tolist()), reverse=True)
        j = [
            Fraction(int(((p >= t) & (y == 1)).sum()), pos)
            - Fraction(int(((p >= t) & (y == 0)).sum()), neg)
            for t in candidates
        ]
        assert metrics.youden_threshold(y, p) == candidates[j.index(max(j))]


def test_threshold_between_keeps_the_decisions_off_the_edge() -> None:
    p = np.array([0.2, 0.5, 0.5, 0.8, 0.9], np.float32)
    assert metrics.threshold_between(p, 0.8) == pytest.approx((0.5 + 0.8) / 2)  # float32 values
    assert metrics.threshold_between(p, 0.2) == pytest.approx(0.1)  # the lowest: halfway to 0
    assert metrics.threshold_between(p, 0.0) == 0.0
    one_ulp = np.nextafter(np.float32(0.8), np.float32(0))
    assert metrics.threshold_between([one_ulp, 0.8], 0.8) == pytest.approx(0.8, abs=1e-7)
    close = np.array([np.nextafter(0.8, 0), 0.8])  # no float32 between them
    assert metrics.threshold_between(close, 0.8) == 0.8
    # Adjacent float32 values: no float32 between, so the threshold stays (a float64 middle
    # would round to the lower one in a float32 comparison and flip it).
    adjacent = np.array([one_ulp, 0.8], np.float32)
    assert metrics.threshold_between(adjacent, float(np.float32(0.8))) == float(np.float32(0.8))
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.random(40).astype(np.float32)
        t = float(rng.choice(q))
        between = metrics.threshold_between(q, t)
        assert between not in q and between < t
        np.testing.assert_array_equal(q >= between, q >= t)
        np.testing.assert_array_equal(q >= np.float32(between), q >= t)  # compared in float32


def test_threshold_for_sensitivity_hand_cases() -> None:
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert metrics.threshold_for_sensitivity(y, p, 0.5) == 0.8
    assert metrics.threshold_for_sensitivity(y, p, 0.6) == 0.35
    assert metrics.threshold_for_sensitivity(y, p, 1.0) == 0.35
    y = [1] * 10 + [0] * 3
    p = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.1, 0.5, 0.3, 0.2]
    # Sensitivity 0.9 exactly is reached at 0.55 (9 of 10): no float slack needed.
    t = metrics.threshold_for_sensitivity(y, p, 0.9)
    assert t == 0.55
    assert metrics.recall(y, p, t) >= 0.9 and metrics.specificity(y, p, t) == 1.0
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="target sensitivity"):
            metrics.threshold_for_sensitivity(y, p, bad)


def test_one_class_gives_nan_where_undefined() -> None:
    p = np.array([0.2, 0.7, 0.4])
    only_pos = metrics.summary([1, 1, 1], p)
    assert np.isnan(only_pos["roc_auc"]) and np.isnan(only_pos["specificity"])
    assert only_pos["average_precision"] == 1.0
    assert only_pos["recall"] == pytest.approx(1 / 3) and only_pos["precision"] == 1.0
    only_neg = metrics.summary([0, 0, 0], p)
    for name in ("roc_auc", "average_precision", "recall"):
        assert np.isnan(only_neg[name]), name
    assert only_neg["precision"] == 0.0  # one prediction, wrong: 0 / 1
    assert only_neg["f1"] == 0.0  # one false positive, no positive label: 0 / 1
    assert (
        only_neg["accuracy"] == pytest.approx(2 / 3)
        and only_neg["specificity"] == 0.6666666666666666
    )
    assert np.isnan(metrics.f1([0, 0], [0.1, 0.2]))  # nothing to find, nothing found: 0 / 0
    assert np.isnan(metrics.precision([0, 1], [0.1, 0.2], threshold=0.9))
    assert np.isnan(metrics.npv([0, 1], [0.6, 0.7]))
    assert only_neg["brier"] == pytest.approx(np.mean(p**2)) and only_neg["n"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the undefined rate
        for ours, theirs in zip(
            metrics.roc_curve([0, 0, 0], p),
            skm.roc_curve([0, 0, 0], p, drop_intermediate=False),
            strict=True,
        ):
            np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(metrics.pr_curve([0, 0, 0], p)[1][:-1]).all()
    with pytest.raises(ValueError, match="no positive"):
        metrics.youden_threshold([0, 0, 0], p)
    with pytest.raises(ValueError, match="no negative"):
        metrics.youden_threshold([1, 1, 1], p)
    with pytest.raises(ValueError, match="no positive"):
        metrics.threshold_for_sensitivity([0, 0, 0], p, 0.9)
    assert metrics.threshold_for_sensitivity([1, 1, 1], p, 0.6) == 0.4


@pytest.mark.parametrize(
    "labels,probs,message",
    [
        ([], [], "empty"),
        ([0, 1], [0.5], "same length"),
        ([[0, 1]], [[0.5, 0.2]], "1-D"),
        ([0, 2, 1], [0.1, 0.2, 0.3], r"labels must be 0 or 1; got 2 at index 1 \(1 of 3"),
        ([0, np.nan], [0.1, 0.2], "labels must be 0 or 1"),
        (["normal", "lesion"], [0.1, 0.2], "numeric"),
        ([0, 1, 1], [0.1, 1.5, -0.1], r"within \[0, 1\].*index 1 \(2 of 3"),
        ([0, 1], [0.1, np.nan], "finite.*index 1"),
        ([0, 1], [np.inf, 0.2], "finite.*index 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(labels: list, probs: list, message: str) -> None:
    for fn in (metrics.summary, metrics.roc_auc, metrics.roc_curve, metrics.calibration_curve):
        with pytest.raises(ValueError, match=message):
            fn(labels, probs)
    with pytest.raises(ValueError, match=message):
        metrics.bootstrap_ci(np.arange(len(labels)), labels, probs, n_resamples=2, seed=0)


def test_bad_parameters_raise_clear_errors() -> None:
    y, p = [0, 1], [0.2, 0.8]
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(y, p, n_bins=0)
    with pytest.raises(ValueError, match="threshold is NaN"):
        metrics.summary(y, p, float("nan"))
    with pytest.raises(ValueError, match="group_ids"):
        metrics.aggregate_by_group([1], y, p)
    with pytest.raises(ValueError, match="how must be"):
        metrics.aggregate_by_group([1, 2], y, p, how="median")
    with pytest.raises(ValueError, match="unknown metrics.*'auc'"):
        metrics.bootstrap_ci([1, 2], y, p, ["auc"], n_resamples=2, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        metrics.bootstrap_ci([1, 2], y, p, n_resamples=2, seed=0, alpha=5)


def test_aggregate_by_group() -> None:
    ids = np.array(["b", "a", "b", "c", "a", "b"])
    y = [0, 0, 1, 0, 0, 0]
    p = [0.2, 0.1, 0.9, 0.4, 0.3, 0.4]
    groups, labels, probs = metrics.aggregate_by_group(ids, y, p, how="max")
    np.testing.assert_array_equal(groups, ["a", "b", "c"])
    np.testing.assert_array_equal(labels, [0, 1, 0])
    np.testing.assert_allclose(probs, [0.3, 0.9, 0.4])
    _, labels, probs = metrics.aggregate_by_group(ids, y, p, how="mean")
    np.testing.assert_array_equal(labels, [0, 1, 0])
    np.testing.assert_allclose(probs, [0.2, 0.5, 0.4])
    # Patient-level metrics are the same functions on the aggregated arrays.
    assert metrics.roc_auc(labels, probs) == 1.0


def _clustered(seed: int, patients: int, slices: int) -> tuple[np.ndarray, ...]:
    """Slices whose probabilities share a per-patient effect, as real CT series do."""
    rng = np.random.default_rng(seed)
    patient_label = rng.integers(0, 2, patients)
    patient_score = np.clip(rng.normal(0.4 + 0.2 * patient_label, 0.15), 0.05, 0.95)
    groups = np.repeat(np.arange(patients), slices)
    y = patient_label[groups]
    p = np.clip(patient_score[groups] + rng.normal(0, 0.03, groups.size), 0, 1)
    return groups, y, p


def _slow_bootstrap(groups, y, p, fns, n_resamples, seed, alpha):
    """Straightforward reference: concatenate the drawn patients' rows, call scikit-learn."""
    ids = np.unique(groups)
    rows_of = [np.flatnonzero(groups == g) for g in ids]
    draws = np.random.default_rng(seed).integers(0, ids.size, (n_resamples, ids.size))
    values = {name: [] for name in fns}
    skipped = 0
    for draw in draws:
        rows = np.concatenate([rows_of[g] for g in draw])
        if y[rows].min() == y[rows].max():
            skipped += 1
            continue
        for name, fn in fns.items():
            values[name].append(fn(y[rows], p[rows]))
    bounds = {k: tuple(np.quantile(v, [alpha / 2, 1 - alpha / 2])) for k, v in values.items()}
    return bounds, skipped


def _ece_reference(y, p, n_bins=metrics.DEFAULT_N_BINS):
    ids = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p)  # the documented (lo, hi]
    return sum(
        np.mean(ids == b) * abs(p[ids == b].mean() - y[ids == b].mean())
        for b in range(n_bins)
        if np.any(ids == b)
    )


def test_bootstrap_equals_slow_reference() -> None:
    groups, y, p = _clustered(0, patients=40, slices=6)
    y[::7] = 1 - y[::7]  # some patients with mixed slice labels
    threshold = 0.5
    fns = {
        "accuracy": lambda a, b: skm.accuracy_score(a, b >= threshold),
        "precision": lambda a, b: skm.precision_score(a, b >= threshold, zero_division=np.nan),
        "recall": lambda a, b: skm.recall_score(a, b >= threshold),
        "f1": lambda a, b: skm.f1_score(a, b >= threshold),
        "roc_auc": skm.roc_auc_score,
        "average_precision": skm.average_precision_score,
        "brier": skm.brier_score_loss,
        "ece": _ece_reference,
    }
    expected, skipped = _slow_bootstrap(groups, y, p, fns, 60, seed=3, alpha=0.1)
    got = metrics.bootstrap_ci(
        groups, y, p, list(fns), n_resamples=60, seed=3, alpha=0.1, threshold=threshold
    )
    assert got.n_skipped == skipped == 0
    for name in fns:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=TOL, err_msg=name)
        assert got.n_used[name] == 60
    # The callable path (one call per resample) draws the same resamples.
    by_fn = metrics.bootstrap_ci(groups, y, p, skm.roc_auc_score, n_resamples=60, seed=3, alpha=0.1)
    np.testing.assert_allclose(by_fn["roc_auc_score"], got["roc_auc"], rtol=0, atol=TOL)


def test_paired_bootstrap_equals_slow_reference() -> None:
    # Model B sees the labels a little better than model A, on the same clustered slices.
    groups, y, p_a = _clustered(4, patients=40, slices=6)
    rng = np.random.default_rng(5)
    p_b = np.clip(p_a + 0.05 * (y - 0.5) + rng.normal(0, 0.05, y.size), 0, 1)
    t_a, t_b = 0.5, 0.45
    ids = np.unique(groups)
    rows_of = [np.flatnonzero(groups == g) for g in ids]
    draws = np.random.default_rng(3).integers(0, ids.size, (80, ids.size))
    fns = {
        "roc_auc": lambda yy, pp, t: skm.roc_auc_score(yy, pp),
        "recall": lambda yy, pp, t: skm.recall_score(yy, pp >= t),
        "brier": lambda yy, pp, t: skm.brier_score_loss(yy, pp),
    }
    diffs = {name: [] for name in fns}
    for draw in draws:
        rows = np.concatenate([rows_of[g] for g in draw])
        for name, fn in fns.items():
            diffs[name].append(fn(y[rows], p_b[rows], t_b) - fn(y[rows], p_a[rows], t_a))
    got = metrics.paired_bootstrap_ci(
        groups, y, p_a, p_b, list(fns), n_resamples=80, seed=3, alpha=0.1, thresholds=(t_a, t_b)
    )
    assert got.n_skipped == 0
    for name, d in diffs.items():
        d = np.asarray(d)
        np.testing.assert_allclose(got[name], np.quantile(d, [0.05, 0.95]), atol=TOL, err_msg=name)
        p_value = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
        assert got.p_values[name] == pytest.approx(p_value), name
    # B ranks better on every resample here: its AUC gain is clear of zero.
    assert got["roc_auc"][0] > 0 and got.p_values["roc_auc"] < 0.05


def test_paired_bootstrap_of_a_model_with_itself_is_zero() -> None:
    groups, y, p = _clustered(6, patients=20, slices=4)
    same = metrics.paired_bootstrap_ci(groups, y, p, p, n_resamples=50, seed=0)
    for name in metrics.BOOTSTRAP_NAMES:
        assert same[name] == (0.0, 0.0) and same.p_values[name] == 1.0, name
    # The pairing matters: B's interval of the difference is narrower than the two models' own
    # intervals, when B is A plus a little noise.
    p_b = np.clip(p + np.random.default_rng(1).normal(0, 0.01, p.size), 0, 1)
    paired = metrics.paired_bootstrap_ci(groups, y, p, p_b, ["roc_auc"], n_resamples=300, seed=0)
    own = metrics.bootstrap_ci(groups, y, p, ["roc_auc"], n_resamples=300, seed=0)
    assert np.diff(paired["roc_auc"])[0] < np.diff(own["roc_auc"])[0] / 3
    # All one class: no resample, no interval, no p-value.
    none = metrics.paired_bootstrap_ci(groups, 0 * y, p, p_b, ["roc_auc"], n_resamples=9, seed=0)
    assert none.n_skipped == 9 and np.isnan(none["roc_auc"]).all()
    assert np.isnan(none.p_values["roc_auc"])
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.paired_bootstrap_ci(groups, y, p, p, ["auc"], n_resamples=9, seed=0)


def test_mcnemar_of_one_row_per_patient_is_the_exact_binomial_test() -> None:
    from scipy import stats

    rng = np.random.default_rng(3)
    for trial in range(100):
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        p_a, p_b = rng.random(n), rng.random(n)
        thresholds = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8)))
        for name, label in metrics.MCNEMAR_METRICS.items():
            got = metrics.paired_mcnemar(np.arange(n), y, p_a, p_b, name, thresholds=thresholds)
            rows = y == label
            right_a = (p_a[rows] >= thresholds[0]) == bool(label)
            right_b = (p_b[rows] >= thresholds[1]) == bool(label)
            b, c = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
            want = stats.binomtest(b, b + c).pvalue if b + c else 1.0 if rows.any() else math.nan
            assert (got.only_a, got.only_b, got.patients_discordant) == (b, c, b + c), trial
            assert got.p_value == pytest.approx(want, abs=1e-12, nan_ok=True)
            assert got.method == "exact"


def _discordance(groups, right_a, right_b) -> np.ndarray:
    """Each patient's rows only A gets right minus only B, the patients with none left out."""
    d = np.array(
        [
            np.sum((right_a & ~right_b)[groups == g]) - np.sum((right_b & ~right_a)[groups == g])
            for g in np.unique(groups)
        ]
    )
    return d[d != 0]


def test_mcnemar_of_clustered_rows_is_the_sign_flip_test_over_patients() -> None:
    import itertools

    rng = np.random.default_rng(4)
    for _ in range(40):
        groups = rng.integers(0, 9, 60).astype(str)
        y = np.ones(60, np.int64)
        p_a, p_b = rng.random(60), np.clip(rng.random(60) + 0.1, 0, 1)
        got = metrics.paired_mcnemar(groups, y, p_a, p_b, "recall")
        d = _discordance(groups, p_a >= 0.5, p_b >= 0.5)
        every = [abs(np.dot(signs, d)) for signs in itertools.product((-1, 1), repeat=d.size)]
        assert got.p_value == pytest.approx(np.mean(np.asarray(every) >= abs(d.sum())), abs=1e-12)
        assert got.patients_discordant == d.size


def test_mcnemar_keeps_its_level_where_slices_of_a_patient_agree() -> None:
    # Two equally good models whose errors come in whole patients (the slices of a patient are
    # alike): the plain McNemar test on slices rejects far too often, this one does not.
    from scipy import stats

    rng = np.random.default_rng(5)
    rejected, naive = 0, 0
    trials = 400
    for _ in range(trials):
        patients, slices = 25, 8
        groups = np.repeat(np.arange(patients), slices)
        # Each patient is hard or easy for each model, at random and alike for both models.
        right = rng.random((2, patients)) < 0.7
        noise = rng.random((2, patients * slices)) < 0.05  # a few slices differ from their patient
        p_a, p_b = (
            np.where(np.repeat(r, slices) ^ n, 0.9, 0.1) for r, n in zip(right, noise, strict=True)
        )
        y = np.ones(patients * slices, np.int64)
        test = metrics.paired_mcnemar(groups, y, p_a, p_b, "recall")
        rejected += test.p_value < 0.05
        b, c = test.only_a, test.only_b
        naive += b + c > 0 and stats.binomtest(b, b + c).pvalue < 0.05
    assert rejected / trials <= 0.07  # exact: at most 5 %, up to the trials' noise
    assert naive / trials > 0.3  # the unclustered test, on the same data


def test_mcnemar_without_discordance_and_its_normal_approximation(monkeypatch) -> None:
    from scipy import stats

    groups, y, p = _clustered(2, patients=30, slices=5)
    same = metrics.paired_mcnemar(groups, y, p, p, "specificity")
    assert (same.only_a, same.only_b, same.p_value, same.patients_discordant) == (0, 0, 1.0, 0)
    p_b = np.clip(p + np.random.default_rng(2).normal(0, 0.2, p.size), 0, 1)
    exact = metrics.paired_mcnemar(groups, y, p, p_b, "specificity")
    monkeypatch.setattr(metrics, "_EXACT_SIGN_FLIP_CELLS", 0)
    normal = metrics.paired_mcnemar(groups, y, p, p_b, "specificity")
    assert normal.method == "normal" and exact.method == "exact"
    d = _discordance(groups[y == 0], p[y == 0] < 0.5, p_b[y == 0] < 0.5)
    durkalski = d.sum() ** 2 / np.sum(d**2)  # Durkalski et al. (2003)
    assert normal.p_value == pytest.approx(stats.chi2.sf(durkalski, 1), abs=1e-12)
    assert abs(normal.p_value - exact.p_value) < 0.1
    no_lesion = metrics.paired_mcnemar(groups, 0 * y, p, p_b, "recall")
    assert math.isnan(no_lesion.p_value) and no_lesion.only_a == no_lesion.only_b == 0
    one = metrics.paired_mcnemar(["a", "a", "b"], [1, 1, 1], [0.9, 0.9, 0.9], [0, 0, 0.9], "recall")
    assert (one.only_a, one.only_b, one.patients_discordant, one.p_value) == (2, 0, 1, 1.0)
    with pytest.raises(ValueError, match="choose from"):
        metrics.paired_mcnemar(groups, y, p, p, "roc_auc")
    with pytest.raises(ValueError, match="one group id per row"):
        metrics.paired_mcnemar(groups[:-1], y, p, p, "recall")


def test_bootstrap_is_deterministic_and_seeded() -> None:
    groups, y, p = _clustered(1, patients=30, slices=5)
    a = metrics.bootstrap_ci(groups, y, p, n_resamples=200, seed=7)
    b = metrics.bootstrap_ci(groups, y, p, n_resamples=200, seed=7)
    c = metrics.bootstrap_ci(groups, y, p, n_resamples=200, seed=8)
    assert a == b and a != c
    assert set(a) == set(metrics.METRIC_NAMES)
    point = metrics.summary(y, p)
    for name in ("roc_auc", "accuracy", "brier"):
        low, high = a[name]
        assert low < point[name] < high, name


def test_bootstrap_resamples_patients_not_slices() -> None:
    groups, y, p = _clustered(2, patients=30, slices=40)
    by_patient = metrics.bootstrap_ci(groups, y, p, ["roc_auc"], n_resamples=300, seed=0)
    by_slice = metrics.bootstrap_ci(np.arange(y.size), y, p, ["roc_auc"], n_resamples=300, seed=0)
    width = {
        k: ci["roc_auc"][1] - ci["roc_auc"][0]
        for k, ci in {"patient": by_patient, "slice": by_slice}.items()
    }
    # 1200 correlated slices carry about the information of 30 patients, not 1200.
    assert width["patient"] > 3 * width["slice"], width


def test_bootstrap_skips_and_counts_single_class_resamples() -> None:
    # Three patients: one positive, two negative. A resample misses a class unless it draws the
    # positive patient and at least one negative one.
    groups = np.array([0, 0, 1, 1, 2])
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.7, 0.2, 0.1])
    ci = metrics.bootstrap_ci(groups, y, p, ["roc_auc", "brier"], n_resamples=500, seed=0)
    draws = np.random.default_rng(0).integers(0, 3, (500, 3))
    has_pos = (draws == 0).any(axis=1)
    has_neg = (draws != 0).any(axis=1)
    expected_skipped = int(np.sum(~(has_pos & has_neg)))
    assert 100 < expected_skipped < 400
    assert ci.n_skipped == expected_skipped
    assert ci.n_used == {"roc_auc": 500 - expected_skipped, "brier": 500 - expected_skipped}
    # All one class: every resample is skipped and the intervals are undefined, not a crash.
    none = metrics.bootstrap_ci(groups, np.zeros(5), p, ["roc_auc"], n_resamples=20, seed=0)
    assert none.n_skipped == 20 and np.isnan(none["roc_auc"]).all()


@struct.dataclass
class _EvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    binary: metrics.BinaryOutputs
    roc_auc: metrics.binary_metric("roc_auc")
    f1_at_03: metrics.binary_metric("f1", threshold=0.3)


def test_clu_metric_from_jitted_sharded_steps_equals_summary() -> None:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    n_dev = len(jax.devices())
    assert n_dev == 8  # conftest's fake devices: values really come from several devices

    @jax.jit
    def eval_step(labels, logits, mask):
        loss = jnp.mean(jnp.abs(logits))
        return _EvalMetrics.single_from_model_output(
            labels=labels, logits=logits, mask=mask, loss=loss
        )

    rng = np.random.default_rng(0)
    batches, kept_y, kept_logit = [], [], []
    for size, pad in ((64, 0), (64, 24)):  # the second batch ends with 24 padding rows
        y = rng.integers(0, 2, size).astype(np.int32)
        logits = np.round(rng.normal(y - 0.5, 1.0), 1).astype(np.float32)  # ties
        mask = np.arange(size) < size - pad
        y[~mask] = -1  # padding labels are not valid labels: they must be dropped
        batches.append(tuple(jax.device_put(a, batch) for a in (y, logits, mask)))
        kept_y.append(y[mask])
        kept_logit.append(logits[mask])

    collection = _EvalMetrics.empty()
    for labels, logits, mask in batches:
        collection = collection.merge(eval_step(labels, logits, mask))
    computed = collection.compute()

    y = np.concatenate(kept_y)
    probs = np.asarray(jax.nn.sigmoid(jnp.asarray(np.concatenate(kept_logit))))
    assert computed["binary"] == metrics.summary(y, probs)
    assert computed["binary"]["n"] == 104
    assert computed["roc_auc"] == metrics.roc_auc(y, probs)
    np.testing.assert_allclose(computed["roc_auc"], skm.roc_auc_score(y, probs), atol=TOL)
    assert computed["f1_at_03"] == metrics.f1(y, probs, 0.3)
    assert isinstance(computed["roc_auc"], float)


def test_clu_metric_with_probs_and_errors() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.8, 0.4, 0.4, 0.9], np.float32)
    first = metrics.BinaryOutputs.from_model_output(labels=y[:2], probs=p[:2])
    second = metrics.BinaryOutputs.from_model_output(labels=y[2:], probs=p[2:])
    merged = metrics.BinaryOutputs.empty().merge(first).merge(second)
    assert merged.compute() == metrics.summary(y, p)
    labels, probs = merged.collected()
    assert isinstance(labels, np.ndarray) and isinstance(probs, np.ndarray)
    with pytest.raises(ValueError, match="empty"):
        metrics.BinaryOutputs.empty().compute()
    with pytest.raises(ValueError, match="shapes"):
        metrics.BinaryOutputs.from_model_output(labels=y, probs=p[:, None])
    with pytest.raises(TypeError, match="probs.*logits"):
        metrics.BinaryOutputs.from_model_output(labels=y)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.binary_metric("auc")


# --------------------------------------------------------------------------- proportions


@pytest.mark.parametrize(
    ("p", "n", "expected"),
    # Wilson score intervals at 95 % (Newcombe 1998, Table I: 0/10, 10/10; 8/10 by hand)
    [(0.0, 10, (0.0, 0.2775)), (1.0, 10, (0.7225, 1.0)), (0.8, 10, (0.4902, 0.9433))],
)
def test_wilson_interval_known_values(p, n, expected) -> None:
    assert metrics.wilson_interval(p, n) == pytest.approx(expected, abs=5e-5)
    assert np.isnan(metrics.wilson_interval(0.5, 0)).all()


def test_a_proportion_of_one_gets_a_wilson_interval_not_a_point() -> None:
    # 20 of 20 lesions found, one slice per patient: a percentile bootstrap gives (1, 1)
    y = np.r_[np.ones(20), np.zeros(20)]
    p = np.r_[np.full(20, 0.9), np.full(2, 0.8), np.full(18, 0.1)]
    groups = np.arange(40)
    boot = metrics.bootstrap_ci(groups, y, p, ["recall"], n_resamples=300, seed=0)
    assert boot["recall"] == (1.0, 1.0)
    found = metrics.proportion_intervals(groups, y, p)["recall"]
    assert found.design_effect == 1.0 and found.trials == 20 and found.groups == 20
    assert (found.low, found.high) == metrics.wilson_interval(1.0, 20)
    assert found.low == pytest.approx(0.8389, abs=5e-5)


def test_proportion_intervals_count_patients_not_slices_when_slices_agree() -> None:
    # 10 patients x 5 lesion slices, each patient all found or all missed: 5 slices of one
    # patient are one observation. Rao-Scott: var = p(1-p)/(G-1), design effect 5 * 10 / 9,
    # and a t quantile on G - 1 = 9 degrees of freedom.
    groups = np.repeat(np.arange(10), 5)
    y = np.ones(50)
    p = np.repeat([0.9] * 7 + [0.1] * 3, 5)
    found = metrics.proportion_intervals(groups, y, p, ["recall"])["recall"]
    assert found.design_effect == pytest.approx(50 / 9)
    assert found.effective_n == pytest.approx(9) and found.df == 9
    assert (found.low, found.high) == pytest.approx(metrics.wilson_interval(0.7, 9, df=9))
    # The same counts on 50 independent slices: the plain Wilson interval, far narrower.
    alone = metrics.proportion_intervals(np.arange(50), y, p, ["recall"])["recall"]
    assert (alone.low, alone.high) == pytest.approx(metrics.wilson_interval(0.7, 50))
    assert found.high - found.low > 2 * (alone.high - alone.low)
    # All found: no variation to estimate the clustering from; each patient counts once.
    everything = metrics.proportion_intervals(groups, y, np.full(50, 0.9), ["recall"])["recall"]
    assert everything.effective_n == 10
    assert (everything.low, everything.high) == metrics.wilson_interval(1.0, 10, df=9)


def test_one_more_miss_does_not_narrow_a_proportions_interval() -> None:
    # 200 of 200 and 199 of 200 slices of 10 patients: one patient with a miss cannot show how
    # misses cluster, so both count the patients. The design effect of that one miss (about 1)
    # once gave 199/200 an interval from 0.972, far above 200/200's 0.72.
    groups, y = np.repeat(np.arange(10), 20), np.ones(200)
    probs = np.full(200, 0.9)
    every = metrics.proportion_intervals(groups, y, probs, ["recall"])["recall"]
    probs[0] = 0.1
    one_missed = metrics.proportion_intervals(groups, y, probs, ["recall"])["recall"]
    assert one_missed.effective_n == every.effective_n == 10
    assert one_missed.low <= every.low and one_missed.high <= every.high == 1.0
    probs[25] = 0.1  # misses in two patients: the clustering is estimated
    two = metrics.proportion_intervals(groups, y, probs, ["recall"])["recall"]
    assert two.effective_n > 10 and two.df == 9


def test_clustered_proportion_intervals_keep_their_coverage() -> None:
    # 20 patients of 10-30 slices whose sensitivities vary (Beta, intra-patient correlation 0.3)
    # around 0.98: the case where a design effect from the few patients with misses ran short
    # (83 % for a nominal 95 %).
    rng = np.random.default_rng(1)
    truth, icc, trials = 0.98, 0.3, 300
    scale = (1 - icc) / icc
    covered = 0
    for _ in range(trials):
        per_patient = rng.beta(truth * scale, (1 - truth) * scale, 20)
        slices = rng.integers(10, 31, 20)
        found = rng.random(slices.sum()) < np.repeat(per_patient, slices)
        groups = np.repeat(np.arange(20), slices)
        w = metrics.proportion_intervals(
            groups, np.ones(found.size), np.where(found, 0.9, 0.1), ["recall"]
        )["recall"]
        covered += w.low <= truth <= w.high
    assert covered / trials > 0.9, covered / trials


def test_proportion_intervals_follow_each_metrics_denominator() -> None:
    groups = np.array([0, 0, 1, 1, 2, 2])
    y = np.array([1, 0, 1, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.3, 0.1, 0.8, 0.4])  # at 0.5: TP 1, FN 1, FP 1, TN 3
    found = metrics.proportion_intervals(groups, y, p, threshold=0.5)
    expected_trials = {"recall": 2, "specificity": 4, "precision": 2, "npv": 4, "accuracy": 6}
    assert {k: v.trials for k, v in found.items()} == expected_trials
    assert {k: v.groups for k, v in found.items()} == {
        "recall": 2, "specificity": 3, "precision": 2, "npv": 3, "accuracy": 3,
    }  # fmt: skip
    # No predicted positive: PPV is undefined, and so is its interval.
    none = metrics.proportion_intervals(groups, y, np.zeros(6), ["precision"])["precision"]
    assert none.trials == 0 and np.isnan([none.low, none.high]).all()
    with pytest.raises(ValueError, match="unknown proportions \\['roc_auc'\\]"):
        metrics.proportion_intervals(groups, y, p, ["roc_auc"])


def test_wilson_intervals_cover_where_the_bootstrap_does_not() -> None:
    # 10 lesion patients with one slice each, true sensitivity 0.9: P(10 of 10) = 0.35, and a
    # percentile bootstrap then gives (1, 1), which misses 0.9. Wilson keeps its 95 %.
    rng = np.random.default_rng(0)
    covered = {"wilson": 0, "bootstrap": 0}
    trials = 200
    for _ in range(trials):
        found = rng.random(10) < 0.9
        y = np.r_[np.ones(10), np.zeros(10)]
        p = np.r_[np.where(found, 0.9, 0.1), np.full(10, 0.1)]
        groups = np.arange(20)
        w = metrics.proportion_intervals(groups, y, p, ["recall"])["recall"]
        b = metrics.bootstrap_ci(groups, y, p, ["recall"], n_resamples=200, seed=1)["recall"]
        covered["wilson"] += w.low <= 0.9 <= w.high
        covered["bootstrap"] += b[0] <= 0.9 <= b[1]
    assert covered["wilson"] / trials > 0.9, covered
    assert covered["bootstrap"] / trials < 0.75, covered


# --------------------------------------------------------------------------- DeLong


def _psi(labels, probs):
    """The Mann-Whitney kernel of every (lesion, normal) pair: 1, 1/2 on a tie, 0."""
    x, y = probs[labels == 1], probs[labels == 0]
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def _tied_scores(rng, n):
    labels = rng.integers(0, 2, n)
    return labels, np.round(0.6 * rng.random(n) + 0.25 * labels, 2)  # rounded: many ties


def test_delong_interval_is_delongs_variance_of_the_placement_matrix():
    rng = np.random.default_rng(3)
    labels, probs = _tied_scores(rng, 150)
    psi = _psi(labels, probs)
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)  # DeLong et al. (1988), equations 3-5
    se = math.sqrt(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)
    found = metrics.delong_interval(labels, probs, alpha=0.1)
    assert found.auc == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-12)
    assert found.se == pytest.approx(se, rel=1e-12)
    assert found.ci == pytest.approx((found.auc - 1.6448536 * se, found.auc + 1.6448536 * se))
    assert found.method == "delong"
    # Ids of one row each are DeLong's too; a strictly increasing map of the scores changes
    # nothing.
    assert metrics.delong_interval(labels, probs, np.arange(150)[::-1], alpha=0.1) == found
    squashed = metrics.delong_interval(labels, probs**3, alpha=0.1)
    assert (squashed.auc, squashed.se) == pytest.approx((found.auc, found.se), rel=1e-12)


def test_clustered_delong_is_obuchowskis_formula():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), rng.integers(1, 6, 30))
    labels, probs = _tied_scores(rng, groups.size)
    found = metrics.delong_interval(labels, probs, groups)
    # Obuchowski (1997), written out cluster by cluster from the placement matrix.
    psi = _psi(labels, probs)
    m, n = psi.shape
    auc = psi.mean()
    pos_groups, neg_groups = groups[labels == 1], groups[labels == 0]
    i10, i01, i = len(set(pos_groups)), len(set(neg_groups)), len(set(groups))
    s10 = s01 = s11 = 0.0
    for g in set(groups):
        a = psi[pos_groups == g].mean(axis=1).sum() - np.sum(pos_groups == g) * auc
        b = psi[:, neg_groups == g].mean(axis=0).sum() - np.sum(neg_groups == g) * auc
        s10, s01, s11 = s10 + a * a, s01 + b * b, s11 + a * b
    s10 *= i10 / ((i10 - 1) * m)
    s01 *= i01 / ((i01 - 1) * n)
    s11 *= i / (i - 1)
    se = math.sqrt(s10 / m + s01 / n + 2 * s11 / (m * n))
    assert (found.auc, found.se) == pytest.approx((auc, se), rel=1e-12)
    assert found.method == "obuchowski"
    assert (found.groups_with_lesion, found.groups_with_normal) == (i10, i01)


def test_clustered_delong_counts_a_patients_copies_once():
    # Each patient's one slice copied 4 times: the clustered se is that of the patients; the
    # rows taken as independent would claim twice the precision.
    rng = np.random.default_rng(5)
    labels, probs = _tied_scores(rng, 80)
    one = metrics.delong_interval(labels, probs)
    rows = (np.repeat(labels, 4), np.repeat(probs, 4))
    copies = metrics.delong_interval(*rows, np.repeat(np.arange(80), 4))
    assert (copies.auc, copies.se) == pytest.approx((one.auc, one.se), rel=1e-12)
    assert metrics.delong_interval(*rows).se == pytest.approx(one.se / 2, rel=0.05)


def test_delong_where_it_is_undefined_or_degenerate():
    one_class = metrics.delong_interval([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(one_class.auc) and math.isnan(one_class.se)
    # A class held by one patient: its variance cannot be estimated.
    single = metrics.delong_interval([1, 1, 0, 0, 0], [0.9, 0.8, 0.1, 0.85, 0.3], [0, 0, 1, 2, 3])
    assert single.auc == pytest.approx(5 / 6)
    assert math.isnan(single.se) and all(map(math.isnan, single.ci))
    # No overlap: se 0 and a point at 1 (the interval is cut to [0, 1]).
    perfect = metrics.delong_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert (perfect.auc, perfect.se, perfect.ci) == (1.0, 0.0, (1.0, 1.0))
    near = metrics.delong_interval([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.85, 0.8, 0.9, 0.95])
    assert near.ci[1] == 1.0 and near.ci[0] < near.auc < 1.0
    with pytest.raises(ValueError, match="alpha must be in"):
        metrics.delong_interval([0, 1], [0.1, 0.9], alpha=1.5)
    with pytest.raises(ValueError, match="one id per example"):
        metrics.paired_delong([1, 2], [0, 1, 1], [0.1, 0.5, 0.9], [0.2, 0.5, 0.9])


def test_paired_delong_is_delongs_test_of_correlated_aucs():
    rng = np.random.default_rng(6)
    labels, a = _tied_scores(rng, 120)
    b = np.clip(a + rng.normal(0, 0.08, a.size), 0, 1)
    # DeLong et al. (1988): the variance of the difference from the paired placements.
    pa, pb = _psi(labels, a), _psi(labels, b)
    d10, d01 = pb.mean(axis=1) - pa.mean(axis=1), pb.mean(axis=0) - pa.mean(axis=0)
    se = math.sqrt(d10.var(ddof=1) / d10.size + d01.var(ddof=1) / d01.size)
    test = metrics.paired_delong(None, labels, a, b)
    difference = skm.roc_auc_score(labels, b) - skm.roc_auc_score(labels, a)
    assert (test.difference, test.se) == pytest.approx((difference, se), rel=1e-12)
    assert test.z == pytest.approx(difference / se, rel=1e-12)
    assert test.p_value == pytest.approx(math.erfc(abs(test.z) / math.sqrt(2)), rel=1e-12)
    assert test.ci == pytest.approx((difference - 1.959964 * se, difference + 1.959964 * se))
    assert 0.5 < test.correlation < 1.0  # b is a's scores plus noise
    swapped = metrics.paired_delong(None, labels, b, a)
    assert (swapped.z, swapped.p_value) == pytest.approx((-test.z, test.p_value), rel=1e-12)
    # The se of a difference is below what the two AUCs' own se suggest, when they correlate.
    own = [metrics.delong_interval(labels, p).se for p in (a, b)]
    assert test.se < math.hypot(*own)
    same = metrics.paired_delong(None, labels, a, a)
    assert (same.difference, same.se, same.z, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_delong_clusters_in_patients():
    # Two models whose difference is the same in every copy of a patient: 4 copies each are the
    # patients' test again, not four times the evidence.
    rng = np.random.default_rng(7)
    labels, a = _tied_scores(rng, 60)
    b = np.clip(a + rng.normal(0.03, 0.08, a.size), 0, 1)
    once = metrics.paired_delong(None, labels, a, b)
    copies = [np.repeat(v, 4) for v in (labels, a, b)]
    clustered = metrics.paired_delong(np.repeat(np.arange(60), 4), *copies)
    assert (clustered.se, clustered.p_value) == pytest.approx((once.se, once.p_value), rel=1e-9)
    assert clustered.method == "obuchowski"
    assert metrics.paired_delong(None, *copies).p_value < once.p_value
