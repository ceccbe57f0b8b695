"""Geometry of a sorted stack: the affine from the slice positions, quality checks, and the resampling they need.

The slice axis comes from ImagePositionPatient (PS3.3 C.7.6.2.1.1), never from SliceThickness, which is the
thickness of the excited slab and not the distance between slices. Checks, each recorded as a
:class:`~gateway.assemble.model.QCFlag`:

- ``missing-slices``: a step along the normal well above the median step (kept as is, not resampled, so the
  affine holds before the gap only; the flag says where);
- ``uneven-spacing``: steps that differ by more than 1 % of the median: resampled, linearly along the normal,
  onto a uniform grid from the first to the last slice (a gap, if any, then gets interpolated slices too);
- ``spacing-changes``: runs of regular spacing that differ (thin slices, then thicker ones; found by
  :mod:`gateway.assemble.spacing`): one volume, resampled linearly onto the finest run's spacing, on a grid through
  that run's own slices and reaching as far as the source slices do; the flag names each run's spacing, slices and
  SliceThickness (a gap between runs is flagged ``missing-slices`` and interpolated across);
- ``gantry-tilt``: slice origins that drift in-plane along a line (a CT gantry tilt, PS3.3 C.8.2.1 Gantry/Detector
  Tilt): each slice is shifted in-plane by its drift, linearly interpolated, so the grid becomes orthogonal, which
  is what dcm2niix writes as its ``_Tilt_1`` image;
- ``single-slice``: one slice; the third axis is SliceThickness, or 1 mm.

Positions that are not on a line, or repeated, raise :class:`~gateway.errors.AssemblyError`. Whenever it resamples,
the geometry also says where each source slice lies on the new grid (:attr:`StackGeometry.planes`), so that
outputs drawn on the grid can be put back on the source images (:mod:`gateway.assemble.source_grid`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import QCFlag
from gateway.assemble.spacing import SpacingRun, run_gaps, spacing_change_flag, spacing_runs
from gateway.errors import AssemblyError

__all__ = ["StackGeometry", "resample_stack", "shift_axis", "stack_geometry"]

_GAP_FACTOR: Final = 1.5
_UNEVEN_RELATIVE: Final = 0.01
_MIN_STEP_MM: Final = 1e-3
_TILT_TOLERANCE_MM: Final = 0.01
_LINE_TOLERANCE_MM: Final = 0.05
_PLANE_TOLERANCE_MM: Final = 0.01

Float64Array = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class StackGeometry:
    """Where a stack's voxels are, and how to get them onto that grid.

    Parameters
    ----------
    affine
        Maps ``[slice, row, column, 1]`` of the output grid to LPS (see :mod:`gateway.assemble.model`).
    qc
        What the checks found or did.
    sources
        For each output slice: the two source slices it interpolates between and the weight of the second;
        ``None`` when the output slices are the source slices.
    shifts
        In-plane shift ``(rows, columns)`` in pixels to apply to each source slice (gantry tilt), or ``None``.
    planes
        For each source slice: the output slice nearest to it along the normal, and whether that output slice lies
        in the source slice's plane (within 0.01 mm, or because the grid was not resampled along the normal);
        ``None`` when nothing is resampled (output slice ``k`` is source slice ``k``).
    """

    affine: Float64Array
    qc: tuple[QCFlag, ...] = ()
    sources: tuple[tuple[int, int, float], ...] | None = None
    shifts: Float64Array | None = None
    planes: tuple[tuple[int, bool], ...] | None = None

    @property
    def nearest(self) -> tuple[int, ...] | None:
        """For each output slice, the source slice nearest to it, or ``None`` when not resampled along the normal."""
        if self.sources is None:
            return None
        return tuple(k1 if weight >= 0.5 else k0 for k0, k1, weight in self.sources)


def _in_plane_affine(orientation: Sequence[float], pixel_spacing: Sequence[float]) -> Float64Array:
    iop = np.asarray(orientation, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 2] = iop[:3] * pixel_spacing[1]
    affine[:3, 1] = iop[3:] * pixel_spacing[0]
    return affine


def _normal(orientation: Sequence[float]) -> Float64Array:
    iop = np.asarray(orientation, dtype=np.float64)
    if abs(float(np.dot(iop[:3], iop[3:]))) > 1e-3:
        raise AssemblyError("ImageOrientationPatient row and column cosines are not orthogonal")
    normal = np.cross(iop[:3], iop[3:])
    unit: Float64Array = normal / np.linalg.norm(normal)
    return unit


def _single_slice(affine: Float64Array, normal: Float64Array, thickness: float | None) -> StackGeometry:
    step = thickness if thickness is not None and thickness > 0 else 1.0
    affine[:3, 0] = normal * step
    source = "SliceThickness" if step == thickness else "1 mm (no SliceThickness)"
    return StackGeometry(affine, (QCFlag("single-slice", f"one slice; third axis {step:g} mm from {source}"),))


def _tilt(positions: Float64Array, distances: Float64Array, normal: Float64Array) -> Float64Array | None:
    """The in-plane drift of each slice origin relative to the first, or ``None`` when there is none."""
    relative = positions - positions[0]
    drift = relative - np.outer(relative @ normal, normal)
    if float(np.max(np.linalg.norm(drift, axis=1))) < _TILT_TOLERANCE_MM:
        return None
    along = distances - distances[0]
    direction = (along @ drift) / float(along @ along)
    residual = float(np.max(np.linalg.norm(drift - np.outer(along, direction), axis=1)))
    if residual > _LINE_TOLERANCE_MM:
        raise AssemblyError(f"slice positions do not lie on a line (off by up to {residual:.3g} mm)")
    result: Float64Array = drift
    return result


def _gap_flag(steps: Float64Array, median: float) -> QCFlag | None:
    gaps = np.flatnonzero(steps > _GAP_FACTOR * median)
    if gaps.size == 0:
        return None
    missing = int(sum(round(float(steps[g]) / median) - 1 for g in gaps))
    where = ", ".join(f"after slice {int(g)} ({float(steps[g]):.3g} mm)" for g in gaps)
    return QCFlag(
        "missing-slices",
        f"about {missing} slice(s) missing: gap {where} vs median spacing {median:.4g} mm; "
        "kept without resampling, so positions past a gap are off by the gap",
    )


def _uneven(steps: Float64Array, median: float) -> bool:
    regular = steps[steps <= _GAP_FACTOR * median]
    return bool(np.max(np.abs(regular - median)) > _UNEVEN_RELATIVE * median)


@dataclass(frozen=True)
class _Grid:
    """A uniform grid along the normal: one slice per source entry, ``step`` apart from ``start`` (mm from the
    first source slice)."""

    start: float
    step: float
    sources: tuple[tuple[int, int, float], ...]


def _interpolation(along: Float64Array, targets: npt.NDArray[np.floating[Any]]) -> tuple[tuple[int, int, float], ...]:
    """For each target distance, the two source slices around it and the weight of the second."""
    sources: list[tuple[int, int, float]] = []
    for target in targets:
        k1 = int(min(max(np.searchsorted(along, target, side="right"), 1), len(along) - 1))
        k0 = k1 - 1
        weight = float((target - along[k0]) / (along[k1] - along[k0]))
        sources.append((k0, k1, min(max(weight, 0.0), 1.0)))
    return tuple(sources)


def _uniform_grid(along: Float64Array, median: float) -> _Grid:
    """From the first to the last slice, the median step stretched to fit a whole number of steps."""
    count = max(2, round(float(along[-1]) / median) + 1)
    step = float(along[-1]) / (count - 1)
    return _Grid(0.0, step, _interpolation(along, np.arange(count) * step))


def _fine_grid(along: Float64Array, runs: Sequence[SpacingRun]) -> _Grid:
    """The finest run's spacing, on the finest run's own slices, reaching as far as the source slices go."""
    finest = min(runs, key=lambda run: run.spacing)
    step, anchor = finest.spacing, float(along[finest.first])
    tolerance = _PLANE_TOLERANCE_MM / step
    below = math.floor(anchor / step + tolerance)
    above = math.floor((float(along[-1]) - anchor) / step + tolerance)
    targets = anchor + np.arange(-below, above + 1) * step
    return _Grid(float(targets[0]), step, _interpolation(along, targets))


def _plane_slices(along: Float64Array, grid: _Grid) -> tuple[tuple[int, bool], ...]:
    """For each source slice, the nearest slice of ``grid`` and whether it lies in the source slice's plane."""
    index = (along - grid.start) / grid.step
    nearest = np.clip(np.rint(index), 0, len(grid.sources) - 1)
    exact = np.abs(index - nearest) * grid.step <= _PLANE_TOLERANCE_MM
    return tuple((int(k), bool(e)) for k, e in zip(nearest, exact, strict=True))


