"""Siemens mosaics: one frame holding a whole 3D volume as a grid of tiles, to one :class:`Plane` per tile.

A mosaic is a single-frame MR image whose ImageType holds ``MOSAIC`` and whose Siemens CSA image header
(0029,xx10, creator ``SIEMENS CSA HEADER``) gives ``NumberOfImagesInMosaic`` (also in the private
(0019,xx0A) under ``SIEMENS MR HEADER``). The ``n`` slices are laid out row by row on a square grid of
``ceil(sqrt(n))`` tiles a side; unused tiles at the end are blank.

Geometry follows nibabel's ``MosaicWrapper`` and dcm2niix (``nii_dicom.cpp``), which agree:

- ImagePositionPatient is the centre-corrected corner of the *whole* mosaic frame; the first voxel of tile 0 lies
  at ``IPP + row_cosine * PixelSpacing[1] * (Columns - tile_columns) / 2
  + column_cosine * PixelSpacing[0] * (Rows - tile_rows) / 2``;
- tile ``t`` lies ``t * SpacingBetweenSlices`` (else SliceThickness) further along the slice normal, the cross
  product of the ImageOrientationPatient cosines with the sign of the CSA ``SliceNormalVector``.

Diffusion comes from the CSA ``B_value`` and ``DiffusionGradientDirection`` (patient LPS), else from the private
(0019,xx0C) and (0019,xx0E), and goes into ``keys`` as ``("Diffusion", (b_value, gradient or None))``, the form
:mod:`gateway.assemble.planes` uses, so that a diffusion series splits into one volume per mosaic file.

The CSA header is parsed with ``nibabel.nicom.csareader`` (imported on first use).
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from gateway.assemble.model import Plane, SliceRef
from gateway.assemble.planes import read_image_header
from gateway.assemble.values import floats, scalar, siemens_private
from gateway.errors import AssemblyError

__all__ = ["is_mosaic", "mosaic_grid", "mosaic_planes", "mosaic_tile_count", "split_mosaic"]

_GRADIENT_DECIMALS: Final = 4
_PARALLEL_TOLERANCE: Final = 1e-3
# The same keys as gateway.assemble.planes reads from single-frame images (stack keys, then dimension keys).
_HEADER_KEYS: Final = (
    "SeriesInstanceUID",
    "ImageType",
    "EchoNumbers",
    "TemporalPositionIdentifier",
    "TriggerTime",
    "AcquisitionNumber",
)

CsaHeader = dict[str, Any]


@functools.cache
def _csa_reader() -> ModuleType:
    """nibabel's CSA parser, imported once on first use (importing nibabel is not free)."""
    with warnings.catch_warnings():
        # nibabel.nicom warns on import that its DICOM *readers* are experimental; only the CSA parser is used.
        warnings.filterwarnings("ignore", message="The DICOM readers are highly experimental", category=UserWarning)
        from nibabel.nicom import csareader
    return csareader


def _csa_image_header(ds: Dataset) -> CsaHeader:
    """The parsed CSA image header (0029,xx10), or an empty dict when there is none."""
    reader = _csa_reader()
    try:
        header: CsaHeader | None = reader.get_csa_header(ds, "image")
    except (reader.CSAError, struct.error, ValueError, KeyError) as exc:
        raise AssemblyError(f"unreadable Siemens CSA image header: {exc}") from exc
    return header or {}


def _csa_items(csa: CsaHeader, name: str) -> list[Any]:
    items: list[Any] = csa.get("tags", {}).get(name, {}).get("items", [])
    return items


def mosaic_tile_count(ds: Dataset, csa: CsaHeader | None = None) -> int | None:
    """The number of slices in a mosaic: CSA NumberOfImagesInMosaic, else private (0019,xx0A).

    Parameters
    ----------
    ds
        The image's data set (header only is enough).
    csa
        Its parsed CSA image header, when already read.

    Returns
    -------
    int or None
        The count, or ``None`` when neither source gives a positive one.
    """
    items = _csa_items(_csa_image_header(ds) if csa is None else csa, "NumberOfImagesInMosaic")
    value = items[0] if items else siemens_private(ds, 0x0A)
    if value in (None, ""):
        return None
    count = int(value)
    return count if count > 0 else None


