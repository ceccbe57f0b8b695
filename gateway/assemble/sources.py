"""Where planes and their pixels come from: single-frame files, multi-frame objects, Siemens mosaics.

:func:`read_source` turns any image file into its planes (one per frame, or per mosaic tile), reading its header
once; :func:`modality_frames` gets the pixels of a list of planes and returns their modality values. Uncompressed
little-endian frames are read straight from their files into a reused block (:mod:`gateway.assemble.native`);
the rest are decoded in parallel (:mod:`gateway.assemble.decode`).
"""

from __future__ import annotations

import math
import mmap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from gateway.assemble.decode import decode_frames
from gateway.assemble.model import Plane
from gateway.assemble.mosaic import is_mosaic, mosaic_planes, mosaic_tile_count, split_mosaic
from gateway.assemble.multiframe import enhanced_planes
from gateway.assemble.native import NativePixels, read_header_and_pixels, read_native_frames
from gateway.assemble.pixels import ModalityTransform, modality_values
from gateway.assemble.planes import SeriesHeader, plane_from_header, require_image, series_header
from gateway.errors import AssemblyError

_BLOCK: Final = 8  # planes per call: vectorised, and 8 frames of 512x512 (4 MB) stay in cache from read to convert
_POPULATE_BYTES: Final = 16 << 20  # outputs from this size up are mapped with their pages already in place

FrameKey = tuple[Path, int]


@dataclass(frozen=True)
class SourceFile:
    """One image file: its planes, its series-level attributes and what its pixels need.

    ``pixels`` says where its frames lie when they are uncompressed little endian (read without a decoder).
    """

    path: Path
    planes: tuple[Plane, ...]
    header: SeriesHeader
    transform: ModalityTransform
    mosaic_tiles: int | None
    pixels: NativePixels | None = None


def read_source(path: Path) -> SourceFile:
    """Read one file's header and describe its planes.

    Raises
    ------
    AssemblyError
        When the file is not an image or its geometry headers cannot be understood.
    """
    path = Path(path)
    try:
        ds, pixels = read_header_and_pixels(path)
    except (OSError, InvalidDicomError) as exc:
        raise AssemblyError(f"cannot read {path.name}: {type(exc).__name__}") from exc
    return source_from_header(path, ds, pixels)


def source_from_header(path: Path, ds: Dataset, pixels: NativePixels | None = None) -> SourceFile:
    """:func:`read_source` for a header already read (without pixel data).

    Parameters
    ----------
    path
        The file.
    ds
        Its header.
    pixels
        Where its frames lie, from :func:`~gateway.assemble.native.read_header_and_pixels`; ``None`` decodes them.

    Raises
    ------
    AssemblyError
        When the file is not an image or its geometry headers cannot be understood.
    """
    require_image(path, ds)
    planes = _planes(path, ds)
    tiles = mosaic_tile_count(ds) if is_mosaic(ds) else None
    return SourceFile(path, tuple(planes), series_header(ds), ModalityTransform.from_dataset(ds), tiles, pixels)


