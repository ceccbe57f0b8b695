"""A model's parametric maps as DICOM Parametric Maps (PS3.3 A.75), one object per map, float32.

Each map's Real World Value Mapping (PS3.3 C.7.6.16.2.11) is the identity (slope 1, intercept 0) over the map's
value range, with the manifest's quantity (Quantity Definition) and UCUM unit, and its LUT Label the map's name.
A recommended window spans the 1st to 99th percentile of the non-zero values. General Series Laterality is the
sources' or, when they have none, empty (Type 2C; highdicom leaves it out, which dciodvfy reports as an error
since no Image or Frame Laterality stands in for it). Frames lie on the source images as
:mod:`gateway.encode.frames` describes (a mosaic's tiles get their positions from the volume's affine; after
gantry-tilt or uneven-spacing resampling there is one frame per source image, the map moved back onto its pixel
grid by linear interpolation in-plane, 0 where the image reaches outside the volume). The objects start a new
series in the sources' study.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from gateway.encode.common import EncodedObject, Provenance, coded, copying_source_names, series_laterality
from gateway.encode.frames import FramePlan, plan_frames
from gateway.errors import EncodeError
from gateway.infer.results import ModelResult
from gateway.registry.manifest import ParametricMap

__all__ = ["encode_parametric_maps"]

Map = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _Series:
    """The new series the maps go in, one instance per declared map."""

    uid: str
    number: int
    provenance: Provenance
    maps: tuple[ParametricMap, ...]

    def instance(self, declared: ParametricMap) -> int:
        return self.maps.index(declared) + 1


def _values(result: ModelResult, declared: ParametricMap) -> Map:
    values = result.maps.get(declared.name)
    if values is None:
        raise EncodeError(f"{result.ref} gave no map {declared.name!r}")
    expected = result.volume.array.shape[-3:]
    if values.shape != expected:
        raise EncodeError(f"{result.ref}: map {declared.name!r} shape {values.shape} is not the volume's {expected}")
    if not np.isfinite(values).all():
        raise EncodeError(f"{result.ref}: map {declared.name!r} holds NaN or infinite values")
    return np.ascontiguousarray(values, dtype=np.float32)


def _mapping(declared: ParametricMap, values: Map) -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label=declared.name[:16],
        lut_explanation=f"{declared.quantity.meaning} ({declared.units.meaning})"[:64],
        unit=coded(declared.units),
        value_range=(float(values.min()), float(values.max())),
        slope=1.0,
        intercept=0.0,
        quantity_definition=coded(declared.quantity),
    )


def _window(values: Map) -> hd.VOILUTTransformation:
    inside = values[values != 0]
    low, high = np.percentile(inside, [1.0, 99.0]) if inside.size else (0.0, 1.0)
    width = max(float(high - low), 1e-3)
    return hd.VOILUTTransformation(window_center=float(low) + width / 2.0, window_width=width)


def _recognizable(plan: FramePlan) -> bool:
    return any(str(ds.get("RecognizableVisualFeatures", "NO")).upper() == "YES" for ds in plan.source_images)


def _encode(result: ModelResult, declared: ParametricMap, plan: FramePlan, series: _Series) -> EncodedObject:
    values = np.ascontiguousarray(plan.frames(_values(result, declared), linear=True), dtype=np.float32)
    try:
        with copying_source_names():
            pm = hd.pm.ParametricMap(
                pixel_array=values,
                series_instance_uid=series.uid,
                series_number=series.number,
                sop_instance_uid=series.provenance.uids.instance("PM", series.instance(declared)),
                instance_number=series.instance(declared),
                contains_recognizable_visual_features=_recognizable(plan),
                real_world_value_mappings=[_mapping(declared, values)],
                voi_lut_transformations=[_window(values)],
                content_description=f"{declared.name} by {result.name} {result.version}"[:64],
                content_label=_content_label(declared.name),
                **plan.arguments(),
                **series.provenance.equipment("PM"),
            )
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"{result.ref}: highdicom cannot build the map {declared.name!r}: {exc}") from exc
    series.provenance.stamp(pm)
    pm.Laterality = series_laterality(plan.source_images[0])
    return EncodedObject.of("PM", pm)


def _content_label(name: str) -> str:
    """A Code String (upper case, digits, space, underscore; 16 characters) from a map's name."""
    label = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name.upper())[:16]
    return label or "MAP"


def encode_parametric_maps(
    result: ModelResult, sources: Mapping[str, Dataset], *, series_number: int, gateway_version: str
) -> list[EncodedObject]:
    """Encode every parametric map the manifest declares, each as a Parametric Map in one new series.

    Parameters
    ----------
    result
        A model result whose manifest declares parametric maps.
    sources
        SOP Instance UID -> source dataset, for every instance in ``result.volume.slices``.
    series_number
        SeriesNumber of the new series.
    gateway_version
        The gateway's version (SoftwareVersions).

    Raises
    ------
    EncodeError
        No map declared, a map missing, of the wrong shape or not finite, a source missing, or highdicom refusing.
    """
    declared = result.manifest.outputs.parametric_maps
    if not declared:
        raise EncodeError(f"{result.ref} declares no parametric map")
    plan = plan_frames(result.volume, sources)
    provenance = Provenance.of(result, gateway_version)
    series = _Series(provenance.uids.series("PM"), series_number, provenance, tuple(declared))
    return [_encode(result, item, plan, series) for item in declared]
