"""Every `python -m` entry point defines all of its module before it runs.

Run as a script, a module executes top to bottom: a function defined below the `__main__` block
does not exist yet when `main()` runs, although every test that imports the module finds it.
"""

import ast
import os
import pathlib
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


def test_the_entry_points_are_found():
    names = {p.stem for p in MODULES}
    assert {"main", "evaluate", "export", "serve", "labels", "phantom"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_main_block_is_the_last_statement(path):
    body = ast.parse(path.read_text()).body
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
