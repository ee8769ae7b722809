"""Conversion speed: DICOM → `liver` ArrayRecord records vs a bare pydicom decode loop, in one run.

    python -m tfds_liver.benchmark [--patients 8] [--slices 16] [--size 512] [--workers 0]
                                   [--compress none|rle|jpeg2000]

Writes a phantom manual dir of 512×512 CT files, times `pydicom.dcmread(f).pixel_array` over every
file in one process (the bare decode rate), then times the full `manual` build of the same folder
(decode, resample, curation, ArrayRecord writing, dataset statistics) and prints both rates and
their ratio. `--compress` rewrites the files with a compressed transfer syntax first (hospital
archives often are), where decoding is a larger share of the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import pydicom
import tensorflow_datasets as tfds
from pydicom import uid

from tfds_liver import curation, liver_dataset_builder, phantom

COMPRESSIONS = {"none": None, "rle": uid.RLELossless, "jpeg2000": uid.JPEG2000Lossless}


def compress(files: list[pathlib.Path], syntax: str) -> None:
    """Rewrites each file in place with the given compressed transfer syntax."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(syntax)
        ds.save_as(f, enforce_file_format=True)


def bare_decode(files: list[pathlib.Path]) -> float:
    """Seconds for `pydicom.dcmread(f).pixel_array` over every file, in this process."""
    start = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array  # noqa: B018 - the decode is the work being timed
    return time.perf_counter() - start


def build(manual_dir: pathlib.Path, data_dir: pathlib.Path, workers: int) -> float:
    """Seconds for a full `manual` build of manual_dir into data_dir."""
    manual = next(c for c in liver_dataset_builder.Builder.BUILDER_CONFIGS if c.name == "manual")
    # TFDS refuses a changed config under a registered name: the variant gets its own.
    config = dataclasses.replace(manual, name=f"manual_workers{workers}", workers=workers)
    builder = liver_dataset_builder.Builder(config=config, data_dir=str(data_dir))
    start = time.perf_counter()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and prints a JSON line of figures."""
    parser = argparse.ArgumentParser(
        prog="python -m tfds_liver.benchmark",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compress", choices=sorted(COMPRESSIONS), default="none")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        manual_dir = pathlib.Path(tmp) / "manual"
        phantom.write_phantom(
            manual_dir, patients=args.patients, seed=args.seed, size=args.size, slices=args.slices
        )
        files, _ = curation.find_files(manual_dir)
        paths = [manual_dir / f for f in files]
        if COMPRESSIONS[args.compress]:
            compress(paths, COMPRESSIONS[args.compress])
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        bare_decode(paths[:4])  # warm the page cache and pydicom's imports for both contenders
        t_bare = bare_decode(paths)
        t_build = build(manual_dir, pathlib.Path(tmp) / "data", args.workers)
    result = {
        "files": len(paths),
        "transfer_syntax": args.compress,
        "megabytes": round(megabytes, 1),
        "cores": os.cpu_count(),
        "bare_decode_files_per_s": round(len(paths) / t_bare, 1),
        "bare_decode_mb_per_s": round(megabytes / t_bare, 1),
        "build_files_per_s": round(len(paths) / t_build, 1),
        "build_mb_per_s": round(megabytes / t_build, 1),
        "build_vs_bare_decode": round(t_bare / t_build, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
