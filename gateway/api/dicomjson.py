"""DICOM JSON (PS3.18 F.2) from index rows and from instance headers.

Values are encoded by pydicom's :meth:`~pydicom.dataset.Dataset.to_json_dict`, so each attribute carries
the VR of the data dictionary (PN as ``{"Alphabetic": ...}``, IS and US as numbers, DA as a string). Bulk
data is never sent: headers are read without their pixel data, and any other binary value longer than
:data:`BULK_DATA_THRESHOLD` bytes is left out (smaller ones travel as ``InlineBinary``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydicom import config, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from gateway.store.query import AttributeValue, Level

log = logging.getLogger(__name__)

#: Binary values longer than this many bytes are left out of DICOM JSON.
BULK_DATA_THRESHOLD = 1024
_BULK_MARKER = "\0bulk"

#: Attributes the gateway computes rather than reads (PS3.4 C.3.4, PS3.18 Table 10.6.3-3).
_COMPUTED_STUDY = "ModalitiesInStudy NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances"
_COMPUTED_SERIES = "NumberOfSeriesRelatedInstances"
_COMPUTED_ANY = "RetrieveURL InstanceAvailability"

#: Top-level attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical
#: Trial Study modules (PS3.3 C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3): the Patient and Study IEs.
_STUDY_MODULES = """
ReferencedPatientSequence PatientName PatientID IssuerOfPatientID TypeOfPatientID
IssuerOfPatientIDQualifiersSequence SourcePatientGroupIdentificationSequence
GroupOfPatientsIdentificationSequence PatientBirthDate PatientBirthTime
PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar PatientAlternativeCalendar
PatientSex QualityControlSubject StrainDescription StrainNomenclature StrainStockSequence
StrainAdditionalInformation StrainCodeSequence GeneticModificationsSequence OtherPatientNames
OtherPatientIDsSequence ReferencedPatientPhotoSequence EthnicGroupCodeSequence PatientSpeciesDescription
PatientSpeciesCodeSequence PatientBreedDescription PatientBreedCodeSequence BreedRegistrationSequence
ResponsiblePerson ResponsiblePersonRole ResponsibleOrganization PatientComments PatientIdentityRemoved
DeidentificationMethod DeidentificationMethodCodeSequence ClinicalTrialSponsorName ClinicalTrialProtocolID
ClinicalTrialProtocolName IssuerOfClinicalTrialProtocolID OtherClinicalTrialProtocolIDsSequence
ClinicalTrialSiteID ClinicalTrialSiteName IssuerOfClinicalTrialSiteID ClinicalTrialSubjectID
IssuerOfClinicalTrialSubjectID ClinicalTrialSubjectReadingID IssuerOfClinicalTrialSubjectReadingID
ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolEthicsCommitteeApprovalNumber StudyDate
StudyTime AccessionNumber IssuerOfAccessionNumberSequence ReferringPhysicianName
ReferringPhysicianIdentificationSequence ConsultingPhysicianName ConsultingPhysicianIdentificationSequence
StudyDescription ProcedureCodeSequence PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
NameOfPhysiciansReadingStudy PhysiciansReadingStudyIdentificationSequence ReferencedStudySequence
StudyInstanceUID StudyID RequestingService RequestingServiceCodeSequence
ReasonForPerformedProcedureCodeSequence AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence
PatientAge PatientSize PatientSizeCodeSequence PatientBodyMassIndex MeasuredAPDimension
MeasuredLateralDimension PatientWeight MedicalAlerts Allergies Occupation SmokingStatus
AdditionalPatientHistory PregnancyStatus LastMenstrualDate PatientSexNeutered ReasonForVisit
ReasonForVisitCodeSequence AdmissionID IssuerOfAdmissionIDSequence ServiceEpisodeID
ServiceEpisodeDescription IssuerOfServiceEpisodeIDSequence PatientState ClinicalTrialTimePointID
ClinicalTrialTimePointDescription LongitudinalTemporalOffsetFromEvent LongitudinalTemporalEventType
ClinicalTrialTimePointTypeCodeSequence IssuerOfClinicalTrialTimePointID ConsentForClinicalTrialUseSequence
"""

#: Top-level attributes of the General Series, Clinical Trial Series and General Equipment modules
#: (PS3.3 C.7.3.1, C.7.3.2, C.7.5.1): the Series IE and the Equipment IE that produced the series.
_SERIES_MODULES = """
SeriesDate SeriesTime Modality SeriesDescription SeriesDescriptionCodeSequence PerformingPhysicianName
PerformingPhysicianIdentificationSequence OperatorsName OperatorIdentificationSequence
ReferencedPerformedProcedureStepSequence RelatedSeriesSequence AnatomicalOrientationType BodyPartExamined
ProtocolName PatientPosition SeriesInstanceUID SeriesNumber Laterality SmallestPixelValueInSeries
LargestPixelValueInSeries PerformedProcedureStepStartDate PerformedProcedureStepStartTime
PerformedProcedureStepEndDate PerformedProcedureStepEndTime PerformedProcedureStepID
PerformedProcedureStepDescription PerformedProtocolCodeSequence RequestAttributesSequence
CommentsOnThePerformedProcedureStep TreatmentSessionUID ClinicalTrialCoordinatingCenterName
ClinicalTrialSeriesID ClinicalTrialSeriesDescription IssuerOfClinicalTrialSeriesID Manufacturer
InstitutionName InstitutionAddress StationName InstitutionalDepartmentName
InstitutionalDepartmentTypeCodeSequence ManufacturerModelName DeviceSerialNumber DeviceUID GantryID
UDISequence ManufacturerDeviceClassUID SoftwareVersions SpatialResolution DateOfLastCalibration
TimeOfLastCalibration DateOfManufacture DateOfInstallation
"""

STUDY_LEVEL: frozenset[str] = frozenset((_STUDY_MODULES + _COMPUTED_STUDY + " " + _COMPUTED_ANY).split())
SERIES_LEVEL: frozenset[str] = frozenset((_SERIES_MODULES + _COMPUTED_SERIES + " " + _COMPUTED_ANY).split())


def keywords_at(level: Level) -> frozenset[str] | None:
    """The attributes a search response at ``level`` may carry; ``None`` for any (instance level).

    PS3.18 10.6.3.3: a study response carries no series or instance attributes, a series response no
    instance attributes.
    """
    if level == "study":
        return STUDY_LEVEL
    if level == "series":
        return STUDY_LEVEL | SERIES_LEVEL
    return None


def resolve_keyword(name: str) -> str | None:
    """The keyword named by ``name``, a keyword or an eight-digit hex tag (``00100020``); else ``None``."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        return keyword or None
    return name if tag_for_keyword(name) is not None else None


