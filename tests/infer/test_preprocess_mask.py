"""``restore_mask``: a probability channel restored and thresholded slab by slab gives exactly the mask and the
maximum of the whole restored channel (issue 12: no full-size float32 channel per mask)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch  # loaded: the torch path of the resize (bilinear per slab where the slices stay)
from test_imports import loaded_after
from tiny_models import make_volume, manifest_dict

from gateway.infer.preprocess import Prepared, prepare, restore_channel, restore_mask
from gateway.registry.manifest import manifest_from_data

assert torch is not None

OBLIQUE = np.array([[0, 0, -0.7, 40], [0, 0.9, 0, -10], [2.0, 0, 0, 10], [0, 0, 0, 1]], dtype=np.float64)

#: (volume shape, affine, preprocess): in-plane resampling (slices stay), resampling of the slices too,
#: reorientation with flips, a centre crop and pad, and nothing at all (restoring is the identity).
CASES: list[tuple[tuple[int, int, int], np.ndarray | None, dict[str, Any]]] = [
    ((12, 40, 44), None, {"orientation": None, "spacing_mm": [None, 1.4, 0.6]}),
    ((12, 40, 44), None, {"orientation": None, "spacing_mm": [0.7, 1.4, 1.0]}),
    ((9, 21, 30), OBLIQUE, {"orientation": "RAS", "spacing_mm": [1.0, 1.0, 1.0]}),
    ((10, 20, 22), None, {"orientation": None, "spacing_mm": [None, 0.5, 0.5], "spatial_size": [8, 48, 30]}),
    ((10, 20, 22), None, {"orientation": None}),
]


def prepared_for(shape: tuple[int, int, int], affine: np.ndarray | None, preprocess: dict[str, Any]) -> Prepared:
    data = manifest_dict("onnx", "model.onnx", preprocess={"intensity": {"mode": "none"}, **preprocess})
    manifest = manifest_from_data(data, "test")
    return prepare(make_volume(np.zeros(shape, np.float32), affine), manifest)


def probabilities(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """0, 1 and steps of 1/4: many restored voxels land exactly on a threshold of 0.5."""
    return (np.random.default_rng(seed).integers(0, 5, shape) / 4).astype(np.float32)


@pytest.mark.parametrize(("shape", "affine", "preprocess"), CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_mask_and_maximum_match_the_restored_channel(
    shape: tuple[int, int, int], affine: np.ndarray | None, preprocess: dict[str, Any], threshold: float
) -> None:
    prepared = prepared_for(shape, affine, preprocess)
    channel = probabilities(prepared.model_shape, seed=len(shape) + shape[0])
    restored = restore_channel(channel, prepared)
    mask, highest = restore_mask(channel, prepared, threshold)
    assert mask.shape == prepared.source_shape and mask.dtype == np.bool_ and mask.flags.c_contiguous
    np.testing.assert_array_equal(mask, restored >= threshold)
    assert highest == float(restored.max())
    assert np.any(restored == threshold) or threshold != 0.5  # the exact-threshold voxels were tested


def test_numpy_path_matches_without_torch() -> None:
    """An ONNX job without torch restores masks with the numpy resize: the same mask as its restored channel."""
    manifests = [
        manifest_dict("onnx", "model.onnx", preprocess={"orientation": None, "spacing_mm": spacing})
        for spacing in ([None, 1.4, 0.6], [0.7, 1.4, 1.0])
    ]
    code = f"""
import json
import numpy as np
from gateway.assemble.model import SliceRef, Volume
from gateway.infer.preprocess import prepare, restore_channel, restore_mask
from gateway.registry.manifest import manifest_from_data
for data in json.loads({json.dumps(manifests)!r}):
    affine = np.array([[0, 0, 1, -10], [0, 1, 0, -10], [-1, 0, 0, 10], [0, 0, 0, 1]], dtype=np.float64)
    volume = Volume(array=np.zeros((12, 40, 44), np.float32), affine=affine,
        slices=tuple(SliceRef(f"1.2.3.{{i + 1}}") for i in range(12)), series_instance_uid="1.2.3",
        study_instance_uid="1.2", frame_of_reference_uid="1.2.4", modality="CT")
    prepared = prepare(volume, manifest_from_data(data, "test"))
    channel = (np.random.default_rng(1).integers(0, 5, prepared.model_shape) / 4).astype(np.float32)
    restored = restore_channel(channel, prepared)
    mask, highest = restore_mask(channel, prepared, 0.5)
    assert np.array_equal(mask, restored >= 0.5) and highest == float(restored.max())
"""
    assert loaded_after(code, ("torch",)) == []
