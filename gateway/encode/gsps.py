"""The findings' outlines as a Grayscale Softcopy Presentation State (PS3.3 A.33.1), visible in any PACS viewer.

Many viewers do not render DICOM SEG, but every one applies a presentation state: a radiologist toggles it like
any annotation. The presentation state references every source image of the volume (so it applies while scrolling
the whole series) and holds, per source image:

- the closed outline of each finding that touches it (:mod:`gateway.encode.findings`: one per lesion, or one per
  whole segment), as POLYLINE graphic objects in PIXEL units, tracking identifier and UID those of the finding's
  SR measurement group;
- on a finding's key image (where it is largest), for a lesion its long and short axis as two lines, and a text
  label (``nodule 2: 0.53 ml, 11.2 x 9.8 mm``) anchored at its centre.

Each segment has its own graphic layer, named after it and drawn in its colour (CIELab, and white for grayscale
displays). Outlines are drawn on the source images' own pixel grid (:mod:`gateway.assemble.source_grid`), so they
lie on real images after a gantry-tilt or spacing correction too. The VOI window is the model's declared display
window (a lung window for lung nodules), else the sources' own, else one from the volume's values; the Modality LUT
is the sources'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset

from gateway.assemble.model import Volume
from gateway.encode.annotations import annotation, annotation_sequence, polylines
from gateway.encode.common import EncodedObject, Provenance, copying_source_names, series_laterality
from gateway.encode.findings import ShownFinding, as_points
from gateway.encode.frames import SourceImage, source_image_of_slice, source_images
from gateway.errors import EncodeError

__all__ = ["display_window", "encode_presentation_state", "layer_name"]

_WHITE = 0xFFFF  # Graphic Layer Recommended Display Grayscale Value: the brightest P-value
_TEXT_HEIGHT_PX = 14.0
_TEXT_WIDTH_PX = 7.0  # per character, for the text box


def layer_name(name: str) -> str:
    """A Code String (upper case letters, digits, space, underscore; 16 characters) from a segment's name."""
    cs = re.sub(r"[^A-Z0-9 _]", "_", name.upper())[:16].strip()
    return cs or "FINDING"


def display_window(
    volume: Volume, sources: Sequence[Dataset], declared: tuple[float, float] | None = None
) -> tuple[float, float]:
    """(centre, width) to show the findings in: the manifest's ``outputs.display_window`` when it declares one, else
    the first source's window, else the 1st-99th percentile of the volume's values."""
    if declared is not None:
        return declared
    first = sources[0]
    if "WindowCenter" in first and "WindowWidth" in first:
        centre, width = first.WindowCenter, first.WindowWidth
        centre = centre[0] if isinstance(centre, Sequence) and not isinstance(centre, str) else centre
        width = width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width
        if float(width) > 0:
            return float(centre), float(width)
    values = volume.array if volume.array.ndim == 3 else volume.array[0]
    step = max(1, values.shape[0] // 16)
    low, high = np.percentile(values[::step], [1.0, 99.0])
    width = max(float(high - low), 1.0)
    return float(low) + width / 2.0, width


@dataclass
class _Drawing:
    """The graphic and text objects of one layer on one source image."""

    image: SourceImage
    layer: str
    graphics: list[bytes]
    texts: list[hd.pr.TextObject]

    def annotation(self) -> bytes:
        """Its Graphic Annotation Sequence item (PS3.3 C.10.5), for the image (and frame) and layer."""
        frame = self.image.frame if self.image.multiframe else None
        image = self.image
        return annotation(image.sop_class_uid, image.sop_instance_uid, frame, self.layer, self.graphics, self.texts)


def _layers(findings: Sequence[ShownFinding]) -> dict[int, hd.pr.GraphicLayer]:
    layers: dict[int, hd.pr.GraphicLayer] = {}
    names: set[str] = set()
    for finding in findings:
        if finding.segment_number in layers:
            continue
        name = layer_name(finding.label.name)
        while name in names:  # two segments whose names differ only in what a Code String cannot hold
            name = f"{name[:13]}_{finding.segment_number}"[:16]
        names.add(name)
        layer = hd.pr.GraphicLayer(
            layer_name=name,
            order=finding.segment_number,
            description=finding.label.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*finding.label.color),
        )
        layer.GraphicLayerRecommendedDisplayGrayscaleValue = _WHITE
        layers[finding.segment_number] = layer
    return layers


def _outline_objects(finding: ShownFinding, mask: npt.NDArray[np.bool_]) -> list[bytes]:
    return [
        graphic
        for points in finding.outlines_on(mask)
        for graphic in polylines(points, finding.name, finding.tracking_uid)
    ]


def _key_objects(
    finding: ShownFinding, image: SourceImage, mask: npt.NDArray[np.bool_]
) -> tuple[list[bytes], list[hd.pr.TextObject]]:
    """Long and short axis (a lesion) and the caption, on the finding's key image (``mask``: its cross-section)."""
    graphics = [
        graphic
        for axis in finding.axes or ()
        for graphic in polylines(as_points(image.points(axis)), finding.name, finding.tracking_uid)
    ]
    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        return graphics, []
    centre = (float(columns.mean()) + 0.5, float(rows.mean()) + 0.5)
    box = (float(rows.min()), float(rows.max()) + 1.0, float(columns.min()))
    return graphics, [_caption(finding, centre, box, image.shape)]


