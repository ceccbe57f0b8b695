"""Overlay previews: one slice of a SEG or Parametric Map over its source image, as a PNG (numpy, OpenCV, Pillow).

:func:`read_layout` reads an output's header (no pixels): its frames, the source image each lies on (every frame
the gateway writes lies on a real source image and cites it, :mod:`gateway.encode.frames`), in **anatomical order**
along the slice normal: axial slices from head to feet, coronal from front to back, sagittal from the patient's
right to left. :func:`render_png` draws one of those planes:

- the source image (read from the store by the caller), its stored values through the Modality LUT (Rescale Slope
  and Intercept, per frame for an enhanced multi-frame image), then a window: the model's display window when its
  manifest gives one (what the presentation state the gateway wrote uses, e.g. the lung window of a nodule model),
  else the source's own Window Center/Width, else for CT a soft-tissue (mediastinal) window, centre 40 HU width
  400 HU, and for anything else the 1st to 99th percentile of the image. MONOCHROME1 is inverted; a colour source
  is shown as it is;
- for a SEG, the segment's outline in its Recommended Display CIELab Value as sRGB (highdicom's converter), along
  the pixel edges of the segment on that image, with a thin black edge so that a light colour shows on bone;
- for a Parametric Map, its values (through the Real World Value Mapping) as a colour map (viridis) laid at 50 %
  over the image where the map is not zero, scaled over the map's own window (1st to 99th percentile of its values,
  as the gateway writes it), with a scale bar at the right naming the values and the unit.

The picture is scaled so that its longer side is at least :data:`MIN_SIDE` and at most :data:`MAX_SIDE` pixels
(bounded work, whatever the source's size). Nothing is cached: each request reads the files it needs. A request
the output cannot answer raises :class:`ValueError` with the reason (the page answers it 400).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import iter_pixels, pixel_array

from gateway.ui.report import for_reading, readable_unit

__all__ = [
    "MAX_SIDE",
    "MIN_SIDE",
    "Layout",
    "Plane",
    "Segment",
    "Window",
    "display_size",
    "key_plane",
    "nearest_plane",
    "read_layout",
    "render_png",
    "run_around",
    "source_window",
]

MAX_SIDE = 1024
MIN_SIDE = 512
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
#: CT without a window of its own: soft tissue (mediastinum), centre 40 HU, width 400 HU.
CT_DEFAULT_WINDOW = (40.0, 400.0)
_MAP_ALPHA = 0.5
_LEGEND_WIDTH = 96
_HALO = (0, 0, 0)
_NO_COLOUR = (255, 255, 0)  # a segment without a recommended colour: yellow

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Window:
    """A display window in modality units (Hounsfield units for CT): centre and width."""

    centre: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.centre) and math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"window: a finite centre and a positive width, not {self.centre}/{self.width}")


@dataclass(frozen=True)
class Plane:
    """A source image an output's frames lie on: its SOP Instance UID, its frame (1-based, for a multi-frame
    source), its position along the output's anatomical order (mm) and its Image Position (Patient)."""

    sop_instance_uid: str
    frame: int | None
    position: float
    origin: tuple[float, float, float]


@dataclass(frozen=True)
class Segment:
    """A SEG's segment: number, label and display colour (sRGB)."""

    number: int
    label: str
    colour: tuple[int, int, int]

    @property
    def hex(self) -> str:
        """``#ff4040``."""
        return "#{:02x}{:02x}{:02x}".format(*self.colour)


