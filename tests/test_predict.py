"""liverjax.predict: the session's trained run (tests/test_export.py) scores the synthetic set's
DICOM files in-process, and gives each slice the probability evaluation gives its record.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
import training_runs
from test_export import CHOSEN, DATASET, THRESHOLD, make_config, shared_export

from liverjax import dicom, evaluate, input_pipeline, metrics, predict, train
from tfds_liver.labels import LABEL_NAMES


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def workdir(exported) -> pathlib.Path:
    return pathlib.Path(exported["out_dir"]).parent / "run"


@pytest.fixture(scope="module")
def predictor(exported, workdir) -> predict.Predictor:
    # The operating point of the shared run was chosen for its latest checkpoint.
    return predict.Predictor.load(workdir, "latest")


@pytest.fixture(scope="module")
def phantom(exported, tmp_path_factory) -> pathlib.Path:
    """The DICOM files the records were built from, regenerated from the builder's settings."""
    config = tfds.builder(DATASET, data_dir=exported["data_dir"]).builder_config
    out = tmp_path_factory.mktemp("phantom")
    config.write_phantom(out)
    return out


@pytest.fixture(scope="module")
def evaluation(exported, predictor) -> dict[str, evaluate.Predictions]:
    """Every split as evaluation scores it: its records through the eval input pipeline."""
    config = make_config(exported["data_dir"])
    restored = predictor.restored
    out = {}
    for split in ("train", "validation", "test"):
        source = input_pipeline.open_source(config.dataset, split)
        out[split] = evaluate.predict_split(
            restored.steps, restored.state, source, config, restored.mesh, split
        )
    return out


def test_loads_the_checkpoint_its_size_and_operating_point(exported, predictor):
    assert predictor.step == exported["step"]
    assert predictor.restored.meta["record_size"] == predictor.input_size == 64
    assert predictor.input_size == input_pipeline.record_size(make_config().dataset)
    assert predictor.threshold == THRESHOLD
    assert predictor.threshold_source.endswith(evaluate.OPERATING_POINT_FILE)
    assert predictor.patient_thresholds == CHOSEN["patient_level"]
    assert predictor.chosen["rule"] == CHOSEN["rule"]


def test_every_slice_scores_as_evaluation_scores_its_record(predictor, phantom, evaluation):
    scored = predictor.score_files([phantom])
    by_uid = {row["sop_uid"]: row for row in scored.slices}
    n_records = 0
    for split, predictions in evaluation.items():
        for uid, p in zip(predictions.ids["sop_uid"], predictions.probs, strict=True):
            row = by_uid[uid]
            np.testing.assert_allclose(row["probability"], p, rtol=0, atol=1e-6, err_msg=split)
            assert row["predicted"] == int(row["probability"] >= THRESHOLD)
            n_records += 1
    # The phantom writes exactly the files the records came from (one slice each) and its sheet.
    assert len(scored.slices) == n_records == len(scored.files) - 1
    [sheet] = [f for f in scored.files if f["status"] != "scored"]
    assert sheet == {"file": str(phantom / "labels.csv"), "status": "skipped", "slices": 0,
                     "reason": predict.LABEL_SHEET, "detail": "a label sheet"}  # fmt: skip
    assert all(row["warnings"] == [] for row in scored.slices)  # square-pixelled axial CT


