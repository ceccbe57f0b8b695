"""Routing: which models run on a series, and on which of its volumes, with the reason for every decision.

Pure functions, no I/O. Each model is checked against each volume the series assembled into; it runs on the first
volume that passes every rule of its manifest's ``select`` (:class:`gateway.registry.manifest.Selection`). Every
check is recorded, passed or failed, so a job can answer "why did this model (not) run on this series?".

Series-level rules (``modality``, ``body_part_examined`` with its fallback ``body_part_from_description``,
``image_type``, ``series_description``) are checked on the header facts (:func:`series_facts`); volume-level rules
(``diffusion``, ``min_slices``, ``slice_thickness_mm``, ``orientation``, ``accept_resampled``,
``accept_missing_slices``) on each volume. ``diffusion`` and ``min_slices`` are always checked (a model takes a 3D
volume unless it asks for diffusion); the other rules only when the manifest sets them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset

from gateway.assemble.model import Volume, diffusion_groups
from gateway.registry.manifest import Manifest, Selection

__all__ = [
    "OBLIQUE_DEGREES",
    "Decision",
    "RuleCheck",
    "SeriesFacts",
    "diffusion_b_values",
    "plane_of",
    "route",
    "series_facts",
]

#: A volume is oblique when its slice normal is more than this many degrees from every patient axis.
OBLIQUE_DEGREES = 10.0

#: The plane whose normal is each LPS axis.
_PLANES = ("sagittal", "coronal", "axial")


@dataclass(frozen=True)
class SeriesFacts:
    """What routing reads from a series' header: Modality, BodyPartExamined, ImageType, SeriesDescription."""

    modality: str | None = None
    body_part_examined: str | None = None
    image_type: tuple[str, ...] = ()
    series_description: str | None = None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return ()
    items = value.split("\\") if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in items if str(v).strip())


def series_facts(ds: Dataset) -> SeriesFacts:
    """The routing facts of a series, from one of its instances' headers (read tolerantly: missing is ``None``)."""
    return SeriesFacts(
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        image_type=_multi(ds, "ImageType"),
        series_description=_text(ds, "SeriesDescription"),
    )


