"""The DICOM decoder: pydicom's whole test corpus, synthesised edge cases, resample and to_int16."""

import fnmatch
import io
import json
import logging
import pathlib
import pickle
import struct
import tracemalloc
import zlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pydicom
import pytest
from pydicom.data import data_manager, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from liverjax import dicom

BT601 = np.array([0.299, 0.587, 0.114])  # the luma the decoder promises, written out here

# ------------------------------------------------------------------ pydicom's own test corpus

CORPUS_ROOT = pathlib.Path(pydicom.data.DATA_ROOT) / "test_files"
_download_attempts: list[tuple] = []


def _no_download(*args, **kwargs):
    _download_attempts.append(args)
    raise RuntimeError("the corpus test must not download anything")


# get_testdata_files() may fetch pydicom-data files from the network; forbid (and record) that.
with mock.patch.object(data_manager, "data_path_with_download", side_effect=_no_download):
    _LISTED = get_testdata_files()
CORPUS = sorted(
    pathlib.Path(f).relative_to(CORPUS_ROOT).as_posix()
    for f in _LISTED
    if pathlib.Path(f).is_file() and pathlib.Path(f).is_relative_to(CORPUS_ROOT)
)

# Every corpus file read_dicom refuses, and why (first matching pattern wins). Any file not listed
# here must decode to pydicom's values.
EXPECTED_REASONS = [
    ("MR_truncated.dcm", "truncated"),  # pixel data 8130 of 8192 bytes
    ("rtplan_truncated.dcm", "truncated"),  # ends inside the Beam Sequence
    ("rtstruct.dcm", "not_image"),
    ("rtplan.dcm", "not_image"),
    ("test-SR.dcm", "not_image"),
    ("reportsi*.dcm", "not_image"),  # Basic Text SR
    ("waveform_ecg.dcm", "not_image"),
    ("ExplVR_*NoMeta.dcm", "not_image"),  # RT Ion Plans without file meta
    ("liver*_1frame.dcm", "not_image"),  # DICOM SEG: pydicom decodes it, refused by design
    ("dicomdirtests/*DICOMDIR*", "not_image"),
    ("dicomdirtests/TINY_ALPHA/PT*", "no_pixels"),  # CT Image Storage without Pixel Data
    ("priv_SQ.dcm", "no_pixels"),
    ("UN_sequence.dcm", "no_pixels"),
    ("empty_charset_LEI.dcm", "no_pixels"),
    ("no_meta_group_length.dcm", "no_pixels"),
    ("JPEG-lossy.dcm", "unsupported"),  # 12-bit JPEG Extended: neither gdcm nor Pillow reads it
    ("JPGExtended.dcm", "unsupported"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "decode_failed"),  # corrupt codestream
    ("badVR.dcm", "decode_failed"),  # NumberOfFrames "1A"
    ("meta_missing_tsyntax.dcm", "decode_failed"),  # Pixel Data without Rows, Columns, Bits
    ("nested_priv_SQ.dcm", "decode_failed"),
    ("no_meta.dcm", "not_dicom"),  # a stray byte before the dataset: pydicom reads 1 bogus element
    ("*README*", "not_dicom"),
    ("*.json", "not_dicom"),
    ("*.dump", "not_dicom"),
    ("*.gz", "not_dicom"),
    ("*.icc", "not_dicom"),
]
# Files pydicom decodes that read_dicom refuses on purpose (segmentations are label maps).
DELIBERATE_REFUSALS = {"liver_1frame.dcm", "liver_expb_1frame.dcm"}


def _expected_reason(rel: str) -> str | None:
    return next(
        (reason for pattern, reason in EXPECTED_REASONS if fnmatch.fnmatch(rel, pattern)), None
    )


def _pydicom_reference(path: pathlib.Path) -> tuple[pydicom.Dataset, list[np.ndarray]] | None:
    """pydicom's own decode, rescaled, MONOCHROME1 reflected, colour as BT.601 luma (float64)."""
    try:
        ds = pydicom.dcmread(path, force=True)
        pixels = ds.pixel_array
    except Exception:
        return None
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[np.newaxis]
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        return ds, list(apply_color_lut(frames, ds).astype(np.float64) @ BT601)
    if ds.SamplesPerPixel == 3:  # pixel_array has already converted YBR to RGB
        return ds, list(frames.astype(np.float64) @ BT601)
    # pydicom rescales only when both tags are present; the corpus never has just one of them.
    assert ("RescaleSlope" in ds) == ("RescaleIntercept" in ds), path
    padding = frames == ds.PixelPaddingValue if "PixelPaddingValue" in ds else None
    if photometric == "MONOCHROME1":
        stored = frames.astype(np.int64)
        frames = -1 - stored if ds.PixelRepresentation else (2**ds.BitsStored - 1) - stored
    out = np.asarray(apply_modality_lut(frames, ds), dtype=np.float64)
    assert "PixelPaddingRangeLimit" not in ds  # no corpus file has one
    for image, pad in zip(out, padding, strict=True) if padding is not None else ():
        if pad.any():  # padding takes the darkest other value of its frame (never all of it here)
            image[pad] = image[~pad].min()
    return ds, list(out)


def test_corpus_is_the_local_one_and_nothing_was_downloaded():
    assert _download_attempts == []
    assert len(CORPUS) > 150
    assert {"CT_small.dcm", "rtstruct.dcm", "dicomdirtests/DICOMDIR"} <= set(CORPUS)


@pytest.mark.parametrize("rel", CORPUS)
def test_corpus_file(rel):
    path = CORPUS_ROOT / rel
    reference = _pydicom_reference(path)
    reason = _expected_reason(rel)
    if reason is not None:
        with pytest.raises(dicom.DicomError) as info:
            dicom.read_dicom(path)
        assert (info.value.reason, info.value.path) == (reason, str(path)), str(info.value)
        assert reference is None or rel in DELIBERATE_REFUSALS, "pydicom decodes it, so must we"
        return
    assert reference is not None, f"pydicom cannot decode {rel}: list its reason in the test"
    ds, expected = reference
    slices = dicom.read_dicom(path)
    assert len(slices) == len(expected)
    multi = len(expected) > 1
    for index, (s, want) in enumerate(zip(slices, expected, strict=True)):
        assert s.image.dtype == np.float32 and s.image.shape == (ds.Rows, ds.Columns)
        if s.color_converted:  # luma: float32 arithmetic, so equal to rounding
            np.testing.assert_allclose(s.image, want, rtol=1e-6, atol=1e-4)
        else:  # grayscale: exactly pydicom's float64 result rounded once to float32
            np.testing.assert_array_equal(s.image, want.astype(np.float32))
        assert s.color_converted == (
            ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
        )
        assert s.photometric == ds.PhotometricInterpretation
        assert s.sop_uid == ds.SOPInstanceUID
        assert s.frame == (index if multi else None)
        assert s.image_id == (f"{ds.SOPInstanceUID}/{index}" if multi else ds.SOPInstanceUID)
        assert s.transfer_syntax == ds.file_meta.TransferSyntaxUID


def test_corpus_ct_metadata():
    (s,) = dicom.read_dicom(CORPUS_ROOT / "CT_small.dcm")
    ds = pydicom.dcmread(CORPUS_ROOT / "CT_small.dcm")
    assert (s.modality, s.patient_id, s.study_uid, s.series_uid) == (
        "CT",
        ds.PatientID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
    )
    assert (s.rescale_slope, s.rescale_intercept) == (1.0, -1024.0)
    assert s.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert s.image_position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert s.slice_position == float(ds.ImagePositionPatient[2])
    assert s.instance_number == int(ds.InstanceNumber)
    assert s.image.min() == ds.pixel_array.min() - 1024 < -800  # air, in HU


