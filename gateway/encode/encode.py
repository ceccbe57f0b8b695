"""A model result to the DICOM objects that carry it, and those objects to Part 10 files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from gateway.encode.common import EncodedObject
from gateway.encode.pmap import encode_parametric_maps
from gateway.encode.seg import encode_segmentation
from gateway.encode.sr import encode_measurement_report
from gateway.infer.results import ModelResult
from gateway.store.files import fsync_dir

__all__ = ["encode_result", "object_filename", "write_objects"]


def encode_result(
    result: ModelResult,
    sources: Mapping[str, Dataset],
    *,
    series_number: int,
    gateway_version: str,
    labelmap: bool = False,
) -> list[EncodedObject]:
    """Encode one model result: a SEG and its TID 1500 SR, or the parametric maps.

    Parameters
    ----------
    result
        The model's result on a source volume.
    sources
        SOP Instance UID -> dataset as read from disk, for every instance ``result.volume.slices`` names.
    series_number
        SeriesNumber of the SEG (the SR gets ``series_number + 1``) or of the parametric maps.
    gateway_version
        The gateway's version, written in SoftwareVersions.
    labelmap
        Write a LABELMAP SEG (Label Map Segmentation Storage, DICOM 2024b) for a label map of several segments
        instead of BINARY; off by default, as older receivers do not accept it (see :mod:`gateway.encode.seg`).

    Returns
    -------
    list of EncodedObject
        ``[SEG, SR]`` for a segmentation, one ``PM`` per declared map otherwise; every call starts new series.

    Raises
    ------
    EncodeError
        If the result cannot be encoded (the reason says why).
    """
    if result.manifest.outputs.segmentation is None:
        return encode_parametric_maps(result, sources, series_number=series_number, gateway_version=gateway_version)
    seg = encode_segmentation(
        result, sources, series_number=series_number, gateway_version=gateway_version, labelmap=labelmap
    )
    sr = encode_measurement_report(
        result, seg, sources, series_number=series_number + 1, gateway_version=gateway_version
    )
    return [seg, sr]


def object_filename(item: EncodedObject) -> str:
    """``<kind>-<SOPInstanceUID>.dcm``."""
    return f"{item.kind}-{item.sop_instance_uid}.dcm"


def _write_one(item: EncodedObject, folder: Path) -> Path:
    """Write into a temporary file in ``folder``, fsync it, rename it into place."""
    target = folder / object_filename(item)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{item.kind}-", suffix=".part")
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            item.dataset.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return target


def write_objects(objects: Sequence[EncodedObject], folder: Path) -> list[Path]:
    """Write each object as a DICOM Part 10 file ``folder/<kind>-<SOPInstanceUID>.dcm``, atomically.

    Each file is written to a temporary name in ``folder``, flushed to disk and renamed into place, so a reader
    never sees a partial file; the folder (created if missing) is fsynced once at the end.

    Returns
    -------
    list of Path
        The written files, in the order of ``objects``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write_one(item, folder) for item in objects]
    fsync_dir(folder)
    return paths
