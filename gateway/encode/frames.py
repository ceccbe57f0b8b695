"""Where the frames of a derived multi-frame object (SEG, Parametric Map) lie, and which source images they cite.

The rule: **every output frame lies on a real source image**, never at a position where the series has no image.
Where that cannot be done, :func:`plan_frames` raises :class:`~gateway.errors.EncodeError` with the reason (it is
recorded on the job). How the frames are laid out, by what assembly did (:mod:`gateway.assemble.geometry`):

- **Not resampled, same grid** (every slice a whole single-frame instance, or the slices all frames of one
  multi-frame instance in order; ``missing-slices`` included, as each slice is still its own source image): output
  frame ``k`` is volume slice ``k``; the source images are handed over in slice order and highdicom copies their
  positions, orientation and pixel spacing; every frame cites its source image (Derivation Image Sequence, Spatial
  Locations Preserved YES).
- **Not resampled, other layouts** (a subset or reordering of a multi-frame instance's frames, several multi-frame
  instances): output frame ``k`` is volume slice ``k`` at the Plane Position recorded for its source frame, so
  again on a real image; highdicom cites the source frame where it can (one multi-frame instance). Mosaic tiles
  take their positions from ``volume.affine`` (``affine @ [k, 0, 0, 1]``), which is where each tile lies.
- **Resampled** (``gantry-tilt`` shifted slices in-plane, ``uneven-spacing`` made the grid uniform along the
  normal and so filled any gap with interpolated slices): the volume's slices are not images of the series, so
  the frames are the source images themselves, one per :class:`~gateway.assemble.model.SourcePlane` in stack
  order. Each frame holds the volume's output on the plane's nearest slice put back on the source image's own
  pixel grid (:func:`~gateway.assemble.source_grid.source_stack`; nearest neighbour for segments, linear for
  maps; :meth:`FramePlan.frames` does it), lies at the source image's position (copied by highdicom) and cites
  that image alone (Spatial Locations Preserved YES). An interpolated slice inside a gap gets no frame.

Refused (:class:`~gateway.errors.EncodeError`): a resampled volume whose planes are frames of several multi-frame
instances, or of single-frame and multi-frame ones mixed (highdicom cites the frames of one multi-frame source
only), a resampled volume without source planes, resampled mosaic tiles, mosaic tiles with missing slices, and a
volume with missing slices whose source frames record no usable position (the affine is wrong past a gap, so no
position can stand in for theirs). A missing source instance is refused too.

Outputs laid over the source images by other encoders (presentation-state outlines, key images) use
:func:`source_images` and :func:`source_image_of_slice`: the source image (and frame) a volume slice lies on, and
its outputs moved onto that image's pixel grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from gateway.assemble.model import SliceRef, SourcePlane, Volume
from gateway.assemble.source_grid import on_planes, plane_of_slice, source_planes, to_source_plane
from gateway.errors import EncodeError

__all__ = ["FramePlan", "SourceImage", "plan_frames", "source_datasets", "source_image_of_slice", "source_images"]


@dataclass(frozen=True)
class FramePlan:
    """The geometry arguments of a highdicom multi-frame image, for a volume, and how its pixels become frames.

    ``plane_positions``, ``pixel_measures`` and ``plane_orientation`` are ``None`` where highdicom copies the
    sources'. ``further_source_images`` holds the instances past the first when there are several multi-frame
    ones (highdicom takes one multi-frame source image), and those of a 4D volume's other 3D volumes (the other
    b-values a diffusion model also read), cited as sources but not used for geometry. ``planes`` is empty when
    output frame ``k`` is volume slice ``k``; for a resampled volume it holds the source planes, frame ``i`` being
    source image ``planes[i]`` (pass every array through :meth:`frames`).
    """

    source_images: tuple[Dataset, ...]
    further_source_images: tuple[Dataset, ...] = ()
    plane_positions: tuple[hd.PlanePositionSequence, ...] | None = None
    pixel_measures: hd.PixelMeasuresSequence | None = None
    plane_orientation: hd.PlaneOrientationSequence | None = None
    planes: tuple[SourcePlane, ...] = ()

    @property
    def same_grid(self) -> bool:
        """Whether every frame is a source frame whose position highdicom copies from the sources."""
        return self.plane_positions is None

    def frames(self, array: npt.NDArray[Any], *, linear: bool = False, fill: float = 0) -> npt.NDArray[Any]:
        """The frames of the object from an array on the volume's grid.

        Parameters
        ----------
        array
            ``[slice, row, column]`` (or ``[slice, row, column, n]``) on the volume's grid.
        linear
            Interpolate linearly in-plane (parametric maps); nearest neighbour otherwise (segments).
        fill
            The value where a source image reaches outside the volume (gantry tilt).

        Returns
        -------
        numpy.ndarray
            ``array`` itself when frame ``k`` is slice ``k``, else one frame per source plane.
        """
        if not self.planes:
            return array
        return on_planes(array, self.planes, linear=linear, fill=fill)

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


def _dataset(ref: SliceRef, sources: Mapping[str, Dataset], what: str) -> Dataset:
    image = sources.get(ref.sop_instance_uid)
    if image is None:
        raise EncodeError(f"the source instance of {what} ({ref.sop_instance_uid}) was not given")
    return image


def _instances(refs: Sequence[SliceRef], sources: Mapping[str, Dataset], what: str) -> list[Dataset]:
    """The distinct source instances of ``refs``, in order of first use."""
    order: dict[str, Dataset] = {}
    for index, ref in enumerate(refs):
        if ref.sop_instance_uid not in order:
            order[ref.sop_instance_uid] = _dataset(ref, sources, f"{what} {index}")
    return list(order.values())


def _other_volumes(volume: Volume, sources: Mapping[str, Dataset], instances: Sequence[Dataset]) -> tuple[Dataset, ...]:
    """The instances of a 4D volume's other 3D volumes (other b-values, echoes, ...) that ``sources`` holds."""
    seen = {str(ds.SOPInstanceUID) for ds in instances}
    uids = dict.fromkeys(ref.sop_instance_uid for refs in volume.slices_4d for ref in refs)
    return tuple(sources[uid] for uid in uids if uid not in seen and uid in sources)