def test_rt_dose_frames_follow_the_grid_frame_offsets():
    ds = pydicom.dcmread(CORPUS_ROOT / "rtdose.dcm")
    slices = dicom.read_dicom(CORPUS_ROOT / "rtdose.dcm")
    z0 = float(ds.ImagePositionPatient[2])
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert offsets[0] == 0 and len(set(offsets)) == len(offsets) == len(slices)
    assert [s.slice_position for s in slices] == [z0 + o for o in offsets]
    assert [s.frame for s in slices] == list(range(len(slices)))


def test_monochrome1_corpus_file_is_inverted_with_its_window():
    path = CORPUS_ROOT / "dicomdirtests/77654033/CR1/6154"
    ds = pydicom.dcmread(path)
    (s,) = dicom.read_dicom(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    raw = ds.pixel_array.astype(np.float64) * slope + intercept
    # brighter stays brighter: the stored minimum (white in MONOCHROME1) is now the maximum
    assert np.argmax(s.image) == np.argmin(raw)
    if "WindowCenter" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        assert s.window_center == pytest.approx(slope * 4095 + 2 * intercept - center)


# ------------------------------------------------------------------ synthesised files


def make_ds(pixels: np.ndarray, **attrs) -> Dataset:
    """A CT dataset holding `pixels` as stored values; attrs override (None deletes) elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P-001", "CT"
    ds.InstanceNumber = 7
    ds.PixelSpacing = [0.75, 0.8]
    ds.ImagePositionPatient = [-100, -120, 42.5]
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def to_bytes(
    ds: Dataset, *, meta: bool = True, implicit: bool = False, little: bool = True
) -> bytes:
    """The dataset as a file: Part 10 with preamble and meta, or (meta=False) the bare dataset."""
    buffer = io.BytesIO()
    if meta:
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.preamble = None  # a dataset read from a file would otherwise keep its preamble + DICM
        ds.save_as(buffer, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    data = buffer.getvalue()
    assert (data[128:132] == b"DICM") == meta
    return data


STORED = np.array([[-2000, 0], [1, 3001]], dtype=np.int16)


def reason_of(source, **kwargs) -> str:
    with pytest.raises(dicom.DicomError) as info:
        dicom.read_dicom(source, **kwargs)
    assert isinstance(info.value, ValueError)  # one error type, a ValueError for callers
    assert str(info.value) == f"{info.value.path}: {info.value.reason}: {info.value.detail}"
    return info.value.reason


def test_ct_gives_hounsfield_units_and_metadata(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(to_bytes(make_ds(STORED)))
    (s,) = dicom.read_dicom(path)
    np.testing.assert_array_equal(s.image, [[-3024, -1024], [-1023, 1977]])
    assert s.image.dtype == np.float32
    assert (s.pixel_spacing, s.image_position, s.slice_position) == (
        (0.75, 0.8),
        (-100, -120, 42.5),
        42.5,
    )
    assert (s.window_center, s.window_width, s.instance_number) == (40.0, 400.0, 7)
    assert (s.patient_id, s.modality, s.photometric, s.color_converted) == (
        "P-001",
        "CT",
        "MONOCHROME2",
        False,
    )
    assert s.frame is None and s.image_id == s.sop_uid
    assert s.transfer_syntax == ExplicitVRLittleEndian


def test_path_bytes_and_file_objects_decode_alike(tmp_path):
    data = to_bytes(make_ds(STORED))
    path = tmp_path / "ct.dcm"
    path.write_bytes(data)

    class Unseekable(io.RawIOBase):
        def __init__(self):
            self._inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self._inner.readinto(b)

    sources = [
        path,
        str(path),
        data,
        bytearray(data),
        io.BytesIO(data),
        open(path, "rb"),
        Unseekable(),
    ]
    images = [dicom.read_dicom(src)[0].image for src in sources]
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


def test_fractional_slope_is_exact():
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, RescaleSlope=0.5, RescaleIntercept=-1024.25)))
    np.testing.assert_array_equal(s.image, [[-2024.25, -1024.25], [-1023.75, 476.25]])
    assert (s.rescale_slope, s.rescale_intercept) == (0.5, -1024.25)
    # a slope float32 cannot hold: the float64 result is rounded once, so it matches exactly
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, RescaleSlope="0.1", RescaleIntercept=-3)))
    np.testing.assert_array_equal(s.image, (STORED * 0.1 - 3).astype(np.float32))


def test_missing_rescale_tags_default_to_one_and_zero():
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, RescaleSlope=None, RescaleIntercept=None)))
    np.testing.assert_array_equal(s.image, STORED)
    assert (s.rescale_slope, s.rescale_intercept) == (1.0, 0.0)
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, RescaleSlope=None)))  # intercept alone
    np.testing.assert_array_equal(s.image, STORED - 1024)
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, RescaleIntercept=None, RescaleSlope=2)))
    np.testing.assert_array_equal(s.image, STORED * 2)


def test_bad_rescale_is_a_decode_error_naming_the_tag():
    bad = to_bytes(make_ds(STORED, RescaleSlope="9.99")).replace(b"9.99", b"abc ")
    with pytest.raises(dicom.DicomError, match="RescaleSlope 'abc'") as info:
        dicom.read_dicom(bad, name="x.dcm")
    assert (info.value.reason, info.value.path) == ("decode_failed", "x.dcm")
    assert reason_of(to_bytes(make_ds(STORED, RescaleSlope=0))) == "decode_failed"


def test_modality_lut_sequence_is_applied_and_reflected_for_monochrome1():
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]  # 4 entries, first stored value 0, 16-bit entries
    lut.add_new("LUTData", "US", [10, 20, 30, 40])
    stored = np.array([[0, 1], [2, 7]], dtype=np.uint16)  # 7 is past the end: the last entry
    ds = make_ds(stored, RescaleSlope=None, RescaleIntercept=None, Modality="CR")
    ds.ModalityLUTSequence = Sequence([lut])
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[10, 20], [30, 40]])
    ds.PhotometricInterpretation = "MONOCHROME1"
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[40, 30], [20, 10]])  # reflected in the LUT's range
    # empty Rescale Slope / Intercept elements beside the sequence are no rescale: the LUT applies
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.add_new("RescaleSlope", "DS", None)
    ds.add_new("RescaleIntercept", "DS", None)
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[10, 20], [30, 40]])


def test_unsigned_bits_stored_masks_the_high_bits(caplog):
    raw = np.array([[0xF123, 0x0FFF], [0, 0x8001]], dtype=np.uint16)  # high nibble = overlay junk
    ds = make_ds(
        raw, BitsStored=12, HighBit=11, Modality="MR", RescaleSlope=None, RescaleIntercept=None
    )
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[0x123, 0xFFF], [0, 1]])
    # 12 bits of 16 is most CT: nothing is logged per file for it
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_signed_pixels_and_signed_bits_stored():
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, RescaleIntercept=0)))
    np.testing.assert_array_equal(s.image, STORED)
    twelve_bit = np.array([[0x0FFB, 0x0800], [0x07FF, 0x0000]], dtype=np.uint16)  # -5, -2048, 2047
    ds = make_ds(twelve_bit, BitsStored=12, HighBit=11, PixelRepresentation=1, RescaleIntercept=0)
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[-5, -2048], [2047, 0]])


def test_monochrome1_is_reflected_in_its_bits_stored_range():
    raw = np.array([[0, 1000], [4095, 2048]], dtype=np.uint16)
    ds = make_ds(
        raw,
        BitsStored=12,
        HighBit=11,
        PhotometricInterpretation="MONOCHROME1",
        Modality="CR",
        RescaleSlope=2,
        RescaleIntercept=10,
        WindowCenter=2010,
    )
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, 2 * (4095 - raw.astype(np.int64)) + 10)
    assert s.photometric == "MONOCHROME1"
    # the window moves with the pixels: value 2010 (stored 1000) is now 2*3095+10 = 6200
    assert s.window_center == 2 * 4095 + 2 * 10 - 2010 == 2 * 3095 + 10
    signed = make_ds(
        STORED, PhotometricInterpretation="MONOCHROME1", Modality="DX", RescaleIntercept=0
    )
    (s,) = dicom.read_dicom(to_bytes(signed))
    np.testing.assert_array_equal(s.image, -1 - STORED.astype(np.int64))


@pytest.mark.parametrize(
    "attrs", [{}, {"Modality": "OT", "RescaleType": "HU"}], ids=["ct", "rescale_type_hu"]
)
def test_monochrome1_ct_stays_in_hounsfield_units(attrs):
    # MONOCHROME1 only says the lowest value is shown white: the rescale gives HU all the same.
    raw = np.array([[0, 1024], [1064, 4095]], dtype=np.uint16)
    ds = make_ds(raw, BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1", **attrs)
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[-1024, 0], [40, 3071]])
    np.testing.assert_array_equal(s.image, apply_modality_lut(ds.pixel_array, ds))
    assert s.photometric == "MONOCHROME1"
    assert s.window_center == 40  # in HU, as written


@pytest.mark.parametrize("implicit,little", [(True, True), (False, True), (False, False)])
def test_encodings_with_and_without_file_meta(implicit, little):
    stored = STORED if little else STORED.astype(">i2")
    for meta in (True, False):
        ds = make_ds(STORED)
        ds.PixelData = stored.tobytes()
        data = to_bytes(ds, meta=meta, implicit=implicit, little=little)
        (s,) = dicom.read_dicom(data)
        np.testing.assert_array_equal(s.image, STORED - 1024)
        expected_ts = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
        assert s.transfer_syntax == expected_ts


@pytest.mark.parametrize(
    "name,guesses",
    [
        ("JPEG2000.dcm", {"1.2.840.10008.1.2.4.91"}),
        ("MR_small_jp2klossless.dcm", {"1.2.840.10008.1.2.4.91"}),
        ("MR_small_RLE.dcm", {"1.2.840.10008.1.2.5"}),
        ("MR_small_jpeg_ls_lossless.dcm", {"1.2.840.10008.1.2.4.80"}),
        ("JPEGLSNearLossless_16.dcm", {"1.2.840.10008.1.2.4.81"}),
        ("SC_rgb_jpeg_gdcm.dcm", {"1.2.840.10008.1.2.4.57"}),  # lossless: process 14, any predictor
        ("SC_rgb_jpeg_dcmtk.dcm", {"1.2.840.10008.1.2.4.50"}),
    ],
)
def test_compressed_without_file_meta_guesses_the_codec(name, guesses):
    path = CORPUS_ROOT / name
    with_meta = dicom.read_dicom(path)
    ds = pydicom.dcmread(path)
    stripped = to_bytes(ds, meta=False, implicit=False, little=True)
    without_meta = dicom.read_dicom(stripped)
    assert {s.transfer_syntax for s in without_meta} == guesses
    for a, b in zip(with_meta, without_meta, strict=True):
        np.testing.assert_array_equal(a.image, b.image)


def test_compressed_frame_of_the_wrong_size_is_rejected_before_decoding():
    ds = pydicom.dcmread(CORPUS_ROOT / "JPEG2000.dcm")
    assert (ds.Rows, ds.Columns) == (1024, 256)
    ds.Rows = 512
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # still JPEG 2000
    with pytest.raises(dicom.DicomError, match="compressed frame is 1024x256") as info:
        dicom.read_dicom(buffer.getvalue())
    assert info.value.reason == "decode_failed"


def test_multi_frame_gives_one_slice_per_frame_with_ids():
    frames = np.stack([STORED + i for i in range(3)])
    ds = make_ds(frames, NumberOfFrames=3)
    slices = dicom.read_dicom(to_bytes(ds))
    assert [s.frame for s in slices] == [0, 1, 2]
    assert [s.image_id for s in slices] == [f"{ds.SOPInstanceUID}/{i}" for i in range(3)]
    assert len({s.image_id for s in slices}) == 3
    for i, s in enumerate(slices):
        np.testing.assert_array_equal(s.image, STORED + i - 1024)


def test_enhanced_multi_frame_reads_functional_groups():
    frames = np.stack([STORED, STORED])
    ds = make_ds(
        frames,
        NumberOfFrames=2,
        SOPClassUID=EnhancedCTImageStorage,
        RescaleSlope=None,
        RescaleIntercept=None,
        PixelSpacing=None,
        ImagePositionPatient=None,
        WindowCenter=None,
        WindowWidth=None,
    )

    def group(**macros) -> Dataset:
        item = Dataset()
        for macro, values in macros.items():
            inner = Dataset()
            for keyword, value in values.items():
                setattr(inner, keyword, value)
            setattr(item, macro, Sequence([inner]))
        return item

    source = Dataset()
    source.ReferencedSOPInstanceUID = "1.2.3.4"
    shared = group(
        PixelMeasuresSequence=dict(PixelSpacing=[0.5, 0.6]),
        FrameVOILUTSequence=dict(WindowCenter=50, WindowWidth=350),
    )
    per_frame = [
        group(
            PixelValueTransformationSequence=dict(RescaleSlope=1, RescaleIntercept=-1024),
            PlanePositionSequence=dict(ImagePositionPatient=[0, 0, 10]),
        ),
        group(
            PixelValueTransformationSequence=dict(RescaleSlope=2, RescaleIntercept=-1000),
            PlanePositionSequence=dict(ImagePositionPatient=[0, 0, 12.5]),
        ),
    ]
    derivation = Dataset()
    derivation.SourceImageSequence = Sequence([source])
    per_frame[1].DerivationImageSequence = Sequence([derivation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    first, second = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(first.image, STORED - 1024)
    np.testing.assert_array_equal(second.image, STORED * 2 - 1000)
    assert (first.slice_position, second.slice_position) == (10.0, 12.5)
    assert first.pixel_spacing == second.pixel_spacing == (0.5, 0.6)
    assert (second.rescale_slope, second.rescale_intercept) == (2.0, -1000.0)
    assert (first.window_center, second.window_width) == (50.0, 350.0)
    assert (first.referenced_sop_uids, second.referenced_sop_uids) == ((), ("1.2.3.4",))
    # A converter's top-level copy (not conformant) does not override the per-frame values.
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    first, second = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(first.image, STORED - 1024)
    np.testing.assert_array_equal(second.image, STORED * 2 - 1000)
    assert (second.rescale_slope, second.rescale_intercept) == (2.0, -1000.0)
    # Nor does it override a shared value.
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PixelValueTransformationSequence
    rescale = group(PixelValueTransformationSequence=dict(RescaleSlope=3, RescaleIntercept=-1024))
    ds.SharedFunctionalGroupsSequence[
        0
    ].PixelValueTransformationSequence = rescale.PixelValueTransformationSequence
    for s in dicom.read_dicom(to_bytes(ds)):
        np.testing.assert_array_equal(s.image, STORED * 3 - 1024)
        assert (s.rescale_slope, s.rescale_intercept) == (3.0, -1024.0)


def rgb_ds(pixels: np.ndarray, photometric: str = "RGB") -> Dataset:
    ds = make_ds(
        pixels[..., 0].astype(np.uint16),
        SOPClassUID=SecondaryCaptureImageStorage,
        Modality="OT",
        RescaleSlope=None,
        RescaleIntercept=None,
    )
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def test_rgb_becomes_bt601_luma():
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]])
    (s,) = dicom.read_dicom(to_bytes(rgb_ds(pixels)))
    np.testing.assert_allclose(s.image, [[76.245, 149.685], [29.07, 18.15]], rtol=1e-6)
    assert (s.color_converted, s.photometric) == (True, "RGB")
    assert (s.rescale_slope, s.rescale_intercept) == (1.0, 0.0)


def test_ybr_is_converted_to_rgb_before_luma():
    # YCbCr with neutral chroma is grey: R = G = B = Y, so the luma is Y itself.
    ybr = np.array([[[100, 128, 128], [200, 128, 128]], [[0, 128, 128], [255, 128, 128]]])
    (s,) = dicom.read_dicom(to_bytes(rgb_ds(ybr, "YBR_FULL")))
    np.testing.assert_allclose(s.image, ybr[..., 0], atol=1.0)
    # strongly red chroma must come out as red's luma, not as the Y value alone
    (s,) = dicom.read_dicom(to_bytes(rgb_ds(np.array([[[76, 85, 255]]]), "YBR_FULL")))
    assert s.image[0, 0] == pytest.approx(0.299 * 255, abs=2.0)


def test_colour_spaces_without_an_rgb_conversion_are_unsupported():
    pixels = np.array([[[100, 128, 128], [200, 128, 128]]])
    assert reason_of(to_bytes(rgb_ds(pixels, "YBR_ICT"))) == "unsupported"  # only inside J2K
    assert reason_of(to_bytes(rgb_ds(pixels, "HSV"))) == "unsupported"  # retired


def test_not_images_and_images_without_pixels():
    no_pixels = make_ds(STORED, PixelData=None)
    assert reason_of(to_bytes(no_pixels)) == "no_pixels"
    seg = make_ds(STORED, SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4", Modality="SEG")
    assert reason_of(to_bytes(seg)) == "not_image"
    sr = make_ds(STORED, PixelData=None, SOPClassUID="1.2.840.10008.5.1.4.1.1.88.33")
    assert reason_of(to_bytes(sr)) == "not_image"


def test_empty_random_directory_and_fifo_inputs(tmp_path, fifo):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert reason_of(empty) == "empty"
    assert reason_of(b"") == "empty"
    assert reason_of(io.BytesIO(b"")) == "empty"
    rng = np.random.default_rng(0)
    for n in (1, 3, 131, 132, 1000, 100_000):
        assert reason_of(rng.bytes(n)) == "not_dicom", n
    with pytest.raises(dicom.DicomError, match="does not start with a DICOM element"):
        dicom.read_dicom(b"patient_id,label\nP1,lesion\n")  # rejected before any parsing
    assert reason_of(tmp_path) == "not_a_file"
    with pytest.raises(dicom.DicomError, match=r"pipe.dcm: not_a_file: is a FIFO \(named pipe\)"):
        dicom.read_dicom(fifo(tmp_path / "pipe.dcm"))  # without blocking on it
    (tmp_path / "to_pipe.dcm").symlink_to("pipe.dcm")
    assert reason_of(tmp_path / "to_pipe.dcm") == "not_a_file"  # a link: what it points at
    (tmp_path / "broken.dcm").symlink_to("nowhere.dcm")
    assert reason_of(tmp_path / "broken.dcm") == "decode_failed"  # cannot open: named as such


def test_truncated_ct_at_every_part_of_the_file():
    data = to_bytes(make_ds(np.arange(64 * 64, dtype=np.int16).reshape(64, 64)))
    pixel_start = len(data) - 64 * 64 * 2
    header_end = data.index(b"\xe0\x7f\x10\x00")  # where the Pixel Data element starts
    for cut in (len(data) - 1, pixel_start + 100, pixel_start - 4, header_end + 3, 400, 200, 140):
        assert reason_of(data[:cut], name=f"cut{cut}") == "truncated", cut
    # compressed: the file ends inside the encapsulated (undefined-length) pixel data
    j2k = (CORPUS_ROOT / "JPEG2000.dcm").read_bytes()
    assert reason_of(j2k[:-8]) == reason_of(j2k[:1657]) == "truncated"
    no_meta = to_bytes(pydicom.dcmread(CORPUS_ROOT / "JPEG2000.dcm"), meta=False)
    assert reason_of(no_meta[:-8]) == "truncated"  # pydicom warns, then returns nothing
    # a cut exactly between two elements before the pixel data leaves a valid, pixel-less file
    assert reason_of(j2k[:1654]) == "no_pixels"


def test_corrupted_files_raise_only_dicom_errors():
    """Flipped bytes anywhere in real files: a decoded image or a DicomError, nothing else."""
    rng = np.random.default_rng(1)
    sources = [
        to_bytes(make_ds(STORED)),
        (CORPUS_ROOT / "MR_small_RLE.dcm").read_bytes(),
        (CORPUS_ROOT / "JPEG2000.dcm").read_bytes(),
    ]
    outcomes = set()
    for data in sources:
        for _ in range(40):
            corrupt = bytearray(data)
            for pos in rng.integers(0, len(data), size=rng.integers(1, 8)):
                corrupt[pos] = rng.integers(0, 256)
            try:
                slices = dicom.read_dicom(bytes(corrupt))
            except dicom.DicomError as e:
                assert e.reason in dicom.REASONS
                outcomes.add(e.reason)
            else:
                assert all(s.image.dtype == np.float32 for s in slices)
                outcomes.add("decoded")
    assert "decoded" in outcomes and len(outcomes) >= 2


def test_errors_chain_their_cause_and_pickle():
    with pytest.raises(dicom.DicomError) as info:
        dicom.read_dicom(CORPUS_ROOT / "badVR.dcm")
    assert info.value.__cause__ is not None
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.path, copy.reason, copy.detail, str(copy)) == (
        info.value.path,
        info.value.reason,
        info.value.detail,
        str(info.value),
    )
    with pytest.raises(ValueError, match="not one of"):
        dicom.DicomError("x", "oops", "detail")


def test_metadata_is_json_ready():
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED)))
    meta = s.metadata()
    assert json.loads(json.dumps(meta)) == meta
    fields = {f.name for f in s.__dataclass_fields__.values()} - {"image", "stored"}
    assert set(meta) == fields | {"image_id"}
    assert meta["pixel_spacing"] == [0.75, 0.8] and meta["image_id"] == s.sop_uid


def test_supported_transfer_syntaxes_cover_the_required_codecs():
    table = dicom.supported_transfer_syntaxes()
    for name in (
        "Explicit VR Little Endian",
        "Explicit VR Big Endian",
        "Implicit VR Little Endian",
        "JPEG Baseline (Process 1)",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "JPEG-LS Lossless Image Compression",
        "JPEG 2000 Image Compression",
        "RLE Lossless",
    ):
        assert table.get(name), name
    assert table["Explicit VR Little Endian"] == "pydicom"
    assert "gdcm" in table["JPEG-LS Lossless Image Compression"]
    assert "pylibjpeg" in table["JPEG 2000 Image Compression"]


# ------------------------------------------------------------------ the header's declared size


def deflated_dicom(rows: int, columns: int, pixel_bytes: int) -> bytes:
    """A Deflated CT file of rows x columns int16 whose Pixel Data is `pixel_bytes` zeros, deflated
    as it is written (a 16384² frame of zeros deflates to ~0.5 MB, never held inflated here)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.PatientID = "deflated"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    dataset = DicomBytesIO()
    dataset.is_little_endian, dataset.is_implicit_VR = True, False
    write_dataset(dataset, ds)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    out.write(deflate.compress(dataset.getvalue() + pixel_header))
    zeros = bytes(2**22)
    for start in range(0, pixel_bytes, len(zeros)):
        out.write(deflate.compress(zeros[: pixel_bytes - start]))
    out.write(deflate.flush())
    return out.getvalue()


def test_declared_size_agrees_with_the_decoder_on_the_corpus():
    checked = deflated = 0
    for rel in CORPUS:
        data = (CORPUS_ROOT / rel).read_bytes()
        try:
            slices = dicom.read_dicom(data, name=rel)
        except dicom.DicomError:
            continue
        size = dicom.declared_size(data, name=rel)
        assert (size.rows, size.columns) == slices[0].image.shape, rel
        assert size.frames == len(slices), rel
        inflated = dicom.inflated_size(data, 2**30)
        if inflated is not None:
            deflated += 1
            assert inflated >= size.pixel_bytes, rel
        checked += 1
    assert checked > 80 and deflated >= 1


def test_declared_size_of_a_deflated_file_inflates_only_its_header():
    side = 16384
    data = deflated_dicom(side, side, side * side * 2)
    assert len(data) < 2**20
    tracemalloc.start()
    try:
        size = dicom.declared_size(data, name="big.dcm")
        counted = dicom.inflated_size(data, 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (size.rows, size.columns, size.frames, size.pixel_bytes) == (side, side, 1, 2 * side**2)
    assert 2**20 < counted <= 2**21  # counted just past the limit, not to 512 MiB
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB"
    # a small one the decoder reads; an uncompressed file has nothing to inflate
    small = deflated_dicom(4, 6, 48)
    assert dicom.inflated_size(small, 2**20) > 48
    assert dicom.read_dicom(small)[0].image.shape == (4, 6)
    assert dicom.inflated_size((CORPUS_ROOT / "CT_small.dcm").read_bytes(), 2**20) is None


# ------------------------------------------------------------------ to_int16, resample


def test_to_int16_rounds_and_clips():
    values = np.array([-40000.2, -1.5, -0.5, 0.4, 1.5, 2.6, 40000.0], dtype=np.float32)
    out = dicom.to_int16(values)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [-32768, -2, 0, 0, 2, 3, 32767])


def test_resample_identity_is_exact_and_a_copy():
    image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32) * 1000
    out = dicom.resample(image, 32)
    np.testing.assert_array_equal(out, image)
    assert out is not image and not np.shares_memory(out, image)


