"""Understand a received Part 10 file without decoding its pixel data.

Tolerant where real scanners deviate harmlessly, strict where a wrong answer would lose or misfile data: every
top-level element's declared length is checked against what follows (a truncated instance is refused, never
stored), the three UIDs that file an instance must be present and well formed, and the data set's SOP Class and
Instance UIDs must be those declared for it (file meta information, C-STORE request). The common file is walked by
:mod:`gateway.ingest.header` (struct over the declared lengths) and its plain ASCII values read straight from their
bytes; anything unusual is left to pydicom's generic element generator and value conversion, which stay the
reference (``tests/ingest/test_header_walk.py`` holds the two to the same answers).

A Deflated Explicit VR Little Endian data set (PS3.5 A.5) is inflated as a stream, a megabyte at a time, into an
unnamed temporary file, and never beyond :class:`InflateLimit`: a deflate bomb is refused (0xA700) once it has
cost the limit, not the gigabytes it would inflate to. The file stored stays the bytes as received; since every
stored deflated instance passed this check, later readers (assembly, WADO) that let pydicom inflate it in memory
hold at most the limit.
"""

from __future__ import annotations

import errno
import io
import re
import struct
import tempfile
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.config import IngestSettings
from gateway.errors import DataSetMismatch, InvalidInstance, OutOfResources, UnsupportedTransferSyntax
from gateway.ingest.header import walk_header

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
_INFLATE_CHUNK = 1 << 20  # compressed bytes read, and inflated bytes produced, at a time
_PEEK_INFLATED = 1 << 20  # what peek_uids inflates of a deflated data set, at most
_DEFER_SIZE = 256  # a wanted element longer than this is not kept (no indexed attribute is that long)

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
_INDEX_TAGS = tuple((kw, Tag(kw), dictionary_VR(Tag(kw))) for kw in INDEX_KEYWORDS)
_QUICK_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"})
_INTEGER_STRING = re.compile(r"[+-]?[0-9]{1,10}")
_SLOW = object()  # a raw value left to pydicom's conversion
_FILING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class InflateLimit:
    """How far a Deflated data set may inflate (:class:`gateway.config.IngestSettings`).

    Attributes
    ----------
    max_ratio
        Inflated bytes allowed per byte received.
    floor_bytes
        Allowed whatever the ratio gives (a small deflated instance may compress well).
    max_bytes
        Never allowed beyond this.
    """

    max_ratio: float
    floor_bytes: int
    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_ratio < 1:
            raise ValueError("max_ratio must be at least 1")
        if self.floor_bytes <= 0 or self.max_bytes <= 0:
            raise ValueError("floor_bytes and max_bytes must be positive")

    @classmethod
    def of(cls, settings: IngestSettings) -> InflateLimit:
        """The limit the ``ingest`` settings set."""
        return cls(settings.inflate_max_ratio, settings.inflate_floor_bytes, settings.inflate_max_bytes)

    def allowed(self, wire_bytes: int) -> int:
        """Inflated bytes allowed for a data set of ``wire_bytes`` deflated bytes:
        ``min(max_bytes, max(floor_bytes, max_ratio * wire_bytes))``."""
        return min(self.max_bytes, max(self.floor_bytes, int(self.max_ratio * wire_bytes)))


#: The limit of the default settings.
DEFAULT_INFLATE_LIMIT = InflateLimit.of(IngestSettings())


@dataclass(frozen=True)
class ReceivedInstance:
    """What the index needs to know of one received instance; built by :func:`read_received`."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    attributes: dict[str, str | int | None]


@dataclass(frozen=True)
class InstanceUIDs:
    """The filing UIDs :func:`peek_uids` could read from a refused instance; each ``None`` if absent or malformed."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None


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


