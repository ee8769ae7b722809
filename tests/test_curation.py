"""Curation: every file accounted for, duplicates and conflicts found, splits by patient."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tfds_liver import curation, labels

SIZE = 16


def write_ct(
    path: pathlib.Path, pixels: np.ndarray, *, patient="P1", sop=None, frames=1, study=None
) -> str:
    """Writes a small CT DICOM file (stored = HU + 1024) and returns its SOP Instance UID."""
    sop = sop or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.PatientID = patient
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing = [0.5, 0.5]
    ds.ImagePositionPatient = [0, 0, 0]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-200, 200, (SIZE, SIZE)).astype(np.int16)


def _set_tag(path: pathlib.Path, keyword: str, value) -> None:
    """Rewrites the file with `keyword` set to `value` (None: the tag removed)."""
    ds = pydicom.dcmread(path)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    ds.save_as(path)


def write_sheet(path: pathlib.Path, rows: list[dict]) -> None:
    labels.write_labels(rows, path)


@pytest.fixture
def messy_dir(tmp_path):
    """A manual dir with every kind of file curation must account for."""
    d = tmp_path / "manual"
    rows = []
    for p in range(6):  # 6 patients, 2 slices each; odd patients have a lesion slice
        for s in range(2):
            rel = f"siteA/p{p}/s{s}.dcm"
            write_ct(d / rel, image(10 * p + s), patient=f"P{p}")
            lesion = p % 2 == 1 and s == 1
            rows.append(
                {"patient_id": f"P{p}", "label": "lesion" if lesion else "normal", "path": rel}
            )
    # Exact copy (same SOP UID) of p0/s0 under another name, same label: duplicate.
    (d / "siteB").mkdir(parents=True)
    (d / "siteB/copy.dcm").write_bytes((d / "siteA/p0/s0.dcm").read_bytes())
    rows.append({"patient_id": "P0", "label": "normal", "path": "siteB/copy.dcm"})
    # Same pixels and patient, new SOP UID, different label: both copies are a conflict.
    write_ct(d / "siteB/relabel.dcm", image(20), patient="P2")
    rows.append({"patient_id": "P2", "label": "lesion", "path": "siteB/relabel.dcm"})
    # A series folder labelled by one row: every file in it gets the label.
    for s in range(3):
        write_ct(d / f"siteB/p9/series/{s}.dcm", image(900 + s), patient="P9")
    rows.append({"patient_id": "P9", "label": "normal", "path": "siteB/p9/series"})
    # Labelled by SOP Instance UID instead of path.
    sop = write_ct(d / "siteB/by_uid.dcm", image(777), patient="P7")
    rows.append({"patient_id": "P7", "label": "lesion", "sop_instance_uid": sop})
    # A multi-frame file: 2 slices from one file.
    frames = np.stack([image(501), image(502)])
    write_ct(d / "siteB/multi.dcm", frames, patient="P5", frames=2)
    rows.append({"patient_id": "P5", "label": "normal", "path": "siteB/multi.dcm"})
    # Problem files.
    (d / "siteB/empty.dcm").write_bytes(b"")
    (d / "siteB/notes.txt").write_text("not an image")
    write_ct(d / "siteB/unlabelled.dcm", image(4242), patient="P8")
    rows.append({"patient_id": "P8", "label": "normal", "path": "siteB/missing.dcm"})
    rows.append({"patient_id": "P8", "label": "normal", "path": "siteB/empty.dcm"})
    write_sheet(d / "labels.csv", rows)
    return d


def test_every_file_is_accounted_for(messy_dir, caplog):
    result = curation.curate(
        messy_dir, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=2
    )
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "labels.csv line 19 (siteB/missing.dcm) matches no image: path does not" in caplog.text
    assert "1 decoded files are named by no label row" in caplog.text
    report = json.loads(json.dumps(result.report))  # JSON-serialisable
    by_path = {e["path"]: e for e in report["files"]}
    files, _ = curation.find_files(messy_dir)
    assert sorted(by_path) == sorted(files)
    assert sum(report["counts"].values()) == report["files_total"] == len(files) == 22
    assert by_path["siteB/copy.dcm"]["status"] == "duplicate"
    assert by_path["siteB/copy.dcm"]["duplicate_of"] == "siteA/p0/s0.dcm"
    assert by_path["siteB/relabel.dcm"]["status"] == "conflict"
    assert by_path["siteA/p2/s0.dcm"]["status"] == "conflict"
    assert by_path["siteB/empty.dcm"] == {
        **by_path["siteB/empty.dcm"],
        "status": "skipped",
        "reason": "empty",
    }
    assert by_path["siteB/empty.dcm"]["labelled_by"] == ["labels.csv:20"]
    assert by_path["siteB/notes.txt"]["reason"] == "not_dicom"
    # The log gives the reason and what the report says of it.
    detail = by_path["siteB/notes.txt"]["detail"]
    assert detail and f"siteB/notes.txt: skipped not_dicom: {detail}" in caplog.text
    assert by_path["siteB/unlabelled.dcm"]["status"] == "unlabelled"
    assert by_path["siteB/by_uid.dcm"]["status"] == "written"
    assert all(by_path[f"siteB/p9/series/{s}.dcm"]["status"] == "written" for s in range(3))
    assert report["counts"] == {
        "written": 16,
        "duplicate": 1,
        "conflict": 2,
        "unlabelled": 1,
        "skipped": 2,
    }
    assert report["skipped_by_reason"] == {"empty": 1, "not_dicom": 1}
    # A row naming a file that holds no image matches none too (the file's entry says why).
    missing, empty = report["label_rows_without_image"]
    assert (missing["path"], empty["path"]) == ("siteB/missing.dcm", "siteB/empty.dcm")
    assert empty["why"].startswith("names 1 file(s), none of them a decodable image (siteB/empty")
    assert report["top_level_folders"] == {"siteA": 12, "siteB": 10}
    assert report["slices_by_source"] == {"siteA": 11, "siteB": 6}
    # Slices: 12 siteA - 1 conflict + 3 series + 1 by uid + 2 frames = 17.
    assert sum(len(v) for v in result.splits.values()) == 17
    assert sum(s["slices"] for s in report["splits"].values()) == 17


def test_splits_are_disjoint_by_patient_and_stratified(tmp_path):
    d = tmp_path / "m"
    rows = []
    for p in range(20):
        for s in range(3):
            rel = f"p{p}/{s}.dcm"
            write_ct(d / rel, image(100 * p + s), patient=f"P{p}")
            rows.append(
                {
                    "patient_id": f"P{p}",
                    "label": "lesion" if p < 8 and s == 0 else "normal",
                    "path": rel,
                }
            )
    write_sheet(d / "labels.csv", rows)
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 3), workers=1)
    patients = {k: {e.patient_id for e in v} for k, v in result.splits.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    assert sum(len(p) for p in patients.values()) == 20
    lesion_patients = {k: {e.patient_id for e in v if e.label} for k, v in result.splits.items()}
    # 8 lesion patients, 12 without: 20% each to validation and test in both strata.
    assert [len(lesion_patients[k]) for k in curation.SPLITS] == [4, 2, 2]
    assert [len(patients[k]) for k in curation.SPLITS] == [12, 4, 4]
    # Same seed, same split; another seed, another split.
    again = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 3), workers=2)
    assert {k: {e.patient_id for e in v} for k, v in again.splits.items()} == patients
    other = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 4), workers=1)
    assert {k: {e.patient_id for e in v} for k, v in other.splits.items()} != patients


@pytest.mark.parametrize("n", [20, 100, 1000])
def test_adding_or_relabelling_a_patient_moves_few_others(n):
    """A rebuild after new exports arrive must not move patients an older model trained on into
    validation or test: each patient's place depends on its own id."""
    spec = curation.SplitSpec(0.15, 0.15, 0)
    has_lesion = {f"P{i:04d}": i % 3 == 0 for i in range(n)}
    before = curation.split_patients(has_lesion, spec)

    def moved(after):
        return sorted(p for p in before if p in after and after[p] != before[p])

    added = curation.split_patients(has_lesion | {"NEW": False}, spec)
    assert len(moved(added)) <= 2, moved(added)  # at most one per cut of the stratum
    removed = curation.split_patients({p: v for p, v in has_lesion.items() if p != "P0001"}, spec)
    assert len(moved(removed)) <= 2, moved(removed)
    relabelled = curation.split_patients(has_lesion | {"P0001": True}, spec)
    assert len([p for p in moved(relabelled) if p != "P0001"]) <= 4  # both strata change