def test_resample_pads_to_square_with_the_minimum():
    image = np.arange(8, dtype=np.float32).reshape(2, 4) + 5
    out = dicom.resample(image, 4)
    np.testing.assert_array_equal(out[[0, 3]], 5)  # one pad row above, one below, value = min
    np.testing.assert_array_equal(out[1:3], image)


@pytest.mark.parametrize("shape,size", [((64, 64), 32), ((48, 64), 20), ((30, 30), 45)])
def test_resample_matches_jax_antialiased_linear_resize(shape, size):
    image = np.random.default_rng(2).normal(size=shape).astype(np.float32) * 300
    square = dicom.resample(image, max(shape))
    want = jax.image.resize(jnp.asarray(square), (size, size), "linear", antialias=True)
    np.testing.assert_allclose(dicom.resample(image, size), np.asarray(want), atol=1e-2)


def _padded(image: np.ndarray) -> np.ndarray:
    """The image centred in its square, filled with its minimum (what resample pads to)."""
    rows, cols = image.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    pad = ((top, side - rows - top), (left, side - cols - left))
    return np.pad(image, pad, constant_values=image.min())


@pytest.mark.parametrize("shape", [(512, 400), (400, 512), (48, 64), (300, 150), (150, 300)])
def test_resample_within_two_to_one_is_the_padded_square_exactly(shape):
    image = np.random.default_rng(3).normal(size=shape).astype(np.float32) * 300 - 500
    for size in (64, 128, 600):
        np.testing.assert_array_equal(
            dicom.resample(image, size), dicom.resample(_padded(image), size)
        )


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (3, 40), (40, 3), (7, 301), (301, 64)])
@pytest.mark.parametrize("size", [1, 16, 33, 120])
def test_resample_long_narrow_images_equal_the_padded_square(shape, size):
    image = np.random.default_rng(4).normal(size=shape).astype(np.float32) * 300 - 500
    got = dicom.resample(image, size)
    assert got.shape == (size, size) and got.dtype == np.float32
    # the same linear map in another order: equal to float32 rounding of values ~1000
    np.testing.assert_allclose(got, dicom.resample(_padded(image), size), rtol=0, atol=4e-3)