def is_mosaic(ds: Dataset) -> bool:
    """Whether ``ds`` is a Siemens mosaic: ImageType holds ``MOSAIC`` and the number of tiles is known.

    Parameters
    ----------
    ds
        The image's data set (header only is enough).

    Returns
    -------
    bool
        ``True`` for a mosaic.
    """
    return _typed_mosaic(ds) and mosaic_tile_count(ds) is not None


def _typed_mosaic(ds: Dataset) -> bool:
    image_type = ds.get("ImageType") or ()
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return "MOSAIC" in (str(v).upper() for v in values)


def mosaic_grid(n_tiles: int) -> int:
    """The number of tiles along each side of a mosaic holding ``n_tiles`` slices: ``ceil(sqrt(n_tiles))``.

    Parameters
    ----------
    n_tiles
        Slices in the mosaic (NumberOfImagesInMosaic), at least 1.

    Returns
    -------
    int
        Tiles per grid row and per grid column.
    """
    if n_tiles < 1:
        raise ValueError(f"n_tiles must be at least 1, got {n_tiles}")
    return math.isqrt(n_tiles - 1) + 1


def split_mosaic(frame: npt.NDArray[Any], n_tiles: int, tile_rows: int, tile_cols: int) -> npt.NDArray[Any]:
    """Cut a mosaic frame into its slices, tile ``t`` at grid row ``t // g`` and grid column ``t % g``.

    Parameters
    ----------
    frame
        The mosaic's pixels, ``(g * tile_rows, g * tile_cols)`` with ``g = mosaic_grid(n_tiles)``.
    n_tiles
        Slices in the mosaic; blank tiles after them are dropped.
    tile_rows, tile_cols
        The size of one tile.

    Returns
    -------
    numpy.ndarray
        ``(n_tiles, tile_rows, tile_cols)``, same dtype as ``frame``, a new array.

    Raises
    ------
    ValueError
        When ``frame`` is not 2D or its shape is not the grid of tiles the other arguments describe.
    """
    grid = mosaic_grid(n_tiles)
    expected = (grid * tile_rows, grid * tile_cols)
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile_rows and tile_cols must be positive, got {tile_rows} and {tile_cols}")
    if frame.shape != expected:
        raise ValueError(f"frame has shape {frame.shape}, expected {expected} for {n_tiles} tiles")
    blocks = frame.reshape(grid, tile_rows, grid, tile_cols).transpose(0, 2, 1, 3)
    return blocks.reshape(grid * grid, tile_rows, tile_cols)[:n_tiles].copy()


def _slice_normal(orientation: tuple[float, ...], csa: CsaHeader) -> npt.NDArray[np.float64]:
    """The unit normal of the cosines, with the sign of the CSA SliceNormalVector when there is one."""
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    items = _csa_items(csa, "SliceNormalVector")
    if len(items) != 3:
        return normal
    agreement = float(np.dot(normal, np.asarray(items, dtype=float)))
    if abs(abs(agreement) - 1.0) > _PARALLEL_TOLERANCE:
        raise AssemblyError("CSA SliceNormalVector is not normal to ImageOrientationPatient")
    return normal if agreement > 0 else -normal


