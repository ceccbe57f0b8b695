"""Lesions: each connected component of a segment declared ``lesions: true`` is a finding of its own.

Radiologists and trials (RECIST 1.1, Lung-RADS) measure lesion by lesion, so a label such as "nodule" is split into
its connected components (26-connectivity, on the source grid) and each is measured on its own:

- ``volume``: voxel count times the voxel volume, in ml;
- ``long_axis``: the longest diameter of the lesion's cross-section in the slice where that cross-section is
  largest (its *key slice*), in mm, and ``short_axis``: the longest diameter perpendicular to it in the same slice
  (RECIST's long and short axis, measured in the plane of the source images, which for an axial series is the
  axial plane);
- ``mean`` and ``stddev`` of the volume's modality values inside the lesion (Hounsfield units for CT), when the
  label lists them;
- its centre: the centroid of its voxels, as an index ``(slice, row, column)`` and in patient coordinates (LPS, mm).

Components smaller than the label's ``min_volume_ml`` are left out and counted. Lesions are numbered from 1 by
decreasing volume (ties: by centre, slice then row then column), so the same segmentation always numbers its
lesions the same way, and so do re-runs of the same job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Lesion", "LesionSet"]

Point2 = tuple[float, float]


@dataclass(frozen=True, eq=False)
class Lesion:
    """One connected component of a segment, measured.

    Attributes
    ----------
    label
        The segment's label value (``labelmap``) or output channel (``channels``).
    number
        1-based, by decreasing volume within its label.
    voxels
        How many voxels it has.
    values
        Measurement name -> value, unrounded: ``volume`` (ml), ``long_axis`` and ``short_axis`` (mm), and
        ``mean`` / ``stddev`` / ``min`` / ``max`` (modality units) where the label lists them.
    units
        Measurement name -> UCUM unit (``ml``, ``mm``, ``[hnsf'U]``, ``1``).
    probability
        The highest voxel probability inside the lesion (0-1), or ``None`` when the model gives none.
    centre_index
        Centroid ``(slice, row, column)`` on the volume's grid, in (fractional) voxel indices.
    centre
        The same point in patient coordinates (LPS, mm): ``affine @ [*centre_index, 1]``.
    key_slice
        The volume slice where the lesion's cross-section is largest (the first of equal ones).
    long_axis, short_axis
        End points ``((row, column), (row, column))`` of the two diameters on the key slice, in (fractional)
        pixel indices of the volume's grid (pixel centres at integers).
    box
        ``(slice_start, row_start, column_start)`` of :attr:`mask` in the volume.
    mask
        The lesion's voxels inside its bounding box ``[s, r, c]`` (bool); the volume's other labels and lesions
        are not in it.
    """

    label: int
    number: int
    voxels: int
    values: Mapping[str, float]
    units: Mapping[str, str]
    probability: float | None
    centre_index: tuple[float, float, float]
    centre: tuple[float, float, float]
    key_slice: int
    long_axis: tuple[Point2, Point2]
    short_axis: tuple[Point2, Point2]
    box: tuple[int, int, int]
    mask: npt.NDArray[np.bool_]

    @property
    def volume_ml(self) -> float:
        """Its volume in ml."""
        return float(self.values["volume"])

    def slices(self) -> range:
        """The volume slices it touches."""
        return range(self.box[0], self.box[0] + self.mask.shape[0])

    def mask_on(self, index: int, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
        """Its cross-section on volume slice ``index`` as a full ``shape`` (rows, columns) mask."""
        out = np.zeros(shape, dtype=np.bool_)
        k = index - self.box[0]
        if 0 <= k < self.mask.shape[0]:
            r, c = self.box[1], self.box[2]
            out[r : r + self.mask.shape[1], c : c + self.mask.shape[2]] = self.mask[k]
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (no voxels)."""
        return {
            "label": self.label,
            "number": self.number,
            "voxels": self.voxels,
            "values": dict(self.values),
            "units": dict(self.units),
            "probability": self.probability,
            "centre": list(self.centre),
            "key_slice": self.key_slice,
        }


@dataclass(frozen=True, eq=False)
class LesionSet:
    """The lesions of one segment declared ``lesions: true``.

    Attributes
    ----------
    label
        The segment's label value or channel.
    name
        The segment's name (``nodule``).
    lesions
        Those at least ``min_volume_ml``, numbered from 1 by decreasing volume.
    left_out
        How many components were smaller than ``min_volume_ml`` (not reported, only counted).
    min_volume_ml
        The label's threshold.
    """

    label: int
    name: str
    lesions: tuple[Lesion, ...]
    left_out: int = 0
    min_volume_ml: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "label": self.label,
            "name": self.name,
            "lesions": [lesion.as_dict() for lesion in self.lesions],
            "left_out": self.left_out,
            "min_volume_ml": self.min_volume_ml,
        }