def attributes_dataset(attributes: Mapping[str, AttributeValue], keywords: Iterable[str]) -> Dataset:
    """A data set of the ``keywords`` taken from index ``attributes`` (absent or ``None``: empty value).

    Values are stored as found, without validation: they were read tolerantly from received instances.
    """
    ds = Dataset()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"keyword {keyword!r} is not in the DICOM data dictionary")
        value = attributes.get(keyword)
        ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE))
    return ds


def to_dicom_json(ds: Dataset) -> dict[str, Any]:
    """The DICOM JSON object of ``ds``, tags in ascending order, bulk data left out.

    Invalid values are left out rather than failing the whole response (tolerant when reading).
    """
    encoded = ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=lambda _elem: _BULK_MARKER,
        suppress_invalid_tags=True,
    )
    return _without_bulk(encoded)


def read_header(path: Path, keywords: Collection[str] | None = None) -> Dataset | None:
    """Read the header of a stored instance (no pixel data); only ``keywords`` when given.

    Returns ``None``, with a logged warning (no file name: result files are named by their UIDs), if the file
    cannot be read.
    """
    tags = None if keywords is None else [kw for kw in keywords if tag_for_keyword(kw) is not None]
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except Exception as exc:  # a damaged file must not fail the whole response
        log.warning("cannot read the header of a stored file (%s)", type(exc).__name__)  # names carry UIDs
        return None


def header_json(header: Dataset, allowed: frozenset[str] | None, wanted: Collection[str] | None) -> dict[str, Any]:
    """DICOM JSON of the header elements that are ``allowed`` and ``wanted`` (``None``: any)."""
    encoded = to_dicom_json(header)
    return {tag: value for tag, value in encoded.items() if _keep(tag, allowed, wanted)}


def merge_json(*objects: Mapping[str, Any]) -> dict[str, Any]:
    """Merge DICOM JSON objects (later ones win for the same tag), tags in ascending order."""
    merged: dict[str, Any] = {}
    for obj in objects:
        merged.update(obj)
    return dict(sorted(merged.items()))


def _keep(tag: str, allowed: frozenset[str] | None, wanted: Collection[str] | None) -> bool:
    keyword = keyword_for_tag(int(tag, 16))
    if allowed is not None and keyword not in allowed:
        return False
    return wanted is None or keyword in wanted


def _without_bulk(encoded: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for tag, element in encoded.items():
        if element.get("BulkDataURI") == _BULK_MARKER:
            continue
        if element.get("vr") == "SQ" and "Value" in element:
            element = {**element, "Value": [_without_bulk(item) for item in element["Value"]]}
        kept[tag] = element
    return dict(sorted(kept.items()))
