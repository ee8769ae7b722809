"""The one DICOM decoder of liverjax: a file becomes float32 slices plus metadata, or a DicomError.

`read_dicom` returns one `DicomSlice` per frame. Pixel values are:

* grayscale: the stored values after the modality transform, i.e. Hounsfield units for CT.
  RescaleSlope/RescaleIntercept are applied (a missing tag counts as 1 / 0); when the slope is not
  1 or the intercept not an integer the rescale is done in float64 and rounded once to float32, so
  fractional slopes are exact to float32. A Modality LUT Sequence, where present instead, is
  applied with pydicom. Signed and unsigned pixels and BitsStored are handled by pydicom's decoder.
* MONOCHROME1 (minimum = white) in CT (Modality CT or Rescale Type HU): not inverted. The rescale
  gives Hounsfield units whatever the Photometric Interpretation, which only says how to display
  them; `photometric` says MONOCHROME1.
* MONOCHROME1 otherwise (CR, DX and other values without physical units): inverted so that, as in
  MONOCHROME2, higher means brighter. The stored value s is reflected inside its BitsStored range,
  s -> lo + hi - s (unsigned: 2**bits - 1 - s, signed: -1 - s), before the rescale, so the values
  keep their range; the window centre is reflected the same way. `photometric` still says
  MONOCHROME1.
* colour (RGB, YBR_* and PALETTE COLOR): converted to RGB by pydicom (YBR -> RGB, palette through
  `apply_color_lut`), then to one channel of ITU-R BT.601 luma (`LUMA_WEIGHTS`), with
  `color_converted=True`. No rescale is applied to colour data (the modality transform is defined
  for grayscale only), so `rescale_slope`/`rescale_intercept` are 1 and 0.

* Pixel Padding (PixelPaddingValue, with PixelPaddingRangeLimit a range of stored values: the
  area outside a CT scan's circular field of view) becomes the frame's darkest other value, so
  that it windows like the background, instead of the rescaled padding value (+62512 "HU" for
  the common unsigned 63536, which windows to white). A frame of padding alone becomes
  `CT_PADDING_HU` (-1024, air) in CT, 0 otherwise. Padding is found on the stored values, in
  the sign of Pixel Representation (a US or SS tag of the other sign means the same bits); a
  value beyond Bits Stored (63536 with 12 of 16 bits stored) is looked for in the pixel cells as
  the file has them, before the bits above Bits Stored are masked off.
* Float Pixel Data with NaN or infinite values is an error (`decode_failed`), not zeros; so is a
  rescale whose values overflow float32 (a huge slope or intercept), not 32767 after `to_int16`.
* `read_dicom(..., keep_stored=True)` also keeps each frame's stored values in `stored`: the
  decoded pixel array as the decoder returns it (integers as in the file, bits above Bits Stored
  masked off; floats for Float Pixel Data; RGB samples for colour, palette indices for PALETTE
  COLOR), before MONOCHROME1 reflection, modality transform and padding replacement. For data
  whose values are codes rather than intensities (segmentation masks stored as images).

`read_dicom` gives the pixels as stored, in the file's orientation. `decode_resampled`, what the
network reads (the dataset builder, the server and `liverjax.predict` call it), first turns an
axial slice stored prone, feet first or transposed to the standard axial orientation (`turned`:
a transpose and flips only, so no pixel value changes), then resamples it.

A multi-frame object gives one slice per frame (NumberOfFrames, 1 when absent: native bytes
beyond them that are less than a frame are ignored, a frame's worth or more is an error, never
read as more frames), `frame` = 0, 1, ... and `image_id` =
"<SOPInstanceUID>/<frame>"; a single frame has `frame=None` and `image_id` = the SOP Instance UID.
Enhanced multi-frame functional groups (per-frame rescale, position, spacing, window) are read.
A file without file meta is read with `force=True`; its transfer syntax is guessed from the
encoding, or for compressed pixel data from the codestream signature (JPEG, JPEG-LS, JPEG 2000,
RLE). The signature also decides when the file meta names an uncompressed syntax but the pixel
data is encapsulated (a converter that rewrote the meta only); `transfer_syntax` then says what
was decoded. Pixel data of exactly the uncompressed size whose first bytes only look like an item
(no second item where the first one ends, or no known codestream) is native; so is pixel data of
exactly that size that is not encapsulated under a compressed syntax (raw pixels written over a
compressed file, the meta left as it was). A data set in the other byte order than its file meta
says, and a private (vendor) or wrong Transfer Syntax UID, are named as such.
`supported_transfer_syntaxes()` lists what the installed plugins decode.

Every failure is a `DicomError` (a ValueError) with `.reason`, one of `REASONS`:
  empty          zero-byte file
  not_a_file     a directory, FIFO (named pipe), socket or device: no regular file to read
                 (reading a FIFO would wait for a writer forever), checked before opening it
  not_dicom      not DICOM at all (text, archives, other binaries)
  truncated      the file ends before the data it declares
  no_pixels      a DICOM object of an image (or unknown) class without Pixel Data
  not_image      an object that is not an image: segmentations (SEG, even though they carry pixel
                 data), RT structure sets and plans, structured reports, waveforms, DICOMDIRs and
                 any other SOP class without "Image" in its name and without pixel data
  unsupported    no installed plugin decodes its transfer syntax or colour space
  decode_failed  corrupt or inconsistent pixel data or attributes, or an unreadable file
RT Dose IS decoded as an image: its frames are dose planes in stored units (DoseGridScaling is not
applied; multiply by it to get Gy) and each frame's `slice_position` follows GridFrameOffsetVector.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

REASONS = (
    "empty",
    "not_a_file",
    "not_dicom",
    "truncated",
    "no_pixels",
    "not_image",
    "unsupported",
    "decode_failed",
)

# ITU-R BT.601 luma, the same weights as the Y of DICOM's YBR_FULL: colour becomes one channel.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_PREAMBLE_BYTES = 128  # a DICOM Part 10 file has a 128-byte preamble, then the "DICM" magic
_MAGIC = b"DICM"
# A dataset without preamble starts with its lowest group; any image has group 0028 (Image Pixel),
# so a first tag above it (in either byte order) is not the start of a DICOM image dataset.
_MAX_FIRST_GROUP = 0x0028
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ELEMENT_HEADER_BYTES = 8  # the shortest data element header: tag, then VR and/or length
_GROUP_LENGTH_BYTES = 12  # the (0002,0000) element: tag 4, VR 2, length 2, value 4
_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = tuple(tag_for_keyword(k) for k in _PIXEL_KEYWORDS)
# A forced read of a file without preamble is accepted as DICOM only if it has one of these.
_IDENTIFYING = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "PatientID",
    "Rows",
    "DirectoryRecordSequence",
    *_PIXEL_KEYWORDS,
)
# Segmentations carry pixel data but are label maps, not images (named by UID: pydicom 3.0 knows
# only the first; 66.7/66.8 are the Label Map and Height Map Segmentation Storage classes).
_SEGMENTATION_CLASSES = frozenset(
    {dicom_uid.SegmentationStorage, "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.5.1.4.1.1.66.8"}
)
# Integers of this magnitude and below are exact in float32 (24-bit significand), and so are the
# sums of <=16-bit stored values with an integer intercept this small: the float32 fast path.
_FLOAT32_EXACT_INT = 2**23
_FAST_PATH_MAX_ITEMSIZE = 2  # bytes per stored value for the float32 fast path (8 and 16 bit)
_COLOR_SAMPLES = 3
# JPEG frame-header (SOFn) marker codes -> transfer syntax (JPEG-LS uses SOF55, 0xF7).
_JPEG_SOF = {
    0xC0: dicom_uid.JPEGBaseline8Bit,
    0xC1: dicom_uid.JPEGExtended12Bit,
    0xC3: dicom_uid.JPEGLossless,
    0xF7: dicom_uid.JPEGLSLossless,
}
_JPEG_SOS = 0xDA  # start of scan; JPEG-LS keeps its NEAR parameter there
_JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI
_J2K_STARTS = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")  # codestream SOC+SIZ, or a JP2 box
_J2K_SIZ_OFFSET = 8  # SOC (2), SIZ marker (2), Lsiz (2), Rsiz (2), then Xsiz, Ysiz, XOsiz, YOsiz
_RLE_HEADER_BYTES = 64  # RLE Lossless: 64-byte header = segment count + 15 offsets (PS3.5 G.3)
_RLE_MAX_SEGMENTS = 15
# A Deflated dataset is inflated at most this far to find its header (`declared_size`).
DEFLATED_HEADER_BYTES = 16 * 2**20
_INFLATE_CHUNK_BYTES = 2**20
# `resample` pads an image longer than this times its width in two steps, never as a square.
_MAX_ASPECT = 2


class DicomError(ValueError):
    """A file that does not give an image: .reason (one of REASONS), .path, .detail."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"DicomError reason {reason!r} is not one of {REASONS}")
        super().__init__(path, reason, detail)  # keeps the error picklable across processes
        self.path = path
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True, eq=False)
class DicomSlice:
    """One decoded frame: float32 (rows, cols) image and the metadata the pipeline needs."""

    image: np.ndarray
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    frame: int | None
    modality: str
    pixel_spacing: tuple[float, float] | None  # (row, column) mm; None: absent or not > 0
    image_position: tuple[float, float, float] | None
    slice_position: float | None
    instance_number: int | None
    window_center: float | None
    window_width: float | None
    photometric: str
    color_converted: bool
    rescale_slope: float
    rescale_intercept: float
    transfer_syntax: str
    referenced_sop_uids: tuple[str, ...]
    # Whether its values are Hounsfield units: Modality CT, or Rescale Type HU.
    hounsfield: bool = False
    # Image Type's values (ORIGINAL\PRIMARY\AXIAL, ...\LOCALIZER), upper case; () when absent.
    image_type: tuple[str, ...] = ()
    # Image Orientation (Patient): row then column direction cosines; None when absent.
    orientation: tuple[float, ...] | None = None
    # The frame's stored values, only with read_dicom(keep_stored=True); see the module docstring.
    stored: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def image_id(self) -> str:
        """The SOP Instance UID, with "/<frame>" appended for a frame of a multi-frame object."""
        return self.sop_uid if self.frame is None else f"{self.sop_uid}/{self.frame}"

    def ids(self) -> dict[str, Any]:
        """Which image this is: image_id, the patient, study, series and SOP ids, frame, modality
        (the server's and `liverjax.predict`'s per-image fields)."""
        return {
            "image_id": self.image_id,
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_uid": self.sop_uid,
            "frame": self.frame,
            "modality": self.modality,
        }

    def metadata(self) -> dict[str, Any]:
        """Every field except the pixels (image, stored), plus image_id, as JSON-ready values."""
        out: dict[str, Any] = {"image_id": self.image_id}
        for field in dataclasses.fields(self):
            if field.name not in ("image", "stored"):
                value = getattr(self, field.name)
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


