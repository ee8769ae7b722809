"""Every `python -m` entry point defines all of its module before it runs.

Run as a script, a module executes top to bottom: a function defined below the `__main__` block
does not exist yet when `main()` runs, although every test that imports the module finds it.
"""

import ast
import pathlib

import pytest

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