def _gaps(volume: Volume) -> bool:
    return any(flag.code == "missing-slices" for flag in volume.qc)


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


def _source_positions(refs: Sequence[SliceRef], sources: Mapping[str, Dataset]) -> list[hd.PlanePositionSequence]:
    """The positions of the source frames ``refs`` name, as recorded in their instances."""
    of_instance: dict[str, Sequence[hd.PlanePositionSequence]] = {}
    positions = []
    for ref in refs:
        ds = sources[ref.sop_instance_uid]
        if _frames(ds) == 1:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            positions.append(hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, ipp))
            continue
        if ref.sop_instance_uid not in of_instance:
            of_instance[ref.sop_instance_uid] = hd.utils.get_plane_positions_of_image(ds)
        positions.append(of_instance[ref.sop_instance_uid][ref.frame - 1])
    return positions


def _positions(volume: Volume, sources: Mapping[str, Dataset]) -> list[hd.PlanePositionSequence]:
    if any(ref.tile is not None for ref in volume.slices):
        if _gaps(volume):
            raise EncodeError("mosaic tiles with missing slices: the tile positions past the gap are not known")
        return _affine_positions(volume.affine, len(volume.slices))
    try:
        return _source_positions(volume.slices, sources)
    except (AttributeError, IndexError, KeyError, ValueError) as exc:  # a source without usable positions
        if _gaps(volume):
            raise EncodeError(
                "the series has missing slices and its source frames record no usable position, so the frames "
                "past the gap cannot be placed on their source images"
            ) from exc
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


def _check_resampled(volume: Volume) -> tuple[SourcePlane, ...]:
    planes = volume.source_planes
    if not planes:
        raise EncodeError(
            "the volume was resampled but assembly recorded no source planes, so its frames cannot be put on "
            "the source images"
        )
    if any(plane.ref.tile is not None for plane in planes):
        raise EncodeError("a resampled mosaic: its tiles are not images of their own that frames can be put on")
    return planes