def _planes(
    along: Float64Array, grid: _Grid | None, shifts: Float64Array | None
) -> tuple[tuple[int, bool], ...] | None:
    if grid is not None:
        return _plane_slices(along, grid)
    if shifts is not None:  # shifted in-plane only: output slice k is source slice k
        return tuple((k, True) for k in range(len(along)))
    return None


def _along_normal(
    along: Float64Array, steps: Float64Array, thicknesses: Sequence[float | None]
) -> tuple[list[QCFlag], _Grid | None]:
    """The flags and the grid (``None``: the source slices as they are) of the spacing along the normal."""
    runs = spacing_runs(steps)
    if runs:
        grid = _fine_grid(along, runs)
        gap = run_gaps(steps, runs)
        return [*([gap] if gap else []), spacing_change_flag(runs, thicknesses, grid.step)], grid
    median = float(np.median(steps))
    flags = [flag for flag in (_gap_flag(steps, median),) if flag is not None]
    if not _uneven(steps, median):
        return flags, None
    grid = _uniform_grid(along, median)
    flags.append(QCFlag("uneven-spacing", f"resampled to a uniform {grid.step:.4g} mm along the normal", True))
    return flags, grid


def _pixel_shifts(drift: Float64Array, orientation: Sequence[float], pixel_spacing: Sequence[float]) -> Float64Array:
    iop = np.asarray(orientation, dtype=np.float64)
    rows = drift @ iop[3:] / pixel_spacing[0]
    columns = drift @ iop[:3] / pixel_spacing[1]
    return np.stack([rows, columns], axis=1)