def test_records_keep_hounsfield_units(tmp_path):
    d = tmp_path / "m"
    hu = image(5)
    write_ct(d / "a.dcm", hu, patient="P1")
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 1, "path": "a.dcm"}])
    result = curation.curate(d, image_size=SIZE, split=curation.SplitSpec(0, 0, 0), workers=1)
    (example,) = result.splits["train"]
    np.testing.assert_array_equal(example.features()["image"][..., 0], hu)
    assert example.features()["image"].dtype == np.int16
    assert example.label == 1
    np.testing.assert_allclose(example.features()["pixel_spacing"], [0.5, 0.5])


def test_per_source_label_sheets_are_merged(tmp_path):
    d = tmp_path / "m"
    for site in ("A", "B"):
        write_ct(d / site / "x.dcm", image(ord(site)), patient=f"{site}1")
        write_sheet(
            d / site / "labels.csv",
            [{"patient_id": f"{site}1", "label": "normal", "path": "x.dcm"}],
        )
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    assert result.report["label_sheets"] == ["A/labels.csv", "B/labels.csv"]
    assert result.report["counts"]["written"] == 2
    assert {e.record.source for e in result.splits["train"]} == {"A", "B"}


def test_a_folder_sheet_row_written_from_the_manual_dir_is_explained(tmp_path):
    """A row of A/labels.csv is relative to A/: `A/x.dcm` there names A/A/x.dcm."""
    d = tmp_path / "m"
    write_ct(d / "A" / "x.dcm", image(1), patient="A1")
    write_sheet(d / "A" / "labels.csv", [{"patient_id": "A1", "label": 0, "path": "A/x.dcm"}])
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    [row] = result.report["label_rows_without_image"]
    assert row["why"] == (
        "path does not exist as A/A/x.dcm (relative to A/); A/x.dcm exists relative to the "
        "manual dir: paths in A/labels.csv are relative to its folder"
    )


def test_bad_label_sheet_is_an_error_naming_the_row(tmp_path):
    d = tmp_path / "m"
    write_ct(d / "a.dcm", image(1))
    (d / "labels.csv").write_text("patient_id,label,path\nP1,maybe,a.dcm\n")
    with pytest.raises(labels.LabelError, match=r"line 2, column 'label'"):
        curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)


def test_missing_label_sheet_is_a_clear_error(tmp_path):
    write_ct(tmp_path / "a.dcm", image(1))
    with pytest.raises(FileNotFoundError, match="no labels.csv in") as e:
        curation.curate(tmp_path, image_size=8, split=curation.SplitSpec(0, 0, 0))
    assert "found" not in str(e.value)
    # Sheets that are there but not read are named: mis-cased, or too deep.
    write_sheet(tmp_path / "Labels.csv", [{"patient_id": "P1", "label": 0, "path": "a.dcm"}])
    write_sheet(tmp_path / "s/p1/labels.csv", [{"patient_id": "P1", "label": 0, "path": "x"}])
    with pytest.raises(FileNotFoundError, match="found Labels.csv, s/p1/labels.csv: a sheet is"):
        curation.curate(tmp_path, image_size=8, split=curation.SplitSpec(0, 0, 0))


def _drop_sop_uid(path: pathlib.Path) -> None:
    ds = pydicom.dcmread(path)
    del ds.SOPInstanceUID
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(path)