def test_hu_arrays_score_like_their_records(predictor, exported, evaluation):
    source = input_pipeline.open_source(make_config(exported["data_dir"]).dataset, "test")
    hu = np.stack([source[i]["image"] for i in range(len(source))])  # (N, S, S, 1) int16
    want = evaluation["test"].probs
    np.testing.assert_allclose(predictor.predict_hu(hu), want, rtol=0, atol=1e-6)
    # Without the channel axis, as int32 or float32 HU: the same values, the same answer.
    np.testing.assert_allclose(predictor.predict_hu(hu[..., 0].astype(np.int32)), want, atol=1e-6)
    # Floats are rounded to int16 as the builder rounds: off-integer HU give the records' answer.
    off = hu.astype(np.float32) + np.random.default_rng(0).uniform(-0.49, 0.49, hu.shape)
    np.testing.assert_allclose(predictor.predict_hu(off), want, rtol=0, atol=1e-6)
    # More images than one batch, and none.
    many = np.concatenate([hu] * (predictor.config.eval_batch_size // len(hu) + 2))
    np.testing.assert_allclose(predictor.predict_hu(many), np.tile(want, len(many) // len(hu)))
    assert predictor.predict_hu(hu[:0]).shape == (0,)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 32, 32), np.int16), r"shape \(2, 32, 32, 1\): expected \(N, 64, 64\)"),
        (np.zeros((64, 64), np.int16), r"shape \(64, 64\)"),
        (np.full((1, 64, 64), 40000, np.int32), r"HU values 40000..40000 outside int16"),
        (np.full((1, 64, 64), -4e4, np.float32), r"HU values -40000.0..-40000.0 outside int16"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((1, 64, 64), bool), "dtype bool"),
    ],
)
def test_bad_hu_arrays_are_refused_with_what_is_wrong(predictor, images, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict_hu(images)


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_the_command_accounts_for_every_file(workdir, phantom, tmp_path, capsys, fifo):
    # A copy of the phantom with a file that is not DICOM, a FIFO, an MR slice, and one file
    # given twice.
    scans = tmp_path / "scans"
    shutil.copytree(phantom, scans)
    dicom_files = sorted(scans.rglob("*.dcm"))
    (scans / "notes.txt").write_text("not a DICOM file\n" * 20)
    fifo(scans / "pipe.dcm")
    mr = pydicom.dcmread(dicom_files[0])
    mr.Modality, mr.RescaleType = "MR", "US"
    mr.SOPInstanceUID = pydicom.uid.generate_uid()
    mr.save_as(scans / "mr.dcm")
    out = tmp_path / "out"
    summary = predict.main(
        [
            "--workdir",
            str(workdir),
            "--out",
            str(out),
            "--checkpoint",
            "latest",
            str(scans),
            str(dicom_files[3]),
        ]  # fmt: skip
    )
    files = _read_csv(out / predict.FILES_FILE)
    assert len(files) == len(dicom_files) + 5 == summary["files"]  # + labels.csv
    by_name = {f["file"]: f for f in files}
    assert by_name[str(scans / "notes.txt")]["status"] == "skipped"
    assert by_name[str(scans / "notes.txt")]["reason"] == "not_dicom"
    assert by_name[str(scans / "mr.dcm")]["reason"] == predict.NOT_CT
    assert by_name[str(scans / "pipe.dcm")]["reason"] == "not_a_file"
    assert (
        by_name[str(scans / "pipe.dcm")]["detail"] == "is a FIFO (named pipe), not a regular file"
    )
    assert "Modality 'MR'" in by_name[str(scans / "mr.dcm")]["detail"]
    repeated = [f for f in files if f["status"] == predict.REPEATED]
    assert len(repeated) == 1 and repeated[0]["file"] == str(dicom_files[3])
    assert repeated[0]["detail"] == f"the same file as {dicom_files[3]}"
    assert summary["files_by_status"] == {"repeated": 1, "scored": len(dicom_files), "skipped": 4}
    assert summary["warnings"] == []  # an operating point without slice counts: none to compare
    assert summary["skipped_by_reason"] == {
        "label_sheet": 1,
        "not_a_file": 1,
        "not_ct": 1,
        "not_dicom": 1,
    }

    slices = _read_csv(out / predict.PREDICTIONS_FILE)
    assert len(slices) == len(dicom_files) == summary["slices"]
    probs = np.asarray([float(r["probability"]) for r in slices])
    predicted = np.asarray([int(r["predicted"]) for r in slices])
    np.testing.assert_array_equal(predicted, probs >= THRESHOLD)
    assert summary["slices_predicted_lesion"] == predicted.sum()
    assert [r["predicted_name"] for r in slices] == [LABEL_NAMES[k] for k in predicted]

    # A patient's max and mean are evaluation's aggregation of its slices.
    patients = _read_csv(out / predict.PATIENTS_FILE)
    assert {p["grouped_by"] for p in patients} == {"PatientID"}
    ids = np.asarray([r["patient_id"] for r in slices])
    zeros = np.zeros(len(ids), np.int64)
    for how in ("max", "mean"):
        groups, _, agg = metrics.aggregate_by_group(ids, zeros, probs, how)
        assert [p["patient"] for p in patients] == list(groups)
        got = np.asarray([float(p[f"probability_{how}"]) for p in patients])
        np.testing.assert_allclose(got, agg, rtol=1e-12)
        threshold = CHOSEN["patient_level"][f"patient_{how}"]
        np.testing.assert_array_equal(
            [int(p[f"predicted_{how}"]) for p in patients], agg >= threshold
        )
    assert sum(int(p["slices"]) for p in patients) == len(slices)

    written = json.loads((out / predict.SUMMARY_FILE).read_text())
    assert written["checkpoint"]["requested"] == "latest"
    assert written["threshold"] == THRESHOLD and written["input_size"] == 64
    assert written["threshold_source"] == evaluate.OPERATING_POINT_FILE
    assert written["inputs"] == [str(scans), str(dicom_files[3])]  # as given
    del written["inputs"]
    assert str(tmp_path) not in json.dumps(written)  # no other path of this machine
    line = capsys.readouterr().out
    assert f"{len(dicom_files)} slices of {len(files)} files scored" in line
    assert (
        "5 files not scored (1 label_sheet, 1 not_a_file, 1 not_ct, 1 not_dicom, 1 repeated)"
        in line
    )


def test_non_ct_is_scored_when_allowed(predictor, phantom, tmp_path):
    mr = pydicom.dcmread(sorted(phantom.rglob("*.dcm"))[0])
    mr.Modality, mr.RescaleType = "MR", "US"
    mr.save_as(tmp_path / "mr.dcm")
    [row] = predictor.score_files([tmp_path / "mr.dcm"], allow_non_ct=True).slices
    assert row["modality"] == "MR"
    assert any(w.startswith("not CT (Modality MR)") for w in row["warnings"])


def test_bad_paths_and_runs_are_said_in_one_line(workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing.dcm")], f"{tmp_path / 'missing.dcm'}: no such file or folder"),
        ([str(tmp_path / "empty")], f"{tmp_path / 'empty'}: the folder holds no file"),
    ]
    for paths, message in cases:
        with pytest.raises(SystemExit) as failed:
            predict.main(["--workdir", str(workdir), "--out", str(tmp_path / "o"), *paths])
        assert str(failed.value.code).startswith(f"prediction failed: {message}")
    (tmp_path / "a.dcm").write_bytes(b"x" * 200)
    with pytest.raises(SystemExit) as failed:  # not a run
        predict.main(
            ["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), str(tmp_path / "a.dcm")]
        )
    assert "prediction failed: " in str(failed.value.code)
    assert str(failed.value.code).endswith(f"({train.TRACEBACK_ENV}=1 shows where)")


def test_patients_of_more_slices_than_validation_patients_are_warned_of(
    exported, workdir, phantom, tmp_path, caplog
):
    # Thresholds chosen on validation patients of 2 to 4 slices; the phantom's have more.
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    validated = {"min": 2, "median": 3.0, "max": 4}
    (run / evaluate.OPERATING_POINT_FILE).write_text(
        json.dumps(
            {"threshold": THRESHOLD, "checkpoint_step": exported["step"]}
            | CHOSEN
            | {"slices_per_patient": validated}
        )
    )
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="liverjax.predict"):
        summary = predict.main(
            ["--workdir", str(run), "--out", str(out), "--checkpoint", "latest", str(phantom)]
        )
    patients = _read_csv(out / predict.PATIENTS_FILE)
    over = [p for p in patients if int(p["slices"]) > validated["max"]]
    assert over and summary["operating_point"]["slices_per_patient"] == validated
    [warning] = summary["warnings"]
    assert warning.startswith(
        f"{len(over)} of {len(patients)} patients have more slices (up to "
        f"{max(int(p['slices']) for p in over)}) than any validation patient the patient-level "
        "thresholds were chosen on (at least 2, at most 4, median 3): the max of more slices"
    )
    assert warning in caplog.text
    # Patients like the validation ones: nothing to say; nor without the counts (older runs).
    assert predict.patient_warnings([{"slices": 4}, {"slices": 2}], validated) == []
    assert predict.patient_warnings(patients, None) == []
    for edited in ({"median": 3}, {"min": "2", "max": "4"}, {"min": None, "max": True}):
        assert predict.patient_warnings(patients, edited) == []  # hand-edited: no numbers
    # Fewer slices than any validation patient: the max is lower, lesions are missed.
    [fewer] = predict.patient_warnings([{"slices": 1}, {"slices": 3}], validated)
    assert fewer.startswith("1 of 2 patients has fewer slices (down to 1) than any validation")
    assert "misses more of their lesions" in fewer


def test_a_threshold_of_another_checkpoint_is_refused(exported, workdir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    other = exported["step"] - 1
    (run / evaluate.OPERATING_POINT_FILE).write_text(
        json.dumps({"threshold": THRESHOLD, "checkpoint_step": other})
    )
    with pytest.raises(ValueError, match=f"chosen for checkpoint step {other}") as refused:
        predict.Predictor.load(run, "latest")
    assert f"checkpoint={other} from Python" in str(refused.value)
    with pytest.warns(UserWarning, match=f"chosen for checkpoint step {other}") as said:
        loaded = predict.Predictor.load(run, "latest", allow_other_checkpoint_threshold=True)
    assert [w.filename for w in said] == [__file__]  # the caller's line, not liverjax's
    # Without patient-level thresholds, the patients are cut at the slice threshold.
    assert loaded.patient_thresholds == {"patient_max": THRESHOLD, "patient_mean": THRESHOLD}
    (run / evaluate.OPERATING_POINT_FILE).unlink()
    with pytest.warns(UserWarning, match="using threshold 0.5") as said:
        default = predict.Predictor.load(run, "latest")
    assert [w.filename for w in said] == [__file__]
    assert (default.threshold, default.threshold_source) == (0.5, "default")


def test_the_command_runs_on_three_devices_without_tensorflow(
    workdir, phantom, predictor, tmp_path, tmp_path_factory
):
    files = sorted(phantom.rglob("*.dcm"))[:3]
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorflow is blocked')\n")
    # 3 devices: the run's eval_batch_size, 8, is rounded up to 9 (trained on 8, scored on 3).
    env = training_runs.child_env(training_runs.compilation_cache(tmp_path_factory), devices=3)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env["PYTHONPATH"]])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "liverjax.predict", "--workdir", str(workdir), "--out", str(out),
         "--checkpoint", "latest", *map(str, files)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("3 slices of 3 files scored at checkpoint step")
    assert "config.eval_batch_size 8 -> 9: a multiple of the 3 devices here" in done.stderr
    rows = _read_csv(out / predict.PREDICTIONS_FILE)
    want = predictor.score_files(files).slices  # in this process, on 8 devices
    assert [r["file"] for r in rows] == [w["file"] for w in want] == list(map(str, files))
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows], [w["probability"] for w in want], atol=1e-6
    )


