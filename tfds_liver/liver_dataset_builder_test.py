"""TFDS builder test over tiny DICOMs in dummy_data/ (the `manual` config), and the synthetic build.

dummy_data/ was made with `python -m tfds_liver.phantom --out tfds_liver/dummy_data --patients 6
--seed 1 --size 32 --slices 2`, then an empty file, a text file and a labelled copy of one slice
were added under extra/ so that the build has to account for them.
"""

import json
import sys

import numpy as np
import tensorflow_datasets as tfds

import tfds_liver
from tfds_liver import labels, liver_dataset_builder

VERSION = str(liver_dataset_builder.Builder.VERSION)


class LiverManualTest(tfds.testing.DatasetBuilderTestCase):
    """The `manual` config on dummy_data/."""

    DATASET_CLASS = tfds_liver.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["manual"]
    SKIP_CHECKSUMS = True
    # 6 patients (4 with lesions), 2 slices each; the labelled copy is a duplicate.
    SPLITS = {"train": 8, "validation": 2, "test": 2}

    def _make_builder(self, config=None):
        # The base class reads the splits back with `as_dataset`, which TFDS implements for
        # TFRecord only: its checks run on TFRecord; the test below reads the ArrayRecord default.
        return self.dataset_class(
            data_dir=self.tmp_dir, config=config, version=self.VERSION, file_format="tfrecord"
        )

    def test_curation_report_accounts_for_every_file(self):
        builder = tfds_liver.Builder(config="manual", data_dir=self.tmp_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(self.dummy_data))
        )
        report = json.loads((builder.data_path / "curation_report.json").read_text())
        statuses = {e["path"]: e["status"] for e in report["files"]}
        self.assertEqual(len(statuses), 15)
        self.assertEqual(
            report["counts"],
            {"written": 12, "duplicate": 1, "conflict": 0, "unlabelled": 0, "skipped": 2},
        )
        # Files are visited in path order: the copy under extra/ comes first and is kept.
        duplicate = next(e for e in report["files"] if e["status"] == "duplicate")
        self.assertEqual(duplicate["path"], "phantom-1-0000/ct/001.dcm")
        self.assertEqual(duplicate["duplicate_of"], "extra/copy_of_0000_001.dcm")
        self.assertEqual(report["skipped_by_reason"], {"empty": 1, "not_dicom": 1})
        # Records keep int16 HU and carry their ids.
        source = tfds.data_source("liver/manual", split="train", data_dir=builder.data_dir_root)
        record = source[0]
        self.assertEqual(record["image"].dtype, np.int16)
        self.assertEqual(record["image"].shape, (128, 128, 1))
        self.assertLess(record["image"].min(), -900)  # air stays in HU, not windowed
        self.assertIn(record["patient_id"].decode(), {f"phantom-1-000{i}" for i in range(6)})


def test_label_names_agree():
    assert liver_dataset_builder.LABEL_NAMES == labels.LABEL_NAMES


def test_synthetic_small_builds_and_reads_without_tensorflow(tmp_path):
    """The synthetic config generates its DICOM, builds ArrayRecord, and reads back without TF."""
    import subprocess

    code = f"""
import sys
import tensorflow_datasets as tfds
import tfds_liver
tfds.builder("liver/synthetic_small", data_dir={str(tmp_path)!r}).download_and_prepare()
source = tfds.data_source("liver/synthetic_small", split="train", data_dir={str(tmp_path)!r})
print(len(source), source[0]["image"].dtype, "tensorflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, dtype, tf_loaded = out.stdout.split()[-3:]
    assert (dtype, tf_loaded) == ("int16", "False")
    report_path = tmp_path / f"liver/synthetic_small/{VERSION}/curation_report.json"
    report = json.loads(report_path.read_text())
    assert report["counts"]["written"] == report["files_total"] == 72
    assert int(n) == report["splits"]["train"]["slices"]


def test_tfds_build_command_writes_array_record(tmp_path):
    """The documented `tfds build` command line builds the manual config as ArrayRecord."""
    import pathlib
    import subprocess

    tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
    manual_dir = pathlib.Path(__file__).parent / "dummy_data"
    subprocess.run(
        [str(tfds_cli), "build", "--imports", "tfds_liver", "liver", "--config", "manual",
         "--manual_dir", str(manual_dir), "--data_dir", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    built = tmp_path / f"liver/manual/{VERSION}"
    assert sorted(p.name for p in built.glob("*.array_record-*")) == [
        f"liver-{s}.array_record-00000-of-00001" for s in ("test", "train", "validation")
    ]
    assert (built / "curation_report.json").exists()
