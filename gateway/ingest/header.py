"""A struct-based walk over the header of a received Part 10 file: the fast path of :mod:`gateway.ingest.instance`.

It reads the file meta information (PS3.10 7.1) and the data set's top-level elements (PS3.5 7.1) straight from the
declared tags, VRs and lengths, with :func:`struct.unpack_from` over a few buffered reads (it seeks past the values
it does not keep, the pixel data among them). It keeps the few elements the index needs as pydicom
``RawDataElement`` values, the same the generic walk keeps, and like it checks that every top-level element's
declared length lies within the file.

It covers what scanners and archives send nearly always: a file meta group in Explicit VR Little Endian that begins
with its group length and ends where that length says, and a Little Endian data set whose top-level elements all
have defined lengths (pixel data not encapsulated; nested sequences of defined length are skipped whole, as the
generic walk skips them). Anything else (an undefined length, a stray item tag, Big Endian, a meta group that
disagrees with its length) makes it answer ``None``, and the caller walks the file with pydicom's generic element
generator, which handles every such case and whose refusals stay the reference.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from gateway.errors import InvalidInstance

#: VRs whose explicit-VR encoding has two reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS"}
    | {b"ST", b"TM", b"UI", b"UL", b"US"}
)
_KNOWN_VRS = _LONG_VRS | _SHORT_VRS  # any other VR bytes: the generic walk decides (implicit switch, 2-byte length)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE = 128
_META_START = 132  # after the preamble and "DICM"
_GROUP_LENGTH_END = _META_START + 12  # (0002,0000) UL: tag, VR, 2-byte length, 4-byte value
_ITEM_GROUP = 0xFFFE
_IMPLICIT_LE = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_HEAD = struct.Struct("<HH2sH")  # explicit VR: group, element, VR, short length
_LONG = struct.Struct("<L")
_IMPLICIT = struct.Struct("<HHL")  # implicit VR: group, element, length
_CHUNK = 16 << 10  # bytes read at a time: a typical header (file meta and all) in one read


class _Window:
    """Reads of a file at given offsets, served from one buffered chunk at a time (callers stay within ``size``)."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self._fp = fp
        self.size = size
        self._base = 0
        self._buf = b""

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        """A buffer holding the ``n`` bytes at file offset ``pos``, and their offset in it."""
        off = pos - self._base
        if off < 0 or off + n > len(self._buf):
            self._fp.seek(pos)
            self._buf = self._fp.read(max(n, _CHUNK))
            self._base, off = pos, 0
        return self._buf, off

    def bytes(self, pos: int, n: int) -> bytes:
        """The ``n`` bytes at file offset ``pos``."""
        buf, off = self.at(pos, n)
        return buf[off : off + n]


@dataclass(frozen=True)
class FastHeader:
    """What the fast walk read of a file: its file meta and the kept top-level elements of its data set.

    Attributes
    ----------
    transfer_syntax_uid
        (0002,0010), as written (trailing padding included).
    media_storage_sop_class_uid, media_storage_sop_instance_uid
        (0002,0002) and (0002,0003), as written; ``None`` when absent.
    elements
        The kept top-level data set elements by tag, undecoded.
    """

    transfer_syntax_uid: str
    media_storage_sop_class_uid: str | None
    media_storage_sop_instance_uid: str | None
    elements: dict[BaseTag, RawDataElement]


def walk_header(path: Path, wanted: frozenset[int], keep_max: int, accepted: frozenset[str]) -> FastHeader | None:
    """Walk the file at ``path``; ``None`` when it needs the generic walk (see the module's docstring).

    Parameters
    ----------
    path
        A Part 10 file whose transfer syntax is not Deflated (a Deflated one answers ``None``).
    wanted
        The top-level tags to keep.
    keep_max
        A wanted element longer than this is not kept (as the generic walk defers it).
    accepted
        The transfer syntaxes the caller stores: any other one answers ``None`` (the generic path refuses it).

    Raises
    ------
    InvalidInstance
        A top-level element declares a length beyond the end of the file, or the data set is empty.
    """
    try:
        with path.open("rb") as fp:
            size = fp.seek(0, 2)
            if size <= _GROUP_LENGTH_END:
                return None
            return _walk(_Window(fp, size), size, wanted, keep_max, accepted)
    except (OSError, struct.error):
        return None  # a fault reading (or a file that shrank): the generic walk meets it and says what it is