@pytest.mark.parametrize("shape", [(1, 8000), (8000, 1)])
def test_resample_of_a_long_strip_never_builds_its_square(shape):
    image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    dicom.resample(image, 64)  # the kernel band is cached; measure the resample itself
    tracemalloc.start()
    try:
        out = dicom.resample(image, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (64, 64)
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB; the 8000² square alone is 244 MiB"


def test_resample_antialiases_and_keeps_constants():
    stripes = np.tile([0.0, 1000.0], (64, 32)).astype(np.float32)  # 1-pixel stripes
    down = dicom.resample(stripes, 16)
    np.testing.assert_allclose(down[:, 1:-1], 500.0, atol=1e-2)  # averaged, not aliased
    assert np.all(np.abs(down - 500.0) < 50.0)  # edges renormalise a cut kernel; still no 0/1000
    np.testing.assert_allclose(dicom.resample(np.full((10, 10), -1024.0), 7), -1024.0, rtol=1e-6)


def test_resampled_spacing():
    assert dicom.resampled_spacing((0.7, 0.8), (512, 400), 256) == (1.4, 1.6)
    assert dicom.resampled_spacing(None, (512, 512), 256) is None


# ------------------------------------------------------------------ vendor quirks of pixel data


def test_encapsulated_pixels_under_an_uncompressed_syntax_are_decoded_by_their_codestream():
    hu = np.arange(-500, 524, dtype=np.int16).reshape(32, 32)
    ds = make_ds((hu + 1024).astype(np.uint16))
    ds.compress(pydicom.uid.RLELossless)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # a converter rewrote the meta only
    buffer = io.BytesIO()
    ds.save_as(buffer)
    (s,) = dicom.read_dicom(buffer.getvalue())
    np.testing.assert_array_equal(s.image, hu)
    assert s.transfer_syntax == pydicom.uid.RLELossless


@pytest.mark.parametrize(
    ("uid", "reason", "message"),
    [
        ("1.2.840.113619.5.2", "unsupported", r"UID 1\.2\.840\.113619\.5\.2 is a private"),
        ("1.3.46.670589.33.1.4.1", "unsupported", "private .vendor. syntax"),
        (CTImageStorage, "decode_failed", r"UID CT Image Storage \(1\.2\.840.*not a transfer"),
        # a standard syntax newer than the installed pydicom
        ("1.2.840.10008.1.2.99", "unsupported", r"not one the installed pydicom knows"),
    ],
)
def test_a_transfer_syntax_uid_that_is_not_one_is_named(uid, reason, message):
    with pytest.raises(dicom.DicomError, match=message) as info:
        dicom.read_dicom(_with_meta(make_ds(STORED), uid))  # pydicom's writer would refuse it
    assert info.value.reason == reason


def _with_meta(ds: Dataset, meta_syntax: str, *, little: bool = True) -> bytes:
    """A Part 10 file whose data set is Explicit VR in the given byte order and whose file meta
    claims `meta_syntax`, agreeing or not (pydicom's writer would make them agree)."""
    ds.file_meta.TransferSyntaxUID = meta_syntax
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    buffer.is_little_endian, buffer.is_implicit_VR = little, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEGLosslessSV1])
def test_native_pixels_under_a_compressed_syntax_of_the_declared_size_are_native(syntax):
    # raw pixels stored over a compressed file (PixelData = array.tobytes()), meta left as it was
    ds = make_ds(STORED)
    (s,) = dicom.read_dicom(_with_meta(ds, syntax))
    np.testing.assert_array_equal(s.image, STORED.astype(np.float32) - 1024)
    assert s.transfer_syntax == ExplicitVRLittleEndian  # what was decoded
    ds = make_ds(STORED)
    ds.PixelData = ds.PixelData[:-2]  # not the declared size: neither native nor compressed
    with pytest.raises(
        dicom.DicomError,
        match=r"compressed, but the Pixel Data is not "
        r"encapsulated \(a plain 6-byte value; the header's uncompressed size: "
        r"8 bytes\)",
    ) as info:
        dicom.read_dicom(_with_meta(ds, syntax))
    assert info.value.reason == "decode_failed"


