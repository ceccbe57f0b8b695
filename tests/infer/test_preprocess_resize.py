"""Resampling and activations in numpy give what PyTorch gives (issue 12: ONNX-only jobs do not load torch).

``_resize_numpy`` stands in for ``torch.nn.functional.interpolate`` (``trilinear``, ``align_corners=False``, and
``nearest-exact``), ``_activate`` for torch's softmax and sigmoid over the channel axis. torch is the reference
here, so these tests skip where it is not installed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from gateway.infer.postprocess import _activate
from gateway.infer.preprocess import Mode, Shape, _resize, _resize_numpy

torch = pytest.importorskip("torch")
F = pytest.importorskip("torch.nn.functional")

#: Odd shapes, up- and down-sampling, mixed per axis, a factor of exactly 2, and a single-voxel axis.
CASES = [
    ((7, 11, 13), (13, 5, 20)),
    ((9, 16, 15), (4, 31, 7)),
    ((5, 6, 7), (10, 12, 14)),
    ((12, 10, 8), (6, 5, 4)),
    ((1, 9, 10), (3, 9, 4)),
    ((17, 3, 29), (17, 8, 11)),
]


def _torch_resize(array: npt.NDArray[np.float32], shape: Shape, mode: Mode) -> npt.NDArray[np.float32]:
    tensor = torch.from_numpy(array)[None, None]
    with torch.inference_mode():
        if mode == "linear":
            out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
        else:
            out = F.interpolate(tensor, size=shape, mode="nearest-exact")
    result: npt.NDArray[np.float32] = out[0, 0].numpy()
    return result


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize(("old", "new"), CASES, ids=lambda s: "x".join(map(str, s)))
def test_resize_matches_torch(old: Shape, new: Shape, mode: Mode) -> None:
    array = np.random.default_rng(0).normal(100.0, 400.0, old).astype(np.float32)
    ours, theirs = _resize_numpy(array, new, mode), _torch_resize(array, new, mode)
    assert ours.shape == new and ours.dtype == np.float32
    if mode == "nearest":
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(np.abs(array).max()))


def test_nearest_resize_of_labels_keeps_label_values() -> None:
    labels = np.random.default_rng(1).integers(0, 4, (11, 14, 9)).astype(np.float32)
    resized = _resize_numpy(labels, (23, 5, 18), "nearest")
    assert set(np.unique(resized)) <= {0.0, 1.0, 2.0, 3.0}
    np.testing.assert_array_equal(resized, _torch_resize(labels, (23, 5, 18), "nearest"))


def test_resize_across_slabs_matches_torch() -> None:
    """More output slices than one slab, from an integer input (converted to float32 on the way)."""
    array = np.random.default_rng(2).integers(-1024, 3000, (21, 12, 10)).astype(np.int16)
    ours = _resize_numpy(array, (37, 9, 13), "linear")
    theirs = _torch_resize(array.astype(np.float32), (37, 9, 13), "linear")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * 3000)


def _torch_activate(output: npt.NDArray[np.float32], activation: str) -> npt.NDArray[np.float32]:
    tensor = torch.from_numpy(output.copy())
    with torch.inference_mode():
        result = torch.softmax(tensor, dim=0) if activation == "softmax" else torch.sigmoid(tensor)
    out: npt.NDArray[np.float32] = result.numpy()
    return out


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_activate_matches_torch(activation: str) -> None:
    output = np.random.default_rng(3).normal(0.0, 30.0, (3, 5, 7, 9)).astype(np.float32)
    output[0, 0, 0, :3] = [-1e4, 1e4, 0.0]  # saturating values: no overflow warning (warnings are errors here)
    expected = _torch_activate(output, activation)
    read_only = output.copy()
    read_only.flags.writeable = False
    np.testing.assert_allclose(_activate(read_only, activation), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read_only, output)  # a read-only output is left as it was
    in_place = output.copy()
    assert _activate(in_place, activation) is in_place
    np.testing.assert_allclose(in_place, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resize_uses_torch_once_loaded_with_the_same_values(mode: Mode) -> None:
    """With torch in the process (it is, here), ``_resize`` takes torch's multi-threaded path; both paths agree."""
    array = np.random.default_rng(3).normal(0, 300, (11, 17, 29)).astype(np.float32)
    via_torch = _resize(array, (7, 30, 19), mode)
    np.testing.assert_array_equal(via_torch, _torch_resize(array, (7, 30, 19), mode))
    np.testing.assert_allclose(_resize_numpy(array, (7, 30, 19), mode), via_torch, rtol=1e-5, atol=1e-5 * 300 * 6)


def test_in_plane_resize_equals_trilinear() -> None:
    """Where the slices stay, torch's path resamples each slice bilinearly: trilinear's values up to rounding."""
    array = np.random.default_rng(5).normal(0, 300, (6, 41, 23)).astype(np.float32)
    ours, theirs = _resize(array, (6, 64, 17), "linear"), _torch_resize(array, (6, 64, 17), "linear")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * 300 * 6)
