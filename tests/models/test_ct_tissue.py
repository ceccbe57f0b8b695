"""models/ct-tissue: the rule model against the phantom's tissue truth, ONNX against torch, and real CT slices."""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pydicom
import pytest
import torch

from gateway.synth.ct import SliceRenderer, Tissue, VolumeGeometry, nodule_mask, phantom_hu, place_nodules, rng_streams

from model_scripts import MODELS, load_script

PIXEL = 360.0 / 512
SLICE = 2.5


@pytest.fixture(scope="module")
def build() -> ModuleType:
    return load_script("ct-tissue", "build")


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / "ct-tissue" / "model.onnx"), providers=["CPUExecutionProvider"])


def onnx_run(session: ort.InferenceSession, hu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = session.run(["tissue"], {"hu": hu})[0]
    return out


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def phantom_truth(
    shape: tuple[int, int, int], seed: int, n_nodules: int
) -> tuple[npt.NDArray[np.float32], dict[str, np.ndarray]]:
    """A phantom's HU (with nodules) and the tissue truth per channel name."""
    geometry = VolumeGeometry(shape, (PIXEL, PIXEL), SLICE)
    placement, noise = rng_streams(seed)
    nodules = place_nodules(geometry, n_nodules, placement)
    hu = phantom_hu(shape, PIXEL, SLICE, nodules, noise)
    renderer = SliceRenderer(geometry)
    labels = np.stack([renderer.labels(k) for k in range(shape[0])])
    nodule = nodule_mask(shape, PIXEL, SLICE, nodules)
    soft = np.isin(labels, [Tissue.SOFT, Tissue.HEART, Tissue.AORTA, Tissue.CSF]) | nodule
    truth = {
        "body": labels != Tissue.AIR,
        "air": (labels == Tissue.LUNG) & ~nodule,
        "fat": labels == Tissue.FAT,
        "soft_tissue": soft,
        "bone": labels == Tissue.BONE,
    }
    return hu, truth


def test_channels_match_the_phantom_tissues(build: ModuleType, session: ort.InferenceSession) -> None:
    hu, truth = phantom_truth((6, 512, 512), seed=7, n_nodules=2)
    out = onnx_run(session, hu[None, None])[0]
    assert out.shape == (5, *hu.shape)
    assert set(np.unique(out)) <= {0.0, 1.0}
    for index, name in enumerate(build.CHANNELS):
        assert truth[name].any(), name
        assert dice(out[index] > 0.5, truth[name]) > 0.9, name


def test_nothing_outside_the_body(session: ort.InferenceSession) -> None:
    hu, truth = phantom_truth((2, 512, 512), seed=8, n_nodules=0)
    out = onnx_run(session, hu[None, None])[0]
    outside = ~(out[0] > 0.5)
    assert not out[1:, outside].any()
    assert not (out[0] > 0.5)[~truth["body"]].any()  # air around the patient stays outside


@pytest.mark.parametrize("shape", [(1, 1, 1, 64, 80), (2, 1, 5, 100, 90), (3, 1, 7, 128, 96)])
def test_onnx_equals_the_torch_module(build: ModuleType, session: ort.InferenceSession, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    hu = rng.normal(-700.0, 300.0, shape).astype(np.float32)
    hu[..., 10:50, 20:60] = rng.normal(40.0, 20.0, (*shape[:3], 40, 40))
    hu[..., 25:35, 30:40] = -900.0  # a hole to fill
    hu[..., 28:31, 70:] = 800.0  # a thin bar to drop
    expected = build.CTTissue()(torch.from_numpy(hu)).numpy()
    got = onnx_run(session, hu)
    assert got.shape == expected.shape == (shape[0], 5, *shape[2:])
    assert np.mean(got != expected) < 1e-5  # a smoothed value may fall on a threshold differently, nothing more


def test_the_fill_closes_holes_but_not_gaps_open_on_one_axis(build: ModuleType) -> None:
    hu = np.full((1, 1, 1, 200, 200), -1000.0, dtype=np.float32)
    hu[..., 40:160, 30:90] = 40.0  # trunk with a lung
    hu[..., 70:130, 45:75] = -850.0
    hu[..., 40:160, 110:170] = 40.0  # an arm, with air between it and the trunk (open above and below)
    out = build.CTTissue()(torch.from_numpy(hu)).numpy()[0, :, 0]
    assert out[0, 100, 60] == 1.0 and out[1, 100, 60] == 1.0  # the lung is inside, and air
    assert out[0, 100, 100] == 0.0  # between trunk and arm: outside
    assert out[0, 100, 140] == 1.0 and out[3, 100, 140] == 1.0  # the arm is body, soft tissue


def test_a_separate_thin_object_is_not_body(build: ModuleType) -> None:
    hu = np.full((1, 1, 1, 256, 256), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:256, :256]
    hu[..., (yy - 110) ** 2 / 80**2 + (xx - 128) ** 2 / 100**2 <= 1] = 40.0
    hu[..., 200:206, 20:236] = 300.0  # a table top, 6 pixels thick, below the patient
    out = build.CTTissue()(torch.from_numpy(hu)).numpy()[0, :, 0]
    assert out[0, 203, 128] == 0.0 and out[4, 203, 128] == 0.0
    assert out[0, 110, 128] == 1.0


def _real_ct(name: str) -> npt.NDArray[np.float32]:
    """One real CT slice from pydicom's (or pydicom-data's) test files, in HU; skips when absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = pydicom.data.get_testdata_file(name)
        except Exception:  # a download attempt that failed
            path = None
    if path is None:
        pytest.skip(f"{name} not available (pip install pydicom-data)")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu


def test_real_head_ct_drops_the_head_holder(session: ort.InferenceSession) -> None:
    hu = _real_ct("693_UNCR.dcm")  # axial head CT in a head holder, -3024 outside the reconstruction circle
    out = onnx_run(session, hu[None, None, None])[0, :, 0] > 0.5
    body = out[0]
    assert 0.2 < body.mean() < 0.5
    columns = np.nonzero(body.any(axis=0))[0]
    assert columns.min() > 80 and columns.max() < 430  # the holder's side walls (near the edges) are outside
    bone = out[4]
    assert bone.sum() > 0.03 * body.sum()  # the skull
    soft = out[3]
    assert soft.sum() > 0.5 * body.sum()  # the brain


def test_real_abdominal_ct_finds_fat_and_bowel_gas(session: ort.InferenceSession) -> None:
    hu = _real_ct("explicit_VR-UN.dcm")  # axial abdominal CT, the table's arc in rows 31-100
    out = onnx_run(session, hu[None, None, None])[0, :, 0] > 0.5
    body = out[0]
    assert 0.15 < body.mean() < 0.5
    assert not body[:100].any()  # the table is not body
    assert out[1].sum() > 100  # bowel gas
    assert out[2].sum() > 0.1 * body.sum()  # subcutaneous and visceral fat
    assert not out[1:, ~body].any()
