"""Every `python -m` entry point defines all of its module before it runs.

Run as a script, a module executes top to bottom: a function defined below the `__main__` block
does not exist yet when `main()` runs, although every test that imports the module finds it.
"""

import ast
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import pytest
import training_runs

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    p
    for package in ("liverjax", "tfds_liver")
    for p in (REPO / package).glob("*.py")
    if "\nif __name__ ==" in p.read_text()  # a top-level guard (not a message quoting one)
)


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def _top_level(path: pathlib.Path) -> list[ast.stmt]:
    """The module's top-level statements. CPython 3.11.7's parser can raise a spurious
    SystemError in a long-running process ("AST constructor recursion depth mismatch",
    gh-106905, fixed in 3.11.8): then the file is parsed in a fresh interpreter."""
    try:
        return ast.parse(path.read_text()).body
    except SystemError:
        code = (
            "import ast, pickle, sys; "
            "sys.stdout.buffer.write(pickle.dumps(ast.parse(open(sys.argv[1]).read()).body))"
        )
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        return pickle.loads(done.stdout)


def test_the_entry_points_are_found():
    names = {p.stem for p in MODULES}
    assert {"main", "evaluate", "export", "serve", "labels", "phantom"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_main_block_is_the_last_statement(path):
    body = _top_level(path)
    guards = [i for i, node in enumerate(body) if _is_main_guard(node)]
    assert guards, f"{path.name}: no `if __name__ == '__main__':` block"
    assert guards == [len(body) - 1], (
        f"{path.name}: statements after the __main__ block (line {body[guards[0]].lineno}) do "
        "not exist yet when `python -m` runs it"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config.optimizer.lerning_rate=0.1"], r"--config.optimizer.lerning_rate=0.1: a "
         r"--config.\* override names no field of the config \('lerning_rate'; Did you mean "
         r"\"learning_rate\""),
        (["--config.train.lr=0.1"], r"names no field of the config \(train\)"),
        (["--workdir="], "--workdir is empty"),
        (["--config.batch_size=0"], r"^training failed: config.batch_size = 0: must be a "
         r"positive int; e.g. 32 \(LIVERJAX_TRACEBACK=1 shows where\)$"),
        (["--config.eval.threshold_rule=sens"], r"^training failed: config.eval.threshold_rule "
         r"= 'sens': use one of"),  # used after training, checked before it
    ],
    ids=["typo", "no_section", "empty_workdir", "bad_value", "bad_eval_setting"],
)  # fmt: skip
def test_main_says_what_is_wrong_in_one_line(tmp_path, args, message):
    workdir = tmp_path / "run"
    argv = ["--config", str(REPO / "configs" / "test.py"), f"--workdir={workdir}", *args]
    # From an empty folder: an empty --workdir once trained into the current one.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "liverjax.main", *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [], done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert any(re.search(message, line) for line in lines), done.stderr[-2000:]
    assert not workdir.exists()  # nothing written for a run that cannot start


