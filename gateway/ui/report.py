"""A TID 1500 Measurement Report (PS3.16) read into a plain report a radiologist can read on a web page.

What :func:`read_report` takes from the SR (the gateway writes it as :mod:`gateway.encode.sr` describes; any TID
1500 report reads, tolerantly: what is missing stays empty):

- the title (the root's Concept Name), the procedure reported, the completion and verification flags, the date;
- the device that made it (TID 1004: observer name, manufacturer, model name, serial number);
- the report-level comments of its Qualitative Evaluations container: the statement of what the report is
  ("Produced automatically ...; not reviewed by a physician.") split from its "Intended use: ..." text, the
  others kept as notes;
- one finding per Measurement Group (TID 1410/1411): tracking identifier and UID, finding type, category and
  sites, the algorithm, its measurements (TID 300), its qualitative evaluations ("Pulmonary nodule: Present"),
  its comments (where it is largest, QC flags), the source images and segment it cites, and its centre;
- the objects the report rests on (Current Requested Procedure Evidence), counted by series and SOP class.

Numbers are shown as a radiologist writes them (:func:`for_reading`): at most three significant digits,
Hounsfield units and percentages whole, millimetres to 0.1 mm, millilitres to 0.1 ml (two significant digits
below 1 ml); units readably (:func:`readable_unit`: UCUM ``[hnsf'U]`` is ``HU``, ``mm2`` is ``mm²``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

__all__ = [
    "Device",
    "Evidence",
    "Finding",
    "Measurement",
    "Report",
    "for_reading",
    "read_report",
    "readable_unit",
    "report_of",
]

# Concepts by (CodeValue, CodingSchemeDesignator) (PS3.16 TID 1500, 1410, 1411, 1004; CID 7469 and others).
_TRACKING_ID = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")
_FINDING = ("121071", "DCM")
_FINDING_CATEGORY = ("276214006", "SCT")
_FINDING_SITE = ("363698007", "SCT")
_ALGORITHM_NAME = ("111001", "DCM")
_ALGORITHM_VERSION = ("111003", "DCM")
_DERIVATION = ("121401", "DCM")
_COMMENT = ("121106", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")
_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
_PROCEDURE_REPORTED = ("121058", "DCM")
_DEVICE = {"121013": "name", "121014": "manufacturer", "121015": "model_name", "121016": "serial_number"}
_REFERENCED_SEGMENT = ("121191", "DCM")
_INTENDED_USE = "Intended use:"

#: The most decimals a unit is shown with, and whether that is a hard limit (else: at least two significant
#: digits, so that 0.03 ml does not read "0.0 ml").
_DECIMALS: dict[str, tuple[int, bool]] = {
    "[hnsf'U]": (0, True),
    "%": (0, True),
    "mm": (1, True),
    "cm": (1, True),
    "ml": (1, False),
    "mm2": (1, False),
    "cm2": (1, False),
    "mm3": (0, False),
    "um2/s": (0, False),
}
_SIGNIFICANT = 3
_UNITS = {
    "[hnsf'U]": "HU",
    "1": "",
    "{ratio}": "",
    "ml": "ml",
    "mL": "ml",
    "um2/s": "µm²/s",
    "10-6.mm2/s": "10⁻⁶ mm²/s",
    "10*-6.mm2/s": "10⁻⁶ mm²/s",
}
_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_POWER_RE = re.compile(r"(?<=[A-Za-z])(-?[0-9]+)")


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement: its name (and derivation), the value as written in the SR, rounded for reading."""

    name: str
    value: str  # rounded for reading (:func:`for_reading`)
    unit: str  # readable (:func:`readable_unit`)
    ucum: str  # the unit's UCUM code
    written: str  # the Numeric Value as the SR holds it
    derivation: str | None = None

    @property
    def label(self) -> str:
        """``Attenuation coefficient (mean)``: the name, with its derivation when there is one."""
        name = self.name[:1].upper() + self.name[1:].lower() if self.name.isascii() else self.name
        return f"{name} ({self.derivation.lower()})" if self.derivation else name

    @property
    def text(self) -> str:
        """``2.7 ml``, ``28 HU``, ``0.93`` (no unit)."""
        return f"{self.value} {self.unit}".rstrip() if self.unit != "%" else f"{self.value} %"