def _build(manual_dir: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
    """The real `manual` build of manual_dir; returns the version folder."""
    import tensorflow_datasets as tfds

    from tfds_liver import liver_dataset_builder

    builder = liver_dataset_builder.Builder(config="manual", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return pathlib.Path(builder.data_dir)


def test_vendor_quirks_of_files_and_folders_build(tmp_path):
    """Anonymised files without SOP UIDs, a file name in another encoding, a linked-in series,
    a multi-frame file that repeats one image: the build writes them and reports each."""
    d = tmp_path / "manual"
    rows = []
    for i in range(2):  # two different images without a SOP Instance UID (blanked by an anonymiser)
        write_ct(d / f"anon/{i}.dcm", image(60 + i), patient="PA")
        _drop_sop_uid(d / f"anon/{i}.dcm")
    rows.append({"patient_id": "PA", "label": "normal", "path": "anon"})
    # A name written as Latin-1 on another system: not UTF-8 (Python keeps a surrogate escape).
    latin1 = d / "cd" / "caf\udce9.dcm"
    write_ct(latin1, image(70), patient="PC")
    rows.append({"patient_id": "PC", "label": "lesion", "path": "cd"})
    # A series linked in from elsewhere.
    write_ct(tmp_path / "elsewhere/series/0.dcm", image(80), patient="PL")
    (d / "linked").symlink_to(tmp_path / "elsewhere")
    (d / "linked_again").symlink_to(tmp_path / "elsewhere")  # the same folder twice: read once
    rows.append({"patient_id": "PL", "label": "normal", "path": "linked"})
    # A multi-frame file whose first frame repeats a single-frame file of the same patient.
    write_ct(d / "mf/a_single.dcm", image(90), patient="PM")
    write_ct(d / "mf/b_multi.dcm", np.stack([image(90), image(91)]), patient="PM", frames=2)
    rows.append({"patient_id": "PM", "label": "normal", "path": "mf"})
    write_sheet(d / "labels.csv", rows)

    built = _build(d, tmp_path / "data")
    report = json.loads((built / "curation_report.json").read_text())
    by_path = {e["path"]: e for e in report["files"]}
    assert by_path["anon/0.dcm"]["status"] == by_path["anon/1.dcm"]["status"] == "written"
    assert by_path["cd/caf\\xe9.dcm"]["status"] == "written"  # named in escaped form
    assert by_path["linked/series/0.dcm"]["status"] == "written"
    assert not any(p.startswith("linked_again/") for p in by_path)
    multi = by_path["mf/b_multi.dcm"]
    assert (multi["status"], multi["slices"], multi["slices_written"]) == ("written", 2, 1)
    assert multi["duplicate_slices"] == [
        {"slice": 0, "image_id": multi["duplicate_slices"][0]["image_id"],
         "duplicate_of": "mf/a_single.dcm"}
    ]  # fmt: skip
    assert report["counts"]["written"] == report["files_total"] == 6

    import tensorflow_datasets as tfds

    paths = []
    for split in ("train", "validation", "test"):
        if (built / f"liver-{split}.array_record-00000-of-00001").exists():
            source = tfds.data_source("liver/manual", split=split, data_dir=str(tmp_path / "data"))
            paths += [source[i]["path"].decode() for i in range(len(source))]
    # 2 anonymised + 1 renamed + 1 linked + 1 single + the multi-frame's one new frame.
    assert sorted(paths) == sorted(
        ["anon/0.dcm", "anon/1.dcm", "cd/caf\\xe9.dcm", "linked/series/0.dcm",
         "mf/a_single.dcm", "mf/b_multi.dcm"]
    )  # fmt: skip


def test_records_of_a_manual_dir_that_changed_since_are_refused_not_reused(tmp_path):
    import tensorflow_datasets as tfds

    from liverjax import input_pipeline
    from tfds_liver import liver_dataset_builder

    d = tmp_path / "manual"
    rows = []
    for i in range(10):
        write_ct(d / f"p{i}/0.dcm", image(400 + i), patient=f"P{i}")
        rows.append({"patient_id": f"P{i}", "label": "normal", "path": f"p{i}"})
    write_sheet(d / "labels.csv", rows)
    built = _build(d, tmp_path / "data")
    report = json.loads((built / "curation_report.json").read_text())
    sheet_hash = hashlib.sha256((d / "labels.csv").read_bytes()).hexdigest()
    assert report["label_sheet_sha256"] == {"labels.csv": sheet_hash}
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(200))  # a Finder's, like a dataset
    (d / "notes.txt").write_text("to do")
    _build(d, tmp_path / "data")  # unchanged but for files the build would skip: reused
    dataset = ml_collections.ConfigDict(
        {"name": "liver/manual", "data_dir": str(tmp_path / "data"), "build_if_missing": True,
         "manual_dir": str(d)}
    )  # fmt: skip
    input_pipeline.ensure_built(dataset)
    # The sheet corrected (two patients have a lesion), a series added: refused, with the fix.
    rows[3]["label"] = rows[7]["label"] = "lesion"
    write_sheet(d / "labels.csv", rows)
    write_ct(d / "p9/1.dcm", image(500), patient="P9")
    for build in (
        lambda: _build(d, tmp_path / "data"),
        lambda: input_pipeline.ensure_built(dataset),
    ):
        with pytest.raises(ValueError) as e:
            build()
        assert f"the records in {built} were built from {d} as it was then" in str(e.value)
        assert "labels.csv changed; 1 input files are new (such as p9/1.dcm)" in str(e.value)
        assert "tfds build ... --overwrite" in str(e.value)
    # --overwrite rebuilds them from the folder as it is.
    builder = liver_dataset_builder.Builder(config="manual", data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(d), download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        )
    )
    report = json.loads((built / "curation_report.json").read_text())
    assert report["files_total"] == 13 and report["counts"]["written"] == 11  # and 2 skipped
    input_pipeline.ensure_built(dataset)
    (d / "p0" / "0.dcm").unlink()
    assert curation.stale_records(report, d) == "1 input files are gone (such as p0/0.dcm)"
    del report["label_sheet_sha256"]  # records built before the sheets were hashed
    assert curation.stale_records(report, d) is None


def test_rows_near_a_path_that_exists_say_which(tmp_path):
    d = tmp_path / "export"
    for i in range(6):
        write_ct(d / f"s/{i}.dcm", image(600 + i), patient=f"P{i}")
    rows = [{"patient_id": f"P{i}", "label": i % 2, "path": f"s/{i}.dcm"} for i in range(2, 6)]
    rows.append({"patient_id": "P0", "label": 0, "path": "export/s/0.dcm"})  # the dir's name
    rows.append({"patient_id": "P1", "label": 1, "path": "s/1"})  # no extension
    write_sheet(d / "labels.csv", rows)
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=1)
    why = {r["path"]: r["why"] for r in result.report["label_rows_without_image"]}
    assert why == {
        "export/s/0.dcm": "path does not exist under the manual dir; s/0.dcm exists: paths are "
        "relative to the manual dir, without its own name export/ in front",
        "s/1": "path does not exist under the manual dir; s/1.dcm exists: give the file's whole "
        "name",
    }


def test_a_bad_label_sheet_fails_before_any_file_is_decoded(tmp_path, monkeypatch):
    d = tmp_path / "manual"
    write_ct(d / "a.dcm", image(1), patient="P1")
    (d / "labels.csv").write_text("patient_id,label,path\nP1,yes,a.dcm\n")
    monkeypatch.setattr(curation, "decode_all", lambda *a, **k: pytest.fail("decoded first"))
    with pytest.raises(labels.LabelError, match="yes"):
        curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=1)


def _conflicts(tmp_path, files: dict[str, tuple[int, str, str, str]]):
    """Curates {path: (image seed, DICOM patient, sheet patient, label)}, files sharing one SOP."""
    d = tmp_path / "m"
    sop = generate_uid()
    rows = []
    for path, (seed, patient, sheet_patient, label) in files.items():
        write_ct(d / path, image(seed), patient=patient, sop=sop)
        rows.append({"patient_id": sheet_patient, "label": label, "path": path})
    write_sheet(d / "labels.csv", rows)
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    return {e["path"]: e for e in result.report["files"]}, result