@dataclass(frozen=True)
class Layout:
    """Where an output's frames lie (read by :func:`read_layout`).

    ``frames`` maps ``(segment, plane)`` to the 0-based frame holding that segment on that plane (segment 0 for a
    Parametric Map or a label map, whose one frame per plane holds every segment).
    """

    kind: Literal["SEG", "PM"]
    planes: tuple[Plane, ...]
    frames: Mapping[tuple[int, int], int]
    rows: int
    columns: int
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    segments: Mapping[int, Segment] = field(default_factory=dict)
    labelmap: bool = False
    fractional: bool = False
    map_label: str | None = None
    map_unit: str | None = None
    map_window: Window | None = None

    def touched(self, segment: int | None = None) -> tuple[int, ...]:
        """The planes (indices into :attr:`planes`) that hold ``segment`` (any frame for a map), in order.

        For a label map every plane with a frame is listed (which hold the segment is known from the pixels
        only)."""
        key = 0 if self.kind == "PM" or self.labelmap or segment is None else segment
        if key == 0:
            return tuple(sorted({plane for _, plane in self.frames}))
        return tuple(sorted(plane for seg, plane in self.frames if seg == key))

    def plane_of_image(self, sop_instance_uid: str) -> int | None:
        """The plane of a source image (its first frame), if the output has one on it."""
        return next((k for k, p in enumerate(self.planes) if p.sop_instance_uid == sop_instance_uid), None)


def read_layout(path: Path) -> Layout:
    """Read the header of a SEG or Parametric Map file: its planes in anatomical order and its frames.

    Raises
    ------
    ValueError
        Not a SEG or Parametric Map, or frames that do not cite their source image (the reason says which).
    """
    ds = dcmread(path, stop_before_pixels=True)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in (SEG_CLASS, LABELMAP_SEG_CLASS, PM_CLASS):
        raise ValueError("output: only a Segmentation or a Parametric Map has an overlay")
    kind: Literal["SEG", "PM"] = "PM" if sop_class == PM_CLASS else "SEG"
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or ())
    if not per_frame:
        raise ValueError("output: no Per-Frame Functional Groups (not an enhanced multi-frame object)")
    row_dir, col_dir = _orientation(shared, per_frame[0])
    normal = _anatomical_normal(np.cross(row_dir, col_dir))
    cited = [_cited(group, shared, k) for k, group in enumerate(per_frame)]
    planes, index = _planes(cited, normal)
    labelmap = kind == "SEG" and (sop_class == LABELMAP_SEG_CLASS or ds.get("SegmentationType") == "LABELMAP")
    frames = {
        (_segment_of(group, shared, kind, labelmap), index[key]): k
        for k, (group, key) in enumerate(zip(per_frame, cited, strict=True))
    }
    return Layout(
        kind=kind,
        planes=planes,
        frames=frames,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        row_direction=(float(row_dir[0]), float(row_dir[1]), float(row_dir[2])),
        column_direction=(float(col_dir[0]), float(col_dir[1]), float(col_dir[2])),
        pixel_spacing=_pixel_spacing(shared, per_frame[0]),
        segments=_segments(ds) if kind == "SEG" else {},
        labelmap=labelmap,
        fractional=ds.get("SegmentationType") == "FRACTIONAL",
        map_label=_map_label(shared) if kind == "PM" else None,
        map_unit=_map_unit(shared) if kind == "PM" else None,
        map_window=_frame_window(shared, per_frame[0]) if kind == "PM" else None,
    )


def key_plane(layout: Layout, path: Path, segment: int) -> int:
    """The plane where ``segment`` covers the most pixels (the first of equal ones); reads its frames one by one.

    Raises
    ------
    ValueError
        The SEG has no frame of that segment.
    """
    touched = layout.touched(segment)
    if not touched:
        raise ValueError(f"segment: the SEG holds nothing of segment {segment}")
    frames = {layout.frames[(0, p) if layout.labelmap else (segment, p)]: p for p in touched}
    best, best_area = touched[0], -1
    for frame, pixels in zip(sorted(frames), iter_pixels(path, indices=sorted(frames)), strict=True):
        area = int(np.count_nonzero(_segment_pixels(layout, np.asarray(pixels), segment)))
        if area > best_area or (area == best_area and frames[frame] < best):
            best, best_area = frames[frame], area
    return best


