"""Launchers: 2 CPU processes train, write one checkpoint, resume; 2 → 1 process resumes exactly;
SIGTERM to both saves one checkpoint at one step; the accelerator benchmark script and the
offline wheel list."""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib

import pytest
import training_runs as runs
import yaml

from liverjax import parallel

LAUNCH = runs.REPO / "launch"
STEPS = 8  # checkpoints at 5 (every 5 steps), 6 (one epoch) and 8 (the end)
INTERRUPTED = 5  # resumed from here: the periodic checkpoint
LOG_LINE = re.compile(r"\] \[(\d+)\] .*train/loss=([-0-9.e]+)")


def _env(tmp_path_factory, devices: int, **extra: str) -> dict[str, str]:
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices)
    env.update(PYTHON=sys.executable, CONFIG="configs/test.py", **extra)
    return env


def _multiprocess(workdir, data_dir, steps: int, env) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "bash",
            str(LAUNCH / "multiprocess_cpu.sh"),
            "2",
            f"--config.dataset.data_dir={data_dir}",
            f"--config.num_train_steps={steps}",
        ],
        cwd=runs.REPO,
        env={**env, "WORKDIR": str(workdir), "PORT": str(runs.free_port())},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(child: subprocess.Popen, code: int = 0) -> str:
    out, _ = child.communicate(timeout=600)
    assert child.returncode == code, out[-3000:]
    return out


def _losses(log) -> dict[int, str]:
    """{step: train loss as logged} from one process's log."""
    text = log.read_text(errors="replace")
    return {int(m[1]): m[2] for m in LOG_LINE.finditer(text)}


def _checkpoint_dirs(workdir) -> set:
    """Folders that hold Orbax checkpoint steps anywhere under `workdir`."""
    return {p.parent.parent for p in workdir.rglob("_CHECKPOINT_METADATA")}


