"""models/ct-nodule-unet: TorchScript and ONNX agree, and the evaluation script's Dice on unseen phantoms."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch

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
