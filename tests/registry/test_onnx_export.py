"""The ONNX export path of docs/models.md works as written: its Python block exports a model in the gateway's
environment, its model.yaml block registers the result, and the names in ``inference.input_name`` /
``output_name`` are checked against the graph."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from gateway.config import StoreSettings
from gateway.errors import ModelError
from gateway.registry.registry import Registry, RegistryIndex

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
SECTION = "## Exporting a PyTorch model to ONNX"


def doc_block(language: str) -> str:
    """The first ``language`` code block of the export section of docs/models.md."""
    text = DOC.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block under {SECTION!r} in {DOC.name}"
    return match.group(1)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    index = RegistryIndex(StoreSettings(data_dir=tmp_path / "data"))
    try:
        yield Registry(index)
    finally:
        index.close()


def export_as_documented(work: Path) -> Path:
    """Run the documented Python block in a fresh interpreter in ``work``; write the documented model.yaml."""
    done = subprocess.run(
        [sys.executable, "-c", doc_block("python")], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    folder = work / "my-model"
    (folder / "model.yaml").write_text(doc_block("yaml"))
    return folder


def test_documented_export_registers_and_dry_runs(tmp_path: Path, registry: Registry) -> None:
    folder = export_as_documented(tmp_path)
    model = registry.register(folder)
    assert model.ref == "my-model@1.0.0" and model.active
    assert (model.manifest.inference.input_name, model.manifest.inference.output_name) == ("image", "logits")
    assert model.dry_run["input_shape"] == [1, 1, 32, 64, 64]
    assert model.dry_run["output_shape"] == [1, 2, 32, 64, 64]


def test_a_name_the_graph_lacks_is_refused_with_the_names_it_has(tmp_path: Path, registry: Registry) -> None:
    folder = export_as_documented(tmp_path)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    manifest["inference"]["input_name"] = "img"
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ModelError, match=r"model\.onnx has no input named 'img'; it has image"):
        registry.register(folder)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is not None, reason="onnxscript is installed here")
def test_the_default_exporter_needs_onnxscript(tmp_path: Path) -> None:
    """Why the documented call passes ``dynamo=False``."""
    with warnings.catch_warnings(), pytest.raises(ModuleNotFoundError, match="onnxscript"):
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(torch.nn.Conv3d(1, 2, 1), (torch.zeros(1, 1, 4, 4, 4),), str(tmp_path / "m.onnx"))
