"""Curation of a manual DICOM folder: decode, de-duplicate, match labels, split by patient, report.

Every input file ends in exactly one status, written to ``curation_report.json``:

* ``written``    decoded, labelled and written to a split;
* ``duplicate``  every slice is the same image as one kept earlier (same SOP Instance UID and
                 frame, or identical pixels of the same patient); the report names the file it
                 repeats. A multi-frame file that repeats only some images is ``written`` with
                 the new ones, and lists the others under ``duplicate_slices``;
* ``conflict``   the same image carries different labels (in one label sheet, across sheets, or
                 across duplicate copies), or one image (a SOP Instance UID, or identical pixels
                 that are not one flat value) is labelled as two patients: every copy is excluded,
                 as one of the two patients is wrong and the image could land in two splits;
* ``unlabelled`` decodes, but no label row names it;
* ``skipped``    cannot be used, with the decoder's reason code (``not_dicom``, ``not_image``, ...).

Label rows that match no decodable image are listed too. Files are visited in sorted path order, so
the outcome is deterministic. Decoding runs in a process pool (one worker per core by default).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pathlib
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

from liverjax import dicom
from tfds_liver import labels as labels_lib

LABEL_SHEET = "labels.csv"
INT16 = np.iinfo(np.int16)
STATUSES = ("written", "duplicate", "conflict", "unlabelled", "skipped")
CT = "CT"  # the modality whose values are Hounsfield units; others are reported
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Patient-level split fractions (train gets the rest) and the seed that draws them."""

    validation: float = 0.15
    test: float = 0.15
    seed: int = 0

    def __post_init__(self):
        if not (
            0 <= self.validation < 1 and 0 <= self.test < 1 and self.validation + self.test < 1
        ):
            raise ValueError(
                f"split fractions must be in [0, 1) and leave room for train: validation="
                f"{self.validation}, test={self.test}"
            )


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """One decoded, resampled slice ready to become an example."""

    image_id: str
    image: np.ndarray  # int16 (size, size) HU
    patient_id: str
    study_uid: str
    series_uid: str
    source: str
    path: str
    pixel_spacing: tuple[float, float]
    slice_position: float
    pixel_hash: str
    index: int = 0  # position of the slice (frame) in its file

    @property
    def key(self) -> str:
        """The example's unique key: its file and its position there (SOP UIDs may be missing)."""
        return f"{display_path(self.path)}#{self.index}"


@dataclasses.dataclass(frozen=True)
class Example:
    """A labelled slice assigned to a split."""

    record: SliceRecord
    label: int
    patient_id: str
    source: str  # the label row's `source`, else the file's top-level folder

    def features(self) -> dict[str, Any]:
        """The TFDS feature dict of this example."""
        r = self.record
        return {
            "image": r.image[..., None],
            "label": self.label,
            "patient_id": self.patient_id,
            "study_uid": r.study_uid,
            "series_uid": r.series_uid,
            "sop_uid": r.image_id,
            "source": display_path(self.source),
            "path": display_path(r.path),
            "pixel_spacing": np.asarray(r.pixel_spacing, np.float32),
            "slice_position": np.float32(r.slice_position),
        }


@dataclasses.dataclass
class Curation:
    """The outcome of a curation run: examples per split and the report."""

    splits: dict[str, list[Example]]
    report: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """What a worker sends back for one file: its slices, or why it has none."""

    path: str
    slices: tuple[SliceRecord, ...] = ()
    sop_uid: str | None = None
    reason: str | None = None
    detail: str | None = None
    clipped: int = 0  # pixels outside int16's range, clipped to it (not HU: MR, PET, bad rescale)
    modality: str = ""  # the file's Modality ("" when it has none)
    hounsfield: bool = True  # its values are HU (Modality CT, or Rescale Type HU)
    plane: str | None = None  # why a slice is no axial image as stored (dicom.plane), if one isn't
    # How its first turned slice was turned to the standard axial orientation (dicom.turned).
    turned: str | None = None
    no_spacing: bool = False  # a slice has no Pixel Spacing (nor Imager Pixel Spacing)
    # The first (row, column) spacing in mm that is not square: the resample treats pixels as
    # square, so such an image is stretched along one axis.
    non_square: tuple[float, float] | None = None


