"""The notebooks run from top to bottom in a fresh kernel (a notebook that no longer runs is a broken document),
leave nothing behind in the temporary folder, and say no number in their prose that their outputs do not show."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
#: The prefix of the work folder the notebook makes in the temporary folder.
WORK_PREFIX = "gateway-notebook-"
_NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w.])")


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def prose_numbers(notebook: nbformat.NotebookNode) -> set[float]:
    """The numbers in the markdown cells, less headings and the numbers of numbered lists."""
    numbers = set()
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if line.startswith("#"):
                continue
            line = re.sub(r"^\s*\d+\.\s", "", line)
            numbers.update(float(n) for n in _NUMBER.findall(line))
    return numbers


def run(name: str, folder: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    client.execute()
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("name", ["register_a_model.ipynb"])
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's own warning about its future default
    temp = Path(tempfile.gettempdir())  # the kernel's too: it inherits this environment
    before = set(os.listdir(temp))
    notebook = run(name, tmp_path)
    outputs = outputs_text(notebook)
    new = set(os.listdir(temp)) - before
    assert "ct-bone@0.1.0 runs" in outputs
    assert "refused:" in outputs and "patch_size" in outputs
    assert "ct-bone@0.2.0 does not run:" in outputs and "min_slices" in outputs

    # Nothing left behind: its work folder (it prints where) is gone, and no other new entry of the temporary
    # folder is one the notebook made (other processes on the machine may add their own meanwhile).
    (work,) = set(re.findall(rf"{re.escape(str(temp))}/({WORK_PREFIX}\w+)", outputs))
    assert not (temp / work).exists(), f"{temp / work} left behind"
    assert f"removed {temp / work}: True" in outputs
    left = {entry for entry in new if entry.startswith(WORK_PREFIX) or entry in outputs}
    assert not left, f"the notebook left {sorted(left)} in {temp}"

    # Every number its prose states is one its outputs show (computed, or an input it prints).
    shown = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", outputs)}
    assert prose_numbers(notebook) <= shown, f"prose numbers not in the outputs: {prose_numbers(notebook) - shown}"