def check_identity(info: ReceivedInstance, sop_class_uid: object, sop_instance_uid: object) -> None:
    """Raise :class:`DataSetMismatch` unless the data set has the SOP Class and Instance UIDs declared for it.

    A declared value that is ``None`` or empty is not checked (a file meta that lacks it is tolerated).
    """
    if _declared(sop_class_uid) not in (None, info.sop_class_uid):
        raise DataSetMismatch("the data set's SOPClassUID is not the one declared for it")
    if _declared(sop_instance_uid) not in (None, info.sop_instance_uid):
        raise DataSetMismatch("the data set's SOPInstanceUID is not the one declared for it")


def _declared(value: object) -> str | None:
    text = "" if value is None else str(value).strip("\0 ")
    return text or None


def read_received(
    path: Path, *, inflate: InflateLimit = DEFAULT_INFLATE_LIMIT, scratch_dir: Path | None = None
) -> ReceivedInstance:
    """Validate the Part 10 file at ``path`` and return what the index needs.

    Parameters
    ----------
    path
        The received file.
    inflate
        How far a Deflated data set may inflate.
    scratch_dir
        Where a Deflated data set is inflated (an unnamed temporary file); the system's temporary folder if omitted.

    Raises
    ------
    InvalidInstance
        The file is not DICOM, is truncated, declares lengths beyond its end, or lacks a filing UID.
    UnsupportedTransferSyntax
        Its transfer syntax is not in :data:`ACCEPTED_TRANSFER_SYNTAXES`.
    DataSetMismatch
        Its SOP Class or Instance UID differs from the file meta information's (MediaStorageSOP...).
    gateway.errors.OutOfResources
        Its Deflated data set inflates beyond ``inflate`` (or the disk filled while inflating it).
    """
    with warnings.catch_warnings():  # tolerant reading: pydicom's warnings about odd encodings are not errors
        warnings.simplefilter("ignore")
        return _read_received(path, inflate, scratch_dir)


def _read_received(path: Path, inflate: InflateLimit, scratch_dir: Path | None) -> ReceivedInstance:
    fast = walk_header(path, _WANTED, _DEFER_SIZE, ACCEPTED_TRANSFER_SYNTAXES)
    if fast is not None:  # the common case; anything unusual is walked by pydicom's generic element generator
        ds = _dataset(fast.elements, UID(fast.transfer_syntax_uid.strip("\0 ")))
        return _received(
            ds, fast.transfer_syntax_uid, fast.media_storage_sop_class_uid, fast.media_storage_sop_instance_uid
        )
    try:
        meta = read_file_meta_info(path)
        ts_value, group_length = meta.get("TransferSyntaxUID"), meta.get("FileMetaInformationGroupLength")
        media = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
    except (
        InvalidDicomError,
        BytesLengthException,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        struct.error,
    ) as exc:
        raise InvalidInstance("not a DICOM Part 10 file (no DICM prefix or readable file meta)") from exc
    ts = check_uid(ts_value, "TransferSyntaxUID")
    if ts not in ACCEPTED_TRANSFER_SYNTAXES:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts} is not supported")
    if not isinstance(group_length, int):
        raise InvalidInstance("file meta information lacks its group length")
    offset = _PREAMBLE_AND_PREFIX + _GROUP_LENGTH_ELEMENT + group_length
    if ts == DeflatedExplicitVRLittleEndian:
        ds = _read_deflated(path, offset, inflate, scratch_dir)
    else:
        ds = _scan_file(path, offset, UID(ts))
    return _received(ds, ts, *media)


def _received(
    ds: Dataset, transfer_syntax: str, media_sop_class: object, media_sop_instance: object
) -> ReceivedInstance:
    """The index's view of a walked data set, its filing UIDs checked, and its identity against the file meta's."""
    attributes = _attributes(ds)
    info = ReceivedInstance(
        sop_class_uid=check_uid(attributes["SOPClassUID"], "SOPClassUID"),
        sop_instance_uid=check_uid(attributes["SOPInstanceUID"], "SOPInstanceUID"),
        study_instance_uid=check_uid(attributes["StudyInstanceUID"], "StudyInstanceUID"),
        series_instance_uid=check_uid(attributes["SeriesInstanceUID"], "SeriesInstanceUID"),
        transfer_syntax_uid=check_uid(transfer_syntax, "TransferSyntaxUID"),
        attributes=attributes,
    )
    check_identity(info, media_sop_class, media_sop_instance)
    return info