def display_path(path: str) -> str:
    """A path as UTF-8 text: bytes of a file name that are not UTF-8 (a name written on another
    system in another encoding, which Python keeps as surrogate escapes) become `\\xNN`."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_of(rel_path: str) -> str:
    """The source a file belongs to: its top-level folder under the manual dir ('' at the top)."""
    parts = pathlib.PurePosixPath(rel_path).parts
    return parts[0] if len(parts) > 1 else ""


def find_files(manual_dir: pathlib.Path) -> tuple[list[str], list[str]]:
    """All files under the manual dir at any depth, split into (input files, label sheets).

    Symbolic links to folders are followed (hospital exports often link series in). A folder
    reached twice is read once: at its own path when it is in the tree (a link `_all -> siteA`
    does not rename siteA's files, whatever sorts first), else at the first link to it. A folder
    that cannot be listed is an error naming it: its files could not be accounted for.
    """
    # Where each folder of the tree is without following links: read there, links or not.
    # (This walk passes over folders it cannot list; the one below reports them.)
    seen: dict[str, str] = {}
    for root, _, _ in os.walk(manual_dir):
        seen.setdefault(os.path.realpath(root), root)
    unreadable: list[OSError] = []
    files, sheets = [], []
    for root, dirs, names in os.walk(manual_dir, followlinks=True, onerror=unreadable.append):
        seen.setdefault(os.path.realpath(root), root)
        dirs.sort()
        for d in list(dirs):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            owner = seen.setdefault(real, path)
            if owner != path:
                dirs.remove(d)
                logging.getLogger(__name__).warning(
                    "%s: the folder %s is %s, read at that path; not read again",
                    manual_dir,
                    os.path.relpath(path, manual_dir),
                    os.path.relpath(owner, manual_dir),
                )
        for name in sorted(names):
            rel = (pathlib.Path(root) / name).relative_to(manual_dir).as_posix()
            depth = rel.count("/")
            (sheets if name == LABEL_SHEET and depth <= 1 else files).append(rel)
    if unreadable:
        shown = "; ".join(
            f"{os.path.relpath(e.filename, manual_dir) if e.filename else '?'}: {e.strerror or e}"
            for e in unreadable[:5]
        )
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        raise PermissionError(
            f"{manual_dir}: {len(unreadable)} folders cannot be listed ({shown}{more}); their "
            "files could not be accounted for. Give this user read and execute permission on "
            "them, or move them out of the manual dir"
        )
    return files, sheets


def decode_file(manual_dir: str, rel_path: str, image_size: int) -> _Decoded:
    """Decodes one file into resampled int16 slices (runs in a worker process)."""
    try:
        decoded = dicom.decode_resampled(os.path.join(manual_dir, rel_path), rel_path, image_size)
    except dicom.DicomError as e:
        return _Decoded(rel_path, reason=e.reason, detail=e.detail)
    slices = [r.slice for r in decoded]
    records = []
    clipped = sum(r.clipped for r in decoded)
    no_spacing, non_square = False, None
    for index, (s, image, *_) in enumerate(decoded):
        if s.pixel_spacing is None:
            no_spacing = True
        elif non_square is None and not dicom.is_square(s.pixel_spacing):
            non_square = (float(s.pixel_spacing[0]), float(s.pixel_spacing[1]))
        spacing = dicom.resampled_spacing(s.pixel_spacing, s.image.shape, image_size)
        records.append(
            SliceRecord(
                image_id=s.image_id,
                image=image,
                patient_id=s.patient_id,
                study_uid=s.study_uid,
                series_uid=s.series_uid,
                source=source_of(rel_path),
                path=rel_path,
                pixel_spacing=spacing if spacing is not None else (float("nan"), float("nan")),
                slice_position=s.slice_position if s.slice_position is not None else float("nan"),
                pixel_hash=hashlib.sha256(np.ascontiguousarray(s.image).data).hexdigest(),
                index=index,
            )
        )
    return _Decoded(
        rel_path,
        slices=tuple(records),
        sop_uid=slices[0].sop_uid,
        clipped=clipped,
        modality=slices[0].modality,
        hounsfield=slices[0].hounsfield,
        plane=next((w for w in map(dicom.plane, slices) if w is not None), None),
        turned=next((r.turned for r in decoded if r.turned is not None), None),
        no_spacing=no_spacing,
        non_square=non_square,
    )


def spacing_summary(spacings: Iterable[tuple[float, float]]) -> dict[str, Any]:
    """min/median/max of the coarser of row and column spacing (mm) of written slices, and how
    many have none. The records' spacing is after the resample to image_size: what the network
    sees, so a split scanned with another field of view stands out."""
    coarse = [max(r, c) for r, c in spacings]
    finite = np.asarray([x for x in coarse if math.isfinite(x)], np.float64)
    summary: dict[str, Any] = {"missing": len(coarse) - len(finite)}
    if len(finite):
        summary |= {
            "min": round(float(finite.min()), 4),
            "median": round(float(np.median(finite)), 4),
            "max": round(float(finite.max()), 4),
        }
    return summary


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or `taskset`'s limit, where os.cpu_count
    counts the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_all(
    manual_dir: pathlib.Path, rel_paths: Sequence[str], image_size: int, workers: int | None
) -> list[_Decoded]:
    """Decodes files in a process pool, in input order; workers=1 decodes in this process."""
    workers = workers or usable_cpus()
    args = (str(manual_dir), image_size)
    if workers == 1 or len(rel_paths) < 2:
        return [decode_file(args[0], p, image_size) for p in rel_paths]
    chunk = max(1, len(rel_paths) // (workers * 8))
    # A process that runs JAX's threads (the demo builds its records on first use) must not
    # fork(): a child can inherit a lock another thread held, and hang. A fresh interpreter
    # (forkserver) costs a second at start; without JAX loaded, fork is safe and quicker.
    context = None
    if "jax" in sys.modules and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
    done: list[_Decoded] = []
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for result in pool.map(
                decode_file,
                [args[0]] * len(rel_paths),
                rel_paths,
                [image_size] * len(rel_paths),
                chunksize=chunk,
            ):
                done.append(result)
        return done
    except concurrent.futures.BrokenExecutor:
        rest = rel_paths[len(done) :]
        logging.getLogger(__name__).warning(
            "a decoder process died (a crash in a native decoder?) with %d of %d files left; "
            "decoding those one at a time to name the file(s) that crash it",
            len(rest),
            len(rel_paths),
        )
    return done + _decode_isolated(args[0], rest, image_size, context)


_CRASHED = (
    "the decoder process crashed on this file (a fault in a native decoder: a corrupt or "
    "unusual compressed stream?)"
)
_WORKER_START_PROBES = 3  # files that each kill a fresh worker: it is the worker, not the files


def _decode_isolated(
    manual_dir: str, rel_paths: Sequence[str], image_size: int, context: Any
) -> list[_Decoded]:
    """Decodes files one at a time in a worker process; a file that kills it is decode_failed
    (the build goes on, as for any other file that does not decode)."""
    results: list[_Decoded] = []
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
    try:
        for path in rel_paths:
            try:
                results.append(pool.submit(decode_file, manual_dir, path, image_size).result())
            except concurrent.futures.BrokenExecutor:
                if len(results) == _WORKER_START_PROBES - 1 and all(
                    r.detail == _CRASHED for r in results
                ):
                    raise RuntimeError(
                        f"the decoder worker process died on each of the first "
                        f"{_WORKER_START_PROBES} files, one at a time: most likely it cannot "
                        "start. A script that builds the dataset must keep its code under "
                        '`if __name__ == "__main__":` (worker processes import it again). If '
                        "the files themselves crash the decoder, the builder config's workers=1 "
                        f"decodes in this process and stops at the first ({display_path(path)})"
                    ) from None
                results.append(
                    _Decoded(
                        path,
                        reason="decode_failed",
                        detail=_CRASHED,
                    )
                )
                pool.shutdown(wait=False)
                pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
    finally:
        pool.shutdown()
    return results


@dataclasses.dataclass(frozen=True)
class _Label:
    label: int
    patient_id: str
    source: str | None
    where: str  # "sheet:row", for the report


def _match_labels(
    manual_dir: pathlib.Path,
    sheets: Sequence[str],
    files: Sequence[str],
    decoded: Sequence[_Decoded],
) -> tuple[dict[str, list[_Label]], list[dict[str, Any]], int]:
    """Maps each input file to the label rows that name it; returns unmatched rows and row count."""
    by_file: dict[str, list[_Label]] = collections.defaultdict(list)
    unmatched: list[dict[str, Any]] = []
    by_sop: dict[str, list[str]] = collections.defaultdict(list)
    for d in decoded:
        if d.sop_uid:
            by_sop[d.sop_uid].append(d.path)
    failed = {d.path: d.reason for d in decoded if d.reason is not None}
    n_rows = 0
    lower: dict[str, str] | None = None  # built for the first row that matches nothing
    index = PathIndex(files)
    for sheet in sheets:
        base = pathlib.PurePosixPath(sheet).parent
        for row in labels_lib.read_labels(manual_dir / sheet, regular_only=True):
            n_rows += 1
            label = _Label(row.label, row.patient_id, row.source, f"{sheet}:{row.row}")
            if row.path is not None:
                target = (base / row.path).as_posix() if str(base) != "." else row.path
                target = target.rstrip("/")
                matched = index.files(target)
                why = "path does not exist under the manual dir"
                if str(base) != ".":
                    why = f"path does not exist as {display_path(target)} (relative to {base}/)"
                if not matched:
                    if lower is None:
                        lower = _by_lower_case(files)
                    plain = row.path.rstrip("/")
                    if str(base) != "." and index.files(plain):
                        why += (
                            f"; {display_path(plain)} exists relative to the manual dir: paths "
                            f"in {sheet} are relative to its folder"
                        )
                    elif target.lower() in lower:
                        why += f"; {display_path(lower[target.lower()])} differs only in case"
                    else:
                        why += _near_path_hint(index, target, manual_dir.name)
            else:
                matched = by_sop.get(row.sop_instance_uid, [])
                why = "no decodable file has this SOPInstanceUID"
            if matched and all(f in failed for f in matched):  # the path exists, no image
                first = matched[0]
                why = (
                    f"names {len(matched)} file(s), none of them a decodable image "
                    f"({display_path(first)}: {failed[first]}; its entry says more)"
                )
            if not matched or all(f in failed for f in matched):
                unmatched.append(
                    {
                        "sheet": sheet,
                        "row": row.row,
                        "path": row.path,
                        "sop_instance_uid": row.sop_instance_uid,
                        "why": why,
                    }
                )
            for f in matched:
                by_file[f].append(label)
    return by_file, unmatched, n_rows


def _near_path_hint(index: PathIndex, target: str, manual_name: str) -> str:
    """'; X exists ...' for a path that names nothing but is near one that does: written with
    the manual dir's own name in front, or without its file's extension."""
    head, _, rest = target.partition("/")
    if head == manual_name and rest and index.files(rest):
        return (
            f"; {display_path(rest)} exists: paths are relative to the manual dir, without its "
            f"own name {display_path(manual_name)}/ in front"
        )
    for extension in (".dcm", ".DCM", ".dicom", ".ima", ".IMA"):
        if index.files(target + extension):
            return f"; {display_path(target + extension)} exists: give the file's whole name"
    return ""


class PathIndex:
    """What a label row's path names among the manual dir's files: the file itself, or every
    file below a folder, by the exact name or else by its Unicode NFC form (macOS writes
    decomposed accents, NFD: the same name to a reader, other bytes). The build's matching and
    `labels check` use it, so they agree on which paths exist. Indexes are built on first use.
    """

    def __init__(self, files: Sequence[str]):
        self._files = files
        self._set = set(files)
        self._under: dict[str, list[str]] | None = None
        self._nfc: dict[str, list[str]] | None = None

    def files(self, path: str) -> list[str]:
        """The files `path` (relative to the manual dir, no trailing slash) names; [] if none."""
        if path in self._set:
            return [path]
        if self._under is None:
            self._under = _files_by_folder(self._files)
        matched = self._under.get(path, [])
        if not matched:
            if self._nfc is None:
                self._nfc = _files_by_nfc_name(self._files, self._under)
            matched = self._nfc.get(_nfc(path), [])
        return matched


def _files_by_folder(files: Sequence[str]) -> dict[str, list[str]]:
    """{folder: every file at any depth below it}, in the order of `files`."""
    index: dict[str, list[str]] = collections.defaultdict(list)
    for f in files:
        parts = f.split("/")
        for n in range(1, len(parts)):
            index["/".join(parts[:n])].append(f)
    return index


def _nfc(path: str) -> str:
    return unicodedata.normalize("NFC", path)


def _files_by_nfc_name(
    files: Sequence[str], by_folder: dict[str, list[str]]
) -> dict[str, list[str]]:
    """{NFC form of a file or folder path: the files it names}; by_folder: _files_by_folder's."""
    index: dict[str, list[str]] = collections.defaultdict(list)
    for f in files:
        index[_nfc(f)].append(f)
    for folder, below in by_folder.items():
        index[_nfc(folder)].extend(below)
    return index


def _by_lower_case(files: Sequence[str]) -> dict[str, str]:
    """{lower-case path: path} of every file and every folder above one."""
    index = {}
    for f in files:
        parts = f.split("/")
        for n in range(1, len(parts) + 1):
            path = "/".join(parts[:n])
            index.setdefault(path.lower(), path)
    return index


def split_patients(patient_has_lesion: dict[str, bool], spec: SplitSpec) -> dict[str, str]:
    """Assigns each patient to a split, stratified by whether the patient has any lesion.

    Within a stratum, patients are ordered by a hash of (seed, patient id) and cut by counts: a
    patient's place in the order depends on its id alone, so adding or removing patients moves
    only those near a cut (384 patients and 38 added: 11 of the 384 moved), where a shuffle of
    the whole list would reshuffle everyone and a rebuilt dataset would test on patients an older
    model trained on. Relabelling a patient's lesion status moves it to the other stratum.
    """
    assignment: dict[str, str] = {}
    for stratum in (False, True):
        patients = sorted(
            (p for p, has in patient_has_lesion.items() if has == stratum),
            key=lambda p: (_patient_hash(spec.seed, p), p),
        )
        n = len(patients)
        n_test = round(n * spec.test)
        n_val = round(n * spec.validation)
        # Small strata: give validation and test one patient each when asked for and possible.
        if spec.test > 0 and n_test == 0 and n >= 3:
            n_test = 1
        if spec.validation > 0 and n_val == 0 and n >= 3:
            n_val = 1
        for i, p in enumerate(patients):
            assignment[p] = (
                "test" if i < n_test else "validation" if i < n_test + n_val else "train"
            )
    return assignment


def _rows_disagree(rows: Sequence[_Label]) -> str | None:
    """Why the label rows that name one file disagree (label, patient or source), or None."""
    fields = labels_lib.disagreeing_fields(rows)
    if not fields:
        return None
    field = fields[0]

    def show(r: _Label) -> str:
        return labels_lib.LABEL_NAMES[r.label] if field == "label" else getattr(r, field)

    return f"label rows disagree on {field}: " + ", ".join(
        f"{r.where}={show(r)}" for r in rows if getattr(r, field) is not None
    )


def _patient_hash(seed: int, patient_id: str) -> bytes:
    text = f"{seed}\0{patient_id}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(text).digest()


def curate(
    manual_dir: str | os.PathLike,
    *,
    image_size: int,
    split: SplitSpec,
    workers: int | None = None,
    name: str | None = None,
) -> Curation:
    """Scans, decodes, labels, de-duplicates and splits a manual dir; see the module docstring.

    `name` is how the report names the input (default: the folder's name).
    """
    manual_dir = pathlib.Path(manual_dir)
    files, sheets = scan(manual_dir)
    decoded = decode_all(manual_dir, files, image_size, workers)
    return curate_decoded(
        manual_dir, files, sheets, decoded, image_size=image_size, split=split, name=name
    )


def scan(manual_dir: pathlib.Path) -> tuple[list[str], list[str]]:
    """The input files and label sheets of a manual dir; a clear error when either is missing."""
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"manual dir {manual_dir} does not exist or is not a folder")
    files, sheets = find_files(manual_dir)
    if not sheets:
        # Sheets that are there but not read: mis-cased (macOS and Windows do not mind), or deeper.
        near = [f for f in files if pathlib.PurePosixPath(f).name.lower() == LABEL_SHEET]
        hint = ""
        if near:
            shown = ", ".join(display_path(f) for f in near[:3]) + (
                ", ..." if len(near) > 3 else ""
            )
            hint = (
                f"; found {shown}: a sheet is read only when named {LABEL_SHEET} (lower case), in "
                "the manual dir or a top-level folder of it"
            )
        raise FileNotFoundError(
            f"no {LABEL_SHEET} in {manual_dir} (nor in its top-level folders){hint}: see the "
            "dataset's manual download instructions for its columns"
        )
    for sheet in sheets:  # a sheet's errors before hours of decoding, not after
        labels_lib.read_labels(manual_dir / sheet, regular_only=True)
    return files, sheets