def _interrupted_copy(workdir, to) -> None:
    """A copy of `workdir` as if the run had stopped right after its step-INTERRUPTED checkpoint."""
    shutil.copytree(workdir, to)
    for step_dir in (to / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > INTERRUPTED:
            shutil.rmtree(step_dir)


def test_two_processes_share_one_checkpoint_resume_and_resume_on_one(
    data_dir, tmp_path, tmp_path_factory
):
    workdir = tmp_path / "run"
    _finish(_multiprocess(workdir, data_dir, STEPS, _env(tmp_path_factory, 1)))
    logs = [workdir / f"process_{i}.log" for i in range(2)]
    full = [_losses(log) for log in logs]
    assert STEPS in full[0], logs[0].read_text()[-3000:]
    assert full[0] == full[1]  # one global batch, one model: the same losses in both processes
    assert _checkpoint_dirs(workdir) == {workdir / "checkpoints"}
    step_dir = workdir / "checkpoints" / str(INTERRUPTED)
    states = sorted(p.name for p in (step_dir / "data").glob("process_*.json"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]
    assert len({(step_dir / "data" / s).read_text() for s in states}) == 1

    # The run stopped after step INTERRUPTED: resumed by 2 processes, and by 1 (with 2 devices).
    again, single = tmp_path / "again", tmp_path / "single"
    _interrupted_copy(workdir, again)
    _interrupted_copy(workdir, single)
    one = subprocess.Popen(
        [
            "bash",
            str(LAUNCH / "local.sh"),
            str(single),
            f"--config.dataset.data_dir={data_dir}",
            f"--config.num_train_steps={STEPS}",
        ],
        cwd=runs.REPO,
        env=_env(tmp_path_factory, 2),
        stdout=open(tmp_path / "single.log", "w"),  # noqa: SIM115  (closed when it exits)
        stderr=subprocess.STDOUT,
    )
    _finish(_multiprocess(again, data_dir, STEPS, _env(tmp_path_factory, 1)))
    assert one.wait(timeout=600) == 0, (tmp_path / "single.log").read_text()[-3000:]

    resumed = [_losses(again / f"process_{i}.log") for i in range(2)]
    for i in range(2):
        assert f"at step {INTERRUPTED}" in (again / f"process_{i}.log").read_text(errors="replace")
    assert resumed[0] and min(resumed[0]) > INTERRUPTED  # continued, did not restart
    assert resumed[0] == resumed[1]
    assert (again / "checkpoints" / str(STEPS)).is_dir()
    assert _checkpoint_dirs(again) == {again / "checkpoints"}

    single_log = (tmp_path / "single.log").read_text(errors="replace")
    assert "saved by 2 process(es), restored in 1" in single_log and "resumes exactly" in single_log
    alone = _losses(tmp_path / "single.log")
    assert sorted(alone) == sorted(resumed[0])
    for step, loss in resumed[0].items():
        # Same batches on the same 2 devices: only the all-reduce's transport differs.
        assert float(alone[step]) == pytest.approx(float(loss), rel=1e-5), step


def _main_processes(workdir) -> list[int]:
    """PIDs of the `liverjax.main` processes training in `workdir`."""
    pids = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if b"liverjax.main" in argv and str(workdir).encode() in argv:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="finds the processes in /proc")
@pytest.mark.parametrize("to", ["every process", "the script"])
def test_sigterm_to_every_process_saves_one_checkpoint_and_stops(
    data_dir, tmp_path, tmp_path_factory, to
):
    """What a cluster's preemption does (SIGTERM to every process of the job): JAX's preemption
    service makes all processes agree on one step, save it and exit 143 (the run is not finished;
    the launcher passes that on). SIGTERM to the script alone (kill, a terminal closing) once
    left the processes training behind it; it passes the signal on."""
    workdir = tmp_path / "run"
    child = _multiprocess(workdir, data_dir, 100_000, _env(tmp_path_factory, 1))
    logs = [workdir / f"process_{i}.log" for i in range(2)]
    deadline = time.monotonic() + 300
    while not all(log.is_file() and _losses(log) for log in logs):  # both are training
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
        time.sleep(0.5)
    pids = _main_processes(workdir)
    assert len(pids) == 2, pids
    for pid in pids if to == "every process" else [child.pid]:
        os.kill(pid, signal.SIGTERM)
    out = _finish(child, code=143)
    assert "preempted: the checkpoint is saved" in out
    assert _main_processes(workdir) == []

    stopped = re.compile(r"stopped at step (\d+) \((\w+)\)")
    stops = {stopped.search(log.read_text(errors="replace")).groups() for log in logs}
    assert len(stops) == 1, stops  # the same step in both
    ((step, reason),) = stops
    assert reason == "preempted" and int(step) < 100_000
    step_dir = workdir / "checkpoints" / step
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    assert (meta["step"], meta["stop_reason"]) == (int(step), "preempted")
    states = sorted(p.name for p in (step_dir / "data").glob("process_*.json"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]
    assert (step_dir / "state" / "commit_success.txt").is_file()


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="finds the processes in /proc")
def test_a_hangup_with_the_output_pipe_gone_stops_every_process(
    data_dir, tmp_path, tmp_path_factory
):
    # A terminal closing (SIGHUP) under `... | tee`: the script was killed by the signal, or by
    # its own failing echo, and left the processes training.
    workdir = tmp_path / "run"
    child = _multiprocess(workdir, data_dir, 100_000, _env(tmp_path_factory, 1))
    deadline = time.monotonic() + 120
    while len(_main_processes(workdir)) < 2:
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    child.stdout.close()  # the reader is gone: every write of the script now fails
    os.kill(child.pid, signal.SIGHUP)
    assert child.wait(timeout=300) == 143
    assert _main_processes(workdir) == []


@pytest.mark.parametrize("differs", ["seed", "workdir", "devices"])
def test_processes_started_differently_all_stop_at_once_saying_so(
    data_dir, tmp_path, tmp_path_factory, differs
):
    # A different seed (or rate) once trained apart silently; another workdir failed at the first
    # save. An error on one process then waited minutes in jax.distributed's shutdown.
    port = runs.free_port()
    children = []
    for i in range(2):
        env = _env(tmp_path_factory, 2 if differs == "devices" and i == 1 else 1)
        env[parallel.SHARED_FOLDER_WAIT_ENV] = "2"  # not the minute an NFS cache may take
        workdir = tmp_path / ("run" if differs == "seed" or i == 0 else "elsewhere")
        argv = [
            sys.executable, "-m", "liverjax.main", "--config=configs/test.py",
            f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
            *([f"--config.seed={i}"] if differs == "seed" else []),
        ]  # fmt: skip
        log = open(tmp_path / f"process_{i}.log", "w")  # noqa: SIM115  (closed when it exits)
        children.append(
            subprocess.Popen(argv, cwd=runs.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    codes = [child.wait(timeout=240) for child in children]  # not jax.distributed's timeout
    logs = [(tmp_path / f"process_{i}.log").read_text(errors="replace") for i in range(2)]
    # Process 0 waits for the others to say it before its exit (the coordinator's) aborts them.
    assert codes == [1, 1], logs
    if differs == "seed":
        want = "have different configs (process 1: seed = 1 (process 0: 0))"
    elif differs == "devices":  # the exchange of counts itself once failed on a reshape
        want = "have different numbers of devices (process 0: 1, process 1: 2)"
    else:
        want = "is not one folder shared by every process: process(es) [1] do not see"
    for log in logs:
        assert "training failed: " in log and want in log, log[-3000:]
    assert not list(tmp_path.rglob("checkpoints"))


@pytest.mark.parametrize("name", ["local.sh", "slurm.sbatch", "tpu_vm.sh", "multiprocess_cpu.sh"])
def test_shell_launchers_parse_and_run_liverjax_main(name):
    path = LAUNCH / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "-m liverjax.main" in path.read_text()
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize(
    "env, want",
    [
        ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}, "0,1,2,3,4,5,6,7"),
        ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_PER_NODE": "h100:4"}, "0,1,2,3"),
        ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8"}, ""),  # one task per GPU
        ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "1"}, ""),
    ],
)
def test_slurm_one_process_per_node_drives_every_gpu_of_it(tmp_path, env, want):
    """JAX's SLURM detection gives a process the GPU of its SLURM_LOCALID alone; with one task
    per node the script hands it all of the node's (srun replaced by a stub that shows them)."""
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text(
        '#!/usr/bin/env bash\necho "ids=${JAX_LOCAL_DEVICE_IDS:-} cpus=${SRUN_CPUS_PER_TASK:-}"\n'
    )
    stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_LOCAL"))}
    base |= {"PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "SLURM_CPUS_PER_TASK": "16"}
    out = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), str(tmp_path / "run")],
        env=base | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == f"ids={want} cpus=16"