def test_a_diverged_run_ends_in_one_line(tmp_path_factory, tmp_path):
    data_dir = training_runs.liver_data(tmp_path_factory)
    argv = [
        *("--config", str(REPO / "configs" / "test.py"), f"--workdir={tmp_path / 'run'}"),
        *(f"--config.dataset.data_dir={data_dir}", "--config.optimizer.learning_rate=1e30"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "liverjax.main", *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"training failed: training loss is (nan|inf) at step \d+", last), last
    assert last.endswith("(LIVERJAX_TRACEBACK=1 shows where)")


def test_help_is_h_too(tmp_path):
    # absl knows --help and --helpshort; every other liverjax command takes -h
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module, flag in (("liverjax.main", "--workdir"), ("liverjax.benchmark", "--torch_ref")):
        done = subprocess.run(
            [sys.executable, "-m", module, "-h"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        # absl's help exits with 1, as --helpshort does
        assert "Unknown command line flag" not in done.stderr, done.stderr[-2000:]
        assert "--config" in done.stdout and flag in done.stdout, module


def test_an_error_in_the_config_file_keeps_its_traceback(tmp_path):
    # not taken for a --config.* override naming no field: the file's own line is shown
    config = tmp_path / "broken.py"
    config.write_text(
        "from configs import default\n\n\ndef get_config():\n"
        "    config = default.get_config()\n    config.batch_size = config.optimizer.batchsize\n"
        "    return config\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "liverjax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}",
         "--config.seed=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "names no field" not in done.stderr
    assert "Traceback" in done.stderr and f'"{config}", line 6' in done.stderr, done.stderr[-2000:]


def test_one_line_for_liverjax_checks_and_os_errors_a_traceback_for_a_library_error(
    tmp_path, monkeypatch
):
    import ml_collections
    import numpy as np

    from liverjax import evaluate, train

    monkeypatch.delenv(train.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit, match=r"^x failed: config has no 'dataset' section"):
        with train.user_errors("x"):
            train.validate_config(ml_collections.ConfigDict())
    with pytest.raises(SystemExit, match=r"^x failed: \[Errno 2\] .*missing"):
        with train.user_errors("x"):
            open(tmp_path / "missing")  # noqa: SIM115
    # A ValueError from inside a library is more likely a bug than a bad input: it keeps its
    # traceback (it once ended in one line, as if the user had given a wrong value).
    # A damaged JSON file of liverjax's is named (json's own error gave no file)
    (tmp_path / "config.json").write_text('{"model": {')
    with pytest.raises(SystemExit, match=r"^x failed: .*config.json is not valid JSON \(Expect"):
        with train.user_errors("x"):
            evaluate.load_config(tmp_path)
    with pytest.raises(ValueError, match="cannot reshape") as raised:
        with train.user_errors("x"):
            np.reshape(np.ones(3), (2,))
    assert not train.raised_by_liverjax(raised.value)


def test_a_library_error_on_one_process_ends_it_at_once_with_its_traceback(tmp_path):
    # Raised, it waited in jax.distributed's shutdown barrier for the other process (minutes).
    script = tmp_path / "one_fails.py"
    script.write_text(
        "import sys\nimport jax\nimport numpy as np\nfrom jax.experimental import multihost_utils\n"
        "from liverjax import train\n\n"
        "i = int(sys.argv[1])\n"
        "jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=i)\n"
        "with train.user_errors('x'):\n"
        "    if i == 1:\n"
        "        np.reshape(np.ones(3), (2,))\n"
        "    multihost_utils.sync_global_devices('process 1 never comes')\n"
    )
    env = training_runs.child_env(tmp_path / "cache", 1)
    env.pop("LIVERJAX_TRACEBACK", None)
    address = f"127.0.0.1:{training_runs.free_port()}"
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), address],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        output = children[1].communicate(timeout=120)[0]
        assert children[1].returncode == 1, output[-3000:]
        assert "Traceback" in output and "cannot reshape" in output, output[-3000:]
    finally:
        for child in children:
            child.kill()
            child.communicate()


def test_a_saved_config_is_a_config_file_again(tmp_path):
    from etils import epath

    from configs import from_workdir
    from configs import test as test_config
    from liverjax import train

    config = test_config.get_config()
    config.seed = 7
    train.write_config(config, epath.Path(tmp_path))
    again = from_workdir.get_config(str(tmp_path))
    assert json.loads(again.to_json()) == json.loads(config.to_json_best_effort())
    assert again.model.widths == (8, 16)  # a tuple again (JSON made it a list): overridable
    # A run saved before a setting existed gets its default (it was an AttributeError)
    saved = json.loads((tmp_path / train.CONFIG_FILE).read_text())
    del saved["early_stopping"]["start_epoch"]
    (tmp_path / train.CONFIG_FILE).write_text(json.dumps(saved))
    older = from_workdir.get_config(str(tmp_path))
    assert older.early_stopping.start_epoch == test_config.get_config().early_stopping.start_epoch
    assert older.seed == 7
    with pytest.raises(ValueError, match="needs the run's folder after a colon"):
        from_workdir.get_config()
