"""Score DICOM files or HU images with a trained run, in this process, as its evaluation does.

From Python:

    from liverjax import predict
    predictor = predict.Predictor.load("W")  # the best checkpoint; checkpoint="latest" or a step
    probs = predictor.predict_hu(hu)  # HU images (N, S, S[, 1]) at the records' size S → (N,)
    scored = predictor.score_files(["scans/"])  # DICOM files and folders → Scored

On the command line:

    python -m liverjax.predict --workdir W --out P PATH [PATH ...] [--checkpoint best|latest|STEP]

writes P/predictions.csv (a row per slice), P/patients.csv (a row per patient: its DICOM
PatientID), P/studies.csv (a row per study of each), P/files.csv (every input file: scored,
skipped with the decoder's reason, repeated, duplicate, or not reached when interrupted) and
P/summary.json (the checkpoint, the thresholds, the counts and `warnings`: patients of more or
fewer slices than the validation patients the patient-level thresholds were chosen on). An
--out holding an earlier prediction is refused unless --overwrite; Ctrl-C writes what was scored
and exits 130.

Nothing here is a second implementation: the checkpoint is restored by `evaluate.restore`, the
images go through training's jitted `predict` (the preprocessing is inside it), DICOM files are
decoded and resampled to the records' size by `dicom.decode_resampled` (the dataset builder's
steps, and the server's), and the labels use the run's operating point,
`W/operating_point.json`, as the exported model does (`export.operating_point`). A slice scored
here has the probability the evaluation gave its record.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath

from liverjax import (
    checkpointing,
    dicom,
    evaluate,
    export,
    host_memory,
    input_pipeline,
    metrics,
    train,
)
from tfds_liver import curation
from tfds_liver.labels import LABEL_NAMES

logger = logging.getLogger("liverjax.predict")  # (not __name__: "__main__" under -m)

PREDICTIONS_FILE = "predictions.csv"
PATIENTS_FILE = "patients.csv"
FILES_FILE = "files.csv"
SUMMARY_FILE = "summary.json"
STUDIES_FILE = "studies.csv"
OUTPUT_FILES = (PREDICTIONS_FILE, PATIENTS_FILE, STUDIES_FILE, FILES_FILE, SUMMARY_FILE)
# files.csv statuses besides "scored" and "skipped" (with the decoder's reason, or these reasons)
REPEATED = "repeated"  # the same file given twice, or reached by two paths: read once
DUPLICATE = "duplicate"  # every image of it was already scored (`_identity`)
NOT_REACHED = "not_reached"  # the run was interrupted before this file
NOT_CT = "not_ct"  # a reason: the file is not CT and allow_non_ct is off
LABEL_SHEET = "label_sheet"  # a reason: a folder's labels.csv, not an image
NOT_A_FILE = "not_a_file"  # a reason (the decoder's): a FIFO, socket, device or folder
PATIENT_LEVELS = {level: how for level, how in evaluate.LEVELS.items() if how is not None}
SLICE_COLUMNS = (
    *("file", "frame", "image_id", "patient_id", "study_uid", "series_uid", "sop_uid"),
    *("instance_number", "slice_position", "modality"),
    *("probability", "predicted", "predicted_name", "warnings", "turned"),
)
_AGGREGATE_COLUMNS = (
    *("slices", "slices_with_warnings", "probability_max", "predicted_max"),
    *("probability_mean", "predicted_mean"),
)
PATIENT_COLUMNS = ("patient", "grouped_by", "studies", *_AGGREGATE_COLUMNS)
STUDY_COLUMNS = ("patient", "grouped_by", "study_uid", "series", *_AGGREGATE_COLUMNS)
FILE_COLUMNS = ("file", "status", "slices", "reason", "detail")
PROGRESS_EVERY_FILES = 1000  # a log line per this many files


class InputFile(NamedTuple):
    name: str  # as the user gave it: the folder given joined to the file's path in it
    path: str
    label_sheet: bool  # a folder's labels.csv, which the dataset build would read as labels


def patient_of(row: dict[str, Any]) -> tuple[str, str]:
    """(the patient a scored slice is counted under, what that is): its PatientID; without one
    (anonymised exports blank it) its study, else its file, never one "" patient of many."""
    if row["patient_id"].strip():
        return row["patient_id"], "PatientID"
    if row["study_uid"].strip():
        return row["study_uid"], "StudyInstanceUID"
    return row["file"], "file"


@dataclasses.dataclass
class Scored:
    """What `Predictor.score_files` found: a row per slice, a row per input file."""

    slices: list[dict[str, Any]]  # SLICE_COLUMNS (warnings: a list, turned: None or how)
    files: list[dict[str, Any]]  # FILE_COLUMNS
    patient_thresholds: dict[str, float]  # the predictor's, for `patients` and `studies`
    interrupted: bool = False  # stopped early (Ctrl-C): the files not reached are NOT_REACHED

    def patients(self) -> list[dict[str, Any]]:
        """A row per patient (`patient_of`): its studies, slices, slices with warnings, the max
        and mean of their probabilities (`metrics.aggregate_by_group`, as evaluation's patient
        levels) and the predicted class at the run's patient-level thresholds."""
        return self._aggregate(patient_of, ("patient", "grouped_by"), "study_uid", "studies")

    def studies(self) -> list[dict[str, Any]]:
        """`patients`, a row per study of each (a follow-up exam is not merged with the first),
        at the same thresholds."""
        return self._aggregate(
            lambda row: (*patient_of(row), row["study_uid"]),
            ("patient", "grouped_by", "study_uid"),
            "series_uid",
            "series",
        )

    def _aggregate(
        self, key_of: Callable[[dict], tuple], names: tuple[str, ...], field: str, label: str
    ) -> list[dict[str, Any]]:
        if not self.slices:
            return []
        keys = [key_of(row) for row in self.slices]
        units = sorted(set(keys))
        index = {key: i for i, key in enumerate(units)}
        groups = np.asarray([index[key] for key in keys])
        rows = [dict(zip(names, unit, strict=True)) for unit in units]
        distinct = [set() for _ in units]
        for row, g in zip(rows, np.bincount(groups, minlength=len(units)), strict=True):
            row |= {label: 0, "slices": int(g), "slices_with_warnings": 0}
        for g, s in zip(groups, self.slices, strict=True):
            distinct[g].add(s[field])
            rows[g]["slices_with_warnings"] += bool(s["warnings"])
        for row, values in zip(rows, distinct, strict=True):
            row[label] = len(values)
        probs = np.asarray([row["probability"] for row in self.slices])
        unlabelled = np.zeros(len(probs), np.int64)
        for level, how in PATIENT_LEVELS.items():
            _, _, agg = metrics.aggregate_by_group(groups, unlabelled, probs, how)
            for row, p in zip(rows, agg, strict=True):
                row[f"probability_{how}"] = float(p)
                row[f"predicted_{how}"] = int(p >= self.patient_thresholds[level])
        return rows


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained run's checkpoint, ready to score images (one process; its devices, any number)."""

    workdir: str
    restored: evaluate.Restored
    config: ml_collections.ConfigDict
    input_size: int  # the records' side S: images are resampled to it, as the builder does
    threshold: float  # the slice-level operating point
    threshold_source: str  # W/operating_point.json, or "default" (0.5; the run was not evaluated)
    patient_thresholds: dict[str, float]  # patient_max / patient_mean
    chosen: dict[str, Any]  # how the operating point was chosen ({} for the default)

    @classmethod
    def load(
        cls,
        workdir: str | os.PathLike,
        checkpoint: str | int = "best",
        *,
        data_dir: str | None = None,
        allow_other_checkpoint_threshold: bool = False,
    ) -> Predictor:
        """Restores checkpoint `checkpoint` ('best', 'latest' or a step) of the run in `workdir`.

        The records are not needed: their size is saved with the checkpoint (runs before that
        take it from the dataset's info, in `data_dir` if given). The thresholds are
        `W/operating_point.json`'s, which must have been chosen for this checkpoint unless
        `allow_other_checkpoint_threshold`; without the file, 0.5 with a warning.
        """
        if jax.process_count() > 1:
            raise ValueError(
                "liverjax.predict runs in one process; score on one host (its devices are used)"
            )
        config = evaluate.load_config(workdir)
        if data_dir is not None:
            config.dataset.data_dir = data_dir
        restored = evaluate.restore(config, workdir, checkpoint)
        size = record_size(restored.meta, config.dataset)
        threshold, source, chosen = export.operating_point(
            workdir, restored.step, restored.note, allow_other_checkpoint_threshold, stacklevel=3
        )
        levels = chosen.get("patient_level") or {}
        patient = {level: float(levels.get(level, threshold)) for level in PATIENT_LEVELS}
        return cls(os.fspath(workdir), restored, config, size, threshold, source, patient, chosen)

    @property
    def step(self) -> int:
        return self.restored.step

    def predict_hu(self, hu: Any) -> np.ndarray:
        """Lesion probabilities (N,) float64 of HU images (N, S, S) or (N, S, S, 1) at the
        records' size S (`input_size`): integers within int16, as the records hold them, or
        floats, rounded to them as the builder rounds (`dicom.to_int16`). Batches of
        `config.eval_batch_size`, the last one padded, through training's jitted `predict`."""
        images = self._as_records(hu)
        batch = self.config.eval_batch_size

        def padded() -> Iterator[np.ndarray]:
            for start in range(0, len(images), batch):
                chunk = images[start : start + batch]
                out = np.zeros((batch, *images.shape[1:]), np.int16)
                out[: len(chunk)] = chunk
                yield out

        r = self.restored
        return evaluate.predict_batches(r.steps, r.state, padded(), r.mesh)[: len(images)]

    def _as_records(self, hu: Any) -> np.ndarray:
        images = np.asarray(hu)
        if images.ndim == 3:
            images = images[..., None]
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 1):
            raise ValueError(
                f"HU images of shape {images.shape}: expected (N, {size}, {size}) or (N, {size}, "
                f"{size}, 1), the records' size; resample as the builder does with "
                f"liverjax.dicom.to_int16(liverjax.dicom.resample(image, {size})), or score DICOM "
                "files with score_files"
            )
        if not (
            np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
        ):
            raise ValueError(f"HU images of dtype {images.dtype}: give integers or floats")
        if images.size and not np.isfinite(images).all():
            raise ValueError("HU images hold NaN or infinite values")
        info = np.iinfo(np.int16)
        if images.size and (images.min() < info.min - 0.5 or images.max() >= info.max + 0.5):
            raise ValueError(
                f"HU values {images.min()}..{images.max()} outside int16 "
                f"({info.min}..{info.max}): the records hold int16 Hounsfield units"
            )
        return images if images.dtype == np.int16 else dicom.to_int16(images)

    def score_files(
        self, paths: Iterable[str | os.PathLike], *, allow_non_ct: bool = False
    ) -> Scored:
        """Every DICOM file among `paths` (files, and folders read at any depth, links
        followed), decoded as the builder does and scored. Every file is accounted for in
        `Scored.files`: scored, skipped (the decoder's reason, `not_a_file` for a FIFO or device
        among them; `not_ct` for a file that is not CT unless `allow_non_ct`, its values are not
        Hounsfield units; `label_sheet` for a folder's labels.csv), repeated (the same file given
        twice) or duplicate (its images already scored from another file)."""
        return self._score(input_files(paths), allow_non_ct=allow_non_ct)

    def _score(
        self, listed: Sequence[InputFile], *, allow_non_ct: bool, keep_partial: bool = False
    ) -> Scored:
        """`score_files` of listed files; with `keep_partial`, a KeyboardInterrupt ends the
        reading and returns what was scored (`Scored.interrupted`), instead of going through."""
        slices: list[dict[str, Any]] = []
        files: list[dict[str, Any]] = []
        images: list[np.ndarray] = []  # of slices[scored:], not yet scored
        scored = 0
        seen_files: dict[str, str] = {}
        seen_images: dict[tuple, str] = {}  # `_identity` -> the file it was scored from
        seen_uids: dict[str, str] = {}  # image_id -> the first file scored with it
        file_start = 0  # the first slice of the file being read

        def flush(all_of_them: bool) -> None:
            nonlocal scored, images
            batch = self.config.eval_batch_size
            n = len(images) if all_of_them else len(images) // batch * batch
            if n == 0:
                return
            probs = self.predict_hu(np.stack(images[:n]))
            for row, p in zip(slices[scored : scored + n], probs, strict=True):
                predicted = int(p >= self.threshold)
                row |= {
                    "probability": float(p),
                    "predicted": predicted,
                    "predicted_name": LABEL_NAMES[predicted],
                }
            scored += n
            images = images[n:]

        def read(name: str, path: str, sheet: bool) -> dict[str, Any]:
            real = os.path.realpath(path)
            if real in seen_files:
                return _file_row(name, REPEATED, 0, "", f"the same file as {seen_files[real]}")
            seen_files[real] = name
            if sheet:
                return _file_row(name, "skipped", 0, LABEL_SHEET, "a label sheet")
            try:
                decoded = dicom.decode_resampled(path, name, self.input_size)
            except dicom.DicomError as e:
                return _file_row(name, "skipped", 0, e.reason, e.detail)
            modality = dicom.not_ct(r.slice for r in decoded)
            if modality and not allow_non_ct:
                detail = (
                    f"{modality}: this model reads CT in Hounsfield units (allow_non_ct, "
                    "--allow_non_ct, scores it anyway)"
                )
                return _file_row(name, "skipped", 0, NOT_CT, detail)
            identities = [_identity(r) for r in decoded]
            new = [
                (r, key)
                for r, key in zip(decoded, identities, strict=True)
                if key is None or key not in seen_images
            ]
            if not new:
                first = seen_images[identities[0]]
                return _file_row(name, DUPLICATE, 0, "", f"the same images as {first}")
            for r, key in new:
                if key is not None:
                    seen_images[key] = name
                warnings = list(r.doubts)
                if r.slice.sop_uid:
                    first = seen_uids.setdefault(r.slice.image_id, name)
                    if first != name:
                        warnings.append(
                            f"SOP Instance UID {r.slice.image_id} is also in {first}, with other "
                            "pixels: both are scored (a UID reused by an anonymiser or an export?)"
                        )
                position = r.slice.slice_position
                slices.append(
                    {
                        "file": name,
                        **r.slice.ids(),
                        "instance_number": r.slice.instance_number,
                        "slice_position": position,
                        "warnings": warnings,
                        "turned": r.turned,
                    }
                )
                images.append(r.image)
            flush(all_of_them=False)  # whole batches as they fill: memory stays a few batches
            again = len(decoded) - len(new)
            detail = f"{again} of its images were already scored from other files" if again else ""
            return _file_row(name, "scored", len(new), "", detail)

        interrupted = False
        try:
            for i, (name, path, sheet) in enumerate(listed):
                if i and i % PROGRESS_EVERY_FILES == 0:
                    logger.info("%d of %d files read, %d slices", i, len(listed), len(slices))
                files.append(read(name, path, sheet))
                file_start = len(slices)
        except KeyboardInterrupt:
            if not keep_partial:
                raise
            interrupted = True
            # The file being read is not reached: none of its slices is kept.
            images = images[: max(0, file_start - scored)]
            scored = min(scored, file_start)
            del slices[file_start:]
            files += [
                _file_row(f.name, NOT_REACHED, 0, "", "the run was interrupted")
                for f in listed[len(files) :]
            ]
        flush(all_of_them=True)
        return Scored(slices, files, dict(self.patient_thresholds), interrupted)


