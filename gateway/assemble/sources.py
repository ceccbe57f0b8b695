"""Where planes and their pixels come from: single-frame files, multi-frame objects, Siemens mosaics.

:func:`read_sources` turns any image file into its planes (one per frame, or per mosaic tile);
:func:`modality_frames` decodes the pixels of a list of planes in parallel and returns their modality values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from gateway.assemble.decode import decode_frames
from gateway.assemble.model import Plane
from gateway.assemble.mosaic import is_mosaic, mosaic_planes, mosaic_tile_count, split_mosaic
from gateway.assemble.multiframe import enhanced_planes
from gateway.assemble.pixels import ModalityTransform, modality_values
from gateway.assemble.planes import SeriesHeader, plane_from_header, read_image_header, series_header
from gateway.errors import AssemblyError

_BLOCK = 32  # planes converted per call: vectorised, with bounded temporaries


@dataclass(frozen=True)
class SourceFile:
    """One image file: its planes, its series-level attributes and what its pixels need."""

    path: Path
    planes: tuple[Plane, ...]
    header: SeriesHeader
    transform: ModalityTransform
    mosaic_tiles: int | None


def read_source(path: Path) -> SourceFile:
    """Read one file's header and describe its planes.

    Raises
    ------
    AssemblyError
        When the file is not an image or its geometry headers cannot be understood.
    """
    ds = read_image_header(path)
    planes = _planes(path, ds)
    tiles = mosaic_tile_count(ds) if is_mosaic(ds) else None
    return SourceFile(path, tuple(planes), series_header(ds), ModalityTransform.from_dataset(ds), tiles)


def _planes(path: Path, ds: Dataset) -> list[Plane]:
    if is_mosaic(ds):
        return mosaic_planes(path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return enhanced_planes(path)
    return [plane_from_header(path, ds)]


def modality_frames(
    planes: Sequence[Plane], sources: dict[Path, SourceFile]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]:
    """Decode ``planes`` (in parallel) and return their modality values ``[plane, row, column]`` and padding mask.

    Raises
    ------
    DecodeError
        When a frame cannot be decoded.
    AssemblyError
        When a decoded frame does not have the size its header declares.
    """
    keys = [(p.path, p.ref.frame) for p in planes]
    decoded = dict(zip(sorted(set(keys)), decode_frames(sorted(set(keys))), strict=True))
    uses = Counter(keys)
    first = planes[0]
    values = np.empty((len(planes), first.rows, first.columns), np.float32)  # filled in place: no list, no copy
    mask_stack: npt.NDArray[np.bool_] | None = None
    for start, stop in _runs(planes, sources):
        block = []
        for k in range(start, stop):
            block.append(_tile(decoded[keys[k]], planes[k], sources[planes[k].path]))
            uses[keys[k]] -= 1
            if not uses[keys[k]]:
                del decoded[keys[k]]  # no longer needed: peak memory stays near the output's size
        transform = sources[planes[start].path].transform
        target = values[start:stop]
        value, mask = modality_values(np.stack(block), transform, planes[start], out=target)
        if value is not target:
            target[...] = value
        if mask is not None:
            if mask_stack is None:
                mask_stack = np.zeros(values.shape, bool)
            mask_stack[start:stop] = mask
    return values, mask_stack


def _runs(planes: Sequence[Plane], sources: dict[Path, SourceFile]) -> list[tuple[int, int]]:
    """Consecutive planes that share one pixel transform, in blocks of at most ``_BLOCK`` (one vectorised call each)."""

    def key(plane: Plane) -> object:
        transform = sources[plane.path].transform
        if transform.modality_lut is not None:
            return object()  # a lookup table: never merged with another plane
        return (transform, plane.rescale_slope, plane.rescale_intercept, plane.rows, plane.columns)

    runs: list[tuple[int, int]] = []
    start = 0
    for k in range(1, len(planes) + 1):
        if k == len(planes) or k - start == _BLOCK or key(planes[k]) != key(planes[start]):
            runs.append((start, k))
            start = k
    return runs


def _tile(frame: npt.NDArray[np.generic], plane: Plane, source: SourceFile) -> npt.NDArray[np.generic]:
    if plane.ref.tile is not None:
        if source.mosaic_tiles is None:
            raise AssemblyError(f"{plane.path.name}: a mosaic tile was asked of a file that is not a mosaic")
        frame = split_mosaic(frame, source.mosaic_tiles, plane.rows, plane.columns)[plane.ref.tile]
    if frame.shape[:2] != (plane.rows, plane.columns):
        raise AssemblyError(f"decoded frame is {frame.shape}, header says {plane.rows}x{plane.columns}")
    return frame
