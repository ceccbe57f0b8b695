"""Decode stored frames into numpy arrays with pydicom 3's pixel decoders: never a codec of our own.

Which decoding plugin handles each transfer syntax, and what it needs installed, is the table :data:`DECODERS`
(in the style of pydicom's ``pixels/decoders``: a row per syntax, ``is_available`` per syntax, and an error
that says what to install). The plugin is pinned, so a frame decodes the same way on every machine; a syntax
whose plugin is missing is refused with a :class:`~gateway.errors.DecodeError` naming the packages.

The arrays hold *stored values* (PS3.3 C.7.6.3.1): pydicom has already masked the bits above Bits Stored and
sign-extended signed data (its ``correct_unused_bits`` and JPEG-LS / JPEG 2000 sign corrections), and
converted YBR_FULL / YBR_FULL_422 colour to RGB; no Modality LUT is applied (see :mod:`gateway.assemble.pixels`).

Parallel decoding uses processes for compressed data. None of the codec bindings (pylibjpeg-openjpeg,
pylibjpeg-libjpeg, pylibjpeg-rle, pyjpegls) releases the GIL while it decodes, so threads run the codecs one at
a time. Measured on this project's 2-core machine, 300 frames of 512x512 16-bit JPEG 2000 lossless (median of
3; the pool's start included): as 300 files, sequential 5.3 s, 2 threads 5.3 s, 2 processes 2.9 s (forkserver;
fork 2.9 s, spawn 3.2 s); as one 300-frame file, 5.2 s, 5.1 s and 2.8 s. Uncompressed data is mostly file
reading, which releases the GIL, and costs more to send back from a process than to decode: 300 such files take
0.16 s sequentially, 0.12 s in 2 threads, 0.4 s in 2 processes, so they are decoded in threads. A process that
crashes (a codec fault on a malformed stream) fails its frames with a DecodeError, never the gateway.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import iter_pixels

from gateway.errors import DecodeError

Frame = npt.NDArray[Any]

_MAX_REASON = 300


@dataclass(frozen=True)
class DecoderPlugin:
    """One row of the dependency table: the pydicom decoding plugin for a transfer syntax and its needs.

    Parameters
    ----------
    plugin
        The label of pydicom's decoding plugin (``pylibjpeg``, ``pyjpegls``); ``""`` for the native
        (uncompressed) syntaxes, which pydicom decodes itself with numpy.
    requires
        The packages (pip requirements) the plugin needs.
    """

    plugin: str
    requires: tuple[str, ...]


_NATIVE = DecoderPlugin("", ("numpy",))
_LIBJPEG = DecoderPlugin("pylibjpeg", ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"))
_OPENJPEG = DecoderPlugin("pylibjpeg", ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.3"))
_RLE = DecoderPlugin("pylibjpeg", ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0"))
_JPEGLS = DecoderPlugin("pyjpegls", ("pyjpegls>=1.4",))

#: Transfer syntax -> the plugin that decodes it. Syntaxes not listed (MPEG, JPIP, private) are refused.
DECODERS: Mapping[str, DecoderPlugin] = MappingProxyType(
    {
        uid.ImplicitVRLittleEndian: _NATIVE,
        uid.ExplicitVRLittleEndian: _NATIVE,
        uid.DeflatedExplicitVRLittleEndian: _NATIVE,
        uid.ExplicitVRBigEndian: _NATIVE,
        uid.RLELossless: _RLE,
        uid.JPEGBaseline8Bit: _LIBJPEG,
        uid.JPEGExtended12Bit: _LIBJPEG,
        uid.JPEGLossless: _LIBJPEG,
        uid.JPEGLosslessSV1: _LIBJPEG,
        uid.JPEGLSLossless: _JPEGLS,
        uid.JPEGLSNearLossless: _JPEGLS,
        uid.JPEG2000Lossless: _OPENJPEG,
        uid.JPEG2000: _OPENJPEG,
        uid.HTJ2KLossless: _OPENJPEG,
        uid.HTJ2KLosslessRPCL: _OPENJPEG,
        uid.HTJ2K: _OPENJPEG,
    }
)


def is_available(transfer_syntax: str) -> bool:
    """Return whether frames of ``transfer_syntax`` can be decoded here (its plugin is installed).

    Parameters
    ----------
    transfer_syntax
        A Transfer Syntax UID.
    """
    row = DECODERS.get(transfer_syntax)
    if row is None:
        return False
    return not row.plugin or row.plugin in get_decoder(transfer_syntax).available_plugins


def dependency_table() -> list[tuple[str, str, str, bool]]:
    """Return the dependency table as rows of (transfer syntax name, plugin, requirements, available)."""
    return [
        (uid.UID(ts).name, row.plugin or "pydicom (native)", ", ".join(row.requires), is_available(ts))
        for ts, row in DECODERS.items()
    ]


def _reason(exc: BaseException) -> str:
    """A one-line cause from pydicom's or a codec's exception: about the file, pixel data and group 0028 only."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _plugin_for(ts: uid.UID, path: Path) -> DecoderPlugin:
    row = DECODERS.get(ts)
    if row is None:
        raise DecodeError(f"{ts.name} ({ts}): no decoder for this transfer syntax, in {path.name}")
    if not is_available(ts):
        raise DecodeError(
            f"{ts.name} ({ts}): the {row.plugin} decoding plugin is not installed; "
            f"install {' '.join(row.requires)} to decode {path.name}"
        )
    return row


