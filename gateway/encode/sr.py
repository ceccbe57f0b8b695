"""A segmentation's findings and measurements as a Comprehensive 3D SR, TID 1500 Measurement Report (PS3.16).

The report's observer is a device (TID 1004): the model, with a UID stable for its name, version and weights,
name ``<model> <version>``, manufacturer ``DICOM AI Gateway``, model name the model's name and serial number the
weights' SHA-256. The procedure reported (CID 100) follows the source's Modality: SCT 77477000 "Computed
tomography" for CT, SCT 113091000 "Magnetic resonance imaging" for MR, else SCT 363679005 "Imaging procedure".

Imaging Measurements hold one TID 1411 Volumetric ROI group per finding, in segment order:

- a segment declared ``lesions: true`` gives one group **per lesion** (:mod:`gateway.infer.lesions`), numbered by
  decreasing volume: Tracking Identifier ``nodule 2`` with a Tracking UID that a re-run of the job repeats; its
  region is its centre, a Volume Surface SCOORD3D POINT (patient coordinates) citing the source image where the
  lesion is largest (an SCOORD POINT on that image when the series has no Frame of Reference); measurements:
  Volume (SCT 118565006, ``ml``), Long Axis and Short Axis (SCT 103339001 / 103340004, ``mm``, in the plane of
  the source images, on that image), and the statistics its manifest entry lists; a Comment naming the image
  (its Instance Number) where it is largest;
- any other segment gives **one group** (a whole organ or tissue): Referenced Segment into the SEG, Volume and
  the statistics its manifest lists.

Every group carries Finding Category and Finding Type (the segment's codes), Finding Site (the type) when the
category is an anatomical structure, Algorithm Identification (the model's name and version), the
classifications drawn from its segment (a qualitative evaluation, the finding's code = SCT 52101004 "Present",
and its probability: DCM 122157 "Probability" in percent, unit ``%``, derivation "Maximum": "93 %" reads better than
"0.93 1"), and a Comment per assembly QC
flag of the source volume. Statistics are DCM 112031 "Attenuation Coefficient" in ``[hnsf'U]`` for CT, DCM
110852 "MR signal intensity" for MR, with Derivation (DCM 121401) Mean, Standard Deviation, Minimum or Maximum.

Numbers are rounded as a radiologist writes them (:func:`gateway.infer.measure.for_reading`) and written only as
the decimal string (Numeric Value), so a viewer shows ``3.34 ml``, never a float's every digit. Every container is
SEPARATE, so a viewer shows each measurement on its own with its name, as DCMTK's own TID 1500 documents do.

The report-level Qualitative Evaluations container (TID 1500 row 12) states what the report is: a Comment naming
the model, that the result was not reviewed by a physician, and the manifest's intended use; and, per lesion
segment, how many components were too small to report, or that none was found.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gateway.assemble.model import Volume
from gateway.encode.common import MANUFACTURER, EncodedObject, Provenance, coded, copying_source_names, ucum
from gateway.encode.frames import source_datasets, source_image_of_slice
from gateway.encode.seg import segment_numbers
from gateway.errors import EncodeError
from gateway.infer.lesions import Lesion, LesionSet, lesion_name
from gateway.infer.measure import for_reading
from gateway.infer.results import ModelResult
from gateway.registry.manifest import SegmentLabel

__all__ = ["encode_measurement_report", "observer_context", "procedure_code", "statement"]

_PROCEDURES = {
    "CT": Code("77477000", "SCT", "Computed tomography"),
    "MR": Code("113091000", "SCT", "Magnetic resonance imaging"),
}
_IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
_QUANTITIES = {
    "CT": Code("112031", "DCM", "Attenuation Coefficient"),
    "MR": Code("110852", "DCM", "MR signal intensity"),
}
_STATISTICS = {
    "mean": codes.SCT.Mean,
    "stddev": codes.SCT.StandardDeviation,
    "min": codes.SCT.Minimum,
    "max": codes.SCT.Maximum,
}
_SIZES = {"volume": codes.SCT.Volume, "long_axis": codes.SCT.LongAxis, "short_axis": codes.SCT.ShortAxis}
_ANATOMY = {("91723000", "SCT"), ("123037004", "SCT")}  # Anatomical structure (current and retired code)
_PROBABILITY = Code("122157", "DCM", "Probability")
_PRESENT = codes.SCT.Present
_COMMENT = codes.DCM.Comment
_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS

Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations


def procedure_code(modality: str | None) -> Code:
    """The procedure reported for a source Modality (CID 100)."""
    return _PROCEDURES.get(modality or "", _IMAGING_PROCEDURE)


def statement(provenance: Provenance, intended_use: str) -> str:
    """What every report says of itself: an AI result, not reviewed, and what the model is for."""
    use = " ".join(intended_use.split())
    if use and use[-1] not in ".!?":
        use += "."  # a bundle's metadata may end without one; the report reads as sentences
    return (
        f"Produced automatically by the AI model {provenance.model_name} {provenance.model_version}; "
        f"not reviewed by a physician. Intended use: {use}"
    )


def observer_context(provenance: Provenance) -> hd.sr.ObserverContext:
    """The model as a device observer (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=provenance.device_uid,
        name=f"{provenance.model_name} {provenance.model_version}",
        manufacturer_name=MANUFACTURER,
        model_name=provenance.model_name,
        serial_number=provenance.serial_number,
    )
    return hd.sr.ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=device)