def test_a_feet_first_slice_is_turned_and_scored_as_the_slice_it_shows(
    predictor, phantom, tmp_path
):
    # Feet first supine: stored mirrored left-right, with the orientation that says so.
    path = sorted(phantom.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "feet_first.dcm")
    scored = predictor.score_files([path, tmp_path / "feet_first.dcm"])
    supine, feet_first = scored.slices
    assert supine["turned"] is None
    assert feet_first["turned"].startswith("stored mirrored left-right (Image Orientation")
    assert feet_first["warnings"] == supine["warnings"] == []
    assert feet_first["probability"] == pytest.approx(supine["probability"], abs=1e-6)
    out = tmp_path / "out"
    predict.write_outputs(out, predictor, scored)
    rows = _read_csv(out / predict.PREDICTIONS_FILE)
    assert [r["turned"] for r in rows] == ["", feet_first["turned"]]


def test_multi_frame_files_and_batches_that_do_not_fill(predictor, phantom, tmp_path):
    # Files of 3, 1, 13 and 5 frames (22 slices, batches of 8): a file's frames cross batches.
    one = pydicom.dcmread(sorted(phantom.rglob("*.dcm"))[0])
    frames = one.pixel_array
    paths = []
    for i, n in enumerate((3, 1, 13, 5)):
        ds = pydicom.dcmread(sorted(phantom.rglob("*.dcm"))[0])
        stack = np.stack([np.roll(frames, 3 * k, axis=1) for k in range(n)])
        ds.PixelData, ds.NumberOfFrames = stack.astype(frames.dtype).tobytes(), n
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(tmp_path / f"{i}.dcm")
        paths.append(tmp_path / f"{i}.dcm")
    scored = predictor.score_files(paths)
    assert [f["slices"] for f in scored.files] == [3, 1, 13, 5]
    assert len(scored.slices) == 22
    # Each slice's probability is that of its frame scored alone.
    for path in paths:
        decoded = dicom.decode_resampled(path, str(path), predictor.input_size)
        alone = predictor.predict_hu(np.stack([r.image for r in decoded]))
        rows = [r for r in scored.slices if r["file"] == str(path)]
        assert [r["frame"] for r in rows] == [r.slice.frame for r in decoded]
        assert [r["frame"] for r in rows] in ([None], list(range(len(decoded))))
        np.testing.assert_allclose([r["probability"] for r in rows], alone, rtol=0, atol=1e-6)


