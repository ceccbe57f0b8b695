"""The notebooks run from top to bottom in a fresh kernel (a notebook that no longer runs is a broken document)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["register_a_model.ipynb"])
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's own warning about its future default
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's work folder lands in the test's tmp_path
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "ct-bone@0.1.0 runs" in outputs
    assert "refused:" in outputs and "patch_size" in outputs
    assert "ct-bone@0.2.0 does not run:" in outputs and "min_slices" in outputs
    assert os.listdir(tmp_path), "the notebook worked in the test's folder"