def _read(path: Path) -> tuple[Dataset, uid.UID]:
    """Read the instance (the whole file: deflated data sets cannot be read in part) and its transfer syntax."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DecodeError(f"transfer syntax unknown: cannot read {path.name} as DICOM: {_reason(exc)}") from exc
    ts = ds.file_meta.get("TransferSyntaxUID")
    if not ts:
        raise DecodeError(f"transfer syntax unknown: {path.name} has no Transfer Syntax UID")
    return ds, uid.UID(ts)


def _frame_count(ds: Dataset, ts: uid.UID, path: Path) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{ts.name}: invalid Number of Frames in {path.name}: {_reason(exc)}") from exc


def _decode_from(ds: Dataset, ts: uid.UID, path: Path, frames: Sequence[int]) -> list[Frame]:
    plugin = _plugin_for(ts, path)
    count = _frame_count(ds, ts, path)
    for frame in frames:
        if not 1 <= frame <= count:
            raise DecodeError(f"{ts.name}: frame {frame} requested from {path.name}, which has {count} frame(s)")
    try:
        arrays = list(iter_pixels(ds, indices=[frame - 1 for frame in frames], decoding_plugin=plugin.plugin))
    except Exception as exc:
        raise DecodeError(f"{ts.name}: cannot decode {path.name}: {_reason(exc)}") from exc
    # Big endian data comes back in big endian dtypes, which torch and friends refuse: make the order native.
    return [array.astype(array.dtype.newbyteorder("="), copy=False) for array in arrays]


def decode_file_frames(path: Path, frames: Sequence[int]) -> list[Frame]:
    """Decode several frames of one instance, reading the file once.

    Parameters
    ----------
    path
        A DICOM Part 10 file.
    frames
        1-based frame numbers, in any order, repeats allowed.

    Returns
    -------
    list[numpy.ndarray]
        One array of stored values per requested frame, as :func:`decode_frame` returns it.

    Raises
    ------
    DecodeError
        If the file cannot be read, a frame number is out of range, the transfer syntax has no installed
        decoder, or the codec fails.
    """
    path = Path(path)
    ds, ts = _read(path)
    return _decode_from(ds, ts, path, frames)


def decode_frame(path: Path, frame: int = 1) -> Frame:
    """Decode one frame of a stored instance into its stored values.

    Parameters
    ----------
    path
        A DICOM Part 10 file.
    frame
        1-based frame number (1 for single-frame images).

    Returns
    -------
    numpy.ndarray
        ``(Rows, Columns)`` or, for colour, ``(Rows, Columns, SamplesPerPixel)`` stored values: unsigned or
        signed integers as Pixel Representation says (bits above Bits Stored masked or sign-extended), floats
        for Float / Double Float Pixel Data. YBR colour is returned as RGB. No Modality LUT is applied.

    Raises
    ------
    DecodeError
        With the transfer syntax name and the reason: unreadable file, frame out of range, no installed
        decoder (the message says what to install), or a codec failure.
    """
    return decode_file_frames(path, [frame])[0]


# -- parallel decoding -------------------------------------------------------------------------------------------

Chunk = tuple[tuple[Path, tuple[int, ...]], ...]


def _decode_chunk(chunk: Chunk) -> list[Frame]:
    """Worker: decode a chunk (runs of frames of the same file), in order."""
    return [array for path, frames in chunk for array in decode_file_frames(path, frames)]


def _runs(items: Iterable[tuple[Path, int]]) -> Chunk:
    """Group consecutive requests for the same file: ``[(a,1), (a,2), (b,1)] -> ((a,(1,2)), (b,(1,)))``."""
    runs: list[tuple[Path, list[int]]] = []
    for path, frame in items:
        if runs and runs[-1][0] == path:
            runs[-1][1].append(frame)
        else:
            runs.append((path, [frame]))
    return tuple((path, tuple(frames)) for path, frames in runs)


def plan_chunks(requests: Sequence[tuple[Path, int]], workers: int) -> tuple[list[int], list[Chunk]]:
    """Split requests into about four chunks per worker, frames of one file kept together where possible.

    Returns the request positions in chunk order (to put results back in request order) and the chunks.
    """
    order = sorted(range(len(requests)), key=lambda i: (str(requests[i][0]), i))
    size = max(1, math.ceil(len(order) / (workers * 4)))
    chunks = [_runs(requests[i] for i in order[start : start + size]) for start in range(0, len(order), size)]
    return order, chunks


def default_workers() -> int:
    """The number of CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decoder_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """Return a process pool for :func:`decode_frames` that a long-lived caller can start once and reuse.

    Processes start by ``forkserver``: safe in a multi-threaded server, where ``fork`` may deadlock.
    """
    context = get_context("forkserver")
    context.set_forkserver_preload([__name__])  # workers start with pydicom and the codecs imported
    return ProcessPoolExecutor(max_workers=workers or default_workers(), mp_context=context)