@dataclass(frozen=True)
class RuleCheck:
    """One rule of a model's ``select`` checked against the series (``volume`` is ``None``) or one volume."""

    rule: str
    passed: bool
    detail: str
    volume: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The check as JSON-ready data."""
        return {"rule": self.rule, "passed": self.passed, "detail": self.detail, "volume": self.volume}


@dataclass(frozen=True)
class Decision:
    """Whether a model runs on a series, on which volume (index into the series' volumes), and every check made."""

    model: str
    run: bool
    volume_index: int | None
    checks: tuple[RuleCheck, ...]

    @property
    def reason(self) -> str:
        """The decision in words: the volume it runs on, or each failed rule (per volume for volume rules)."""
        if self.run:
            return f"runs on volume {self.volume_index}: every rule passed"
        failed = [c for c in self.checks if not c.passed]
        return "; ".join(
            f"{c.rule}: {c.detail}" if c.volume is None else f"volume {c.volume}: {c.rule}: {c.detail}" for c in failed
        )

    def as_dict(self) -> dict[str, Any]:
        """The decision as JSON-ready data (what a job stores)."""
        return {
            "model": self.model,
            "run": self.run,
            "volume_index": self.volume_index,
            "reason": self.reason,
            "checks": [c.as_dict() for c in self.checks],
        }


# --- series-level rules ---------------------------------------------------------------------------------------


def _one_of(rule: str, keyword: str, value: str | None, accepted: Sequence[str]) -> RuleCheck:
    wanted = ", ".join(accepted)
    if value is None:
        return RuleCheck(rule, False, f"{keyword} is missing; the model takes {wanted}")
    passed = value.upper() in {a.upper() for a in accepted}
    return RuleCheck(rule, passed, f"{keyword} {value} {'is' if passed else 'is not'} one of {wanted}")


def _image_type(facts: SeriesFacts, wanted: Sequence[str]) -> RuleCheck:
    held = {v.upper() for v in facts.image_type}
    missing = [w for w in wanted if w.upper() not in held]
    have = "\\".join(facts.image_type) or "(none)"
    if missing:
        return RuleCheck("image_type", False, f"ImageType {have} lacks {', '.join(missing)}")
    return RuleCheck("image_type", True, f"ImageType {have} has {', '.join(wanted)}")


def _matches(facts: SeriesFacts, pattern: str) -> tuple[bool, str]:
    """Whether ``pattern`` is found in SeriesDescription, and that in words.

    The description itself is not repeated: it is free text a site may fill with anything.
    """
    found = re.search(pattern, facts.series_description or "", re.IGNORECASE) is not None
    return found, f"SeriesDescription {'matches' if found else 'does not match'} /{pattern}/"


def _description(facts: SeriesFacts, pattern: str) -> RuleCheck:
    return RuleCheck("series_description", *_matches(facts, pattern))


def _body_part(facts: SeriesFacts, select: Selection) -> RuleCheck:
    """BodyPartExamined against ``body_part_examined``; when it is missing, SeriesDescription against
    ``body_part_from_description`` if the model gives one (the check's rule says which decided)."""
    pattern = select.body_part_from_description
    if facts.body_part_examined is None and pattern is not None:
        found, detail = _matches(facts, pattern)
        return RuleCheck("body_part_from_description", found, f"BodyPartExamined is missing; {detail}")
    return _one_of("body_part_examined", "BodyPartExamined", facts.body_part_examined, select.body_part_examined)


def series_checks(facts: SeriesFacts, select: Selection) -> list[RuleCheck]:
    """The checks of the series-level rules ``select`` sets."""
    checks = []
    if select.modality:
        checks.append(_one_of("modality", "Modality", facts.modality, select.modality))
    if select.body_part_examined:
        checks.append(_body_part(facts, select))
    if select.image_type:
        checks.append(_image_type(facts, select.image_type))
    if select.series_description is not None:
        checks.append(_description(facts, select.series_description))
    return checks


# --- volume-level rules ---------------------------------------------------------------------------------------


def plane_of(affine: npt.NDArray[np.float64]) -> str:
    """The acquisition plane of a volume from its slice normal: ``axial``, ``sagittal``, ``coronal`` or ``oblique``.

    The normal is the cross product of the row and column directions (``affine[:3, 2]`` and ``affine[:3, 1]``); the
    plane is the one whose axis the normal is nearest, unless it is more than :data:`OBLIQUE_DEGREES` from all.
    """
    normal = np.cross(affine[:3, 2], affine[:3, 1])
    length = float(np.linalg.norm(normal))
    if length == 0.0:
        return "oblique"
    cosines = np.abs(normal) / length
    axis = int(np.argmax(cosines))
    angle = math.degrees(math.acos(min(1.0, float(cosines[axis]))))
    return "oblique" if angle > OBLIQUE_DEGREES else _PLANES[axis]


def diffusion_b_values(volume: Volume) -> tuple[float, ...]:
    """The distinct b-values (s/mm2, ascending) of a 4D diffusion volume; empty for any other volume.

    A 4D volume is a diffusion one when every entry of its ``dimension_4`` is ``("Diffusion", (b, gradient))``.
    The b-values are those of :func:`gateway.assemble.model.diffusion_groups`, one input channel each at
    inference, so routing counts the channels the model will get.
    """
    return tuple(sorted(diffusion_groups(volume)))


def _dimensions(volume: Volume, select: Selection, index: int) -> RuleCheck:
    varying = ", ".join(sorted({name or "(unnamed)" for name, _ in volume.dimension_4})) or "(unnamed)"
    if not select.diffusion:
        if volume.array.ndim == 3:
            return RuleCheck("diffusion", True, "a 3D volume", index)
        return RuleCheck("diffusion", False, f"a 4D volume (varying {varying}); the model takes a 3D one", index)
    b_values = diffusion_b_values(volume)
    if not b_values:
        return RuleCheck("diffusion", False, "not a 4D diffusion volume; the model takes one", index)
    listed = ", ".join(f"{b:g}" for b in b_values)
    passed = len(b_values) >= select.min_b_values
    detail = f"{len(b_values)} distinct b-values ({listed}); the model needs at least {select.min_b_values}"
    return RuleCheck("diffusion", passed, detail, index)


def _min_slices(volume: Volume, select: Selection, index: int) -> RuleCheck:
    count = volume.array.shape[-3]
    passed = count >= select.min_slices
    return RuleCheck("min_slices", passed, f"{count} slices; the model needs at least {select.min_slices}", index)


def _thickness(volume: Volume, bounds: tuple[float, float], index: int) -> RuleCheck:
    spacing = volume.spacing[0]
    low, high = bounds
    passed = low - 1e-3 <= spacing <= high + 1e-3
    detail = f"slice spacing {spacing:.3g} mm {'within' if passed else 'outside'} [{low:g}, {high:g}] mm"
    return RuleCheck("slice_thickness_mm", passed, detail, index)


def _orientation(volume: Volume, accepted: Sequence[str], index: int) -> RuleCheck:
    plane = plane_of(volume.affine)
    passed = plane in accepted
    return RuleCheck("orientation", passed, f"{plane}; the model takes {', '.join(accepted)}", index)


def _resampled(volume: Volume, index: int) -> RuleCheck:
    codes = [flag.code for flag in volume.qc if flag.resampled]
    if codes:
        return RuleCheck("accept_resampled", False, f"resampled by assembly ({', '.join(codes)})", index)
    return RuleCheck("accept_resampled", True, "not resampled", index)


def _gaps(volume: Volume, index: int) -> RuleCheck:
    gaps = [flag.message for flag in volume.qc if flag.code == "missing-slices"]
    if gaps:
        return RuleCheck("accept_missing_slices", False, f"slices missing ({'; '.join(gaps)})", index)
    return RuleCheck("accept_missing_slices", True, "no slice missing", index)


def volume_checks(volume: Volume, select: Selection, index: int) -> list[RuleCheck]:
    """The checks of the volume-level rules for the volume at ``index`` of its series."""
    checks = [_dimensions(volume, select, index), _min_slices(volume, select, index)]
    if select.slice_thickness_mm is not None:
        checks.append(_thickness(volume, select.slice_thickness_mm, index))
    if select.orientation:
        checks.append(_orientation(volume, select.orientation, index))
    if not select.accept_resampled:
        checks.append(_resampled(volume, index))
    if not select.accept_missing_slices:
        checks.append(_gaps(volume, index))
    return checks


# --- decisions ------------------------------------------------------------------------------------------------


def decide(facts: SeriesFacts, volumes: Sequence[Volume], manifest: Manifest) -> Decision:
    """The decision for one model: the first volume passing every rule, or every failed check."""
    select = manifest.select
    series = series_checks(facts, select)
    if not volumes:
        missing = RuleCheck("volumes", False, "assembly built no volume from the series")
        return Decision(manifest.ref, False, None, (*series, missing))
    per_volume = [volume_checks(volume, select, k) for k, volume in enumerate(volumes)]
    if all(c.passed for c in series):
        for k, checks in enumerate(per_volume):
            if all(c.passed for c in checks):
                return Decision(manifest.ref, True, k, (*series, *checks))
    return Decision(manifest.ref, False, None, (*series, *(c for checks in per_volume for c in checks)))


def route(facts: SeriesFacts, volumes: Sequence[Volume], models: Sequence[Manifest]) -> list[Decision]:
    """Decide, for each model, whether it runs on the series and on which volume.

    Parameters
    ----------
    facts
        The series' header facts (:func:`series_facts`).
    volumes
        The volumes assembly built from the series, in its order.
    models
        The manifests of the enabled models (one version each), as :meth:`Registry.active` gives them.

    Returns
    -------
    list[Decision]
        One decision per model, in the models' order.
    """
    return [decide(facts, volumes, manifest) for manifest in models]
