"""The notebooks in notebooks/ run from top to bottom, and the committed copies are executed.

Each notebook ends with a cell of asserts against plain PyTorch, so running it is a test.
Needs nbclient, nbformat, ipykernel and matplotlib (the `test` extra).
"""

import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = [
    "01_why_modules_are_not_tensors.ipynb",
    "02_losses_and_regularization.ipynb",
    "03_model_algebra.ipynb",
]
CELL_TIMEOUT_S = 180
FOUND = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))

# Appended to the copy that the test executes (never to the committed notebook): the kernel
# must run in this environment (the one with the project installed), not another python3.
_KERNEL_CHECK = "import sys; print(sys.prefix)"


def _read(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_exactly_the_expected_notebooks():
    assert FOUND == EXPECTED


@pytest.mark.parametrize("name", FOUND)
def test_committed_notebook_is_executed_without_errors(name):
    nb = _read(name)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells, f"{name} has no code cells"
    not_run = [i for i, cell in enumerate(cells) if cell.execution_count is None]
    assert not not_run, f"{name}: code cells {not_run} were not executed; commit the executed notebook"
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{name}: not run top to bottom in one go: {counts}"
    outputs = [out for cell in cells for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"], f"{name} holds error outputs"
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{name} has no figure"
    last = cells[-1]
    assert "assert" in last.source, f"{name} must end with a cell of asserts"
    assert "all checks passed" in "".join(out.get("text", "") for out in last.outputs)


@pytest.mark.parametrize("name", FOUND)
def test_notebook_runs(name):
    nb = _read(name)
    nb.cells.append(nbformat.v4.new_code_cell(_KERNEL_CHECK))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and the traceback, on a failure
    errors = [out for cell in _code_cells(nb) for out in cell.outputs if out.output_type == "error"]
    assert not errors
    kernel_prefix = "".join(out.get("text", "") for out in nb.cells[-1].outputs).strip()
    assert kernel_prefix == sys.prefix, f"the python3 kernel runs in {kernel_prefix}, not in {sys.prefix}"
