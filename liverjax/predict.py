"""Score DICOM files or HU images with a trained run, in this process, as its evaluation does.

From Python:

    from liverjax import predict
    predictor = predict.Predictor.load("W")  # the best checkpoint; checkpoint="latest" or a step
    probs = predictor.predict_hu(hu)  # HU images (N, S, S[, 1]) at the records' size S → (N,)
    scored = predictor.score_files(["scans/"])  # DICOM files and folders → Scored

On the command line:

    python -m liverjax.predict --workdir W --out P PATH [PATH ...] [--checkpoint best|latest|STEP]

writes P/predictions.csv (a row per slice), P/patients.csv (a row per DICOM PatientID),
P/files.csv (every input file: scored, or skipped with the decoder's reason) and
P/summary.json (the checkpoint, the thresholds and the counts).

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
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from liverjax import checkpointing, dicom, evaluate, export, host_memory, parallel, train
from tfds_liver import curation
from tfds_liver.labels import LABEL_NAMES

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
PATIENTS_FILE = "patients.csv"
FILES_FILE = "files.csv"
SUMMARY_FILE = "summary.json"
NOT_CT = "not_ct"  # a files.csv reason: the file is not CT and allow_non_ct is off
LABEL_SHEET = "label_sheet"  # a files.csv reason: a folder's labels.csv, not an image
REPEATED = "repeated"  # a files.csv status: the same file was given twice (scored once)
SLICE_FIELDS = ("file", "frame", "image_id", "patient_id", "study_uid", "series_uid", "sop_uid")


@dataclasses.dataclass
class Scored:
    """What `Predictor.score_files` found: a row per slice, a row per input file."""

    slices: list[dict[str, Any]]  # SLICE_FIELDS, modality, warnings, probability, predicted
    files: list[dict[str, Any]]  # file, status (scored | skipped | repeated), slices, reason, ...

    def patients(self, thresholds: dict[str, float]) -> list[dict[str, Any]]:
        """A row per DICOM PatientID: its slices, max and mean probability, and the predicted
        class at `thresholds['patient_max']` / `['patient_mean']` (evaluation's patient levels)."""
        by_patient: dict[str, list[float]] = collections.defaultdict(list)
        for row in self.slices:
            by_patient[row["patient_id"]].append(row["probability"])
        rows = []
        for patient in sorted(by_patient):
            p = np.asarray(by_patient[patient])
            p_max, p_mean = float(p.max()), float(p.mean())
            rows.append(
                {
                    "patient_id": patient,
                    "slices": len(p),
                    "probability_max": p_max,
                    "predicted_max": int(p_max >= thresholds["patient_max"]),
                    "probability_mean": p_mean,
                    "predicted_mean": int(p_mean >= thresholds["patient_mean"]),
                }
            )
        return rows


@dataclasses.dataclass
class Predictor:
    """A trained run's checkpoint, ready to score images (one process; any number of devices)."""

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
        size = restored.meta.get("record_size")
        if size is None:
            from liverjax import input_pipeline  # (tfds) only for runs saved without the size

            size = input_pipeline.record_size(config.dataset)
        threshold, source, chosen = export.operating_point(
            workdir, restored.step, restored.note, allow_other_checkpoint_threshold
        )
        levels = chosen.get("patient_level") or {}
        patient = {level: float(levels.get(level, threshold)) for level in PATIENT_LEVELS}
        return cls(
            os.fspath(workdir), restored, config, int(size), threshold, source, patient, chosen
        )

    @property
    def step(self) -> int:
        return self.restored.step

    def predict_hu(self, hu: Any) -> np.ndarray:
        """Lesion probabilities (N,) float64 for HU images (N, S, S) or (N, S, S, 1) at the
        records' size S (`input_size`): integers within int16, as the records hold them, or
        finite floats. Batches of `config.eval_batch_size`, the last one padded."""
        images = self._checked(hu)
        batch = self.config.eval_batch_size
        out = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            padded = np.zeros((batch, *images.shape[1:]), images.dtype)
            padded[: len(chunk)] = chunk
            sharded = parallel.global_batch({"image": padded}, self.restored.mesh)["image"]
            probs = self.restored.steps.predict(self.restored.state, sharded)
            out.append(np.asarray(jax.device_get(probs))[: len(chunk)])
        if not out:
            return np.zeros((0,), np.float64)
        return np.concatenate(out).astype(np.float64)

    def _checked(self, hu: Any) -> np.ndarray:
        images = np.asarray(hu)
        if images.ndim == 3:
            images = images[..., None]
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 1):
            raise ValueError(
                f"HU images of shape {images.shape}: expected (N, {size}, {size}) or (N, {size}, "
                f"{size}, 1), the records' size; resample with liverjax.dicom.resample, or score "
                "DICOM files with score_files"
            )
        if np.issubdtype(images.dtype, np.integer):
            info = np.iinfo(np.int16)
            if images.size and (images.min() < info.min or images.max() > info.max):
                raise ValueError(
                    f"HU values {images.min()}..{images.max()} outside int16 "
                    f"({info.min}..{info.max}): the records hold int16 Hounsfield units"
                )
            return images.astype(np.int16, copy=False)
        if np.issubdtype(images.dtype, np.floating):
            if not np.isfinite(images).all():
                raise ValueError("HU images hold NaN or infinite values")
            return images.astype(np.float32, copy=False)
        raise ValueError(f"HU images of dtype {images.dtype}: give integers or floats")

    def score_files(
        self, paths: Iterable[str | os.PathLike], *, allow_non_ct: bool = False
    ) -> Scored:
        """Every DICOM file among `paths` (files, and folders read at any depth, links
        followed), decoded as the builder does and scored. Every file is accounted for in
        `Scored.files`: scored, skipped (the decoder's reason; `not_ct` for a file that is not CT
        unless `allow_non_ct`, its values are not Hounsfield units; `label_sheet` for a folder's
        labels.csv), or repeated (the same file given twice)."""
        return self.score_listed(input_files(paths), allow_non_ct=allow_non_ct)

    def score_listed(
        self, listed: Sequence[tuple[str, str, bool]], *, allow_non_ct: bool = False
    ) -> Scored:
        """`score_files` of the files `input_files` listed."""
        slices: list[dict[str, Any]] = []
        files: list[dict[str, Any]] = []
        images: list[np.ndarray] = []  # of slices[scored:], not yet scored
        scored = 0
        seen: dict[str, str] = {}

        def flush(all_of_them: bool) -> None:
            nonlocal scored, images
            batch = self.config.eval_batch_size
            n = len(images) if all_of_them else len(images) // batch * batch
            if n == 0:
                return
            probs = self.predict_hu(np.stack(images[:n]))
            for row, p in zip(slices[scored : scored + n], probs, strict=True):
                row["probability"] = float(p)
                row["predicted"] = int(p >= self.threshold)
            scored += n
            images = images[n:]

        for name, path, sheet in listed:
            real = os.path.realpath(path)
            if real in seen:
                files.append(_file_row(name, REPEATED, 0, "", f"the same file as {seen[real]}"))
                continue
            seen[real] = name
            if sheet:
                files.append(_file_row(name, "skipped", 0, LABEL_SHEET, "a label sheet"))
                continue
            try:
                decoded = dicom.decode_resampled(path, name, self.input_size)
            except dicom.DicomError as e:
                files.append(_file_row(name, "skipped", 0, e.reason, e.detail))
                continue
            not_ct = sorted({s.modality for s, _, _ in decoded if not s.hounsfield})
            if not_ct and not allow_non_ct:
                modality = f"Modality {not_ct[0]!r}" if not_ct[0] else "no Modality"
                detail = f"{modality}: this model reads CT in Hounsfield units"
                files.append(_file_row(name, "skipped", 0, NOT_CT, detail))
                continue
            files.append(_file_row(name, "scored", len(decoded), "", ""))
            for s, image, doubts in decoded:
                slices.append(
                    {
                        "file": name,
                        "frame": s.frame,
                        "image_id": s.image_id,
                        "patient_id": s.patient_id,
                        "study_uid": s.study_uid,
                        "series_uid": s.series_uid,
                        "sop_uid": s.sop_uid,
                        "modality": s.modality,
                        "warnings": doubts,
                    }
                )
                images.append(image)
            flush(all_of_them=False)  # whole batches as they fill: memory stays a few batches
        flush(all_of_them=True)
        return Scored(slices, files)