def _number(name: Code, key: str, value: float, unit: str, derivation: Code | None = None) -> hd.sr.Measurement:
    """A TID 300 measurement of ``value`` rounded for reading, written as its decimal string only."""
    rounded = for_reading(key, value)
    item = hd.sr.Measurement(name=name, value=rounded, unit=ucum(unit), derivation=derivation)
    measured = item[0].MeasuredValueSequence[0]
    measured.NumericValue = str(rounded)  # "22", not the "22.0" pydicom writes for a number it is given
    if "FloatingPointValue" in measured:
        del measured.FloatingPointValue  # the float's every digit: the rounded decimal string says it all
    return item


def _measurement(name: str, value: float, unit: str, modality: str | None) -> hd.sr.Measurement:
    if name in _SIZES:
        return _number(_SIZES[name], name, value, unit)
    quantity = _QUANTITIES.get(modality or "")
    if quantity is None:
        return _number(_STATISTICS[name], name, value, unit)
    return _number(quantity, name, value, unit, derivation=_STATISTICS[name])


def _measurements(
    values: Mapping[str, float], units: Mapping[str, str], probability: float | None, modality: str | None
) -> list[hd.sr.Measurement]:
    wanted = [name for name in ("volume", "long_axis", "short_axis", *_STATISTICS) if name in values]
    items = [_measurement(name, values[name], units[name], modality) for name in wanted]
    if probability is not None:
        items.append(_number(_PROBABILITY, "percent", 100.0 * probability, "%", derivation=codes.SCT.Maximum))
    return items


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(_COMMENT, text, _CONTAINS)


def _qc_comments(volume: Volume) -> list[hd.sr.TextContentItem]:
    return [_comment(f"{flag.code}: {flag.message}") for flag in volume.qc]


def _finding_sites(label: SegmentLabel) -> list[hd.sr.FindingSite] | None:
    """The segment's type as Finding Site when its category is an anatomical structure."""
    anatomical = (label.category.value, label.category.scheme) in _ANATOMY
    return [hd.sr.FindingSite(coded(label.type))] if anatomical else None


def _evaluations(result: ModelResult, label: SegmentLabel, volume_ml: float) -> list[hd.sr.QualitativeEvaluation]:
    """The classifications drawn from ``label`` that a finding of ``volume_ml`` reaches."""
    return [
        hd.sr.QualitativeEvaluation(coded(item.finding), _PRESENT)
        for item in result.manifest.outputs.classifications
        if item.label == label.value and volume_ml >= item.min_volume_ml
    ]


def _segment_group(
    result: ModelResult, seg: EncodedObject, number: int, label: SegmentLabel, provenance: Provenance
) -> Group:
    measured = next((m for m in result.measurements if m.value == label.value), None)
    findings = [f for f in result.classifications if f.label == label.value]
    values = {k: v for k, v in (measured.values if measured else {}).items() if k != "voxels"}
    units = measured.units if measured else {}
    probability = findings[0].probability if findings else None
    group = Group(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=provenance.uids.tracking(label.value), identifier=label.name),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.sop_class_uid,
            sop_instance_uid=seg.sop_instance_uid,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(result.volume.series_instance_uid),
        ),
        measurements=_measurements(values, units, probability, result.volume.modality) or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(coded(f.finding), _PRESENT) for f in findings] or None,
        finding_type=coded(label.type),
        finding_category=coded(label.category),
        finding_sites=_finding_sites(label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=result.name, version=result.version),
    )
    group[0].ContentSequence.extend(_qc_comments(result.volume))
    return group


def _lesion_region(
    result: ModelResult, lesion: Lesion, sources: Mapping[str, Dataset]
) -> tuple[hd.sr.VolumeSurface | None, list[hd.sr.ImageRegion] | None, Dataset]:
    """The lesion's centre as the group's region (a volume surface, or an image region without a Frame of
    Reference), citing its key image; and that image."""
    volume = result.volume
    key = source_image_of_slice(volume, lesion.key_slice, sources)
    frames = [key.frame] if key.multiframe else None
    if volume.frame_of_reference_uid:
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([lesion.centre], dtype=np.float64),
            frame_of_reference_uid=volume.frame_of_reference_uid,
            source_images=[hd.sr.SourceImageForSegmentation(key.sop_class_uid, key.sop_instance_uid, frames)],
        )
        return surface, None, key.dataset
    _, row, column = lesion.centre_index
    ((r, c),) = key.points([(row, column)])
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[c + 0.5, r + 0.5]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(key.sop_class_uid, key.sop_instance_uid, frames),
    )
    return None, [region], key.dataset