def test_files_without_patient_id_are_not_one_patient(predictor, phantom, tmp_path):
    # Three slices of three phantom patients, their PatientID blanked (as anonymisers do): each
    # study stays a patient of its own, and one without a study too is its file.
    by_patient = {}
    for path in sorted(phantom.rglob("*.dcm")):
        by_patient.setdefault(pydicom.dcmread(path).PatientID, path)
    paths = []
    for i, path in enumerate(list(by_patient.values())[:3]):
        ds = pydicom.dcmread(path)
        ds.PatientID = ""
        if i == 2:
            del ds.StudyInstanceUID
        ds.save_as(tmp_path / f"{i}.dcm")
        paths.append(tmp_path / f"{i}.dcm")
    patients = predictor.score_files(paths).patients()
    assert sorted(p["grouped_by"] for p in patients) == ["StudyInstanceUID"] * 2 + ["file"]
    assert [p["slices"] for p in patients] == [1, 1, 1]
    assert str(paths[2]) in {p["patient"] for p in patients}


def test_nothing_scored_still_writes_every_file_and_column(predictor, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("no DICOM here\n" * 20)
    scored = predictor.score_files([tmp_path / "in"])
    summary = predict.write_outputs(tmp_path / "out", predictor, scored)
    assert summary["slices"] == summary["patients"] == 0
    assert summary["files_by_status"] == {"skipped": 1}
    for name, columns in (
        (predict.PREDICTIONS_FILE, predict.SLICE_COLUMNS),
        (predict.PATIENTS_FILE, predict.PATIENT_COLUMNS),
        (predict.FILES_FILE, predict.FILE_COLUMNS),
    ):
        header = (tmp_path / "out" / name).read_text().splitlines()[0]
        assert header == ",".join(columns), name


def test_the_record_size_of_older_checkpoints_comes_from_the_dataset(exported):
    dataset = make_config(exported["data_dir"]).dataset
    assert predict.record_size({"record_size": 96}, dataset) == 96
    assert predict.record_size({}, dataset) == 64  # liver/synthetic_small's records
    dataset.name = "liver/no_such_config"
    with pytest.raises(ValueError, match="predates the record size .* pass --data_dir"):
        predict.record_size({}, dataset)


def test_one_path_as_a_string_is_one_file(predictor, phantom):
    path = sorted(phantom.rglob("*.dcm"))[0]
    for given in (str(path), path):
        scored = predictor.score_files(given)
        assert [f["file"] for f in scored.files] == [str(path)]


def test_copies_of_images_are_scored_once_and_exams_kept_apart(predictor, phantom, tmp_path):
    # Two exports of one series (the same SOP Instance UIDs), and a follow-up exam of the same
    # patient (new study, new UIDs).
    series = sorted({p.parent for p in phantom.rglob("*.dcm")})[0]
    shutil.copytree(series, tmp_path / "export_a")
    shutil.copytree(series, tmp_path / "export_b")
    study, new_series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    (tmp_path / "followup").mkdir()
    for path in sorted(series.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, new_series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(tmp_path / "followup" / path.name)
    n = len(list(series.glob("*.dcm")))
    scored = predictor.score_files([tmp_path])
    statuses = collections.Counter(f["status"] for f in scored.files)
    assert statuses == {"scored": 2 * n, predict.DUPLICATE: n}
    duplicate = next(f for f in scored.files if f["status"] == predict.DUPLICATE)
    assert duplicate["file"].startswith(str(tmp_path / "export_b"))
    assert duplicate["detail"].startswith(f"the same images as {tmp_path / 'export_a'}")
    [patient] = scored.patients()
    assert (patient["slices"], patient["studies"]) == (2 * n, 2)
    studies = scored.studies()
    assert [s["slices"] for s in studies] == [n, n] and study in {s["study_uid"] for s in studies}
    assert all(s["series"] == 1 for s in studies)


def test_images_without_or_sharing_a_uid_are_told_apart_by_their_pixels(
    predictor, phantom, tmp_path
):
    # An anonymised export without SOP Instance UIDs, and a UID reused for other pixels: each
    # slice is scored (as the server and the dataset build keep them), a copy of one once.
    first, second = sorted({p.parent for p in phantom.rglob("*.dcm")})[:2]
    a, b = sorted(first.glob("*.dcm"))[:2]
    (tmp_path / "no_uid").mkdir()
    for path in (a, b):
        ds = pydicom.dcmread(path)
        del ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(tmp_path / "no_uid" / path.name)
    shutil.copy(tmp_path / "no_uid" / a.name, tmp_path / "no_uid" / "copy.dcm")
    reused = pydicom.dcmread(sorted(second.glob("*.dcm"))[0])
    reused.SOPInstanceUID = pydicom.dcmread(a).SOPInstanceUID
    reused.save_as(tmp_path / "reused.dcm")
    shutil.copy(a, tmp_path / "a.dcm")
    scored = predictor.score_files(
        [tmp_path / "a.dcm", tmp_path / "reused.dcm", tmp_path / "no_uid"]
    )
    status = {pathlib.Path(f["file"]).name: f["status"] for f in scored.files}
    assert status == {
        "a.dcm": "scored",
        "reused.dcm": "scored",
        a.name: "scored",
        b.name: "scored",
        "copy.dcm": predict.DUPLICATE,
    }
    rows = {pathlib.Path(r["file"]).name: r for r in scored.slices}
    assert rows["a.dcm"]["warnings"] == rows[a.name]["warnings"] == []
    [warning] = rows["reused.dcm"]["warnings"]
    assert warning.startswith(f"SOP Instance UID {rows['a.dcm']['image_id']} is also in ")
    assert "with other pixels: both are scored" in warning
    # Each scores as the same file scored alone.
    for name in ("reused.dcm", a.name, b.name):
        path = next(tmp_path.rglob(name))
        [alone] = predictor.score_files(path).slices
        assert rows[name]["probability"] == pytest.approx(alone["probability"], abs=1e-6)
    assert rows[a.name]["probability"] != rows[b.name]["probability"]


def test_an_interrupted_run_keeps_what_was_scored(predictor, phantom, tmp_path):
    listed = predict.input_files([phantom])

    class CtrlC(list):  # Ctrl-C while the 6th file is read
        def __iter__(self):
            yield from list.__iter__(self[:5])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # from Python it goes through
        predictor._score(CtrlC(listed), allow_non_ct=False)
    scored = predictor._score(CtrlC(listed), allow_non_ct=False, keep_partial=True)
    assert scored.interrupted
    assert [f["status"] for f in scored.files[:5]].count("scored") == 4  # and labels.csv
    assert {f["status"] for f in scored.files[5:]} == {predict.NOT_REACHED}
    assert len(scored.files) == len(listed) and len(scored.slices) == 4
    assert all("probability" in row for row in scored.slices)
    summary = predict.write_outputs(tmp_path, predictor, scored)
    assert (
        summary["interrupted"]
        and summary["files_by_status"][predict.NOT_REACHED] == len(listed) - 5
    )


def test_out_is_checked_before_anything_is_scored(workdir, phantom, tmp_path):
    one = str(sorted(phantom.rglob("*.dcm"))[0])
    (tmp_path / "file").write_text("")
    args = ["--workdir", str(workdir), "--checkpoint", "latest"]
    cases = [
        (["--out", str(tmp_path / "file"), one], "a file, not a folder for the outputs"),
        (["--out", str(phantom / "out"), str(phantom)], "a folder being scored"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as failed:
            predict.main(args + extra)
        assert message in str(failed.value.code)
    out = tmp_path / "out"
    predict.main(args + ["--out", str(out), one])
    with pytest.raises(SystemExit) as failed:
        predict.main(args + ["--out", str(out), one])
    assert "holds an earlier prediction (predictions.csv, patients.csv" in str(failed.value.code)
    predict.main(args + ["--out", str(out), "--overwrite", one])
    assert sorted(p.name for p in out.iterdir()) == sorted(predict.OUTPUT_FILES)  # no partials
    # Nothing scored: the outputs say why, and the command fails.
    (tmp_path / "notes.txt").write_text("no DICOM\n" * 20)
    with pytest.raises(SystemExit) as failed:
        predict.main(args + ["--out", str(tmp_path / "none"), str(tmp_path / "notes.txt")])
    assert (
        str(failed.value.code)
        == "prediction failed: no slice was scored; files.csv says why of each file"
    )
    assert _read_csv(tmp_path / "none" / predict.FILES_FILE)[0]["reason"] == "not_dicom"