PATIENT_LEVELS = tuple(level for level in evaluate.LEVELS if level != "slice")


def _file_row(name: str, status: str, n: int, reason: str, detail: str) -> dict[str, Any]:
    return {"file": name, "status": status, "slices": n, "reason": reason, "detail": detail}


def input_files(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str, bool]]:
    """(name, path, is a label sheet) of every file among `paths`, in order: a file as given, a
    folder's files at any depth (sorted; links to folders followed, as the dataset build reads a
    manual dir), named by the folder as given joined to their path in it. A folder's label
    sheets are those the build would read (`labels.csv` at its top or one level down). A path
    that does not exist, or a folder that holds no file, is an error."""
    out = []
    for given in map(os.fspath, paths):
        if os.path.isdir(given):
            found, sheets = curation.find_files(pathlib.Path(given))
            if not found and not sheets:
                raise FileNotFoundError(f"{given}: the folder holds no file")
            for rel in sorted(found + sheets):
                name = curation.display_path(os.path.join(given, rel))
                out.append((name, os.path.join(given, rel), rel in sheets))
        elif os.path.exists(given):
            out.append((curation.display_path(given), given, False))
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    if not out:
        raise ValueError("no input: give DICOM files or folders to score")
    return out


# --------------------------------------------------------------------------- files


