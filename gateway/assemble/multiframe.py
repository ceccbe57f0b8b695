"""Multi-frame Part 10 files to :class:`~gateway.assemble.model.Plane`\\ s, one per frame, reading headers only.

Enhanced objects (Enhanced CT/MR/PET, Legacy Converted Enhanced, ...) describe each frame with functional groups
(PS3.3 C.7.6.16): a macro in the frame's item of the Per-frame Functional Groups Sequence wins over the same macro
in the Shared Functional Groups Sequence. The macros read here:

- Plane Position (Patient) (C.7.6.16.2.3): ``PlanePositionSequence`` > ImagePositionPatient;
- Plane Orientation (Patient) (C.7.6.16.2.4): ``PlaneOrientationSequence`` > ImageOrientationPatient;
- Pixel Measures (C.7.6.16.2.1): ``PixelMeasuresSequence`` > PixelSpacing, SliceThickness;
- Pixel Value Transformation (C.7.6.16.2.9): ``PixelValueTransformationSequence`` > RescaleSlope/Intercept;
- Frame Content (C.7.6.16.2.2): ``FrameContentSequence`` > StackID, TemporalPositionIndex;
- the modality's frame type (``MRImageFrameTypeSequence``, ``CTImageFrameTypeSequence``, ... > FrameType), MR Echo
  (C.8.13.5.2: EffectiveEchoTime) and MR Diffusion (C.8.13.5.9: DiffusionBValue, DiffusionGradientOrientation).

The keys that split stacks use the names of :mod:`gateway.assemble.planes` where the meaning is the same
(``SeriesInstanceUID``, ``ImageType`` from FrameType, ``Diffusion`` as ``(b-value, gradient or None)``) and the
DICOM names otherwise (``StackID``, ``EffectiveEchoTime``, ``TemporalPositionIndex``). InStackPositionNumber and
the Dimension Index Values order frames within a stack; they are not keys, since slice positions already do that.

Classic multi-frame objects (NM, US, Secondary Capture, RT Dose, ...) have no functional groups: every frame gets
the top-level orientation, pixel spacing and rescale. A frame's position is known only for a single frame (the
top-level ImagePositionPatient) and for RT Dose (GridFrameOffsetVector, C.8.8.3.2); otherwise it is ``None`` and
stacking decides what to do with such planes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydicom.dataset import Dataset

from gateway.assemble.model import Plane, SliceRef
from gateway.assemble.planes import read_image_header
from gateway.assemble.values import floats
from gateway.errors import AssemblyError

__all__ = ["enhanced_planes", "is_enhanced"]

_GRADIENT_DECIMALS: Final = 4
_EMPTY: Final = Dataset()

Geometry = tuple[
    tuple[float, float, float] | None,
    tuple[float, float, float, float, float, float] | None,
    tuple[float, float] | None,
]


def _number(ds: Dataset, keyword: str) -> float | None:
    found = floats(ds, keyword, 1)
    return None if found is None else found[0]


def _integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    return None if value in (None, "") else int(value)


def _strings(ds: Dataset, keyword: str) -> tuple[str, ...] | None:
    value = ds.get(keyword)
    if not value:
        return None
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def _macro(groups: Iterable[Dataset], sequence: str) -> Dataset:
    """The first item of ``sequence`` in the first group holding it (per-frame before shared), else empty."""
    for group in groups:
        items = group.get(sequence)
        if items:
            item: Dataset = items[0]
            return item
    return _EMPTY


def _frame_count(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    count = 1 if value in (None, "") else int(value)
    if count < 1:
        raise AssemblyError(f"NumberOfFrames is {count}")
    return count


def is_enhanced(ds: Dataset) -> bool:
    """Whether ``ds`` describes its frames with functional groups (PS3.3 C.7.6.16).

    Parameters
    ----------
    ds
        A data set (header only is enough).

    Returns
    -------
    bool
        ``True`` when it has a Per-frame or Shared Functional Groups Sequence.
    """
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _geometry(groups: Sequence[Dataset], top: Dataset, single_frame: bool) -> Geometry:
    """Position, orientation and pixel spacing from the groups, falling back to the top level where that is safe.

    The top-level ImagePositionPatient is used only for a single frame: for several frames it cannot say which.
    """
    position = floats(_macro(groups, "PlanePositionSequence"), "ImagePositionPatient", 3)
    if position is None and single_frame:
        position = floats(top, "ImagePositionPatient", 3)
    orientation = floats(_macro(groups, "PlaneOrientationSequence"), "ImageOrientationPatient", 6)
    orientation = orientation or floats(top, "ImageOrientationPatient", 6)
    spacing = floats(_macro(groups, "PixelMeasuresSequence"), "PixelSpacing", 2) or floats(top, "PixelSpacing", 2)
    o = orientation or ()
    return (
        None if position is None else (position[0], position[1], position[2]),
        None if orientation is None else (o[0], o[1], o[2], o[3], o[4], o[5]),
        None if spacing is None else (spacing[0], spacing[1]),
    )


def _frame_type(groups: Sequence[Dataset]) -> tuple[str, ...] | None:
    """FrameType from the modality's ``...FrameTypeSequence`` (MR, CT, PET, ...), per-frame before shared."""
    for group in groups:
        for element in group:
            if element.keyword.endswith("FrameTypeSequence") and element.VR == "SQ" and element.value:
                found = _strings(element.value[0], "FrameType")
                if found:
                    return found
    return None