def _caption(
    finding: ShownFinding, centre: tuple[float, float], box: tuple[float, float, float], shape: tuple[int, int]
) -> hd.pr.TextObject:
    """The caption in a box just above the finding (below it when there is no room), inside the image."""
    top, bottom, left = box
    rows, columns = shape
    width = min(_TEXT_WIDTH_PX * len(finding.caption), float(columns))
    x0 = min(max(left, 0.0), columns - width)
    y0 = top - _TEXT_HEIGHT_PX - 4.0
    if y0 < 0:
        y0 = min(bottom + 4.0, rows - _TEXT_HEIGHT_PX)
    y0 = max(y0, 0.0)
    return hd.pr.TextObject(
        text_value=finding.caption,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(x0, y0, x0 + width, y0 + _TEXT_HEIGHT_PX),
        anchor_point=centre,
        anchor_point_visible=True,
        text_justification=hd.pr.TextJustificationValues.LEFT,
        tracking_id=finding.name,
        tracking_uid=finding.tracking_uid,
    )


def _same(a: SourceImage, b: SourceImage) -> bool:
    return a.sop_instance_uid == b.sop_instance_uid and a.frame == b.frame


def _drawings(
    volume: Volume,
    images: Sequence[SourceImage],
    sources: Mapping[str, Dataset],
    findings: Sequence[ShownFinding],
    layers: Mapping[int, str],
) -> list[_Drawing]:
    keys = {id(f): source_image_of_slice(volume, f.key_slice, sources) for f in findings}
    drawings: list[_Drawing] = []
    for image in images:
        by_layer: dict[int, _Drawing] = {}
        for finding in findings:
            if image.plane.slice not in finding.slices:
                continue
            layer = layers[finding.segment_number]
            drawing = by_layer.setdefault(finding.segment_number, _Drawing(image, layer, [], []))
            mask = image.mask(finding.mask_on(image.plane.slice))
            drawing.graphics.extend(_outline_objects(finding, mask))
            if _same(keys[id(finding)], image):
                graphics, texts = _key_objects(finding, image, mask)
                drawing.graphics.extend(graphics)
                drawing.texts.extend(texts)
        drawings.extend(d for d in by_layer.values() if d.graphics or d.texts)
    return drawings


def _shared_rescale(images: Sequence[Dataset]) -> hd.ModalityLUTTransformation | None:
    """The Modality LUT of the images when they all rescale alike (the common case, checked here in one pass);
    ``None`` lets highdicom work it out (and refuse images that differ)."""
    keys = {
        (str(ds.get("RescaleSlope", "")), str(ds.get("RescaleIntercept", "")), str(ds.get("RescaleType", "")))
        for ds in images
    }
    if len(keys) != 1 or any("ModalityLUTSequence" in ds or "NumberOfFrames" in ds for ds in images):
        return None
    slope, intercept, kind = keys.pop()
    if not slope or not intercept:
        return None
    return hd.ModalityLUTTransformation(
        rescale_intercept=float(intercept), rescale_slope=float(slope), rescale_type=kind or "HU"
    )


def encode_presentation_state(
    volume: Volume,
    sources: Mapping[str, Dataset],
    findings: Sequence[ShownFinding],
    provenance: Provenance,
    *,
    series_number: int,
    window: tuple[float, float] | None = None,
) -> EncodedObject | None:
    """The findings' outlines as a GSPS over the source images; ``None`` when there is no finding to show.

    Parameters
    ----------
    volume
        The source volume the findings were made on.
    sources
        SOP Instance UID -> source dataset (headers suffice), for every source image of ``volume``.
    findings
        What to draw (:func:`gateway.encode.findings.shown_findings`).
    provenance
        The model and gateway that made them.
    series_number
        SeriesNumber of the presentation state's new series.
    window
        The manifest's ``outputs.display_window`` (centre, width), if it declares one (:func:`display_window`).

    Raises
    ------
    EncodeError
        A source image missing, a mosaic (its tiles are not images a viewer shows on their own), or highdicom
        refusing.
    """
    if not findings:
        return None
    if any(ref.tile is not None for ref in volume.slices):
        raise EncodeError("outlines cannot be drawn on mosaic tiles: no presentation state for a mosaic series")
    layers = _layers(findings)
    images = source_images(volume, sources)
    names = {number: str(layer.GraphicLayer) for number, layer in layers.items()}
    drawings = _drawings(volume, images, sources, findings, names)
    referenced = list({image.sop_instance_uid: image.dataset for image in images}.values())
    centre, width = display_window(volume, referenced, window)
    rescale = _shared_rescale(referenced)
    try:
        with copying_source_names():
            gsps = hd.pr.GrayscaleSoftcopyPresentationState(
                referenced_images=referenced,
                series_instance_uid=provenance.uids.series("GSPS"),
                series_number=series_number,
                sop_instance_uid=provenance.uids.instance("GSPS"),
                instance_number=1,
                content_label="AI_FINDINGS",
                content_description=f"AI outlines: {provenance.model_name} {provenance.model_version}"[:64],
                graphic_layers=list(layers.values()),
                voi_lut_transformations=[hd.pr.SoftcopyVOILUTTransformation(window_center=centre, window_width=width)],
                modality_lut_transformation=rescale,
                **provenance.equipment("outlines"),
            )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"highdicom cannot build the presentation state: {exc}") from exc
    sequence = annotation_sequence([d.annotation() for d in drawings])
    gsps[sequence.tag] = sequence
    # Written as it is: otherwise pydicom, taking a new dataset for one of another encoding, parses every raw
    # element again to look for ambiguous VRs (there are none: highdicom and annotations.py set every VR).
    gsps.set_original_encoding(False, True, convert_encodings(gsps.get("SpecificCharacterSet") or "ISO_IR 6"))
    provenance.stamp(gsps)
    gsps.Laterality = series_laterality(referenced[0])
    return EncodedObject.of("GSPS", gsps)