@pytest.mark.parametrize(
    ("meta_syntax", "little"), [(ExplicitVRBigEndian, True), (ExplicitVRLittleEndian, False)]
)
def test_a_data_set_in_the_other_byte_order_is_named(meta_syntax, little):
    with pytest.raises(
        dicom.DicomError,
        match=r"byte order is not the one it was read in "
        r"\(the file meta says Explicit VR (Big|Little) Endian\)",
    ) as info:
        dicom.read_dicom(_with_meta(make_ds(STORED), meta_syntax, little=little))
    assert info.value.reason == "decode_failed"


def test_encapsulated_pixels_of_an_unknown_codec_under_an_uncompressed_syntax_are_an_error():
    ds = make_ds(STORED)
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01" * 8])  # no known signature
    ds["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(dicom.DicomError, match="encapsulated") as info:
        dicom.read_dicom(buffer.getvalue())
    assert info.value.reason == "decode_failed"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_native_pixels_that_begin_like_an_item_tag_are_native(dtype):
    # FE FF 00 E0 is the item tag of encapsulated data, here the first stored values; the length
    # after it points to no second item.
    first = (
        [0xFE, 0xFF, 0x00, 0xE0, 8, 0, 0, 0, 0, 0, 4, 0]
        if dtype == np.uint8
        else [0xFFFE, 0xE000, 8, 0, 0, 4]
    )
    pixels = np.arange(64, dtype=dtype).reshape(8, 8)
    pixels.ravel()[: len(first)] = first
    bits = 8 * pixels.itemsize
    ds = make_ds(pixels, BitsAllocated=bits, BitsStored=bits, HighBit=bits - 1)
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, pixels.astype(np.float32) - 1024)
    assert s.transfer_syntax == ExplicitVRLittleEndian