def test_one_sop_uid_under_two_patients_is_a_conflict_not_a_duplicate(tmp_path):
    by_path, result = _conflicts(
        tmp_path, {"a.dcm": (1, "A", "A", "normal"), "b.dcm": (2, "B", "B", "normal")}
    )
    assert by_path["a.dcm"]["status"] == by_path["b.dcm"]["status"] == "conflict"
    assert "two patients" in by_path["b.dcm"]["detail"]
    assert by_path["b.dcm"]["duplicate_of"] == "a.dcm"
    assert "label" not in by_path["a.dcm"] and "patient_id" not in by_path["a.dcm"]
    assert not result.splits["train"]


def test_identical_pixels_under_two_patients_are_a_conflict(tmp_path):
    """A re-export with new UIDs filed under another patient would put one image in two splits;
    flat frames (all one value, e.g. blank) legitimately repeat across patients and are kept."""
    d = tmp_path / "m"
    flat = np.full((SIZE, SIZE), -1000, np.int16)
    files = {"a.dcm": ("A", image(1)), "b.dcm": ("B", image(1)), "c.dcm": ("C", image(2)),
             "flat_a.dcm": ("A", flat), "flat_b.dcm": ("B", flat)}  # fmt: skip
    for path, (patient, pixels) in files.items():
        write_ct(d / path, pixels, patient=patient)  # a new SOP Instance UID each
    write_sheet(
        d / "labels.csv",
        [{"patient_id": pt, "label": "normal", "path": path} for path, (pt, _) in files.items()],
    )
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    by_path = {e["path"]: e for e in result.report["files"]}
    assert {p: e["status"] for p, e in by_path.items() if p != "labels.csv"} == {
        "a.dcm": "conflict", "b.dcm": "conflict", "c.dcm": "written",
        "flat_a.dcm": "written", "flat_b.dcm": "written",
    }  # fmt: skip
    assert "the same pixels are in a.dcm, labelled as patient A" in by_path["b.dcm"]["detail"]
    assert by_path["b.dcm"]["duplicate_of"] == "a.dcm"
    assert "two patients" in by_path["b.dcm"]["detail"]
    assert sorted(e.record.path for e in result.splits["train"]) == [
        "c.dcm", "flat_a.dcm", "flat_b.dcm"
    ]  # fmt: skip


def test_a_conflict_excludes_every_copy_of_the_image(tmp_path):
    # a and b are the same file (b a duplicate of a); c repeats it with another label.
    by_path, result = _conflicts(
        tmp_path,
        {
            "a.dcm": (1, "P", "P", "normal"),
            "b.dcm": (1, "P", "P", "normal"),
            "c.dcm": (1, "P", "P", "lesion"),
        },
    )
    assert [by_path[p]["status"] for p in ("a.dcm", "b.dcm", "c.dcm")] == ["conflict"] * 3
    assert by_path["b.dcm"]["duplicate_of"] == "a.dcm"
    assert by_path["c.dcm"]["duplicate_of"] == "a.dcm"
    assert result.report["counts"]["conflict"] == 3 and not result.splits["train"]


def test_a_label_sheet_too_deep_is_reported_as_one(tmp_path):
    d = tmp_path / "m"
    write_ct(d / "a.dcm", image(1))
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "a.dcm"}])
    write_sheet(d / "site/sub/labels.csv", [{"patient_id": "P1", "label": 0, "path": "a.dcm"}])
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    (deep,) = [e for e in result.report["files"] if e["path"] == "site/sub/labels.csv"]
    assert deep["status"] == "skipped" and "is not read" in deep["detail"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_fifo_in_the_manual_dir_is_reported_not_read(tmp_path, fifo, workers):
    """A FIFO (or device) in the manual dir is skipped as not_a_file: reading it would wait
    for a writer forever, in the worker processes too."""
    d = tmp_path / "m"
    write_ct(d / "a.dcm", image(1))
    fifo(d / "pipe.dcm")
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "a.dcm"}])
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=workers)
    entries = {e["path"]: e for e in result.report["files"]}
    assert entries["a.dcm"]["status"] == "written"
    assert entries["pipe.dcm"]["status"] == "skipped"
    assert entries["pipe.dcm"]["reason"] == "not_a_file"
    assert "FIFO" in entries["pipe.dcm"]["detail"]
    # A FIFO where a label sheet is read: an error naming it, not a build waiting forever.
    fifo(d / "labels.csv", replace=True)
    with pytest.raises(labels.LabelError, match="is not a regular file"):
        curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=workers)


def test_a_prone_slice_is_written_turned_and_reported(tmp_path):
    """Stored upside down and mirrored (head first prone): written as the supine slice it shows,
    its entry saying so, counted in files_turned, and not named as not_axial."""
    d = tmp_path / "m"
    write_ct(d / "supine.dcm", image(1), patient="P1")
    write_ct(d / "prone.dcm", image(2)[::-1, ::-1], patient="P2")
    _set_tag(d / "prone.dcm", "ImageOrientationPatient", [-1, 0, 0, 0, -1, 0])
    write_sheet(
        d / "labels.csv",
        [
            {"patient_id": "P1", "label": 0, "path": "supine.dcm"},
            {"patient_id": "P2", "label": 1, "path": "prone.dcm"},
        ],
    )
    result = curation.curate(d, image_size=SIZE, split=curation.SplitSpec(0, 0, 0), workers=1)
    entries = {e["path"]: e for e in result.report["files"]}
    assert "turned" not in entries["supine.dcm"]
    assert entries["prone.dcm"]["turned"].startswith("stored rotated 180° (Image Orientation")
    assert "not_axial" not in entries["prone.dcm"]
    assert result.report["files_turned"] == 1 and result.report["files_not_axial"] == 0
    assert "1 written input files were stored rotated, flipped or transposed" in curation.summarize(
        result.report
    )
    prone = next(e for e in result.splits["train"] if e.patient_id == "P2")
    np.testing.assert_array_equal(prone.features()["image"][..., 0], image(2))


def test_a_path_that_differs_only_in_case_is_named(tmp_path):
    d = tmp_path / "m"
    write_ct(d / "Series1/IMG1.dcm", image(1))
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "series1"}])
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    (row,) = result.report["label_rows_without_image"]
    assert "Series1 differs only in case" in row["why"]


