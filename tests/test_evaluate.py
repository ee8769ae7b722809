"""liverjax.evaluate on a real run: records built from phantom DICOM, a short training, the CLI.

One module fixture builds `liver/synthetic_small`, trains configs/test.py for a few steps and runs
`python -m liverjax.evaluate`'s main on the test split; the tests then check the written files
against liverjax.metrics, scikit-learn, the records and training's own validation metrics.
"""

import csv
import dataclasses
import html
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds
import training_runs
from flax import nnx
from sklearn import metrics as sk_metrics

import tfds_liver  # noqa: F401  (registers the liver builder)
from liverjax import (
    checkpointing,
    compare,
    evaluate,
    export,
    metrics,
    models,
    report,
    saliency,
    train,
)

DATASET = training_runs.DATASET
# Small evaluation settings for speed; every other one keeps its default.
# The test split holds 2 patients: bootstrap_min_patients 1 keeps its bootstrap intervals.
EVAL = {
    "bootstrap_resamples": 300,
    "bootstrap_seed": 3,
    "bootstrap_min_patients": 1,
    "worst_cases": 2,
}


def _rngs(seed: int) -> nnx.Rngs:
    """Initialization keys of training's PRNG (threefry initializers compile slowly on CPU)."""
    return nnx.Rngs(jax.random.key(seed, impl=train.INIT_PRNG))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained and evaluated workdir: (workdir, config, result of evaluate.main)."""
    training_runs.compilation_cache(tmp_path_factory)
    config = training_runs.make_config(training_runs.liver_data(tmp_path_factory))
    config.eval = ml_collections.ConfigDict(EVAL)
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(config, str(workdir))
    result = evaluate.main(["--workdir", str(workdir), "--split", "test"])
    return workdir, config, result


def _checkpointer(workdir: pathlib.Path, config) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
        workdir / train.CHECKPOINT_DIR,
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        best_metric=config.best_metric,
        async_save=False,
    )


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _predictions_csv(workdir: pathlib.Path):
    rows = _read_csv(workdir / "report" / "predictions.csv")
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    patients = np.array([r["patient_id"] for r in rows])
    return rows, labels, probs, patients


def _same_fields(stored: dict, want) -> None:
    """A dataclass's fields as metrics.json (or the comparison) holds them, NaN as null."""
    for key, value in dataclasses.asdict(want).items():
        if isinstance(value, str):
            assert stored[key] == value, key
        else:
            got = [_num(v) for v in stored[key]] if isinstance(value, tuple) else _num(stored[key])
            expected = list(value) if isinstance(value, tuple) else value
            assert got == pytest.approx(expected, abs=1e-12, nan_ok=True), key


def _num(value: float | None) -> float:
    """A number of metrics.json: null stands for NaN (undefined)."""
    return math.nan if value is None else value


