"""liverjax.benchmark on the test config: every figure is measured and the ratios add up."""

import math

import pytest
import training_runs as runs
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from liverjax import benchmark, models


def test_benchmark_measures_train_inference_and_end_to_end(data_dir, tmp_path):
    config = runs.make_config(data_dir)
    failing = tmp_path / "ref_cnn.py"  # a reference script that fails: liverjax's figures stand
    failing.write_text("import sys\nsys.exit('no GPU here')\n")
    figures = benchmark.run(
        config,
        steps=2,
        warmup=1,
        torch_ref=str(failing),
        ref_frameworks=("jax",),
        peak=2.0,
        profile_dir=str(tmp_path / "trace"),
    )

    assert figures["batch"] == config.batch_size and figures["devices"] == 8
    assert figures["record_size"] == 64  # synthetic_small records, resized on the device to 32
    for key in ("train_in_memory", "train_in_memory_no_augment", "inference_in_memory"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["end_to_end_over_in_memory"] == pytest.approx(
        figures["train_end_to_end"] / figures["train_in_memory"]
    )
    # Model FLOPs: 3 forward passes' worth a training image, one an inference image; utilisation
    # of the given peak of each of the 8 devices.
    flop = models.flops_per_image(config.model, config.image_size)
    assert figures["model_gflop_per_image"] == flop / 1e9
    train_tflops = 3 * flop * figures["train_in_memory"] / 1e12
    assert figures["train_in_memory_tflops"] == pytest.approx(train_tflops)
    assert figures["train_in_memory_mfu"] == pytest.approx(train_tflops / (2.0 * 8))
    infer_tflops = flop * figures["inference_in_memory"] / 1e12
    assert figures["inference_in_memory_mfu"] == pytest.approx(infer_tflops / (2.0 * 8))
    # The trace was written and read (XLA:CPU has no device planes: no kernels to list).
    assert figures["profile"]["trace"].startswith(str(tmp_path / "trace"))
    assert figures["profile"]["wall_ms_per_step"] > 0
    assert "reference" not in figures and "train_over_torch" not in figures
    assert figures["reference_error"].startswith("the reference script failed (exit 1)")
    assert "no GPU here" in figures["reference_error"]


def test_peak_is_the_datasheet_figure_of_known_devices_only():
    assert benchmark.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert benchmark.peak_tflops("NVIDIA H200", "float32") is None
    assert benchmark.peak_tflops("cpu", "bfloat16") is None


def _trace(path, planes):
    """An XSpace file as jax.profiler writes it: {plane: {line: [(kernel, hlo_op, ns)]}}."""
    space = xplane_pb2.XSpace()
    for plane_id, (plane_name, lines) in enumerate(planes.items(), 1):
        plane = space.planes.add(id=plane_id, name=plane_name)
        plane.stat_metadata[1].CopyFrom(xplane_pb2.XStatMetadata(id=1, name="hlo_op"))
        names = sorted({e[0] for events in lines.values() for e in events})
        ids = {n: i for i, n in enumerate(names, 1)}
        for n, i in ids.items():
            plane.event_metadata[i].CopyFrom(xplane_pb2.XEventMetadata(id=i, name=n))
        for line_id, (line_name, events) in enumerate(lines.items(), 1):
            line = plane.lines.add(id=line_id, name=line_name)
            for kernel, op, ns in events:
                event = line.events.add(metadata_id=ids[kernel], duration_ps=ns * 1000)
                if op:
                    event.stats.add(metadata_id=1, str_value=op)
    path.mkdir(parents=True)
    (path / "host.xplane.pb").write_bytes(space.SerializeToString())


def test_profile_summary_sums_the_kernels_of_device_streams_per_step(tmp_path):
    stream = [("gemm", "dot.1", 6000), ("loop_fusion", "fusion.2", 1000)] * 2
    _trace(
        tmp_path / "plugins" / "profile" / "run",
        {
            "/host:CPU": {"python": [("step", None, 10**9)]},  # host time: not kernels
            "/device:GPU:0": {"Stream #13(compute)": stream, "XLA Ops": [("gemm", None, 10**9)]},
            "/device:GPU:1": {"Stream #13(compute)": stream},
        },
    )
    summary = benchmark.profile_summary(str(tmp_path), steps=2)

    assert summary["device_planes"] == 2
    # Per step and device: 2 devices x 2 steps share 4 x (6 + 1) us; "XLA Ops" is not a stream.
    assert summary["device_ms_per_step"] == pytest.approx(0.007)
    gemm, fusion = summary["kernels"]
    assert gemm["kernel"] == "gemm [dot.1]" and fusion["kernel"] == "loop_fusion [fusion.2]"
    assert gemm["ms_per_step"] == pytest.approx(0.006) and gemm["calls_per_step"] == 1
    assert gemm["share"] == pytest.approx(6 / 7) and fusion["share"] == pytest.approx(1 / 7)


def test_profile_summary_without_a_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="xplane"):
        benchmark.profile_summary(str(tmp_path), steps=1)