def test_pixels_beyond_int16_are_counted_in_the_report(tmp_path, caplog):
    d = tmp_path / "m"
    write_ct(d / "hu.dcm", image(1), patient="P1")
    write_ct(d / "steep.dcm", image(2), patient="P2")
    ds = pydicom.dcmread(d / "steep.dcm")
    ds.RescaleSlope = 50  # stored 824..1224 -> 40176..60176 "HU": past int16's 32767
    ds.save_as(d / "steep.dcm")
    write_sheet(
        d / "labels.csv",
        [
            {"patient_id": "P1", "label": 0, "path": "hu.dcm"},
            {"patient_id": "P2", "label": 1, "path": "steep.dcm"},
        ],
    )
    result = curation.curate(d, image_size=SIZE, split=curation.SplitSpec(0, 0, 0), workers=1)
    entries = {e["path"]: e for e in result.report["files"]}
    assert "clipped_pixels" not in entries["hu.dcm"]
    assert entries["steep.dcm"]["clipped_pixels"] == SIZE * SIZE
    assert entries["steep.dcm"]["status"] == "written"
    assert result.report["files_with_clipped_pixels"] == 1
    summary = curation.summarize(result.report)
    assert "1 written input files had pixel values outside int16" in summary
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "steep.dcm" in caplog.text and "clipped" in caplog.text
    steep = next(e for e in result.splits["train"] if e.patient_id == "P2")
    assert steep.features()["image"].max() == 32767


def test_files_that_are_not_ct_are_reported(tmp_path, caplog):
    """MR or a file without Modality decodes, but its values are not HU: each is named, and the
    written ones are counted and warned about (an unlabelled mask series is not)."""
    d = tmp_path / "m"
    for seed, (name, modality) in enumerate(
        (("ct.dcm", "CT"), ("mr.dcm", "MR"), ("none.dcm", None), ("mask.dcm", "OT"))
    ):
        write_ct(d / name, image(seed), patient=name)
        _set_tag(d / name, "Modality", modality)
    write_sheet(
        d / "labels.csv",
        [{"patient_id": n, "label": 0, "path": n} for n in ("ct.dcm", "mr.dcm", "none.dcm")],
    )
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    entries = {e["path"]: e for e in result.report["files"]}
    assert "modality" not in entries["ct.dcm"]
    assert (entries["mr.dcm"]["modality"], entries["none.dcm"]["modality"]) == ("MR", "")
    assert {entries[n]["status"] for n in ("ct.dcm", "mr.dcm", "none.dcm")} == {"written"}
    assert (entries["mask.dcm"]["status"], entries["mask.dcm"]["modality"]) == ("unlabelled", "OT")
    assert result.report["files_not_ct"] == {"": 1, "MR": 1}
    assert "2 written input files are not CT (1 without Modality, 1 MR" in curation.summarize(
        result.report
    )
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "mr.dcm: Modality MR, not CT" in caplog.text
    assert "none.dcm: no Modality, not CT" in caplog.text
    assert "ct.dcm" not in caplog.text and "mask.dcm" not in caplog.text
    assert result.report["input"] == "m"  # the manual dir's name


def test_one_dicom_patient_under_several_sheet_patients_is_reported(tmp_path, caplog):
    """A sheet that gives one person's studies two patient_ids can split that person across
    splits: the report names the DICOM PatientID, the sheet's patients and their splits."""
    d = tmp_path / "m"
    rows = []
    for i in range(12):
        dicom_patient = "SAME" if i < 2 else f"D{i}"
        write_ct(d / f"{i}.dcm", image(100 + i), patient=dicom_patient)
        rows.append({"patient_id": f"S{i}", "label": i % 2, "path": f"{i}.dcm"})
    write_ct(d / "anon.dcm", image(99), patient="")  # no PatientID: nothing to compare
    rows.append({"patient_id": "S0", "label": 0, "path": "anon.dcm"})
    write_sheet(d / "labels.csv", rows)
    spec = curation.SplitSpec(validation=0.0, test=0.5, seed=1)  # seed 1: S0 test, S1 train
    result = curation.curate(d, image_size=8, split=spec, workers=1)
    (several,) = result.report["dicom_patient_ids_labelled_as_several_patients"]
    split_of = {p: name for name, s in result.report["splits"].items() for p in s["patient_ids"]}
    assert (split_of["S0"], split_of["S1"]) == ("test", "train")
    assert several == {
        "dicom_patient_id": "SAME",
        "patient_ids": ["S0", "S1"],
        "splits": ["test", "train"],
    }
    assert (
        "1 DICOM PatientIDs are labelled as several patients (1 of them in more than one split"
        in curation.summarize(result.report)
    )
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "DICOM PatientID 'SAME' is labelled as 2 patients (S0, S1)" in caplog.text


def test_sheet_patients_sharing_a_study_stay_in_one_split(tmp_path, caplog):
    """One series whose slices the sheet gives two patient ids (a typo) under an anonymised,
    empty PatientID: the Study Instance UID still says it is one person, who would otherwise be
    in two splits (seed 1 puts S0 in test and S1 in train)."""
    d = tmp_path / "m"
    rows = []
    study = generate_uid()
    for i in range(12):
        write_ct(d / f"{i}.dcm", image(100 + i), patient="", study=study if i < 2 else None)
        rows.append({"patient_id": f"S{i}", "label": i % 2, "path": f"{i}.dcm"})
    write_sheet(d / "labels.csv", rows)
    spec = curation.SplitSpec(validation=0.0, test=0.5, seed=1)
    result = curation.curate(d, image_size=8, split=spec, workers=1)
    split_of = {p: name for name, s in result.report["splits"].items() for p in s["patient_ids"]}
    assert split_of["S0"] == split_of["S1"]
    (shared,) = result.report["patients_sharing_a_study"]
    assert shared["patient_ids"] == ["S0", "S1"] and shared["study_uids"] == [study]
    assert shared["split"] == split_of["S0"] and shared["series_uids"] == []
    assert result.report["dicom_patient_ids_labelled_as_several_patients"] == []  # empty ids
    assert "2 patients share DICOM studies with another (1 groups" in (
        curation.summarize(result.report)
    )
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert f"patients S0, S1 share DICOM study {study}" in caplog.text


