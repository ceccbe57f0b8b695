"""What a reader is shown of a segmentation: one finding per lesion, or per whole segment, with its outline.

Presentation states, key object selections and key images all show the same findings, in the same order:

- a segment declared ``lesions: true`` gives one finding per lesion (``nodule 1``, ``nodule 2``, ... by
  decreasing volume, :mod:`gateway.infer.lesions`), each with its own outline, long and short axis and key slice
  (where its cross-section is largest);
- any other segment gives one finding (``body``, ``fat``, ...), whose key slice is where the segment is largest;
- an empty segment, or a lesion segment without lesions, gives none.

Outlines are closed polylines through the centres of a segment's boundary pixels (:func:`outlines`), in DICOM image
coordinates: ``(column, row)``, where ``(0, 0)`` is the top left corner of the top left pixel, so a pixel's centre
is ``(c + 0.5, r + 0.5)`` (PS3.3 C.10.5.1.2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.encode.uids import OutputUIDs
from gateway.infer.lesions import Lesion, lesion_name
from gateway.infer.measure import for_reading, voxel_volume_ml
from gateway.infer.results import ModelResult
from gateway.registry.manifest import SegmentLabel

__all__ = ["SPECK_AREA_PX", "ShownFinding", "as_points", "outlines", "shown_findings"]

Mask2D = npt.NDArray[np.bool_]
Points = npt.NDArray[np.float64]

#: The corners of a pixel around its centre: the outline of a segment of one pixel.
_PIXEL_SQUARE = np.array([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)])
#: How far (pixels) a simplified outline may leave the boundary pixels' centres.
_TOLERANCE_PX = 0.5
#: A whole segment's outlines enclosing less than this (a 3x3 block of pixels encloses 4) are noise specks.
SPECK_AREA_PX = 4.0


@dataclass(frozen=True, eq=False)
class ShownFinding:
    """One finding as a reader is shown it.

    Attributes
    ----------
    label
        Its segment's manifest entry (name, colour, codes).
    segment_number
        Its segment's number in the SEG.
    number
        The lesion's number (from 1), or 0 for a whole segment.
    tracking_uid
        The same Tracking UID as its SR measurement group.
    slices
        The volume slices it touches, ascending.
    key_slice
        The volume slice where its cross-section is largest.
    volume_ml
        Its volume (unrounded).
    axes
        For a lesion, the end points of its long and short axis on the key slice, ``(row, column)`` volume pixel
        indices; ``None`` for a whole segment.
    axis_mm
        For a lesion, the lengths of its long and short axis in mm.
    mask_on
        Its cross-section on a volume slice, ``[rows, columns]`` bool on the volume's grid.
    """

    label: SegmentLabel
    segment_number: int
    number: int
    tracking_uid: str
    slices: tuple[int, ...]
    key_slice: int
    volume_ml: float
    axes: tuple[tuple[tuple[float, float], tuple[float, float]], tuple[tuple[float, float], tuple[float, float]]] | None
    axis_mm: tuple[float, float] | None
    mask_on: Callable[[int], Mask2D]

    @property
    def name(self) -> str:
        """``nodule 2`` for a lesion, the segment's name otherwise."""
        return lesion_name(self.label.name, self.number) if self.number else self.label.name

    @property
    def min_outline_px(self) -> float:
        """Outlines enclosing less are left out: noise specks of a whole segment; none of a lesion."""
        return 0.0 if self.number else SPECK_AREA_PX

    def outlines_on(self, mask: Mask2D) -> Iterator[Points]:
        """:func:`outlines` of this finding's cross-section ``mask`` (on a source image's pixel grid)."""
        return outlines(mask, min_area_px=self.min_outline_px)

    @property
    def caption(self) -> str:
        """What its label on an image says: name, volume and, for a lesion, its axes (rounded for reading)."""
        text = f"{self.name}: {for_reading('volume', self.volume_ml)} ml"
        if self.axis_mm is not None:
            long_axis, short_axis = (for_reading("long_axis", v) for v in self.axis_mm)
            text += f", {long_axis} x {short_axis} mm"
        return text