def test_corrupt_encapsulated_items_under_an_uncompressed_syntax_are_named():
    ds = make_ds(STORED)
    items = pydicom.encaps.encapsulate([b"\x00\x01" * 8])
    ds.PixelData = items[:8] + b"\x00" * (len(items) - 8)  # the first fragment's item is gone
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(dicom.DicomError, match="items are malformed") as info:
        dicom.read_dicom(buffer.getvalue())
    assert info.value.reason == "decode_failed"


def _float_ds(values: np.ndarray) -> Dataset:
    ds = make_ds(
        STORED,
        PixelData=None,
        BitsStored=None,
        HighBit=None,
        PixelRepresentation=None,
        RescaleSlope=None,
        RescaleIntercept=None,
        BitsAllocated=32,
    )
    ds.Rows, ds.Columns = values.shape
    ds.FloatPixelData = values.astype("<f4").tobytes()
    return ds


def test_non_finite_float_pixels_are_an_error_naming_the_count():
    values = np.full((4, 4), 40.0, np.float32)
    (s,) = dicom.read_dicom(to_bytes(_float_ds(values)))
    np.testing.assert_array_equal(s.image, values)  # finite ones decode
    values[0, 0], values[1, 2] = np.nan, np.inf
    with pytest.raises(dicom.DicomError, match="2 of 16 float pixel values") as info:
        dicom.read_dicom(to_bytes(_float_ds(values)))
    assert info.value.reason == "decode_failed"


def test_a_rescale_that_overflows_float32_is_an_error():
    values = np.full((4, 4), 40.0, np.float32)
    values[0, 0] = 3e38
    ds = _float_ds(values)
    ds.RescaleSlope, ds.RescaleIntercept = 10, 0
    with pytest.raises(dicom.DicomError, match="1 of 16 pixel values overflow") as info:
        dicom.read_dicom(to_bytes(ds))
    assert info.value.reason == "decode_failed"
    big = make_ds(np.array([[4000, 0]], np.uint16), RescaleSlope=1e35, RescaleIntercept=0)
    with pytest.raises(dicom.DicomError, match="RescaleSlope 1e"):
        dicom.read_dicom(to_bytes(big))


@pytest.mark.parametrize(
    ("rows", "columns", "frames", "samples", "bits", "expected"),
    [
        (512, 512, 1, 1, 16, 524288),
        (3, 5, 1, 1, 8, 16),  # 15 bytes, padded to even
        (3, 5, 1, 1, 1, 2),  # 15 bits in 2 bytes, not 15 bytes
        (8, 8, 3, 3, 8, 576),
        (7, 7, 1, 1, 12, 74),  # 12-bit packed: 588 bits = 73.5 bytes, 74 with padding
    ],
)
def test_declared_pixel_bytes_are_the_native_pixel_data_length(
    rows, columns, frames, samples, bits, expected
):
    size = dicom.DeclaredSize(rows, columns, frames, samples, bits)
    assert size.pixel_bytes == expected


def test_excess_pixel_bytes_are_not_read_as_more_frames():
    ds = make_ds(STORED)
    ds.PixelData = ds.PixelData + b"\x00" * (STORED.nbytes - 2)  # less than a frame: padding
    (s,) = dicom.read_dicom(to_bytes(ds))
    assert s.frame is None and s.image_id == ds.SOPInstanceUID
    np.testing.assert_array_equal(s.image, STORED.astype(np.float32) - 1024)


@pytest.mark.parametrize("little", [True, False], ids=["little_endian", "big_endian"])
def test_a_whole_frame_more_than_declared_is_a_wrong_header(little):
    big = np.arange(64, dtype=np.int16).reshape(8, 8)
    dropped = make_ds(np.stack([big] * 3))  # a 3-frame object whose NumberOfFrames was dropped
    assert "NumberOfFrames" not in dropped
    with pytest.raises(
        dicom.DicomError,
        match=r"384 bytes, 3 frames of 8x8 pixels, but the "
        r"header says no NumberOfFrames \(1\); fix NumberOfFrames",
    ) as info:
        dicom.read_dicom(to_bytes(dropped, little=little))
    assert info.value.reason == "decode_failed"
    half = make_ds(big, Rows=4, Columns=4)  # an 8x8 image declared 4x4: 4 frames of half-rows
    with pytest.raises(dicom.DicomError, match="4 frames of 4x4 pixels"):
        dicom.read_dicom(to_bytes(half, little=little))
    two = make_ds(np.stack([big] * 3), NumberOfFrames=2)
    with pytest.raises(dicom.DicomError, match="header says NumberOfFrames 2;"):
        dicom.read_dicom(to_bytes(two, little=little))
    # a 1x1 8-bit image: its one pad byte (to an even length) is no second frame
    tiny = make_ds(np.array([[7]], np.uint8), BitsAllocated=8, BitsStored=8, HighBit=7)
    (s,) = dicom.read_dicom(to_bytes(tiny, little=little))
    assert s.image.tolist() == [[7 - 1024]]