def _slice_spacing(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = floats(ds, keyword, 1)
        if value is not None and value[0] > 0:
            return value[0]
    return None


def _tile_positions(
    ds: Dataset, csa: CsaHeader, n_tiles: int, tile_shape: tuple[int, int]
) -> list[tuple[float, float, float] | None]:
    """Where the first voxel of each tile lies (LPS, mm), or ``None`` each when the header lacks geometry."""
    position = floats(ds, "ImagePositionPatient", 3)
    orientation = floats(ds, "ImageOrientationPatient", 6)
    spacing = floats(ds, "PixelSpacing", 2)
    step = _slice_spacing(ds)
    if position is None or orientation is None or spacing is None or step is None:
        return [None] * n_tiles
    row_cosine, column_cosine = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    shift_rows = (int(ds.Rows) - tile_shape[0]) / 2
    shift_columns = (int(ds.Columns) - tile_shape[1]) / 2
    first = np.asarray(position) + row_cosine * spacing[1] * shift_columns + column_cosine * spacing[0] * shift_rows
    normal = _slice_normal(orientation, csa)
    points = first + np.outer(np.arange(n_tiles) * step, normal)
    return [(float(p[0]), float(p[1]), float(p[2])) for p in points]


def _diffusion(ds: Dataset, csa: CsaHeader) -> tuple[float, tuple[float, ...] | None] | None:
    b_items = _csa_items(csa, "B_value")
    b_value: Any = b_items[0] if b_items else siemens_private(ds, 0x0C)
    if b_value in (None, ""):
        return None
    gradient: Any = _csa_items(csa, "DiffusionGradientDirection")
    if len(gradient) != 3:
        gradient = siemens_private(ds, 0x0E)
    if gradient is None or len(gradient) != 3:
        return float(b_value), None
    return float(b_value), tuple(round(float(g), _GRADIENT_DECIMALS) for g in gradient)


def _keys(ds: Dataset, csa: CsaHeader) -> tuple[tuple[str, Any], ...]:
    keys = [(keyword, scalar(ds, keyword)) for keyword in _HEADER_KEYS]
    keys.append(("Diffusion", _diffusion(ds, csa)))
    return tuple((name, value) for name, value in keys if value is not None)


def _tile_shape(ds: Dataset, n_tiles: int, name: str) -> tuple[int, int]:
    grid = mosaic_grid(n_tiles)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows % grid or columns % grid:
        raise AssemblyError(f"{name}: a {rows}x{columns} mosaic cannot hold {n_tiles} tiles on a {grid}x{grid} grid")
    return rows // grid, columns // grid


def mosaic_planes(path: Path) -> list[Plane]:
    """Describe each slice of a Siemens mosaic as a plane, reading the header only.

    Parameters
    ----------
    path
        A DICOM Part 10 file holding one Siemens mosaic (see :func:`is_mosaic`).

    Returns
    -------
    list of Plane
        One plane per tile in tile order, ``SliceRef(uid, frame=1, tile=t)``, sized one tile, positioned as
        dcm2niix and nibabel do; ``position`` is ``None`` for all tiles when the header lacks
        ImagePositionPatient, ImageOrientationPatient, PixelSpacing or a slice spacing.

    Raises
    ------
    AssemblyError
        When the file cannot be read, is not a mosaic, its size does not fit the tile grid, or its CSA slice
        normal contradicts its orientation.
    """
    path = Path(path)
    ds = read_image_header(path)
    csa = _csa_image_header(ds)
    n_tiles = mosaic_tile_count(ds, csa)
    if n_tiles is None or not _typed_mosaic(ds):
        raise AssemblyError(f"{path.name} is not a Siemens mosaic (no MOSAIC ImageType or NumberOfImagesInMosaic)")
    tile_shape = _tile_shape(ds, n_tiles, path.name)
    positions = _tile_positions(ds, csa, n_tiles, tile_shape)
    orientation = floats(ds, "ImageOrientationPatient", 6)
    spacing = floats(ds, "PixelSpacing", 2)
    thickness = floats(ds, "SliceThickness", 1)
    keys = _keys(ds, csa)
    uid = str(ds.SOPInstanceUID)
    return [
        Plane(
            ref=SliceRef(uid, frame=1, tile=tile),
            path=path,
            rows=tile_shape[0],
            columns=tile_shape[1],
            position=position,
            orientation=None if orientation is None else _orientation(orientation),
            pixel_spacing=None if spacing is None else (spacing[0], spacing[1]),
            rescale_slope=_number(ds, "RescaleSlope", 1.0),
            rescale_intercept=_number(ds, "RescaleIntercept", 0.0),
            keys=keys,
            slice_thickness=None if thickness is None else thickness[0],
        )
        for tile, position in enumerate(positions)
    ]


def _orientation(values: tuple[float, ...]) -> tuple[float, float, float, float, float, float]:
    return (values[0], values[1], values[2], values[3], values[4], values[5])


def _number(ds: Dataset, keyword: str, default: float) -> float:
    found = floats(ds, keyword, 1)
    return default if found is None else found[0]
