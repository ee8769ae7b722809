"""The synthetic CT phantom: anatomy, labels, difficulty, DICOM encoding, determinism and CLI."""

import csv
import hashlib
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from sklearn.metrics import roc_auc_score

from tfds_liver import phantom

COHORT = dict(patients=24, seed=0, size=128, slices=16)  # small grid: the labels do not need 512
WRITTEN = dict(patients=3, seed=7, size=128, slices=8)


@pytest.fixture(scope="module")
def cohort() -> list[phantom.Patient]:
    flags = phantom.lesion_patients(
        COHORT["patients"], COHORT["seed"], phantom.DEFAULT_LESION_PATIENT_FRACTION
    )
    return [
        phantom.make_patient(
            COHORT["seed"], i, size=COHORT["size"], slices=COHORT["slices"], has_lesions=bool(flag)
        )
        for i, flag in enumerate(flags)
    ]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("phantom") / "out"
    csv_path = phantom.write_phantom(out, write_masks=True, **WRITTEN)
    assert csv_path == out / "labels.csv"
    return out


def _expected(index: int) -> phantom.Patient:
    flags = phantom.lesion_patients(
        WRITTEN["patients"], WRITTEN["seed"], phantom.DEFAULT_LESION_PATIENT_FRACTION
    )
    return phantom.make_patient(
        WRITTEN["seed"],
        index,
        size=WRITTEN["size"],
        slices=WRITTEN["slices"],
        has_lesions=bool(flags[index]),
    )