def _identity(r: dicom.Resampled) -> tuple | None:
    """What makes two slices the same image, as the dataset build has it: the same SOP Instance
    UID (and frame) with the same pixels, or, without a UID, the same pixels of one patient
    (never a uniform slice's: many blank images are alike). None: nothing to compare."""
    if r.slice.sop_uid:
        return ("sop", r.slice.image_id, hashlib.blake2b(r.image.tobytes()).digest())
    if r.image.min() == r.image.max():
        return None
    return ("pixels", r.slice.patient_id, hashlib.blake2b(r.image.tobytes()).digest())


def record_size(meta: dict[str, Any], dataset: ml_collections.ConfigDict) -> int:
    """The records' side a checkpoint was trained on: saved with it (`record_size`), or, for
    checkpoints saved before that was kept, the dataset's info."""
    if meta.get("record_size") is not None:
        return int(meta["record_size"])
    try:
        return input_pipeline.record_size(dataset)
    except (ValueError, OSError) as e:
        raise ValueError(
            f"this checkpoint predates the record size being saved with it, and the dataset "
            f"{dataset.name!r} cannot say it ({e}); pass --data_dir (data_dir=) where the "
            "run's records are"
        ) from e


def _file_row(name: str, status: str, n: int, reason: str, detail: str) -> dict[str, Any]:
    return {"file": name, "status": status, "slices": n, "reason": reason, "detail": detail}


