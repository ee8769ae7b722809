"""Training never imports tensorflow (GPU and TPU hosts may not have it installed)."""

import json
import textwrap

import training_runs as runs

from liverjax import train


def test_training_command_runs_without_importing_tensorflow(tmp_path, tmp_path_factory):
    # An empty data directory: the command builds the synthetic_small records on first use.
    data_dir = tmp_path / "data"
    workdir = tmp_path / "run"
    argv = [
        "liverjax.main",
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        "--config.num_train_steps=3",
    ]
    # The command line as users run it (python -m liverjax.main ...); at exit, after training,
    # report which tensorflow modules the process holds.
    code = textwrap.dedent(
        f"""
        import atexit, runpy, sys
        atexit.register(
            lambda: print("TF_MODULES", sorted(m for m in sys.modules if m.split(".")[0]
                                               in ("tensorflow", "tf_keras", "keras")))
        )
        sys.argv = {argv!r}
        runpy.run_module("liverjax.main", run_name="__main__")
        """
    )
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=8)
    log = tmp_path / "train.log"
    child = runs.start_python(code, env, log)
    output_ok = child.wait(timeout=300) == 0
    output = log.read_text()
    assert output_ok, output[-3000:]
    assert "TF_MODULES []" in output, output[-3000:]
    # The records were decoded in worker processes started without fork() (JAX runs threads).
    assert "os.fork() was called" not in output, output[-3000:]

    # It built the records, then trained: 3 steps, the --config.x override in the saved config,
    # a checkpoint, TensorBoard events.
    assert (data_dir / "liver" / "synthetic_small").is_dir()
    saved = json.loads((workdir / train.CONFIG_FILE).read_text())
    assert saved["num_train_steps"] == 3
    assert (workdir / train.CHECKPOINT_DIR / "3").is_dir()
    assert runs.read_scalars(workdir)["validation/roc_auc"][0][0] == 3
