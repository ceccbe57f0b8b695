"""Measurements of segments on the source grid, from the volume's modality values.

Volume is the voxel count times the voxel volume, ``|det(affine[:3, :3])|`` mm3, in ml; mean, stddev
(population), min and max are over the volume's values inside the mask (Hounsfield units for CT). A 4D volume
is measured on its first 3D volume (for a diffusion series, the first b-value and direction in acquisition order).
An empty segment reports its volume and voxel count (zero) and no statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume
from gateway.registry.manifest import Measurement, SegmentLabel

__all__ = [
    "SegmentMeasurement",
    "for_reading",
    "measure_mask",
    "measure_segments",
    "measurement_units",
    "voxel_volume_ml",
]

Mask = npt.NDArray[np.bool_]

_STATISTICS = ("mean", "stddev", "min", "max")


@dataclass(frozen=True)
class SegmentMeasurement:
    """What was measured for one segment.

    Attributes
    ----------
    value
        The segment's label value (``labelmap``) or output channel (``channels``).
    name
        The segment's name from the manifest.
    values
        Measurement name (``volume``, ``voxels``, ``mean``, ``stddev``, ``min``, ``max``) -> number, for those
        the manifest lists (statistics left out for an empty segment).
    units
        Measurement name -> UCUM unit code (``ml``, ``1``, ``[hnsf'U]`` for CT values).
    """

    value: int
    name: str
    values: Mapping[str, float]
    units: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"value": self.value, "name": self.name, "values": dict(self.values), "units": dict(self.units)}


def for_reading(name: str, value: float) -> float | int:
    """A measured value rounded as a radiologist would write it.

    Volumes to 0.01 ml below 10 ml, to 0.1 ml below 100 ml and to whole ml from there (an organ of 540 ml is
    ``540``, not ``540.3``: no more digits than a segmentation supports); diameters (``long_axis``, ``short_axis``)
    to 0.1 mm; statistics of modality values (``mean``, ``stddev``, ``min``, ``max``: Hounsfield units for CT) to
    0.1; probabilities to 0.01 (as a ``percent``, to 1 %); voxel counts are whole numbers. Anything else keeps 4
    significant digits. A value with nothing after the point is an ``int``, so it is written ``12``, not ``12.0``.
    """
    if name in ("voxels", "percent"):
        return round(value)
    if name == "volume":
        decimals = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    elif name in ("long_axis", "short_axis", *_STATISTICS):
        decimals = 1
    elif name == "probability":
        decimals = 2
    else:
        return float(f"{value:.4g}")
    rounded = round(value, decimals)
    return int(rounded) if rounded == int(rounded) else rounded


def voxel_volume_ml(affine: npt.NDArray[np.float64]) -> float:
    """The volume of one voxel of a grid with this affine, in ml."""
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


def measurement_units(modality: str | None) -> dict[str, str]:
    """UCUM units of each measurement for a volume of this modality (``1``: unitless, e.g. MR signal)."""
    values = "[hnsf'U]" if modality == "CT" else "1"
    return {"volume": "ml", "voxels": "1", **dict.fromkeys(_STATISTICS, values)}


def _values(volume: Volume) -> npt.NDArray[np.float32]:
    return volume.array if volume.array.ndim == 3 else volume.array[0]


def measure_mask(mask: Mask, volume: Volume, wanted: Sequence[Measurement]) -> dict[str, float]:
    """Measure one mask (``[S, R, C]`` bool, on the volume's grid).

    Parameters
    ----------
    mask
        The segment's voxels.
    volume
        The source volume (its affine gives the voxel size, its array the values).
    wanted
        The measurements to report.
    """
    return _measure_masks([mask], volume, [wanted])[0]


def _measure_masks(
    masks: Sequence[Mask], volume: Volume, wanted: Sequence[Sequence[Measurement]]
) -> list[dict[str, float]]:
    """:func:`measure_mask` of each mask with its wanted measurements, the statistics of all in one pass over the
    volume's values (each slab read once for every mask, while it is in cache)."""
    results: list[dict[str, float]] = []
    todo: list[int] = []  # the masks whose statistics are wanted: not empty
    for index, (mask, names) in enumerate(zip(masks, wanted, strict=True)):
        if mask.shape != volume.array.shape[-3:]:
            raise ValueError(f"mask shape {mask.shape} does not match the volume's {volume.array.shape[-3:]}")
        voxels = int(np.count_nonzero(mask))
        result: dict[str, float] = {}
        if "volume" in names:
            result["volume"] = voxels * voxel_volume_ml(volume.affine)
        if "voxels" in names:
            result["voxels"] = float(voxels)
        results.append(result)
        if voxels and any(name in names for name in _STATISTICS):
            todo.append(index)
    for index, stats in zip(todo, _statistics_of(_values(volume), [masks[i] for i in todo]), strict=True):
        results[index].update({name: stats[name] for name in _STATISTICS if name in wanted[index]})
    return results


#: Slices read together by :func:`_statistics_of`: temporaries of a few MB that stay in cache.
_SLAB = 8


class _Moments:
    """Count, mean, sum of squared deviations, min and max of values added a part at a time: each part's merged
    as Chan et al. do (the pairwise update of Welford's algorithm)."""

    def __init__(self) -> None:
        self.count, self.mean, self.squares = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, inside: npt.NDArray[np.float64]) -> None:
        if not inside.size:
            return
        self.low = min(self.low, float(inside.min()))
        self.high = max(self.high, float(inside.max()))
        part_mean = float(inside.mean())
        inside -= part_mean
        part_squares = float(np.dot(inside, inside))
        total = self.count + inside.size
        delta = part_mean - self.mean
        self.mean += delta * inside.size / total
        self.squares += part_squares + delta * delta * self.count * inside.size / total
        self.count = total

    def statistics(self) -> dict[str, float]:
        stddev = float(np.sqrt(self.squares / self.count))
        return {"mean": self.mean, "stddev": stddev, "min": self.low, "max": self.high}


def _statistics_of(values: npt.NDArray[np.float32], masks: Sequence[Mask]) -> list[dict[str, float]]:
    """Mean, population standard deviation, min and max of ``values`` inside each mask (none empty).

    A few slices at a time, in float64, each slab's count, mean and sum of squared deviations merged (see
    :class:`_Moments`): the same numbers as over the whole copy, without a copy of every voxel inside a large
    segment (a body outline is most of a CT); every slab of ``values`` is read once for all the masks.
    """
    moments = [_Moments() for _ in masks]
    for start in range(0, values.shape[0], _SLAB):
        part = values[start : start + _SLAB]
        for mask, moment in zip(masks, moments, strict=True):
            moment.add(part[mask[start : start + _SLAB]].astype(np.float64))
    return [moment.statistics() for moment in moments]


def measure_segments(
    masks: Mapping[int, Mask], volume: Volume, labels: Sequence[SegmentLabel]
) -> tuple[SegmentMeasurement, ...]:
    """Measure every declared segment that has a mask, with the measurements its label lists (the statistics of
    all segments in one pass over the volume's values)."""
    units = measurement_units(volume.modality)
    measured = [label for label in labels if label.value in masks]
    values = _measure_masks(
        [masks[label.value] for label in measured], volume, [label.measurements for label in measured]
    )
    return tuple(
        SegmentMeasurement(label.value, label.name, result, {name: units[name] for name in label.measurements})
        for label, result in zip(measured, values, strict=True)
    )
