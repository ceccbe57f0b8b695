"""From a volume's grid back to its source images: what an output drawn on the volume shows on each source image.

Outputs that a viewer lays over the source images (SEG frames, presentation-state outlines, key images) must lie
on images that exist. Where assembly resampled (:class:`~gateway.assemble.model.SourcePlane`), a slice of the
volume is not a source image: a gantry-tilted slice is shifted in-plane, and a slice of a grid made uniform along
the normal may lie between two source images. These functions take a 2D or 3D array on the volume's grid to the
pixel grid of each source image: source pixel ``(r, c)`` of a plane shows volume pixel ``(r + shift_r, c +
shift_c)`` of the plane's nearest slice (nearest neighbour for labels, linear for values), the inverse of the shift
:func:`~gateway.assemble.geometry.resample_stack` applied (``volume[i] = source[i - shift]``). Along the normal a
plane takes its nearest slice as it is (``SourcePlane.exact`` says whether that slice lies in the plane).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.assemble.geometry import shift_axis
from gateway.assemble.model import SourcePlane, Volume

__all__ = ["on_planes", "plane_of_slice", "source_planes", "source_stack", "to_source_plane"]


def source_planes(volume: Volume) -> tuple[SourcePlane, ...]:
    """Every source image plane of the (first 3D) volume in stack order, with the slice it maps to."""
    if volume.source_planes:
        return volume.source_planes
    return tuple(SourcePlane(ref, k) for k, ref in enumerate(volume.slices))


def plane_of_slice(volume: Volume, index: int) -> SourcePlane:
    """The source plane nearest to volume slice ``index`` (the plane itself when the slice is one)."""
    planes = source_planes(volume)
    exact = [p for p in planes if p.slice == index]
    if exact:
        return exact[0]
    return min(planes, key=lambda p: (abs(p.slice - index), p.slice))


def _shifted(image: npt.NDArray[Any], shift: tuple[float, float], linear: bool, fill: float) -> npt.NDArray[Any]:
    """``out[r, c] = image[r + shift_r, c + shift_c]`` (``fill`` outside), over any trailing axes."""
    rows, columns = image.shape[:2]
    if not linear:
        dr, dc = round(shift[0]), round(shift[1])
        out = np.full_like(image, fill)
        r0, r1 = max(0, -dr), min(rows, rows - dr)
        c0, c1 = max(0, -dc), min(columns, columns - dc)
        if r0 < r1 and c0 < c1:
            out[r0:r1, c0:c1] = image[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        return out
    values = image.astype(np.float32, copy=False)
    return shift_axis(shift_axis(values, -shift[0], 0, fill), -shift[1], 1, fill)


def to_source_plane(
    slice_image: npt.NDArray[Any], plane: SourcePlane, *, linear: bool = False, fill: float = 0
) -> npt.NDArray[Any]:
    """A 2D array on volume slice ``plane.slice`` as it lies on the source image ``plane``.

    Parameters
    ----------
    slice_image
        ``[rows, columns]`` on the volume's grid (the slice ``plane.slice``), or ``[rows, columns, ...]`` (each
        trailing index, e.g. a channel, is moved alike).
    plane
        The source plane.
    linear
        Interpolate linearly (values); nearest neighbour otherwise (labels, masks).
    fill
        The value where the source image reaches outside the volume slice.
    """
    if plane.shift == (0.0, 0.0):
        return slice_image
    return _shifted(slice_image, plane.shift, linear, fill)


def on_planes(
    array: npt.NDArray[Any], planes: Sequence[SourcePlane], *, linear: bool = False, fill: float = 0
) -> npt.NDArray[Any]:
    """A 3D array on a volume's grid (``[slice, row, column, ...]``) as one 2D array per plane of ``planes``.

    Parameters
    ----------
    array
        ``[slice, row, column]`` (or with trailing axes, e.g. channels) on the volume's grid.
    planes
        Source planes of that volume, in the order wanted.
    linear
        Interpolate linearly in-plane (values); nearest neighbour otherwise (labels, masks).
    fill
        The value where a source image reaches outside the volume.

    Returns
    -------
    numpy.ndarray
        ``[len(planes), rows, columns, ...]``, ``array``'s dtype (float32 when ``linear``).
    """
    if not planes:
        raise ValueError("planes is empty")
    return np.stack([to_source_plane(array[p.slice], p, linear=linear, fill=fill) for p in planes])


def source_stack(array: npt.NDArray[Any], volume: Volume, *, linear: bool = False, fill: float = 0) -> npt.NDArray[Any]:
    """A 3D array on the volume's grid (``[slice, row, column]``) as one 2D array per source plane, in plane order.

    Returns ``array`` itself when the volume was not resampled (slice ``k`` is then source plane ``k``).
    """
    if not volume.source_planes:
        return array
    return on_planes(array, volume.source_planes, linear=linear, fill=fill)