def test_near_identical_images_of_two_patients_are_reported(tmp_path, caplog):
    """A re-exported copy under another patient id (new UIDs, recompressed: its pixels differ a
    little, so it is no conflict) is the same person's image, in two splits here (seed 0). Air
    slices with a strip of table look alike in every patient and are not compared."""
    d = tmp_path / "m"
    rows = []
    for i in range(8):
        write_ct(d / f"{i}.dcm", image(100 + i), patient=f"D{i}")
        rows.append({"patient_id": f"S{i}", "label": i % 2, "path": f"{i}.dcm"})
    noise = np.random.default_rng(0).integers(-3, 4, (SIZE, SIZE))
    write_ct(d / "copy.dcm", (image(103) + noise).astype(np.int16), patient="X")
    rows.append({"patient_id": "S9", "label": 1, "path": "copy.dcm"})
    for i in range(2):
        air = np.full((SIZE, SIZE), -1000, np.int16)
        air[-1] = 50 + i  # the table, the same in every scan from one scanner
        write_ct(d / f"air{i}.dcm", air, patient=f"A{i}")
        rows.append({"patient_id": f"A{i}", "label": 0, "path": f"air{i}.dcm"})
    write_sheet(d / "labels.csv", rows)
    spec = curation.SplitSpec(validation=0.0, test=0.5, seed=0)
    result = curation.curate(d, image_size=SIZE, split=spec, workers=1)
    split_of = {p: name for name, s in result.report["splits"].items() for p in s["patient_ids"]}
    assert split_of["S3"] != split_of["S9"]  # where a copy leaks
    (near,) = result.report["near_identical_images"]
    assert near["patient_ids"] == ["S3", "S9"] and near["slice_pairs"] == 1
    assert near["splits"] == [split_of["S3"], split_of["S9"]]
    (closest,) = near["closest"]
    assert closest["slices"] == ["3.dcm#0", "copy.dcm#0"]
    assert curation.NEAR_IDENTICAL_CORRELATION <= closest["correlation"] < 1
    assert result.report["counts"]["written"] == 11  # reported, not acted on
    assert (
        "1 pairs of patients have near-identical images (1 of them in more than one split, "
        f"e.g. S3 and S9: {split_of['S3']}, {split_of['S9']}): one person under two ids"
    ) in curation.summarize(result.report)
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "patients S3 (" in caplog.text and "have 1 near-identical slice pairs" in caplog.text


def test_near_identical_images_are_compared_in_chunks_and_up_to_a_limit(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(-150, 230, (6, SIZE, SIZE))
    images = np.concatenate([base, base + rng.integers(-2, 3, base.shape)]).astype(np.int16)

    def example(i, patient):
        record = curation.SliceRecord(
            image_id=str(i), image=images[i], patient_id="", study_uid="", series_uid="",
            source="s", path=f"{i}.dcm", pixel_spacing=(1.0, 1.0), slice_position=0.0,
            pixel_hash=str(i),
        )  # fmt: skip
        return curation.Example(record, 0, patient, "s")

    # images i and i + 6 are one image; 6..11 all belong to patient Q (its own copies too)
    splits = {
        "train": [example(i, f"P{i}") for i in range(6)],
        "test": [example(i, "Q") for i in range(6, 12)],
    }
    monkeypatch.setattr(curation, "NEAR_IDENTICAL_MAX_SLICES", 12)
    whole = curation.near_identical_images(splits)
    assert [x["patient_ids"] for x in whole] == [[f"P{i}", "Q"] for i in range(6)]
    assert [x["closest"][0]["slices"] for x in whole] == [
        [f"{i}.dcm#0", f"{i + 6}.dcm#0"] for i in range(6)
    ]
    monkeypatch.setattr(curation, "NEAR_IDENTICAL_CHUNK", 30)  # two rows at a time
    assert curation.near_identical_images(splits) == whole
    vectors, usable = curation.thumbnails(images)
    assert usable.all() and np.allclose(np.linalg.norm(vectors, axis=1), 1)
    monkeypatch.setattr(curation, "NEAR_IDENTICAL_MAX_SLICES", 11)
    assert curation.near_identical_images(splits) == (
        "not checked: 12 slices, over 11 (the check compares every pair)"
    )


def test_rows_that_name_one_file_must_agree_and_their_conflict_excludes_every_copy(tmp_path):
    d = tmp_path / "m"
    write_ct(d / "s/a.dcm", image(1), patient="P1")  # two rows: same label, two patients
    write_ct(d / "s/b.dcm", image(2), patient="P2")  # two rows: lesion and normal
    (d / "s/z.dcm").write_bytes((d / "s/b.dcm").read_bytes())  # copies of b, one row each:
    (d / "s/0.dcm").write_bytes((d / "s/b.dcm").read_bytes())  # kept before b is met, and after
    write_ct(d / "s/c.dcm", image(3), patient="P3")  # two rows that agree
    write_ct(d / "s/e.dcm", image(4), patient="P4")  # two rows, two sources
    write_sheet(
        d / "labels.csv",
        [
            {"patient_id": "P1", "label": "normal", "path": "s/a.dcm"},
            {"patient_id": "P2", "label": "normal", "path": "s/b.dcm"},
            {"patient_id": "P2", "label": "lesion", "path": "s/z.dcm"},
            {"patient_id": "P2", "label": "lesion", "path": "s/0.dcm"},
            {"patient_id": "P3", "label": "normal", "path": "s/c.dcm"},
            {"patient_id": "P4", "label": "normal", "path": "s/e.dcm", "source": "x"},
        ],
    )
    write_sheet(
        d / "s/labels.csv",
        [
            {"patient_id": "P9", "label": "normal", "path": "a.dcm"},
            {"patient_id": "P2", "label": "lesion", "path": "b.dcm"},
            {"patient_id": "P3", "label": "normal", "path": "c.dcm"},
            {"patient_id": "P4", "label": "normal", "path": "e.dcm", "source": "y"},
        ],
    )
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    by_path = {e["path"]: e for e in result.report["files"]}
    status = {p: e["status"] for p, e in by_path.items() if p.endswith(".dcm")}
    assert status == {
        "s/0.dcm": "conflict", "s/a.dcm": "conflict", "s/b.dcm": "conflict",
        "s/z.dcm": "conflict", "s/c.dcm": "written", "s/e.dcm": "conflict",
    }  # fmt: skip
    assert "whose label rows disagree" in by_path["s/0.dcm"]["detail"]
    assert "disagree on patient_id" in by_path["s/a.dcm"]["detail"]
    assert len(by_path["s/a.dcm"]["labelled_by"]) == 2  # the rows that disagree, both named
    assert "P1" in by_path["s/a.dcm"]["detail"] and "P9" in by_path["s/a.dcm"]["detail"]
    assert "disagree on label" in by_path["s/b.dcm"]["detail"]
    assert "same image as a conflicting file" in by_path["s/z.dcm"]["detail"]
    assert "disagree on source" in by_path["s/e.dcm"]["detail"]
    assert by_path["s/c.dcm"]["labelled_by"] == ["labels.csv:6", "s/labels.csv:4"]
    assert [e.record.path for e in result.splits["train"]] == ["s/c.dcm"]


def test_names_in_another_unicode_form_match_and_a_mis_cased_sheet_is_named(tmp_path):
    d = tmp_path / "m"
    decomposed = "Mu\u0308ller"  # how macOS stores "Müller": u + combining diaeresis (NFD)
    write_ct(d / decomposed / "a.dcm", image(1), patient="P1")
    write_ct(d / "site" / "b.dcm", image(2), patient="P2")
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "M\u00fcller"}])
    write_sheet(d / "site" / "Labels.csv", [{"patient_id": "P2", "label": 0, "path": "b.dcm"}])
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    by_path = {e["path"]: e for e in result.report["files"]}
    assert by_path[f"{decomposed}/a.dcm"]["status"] == "written"
    assert not result.report["label_rows_without_image"]
    sheet = by_path["site/Labels.csv"]
    assert sheet["status"] == "skipped" and "must be named labels.csv" in sheet["detail"]