def _strict_json(path: pathlib.Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_predictions_cover_every_test_record_once(run):
    workdir, config, result = run
    source = tfds.data_source(DATASET, split="test", data_dir=config.dataset.data_dir)
    rows, labels, probs, _ = _predictions_csv(workdir)
    records = [source[i] for i in range(len(source))]
    assert [r["sop_uid"] for r in rows] == [rec["sop_uid"].decode() for rec in records]
    assert len({r["sop_uid"] for r in rows}) == len(source)
    assert labels.tolist() == [int(rec["label"]) for rec in records]
    assert [r["patient_id"] for r in rows] == [rec["patient_id"].decode() for rec in records]
    threshold = result["levels"]["slice"]["threshold"]
    assert [int(r["predicted"]) for r in rows] == (probs >= threshold).astype(int).tolist()
    assert {r["outcome"] for r in rows} <= {"TP", "FP", "TN", "FN"}
    assert ((probs >= 0) & (probs <= 1)).all()


@pytest.fixture(scope="module")
def restored(run):
    """The checkpoint the report names, restored again, and the validation predictions."""
    workdir, config, result = run
    restored = evaluate.restore(config, workdir, str(result["checkpoint"]["step"]))
    source = tfds.data_source(DATASET, split="validation", data_dir=config.dataset.data_dir)
    val = evaluate.predict_split(
        restored.steps, restored.state, source, config, restored.mesh, "validation"
    )
    return restored, val


def test_best_checkpoint_is_the_best_validated_one(run, restored):
    workdir, config, result = run
    restored, _ = restored
    ckpt = _checkpointer(workdir, config)
    _, latest = ckpt.restore(restored.steps.abstract_state, None, ckpt.latest_step())
    assert result["checkpoint"]["step"] == ckpt.best_step()
    assert "best" in result["checkpoint"]["chosen"]
    ckpt.close()
    # The evaluated checkpoint holds the best validation value that training saw.
    best = latest["early_stopping"]
    assert restored.meta["validation"][config.best_metric] == best["best"]
    assert result["checkpoint"]["step"] == best["best_step"]


def test_probabilities_are_those_of_the_restored_checkpoint(run, restored):
    """Recomputed with the CNN on the records, outside the evaluation's batching."""
    workdir, config, _ = run
    restored, _ = restored
    source = tfds.data_source(DATASET, split="test", data_dir=config.dataset.data_dir)
    hu = np.stack([source[i]["image"] for i in range(len(source))])
    from liverjax import preprocess

    forward = nnx.jit(lambda m, x: m(preprocess.preprocess(x, config), deterministic=True))
    logits = forward(restored.model, jnp.asarray(hu))
    _, _, probs, _ = _predictions_csv(workdir)
    np.testing.assert_allclose(probs, np.asarray(jax.nn.sigmoid(logits)), atol=1e-6)


def test_validation_predictions_match_training_validation(run, restored):
    """Evaluation's predictions on validation reproduce the metrics training logged there."""
    workdir, config, result = run
    restored, val = restored
    logged = restored.meta["validation"]
    assert logged["n"] == val.labels.size
    for name in ("roc_auc", "average_precision", "brier", "accuracy"):
        assert getattr(metrics, name)(val.labels, val.probs) == pytest.approx(
            logged[name], abs=1e-6, nan_ok=True
        ), name
    # The operating point was chosen on these predictions by Youden's J (the default rule).
    op = json.loads((workdir / evaluate.OPERATING_POINT_FILE).read_text())
    youden = metrics.youden_threshold(val.labels, val.probs)
    assert op["threshold"] == metrics.threshold_between(val.probs, youden)
    # Halfway to the next lower probability: the same decisions, no validation image on the edge.
    assert op["threshold"] not in val.probs
    np.testing.assert_array_equal(val.probs >= op["threshold"], val.probs >= youden)
    assert op["threshold"] == result["levels"]["slice"]["threshold"]
    assert (op["rule"], op["split"]) == ("youden", "validation")
    assert op["checkpoint_step"] == result["checkpoint"]["step"]
    assert export.read_threshold(workdir)[0] == op["threshold"]
    # How many slices its patients have: the patient-level thresholds hold for patients alike.
    _, counts = np.unique(val.ids["patient_id"], return_counts=True)
    want = {"min": counts.min(), "median": np.median(counts), "max": counts.max()}
    assert op["slices_per_patient"] == want == result["operating_point"]["slices_per_patient"]


def test_metrics_json_equals_metrics_and_sklearn_on_the_csv(run):
    workdir, config, result = run
    stored = _strict_json(workdir / "report" / "metrics.json")
    _, labels, probs, patients = _predictions_csv(workdir)
    s = stored["levels"]["slice"]
    t = s["threshold"]
    expected = metrics.summary(labels, probs, t)
    for name, value in expected.items():
        assert _num(s["metrics"][name]) == pytest.approx(value, abs=1e-12, nan_ok=True), name
    if len(set(labels)) == 2:
        assert s["metrics"]["roc_auc"] == pytest.approx(
            sk_metrics.roc_auc_score(labels, probs), abs=1e-6
        )
        assert s["metrics"]["average_precision"] == pytest.approx(
            sk_metrics.average_precision_score(labels, probs), abs=1e-6
        )
    predicted = (probs >= t).astype(int)
    tn, fp, fn, tp = sk_metrics.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    assert (s["metrics"]["tp"], s["metrics"]["fp"], s["metrics"]["tn"], s["metrics"]["fn"]) == (
        tp,
        fp,
        tn,
        fn,
    )
    # Intervals: the patient bootstrap with the configured resamples and seed, and the Wilson
    # intervals of the proportions with patients as clusters.
    ci = metrics.bootstrap_ci(
        patients,
        labels,
        probs,
        n_resamples=EVAL["bootstrap_resamples"],
        seed=EVAL["bootstrap_seed"],
        threshold=t,
    )
    wilson = metrics.proportion_intervals(patients, labels, probs, threshold=t)
    for name in metrics.METRIC_NAMES:
        expected = (wilson[name].low, wilson[name].high) if name in wilson else ci[name]
        np.testing.assert_allclose(
            [_num(v) for v in s["ci"][name]], expected, atol=1e-12, err_msg=name
        )
        assert s["ci_method"][name] == ("wilson" if name in wilson else "bootstrap")
    assert stored["bootstrap"]["n_resamples"] == EVAL["bootstrap_resamples"]
    # The AUC's DeLong interval: clustered in patients at slice level (Obuchowski).
    # (The run's test split has one lesion patient: the AUC, no se.)
    assert s["roc_auc_delong"]["auc"] == pytest.approx(s["metrics"]["roc_auc"], abs=1e-12)
    _same_fields(s["roc_auc_delong"], metrics.delong_interval(labels, probs, patients))
    assert s["roc_auc_delong"]["method"] == "obuchowski"
    # Patient level: max and mean of each patient's slices.
    for level, how in (("patient_max", "max"), ("patient_mean", "mean")):
        _, y, p = metrics.aggregate_by_group(patients, labels, probs, how)
        got = stored["levels"][level]
        assert got["metrics"]["n"] == len(set(patients))
        expected = metrics.summary(y, p, got["threshold"])
        for name in evaluate.CALIBRATION_NAMES:  # max / mean of slices: a score, no probability
            assert name not in got["metrics"] and name not in got["ci"]
            del expected[name]
        for name, value in expected.items():
            assert _num(got["metrics"][name]) == pytest.approx(value, abs=1e-12, nan_ok=True), name
        wilson = metrics.proportion_intervals(np.arange(y.size), y, p, threshold=got["threshold"])
        for name, found in wilson.items():  # one row per patient: the plain Wilson interval
            assert found.trials == 0 or found.design_effect == 1.0
            bounds = [_num(v) for v in got["ci"][name]]
            assert bounds == pytest.approx([found.low, found.high], nan_ok=True), name
        _same_fields(got["roc_auc_delong"], metrics.delong_interval(y, p))  # DeLong's own
        assert got["roc_auc_delong"]["method"] == "delong"
    # One source in the phantom data: its subgroup is the whole split.
    assert list(stored["by_source"]) == ["phantom"]
    assert stored["by_source"]["phantom"]["metrics"] == s["metrics"]
    assert stored["by_source"]["phantom"]["ci"] == s["ci"]
    lesion_patients = {p for p, y in zip(patients, labels, strict=True) if y == 1}
    assert stored["by_source"]["phantom"]["patients_with_lesion"] == len(lesion_patients)
    assert stored["split"] == "test"
    assert stored["dataset"]["version"] == str(tfds_liver.liver_dataset_builder.Builder.VERSION)
    assert stored["dataset"]["images"] == labels.size
    assert stored["config"]["dataset"]["name"] == DATASET
    assert stored["eval_settings"]["worst_cases"] == EVAL["worst_cases"]


def test_patients_csv(run):
    workdir, _, result = run
    _, labels, probs, patients = _predictions_csv(workdir)
    rows = _read_csv(workdir / "report" / "patients.csv")
    groups, y, p_max = metrics.aggregate_by_group(patients, labels, probs, "max")
    assert [r["patient_id"] for r in rows] == groups.tolist()
    assert [int(r["label"]) for r in rows] == y.tolist()
    np.testing.assert_array_equal([float(r["probability_max"]) for r in rows], p_max)
    assert sum(int(r["slices"]) for r in rows) == labels.size
    t = result["levels"]["patient_max"]["threshold"]
    assert [int(r["predicted_max"]) for r in rows] == (p_max >= t).astype(int).tolist()


def test_the_thresholds_can_be_derived_again_from_the_report_folder(run):
    workdir, config, result = run
    out = workdir / "report"
    settings = evaluate.eval_settings(config)
    rows = _read_csv(out / "threshold_predictions.csv")
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    points = result["operating_point"]["levels"]
    assert evaluate.choose_threshold(labels, probs, settings) == points["slice"]["threshold"]
    patients = _read_csv(out / "threshold_patients.csv")
    y = np.array([int(r["label"]) for r in patients])
    for level, column in (("patient_max", "probability_max"), ("patient_mean", "probability_mean")):
        p = np.array([float(r[column]) for r in patients])
        assert evaluate.choose_threshold(y, p, settings) == points[level]["threshold"], level
    assert points["slice"]["validation"]["n"] == len(rows)


def test_report_files(run):
    workdir, _, result = run
    out = workdir / "report"
    for name in report.FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width >= 300 and height >= 300, (name, width, height)
    page = (out / report.HTML_FILE).read_text()
    assert page.count('src="data:image/png;base64,') >= len(report.FIGURES)
    assert 'id="metrics"' in page and "http" not in page.split("<body>")[1].split("<pre>")[0]
    assert f"checkpoint step {result['checkpoint']['step']}" in page


def test_the_command_line_runs_as_a_script(run, tmp_path, tmp_path_factory):
    """`python -m liverjax.evaluate` as users type it (a module run as a script sees only what is
    defined above its __main__ block)."""
    import shutil
    import subprocess
    import sys

    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    shutil.rmtree(workdir / evaluate.REPORT_DIR)
    env = training_runs.child_env(training_runs.compilation_cache(tmp_path_factory), devices=8)
    command = [sys.executable, "-m", "liverjax.evaluate", "--workdir", str(workdir)]
    command += ["--split", "test", "--eval", "threshold_rule=sensitivity"]
    done = subprocess.run(
        [*command, "--eval", "target_sensitivity=1"],
        cwd=training_runs.REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "slice ROC AUC" in done.stdout
    assert (workdir / evaluate.REPORT_DIR / report.HTML_FILE).is_file()
    chosen = json.loads((workdir / evaluate.OPERATING_POINT_FILE).read_text())
    assert (chosen["rule"], chosen["target_sensitivity"]) == ("sensitivity", 1)
    # A bad setting fails before any checkpoint is read.
    bad = subprocess.run(
        [*command, "--eval", "bootstrap_samples=10"],
        cwd=training_runs.REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode != 0 and "unknown keys ['bootstrap_samples']" in bad.stderr


def test_checkpoint_and_workdir_errors(run, tmp_path):
    workdir, config, _ = run
    steps = _checkpointer(workdir, config).all_steps()
    with pytest.raises(FileNotFoundError, match=rf"--checkpoint 99999.*{steps}"):
        evaluate.restore(config, workdir, "99999")
    with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
        evaluate.restore(config, workdir, "newest")
    # From Python a step is an int too (it raised AttributeError: no isdigit)
    ckpt = _checkpointer(workdir, config)
    for which in (steps[0], np.int64(steps[0])):
        assert evaluate.resolve_checkpoint(ckpt, which) == (
            steps[0],
            f"step {steps[0]}, as requested",
        )
    with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
        evaluate.resolve_checkpoint(ckpt, True)
    ckpt.close()
    with pytest.raises(SystemExit, match=r"^evaluation failed: .*config.json.*"
                       r"\(LIVERJAX_TRACEBACK=1 shows where\)$"):  # fmt: skip
        evaluate.main(["--workdir", str(tmp_path)])
    with pytest.MonkeyPatch.context() as env:
        env.setenv(train.TRACEBACK_ENV, "1")
        with pytest.raises(FileNotFoundError, match="config.json"):
            evaluate.main(["--workdir", str(tmp_path)])
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.eval = {"bootstrap_samples": 10}
    with pytest.raises(ValueError, match="unknown keys \\['bootstrap_samples'\\]"):
        evaluate.eval_settings(bad)
    for key in ("bootstrap_resamples", "bootstrap_min_patients", "calibration_bins", "worst_cases"):
        bad.eval = {key: True}  # a bool is an int to Python, not a count
        with pytest.raises(ValueError, match=f"config.eval.{key} = True"):
            evaluate.eval_settings(bad)


def test_too_few_patients_of_a_class_get_no_bootstrap_interval():
    # 4 lesion patients (2 slices each) and 6 normal ones: below the default of 5 per class the
    # bootstrap's intervals are not given; the proportions keep their Wilson intervals.
    settings = evaluate.default_eval_config()
    groups = np.repeat(np.arange(10), 2)
    labels = (groups < 4).astype(int)
    probs = np.linspace(0.9, 0.1, 20)
    found = evaluate.intervals(settings, groups, labels, probs, 0.5)
    assert found["ci_patients"] == {"with_lesion": 4, "with_normal": 6}
    for name in metrics.BOOTSTRAP_NAMES:
        assert np.isnan(found["ci"][name]).all() and found["ci_method"][name] == "too_few_patients"
    for name in metrics.PROPORTION_NAMES:
        low, high = found["ci"][name]
        assert 0 <= low < high <= 1 and found["ci_method"][name] == "wilson", name
    assert found["bootstrap_skipped_single_class"] is None
    settings.bootstrap_min_patients = 4
    found = evaluate.intervals(settings, groups, labels, probs, 0.5)
    assert found["ci_method"]["roc_auc"] == "bootstrap"
    low, high = found["ci"]["roc_auc"]
    assert low < metrics.roc_auc(labels, probs) <= high


def _preds(labels, probs, patients) -> evaluate.Predictions:
    ids = {
        name: np.asarray([f"{name}{i}" for i in range(len(labels))]) for name in evaluate.ID_FIELDS
    }
    ids["patient_id"] = np.asarray(patients)
    return evaluate.Predictions("validation", np.asarray(labels), np.asarray(probs, float), ids)


def test_operating_points_target_sensitivity_and_patient_fallback():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(0.5 * labels + 0.6 * rng.random(60), 0, 1)
    # Every patient has a lesion slice: no patient-level threshold can be chosen.
    patients = np.repeat([f"p{i}" for i in range(6)], 10)
    labels[::10] = 1
    config = ml_collections.ConfigDict(
        {"eval": {"threshold_rule": "sensitivity", "target_sensitivity": 0.8}}
    )
    settings = evaluate.eval_settings(config)
    points = evaluate.operating_points(_preds(labels, probs, patients), settings)
    t = points["slice"]["threshold"]
    chosen = metrics.threshold_for_sensitivity(labels, probs, 0.8)
    assert (
        t == metrics.threshold_between(probs, chosen) and chosen > t > probs[probs < chosen].max()
    )
    assert points["slice"]["validation"]["recall"] >= 0.8
    # The next higher distinct probability would miss the target.
    higher = probs[probs > chosen]
    if higher.size:
        assert metrics.recall(labels, probs, higher.min()) < 0.8
    for level in ("patient_max", "patient_mean"):
        # With the sensitivity rule, only lesion patients are needed: chosen at patient level.
        _, y, p = _preds(labels, probs, patients).level(level)
        chosen = metrics.threshold_for_sensitivity(y, p, 0.8)
        assert points[level]["threshold"] == metrics.threshold_between(p, chosen)
    youden = evaluate.eval_settings(ml_collections.ConfigDict())
    points = evaluate.operating_points(_preds(labels, probs, patients), youden)
    chosen = metrics.youden_threshold(labels, probs)
    assert points["slice"]["threshold"] == metrics.threshold_between(probs, chosen)
    for level in ("patient_max", "patient_mean"):
        assert points[level]["threshold"] == points["slice"]["threshold"]
        assert "all lesion" in points[level]["source"]
    with pytest.raises(ValueError, match="all normal"):
        evaluate.operating_points(_preds(np.zeros(60, int), probs, patients), youden)


def test_worst_cases_are_the_most_confident_errors():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    probs = np.array([0.9, 0.7, 0.2, 0.1, 0.45, 0.8, 0.95, 0.3])
    preds = _preds(labels, probs, ["a"] * 8)
    cases = evaluate.worst_cases(preds, 0.5, 2)
    assert cases["false_positive"].tolist() == [6, 0]  # normal, highest probability first
    assert cases["false_negative"].tolist() == [3, 7]  # lesion, lowest probability first
    assert evaluate.worst_cases(preds, 0.5, 0)["false_positive"].size == 0
    # Over patients: each patient's most confident error before any patient's second.
    spread = evaluate.worst_cases(_preds(labels, probs, list("abbbcbab")), 0.5, 3)
    assert spread["false_positive"].tolist() == [6, 1, 0]  # a 0.95, b 0.7, then a 0.9
    assert spread["false_negative"].tolist() == [3, 4, 7]  # b 0.1, c 0.45, then b 0.3


def test_grad_cam_channel_weights_are_mean_gradients():
    """Grad-CAM's weights against forward-mode derivatives of the logit along each channel."""
    config = ml_collections.ConfigDict({"model": models.default_model_config(), "image_size": 16})
    config.model.widths, config.model.dense = (3, 5), 8
    model = nnx.jit(lambda: models.create_model(config, rngs=_rngs(2)))()
    model.eval()
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    cam, logits = saliency.grad_cam_raw(model, x)
    b, h, w, c = cam.shape + (model.convs[-1].out_features,)

    @nnx.jit
    def channel_sums(model, x):
        """d logit / d t of logit(features + t * ones on channel k), for every k: (C, B)."""
        features = model.features(x)

        def along(direction):
            return jax.jvp(
                lambda f: model.classify(f, deterministic=True), (features,), (direction,)
            )[1]

        directions = jnp.eye(c)[:, None, None, None, :] * jnp.ones_like(features)
        return features, model.classify(features, deterministic=True), jax.vmap(along)(directions)

    features, forward_logits, sums = channel_sums(model, x)
    np.testing.assert_allclose(logits, forward_logits, rtol=1e-6)
    assert features.shape == (b, h, w, c)
    alpha = np.asarray(sums).T / (h * w)  # the mean gradient over positions, (B, C)
    expected = np.maximum(np.einsum("bhwc,bc->bhw", np.asarray(features), alpha), 0.0)
    np.testing.assert_allclose(np.asarray(cam), expected, rtol=1e-4, atol=1e-6)

    maps, _ = saliency.grad_cam(model, x)
    assert maps.shape == (2, 16, 16)
    for i in range(2):
        assert float(maps[i].max()) == pytest.approx(1.0 if expected[i].max() > 0 else 0.0)
        assert float(maps[i].min()) >= 0.0
    assert not np.asarray(saliency.upsample(jnp.zeros((1, 4, 4)), (16, 16))).any()
    # A single active cell lands in the matching corner of the image.
    corner = np.asarray(saliency.upsample(jnp.zeros((1, 4, 4)).at[0, 0, 0].set(2.0), (16, 16)))
    assert corner[0, :4, :4].mean() > corner[0, 8:, 8:].mean() == 0.0


def _page_summary(validation, test) -> str:
    """The key results of the report on `test`, as text, the threshold chosen on `validation`."""
    result = evaluate.analyse(validation, test, evaluate.eval_settings(ml_collections.ConfigDict()))
    result["split"] = test.split
    result["dataset"] = {
        "images": test.labels.size,
        "lesion_images": int(test.labels.sum()),
        "patients": int(np.unique(test.ids["patient_id"]).size),
    }
    return html.unescape(report._key_results(result))


def _patients(lesion: int, normal: int, seed: int, split: str) -> evaluate.Predictions:
    """3 slices per patient, all of the patient's class; lesion slices score higher."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.r_[np.ones(lesion, int), np.zeros(normal, int)], 3)
    probs = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.15, labels.size), 0.01, 0.99)
    patients = np.repeat([f"p{i}" for i in range(lesion + normal)], 3)
    return dataclasses.replace(_preds(labels, probs, patients), split=split)


def test_key_results_warn_of_a_split_that_chose_the_threshold_and_checkpoint():
    validation, test = _patients(40, 40, 0, "validation"), _patients(40, 40, 1, "test")
    assert "optimistic" not in _page_summary(validation, test)
    text = _page_summary(validation, validation)
    assert (
        "chosen on the split being evaluated (validation), which is also the split training "
        "validated on to choose its best checkpoint: every figure here is optimistic"
    ) in text
    assert "Only" not in text  # 40 patients of each class


def test_key_results_warn_of_few_patients_per_class():
    validation = _patients(40, 40, 0, "validation")
    text = _page_summary(validation, _patients(20, 20, 1, "test"))
    assert "Only 40 patients (20 with a lesion, 20 without): intervals are wide" in text
    assert "Fewer than" not in text
    text = _page_summary(validation, _patients(4, 50, 1, "test"))
    assert "Only 54 patients (4 with a lesion, 50 without)" in text
    assert "Fewer than 5 patients of a class at Slice, Patient (max), Patient (mean) level" in text
    assert "ROC AUC of " in text and "(CI n/a)" in text


def test_the_few_patients_warning_names_only_the_levels_without_intervals():
    # 20 lesion patients with normal slices too, and 2 normal patients: slices of both classes
    # come from 22 patients (bootstrap), patients of the normal class are 2 (none)
    rng = np.random.default_rng(3)
    labels = np.r_[np.tile([1, 1, 1, 0, 0, 0], 20), np.zeros(12, int)]
    patients = np.repeat([f"p{i}" for i in range(22)], 6)
    probs = np.clip(0.35 + 0.3 * labels + rng.normal(0, 0.15, labels.size), 0.01, 0.99)
    test = dataclasses.replace(_preds(labels, probs, patients), split="test")
    text = _page_summary(_patients(40, 40, 0, "validation"), test)
    assert "Fewer than 5 patients of a class at Patient (max), Patient (mean) level" in text


def test_key_results_warn_of_probabilities_tied_at_one_across_classes():
    validation, test = _patients(40, 40, 0, "validation"), _patients(40, 40, 1, "test")
    probs = test.probs.copy()
    probs[:3] = 1.0  # lesion slices only: their ties do not change a ranking between classes
    only_lesion = dataclasses.replace(test, probs=probs)
    assert "exactly 1.0" not in _page_summary(validation, only_lesion)
    probs[-2:] = 1.0
    both = dataclasses.replace(test, probs=probs)
    assert "3 lesion and 2 normal slices have a probability of exactly 1.0" in (
        _page_summary(validation, both)
    )


def test_compare_two_checkpoints_of_the_run(run, tmp_path, capsys):
    # B: the same run evaluated at another kept checkpoint, in a copy of the workdir.
    workdir, config, result = run
    other = next(
        s for s in _checkpointer(workdir, config).all_steps() if s != result["checkpoint"]["step"]
    )
    b = tmp_path / "b"
    shutil.copytree(workdir, b)
    evaluate.main(["--workdir", str(b), "--split", "test", "--checkpoint", str(other),
                   "--eval", "threshold_rule=sensitivity"])  # fmt: skip
    out = tmp_path / "compare.json"
    comparison = compare.main([str(workdir), str(b), "--out", str(out)])
    assert _strict_json(out) == evaluate._json_safe(comparison)  # NaN as null
    assert comparison["a"]["checkpoint_step"] == result["checkpoint"]["step"]
    assert comparison["b"]["checkpoint_step"] == other
    b_result = json.loads((b / "report" / "metrics.json").read_text())
    _, labels, p_a, patients = _predictions_csv(workdir)
    _, _, p_b, _ = _predictions_csv(b)
    for level, entry in comparison["levels"].items():
        for name, m in entry["metrics"].items():
            # Each side is its own report's figure, at its own operating point.
            assert m["a"] == pytest.approx(_num(result["levels"][level]["metrics"][name]))
            assert m["b"] == pytest.approx(_num(b_result["levels"][level]["metrics"][name]))
            assert m["difference"] == pytest.approx(m["b"] - m["a"])
    # The slice-level interval is the paired patient bootstrap of the two predictions.csv files.
    thresholds = (result["levels"]["slice"]["threshold"], b_result["levels"]["slice"]["threshold"])
    slice_ci = metrics.paired_bootstrap_ci(
        patients, labels, p_a, p_b, ["roc_auc"], n_resamples=EVAL["bootstrap_resamples"],
        seed=EVAL["bootstrap_seed"], thresholds=thresholds,
    )  # fmt: skip
    got = comparison["levels"]["slice"]["metrics"]["roc_auc"]
    assert got["ci"] == pytest.approx(list(slice_ci["roc_auc"]))
    assert got["p_value"] == pytest.approx(slice_ci.p_values["roc_auc"])
    # Sensitivity and specificity get McNemar's test: clustered in patients at slice level,
    # the exact binomial test on discordant patients at a patient level.
    got = comparison["levels"]["slice"]["metrics"]["recall"]["mcnemar"]
    want = metrics.paired_mcnemar(patients, labels, p_a, p_b, "recall", thresholds=thresholds)
    assert got == dataclasses.asdict(want) and got["method"] == "exact"
    thresholds = tuple(r["levels"]["patient_max"]["threshold"] for r in (result, b_result))
    _, patient_labels, max_a = metrics.aggregate_by_group(patients, labels, p_a, "max")
    _, _, max_b = metrics.aggregate_by_group(patients, labels, p_b, "max")
    normal = patient_labels == 0
    right_a, right_b = max_a[normal] < thresholds[0], max_b[normal] < thresholds[1]
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    got = comparison["levels"]["patient_max"]["metrics"]["specificity"]["mcnemar"]
    assert (got["only_a"], got["only_b"]) == (only_a, only_b)
    exact = 1.0 if only_a + only_b == 0 else scipy.stats.binomtest(only_a, only_a + only_b).pvalue
    assert got["p_value"] == pytest.approx(exact, abs=1e-12)
    assert "mcnemar" not in comparison["levels"]["slice"]["metrics"]["roc_auc"]
    # The AUCs get DeLong's paired test: clustered in patients at slice level.
    for level, got in comparison["levels"].items():
        got = got["metrics"]["roc_auc"]["delong"]
        if level == "slice":
            want = metrics.paired_delong(patients, labels, p_a, p_b)
        else:
            _, y, a = metrics.aggregate_by_group(patients, labels, p_a, level[8:])
            _, _, b_ = metrics.aggregate_by_group(patients, labels, p_b, level[8:])
            want = metrics.paired_delong(None, y, a, b_)
        _same_fields(got, want)
        assert got["method"] == ("obuchowski" if level == "slice" else "delong")
        assert got["difference"] == pytest.approx(
            comparison["levels"][level]["metrics"]["roc_auc"]["difference"], abs=1e-12
        )
        assert "delong" not in comparison["levels"][level]["metrics"]["recall"]
    # Too few patients per class for the bootstrap: no DeLong test either.
    loaded_a = compare.load(workdir)
    loaded_a[0]["bootstrap"]["min_patients_per_class"] = 2
    few = compare.compare(loaded_a, compare.load(b))["levels"]["slice"]["metrics"]["roc_auc"]
    assert few["delong"]["method"] == "too_few_patients" and math.isnan(few["delong"]["p_value"])
    assert few["delong"]["difference"] == pytest.approx(few["difference"], abs=1e-12)
    # Operating points chosen by other rules: said, as their sensitivities differ by design.
    [warning] = comparison["warnings"]
    assert warning.startswith("the operating points were chosen by another rule (A: Youden's J")
    table = capsys.readouterr().out
    assert f"A at step {result['checkpoint']['step']}, B at step {other}" in table
    assert f"B: step {other}, operating point by target sensitivity on validation" in table
    assert f"warning: {warning}" in table
    assert compare.main([str(workdir), str(workdir)])["warnings"] == []
    assert "slice         roc_auc   " in table and "patient_max   sensitivity" in table
    [row] = [line for line in table.splitlines() if line.startswith("slice         roc_auc")]
    q = comparison["levels"]["slice"]["metrics"]["roc_auc"]["delong"]["p_value"]
    assert row.endswith("n/a" if math.isnan(q) else "<0.001" if q < 0.001 else f"{q:.3f}"), row
    assert "test p: for ROC AUC DeLong's test of the paired AUCs" in table
    assert "McNemar: exact sign-flip test over patients (A and B equally likely" in table
    # The McNemar cell: p (below 0.001 as such; ~ for the normal approximation), then counts.
    test = comparison["levels"]["slice"]["metrics"]["recall"]["mcnemar"]
    test |= {"p_value": 2e-5, "only_a": 12370, "only_b": 12614, "method": "normal"}
    lines = compare.format_table(comparison).splitlines()
    [row] = [line for line in lines if line.startswith("slice         sensitivity")]
    assert row.endswith("  <0.001~  12370/12614")
    for q, shown in ((0.0412, "  0.041"), (3e-7, "  <0.001")):
        comparison["levels"]["patient_max"]["metrics"]["roc_auc"]["delong"]["p_value"] = q
        lines = compare.format_table(comparison).splitlines()
        [row] = [line for line in lines if line.startswith("patient_max   roc_auc")]
        assert row.endswith(shown) and not row.endswith("/" + shown), row
    assert lines[-1 - len(comparison["warnings"])].endswith(
        "~: its normal approximation (Durkalski)"
    )

    # A run evaluated on other images, or labelled otherwise, is refused, naming the row.
    rows = (b / "report" / "predictions.csv").read_text().splitlines()
    header, first, *rest = rows
    cells = first.split(",")
    label_at = header.split(",").index("label")
    cells[label_at] = str(1 - int(cells[label_at]))
    (b / "report" / "predictions.csv").write_text("\n".join([header, ",".join(cells), *rest]))
    with pytest.raises(SystemExit) as failed:
        compare.main([str(workdir), str(b)])
    assert "the two evaluations label the same image differently: row 0" in str(failed.value.code)
    (b / "report" / "predictions.csv").write_text("\n".join([header, *rest]))
    with pytest.raises(SystemExit) as failed:
        compare.main([str(workdir), str(b)])
    assert f"{b / 'report' / 'predictions.csv'}, line 2: index 1 where 0 was expected" in str(
        failed.value.code
    )
    with pytest.raises(SystemExit) as failed:
        compare.main([str(workdir), str(tmp_path)])
    assert f"{tmp_path / 'report' / 'metrics.json'} does not exist" in str(failed.value.code)


def test_the_metrics_table_gives_the_auc_delong_interval():
    validation, test = _patients(40, 40, 0, "validation"), _patients(40, 40, 1, "test")
    result = evaluate.analyse(validation, test, evaluate.eval_settings(ml_collections.ConfigDict()))
    result["split"] = "test"
    slices = metrics.delong_interval(test.labels, test.probs, test.ids["patient_id"])
    _, y, p = metrics.aggregate_by_group(test.ids["patient_id"], test.labels, test.probs, "max")
    patients = metrics.delong_interval(y, p)
    assert slices.method == "obuchowski" and 0 < slices.ci[0] < slices.auc < slices.ci[1]
    assert result["levels"]["slice"]["roc_auc_delong"] == dataclasses.asdict(slices)
    assert result["levels"]["patient_max"]["roc_auc_delong"] == dataclasses.asdict(patients)
    [row] = [
        r
        for r in html.unescape(report._metrics_section(result)).split("<tr>")
        if r.startswith("<td>ROC AUC, DeLong interval</td>")
    ]
    cells = [c.split("</td>")[0] for c in row.split("<td>")[2:]]
    assert cells[:2] == [
        f"{slices.ci[0]:.3f}\u2013{slices.ci[1]:.3f}",
        f"{patients.ci[0]:.3f}\u2013{patients.ci[1]:.3f}",
    ]
    # Fewer than 5 patients in a class: no interval, as the bootstrap gives none.
    few = evaluate.analyse(validation, _patients(4, 40, 1, "test"), evaluate.eval_settings(
        ml_collections.ConfigDict()))  # fmt: skip
    delong = few["levels"]["slice"]["roc_auc_delong"]
    assert delong["method"] == "too_few_patients" and math.isnan(delong["ci"][0])
    assert delong["auc"] == pytest.approx(few["levels"]["slice"]["metrics"]["roc_auc"])
    # A report from before the interval was computed shows a dash.
    for level in result["levels"].values():
        del level["roc_auc_delong"]
    row = report._metrics_section(result).split("DeLong interval</td>")[1].split("</tr>")[0]
    assert row == "<td>\u2014</td>" * 3


def test_an_evaluation_killed_while_writing_leaves_the_earlier_report_whole(
    run, tmp_path, monkeypatch
):
    workdir, _, result = run
    w = tmp_path / "w"
    shutil.copytree(workdir, w)
    before = {p.relative_to(w): p.read_bytes() for p in (w / "report").rglob("*") if p.is_file()}
    op = (w / evaluate.OPERATING_POINT_FILE).read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after metrics.json and the CSVs, before the page

    monkeypatch.setattr(report, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--workdir", str(w), "--split", "validation"])
    after = {p.relative_to(w): p.read_bytes() for p in (w / "report").rglob("*") if p.is_file()}
    assert after == before and (w / evaluate.OPERATING_POINT_FILE).read_bytes() == op
    # Killed between its renames: the earlier report, moved aside, is put back, not dropped.
    (w / "report").rename(w / "report.old")
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--workdir", str(w), "--split", "validation"])
    after = {p.relative_to(w): p.read_bytes() for p in (w / "report").rglob("*") if p.is_file()}
    assert after == before and not (w / "report.old").exists()
    monkeypatch.undo()
    # The next evaluation clears what the killed one left, and replaces the report whole.
    evaluate.main(["--workdir", str(w), "--split", "validation"])
    assert not (w / "report.writing").exists() and not (w / "report.old").exists()
    assert json.loads((w / "report" / "metrics.json").read_text())["split"] == "validation"
    assert (w / "report" / report.HTML_FILE).exists()
