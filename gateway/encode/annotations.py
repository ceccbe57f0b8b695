"""A presentation state's Graphic Annotation Sequence (PS3.3 C.10.5), written as the bytes of its elements.

An outline on every image a whole-organ segmentation touches is thousands of graphic objects. Built as pydicom
datasets, each value is checked, converted and written one element at a time: seconds for one presentation state.
Here each graphic object and annotation is encoded directly in Explicit VR Little Endian (PS3.5 7.1.2, items of
explicit length, PS3.5 7.5.1) and the whole sequence becomes one raw element, which pydicom writes as it is and
parses only when someone reads it (the tests read every one back with pydicom and DCMTK).

A Graphic Data element has a 2-byte length in Explicit VR, so an outline of more than :data:`MAX_POINTS` points
is written as several polylines, each starting where the last ended.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag

__all__ = ["MAX_POINTS", "annotation", "annotation_sequence", "polylines"]

#: The most points of one Graphic Data element (FL, 2-byte length: 65534 bytes).
MAX_POINTS = 8191

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = 0xFFFEE000
_GRAPHIC_ANNOTATION_SEQUENCE = 0x00700001


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One element: tag, VR, length (2 or 4 bytes as the VR says) and the value padded to an even length."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFE:
        raise ValueError(f"a {vr} value of {len(value)} bytes does not fit a 2-byte length ({tag:08X})")
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def _item(elements: Iterable[bytes]) -> bytes:
    """A sequence item of explicit length holding ``elements`` (already in tag order)."""
    content = b"".join(elements)
    return struct.pack("<HHI", _ITEM >> 16, _ITEM & 0xFFFF, len(content)) + content


def _sequence(tag: int, items: Sequence[bytes]) -> bytes:
    return _element(tag, "SQ", b"".join(items))


def _text(value: str) -> bytes:
    return value.encode("ascii", "replace")


_PIXEL = _element(0x00700005, "CS", b"PIXEL")  # Graphic Annotation Units
_TWO = _element(0x00700020, "US", struct.pack("<H", 2))  # Graphic Dimensions
_POLYLINE = _element(0x00700023, "CS", b"POLYLINE")  # Graphic Type
_UNFILLED = _element(0x00700024, "CS", b"N")  # Graphic Filled


def _chunks(points: npt.NDArray[np.float64]) -> list[npt.NDArray[np.float64]]:
    """``points`` as polylines of at most :data:`MAX_POINTS`, each starting where the last ended."""
    if len(points) <= MAX_POINTS:
        return [points]
    step = MAX_POINTS - 1
    return [points[start : start + MAX_POINTS] for start in range(0, len(points) - 1, step)]


def polylines(points: npt.NDArray[np.float64], tracking_id: str, tracking_uid: str) -> list[bytes]:
    """POLYLINE graphic objects in PIXEL units (PS3.3 C.10.5.1.2) drawing ``points`` (``[n, 2]``, column, row),
    tracked as one finding (Tracking ID and UID)."""
    tracking = _element(0x00620020, "UT", _text(tracking_id)) + _element(0x00620021, "UI", _text(tracking_uid))
    out = []
    for chunk in _chunks(points):
        data = np.ascontiguousarray(chunk, dtype="<f4").tobytes()
        count = _element(0x00700021, "US", struct.pack("<H", len(chunk)))  # Number of Graphic Points
        out.append(_item((tracking, _PIXEL, _TWO, count, _element(0x00700022, "FL", data), _POLYLINE, _UNFILLED)))
    return out


def _dataset_bytes(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def annotation(
    sop_class_uid: str,
    sop_instance_uid: str,
    frame: int | None,
    layer: str,
    graphics: Sequence[bytes],
    texts: Sequence[Dataset] = (),
) -> bytes:
    """One Graphic Annotation Sequence item: an image (and frame), a layer, graphic objects (from
    :func:`polylines`) and text objects (datasets, e.g. :class:`highdicom.pr.TextObject`)."""
    reference = [_element(0x00081150, "UI", _text(sop_class_uid)), _element(0x00081155, "UI", _text(sop_instance_uid))]
    if frame is not None:
        reference.append(_element(0x00081160, "IS", str(frame).encode()))
    elements = [_sequence(0x00081140, [_item(reference)]), _element(0x00700002, "CS", _text(layer))]
    if texts:
        elements.append(_sequence(0x00700008, [_item([_dataset_bytes(text)]) for text in texts]))
    if graphics:
        elements.append(_sequence(0x00700009, graphics))
    return _item(elements)


def annotation_sequence(items: Sequence[bytes]) -> RawDataElement:
    """The Graphic Annotation Sequence (0070,0001) of ``items``, as a raw element to set on the dataset."""
    value = b"".join(items)
    return RawDataElement(Tag(_GRAPHIC_ANNOTATION_SEQUENCE), "SQ", len(value), value, 0, False, True)