def _is_native(path: Path) -> bool:
    """Whether ``path`` holds uncompressed pixel data (judged from its file meta; unreadable counts as not)."""
    try:
        ts = read_file_meta_info(path).get("TransferSyntaxUID")
    except Exception:
        return False
    return bool(ts) and DECODERS.get(ts) is _NATIVE


def _run_chunks(chunks: list[Chunk], pool: Executor) -> list[Frame]:
    try:
        return [array for arrays in pool.map(_decode_chunk, chunks) for array in arrays]
    except BrokenProcessPool as exc:
        raise DecodeError(f"a decoder process died (codec crash or out of memory): {_reason(exc)}") from exc


def _decode_chunks(chunks: list[Chunk], workers: int, executor: Executor | None) -> list[Frame]:
    """Run the chunks: in ``executor``; here for one worker or chunk; else, judged by the first file (a series
    rarely mixes syntaxes, and a wrong guess costs only time), threads for uncompressed data (reading files,
    which releases the GIL) and processes for compressed data (codecs, which hold it)."""
    if executor is not None:
        return _run_chunks(chunks, executor)
    if workers == 1 or len(chunks) == 1:
        return [array for chunk in chunks for array in _decode_chunk(chunk)]
    workers = min(workers, len(chunks))
    native = _is_native(chunks[0][0][0])
    with ThreadPoolExecutor(workers) if native else decoder_pool(workers) as pool:
        return _run_chunks(chunks, pool)


def decode_frames(
    requests: Sequence[tuple[Path, int]],
    *,
    workers: int | None = None,
    executor: Executor | None = None,
) -> list[Frame]:
    """Decode many frames in parallel: compressed ones in processes (the codecs hold the GIL), uncompressed
    ones in threads; see the module docstring for the measurements behind that.

    Parameters
    ----------
    requests
        ``(path, frame)`` pairs, frame 1-based; frames of one file are decoded from one read of it.
    workers
        How many processes or threads; default all CPUs this process may use. ``1`` decodes here, in turn.
    executor
        A pool to run in instead of starting one for this call (see :func:`decoder_pool`); ``workers`` then
        only sizes the chunks.

    Returns
    -------
    list[numpy.ndarray]
        One array per request, in request order, as :func:`decode_frame` returns them.

    Raises
    ------
    DecodeError
        For the first request (in chunk order) that cannot be decoded, or if a worker process died.
    ValueError
        If ``workers`` is less than 1.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not requests:
        return []
    n = workers or default_workers()
    order, chunks = plan_chunks(requests, n)
    decoded = _decode_chunks(chunks, n, executor)
    result: list[Frame] = [np.empty(0)] * len(requests)
    for position, array in zip(order, decoded, strict=True):
        result[position] = array
    return result
