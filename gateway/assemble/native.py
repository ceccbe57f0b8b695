"""Uncompressed little-endian pixel data, read straight from the file into the caller's array.

For Explicit and Implicit VR Little Endian images (PS3.5 A.1, A.2) whose Pixel Data (7FE0,0010) has a defined
length, the frames lie back to back in the file, ``frame_bytes`` each (PS3.5 8.1.1, 8.2). Reading them with one
``readinto`` per frame, into a block of stored values the caller reuses, gives the same arrays as pydicom's native
decoder (which :mod:`gateway.assemble.decode` uses for everything else) without reading the header a second time
or allocating an array per frame. What pydicom does to native data is done here too, the same way: the bits above
Bits Stored are shifted out, left then right in the stored type, which masks unsigned values and sign-extends
signed ones (PS3.5 8.1.1; pydicom's ``correct_unused_bits``).

Anything else (deflated, big endian, encapsulated, 1-bit, colour, Float Pixel Data, a length that does not fit
the image) gets ``None`` from :func:`native_pixels` and goes through the decoder.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset

from gateway.errors import DecodeError

__all__ = ["NativePixels", "native_pixels", "read_header_and_pixels", "read_native_frames"]

_PIXEL_DATA_TAG: Final = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
_SYNTAXES: Final = {uid.ExplicitVRLittleEndian: False, uid.ImplicitVRLittleEndian: True}  # -> implicit VR
_DTYPES: Final = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}


@dataclass(frozen=True)
class NativePixels:
    """Where the frames of an uncompressed little-endian image lie in its file, and how to read them.

    Parameters
    ----------
    offset
        File offset of the first byte of the Pixel Data value.
    frame_bytes
        Bytes per frame (Rows x Columns x Bits Allocated / 8).
    frames
        Number of Frames (1 for single-frame images).
    dtype
        The stored values' type: ``<u1``/``<u2``/``<u4`` or signed, as Bits Allocated and Pixel Representation say.
    shift
        Bits Allocated - Bits Stored: the unused high bits shifted out of every value.
    """

    offset: int
    frame_bytes: int
    frames: int
    dtype: str
    shift: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.frame_bytes < 1 or self.frames < 1:
            raise ValueError(f"offset, frame_bytes and frames must be positive, got {self}")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES.values())}, got {self.dtype!r}")
        if not 0 <= self.shift < 8 * np.dtype(self.dtype).itemsize:
            raise ValueError(f"shift must be within the stored type, got {self.shift}")


def _int(ds: Dataset, keyword: str, default: int) -> int | None:
    """``ds.keyword`` as an integer, ``default`` when absent or empty, ``None`` when malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _layout(ds: Dataset) -> tuple[int, int, str, int] | None:
    """(frame bytes, frames, dtype, shift) of a single-sample integer image, or ``None``."""
    rows, columns, allocated = _int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "BitsAllocated", 0)
    signed, samples = _int(ds, "PixelRepresentation", -1), _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    if rows is None or columns is None or allocated is None or signed is None or frames is None or frames < 0:
        return None
    frames = frames or 1  # 0 reads as 1, as the decoder reads it
    stored = _int(ds, "BitsStored", allocated)
    dtype = _DTYPES.get((allocated, signed))
    if dtype is None or stored is None or not 1 <= stored <= allocated or samples != 1 or rows < 1 or columns < 1:
        return None
    frame_bytes = rows * columns * allocated // 8
    return frame_bytes, frames, dtype, allocated - stored


def _element(header: bytes, implicit: bool) -> tuple[int, int] | None:
    """The Pixel Data element's header length and value length, from the bytes at its tag (``None`` if they are
    not what the transfer syntax says: a value length is even, so an odd one spelling ``OB``/``OW`` is a VR)."""
    if len(header) < 12 or header[:4] != _PIXEL_DATA_TAG:
        return None
    vr_like = header[4:6] in (b"OW", b"OB")
    if implicit:
        return None if vr_like else (8, struct.unpack("<I", header[4:8])[0])
    if not vr_like or header[6:8] != b"\0\0":
        return None
    return 12, struct.unpack("<I", header[8:12])[0]