def input_files(paths: Iterable[str | os.PathLike]) -> list[InputFile]:
    """Every file among `paths`, in order: a file as given, a folder's files at any depth
    (sorted; links to folders followed, as the dataset build reads a manual dir), named by the
    folder as given joined to their path in it. A folder's label sheets are those the build
    would read (`labels.csv` at its top or one level down). A path that does not exist, or a
    folder that holds no file, is an error."""
    if isinstance(paths, str | bytes | os.PathLike):
        paths = [paths]  # one path, not its characters
    out = []
    for given in map(os.fsdecode, paths):
        if os.path.isdir(given):
            found, sheets = curation.find_files(pathlib.Path(given))
            if not found and not sheets:
                raise FileNotFoundError(f"{given}: the folder holds no file")
            for rel in sorted(found + sheets):
                path = os.path.join(given, rel)
                out.append(InputFile(curation.display_path(path), path, rel in sheets))
        elif os.path.exists(given):
            out.append(InputFile(curation.display_path(given), given, False))
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    if not out:
        raise ValueError("no input: give DICOM files or folders to score")
    return out


# --------------------------------------------------------------------------- files


def write_outputs(
    out_dir: str | os.PathLike,
    predictor: Predictor,
    scored: Scored,
    inputs: Sequence[str | os.PathLike] = (),
) -> dict:
    """OUTPUT_FILES in `out_dir` (each written whole, then renamed into place: an earlier run's
    file is replaced, never left half-written); returns the summary. `inputs`: the paths
    given, for the summary."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probabilities = ("probability_max", "probability_mean")
    patients, studies = scored.patients(), scored.studies()
    tables = {
        PREDICTIONS_FILE: (
            SLICE_COLUMNS,
            [
                row
                | {"probability": repr(row["probability"]), "warnings": "; ".join(row["warnings"])}
                for row in scored.slices
            ],
        ),
        PATIENTS_FILE: (
            PATIENT_COLUMNS,
            [r | {k: repr(r[k]) for k in probabilities} for r in patients],
        ),
        STUDIES_FILE: (
            STUDY_COLUMNS,
            [r | {k: repr(r[k]) for k in probabilities} for r in studies],
        ),
        FILES_FILE: (FILE_COLUMNS, scored.files),
    }
    statuses = collections.Counter(f["status"] for f in scored.files)
    reasons = collections.Counter(f["reason"] for f in scored.files if f["status"] == "skipped")
    summary = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "inputs": [os.fsdecode(p) for p in inputs],
        "interrupted": scored.interrupted,
        "workdir": os.path.basename(os.path.abspath(predictor.workdir)),
        "checkpoint": {
            "step": predictor.step,
            "requested": predictor.restored.requested,
            "chosen": predictor.restored.note,
        },
        "input_size": predictor.input_size,
        "threshold": predictor.threshold,
        "threshold_source": os.path.basename(predictor.threshold_source),
        "patient_thresholds": predictor.patient_thresholds,
        "operating_point": predictor.chosen or None,
        "files": len(scored.files),
        "files_by_status": dict(sorted(statuses.items())),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "slices": len(scored.slices),
        "slices_predicted_lesion": sum(r["predicted"] for r in scored.slices),
        "slices_with_warnings": sum(bool(r["warnings"]) for r in scored.slices),
        "patients": len(patients),
        "patients_grouped_by": dict(collections.Counter(r["grouped_by"] for r in patients)),
        "patients_predicted_lesion_max": sum(r["predicted_max"] for r in patients),
        "patients_predicted_lesion_mean": sum(r["predicted_mean"] for r in patients),
        "studies": len(studies),
        "warnings": patient_warnings(patients, predictor.chosen.get("slices_per_patient")),
    }
    for name, (columns, rows) in tables.items():
        partial = out / f".{name}.partial"
        with evaluate.csv_file(partial) as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        partial.replace(out / name)
    partial = out / f".{SUMMARY_FILE}.partial"
    evaluate.write_json(partial, summary)
    partial.replace(out / SUMMARY_FILE)
    return summary


def check_out_dir(
    out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool
) -> None:
    """Before any scoring: `out_dir` must be a folder (or not exist yet), hold no earlier
    prediction unless `overwrite`, and not lie in a folder being scored (its outputs would be
    read as inputs by the next run)."""
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out_dir}: a file, not a folder for the outputs")
    earlier = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(out, name))]
    if earlier and not overwrite:
        raise FileExistsError(
            f"--out {out_dir} holds an earlier prediction ({', '.join(earlier)}); pass "
            "--overwrite to replace it, or choose another folder"
        )
    for given in map(os.fspath, inputs):
        folder = os.path.abspath(given)
        if os.path.isdir(folder) and os.path.commonpath([folder, out]) == folder:
            raise ValueError(
                f"--out {out_dir} lies in {given}, a folder being scored: the next run would "
                "read its outputs as inputs; choose a folder outside it"
            )


# --------------------------------------------------------------------------- command line


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def patient_warnings(
    patients: Sequence[dict[str, Any]], validated: dict[str, float] | None
) -> list[str]:
    """What makes the patient-level predictions less trustworthy than the run's validation
    figures say, a sentence each: patients of more, or fewer, slices than every validation
    patient the thresholds were chosen on (`validated`: their min, median and max slice counts;
    None for an operating point written before they were kept, or the default threshold)."""

    def number(key: str) -> float | None:  # a hand-edited file may hold anything
        v = (validated or {}).get(key)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        return v if ok else None

    low, high, median = number("min"), number("max"), number("median")
    if low is None or high is None or not patients:
        return []
    among = f"at least {low:g}, at most {high:g}" + (f", median {median:g}" if median else "")
    out = []
    for over, what, effect in (
        (True, "more", "higher by chance, so predicted_max calls more of them lesion"),
        (False, "fewer", "lower by chance, so predicted_max misses more of their lesions"),
    ):
        odd = [p["slices"] for p in patients if (p["slices"] > high if over else p["slices"] < low)]
        if odd:
            extreme = max(odd) if over else min(odd)
            out.append(
                f"{len(odd)} of {len(patients)} patients {'has' if len(odd) == 1 else 'have'} "
                f"{what} slices ({'up' if over else 'down'} to {extreme}) than any validation "
                f"patient the patient-level thresholds were chosen on ({among}): the max of "
                f"{what} slices is {effect} than the validation figures say. Score slices like "
                "those the run was evaluated on, or choose the thresholds on validation patients "
                "scanned alike"
            )
    return out


def summary_line(summary: dict[str, Any], files_csv: str) -> str:
    """The command's one line: what was scored, what was predicted, what was not scored."""
    statuses = summary["files_by_status"]
    not_scored = sum(n for status, n in statuses.items() if status != "scored")
    why = ", ".join(
        [f"{n} {reason}" for reason, n in summary["skipped_by_reason"].items()]
        + [f"{n} {status}" for status, n in statuses.items() if status not in ("scored", "skipped")]
    )
    default = (
        ", the default: the run was not evaluated"
        if summary["threshold_source"] == "default"
        else ""
    )
    return (
        f"{_count(summary['slices'], 'slice')} of {_count(summary['files'], 'file')} scored at "
        f"checkpoint step {summary['checkpoint']['step']} (threshold "
        f"{summary['threshold']:.4g}{default}): {summary['slices_predicted_lesion']} predicted "
        f"lesion, {summary['slices_with_warnings']} with warnings; "
        f"{_count(summary['patients'], 'patient')}, {summary['patients_predicted_lesion_max']} "
        f"predicted lesion by their max; {_count(not_scored, 'file')} not scored"
        f"{f' ({why})' if why else ''}; see {files_csv}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: score DICOM files with a trained run."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders")
    parser.add_argument("--workdir", required=True, help="the training run's folder")
    parser.add_argument("--out", required=True, help="folder for the CSV files and summary.json")
    parser.add_argument(
        "--checkpoint", default="best", help="'best' (default), 'latest', or a step number"
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="where the records are (only runs saved before the record size was kept need them)",
    )
    parser.add_argument(
        "--allow_non_ct",
        action="store_true",
        help="score files that are not CT too (their values are not Hounsfield units)",
    )
    parser.add_argument(
        "--allow_other_checkpoint_threshold",
        action="store_true",
        help="use W/operating_point.json although it was chosen for another checkpoint",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier prediction in --out"
    )
    args = parser.parse_args(argv)
    host_memory.keep_freed_memory()
    checkpointing.command_logging()
    with train.user_errors("prediction"):
        # A wrong path or --out fails before the checkpoint is read.
        listed = input_files(args.paths)
        check_out_dir(args.out, args.paths, args.overwrite)
        predictor = Predictor.load(
            args.workdir,
            args.checkpoint,
            data_dir=args.data_dir,
            allow_other_checkpoint_threshold=args.allow_other_checkpoint_threshold,
        )
        scored = predictor._score(listed, allow_non_ct=args.allow_non_ct, keep_partial=True)
        summary = write_outputs(args.out, predictor, scored, args.paths)
    for warning in summary["warnings"]:
        logger.warning("%s", warning)
    print(summary_line(summary, os.path.join(args.out, FILES_FILE)))
    if scored.interrupted:
        print(
            f"prediction interrupted: what was scored is written to {args.out}; "
            f"{summary['files_by_status'].get(NOT_REACHED, 0)} files not reached",
            file=sys.stderr,
        )
        sys.exit(130)  # as a shell reports a command ended by Ctrl-C
    if not summary["slices"]:
        sys.exit(f"prediction failed: no slice was scored; {FILES_FILE} says why of each file")
    return summary


if __name__ == "__main__":
    main()
