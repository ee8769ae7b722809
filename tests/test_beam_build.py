"""The `liver` builder on Apache Beam (FnApiRunner) writes the same examples as the plain build."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_liver

DUMMY = pathlib.Path(tfds_liver.__file__).parent / "dummy_data"


def build(data_dir: pathlib.Path, beam_options=None) -> pathlib.Path:
    builder = tfds_liver.Builder(config="manual", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(DUMMY), beam_options=beam_options
        )
    )
    return data_dir


def records(data_dir: pathlib.Path, split: str) -> dict[bytes, dict]:
    source = tfds.data_source("liver/manual", split=split, data_dir=str(data_dir))
    return {r["sop_uid"]: r for r in (source[i] for i in range(len(source)))}


@pytest.mark.slow
def test_beam_build_equals_plain_build(tmp_path):
    beam = pytest.importorskip("apache_beam")
    options = beam.options.pipeline_options.PipelineOptions(
        ["--runner=FnApiRunner", "--direct_num_workers=2"]  # not Prism, which downloads itself
    )
    plain = build(tmp_path / "plain")
    beamed = build(tmp_path / "beam", options)
    for split in ("train", "validation", "test"):
        a, b = records(plain, split), records(beamed, split)
        assert sorted(a) == sorted(b) and a
        for key, record in a.items():
            assert record.keys() == b[key].keys()
            for field, value in record.items():
                np.testing.assert_array_equal(value, b[key][field], err_msg=f"{key} {field}")
    version = tfds_liver.liver_dataset_builder.Builder.VERSION
    reports = [
        json.loads((d / f"liver/manual/{version}/curation_report.json").read_text())
        for d in (plain, beamed)
    ]
    assert reports[0] == reports[1]