def _scan_file(path: Path, offset: int, ts: UID) -> Dataset:
    size = path.stat().st_size
    if offset >= size:
        raise InvalidInstance("the data set is empty", InvalidInstance.TRUNCATED)
    with path.open("rb") as fp:
        fp.seek(offset)
        return _scan(fp, size, ts)


def _scan(fp: BinaryIO, size: int | None, ts: UID, *, partial: bool = False) -> Dataset:
    """One pass over the top-level elements from ``fp``'s position: check every declared length against ``size``
    (the stream's end), keep the indexed ones. ``partial``: keep what was read before a fault, raise nothing."""
    kept: dict[BaseTag, DataElement | RawDataElement] = {}
    try:
        for elem in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian, defer_size=_DEFER_SIZE):
            if isinstance(elem, RawDataElement):
                if size is not None:
                    _check_fits(elem, size)
                if elem.tag in _WANTED and elem.value is not None:
                    kept[elem.tag] = elem
    except InvalidInstance:
        if not partial:
            raise
    except (EOFError, OSError, ValueError, NotImplementedError, KeyError, TypeError, struct.error) as exc:
        if not partial:
            raise InvalidInstance(
                f"truncated or malformed data set ({type(exc).__name__})", InvalidInstance.TRUNCATED
            ) from exc
    return _dataset(kept, ts)


def _dataset(kept: Mapping[BaseTag, DataElement | RawDataElement], ts: UID) -> Dataset:
    ds = Dataset(dict(kept))
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, default_encoding)
    return ds


def _check_fits(elem: RawDataElement, size: int) -> None:
    if elem.length != _UNDEFINED_LENGTH and elem.value_tell + elem.length > size:
        raise InvalidInstance(
            f"element {elem.tag} declares {elem.length} bytes but only {max(0, size - elem.value_tell)} follow",
            InvalidInstance.TRUNCATED,
        )


def _read_deflated(path: Path, offset: int, inflate: InflateLimit, scratch_dir: Path | None) -> Dataset:
    """Inflate the data set into an unnamed temporary file, up to the limit for its size, and scan it there."""
    allowed = inflate.allowed(max(0, path.stat().st_size - offset))
    try:
        with path.open("rb") as src, tempfile.TemporaryFile(dir=scratch_dir) as inflated:
            src.seek(offset)
            size = inflate_into(src, inflated, allowed)
            if size == 0:
                raise InvalidInstance("the data set is empty", InvalidInstance.TRUNCATED)
            inflated.seek(0)
            return _scan(inflated, size, ExplicitVRLittleEndian)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutOfResources("disk full while inflating a deflated data set") from exc
        raise


def inflate_into(src: BinaryIO, out: BinaryIO, allowed: int) -> int:
    """Inflate the raw deflate stream (PS3.5 A.5) read from ``src`` into ``out``; return the inflated size.

    Memory stays within a few megabytes whatever the stream: at most 1 MiB is read, and 1 MiB produced, at a time
    (``zlib.decompressobj`` with ``max_length``); bytes after the end of the stream (padding) are ignored.

    Raises
    ------
    gateway.errors.OutOfResources
        The stream inflates to more than ``allowed`` bytes (nothing beyond ``allowed`` is inflated).
    InvalidInstance
        The stream is corrupt, or ends before its last block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            pending = inflater.unconsumed_tail or src.read(_INFLATE_CHUNK)
            data = inflater.decompress(pending, _INFLATE_CHUNK)
            if not data and not pending:
                break  # the input has ended, and nothing is left inside the inflater
            total += len(data)
            if total > allowed:
                raise OutOfResources(f"deflated data set inflates past the limit of {allowed} bytes")
            out.write(data)
    except zlib.error as exc:
        raise InvalidInstance("corrupt deflated data set", InvalidInstance.UNPARSEABLE) from exc
    if not inflater.eof:
        raise InvalidInstance("truncated deflated data set", InvalidInstance.TRUNCATED)
    return total


def peek_uids(source: Path | bytes) -> InstanceUIDs | None:
    """Best-effort read of the filing UIDs of a refused instance (a file, or the first bytes of one).

    Reads the file meta and the top-level elements up to the first fault; of a Deflated data set, inflates at most
    1 MiB. Only well-formed UIDs are kept (a malformed one is not echoed back in a UI element). Nothing from the
    refused data reaches a warning or the log. ``None`` when nothing could be read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as fp:
                ds = _peek(fp)
    except Exception:
        return None
    found = {kw: _uid_or_none(ds, kw) for kw in _FILING_KEYWORDS}
    return InstanceUIDs(
        found["SOPClassUID"], found["SOPInstanceUID"], found["StudyInstanceUID"], found["SeriesInstanceUID"]
    )