def _lesion_finding(
    label: SegmentLabel, segment: int, lesion: Lesion, uids: OutputUIDs, shape: tuple[int, int]
) -> ShownFinding:
    def mask_on(index: int) -> Mask2D:
        return lesion.mask_on(index, shape)

    return ShownFinding(
        label=label,
        segment_number=segment,
        number=lesion.number,
        tracking_uid=uids.tracking(label.value, lesion.number),
        slices=tuple(lesion.slices()),
        key_slice=lesion.key_slice,
        volume_ml=lesion.volume_ml,
        axes=(lesion.long_axis, lesion.short_axis),
        axis_mm=(float(lesion.values["long_axis"]), float(lesion.values["short_axis"])),
        mask_on=mask_on,
    )


def _segment_finding(
    label: SegmentLabel, segment: int, mask: npt.NDArray[np.bool_], uids: OutputUIDs, voxel_ml: float
) -> ShownFinding | None:
    areas = np.array([np.count_nonzero(plane) for plane in mask])  # per slice: faster than along an axis
    touched = np.flatnonzero(areas)
    if touched.size == 0:
        return None

    def mask_on(index: int) -> Mask2D:
        return np.asarray(mask[index], dtype=np.bool_)

    return ShownFinding(
        label=label,
        segment_number=segment,
        number=0,
        tracking_uid=uids.tracking(label.value),
        slices=tuple(int(k) for k in touched),
        key_slice=int(np.argmax(areas)),
        volume_ml=float(areas.sum()) * voxel_ml,
        axes=None,
        axis_mm=None,
        mask_on=mask_on,
    )


def shown_findings(result: ModelResult, uids: OutputUIDs) -> list[ShownFinding]:
    """Every finding of ``result``'s segmentation, in segment order, lesions by number (empty without one)."""
    segmentation = result.manifest.outputs.segmentation
    if segmentation is None:
        return []
    shape = (int(result.volume.array.shape[-2]), int(result.volume.array.shape[-1]))
    voxel_ml = voxel_volume_ml(result.volume.affine)
    found: list[ShownFinding] = []
    for segment, label in enumerate(segmentation.labels, start=1):
        if label.lesions:
            lesions = result.lesions.get(label.value)
            found.extend(_lesion_finding(label, segment, x, uids, shape) for x in (lesions.lesions if lesions else ()))
            continue
        mask = result.segment_mask(label.value)
        whole = None if mask is None else _segment_finding(label, segment, mask, uids, voxel_ml)
        if whole is not None:
            found.append(whole)
    return found


def outlines(mask: Mask2D, *, min_area_px: float = 0.0) -> Iterator[Points]:
    """The closed outlines of a 2D mask, each ``[n, 2]`` of ``(column, row)`` DICOM image coordinates.

    Each boundary (outer and of every hole) is one closed polyline (first point repeated last) through the
    centres of the segment's boundary pixels (OpenCV's border following, Suzuki & Abe 1985: a fraction of a
    millisecond for a whole slice), kept to the points that matter (Douglas-Peucker within half a pixel, so every
    vertex is still a boundary pixel's centre). A single pixel is outlined by its square. Boundaries enclosing
    less than ``min_area_px`` (square pixels, between the pixel centres) are left out: noise specks of a whole
    organ segment, which would add thousands of tiny outlines and help no reader. An empty mask has none.
    """
    import cv2  # OpenCV loads with the first outline, not with the gateway

    pixels = np.ascontiguousarray(mask, dtype=np.bool_).view(np.uint8)
    contours, _ = cv2.findContours(pixels, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([0.5, 0.5])  # pixel indices -> image coordinates of the pixel centres
    for contour in contours:
        if min_area_px and cv2.contourArea(contour) < min_area_px:
            continue
        simplified = cv2.approxPolyDP(contour, _TOLERANCE_PX, True) if len(contour) > 4 else contour
        points = simplified.reshape(-1, 2).astype(np.float64) + offset
        if len(points) == 1:
            points = points + _PIXEL_SQUARE
        yield np.vstack([points, points[:1]])


def as_points(pairs: npt.ArrayLike) -> Points:
    """``(row, column)`` pixel indices (pixel centres at integers) as ``(column, row)`` DICOM image coordinates."""
    array = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    points: Points = array[:, ::-1] + 0.5
    return points
