"""The notebooks in ``notebooks/``: committed without outputs, and each runs top to bottom.

Execution uses nbclient with the ``python3`` kernel (ipykernel, a dev dependency) in a fresh
temporary working directory, offline (``HF_HUB_OFFLINE=1``), with the repository root first on
``PYTHONPATH`` so the checkout under test is what the kernel imports. A failing cell fails the
test with the cell's traceback.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "01_frontier_exploration.ipynb",
    "02_estimator_comparison.ipynb",
    "03_bayesian_refinement.ipynb",
    "04_export_to_quantizers.ipynb",
}
CELL_TIMEOUT_S = 600


def test_expected_notebooks_exist() -> None:
    assert EXPECTED <= {p.name for p in NOTEBOOKS}, f"missing: {EXPECTED - {p.name for p in NOTEBOOKS}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs or an execution count; strip them "
                       "(see docs/notebooks.md, Editing them)")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # The kernel process inherits this environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed after {time.perf_counter() - start:.0f} s:\n{exc}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {[e.get('ename') for e in errors]}"
    # Notebooks write only into their own temporary directories, never the working directory.
    assert not any(tmp_path.iterdir()), f"{path.name} wrote {sorted(p.name for p in tmp_path.iterdir())}"
