"""labels.csv: read, validate and write per-image labels; derive them from mask series.

The file format (README.md, "Your DICOM → records"): one row per labelled image or series.

* required columns ``patient_id`` and ``label`` (``normal``/``lesion``, any case, or ``0``/``1``);
* per row exactly one of ``path`` (relative to the manual dir, ``/``-separated; a file, or a folder
  meaning every slice of that series) or ``sop_instance_uid`` (a DICOM UID: digits and dots);
* optional ``sex`` (``M``/``F``/``O``), ``exam_date`` (``YYYYMMDD`` or ``YYYY-MM-DD``),
  ``diagnosis``, ``source``, ``notes``.

Column names are matched ignoring case and surrounding spaces. A column that is none of these is an
error (a typo such as ``lable`` must not pass silently) unless its name starts with ``x_``: such
columns are yours, are ignored here and are not written back. Values are trimmed; an empty
optional value is ``None``. Blank lines are skipped; a UTF-8 byte-order mark is accepted. Every
problem in the file is collected and raised as one :class:`LabelError` that names the line
(header = line 1) and column of each.

``python -m tfds_liver.labels check labels.csv`` validates a file; ``python -m tfds_liver.labels
from-masks ...`` writes one from lesion (and organ) mask series, see :func:`labels_from_masks`:
an image is ``lesion`` when any lesion mask has at least ``--min-lesion-pixels`` set pixels on it,
``normal`` when every lesion mask has a slice for it with none and the organ mask (if given) is set
on it, and left out otherwise (each reason counted): a lesion mask without a slice for an image does
not say that it is normal, unless ``--uncovered-as-normal`` (masks that store only the slices with a
lesion). A mask pixel is set when its stored value (as in the file, before any rescale; Pixel
Padding tags are ignored) is non-zero, or with ``--lesion-values`` / ``--organ-values`` one of the
values given (label maps such as LiTS: 1 liver, 2 tumour); a mask series holding several non-zero
values without such a list is an error. Mask slices are matched to image slices by the first rule
that every slice supports: SOPInstanceUID reference, ImagePositionPatient (to 0.01 mm),
InstanceNumber, file name; a mask slice that then matches no image, or a different rows x columns,
is an error. DICOM SEG objects are not read.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import difflib
import io
import os
import pathlib
import posixpath
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

LABEL_NAMES = ("normal", "lesion")
REQUIRED = ("patient_id", "label")
LOCATORS = ("path", "sop_instance_uid")  # each row has exactly one of these
OPTIONAL = ("sex", "exam_date", "diagnosis", "source", "notes")
COLUMNS = REQUIRED + LOCATORS + OPTIONAL  # also the order in which write_labels writes them
USER_COLUMN_PREFIX = "x_"  # columns named x_... are the user's own: accepted and ignored
SEXES = ("M", "F", "O")  # DICOM PatientSex (0010,0040) values
MAX_UID_CHARS = 64  # DICOM PS3.5 §9.1: a UID is at most 64 characters
MAX_PATIENT_ID_CHARS = 64  # PatientID is VR LO: at most 64 characters
MAX_LISTED_ERRORS = 50  # LabelError lists this many problems, then counts the rest
MAX_SHOWN_VALUE_CHARS = 40  # a bad value is quoted in an error up to this length

_LABEL_VALUES = {"normal": 0, "lesion": 1, "0": 0, "1": 1}
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_DATE_FORMATS = (("%Y%m%d", re.compile(r"\d{8}")), ("%Y-%m-%d", re.compile(r"\d{4}-\d{2}-\d{2}")))
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_WINDOWS_DRIVE_RE = re.compile(r"[A-Za-z]:")


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One validated row of labels.csv."""

    row: int  # line number in the file (header = 1); for rows not read from a file, where it goes
    patient_id: str
    label: int  # index into LABEL_NAMES: 0 normal, 1 lesion
    path: str | None = None  # POSIX, relative to the manual dir, normalised (no ./, no trailing /)
    sop_instance_uid: str | None = None
    sex: str | None = None  # M, F or O
    exam_date: str | None = None  # ISO YYYY-MM-DD
    diagnosis: str | None = None
    source: str | None = None
    notes: str | None = None

    @property
    def label_name(self) -> str:
        """The label as written in the file: 'normal' or 'lesion'."""
        return LABEL_NAMES[self.label]


class LabelError(ValueError):
    """labels.csv is not valid; ``errors`` holds every (line, column, message) found."""

    def __init__(self, path: str | os.PathLike, errors: Sequence[tuple[int, str, str]]):
        self.path = str(path)
        self.errors = list(errors)
        super().__init__(_format_errors(self.path, self.errors))


def _format_errors(path: str, errors: Sequence[tuple[int, str, str]]) -> str:
    count = len(errors)
    lines = [f"{path}: {count} problem{'s' if count != 1 else ''} in labels.csv:"]
    for row, column, message in errors[:MAX_LISTED_ERRORS]:
        where = f"line {row}" if row else "file"
        if column:
            where += f", column '{column}'"
        lines.append(f"  {where}: {message}")
    if count > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {count - MAX_LISTED_ERRORS} more (fix these and run again)")
    return "\n".join(lines)


def _show(value: str) -> str:
    """Quote a user value for an error message, shortened."""
    if len(value) > MAX_SHOWN_VALUE_CHARS:
        value = value[: MAX_SHOWN_VALUE_CHARS - 3] + "..."
    return repr(value)


