"""Where the frames of a derived multi-frame object (SEG, Parametric Map) lie, and which source images they cite.

An output frame ``k`` is the volume's slice ``k`` (array order). How highdicom learns its geometry:

- **Same grid** (the volume was not resampled, every slice is a whole single-frame instance, or the slices are
  all frames of one multi-frame instance in order): the source images are handed over in slice order and
  highdicom copies their positions, orientation and pixel spacing; every frame cites its source image
  (Derivation Image Sequence, Spatial Locations Preserved YES).
- **Otherwise** (resampled for gantry tilt or uneven spacing, mosaic tiles, a subset or reordering of a
  multi-frame instance's frames): the Plane Position of every frame is given explicitly, from the source frame
  itself when the voxels are the scanner's own (not resampled, not a mosaic tile), else from ``volume.affine``
  (``affine @ [k, 0, 0, 1]``); Pixel Measures and Plane Orientation come from the affine. highdicom then cites a
  source image per frame where one lies in the same plane (Spatial Locations Preserved YES when the position
  matches too, NO when only the plane does, as after a gantry-tilt shift); where none does (a mosaic, a grid
  resampled along the normal) the object cites its sources only as a whole (Referenced Series Sequence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from gateway.assemble.model import SliceRef, Volume
from gateway.errors import EncodeError

__all__ = ["FramePlan", "plan_frames"]


@dataclass(frozen=True)
class FramePlan:
    """The geometry arguments of a highdicom multi-frame image, for a volume's slices.

    ``plane_positions``, ``pixel_measures`` and ``plane_orientation`` are ``None`` on the same grid (highdicom
    copies the sources'). ``further_source_images`` holds the instances past the first when there are several
    multi-frame ones (highdicom takes one multi-frame source image), and those of a 4D volume's other 3D volumes
    (the other b-values a diffusion model also read), cited as sources but not used for geometry.
    """

    source_images: tuple[Dataset, ...]
    further_source_images: tuple[Dataset, ...] = ()
    plane_positions: tuple[hd.PlanePositionSequence, ...] | None = None
    pixel_measures: hd.PixelMeasuresSequence | None = None
    plane_orientation: hd.PlaneOrientationSequence | None = None

    @property
    def same_grid(self) -> bool:
        """Whether every frame is a source frame (positions copied from the sources)."""
        return self.plane_positions is None

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments for :class:`highdicom.seg.Segmentation` and :class:`highdicom.pm.ParametricMap`."""
        return {
            "source_images": list(self.source_images),
            "further_source_images": list(self.further_source_images) or None,
            "plane_positions": None if self.plane_positions is None else list(self.plane_positions),
            "pixel_measures": self.pixel_measures,
            "plane_orientation": self.plane_orientation,
        }


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _instances(volume: Volume, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """The distinct source instances, in order of first use by a slice."""
    order: dict[str, Dataset] = {}
    for index, ref in enumerate(volume.slices):
        if ref.sop_instance_uid not in order:
            if ref.sop_instance_uid not in sources:
                raise EncodeError(f"the source instance of slice {index} ({ref.sop_instance_uid}) was not given")
            order[ref.sop_instance_uid] = sources[ref.sop_instance_uid]
    return list(order.values())


def _other_volumes(volume: Volume, sources: Mapping[str, Dataset], instances: Sequence[Dataset]) -> tuple[Dataset, ...]:
    """The instances of a 4D volume's other 3D volumes (other b-values, echoes, ...) that ``sources`` holds."""
    seen = {str(ds.SOPInstanceUID) for ds in instances}
    uids = dict.fromkeys(ref.sop_instance_uid for refs in volume.slices_4d for ref in refs)
    return tuple(sources[uid] for uid in uids if uid not in seen and uid in sources)


def _on_source_grid(volume: Volume, instances: Sequence[Dataset]) -> bool:
    """Whether the slices are, in order, whole single-frame instances or all frames of one multi-frame one."""
    slices = volume.slices
    if volume.resampled or any(ref.tile is not None for ref in slices):
        return False
    if all(_frames(ds) == 1 for ds in instances):
        return len(instances) == len(slices) and all(ref.frame == 1 for ref in slices)
    if len(instances) != 1 or _frames(instances[0]) != len(slices):
        return False
    return [ref.frame for ref in slices] == list(range(1, len(slices) + 1))


def _affine_positions(affine: np.ndarray, count: int) -> list[hd.PlanePositionSequence]:
    points = affine[:3, 0][None, :] * np.arange(count, dtype=np.float64)[:, None] + affine[:3, 3][None, :]
    return [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in p]) for p in points]


def _source_position(ref: SliceRef, ds: Dataset) -> hd.PlanePositionSequence:
    """The position of the source frame a slice is, as recorded in its instance."""
    if _frames(ds) == 1:
        return hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in ds.ImagePositionPatient])
    positions = hd.utils.get_plane_positions_of_image(ds)
    return positions[ref.frame - 1]


def _positions(volume: Volume, sources: Mapping[str, Dataset]) -> list[hd.PlanePositionSequence]:
    if volume.resampled or any(ref.tile is not None for ref in volume.slices):
        return _affine_positions(volume.affine, len(volume.slices))
    try:
        return [_source_position(ref, sources[ref.sop_instance_uid]) for ref in volume.slices]
    except (AttributeError, IndexError, KeyError, ValueError):  # a source without usable positions
        return _affine_positions(volume.affine, len(volume.slices))


def _thickness(instance: Dataset, spacing: float) -> float:
    value = instance.get("SliceThickness")
    return float(value) if value not in (None, "") and float(value) > 0 else spacing


def _measures(volume: Volume, first: Dataset) -> hd.PixelMeasuresSequence:
    slice_step, row_spacing, column_spacing = volume.spacing
    return hd.PixelMeasuresSequence(
        pixel_spacing=[row_spacing, column_spacing],
        slice_thickness=_thickness(first, slice_step),
        spacing_between_slices=slice_step,
    )


def _orientation(affine: np.ndarray) -> hd.PlaneOrientationSequence:
    row = affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # along a row: the column index grows
    column = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    return hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in (*row, *column)])


def plan_frames(volume: Volume, sources: Mapping[str, Dataset]) -> FramePlan:
    """How the frames of an object derived from ``volume`` lie, and which sources they cite.

    Parameters
    ----------
    volume
        The source volume; output frame ``k`` is its slice ``k``.
    sources
        SOP Instance UID -> dataset, for every instance ``volume.slices`` names.

    Raises
    ------
    EncodeError
        If a slice's source instance is not in ``sources``.
    """
    instances = _instances(volume, sources)
    others = _other_volumes(volume, sources, instances)
    if _on_source_grid(volume, instances):
        return FramePlan(tuple(instances), others)
    single = all(_frames(ds) == 1 for ds in instances)
    first, rest = (tuple(instances), ()) if single else ((instances[0],), tuple(instances[1:]))
    return FramePlan(
        source_images=first,
        further_source_images=rest + others,
        plane_positions=tuple(_positions(volume, sources)),
        pixel_measures=_measures(volume, instances[0]),
        plane_orientation=_orientation(volume.affine),
    )