def supported_transfer_syntaxes() -> dict[str, str]:
    """Transfer syntax name -> installed pixel-data plugin(s) that decode it, here and now."""
    out = {}
    for ts in dicom_uid.AllTransferSyntaxes:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            continue  # no pydicom decoder exists for it (video, JPIP, JPEG 2000 Part 2)
        if decoder.is_native:
            out[ts.name] = "pydicom"
        elif decoder.is_available:
            out[ts.name] = ", ".join(decoder.available_plugins)
    return out


def read_dicom(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    name: str | None = None,
    keep_stored: bool = False,
) -> list[DicomSlice]:
    """Decode a DICOM file (path, bytes or binary file object) into one DicomSlice per frame.

    keep_stored: also set each slice's `stored` to the frame's stored values (module docstring).
    """
    path = name if name is not None else _display_name(source)
    try:
        # pydicom logs every warning to the "pydicom" logger as well; the duplicate Python warnings
        # are recorded here (a truncated file shows up as one) rather than printed per file.
        with warnings.catch_warnings(record=True) as caught, _open(source, path) as fp:
            warnings.simplefilter("always")
            ds, ts = _read_dataset(fp, path, caught)
            return _decode(ds, ts, path, keep_stored)
    except DicomError:
        raise
    except Exception as e:  # anything pydicom or a plugin raises on a bad file: one error type
        raise DicomError(path, "decode_failed", f"{type(e).__name__}: {e}") from e
    except BaseException as e:
        if type(e).__name__ != "PanicException":  # KeyboardInterrupt, SystemExit... go through
            raise
        # a Rust plugin (pyo3) panicked on malformed data; pydicom does not catch it either
        raise DicomError(path, "decode_failed", f"the pixel-data plugin crashed: {e}") from e


@dataclasses.dataclass(frozen=True)
class DeclaredSize:
    """What a file's header says its pixel data is (`declared_size`)."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames

    @property
    def pixel_bytes(self) -> int:
        """Bytes of native (uncompressed) Pixel Data these declare, padded to an even length."""
        n = -(-self.pixels * self.samples * self.bits_allocated // 8)
        return n + n % 2


def declared_size(source: bytes, *, name: str | None = None) -> DeclaredSize | None:
    """Rows, Columns, NumberOfFrames (1 when absent) etc. from the header alone, without reading,
    decoding or inflating the pixel data: a cheap check before `read_dicom` (a server refusing
    images too large to decode). None when the header does not say (no Rows/Columns, or it does
    not parse): `read_dicom` then tells what is wrong. A Deflated dataset is inflated only as far
    as DEFLATED_HEADER_BYTES; a DicomError if its Rows and Columns are not within them.
    """
    path = name if name is not None else _display_name(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            deflated = _deflated_data(source)
            if deflated is None:
                return _declared(dcmread(io.BytesIO(source), force=True, stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - read_dicom tells what is wrong with the file
            return None
        # Inflate 64 KiB, then 4x more until the header is all there (or the limit is reached).
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head, tail, want = b"", deflated, _INFLATE_CHUNK_BYTES // 16
        while True:
            chunk = inflater.decompress(tail, want - len(head))
            head, tail = head + chunk, inflater.unconsumed_tail
            try:
                ds = read_dataset(DicomBytesIO(head), False, True, stop_when=_at_pixels)
                size = _declared_native(ds)
            except Exception:  # noqa: BLE001 - cut inside an element: inflate more
                size = None
            done = inflater.eof or not (chunk or tail)
            if size is not None or want >= DEFLATED_HEADER_BYTES or done:
                break
            want *= 4
    if size is None:
        raise DicomError(
            path,
            "decode_failed",
            "no Rows and Columns in the first 16 MiB of the deflated dataset; it cannot be read",
        )
    return size


def inflated_size(source: bytes, limit: int) -> int | None:
    """The size of a Deflated file's dataset once inflated, counted in 1 MiB pieces that are never
    kept and only until it passes `limit` (a small file can inflate to gigabytes, which pydicom
    holds at once); None for any other file, whose data is no larger than the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            deflated = _deflated_data(source)
        except Exception:  # noqa: BLE001 - read_dicom tells what is wrong with the file
            return None
    if deflated is None:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated, tail = 0, deflated
    while not inflater.eof and inflated <= limit:
        chunk = inflater.decompress(tail, _INFLATE_CHUNK_BYTES)
        tail = inflater.unconsumed_tail
        if not chunk and not tail:
            break  # the deflated data ends without its end marker: read_dicom reports it
        inflated += len(chunk)
    return inflated


def _deflated_data(source: bytes) -> bytes | None:
    """The deflated dataset after the file meta of a Deflated Explicit VR Little Endian file."""
    fp = io.BytesIO(source)
    if read_preamble(fp, True) is None:  # no file meta: pydicom guesses an uncompressed syntax
        return None
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != dicom_uid.DeflatedExplicitVRLittleEndian:
        return None
    return source[fp.tell() :]


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _declared_native(ds: Dataset) -> DeclaredSize | None:
    """`_declared` when Bits Allocated is there, else None (`_declared` would assume 16 bits,
    an upper bound, not the length of native pixel data or a header read to its end)."""
    return _declared(ds) if "BitsAllocated" in ds else None


def _declared(ds: Dataset) -> DeclaredSize | None:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (AttributeError, TypeError, ValueError):
        return None
    return DeclaredSize(rows, columns, frames, samples, bits)