def _peek(fp: BinaryIO) -> Dataset:
    if fp.read(_PREAMBLE_AND_PREFIX)[128:] != b"DICM":
        raise InvalidInstance("no DICM prefix")
    meta = _scan_meta(fp)
    ts = UID(str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)).strip("\0 "))
    if ts == DeflatedExplicitVRLittleEndian:
        inflated = io.BytesIO()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated.write(inflater.decompress(fp.read(_PEEK_INFLATED), _PEEK_INFLATED))
        inflated.seek(0)
        return _scan(inflated, None, ExplicitVRLittleEndian, partial=True)
    if ts.is_transfer_syntax:
        return _scan(fp, None, ts, partial=True)
    start = fp.tell()  # an unknown (private) transfer syntax: explicit VR little endian, else implicit
    ds = _scan(fp, None, ExplicitVRLittleEndian, partial=True)
    if "SOPInstanceUID" in ds:
        return ds
    fp.seek(start)
    return _scan(fp, None, ImplicitVRLittleEndian, partial=True)


def _scan_meta(fp: BinaryIO) -> Dataset:
    """The group 0002 elements (always Explicit VR Little Endian); ``fp`` is left at the data set's first tag."""
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for elem in data_element_generator(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
        elements[elem.tag] = elem
    return Dataset(elements)


def _uid_or_none(ds: Dataset, keyword: str) -> str | None:
    raw = ds.get_item(keyword)
    value = raw.value if isinstance(raw, DataElement | RawDataElement) else None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    try:
        return check_uid(value, keyword)
    except InvalidInstance:
        return None


def _attributes(ds: Dataset) -> dict[str, str | int | None]:
    """The indexed attributes: plain ASCII text, integer strings and single US values are read straight from the
    raw bytes; anything else (a character set's escapes, several values, non-ASCII bytes) is decoded by pydicom."""
    attributes: dict[str, str | int | None] = {}
    for keyword, tag, vr in _INDEX_TAGS:
        raw = ds.get_item(tag)
        value = _quick(raw, vr) if isinstance(raw, RawDataElement) else None if raw is None else _SLOW
        attributes[keyword] = _value(ds, keyword) if value is _SLOW else cast(str | int | None, value)
    return attributes


def _quick(raw: RawDataElement, dictionary_vr: str) -> object:
    """``raw``'s plain value when it is a simple case, else :data:`_SLOW`."""
    data, vr = raw.value, raw.VR or dictionary_vr
    if not isinstance(data, bytes):
        return _SLOW
    if vr == "US":
        return int.from_bytes(data, "little") if len(data) == 2 and raw.is_little_endian else _SLOW
    if vr not in _QUICK_TEXT_VRS or not data.isascii() or b"\\" in data or b"\x1b" in data:
        return _SLOW
    text = data.decode("ascii").strip("\0 ")
    if not text:
        return None
    if vr == "IS":
        return int(text) if _INTEGER_STRING.fullmatch(text) else _SLOW
    return text


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
