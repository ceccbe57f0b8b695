"""prepare/restore: orientation, resampling, intensity, crop/pad, diffusion channels, and their exact inverse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import make_volume, manifest_dict

from gateway.errors import InferenceError
from gateway.infer.preprocess import axis_codes, prepare, restore
from gateway.registry.manifest import Manifest


def manifest(tmp_path: Path | None = None, **preprocess: Any) -> Manifest:
    extra: dict[str, Any] = {"preprocess": preprocess}
    return Manifest.model_validate(manifest_dict("onnx", "model.onnx", **extra))


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def affine_from(columns: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray) -> np.ndarray:
    """Affine with unit direction ``columns`` (slice, row, column) scaled by ``spacing``."""
    affine = np.eye(4)
    affine[:3, :3] = columns * np.array(spacing)
    affine[:3, 3] = origin
    return affine


AXIAL = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], dtype=float)  # slice -> I, row -> P, column -> L
SAGITTAL = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)  # slice -> L, row -> I, column -> P
OBLIQUE = rotation(np.array([1.0, 0.5, 0.2]), 25) @ AXIAL


def patient_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    index = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:4]).T.reshape(*shape, 3)


def blob(shape: tuple[int, int, int], affine: np.ndarray, centre: np.ndarray, sigma: float) -> np.ndarray:
    distance2 = np.sum((patient_points(shape, affine) - centre) ** 2, axis=-1)
    return np.exp(-distance2 / (2 * sigma**2)).astype(np.float32)


def centroid_mm(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    weights = np.where(array > 0.5 * array.max(), array, 0.0)
    index = np.array([np.sum(w * weights) for w in np.indices(array.shape)]) / weights.sum()
    return affine[:3, :3] @ index + affine[:3, 3]


def test_axis_codes() -> None:
    origin = np.zeros(3)
    assert axis_codes(affine_from(AXIAL, (2, 1, 1), origin)) == "IPL"
    assert axis_codes(affine_from(SAGITTAL, (1, 1, 1), origin)) == "LIP"
    assert axis_codes(affine_from(-AXIAL, (1, 1, 1), origin)) == "SAR"
    assert axis_codes(affine_from(OBLIQUE, (1, 1, 1), origin)) == "IPL"  # 25 degrees off: still nearest IPL


def test_nothing_to_do_is_exactly_the_identity() -> None:
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    volume = make_volume(array)
    prepared = prepare(volume, manifest(orientation="IPL", spacing_mm=[1.0, 1.0, 1.0]))
    assert prepared.notes == ()
    np.testing.assert_array_equal(prepared.array[0], array)
    np.testing.assert_array_equal(prepared.affine, volume.affine)
    np.testing.assert_array_equal(restore(prepared.array, prepared), array[None])
    np.testing.assert_array_equal(restore(prepared.array, prepared, mode="nearest"), array[None])


@pytest.mark.parametrize(
    ("columns", "spacing", "codes"),
    [(SAGITTAL, (1.2, 0.9, 0.8), "LIP"), (OBLIQUE, (2.5, 0.8, 0.9), "IPL"), (-OBLIQUE, (2.0, 1.0, 0.7), "SAR")],
    ids=["sagittal", "oblique", "oblique-reversed"],
)
def test_a_blob_stays_where_it_is_in_patient_space(columns: np.ndarray, spacing: Any, codes: str) -> None:
    shape = (30, 36, 40)
    affine = affine_from(columns, spacing, np.array([-20.0, -15.0, 30.0]))
    centre = affine[:3, :3] @ (np.array(shape) * [0.45, 0.55, 0.5]) + affine[:3, 3]
    volume = make_volume(blob(shape, affine, centre, sigma=4.0), affine)
    assert axis_codes(affine) == codes
    first = prepare(volume, manifest(orientation="IPL", spacing_mm=[1.5, 1.5, 1.5]))
    crop = tuple(n - 6 if i != 1 else n + 5 for i, n in enumerate(first.model_shape))  # crop two axes, pad one
    prepared = prepare(volume, manifest(orientation="IPL", spacing_mm=[1.5, 1.5, 1.5], spatial_size=list(crop)))
    assert axis_codes(prepared.affine) == "IPL"
    np.testing.assert_allclose(prepared.spacing, (1.5, 1.5, 1.5), rtol=0.05)
    assert any("resampled" in note for note in prepared.notes) and any("cropped" in note for note in prepared.notes)
    # the model sees the blob where it is in patient space ...
    np.testing.assert_allclose(centroid_mm(prepared.array[0], prepared.affine), centre, atol=0.3)
    # ... and its output comes back to the same place, with the same values
    restored = restore(prepared.array, prepared)[0]
    assert restored.shape == shape
    np.testing.assert_allclose(centroid_mm(restored, affine), centre, atol=0.3)
    np.testing.assert_allclose(restored, volume.array, atol=0.1)  # two linear interpolations blur the peak a little


def test_a_resampled_sphere_keeps_its_centre_and_volume() -> None:
    shape, spacing = (24, 64, 64), (3.0, 0.7, 0.7)
    affine = affine_from(AXIAL, spacing, np.array([-22.0, -22.0, 30.0]))
    centre = affine[:3, :3] @ np.array([11.3, 30.2, 33.7]) + affine[:3, 3]
    radius = 9.0
    inside = np.sum((patient_points(shape, affine) - centre) ** 2, axis=-1) <= radius**2
    volume = make_volume(inside.astype(np.float32), affine)
    prepared = prepare(volume, manifest(spacing_mm=[1.25, 1.25, 1.25]))
    assert prepared.model_shape == (58, 36, 36)
    model_mask = prepared.array[0] > 0.5  # what a segmentation model would say on its own grid
    restored = restore(model_mask[None].astype(np.float32), prepared)[0] > 0.5
    voxel_ml = np.prod(spacing) / 1000
    true_ml = 4 / 3 * np.pi * radius**3 / 1000
    assert restored.sum() * voxel_ml == pytest.approx(true_ml, rel=0.05)
    assert restored.sum() == pytest.approx(inside.sum(), rel=0.03)
    np.testing.assert_allclose(centroid_mm(restored.astype(np.float32), affine), centre, atol=0.3)


def test_nearest_restore_keeps_label_values() -> None:
    labels = np.zeros((10, 20, 20), dtype=np.float32)
    labels[3:7, 5:10, 5:10] = 1
    labels[3:7, 12:18, 12:18] = 7
    prepared = prepare(make_volume(labels), manifest(spacing_mm=[0.7, 1.3, 1.7]))
    model = np.select([prepared.array > 4, prepared.array > 0.5], [7.0, 1.0], 0.0)  # a model's label values
    restored = restore(model.astype(np.float32), prepared, mode="nearest")[0]
    assert set(np.unique(restored)) == {0.0, 1.0, 7.0}
    assert np.mean(restored == labels) > 0.97


def test_crop_and_pad_are_centred_and_undone() -> None:
    array = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8) + 1
    prepared = prepare(make_volume(array), manifest(spatial_size=[4, 10, None], pad_value=-5))
    assert prepared.model_shape == (4, 10, 8)
    assert prepared.offset == (1, -2, 0)
    np.testing.assert_array_equal(prepared.array[0, :, 2:9], array[1:5])
    assert np.all(prepared.array[0, :, :2] == -5) and np.all(prepared.array[0, :, 9:] == -5)
    restored = restore(prepared.array, prepared)[0]
    np.testing.assert_array_equal(restored[1:5], array[1:5])
    assert np.all(restored[[0, 5]] == 0)  # cropped away: the model did not see it
    # the model grid's affine says where each model voxel is
    np.testing.assert_allclose(prepared.affine @ [0, 2, 0, 1], make_volume(array).affine @ [1, 0, 0, 1])


def test_window_and_pad_value_in_input_units() -> None:
    array = np.array([-2000, -1000, 0, 400, 1000, 3000], dtype=np.float32).reshape(1, 1, 6)
    prepared = prepare(
        make_volume(array),
        manifest(intensity={"mode": "window", "window": [-1000, 1000]}, spatial_size=[1, 1, 8], pad_value=-1024),
    )
    np.testing.assert_allclose(prepared.array[0, 0, 0], [0, 0, 0, 0.5, 0.7, 1, 1, 0])


def test_zscore_over_nonzero_voxels_leaves_zeros() -> None:
    rng = np.random.default_rng(3)
    array = np.zeros((4, 10, 10), dtype=np.float32)
    array[:, 2:8, 2:8] = rng.normal(300, 40, size=(4, 6, 6))
    prepared = prepare(make_volume(array), manifest(intensity={"mode": "zscore", "nonzero": True}))
    inside = prepared.array[0][array != 0]
    assert inside.mean() == pytest.approx(0, abs=1e-5) and inside.std() == pytest.approx(1, abs=1e-4)
    assert np.all(prepared.array[0][array == 0] == 0)
    whole = prepare(make_volume(array), manifest(intensity={"mode": "zscore"})).array[0]
    assert whole.mean() == pytest.approx(0, abs=1e-5) and whole.std() == pytest.approx(1, abs=1e-4)


def diffusion_manifest() -> Manifest:
    data = manifest_dict("onnx", "model.onnx", select={"diffusion": True}, inference={"input_channels": 3})
    return Manifest.model_validate(data)


def test_diffusion_channels_are_b_values_averaged_over_directions() -> None:
    rng = np.random.default_rng(4)
    array = rng.random((5, 3, 4, 4), dtype=np.float32)
    dimension_4 = (
        ("Diffusion", (0.0, None)),
        ("Diffusion", (1000.0, (1.0, 0.0, 0.0))),
        ("Diffusion", (500.0, (1.0, 0.0, 0.0))),
        ("Diffusion", (1000.0, (0.0, 1.0, 0.0))),
        ("Diffusion", (500.0, (0.0, 1.0, 0.0))),
    )
    prepared = prepare(make_volume(array, modality="MR", dimension_4=dimension_4), diffusion_manifest())
    np.testing.assert_array_equal(prepared.b_values, np.array([0, 500, 1000], dtype=np.float32))
    assert prepared.b_values is not None and prepared.b_values.dtype == np.float32
    np.testing.assert_array_equal(prepared.array[0], array[0])
    np.testing.assert_allclose(prepared.array[1], (array[2] + array[4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(prepared.array[2], (array[1] + array[3]) / 2, rtol=1e-6)
    assert "3 b-values (0, 500, 1000 s/mm2)" in prepared.notes[0]


def test_channel_mismatches_are_inference_errors() -> None:
    with pytest.raises(InferenceError, match="4D diffusion volume"):
        prepare(make_volume(np.zeros((2, 3, 4), np.float32)), diffusion_manifest())
    echoes = make_volume(np.zeros((2, 2, 3, 4), np.float32), dimension_4=(("EchoTime", 10.0), ("EchoTime", 20.0)))
    with pytest.raises(InferenceError, match="varies by EchoTime"):
        prepare(echoes, diffusion_manifest())
    with pytest.raises(InferenceError, match="takes 1 input channel"):
        prepare(echoes, manifest())