@dataclass(frozen=True)
class Finding:
    """One Measurement Group: a lesion, an organ or a tissue, what was measured on it and what it cites."""

    tracking_id: str | None = None
    tracking_uid: str | None = None
    finding_type: str | None = None
    category: str | None = None
    sites: tuple[str, ...] = ()
    algorithm: str | None = None
    measurements: tuple[Measurement, ...] = ()
    evaluations: tuple[str, ...] = ()
    comments: tuple[str, ...] = ()
    images: tuple[str, ...] = ()  # SOP Instance UIDs of the source images it cites (its key image first)
    segment: tuple[str, int] | None = None  # (SEG SOP Instance UID, segment number)
    centre: tuple[float, float, float] | None = None  # patient coordinates (LPS, mm), when a 3D point

    @property
    def title(self) -> str:
        """What a reader calls it: the tracking identifier, else the finding type."""
        return self.tracking_id or self.finding_type or "finding"


@dataclass(frozen=True)
class Device:
    """The device observer (TID 1004): the model that made the report."""

    name: str | None = None
    manufacturer: str | None = None
    model_name: str | None = None
    serial_number: str | None = None


@dataclass(frozen=True)
class Evidence:
    """Objects the report rests on: one series' count of one SOP class."""

    series_instance_uid: str
    sop_class: str  # its name (``CT Image Storage``)
    count: int


@dataclass(frozen=True)
class Report:
    """A measurement report as a radiologist reads it."""

    title: str
    sop_instance_uid: str
    series_description: str | None = None
    procedure: str | None = None
    content_date: str | None = None  # YYYY-MM-DD HH:MM
    completion: str | None = None
    verification: str | None = None
    device: Device = field(default_factory=Device)
    statement: str | None = None  # "Produced automatically ...; not reviewed by a physician."
    intended_use: str | None = None
    notes: tuple[str, ...] = ()  # the other report-level comments
    findings: tuple[Finding, ...] = ()
    evidence: tuple[Evidence, ...] = ()


def read_report(path: Path) -> Report:
    """Read the SR at ``path`` (:func:`report_of`).

    Raises
    ------
    ValueError
        The file is not a structured report (the message says why).
    OSError
        The file cannot be read.
    """
    try:
        dataset = dcmread(path)
    except OSError:
        raise
    except Exception as exc:  # pydicom's own errors for a damaged file
        raise ValueError(f"not a readable DICOM file: {type(exc).__name__}") from exc
    return report_of(dataset)


def report_of(dataset: Dataset) -> Report:
    """The report of an SR dataset (TID 1500; other templates read as far as they match).

    Raises
    ------
    ValueError
        ``dataset`` is not a structured report (no Value Type CONTAINER at its root).
    """
    if dataset.get("ValueType") != "CONTAINER":
        raise ValueError("dataset: not a structured report (its root is not a CONTAINER)")
    statement, intended_use, notes = _statements(_report_comments(dataset))
    return Report(
        title=_meaning(dataset) or "Structured report",
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        series_description=dataset.get("SeriesDescription") or None,
        procedure=next((_code_value(i) for i in _children(dataset) if _concept(i) == _PROCEDURE_REPORTED), None),
        content_date=_date_time(dataset.get("ContentDate"), dataset.get("ContentTime")),
        completion=dataset.get("CompletionFlag") or None,
        verification=dataset.get("VerificationFlag") or None,
        device=_device(dataset),
        statement=statement,
        intended_use=intended_use,
        notes=notes,
        findings=tuple(_finding(group) for group in _walk(dataset) if _concept(group) == _MEASUREMENT_GROUP),
        evidence=tuple(_evidence(dataset)),
    )


