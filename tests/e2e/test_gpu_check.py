"""``make gpu-check`` (bench/gpu_check.py): without CUDA it refuses on one clear line with its own exit status; its
report puts each GPU target of issue 12 beside what was measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402  (bench/ is not a package)

CUDA_HERE = torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(CUDA_HERE, reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_why_on_one_line_and_exits_2(tmp_path: Path) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    before = doc.read_bytes() if doc.exists() else None
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == gpu_check.NO_CUDA_STATUS == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("gpu-check: cannot run here: ")
    assert "CPU-only build" in line or "no CUDA device" in line or "CUDA execution provider" in line
    assert (doc.read_bytes() if doc.exists() else None) == before, "nothing written"


def test_the_report_puts_each_target_beside_the_measurement() -> None:
    table = (
        "| stage | first study (cold) | study 2 |\n|---|---:|---:|\n"
        "| **end to end** (last instance received -> SR in Orthanc, minus quiet period) | **3.10** | **1.75** |\n"
    )
    match = gpu_check._E2E_ROW.search(table)
    assert match is not None
    outcome = gpu_check.Outcome(
        pytest_line="3 passed, 1 skipped", pytest_ok=True, ratio=3.4, busy_pct=72.0, busy_samples=40
    )
    outcome.e2e_s = [float(cell.strip(" *")) for cell in match.group(1).split("|")]
    rows = "\n".join(gpu_check.target_rows(outcome))
    assert "| 3.40x | met |" in rows
    assert "| 72 % (mean of 40 nvidia-smi samples) | NOT met |" in rows
    assert "3.10 s / 1.75 s (first cold / then steady) | met |" in rows
    assert "| 3 passed, 1 skipped | met |" in rows
    unmeasured = "\n".join(gpu_check.target_rows(gpu_check.Outcome()))
    assert unmeasured.count("not measured") == 3 and "| not run | NOT met |" in unmeasured