def nearest_plane(layout: Layout, point: Sequence[float], planes: Sequence[int] | None = None) -> int:
    """Of ``planes`` (default: all), the one nearest ``point`` (patient coordinates, mm) along the slice normal."""
    candidates = list(range(len(layout.planes)) if planes is None else planes)
    if not candidates:
        raise ValueError("planes: none to choose from")
    normal = _anatomical_normal(np.cross(layout.row_direction, layout.column_direction))
    along = float(np.dot(normal, np.asarray(point, dtype=np.float64)))
    return min(candidates, key=lambda k: abs(layout.planes[k].position - along))


def run_around(layout: Layout, planes: Sequence[int], plane: int) -> tuple[int, ...]:
    """The run of ``planes`` (in order) that holds ``plane`` with no gap between neighbours: the slices of one
    lesion, where its segment's other lesions lie further along. A gap is a step more than 1.5 times the smallest
    step between neighbouring ``planes``."""
    ordered = sorted(planes)
    if plane not in ordered:
        return (plane,)
    steps = [layout.planes[b].position - layout.planes[a].position for a, b in pairwise(ordered)]
    positive = [step for step in steps if step > 1e-6]
    if not positive:
        return tuple(ordered)
    limit = 1.5 * min(positive)
    runs: list[list[int]] = [[ordered[0]]]
    for k, step in zip(ordered[1:], steps, strict=True):
        if step > limit:
            runs.append([])
        runs[-1].append(k)
    return tuple(next(run for run in runs if plane in run))


def source_window(source: Dataset, frame: int | None = None) -> Window | None:
    """The source image's own window (its first Window Center/Width, per frame for an enhanced image), if any."""
    if "WindowCenter" in source and "WindowWidth" in source:
        return _window_of(source)
    shared = _first(source.get("SharedFunctionalGroupsSequence"))
    groups = source.get("PerFrameFunctionalGroupsSequence") or ()
    group = groups[frame - 1] if frame is not None and 0 < frame <= len(groups) else None
    return _frame_window(shared, group)


def render_png(
    layout: Layout,
    output: Path,
    source: Path,
    plane: int,
    *,
    segment: int | None = None,
    window: Window | None = None,
) -> bytes:
    """The PNG of ``plane``: the source image, windowed, with the segment's outline or the map's colours.

    Parameters
    ----------
    layout
        The output's layout (:func:`read_layout` of ``output``).
    output
        The SEG or Parametric Map file.
    source
        The file of the source image the plane lies on (``layout.planes[plane]``).
    plane
        Which plane (an index into ``layout.planes``).
    segment
        The SEG's segment to outline (required for a SEG, ignored for a map).
    window
        The model's display window, which wins over the source's own (see the module docstring).

    Raises
    ------
    ValueError
        A plane or segment the output does not have, or a source image that does not fit the output's frames.
    """
    import cv2

    if not 0 <= plane < len(layout.planes):
        raise ValueError(f"slice: the output has {len(layout.planes)} slice(s), numbered from 0")
    if layout.kind == "SEG" and (segment is None or segment not in layout.segments):
        raise ValueError(f"segment: the SEG's segments are {', '.join(map(str, sorted(layout.segments)))}")
    image = _source_rgb(source, layout, layout.planes[plane].frame, window)
    size = display_size(layout.rows, layout.columns, layout.pixel_spacing)
    interpolation = cv2.INTER_AREA if size[0] < layout.columns else cv2.INTER_LINEAR
    shown = np.asarray(cv2.resize(image, size, interpolation=interpolation), dtype=np.uint8)
    if layout.kind == "SEG":
        assert segment is not None
        _outline(shown, _mask(layout, output, segment, plane), layout.segments[segment].colour)
        picture = Image.fromarray(shown)
    else:
        picture = _with_map(shown, layout, output, plane)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def display_size(rows: int, columns: int, spacing: tuple[float, float]) -> tuple[int, int]:
    """(width, height) of the picture: square pixels on the patient, the longer side in [MIN_SIDE, MAX_SIDE]."""
    height_mm, width_mm = rows * spacing[0], columns * spacing[1]
    longer = max(height_mm, width_mm) or 1.0
    side = min(MAX_SIDE, max(MIN_SIDE, max(rows, columns)))
    return max(1, round(side * width_mm / longer)), max(1, round(side * height_mm / longer))