def for_reading(value: str | float, ucum: str = "1") -> str:
    """``value`` rounded as a radiologist writes it, for a unit given by its UCUM code.

    At most three significant digits (``1234.5 ml`` is ``1230``); Hounsfield units and percentages whole,
    millimetres to 0.1 mm, millilitres and areas to 0.1 (keeping two significant digits below 1: ``0.27 ml``).
    Halves round away from zero (``2.65`` is ``2.7``), as on paper; rounding never adds digits (``0.93`` stays
    ``0.93``, not ``0.930``). A value that is not a number is returned as is.
    """
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return str(value)
    if not number.is_finite():
        return str(value)
    if number.is_zero():
        return "0"
    magnitude = number.copy_abs().adjusted()  # the exponent of the leading digit
    decimals = _SIGNIFICANT - 1 - magnitude
    limit, hard = _DECIMALS.get(ucum, (decimals, True))
    exponent = number.as_tuple().exponent
    written = -exponent if isinstance(exponent, int) and exponent < 0 else 0  # the decimals the value comes with
    decimals = min(decimals, limit if hard else max(limit, 1 - magnitude), written)
    rounded = number.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    text = f"{rounded:f}"
    return "0" if rounded.is_zero() else text


def readable_unit(ucum: str) -> str:
    """A UCUM unit as people write it: ``[hnsf'U]`` is ``HU``, ``mm2`` is ``mm²``, ``1`` is nothing."""
    if ucum in _UNITS:
        return _UNITS[ucum]
    unit = ucum.strip("[]")
    unit = re.sub(r"\bu(?=[mgLls])", "µ", unit)  # micro
    return _POWER_RE.sub(lambda m: m.group(1).translate(_SUPERSCRIPT), unit)


# --- the content tree ---------------------------------------------------------------------------------------


def _children(item: Dataset) -> Sequence[Dataset]:
    return item.get("ContentSequence") or ()


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _concept(item: Dataset) -> tuple[str, str] | None:
    codes = item.get("ConceptNameCodeSequence")
    if not codes:
        return None
    return str(codes[0].get("CodeValue", "")), str(codes[0].get("CodingSchemeDesignator", ""))


def _meaning(item: Dataset) -> str | None:
    codes = item.get("ConceptNameCodeSequence")
    return str(codes[0].get("CodeMeaning", "")) or None if codes else None


def _code_value(item: Dataset) -> str | None:
    codes = item.get("ConceptCodeSequence")
    return str(codes[0].get("CodeMeaning", "")) or None if codes else None


def _text(item: Dataset) -> str | None:
    value = item.get("TextValue")
    return " ".join(str(value).split()) or None if value is not None else None


def _date_time(date: object, time: object) -> str | None:
    if not date:
        return None
    d = str(date)
    text = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d
    t = str(time or "")
    return f"{text} {t[:2]}:{t[2:4]}" if len(t) >= 4 and t[:4].isdigit() else text


def _device(root: Dataset) -> Device:
    found: dict[str, str] = {}
    for item in _children(root):
        concept = _concept(item)
        if concept is not None and concept[1] == "DCM" and concept[0] in _DEVICE and item.get("ValueType") == "TEXT":
            text = _text(item)
            if text:
                found[_DEVICE[concept[0]]] = text
    return Device(**found)


def _report_comments(root: Dataset) -> list[str]:
    """The comments of the report-level Qualitative Evaluations container (TID 1500 row 12)."""
    texts: list[str] = []
    for item in _children(root):
        if _concept(item) == _QUALITATIVE_EVALUATIONS:
            texts.extend(t for child in _children(item) if _concept(child) == _COMMENT and (t := _text(child)))
    return texts