def test_excess_compressed_frames_are_not_read_as_more_frames():
    ds = make_ds(np.stack([STORED, STORED * 2]), NumberOfFrames=2)
    ds.compress(pydicom.uid.RLELossless)
    ds.NumberOfFrames = 1  # two fragments, one frame declared
    buffer = io.BytesIO()
    ds.save_as(buffer)
    (s,) = dicom.read_dicom(buffer.getvalue())
    assert s.frame is None
    np.testing.assert_array_equal(s.image, STORED.astype(np.float32) - 1024)


def _padded_ct(pixels: np.ndarray, **attrs) -> dicom.DicomSlice:
    (s,) = dicom.read_dicom(to_bytes(make_ds(pixels, **attrs)))
    return s


def test_pixel_padding_becomes_the_darkest_other_value():
    stored = np.array([[63536, 1000], [1064, 63536]], np.uint16)  # 63536: outside the scan
    plain = _padded_ct(stored)
    assert plain.image[0, 0] == 62512  # without the tag: the rescaled value, white when windowed
    s = _padded_ct(stored, PixelPaddingValue=63536)
    np.testing.assert_array_equal(s.image, [[-24, -24], [40, -24]])
    mr = _padded_ct(stored, Modality="MR", RescaleIntercept=0, PixelPaddingValue=63536)
    np.testing.assert_array_equal(mr.image, [[1000, 1000], [1064, 1000]])


def test_pixel_padding_range_and_signed_pixels():
    stored = np.array([[-2000, -1500], [-1995, 40]], np.int16)
    s = _padded_ct(
        stored, RescaleIntercept=0, PixelPaddingValue=-2000, PixelPaddingRangeLimit=-1990
    )
    np.testing.assert_array_equal(s.image, [[-1500, -1500], [-1500, 40]])
    # MONOCHROME1: padding is found on the stored values, then reflected (-1 - s) like the rest.
    m1 = _padded_ct(
        stored,
        RescaleIntercept=0,
        PixelPaddingValue=-2000,
        PhotometricInterpretation="MONOCHROME1",
        Modality="DX",
    )
    np.testing.assert_array_equal(m1.image, [[-41, 1499], [1994, -41]])


@pytest.mark.parametrize("little", [True, False], ids=["little_endian", "big_endian"])
def test_pixel_padding_beyond_bits_stored_is_found_in_the_cells(little):
    # 63536 (0xF830) needs 16 bits; with 12 stored the decoder masks it to 0x830 (+1072 HU).
    stored = np.array([[63536, 1100], [1064, 63536]], np.uint16)
    ds = make_ds(stored, BitsStored=12, HighBit=11, PixelPaddingValue=63536)
    ds.PixelData = stored.astype("<u2" if little else ">u2").tobytes()
    (s,) = dicom.read_dicom(to_bytes(ds, little=little))
    np.testing.assert_array_equal(s.image, [[40, 76], [40, 40]])


@pytest.mark.parametrize("padding", [0, 1, 63536])
def test_pixel_padding_in_implicit_vr_is_read_as_a_number(padding):
    """Implicit VR gives raw elements no VR: Pixel Padding Value 0 (bytes 00 00) and 1 are not
    text (they once read as "absent" and as "\x01"), in Explicit VR or not."""
    stored = np.array([[padding, 1100], [1064, padding]], np.uint16)
    want = [[40, 76], [40, 40]]
    for implicit in (False, True):
        ds = make_ds(stored, PixelPaddingValue=padding)
        (s,) = dicom.read_dicom(to_bytes(ds, implicit=implicit))
        np.testing.assert_array_equal(s.image, want, err_msg=f"implicit={implicit}")


def test_pixel_padding_of_the_other_sign_is_read_in_the_pixels_sign():
    stored = np.array([[63536, 1000], [1064, 63536]], np.uint16)
    ds = make_ds(stored)
    ds.add_new("PixelPaddingValue", "SS", -2000)  # the bits of 63536, written as signed
    (s,) = dicom.read_dicom(to_bytes(ds))
    np.testing.assert_array_equal(s.image, [[-24, -24], [40, -24]])


def test_keep_stored_gives_the_stored_values_before_padding_and_rescale():
    stored = np.array([[0, 0], [1, 2]], np.uint16)  # a label map with a CT header's padding tag
    ds = make_ds(stored, PixelPaddingValue=0, PhotometricInterpretation="MONOCHROME1")
    (s,) = dicom.read_dicom(to_bytes(ds), keep_stored=True)
    assert s.image[0, 0] != -1024  # padding replaced (and reflected): the image hides the zeros
    np.testing.assert_array_equal(s.stored, stored)
    assert s.stored.dtype == np.uint16
    frames = np.stack([np.zeros((2, 2), np.int16), np.array([[0, 5], [-6, 7]], np.int16)])
    blank, other = dicom.read_dicom(
        to_bytes(make_ds(frames, NumberOfFrames=2, PixelPaddingValue=0)), keep_stored=True
    )
    np.testing.assert_array_equal(blank.stored, frames[0])
    np.testing.assert_array_equal(other.stored, frames[1])
    (plain,) = dicom.read_dicom(to_bytes(ds))
    assert plain.stored is None  # only when asked for: the pipeline keeps one array per slice


def test_a_frame_of_padding_alone_is_air_in_ct():
    frames = np.stack([np.full((2, 2), 63536, np.uint16), np.array([[63536, 5], [6, 7]])])
    blank, other = dicom.read_dicom(
        to_bytes(make_ds(frames.astype(np.uint16), NumberOfFrames=2, PixelPaddingValue=63536))
    )
    np.testing.assert_array_equal(blank.image, np.full((2, 2), -1024))
    np.testing.assert_array_equal(other.image, [[-1019, -1019], [-1018, -1017]])


def test_pixel_padding_that_no_pixel_can_hold_is_an_error():
    with pytest.raises(dicom.DicomError, match="PixelPaddingValue") as info:
        _padded_ct(
            np.array([[0, 1]], np.uint8),
            BitsAllocated=8,
            BitsStored=8,
            HighBit=7,
            PixelData=np.array([[0, 1]], np.uint8).tobytes(),
            PixelPaddingValue=4000,
        )
    assert info.value.reason == "decode_failed"


@pytest.mark.parametrize(
    "raw, want",
    [
        (b"0.7\\0.8\\ ", (0.7, 0.8)),  # a trailing separator some writers add
        (b"0\\0 ", None),  # "unknown"
        (b"-0.7\\0.7 ", None),
        (b"nan\\nan ", None),
        (b"0.7 ", None),  # one value
    ],
)
def test_pixel_spacing_is_two_positive_numbers_or_none(raw, want):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = make_ds(STORED)
    tag = Tag(0x00280030)
    ds[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
    (s,) = dicom.read_dicom(to_bytes(ds))
    assert s.pixel_spacing == want


@pytest.mark.parametrize(
    "attrs, says",
    [
        ({}, None),  # no orientation: only the Image Type is looked at
        ({"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}, None),
        ({"ImageOrientationPatient": [0.998, 0.05, 0, -0.05, 0.998, 0]}, None),  # a tilt
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "not an axial slice"),  # coronal
        ({"ImageOrientationPatient": [-1, 0, 0, 0, -1, 0]}, "stored rotated or flipped"),  # prone
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "a localizer (scout) image"),
        ({"ImageType": ["DERIVED", "SECONDARY", "MASK"]}, "a mask (segmentation)"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}, None),
    ],
)
def test_slices_that_are_no_axial_image_as_stored_are_named(attrs, says):
    # a scout or a coronal reformat in a labelled series folder was written as a lesion slice
    (s,) = dicom.read_dicom(to_bytes(make_ds(STORED, **attrs)))
    found = dicom.plane(s)
    assert (found is None) if says is None else (says in found), found
    assert (says is None) == all(says is None or says not in d for d in dicom.doubts(s))