def _tilt_flag(drift: Float64Array, distances: Float64Array) -> QCFlag:
    along = float(distances[-1] - distances[0])
    degrees = math.degrees(math.atan2(float(np.linalg.norm(drift[-1])), along))
    return QCFlag(
        "gantry-tilt",
        f"slices sheared by {degrees:.3g} degrees (gantry tilt); shifted in-plane onto an orthogonal grid",
        resampled=True,
    )


def stack_geometry(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float | None = None,
    thicknesses: Sequence[float | None] = (),
) -> StackGeometry:
    """Compute the affine of a stack from its slice positions, check it, and plan any resampling.

    Parameters
    ----------
    positions
        ImagePositionPatient of each slice, sorted by position along the normal (ascending).
    orientation
        The ImageOrientationPatient shared by the slices.
    pixel_spacing
        PixelSpacing (row spacing, column spacing) in mm.
    slice_thickness
        SliceThickness, used only for a single slice.
    thicknesses
        SliceThickness of each slice (``None`` where absent), named in the ``spacing-changes`` flag; may be empty.

    Returns
    -------
    StackGeometry
        The affine of the output grid, the QC flags and the resampling plan.

    Raises
    ------
    AssemblyError
        When positions repeat, are not sorted, or do not lie on a line.
    """
    points = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    affine = _in_plane_affine(orientation, pixel_spacing)
    affine[:3, 3] = points[0]
    normal = _normal(orientation)
    if len(points) == 1:
        return _single_slice(affine, normal, slice_thickness)
    distances = points @ normal
    steps = np.diff(distances)
    if float(np.min(steps)) < _MIN_STEP_MM:
        raise AssemblyError("slice positions repeat or are not sorted along the normal")
    drift = _tilt(points, distances, normal)
    along = distances - distances[0]
    flags, grid = _along_normal(along, steps, thicknesses)
    if grid is None and not flags and drift is None:
        affine[:3, 0] = (points[-1] - points[0]) / (len(points) - 1)
        return StackGeometry(affine)
    step = float(np.median(steps)) if grid is None else grid.step
    affine[:3, 0] = normal * step
    if grid is not None:
        affine[:3, 3] += normal * grid.start
    shifts = None if drift is None else _pixel_shifts(drift, orientation, pixel_spacing)
    if drift is not None:
        flags.append(_tilt_flag(drift, distances))
    sources = None if grid is None else grid.sources
    return StackGeometry(affine, tuple(flags), sources, shifts, _planes(along, grid, shifts))


def shift_axis(image: Float32Array, shift: float, axis: int, fill: float) -> Float32Array:
    """``out[i] = image[i - shift]`` along ``axis``, linear, ``fill`` outside (any further axes move alike)."""
    size = image.shape[axis]
    source = np.arange(size, dtype=np.float64) - shift
    low = np.floor(source).astype(np.int64)
    weight = (source - low).astype(np.float32)
    a = np.take(image, np.clip(low, 0, size - 1), axis=axis)
    b = np.take(image, np.clip(low + 1, 0, size - 1), axis=axis)
    shape = [1] * image.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    out: Float32Array = (a * (1 - weight) + b * weight).astype(np.float32)
    outside = ((source < 0) | (source > size - 1)).reshape(shape)
    return np.where(np.broadcast_to(outside, out.shape), np.float32(fill), out).astype(np.float32)


def _shift(image: Float32Array, shift: Float64Array, fill: float) -> Float32Array:
    if abs(float(shift[0])) > 1e-6:
        image = shift_axis(image, float(shift[0]), 0, fill)
    if abs(float(shift[1])) > 1e-6:
        image = shift_axis(image, float(shift[1]), 1, fill)
    return image


def resample_stack(array: Float32Array, geometry: StackGeometry, fill: float | None = None) -> Float32Array:
    """Put a stack's voxels (``[slice, row, column]``, source order) onto the grid of ``geometry``.

    Parameters
    ----------
    array
        The source slices, as sorted for :func:`stack_geometry`.
    geometry
        Its geometry.
    fill
        Value for voxels that fall outside the source (gantry tilt); default the minimum of ``array``.

    Returns
    -------
    numpy.ndarray
        float32 ``[slice, row, column]`` on the output grid (``array`` itself when nothing is resampled).
    """
    if geometry.sources is None and geometry.shifts is None:
        return array
    value = float(np.min(array)) if fill is None else fill
    slices = array
    if geometry.shifts is not None:
        slices = np.stack([_shift(s, shift, value) for s, shift in zip(array, geometry.shifts, strict=True)])
    if geometry.sources is None:
        return slices
    return np.stack([slices[k0] * np.float32(1 - w) + slices[k1] * np.float32(w) for k0, k1, w in geometry.sources])
