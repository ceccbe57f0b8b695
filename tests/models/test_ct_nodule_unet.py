"""models/ct-nodule-unet: TorchScript and ONNX agree, the evaluation script's Dice on unseen phantoms, and one
measured lesion per phantom nodule through the runtime."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gateway.assemble.model import SliceRef, Volume
from gateway.infer.runtime import InferenceRuntime
from gateway.registry.manifest import load_manifest

from model_scripts import MODELS, load_script

MODEL = "ct-nodule-unet"


@pytest.fixture(scope="module")
def evaluate() -> ModuleType:
    return load_script(MODEL, "evaluate")


def test_torchscript_and_onnx_agree(evaluate: ModuleType) -> None:
    data = evaluate.make_phantom(3100, (40, 256, 256), 360.0 / 256, 2.5, 2)
    m = evaluate.manifest()
    shape, _ = evaluate.model_grid(data.hu.shape, data.spacing, evaluate.target_spacing(m))
    image = evaluate.window(evaluate.resize(data.hu, shape), m)
    batch = np.stack([image[:48, 20:116, 60:156], image[10:58, 100:196, 100:196]])[:, None]
    scripted = evaluate.load_torchscript(MODELS / MODEL / "model.pt")(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(MODELS / MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert scripted.shape == onnx.shape == (2, 2, 48, 96, 96)
    np.testing.assert_allclose(onnx, scripted, atol=1e-3, rtol=1e-3)
    assert np.array_equal(onnx.argmax(axis=1), scripted.argmax(axis=1))


def test_dice_on_unseen_phantoms(evaluate: ModuleType) -> None:
    predictor = evaluate.load_torchscript(MODELS / MODEL / "model.pt")
    scores = evaluate.evaluate(predictor, seeds=(3000, 3001), shape=(40, 256, 256), pixel_spacing=360.0 / 256)
    assert min(scores) >= 0.8, scores


def test_dice_on_a_series_thinner_than_a_patch(evaluate: ModuleType) -> None:
    predictor = evaluate.load_torchscript(MODELS / MODEL / "model.pt")
    (score,) = evaluate.evaluate(predictor, seeds=(3003,), shape=(20, 256, 256), pixel_spacing=360.0 / 256, n_nodules=1)
    assert score >= 0.8


@pytest.mark.parametrize("slices", [20, 40])  # 20: thinner than a patch, so the sliding window pads it with air
def test_no_nodule_no_segment(evaluate: ModuleType, slices: int) -> None:
    predictor = evaluate.load_torchscript(MODELS / MODEL / "model.pt")
    data = evaluate.make_phantom(3200, (slices, 256, 256), 360.0 / 256, 2.5, 0)
    probability = evaluate.predict(predictor, data, evaluate.manifest())
    assert probability.shape == data.hu.shape
    assert int((probability >= 0.5).sum()) < 20  # a few voxels at most, no blob


@pytest.fixture(scope="module")
def runtime() -> Iterator[InferenceRuntime]:
    rt = InferenceRuntime("cpu")
    yield rt
    rt.close()


def phantom_volume(data: Any) -> Volume:
    """A phantom as the volume assembly would make of its series (slice k at z = ((S - 1) / 2 - k) * spacing)."""
    s, r, c = data.hu.shape
    slice_mm, row_mm, column_mm = data.spacing
    affine = np.array(
        [
            [0.0, 0.0, column_mm, -(c - 1) / 2 * column_mm],
            [0.0, row_mm, 0.0, -(r - 1) / 2 * row_mm],
            [-slice_mm, 0.0, 0.0, (s - 1) / 2 * slice_mm],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    slices = tuple(SliceRef(f"1.2.826.0.1.3680043.10.1.{k + 1}") for k in range(s))
    return Volume(data.hu, affine, slices, "1.2.826.0.1.3680043.10.2", "1.2.826.0.1.3680043.10.3", None, "CT")


@pytest.mark.parametrize("seed", [3000, 3003])  # nodules of 4.1 to 8.8 mm radius
def test_one_lesion_per_nodule(evaluate: ModuleType, runtime: InferenceRuntime, seed: int) -> None:
    data = evaluate.make_phantom(seed, (40, 256, 256), 360.0 / 256, 2.5, 3)
    folder = MODELS / MODEL
    manifest = load_manifest(folder)
    sha256 = hashlib.sha256((folder / manifest.weights).read_bytes()).hexdigest()
    found = runtime.run(manifest, folder, sha256, phantom_volume(data)).lesions[1]
    assert (found.name, found.left_out, len(found.lesions)) == ("nodule", 0, len(data.nodules))
    matched = set()
    for nodule in data.nodules:
        distances = [np.linalg.norm(np.subtract(lesion.centre, nodule.center_mm)) for lesion in found.lesions]
        lesion = found.lesions[int(np.argmin(distances))]
        matched.add(lesion.number)
        assert min(distances) < 1.5  # mm
        assert lesion.volume_ml == pytest.approx(nodule.volume_ml, rel=0.1)
        assert lesion.values["long_axis"] == pytest.approx(2 * nodule.radius_mm, abs=2.0)  # 1.4 mm pixels
        assert lesion.probability is not None and lesion.probability > 0.9
    assert matched == {1, 2, 3}