# --- the output's header ------------------------------------------------------------------------------------


def _first(sequence: Sequence[Dataset] | None) -> Dataset | None:
    return sequence[0] if sequence else None


def _attribute(keyword: str, sequence: str, *groups: Dataset | None) -> object | None:
    """``keyword`` of the first item of ``sequence`` in the first of ``groups`` (per-frame before shared) having it."""
    for group in groups:
        item = _first(group.get(sequence)) if group is not None else None
        if item is not None and keyword in item:
            value: object = item.get(keyword)
            return value
    return None


def _orientation(shared: Dataset | None, frame: Dataset) -> tuple[Array, Array]:
    value = _attribute("ImageOrientationPatient", "PlaneOrientationSequence", frame, shared)
    if value is None:
        raise ValueError("output: no Image Orientation (Patient) in its functional groups")
    cosines = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    return cosines[:3], cosines[3:]


def _pixel_spacing(shared: Dataset | None, frame: Dataset) -> tuple[float, float]:
    value = _attribute("PixelSpacing", "PixelMeasuresSequence", frame, shared)
    if value is None:
        return 1.0, 1.0
    row, column = (float(v) for v in value)  # type: ignore[attr-defined]
    return row, column


def _anatomical_normal(normal: npt.ArrayLike) -> Array:
    """The slice normal pointing the way a reader scrolls: to the feet, the back, or the patient's left (LPS)."""
    n = np.asarray(normal, dtype=np.float64)
    n = n / (np.linalg.norm(n) or 1.0)
    axis = int(np.argmax(np.abs(n)))
    wanted = -1.0 if axis == 2 else 1.0  # LPS: +z is head, +y is back, +x is left
    return n if n[axis] * wanted > 0 else -n


def _cited(group: Dataset, shared: Dataset | None, k: int) -> tuple[str, int | None, tuple[float, float, float]]:
    """(source SOP Instance UID, source frame, Image Position (Patient)) of frame ``k``."""
    position = _attribute("ImagePositionPatient", "PlanePositionSequence", group, shared)
    if position is None:
        raise ValueError(f"output: frame {k + 1} has no Image Position (Patient)")
    x, y, z = (float(v) for v in position)  # type: ignore[attr-defined]
    for derivation in group.get("DerivationImageSequence") or ():
        for source in derivation.get("SourceImageSequence") or ():
            uid = source.get("ReferencedSOPInstanceUID")
            if uid:
                frames = source.get("ReferencedFrameNumber")
                frame = None if frames is None else int(frames[0] if isinstance(frames, list | tuple) else frames)
                return str(uid), frame, (x, y, z)
    raise ValueError(f"output: frame {k + 1} cites no source image (a mosaic's tiles are not images of their own)")


def _planes(
    cited: Sequence[tuple[str, int | None, tuple[float, float, float]]], normal: Array
) -> tuple[tuple[Plane, ...], dict[tuple[str, int | None, tuple[float, float, float]], int]]:
    unique = {key: Plane(key[0], key[1], float(np.dot(normal, key[2])), key[2]) for key in cited}
    ordered = sorted(unique.items(), key=lambda item: (item[1].position, item[1].sop_instance_uid, item[1].frame or 0))
    return tuple(p for _, p in ordered), {key: k for k, (key, _) in enumerate(ordered)}


def _segment_of(group: Dataset, shared: Dataset | None, kind: str, labelmap: bool) -> int:
    if kind == "PM" or labelmap:
        return 0
    number = _attribute("ReferencedSegmentNumber", "SegmentIdentificationSequence", group, shared)
    return int(number) if number is not None else 0  # type: ignore[call-overload]


def _segments(ds: Dataset) -> dict[int, Segment]:
    found: dict[int, Segment] = {}
    for item in ds.get("SegmentSequence") or ():
        number = int(item.SegmentNumber)
        found[number] = Segment(number, str(item.get("SegmentLabel") or f"segment {number}"), _colour(item))
    return found