def curate_decoded(
    manual_dir: pathlib.Path,
    files: Sequence[str],
    sheets: Sequence[str],
    decoded: Sequence[_Decoded],
    *,
    image_size: int,
    split: SplitSpec,
    name: str | None = None,
) -> Curation:
    """The curation proper, on files already decoded (in this process, a pool, or Beam workers)."""
    decoded = sorted(decoded, key=lambda d: d.path)
    if [d.path for d in decoded] != sorted(files):
        raise AssertionError("curation needs exactly one decode result per input file")
    labels_by_file, unmatched, n_rows = _match_labels(manual_dir, sheets, files, decoded)

    entries: dict[str, dict[str, Any]] = {}
    # Image ids → the file that holds the kept copy: ("sop", SOP UID/frame) and
    # ("pixels", patient, hash). Owner ids → (patient, file) of the first copy: ("sop", ...) and
    # ("pixels", hash) of a slice that is not one flat value (blank frames repeat across patients).
    kept_by_image: dict[tuple, str] = {}
    kept_pixels: dict[str, str] = {}  # SOP UID/frame of a kept slice → its pixel hash
    owner: dict[tuple, tuple[str, str]] = {}
    copies: dict[str, list[str]] = collections.defaultdict(list)  # kept file → its duplicates
    file_label: dict[str, _Label] = {}
    kept_slices: dict[str, list[SliceRecord]] = {}
    conflicted_images: set[tuple] = set()

    def exclude(path: str, detail: str, duplicate_of: str | None = None) -> None:
        """Marks a file a conflict (none of its slices written), and every copy of it."""
        entry = entries[path]
        for key in ("label", "patient_id", "slices_written", "duplicate_slices"):
            entry.pop(key, None)
        entry.update(status="conflict", detail=detail)
        if duplicate_of is not None:
            entry["duplicate_of"] = display_path(duplicate_of)
        kept_slices.pop(path, None)
        for copy in copies.pop(path, []):
            exclude(copy, f"a copy of {display_path(path)}, whose copies conflict", path)

    def exclude_kept(path: str, detail: str) -> None:
        """Excludes a file kept earlier, and makes its images conflicting for later copies."""
        conflicted_images.update(i for i, f in kept_by_image.items() if f == path)
        conflicted_images.update(i for i, (_, f) in owner.items() if f == path)
        exclude(path, detail)

    for d in decoded:
        rows = labels_by_file.get(d.path, [])
        entry: dict[str, Any] = {"path": display_path(d.path)}
        entries[d.path] = entry
        if d.reason is not None:
            entry.update(status="skipped", reason=d.reason, detail=d.detail)
            file_name = pathlib.PurePosixPath(d.path).name
            if file_name == LABEL_SHEET:
                entry["detail"] = (
                    f"a {LABEL_SHEET} deeper than one folder below the manual dir is not read; "
                    f"move its rows to the manual dir's or a top-level folder's {LABEL_SHEET}"
                )
            elif file_name.lower() == LABEL_SHEET:
                entry["detail"] = (
                    f"named {file_name}: a label sheet must be named {LABEL_SHEET} (lower case) "
                    "to be read; rename it"
                )
            if rows:
                entry["labelled_by"] = [r.where for r in rows]
            continue
        entry["slices"] = len(d.slices)
        if not d.hounsfield:  # not CT (nor values said to be HU by their Rescale Type)
            entry["modality"] = d.modality
        if d.clipped:
            entry["clipped_pixels"] = d.clipped
        if d.no_spacing:
            entry["no_pixel_spacing"] = True
        if d.non_square is not None:
            entry["non_square_pixels_mm"] = list(d.non_square)
        if d.plane is not None:
            entry["not_axial"] = d.plane
        if d.turned is not None:
            entry["turned"] = d.turned
        if not rows:
            entry.update(status="unlabelled")
            continue
        entry["labelled_by"] = [r.where for r in rows]  # every row naming it, also in a conflict
        # Each slice on its own: a multi-frame file may repeat some images and add others. A
        # file without a SOP Instance UID has no id to compare: only its pixels identify it.
        owner_ids = [
            ([("sop", s.image_id)] if s.image_id.split("/")[0] else [])
            + ([("pixels", s.pixel_hash)] if s.image.min() != s.image.max() else [])
            for s in d.slices
        ]
        disagreement = _rows_disagree(rows)
        if disagreement:
            # The file and every copy of it (kept before, or met later) are excluded.
            ids = {i for owned in owner_ids for i in owned} | {
                ("pixels", r.patient_id, s.pixel_hash) for r in rows for s in d.slices
            }
            conflicted_images.update(ids)
            exclude(d.path, disagreement)
            holders = {kept_by_image[i] for i in ids if i in kept_by_image}
            holders |= {owner[i][1] for i in ids if i in owner}
            for held in sorted(holders & kept_slices.keys()):
                exclude_kept(
                    held, f"same image as {display_path(d.path)}, whose label rows disagree"
                )
            continue
        label = dataclasses.replace(
            rows[0], source=next((r.source for r in rows if r.source), None)
        )
        slice_ids = [
            ([("sop", s.image_id)] if s.image_id.split("/")[0] else [])
            + [("pixels", label.patient_id, s.pixel_hash)]
            for s in d.slices
        ]
        problem = None
        for s, ids, owned in zip(d.slices, slice_ids, owner_ids, strict=True):
            earlier = next((kept_by_image[i] for i in ids if i in kept_by_image), None)
            other = next(
                (
                    (*owner[i], i[0])
                    for i in owned
                    if owner.get(i, (label.patient_id,))[0] != label.patient_id
                ),
                None,
            )
            if any(i in conflicted_images for i in ids + owned):
                problem = (f"{s.image_id or 'a slice'}: the same image as a conflicting file", None)
            elif other is not None:
                other_patient, first, kind = other
                what = (
                    f"SOP Instance UID {s.image_id} is also in"
                    if kind == "sop"
                    else f"slice {s.index}: the same pixels are in"
                )
                problem = (
                    f"{what} {display_path(first)}, labelled as patient {other_patient}, here as "
                    f"patient {label.patient_id}: one image cannot belong to two patients "
                    "(a mixed-up export or label sheet)",
                    first,
                )
            elif s.image_id in kept_pixels and kept_pixels[s.image_id] != s.pixel_hash:
                first = kept_by_image[("sop", s.image_id)]
                problem = (
                    f"SOP Instance UID {s.image_id} is also in {display_path(first)}, with other "
                    "pixels: one UID names one image, so neither copy can be told to be the "
                    "right one (a UID reused by an anonymiser or an export?)",
                    first,
                )
            elif earlier is not None and file_label[earlier].label != label.label:
                first = file_label[earlier]
                problem = (
                    f"same image as {display_path(earlier)} "
                    f"({labels_lib.LABEL_NAMES[first.label]}) but labelled "
                    f"{labels_lib.LABEL_NAMES[label.label]} by {label.where}",
                    earlier,
                )
            if problem:
                break
        if problem:
            detail, earlier = problem
            conflicted_images.update(i for ids in slice_ids + owner_ids for i in ids)
            exclude(d.path, detail, earlier)
            if earlier is not None and earlier in kept_slices:
                exclude_kept(
                    earlier, f"same image as {display_path(d.path)}, which conflicts with it"
                )
            continue
        new, repeated = [], []
        for s, ids, owned in zip(d.slices, slice_ids, owner_ids, strict=True):
            earlier = next((kept_by_image[i] for i in ids if i in kept_by_image), None)
            if earlier is not None:
                repeated.append((s, earlier))
                continue
            new.append(s)
            if s.image_id.split("/")[0]:
                kept_pixels[s.image_id] = s.pixel_hash
            for i in ids:
                kept_by_image[i] = d.path
            for i in owned:
                owner[i] = (label.patient_id, d.path)
        if not new:
            first = repeated[0][1]
            entry.update(status="duplicate", duplicate_of=display_path(first))
            copies[first].append(d.path)
            continue
        file_label[d.path] = label
        kept_slices[d.path] = new
        entry.update(
            status="written",
            label=labels_lib.LABEL_NAMES[label.label],
            patient_id=label.patient_id,
        )
        if repeated:  # some slices were kept earlier: listed, the rest written
            entry["slices_written"] = len(new)
            entry["duplicate_slices"] = [
                {"slice": s.index, "image_id": s.image_id, "duplicate_of": display_path(f)}
                for s, f in repeated
            ]

    written = [d for d in decoded if entries[d.path]["status"] == "written"]
    # Sheet patients whose images share a DICOM study or series are one patient to the split:
    # a study is one person's, so they are one person under two ids (a typo, ids per study)
    # and in two splits they would leak; reported to fix in the sheet.
    group_of, shared = _patients_sharing_studies(
        (file_label[d.path].patient_id, s) for d in written for s in kept_slices[d.path]
    )
    has_lesion: dict[str, bool] = {}
    for d in written:
        group = group_of[file_label[d.path].patient_id]
        has_lesion[group] = has_lesion.get(group, False) or file_label[d.path].label == 1
    by_group = split_patients(has_lesion, split)
    assignment = {patient: by_group[group] for patient, group in group_of.items()}
    for link in shared:
        link["split"] = assignment[link["patient_ids"][0]]
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for d in written:
        lab = file_label[d.path]
        entries[d.path]["split"] = assignment[lab.patient_id]
        splits[assignment[lab.patient_id]].extend(
            Example(s, lab.label, lab.patient_id, lab.source or s.source)
            for s in kept_slices[d.path]
        )
    _check_patients_disjoint(splits)
    report = _report(
        name or manual_dir.name,
        files,
        sheets,
        n_rows,
        entries,
        unmatched,
        splits,
        split,
        image_size,
        shared,
    )
    report["label_sheet_sha256"] = sheet_hashes(manual_dir, sheets)
    return Curation(splits=splits, report=report)