def write_outputs(out_dir: str | os.PathLike, predictor: Predictor, scored: Scored) -> dict:
    """predictions.csv, patients.csv, files.csv and summary.json in `out_dir`; the summary."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = (*SLICE_FIELDS, "modality", "probability", "predicted", "predicted_name", "warnings")
    _write_csv(
        out / PREDICTIONS_FILE,
        columns,
        (
            row
            | {
                "probability": repr(row["probability"]),
                "predicted_name": LABEL_NAMES[row["predicted"]],
                "warnings": "; ".join(row["warnings"]),
            }
            for row in scored.slices
        ),
    )
    patients = scored.patients(predictor.patient_thresholds)
    _write_csv(
        out / PATIENTS_FILE,
        tuple(patients[0]) if patients else ("patient_id",),
        (
            row | {k: repr(row[k]) for k in ("probability_max", "probability_mean")}
            for row in patients
        ),
    )
    _write_csv(out / FILES_FILE, ("file", "status", "slices", "reason", "detail"), scored.files)
    statuses = collections.Counter(f["status"] for f in scored.files)
    reasons = collections.Counter(f["reason"] for f in scored.files if f["status"] == "skipped")
    summary = {
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
        "patients_predicted_lesion_max": sum(r["predicted_max"] for r in patients),
        "patients_predicted_lesion_mean": sum(r["predicted_mean"] for r in patients),
    }
    evaluate.write_json(out / SUMMARY_FILE, summary)
    return summary


def _write_csv(path: pathlib.Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- command line


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
    args = parser.parse_args(argv)
    host_memory.keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("liverjax").setLevel(logging.INFO)
    checkpointing.quiet_orbax_logs()
    with train.user_errors("prediction"):
        listed = input_files(args.paths)  # a wrong path fails before the checkpoint is read
        predictor = Predictor.load(
            args.workdir,
            args.checkpoint,
            data_dir=args.data_dir,
            allow_other_checkpoint_threshold=args.allow_other_checkpoint_threshold,
        )
        scored = predictor.score_listed(listed, allow_non_ct=args.allow_non_ct)
        summary = write_outputs(args.out, predictor, scored)
    skipped = sum(n for s, n in summary["files_by_status"].items() if s != "scored")
    print(
        f"{summary['slices']} slices of {summary['files']} files scored at checkpoint step "
        f"{predictor.step} (threshold {predictor.threshold:.4g}): "
        f"{summary['slices_predicted_lesion']} predicted lesion; {summary['patients']} "
        f"PatientIDs, {summary['patients_predicted_lesion_max']} predicted lesion by their "
        f"max; {skipped} files not scored (see {os.path.join(args.out, FILES_FILE)})"
    )
    return summary


if __name__ == "__main__":
    main()