def test_pixel_spacing_is_checked_and_summarised_per_split(tmp_path, caplog):
    """Non-square pixels (stretched by the square resample) and files without a usable spacing
    (absent, or `0\\0` as some exporters write for "unknown") are named and counted; each
    split's spacing after the resample is summarised."""
    d = tmp_path / "m"
    spacings = {"square.dcm": [0.5, 0.5], "wide.dcm": [0.5, 1.0], "none.dcm": None}
    spacings["zero.dcm"] = [0, 0]
    for seed, (name, spacing) in enumerate(spacings.items()):
        write_ct(d / name, image(seed), patient=name)
        _set_tag(d / name, "PixelSpacing", spacing)
    write_sheet(d / "labels.csv", [{"patient_id": n, "label": 0, "path": n} for n in spacings])
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    entries = {e["path"]: e for e in result.report["files"]}
    assert entries["wide.dcm"]["non_square_pixels_mm"] == [0.5, 1.0]
    assert entries["none.dcm"]["no_pixel_spacing"] and entries["zero.dcm"]["no_pixel_spacing"]
    assert not {"non_square_pixels_mm", "no_pixel_spacing"} & set(entries["square.dcm"])
    assert result.report["files_with_non_square_pixels"] == 1
    assert result.report["files_without_pixel_spacing"] == 2
    # 16 pixels resampled to 8: twice the spacing; the coarser axis of wide.dcm counts.
    assert result.report["splits"]["train"]["pixel_spacing_mm"] == {
        "missing": 2,
        "min": 1.0,
        "median": 1.5,
        "max": 2.0,
    }
    summary = curation.summarize(result.report)
    assert "1 written input files have non-square pixels" in summary
    assert "2 written input files have no pixel spacing" in summary
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "wide.dcm: pixels are 0.5 x 1 mm (row x column), not square" in caplog.text
    assert "square.dcm: pixels" not in caplog.text


def test_a_folder_linked_into_the_tree_keeps_its_own_path(tmp_path, caplog):
    """A link that sorts first (`_all -> siteA`, an export's "all series" view) does not rename
    siteA's files: rows written with the real path match, and the link is named as skipped."""
    d = tmp_path / "m"
    write_ct(d / "siteA/p1/0.dcm", image(1), patient="P1")
    (d / "_all").symlink_to(d / "siteA")
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "siteA/p1"}])
    with caplog.at_level("WARNING"):
        files, _ = curation.find_files(d)
    assert files == ["siteA/p1/0.dcm"]
    assert "the folder _all is siteA, read at that path" in caplog.text
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)
    assert result.report["counts"]["written"] == 1
    assert result.report["label_rows_without_image"] == []


def test_a_folder_that_cannot_be_listed_is_an_error_naming_it(tmp_path, monkeypatch):
    """Its files cannot be accounted for. (The tests may run as root, who reads any folder, so
    listing it fails the way it does for a user without permission.)"""
    d = tmp_path / "m"
    write_ct(d / "p1/0.dcm", image(1), patient="P1")
    write_ct(d / "p2/0.dcm", image(2), patient="P2")
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "p1"}])
    scandir = os.scandir

    def no_permission(path="."):
        if os.fspath(path) == os.fspath(d / "p2"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    with pytest.raises(
        PermissionError, match=r"1 folders cannot be listed \(p2: Permission denied\)"
    ):
        curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)


