"""A model that asks for CUDA on a machine whose runtime cannot give it runs on the CPU, and says so once, naming
the model and the reason (issue 12: "log a clear line when a model asks for CUDA but falls back to the CPU")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_models import TinyConv, save_onnx, save_torchscript, write_package

from gateway.infer.ort import load_onnx
from gateway.infer.torch_backend import load_torchscript


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine where torch has no CUDA")
def test_torch_model_asking_for_cuda_warns_once_and_runs_on_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_torchscript(TinyConv(), tmp_path / "model.pt")
    manifest = write_package(tmp_path, "torchscript", "model.pt", name="fallback-torch")
    with caplog.at_level(logging.WARNING, logger="gateway.infer.torch_backend"):
        first = load_torchscript(manifest, tmp_path, "cuda:0")
        second = load_torchscript(manifest, tmp_path, "cuda:0")  # unloaded and loaded again: no second line
    assert first.device == second.device == "cpu"
    lines = [r for r in caplog.records if r.levelno == logging.WARNING and manifest.ref in r.getMessage()]
    assert len(lines) == 1, caplog.text
    message = lines[0].getMessage()
    assert "asks for cuda:0" in message and "running it on the CPU" in message
    assert "CPU-only build" in message or "no CUDA device" in message
    assert first.run(np.zeros((1, 1, 4, 5, 6), dtype=np.float32)).shape[0] == 1


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="checks the fallback without the CUDA provider"
)
def test_onnx_model_asking_for_cuda_names_itself_and_runs_on_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_onnx(TinyConv(), tmp_path / "model.onnx")
    manifest = write_package(tmp_path, "onnx", "model.onnx", name="fallback-onnx")
    with caplog.at_level(logging.WARNING, logger="gateway.infer.ort"):
        backend = load_onnx(manifest, tmp_path, "cuda:0")
    assert backend.device == "cpu"
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert manifest.ref in line and "asks for cuda:0" in line and "install onnxruntime-gpu" in line
