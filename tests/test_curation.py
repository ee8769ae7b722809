"""Curation: every file accounted for, duplicates and conflicts found, splits by patient."""

import json
import pathlib

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tfds_liver import curation, labels

SIZE = 16


def write_ct(path: pathlib.Path, pixels: np.ndarray, *, patient="P1", sop=None, frames=1) -> str:
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
    ds.StudyInstanceUID = generate_uid()
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


def test_every_file_is_accounted_for(messy_dir):
    result = curation.curate(
        messy_dir, image_size=8, split=curation.SplitSpec(0.2, 0.2, 0), workers=2
    )
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
    assert [r["path"] for r in report["label_rows_without_image"]] == ["siteB/missing.dcm"]
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


def test_bad_label_sheet_is_an_error_naming_the_row(tmp_path):
    d = tmp_path / "m"
    write_ct(d / "a.dcm", image(1))
    (d / "labels.csv").write_text("patient_id,label,path\nP1,maybe,a.dcm\n")
    with pytest.raises(labels.LabelError, match=r"line 2, column 'label'"):
        curation.curate(d, image_size=8, split=curation.SplitSpec(0, 0, 0), workers=1)


def test_missing_label_sheet_is_a_clear_error(tmp_path):
    write_ct(tmp_path / "a.dcm", image(1))
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        curation.curate(tmp_path, image_size=8, split=curation.SplitSpec(0, 0, 0))