def _rows(csv_path: pathlib.Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_patient_arrays_are_consistent(cohort):
    for p in cohort:
        slices, size = COHORT["slices"], COHORT["size"]
        assert p.hu.dtype == np.int16 and p.hu.shape == (slices, size, size)
        assert p.lesion_mask.shape == p.liver_mask.shape == p.hu.shape
        np.testing.assert_array_equal(p.labels, p.lesion_mask.any(axis=(1, 2)).astype(np.int64))
        assert not (p.lesion_mask & ~p.liver_mask).any(), "lesions must lie inside the liver"
        assert p.liver_mask.any(axis=(1, 2)).all(), "the scan stays within the liver"
        assert p.hu.min() >= phantom.HU_MIN and p.hu.max() <= phantom.HU_MAX
        assert len(p.meta.sop_uids) == slices and len(p.meta.z_mm) == slices
        np.testing.assert_allclose(-np.diff(p.meta.z_mm), p.meta.slice_thickness_mm, atol=1e-3)
        for lesion in p.lesions:  # each lesion spans adjacent slices and labels them
            assert lesion.slices == tuple(range(lesion.slices[0], lesion.slices[-1] + 1))
            assert p.labels[list(lesion.slices)].all()


def test_tissue_values_are_realistic(cohort):
    corner = np.concatenate([p.hu[:, :4, :4].ravel() for p in cohort])
    assert abs(np.median(corner) - phantom.HU_AIR) < 30
    for p in cohort[:6]:
        liver = p.hu[p.liver_mask & ~p.lesion_mask]
        assert phantom.LIVER_HU[0] - 6 < np.median(liver) < phantom.LIVER_HU[1] + 6
        assert (p.hu > 150).sum() > 0, "bone (spine) must be present"
        assert ((p.hu > -130) & (p.hu < -70)).mean() > 0.05, "fat must be present"
        for lesion in p.lesions:  # a lesion differs from the liver in the drawn direction
            col, row = (np.array(lesion.center_mm[:2]) - p.meta.origin_mm) / p.meta.pixel_spacing_mm
            reach = lesion.diameter_mm / 2 / p.meta.pixel_spacing_mm + 1
            rows, cols = np.ogrid[: COHORT["size"], : COHORT["size"]]
            near = (abs(rows - row) <= reach) & (abs(cols - col) <= reach)  # not its neighbours
            mask = np.zeros_like(p.lesion_mask)
            mask[list(lesion.slices)] = p.lesion_mask[list(lesion.slices)] & near
            if mask.sum() < 40:  # small ones at this grid are within the noise: subtle on purpose
                continue
            delta = p.hu[mask].mean() - np.median(liver)
            assert np.sign(delta) == np.sign(lesion.contrast_hu), (lesion, delta)


def test_lesion_patients_and_label_balance(cohort):
    flags = phantom.lesion_patients(
        COHORT["patients"], COHORT["seed"], phantom.DEFAULT_LESION_PATIENT_FRACTION
    )
    assert flags.sum() == round(COHORT["patients"] * phantom.DEFAULT_LESION_PATIENT_FRACTION)
    np.testing.assert_array_equal([p.labels.any() for p in cohort], flags)
    assert all(not p.lesions for p, flag in zip(cohort, flags, strict=True) if not flag)
    labels = np.concatenate([p.labels for p in cohort])
    assert 0.30 <= labels.mean() <= 0.60, labels.mean()
    lesions = [lesion for p in cohort for lesion in p.lesions]
    hyper = np.mean([lesion.contrast_hu > 0 for lesion in lesions])
    assert 0.35 <= hyper <= 0.65, hyper
    diameters = [lesion.diameter_mm for lesion in lesions]
    assert min(diameters) < 8 and max(diameters) > 20
    assert np.median([len(lesion.slices) for lesion in lesions]) >= 2
    assert phantom.lesion_patients(2, 0, 0.5).sum() == 1  # both kinds for a stratified split
    assert phantom.lesion_patients(5, 0, 0.0).sum() == 0


def test_image_size_does_not_change_the_patient(cohort):
    for index in range(3):
        small, large = (
            cohort[index],
            phantom.make_patient(
                COHORT["seed"],
                index,
                size=256,
                slices=COHORT["slices"],
                has_lesions=bool(cohort[index].lesions),
            ),
        )
        assert {x.center_mm for x in small.lesions} <= {x.center_mm for x in large.lesions}
        assert np.mean(small.labels == large.labels) >= 0.9
        coarse = large.liver_mask.reshape(COHORT["slices"], 128, 2, 128, 2).mean(axis=(2, 4))
        assert np.mean((coarse >= 0.5) != small.liver_mask) < 0.01  # the same liver


def test_mean_hu_does_not_separate_the_classes(cohort):
    labels = np.concatenate([p.labels for p in cohort])
    slice_mean = np.concatenate([p.hu.mean(axis=(1, 2)) for p in cohort])
    body_mean = np.concatenate([[s[s > -500].mean() for s in p.hu] for p in cohort])
    for feature in (slice_mean, body_mean):
        auc = roc_auc_score(labels, feature)
        assert max(auc, 1 - auc) < 0.75, auc


def test_lesions_are_visible_after_4x_downsampling():
    """At 512 -> 128 most lesion slices pass the Rose criterion (SNR >= 5); some are subtle."""
    snr = []
    for index in range(4):
        p = phantom.make_patient(11, index, size=512, slices=8)
        shape = (p.hu.shape[0], 128, 4, 128, 4)
        hu = p.hu.astype(np.float32).reshape(shape).mean(axis=(2, 4))
        lesion = p.lesion_mask.reshape(shape).mean(axis=(2, 4))
        liver = p.liver_mask.reshape(shape).mean(axis=(2, 4))
        for s in np.flatnonzero(p.labels):
            inside, background = lesion[s] >= 0.5, (liver[s] == 1) & (lesion[s] == 0)
            contrast = (
                abs(hu[s][inside].mean() - np.median(hu[s][background])) if inside.any() else 0
            )
            snr.append(contrast / hu[s][background].std() * np.sqrt(inside.sum()))
    snr = np.array(snr)
    assert len(snr) >= 10
    assert np.mean(snr >= 5) >= 0.5, np.round(snr, 1)
    assert np.mean(snr < 5) >= 0.05, np.round(snr, 1)


def test_dicom_files_hold_the_generated_hu(written):
    for index in range(WRITTEN["patients"]):
        p = _expected(index)
        files = sorted((written / p.meta.patient_id / phantom.IMAGE_SERIES_DIR).glob("*.dcm"))
        assert [f.name for f in files] == [f"{i + 1:03d}.dcm" for i in range(WRITTEN["slices"])]
        for s, path in enumerate(files):
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert path.read_bytes()[128:132] == b"DICM"
            assert (ds.Modality, ds.PatientID, ds.PatientSex) == (
                "CT",
                p.meta.patient_id,
                p.meta.sex,
            )
            assert (ds.BitsAllocated, ds.PixelRepresentation, ds.RescaleType) == (16, 0, "HU")
            assert (ds.RescaleIntercept, ds.RescaleSlope) == (-1024, 1)
            assert (ds.WindowCenter, ds.WindowWidth) == (40, 400)
            assert ds.InstanceNumber == s + 1 and ds.SOPInstanceUID == p.meta.sop_uids[s]
            assert float(ds.ImagePositionPatient[2]) == pytest.approx(p.meta.z_mm[s])
            assert float(ds.SliceLocation) == pytest.approx(p.meta.z_mm[s])
            assert [float(v) for v in ds.PixelSpacing] == [p.meta.pixel_spacing_mm] * 2
            assert float(ds.SliceThickness) == p.meta.slice_thickness_mm
            hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
            np.testing.assert_array_equal(hu, p.hu[s])


def test_uids_are_valid_unique_and_grouped(written):
    sops, series_of, study_of = [], {}, {}
    for path in written.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for uid in (
            ds.SOPInstanceUID,
            ds.SeriesInstanceUID,
            ds.StudyInstanceUID,
            ds.FrameOfReferenceUID,
        ):
            assert UID(uid).is_valid, (path, uid)
        sops.append(ds.SOPInstanceUID)
        series_of.setdefault(path.parent, set()).add(ds.SeriesInstanceUID)
        study_of.setdefault(ds.PatientID, set()).add(ds.StudyInstanceUID)
    assert len(sops) == len(set(sops)) == WRITTEN["patients"] * WRITTEN["slices"] * 3
    assert all(len(uids) == 1 for uids in series_of.values())  # one series per folder
    assert len({next(iter(uids)) for uids in series_of.values()}) == len(series_of)
    assert all(len(uids) == 1 for uids in study_of.values()) and len(study_of) == 3


def test_labels_csv_lists_exactly_the_image_files(written):
    rows = _rows(written / "labels.csv")
    with open(written / "labels.csv", encoding="utf-8") as f:
        assert f.readline().strip() == "patient_id,label,path,sex,exam_date,source"
    images = {
        p.relative_to(written).as_posix()
        for p in written.rglob("*.dcm")
        if p.parent.name == phantom.IMAGE_SERIES_DIR
    }
    assert [r["path"] for r in rows] == sorted(images)  # masks are not listed
    for index in range(WRITTEN["patients"]):
        p = _expected(index)
        mine = [r for r in rows if r["patient_id"] == p.meta.patient_id]
        assert [r["label"] for r in mine] == [("normal", "lesion")[v] for v in p.labels]
        ds = pydicom.dcmread(written / mine[0]["path"], stop_before_pixels=True)
        assert mine[0]["exam_date"].replace("-", "") == ds.StudyDate
        assert {r["sex"] for r in mine} == {ds.PatientSex}
        assert {r["source"] for r in mine} == {phantom.SOURCE}
    assert {r["label"] for r in rows} == {"normal", "lesion"}


def test_mask_series_reference_their_images(written):
    for index in range(WRITTEN["patients"]):
        p = _expected(index)
        for kind, expected in (
            (phantom.LESION_MASK_DIR, p.lesion_mask),
            (phantom.LIVER_MASK_DIR, p.liver_mask),
        ):
            files = sorted((written / p.meta.patient_id / kind).glob("*.dcm"))
            assert len(files) == WRITTEN["slices"]
            for s, path in enumerate(files):
                ds = pydicom.dcmread(path)
                assert ds.SOPClassUID == SecondaryCaptureImageStorage
                ref = ds.ReferencedImageSequence[0]
                assert ref.ReferencedSOPInstanceUID == p.meta.sop_uids[s]
                assert ref.ReferencedSOPClassUID == CTImageStorage
                assert float(ds.ImagePositionPatient[2]) == pytest.approx(p.meta.z_mm[s])
                assert set(np.unique(ds.pixel_array)) <= {0, phantom.MASK_ON}
                np.testing.assert_array_equal(ds.pixel_array == phantom.MASK_ON, expected[s])


def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    args = dict(patients=2, size=64, slices=4, write_masks=True)
    phantom.write_phantom(tmp_path / "a", seed=5, **args)
    phantom.write_phantom(tmp_path / "b", seed=5, **args)
    phantom.write_phantom(tmp_path / "c", seed=6, **args)
    first, second, other = (_digest(tmp_path / n) for n in "abc")
    assert first == second and len(first) == 2 * 4 * 3 + 1
    assert not set(first.values()) & set(other.values())
    a = pydicom.dcmread(next((tmp_path / "a").rglob("*.dcm")), stop_before_pixels=True)
    c = pydicom.dcmread(next((tmp_path / "c").rglob("*.dcm")), stop_before_pixels=True)
    assert a.StudyInstanceUID != c.StudyInstanceUID and a.PatientID != c.PatientID


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="patients=0"):
        phantom.write_phantom(tmp_path / "x", patients=0, seed=0)
    with pytest.raises(ValueError, match="size=8"):
        phantom.write_phantom(tmp_path / "x", patients=1, seed=0, size=8)
    with pytest.raises(ValueError, match="lesion_patient_fraction=1.5"):
        phantom.write_phantom(tmp_path / "x", patients=1, seed=0, lesion_patient_fraction=1.5)
    with pytest.raises(ValueError, match=r"lesion_contrast_hu=\(40, 20\)"):
        phantom.write_phantom(tmp_path / "x", patients=1, seed=0, lesion_contrast_hu=(40, 20))
    assert not (tmp_path / "x").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        phantom.write_phantom(tmp_path / "busy", patients=1, seed=0, size=64, slices=2)


