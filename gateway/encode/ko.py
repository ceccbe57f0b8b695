"""The findings' key images as a Key Object Selection document (PS3.3 A.35.4, TID 2010), titled "Of Interest".

Per finding (:mod:`gateway.encode.findings`), the source image where it is largest is flagged, each with a
reference to the presentation state that outlines it (PS3.3 C.17.3.2.1: a Referenced SOP Sequence inside the
image's reference), so a viewer that opens the key images shows them with the outlines. The document also
references the measurement report and the presentation state themselves, and its Key Object Description lists
the findings by name with their key image's Instance Number. The observer is the model, as a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from gateway.assemble.model import Volume
from gateway.encode.common import EncodedObject, Provenance, copying_source_names
from gateway.encode.findings import ShownFinding
from gateway.encode.frames import source_image_of_slice
from gateway.encode.sr import observer_context
from gateway.errors import EncodeError

__all__ = ["encode_key_objects"]

_OF_INTEREST = codes.DCM.OfInterest  # (113000, DCM, "Of Interest"), CID 7010


def _key_images(
    volume: Volume, sources: Mapping[str, Dataset], findings: Sequence[ShownFinding]
) -> tuple[dict[str, Dataset], dict[str, list[int]], dict[str, list[str]]]:
    """Key image instances in finding order, their frames (multi-frame sources), and the findings on each."""
    images: dict[str, Dataset] = {}
    frames: dict[str, list[int]] = {}
    names: dict[str, list[str]] = {}
    for finding in findings:
        key = source_image_of_slice(volume, finding.key_slice, sources)
        uid = key.sop_instance_uid
        images.setdefault(uid, key.dataset)
        if key.multiframe and key.frame not in frames.setdefault(uid, []):
            frames[uid].append(key.frame)
        names.setdefault(uid, []).append(finding.name)
    return images, frames, names


def _description(provenance: Provenance, images: Mapping[str, Dataset], names: Mapping[str, list[str]]) -> str:
    where = "; ".join(f"{', '.join(names[uid])}: image {images[uid].get('InstanceNumber', '?')}" for uid in images)
    return (
        f"Key images of the findings of {provenance.model_name} {provenance.model_version} (AI, not reviewed by a "
        f"physician): {where}."
    )


def _link_presentation_state(
    document: Dataset, frames: Mapping[str, list[int]], presentation_state: EncodedObject
) -> None:
    """Give each IMAGE item its frames and a reference to the presentation state (PS3.3 C.17.3.2.1)."""
    for item in document.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        reference = item.ReferencedSOPSequence[0]
        uid = str(reference.ReferencedSOPInstanceUID)
        if frames.get(uid):
            reference.ReferencedFrameNumber = frames[uid] if len(frames[uid]) > 1 else frames[uid][0]
        state = Dataset()
        state.ReferencedSOPClassUID = presentation_state.sop_class_uid
        state.ReferencedSOPInstanceUID = presentation_state.sop_instance_uid
        reference.ReferencedSOPSequence = [state]


def encode_key_objects(
    volume: Volume,
    sources: Mapping[str, Dataset],
    findings: Sequence[ShownFinding],
    report: EncodedObject,
    presentation_state: EncodedObject,
    provenance: Provenance,
    *,
    series_number: int,
) -> EncodedObject | None:
    """A KOS flagging each finding's key image, with the presentation state and the report; ``None`` without
    findings.

    Parameters
    ----------
    volume
        The source volume the findings were made on.
    sources
        SOP Instance UID -> source dataset (headers suffice).
    findings
        The findings (:func:`gateway.encode.findings.shown_findings`).
    report, presentation_state
        The TID 1500 SR and the GSPS of the same result, both referenced.
    provenance
        The model and gateway that made them.
    series_number
        SeriesNumber of the document's new series.

    Raises
    ------
    EncodeError
        A source image missing, or highdicom refusing.
    """
    if not findings:
        return None
    images, frames, names = _key_images(volume, sources, findings)
    try:
        with copying_source_names():
            content = hd.ko.KeyObjectSelection(
                document_title=_OF_INTEREST,
                referenced_objects=[*images.values(), report.dataset, presentation_state.dataset],
                observer_device_context=observer_context(provenance),
                description=_description(provenance, images, names),
            )
            _link_presentation_state(content[0], frames, presentation_state)
            document = hd.ko.KeyObjectSelectionDocument(
                evidence=[*images.values(), report.dataset, presentation_state.dataset],
                content=content,
                series_instance_uid=provenance.uids.series("KO"),
                series_number=series_number,
                sop_instance_uid=provenance.uids.instance("KO"),
                instance_number=1,
                **provenance.equipment("key images"),
            )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"highdicom cannot build the key object selection: {exc}") from exc
    provenance.stamp(document)
    return EncodedObject.of("KO", document)