def _plan_on_source_images(volume: Volume, sources: Mapping[str, Dataset]) -> FramePlan:
    """The frames of a resampled volume: one per source plane, on that source image."""
    planes = _check_resampled(volume)
    refs = [plane.ref for plane in planes]
    instances = _instances(refs, sources, "source plane")
    others = _other_volumes(volume, sources, instances)
    if all(_frames(ds) == 1 for ds in instances):
        return FramePlan(tuple(instances), others, planes=planes)
    if len(instances) > 1:
        raise EncodeError(
            f"the resampled series' images are frames of {len(instances)} instances, not of one multi-frame "
            "instance: a SEG or Parametric Map can cite the frames of one only, so its frames cannot be put "
            "on the source images"
        )
    try:
        positions = _source_positions(refs, sources)
    except (AttributeError, IndexError, KeyError, ValueError) as exc:
        raise EncodeError(
            "the resampled multi-frame source records no usable frame positions, so the frames cannot be put "
            "on its images"
        ) from exc
    return FramePlan((instances[0],), others, plane_positions=tuple(positions), planes=planes)


def plan_frames(volume: Volume, sources: Mapping[str, Dataset]) -> FramePlan:
    """How the frames of an object derived from ``volume`` lie, and which sources they cite (module docstring).

    Parameters
    ----------
    volume
        The source volume.
    sources
        SOP Instance UID -> dataset, for every instance ``volume.slices`` names (and, when the volume was
        resampled, every instance its ``source_planes`` name).

    Returns
    -------
    FramePlan
        The highdicom geometry arguments; pass the pixel arrays through :meth:`FramePlan.frames`.

    Raises
    ------
    EncodeError
        If a source instance is not in ``sources``, or a frame cannot be put on a source image.
    """
    if volume.resampled:
        return _plan_on_source_images(volume, sources)
    instances = _instances(volume.slices, sources, "slice")
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


# -- for outputs laid over the source images (presentation-state outlines, key images) ------------------------


