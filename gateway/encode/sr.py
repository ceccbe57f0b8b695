"""A segmentation's measurements and findings as a Comprehensive 3D SR, TID 1500 Measurement Report (PS3.16).

The report's observer is a device (TID 1004): the model, with a UID stable for its name, version and weights,
name ``<model> <version>``, manufacturer ``DICOM AI Gateway``, model name the model's name and serial number the
weights' SHA-256. The procedure reported (CID 100) follows the source's Modality: SCT 77477000 "Computed
tomography" for CT, SCT 113091000 "Magnetic resonance imaging" for MR, else SCT 363679005 "Imaging procedure".

One TID 1411 Volumetric ROI group per declared segment, in segment-number order, each with:

- Tracking Identifier (the segment's name) and Tracking UID (the SEG segment's Tracking UID),
- Referenced Segment (the SEG instance and segment number) and Source Series for Segmentation,
- Finding Category and Finding Type (the segment's category and type codes), and Finding Site (the type) when
  the category is an anatomical structure, Algorithm Identification (the model's name and version),
- a TID 300 measurement for each of the segment's measurements: volume as SCT 118565006 "Volume" in ``ml``;
  mean, standard deviation, minimum and maximum as a quantity (DCM 112031 "Attenuation Coefficient" in
  ``[hnsf'U]`` for CT, DCM 110852 "MR signal intensity" for MR) with Derivation (DCM 121401) SCT 373098007
  "Mean", 386136009 "Standard Deviation", 255605001 "Minimum" or 56851009 "Maximum" (CID 7464); other
  modalities name the statistic itself. Voxel counts are not reported (the volume says the same in ml),
- for each classification drawn from the segment, a qualitative evaluation: its finding code = SCT 52101004
  "Present" (the finding code is the question, as DCM 121071 "Finding" already names the group's finding type),
  and once the segment's probability: DCM 122157 "Probability" (unit ``1``) with derivation "Maximum" (it is
  the highest voxel probability),
- a TEXT item (DCM 121106 "Comment") per assembly QC flag of the source volume (``gantry-tilt: ...``), so a
  reader knows the measurements were made on resampled voxels.

Patient and study come from the sources (highdicom copies them from the evidence); the SR starts a new series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gateway.assemble.model import Volume
from gateway.encode.common import MANUFACTURER, EncodedObject, Provenance, coded, copying_source_names, ucum
from gateway.encode.seg import segment_numbers
from gateway.errors import EncodeError
from gateway.infer.measure import SegmentMeasurement
from gateway.infer.results import Finding, ModelResult
from gateway.registry.manifest import SegmentLabel

__all__ = ["encode_measurement_report", "procedure_code"]

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
_ANATOMY = {("91723000", "SCT"), ("123037004", "SCT")}  # Anatomical structure (current and retired code)
_VOLUME = codes.SCT.Volume
_PROBABILITY = Code("122157", "DCM", "Probability")
_PRESENT = codes.SCT.Present
_COMMENT = codes.DCM.Comment


def procedure_code(modality: str | None) -> Code:
    """The procedure reported for a source Modality (CID 100)."""
    return _PROCEDURES.get(modality or "", _IMAGING_PROCEDURE)


def _observer(provenance: Provenance) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=provenance.device_uid,
        name=f"{provenance.model_name} {provenance.model_version}",
        manufacturer_name=MANUFACTURER,
        model_name=provenance.model_name,
        serial_number=provenance.serial_number,
    )
    context = hd.sr.ObserverContext(observer_type=codes.cid270.Device, observer_identifying_attributes=device)
    return hd.sr.ObservationContext(observer_device_context=context)


def _measurement(name: str, value: float, unit: str, modality: str | None) -> hd.sr.Measurement:
    if name == "volume":
        return hd.sr.Measurement(name=_VOLUME, value=value, unit=ucum(unit))
    quantity = _QUANTITIES.get(modality or "")
    if quantity is None:
        return hd.sr.Measurement(name=_STATISTICS[name], value=value, unit=ucum(unit))
    return hd.sr.Measurement(name=quantity, value=value, unit=ucum(unit), derivation=_STATISTICS[name])


def _measurements(
    measured: SegmentMeasurement | None, findings: Sequence[Finding], modality: str | None
) -> list[hd.sr.Measurement]:
    items = []
    if measured is not None:
        items = [
            _measurement(name, value, measured.units[name], modality)
            for name, value in measured.values.items()
            if name == "volume" or name in _STATISTICS
        ]
    if findings:
        probability = findings[0].probability
        items.append(hd.sr.Measurement(_PROBABILITY, probability, ucum("1"), derivation=codes.SCT.Maximum))
    return items


def _qc_comments(volume: Volume) -> list[hd.sr.TextContentItem]:
    return [
        hd.sr.TextContentItem(_COMMENT, f"{flag.code}: {flag.message}", hd.sr.RelationshipTypeValues.CONTAINS)
        for flag in volume.qc
    ]


def _reference(seg: EncodedObject, number: int, volume: Volume) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.sop_class_uid,
        sop_instance_uid=seg.sop_instance_uid,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
    )


def _group(
    result: ModelResult, seg: EncodedObject, number: int, label: SegmentLabel, tracking_uid: str
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measured = next((m for m in result.measurements if m.value == label.value), None)
    findings = [f for f in result.classifications if f.label == label.value]
    anatomical = (label.category.value, label.category.scheme) in _ANATOMY
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label.name),
        referenced_segment=_reference(seg, number, result.volume),
        finding_type=coded(label.type),
        finding_category=coded(label.category),
        finding_sites=[hd.sr.FindingSite(coded(label.type))] if anatomical else None,
        algorithm_id=hd.sr.AlgorithmIdentification(name=result.name, version=result.version),
        measurements=_measurements(measured, findings, result.volume.modality) or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(coded(f.finding), _PRESENT) for f in findings] or None,
    )
    group[0].ContentSequence.extend(_qc_comments(result.volume))
    return group


def _groups(
    result: ModelResult, seg: EncodedObject, provenance: Provenance
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    numbers = segment_numbers(result.manifest)
    assert result.manifest.outputs.segmentation is not None  # segment_numbers checked it
    return [
        _group(result, seg, numbers[label.value], label, provenance.uids.tracking(label.value))
        for label in result.manifest.outputs.segmentation.labels
    ]


def _evidence(seg: EncodedObject, volume: Volume, sources: Mapping[str, Dataset]) -> list[Dataset]:
    uids = dict.fromkeys(ref.sop_instance_uid for ref in volume.slices)
    missing = [uid for uid in uids if uid not in sources]
    if missing:
        raise EncodeError(f"the source instance {missing[0]} was not given")
    return [seg.dataset, *(sources[uid] for uid in uids)]


def encode_measurement_report(
    result: ModelResult,
    seg: EncodedObject,
    sources: Mapping[str, Dataset],
    *,
    series_number: int,
    gateway_version: str,
) -> EncodedObject:
    """Encode ``result``'s measurements and findings as a TID 1500 report referencing ``seg``'s segments.

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
            report = hd.sr.MeasurementReport(
                observation_context=_observer(provenance),
                procedure_reported=procedure_code(result.volume.modality),
                imaging_measurements=_groups(result, seg, provenance),
            )
            sr = hd.sr.Comprehensive3DSR(
                evidence=_evidence(seg, result.volume, sources),
                content=report,
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
