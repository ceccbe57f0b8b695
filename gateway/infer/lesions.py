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

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume
from gateway.infer.measure import measure_mask, measurement_units, voxel_volume_ml
from gateway.registry.manifest import SegmentLabel

__all__ = ["Lesion", "LesionSet", "find_lesions", "lesion_name"]

Point2 = tuple[float, float]
Box = tuple[slice, slice, slice]
Mask = npt.NDArray[np.bool_]
Points = npt.NDArray[np.float64]

_STATISTICS = ("mean", "stddev", "min", "max")
_CELLS = 1_000_000  # (position, edge) pairs evaluated at once when looking for the short axis


def lesion_name(segment: str, number: int) -> str:
    """How a lesion is named wherever it is shown (report, outlines, key images, ``gateway run``): ``nodule 2``."""
    return f"{segment} {number}"


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


def find_lesions(
    mask: Mask, volume: Volume, label: SegmentLabel, probability: npt.NDArray[np.float32] | None = None
) -> LesionSet:
    """Split a segment into its connected components and measure each (see the module docstring).

    Components are found with 26-connectivity. The mask is first cut at empty slices, rows and columns into
    boxes that no component crosses, so labelling and measuring work on bounding boxes, not on the whole
    volume. Diameters are measured on the sub-pixel outline of the key slice's cross-section (the 0.5 level of
    the binary slice, so a disk ``N`` pixels across measures ``N`` pixel spacings), in mm on the plane the
    affine's row and column vectors span: the long axis is the longest distance between two outline points, the
    short axis the widest extent of the outline perpendicular to it at any position along it.

    Parameters
    ----------
    mask
        The segment's voxels, ``[S, R, C]`` bool on the volume's grid.
    volume
        The source volume: its affine gives the geometry, its array the values (a 4D volume is measured on its
        first 3D volume).
    label
        The segment's manifest entry: its value, name, ``measurements`` (the statistics to report) and
        ``min_volume_ml``.
    probability
        The voxel probability of the label, ``[S, R, C]`` float, for each lesion's highest; ``None`` when the
        model gives none.

    Returns
    -------
    LesionSet
        The lesions of at least ``label.min_volume_ml``, numbered by decreasing volume, and how many were left out.

    Raises
    ------
    ValueError
        If ``mask`` is not a bool array of the volume's shape, or ``probability`` not of that shape.
    """
    _check(mask, volume, probability)
    voxel_ml = voxel_volume_ml(volume.affine)
    components = [_Component.of(box, voxels) for box, voxels in _components(mask)]
    kept = sorted(
        (c for c in components if c.count * voxel_ml >= label.min_volume_ml), key=lambda c: (-c.count, c.centre)
    )
    lesions = tuple(_measure(c, number, volume, label, probability) for number, c in enumerate(kept, start=1))
    return LesionSet(label.value, label.name, lesions, len(components) - len(kept), label.min_volume_ml)


def _check(mask: Mask, volume: Volume, probability: npt.NDArray[np.float32] | None) -> None:
    shape = volume.array.shape[-3:]
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != shape:
        raise ValueError(f"mask must be a bool array of the volume's shape {shape}")
    if probability is not None and probability.shape != shape:
        raise ValueError(f"probability has shape {probability.shape}; expected the volume's {shape}")


# -- components ----------------------------------------------------------------------------------------------------


