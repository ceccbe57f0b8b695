"""Sliding-window stitching: the same values as MONAI's ``sliding_window_inference`` on the padded image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers.utils import sliding_window_inference
from tiny_models import CODE, make_volume, torchscript_package

from gateway.infer.runtime import InferenceRuntime

UNITS = {"value": "1", "scheme": "UCUM", "meaning": "no units"}
PAD = -1024.0


class PatchRamp(torch.nn.Module):
    """The input plus a ramp over the patch's own voxel indices (integers: exact in float32), so each voxel's
    value depends on where it sits in its patch and overlapping patches disagree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, r, c = x.shape[2:]
        ramp = (
            torch.arange(s).reshape(s, 1, 1) * 10000.0
            + torch.arange(r).reshape(1, r, 1) * 100.0
            + torch.arange(c).reshape(1, 1, c)
        )
        return torch.cat([x + ramp, x - ramp], dim=1)


@pytest.fixture
def runtime() -> Iterator[InferenceRuntime]:
    rt = InferenceRuntime("cpu")
    yield rt
    rt.close()


def reference(array: np.ndarray, patch: tuple[int, int, int], batch_size: int) -> np.ndarray:
    """MONAI's own stitching of the whole image, padded to the patch where smaller."""
    with torch.inference_mode():
        result = sliding_window_inference(
            torch.from_numpy(array[None, None]),
            roi_size=patch,
            sw_batch_size=batch_size,
            predictor=PatchRamp(),
            overlap=0.25,
            mode="gaussian",
            padding_mode="constant",
            cval=PAD,
        )
    assert isinstance(result, torch.Tensor)
    return result[0].numpy()


@pytest.mark.parametrize(
    ("shape", "patch"),
    [
        ((20, 10, 13), (8, 16, 16)),  # smaller than the patch in plane (padded), overlapping along the slices
        ((5, 30, 9), (8, 12, 16)),  # smaller along the slices and the columns, overlapping along the rows
        ((17, 19, 21), (8, 8, 8)),  # larger everywhere: nothing padded
        ((8, 16, 16), (8, 16, 16)),  # exactly one patch
    ],
)
def test_stitching_matches_monai(
    tmp_path: Path, runtime: InferenceRuntime, shape: tuple[int, int, int], patch: tuple[int, int, int]
) -> None:
    manifest = torchscript_package(
        tmp_path,
        PatchRamp(),
        preprocess={"orientation": None, "intensity": {"mode": "none"}, "pad_value": PAD},
        inference={"patch_size": list(patch), "batch_size": 3, "overlap": 0.25},
        outputs={
            "parametric_maps": [
                {"name": "up", "channel": 0, "quantity": CODE, "units": UNITS},
                {"name": "down", "channel": 1, "quantity": CODE, "units": UNITS},
            ]
        },
    )
    array = np.random.default_rng(7).integers(-1000, 1000, size=shape).astype(np.float32)
    result = runtime.run(manifest, tmp_path, "a" * 64, make_volume(array))
    expected = reference(array, patch, 3)
    np.testing.assert_array_equal(result.maps["up"], expected[0])
    np.testing.assert_array_equal(result.maps["down"], expected[1])
