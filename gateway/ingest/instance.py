"""Understand a received Part 10 file without decoding its pixel data.

Tolerant where real scanners deviate harmlessly, strict where a wrong answer would lose or misfile data: every
top-level element's declared length is checked against what follows (a truncated instance is refused, never
stored), and the three UIDs that file an instance must be present and well formed.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from gateway.errors import InvalidInstance, UnsupportedTransferSyntax

#: Transfer syntaxes the gateway stores as received (PS3.5 and PS3.6 Table A-1).
ACCEPTED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Lossless
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
    }
)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_AND_PREFIX = 132
_GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL, explicit VR: tag, VR, 2-byte length, 4-byte value

#: The attributes the index keeps, read from the header (never the pixel data).
INDEX_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
_WANTED: frozenset[BaseTag] = frozenset(Tag(kw) for kw in ("SpecificCharacterSet", *INDEX_KEYWORDS))


@dataclass(frozen=True)
class ReceivedInstance:
    """What the index needs to know of one received instance; built by :func:`read_received`."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    attributes: dict[str, str | int | None]


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a well-formed UID: 1-64 characters of digits and dots (PS3.5 9.1).

    Leading zeros in a component are tolerated because real devices emit them.
    """
    return len(value) <= 64 and _UID_RE.match(value) is not None


def check_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string or raise :class:`InvalidInstance` naming ``keyword``.

    A UID must be 1-64 characters of digits and dots (PS3.5 9.1); leading zeros are tolerated because
    real devices emit them.
    """
    if value is None or str(value).strip("\0 ") == "":
        raise InvalidInstance(f"{keyword} is missing", InvalidInstance.MISSING_UID)
    text = str(value).strip("\0 ")
    if not is_valid_uid(text):
        raise InvalidInstance(f"{keyword} is not a valid UID", InvalidInstance.INVALID_UID)
    return text


def read_received(path: Path) -> ReceivedInstance:
    """Validate the Part 10 file at ``path`` and return what the index needs.

    Raises
    ------
    InvalidInstance
        The file is not DICOM, is truncated, declares lengths beyond its end, or lacks a filing UID.
    UnsupportedTransferSyntax
        Its transfer syntax is not in :data:`ACCEPTED_TRANSFER_SYNTAXES`.
    """
    with warnings.catch_warnings():  # tolerant reading: pydicom's warnings about odd encodings are not errors
        warnings.simplefilter("ignore")
        return _read_received(path)


def _read_received(path: Path) -> ReceivedInstance:
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInstance("not a DICOM Part 10 file (no DICM prefix or readable file meta)") from exc
    ts = check_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID")
    if ts not in ACCEPTED_TRANSFER_SYNTAXES:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts} is not supported")
    group_length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(group_length, int):
        raise InvalidInstance("file meta information lacks its group length")
    if ts == DeflatedExplicitVRLittleEndian:
        ds = _read_deflated(path, _PREAMBLE_AND_PREFIX + _GROUP_LENGTH_ELEMENT + group_length)
    else:
        ds = _scan(path, _PREAMBLE_AND_PREFIX + _GROUP_LENGTH_ELEMENT + group_length, UID(ts))
    attributes = {kw: _value(ds, kw) for kw in INDEX_KEYWORDS}
    return ReceivedInstance(
        sop_class_uid=check_uid(attributes["SOPClassUID"], "SOPClassUID"),
        sop_instance_uid=check_uid(attributes["SOPInstanceUID"], "SOPInstanceUID"),
        study_instance_uid=check_uid(attributes["StudyInstanceUID"], "StudyInstanceUID"),
        series_instance_uid=check_uid(attributes["SeriesInstanceUID"], "SeriesInstanceUID"),
        transfer_syntax_uid=ts,
        attributes=attributes,
    )


def _scan(path: Path, offset: int, ts: UID) -> Dataset:
    """One pass over the top-level elements: check every declared length, keep the indexed ones."""
    size = path.stat().st_size
    if offset >= size:
        raise InvalidInstance("the data set is empty", InvalidInstance.TRUNCATED)
    kept: dict[BaseTag, DataElement | RawDataElement] = {}
    with path.open("rb") as fp:
        fp.seek(offset)
        try:
            for elem in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian, defer_size=256):
                if isinstance(elem, RawDataElement):
                    _check_fits(elem, size)
                    if elem.tag in _WANTED and elem.value is not None:
                        kept[elem.tag] = elem
        except InvalidInstance:
            raise
        except (EOFError, OSError, ValueError, NotImplementedError, KeyError, TypeError) as exc:
            raise InvalidInstance(
                f"truncated or malformed data set ({type(exc).__name__})", InvalidInstance.TRUNCATED
            ) from exc
    ds = Dataset(kept)
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, default_encoding)
    return ds


def _check_fits(elem: RawDataElement, size: int) -> None:
    if elem.length != _UNDEFINED_LENGTH and elem.value_tell + elem.length > size:
        raise InvalidInstance(
            f"element {elem.tag} declares {elem.length} bytes but only {max(0, size - elem.value_tell)} follow",
            InvalidInstance.TRUNCATED,
        )


def _read_deflated(path: Path, offset: int) -> Dataset:
    with path.open("rb") as fp:
        fp.seek(offset)
        _check_deflated(fp)
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=list(INDEX_KEYWORDS))
    except Exception as exc:
        raise InvalidInstance(f"unparseable data set ({type(exc).__name__})") from exc


def _check_deflated(fp: BinaryIO) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while chunk := fp.read(1 << 20):
            inflater.decompress(chunk, 1 << 20)
            while inflater.unconsumed_tail:
                inflater.decompress(inflater.unconsumed_tail, 1 << 20)
    except zlib.error as exc:
        raise InvalidInstance("corrupt deflated data set", InvalidInstance.UNPARSEABLE) from exc
    if not inflater.eof:
        raise InvalidInstance("truncated deflated data set", InvalidInstance.TRUNCATED)


def _value(ds: Dataset, keyword: str) -> str | int | None:
    """An indexed attribute's value; one that cannot be decoded (``IS`` of "12A") is left out, not fatal."""
    try:
        return _plain(ds.get(keyword))
    except Exception:
        return None


def _plain(value: object) -> str | int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip("\0 ")
    return text or None
