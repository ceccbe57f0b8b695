"""Random placement of non-overlapping spherical nodules inside the phantom's lungs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np

from gateway.synth._phantom import _LUNGS, FloatArray, Nodule, Tissue, VolumeGeometry, tissue_labels

__all__ = ["place_nodules"]

_PLACEMENT_MARGIN_MM: Final = 2.0
_NODULE_GAP_MM: Final = 2.0


def _fibonacci_directions(n: int) -> FloatArray:
    i = np.arange(n, dtype=np.float64) + 0.5
    polar, azimuth = np.arccos(1.0 - 2.0 * i / n), math.pi * (1.0 + math.sqrt(5.0)) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)


_DIRECTIONS: Final = _fibonacci_directions(96)


def _fits(nodule: Nodule, geom: VolumeGeometry, placed: Sequence[Nodule]) -> bool:
    """Whether a nodule lies in lung with margin, inside the volume, and clear of other nodules."""
    centre, r = np.asarray(nodule.center_mm), nodule.radius_mm
    z_lo, z_hi = geom.z_mm(geom.shape[0] - 1), geom.z_mm(0)
    x_hi, y_hi = float(geom.x_mm()[-1]), float(geom.y_mm()[-1])
    inside = z_lo <= centre[2] - r and centre[2] + r <= z_hi
    inside = inside and abs(centre[0]) + r <= x_hi and abs(centre[1]) + r <= y_hi
    if not inside:
        return False
    for other in placed:
        if math.dist(nodule.center_mm, other.center_mm) < r + other.radius_mm + _NODULE_GAP_MM:
            return False
    points = np.vstack([centre, centre + (r + _PLACEMENT_MARGIN_MM) * _DIRECTIONS])
    return bool(np.all(tissue_labels(points[:, 0], points[:, 1], points[:, 2]) == Tissue.LUNG))


def _candidate(
    geom: VolumeGeometry,
    rng: np.random.Generator,
    radius_range_mm: tuple[float, float],
    hu_range: tuple[float, float],
) -> Nodule:
    (cx, cy, cz), (a, b, c) = _LUNGS[int(rng.integers(len(_LUNGS)))]
    z_lo, z_hi = geom.z_mm(geom.shape[0] - 1), geom.z_mm(0)
    x, y = rng.uniform(cx - a, cx + a), rng.uniform(cy - b, cy + b)
    z = rng.uniform(max(cz - c, z_lo), min(cz + c, z_hi)) if z_lo < z_hi else z_lo
    radius = round(float(rng.uniform(*radius_range_mm)), 2)
    centre = (round(float(x), 2), round(float(y), 2), round(float(z), 2))
    return Nodule(centre, radius, round(float(rng.uniform(*hu_range)), 1))


def place_nodules(
    geometry: VolumeGeometry,
    n: int,
    rng: np.random.Generator,
    *,
    radius_range_mm: tuple[float, float] = (3.0, 12.0),
    hu_range: tuple[float, float] = (10.0, 50.0),
    max_tries: int = 20000,
) -> tuple[Nodule, ...]:
    """Draw ``n`` non-overlapping nodules lying wholly inside the lungs and the volume.

    Each sphere, grown by a 2 mm margin, lies in lung parenchyma (checked on 96 surface points),
    within the first and last slice centres and the in-plane field of view, and at least 2 mm away
    from the other nodules. Centres are rounded to 0.01 mm and radii to 0.01 mm before the checks,
    so the returned truth is exactly what gets rendered.

    Parameters
    ----------
    geometry : VolumeGeometry
        Voxel grid the nodules must fit in.
    n : int
        Number of nodules.
    rng : numpy.random.Generator
        Randomness source.
    radius_range_mm, hu_range : tuple of float
        Uniform ranges of radius (mm) and nodule HU.
    max_tries : int
        Candidates drawn before giving up.

    Returns
    -------
    tuple of Nodule
        The nodules in placement order.

    Raises
    ------
    ValueError
        If the nodules cannot be placed (volume too thin or field of view too small).
    """
    placed: list[Nodule] = []
    for _ in range(max_tries):
        if len(placed) >= n:
            break
        candidate = _candidate(geometry, rng, radius_range_mm, hu_range)
        if _fits(candidate, geometry, placed):
            placed.append(candidate)
    if len(placed) < n:
        raise ValueError(
            f"could only place {len(placed)} of {n} nodules in a volume of shape {geometry.shape}; "
            "use fewer nodules or a taller volume"
        )
    return tuple(placed)
