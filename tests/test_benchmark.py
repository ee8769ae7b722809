"""liverjax.benchmark on the test config: every figure is measured and the ratios add up."""

import math

import pytest
import training_runs as runs

from liverjax import benchmark


def test_benchmark_measures_train_inference_and_end_to_end(data_dir):
    config = runs.make_config(data_dir)
    figures = benchmark.run(config, steps=2, warmup=1, torch_ref=None)

    assert figures["batch"] == config.batch_size and figures["devices"] == 8
    assert figures["record_size"] == 64  # synthetic_small records, resized on the device to 32
    for key in ("train_in_memory", "train_in_memory_no_augment", "inference_in_memory"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["end_to_end_over_in_memory"] == pytest.approx(
        figures["train_end_to_end"] / figures["train_in_memory"]
    )
    assert "torch" not in figures  # no reference asked for