def check_records_current(data_dir: str | os.PathLike, manual_dir: str | os.PathLike) -> None:
    """Raises ValueError when records already built in `data_dir` (its curation_report.json)
    came from another state of `manual_dir` (`stale_records`): reused, they would give the old
    labels and files without a word. Silent where either is missing (nothing to compare)."""
    report_path = epath.Path(data_dir) / "curation_report.json"
    if not os.path.isdir(manual_dir) or not report_path.exists():
        return
    changes = stale_records(json.loads(report_path.read_text()), manual_dir)
    if changes:
        raise ValueError(
            f"the records in {data_dir} were built from {manual_dir} as it was then, and it has "
            f"changed since: {changes}. Reused, they would give the old labels and files; "
            "rebuild them (tfds build ... --overwrite, or delete that folder first)"
        )


def sheet_hashes(manual_dir: pathlib.Path, sheets: Sequence[str]) -> dict[str, str]:
    """{sheet: SHA-256 of its bytes}: what `stale_records` compares a later manual dir with."""
    return {
        sheet: hashlib.sha256((pathlib.Path(manual_dir) / sheet).read_bytes()).hexdigest()
        for sheet in sheets
    }


def stale_records(report: dict[str, Any], manual_dir: str | os.PathLike) -> str | None:
    """How the manual dir differs from the one the records were built from (`report`, their
    curation_report.json): other label sheets or sheet contents, files gone or added. None when
    it does not, or when the report is older than the sheets' hashes (nothing to compare). A
    DICOM file rewritten in place under its name is not seen."""
    built = report.get("label_sheet_sha256")
    if built is None:
        return None
    manual_dir = pathlib.Path(manual_dir)
    files, sheets = find_files(manual_dir)
    now = sheet_hashes(manual_dir, sheets)
    changes = []
    for sheet in sorted(set(built) | set(now)):
        if sheet not in now:
            changes.append(f"{display_path(sheet)} is gone")
        elif sheet not in built:
            changes.append(f"{display_path(sheet)} is new")
        elif now[sheet] != built[sheet]:
            changes.append(f"{display_path(sheet)} changed")
    # Files the build skipped (a .DS_Store, notes) may come and go; new ones count when they
    # may be DICOM.
    entries = report.get("files", ())
    before = {e["path"] for e in entries}
    after = {display_path(f): f for f in files}
    gone = {e["path"] for e in entries if e.get("status") != "skipped"} - after.keys()
    new = {p for p, f in after.items() if p not in before and _may_be_dicom(manual_dir / f)}
    for what, paths in (("gone", gone), ("new", new)):
        if paths:
            first = sorted(paths)[0]
            changes.append(f"{len(paths)} input files are {what} (such as {first})")
    return "; ".join(changes) or None


