"""Single-frame Part 10 files to :class:`~gateway.assemble.model.Plane`\\ s, reading headers only.

Each plane carries the geometry the scanner wrote (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
PS3.3 C.7.6.2) and the keys that split a series into stacks (:mod:`gateway.assemble.stacks`):

- *stack keys*, which always separate volumes: ImageType, EchoNumbers;
- *dimension keys*, which only matter when slice positions repeat and then say what the fourth dimension is:
  TemporalPositionIdentifier, TriggerTime, AcquisitionNumber and diffusion (b-value, gradient direction).

Diffusion comes from DiffusionBValue / DiffusionGradientOrientation (PS3.3 C.8.13.5.9) and, when those are
absent, from the Siemens private tags under creator ``SIEMENS MR HEADER`` (0019,xx0C) B_value and (0019,xx0E)
DiffusionGradientDirection, which is what the Siemens VE11 diffusion series in ``dcm_qa_decubitus`` carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.dataset import Dataset

from gateway.assemble.model import Plane, SliceRef
from gateway.assemble.values import floats, scalar, siemens_private
from gateway.errors import AssemblyError

__all__ = [
    "DIMENSION_KEYS",
    "STACK_KEYS",
    "SeriesHeader",
    "plane_from_header",
    "read_header",
    "read_image_header",
    "read_plane",
    "read_planes",
    "require_image",
    "series_header",
]

STACK_KEYS: Final = ("SeriesInstanceUID", "ImageType", "EchoNumbers", "StackID", "EffectiveEchoTime")
"""Keys that always put planes in different stacks."""

DIMENSION_KEYS: Final = (
    "TemporalPositionIndex",
    "TemporalPositionIdentifier",
    "TriggerTime",
    "Diffusion",
    "AcquisitionNumber",
)
"""Keys tried in this order to separate planes that share a slice position (the fourth dimension)."""

_GRADIENT_DECIMALS: Final = 4


@dataclass(frozen=True)
class SeriesHeader:
    """Series-level attributes of one instance, needed to label a volume (no patient data).

    Parameters
    ----------
    series_instance_uid, study_instance_uid
        The series and study.
    frame_of_reference_uid
        FrameOfReferenceUID, or ``None``.
    modality
        Modality, or ``None``.
    """

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str | None


def _diffusion(ds: Dataset) -> tuple[float, tuple[float, ...] | None] | None:
    """The b-value and gradient direction, from the standard attributes or the Siemens private ones."""
    b_value: Any = ds.get("DiffusionBValue")
    gradient: Any = ds.get("DiffusionGradientOrientation")
    if b_value is None:
        b_value = siemens_private(ds, 0x0C)
        gradient = siemens_private(ds, 0x0E) if gradient is None else gradient
    if b_value is None or b_value == "":
        return None
    direction = None if not gradient else tuple(round(float(g), _GRADIENT_DECIMALS) for g in gradient)
    return float(b_value), direction


def _keys(ds: Dataset) -> tuple[tuple[str, Any], ...]:
    keys: list[tuple[str, Any]] = []
    for keyword in (*STACK_KEYS, *(k for k in DIMENSION_KEYS if k != "Diffusion")):
        value = scalar(ds, keyword)
        if value is not None:
            keys.append((keyword, value))
    diffusion = _diffusion(ds)
    if diffusion is not None:
        keys.append(("Diffusion", diffusion))
    return tuple(keys)


def _number(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def _six(values: tuple[float, ...]) -> tuple[float, float, float, float, float, float]:
    return (values[0], values[1], values[2], values[3], values[4], values[5])


def _plane(path: Path, ds: Dataset) -> Plane:
    orientation = floats(ds, "ImageOrientationPatient", 6)
    position = floats(ds, "ImagePositionPatient", 3)
    spacing = floats(ds, "PixelSpacing", 2)
    thickness = ds.get("SliceThickness")
    return Plane(
        ref=SliceRef(str(ds.SOPInstanceUID)),
        path=path,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        position=None if position is None else (position[0], position[1], position[2]),
        orientation=None if orientation is None else _six(orientation),
        pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
        rescale_slope=_number(ds, "RescaleSlope", 1.0),
        rescale_intercept=_number(ds, "RescaleIntercept", 0.0),
        keys=_keys(ds),
        slice_thickness=None if thickness in (None, "") else float(thickness),
    )


def read_header(path: Path) -> Dataset:
    """Read one file's header, without pixel data."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise AssemblyError(f"cannot read {path.name}: {type(exc).__name__}") from exc


def read_image_header(path: Path) -> Dataset:
    """:func:`read_header` of a file that must be an image (Rows, Columns and SOPInstanceUID present)."""
    return require_image(path, read_header(path))


def require_image(path: Path, ds: Dataset) -> Dataset:
    """Return ``ds``, the header of ``path``, if it is an image (Rows, Columns and SOPInstanceUID present).

    Raises
    ------
    AssemblyError
        When it is not.
    """
    if "Rows" not in ds or "Columns" not in ds or "SOPInstanceUID" not in ds:
        raise AssemblyError(f"{Path(path).name} is not an image (no Rows, Columns or SOPInstanceUID)")
    return ds


def series_header(ds: Dataset) -> SeriesHeader:
    """The series-level attributes of a header read by :func:`read_header`."""
    frame_of_reference = ds.get("FrameOfReferenceUID")
    modality = ds.get("Modality")
    return SeriesHeader(
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=None if not frame_of_reference else str(frame_of_reference),
        modality=None if not modality else str(modality),
    )


def read_plane(path: Path) -> tuple[Plane, SeriesHeader]:
    """Describe a single-frame image file as a plane, reading its header only.

    Parameters
    ----------
    path
        A DICOM Part 10 file holding one single-frame image.

    Returns
    -------
    tuple of (Plane, SeriesHeader)
        The plane (geometry, rescale, split keys) and the series-level attributes.

    Raises
    ------
    AssemblyError
        When the file cannot be read or is not a single-frame image (no Rows/Columns, NumberOfFrames > 1,
        a Siemens mosaic).
    """
    ds = read_header(Path(path))
    return plane_from_header(Path(path), ds), series_header(ds)


def plane_from_header(path: Path, ds: Dataset) -> Plane:
    """:func:`read_plane` for a header already read (see :func:`read_header`).

    Raises
    ------
    AssemblyError
        When ``ds`` is not a single-frame image.
    """
    require_image(path, ds)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise AssemblyError(f"{Path(path).name} is a multi-frame image; use gateway.assemble.multiframe")
    if "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", [])]:
        raise AssemblyError(f"{Path(path).name} is a Siemens mosaic; use gateway.assemble.mosaic")
    return _plane(Path(path), ds)


def read_planes(paths: Sequence[Path]) -> tuple[list[Plane], dict[str, SeriesHeader]]:
    """Read the planes of several files (see :func:`read_plane`).

    Parameters
    ----------
    paths
        Single-frame image files.

    Returns
    -------
    tuple of (list of Plane, dict)
        The planes in input order, and the series header of each SOPInstanceUID.
    """
    planes: list[Plane] = []
    headers: dict[str, SeriesHeader] = {}
    for path in paths:
        plane, header = read_plane(path)
        planes.append(plane)
        headers[plane.ref.sop_instance_uid] = header
    return planes, headers
