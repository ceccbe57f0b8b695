"""What a model gave for one volume, on the volume's own grid: the value handed to the encoders and the job."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume
from gateway.infer.lesions import LesionSet
from gateway.infer.measure import SegmentMeasurement
from gateway.registry.manifest import Code, Manifest

__all__ = ["Finding", "ModelResult", "SegmentMeasurement"]


@dataclass(frozen=True)
class Finding:
    """A classification from :attr:`gateway.registry.manifest.Outputs.classifications` that is reported.

    Attributes
    ----------
    name
        The classification's name.
    finding
        Its coded finding (for a TID 1500 qualitative evaluation).
    label
        The segment it is drawn from.
    probability
        The segment's highest voxel probability (0-1) on the source grid.
    volume_ml
        The segment's volume, which reached the classification's ``min_volume_ml``.
    """

    name: str
    finding: Code
    label: int
    probability: float
    volume_ml: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "finding": self.finding.model_dump(),
            "label": self.label,
            "probability": self.probability,
            "volume_ml": self.volume_ml,
        }


@dataclass(frozen=True, eq=False)
class ModelResult:
    """One model's results for one volume, every array on the source volume's grid ``[S, R, C]``.

    Attributes
    ----------
    name, version, sha256
        The model that ran (``sha256`` of its weights).
    manifest
        Its manifest (the encoders read codes, colours and units from it).
    volume
        The source volume (the results' geometry and references).
    labelmap
        uint8 (uint16 above 255 labels) label values, 0 background, for a ``labelmap`` segmentation; else ``None``.
    masks
        Label value -> bool mask, for every declared segment (both segmentation kinds; ``channels`` masks may
        overlap).
    maps
        Parametric map name -> float32 values.
    probabilities
        Label value -> the segment's highest voxel probability (1.0 for a model that outputs label values).
    measurements
        Per declared segment, the measurements its manifest entry lists (the whole segment, lesions or not).
    lesions
        Label value -> its lesions, for every segment declared ``lesions: true``
        (:mod:`gateway.infer.lesions`).
    classifications
        The classifications whose segment reached ``min_volume_ml``.
    timings
        Seconds spent in ``prepare_s``, ``infer_s`` (queueing included; of it ``forward_s``: the time inside the
        batcher, the forward passes), ``restore_s`` and ``measure_s``.
    notes
        What was done to the geometry (reorientation, resampling, crop/pad) and the channels, in words.
    """

    name: str
    version: str
    sha256: str
    manifest: Manifest
    volume: Volume
    labelmap: npt.NDArray[np.unsignedinteger[Any]] | None = None
    masks: Mapping[int, npt.NDArray[np.bool_]] = field(default_factory=dict)
    maps: Mapping[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    probabilities: Mapping[int, float] = field(default_factory=dict)
    measurements: tuple[SegmentMeasurement, ...] = ()
    lesions: Mapping[int, LesionSet] = field(default_factory=dict)
    classifications: tuple[Finding, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def segment_mask(self, value: int) -> npt.NDArray[np.bool_] | None:
        """The voxels of the segment with label value (or channel) ``value``: its mask, else where the label map
        holds it; ``None`` when the result has neither."""
        if value in self.masks:
            return np.asarray(self.masks[value], dtype=np.bool_)
        if self.labelmap is not None:
            return np.asarray(self.labelmap == value)
        return None