# ---------------------------------------------------------------------------------------------
# Values


def _parse_label(value: str) -> tuple[int | None, str]:
    label = _LABEL_VALUES.get(value.lower())
    if label is None:
        return None, f"{_show(value)} is not a label; write normal or lesion (or 0 / 1)"
    return label, ""


def _parse_path(value: str) -> tuple[str | None, str]:
    if "\\" in value:
        return None, f"{_show(value)} uses '\\'; separate folders with '/'"
    if value.startswith("/") or _WINDOWS_DRIVE_RE.match(value):
        return None, (
            f"{_show(value)} is absolute; give the path relative to the manual dir "
            "(the folder that holds labels.csv)"
        )
    if ".." in value.split("/"):
        return None, f"{_show(value)} contains '..'; paths must stay inside the manual dir"
    if _CONTROL_RE.search(value):
        return None, f"{_show(value)} contains a control character (tab, newline, ...)"
    normal = posixpath.normpath(value)
    if normal == ".":
        return None, f"{_show(value)} names the manual dir itself; name a file or series folder"
    return normal, ""


def _parse_uid(value: str) -> tuple[str | None, str]:
    if re.fullmatch(r"[0-9.]+[eE][+-]?[0-9]+", value):
        return None, (
            f"{_show(value)} looks like a number reformatted by a spreadsheet; "
            "format the column as text and paste the UIDs again"
        )
    if not _UID_RE.fullmatch(value):
        return None, f"{_show(value)} is not a DICOM UID (digits separated by single dots)"
    if len(value) > MAX_UID_CHARS:
        return None, f"{_show(value)} has {len(value)} characters; at most {MAX_UID_CHARS} allowed"
    return value, ""


def _parse_patient_id(value: str) -> tuple[str | None, str]:
    if _CONTROL_RE.search(value) or "\\" in value:
        return None, f"{_show(value)} contains a control character or '\\'"
    if len(value) > MAX_PATIENT_ID_CHARS:
        return None, (
            f"{_show(value)} has {len(value)} characters; a patient id has at most "
            f"{MAX_PATIENT_ID_CHARS}"
        )
    return value, ""


def _parse_sex(value: str) -> tuple[str | None, str]:
    if value.upper() not in SEXES:
        return None, f"{_show(value)} is not a sex; write M, F or O, or leave it empty"
    return value.upper(), ""


def _parse_date(value: str) -> tuple[str | None, str]:
    for fmt, pattern in _DATE_FORMATS:
        if pattern.fullmatch(value):
            try:
                return datetime.datetime.strptime(value, fmt).date().isoformat(), ""
            except ValueError:
                return None, f"{_show(value)} is not a real date (check month and day)"
    return None, f"{_show(value)} is not a date; write YYYY-MM-DD or YYYYMMDD"


def _parse_text(value: str) -> tuple[str | None, str]:
    return value, ""


_PARSERS = {
    "patient_id": _parse_patient_id,
    "label": _parse_label,
    "path": _parse_path,
    "sop_instance_uid": _parse_uid,
    "sex": _parse_sex,
    "exam_date": _parse_date,
    "diagnosis": _parse_text,
    "source": _parse_text,
    "notes": _parse_text,
}


def _validate_values(line: int, values: Mapping[str, str]) -> tuple[LabelRow | None, list]:
    """Validate one row given as {column: raw string}; returns (row or None, errors)."""
    errors = []
    fields: dict[str, object] = {}
    for column in COLUMNS:
        value = (values.get(column) or "").strip()
        if not value:
            if column in REQUIRED:
                errors.append((line, column, f"is empty; every row needs a {column}"))
            fields[column] = None
            continue
        parsed, problem = _PARSERS[column](value)
        if problem:
            errors.append((line, column, problem))
        fields[column] = parsed
    has = [c for c in LOCATORS if (values.get(c) or "").strip()]
    if not has:
        errors.append((line, "path", "is empty; give a path (or a sop_instance_uid) for each row"))
    elif len(has) > 1:
        errors.append(
            (
                line,
                "sop_instance_uid",
                "is set as well as path; give one of them per row (split the row in two if needed)",
            )
        )
    if errors:
        return None, errors
    return LabelRow(row=line, **fields), []


# ---------------------------------------------------------------------------------------------
# Reading


def _named_width(header: list[str]) -> int:
    """The header's columns up to its last named one. Unnamed columns after it are what
    spreadsheets write for cells once touched (",,"): accepted while every row leaves them empty."""
    named = len(header)
    while named and not header[named - 1].strip():
        named -= 1
    return named