def native_pixels(ds: Dataset, fp: BinaryIO) -> NativePixels | None:
    """Locate the frames of ``ds``, whose header was just read from ``fp`` up to (not into) the pixel data.

    Parameters
    ----------
    ds
        The header, as ``pydicom.dcmread(fp, stop_before_pixels=True)`` returned it (``fp`` is left at the tag of
        the element it stopped before).
    fp
        The open file, positioned there.

    Returns
    -------
    NativePixels or None
        ``None`` unless the image is uncompressed little endian with a defined-length Pixel Data element that
        holds every frame.
    """
    meta = getattr(ds, "file_meta", None)
    implicit = None if meta is None else _SYNTAXES.get(meta.get("TransferSyntaxUID"))
    layout = _layout(ds)
    if implicit is None or layout is None:
        return None
    frame_bytes, frames, dtype, shift = layout
    start = fp.tell()
    element = _element(fp.read(12), implicit)
    if element is None or element[1] == _UNDEFINED_LENGTH or element[1] < frame_bytes * frames:
        return None
    offset = start + element[0]
    if os.fstat(fp.fileno()).st_size < offset + frame_bytes * frames:
        return None
    return NativePixels(offset, frame_bytes, frames, dtype, shift)


def read_header_and_pixels(path: Path) -> tuple[Dataset, NativePixels | None]:
    """Read one file's header (no pixel data) and, where the pixels are native, where its frames lie.

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        As :func:`pydicom.dcmread` does.
    """
    with Path(path).open("rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        return ds, native_pixels(ds, fp)


def read_native_frames(requests: Sequence[tuple[Path, int, NativePixels]], out: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Read frames into ``out`` (``[frame, row, column]``, C-contiguous, the stored type) as stored values.

    Parameters
    ----------
    requests
        ``(path, frame, pixels)``: the file, the 1-based frame and where its frames lie; one per row of ``out``.
    out
        Where the frames go.

    Returns
    -------
    numpy.ndarray
        ``out``, with the unused high bits shifted out.

    Raises
    ------
    DecodeError
        When a file cannot be read or is shorter than its header said (changed since).
    ValueError
        When a frame number is out of range, or ``out`` does not fit the requests.
    """
    if len(requests) != len(out) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous with one row per request, got {out.shape} for {len(requests)}")
    shifts = {pixels.shift for _, _, pixels in requests}
    if len(shifts) > 1:
        raise ValueError(f"frames with different Bits Stored in one block: shifts {sorted(shifts)}")
    for row, (path, frame, pixels) in zip(out, requests, strict=True):
        if not 1 <= frame <= pixels.frames:
            raise ValueError(f"frame {frame} requested from {path.name}, which has {pixels.frames} frame(s)")
        if row.nbytes != pixels.frame_bytes or row.dtype != np.dtype(pixels.dtype):
            raise ValueError(f"out rows are {row.nbytes} bytes of {row.dtype}; {path.name} has {pixels}")
        _read_frame(path, pixels.offset + (frame - 1) * pixels.frame_bytes, row)
    for shift in shifts - {0}:
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out


def _read_frame(path: Path, offset: int, row: npt.NDArray[Any]) -> None:
    view, count = row.data.cast("B"), 0
    try:
        with Path(path).open("rb", buffering=0) as fp:
            fp.seek(offset)
            while count < row.nbytes and (got := fp.readinto(view[count:])):
                count += got
    except OSError as exc:
        raise DecodeError(
            f"cannot read the uncompressed pixel data of {path.name}: {exc.strerror or type(exc).__name__}"
        ) from exc
    if count != row.nbytes:
        raise DecodeError(f"{path.name}: uncompressed pixel data cut short ({count} of {row.nbytes} bytes)")
