"""labels.csv validation and writing, and labels from mask series (on real DICOM written here)."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from tfds_liver import labels

HEADER = "patient_id,label,path,sop_instance_uid,sex,exam_date,diagnosis,source,notes\n"
GOOD_ROW = "P1,lesion,p1/s1/1.dcm,,F,2021-03-14,HCC,site_a,\n"


def write_csv(tmp_path: pathlib.Path, text: str | bytes) -> pathlib.Path:
    path = tmp_path / "labels.csv"
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def errors_of(path: pathlib.Path) -> list[tuple[int, str, str]]:
    with pytest.raises(labels.LabelError) as info:
        labels.read_labels(path)
    assert info.value.path == str(path)
    return info.value.errors


# ---------------------------------------------------------------------------------------------
# Reading good files


def test_reads_and_normalises_a_good_file(tmp_path):
    text = (
        "\ufeff Patient_ID , LABEL ,Path,sop_instance_uid,sex,exam_date,x_reader\r\n"
        "\r\n"
        "  P1 , Lesion , ./p1/s1//1.dcm ,,f,20210314,dr a\r\n"
        "P1,0,p1/s2/,,,2021-03-15,\r\n"
        ",,,,,,\r\n"
        "P2,1,,1.2.840.10008.5.1.4.1.1.2,O,,\r\n"
    )
    rows = labels.read_labels(write_csv(tmp_path, text))
    assert rows == [
        labels.LabelRow(3, "P1", 1, "p1/s1/1.dcm", None, "F", "2021-03-14"),
        labels.LabelRow(4, "P1", 0, "p1/s2", None, None, "2021-03-15"),
        labels.LabelRow(6, "P2", 1, None, "1.2.840.10008.5.1.4.1.1.2", "O", None),
    ]
    assert [r.label_name for r in rows] == ["lesion", "normal", "lesion"]


def test_round_trip_through_write_and_read(tmp_path):
    text = (
        HEADER
        + GOOD_ROW
        + 'P2,normal,p2/a b/2.dcm,,M,20200101,,site_b,"has, comma and\nnewline"\n'
        + "P3,lesion,,1.2.3.4,,,metastasis,,\n"
    )
    first = labels.read_labels(write_csv(tmp_path, text))
    out = tmp_path / "out" / "labels.csv"
    labels.write_labels(first, out)
    second = labels.read_labels(out)
    assert second == first  # line numbers too: the note's newline is in line 3 in both files
    assert [r.row for r in second] == [2, 3, 5]
    assert second[1].notes == "has, comma and\nnewline"
    assert second[1].exam_date == "2020-01-01"


def test_write_labels_from_dicts_writes_only_used_columns(tmp_path):
    out = tmp_path / "labels.csv"
    labels.write_labels(
        [
            {"patient_id": "A", "label": 1, "path": "a/1.dcm"},
            {"patient_id": "B", "label": "normal", "path": "b"},
        ],
        out,
    )
    assert (
        out.read_text(encoding="utf-8") == "patient_id,label,path\nA,lesion,a/1.dcm\nB,normal,b\n"
    )
    assert [(r.patient_id, r.label, r.path) for r in labels.read_labels(out)] == [
        ("A", 1, "a/1.dcm"),
        ("B", 0, "b"),
    ]


def test_write_labels_refuses_bad_rows_and_writes_nothing(tmp_path):
    out = tmp_path / "labels.csv"
    with pytest.raises(labels.LabelError) as info:
        labels.write_labels(
            [{"patient_id": "A", "label": "maybe", "path": "a"}, {"patient_id": "B", "lable": 1}],
            out,
        )
    assert (2, "label") in [(r, c) for r, c, _ in info.value.errors]
    assert (3, "lable") in [(r, c) for r, c, _ in info.value.errors]
    assert (3, "label") in [(r, c) for r, c, _ in info.value.errors]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Every kind of error names line and column


ROW_ERRORS = [
    # (row after the header, column, words the message must contain)
    ("P1,lession,a.dcm,,,,,,", "label", "normal or lesion"),
    ("P1,2,a.dcm,,,,,,", "label", "normal or lesion"),
    ("P1,,a.dcm,,,,,,", "label", "empty"),
    (",lesion,a.dcm,,,,,,", "patient_id", "empty"),
    ("P\x011,lesion,a.dcm,,,,,,", "patient_id", "control character"),
    ("P" + "1" * 64 + ",lesion,a.dcm,,,,,,", "patient_id", "at most 64"),
    ("P1,lesion,/data/a.dcm,,,,,,", "path", "relative to the manual dir"),
    ("P1,lesion,C:/data/a.dcm,,,,,,", "path", "relative to the manual dir"),
    ("P1,lesion,p1\\a.dcm,,,,,,", "path", "'/'"),
    ("P1,lesion,p1/../../a.dcm,,,,,,", "path", "inside the manual dir"),
    ("P1,lesion,./,,,,,,", "path", "manual dir itself"),
    ("P1,lesion,,,,,,,", "path", "give a path (or a sop_instance_uid)"),
    ("P1,lesion,a.dcm,1.2.3,,,,,", "sop_instance_uid", "one of them per row"),
    ("P1,lesion,,1.2.abc,,,,,", "sop_instance_uid", "not a DICOM UID"),
    ("P1,lesion,,1..2,,,,,", "sop_instance_uid", "not a DICOM UID"),
    ("P1,lesion,,1.2" + ".3" * 32 + ",,,,,", "sop_instance_uid", "at most 64"),
    ("P1,lesion,,1.23457E+45,,,,,", "sop_instance_uid", "spreadsheet"),
    ("P1,lesion,a.dcm,,X,,,,", "sex", "M, F or O"),
    ("P1,lesion,a.dcm,,,2021-02-30,,,", "exam_date", "not a real date"),
    ("P1,lesion,a.dcm,,,20211301,,,", "exam_date", "not a real date"),
    ("P1,lesion,a.dcm,,,14/03/2021,,,", "exam_date", "YYYY-MM-DD or YYYYMMDD"),
    ("P1,lesion,a.dcm,,,,,", "", "has 8 values but the header has 9 columns"),
    ("P1,lesion,a.dcm,,,,,,,extra", "", "has 10 values but the header has 9 columns"),
]


@pytest.mark.parametrize(("row", "column", "words"), ROW_ERRORS)
def test_each_row_error_names_line_and_column(tmp_path, row, column, words):
    # The bad row is line 4: a good row and a blank line come before it.
    path = write_csv(tmp_path, HEADER + GOOD_ROW + "\n" + row + "\n" + GOOD_ROW)
    errors = errors_of(path)
    assert len(errors) == 1, errors
    line, col, message = errors[0]
    assert (line, col) == (4, column)
    assert words in message
    where = f"line 4, column '{column}'" if column else "line 4:"
    with pytest.raises(labels.LabelError, match=None) as info:
        labels.read_labels(path)
    assert where in str(info.value) and words in str(info.value)


FILE_ERRORS = [
    # (file contents, line, column, words)
    (b"", 1, "", "empty"),
    (b"\xef\xbb\xbf \n\n", 1, "", "empty"),
    (HEADER.encode(), 1, "", "no rows"),
    (b",,,\n \t,\n", 1, "", "only empty lines"),
    (b"P1,lesion,a.dcm\nP2,normal,b.dcm\n", 1, "", "no header"),
    (b"patient_id;label;path\nP1;lesion;a.dcm\n", 1, "", "comma-separated"),
    (b'"patient_id";"label";"path"\n"P1";"lesion";"a.dcm"\n', 1, "", "comma-separated"),
    (b'patient_id;"label";path\nP1;lesion;a.dcm\n', 1, "", "Excel writes ';'"),
    (b'\xef\xbb\xbf\r\n"Patient_ID";Label;Path\r\nP1;1;a.dcm\r\n', 2, "", "comma-separated"),
    (b"patient_id,label,path\nP1,l\xe9sion,a.dcm\n", 2, "", "not UTF-8"),
    (b'patient_id,label,path\nP1,lesion,"a.dcm\nP2,normal,b.dcm\n', 2, "", "quotes"),
    (b"patient_id,,label,path\nP1,,lesion,a.dcm\n", 1, "", "header column 2 has no name"),
    (b"patient_id,label,path,,\nP1,lesion,a.dcm,,x\n", 2, "", "column 5, which has no name"),
]


@pytest.mark.parametrize(("content", "line", "column", "words"), FILE_ERRORS)
def test_file_level_errors(tmp_path, content, line, column, words):
    errors = errors_of(write_csv(tmp_path, content))
    assert [(r, c) for r, c, _ in errors] == [(line, column)], errors
    assert words in errors[0][2]


def test_a_sheet_from_a_pipe_is_read_unless_only_regular_files_are(tmp_path):
    # `labels check /dev/stdin` reads a pipe; the dataset build refuses one (it would wait).
    read, write = os.pipe()
    os.write(write, b"patient_id,label,path\nP1,lesion,a.dcm\n")
    os.close(write)
    try:
        [row] = labels.read_labels(f"/dev/fd/{read}")
        assert (row.patient_id, row.path) == ("P1", "a.dcm")
        with pytest.raises(labels.LabelError, match="is not a regular file"):
            labels.read_labels(f"/dev/fd/{read}", regular_only=True)
    finally:
        os.close(read)


def test_empty_trailing_columns_of_a_spreadsheet_are_accepted(tmp_path):
    # Excel writes ",," for cells once touched; a row may also stop before them.
    text = "patient_id,label,path,,\nP1,lesion,a.dcm,,\nP2,normal,b.dcm\n,,,,\n"
    rows = labels.read_labels(write_csv(tmp_path, text))
    assert [(r.row, r.patient_id, r.label, r.path) for r in rows] == [
        (2, "P1", 1, "a.dcm"),
        (3, "P2", 0, "b.dcm"),
    ]


def test_header_errors_name_the_column(tmp_path):
    errors = errors_of(write_csv(tmp_path, "patient_id,label,label,path\nP1,1,1,a\n"))
    assert [(r, c) for r, c, _ in errors] == [(1, "label")]
    assert "columns 2 and 3" in errors[0][2]
    errors = errors_of(write_csv(tmp_path, "patient_id,path\nP1,a\n"))
    assert [(r, c) for r, c, _ in errors] == [(1, "label")]
    assert "required" in errors[0][2]
    errors = errors_of(write_csv(tmp_path, "patient_id,lable,path\nP1,lesion,a.dcm\n"))
    assert [(r, c) for r, c, _ in errors] == [(1, "lable"), (1, "label")]
    assert "did you mean 'label'" in errors[0][2]
    errors = errors_of(write_csv(tmp_path, "patient_id,label,sex\nP1,1,F\n"))
    assert [(r, c) for r, c, _ in errors] == [(1, "path")]


def test_unknown_column_is_reported_with_the_row_errors(tmp_path):
    text = "patient_id,label,path,diagnoses\nP1,lesion,a.dcm,HCC\nP2,bad,b.dcm,\n"
    errors = errors_of(write_csv(tmp_path, text))
    assert [(r, c) for r, c, _ in errors] == [(1, "diagnoses"), (3, "label")]
    assert "did you mean 'diagnosis'" in errors[0][2]
    assert "'x_'" in errors[0][2]


def test_all_errors_are_collected_and_the_listing_is_capped(tmp_path):
    bad = labels.MAX_LISTED_ERRORS + 10
    text = "patient_id,label,path\n" + "".join(f"P{i},bad,a{i}.dcm\n" for i in range(bad))
    with pytest.raises(labels.LabelError) as info:
        labels.read_labels(write_csv(tmp_path, text))
    assert [r for r, _, _ in info.value.errors] == list(range(2, bad + 2))
    message = str(info.value)
    assert f"{bad} problems" in message
    assert message.count("column 'label'") == labels.MAX_LISTED_ERRORS
    assert "and 10 more" in message


# ---------------------------------------------------------------------------------------------
# Labels from masks, on DICOM series written here

SIZE = 64
SLICES = 6
SPACING_MM = 2.5
LESION_PIXELS = (0, 0, 3, 20, 12, 0)  # per slice; not symmetric, so reversed keys would show
ORGAN_ON = (False, True, True, True, True, False)
STUDY = "1.2.826.0.1.3680043.8.498.1"


def uid(*parts: int) -> str:
    return STUDY + "." + ".".join(str(p) for p in parts)


def write_dicom(
    path: pathlib.Path,
    pixels: np.ndarray,
    *,
    sop_uid: str,
    series_uid: str,
    modality: str = "CT",
    position: tuple[float, float, float] | None = None,
    instance: int | None = None,
    references: tuple[str, ...] = (),
    reference_tag: str = "ReferencedImageSequence",
) -> None:
    ct = modality == "CT"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage if ct else SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = "DICOM-ID"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if ct:
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelSpacing = [0.7, 0.7]
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if instance is not None:
        ds.InstanceNumber = instance
    if references:
        items = []
        for ref in references:
            item = Dataset()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = ref
            items.append(item)
        setattr(ds, reference_tag, items)
    ds.PixelData = pixels.astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def position(z: int) -> tuple[float, float, float]:
    return (-112.0, -112.0, z * SPACING_MM)


@pytest.fixture
def series(tmp_path) -> pathlib.Path:
    """tmp/p1/ct/slice_{i}.dcm: 6 CT slices of noise, body around 40 HU."""
    rng = np.random.default_rng(0)
    for i in range(SLICES):
        hu = rng.normal(40, 20, (SIZE, SIZE))
        write_dicom(
            tmp_path / "p1" / "ct" / f"slice_{i}.dcm",
            (hu + 1024).astype(np.int16),
            sop_uid=uid(1, i),
            series_uid=uid(1),
            position=position(i),
            instance=i + 1,
        )
    return tmp_path


def mask_pixels(count: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.int16)
    mask.flat[np.arange(count) * 7 + 100] = 255  # count scattered pixels
    return mask


def write_mask_series(
    directory: pathlib.Path,
    counts: tuple[int, ...],
    *,
    rule: str,
    series: int,
    size: int = SIZE,
) -> None:
    """One mask slice per image slice, carrying only the keys `rule` needs.

    Keys the rule does not use are left out or scrambled (file names and instance numbers run
    backwards), so that matching by any other rule would give different labels.
    """
    for i, count in enumerate(counts):
        reverse = SLICES - 1 - i
        write_dicom(
            directory / (f"slice_{i}.dcm" if rule == "file_name" else f"mask_{reverse}.dcm"),
            mask_pixels(count, size),
            sop_uid=uid(series, i),
            series_uid=uid(series),
            modality="OT",
            position=position(i) if rule == "position" else None,
            instance=(
                i + 1
                if rule == "instance_number"
                else reverse + 1
                if rule in ("sop_reference", "position")
                else None
            ),
            references=(uid(1, i),) if rule == "sop_reference" else (),
        )


def labels_by_file(result: labels.MaskLabels) -> dict[str, str]:
    return {row.path: row.label_name for row in result.rows}


EXPECTED = {
    "p1/ct/slice_0.dcm": "normal",
    "p1/ct/slice_1.dcm": "normal",
    "p1/ct/slice_2.dcm": "lesion",
    "p1/ct/slice_3.dcm": "lesion",
    "p1/ct/slice_4.dcm": "lesion",
    "p1/ct/slice_5.dcm": "normal",
}


@pytest.mark.parametrize("rule", labels.MATCH_RULES)
def test_from_masks_matches_by_each_rule(series, rule):
    write_mask_series(series / "masks" / "lesion", LESION_PIXELS, rule=rule, series=2)
    result = labels.labels_from_masks(
        series / "p1" / "ct", [series / "masks" / "lesion"], patient_id="P1", relative_to=series
    )
    assert [m.rule for m in result.matches] == [rule]
    assert result.matches[0].images_covered == SLICES
    assert len(result.matches[0].rules_not_used) == labels.MATCH_RULES.index(rule)
    assert labels_by_file(result) == EXPECTED
    assert {row.patient_id for row in result.rows} == {"P1"}
    assert result.left_out == ()
    assert labels.RULE_NAMES[rule] in result.summary()


def test_a_reference_copied_to_the_localizer_falls_back_to_position(series):
    """Mask slices written over the CT header keep its reference to the scout: no reference
    names an image of the series, so the SOP rule does not apply and position matches."""
    directory = series / "masks" / "lesion"
    write_mask_series(directory, LESION_PIXELS, rule="position", series=2)
    for file in directory.iterdir():
        ds = pydicom.dcmread(file)
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid(9, 9)  # the localizer, not in --images
        ds.ReferencedImageSequence = [item]
        ds.save_as(file)
    result = labels.labels_from_masks(
        series / "p1" / "ct", [directory], patient_id="P1", relative_to=series
    )
    assert result.matches[0].rule == "position"
    assert labels_by_file(result) == EXPECTED
    assert "references an image of the series" in str(result.matches[0].rules_not_used)


def test_position_rule_rounds_and_undoes_ct_rescale(series):
    # CT masks: stored 0 decodes to -1024 HU, which must still count as "not set".
    directory = series / "lesion"
    for i, count in enumerate(LESION_PIXELS):
        x, y, z = position(i)
        write_dicom(
            directory / f"m{i}.dcm",
            mask_pixels(count),
            sop_uid=uid(3, i),
            series_uid=uid(3),
            position=(x + 0.001, y - 0.002, z + 0.003),
        )
    result = labels.labels_from_masks(
        series / "p1" / "ct", [directory], patient_id="P1", relative_to=series
    )
    assert result.matches[0].rule == "position"
    assert labels_by_file(result) == EXPECTED


def test_pixel_padding_in_a_mask_header_is_not_a_set_pixel(series):
    # A mask written over a copied CT header: Modality CT, stored values as HU (intercept 0) and
    # PixelPaddingValue 0. The decoder replaces padding by the darkest other value, or by -1024 HU
    # on a slice of padding alone; a mask pixel is set by its stored value, so the background
    # stays background and each slice keeps its own count.
    directory = series / "lesion"
    write_mask_series(directory, LESION_PIXELS, rule="position", series=3)
    for file in directory.iterdir():
        ds = pydicom.dcmread(file)
        ds.Modality, ds.RescaleIntercept, ds.RescaleSlope = "CT", 0, 1
        ds.add_new("PixelPaddingValue", "SS", 0)  # the pixels are signed
        ds.save_as(file)
    result = labels.labels_from_masks(
        series / "p1" / "ct",
        [directory],
        patient_id="P1",
        relative_to=series,
        min_lesion_pixels=4,
    )
    assert labels_by_file(result) == {
        "p1/ct/slice_0.dcm": "normal",
        "p1/ct/slice_1.dcm": "normal",
        "p1/ct/slice_3.dcm": "lesion",
        "p1/ct/slice_4.dcm": "lesion",
        "p1/ct/slice_5.dcm": "normal",
    }
    assert result.left_out == (("p1/ct/slice_2.dcm", "lesion mask below --min-lesion-pixels 4"),)


def test_organ_mask_and_second_lesion_mask(series):
    write_mask_series(series / "lesion_a", LESION_PIXELS, rule="sop_reference", series=2)
    write_mask_series(series / "lesion_b", (0, 0, 0, 0, 0, 9), rule="position", series=3)
    # The organ mask covers slices 1-4 but has slice files only for slices 1-5 (5 empty).
    organ = series / "organ"
    for i in range(1, SLICES):
        write_dicom(
            organ / f"o{i}.dcm",
            mask_pixels(50 if ORGAN_ON[i] else 0),
            sop_uid=uid(4, i),
            series_uid=uid(4),
            modality="OT",
            references=(uid(1, i),),
            reference_tag="SourceImageSequence",
        )
    result = labels.labels_from_masks(
        series / "p1" / "ct",
        [series / "lesion_a", series / "lesion_b"],
        patient_id="P1",
        relative_to=series,
        organ_mask=organ,
    )
    assert [(m.role, m.rule, m.images_covered) for m in result.matches] == [
        ("lesion", "sop_reference", 6),
        ("lesion", "position", 6),
        ("organ", "sop_reference", 5),
    ]
    assert labels_by_file(result) == {
        "p1/ct/slice_1.dcm": "normal",
        "p1/ct/slice_2.dcm": "lesion",
        "p1/ct/slice_3.dcm": "lesion",
        "p1/ct/slice_4.dcm": "lesion",
        "p1/ct/slice_5.dcm": "lesion",  # lesion in mask b; organ mask empty there
    }
    assert result.left_out == (("p1/ct/slice_0.dcm", "no organ-mask slice for the image"),)


def test_image_slices_without_a_lesion_mask_slice_are_left_out(series):
    # A lesion mask exported only for the slices that show a lesion (2, 3, 4).
    write_mask_series(series / "lesion", LESION_PIXELS, rule="sop_reference", series=2)
    for i in (0, 1, 5):
        (series / "lesion" / f"mask_{SLICES - 1 - i}.dcm").unlink()
    images = series / "p1" / "ct"
    result = labels.labels_from_masks(
        images, [series / "lesion"], patient_id="P1", relative_to=series
    )
    assert labels_by_file(result) == {
        "p1/ct/slice_2.dcm": "lesion",
        "p1/ct/slice_3.dcm": "lesion",
        "p1/ct/slice_4.dcm": "lesion",
    }
    assert result.left_out == tuple(
        (f"p1/ct/slice_{i}.dcm", "no lesion-mask slice for the image") for i in (0, 1, 5)
    )
    assert "3 mask slices onto 3 of 6 image slices" in result.summary()
    # Masks that store only the slices with a lesion: the others are normal when asked for.
    result = labels.labels_from_masks(
        images, [series / "lesion"], patient_id="P1", relative_to=series, uncovered_as_normal=True
    )
    assert labels_by_file(result) == EXPECTED and result.left_out == ()
    # Several lesion masks: a slice is normal only where every one of them has a slice.
    write_mask_series(series / "full", (0,) * SLICES, rule="position", series=3)
    result = labels.labels_from_masks(
        images, [series / "full", series / "lesion"], patient_id="P1", relative_to=series
    )
    assert labels_by_file(result) == {
        "p1/ct/slice_2.dcm": "lesion",
        "p1/ct/slice_3.dcm": "lesion",
        "p1/ct/slice_4.dcm": "lesion",
    }
    assert result.left_out_counts() == {"a lesion mask has no slice for the image": 3}


def write_label_map(directory: pathlib.Path) -> None:
    """A LiTS-style label map, one slice per image: 0 background, 1 liver, 2 tumour."""
    for i in range(SLICES):
        stored = np.zeros((SIZE, SIZE), np.int16)
        if ORGAN_ON[i]:
            stored[20:50, 10:40] = 1
        stored[mask_pixels(LESION_PIXELS[i]) > 0] = 2
        write_dicom(
            directory / f"slice_{i}.dcm",
            stored,
            sop_uid=uid(7, i),
            series_uid=uid(7),
            modality="OT",
        )


def test_label_map_needs_the_values_that_count(series):
    write_label_map(series / "map")
    images, label_map = series / "p1" / "ct", series / "map"
    with pytest.raises(labels.MaskError) as info:
        labels.labels_from_masks(images, [label_map], patient_id="P1", relative_to=series)
    message = str(info.value)
    assert "slice_2.dcm" in message and "1, 2" in message and "--lesion-values" in message
    with pytest.raises(labels.MaskError, match="--organ-values"):
        labels.labels_from_masks(
            images,
            [label_map],
            patient_id="P1",
            relative_to=series,
            organ_mask=label_map,
            lesion_values=(2,),
        )
    result = labels.labels_from_masks(
        images,
        [label_map],
        patient_id="P1",
        relative_to=series,
        organ_mask=label_map,
        lesion_values=(2,),
        organ_values=(1, 2),  # tumour is inside the liver
    )
    assert labels_by_file(result) == {
        "p1/ct/slice_1.dcm": "normal",
        "p1/ct/slice_2.dcm": "lesion",
        "p1/ct/slice_3.dcm": "lesion",
        "p1/ct/slice_4.dcm": "lesion",
    }
    assert result.left_out_counts() == {"organ mask empty on the image": 2}
    summary = result.summary()
    assert "stored values 1, 2; counting 2 as set" in summary
    assert "stored values 1, 2; counting 1, 2 as set" in summary
    with pytest.raises(ValueError, match="background"):
        labels.labels_from_masks(
            images, [label_map], patient_id="P1", relative_to=series, lesion_values=(0, 2)
        )


def test_mask_slices_of_different_values_need_the_values_too(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="file_name", series=2)
    other = series / "lesion" / "slice_3.dcm"
    ds = pydicom.dcmread(other)
    ds.PixelData = (mask_pixels(LESION_PIXELS[3]) // 255 * 3).astype("<i2").tobytes()
    ds.save_as(other)
    with pytest.raises(labels.MaskError) as info:
        labels.labels_from_masks(
            series / "p1" / "ct", [series / "lesion"], patient_id="P1", relative_to=series
        )
    message = str(info.value)
    assert "different stored values: 255 in " in message and "slice_2.dcm; 3 in " in message
    assert "slice_3.dcm" in message
    result = labels.labels_from_masks(
        series / "p1" / "ct",
        [series / "lesion"],
        patient_id="P1",
        relative_to=series,
        lesion_values=(255,),
    )
    assert labels_by_file(result)["p1/ct/slice_3.dcm"] == "normal"  # only 255 counts


def test_min_lesion_pixels_leaves_small_lesions_out(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="instance_number", series=2)
    (series / "lesion" / "README.txt").write_text("liver lesion masks")  # ignored and said so
    (series / "p1" / "ct" / "notes.txt").write_text("not an image")  # left out and said so
    result = labels.labels_from_masks(
        series / "p1" / "ct",
        [series / "lesion"],
        patient_id="P1",
        relative_to=series / "p1",
        min_lesion_pixels=4,
    )
    assert labels_by_file(result) == {
        "ct/slice_0.dcm": "normal",
        "ct/slice_1.dcm": "normal",
        "ct/slice_3.dcm": "lesion",
        "ct/slice_4.dcm": "lesion",
        "ct/slice_5.dcm": "normal",
    }
    assert result.left_out_counts() == {
        "lesion mask below --min-lesion-pixels 4": 1,
        "image not decoded (not_dicom)": 1,
    }
    assert result.matches[0].ignored_files == ("README.txt",)
    assert "2 images left out" in result.summary()
    assert "ignored 1 files that are not DICOM: README.txt" in result.summary()
    with pytest.raises(ValueError, match="at least 1"):
        labels.labels_from_masks(
            series / "p1" / "ct",
            [series / "lesion"],
            patient_id="P1",
            relative_to=series,
            min_lesion_pixels=0,
        )


def test_multi_frame_images_are_labelled_per_file(tmp_path):
    frames = np.full((3, SIZE, SIZE), 1064, np.int16)
    write_dicom(tmp_path / "ct" / "a.dcm", frames, sop_uid=uid(5, 1), series_uid=uid(5))
    empty = np.zeros((3, SIZE, SIZE), np.int16)
    write_dicom(
        tmp_path / "m" / "a.dcm", empty, sop_uid=uid(6, 1), series_uid=uid(6), modality="OT"
    )
    result = labels.labels_from_masks(
        tmp_path / "ct", [tmp_path / "m"], patient_id="P1", relative_to=tmp_path
    )
    assert result.image_slices == 3
    assert [(m.rule, m.images_covered) for m in result.matches] == [("file_name", 3)]
    assert labels_by_file(result) == {"ct/a.dcm": "normal"}
    empty[1] = mask_pixels(5)  # a lesion on the middle frame only: one file cannot say that
    write_dicom(
        tmp_path / "m" / "a.dcm", empty, sop_uid=uid(6, 1), series_uid=uid(6), modality="OT"
    )
    with pytest.raises(labels.MaskError, match="multi-frame"):
        labels.labels_from_masks(
            tmp_path / "ct", [tmp_path / "m"], patient_id="P1", relative_to=tmp_path
        )


def test_mismatched_geometry_is_an_error(series):
    write_mask_series(series / "lesion", (0,) * SLICES, rule="position", series=2, size=32)
    with pytest.raises(labels.MaskError) as info:
        labels.labels_from_masks(
            series / "p1" / "ct", [series / "lesion"], patient_id="P1", relative_to=series
        )
    assert "32 rows x 32 columns" in str(info.value)
    assert f"{SIZE} rows x {SIZE} columns" in str(info.value)


def test_segmentation_object_as_mask_is_an_error(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="file_name", series=2)
    seg = series / "lesion" / "slice_0.dcm"
    ds = pydicom.dcmread(seg)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.save_as(seg)
    with pytest.raises(labels.MaskError, match="export the mask as an image series") as info:
        labels.labels_from_masks(
            series / "p1" / "ct", [series / "lesion"], patient_id="P1", relative_to=series
        )
    assert "slice_0.dcm" in str(info.value) and "not_image" in str(info.value)


def test_colour_mask_is_an_error(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="file_name", series=2)
    rgb = series / "lesion" / "slice_3.dcm"
    ds = pydicom.dcmread(rgb)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((SIZE, SIZE, 3), np.uint8).tobytes()
    ds.save_as(rgb)
    with pytest.raises(labels.MaskError, match="colour") as info:
        labels.labels_from_masks(
            series / "p1" / "ct", [series / "lesion"], patient_id="P1", relative_to=series
        )
    assert "slice_3.dcm" in str(info.value) and "grayscale" in str(info.value)


def test_unmatched_mask_slice_is_an_error(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="sop_reference", series=2)
    write_dicom(
        series / "lesion" / "stray.dcm",
        mask_pixels(1),
        sop_uid=uid(2, 99),
        series_uid=uid(2),
        modality="OT",
        references=(uid(9, 9),),
    )
    with pytest.raises(labels.MaskError) as info:
        labels.labels_from_masks(
            series / "p1" / "ct", [series / "lesion"], patient_id="P1", relative_to=series
        )
    message = str(info.value)
    assert "1 of 7 mask slices match no single image slice" in message
    assert "stray.dcm" in message and uid(9, 9) in message


def test_images_outside_relative_to_is_an_error(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="file_name", series=2)
    with pytest.raises(labels.MaskError, match="relative-to"):
        labels.labels_from_masks(
            series / "p1" / "ct",
            [series / "lesion"],
            patient_id="P1",
            relative_to=series / "masks",
        )


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tfds_liver.labels", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_from_masks_then_check(series):
    write_mask_series(series / "lesion", LESION_PIXELS, rule="position", series=2)
    out = series / "labels.csv"
    done = run_cli(
        "from-masks",
        "--images",
        series / "p1" / "ct",
        "--lesion-masks",
        series / "lesion",
        "--patient-id",
        "P1",
        "--min-lesion-pixels",
        "5",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert "matched by ImagePositionPatient" in done.stdout
    assert "5 images labelled: 3 normal, 2 lesion" in done.stdout
    assert "1 lesion mask below --min-lesion-pixels 5" in done.stdout
    rows = labels.read_labels(out)
    assert [(r.path, r.label) for r in rows] == [
        ("p1/ct/slice_0.dcm", 0),
        ("p1/ct/slice_1.dcm", 0),
        ("p1/ct/slice_3.dcm", 1),
        ("p1/ct/slice_4.dcm", 1),
        ("p1/ct/slice_5.dcm", 0),
    ]
    done = run_cli("check", out)
    assert done.returncode == 0, done.stderr
    assert "5 rows, 1 patients; 3 normal, 2 lesion" in done.stdout
    assert "do not exist" not in done.stdout
    elsewhere = series.parent / "sheet.csv"  # a sheet kept away from the images
    shutil.copy(out, elsewhere)
    for flag in ("--manual-dir", "--manual_dir"):  # the second as `tfds build` spells it
        done = run_cli("check", elsewhere, flag, series)
        assert done.returncode == 0 and "do not exist" not in done.stdout, done.stdout


def test_cli_refuses_an_existing_out_unless_append_or_overwrite(series):
    shutil.copytree(series / "p1", series / "p2")
    write_mask_series(series / "lesion", LESION_PIXELS, rule="position", series=2)
    out = series / "labels.csv"

    def from_masks(patient: str, *flags: str) -> subprocess.CompletedProcess:
        return run_cli(
            "from-masks",
            "--images",
            series / patient.lower() / "ct",
            "--lesion-masks",
            series / "lesion",
            "--lesion-values",
            "255",
            "--patient-id",
            patient,
            "--out",
            out,
            *flags,
        )

    def rows() -> list[tuple[str, str]]:
        return [(r.patient_id, r.path) for r in labels.read_labels(out)]

    assert from_masks("P1").returncode == 0
    first = out.read_bytes()
    done = from_masks("P2")
    assert done.returncode == 2
    assert "exists" in done.stderr and "--append" in done.stderr and "--overwrite" in done.stderr
    assert out.read_bytes() == first
    done = from_masks("P2", "--append")
    assert done.returncode == 0, done.stderr
    assert rows() == [("P1", f"p1/ct/slice_{i}.dcm") for i in range(SLICES)] + [
        ("P2", f"p2/ct/slice_{i}.dcm") for i in range(SLICES)
    ]
    both = out.read_bytes()
    done = from_masks("P2", "--append")  # the same images again
    assert done.returncode == 2
    assert "p2/ct/slice_0.dcm" in done.stderr and "twice" in done.stderr
    assert out.read_bytes() == both
    assert from_masks("P2", "--append", "--overwrite").returncode == 2  # one or the other
    done = from_masks("P2", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert rows() == [("P2", f"p2/ct/slice_{i}.dcm") for i in range(SLICES)]
    # Columns of the user's own are not written back: --append would drop them.
    out.write_text("patient_id,label,path,x_note\nP9,normal,p9/a.dcm,checked\n")
    done = from_masks("P1", "--append")
    assert done.returncode == 2 and "x_note" in done.stderr
    assert "checked" in out.read_text()


def test_cli_check_reports_errors_with_exit_code_2(tmp_path):
    path = write_csv(tmp_path, "patient_id,lable,path\nP1,lesion,a.dcm\n")
    done = run_cli("check", path)
    assert done.returncode == 2
    assert "line 1, column 'lable'" in done.stderr
    done = run_cli(
        "from-masks",
        "--images",
        tmp_path / "none",
        "--lesion-masks",
        tmp_path,
        "--patient-id",
        "P1",
        "--out",
        tmp_path / "x.csv",
    )
    assert done.returncode == 2
    assert "is not a folder" in done.stderr
    assert not (tmp_path / "x.csv").exists()


def test_check_warns_of_rows_that_name_the_same_files_and_disagree(tmp_path):
    text = (
        "patient_id,label,path,sop_instance_uid,source\n"
        "P1,normal,series1,,\n"  # a folder row
        "P2,normal,series1/a.dcm,,\n"  # a file in it, another patient
        "P1,lesion,series1/b.dcm,,\n"  # another label
        "P1,normal,series1/c.dcm,,siteA\n"  # a source where the folder row has none: agrees
        "P1,normal,series10/d.dcm,,\n"  # not in series1
        "P3,normal,,1.2.3,x\n"
        "P3,normal,,1.2.3,y\n"  # one SOP UID, two sources
    )
    path = write_csv(tmp_path, text)
    clashes = labels.disagreeing_rows(labels.read_labels(path))
    assert clashes == [
        "lines 2 and 3 (series1, series1/a.dcm): patient_id",
        "lines 2 and 4 (series1, series1/b.dcm): label",
        "lines 7 and 8 (1.2.3, 1.2.3): source",
    ]
    done = run_cli("check", path)
    assert done.returncode == 0
    assert "warning: 3 pairs of rows name the same files but disagree" in done.stdout


def test_check_finds_paths_as_the_build_does(tmp_path):
    """A name typed in NFC for a folder stored in NFD (macOS) exists, as the build matches it;
    a wrong-case name does not (the build would leave it unmatched on any file system)."""
    folder = tmp_path / "Mu\u0308ller"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"x")
    text = "patient_id,label,path\nP1,normal,M\u00fcller\nP2,normal,m\u00fcller/a.dcm\n"
    done = run_cli("check", write_csv(tmp_path, text))
    assert done.returncode == 0, done.stderr
    assert "warning: 1 of 2 paths do not exist" in done.stdout and "line 3" in done.stdout
    # A site sheet names paths relative to its own folder, as the build reads it.
    (tmp_path / "siteB" / "p1").mkdir(parents=True)
    (tmp_path / "siteB" / "p1" / "a.dcm").write_bytes(b"x")
    site = tmp_path / "siteB" / "labels.csv"
    site.write_text("patient_id,label,path\nP1,normal,p1/a.dcm\nP2,normal,siteB/p1/a.dcm\n")
    done = run_cli("check", site, "--manual-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: 1 of 2 paths do not exist under {tmp_path} (relative to siteB/, the sheet's "
        "folder), e.g. line 3: siteB/p1/a.dcm"
    ) in done.stdout
    done = run_cli("check", tmp_path / "missing.csv")
    assert done.returncode == 2 and done.stderr.startswith("error: ")