def _colour(item: Dataset) -> tuple[int, int, int]:
    import highdicom as hd

    lab = item.get("RecommendedDisplayCIELabValue")
    if lab is None or len(lab) != 3:
        return _NO_COLOUR
    r, g, b = hd.color.CIELabColor.from_dicom_value([int(v) for v in lab]).to_rgb(clip=True)
    return round(r), round(g), round(b)


def _map_label(shared: Dataset | None) -> str | None:
    mapping = _first(shared.get("RealWorldValueMappingSequence")) if shared is not None else None
    if mapping is None:
        return None
    return str(mapping.get("LUTExplanation") or mapping.get("LUTLabel") or "") or None


def _map_unit(shared: Dataset | None) -> str | None:
    mapping = _first(shared.get("RealWorldValueMappingSequence")) if shared is not None else None
    units = _first(mapping.get("MeasurementUnitsCodeSequence")) if mapping is not None else None
    return str(units.CodeValue) if units is not None and "CodeValue" in units else None


def _window_of(item: Dataset) -> Window | None:
    try:
        centre, width = item.WindowCenter, item.WindowWidth
        centre = centre[0] if not isinstance(centre, float | int) else centre
        width = width[0] if not isinstance(width, float | int) else width
        return Window(float(centre), float(width))
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _frame_window(shared: Dataset | None, frame: Dataset | None) -> Window | None:
    for group in (frame, shared):
        item = _first(group.get("FrameVOILUTSequence")) if group is not None else None
        if item is not None and (window := _window_of(item)) is not None:
            return window
    return None


# --- pixels -------------------------------------------------------------------------------------------------


def _frame_pixels(path: Path, frame: int) -> npt.NDArray[Any]:
    """One frame (0-based) of a multi-frame file, decoded alone."""
    return np.asarray(pixel_array(path, index=frame))


def _mask(layout: Layout, path: Path, segment: int, plane: int) -> npt.NDArray[np.bool_]:
    key = (0, plane) if layout.labelmap else (segment, plane)
    frame = layout.frames.get(key)
    if frame is None:
        return np.zeros((layout.rows, layout.columns), dtype=bool)
    return _segment_pixels(layout, _frame_pixels(path, frame), segment)


def _segment_pixels(layout: Layout, pixels: npt.NDArray[Any], segment: int) -> npt.NDArray[np.bool_]:
    """A frame's pixels of ``segment``: a label map's equal to it, a fractional frame's at least half full."""
    if layout.labelmap:
        return np.asarray(pixels == segment)
    if layout.fractional:
        return np.asarray(pixels > int(pixels.max()) // 2) if pixels.any() else np.zeros(pixels.shape, dtype=bool)
    return np.asarray(pixels > 0)


def _rescale(source: Dataset, pixels: npt.NDArray[Any], frame: int | None) -> Array:
    """Stored values to modality values (Rescale Slope/Intercept, per frame for an enhanced image)."""
    if "RescaleSlope" in source or "ModalityLUTSequence" in source:
        return np.asarray(apply_modality_lut(pixels, source), dtype=np.float64)
    shared = _first(source.get("SharedFunctionalGroupsSequence"))
    groups = source.get("PerFrameFunctionalGroupsSequence") or ()
    group = groups[frame - 1] if frame is not None and 0 < frame <= len(groups) else None
    slope = _attribute("RescaleSlope", "PixelValueTransformationSequence", group, shared)
    intercept = _attribute("RescaleIntercept", "PixelValueTransformationSequence", group, shared)
    return np.asarray(pixels, dtype=np.float64) * _number(slope, 1.0) + _number(intercept, 0.0)


def _number(value: object, default: float) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _source_rgb(path: Path, layout: Layout, frame: int | None, window: Window | None) -> npt.NDArray[np.uint8]:
    source = dcmread(path)
    frames = int(source.get("NumberOfFrames") or 1)
    if frame is not None and not 0 < frame <= frames:
        raise ValueError(f"slice: the source image has no frame {frame}")
    pixels = np.asarray(source.pixel_array if frames == 1 else pixel_array(source, index=(frame or 1) - 1))
    if pixels.shape[:2] != (layout.rows, layout.columns):
        raise ValueError("output: its frames do not have the source image's rows and columns")
    if pixels.ndim == 3:  # a colour source: shown as it is
        return np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)
    values = _rescale(source, pixels, frame)
    chosen = window or source_window(source, frame) or _default_window(str(source.get("Modality", "")), values)
    grey = _windowed(values, chosen)
    if source.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