def _header_errors(cells: list[str], line: int) -> tuple[dict[str, int], list, bool]:
    """Map known column -> index; returns (columns, errors, rows_checkable)."""
    errors = []
    names = [cell.strip().lower() for cell in cells]
    known = set(COLUMNS)
    if not any(n in known or n.startswith(USER_COLUMN_PREFIX) for n in names):
        if _semicolon_header(",".join(cells)) or (len(cells) == 1 and "\t" in cells[0]):
            sep = "';'" if ";" in ",".join(cells) else "tabs"
            msg = f"the header is separated by {sep}; labels.csv must be comma-separated{_EXCEL}"
        else:
            msg = (
                f"no header: line {line} must name the columns, e.g. "
                f"'patient_id,label,path'; found {_show(','.join(cells))}"
            )
        return {}, [(line, "", msg)], False
    columns: dict[str, int] = {}
    duplicated = False
    for index, name in enumerate(names[: _named_width(cells)]):
        if not name:
            errors.append((line, "", f"header column {index + 1} has no name; name or remove it"))
        elif name in columns:
            duplicated = True
            errors.append(
                (
                    line,
                    name,
                    f"appears twice in the header (columns {columns[name] + 1} and {index + 1}); "
                    "keep one",
                )
            )
        elif name in known:
            columns[name] = index
        elif not name.startswith(USER_COLUMN_PREFIX):
            guess = difflib.get_close_matches(name, COLUMNS, n=1)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            errors.append(
                (
                    line,
                    name,
                    f"is not a labels.csv column; {hint}known columns are {', '.join(COLUMNS)} "
                    f"(prefix your own columns with '{USER_COLUMN_PREFIX}')",
                )
            )
            columns[name] = index  # so a second copy is reported as a duplicate
    for name in REQUIRED:
        if name not in columns:
            errors.append((line, name, "is missing from the header; it is required"))
    if not any(name in columns for name in LOCATORS):
        errors.append((line, "path", "is missing from the header; add path or sop_instance_uid"))
    checkable = (
        not duplicated
        and all(name in columns for name in REQUIRED)
        and any(name in columns for name in LOCATORS)
    )
    return columns, errors, checkable


def read_labels(csv_path: str | os.PathLike, *, regular_only: bool = False) -> list[LabelRow]:
    """Read and validate labels.csv; raises LabelError listing every problem. `regular_only`:
    refuse a FIFO, socket or device (the dataset build, which finds sheets by name in a folder
    and would wait forever on a FIFO; `labels check /dev/stdin` reads a pipe on purpose)."""
    path = pathlib.Path(csv_path)
    if regular_only:
        from liverjax import dicom

        if dicom.not_a_file(path) is not None:
            raise LabelError(
                path, [(0, "", "is not a regular file (a FIFO, socket, device or folder)")]
            )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LabelError(path, [(0, "", f"cannot be read: {e.strerror or e}")]) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LabelError(
            path,
            [
                (
                    line,
                    "",
                    (f"byte {e.start} is not UTF-8; save the file as UTF-8 ('CSV UTF-8' in Excel)"),
                )
            ],
        ) from e
    if not text.strip():
        raise LabelError(
            path,
            [
                (
                    1,
                    "",
                    "the file is empty; line 1 must be the header, e.g. "
                    "'patient_id,label,path', then one row per image",
                )
            ],
        )
    rows, errors = _parse_text_rows(text)
    if errors:
        raise LabelError(path, errors)
    return rows


_EXCEL = (
    " (Excel writes ';' where the decimal separator is a comma: save as CSV with ',' as the "
    "list separator, or replace the ';')"
)


def _semicolon_header(line: str) -> bool:
    """Whether a header line is columns of labels.csv separated by ';', quoted or not."""
    cells = [c.strip().strip('"').strip().lower() for c in line.split(";")]
    return len(cells) > 1 and any(c in COLUMNS for c in cells)


def _parse_text_rows(text: str) -> tuple[list[LabelRow], list]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    columns: dict[str, int] = {}
    rows: list[LabelRow] = []
    errors: list = []
    line = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            first = text.lstrip("\r\n").splitlines()[0] if text.strip() else ""
            if header is None and _semicolon_header(first):
                msg = f"the header is separated by ';'; labels.csv must be comma-separated{_EXCEL}"
            else:
                msg = f"is not valid CSV ({e}); check the quotes on this line"
            errors.append((line, "", msg))
            break
        start, line = line, reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue  # blank line
        if header is None:
            header, header_line = record, start
            named = _named_width(header)
            columns, header_problems, checkable = _header_errors(record, start)
            errors.extend(header_problems)
            if not checkable:
                return [], errors
            continue
        extra = [i + 1 for i, cell in enumerate(record) if i >= named and cell.strip()]
        if extra and len(record) == len(header):
            errors.append(
                (
                    start,
                    "",
                    f"has a value in column {extra[0]}, which has no name in the header (line "
                    f"{header_line}); name the column or move the value",
                )
            )
            continue
        if len(record) != len(header) and not (named <= len(record) < len(header)):
            errors.append(
                (
                    start,
                    "",
                    (
                        f"has {len(record)} values but the header has {len(header)} columns; "
                        "quote values that contain commas"
                    ),
                )
            )
            continue
        values = {name: record[index] for name, index in columns.items()}
        row, problems = _validate_values(start, values)
        errors.extend(problems)
        if row is not None:
            rows.append(row)
    if header is None and not errors:
        errors.append((1, "", "the file has only empty lines; line 1 must be the header"))
    elif not rows and not errors:
        errors.append((header_line, "", "the file has a header but no rows; add one row per image"))
    return rows, errors


# ---------------------------------------------------------------------------------------------
# Writing


def _row_values(row: LabelRow | Mapping[str, object]) -> dict[str, str]:
    if isinstance(row, LabelRow):
        values = {c: getattr(row, c) for c in COLUMNS}
        values["label"] = row.label_name
    else:
        values = dict(row)
        values.pop("row", None)
    return {k: "" if v is None else str(v) for k, v in values.items()}