def _lesion_group(
    result: ModelResult, label: SegmentLabel, lesion: Lesion, sources: Mapping[str, Dataset], provenance: Provenance
) -> Group:
    surface, regions, image = _lesion_region(result, lesion, sources)
    evaluations = _evaluations(result, label, lesion.volume_ml)
    probability = lesion.probability if evaluations else None
    group = Group(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=provenance.uids.tracking(label.value, lesion.number), identifier=lesion_name(label.name, lesion.number)
        ),
        measurements=_measurements(lesion.values, lesion.units, probability, result.volume.modality),
        qualitative_evaluations=evaluations or None,
        referenced_volume_surface=surface,
        referenced_regions=regions,
        finding_type=coded(label.type),
        finding_category=coded(label.category),
        finding_sites=_finding_sites(label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=result.name, version=result.version),
    )
    where = (
        f"largest cross-section on image {image.get('InstanceNumber', '?')} of series {image.get('SeriesNumber', '?')}"
    )
    group[0].ContentSequence.append(_comment(where))
    group[0].ContentSequence.extend(_qc_comments(result.volume))
    return group


def _groups(
    result: ModelResult, seg: EncodedObject, sources: Mapping[str, Dataset], provenance: Provenance
) -> list[Group]:
    numbers = segment_numbers(result.manifest)
    segmentation = result.manifest.outputs.segmentation
    assert segmentation is not None  # segment_numbers checked it
    groups: list[Group] = []
    for label in segmentation.labels:
        if label.lesions:
            found = result.lesions.get(label.value)
            lesions = found.lesions if found else ()
            groups.extend(_lesion_group(result, label, lesion, sources, provenance) for lesion in lesions)
        else:
            groups.append(_segment_group(result, seg, numbers[label.value], label, provenance))
    return groups


def _lesion_note(label: SegmentLabel, found: LesionSet | None) -> str | None:
    lesions = found.lesions if found else ()
    left_out = found.left_out if found else 0
    if not left_out and lesions:
        return None
    smaller = f"{left_out} smaller component(s) below {label.min_volume_ml:g} ml not reported" if left_out else ""
    if lesions:
        return f"{label.name}: {smaller}"
    return f"{label.name}: none found" + (f" ({smaller})" if smaller else "")


def _report_comments(result: ModelResult, provenance: Provenance) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the statement of what the report is, and what was left out."""
    texts = [statement(provenance, result.manifest.intended_use)]
    segmentation = result.manifest.outputs.segmentation
    for label in segmentation.labels if segmentation else ():
        note = _lesion_note(label, result.lesions.get(label.value)) if label.lesions else None
        if note:
            texts.append(note)
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([_comment(text) for text in texts])
    return container


def _content(
    result: ModelResult, seg: EncodedObject, sources: Mapping[str, Dataset], provenance: Provenance
) -> hd.sr.MeasurementReport:
    groups = _groups(result, seg, sources, provenance)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer_context(provenance)),
        procedure_reported=procedure_code(result.volume.modality),
        imaging_measurements=groups or [_placeholder(result, provenance)],
    )
    root = report[0].ContentSequence
    if not groups:  # nothing measured: the report states it in its qualitative evaluations alone (TID 1500 row 12)
        del root[-1]
    root.append(_report_comments(result, provenance))
    _separate(report[0])
    return report


def _separate(item: Dataset) -> None:
    """Mark every container SEPARATE: its items are measurements and statements each of their own, not one flowing
    text (PS3.3 C.17.3.2.2), so a viewer shows each with its name ("Volume = 3.05 ml"), as DCMTK's TID 1500 does."""
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


def _placeholder(result: ModelResult, provenance: Provenance) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group highdicom needs to build a report without measurements; removed again at once."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=provenance.uids.tracking(-1), identifier=result.name)
    )


def encode_measurement_report(
    result: ModelResult,
    seg: EncodedObject,
    sources: Mapping[str, Dataset],
    *,
    series_number: int,
    gateway_version: str,
) -> EncodedObject:
    """Encode ``result``'s findings and measurements as a TID 1500 report referencing ``seg``'s segments.

    Parameters
    ----------
    result
        A model result whose manifest declares a segmentation.
    seg
        The SEG encoded from it by :func:`gateway.encode.seg.encode_segmentation`.
    sources
        SOP Instance UID -> source dataset, for every instance in ``result.volume.slices``.
    series_number
        SeriesNumber of the SR's new series.
    gateway_version
        The gateway's version (SoftwareVersions).

    Raises
    ------
    EncodeError
        No segmentation declared, a source missing, or highdicom refusing.
    """
    provenance = Provenance.of(result, gateway_version)
    try:
        with copying_source_names():
            sr = hd.sr.Comprehensive3DSR(
                evidence=[seg.dataset, *source_datasets(result.volume, sources)],
                content=_content(result, seg, sources, provenance),
                series_instance_uid=provenance.uids.series("SR"),
                series_number=series_number,
                sop_instance_uid=provenance.uids.instance("SR"),
                instance_number=1,
                is_complete=True,
                **provenance.equipment("SR"),
            )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"{result.ref}: highdicom cannot build the SR: {exc}") from exc
    provenance.stamp(sr)
    return EncodedObject.of("SR", sr)