def to_int16(image: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and clip to the int16 range (HU fit in int16)."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(image), info.min, info.max).astype(np.int16)


def outside_int16(image: np.ndarray) -> int:
    """How many values of `image` `to_int16` clips (beyond what rounding reaches)."""
    info = np.iinfo(np.int16)
    return int(np.count_nonzero((image < info.min - 0.5) | (image > info.max + 0.5)))


SQUARE_TOLERANCE = 0.01  # row and column spacing within 1% of each other count as square


def is_square(spacing: Sequence[float]) -> bool:
    """Whether (row, column) pixel spacing is square to within SQUARE_TOLERANCE."""
    row, col = float(spacing[0]), float(spacing[1])
    return abs(row - col) <= SQUARE_TOLERANCE * max(abs(row), abs(col))


AXIAL_TOLERANCE = 0.1  # |cosine| off the standard axial directions still counted as axial


def plane(s: DicomSlice) -> str | None:
    """Why a slice is not an axial image as the network was trained on, or None: a localizer
    (scout) or a mask by its Image Type, another plane by its orientation (coronal, sagittal,
    oblique), or an axial one stored rotated by a multiple of 90° or flipped (what `turned`
    turns, so a slice `decode_resampled` gives is not named for it) or rotated in its plane by
    another angle. A gantry tilt is axial. Without an orientation only the Image Type is looked
    at."""
    if "LOCALIZER" in s.image_type:
        return "a localizer (scout) image by its Image Type"
    if "MASK" in s.image_type:
        return "a mask (segmentation) by its Image Type, not a CT slice"
    if s.orientation is None:
        return None
    shown = "/".join(f"{v:g}" for v in s.orientation)
    if not _axial(s.orientation):
        return f"not an axial slice: Image Orientation (Patient) {shown}"
    if axial_turn(s.orientation) is not None:
        return (
            f"an axial slice stored rotated or flipped (Image Orientation (Patient) {shown}, not "
            "1/0/0/0/1/0): its anatomy is turned against the other slices"
        )
    if _along(s.orientation[:3]) != (0, 1.0) or _along(s.orientation[3:]) != (1, 1.0):
        return (
            "an axial slice stored rotated in its plane by other than a multiple of 90° (Image "
            f"Orientation (Patient) {shown}): its anatomy is turned against the other slices"
        )
    return None


def _axial(orientation: Sequence[float]) -> bool:
    """Whether the plane's normal is within AXIAL_TOLERANCE of the patient's z axis (a gantry
    tilt of up to about 25° is axial)."""
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return abs(abs(float(normal[2])) - 1) <= AXIAL_TOLERANCE


def _along(direction: Sequence[float]) -> tuple[int, float] | None:
    """(the patient axis, x = 0 or y = 1, and its sign) that a row or column direction runs
    along in the axial plane, within AXIAL_TOLERANCE, or None. Only its x and y components
    count: a gantry tilt adds a z component to the column direction, not another direction."""
    xy = np.asarray(direction[:2], np.float64)
    length = float(np.hypot(*xy))
    if length == 0.0:
        return None
    for axis, sign in ((0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)):
        if np.abs(xy / length - sign * np.eye(2)[axis]).max() <= AXIAL_TOLERANCE:
            return axis, sign
    return None


class Turn(NamedTuple):
    """How a stored axial slice is turned to the standard orientation, applied in this order."""

    transpose: bool  # rows and columns swapped: the stored rows run along the patient's x
    flip_rows: bool  # then upside down: the rows ran from the patient's back
    flip_columns: bool  # then mirrored: the columns ran from the patient's left

    def stored_as(self) -> str:
        """How the slice was stored, against the standard orientation, in words."""
        return {
            (False, False, True): "mirrored left-right",
            (False, True, False): "mirrored top to bottom",
            (False, True, True): "rotated 180°",
            (True, False, False): "transposed (mirrored across its diagonal)",
            (True, True, False): "rotated 90° clockwise",
            (True, False, True): "rotated 90° counterclockwise",
            (True, True, True): "mirrored across its anti-diagonal",
        }[tuple(self)]


def axial_turn(orientation: Sequence[float] | None) -> Turn | None:
    """The transpose and flips that bring an axial slice stored rotated by a multiple of 90° or
    flipped to the standard axial orientation, Image Orientation (Patient) 1/0/0/0/1/0: columns
    run toward the patient's left and rows toward the back, as a head-first supine scan is
    stored and every CT viewer shows an axial slice. A prone scan is usually stored rotated
    180°, and a feet-first one mirrored where the scanner stores it as seen from the gantry;
    only the Image Orientation decides (it describes the stored pixels), not Patient Position.
    Axial: the plane's normal within AXIAL_TOLERANCE of z, a gantry tilt included; its rows and
    columns along the patient's x and y axes in that plane, each within AXIAL_TOLERANCE. None
    when the slice is standard already, has no orientation, or is rotated by another angle,
    oblique or another plane (which `plane` names)."""
    if orientation is None or not _axial(orientation):
        return None
    r, c = _along(orientation[:3]), _along(orientation[3:])
    if r is None or c is None or r[0] == c[0]:
        return None
    transpose = r[0] == 1  # the stored columns run along y
    # After a transpose the array's columns run along the stored column direction, and its
    # rows along the stored row direction.
    columns_sign, rows_sign = (c[1], r[1]) if transpose else (r[1], c[1])
    turn = Turn(transpose, flip_rows=rows_sign < 0, flip_columns=columns_sign < 0)
    return turn if any(turn) else None


def turned(s: DicomSlice) -> tuple[DicomSlice, str | None]:
    """The slice in the standard axial orientation (`axial_turn`) with a sentence saying how it
    was stored, or the slice itself and None. The turned slice's pixel spacing, orientation and
    image position are those of its turned pixels (the position of its new first pixel; None
    without a pixel spacing, unless that pixel is the stored first one). `slice_position` (the
    stored position's z, the series' order) and `stored`, if kept, stay as stored."""
    turn = axial_turn(s.orientation)
    if turn is None:
        return s, None
    assert s.orientation is not None
    image = s.image.T if turn.transpose else s.image
    stored_row, stored_col = np.asarray(s.orientation[:3]), np.asarray(s.orientation[3:])
    row, col = stored_row, stored_col
    spacing = s.pixel_spacing
    if turn.transpose:
        row, col = col, row
        spacing = None if spacing is None else (spacing[1], spacing[0])
    # The stored (row, column) of the pixel that becomes the first one.
    first = [0, 0]
    if turn.flip_rows:
        image, col, first[0] = image[::-1], -col, image.shape[0] - 1
    if turn.flip_columns:
        image, row, first[1] = image[:, ::-1], -row, image.shape[1] - 1
    if turn.transpose:
        first.reverse()
    position = s.image_position if first == [0, 0] else None
    if s.image_position is not None and s.pixel_spacing is not None:
        offset = (
            first[1] * s.pixel_spacing[1] * stored_row + first[0] * s.pixel_spacing[0] * stored_col
        )
        position = tuple(float(v) for v in np.asarray(s.image_position) + offset)
    sentence = (
        f"stored {turn.stored_as()} (Image Orientation (Patient) "
        f"{'/'.join(f'{v:g}' for v in s.orientation)}): turned to the standard axial orientation"
    )
    out = dataclasses.replace(
        s,
        image=np.ascontiguousarray(image),
        pixel_spacing=spacing,
        orientation=tuple(float(v) + 0.0 for v in (*row, *col)),  # + 0.0: no -0.0
        image_position=position,
    )
    return out, sentence


def doubts(s: DicomSlice, clipped: int = 0) -> list[str]:
    """What is doubtful in a decoded slice's values and scale, a sentence each (the server's
    per-image `warnings`; the dataset build counts the same conditions per file). `clipped`:
    the values `to_int16` clipped after the resample (`outside_int16`)."""
    out = []
    if not s.hounsfield:
        modality = f"Modality {s.modality}" if s.modality else "no Modality"
        out.append(f"not CT ({modality}): its values are not Hounsfield units")
    if clipped:
        out.append(f"{clipped} pixel values outside int16, clipped to it (not Hounsfield units?)")
    where = plane(s)
    if where is not None:
        out.append(where)
    if s.pixel_spacing is None:
        out.append("no pixel spacing: its physical scale is unknown")
    elif not is_square(s.pixel_spacing):
        row, col = s.pixel_spacing
        out.append(
            f"non-square pixels ({row:g} x {col:g} mm): resampled as square, its anatomy is "
            "stretched along one axis"
        )
    return out


class Resampled(NamedTuple):
    """A decoded slice at the records' size, as the dataset builder makes it."""

    slice: DicomSlice  # in the standard axial orientation (`turned`)
    image: np.ndarray  # int16 HU (size, size)
    doubts: list[str]  # `doubts` of the slice
    clipped: int  # values `to_int16` clipped after the resample (`outside_int16`)
    turned: str | None  # how it was turned to the standard axial orientation (`turned`), if it was


def decode_resampled(
    source: str | os.PathLike | bytes | BinaryIO, name: str, size: int
) -> list[Resampled]:
    """Decodes one DICOM file and makes each slice what the network reads, as the dataset
    builder does: `read_dicom`, `turned` to the standard axial orientation (an axial slice
    stored prone, feet first or transposed), then `to_int16(resample(image, size))`, with the
    slice's `doubts` (not CT, clipped values, an oblique or non-axial plane, no or non-square
    pixel spacing). The builder (`tfds_liver.curation.decode_file`), the server and
    `liverjax.predict` read files through it."""
    out = []
    for stored in read_dicom(source, name=name):
        s, turn = turned(stored)
        resampled = resample(s.image, size)
        clipped = outside_int16(resampled)
        out.append(Resampled(s, to_int16(resampled), doubts(s, clipped), clipped, turn))
    return out


def not_ct(slices: Iterable[DicomSlice]) -> str | None:
    """Why a file's slices are not Hounsfield units ("Modality 'MR'", "no Modality"), or None
    when every slice is (CT, or Rescale Type HU)."""
    modalities = sorted({s.modality for s in slices if not s.hounsfield})
    if not modalities:
        return None
    return f"Modality {modalities[0]!r}" if modalities[0] else "no Modality"


def resample(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to square (centred, filled with the image minimum) then resize to float32 size x size.

    The resize is antialiased linear interpolation (a triangle kernel widened by the shrink
    factor, the same weights as `jax.image.resize(..., "linear", antialias=True)`), done as two
    small matrix products. When the padded side already equals `size` the padded image is
    returned unchanged (exact identity for a square input of that size).

    An image more than twice as long as it is wide is never padded in memory (a 1 x 16000 strip
    would make a 16000 x 16000 square): its long side, which needs no padding, is resized first,
    then the short side is padded with what a row of the minimum resizes to and resized. That is
    the same linear map, equal to float32 rounding; images within 2:1 (every CT slice) take the
    square path, so their output does not depend on this.
    """
    if image.ndim != 2 or min(image.shape) == 0:
        raise ValueError(f"resample needs a non-empty 2-D image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"resample size must be >= 1, got {size}")
    rows, cols = image.shape
    side = max(rows, cols)
    if side != size and side > _MAX_ASPECT * min(rows, cols):
        return _resample_long_side_first(np.asarray(image, dtype=np.float32), size)
    square = np.array(image, dtype=np.float32)  # a copy: the result never aliases the input
    if rows != cols:
        top, left = (side - rows) // 2, (side - cols) // 2
        square = np.pad(
            square,
            ((top, side - rows - top), (left, side - cols - left)),
            constant_values=square.min(),
        )
    if side == size:
        return square
    rows_idx, rows_w = _band(side, size)
    # Each output pixel reads only the few input pixels under its kernel: gather that band and
    # weight it (a dense (size, side) matrix product would do ~side/band times more work).
    out = np.einsum("ok,okc->oc", rows_w, square[rows_idx])
    return np.einsum("ok,rok->ro", rows_w, out[:, rows_idx])


def _resample_long_side_first(image: np.ndarray, size: int) -> np.ndarray:
    """`resample` of a long, narrow image without its padded square: memory ~ side x size."""
    if image.shape[0] > image.shape[1]:  # tall: resize the transpose, which is wide
        return np.ascontiguousarray(_resample_long_side_first(image.T, size).T)
    rows, side = image.shape
    index, weights = _band(side, size)
    # The columns: no padding there. Then the (side, size) rows, padded with the minimum's row.
    narrow = np.einsum("ok,rok->ro", weights, image[:, index])
    fill = np.einsum("ok,ok->o", weights, np.full(weights.shape, image.min(), np.float32))
    top = (side - rows) // 2
    padded = np.empty((side, size), np.float32)
    padded[:] = fill
    padded[top : top + rows] = narrow
    return np.einsum("ok,okc->oc", weights, padded[index])


def resampled_spacing(
    pixel_spacing: Sequence[float] | None, shape: tuple[int, ...], size: int
) -> tuple[float, float] | None:
    """(row, col) pixel spacing in mm after `resample(image of this shape, size)`, or None."""
    if pixel_spacing is None:
        return None
    factor = max(shape) / size  # padding keeps the spacing; the resize scales it by side / size
    return (float(pixel_spacing[0]) * factor, float(pixel_spacing[1]) * factor)


@functools.lru_cache(maxsize=16)
def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) antialiased linear interpolation matrix, rows summing to 1."""
    scale = n_out / n_in
    kernel_width = max(1.0 / scale, 1.0)  # widen the triangle when shrinking: antialiasing
    centres = (np.arange(n_out) + 0.5) / scale - 0.5  # output pixel centres in input coordinates
    distance = np.abs(centres[:, None] - np.arange(n_in)[None, :]) / kernel_width
    weights = np.maximum(0.0, 1.0 - distance)
    weights /= weights.sum(axis=1, keepdims=True)
    weights = weights.astype(np.float32)
    weights.flags.writeable = False  # shared through the cache
    return weights


@functools.lru_cache(maxsize=16)
def _band(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero band of `_resize_weights`: (n_out, k) input indices and their weights."""
    weights = _resize_weights(n_in, n_out)
    nonzero = weights > 0
    first = nonzero.argmax(axis=1)
    width = int((nonzero.sum(axis=1)).max())
    index = np.minimum(first[:, None] + np.arange(width)[None, :], n_in - 1)
    band = np.take_along_axis(weights, index, axis=1)
    # Indices clipped at the edge repeat the last pixel: their weight is already in the band once.
    band = np.where(first[:, None] + np.arange(width)[None, :] < n_in, band, 0).astype(np.float32)
    index.flags.writeable = band.flags.writeable = False  # shared through the cache
    return index, band


# ----------------------------------------------------------------------------- reading


def _display_name(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def not_a_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it is no regular file ("a FIFO (named pipe)", "a directory", ...), or
    None for a regular file, or one that cannot be looked at (opening it says why). Links are
    followed. Checked before opening: reading a FIFO would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


@contextlib.contextmanager
def _open(source: str | os.PathLike | bytes | BinaryIO, path: str) -> Iterator[BinaryIO]:
    """A seekable binary file positioned at the start of the data; opened here, closed here."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        kind = not_a_file(source)
        if kind is not None:
            raise DicomError(path, "not_a_file", f"is {kind}, not a regular file")
        try:
            fp = open(source, "rb")  # closed by the `with` below
        except OSError as e:
            raise DicomError(path, "decode_failed", f"cannot open the file: {e}") from e
        with fp:
            yield fp
    elif not source.seekable():
        yield io.BytesIO(source.read())
    else:
        yield source


def _read_dataset(
    fp: BinaryIO, path: str, caught: list[warnings.WarningMessage]
) -> tuple[Dataset, dicom_uid.UID]:
    """Parse the file (with or without file meta) and check that it holds an image."""
    start = fp.tell()
    head = fp.read(_PREAMBLE_BYTES + len(_MAGIC))
    end = fp.seek(0, os.SEEK_END)
    fp.seek(start)
    if not head:
        raise DicomError(path, "empty", "zero-byte file; copy or export it again")
    has_magic = head[_PREAMBLE_BYTES:] == _MAGIC
    if not has_magic and not _starts_like_dataset(head):
        raise DicomError(
            path,
            "not_dicom",
            "not a DICOM file: no 'DICM' marker at byte 128 and "
            "the data does not start with a DICOM element",
        )
    try:
        ds = dcmread(fp, force=True)
    except Exception as e:
        if not has_magic:
            raise DicomError(
                path,
                "not_dicom",
                "not a DICOM file: no 'DICM' marker and the "
                f"data does not parse as DICOM ({type(e).__name__}: {e})",
            ) from e
        if isinstance(e, EOFError | struct.error) or fp.tell() >= end:  # ran out of data
            raise DicomError(
                path,
                "truncated",
                f"the file ends inside a data element ({e}); copy or export it again",
            ) from e
        raise DicomError(path, "decode_failed", f"DICOM structure cannot be parsed: {e}") from e
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise DicomError(
            path, "truncated", f"the file ends too early ({eof[0]}); copy or export it again"
        )
    if not has_magic and not ds.file_meta and not any(k in ds for k in _IDENTIFYING):
        raise DicomError(
            path,
            "not_dicom",
            "not a DICOM file: no 'DICM' marker at byte 128 and "
            "no DICOM identifiers (SOP/study/series UID, modality, pixel data)",
        )
    _check_byte_order(ds, path)  # before the lengths, which read byte-swapped too
    _check_complete(ds, path, has_magic, start, end)
    _check_is_image(ds, path)
    return ds, _transfer_syntax(ds, path)


def _starts_like_dataset(head: bytes) -> bool:
    """True if the first 2 bytes can be the group of a dataset's first tag (LE or BE)."""
    if len(head) < 2:
        return False
    groups = (int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big"))
    return any(g <= _MAX_FIRST_GROUP and g % 2 == 0 for g in groups)


def _check_complete(ds: Dataset, path: str, has_magic: bool, start: int, end: int) -> None:
    """Raise 'truncated' if the file stops before the data it declares (up to Pixel Data).

    pydicom reads a cut file without complaint: it keeps a short last value, drops a last header
    of fewer than 8 bytes and returns an empty dataset for a cut file meta. Trailing padding after
    the pixel data may be short without harming the image, so it is not checked.
    """
    group_length = ds.file_meta.get("FileMetaInformationGroupLength") if ds.file_meta else None
    parsed_end = start
    if has_magic and end - start < _PREAMBLE_BYTES + len(_MAGIC) + _GROUP_LENGTH_BYTES:
        raise DicomError(
            path,
            "truncated",
            "the file ends inside its file meta header "
            f"({end - start} bytes); copy or export it again",
        )
    if has_magic and isinstance(group_length, int):
        parsed_end = start + _PREAMBLE_BYTES + len(_MAGIC) + _GROUP_LENGTH_BYTES + group_length
        if end < parsed_end:
            raise DicomError(
                path,
                "truncated",
                f"the file ends inside its file meta header "
                f"({end - start} of {parsed_end - start} bytes); copy or export it "
                "again",
            )
    # Only the last element read can be cut short: the last inserted, which is also the highest
    # tag in a well-formed file (both are checked, in case the tags are out of order).
    tags = ds.keys()
    for tag in {next(reversed(tags)), max(tags)} if tags else ():
        elem = ds.get_item(tag)
        length = getattr(elem, "length", None)  # raw (not yet converted) elements only
        value = getattr(elem, "value", None)
        if (
            length is None
            or length == _UNDEFINED_LENGTH
            or tag > _PIXEL_DATA_TAG
            or not isinstance(value, bytes | bytearray)
        ):
            continue
        if len(value) < length:
            raise DicomError(
                path,
                "truncated",
                f"the file ends inside element {elem.tag}: "
                f"{length} bytes declared, {len(value)} present; copy or export "
                "it again",
            )
        parsed_end = max(parsed_end, elem.value_tell + length)
    if has_magic and len(ds) == 0 and end - parsed_end >= _ELEMENT_HEADER_BYTES:
        # pydicom discards the whole dataset when the file ends inside an undefined-length value
        raise DicomError(
            path,
            "truncated",
            f"none of the {end - parsed_end} bytes after the file"
            " meta form a complete dataset; copy or export it again",
        )
    if not _has_pixels(ds) and 0 < end - parsed_end < _ELEMENT_HEADER_BYTES:
        raise DicomError(
            path,
            "truncated",
            f"the file ends inside an element header "
            f"{end - parsed_end} bytes after the last element; copy or export it "
            "again",
        )


def _check_is_image(ds: Dataset, path: str) -> None:
    """Raise 'not_image' for DICOMDIRs and non-image objects, 'no_pixels' if pixels are absent."""
    media_class = ds.file_meta.get("MediaStorageSOPClassUID", "") if ds.file_meta else ""
    is_directory = _TAGS["DirectoryRecordSequence"] in ds
    if media_class == dicom_uid.MediaStorageDirectoryStorage or is_directory:
        raise DicomError(
            path,
            "not_image",
            "a DICOMDIR (an index of a DICOM media), not an "
            "image; read the image files it lists instead",
        )
    sop_class = dicom_uid.UID(_text(ds, "SOPClassUID") or str(media_class))
    has_pixels = _has_pixels(ds)
    if sop_class in _SEGMENTATION_CLASSES:
        raise DicomError(
            path,
            "not_image",
            f"a {_class_name(sop_class)} object (a label map, not "
            "an image); export masks as an image series to use them",
        )
    if has_pixels:
        return
    if sop_class.type == "SOP Class" and "Image" not in sop_class.name:
        raise DicomError(
            path,
            "not_image",
            f"a {sop_class.name} object ({_text(ds, 'Modality')})"
            " has no image; only image objects can be decoded",
        )
    raise DicomError(
        path,
        "no_pixels",
        f"no Pixel Data element in this "
        f"{_class_name(sop_class)} object (or the file was cut short before it); "
        "nothing to decode",
    )


# Groups of an image's data set (identification, patient, acquisition, relationship, image
# pixel) and what they read as in the other byte order.
_IMAGE_GROUPS = (0x0008, 0x0010, 0x0018, 0x0020, 0x0028)
_SWAPPED_GROUPS = frozenset(((g & 0xFF) << 8) | (g >> 8) for g in _IMAGE_GROUPS)


def _check_byte_order(ds: Dataset, path: str) -> None:
    """A data set read in the wrong byte order (file meta of one endianness over a data set of
    the other) parses as byte-swapped tags and no pixels: say so, not "no Pixel Data"."""
    groups = {tag.group for tag in ds.keys()}
    if groups & _SWAPPED_GROUPS and not groups & set(_IMAGE_GROUPS):
        ts = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
        said = f"the file meta says {dicom_uid.UID(ts).name}" if ts else "no file meta says it"
        raise DicomError(
            path,
            "decode_failed",
            f"the data set's byte order is not the one it was read in ({said}): its tags read "
            "byte-swapped, e.g. (0800,1600) for SOP Class UID (0008,0016); fix the file meta's "
            "Transfer Syntax UID",
        )


def _has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


def _class_name(sop_class: dicom_uid.UID) -> str:
    return sop_class.name if sop_class else "DICOM (no SOP Class UID)"


_DICOM_TRANSFER_SYNTAX_ROOT = "1.2.840.10008.1.2."  # every standard transfer syntax's UID


def _transfer_syntax(ds: Dataset, path: str) -> dicom_uid.UID:
    """The file meta's transfer syntax, or one guessed from the encoding and pixel data."""
    ts = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if ts:
        ts = dicom_uid.UID(ts)
        if not ts.is_transfer_syntax:
            named = f"{ts.name} ({ts})" if ts.name != ts else str(ts)
            if ts.is_private:
                raise DicomError(
                    path,
                    "unsupported",
                    f"the Transfer Syntax UID {named} is a private (vendor) syntax that no "
                    "decoder reads; export the file in a standard transfer syntax",
                )
            if ts.startswith(_DICOM_TRANSFER_SYNTAX_ROOT):
                raise DicomError(
                    path,
                    "unsupported",
                    f"the Transfer Syntax UID {named} is not one the installed pydicom knows "
                    "(a newer standard syntax?); no decoder reads it",
                )
            raise DicomError(
                path,
                "decode_failed",
                f"the file meta's Transfer Syntax UID {named} is not a transfer syntax; fix it",
            )
        if keyword is None:
            return ts
        if ts.is_compressed and not _looks_encapsulated(ds, keyword):
            return _native_under_compressed(ds, keyword, ts, path)
        if ts.is_compressed or not _looks_encapsulated(ds, keyword):
            return ts
        # Encapsulated (compressed) pixel data under a native syntax: a converter rewrote the
        # file meta but not the pixels. Read natively it would be garbage; the codestream says
        # what it is.
        elem = ds[keyword]
        fragment = _item_fragment(elem.value)
        guessed = _codestream_header(fragment)[0] if fragment is not None else None
        if guessed is not None:
            ds.file_meta.TransferSyntaxUID = guessed  # pydicom's decoders check it
            return guessed
        declared = _declared_native(ds)
        if (
            not elem.is_undefined_length
            and declared is not None
            and len(elem.value) == declared.pixel_bytes
        ):
            # Native pixels that happen to begin with an item tag's bytes (FE FF 00 E0: 8-bit
            # values 254 255 0 224, or 16-bit 65534 57344).
            return ts
        problem = (
            "its items are malformed"
            if fragment is None
            else "the codestream is not JPEG, JPEG-LS, JPEG 2000 or RLE"
        )
        raise DicomError(
            path,
            "decode_failed",
            f"the Pixel Data is encapsulated (compressed) "
            f"but the Transfer Syntax UID says {ts.name} ({ts}), and {problem}; "
            "fix the file meta's Transfer Syntax UID",
        )
    if not ds[keyword].is_undefined_length:  # native pixels: only the byte order matters
        implicit, little = ds.original_encoding
        if not little:
            return dicom_uid.ExplicitVRBigEndian
        return dicom_uid.ImplicitVRLittleEndian if implicit else dicom_uid.ExplicitVRLittleEndian
    guessed = _sniff_codec(ds[keyword].value)
    if guessed is None:
        raise DicomError(
            path,
            "unsupported",
            "compressed pixel data without a Transfer Syntax "
            "UID, in a format that is not JPEG, JPEG-LS, JPEG 2000 or RLE; add file "
            "meta with the transfer syntax",
        )
    return guessed


def _native_under_compressed(
    ds: Dataset, keyword: str, ts: dicom_uid.UID, path: str
) -> dicom_uid.UID:
    """Pixel Data that is not encapsulated under a compressed syntax: a writer stored raw pixels
    (``PixelData = array.tobytes()``) and left the old Transfer Syntax UID. Of exactly the size
    the header declares, they are native pixels in the data set's own encoding (Explicit VR
    Little Endian, as every compressed syntax encodes the data set); otherwise an error."""
    declared = _declared_native(ds)
    have = len(ds[keyword].value)
    if declared is not None and have == declared.pixel_bytes:
        ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian  # the decoders check it
        return dicom_uid.ExplicitVRLittleEndian
    native = f"{declared.pixel_bytes} bytes" if declared is not None else "unknown"
    raise DicomError(
        path,
        "decode_failed",
        f"the Transfer Syntax UID says {ts.name} ({ts}), compressed, but the Pixel Data is not "
        f"encapsulated (a plain {have}-byte value; the header's uncompressed size: {native}); "
        "fix the file meta's Transfer Syntax UID",
    )


_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: the first item of encapsulated data


def _looks_encapsulated(ds: Dataset, keyword: str) -> bool:
    """Pixel data in items (Basic Offset Table, fragments), whatever length its element has."""
    elem = ds[keyword]
    return elem.is_undefined_length or (
        isinstance(elem.value, bytes) and elem.value[:4] == _ITEM_TAG
    )


def _item_fragment(value: bytes) -> bytes | None:
    """The first fragment if `value` is laid out as encapsulated items, else None.

    Encapsulated: an item (the Basic Offset Table, a multiple of 4 bytes long) and right after it
    a second item (the first fragment, not empty). Native pixels that begin with an item tag's
    bytes almost never also have the second one where the first one's length points.
    """
    if len(value) < 2 * _ELEMENT_HEADER_BYTES or value[:4] != _ITEM_TAG:
        return None
    (table,) = struct.unpack_from("<I", value, 4)
    first = _ELEMENT_HEADER_BYTES + table
    if (
        table % 4
        or first + _ELEMENT_HEADER_BYTES > len(value)
        or (value[first : first + 4] != _ITEM_TAG)
    ):
        return None
    (length,) = struct.unpack_from("<I", value, first + 4)
    if length in (0, _UNDEFINED_LENGTH):
        return None
    return value[first + _ELEMENT_HEADER_BYTES : first + _ELEMENT_HEADER_BYTES + length]


def _sniff_codec(encapsulated: bytes) -> dicom_uid.UID | None:
    """The transfer syntax of encapsulated pixel data, from its first fragment's signature."""
    return _codestream_header(_first_fragment(encapsulated))[0]


def _first_fragment(encapsulated: bytes) -> bytes:
    buffer = io.BytesIO(encapsulated)
    parse_basic_offsets(buffer)
    return next(generate_fragments(buffer), b"")


def _codestream_header(fragment: bytes) -> tuple[dicom_uid.UID | None, tuple[int, int] | None]:
    """(transfer syntax, (rows, cols)) read from a compressed frame's header; None if unknown."""
    if fragment[:2] == b"\xff\xd8":
        return _jpeg_header(fragment)
    if fragment.startswith(_J2K_STARTS[0]):  # SIZ: Xsiz, Ysiz, XOsiz, YOsiz after Lsiz, Rsiz
        x, y, x0, y0 = struct.unpack_from(">4I", fragment, _J2K_SIZ_OFFSET)
        return dicom_uid.JPEG2000, (y - y0, x - x0)  # decoders also read lossless and HTJ2K
    if fragment.startswith(_J2K_STARTS[1]):
        return dicom_uid.JPEG2000, None
    if len(fragment) >= _RLE_HEADER_BYTES:
        segments, first_offset = struct.unpack_from("<2I", fragment)
        if 1 <= segments <= _RLE_MAX_SEGMENTS and first_offset == _RLE_HEADER_BYTES:
            return dicom_uid.RLELossless, None
    return None, None


def _jpeg_header(data: bytes) -> tuple[dicom_uid.UID | None, tuple[int, int] | None]:
    """Walk the JPEG markers to the frame header: baseline, extended, lossless or JPEG-LS."""
    pos, found, size = 2, None, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_MARKERS_WITHOUT_LENGTH:
            pos += 2
            continue
        if marker in _JPEG_SOF and pos + 9 <= len(data):  # Lf, P, then Y and X (2 bytes each)
            found, size = _JPEG_SOF[marker], struct.unpack_from(">2H", data, pos + 5)
            if found != dicom_uid.JPEGLSLossless:
                return found, size
        if marker == _JPEG_SOS and found is not None:  # JPEG-LS: NEAR follows the components
            near_at = pos + 5 + 2 * data[pos + 4]
            near = data[near_at] if near_at < len(data) else 0
            return (dicom_uid.JPEGLSNearLossless if near else found), size
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return found, size


def _check_frame_size(ds: Dataset, ts: dicom_uid.UID, path: str) -> None:
    """A compressed frame must be Rows x Columns: a corrupt header could make a plugin decode a
    huge image (minutes, gigabytes) only for pydicom to reject it afterwards. Native pixel data
    must not hold a whole frame more than the header declares (`_check_native_length`)."""
    keyword = next(k for k in _PIXEL_KEYWORDS if k in ds)
    if not ts.is_compressed:
        _check_native_length(ds, keyword, path)
        return
    if not ds[keyword].is_undefined_length:
        return
    _, size = _codestream_header(_first_fragment(ds[keyword].value))
    declared = (ds.get("Rows"), ds.get("Columns"))
    if size is not None and size[0] != 0 and size != declared:  # JPEG may put rows in DNL: 0
        raise DicomError(
            path,
            "decode_failed",
            f"the compressed frame is {size[0]}x{size[1]} "
            f"pixels but Rows x Columns say {declared[0]}x{declared[1]}; the file "
            "is corrupt",
        )


def _check_native_length(ds: Dataset, keyword: str, path: str) -> None:
    """Bytes beyond the declared frames are ignored when they are less than a frame (padding);
    a frame's worth or more means the header understates the image (a converter dropped
    NumberOfFrames, or Rows and Columns are wrong): read as declared it would lose frames or
    garble rows, so it is an error."""
    elem = ds[keyword]
    size = _declared_native(ds)
    if elem.is_undefined_length or size is None or not isinstance(elem.value, bytes):
        return
    frame_bits = size.rows * size.columns * size.samples * size.bits_allocated
    excess_bits = 8 * (len(elem.value) - size.pixel_bytes)  # beyond the even-padded length
    if frame_bits <= 0 or excess_bits < frame_bits:
        return
    held = 8 * len(elem.value) // frame_bits
    frames = ds.get("NumberOfFrames")
    said = f"NumberOfFrames {frames}" if frames not in (None, "") else "no NumberOfFrames (1)"
    raise DicomError(
        path,
        "decode_failed",
        f"the Pixel Data holds {len(elem.value)} bytes, {held} frames of "
        f"{size.rows}x{size.columns} pixels, but the header says {said}; fix NumberOfFrames, "
        "or Rows and Columns",
    )


# ----------------------------------------------------------------------------- decoding


def _decode(
    ds: Dataset, ts: dicom_uid.UID, path: str, keep_stored: bool = False
) -> list[DicomSlice]:
    """Decode the pixel data and build one DicomSlice per frame."""
    _check_frame_size(ds, ts, path)
    frames, props = _pixels(ds, ts, path)
    photometric = str(ds.get("PhotometricInterpretation", props["photometric_interpretation"]))
    samples = int(props["samples_per_pixel"])
    n_frames = frames.shape[0]
    monochrome1 = photometric == "MONOCHROME1" and not _in_hounsfield_units(ds)
    if samples == _COLOR_SAMPLES or photometric == "PALETTE COLOR":
        images = _luma(frames, ds, props, path)
        rescales = [(1.0, 0.0)] * n_frames
        reflections: list[float | None] = [None] * n_frames
    elif samples == 1:
        if frames.dtype.kind == "f" and not np.isfinite(frames).all():
            bad = int(np.count_nonzero(~np.isfinite(frames)))
            raise DicomError(
                path,
                "decode_failed",
                f"{bad} of {frames.size} float pixel values "
                "are NaN or infinite; the file's pixel data is corrupt",
            )
        rescales = [_rescale(ds, i, path) for i in range(n_frames)]
        padding = _padding_mask(ds, ts, frames, props, path)
        images = _grayscale(frames, ds, props, rescales, monochrome1)
        if padding is not None:
            _fill_padding(images, padding, _text(ds, "Modality"))
        if not all(_fast_rescale(frames.dtype, *r) for r in rescales):
            _check_finite(images, rescales, path)
        reflections = [
            _reflection(ds, props, r, frames.dtype) if monochrome1 else None for r in rescales
        ]
    else:
        raise DicomError(
            path,
            "unsupported",
            f"{samples} samples per pixel; only 1 (grayscale) and 3 (colour) are decoded",
        )
    common = _common_metadata(ds, ts, photometric, samples != 1 or photometric == "PALETTE COLOR")
    return [
        DicomSlice(
            image=images[i],
            **common,
            **_frame_metadata(ds, i, n_frames, rescales[i], reflections[i]),
            hounsfield=_in_hounsfield_units(ds),
            stored=frames[i] if keep_stored else None,
        )
        for i in range(n_frames)
    ]


def _in_hounsfield_units(ds: Dataset) -> bool:
    """Whether the modality transform gives Hounsfield units (CT, or Rescale Type HU): their
    values mean the same whatever the Photometric Interpretation, which only says how to show
    them (MONOCHROME1: the lowest HU white)."""
    return _text(ds, "Modality").upper() == "CT" or _text(ds, "RescaleType").upper() == "HU"


def _check_finite(images: np.ndarray, rescales: list[tuple[float, float]], path: str) -> None:
    """Finite stored values with a huge slope can overflow float32 (to inf, then 32767)."""
    finite = np.isfinite(images)
    if finite.all():
        return
    frame = int(np.argmin(finite.reshape(len(images), -1).all(axis=1)))
    slope, intercept = rescales[frame]
    raise DicomError(
        path,
        "decode_failed",
        f"{finite.size - np.count_nonzero(finite)} of "
        f"{finite.size} pixel values overflow float32 after the rescale (frame "
        f"{frame}: RescaleSlope {slope:g}, RescaleIntercept {intercept:g}); fix the "
        "tags to get correct pixel values",
    )


def _pixels(ds: Dataset, ts: dicom_uid.UID, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decoded pixels as (frames, rows, cols[, samples]) and pydicom's pixel properties."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise DicomError(
            path,
            "unsupported",
            f"no decoder exists for transfer syntax {ts.name} "
            f"({ts}); convert the file to an uncompressed syntax",
        ) from e
    if not decoder.is_available:
        raise DicomError(
            path,
            "unsupported",
            f"transfer syntax {ts.name} needs a plugin that is "
            f"not installed: {'; '.join(decoder.missing_dependencies)}",
        )
    try:
        # view_only: native data is not copied here, the float conversion below copies it. Not
        # when bits above Bits Stored must be masked (12 of 16 in most CT): pydicom then masks a
        # copy anyway, and asked for a view it logs a warning for every such file.
        view = _get(ds, "BitsStored") == _get(ds, "BitsAllocated")
        # The frame count is NumberOfFrames (1 when absent): bytes beyond it are padding, not
        # frames (pydicom would otherwise return a frame for every further Rows x Columns);
        # _check_native_length refused a whole frame more.
        arr, props = decoder.as_array(ds, view_only=view, allow_excess_frames=False)
    except ValueError as e:
        if "less than expected" in str(e):
            raise DicomError(path, "truncated", f"the pixel data is cut short: {e}") from e
        raise DicomError(
            path,
            "decode_failed",
            f"pixel data cannot be decoded: {e}; check the "
            "Image Pixel elements (Rows, Columns, Bits, Frames)",
        ) from e
    except (AttributeError, KeyError, TypeError) as e:
        raise DicomError(
            path,
            "decode_failed",
            f"pixel data cannot be decoded: {e}; the Image Pixel module is incomplete",
        ) from e
    except RuntimeError as e:
        reasons = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        if reasons and all("not support" in line for line in reasons):
            raise DicomError(
                path,
                "unsupported",
                f"no installed plugin decodes this {ts.name} data: {'; '.join(reasons)}",
            ) from e
        raise DicomError(path, "decode_failed", f"pixel data cannot be decoded: {e}") from e
    single_frame_ndim = 2 if int(props["samples_per_pixel"]) == 1 else 3
    return (arr[np.newaxis] if arr.ndim == single_frame_ndim else arr), props


def _grayscale(
    frames: np.ndarray,
    ds: Dataset,
    props: dict[str, Any],
    rescales: list[tuple[float, float]],
    monochrome1: bool,
) -> np.ndarray:
    """Stored values -> float32 modality values (HU for CT), MONOCHROME1 reflected."""
    if _has_modality_lut(ds):
        out = apply_modality_lut(frames, ds).astype(np.float32)
        if monochrome1:  # reflect inside the LUT's output range
            np.subtract(np.float32(_reflection(ds, props, rescales[0], frames.dtype)), out, out=out)
        return out
    if monochrome1:
        frames = _reflect_stored(frames, props)
    out = np.empty(frames.shape, dtype=np.float32)
    if len(set(rescales)) == 1:
        _rescale_into(frames, *rescales[0], out)
    else:  # enhanced multi-frame objects may rescale each frame differently
        for i, (slope, intercept) in enumerate(rescales):
            _rescale_into(frames[i], slope, intercept, out[i])
    return out


def _padding_mask(
    ds: Dataset, ts: dicom_uid.UID, frames: np.ndarray, props: dict[str, Any], path: str
) -> np.ndarray | None:
    """Where the stored values are Pixel Padding (outside the scanned field of view), or None.

    PixelPaddingValue alone marks one stored value; with PixelPaddingRangeLimit, every stored
    value between the two, inclusive (PS3.3 C.7.5.1.1.2). Compared before any rescale or
    MONOCHROME1 reflection, in the sign of Pixel Representation.
    """
    pad = _int(_strings(ds, "PixelPaddingValue"))
    if pad is None or frames.dtype.kind not in "iu":
        return None
    limit = _int(_strings(ds, "PixelPaddingRangeLimit"))
    bits = 8 * frames.dtype.itemsize
    values = [v for v in (pad, limit) if v is not None]
    # The tags are US or SS whatever the pixels are: the same bits, read in the pixels' sign.
    if frames.dtype.kind == "i":
        values = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in values]
    else:
        values = [v + (1 << bits) if v < 0 else v for v in values]
    lo, hi = min(values), max(values)
    info = np.iinfo(frames.dtype)
    if hi < info.min or lo > info.max:
        raise DicomError(
            path,
            "decode_failed",
            f"PixelPaddingValue {pad} (range limit {limit}) "
            f"cannot occur in {frames.dtype} pixels; fix the tag",
        )
    lo, hi = max(lo, info.min), min(hi, info.max)
    stored_lo, stored_hi = _stored_range(props)
    if lo < stored_lo or hi > stored_hi:
        # A padding value beyond Bits Stored (63536 with 12 of 16 bits) is in the bits that the
        # decoder masked off: look for it in the pixel cells as the file has them.
        frames = _native_cells(ds, ts, frames, props)
    mask = (frames == lo) if lo == hi else ((frames >= lo) & (frames <= hi))
    return mask if mask.any() else None


def _native_cells(
    ds: Dataset, ts: dicom_uid.UID, frames: np.ndarray, props: dict[str, Any]
) -> np.ndarray:
    """The pixel cells of native Pixel Data with the bits above Bits Stored kept; else `frames`.

    Compressed data has no such bits (a codec keeps the stored ones), nor has packed 1-bit data.
    """
    value = ds.get("PixelData") if not ts.is_compressed else None
    if not isinstance(value, bytes) or int(props["bits_allocated"]) != 8 * frames.dtype.itemsize:
        return frames
    dtype = frames.dtype.newbyteorder("<" if ts.is_little_endian else ">")
    if len(value) < frames.size * dtype.itemsize:
        return frames
    return np.frombuffer(value, dtype, frames.size).reshape(frames.shape)


# What an image of nothing but padding becomes in CT: air.
CT_PADDING_HU = -1024.0


def _fill_padding(images: np.ndarray, mask: np.ndarray, modality: str) -> None:
    """Padding pixels -> the frame's darkest other value, so that they window like background.

    Not a fixed value: out of the field of view, scanners store -2000, -3024 or +63536, and
    lossy compression leaves the background around the padding value rather than at it. A frame
    of padding alone becomes CT_PADDING_HU in CT, 0 otherwise.
    """
    for image, pad in zip(images, mask, strict=True):
        if pad.all():
            image[...] = CT_PADDING_HU if modality == "CT" else 0.0
        elif pad.any():
            image[pad] = image[~pad].min()


def _fast_rescale(dtype: np.dtype, slope: float, intercept: float) -> bool:
    """Whether stored values of this dtype rescale exactly in float32 (and cannot overflow it)."""
    return (
        slope == 1.0
        and intercept.is_integer()
        and abs(intercept) <= _FLOAT32_EXACT_INT
        and dtype.kind in "iu"
        and dtype.itemsize <= _FAST_PATH_MAX_ITEMSIZE
    )


def _rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """out = stored * slope + intercept, exact to float32 (one rounding)."""
    if _fast_rescale(stored.dtype, slope, intercept):
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32)  # exact in float32
        return
    wide = stored.astype(np.float64)
    if slope != 1.0:
        wide *= slope
    if intercept != 0.0:
        wide += intercept
    out[...] = wide


def _stored_range(props: dict[str, Any]) -> tuple[int, int]:
    bits = int(props["bits_stored"])
    if int(props.get("pixel_representation", 0)):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _reflect_stored(frames: np.ndarray, props: dict[str, Any]) -> np.ndarray:
    """MONOCHROME1 -> MONOCHROME2 on stored values: s -> lo + hi - s, exact in integers."""
    if frames.dtype.kind == "f":
        return -frames  # float pixel data has no BitsStored range: mirror around 0
    if frames.dtype.kind == "i":
        return np.invert(frames)  # -1 - s: lo + hi = -1 for two's complement
    _, hi = _stored_range(props)
    return hi - frames


def _has_modality_lut(ds: Dataset) -> bool:
    """A Modality LUT Sequence and no Rescale Slope value (an empty element is no value)."""
    return bool(ds.get("ModalityLUTSequence")) and _get(ds, "RescaleSlope") is None


def _reflection(
    ds: Dataset, props: dict[str, Any], rescale: tuple[float, float], dtype: np.dtype
) -> float:
    """c such that a MONOCHROME1 output value v becomes c - v (used for the window centre)."""
    slope, intercept = rescale
    if dtype.kind == "f":
        return 2 * intercept  # float pixels are mirrored around 0 before the rescale
    lo, hi = _stored_range(props)
    if _has_modality_lut(ds):
        ends = apply_modality_lut(np.array([lo, hi]), ds).astype(np.float64)
        return float(ends.min() + ends.max())
    return slope * (lo + hi) + 2 * intercept


def _luma(frames: np.ndarray, ds: Dataset, props: dict[str, Any], path: str) -> np.ndarray:
    """Colour frames (RGB, YBR or palette) -> float32 BT.601 luma."""
    photometric = str(props["photometric_interpretation"])  # after decoding: YBR is now RGB
    if photometric == "PALETTE COLOR":
        frames = apply_color_lut(frames, ds)
    elif photometric != "RGB":
        raise DicomError(
            path,
            "unsupported",
            f"colour space {photometric} cannot be converted "
            "to RGB; convert the file to RGB or YBR_FULL",
        )
    return np.matmul(frames.astype(np.float32), LUMA_WEIGHTS)


# ----------------------------------------------------------------------------- metadata


def _common_metadata(
    ds: Dataset, ts: dicom_uid.UID, photometric: str, color: bool
) -> dict[str, Any]:
    """Fields shared by every frame of the object."""
    return dict(
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality"),
        image_type=tuple(v.strip().upper() for v in _strings(ds, "ImageType") or ()),
        instance_number=_int(_strings(ds, "InstanceNumber")),
        photometric=photometric,
        color_converted=color,
        transfer_syntax=str(ts),
    )


def _frame_metadata(
    ds: Dataset, frame: int, n_frames: int, rescale: tuple[float, float], reflection: float | None
) -> dict[str, Any]:
    """Fields that may differ per frame (enhanced multi-frame functional groups, dose grids)."""
    spacing = _spacing(_frame_strings(ds, frame, "PixelMeasuresSequence", "PixelSpacing"))
    if spacing is None:  # projection radiographs give the spacing at the detector only
        spacing = _spacing(_strings(ds, "ImagerPixelSpacing"))
    position = _floats(
        _frame_strings(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3
    )
    offsets = (
        _floats(_strings(ds, "GridFrameOffsetVector"), n_frames, finite=False)
        if n_frames > 1
        else None
    )
    if position is not None and offsets is not None:
        # GridFrameOffsetVector: relative to the first frame's z if it starts at 0, else absolute
        z = position[2] + offsets[frame] if offsets[0] == 0 else offsets[frame]
        position = (position[0], position[1], z)
    slice_position = position[2] if position is not None else _float(_strings(ds, "SliceLocation"))
    center = _float(_frame_strings(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _float(_frame_strings(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if reflection is not None and center is not None:
        center = reflection - center  # MONOCHROME1: the window follows the reflected values
    orientation = _floats(
        _frame_strings(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    )
    return dict(
        frame=frame if n_frames > 1 else None,
        pixel_spacing=spacing,
        image_position=position,
        orientation=orientation,
        slice_position=slice_position,
        window_center=center,
        window_width=width,
        rescale_slope=rescale[0],
        rescale_intercept=rescale[1],
        referenced_sop_uids=_referenced_uids(ds, frame),
    )


def _rescale(ds: Dataset, frame: int, path: str) -> tuple[float, float]:
    """(slope, intercept) of one frame; a missing tag counts as 1 / 0, a bad one is an error."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = _frame_strings(ds, frame, "PixelValueTransformationSequence", keyword)
        try:
            value = _float(raw, strict=True)
        except ValueError as e:
            text = "\\".join(raw or [])
            raise DicomError(
                path,
                "decode_failed",
                f"{keyword} {text!r} is not a number; fix the tag to get correct pixel values",
            ) from e
        values.append(default if value is None else value)
    if not all(np.isfinite(values)) or values[0] == 0:
        raise DicomError(
            path,
            "decode_failed",
            f"RescaleSlope/Intercept {values} cannot map "
            "stored values; fix the tags to get correct pixel values",
        )
    return values[0], values[1]


def _frame_strings(ds: Dataset, frame: int, macro: str, keyword: str) -> list[str] | None:
    """The frame's functional-group value, else the shared one, else the top-level attribute.

    The most specific value wins: an enhanced object that also carries a top-level copy (not
    conformant, but written by some converters) is read by its per-frame values.
    """
    if not ds.get_item(_TAGS["SharedFunctionalGroupsSequence"]) and not (
        ds.get_item(_TAGS["PerFrameFunctionalGroupsSequence"])
    ):
        return _strings(ds, keyword)
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = _get(ds, groups)
        if items and index < len(items):
            inner = _get(items[index], macro)
            if inner:
                values = _strings(inner[0], keyword)
                if values is not None:
                    return values
    return _strings(ds, keyword)


def _referenced_uids(ds: Dataset, frame: int) -> tuple[str, ...]:
    """SOP Instance UIDs this object derives from: Referenced/Source Image Sequences."""
    holders = [ds]
    if ds.get_item(_TAGS["PerFrameFunctionalGroupsSequence"]) is not None:
        per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
        if per_frame and frame < len(per_frame):
            holders.extend(_get(per_frame[frame], "DerivationImageSequence") or [])
    uids: list[str] = []
    for holder in holders:
        for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
            if holder.get_item(_TAGS[keyword]) is None:
                continue
            for item in _get(holder, keyword) or []:
                uid = _text(item, "ReferencedSOPInstanceUID")
                if uid and uid not in uids:
                    uids.append(uid)
    return tuple(uids)


# Tags of the elements read here, looked up once: reading by tag skips pydicom's keyword lookup.
_TAGS = {
    keyword: tag_for_keyword(keyword)
    for keyword in (
        "PixelPaddingValue",
        "PixelPaddingRangeLimit",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Modality",
        "RescaleType",
        "InstanceNumber",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "ImageType",
        "GridFrameOffsetVector",
        "SliceLocation",
        "WindowCenter",
        "WindowWidth",
        "RescaleSlope",
        "RescaleIntercept",
        "ReferencedSOPInstanceUID",
        "ReferencedImageSequence",
        "SourceImageSequence",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DirectoryRecordSequence",
    )
}
# Value representations stored as backslash-separated ASCII text (PS3.5 6.2): parsed from the raw
# bytes here, which is several times faster than pydicom's general value conversion.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})


@functools.cache
def _dictionary_vr(tag: int) -> str | None:
    """The VR the DICOM dictionary gives `tag` (None for a tag it does not know)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _strings(ds: Dataset, keyword: str) -> list[str] | None:
    """An element's values as stripped strings, or None when absent or empty."""
    elem = ds.get_item(_TAGS[keyword])
    if elem is None:
        return None
    value = elem.value
    # A raw element of an Implicit VR file has VR None: its dictionary VR tells whether it is
    # text (a binary Pixel Padding Value 0 is b"\x00\x00", which would read as "absent").
    vr = elem.VR if elem.VR is not None else _dictionary_vr(_TAGS[keyword])
    if isinstance(value, bytes) and vr in _ASCII_VRS and value.isascii():
        parts = [part.strip(" \x00") for part in value.decode("ascii").split("\\")]
    else:  # already converted, another VR, or non-ASCII text: let pydicom decode it
        value = _get(ds, keyword)
        if value is None:
            return None
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        parts = [str(item).strip() for item in items]
    return parts if any(parts) else None


def _text(ds: Dataset, keyword: str) -> str:
    """The first value of a text element, or ""."""
    values = _strings(ds, keyword)
    return values[0] if values else ""


def _get(ds: Dataset, keyword: str) -> Any:
    """ds.keyword, or None when absent, empty or unreadable (optional metadata never fails)."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed optional element: treated as absent, by design
        return None
    return None if value is None or value == "" else value


def _float(values: list[str] | None, strict: bool = False) -> float | None:
    """The first value as a float; None if absent; invalid -> None, or ValueError if strict."""
    if not values or not values[0]:
        return None
    try:
        return float(values[0])
    except ValueError:
        if strict:
            raise
        return None


def _int(values: list[str] | None) -> int | None:
    number = _float(values)
    return int(number) if number is not None and np.isfinite(number) else None


def _spacing(values: list[str] | None) -> tuple[float, float] | None:
    """(row, column) spacing in mm, or None if absent or not two positive finite numbers
    (`0\\0` and `nan` are written by some exporters for "unknown")."""
    while values and not values[-1]:  # `0.7\\0.7\\`: a trailing separator some writers add
        values = values[:-1]
    spacing = _floats(values, 2)
    if spacing is None or not all(math.isfinite(v) and v > 0 for v in spacing):
        return None
    return spacing


def _floats(
    values: list[str] | None, count: int, *, finite: bool = True
) -> tuple[float, ...] | None:
    """Exactly `count` finite numbers, or None if absent or malformed. `finite=False`: NaN and
    infinities are kept (one bad value of a per-frame list spoils only its own frame)."""
    if values is None or len(values) != count:
        return None
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        return None
    return numbers if not finite or all(map(math.isfinite, numbers)) else None
