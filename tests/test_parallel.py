"""Same training on 1 device, 8 devices, and 2 processes x 4 devices (gloo on 127.0.0.1)."""

import textwrap

import jax
import numpy as np
import pytest
import training_runs as runs

from liverjax import parallel, train

STEPS = 6  # one epoch of synthetic_small at the test config's global batch of 8

CHILD = """
import sys
import numpy as np
from configs import test
from liverjax import train
sys.path.insert(0, {tests!r})
import training_runs as runs
config = test.get_config()
config.dataset.data_dir = {data_dir!r}
config.num_train_steps = {steps}
{distributed}
summary = train.train_and_evaluate(config, {workdir!r})
if summary.step != {steps}:
    raise SystemExit(f"stopped at step {{summary.step}}")
import jax
if jax.process_index() == 0:
    np.savez({out!r}, **runs.host_tree(summary.state.params))
print("devices", jax.device_count(), "processes", jax.process_count())
"""


def _child(tmp_path, data_dir, name: str, distributed: str = "") -> tuple[str, str]:
    out = str(tmp_path / f"{name}.npz")
    code = CHILD.format(
        tests=str(runs.REPO / "tests"),
        data_dir=str(data_dir),
        steps=STEPS,
        distributed=textwrap.dedent(distributed),
        workdir=str(tmp_path / name),
        out=out,
    )
    return code, out


def test_one_device_eight_devices_and_two_processes_agree(data_dir, tmp_path, tmp_path_factory):
    cache = runs.compilation_cache(tmp_path_factory)
    port = runs.free_port()
    children = []
    code, one_out = _child(tmp_path, data_dir, "one_device")
    children.append(runs.start_python(code, runs.child_env(cache, 1), tmp_path / "one.log"))
    for pid in range(2):
        code, two_out = _child(
            tmp_path,
            data_dir,
            "two_processes",
            f"""
            config.distributed.coordinator_address = "127.0.0.1:{port}"
            config.distributed.num_processes = 2
            config.distributed.process_id = {pid}
            """,
        )
        log = tmp_path / f"process{pid}.log"
        children.append(runs.start_python(code, runs.child_env(cache, 4), log))

    # Meanwhile, here: 8 devices in this process.
    assert jax.device_count() == 8
    config = runs.make_config(data_dir, num_train_steps=STEPS)
    eight = runs.host_tree(train.train_and_evaluate(config, str(tmp_path / "eight")).state.params)

    logs = ["one.log", "process0.log", "process1.log"]
    for child, log in zip(children, logs, strict=True):
        assert child.wait(timeout=600) == 0, (tmp_path / log).read_text()[-3000:]
    assert "devices 1 processes 1" in (tmp_path / "one.log").read_text()
    assert "devices 8 processes 2" in (tmp_path / "process0.log").read_text()

    for other in (np.load(one_out), np.load(two_out)):
        assert set(other.files) == set(eight)
        for key, value in eight.items():
            # Only the order of float sums (the gradient all-reduce) differs; Adam's normalised
            # steps (learning rate 1e-2) can turn that into ~1e-5 on weights with ~0 gradient.
            # Other data or other random numbers would move weights by ~1e-2.
            np.testing.assert_allclose(other[key], value, rtol=1e-3, atol=1e-4, err_msg=key)
    # Not trivially equal: training moved the parameters away from their initial values.
    steps = train.make_steps(config, parallel.create_mesh(), train.create_optimizer(config, 6, 6))
    initial = runs.host_tree(steps.init().params)
    assert any(not np.allclose(initial[k], v) for k, v in eight.items())


def test_batch_size_must_split_evenly_over_devices():
    mesh = parallel.create_mesh()
    assert parallel.check_batch_size(16, mesh) == 16  # one process: its share is all of it
    with pytest.raises(ValueError, match="= 20 must be a positive multiple of the device count 8"):
        parallel.check_batch_size(20, mesh)


def test_global_batch_is_split_over_the_data_axis():
    mesh = parallel.create_mesh()
    local = {"image": np.arange(16 * 2, dtype=np.int16).reshape(16, 2, 1, 1)}
    batch = parallel.global_batch(local, mesh)["image"]
    assert batch.shape == (16, 2, 1, 1)
    assert [s.data.shape[0] for s in batch.addressable_shards] == [2] * 8
    np.testing.assert_array_equal(np.asarray(batch), local["image"])


@pytest.mark.parametrize("value", ["False", "false", "0"])
def test_distributed_can_be_switched_off_inside_a_cluster_allocation(monkeypatch, value):
    # `--config.distributed.enabled=False` arrives as the string 'False' (the field's default is
    # 'auto'); inside a SLURM allocation of 4 tasks, 'auto' would start jax.distributed.
    monkeypatch.setenv("SLURM_NTASKS", "4")
    from configs import default

    dist = default.get_config().distributed
    dist.enabled = value
    assert parallel.initialize_distributed(dist) is False
    assert not jax.distributed.is_initialized()
    dist.enabled = "yes"
    with pytest.raises(ValueError, match="use True, False or 'auto'"):
        parallel.initialize_distributed(dist)


def test_two_processes_from_the_jax_environment_variables(tmp_path, tmp_path_factory):
    """JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID alone start a run of two
    processes (JAX itself reads only the first)."""
    port = runs.free_port()
    code = textwrap.dedent(
        """
        from configs import default
        from liverjax import parallel
        import jax
        assert parallel.initialize_distributed(default.get_config().distributed)
        print("processes", jax.process_index(), jax.process_count(), jax.device_count())
        """
    )
    cache = runs.compilation_cache(tmp_path_factory)
    children = []
    for index in range(2):
        env = runs.child_env(cache, 1)
        env |= {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(index),
        }
        log = tmp_path / f"p{index}.log"
        children.append((runs.start_python(code, env, log), log))
    for index, (child, log) in enumerate(children):
        assert child.wait(timeout=300) == 0, log.read_text()[-3000:]
        assert f"processes {index} 2 2" in log.read_text()


def test_a_detected_launch_that_jax_cannot_start_says_why_and_what_to_do(tmp_path):
    # Open MPI's count without the variables JAX's own detection needs: JAX said only
    # "coordinator_address should be defined".
    code = textwrap.dedent(
        """
        from configs import default
        from liverjax import parallel
        try:
            parallel.initialize_distributed(default.get_config().distributed)
        except ValueError as e:
            print("ERROR", e)
        """
    )
    env = runs.child_env(tmp_path / "cache", 1)
    env["OMPI_COMM_WORLD_SIZE"] = "2"
    for name in [n for n in env if n.startswith(("SLURM_", "JAX_COORDINATOR", "TPU_", "OMPI_MCA"))]:
        del env[name]
    log = tmp_path / "log"
    assert runs.start_python(code, env, log).wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "ERROR jax.distributed did not start (" in text, text[-3000:]
    assert "because $OMPI_COMM_WORLD_SIZE shows a multi-process launch" in text
    assert "--config.distributed.enabled=False" in text