def _may_be_dicom(path: pathlib.Path) -> bool:
    """Whether a file may hold a DICOM image: not hidden, and 'DICM' at byte 128 or a start
    like a dataset's without a preamble."""
    if path.name.startswith(".") or path.name.lower() in ("thumbs.db", "desktop.ini"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or dicom._starts_like_dataset(head)


def _id_form(patient_id: str) -> str:
    """A patient id without what varies between spellings of one id: case, separators and other
    punctuation, invisible characters, and the leading zeros of its numbers."""
    text = unicodedata.normalize("NFKC", patient_id).casefold()
    kept = "".join(c for c in text if unicodedata.category(c)[0] != "C")
    # Runs of letters and of digits, whatever separates them (LIV-001, LIV_1 and LIV001 are
    # liv/1), numbers without leading zeros (P0021 as P21); S1-011 and S11-001 stay apart.
    runs = re.findall(r"[^\W\d_]+|\d+", kept)
    return "-".join(r.lstrip("0") or "0" if r.isdigit() else r for r in runs)


def _patients_sharing_studies(
    slices: Iterable[tuple[str, SliceRecord]],
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """({sheet patient: its group}, the groups of several patients with the UIDs they share)
    from (sheet patient, slice) pairs: patients are grouped when their slices share a non-empty
    Study or Series Instance UID. A group is named by its first patient id."""
    parent: dict[str, str] = {}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    first_of: dict[tuple[str, str], str] = {}
    uids_of: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for patient, s in slices:
        parent.setdefault(patient, patient)
        for kind, uid in (("study", s.study_uid), ("series", s.series_uid)):
            if not uid.strip():
                continue
            uids_of[(kind, uid)].add(patient)
            other = first_of.setdefault((kind, uid), patient)
            a, b = find(patient), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    group_of = {p: find(p) for p in parent}
    members: dict[str, list[str]] = collections.defaultdict(list)
    for p, g in sorted(group_of.items()):
        members[g].append(p)
    shared = []
    for group, patients in sorted(members.items()):
        if len(patients) < 2:
            continue
        keys = sorted(
            key for key, who in uids_of.items() if len(who) > 1 and group_of[min(who)] == group
        )
        shared.append(
            {
                "patient_ids": patients,
                "study_uids": sorted(uid for kind, uid in keys if kind == "study"),
                "series_uids": sorted(uid for kind, uid in keys if kind == "series"),
            }
        )
    return group_of, shared


# Near-identical images of two sheet patients (a re-exported, recompressed or re-anonymised copy
# with new UIDs): soft-tissue thumbnails whose correlation is at least NEAR_IDENTICAL_CORRELATION.
# A recompressed copy or one with noise added correlates above 0.9997; neighbouring slices of one
# scan up to 0.9996; two people's slices at one level up to 0.99 (phantom anatomy, which varies
# less than people's). Slices with little soft tissue (air and the table above and below the body)
# are left out: they look alike in every patient from one scanner.
NEAR_IDENTICAL_CORRELATION = 0.999
THUMBNAIL_SIDE = 16
THUMBNAIL_WINDOW_HU = (-160, 240)  # soft tissue: fat, muscle, liver, vessels with contrast
THUMBNAIL_MIN_TISSUE = 0.1  # the fraction of a slice's pixels in the window
NEAR_IDENTICAL_MAX_SLICES = 200_000  # the comparison takes time in the square of the slices
NEAR_IDENTICAL_EXAMPLES = 3  # slice pairs listed per patient pair
NEAR_IDENTICAL_CHUNK = 2**24  # correlations or pixels at once (64 MB of float32)


def thumbnails(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, usable) of (n, h, w) HU images: each image clipped to the soft-tissue window,
    averaged over a THUMBNAIL_SIDE² grid, centred and scaled to length 1; `usable` where at least
    THUMBNAIL_MIN_TISSUE of the pixels are in the window and the thumbnail is not flat."""
    lo, hi = THUMBNAIL_WINDOW_HU
    x = np.clip(images.astype(np.float32), lo, hi)
    tissue = ((x > lo) & (x < hi)).mean(axis=(1, 2))
    n, h, w = x.shape
    rows = np.linspace(0, h, min(THUMBNAIL_SIDE, h) + 1).astype(int)
    cols = np.linspace(0, w, min(THUMBNAIL_SIDE, w) + 1).astype(int)
    cells = np.add.reduceat(np.add.reduceat(x, rows[:-1], axis=1), cols[:-1], axis=2)
    cells /= np.outer(np.diff(rows), np.diff(cols))
    v = cells.reshape(n, -1)
    v -= v.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(v, axis=1)
    usable = (tissue >= THUMBNAIL_MIN_TISSUE) & (norm > 1e-3)
    return v / np.where(usable, norm, 1.0)[:, None], usable


def near_identical_images(splits: dict[str, list[Example]]) -> list[dict[str, Any]] | str:
    """Pairs of sheet patients with near-identical images (see NEAR_IDENTICAL_CORRELATION): each
    pair with its splits, how many slice pairs match, and the closest few. A string saying why
    when there are too many slices to compare."""
    examples = [e for name in SPLITS for e in splits.get(name, ())]
    if len(examples) > NEAR_IDENTICAL_MAX_SLICES:
        return (
            f"not checked: {len(examples)} slices, over {NEAR_IDENTICAL_MAX_SLICES} (the check "
            "compares every pair)"
        )
    if not examples:
        return []
    if len(examples) > 20_000:
        logging.getLogger(__name__).info(
            "curation: comparing %d slices for near-identical images of two patients (time "
            "grows with the square of the count: about 5 s for 20,000 slices on 2 CPU cores)",
            len(examples),
        )
    per = max(1, NEAR_IDENTICAL_CHUNK // examples[0].record.image.size)  # images at once
    parts = [
        thumbnails(np.stack([e.record.image for e in examples[start : start + per]]))
        for start in range(0, len(examples), per)
    ]
    vectors = np.concatenate([v for v, _ in parts])
    usable = np.concatenate([u for _, u in parts])
    keep = np.flatnonzero(usable)
    vectors = vectors[keep]
    patients = np.asarray([examples[i].patient_id for i in keep])
    split_of = {e.patient_id: name for name in SPLITS for e in splits.get(name, ())}
    found: dict[tuple[str, str], list[tuple[float, str, str]]] = collections.defaultdict(list)
    chunk = max(1, NEAR_IDENTICAL_CHUNK // max(1, len(keep)))  # rows compared at once
    for start in range(0, len(keep), chunk):
        stop = min(start + chunk, len(keep))
        similar = vectors[start:stop] @ vectors[start:].T
        i, j = np.nonzero(similar >= NEAR_IDENTICAL_CORRELATION)
        j_abs = j + start
        other = (j_abs > i + start) & (patients[i + start] != patients[j_abs])
        for a, b in zip(i[other] + start, j_abs[other], strict=True):
            first, second = sorted((a, b), key=lambda k: patients[k])
            found[(patients[first], patients[second])].append(
                (
                    float(similar[a - start, b - start]),
                    examples[keep[first]].record.key,
                    examples[keep[second]].record.key,
                )
            )
    out = []
    for (a, b), pairs in sorted(found.items()):
        pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
        out.append(
            {
                "patient_ids": [a, b],
                "splits": [split_of[a], split_of[b]],
                "slice_pairs": len(pairs),
                "closest": [
                    {"slices": [x, y], "correlation": round(c, 6)}
                    for c, x, y in pairs[:NEAR_IDENTICAL_EXAMPLES]
                ],
            }
        )
    return out


def _check_patients_disjoint(splits: dict[str, list[Example]]) -> None:
    """Raises if a patient appears in two splits (a leak that would inflate every metric)."""
    seen: dict[str, str] = {}
    for name, examples in splits.items():
        for e in examples:
            other = seen.setdefault(e.patient_id, name)
            if other != name:
                raise AssertionError(f"patient {e.patient_id} is in both {other} and {name}")


def _report(
    name: str,
    files: Sequence[str],
    sheets: Sequence[str],
    n_rows: int,
    entries: dict[str, dict[str, Any]],
    unmatched: list[dict[str, Any]],
    splits: dict[str, list[Example]],
    spec: SplitSpec,
    image_size: int,
    shared: list[dict[str, Any]],
) -> dict[str, Any]:
    """Builds the JSON-serialisable curation report and checks that its counts add up."""
    counts = collections.Counter(e["status"] for e in entries.values())
    reasons = collections.Counter(e["reason"] for e in entries.values() if e["status"] == "skipped")
    if sum(counts.values()) != len(files) or len(entries) != len(files):
        raise AssertionError(f"curation lost files: {len(files)} in, {sum(counts.values())} out")
    split_summary = {}
    for split_name, examples in splits.items():
        labels = [e.label for e in examples]
        split_summary[split_name] = {
            "patients": len({e.patient_id for e in examples}),
            "patients_with_lesion": len({e.patient_id for e in examples if e.label == 1}),
            "slices": len(examples),
            "lesion": int(sum(labels)),
            "normal": len(labels) - int(sum(labels)),
            "pixel_spacing_mm": spacing_summary(e.record.pixel_spacing for e in examples),
            "slices_by_source": dict(
                sorted(collections.Counter(e.source for e in examples).items())
            ),
            "patient_ids": sorted({e.patient_id for e in examples}),
        }
    # A DICOM PatientID under several of the sheet's patients: the sheet may have split one person
    # (ids per study, a typo), who can then be in two splits. Reported, not acted on: anonymisers
    # may also write one placeholder PatientID into every file.
    # The reverse, dicom_ids_of: one sheet patient over several DICOM PatientIDs (two people
    # given one id, e.g. sites that each number their patients 001, ...; or one person's two
    # record numbers).
    sheet_patients: dict[str, dict[str, set[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(set)
    )
    dicom_ids_of: dict[str, set[str]] = collections.defaultdict(set)
    split_of: dict[str, str] = {}  # sheet patient → its split
    for split_name, examples in splits.items():
        for e in examples:
            split_of[e.patient_id] = split_name
            if e.record.patient_id.strip():
                sheet_patients[e.record.patient_id][e.patient_id].add(split_name)
                dicom_ids_of[e.patient_id].add(e.record.patient_id)
    several = [
        {
            "dicom_patient_id": dicom_id,
            "patient_ids": sorted(by_sheet),
            "splits": sorted(set().union(*by_sheet.values())),
        }
        for dicom_id, by_sheet in sorted(sheet_patients.items())
        if len(by_sheet) > 1
    ]
    merged = [
        {"patient_id": p, "dicom_patient_ids": sorted(ids)}
        for p, ids in sorted(dicom_ids_of.items())
        if len(ids) > 1
    ]
    # Sheet ids that differ only in case, separators, leading zeros or invisible characters: one
    # person under two spellings, who may be in two splits.
    by_form: dict[str, list[str]] = collections.defaultdict(list)
    for p in sorted(split_of):
        by_form[_id_form(p)].append(p)
    alike = [
        {"patient_ids": ids, "splits": sorted({split_of[i] for i in ids})}
        for ids in by_form.values()
        if len(ids) > 1
    ]
    folders = collections.Counter(source_of(f) for f in files)
    # What reaches the records: other files (mask series, unlabelled scouts) are named per entry.
    written = [e for e in entries.values() if e["status"] == "written"]
    not_ct = collections.Counter(e["modality"] for e in written if "modality" in e)
    sources = collections.Counter(e.source for v in splits.values() for e in v)
    return {
        "input": name,
        "image_size": image_size,
        "split_spec": dataclasses.asdict(spec),
        "label_sheets": list(sheets),
        "label_rows": n_rows,
        "label_rows_without_image": unmatched,
        "top_level_folders": dict(sorted(folders.items())),
        "slices_by_source": dict(sorted(sources.items())),
        "files_total": len(files),
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "skipped_by_reason": dict(sorted(reasons.items())),
        "files_with_clipped_pixels": sum(1 for e in written if e.get("clipped_pixels")),
        "files_not_ct": dict(sorted(not_ct.items())),
        "files_without_pixel_spacing": sum(1 for e in written if e.get("no_pixel_spacing")),
        "files_with_non_square_pixels": sum(1 for e in written if "non_square_pixels_mm" in e),
        "files_not_axial": sum(1 for e in written if "not_axial" in e),
        "files_turned": sum(1 for e in written if "turned" in e),
        "dicom_patient_ids_labelled_as_several_patients": several,
        "patients_sharing_a_study": shared,
        "patients_with_several_dicom_patient_ids": merged,
        "patient_ids_alike": alike,
        "near_identical_images": near_identical_images(splits),
        "splits": split_summary,
        "files": [entries[f] for f in files],
    }


def report_json(report: dict[str, Any]) -> str:
    """The curation report as indented JSON text."""
    return json.dumps(report, indent=1) + "\n"


def summarize(report: dict[str, Any]) -> str:
    """A one-paragraph human summary of a curation report."""
    c = report["counts"]
    lines = [
        f"{report['files_total']} files: " + ", ".join(f"{c[s]} {s}" for s in STATUSES),
    ]
    if report["skipped_by_reason"]:
        lines.append(
            "skipped: " + ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items())
        )
    lines.extend(w.rstrip(".") for w in label_warnings(report))
    lines.extend(w.rstrip(".") for w in patient_warnings(report))
    lines.extend(w.rstrip(".") for w in file_warnings(report))
    lines.extend(n.rstrip(".") for n in file_notes(report))
    for name, s in report["splits"].items():
        lines.append(
            f"{name}: {s['patients']} patients, {s['slices']} slices "
            f"({s['lesion']} lesion, {s['normal']} normal)"
        )
    return "; ".join(lines)


def label_warnings(report: dict[str, Any]) -> list[str]:
    """The label rows that match no image, in one sentence (the build summary's and the
    evaluation report's): labelled cases that are not in the records."""
    unmatched = report.get("label_rows_without_image") or []
    if not unmatched:
        return []
    shown = ", ".join(f"{r['sheet']} line {r['row']}" for r in unmatched[:3])
    return [
        f"{len(unmatched)} label rows match no image (e.g. {shown}): labelled cases that are "
        "not in the records (label_rows_without_image in curation_report.json)."
    ]


def _across_splits(entries: Sequence[dict[str, Any]], name: Any) -> str:
    """'N of them in more than one split, e.g. ...' of report entries with `splits`."""
    across = [x for x in entries if len(set(x["splits"])) > 1]
    if not across:
        return "none in more than one split"
    shown = "; ".join(f"{name(x)}: {', '.join(x['splits'])}" for x in across[:3])
    return f"{len(across)} of them in more than one split, e.g. {shown}"


def patient_warnings(report: dict[str, Any]) -> list[str]:
    """Who may be one person under two patient ids (in two splits, a leak) or two people under
    one, a sentence each: the build summary and the evaluation report say it in the same words.
    Reports from before a check was made lack its key and say nothing of it."""
    warnings = []
    several = report.get("dicom_patient_ids_labelled_as_several_patients")
    if several:
        across = _across_splits(several, lambda x: x["dicom_patient_id"])
        warnings.append(
            f"{len(several)} DICOM PatientIDs are labelled as several patients ({across}): one "
            "person under two ids?"
        )
    alike = report.get("patient_ids_alike")
    if alike:
        across = _across_splits(alike, lambda x: " and ".join(x["patient_ids"]))
        warnings.append(
            f"{len(alike)} groups of patient_ids differ only in case, punctuation or leading "
            f"zeros ({across}): one person under two spellings?"
        )
    near = report.get("near_identical_images")
    if isinstance(near, str):
        warnings.append(f"Near-identical images of two patients were {near}.")
    elif near:
        across = _across_splits(near, lambda x: " and ".join(x["patient_ids"]))
        warnings.append(
            f"{len(near)} pairs of patients have near-identical images ({across}): one person "
            "under two ids, or a re-exported copy?"
        )
    shared = report.get("patients_sharing_a_study")
    if shared:
        warnings.append(
            f"{sum(len(x['patient_ids']) for x in shared)} patients share DICOM studies with "
            f"another ({len(shared)} groups, each kept in one split): one person under two ids?"
        )
    merged = report.get("patients_with_several_dicom_patient_ids")
    if merged:
        warnings.append(
            f"{len(merged)} patients hold images of several DICOM PatientIDs: two people under "
            "one patient_id?"
        )
    return warnings


def file_warnings(report: dict[str, Any]) -> list[str]:
    """What is doubtful in the written files' values and scale, a sentence each: the build summary
    and the evaluation report say it in the same words. Reports from before a key was counted
    lack it and say nothing of it."""
    warnings = []
    not_ct = report.get("files_not_ct")
    if not_ct:
        kinds = ", ".join(f"{n} {m or 'without Modality'}" for m, n in not_ct.items())
        warnings.append(
            f"{sum(not_ct.values())} written input files are not CT ({kinds}): their values are "
            "not Hounsfield units."
        )
    if report.get("files_with_clipped_pixels"):
        warnings.append(
            f"{report['files_with_clipped_pixels']} written input files had pixel values "
            "outside int16, clipped to it (not Hounsfield units?)."
        )
    if report.get("files_with_non_square_pixels"):
        warnings.append(
            f"{report['files_with_non_square_pixels']} written input files have non-square "
            "pixels: resampled as square, their anatomy is stretched along one axis."
        )
    if report.get("files_not_axial"):
        warnings.append(
            f"{report['files_not_axial']} written input files are no axial slice as stored "
            "(localizers, masks, other planes, or rotated in their plane): their entries say "
            "which."
        )
    if report.get("files_without_pixel_spacing"):
        warnings.append(
            f"{report['files_without_pixel_spacing']} written input files have no pixel "
            "spacing: their physical scale is unknown."
        )
    return warnings


def file_notes(report: dict[str, Any]) -> list[str]:
    """What was done to written files that is not doubtful, a sentence each (the build summary
    and the evaluation report): slices turned to the standard axial orientation."""
    if not report.get("files_turned"):
        return []
    return [
        f"{report['files_turned']} written input files were stored rotated, flipped or "
        "transposed (prone; feet first as seen from the gantry) and are turned to the standard "
        "axial orientation: their entries say how."
    ]


def split_warnings(report: dict[str, Any]) -> list[str]:
    """Splits that training or evaluation cannot use: empty, or of one class (validation ROC AUC
    is then undefined and no threshold can be chosen on it), with how to rebuild."""
    if not report["counts"].get("written"):
        return []  # the build fails on that by itself
    spec = report.get("split_spec") or {}
    rebuild = (
        "rebuild with other fractions under a new config name, e.g. tfds build --imports "
        'tfds_liver liver --config \'{"name": "manual_v30", "validation_fraction": 0.3, '
        '"test_fraction": 0.2}\' --manual_dir DIR --data_dir DATA (now validation '
        f"{spec.get('validation')}, test {spec.get('test')})"
    )
    warnings = []
    for name in SPLITS:
        split = report["splits"].get(name)
        if not split or not split["slices"]:
            if name == "train" or spec.get(name, 0) > 0:
                warnings.append(f"split {name!r} has no image (too few patients); {rebuild}")
            continue
        for kind, other in (("lesion", "normal"), ("normal", "lesion")):
            if split[kind] == split["slices"]:
                warnings.append(
                    f"split {name!r} holds only {kind} slices ({split['slices']} slices, "
                    f"{split['patients']} patients, no {other}): its ROC AUC is undefined"
                    + (
                        ", and evaluation cannot choose a threshold on it"
                        if name == "validation"
                        else ""
                    )
                    + f"; {rebuild}"
                )
    return warnings


MAX_LOGGED_ROWS = 20  # unmatched label rows logged one by one; the report lists them all


def log_summary(report: dict[str, Any], logger: logging.Logger | None = None) -> None:
    """Logs the summary at INFO; every skipped/conflicting file, the first label rows that match
    no image (typos?) and the count of unlabelled files at WARNING."""
    logger = logger or logging.getLogger(__name__)
    logger.info("curation: %s", summarize(report))
    for e in _problem_entries(report["files"]):
        reason, detail = e.get("reason", ""), e.get("detail", "")
        logger.warning(
            "curation: %s: %s %s",
            e["path"],
            e["status"],
            f"{reason}: {detail}" if reason and detail else reason or detail,
        )
    unmatched = report["label_rows_without_image"]
    for row in unmatched[:MAX_LOGGED_ROWS]:
        logger.warning(
            "curation: %s line %d (%s) matches no image: %s",
            row["sheet"],
            row["row"],
            row["path"] if row["path"] is not None else row["sop_instance_uid"],
            row["why"],
        )
    if len(unmatched) > MAX_LOGGED_ROWS:
        logger.warning(
            "curation: and %d more label rows match no image (label_rows_without_image in "
            "curation_report.json)",
            len(unmatched) - MAX_LOGGED_ROWS,
        )
    for warning in split_warnings(report):
        logger.warning("curation: %s", warning)
    unlabelled = report["counts"].get("unlabelled", 0)
    if unlabelled:
        logger.warning(
            "curation: %d decoded files are named by no label row and are not in the records "
            '(status "unlabelled" in curation_report.json: mask series, localizers, or rows '
            "missing from the sheet?)",
            unlabelled,
        )
    for x in report.get("dicom_patient_ids_labelled_as_several_patients", ()):
        logger.warning(
            "curation: DICOM PatientID %r is labelled as %d patients (%s) in splits %s: if they "
            "are one person, give their rows one patient_id",
            x["dicom_patient_id"],
            len(x["patient_ids"]),
            _first_ids(x["patient_ids"]),
            ", ".join(x["splits"]),
        )
    for x in report.get("patients_with_several_dicom_patient_ids", ()):
        logger.warning(
            "curation: patient %s holds images of DICOM PatientIDs %s: if they are different "
            "people, give them different patient_ids",
            x["patient_id"],
            _first_ids(x["dicom_patient_ids"]),
        )
    for x in report.get("patient_ids_alike", ()):
        logger.warning(
            "curation: patient_ids %s differ only in case, punctuation or leading zeros (splits "
            "%s): if they are one person, give their rows one patient_id",
            ", ".join(repr(i) for i in x["patient_ids"]),
            ", ".join(x["splits"]),
        )
    for x in report.get("patients_sharing_a_study", ()):
        logger.warning(
            "curation: patients %s share DICOM %s: one study is one person's, so they are kept "
            "together in the %s split; give their rows one patient_id if they are one person",
            _first_ids(x["patient_ids"]),
            f"study {x['study_uids'][0]}" if x["study_uids"] else f"series {x['series_uids'][0]}",
            x["split"],
        )
    near = report.get("near_identical_images") or []
    if isinstance(near, str):  # not checked, and why
        logger.warning("curation: near-identical images of two patients: %s", near)
        near = []
    for x in near[:MAX_LOGGED_ROWS]:
        closest = x["closest"][0]
        logger.warning(
            "curation: patients %s (%s) and %s (%s) have %d near-identical slice pairs (e.g. %s "
            "and %s, correlation %.4f): if they are one person or one scan re-exported, give "
            "their rows one patient_id; else ignore",
            x["patient_ids"][0],
            x["splits"][0],
            x["patient_ids"][1],
            x["splits"][1],
            x["slice_pairs"],
            *closest["slices"],
            closest["correlation"],
        )
    if len(near) > MAX_LOGGED_ROWS:
        logger.warning(
            "curation: and %d more pairs of patients with near-identical images "
            "(near_identical_images in curation_report.json)",
            len(near) - MAX_LOGGED_ROWS,
        )
    for e in report["files"]:
        if e["status"] != "written":
            continue  # nothing of it is in the records
        if "modality" in e:
            logger.warning(
                "curation: %s: %s, not CT: its values are not Hounsfield units (%s)",
                e["path"],
                f"Modality {e['modality']}" if e["modality"] else "no Modality",
                e["status"],
            )
        if e.get("clipped_pixels"):
            logger.warning(
                "curation: %s: %d pixels outside int16 [%d, %d] were clipped to it "
                "(values are not Hounsfield units? check modality and rescale)",
                e["path"],
                e["clipped_pixels"],
                INT16.min,
                INT16.max,
            )
        if "not_axial" in e:
            logger.warning("curation: %s: %s", e["path"], e["not_axial"])
        if "non_square_pixels_mm" in e:
            row, col = e["non_square_pixels_mm"]
            logger.warning(
                "curation: %s: pixels are %g x %g mm (row x column), not square; the resample "
                "to a square image treats them as square, so the anatomy is stretched",
                e["path"],
                row,
                col,
            )


def _first_ids(ids: Sequence[str], n: int = 5) -> str:
    """The first `n` ids, joined, with ", ..." when there are more (for a log line); an id with
    invisible characters or spaces at its ends as Python writes it ('P0023\\u200b'), as it
    would look like another."""
    shown = [i if i.isprintable() and i == i.strip() and i else repr(i) for i in ids[:n]]
    return ", ".join(shown) + (", ..." if len(ids) > n else "")


def _problem_entries(entries: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    return (e for e in entries if e["status"] in ("skipped", "conflict"))