def _default_window(modality: str, values: Array) -> Window:
    if modality == "CT":
        return Window(*CT_DEFAULT_WINDOW)
    low, high = np.percentile(values, [1.0, 99.0])
    return Window(float(low + high) / 2.0, max(float(high - low), 1.0))


def _windowed(values: Array, window: Window) -> npt.NDArray[np.uint8]:
    """The linear VOI function of PS3.3 C.11.2.1.2.1, to 8 bits."""
    scaled = ((values - (window.centre - 0.5)) / max(window.width - 1.0, 1.0) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _outline(image: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_], colour: tuple[int, int, int]) -> None:
    """Draw the mask's outline, along its pixels' edges, on ``image`` (already at display size)."""
    import cv2

    if not mask.any():
        return
    height, width = image.shape[:2]
    shown = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(shown, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(2, round(max(height, width) / 300))
    # A dark edge on either side, so that any colour shows on any grey (a white bone outline on white bone).
    cv2.drawContours(image, contours, -1, _HALO, thickness + 2, lineType=cv2.LINE_8)
    cv2.drawContours(image, contours, -1, colour, thickness, lineType=cv2.LINE_8)


def _with_map(image: npt.NDArray[np.uint8], layout: Layout, path: Path, plane: int) -> Image.Image:
    import cv2

    frame = layout.frames.get((0, plane))
    height, width = image.shape[:2]
    window = layout.map_window or Window(0.5, 1.0)
    low, high = window.centre - window.width / 2.0, window.centre + window.width / 2.0
    if frame is not None:
        values = np.asarray(_frame_pixels(path, frame), dtype=np.float64)
        shown = cv2.resize(values, (width, height), interpolation=cv2.INTER_NEAREST)
        inside = np.isfinite(shown) & (shown != 0)
        colours = _colour_map(np.clip((shown - low) / (high - low), 0.0, 1.0))
        blended = image.astype(np.float64) * (1 - _MAP_ALPHA) + colours.astype(np.float64) * _MAP_ALPHA
        image = np.where(inside[..., None], np.rint(blended), image).astype(np.uint8)
    return _legend(Image.fromarray(image), low, high, layout.map_unit)


def _colour_map(fraction: Array) -> npt.NDArray[np.uint8]:
    """Viridis (OpenCV's table) of values in [0, 1], as RGB."""
    import cv2

    grey = np.rint(fraction * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS)
    return np.ascontiguousarray(bgr[..., ::-1])


def _legend(picture: Image.Image, low: float, high: float, unit: str | None) -> Image.Image:
    """The picture with a scale at its right: the colour bar, its top and bottom values, and the unit."""
    width, height = picture.size
    canvas = Image.new("RGB", (width + _LEGEND_WIDTH, height), (24, 24, 24))
    canvas.paste(picture, (0, 0))
    top, bottom = 24, height - 40
    ramp = np.linspace(1.0, 0.0, max(bottom - top, 2))[:, None].repeat(16, axis=1)
    canvas.paste(Image.fromarray(_colour_map(ramp)), (width + 12, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    ucum = unit or "1"
    draw.text((width + 32, top - 6), for_reading(high, ucum), fill=(235, 235, 235), font=font)
    draw.text((width + 32, bottom - 10), for_reading(low, ucum), fill=(235, 235, 235), font=font)
    draw.text((width + 8, bottom + 12), readable_unit(ucum) or "(no unit)", fill=(235, 235, 235), font=font)
    return canvas