@dataclass(frozen=True)
class SourceImage:
    """A source image (or one frame of it) and where a volume's slice lies on it.

    What a presentation state's outline (PS3.3 C.10.5 Graphic Annotation) or a key object (PS3.3 C.17.6)
    references: ``dataset`` and ``frame``, with the outline drawn in the image's own pixel coordinates
    (:meth:`mask`, :meth:`points`).

    Parameters
    ----------
    dataset
        The source instance.
    frame
        Its 1-based frame number (1 for a single-frame image); cite it as ReferencedFrameNumber when
        :attr:`multiframe`.
    plane
        The source plane: the volume slice it shows (``plane.slice``) and the in-plane shift.
    offset_mm
        How far the volume slice asked for lies from this image along the slice normal (0 when it lies on it).
    origin
        ``(row, column)`` of the slice's first pixel in the image: the tile's corner in a Siemens mosaic frame,
        else ``(0, 0)``.
    """

    dataset: Dataset
    frame: int
    plane: SourcePlane
    offset_mm: float = 0.0
    origin: tuple[int, int] = (0, 0)

    @property
    def sop_instance_uid(self) -> str:
        """The image's SOP Instance UID."""
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        """The image's SOP Class UID."""
        return str(self.dataset.SOPClassUID)

    @property
    def multiframe(self) -> bool:
        """Whether the image is a multi-frame one (reference :attr:`frame` then)."""
        return _frames(self.dataset) > 1

    @property
    def shape(self) -> tuple[int, int]:
        """The image's (Rows, Columns)."""
        return int(self.dataset.Rows), int(self.dataset.Columns)

    def mask(self, slice_image: npt.NDArray[Any], *, linear: bool = False, fill: float = 0) -> npt.NDArray[Any]:
        """A 2D array on volume slice ``plane.slice`` as it lies on this image's pixel grid, ``[Rows, Columns]``.

        Parameters
        ----------
        slice_image
            ``[rows, columns]`` on the volume's grid, the slice ``plane.slice``.
        linear
            Interpolate linearly (values); nearest neighbour otherwise (masks, labels).
        fill
            The value where the image reaches outside the slice (a gantry-tilt shift, the rest of a mosaic).
        """
        moved = to_source_plane(slice_image, self.plane, linear=linear, fill=fill)
        if self.origin == (0, 0) and moved.shape == self.shape:
            return moved
        out = np.full(self.shape, fill, dtype=moved.dtype)
        (r, c), (rows, columns) = self.origin, moved.shape
        out[r : r + rows, c : c + columns] = moved
        return out

    def points(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Points ``[n, 2]`` given as ``(row, column)`` pixel indices on volume slice ``plane.slice`` (pixel centres
        at integers), as ``(row, column)`` pixel indices on this image."""
        array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        shift = np.asarray(self.plane.shift, dtype=np.float64) - np.asarray(self.origin, dtype=np.float64)
        moved: npt.NDArray[np.float64] = array - shift
        return moved


def _frame_position(ds: Dataset, frame: int) -> npt.NDArray[np.float64] | None:
    """ImagePositionPatient of a frame, or ``None`` when the image records none."""
    try:
        if _frames(ds) == 1:
            return np.asarray([float(v) for v in ds.ImagePositionPatient])
        groups = ds.PerFrameFunctionalGroupsSequence[frame - 1]
        group = groups if "PlanePositionSequence" in groups else ds.SharedFunctionalGroupsSequence[0]
        return np.asarray([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
    except (AttributeError, IndexError, KeyError, ValueError):
        return None


def _offset_mm(volume: Volume, plane: SourcePlane, ds: Dataset, index: int) -> float:
    """Distance along the normal from volume slice ``index`` to the plane (the affine holds after resampling)."""
    if plane.exact and plane.slice == index:
        return 0.0
    position = _frame_position(ds, plane.ref.frame)
    step = volume.affine[:3, 0]
    if position is None or not volume.source_planes:
        return float(abs(plane.slice - index) * np.linalg.norm(step))
    return float(np.dot(position - volume.affine[:3, 3], step) / np.linalg.norm(step) - index * np.linalg.norm(step))


def _tile_origin(ref: SliceRef, ds: Dataset, volume: Volume) -> tuple[int, int]:
    if ref.tile is None:
        return (0, 0)
    rows, columns = volume.array.shape[-2:]
    per_row = max(int(ds.Columns) // columns, 1)
    return (ref.tile // per_row * rows, ref.tile % per_row * columns)


def _source_image(volume: Volume, plane: SourcePlane, sources: Mapping[str, Dataset], index: int) -> SourceImage:
    ds = _dataset(plane.ref, sources, f"source plane of slice {plane.slice}")
    origin = _tile_origin(plane.ref, ds, volume)
    return SourceImage(ds, plane.ref.frame, plane, _offset_mm(volume, plane, ds, index), origin)


def source_datasets(volume: Volume, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """The distinct source instances of the (first 3D) volume's images, in stack order: what an object derived from
    the whole volume cites as its evidence.

    Raises
    ------
    EncodeError
        If a source instance is not in ``sources``.
    """
    return _instances([plane.ref for plane in source_planes(volume)], sources, "source image")


def source_images(volume: Volume, sources: Mapping[str, Dataset]) -> tuple[SourceImage, ...]:
    """Every source image (plane) of the (first 3D) volume in stack order, each with the slice it shows.

    For a volume that was not resampled this is one image per slice, slice ``k`` on image ``k``; after resampling,
    one per source plane, several of which may show the same slice and none an interpolated slice in a gap.

    Parameters
    ----------
    volume
        The source volume.
    sources
        SOP Instance UID -> dataset, for every instance the volume's slices and source planes name.

    Raises
    ------
    EncodeError
        If a source instance is not in ``sources``.
    """
    return tuple(_source_image(volume, plane, sources, plane.slice) for plane in source_planes(volume))


def source_image_of_slice(
    volume: Volume, index: int, sources: Mapping[str, Dataset], *, max_offset_mm: float | None = None
) -> SourceImage:
    """The source image nearest to volume slice ``index``: what an outline or key image of that slice goes on.

    Parameters
    ----------
    volume
        The source volume.
    index
        A slice of the volume (array order).
    sources
        SOP Instance UID -> dataset, for every instance the volume's slices and source planes name.
    max_offset_mm
        Refuse when the nearest image lies further than this from the slice along the normal (a slice that
        uneven-spacing resampling interpolated inside a gap); ``None`` takes the nearest image however far.

    Raises
    ------
    EncodeError
        If the slice is not in the volume, its source instance is not in ``sources``, or the nearest image lies
        further than ``max_offset_mm``.
    """
    if not 0 <= index < len(volume.slices):
        raise EncodeError(f"slice {index} is not in the volume ({len(volume.slices)} slices)")
    image = _source_image(volume, plane_of_slice(volume, index), sources, index)
    if max_offset_mm is not None and abs(image.offset_mm) > max_offset_mm:
        raise EncodeError(
            f"slice {index} lies {abs(image.offset_mm):.3g} mm from the nearest source image (missing slices): "
            "nothing is drawn where the series has no image"
        )
    return image
