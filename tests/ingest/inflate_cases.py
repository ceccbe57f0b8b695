"""Deflated instances for the ingest tests: small honest ones, and deflate bombs built without holding their bulk."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_files import minimal_ct_header

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
_CHUNK = 1 << 20


def header(
    *,
    sop_class: str = CT_IMAGE,
    sop_instance: str | None = None,
    study: str | None = None,
    series: str | None = None,
) -> Dataset:
    """The attributes of a small CT image before its pixel data (8x8, 16 bits)."""
    ds = minimal_ct_header(patient_name="BOMB^TEST", patient_id="PID-BOMB")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance or ds.SOPInstanceUID
    ds.StudyInstanceUID = study or ds.StudyInstanceUID
    ds.SeriesInstanceUID = series or ds.SeriesInstanceUID
    return ds


def part10(
    ds: Dataset,
    dest: Path,
    *,
    syntax: str = ExplicitVRLittleEndian,
    meta_sop_class: str | None = None,
    meta_sop_instance: str | None = None,
    pixel_bytes: int = 128,
) -> Path:
    """Write ``ds`` with ``pixel_bytes`` bytes of zero Pixel Data, in ``syntax`` (Deflated: streamed through zlib,
    so a bomb of gigabytes costs the test a megabyte); the file meta may name another SOP Class or Instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_sop_class or ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_sop_instance or ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    pixel_header = _pixel_header(pixel_bytes)
    with dest.open("wb") as fp:
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
        deflate = syntax == DeflatedExplicitVRLittleEndian
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if deflate else None
        for piece in _pieces(head.getvalue() + pixel_header, pixel_bytes):
            fp.write(compressor.compress(piece) if compressor else piece)
        if compressor is not None:
            fp.write(compressor.flush())
    return dest


def _pieces(start: bytes, zeros: int) -> Iterator[bytes]:
    yield start
    block = bytes(_CHUNK)
    while zeros > 0:
        yield block[: min(zeros, _CHUNK)]
        zeros -= _CHUNK


def bomb(dest: Path, inflated: int = 256 << 20, **uids: str) -> Path:
    """A Deflated CT instance whose Pixel Data inflates to ``inflated`` bytes (a few hundred KiB on the wire)."""
    return part10(header(**uids), dest, syntax=DeflatedExplicitVRLittleEndian, pixel_bytes=inflated)


def deflated(dest: Path, **uids: str) -> Path:
    """An honest small Deflated CT instance."""
    return part10(header(**uids), dest, syntax=DeflatedExplicitVRLittleEndian)


def encoded(ds: Dataset) -> bytes:
    """``ds`` (with 128 bytes of Pixel Data) as an Explicit VR Little Endian data set: what a C-STORE carries."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue() + _pixel_header(128) + bytes(128)


def _pixel_header(length: int) -> bytes:
    """(7FE0,0010) Pixel Data, OW, explicit VR little endian, of ``length`` bytes."""
    return b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little")