AXES = {"x": np.array([1.0, 0, 0]), "y": np.array([0, 1.0, 0])}


def _stored_as(standard: np.ndarray, spacing: tuple[float, float], row: str, col: str):
    """The pixels, Image Orientation, Position and Pixel Spacing of `standard` (an axial slice as
    stored head first supine: rows along +y, columns along +x, first pixel at the origin) as a
    scanner stores it with row direction `row` and column direction `col` ("+x", "-y", ...).
    Worked out from the patient positions of the pixels, not from flips."""
    (ny, nx), (dy, dx) = standard.shape, spacing
    size = {"x": nx, "y": ny}
    step = {"x": dx, "y": dy}
    row_dir, col_dir = (float(d[0] + "1") * AXES[d[1]] for d in (row, col))
    # The stored first pixel is the corner of the grid the two directions start from.
    ipp = sum(
        ((size[a] - 1) * step[a] if d[0] == "-" else 0.0) * AXES[a]
        for d, a in ((row, row[1]), (col, col[1]))
    )
    rows, columns = size[col[1]], size[row[1]]
    stored = np.empty((rows, columns), standard.dtype)
    for r in range(rows):
        for c in range(columns):
            p = ipp + c * step[row[1]] * row_dir + r * step[col[1]] * col_dir
            y, x = round(p[1] / dy), round(p[0] / dx)
            assert 0 <= y < ny and 0 <= x < nx, (r, c, p)
            stored[r, c] = standard[y, x]
    attrs = dict(
        ImageOrientationPatient=[*row_dir, *col_dir],
        ImagePositionPatient=[*ipp[:2], 42.5],
        PixelSpacing=[step[col[1]], step[row[1]]],
    )
    return stored, attrs


@pytest.mark.parametrize(
    "row, col",
    [
        ("+x", "+y"),  # head first supine: as stored already
        ("-x", "-y"),  # head first prone
        ("-x", "+y"),  # feet first supine
        ("+x", "-y"),  # feet first prone
        ("+y", "+x"),  # rows and columns swapped
        ("+y", "-x"),
        ("-y", "+x"),
        ("-y", "-x"),
    ],
)
def test_rotated_and_flipped_axial_slices_are_turned_to_the_standard_orientation(row, col):
    """A slice stored prone, feet first or transposed decodes (decode_resampled) to the very
    pixels, spacing and position of the same slice stored head first supine; `read_dicom` gives
    what is stored. A non-square image with non-square pixels shows a swapped axis."""
    standard = np.arange(6 * 8, dtype=np.int16).reshape(6, 8) * 10 + 1000  # rows y, columns x
    spacing = (0.6, 0.9)  # (row, column) = (dy, dx)
    want_ds = make_ds(standard, **_stored_as(standard, spacing, "+x", "+y")[1])
    [want] = dicom.decode_resampled(to_bytes(want_ds), "want.dcm", 16)
    stored, attrs = _stored_as(standard, spacing, row, col)
    [raw] = dicom.read_dicom(to_bytes(make_ds(stored, **attrs)))
    np.testing.assert_array_equal(raw.image, stored.astype(np.float32) - 1024)  # as stored
    [got] = dicom.decode_resampled(to_bytes(make_ds(stored, **attrs)), "got.dcm", 16)
    np.testing.assert_array_equal(got.slice.image, standard.astype(np.float32) - 1024)
    np.testing.assert_array_equal(got.image, want.image)
    assert got.slice.pixel_spacing == spacing
    np.testing.assert_allclose(got.slice.image_position, (0, 0, 42.5), atol=1e-9)
    assert got.slice.orientation == (1, 0, 0, 0, 1, 0)
    assert got.doubts == want.doubts  # the non-square pixels, and nothing of the orientation
    if (row, col) == ("+x", "+y"):
        assert got.turned is None and dicom.plane(raw) is None
        return
    assert got.turned.endswith("): turned to the standard axial orientation")
    assert "stored rotated or flipped" in dicom.plane(raw)
    assert dicom.plane(got.slice) is None
    # The sentence says how the stored pixels lie against the standard ones.
    how = {
        "mirrored left-right": lambda a: a[:, ::-1],
        "mirrored top to bottom": lambda a: a[::-1],
        "rotated 180°": lambda a: np.rot90(a, 2),
        "transposed (mirrored across its diagonal)": lambda a: a.T,
        "rotated 90° clockwise": lambda a: np.rot90(a, -1),
        "rotated 90° counterclockwise": lambda a: np.rot90(a, 1),
        "mirrored across its anti-diagonal": lambda a: np.rot90(a, 2).T,
    }
    [said] = [words for words in how if got.turned.startswith(f"stored {words} (Image")]
    np.testing.assert_array_equal(how[said](standard), stored)


def test_a_tilted_prone_slice_is_turned_and_a_nan_orientation_is_none():
    tilt = np.deg2rad(15)
    prone = [-1, 0, 0, 0, -np.cos(tilt), np.sin(tilt)]
    pixels = np.arange(12, dtype=np.int16).reshape(3, 4) + 1000
    [r] = dicom.decode_resampled(
        to_bytes(make_ds(pixels, ImageOrientationPatient=prone)), "tilted.dcm", 4
    )
    assert r.turned.startswith("stored rotated 180° (Image Orientation (Patient) -1/0/0/0/")
    np.testing.assert_array_equal(r.slice.image, np.rot90(pixels, 2).astype(np.float32) - 1024)
    np.testing.assert_allclose(r.slice.orientation, [1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)])
    assert not any("Orientation" in d for d in r.doubts), r.doubts
    assert r.slice.slice_position == 42.5  # the stored position's z: the series' order
    # A NaN in Image Orientation (Patient) or Position is no orientation or position at all.
    nan = make_ds(pixels, ImageOrientationPatient=[-1, 0, 0, 0, "NaN", 0])
    [s] = dicom.read_dicom(to_bytes(nan))
    assert s.orientation is None and dicom.plane(s) is None
    [s] = dicom.read_dicom(to_bytes(make_ds(pixels, ImagePositionPatient=[0, "nan", 1])))
    assert s.image_position is None
    # One bad offset of a dose grid's frames spoils its own frame's position only.
    frames = np.stack([pixels] * 3)
    grid = make_ds(frames, NumberOfFrames=3, GridFrameOffsetVector=["0", "NaN", "5"])
    positions = [s.slice_position for s in dicom.read_dicom(to_bytes(grid))]
    np.testing.assert_array_equal(positions, [42.5, np.nan, 47.5])


def test_oblique_and_in_plane_rotated_slices_are_not_turned():
    """Only multiples of 90° and flips are turned: a slice rotated 30° in its plane, or a
    coronal one, is decoded as stored and named in its doubts; a gantry tilt is no turn."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    tilt = np.deg2rad(20)
    cases = {
        "rotated in its plane by other than a multiple of 90°": [c, s, 0, -s, c, 0],
        "not an axial slice": [1, 0, 0, 0, 0, -1],
        None: [1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)],  # a 20° gantry tilt
    }
    pixels = np.arange(16, dtype=np.int16).reshape(4, 4) + 1000
    for says, iop in cases.items():
        assert dicom.axial_turn(iop) is None, iop
        [r] = dicom.decode_resampled(to_bytes(make_ds(pixels, ImageOrientationPatient=iop)), "a", 4)
        assert r.turned is None
        np.testing.assert_array_equal(r.slice.image, pixels.astype(np.float32) - 1024)
        assert (says is None) == (not any("orientation" in d.lower() for d in r.doubts)), r.doubts
        if says is not None:
            assert any(says in d for d in r.doubts), r.doubts