def _walk(
    buf: _Window, size: int, wanted: frozenset[int], keep_max: int, accepted: frozenset[str]
) -> FastHeader | None:
    if buf.bytes(_PREAMBLE, 4) != b"DICM":
        return None
    meta = _meta(buf, size)
    if meta is None:
        return None
    start, found = meta
    ts = found.get(0x00020010)
    if ts is None or ts.rstrip("\0 ") not in accepted or ts.rstrip("\0 ") in (_BIG_ENDIAN, _DEFLATED):
        return None
    if start >= size:
        raise InvalidInstance("the data set is empty", InvalidInstance.TRUNCATED)
    if ts.rstrip("\0 ") == _IMPLICIT_LE:
        elements = _walk_implicit(buf, start, size, wanted, keep_max)
    else:
        elements = _walk_explicit(buf, start, size, wanted, keep_max)
    if elements is None:
        return None
    return FastHeader(ts, found.get(0x00020002), found.get(0x00020003), elements)


def _meta(buf: _Window, size: int) -> tuple[int, dict[int, str]] | None:
    """The data set's offset and the meta's text values; ``None`` unless the meta group is the canonical one."""
    group, element, vr, length, group_length = struct.unpack("<HH2sHL", buf.bytes(_META_START, 12))
    if (group, element, vr, length) != (2, 0, b"UL", 4):
        return None
    end = _GROUP_LENGTH_END + group_length
    if end > size:
        return None
    found: dict[int, str] = {}
    pos = _GROUP_LENGTH_END
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, vr, length = _HEAD.unpack_from(*buf.at(pos, 8))
        if group != 2 or vr not in _KNOWN_VRS:
            return None
        pos += 8
        if vr in _LONG_VRS:
            if pos + 4 > end:
                return None
            (length,) = _LONG.unpack_from(*buf.at(pos, 4))
            pos += 4
        if length == _UNDEFINED_LENGTH or pos + length > end:
            return None
        if vr == b"UI":
            found[0x00020000 | element] = buf.bytes(pos, length).decode("latin-1")
        pos += length
    if end + 2 <= size and buf.bytes(end, 2) == b"\x02\x00":
        return None  # group 0002 goes on past its declared length: the generic walk decides
    return end, found


def _walk_explicit(
    buf: _Window, pos: int, size: int, wanted: frozenset[int], keep_max: int
) -> dict[BaseTag, RawDataElement] | None:
    kept: dict[BaseTag, RawDataElement] = {}
    head, long_ = _HEAD, _LONG
    while pos < size:
        if pos + 8 > size:
            break  # a few trailing bytes: ignored, as the generic walk ignores them
        group, element, vr, length = head.unpack_from(*buf.at(pos, 8))
        if group == _ITEM_GROUP or vr not in _KNOWN_VRS:
            return None
        pos += 8
        if vr in _LONG_VRS:
            if pos + 4 > size:
                raise _truncated(pos, 4, size)
            (length,) = long_.unpack_from(*buf.at(pos, 4))
            pos += 4
        if length == _UNDEFINED_LENGTH:
            return None
        if pos + length > size:
            raise _truncated(pos, length, size, group, element)
        tag = group << 16 | element
        if tag in wanted and length <= keep_max:
            kept[BaseTag(tag)] = RawDataElement(
                BaseTag(tag), vr.decode("ascii"), length, buf.bytes(pos, length), pos, False, True
            )
        pos += length
    return kept


def _walk_implicit(
    buf: _Window, pos: int, size: int, wanted: frozenset[int], keep_max: int
) -> dict[BaseTag, RawDataElement] | None:
    kept: dict[BaseTag, RawDataElement] = {}
    head = _IMPLICIT
    while pos < size:
        if pos + 8 > size:
            break  # a few trailing bytes: ignored, as the generic walk ignores them
        group, element, length = head.unpack_from(*buf.at(pos, 8))
        if group == _ITEM_GROUP or length == _UNDEFINED_LENGTH:
            return None
        pos += 8
        if pos + length > size:
            raise _truncated(pos, length, size, group, element)
        tag = group << 16 | element
        if tag in wanted and length <= keep_max:
            kept[BaseTag(tag)] = RawDataElement(BaseTag(tag), None, length, buf.bytes(pos, length), pos, True, True)
        pos += length
    return kept


def _truncated(
    pos: int, length: int, size: int, group: int | None = None, element: int | None = None
) -> InvalidInstance:
    what = "the data set" if group is None else f"element ({group:04X},{element:04X})"
    return InvalidInstance(
        f"{what} declares {length} bytes but only {max(0, size - pos)} follow", InvalidInstance.TRUNCATED
    )