def _runs(occupied: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of ``True``."""
    edges = np.diff(np.concatenate(([0], occupied.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _pieces(mask: Mask) -> Iterator[Box]:
    """Boxes that hold all of ``mask``'s voxels and that no 26-connected component crosses.

    An empty slice, row or column plane separates what lies on either side of it, so the mask is cut at such
    planes, and each piece again, until no piece has an empty plane left (in raster order of the pieces).
    """
    todo: list[Box] = [(slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2]))]
    while todo:
        box = todo.pop()
        split = _split(mask[box], box)
        if split is None:
            yield box
        else:
            todo.extend(reversed(split))


def _split(piece: Mask, box: Box) -> list[Box] | None:
    """``box`` cut at the empty planes of its first axis that has any (``None``: it has none)."""
    for axis in range(3):
        occupied: npt.NDArray[np.bool_] = np.any(piece, axis=tuple(a for a in range(3) if a != axis))
        runs = _runs(occupied)
        if runs != [(0, piece.shape[axis])]:
            offset = box[axis].start
            return [_with(box, axis, slice(offset + start, offset + stop)) for start, stop in runs]
    return None


def _with(box: Box, axis: int, part: slice) -> Box:
    return (part, box[1], box[2]) if axis == 0 else (box[0], part, box[2]) if axis == 1 else (box[0], box[1], part)


@functools.cache
def _26() -> npt.NDArray[np.bool_]:
    """26-connectivity in 3D."""
    from scipy import ndimage  # type: ignore[import-untyped]  # scipy ships no type hints

    structure: npt.NDArray[np.bool_] = ndimage.generate_binary_structure(3, 3)
    return structure


def _components(mask: Mask) -> Iterator[tuple[Box, Mask]]:
    """Each 26-connected component: its bounding box in the volume and its voxels inside that box."""
    from scipy import ndimage  # SciPy and scikit-image load with the first lesions, not with the gateway

    for piece in _pieces(mask):
        labels, _ = ndimage.label(mask[piece], structure=_26())
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            if found is None:
                continue
            box = tuple(slice(p.start + f.start, p.start + f.stop) for p, f in zip(piece, found, strict=True))
            yield box, labels[found] == index  # type: ignore[misc]


@dataclass(frozen=True)
class _Component:
    box: Box
    voxels: Mask
    count: int
    centre: tuple[float, float, float]

    @classmethod
    def of(cls, box: Box, voxels: Mask) -> _Component:
        indices = np.nonzero(voxels)
        centre = tuple(float(i.mean()) + b.start for i, b in zip(indices, box, strict=True))
        return cls(box, voxels, len(indices[0]), (centre[0], centre[1], centre[2]))


# -- measuring -----------------------------------------------------------------------------------------------------


def _measure(
    component: _Component,
    number: int,
    volume: Volume,
    label: SegmentLabel,
    probability: npt.NDArray[np.float32] | None,
) -> Lesion:
    box, voxels = component.box, component.voxels
    wanted = ["volume", *(name for name in _STATISTICS if name in label.measurements)]
    measured = measure_mask(voxels, _cropped(volume, box), wanted)
    areas = voxels.sum(axis=(1, 2))
    key = int(np.argmax(areas))  # the first of equal ones
    plane = _plane(volume.affine)
    long_axis, short_axis = _diameters(voxels[key], (box[1].start, box[2].start), plane)
    values = {"volume": measured.pop("volume"), "long_axis": long_axis[0], "short_axis": short_axis[0], **measured}
    units = {**measurement_units(volume.modality), "long_axis": "mm", "short_axis": "mm"}
    centre = volume.affine @ np.array([*component.centre, 1.0])
    return Lesion(
        label=label.value,
        number=number,
        voxels=component.count,
        values=values,
        units={name: units[name] for name in values},
        probability=None if probability is None else float(probability[box][voxels].max()),
        centre_index=component.centre,
        centre=(float(centre[0]), float(centre[1]), float(centre[2])),
        key_slice=box[0].start + key,
        long_axis=long_axis[1],
        short_axis=short_axis[1],
        box=(box[0].start, box[1].start, box[2].start),
        mask=voxels,
    )


def _cropped(volume: Volume, box: Box) -> Volume:
    """The volume's first 3D volume inside ``box``, its affine moved so that each voxel stays where it was."""
    values = volume.array if volume.array.ndim == 3 else volume.array[0]
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    padding = None if volume.padding_mask is None else volume.padding_mask[box]
    return dataclasses.replace(
        volume,
        array=values[box],
        affine=volume.affine @ shift,
        slices=volume.slices[box[0]],
        dimension_4=(),
        slices_4d=(),
        padding_mask=padding,
        source_planes=(),
    )


def _plane(affine: npt.NDArray[np.float64]) -> Points:
    """A 2x2 ``P`` with ``|P @ (row, column)|`` the length in mm of an in-plane step of the grid (sheared too).

    ``P`` is the upper Cholesky factor of the metric ``B.T @ B`` of the row and column vectors
    ``B = affine[:3, 1:3]``: it maps pixel indices onto orthonormal mm coordinates in the slice plane and depends
    on the grid's spacing and shear only, not on how the grid lies in space, so neither do the diameters.
    """
    rows_columns = affine[:3, 1:3]
    plane: Points = np.asarray(np.linalg.cholesky(rows_columns.T @ rows_columns).T, dtype=np.float64)
    return plane


Diameter = tuple[float, tuple[Point2, Point2]]


def _diameters(section: Mask, offset: tuple[int, int], plane: Points) -> tuple[Diameter, Diameter]:
    """Long and short axis of a cross-section: lengths in mm and end points in the volume's pixel indices."""
    from skimage.measure import find_contours

    contours = [c - 1.0 + np.array(offset) for c in find_contours(np.pad(section, 1).astype(np.float64), 0.5)]
    first, second = _farthest(np.concatenate(contours), plane)
    along = (second - first) / np.linalg.norm(second - first)
    across = np.array([-along[1], along[0]])
    outline = [c @ plane.T for c in contours]  # in mm
    position, low, high = _widest([np.stack([c @ along, c @ across], axis=1) for c in outline])
    ends = np.array([first, second, position * along + low * across, position * along + high * across])
    index = np.linalg.solve(plane, ends.T).T
    long_ends = ((float(index[0, 0]), float(index[0, 1])), (float(index[1, 0]), float(index[1, 1])))
    short_ends = ((float(index[2, 0]), float(index[2, 1])), (float(index[3, 0]), float(index[3, 1])))
    return (float(np.linalg.norm(second - first)), long_ends), (float(high - low), short_ends)


def _first_of_greatest(values: npt.NDArray[np.float64]) -> int:
    """The first index whose value is the greatest, to a relative 1e-9 (so rounding cannot choose between ties)."""
    return int(np.argmax(values >= values.max() * (1.0 - 1e-9)))


def _farthest(points: Points, plane: Points) -> tuple[Points, Points]:
    """The two outline points (pixel indices) farthest apart in mm, as mm coordinates in the plane.

    Searched among the convex hull's vertices; of equally long pairs, the first in the points' index order.
    """
    from scipy import spatial

    points = np.unique(points, axis=0)
    if len(points) > 3:
        with contextlib.suppress(spatial.QhullError):  # all on one line: every point stays a candidate
            points = points[np.sort(spatial.ConvexHull(points).vertices)]
    mm = points @ plane.T
    distance = np.linalg.norm(mm[:, None, :] - mm[None, :, :], axis=2)
    i, j = np.unravel_index(_first_of_greatest(distance.ravel()), distance.shape)
    return mm[i], mm[j]


def _widest(polygons: list[Points]) -> tuple[float, float, float]:
    """Where, along the first axis, closed polygons (``(along, across)`` vertices) extend furthest across.

    Between two consecutive vertex positions the upper edge of the outline is a maximum and the lower one a
    minimum of straight lines, so the extent across is convex there and greatest at a vertex position: only those
    are tried (the first of equal ones). Returns the position and the lowest and highest point across there.
    """
    edges = np.concatenate([np.stack([p[:-1], p[1:]], axis=1) for p in polygons])  # [E, 2 ends, (along, across)]
    edges = edges[edges[:, 0, 0] != edges[:, 1, 0]]  # edges straight across: their ends belong to other edges too
    a0, b0, a1, b1 = edges[:, 0, 0], edges[:, 0, 1], edges[:, 1, 0], edges[:, 1, 1]
    positions = np.unique(edges[:, :, 0])
    lows, highs = [], []
    for chunk in np.array_split(positions, max(1, len(positions) * len(edges) // _CELLS)):
        t = chunk[:, None]
        inside = (np.minimum(a0, a1) <= t) & (t <= np.maximum(a0, a1))
        b = b0 + (t - a0) / (a1 - a0) * (b1 - b0)
        highs.append(np.where(inside, b, -np.inf).max(axis=1))
        lows.append(np.where(inside, b, np.inf).min(axis=1))
    low, high = np.concatenate(lows), np.concatenate(highs)
    k = _first_of_greatest(high - low)
    return float(positions[k]), float(low[k]), float(high[k])