def _diffusion(groups: Sequence[Dataset]) -> tuple[float, tuple[float, ...] | None] | None:
    """``(b-value, gradient direction or None)`` from the MR Diffusion macro (PS3.3 C.8.13.5.9)."""
    item = _macro(groups, "MRDiffusionSequence")
    b_value = _number(item, "DiffusionBValue")
    if b_value is None:
        return None
    gradient = floats(_macro([item], "DiffusionGradientDirectionSequence"), "DiffusionGradientOrientation", 3)
    direction = None if gradient is None else tuple(round(g, _GRADIENT_DECIMALS) for g in gradient)
    return b_value, direction


def _frame_keys(groups: Sequence[Dataset], top: Dataset) -> tuple[tuple[str, Any], ...]:
    content = _macro(groups, "FrameContentSequence")
    image_type = _frame_type(groups) or _strings(top, "ImageType")
    candidates: list[tuple[str, Any]] = [
        ("SeriesInstanceUID", str(top.get("SeriesInstanceUID", "")) or None),
        ("ImageType", image_type),
        ("StackID", str(content.get("StackID", "")) or None),
        ("EffectiveEchoTime", _number(_macro(groups, "MREchoSequence"), "EffectiveEchoTime")),
        ("TemporalPositionIndex", _integer(content, "TemporalPositionIndex")),
        ("Diffusion", _diffusion(groups)),
    ]
    return tuple((name, value) for name, value in candidates if value is not None)


def _rescale(groups: Sequence[Dataset], top: Dataset) -> tuple[float, float]:
    item = _macro(groups, "PixelValueTransformationSequence")
    slope = _number(item, "RescaleSlope")
    intercept = _number(item, "RescaleIntercept")
    if slope is None:
        # RT Dose scales its grid with DoseGridScaling (C.8.8.3) instead of RescaleSlope.
        slope = _number(top, "RescaleSlope") or _number(top, "DoseGridScaling")
    if intercept is None:
        intercept = _number(top, "RescaleIntercept")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _thickness(groups: Sequence[Dataset], top: Dataset) -> float | None:
    found = _number(_macro(groups, "PixelMeasuresSequence"), "SliceThickness")
    return found if found is not None else _number(top, "SliceThickness")


def _plane(path: Path, top: Dataset, frame: int, groups: Sequence[Dataset], single_frame: bool) -> Plane:
    position, orientation, spacing = _geometry(groups, top, single_frame)
    slope, intercept = _rescale(groups, top)
    return Plane(
        ref=SliceRef(str(top.SOPInstanceUID), frame=frame),
        path=path,
        rows=int(top.Rows),
        columns=int(top.Columns),
        position=position,
        orientation=orientation,
        pixel_spacing=spacing,
        rescale_slope=slope,
        rescale_intercept=intercept,
        keys=_frame_keys(groups, top),
        slice_thickness=_thickness(groups, top),
    )


def _functional_group_planes(path: Path, ds: Dataset, count: int) -> list[Plane]:
    per_frame: Sequence[Dataset] = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, count):
        raise AssemblyError(
            f"{path.name}: PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {count} frames"
        )
    shared_items = ds.get("SharedFunctionalGroupsSequence") or []
    shared: Dataset = shared_items[0] if shared_items else _EMPTY
    frames = per_frame or [_EMPTY] * count
    return [
        _plane(path, ds, k, (frame_group, shared), single_frame=count == 1) for k, frame_group in enumerate(frames, 1)
    ]


def _grid_positions(ds: Dataset, count: int) -> list[tuple[float, float, float] | None] | None:
    """Frame positions of an RT Dose grid: ImagePositionPatient moved along the normal by GridFrameOffsetVector.

    The offsets are relative to the first frame when the first one is 0, else absolute coordinates along the
    normal (C.8.8.3.2); subtracting the first offset covers both.
    """
    offsets = ds.get("GridFrameOffsetVector")
    origin = floats(ds, "ImagePositionPatient", 3)
    orientation = floats(ds, "ImageOrientationPatient", 6)
    if offsets is None or origin is None or orientation is None:
        return None
    values = [float(v) for v in (offsets if isinstance(offsets, Sequence) else [offsets])]
    if len(values) != count:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    points = np.asarray(origin) + np.outer(np.asarray(values) - values[0], normal)
    return [(float(p[0]), float(p[1]), float(p[2])) for p in points]


def _classic_planes(path: Path, ds: Dataset, count: int) -> list[Plane]:
    planes = [_plane(path, ds, k, (), single_frame=count == 1) for k in range(1, count + 1)]
    positions = _grid_positions(ds, count) if count > 1 else None
    if positions is None:
        return planes
    return [replace(plane, position=position) for plane, position in zip(planes, positions, strict=True)]


def enhanced_planes(path: Path) -> list[Plane]:
    """Describe each frame of a multi-frame image file as a plane, reading its header only.

    Parameters
    ----------
    path
        A DICOM Part 10 file: an enhanced multi-frame image (functional groups, PS3.3 C.7.6.16) or a classic
        multi-frame one (NM, US, SC, RT Dose, ...). A single-frame image gives one plane.

    Returns
    -------
    list of Plane
        One plane per frame in frame order, ``ref.frame`` 1-based. ``position`` is ``None`` where the file does
        not say where the frame lies (classic multi-frame other than RT Dose).

    Raises
    ------
    AssemblyError
        When the file cannot be read, is not an image, or its per-frame groups do not match NumberOfFrames.
    """
    path = Path(path)
    ds = read_image_header(path)
    count = _frame_count(ds)
    if is_enhanced(ds):
        return _functional_group_planes(path, ds, count)
    return _classic_planes(path, ds, count)
