"""The example models' packages: a valid manifest, weights small enough to commit, the script that made them."""

from __future__ import annotations

import pytest

from gateway.infer.backends import is_available
from gateway.registry.manifest import load_manifest

from model_scripts import MODELS

PACKAGES = {"ct-tissue": "build.py", "ct-nodule-unet": "train.py", "adc-dwi": "build.py"}


@pytest.mark.parametrize(("name", "script"), sorted(PACKAGES.items()))
def test_package(name: str, script: str) -> None:
    folder = MODELS / name
    manifest = load_manifest(folder)
    assert manifest.name == name
    assert is_available(manifest.backend)
    weights = folder / manifest.weights
    assert weights.is_file()
    assert weights.stat().st_size < 5 * 2**20
    assert (folder / script).is_file()
    assert (folder / "README.md").is_file()


def test_the_nodule_model_also_ships_onnx() -> None:
    onnx = MODELS / "ct-nodule-unet" / "model.onnx"
    assert onnx.is_file() and onnx.stat().st_size < 5 * 2**20