def test_a_file_that_crashes_the_decoder_process_is_decode_failed(tmp_path):
    """A fault in a native decoder kills its worker process: the file is named decode_failed
    and every other file is still decoded. (Run in a fresh interpreter without JAX, whose
    pool forks: the crash is a real SIGSEGV of the worker, on one file.)"""
    d = tmp_path / "m"
    for i in range(6):
        write_ct(d / f"{i}.dcm", image(i), patient=f"P{i}")
    code = textwrap.dedent(
        f"""
        import os, pathlib, signal, sys
        from tfds_liver import curation
        decode = curation.decode_file
        def crashing(manual_dir, rel_path, image_size):
            if rel_path == "3.dcm":
                os.kill(os.getpid(), signal.SIGSEGV)
            return decode(manual_dir, rel_path, image_size)
        curation.decode_file = crashing
        files = [f"{{i}}.dcm" for i in range(6)]
        out = curation.decode_all(pathlib.Path({str(d)!r}), files, 8, workers=2)
        assert "jax" not in sys.modules
        for r in out:
            print(r.path, r.reason, r.detail if r.reason else len(r.slices))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"{i}.dcm" for i in range(6)]
    assert lines[3].startswith("3.dcm decode_failed the decoder process crashed on this file")
    assert all(line.endswith(" None 1") for i, line in enumerate(lines) if i != 3)
    assert "decoding those one at a time" in run.stderr


def test_a_build_that_writes_no_image_fails_and_one_class_splits_are_warned_of(tmp_path, caplog):
    d = tmp_path / "m"
    write_ct(d / "src" / "001.dcm", image(1), patient="P1")
    write_sheet(d / "labels.csv", [{"patient_id": "P1", "label": 0, "path": "SRC/001.dcm"}])
    with pytest.raises(
        ValueError, match=r"no image was written: 1 files \(1 unlabelled\), 1 label"
    ):
        _build(d, tmp_path / "data")
    assert "src/001.dcm differs only in case" in caplog.text  # the row was warned about

    # Six patients all lesion but one: validation and test get one class.
    e = tmp_path / "e"
    rows = []
    for i in range(6):
        write_ct(e / f"p{i}.dcm", image(10 + i), patient=f"P{i}")
        rows.append({"patient_id": f"P{i}", "label": int(i > 0), "path": f"p{i}.dcm"})
    write_sheet(e / "labels.csv", rows)
    result = curation.curate(e, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=1)
    caplog.clear()
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    splits = result.report["splits"]
    assert {n: (v["lesion"], v["normal"]) for n, v in splits.items()} == {
        "train": (3, 1),  # the one normal patient: stratified into train
        "validation": (1, 0),
        "test": (1, 0),
    }
    assert "split 'validation' holds only lesion slices (1 slices, 1 patients, no normal)" in (
        caplog.text
    )
    assert "evaluation cannot choose a threshold on it" in caplog.text
    assert "split 'test' holds only lesion slices" in caplog.text
    assert "split 'train'" not in caplog.text
    assert '"validation_fraction": 0.3' in caplog.text


def test_worker_processes_that_cannot_start_are_said_to_be_the_cause(tmp_path):
    """A build script without a __main__ guard: each worker re-runs it and dies. That is not
    every file crashing the decoder, and the error says what to do."""
    d = tmp_path / "m"
    for i in range(5):
        write_ct(d / f"{i}.dcm", image(i), patient=f"P{i}")
    script = tmp_path / "unguarded_build.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, pathlib
            from tfds_liver import curation
            multiprocessing.set_start_method("spawn", force=True)  # as forkserver: a re-import
            files = [f"{{i}}.dcm" for i in range(5)]
            curation.decode_all(pathlib.Path({str(d)!r}), files, 8, workers=2)
            print("decoded")
            """
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode != 0
    assert "died on each of the first 3 files, one at a time" in run.stderr
    assert '`if __name__ == "__main__":`' in run.stderr


def test_one_sop_uid_with_other_pixels_is_a_conflict_not_a_duplicate(tmp_path):
    # once "duplicate" of the first: a distinct image dropped as a repeat of another
    d = tmp_path / "m"
    uid = generate_uid()
    write_ct(d / "a.dcm", image(1), patient="P1", sop=uid)
    write_ct(d / "b.dcm", image(2), patient="P1", sop=uid)  # other pixels, the same UID
    write_ct(d / "c.dcm", image(1), patient="P1", sop=uid)  # a true copy of a
    for i in range(3, 9):
        write_ct(d / f"{i}.dcm", image(i), patient=f"P{i}")
    rows = [{"patient_id": "P1", "label": 1, "path": f"{n}.dcm"} for n in "abc"]
    rows += [{"patient_id": f"P{i}", "label": i % 2, "path": f"{i}.dcm"} for i in range(3, 9)]
    write_sheet(d / "labels.csv", rows)
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=1)
    by_path = {e["path"]: e for e in result.report["files"]}
    assert by_path["b.dcm"]["status"] == "conflict"
    assert (
        f"SOP Instance UID {uid} is also in a.dcm, with other pixels" in by_path["b.dcm"]["detail"]
    )
    assert by_path["a.dcm"]["status"] == "conflict"  # neither can be told to be the right one
    assert by_path["c.dcm"]["status"] == "conflict"  # and its copy goes with it
    assert all(e.record.image_id != uid for s in result.splits.values() for e in s)


def test_one_person_under_two_spellings_and_two_people_under_one_id_are_reported(tmp_path, caplog):
    d = tmp_path / "m"
    rows = []
    for i in range(10):
        write_ct(d / f"{i}.dcm", image(200 + i), patient=f"D{i}")
        rows.append({"patient_id": f"site-{i:04d}", "label": i % 2, "path": f"{i}.dcm"})
    # the same person as site-0003, spelled another way (and a zero-width space)
    write_ct(d / "again.dcm", image(300), patient="D3")
    rows.append({"patient_id": "SITE_3\u200b", "label": 1, "path": "again.dcm"})
    # another person (another DICOM PatientID) under site-0005's id
    write_ct(d / "other.dcm", image(301), patient="SOMEONE-ELSE")
    rows.append({"patient_id": "site-0005", "label": 1, "path": "other.dcm"})
    write_sheet(d / "labels.csv", rows)
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=1)
    (alike,) = result.report["patient_ids_alike"]
    assert alike["patient_ids"] == ["SITE_3\u200b", "site-0003"]
    (merged,) = result.report["patients_with_several_dicom_patient_ids"]
    assert merged == {"patient_id": "site-0005", "dicom_patient_ids": ["D5", "SOMEONE-ELSE"]}
    summary = curation.summarize(result.report)
    assert "1 groups of patient_ids differ only in case, punctuation or leading zeros" in summary
    assert "1 patients hold images of several DICOM PatientIDs" in summary
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "patient site-0005 holds images of DICOM PatientIDs D5, SOMEONE-ELSE" in caplog.text


@pytest.mark.parametrize(
    "a, b",
    [("LIV-001", "LIV001"), ("AB-7", "ab7"), ("P0021", "P21"), ("010", "10"), ("12-005", "12_5"),
     ("site-0003", "SITE 3\u200b"), ("Ｐ２１", "p21")],
)  # fmt: skip
def test_patient_id_spellings_alike(a, b):
    assert curation._id_form(a) == curation._id_form(b)


@pytest.mark.parametrize(
    "a, b",
    [("P21", "P211"), ("LIV1", "LIV10"), ("A0", "A"), ("100", "10"), ("S1-011", "S11-001"),
     ("1_11", "11_1"), ("1.2.0", "120")],
)  # fmt: skip
def test_patient_ids_not_alike(a, b):
    assert curation._id_form(a) != curation._id_form(b)


def test_ids_that_look_alike_are_logged_as_python_writes_them():
    assert curation._first_ids(["P0023", "P0023\u200b", " P1"]) == "P0023, 'P0023\\u200b', ' P1'"


def test_a_scout_in_a_labelled_series_folder_is_named(tmp_path, caplog):
    d = tmp_path / "m"
    rows = []
    for i in range(8):
        write_ct(d / f"p{i}/ct/1.dcm", image(400 + i), patient=f"P{i}")
        rows.append({"patient_id": f"P{i}", "label": i % 2, "path": f"p{i}/ct"})
    write_ct(d / "p1/ct/scout.dcm", image(500), patient="P1")
    ds = pydicom.dcmread(d / "p1/ct/scout.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(d / "p1/ct/scout.dcm", enforce_file_format=True)
    write_sheet(d / "labels.csv", rows)
    result = curation.curate(d, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=1)
    by_path = {e["path"]: e for e in result.report["files"]}
    assert by_path["p1/ct/scout.dcm"]["not_axial"] == "a localizer (scout) image by its Image Type"
    assert "not_axial" not in by_path["p1/ct/1.dcm"]
    assert result.report["files_not_axial"] == 1
    assert "1 written input files are no axial slice as stored" in curation.summarize(result.report)
    with caplog.at_level("WARNING"):
        curation.log_summary(result.report)
    assert "p1/ct/scout.dcm: a localizer (scout) image" in caplog.text