def test_cli_writes_a_set_and_prints_one_line(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--patients", "2", "--seed", "3", "--size", "64", "--slices", "4"]
    cmd = [sys.executable, "-m", "tfds_liver.phantom", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 2 patients") and "8 slices" in lines[0]
    assert len(_rows(out / "labels.csv")) == 8
    assert not list(out.rglob("masks_*")), "masks are written only on request"


def test_cli_options_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["--out", str(out), "--patients", "1", "--seed", "4", "--size", "64", "--slices", "3"]
    phantom.main([*base, "--masks", "--lesion-contrast", "40", "50", "--lesion-fraction", "1"])
    assert "wrote 1 patients (1 with lesions)" in capsys.readouterr().out
    assert len(list(out.glob("*/masks_lesion/*.dcm"))) == 3
    with pytest.raises(SystemExit) as exit_info:  # the folder is no longer empty
        phantom.main(base)
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # errors name the flags given, not write_phantom's keywords
        phantom.main([*base[:2], "--patients", "1", "--seed", "0", "--lesion-fraction", "1.5"])
    assert "--lesion-fraction 1.5: use a value in [0, 1]" in capsys.readouterr().err
    named = tmp_path / "seed=3"  # ... and leave paths alone
    (named / "x").mkdir(parents=True)
    with pytest.raises(SystemExit):
        phantom.main(["--out", str(named), "--patients", "1", "--seed", "3"])
    assert f"{named}" in capsys.readouterr().err


def test_files_decode_through_the_project_decoder(written):
    dicom = pytest.importorskip("liverjax.dicom", reason="liverjax.dicom not written yet")
    p = _expected(0)
    series = written / p.meta.patient_id
    for s in range(WRITTEN["slices"]):
        (image,) = dicom.read_dicom(series / phantom.IMAGE_SERIES_DIR / f"{s + 1:03d}.dcm")
        np.testing.assert_array_equal(image.image, p.hu[s].astype(np.float32))
        assert (image.modality, image.sop_uid, image.patient_id) == (
            "CT",
            p.meta.sop_uids[s],
            p.meta.patient_id,
        )
        assert image.slice_position == pytest.approx(p.meta.z_mm[s])
        assert image.pixel_spacing == pytest.approx((p.meta.pixel_spacing_mm,) * 2)
        (mask,) = dicom.read_dicom(series / phantom.LESION_MASK_DIR / f"{s + 1:03d}.dcm")
        assert mask.referenced_sop_uids == (p.meta.sop_uids[s],)
        np.testing.assert_array_equal(mask.image > 0, p.lesion_mask[s])


def test_labels_csv_passes_the_project_validator(written):
    labels = pytest.importorskip("tfds_liver.labels", reason="tfds_liver.labels not written yet")
    rows = labels.read_labels(written / "labels.csv")
    assert len(rows) == WRITTEN["patients"] * WRITTEN["slices"]
    expected = np.concatenate([_expected(i).labels for i in range(WRITTEN["patients"])])
    np.testing.assert_array_equal([r.label for r in rows], expected)