def write_labels(
    rows: Iterable[LabelRow] | Iterable[Mapping[str, object]], csv_path: str | os.PathLike
) -> None:
    """Validate rows (LabelRow or {column: value}) and write them as labels.csv, UTF-8."""
    path = pathlib.Path(csv_path)
    all_values = [_row_values(row) for row in rows]
    errors = []
    for line, values in enumerate(all_values, start=2):
        unknown = sorted(
            k for k in values if k not in COLUMNS and not k.startswith(USER_COLUMN_PREFIX)
        )
        for name in unknown:
            errors.append((line, name, "is not a labels.csv column"))
        errors.extend(_validate_values(line, values)[1])
    if not all_values:
        errors.append((2, "", "there are no rows to write"))
    if errors:
        raise LabelError(path, errors)
    # Normalised values (label name, ISO date, ...), so that the file reads back identically.
    parsed = [_validate_values(line, v)[0] for line, v in enumerate(all_values, start=2)]
    used = [c for c in COLUMNS if c in REQUIRED or any(getattr(r, c) is not None for r in parsed)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(used)
    for row in parsed:
        writer.writerow(_row_values(row)[c] for c in used)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Labels from masks

MATCH_RULES = ("sop_reference", "position", "instance_number", "file_name")  # tried in this order
RULE_NAMES = {
    "sop_reference": "SOPInstanceUID reference (ReferencedImageSequence / SourceImageSequence)",
    "position": "ImagePositionPatient",
    "instance_number": "InstanceNumber",
    "file_name": "file name",
}
POSITION_DECIMALS = 2  # ImagePositionPatient is compared after rounding to 0.01 mm
MAX_LISTED_MISMATCHES = 5  # a MaskError lists this many unmatched slices, then counts the rest
MAX_LISTED_VALUES = 10  # stored values of a mask listed in a message, then counted
_SKIPPABLE_MASK_FILES = ("empty", "not_dicom")  # e.g. a README or .DS_Store next to the masks


class MaskError(ValueError):
    """Masks cannot be matched to the images (or read); the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class MaskMatch:
    """How one mask series was matched to the image series."""

    mask_dir: str
    role: str  # "lesion" or "organ"
    rule: str  # one of MATCH_RULES
    mask_slices: int
    images_covered: int  # image slices that have a mask slice
    rules_not_used: tuple[str, ...]  # "rule: why" for each earlier rule that did not apply
    ignored_files: tuple[str, ...] = ()  # files in the folder that are not DICOM (or empty)
    image_slices: int = 0  # image slices in the series (covered or not)
    values_found: tuple[float, ...] = ()  # the distinct non-zero stored values in the mask
    set_values: tuple[float, ...] | None = None  # the stored values counted as set; None: non-zero

    def describe(self) -> str:
        """Lines for people: which rule matched, how much it covered, why not earlier rules."""
        lines = [
            f"{self.role} mask {self.mask_dir}: matched by {RULE_NAMES[self.rule]}; "
            f"{self.mask_slices} mask slices onto {self.images_covered} of {self.image_slices} "
            "image slices"
        ]
        counting = "non-zero" if self.set_values is None else _format_values(self.set_values)
        lines.append(
            f"  stored values {_format_values(self.values_found) or 'none but 0'}; "
            f"counting {counting} as set"
        )
        lines += [f"  not by {why}" for why in self.rules_not_used]
        if self.ignored_files:
            lines.append(
                f"  ignored {len(self.ignored_files)} files that are not DICOM: "
                + ", ".join(self.ignored_files[:MAX_LISTED_MISMATCHES])
                + (" ..." if len(self.ignored_files) > MAX_LISTED_MISMATCHES else "")
            )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MaskLabels:
    """The result of labels_from_masks: rows to write, how masks matched, what was left out."""

    rows: tuple[LabelRow, ...]
    matches: tuple[MaskMatch, ...]
    left_out: tuple[tuple[str, str], ...]  # (image path as in the rows, reason)
    image_slices: int

    def left_out_counts(self) -> dict[str, int]:
        """Number of image files left out, per reason."""
        return dict(collections.Counter(reason for _, reason in self.left_out))

    def summary(self) -> str:
        """Several lines for people: rules, label counts, what was left out and why."""
        lines = [m.describe() for m in self.matches]
        counts = collections.Counter(row.label_name for row in self.rows)
        lines.append(
            f"{len(self.rows)} images labelled: "
            + ", ".join(f"{counts[name]} {name}" for name in LABEL_NAMES)
        )
        left = self.left_out_counts()
        lines.append(f"{len(self.left_out)} images left out" + (":" if left else ""))
        lines += [f"  {n} {reason}" for reason, n in sorted(left.items())]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Slice:
    file: pathlib.Path
    name: str  # path inside the series folder, POSIX
    dicom: object  # liverjax.dicom.DicomSlice


def _load_series(
    directory: pathlib.Path, role: str, keep_stored: bool = False
) -> tuple[list[_Slice], list[tuple]]:
    """Decode every file under directory; returns (slices, [(file, DicomError)] not decoded)."""
    from liverjax import dicom

    if not directory.is_dir():
        raise MaskError(f"{role} {directory}: is not a folder; give the folder of a DICOM series")
    slices, failed = [], []
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = file.relative_to(directory).as_posix()
        try:
            decoded = dicom.read_dicom(file, keep_stored=keep_stored)
        except dicom.DicomError as e:
            failed.append((file, e))
            continue
        slices.extend(_Slice(file, name, d) for d in decoded)
    if not slices:
        raise MaskError(f"{role} {directory}: no DICOM image could be read from this folder")
    return slices, failed


def _load_masks(directory: pathlib.Path, role: str) -> tuple[list[_Slice], list[str]]:
    """Decode a mask series; returns (slices, names of files that are not DICOM)."""
    slices, failed = _load_series(directory, role, keep_stored=True)
    ignored = []
    for file, error in failed:
        if error.reason in _SKIPPABLE_MASK_FILES:
            ignored.append(file.relative_to(directory).as_posix())
            continue
        hint = (
            "DICOM SEG / RTSTRUCT masks are not read; export the mask as an image series"
            if error.reason == "not_image"
            else "a mask that cannot be read would label its slices wrongly; fix or remove it"
        )
        raise MaskError(f"{role} mask {file}: {error.reason}: {error.detail}; {hint}")
    for s in slices:
        if s.dicom.photometric == "MONOCHROME1":
            raise MaskError(
                f"{role} mask {s.file}: is MONOCHROME1 (inverted); store masks as MONOCHROME2"
            )
        if s.dicom.stored.ndim != 2:  # (rows, columns, samples): RGB
            raise MaskError(
                f"{role} mask {s.file}: is colour ({s.dicom.photometric}); store masks as "
                "grayscale, one stored value per pixel"
            )
    return slices, ignored


def _position_key(s: _Slice) -> tuple | None:
    position = s.dicom.image_position
    if position is None:
        return None
    return tuple(round(float(v), POSITION_DECIMALS) + 0.0 for v in position)  # +0.0: no -0.0


def _rule_key(rule: str, s: _Slice) -> object:
    """The key an image or mask slice is matched on under rule (None: not available)."""
    if rule == "position":
        return _position_key(s)
    if rule == "instance_number":
        number = s.dicom.instance_number
        return None if number is None else (number, s.dicom.frame)
    return (s.name, s.dicom.frame)  # file_name


def _describe_key(rule: str, s: _Slice) -> str:
    if rule == "sop_reference":
        return f"references {', '.join(s.dicom.referenced_sop_uids)}"
    return f"{RULE_NAMES[rule]} {_rule_key(rule, s)}"


def _why_not(rule: str, images: list[_Slice], masks: list[_Slice]) -> str:
    """Why rule cannot match these series; '' when it can."""
    if rule == "sop_reference":
        missing = [m for m in masks if not m.dicom.referenced_sop_uids]
        if missing:
            return f"{len(missing)} of {len(masks)} mask slices carry no image reference"
        uids = [i.dicom.sop_uid for i in images]
        if len(set(uids)) < len(uids):
            return "the images are multi-frame: a SOP reference does not name the frame"
        if not any(u in set(uids) for m in masks for u in m.dicom.referenced_sop_uids):
            # A header copied from the CT keeps its reference to the localizer (scout).
            return (
                f"none of the {len(masks)} mask slices references an image of the series "
                "(a reference copied from the CT header, e.g. to the localizer?)"
            )
        return ""
    image_keys = [_rule_key(rule, i) for i in images]
    mask_keys = [_rule_key(rule, m) for m in masks]
    if None in mask_keys:
        return f"{mask_keys.count(None)} of {len(masks)} mask slices have no {RULE_NAMES[rule]}"
    if None in image_keys:
        return f"{image_keys.count(None)} of {len(images)} images have no {RULE_NAMES[rule]}"
    if len(set(image_keys)) < len(image_keys):
        return f"several images share one {RULE_NAMES[rule]}"
    return ""


def _pair(rule: str, images: list[_Slice], masks: list[_Slice], where: str) -> dict[int, int]:
    """Map image index -> mask index under rule; MaskError for unmatched or doubled slices."""
    if rule == "sop_reference":
        by_uid = {i.dicom.sop_uid: n for n, i in enumerate(images)}
        candidates = [
            sorted({by_uid[u] for u in m.dicom.referenced_sop_uids if u in by_uid}) for m in masks
        ]
    else:
        by_key = {_rule_key(rule, i): n for n, i in enumerate(images)}
        candidates = [[by_key[k]] if (k := _rule_key(rule, m)) in by_key else [] for m in masks]
    unmatched = [m for m, c in zip(masks, candidates, strict=True) if len(c) != 1]
    if unmatched:
        listed = "; ".join(
            f"{m.file} ({_describe_key(rule, m)})" for m in unmatched[:MAX_LISTED_MISMATCHES]
        )
        more = len(unmatched) - MAX_LISTED_MISMATCHES
        raise MaskError(
            f"{where}: matching by {RULE_NAMES[rule]}, {len(unmatched)} of {len(masks)} mask "
            f"slices match no single image slice: {listed}"
            + (f"; and {more} more" if more > 0 else "")
            + ". Check that the mask series was drawn on the --images series."
        )
    pairs: dict[int, int] = {}
    for mask_index, (image_index,) in enumerate(candidates):
        if image_index in pairs:
            raise MaskError(
                f"{where}: mask slices {masks[pairs[image_index]].file} and "
                f"{masks[mask_index].file} both match image {images[image_index].file} "
                f"(by {RULE_NAMES[rule]}); remove one of them"
            )
        pairs[image_index] = mask_index
    return pairs


def _check_geometry(pairs: dict[int, int], images: list[_Slice], masks: list[_Slice], where: str):
    for image_index, mask_index in pairs.items():
        image, mask = images[image_index], masks[mask_index]
        if image.dicom.image.shape != mask.dicom.image.shape:
            raise MaskError(
                f"{where}: mask {mask.file} is {_shape(mask)} but its image {image.file} is "
                f"{_shape(image)}; masks must be on the image grid (resample the mask first)"
            )


def _shape(s: _Slice) -> str:
    rows, cols = s.dicom.image.shape
    return f"{rows} rows x {cols} columns"


def _format_values(values: Sequence[float]) -> str:
    shown = [str(int(v)) if float(v).is_integer() else f"{v:g}" for v in values]
    more = len(values) - MAX_LISTED_VALUES
    return ", ".join(shown[:MAX_LISTED_VALUES]) + (
        f" ... ({len(values)} values)" if more > 0 else ""
    )


def _values_found(masks: list[_Slice], where: str, option: str, given: bool) -> tuple[float, ...]:
    """The distinct non-zero stored values of a mask series; several without `given`: MaskError."""
    per_slice = [v[v != 0].tolist() for v in (np.unique(m.dicom.stored) for m in masks)]
    found = tuple(sorted(set().union(*per_slice)))
    if len(found) <= 1 or given:
        return found
    several = [(m, v) for m, v in zip(masks, per_slice, strict=True) if len(v) > 1]
    if several:
        mask, values = several[0]
        detail = f"mask {mask.file} holds the stored values {_format_values(values)}"
    else:  # one value per slice, but not the same one
        first: dict[float, pathlib.Path] = {}
        for m, v in zip(masks, per_slice, strict=True):
            if v:
                first.setdefault(v[0], m.file)
        detail = "its slices hold different stored values: " + "; ".join(
            f"{_format_values([v])} in {file}"
            for v, file in list(first.items())[:MAX_LISTED_MISMATCHES]
        )
    raise MaskError(
        f"{where}: {detail} (the series: {_format_values(found)}); a label map with several values "
        f"needs {option} V [V ...] naming the stored values that count as set, e.g. for LiTS "
        "(1 liver, 2 tumour) --lesion-values 2 --organ-values 1 2"
    )


def _set_pixels(s: _Slice, values: tuple[float, ...] | None) -> int:
    """Number of mask pixels whose stored value is non-zero, or one of values."""
    # Stored values, not the decoded image: the decoder rescales them and replaces Pixel Padding
    # (a CT header copied onto a mask often declares 0 as padding) by another value.
    if values is None:
        return int(np.count_nonzero(s.dicom.stored))
    return int(np.count_nonzero(np.isin(s.dicom.stored, values)))


def _match_masks(
    images: list[_Slice], directory: pathlib.Path, role: str, values: tuple[float, ...] | None
) -> tuple[MaskMatch, list[int | None]]:
    """Match one mask series; returns the match and each image's set-pixel count (None: no mask)."""
    masks, ignored = _load_masks(directory, role)
    where = f"{role} mask {directory}"
    found = _values_found(masks, where, f"--{role}-values", values is not None)
    not_used = []
    for rule in MATCH_RULES:
        why = _why_not(rule, images, masks)
        if why:
            not_used.append(f"{RULE_NAMES[rule]}: {why}")
            continue
        pairs = _pair(rule, images, masks, where)
        break
    _check_geometry(pairs, images, masks, where)
    counts = [
        _set_pixels(masks[pairs[n]], values) if n in pairs else None for n in range(len(images))
    ]
    match = MaskMatch(
        str(directory),
        role,
        rule,
        len(masks),
        len(pairs),
        tuple(not_used),
        tuple(ignored),
        image_slices=len(images),
        values_found=found,
        set_values=values,
    )
    return match, counts


def _slice_label(
    lesion_counts: list[int | None],
    organ_count: int | None,
    has_organ: bool,
    min_pixels: int,
    uncovered_as_normal: bool,
) -> tuple[int | None, str]:
    """(label, '') for a slice, or (None, why it is left out); a count of None: no mask slice."""
    counted = [c for c in lesion_counts if c is not None]
    if counted and max(counted) >= min_pixels:
        return 1, ""
    if counted and max(counted) > 0:
        return None, f"lesion mask below --min-lesion-pixels {min_pixels}"
    if len(counted) < len(lesion_counts) and not uncovered_as_normal:
        if not counted:
            return None, "no lesion-mask slice for the image"
        return None, "a lesion mask has no slice for the image"
    if not has_organ:
        return 0, ""
    if organ_count is None:
        return None, "no organ-mask slice for the image"
    if organ_count == 0:
        return None, "organ mask empty on the image"
    return 0, ""


def _set_values(values: Sequence[float] | None, role: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    out = tuple(sorted(set(values)))
    if not out:
        raise ValueError(f"{role}_values is empty; give the stored values that count as set")
    if 0 in out:
        raise ValueError(
            f"{role}_values contains 0, the background of a mask; give the values that count as set"
        )
    return out


def labels_from_masks(
    images: str | os.PathLike,
    lesion_masks: Sequence[str | os.PathLike],
    *,
    patient_id: str,
    relative_to: str | os.PathLike,
    organ_mask: str | os.PathLike | None = None,
    min_lesion_pixels: int = 1,
    uncovered_as_normal: bool = False,
    lesion_values: Sequence[float] | None = None,
    organ_values: Sequence[float] | None = None,
) -> MaskLabels:
    """Label each image file of a series from lesion (and organ) mask series.

    uncovered_as_normal: an image slice that a lesion mask has no slice for counts as empty in that
    mask (for masks that store only the slices with a lesion), instead of being left out.
    lesion_values, organ_values: the stored values that count as set in the lesion masks and in
    the organ mask (label maps); None: any non-zero value, and a mask with several is an error.
    """
    lesion_set, organ_set = _set_values(lesion_values, "lesion"), _set_values(organ_values, "organ")
    if min_lesion_pixels < 1:
        raise ValueError(f"min_lesion_pixels must be at least 1, got {min_lesion_pixels}")
    if not lesion_masks:
        raise ValueError("give at least one lesion mask folder")
    images_dir = pathlib.Path(images)
    base = pathlib.Path(os.path.abspath(relative_to))
    image_slices, failed = _load_series(images_dir, "images")
    matches, lesion_counts = [], []
    for directory in lesion_masks:
        match, counts = _match_masks(image_slices, pathlib.Path(directory), "lesion", lesion_set)
        matches.append(match)
        lesion_counts.append(counts)
    organ_counts: list[int | None] = [None] * len(image_slices)
    if organ_mask is not None:
        match, organ_counts = _match_masks(
            image_slices, pathlib.Path(organ_mask), "organ", organ_set
        )
        matches.append(match)

    def relative(file: pathlib.Path) -> str:
        try:
            return pathlib.Path(os.path.abspath(file)).relative_to(base).as_posix()
        except ValueError:
            raise MaskError(
                f"image {file} is not inside {base}; paths in labels.csv are relative to the "
                "manual dir, so --relative-to (or the folder of --out) must contain the images"
            ) from None

    per_file: dict[pathlib.Path, list[tuple[int | None, str]]] = {}
    for n, s in enumerate(image_slices):
        outcome = _slice_label(
            [counts[n] for counts in lesion_counts],
            organ_counts[n],
            organ_mask is not None,
            min_lesion_pixels,
            uncovered_as_normal,
        )
        per_file.setdefault(s.file, []).append(outcome)
    rows, left_out = [], []
    for file, error in failed:
        left_out.append((relative(file), f"image not decoded ({error.reason})"))
    for file, outcomes in sorted(per_file.items()):
        if len(set(outcomes)) > 1:
            raise MaskError(
                f"image {file} is multi-frame and its frames get different labels; labels.csv "
                "labels whole files, so split the file into single-frame images first"
            )
        label, why = outcomes[0]
        if label is None:
            left_out.append((relative(file), why))
            continue
        values = {"patient_id": patient_id, "label": str(label), "path": relative(file)}
        row, errors = _validate_values(len(rows) + 2, values)
        if errors:
            raise LabelError("labels.csv", errors)
        rows.append(row)
    return MaskLabels(tuple(rows), tuple(matches), tuple(sorted(left_out)), len(image_slices))


# ---------------------------------------------------------------------------------------------
# Command line


def _check(args: argparse.Namespace) -> int:
    rows = read_labels(args.csv)
    manual_dir = pathlib.Path(args.manual_dir or pathlib.Path(args.csv).parent)
    counts = collections.Counter(row.label_name for row in rows)
    by_path = [row for row in rows if row.path is not None]
    print(
        f"{args.csv}: valid; {len(rows)} rows, {len({r.patient_id for r in rows})} patients; "
        + ", ".join(f"{counts[name]} {name}" for name in LABEL_NAMES)
        + f"; {len(by_path)} by path, {len(rows) - len(by_path)} by sop_instance_uid"
    )
    from tfds_liver import curation  # the build's own file list and path matching

    index = curation.PathIndex(curation.find_files(manual_dir)[0])
    # A site sheet (in a top-level folder of the manual dir) names paths relative to its own
    # folder, as the build reads it.
    base = pathlib.PurePosixPath()
    sheet_dir = pathlib.Path(args.csv).resolve().parent
    if args.manual_dir and sheet_dir != manual_dir.resolve():
        try:
            base = pathlib.PurePosixPath(sheet_dir.relative_to(manual_dir.resolve()).as_posix())
        except ValueError:
            pass  # a sheet kept elsewhere: its paths are the manual dir's
    missing = [row for row in by_path if not index.files((base / row.path).as_posix().rstrip("/"))]
    if missing:
        where = f"under {manual_dir}" + (
            f" (relative to {base}/, the sheet's folder)" if str(base) != "." else ""
        )
        shown = "; ".join(f"line {r.row}: {r.path}" for r in missing[:3])
        print(f"warning: {len(missing)} of {len(by_path)} paths do not exist {where}, e.g. {shown}")
    clashes = disagreeing_rows(rows)
    if clashes:
        print(
            f"warning: {len(clashes)} pairs of rows name the same files but disagree; the build "
            "makes those files conflicts (excluded), e.g. " + "; ".join(clashes[:3])
        )
    return 0


def disagreeing_fields(rows: Iterable[object]) -> list[str]:
    """Of label, patient_id and source, those on which rows that name the same files disagree
    (an unset source has no opinion): the build makes such files conflicts."""
    rows = list(rows)
    return [
        field
        for field in ("label", "patient_id", "source")
        if len({getattr(r, field) for r in rows} - {None}) > 1
    ]


def disagreeing_rows(rows: Sequence[LabelRow]) -> list[str]:
    """Pairs of rows of one sheet that name the same files (one path, a folder and a path in it,
    or one SOP Instance UID) with another label, patient_id or source, described."""
    first: dict[tuple[str, str], LabelRow] = {}
    for row in rows:
        key = (
            ("path", row.path.strip("/")) if row.path is not None else ("sop", row.sop_instance_uid)
        )
        first.setdefault(key, row)
    out = []
    for row in rows:
        if row.path is None:
            candidates = [first[("sop", row.sop_instance_uid)]]
        else:
            parts = row.path.strip("/").split("/")
            candidates = [
                first[key]
                for n in range(1, len(parts) + 1)
                if (key := ("path", "/".join(parts[:n]))) in first
            ]
        for other in candidates:
            if other is row:
                continue
            fields = disagreeing_fields((other, row))
            if fields:
                out.append(
                    f"lines {other.row} and {row.row} ({other.path or other.sop_instance_uid}, "
                    f"{row.path or row.sop_instance_uid}): {', '.join(fields)}"
                )
    return out


def _from_masks(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    if out.exists() and not (args.append or args.overwrite):
        print(
            f"error: {out} exists; give --append to add these rows to it (one run per patient) "
            "or --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    kept = _rows_to_append_to(out) if args.append and out.exists() else []
    result = labels_from_masks(
        args.images,
        args.lesion_masks,
        patient_id=args.patient_id,
        relative_to=args.relative_to if args.relative_to is not None else out.parent,
        organ_mask=args.organ_mask,
        min_lesion_pixels=args.min_lesion_pixels,
        uncovered_as_normal=args.uncovered_as_normal,
        lesion_values=args.lesion_values,
        organ_values=args.organ_values,
    )
    print(result.summary())
    if not result.rows:
        print(f"error: no image could be labelled; {out} not written", file=sys.stderr)
        return 2
    listed = {row.path: row for row in kept if row.path is not None}
    twice = [
        (listed[row.path].row, "path", f"{row.path} is here already; --append would list it twice")
        for row in result.rows
        if row.path in listed
    ]
    if twice:
        raise LabelError(out, twice)
    write_labels([*kept, *result.rows], out)
    added = f" ({len(kept)} rows kept, {len(result.rows)} added)" if args.append else ""
    print(f"wrote {out}{added}")
    return 0


def _rows_to_append_to(out: pathlib.Path) -> list[LabelRow]:
    """The rows of an existing labels.csv for --append; LabelError if rewriting it loses data."""
    rows = read_labels(out)
    header = next(
        record
        for record in csv.reader(io.StringIO(out.read_text("utf-8-sig"), newline=""))
        if any(cell.strip() for cell in record)
    )
    own = [c.strip() for c in header if c.strip().lower().startswith(USER_COLUMN_PREFIX)]
    if own:
        raise LabelError(
            out,
            [
                (
                    1,
                    own[0],
                    f"--append rewrites the file, and columns of your own ({', '.join(own)}) are "
                    "not written back; write to a new file and merge the two yourself",
                )
            ],
        )
    return rows


def _mask_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"is not a number: {text!r}") from None
    if value == 0:
        raise argparse.ArgumentTypeError("0 is a mask's background; give the values that are set")
    return int(value) if value.is_integer() else value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tfds_liver.labels", description="Validate or create labels.csv."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate labels.csv and summarise it")
    check.add_argument("csv", help="the labels.csv to check")
    check.add_argument(
        "--manual-dir",
        "--manual_dir",  # as `tfds build` spells it
        dest="manual_dir",
        help="folder the paths are relative to (default: the csv's folder)",
    )
    masks = commands.add_parser(
        "from-masks", help="write labels.csv from lesion (and organ) mask series"
    )
    masks.add_argument("--images", required=True, help="folder of the image series")
    masks.add_argument(
        "--lesion-masks", required=True, nargs="+", help="folders of lesion mask series"
    )
    masks.add_argument(
        "--organ-mask", help="folder of an organ mask series: slices without organ are left out"
    )
    masks.add_argument(
        "--lesion-values",
        type=_mask_value,
        nargs="+",
        help="stored values that count as lesion in the lesion masks (label maps; default: any "
        "non-zero value, and a mask holding several is an error)",
    )
    masks.add_argument(
        "--organ-values",
        type=_mask_value,
        nargs="+",
        help="stored values that count as organ in the organ mask (default: any non-zero value)",
    )
    masks.add_argument("--patient-id", required=True, help="patient_id written on every row")
    masks.add_argument(
        "--min-lesion-pixels",
        type=_positive_int,
        default=1,
        help="a slice is lesion when a lesion mask has at least this many pixels on it "
        "(default %(default)s)",
    )
    masks.add_argument(
        "--uncovered-as-normal",
        action="store_true",
        help="an image slice that a lesion mask has no slice for counts as empty in it (masks "
        "that store only the slices with a lesion); by default such slices are left out",
    )
    masks.add_argument(
        "--out", default="labels.csv", help="labels.csv to write (default: ./labels.csv)"
    )
    existing = masks.add_mutually_exclusive_group()
    existing.add_argument(
        "--append",
        action="store_true",
        help="--out may exist: keep its rows and add these (a path in both is an error)",
    )
    existing.add_argument("--overwrite", action="store_true", help="--out may exist: replace it")
    masks.add_argument(
        "--relative-to", help="folder the written paths are relative to (default: --out's folder)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code (2 for invalid input)."""
    from liverjax import dicom

    args = _parser().parse_args(argv)
    run = _check if args.command == "check" else _from_masks
    try:
        return run(args)
    except (LabelError, MaskError, dicom.DicomError, OSError) as e:  # OSError: missing, unreadable
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