def _statements(comments: Iterable[str]) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(the statement of what the report is, its intended use, the other comments)."""
    statement = intended_use = None
    notes: list[str] = []
    for text in comments:
        before, found, after = text.partition(_INTENDED_USE)
        if found and intended_use is None:
            statement, intended_use = before.strip() or None, after.strip() or None
        else:
            notes.append(text)
    return statement, intended_use, tuple(notes)


# --- findings -----------------------------------------------------------------------------------------------


def _finding(group: Dataset) -> Finding:
    items = list(_children(group))
    by_concept = {_concept(i): i for i in reversed(items)}  # the first of each concept
    algorithm = " ".join(
        t for key in (_ALGORITHM_NAME, _ALGORITHM_VERSION) if key in by_concept and (t := _text(by_concept[key]))
    )
    return Finding(
        tracking_id=_text(by_concept[_TRACKING_ID]) if _TRACKING_ID in by_concept else None,
        tracking_uid=str(by_concept[_TRACKING_UID].get("UID", "")) or None if _TRACKING_UID in by_concept else None,
        finding_type=_code_value(by_concept[_FINDING]) if _FINDING in by_concept else None,
        category=_code_value(by_concept[_FINDING_CATEGORY]) if _FINDING_CATEGORY in by_concept else None,
        sites=tuple(s for i in items if _concept(i) == _FINDING_SITE and (s := _code_value(i))),
        algorithm=algorithm or None,
        measurements=tuple(m for i in items if i.get("ValueType") == "NUM" and (m := _measurement(i))),
        evaluations=tuple(_evaluations(items)),
        comments=tuple(t for i in items if _concept(i) == _COMMENT and (t := _text(i))),
        images=tuple(_images(items)),
        segment=_segment(items),
        centre=_centre(items),
    )


def _measurement(item: Dataset) -> Measurement | None:
    values = item.get("MeasuredValueSequence")
    if not values:
        return None  # a NUM without a value (TID 300's "no value" qualifier)
    measured = values[0]
    written = str(measured.get("NumericValue", "")).strip()
    units = measured.get("MeasurementUnitsCodeSequence")
    ucum = str(units[0].get("CodeValue", "1")) if units else "1"
    derivation = next((_code_value(c) for c in _children(item) if _concept(c) == _DERIVATION), None)
    return Measurement(
        name=_meaning(item) or "Measurement",
        value=for_reading(written, ucum),
        unit=readable_unit(ucum),
        ucum=ucum,
        written=written,
        derivation=derivation,
    )


def _evaluations(items: Iterable[Dataset]) -> Iterator[str]:
    """Qualitative evaluations: a CODE item whose name is the finding's concept (not one of TID 1411's rows)."""
    structural = {_FINDING, _FINDING_CATEGORY, _FINDING_SITE}
    for item in items:
        coded = item.get("ValueType") == "CODE" and item.get("RelationshipType") == "CONTAINS"
        if coded and _concept(item) not in structural:
            yield f"{_meaning(item)}: {_code_value(item)}"


def _images(items: Iterable[Dataset]) -> Iterator[str]:
    """The SOP Instance UIDs of the images cited (IMAGE items, and those a spatial coordinate selects from)."""
    for item in items:
        for holder in (item, *_children(item)):
            if holder.get("ValueType") == "IMAGE" and _concept(holder) != _REFERENCED_SEGMENT:
                for ref in holder.get("ReferencedSOPSequence") or ():
                    if "ReferencedSegmentNumber" not in ref and ref.get("ReferencedSOPInstanceUID"):
                        yield str(ref.ReferencedSOPInstanceUID)


def _segment(items: Iterable[Dataset]) -> tuple[str, int] | None:
    for item in items:
        if item.get("ValueType") != "IMAGE":
            continue
        for ref in item.get("ReferencedSOPSequence") or ():
            number = ref.get("ReferencedSegmentNumber")
            if number is not None and ref.get("ReferencedSOPInstanceUID"):
                first = number[0] if isinstance(number, list | tuple) else number
                return str(ref.ReferencedSOPInstanceUID), int(first)
    return None


def _centre(items: Iterable[Dataset]) -> tuple[float, float, float] | None:
    for item in items:
        if item.get("ValueType") == "SCOORD3D" and item.get("GraphicType") == "POINT":
            data = [float(v) for v in item.get("GraphicData") or ()]
            if len(data) == 3:
                return data[0], data[1], data[2]
    return None


def _evidence(dataset: Dataset) -> Iterator[Evidence]:
    for study in dataset.get("CurrentRequestedProcedureEvidenceSequence") or ():
        for series in study.get("ReferencedSeriesSequence") or ():
            counts: dict[str, int] = {}
            for ref in series.get("ReferencedSOPSequence") or ():
                name = UID(str(ref.get("ReferencedSOPClassUID", ""))).name or "unknown SOP class"
                counts[name] = counts.get(name, 0) + 1
            for name, count in counts.items():
                yield Evidence(str(series.get("SeriesInstanceUID", "")), name, count)
