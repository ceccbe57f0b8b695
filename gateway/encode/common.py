"""What every encoded object shares: the value handed on, who made it (equipment, series, software), codes.

Every object the gateway writes names the model in its SeriesDescription (``AI ct-tissue 1.0.0 SEG``), has
Manufacturer ``DICOM AI Gateway``, ManufacturerModelName the model's name, DeviceSerialNumber the SHA-256 of the
model's weights (which copy of the model ran), and SoftwareVersions naming the gateway's and the model's versions
(PS3.3 C.7.5.1 General Equipment, C.7.5.2 Enhanced General Equipment).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset

from gateway.encode.uids import OutputUIDs, stable_uid
from gateway.infer.results import ModelResult
from gateway.registry.manifest import Code

__all__ = [
    "MANUFACTURER",
    "EncodedObject",
    "Provenance",
    "coded",
    "copying_source_names",
    "series_laterality",
    "ucum",
    "with_type2_attributes",
]

MANUFACTURER = "DICOM AI Gateway"

_LO = 64  # the longest Long String (PS3.5 6.2)

#: The Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that every object
#: copies from its sources (highdicom reads them as attributes: a source that lacks one would raise).
SOURCE_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

_UCUM_MEANINGS = {
    "ml": "milliliter",
    "[hnsf'U]": "Hounsfield unit",
    "1": "no units",
    "%": "percent",
    "mm": "millimeter",
    "mm2/s": "square millimeter per second",
    "um2/s": "square micrometer per second",
}


@dataclass(frozen=True)
class EncodedObject:
    """One DICOM object the encoders made, ready to write or send.

    Attributes
    ----------
    kind
        ``SEG``, ``SR`` or ``PM``.
    dataset
        The object (a highdicom SOP class instance, so a :class:`pydicom.Dataset` with file meta).
    sop_class_uid, sop_instance_uid, series_instance_uid
        Its identifiers.
    """

    kind: str
    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str

    @classmethod
    def of(cls, kind: str, dataset: Dataset) -> EncodedObject:
        """Wrap ``dataset``, reading its identifiers."""
        return cls(kind, dataset, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(dataset.SeriesInstanceUID))


def _lo(text: str) -> str:
    return text[:_LO]


@dataclass(frozen=True)
class Provenance:
    """Who made an object: the model (name, version, weights digest) and the gateway (version).

    Build it with :meth:`of`; :meth:`equipment` gives the keyword arguments every highdicom SOP class takes,
    :meth:`stamp` sets what those arguments cannot (several SoftwareVersions values); :attr:`uids` names the
    objects (:mod:`gateway.encode.uids`: the same for a re-run of the same job).
    """

    model_name: str
    model_version: str
    sha256: str
    gateway_version: str
    uids: OutputUIDs

    @classmethod
    def of(cls, result: ModelResult, gateway_version: str) -> Provenance:
        """The provenance of ``result``'s objects."""
        if not gateway_version:
            raise ValueError("gateway_version must not be empty")
        uids = OutputUIDs(result.volume, result.name, result.version, result.sha256)
        return cls(result.name, result.version, result.sha256, gateway_version, uids)

    def series_description(self, kind: str) -> str:
        """``AI <model> <version> <kind>``, cut to 64 characters (the model's name first gives way)."""
        tail = f" {self.model_version} {kind}"
        return "AI " + self.model_name[: _LO - 3 - len(tail)] + tail

    @property
    def software_versions(self) -> list[str]:
        """The gateway's version, then the model's."""
        return [_lo(f"{MANUFACTURER} {self.gateway_version}"), _lo(f"{self.model_name} {self.model_version}")]

    @property
    def serial_number(self) -> str:
        """The weights' SHA-256 (64 hex digits fit a Long String), or ``unknown``."""
        return _lo(self.sha256) or "unknown"

    @property
    def device_uid(self) -> str:
        """A UID for this model as an observer device: the same for the same name, version and weights."""
        return stable_uid(MANUFACTURER, "device", self.model_name, self.model_version, self.sha256)

    def equipment(self, kind: str) -> dict[str, Any]:
        """Keyword arguments of a highdicom SOP class: equipment and series description."""
        return {
            "manufacturer": MANUFACTURER,
            "manufacturer_model_name": _lo(self.model_name),
            "software_versions": self.software_versions[0],
            "device_serial_number": self.serial_number,
            "series_description": self.series_description(kind),
        }

    def stamp(self, dataset: Dataset) -> None:
        """Set SoftwareVersions to both versions (highdicom takes one string)."""
        dataset.SoftwareVersions = self.software_versions


def coded(code: Code) -> hd.sr.CodedConcept:
    """A manifest code as a highdicom coded concept."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def ucum(unit: str) -> hd.sr.CodedConcept:
    """A UCUM unit code (``ml``, ``[hnsf'U]``, ``1``, ...) as a coded concept, with a readable meaning."""
    return hd.sr.CodedConcept(unit, "UCUM", _UCUM_MEANINGS.get(unit, unit))


@contextmanager
def copying_source_names() -> Iterator[None]:
    """Silence highdicom's doubts about the person names it copies from the sources (a one-component
    PatientName, say): they are the sources' as received, not ours to fix, and the warning quotes the name, which
    is patient data that must not reach a log."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*unlikely to represent the intended person name", category=UserWarning
        )
        yield


def series_laterality(source: Dataset) -> str:
    """General Series Laterality (Type 2C) of an object derived from ``source``: the source's, or empty
    ("unknown": the model does not say whether the part is paired)."""
    value = source.get("Laterality")
    return str(value) if value else ""


def with_type2_attributes(sources: Mapping[str, Dataset]) -> dict[str, Dataset]:
    """The sources, each that lacks a Type 2 Patient or General Study attribute replaced by a copy that has it
    empty (:data:`SOURCE_TYPE2_KEYWORDS`): the objects made from them then carry it empty, as a Type 2 attribute
    whose value is unknown must be (PS3.5 7.4.5), and encoding never fails on it. The sources are not changed."""
    return {uid: _with_type2(ds) for uid, ds in sources.items()}


def _with_type2(ds: Dataset) -> Dataset:
    missing = [keyword for keyword in SOURCE_TYPE2_KEYWORDS if keyword not in ds]
    if not missing:
        return ds
    filled = Dataset({elem.tag: elem for elem in ds})  # a new dict of the same elements (values not copied)
    if hasattr(ds, "file_meta"):
        filled.file_meta = ds.file_meta
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled
