"""A model result to the DICOM objects that carry it, and those objects to Part 10 files.

A segmentation becomes a SEG (:mod:`gateway.encode.seg`), a TID 1500 report of its findings
(:mod:`gateway.encode.sr`), and for the viewers that show neither, the findings' outlines as a presentation state
(:mod:`gateway.encode.gsps`), their key images as a key object selection (:mod:`gateway.encode.ko`) and, on
request, burned-in key images (:mod:`gateway.encode.keyimages`); parametric maps become Parametric Maps
(:mod:`gateway.encode.pmap`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr

from gateway.encode.common import EncodedObject, Provenance, with_type2_attributes
from gateway.encode.findings import shown_findings
from gateway.encode.gsps import encode_presentation_state
from gateway.encode.keyimages import encode_key_images
from gateway.encode.ko import encode_key_objects
from gateway.encode.perframe import encoded_once
from gateway.encode.pmap import encode_parametric_maps
from gateway.encode.seg import encode_segmentation
from gateway.encode.sr import encode_measurement_report
from gateway.infer.results import ModelResult
from gateway.store.files import fsync_dir

__all__ = ["SERIES_OFFSETS", "encode_result", "object_filename", "write_objects"]

log = logging.getLogger(__name__)

#: SeriesNumber of each kind of a segmentation's objects, after the SEG's.
SERIES_OFFSETS = {"SEG": 0, "SR": 1, "GSPS": 2, "KO": 3, "SC": 4}


def encode_result(
    result: ModelResult,
    sources: Mapping[str, Dataset],
    *,
    series_number: int,
    gateway_version: str,
    labelmap: bool = False,
    key_images: bool = False,
    timings: dict[str, float] | None = None,
) -> list[EncodedObject]:
    """Encode one model result: a SEG, its TID 1500 SR, the outlines and key images; or the parametric maps.

    Parameters
    ----------
    result
        The model's result on a source volume.
    sources
        SOP Instance UID -> dataset as read from disk, for every instance ``result.volume.slices`` names.
    series_number
        SeriesNumber of the SEG; the SR, presentation state, key object selection and key images take the next
        four (:data:`SERIES_OFFSETS`); or of the parametric maps.
    gateway_version
        The gateway's version, written in SoftwareVersions.
    labelmap
        Write a LABELMAP SEG (Label Map Segmentation Storage, DICOM 2024b) for a label map of several segments
        instead of BINARY; off by default, as older receivers do not accept it (see :mod:`gateway.encode.seg`).
    key_images
        Also write burned-in Secondary Capture key images (only some destinations want them).
    timings
        When given, the seconds each kind took are added to it under ``seg_s``, ``sr_s``, ``gsps_s``, ``ko_s``,
        ``sc_s`` or ``pm_s`` (summed over calls).

    Returns
    -------
    list of EncodedObject
        For a segmentation ``[SEG, SR]``, then, when there is a finding to show (and the series is not a mosaic),
        a ``GSPS`` and a ``KO``, then with ``key_images`` one ``SC`` per finding; one ``PM`` per declared map
        otherwise. The UIDs are those of :mod:`gateway.encode.uids` (the same for a re-run of the same job).

    Raises
    ------
    EncodeError
        If the result cannot be encoded (the reason says why).
    """
    clock = _Clock(timings if timings is not None else {})
    sources = with_type2_attributes(sources)  # a source without PatientID, StudyID...: the outputs have them empty
    if result.manifest.outputs.segmentation is None:
        with clock("pm_s"):
            return encode_parametric_maps(result, sources, series_number=series_number, gateway_version=gateway_version)
    with clock("seg_s"):
        seg = encode_segmentation(
            result, sources, series_number=series_number, gateway_version=gateway_version, labelmap=labelmap
        )
    with clock("sr_s"):
        sr = encode_measurement_report(
            result, seg, sources, series_number=series_number + SERIES_OFFSETS["SR"], gateway_version=gateway_version
        )
    return [seg, sr, *_views(result, sources, sr, series_number, gateway_version, key_images, clock)]


class _Clock:
    """Adds the seconds a block took to ``timings[key]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started


def _views(
    result: ModelResult,
    sources: Mapping[str, Dataset],
    sr: EncodedObject,
    series_number: int,
    gateway_version: str,
    key_images: bool,
    clock: _Clock,
) -> list[EncodedObject]:
    """The presentation state, key object selection and (optionally) key images of a segmentation's findings."""
    volume = result.volume
    if any(ref.tile is not None for ref in volume.slices):
        log.info(
            "%s: no outlines or key images for a mosaic series (its tiles are not images of their own)", result.ref
        )
        return []
    provenance = Provenance.of(result, gateway_version)
    window = result.manifest.outputs.display_window
    with clock("gsps_s"):
        findings = shown_findings(result, provenance.uids)
        gsps = encode_presentation_state(
            volume, sources, findings, provenance, series_number=series_number + SERIES_OFFSETS["GSPS"], window=window
        )
    if gsps is None:
        return []
    with clock("ko_s"):
        ko = encode_key_objects(
            volume, sources, findings, sr, gsps, provenance, series_number=series_number + SERIES_OFFSETS["KO"]
        )
    views = [gsps, *([ko] if ko is not None else [])]
    if key_images:
        with clock("sc_s"):
            views.extend(
                encode_key_images(
                    volume,
                    sources,
                    findings,
                    provenance,
                    series_number=series_number + SERIES_OFFSETS["SC"],
                    declared=window,
                )
            )
    return views


def object_filename(item: EncodedObject) -> str:
    """``<kind>-<SOPInstanceUID>.dcm``."""
    return f"{item.kind}-{item.sop_instance_uid}.dcm"


def _settle_encoding(dataset: Dataset) -> None:
    """Resolve the dataset's ambiguous VRs once, for its transfer syntax, and say so to pydicom's writer.

    pydicom's writer resolves the ambiguous VRs (``US or SS``...) of every dataset whose original encoding differs
    from the file's, a fresh one included, and again for each nested sequence item on its way down (~10% of a
    SEG's writing), and that walk would decode the per-frame groups :func:`~gateway.encode.perframe.encoded_once`
    hands it encoded. Resolved here once over the whole tree (ancestors known, as in the writer's own first pass),
    each dataset records the file's encoding as its original one, and the writer encodes it as it is: the same
    bytes (tests/encode/test_write_bytes.py).
    """
    syntax = dataset.file_meta.TransferSyntaxUID
    if dataset.original_encoding == (syntax.is_implicit_VR, syntax.is_little_endian):
        return  # settled by its encoder (the GSPS, whose graphic annotations stay raw)
    correct_ambiguous_vr(dataset, syntax.is_little_endian)
    _record_encoding(dataset, syntax.is_implicit_VR, syntax.is_little_endian)


def _record_encoding(dataset: Dataset, implicit: bool, little: bool) -> None:
    # the writer skips its walk where the original encoding and character set are those it writes with
    dataset.set_original_encoding(implicit, little, dataset._character_set)
    for element in dataset.elements():  # raw elements (the GSPS's graphic annotations) stay as they are
        if isinstance(element, DataElement) and element.VR == "SQ":
            for item in element.value:
                _record_encoding(item, implicit, little)


def _write_one(item: EncodedObject, folder: Path) -> Path:
    """Write into a temporary file in ``folder``, fsync it, rename it into place."""
    target = folder / object_filename(item)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{item.kind}-", suffix=".part")
    temp = Path(name)
    try:
        _settle_encoding(item.dataset)
        with os.fdopen(fd, "wb") as handle, encoded_once(item.dataset):
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
