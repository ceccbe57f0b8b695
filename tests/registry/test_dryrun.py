"""The dry run: input shapes from the manifest, the output checks, and real ONNX / TorchScript models through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import ModelError
from gateway.registry.dryrun import DEFAULT_SPATIAL, check_output, dry_run, expected_channels, input_shape
from gateway.registry.manifest import Manifest

from model_packages import manifest_dict, onnx_model, torchscript_model, write_package

UNIT = {"value": "1", "scheme": "UCUM", "meaning": "no units"}
ADC = {"value": "113041", "scheme": "DCM", "meaning": "Apparent Diffusion Coefficient"}


def manifest(**overrides: Any) -> Manifest:
    return Manifest.model_validate(manifest_dict(**overrides))


def segmentation(labels: int = 2, **fields: Any) -> dict[str, Any]:
    seg = manifest_dict(labels=labels)["outputs"]["segmentation"]
    return {"segmentation": {**seg, **fields}}


def maps(*channels: int) -> dict[str, Any]:
    return {"parametric_maps": [{"name": f"map{c}", "channel": c, "quantity": ADC, "units": UNIT} for c in channels]}


def test_input_shape_from_patch_size_spatial_size_or_default() -> None:
    assert input_shape(manifest()) == (1, 1, 8, 16, 16)
    no_patch = {"patch_size": None, "input_channels": 3}
    assert input_shape(manifest(inference=no_patch)) == (1, 3, *DEFAULT_SPATIAL)
    sized = manifest(inference=no_patch, preprocess={"spatial_size": [None, 24, 40]})
    assert input_shape(sized) == (1, 3, DEFAULT_SPATIAL[0], 24, 40)
    diffusion = manifest(select={"diffusion": True, "min_b_values": 3})
    assert input_shape(diffusion) == (1, 3, 8, 16, 16), "one channel per b-value, as many as the model needs"


@pytest.mark.parametrize(
    ("outputs", "needed"),
    [
        (segmentation(2), 3),
        (segmentation(4, activation="sigmoid"), 5),
        (segmentation(4, activation="none"), 1),
        (segmentation(3, kind="channels", activation="sigmoid"), 4),  # values 1-3 are channels 1-3
        (maps(0), 1),
        (maps(0, 2), 3),
    ],
)
def test_expected_channels(outputs: dict[str, Any], needed: int) -> None:
    assert expected_channels(manifest(outputs=outputs))[0] == needed


def test_check_output_messages() -> None:
    m = manifest(outputs=segmentation(5))
    shape = (1, 1, 8, 16, 16)
    check_output(m, shape, np.zeros((1, 6, 8, 16, 16), np.float32))
    with pytest.raises(ModelError) as refused:
        check_output(m, shape, np.zeros((1, 3, 8, 16, 16), np.float32))
    assert (
        refused.value.reason
        == "dry run: output has 3 channels, the manifest declares 5 labels, values up to 5 (needs 6)"
    )
    with pytest.raises(ModelError, match=r"output has shape \[1, 6, 8, 16\]"):
        check_output(m, shape, np.zeros((1, 6, 8, 16), np.float32))
    with pytest.raises(ModelError, match="spatial shape"):
        check_output(m, shape, np.zeros((1, 6, 8, 16, 8), np.float32))
    infinite = np.zeros((1, 6, 8, 16, 16), np.float32)
    infinite[0, 0, 0, 0, 0] = np.inf
    with pytest.raises(ModelError, match="NaN or infinite"):
        check_output(m, shape, infinite)
    with pytest.raises(ModelError, match=r"reads parametric map channels up to 2 \(needs 3\)"):
        check_output(manifest(outputs=maps(2)), shape, np.zeros((1, 1, 8, 16, 16), np.float32))


def test_onnx_model(tmp_path: Path) -> None:
    folder = write_package(tmp_path / "pkg", manifest_dict())
    report = dry_run(manifest(), folder)
    assert report.input_shape == (1, 1, 8, 16, 16) and report.output_shape == (1, 3, 8, 16, 16)
    assert report.device == "cpu" and report.seconds >= 0 and report.load_seconds > 0
    assert report.as_dict()["output_shape"] == [1, 3, 8, 16, 16]


def test_diffusion_model_gets_b_values(tmp_path: Path) -> None:
    data = manifest_dict(select={"modality": ["MR"], "diffusion": True}, outputs=maps(0))
    folder = write_package(tmp_path / "pkg", data, weights=onnx_model(1, 2, b_values=True))
    report = dry_run(Manifest.model_validate(data), folder)
    assert report.input_shape == (1, 2, 8, 16, 16) and report.output_shape == (1, 1, 8, 16, 16)


def test_a_model_failing_on_its_declared_input_is_refused(tmp_path: Path) -> None:
    data = manifest_dict(inference={"patch_size": [8, 16, 16], "input_channels": 2})
    folder = write_package(tmp_path / "pkg", data, weights=onnx_model(3, 1))
    with pytest.raises(ModelError, match=r"^dry run: the model failed on input \[1, 2, 8, 16, 16\]"):
        dry_run(Manifest.model_validate(data), folder)


def test_diffusion_model_without_its_b_values_input_is_refused(tmp_path: Path) -> None:
    data = manifest_dict(select={"diffusion": True}, outputs=maps(0))
    folder = write_package(tmp_path / "pkg", data, weights=onnx_model(1, 2))
    with pytest.raises(ModelError, match=r"^dry run: "):
        dry_run(Manifest.model_validate(data), folder)


def test_torchscript_model(tmp_path: Path) -> None:
    data = manifest_dict(backend="torchscript", weights="model.pt")
    folder = tmp_path / "pkg"
    write_package(folder, data, weights=b"placeholder")
    torchscript_model(folder / "model.pt", out_channels=3)
    report = dry_run(Manifest.model_validate(data), folder)
    assert report.output_shape == (1, 3, 8, 16, 16)
    torchscript_model(folder / "model.pt", out_channels=2)
    with pytest.raises(
        ModelError, match=r"output has 2 channels, the manifest declares 2 labels, values up to 2 \(needs 3\)"
    ):
        dry_run(Manifest.model_validate(data), folder)
