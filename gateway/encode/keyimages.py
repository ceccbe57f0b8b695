"""Burned-in key images: for a PACS that shows neither SEG nor presentation states, a picture of each finding.

One Secondary Capture image (PS3.3 A.8.1) per finding (:mod:`gateway.encode.findings`), in one new series: the
finding's key image (the source image where it is largest) windowed as the presentation state shows it, with every
finding's outline on that image drawn in its segment's colour, a lesion's long and short axis, and in the pixels
themselves "NOT FOR DIAGNOSTIC USE", the model's name and version and the finding's caption. The image is enlarged
(by a whole factor, nearest neighbour) when the source is small, so that the text stays legible. Burned In
Annotation is YES; each image cites its source image (Source Image Sequence).

Only destinations that ask for them get these (``export.destinations.NAME.send: [..., sc]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from gateway.assemble.model import Volume
from gateway.encode.common import EncodedObject, Provenance, copying_source_names, series_laterality
from gateway.encode.findings import ShownFinding, as_points
from gateway.encode.frames import SourceImage, source_image_of_slice
from gateway.encode.gsps import display_window
from gateway.errors import EncodeError

__all__ = ["NOT_FOR_DIAGNOSIS", "encode_key_images", "patient_orientation", "render_key_image"]

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
_MIN_SIDE_PX = 512  # smaller images are enlarged to about this
_BANNER = (255, 210, 0)


def _scale(shape: tuple[int, int]) -> int:
    return max(1, min(4, math.ceil(_MIN_SIDE_PX / max(shape))))


def _grey(values: npt.NDArray[np.float32], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    centre, width = window
    low = centre - width / 2.0
    scaled = np.clip((values.astype(np.float32) - low) / width, 0.0, 1.0) * 255.0
    grey: npt.NDArray[np.uint8] = np.rint(scaled).astype(np.uint8)
    return grey


def _draw_finding(draw: ImageDraw.ImageDraw, finding: ShownFinding, image: SourceImage, key: bool, scale: int) -> None:
    lines = list(finding.outlines_on(image.mask(finding.mask_on(image.plane.slice))))
    if key and finding.axes is not None:
        lines.extend(as_points(image.points(axis)) for axis in finding.axes)
    width = max(1, scale // 2)
    for fill, extra in (((0, 0, 0), 2), (finding.label.color, 0)):  # a dark halo keeps a pale line visible on bone
        for points in lines:
            draw.line([(x * scale - 0.5, y * scale - 0.5) for x, y in points], fill=fill, width=width + extra)


def _text(
    draw: ImageDraw.ImageDraw, lines: Sequence[tuple[str, tuple[int, int, int]]], size: int, height: int, top: bool
) -> None:
    font = ImageFont.load_default(size=size)
    y = 4 if top else height - 4 - len(lines) * (size + 4)
    for text, colour in lines:
        box = draw.textbbox((6, y), text, font=font)
        draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        draw.text((6, y), text, fill=colour, font=font)
        y += size + 4


def render_key_image(
    image: SourceImage,
    volume: Volume,
    finding: ShownFinding,
    findings: Sequence[ShownFinding],
    model: str,
    window: tuple[float, float],
) -> npt.NDArray[np.uint8]:
    """The RGB key image (``[rows, columns, 3]`` uint8) of ``finding`` on its key image ``image``.

    Every finding of ``findings`` that touches that image is outlined; ``model`` (name and version) and the
    finding's caption are written at the bottom, :data:`NOT_FOR_DIAGNOSIS` at the top.
    """
    values = volume.array if volume.array.ndim == 3 else volume.array[0]
    fill = float(values.min())
    grey = _grey(image.mask(values[image.plane.slice], linear=True, fill=fill), window)
    scale = _scale((int(grey.shape[0]), int(grey.shape[1])))
    picture = Image.fromarray(grey, mode="L").convert("RGB")
    if scale > 1:
        picture = picture.resize((grey.shape[1] * scale, grey.shape[0] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for other in findings:
        if image.plane.slice in other.slices:
            _draw_finding(draw, other, image, other is finding, scale)
    size = max(12, picture.size[1] // 40)
    lines = [(NOT_FOR_DIAGNOSIS, _BANNER), (f"AI result: {model}", _BANNER)]
    _text(draw, lines, size, picture.size[1], top=True)
    _text(draw, [(finding.caption, finding.label.color)], size, picture.size[1], top=False)
    return np.asarray(picture, dtype=np.uint8)


def patient_orientation(volume: Volume) -> tuple[str, str]:
    """PatientOrientation (PS3.3 C.7.6.1.1.1) of the volume's slices: the patient directions along a row and down
    a column, most significant letter first (``L``/``R``, ``P``/``A``, ``H``/``F``)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def direction(vector: npt.NDArray[np.float64]) -> str:
        unit = vector / np.linalg.norm(vector)
        order = np.argsort(-np.abs(unit))
        return "".join(letters[k][0 if unit[k] > 0 else 1] for k in order if abs(unit[k]) > 0.25) or "L"

    return direction(volume.affine[:3, 2]), direction(volume.affine[:3, 1])


def _source_reference(image: SourceImage) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.sop_class_uid
    item.ReferencedSOPInstanceUID = image.sop_instance_uid
    if image.multiframe:
        item.ReferencedFrameNumber = image.frame
    return item


def _encode_one(
    pixels: npt.NDArray[np.uint8],
    orientation: tuple[str, str],
    image: SourceImage,
    finding: ShownFinding,
    provenance: Provenance,
    series_number: int,
    number: int,
) -> EncodedObject:
    with copying_source_names():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=image.dataset,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            patient_orientation=orientation,
            series_instance_uid=provenance.uids.series("SC"),
            series_number=series_number,
            sop_instance_uid=provenance.uids.instance("SC", number),
            instance_number=number,
            **provenance.equipment("key images burned in"),
        )
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. {finding.caption} ({provenance.model_name} {provenance.model_version})"
    sc.DerivationDescription = "Key image with the AI finding's outline and caption burned in"
    sc.SourceImageSequence = [_source_reference(image)]
    sc.Laterality = series_laterality(image.dataset)
    provenance.stamp(sc)
    return EncodedObject.of("SC", sc)


def encode_key_images(
    volume: Volume,
    sources: Mapping[str, Dataset],
    findings: Sequence[ShownFinding],
    provenance: Provenance,
    *,
    series_number: int,
    declared: tuple[float, float] | None = None,
) -> list[EncodedObject]:
    """One burned-in Secondary Capture key image per finding, in one new series (none without findings), in the
    window a presentation state of the same findings shows (``declared``: the manifest's display window).

    Raises
    ------
    EncodeError
        A source image missing, a mosaic, or highdicom refusing.
    """
    if not findings:
        return []
    if any(ref.tile is not None for ref in volume.slices):
        raise EncodeError("key images cannot be cut from mosaic tiles")
    first = source_image_of_slice(volume, 0, sources)
    window = display_window(volume, [first.dataset], declared)
    model = f"{provenance.model_name} {provenance.model_version}"
    orientation = patient_orientation(volume)
    objects = []
    try:
        for number, finding in enumerate(findings, start=1):
            image = source_image_of_slice(volume, finding.key_slice, sources)
            pixels = render_key_image(image, volume, finding, findings, model, window)
            objects.append(_encode_one(pixels, orientation, image, finding, provenance, series_number, number))
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"highdicom cannot build the key images: {exc}") from exc
    return objects
