"""Synthetic phantoms for ct-nodule-unet, and the grid arithmetic that training and evaluation share.

A phantom is rendered with :mod:`gateway.synth.ct` on a "scanner" grid (``VolumeGeometry``: centred on the origin,
slices running towards the feet, so already in the model's ``IPL`` orientation). The model grid is what the
gateway's preprocessing makes of it (:mod:`gateway.infer.preprocess`): the same extent cut into
``round(n * spacing / target)`` voxels per axis, resampled trilinearly with ``align_corners=False``, then the HU
window mapped to [0, 1]. All settings come from ``model.yaml``, so the scripts and the gateway cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from gateway.registry.manifest import Manifest, load_manifest
from gateway.synth.ct import Nodule, VolumeGeometry, nodule_mask, phantom_hu, place_nodules, rng_streams

MODEL_DIR = Path(__file__).resolve().parent
Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]
FloatArray = npt.NDArray[np.float32]


def manifest() -> Manifest:
    """The model's manifest (preprocessing and inference settings)."""
    return load_manifest(MODEL_DIR)


def target_spacing(m: Manifest) -> Spacing:
    """The model grid's voxel size from the manifest (all three axes are resampled)."""
    spacing = m.preprocess.spacing_mm
    if spacing is None or any(s is None for s in spacing):
        raise ValueError("ct-nodule-unet resamples all three axes: spacing_mm needs three numbers")
    return (float(spacing[0] or 0.0), float(spacing[1] or 0.0), float(spacing[2] or 0.0))


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom on its scanner grid: HU, truth mask, voxel size (slice, row, column), nodules."""

    hu: FloatArray
    truth: npt.NDArray[np.bool_]
    spacing: Spacing
    nodules: tuple[Nodule, ...]

    @property
    def geometry(self) -> VolumeGeometry:
        """The scanner grid."""
        s, r, c = self.hu.shape
        return VolumeGeometry((s, r, c), (self.spacing[1], self.spacing[2]), self.spacing[0])


def make_phantom(seed: int, shape: Shape, pixel_spacing: float, slice_spacing: float, n_nodules: int) -> Phantom:
    """Render phantom ``seed``: the same nodules and noise as ``write_synthetic_ct`` with these parameters."""
    geometry = VolumeGeometry(shape, (pixel_spacing, pixel_spacing), slice_spacing)
    placement, noise = rng_streams(seed)
    nodules = place_nodules(geometry, n_nodules, placement)
    hu = phantom_hu(shape, pixel_spacing, slice_spacing, nodules, noise)
    truth = nodule_mask(shape, pixel_spacing, slice_spacing, nodules)
    return Phantom(hu, truth, (slice_spacing, pixel_spacing, pixel_spacing), nodules)


def model_grid(shape: Shape, spacing: Spacing, target: Spacing) -> tuple[Shape, Spacing]:
    """The model grid for a volume: its shape, and its exact voxel size (the extent is kept)."""
    sizes = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]
    exact = [n * s / m for n, s, m in zip(shape, spacing, sizes, strict=True)]
    return (sizes[0], sizes[1], sizes[2]), (exact[0], exact[1], exact[2])


def resize(array: npt.NDArray[np.floating], shape: Shape) -> FloatArray:
    """Trilinear, extent-preserving resize (``align_corners=False``), as the gateway resamples."""
    if tuple(array.shape) == shape:
        return np.asarray(array, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    with torch.inference_mode():
        out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return np.ascontiguousarray(out[0, 0].numpy())


def window(hu: FloatArray, m: Manifest) -> FloatArray:
    """The manifest's intensity window, mapped to [0, 1] and clipped."""
    window_hu = m.preprocess.intensity.window
    if window_hu is None:
        raise ValueError("ct-nodule-unet needs an intensity window in model.yaml")
    low, high = window_hu
    mapped: FloatArray = np.clip((hu - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    return mapped


def occupancy(shape: Shape, spacing: Spacing, nodules: Sequence[Nodule], samples: int = 4) -> FloatArray:
    """Fraction of each voxel of a centred grid that lies inside a nodule (``samples``\\ :sup:`3` points a voxel).

    Used as a soft training target: its 0.5 level is the sphere's surface to within a fraction of a voxel, so the
    network's probabilities, resampled back to a finer grid, put the surface where the truth has it.
    """
    geometry = VolumeGeometry(shape, (spacing[1], spacing[2]), spacing[0])
    xs, ys = geometry.x_mm(), geometry.y_mm()
    zs = np.array([geometry.z_mm(k) for k in range(shape[0])])
    out = np.zeros(shape, dtype=np.float32)
    sub = (np.arange(samples) + 0.5) / samples - 0.5
    for nodule in nodules:
        (x0, x1), (y0, y1), (z0, z1) = (
            _box(axis, centre, nodule.radius_mm, step) for axis, centre, step in _axes(xs, ys, zs, nodule, spacing)
        )
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        z = (zs[z0:z1, None] - sub[None, :] * spacing[0]).reshape(-1, 1, 1)
        y = (ys[y0:y1, None] + sub[None, :] * spacing[1]).reshape(1, -1, 1)
        x = (xs[x0:x1, None] + sub[None, :] * spacing[2]).reshape(1, 1, -1)
        cx, cy, cz = nodule.center_mm
        inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= nodule.radius_mm**2
        shape_sub = (z1 - z0, samples, y1 - y0, samples, x1 - x0, samples)
        fraction = inside.reshape(shape_sub).mean(axis=(1, 3, 5), dtype=np.float32)
        np.maximum(out[z0:z1, y0:y1, x0:x1], fraction, out=out[z0:z1, y0:y1, x0:x1])
    return out


def _axes(
    xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64], zs: npt.NDArray[np.float64], n: Nodule, sp: Spacing
) -> list[tuple[npt.NDArray[np.float64], float, float]]:
    return [(xs, n.center_mm[0], sp[2]), (ys, n.center_mm[1], sp[1]), (zs, n.center_mm[2], sp[0])]


def _box(axis: npt.NDArray[np.float64], centre: float, radius: float, step: float) -> tuple[int, int]:
    """Index range of the voxels along ``axis`` (monotonic centres) whose extent may touch ``centre +- radius``."""
    near = np.nonzero(np.abs(axis - centre) <= radius + step)[0]
    if near.size == 0:
        return 0, 0
    return int(near.min()), int(near.max()) + 1


def dice(prediction: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def nodule_index(nodule: Nodule, shape: Shape, spacing: Spacing) -> tuple[float, float, float]:
    """A nodule centre as (slice, row, column) indices of a centred grid."""
    cx, cy, cz = nodule.center_mm
    s, r, c = shape
    return ((s - 1) / 2.0 - cz / spacing[0], cy / spacing[1] + (r - 1) / 2.0, cx / spacing[2] + (c - 1) / 2.0)


def radius_voxels(nodule: Nodule, spacing: Spacing) -> float:
    """The nodule's radius in voxels of the coarsest axis."""
    return nodule.radius_mm / min(spacing) if min(spacing) > 0 else math.inf