def test_tpu_vm_quotes_a_repository_folder_with_spaces():
    out = subprocess.run(
        ["bash", str(LAUNCH / "tpu_vm.sh"), "gs://b/run"],
        env={**os.environ, "TPU": "t", "ZONE": "z", "DRY_RUN": "1", "REPO_DIR": "~/my repo"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    argv = shlex.split(out)
    remote = argv[argv.index("--command") + 1]
    assert remote.startswith("cd ~/my\\ repo && python3 -m liverjax.main ")
    assert shlex.split(remote)[:2] == ["cd", "~/my repo"]  # one argument, ~ left to expand


def test_tpu_vm_command_runs_main_on_every_worker():
    out = subprocess.run(
        ["bash", str(LAUNCH / "tpu_vm.sh"), "gs://b/run", "--config.num_epochs=3"],
        env={**os.environ, "TPU": "v4-16", "ZONE": "us-central2-b", "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--worker=all" in out and "v4-16" in out and "us-central2-b" in out
    assert "liverjax.main" in out and "gs://b/run" in out and "--config.num_epochs=3" in out


def test_kubernetes_job_wires_coordinator_index_and_count():
    service, job = yaml.safe_load_all((LAUNCH / "k8s" / "job.yaml").read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    (rule,) = spec["podFailurePolicy"]["rules"]  # preempted pods (exit 143) run again, resume
    assert rule["action"] == "Ignore" and rule["onExitCodes"]["values"] == [143]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["NUM_PROCESSES"]) == spec["completions"] == spec["parallelism"]
    port = service["spec"]["ports"][0]["port"]
    assert env["COORDINATOR_ADDRESS"] == f"{job['metadata']['name']}-0.{pod['subdomain']}:{port}"
    command = " ".join(container["command"] + container["args"])
    assert "-m liverjax.main" in command
    assert '--config.distributed.process_id="$JOB_COMPLETION_INDEX"' in command
    assert '--config.distributed.num_processes="$NUM_PROCESSES"' in command
    assert '--config.distributed.coordinator_address="$COORDINATOR_ADDRESS"' in command


def test_gpu_benchmark_script_writes_figures_trace_and_hlo(data_dir, tmp_path, tmp_path_factory):
    """The script runs where no GPU is (XLA:CPU, no nvidia-smi) on a small size: every output."""
    out = tmp_path / "out"
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=1)
    env.update(PYTHON=sys.executable, SIZE="32", BATCH="8", STEPS="1", WARMUP="1", WORKERS="0")
    env["DATA_DIR"] = str(data_dir)
    done = subprocess.run(
        # OUT relative to the repository, where the script runs, as the README writes it
        ["bash", str(LAUNCH / "gpu_benchmark.sh"), os.path.relpath(out, runs.REPO)]
        + ["--peak_tflops=1", "--matmul_size=512", "--config.dataset.name=liver/synthetic_small"],
        cwd=runs.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((out / "benchmark.json").read_text())
    assert (figures["image_size"], figures["batch"], figures["model_dtype"]) == (
        32,
        8,
        "bfloat16",
    )
    assert figures["matmul_bf16_tflops"] > 0 and figures["train_in_memory_mfu"] > 0
    assert "train, end to end from ArrayRecord" in (out / "benchmark.log").read_text()
    with tarfile.open(out / "profile.tar.gz") as tar:
        assert any(n.endswith(".xplane.pb") for n in tar.getnames())
    with tarfile.open(out / "xla_dump.tar.gz") as tar:
        dumped = tar.getnames()
    assert any("jit_train_step" in n and "after_optimizations.txt" in n for n in dumped), dumped
    assert not any("jit_predict" in n for n in dumped)  # only the train step's module
    assert (out / "devices.txt").is_file()


def _wheel_list() -> list[str]:
    text = (LAUNCH / "offline_wheels.sh").read_text()
    body = re.search(r"^packages=\((.*?)^\)", text, re.S | re.M).group(1)
    lines = [line.split("#")[0] for line in body.splitlines()]
    return " ".join(lines).split()


def test_offline_wheels_cover_every_runtime_dependency_of_pyproject():
    deps = tomllib.loads((runs.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", d)[0].lower().replace("_", "-") for d in deps}
    host_stack = {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "matplotlib"}
    left_out = {"apache-beam", "mlcroissant"}  # Beam builds, the tfds command line (see script)
    assert names - host_stack - left_out <= set(_wheel_list())


def test_offline_wheels_skip_what_the_host_has(tmp_path):
    # A freeze of a host that has every package (names as pip writes them): nothing to fetch,
    # so this runs without an index.
    host = tmp_path / "freeze.txt"
    spelled = {"python-multipart": "Python_Multipart", "pyyaml": "PyYAML"}
    host.write_text("".join(f"{spelled.get(n, n)}==1.0\n" for n in _wheel_list()))
    done = subprocess.run(
        ["bash", str(LAUNCH / "offline_wheels.sh"), str(tmp_path / "wheels"), str(host)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.stdout.startswith("0 packages in"), done.stdout
    assert not list((tmp_path / "wheels").iterdir())