def _planes(path: Path, ds: Dataset) -> list[Plane]:
    if is_mosaic(ds):
        return mosaic_planes(path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return enhanced_planes(path)
    return [plane_from_header(path, ds)]


def modality_frames(
    planes: Sequence[Plane], sources: dict[Path, SourceFile]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]:
    """Read or decode ``planes`` and return their modality values ``[plane, row, column]`` and padding mask.

    Raises
    ------
    DecodeError
        When a frame cannot be read or decoded.
    AssemblyError
        When a decoded frame does not have the size its header declares.
    """
    first = planes[0]
    frames = _Frames(planes, sources)  # decodes now what cannot be read natively
    shape = (len(planes), first.rows, first.columns)
    values = _empty_float32(shape, populate=not frames.decoded)  # filled in place: no list, no copy
    mask_stack: npt.NDArray[np.bool_] | None = None
    for start, stop in _runs(planes, sources):
        target = values[start:stop]
        value, mask = modality_values(
            frames.block(start, stop), sources[planes[start].path].transform, planes[start], out=target
        )
        if value is not target:
            target[...] = value
        if mask is not None:
            if mask_stack is None:
                mask_stack = np.zeros(values.shape, bool)
            mask_stack[start:stop] = mask
    return values, mask_stack


def _empty_float32(shape: tuple[int, ...], *, populate: bool) -> npt.NDArray[np.float32]:
    """An uninitialised float32 array; with ``populate``, a large one is mapped with its pages already present
    (Linux ``MAP_POPULATE``).

    Every byte of the output is written, so its pages are all touched anyway; faulting them in one by one on first
    write cost 0.15-0.65 s for a 315 MB volume on this project's 2-core VM (numpy's transparent-huge-page advice
    makes that range wide), mapping them populated 0.1 s. Not while decoded frames are held: committing the whole
    output at once would add it to their memory, where filling it block by block as they are dropped does not.
    """
    nbytes = math.prod(shape) * 4
    flag = getattr(mmap, "MAP_POPULATE", 0)
    if not (populate and flag) or nbytes < _POPULATE_BYTES:
        return np.empty(shape, np.float32)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
    return np.frombuffer(buffer, np.float32).reshape(shape)


def _native(plane: Plane, sources: dict[Path, SourceFile]) -> NativePixels | None:
    """Where the plane's frame lies in its file, when it can be read without decoding (not a mosaic tile)."""
    return sources[plane.path].pixels if plane.ref.tile is None else None


class _Frames:
    """The stored values of blocks of planes: native frames read into a reused buffer, the others decoded once."""

    def __init__(self, planes: Sequence[Plane], sources: dict[Path, SourceFile]) -> None:
        self.planes, self.sources = planes, sources
        keys = [(p.path, p.ref.frame) for p in planes if _native(p, sources) is None]
        unique = sorted(set(keys))
        self.decoded: dict[FrameKey, npt.NDArray[Any]] = dict(zip(unique, decode_frames(unique), strict=True))
        self.uses = Counter(keys)
        self.buffers: dict[tuple[str, int, int], npt.NDArray[Any]] = {}

    def block(self, start: int, stop: int) -> npt.NDArray[Any]:
        """Stored values ``[plane, row, column]`` of ``planes[start:stop]`` (all native, or none)."""
        pixels = _native(self.planes[start], self.sources)
        return self._decoded(start, stop) if pixels is None else self._read(start, stop, pixels)

    def _read(self, start: int, stop: int, pixels: NativePixels) -> npt.NDArray[Any]:
        first = self.planes[start]
        key = (pixels.dtype, first.rows, first.columns)
        if key not in self.buffers:
            self.buffers[key] = np.empty((_BLOCK, first.rows, first.columns), pixels.dtype)
        out = self.buffers[key][: stop - start]
        requests = []
        for plane in self.planes[start:stop]:
            native = _native(plane, self.sources)
            assert native is not None
            requests.append((plane.path, plane.ref.frame, native))
        return read_native_frames(requests, out)

    def _decoded(self, start: int, stop: int) -> npt.NDArray[Any]:
        block = []
        for plane in self.planes[start:stop]:
            key = (plane.path, plane.ref.frame)
            block.append(_tile(self.decoded[key], plane, self.sources[plane.path]))
            self.uses[key] -= 1
            if not self.uses[key]:
                del self.decoded[key]  # no longer needed: peak memory stays near the output's size
        return np.stack(block)


def _runs(planes: Sequence[Plane], sources: dict[Path, SourceFile]) -> list[tuple[int, int]]:
    """Consecutive planes that share one pixel transform and source kind, in blocks of at most ``_BLOCK`` (one
    vectorised call each)."""

    def key(plane: Plane) -> object:
        transform = sources[plane.path].transform
        if transform.modality_lut is not None:
            return object()  # a lookup table: never merged with another plane
        pixels = _native(plane, sources)
        kind = None if pixels is None else (pixels.dtype, pixels.shift)
        return (transform, plane.rescale_slope, plane.rescale_intercept, plane.rows, plane.columns, kind)

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
