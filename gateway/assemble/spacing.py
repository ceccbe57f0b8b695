"""Runs of regular slice spacing in one stack: a series whose spacing changes part way.

Older head CT protocols, for example, take thin slices through the posterior fossa and thicker ones above, in one
series. Such a stack is one volume (:func:`~gateway.assemble.geometry.stack_geometry` resamples it onto the finest
spacing), not two, and not a stack with "missing slices" every other position. :func:`spacing_runs` finds the
runs: stretches of at least :data:`MIN_RUN_STEPS` steps along the normal that agree within 1 % (or 0.02 mm), with
at least two different spacings among them and together covering most of the stack. Steps between runs are
transitions; one well above the spacing of the runs beside it is a gap (:func:`run_gaps`).

Slices are numbered from 1 in stack order, ascending along the slice normal (row cosine x column cosine), which for
an axial head-first series runs from the feet towards the head (the reverse of the usual InstanceNumber order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import QCFlag

__all__ = ["MIN_RUN_STEPS", "SpacingRun", "run_gaps", "spacing_change_flag", "spacing_runs"]

MIN_RUN_STEPS: Final = 3
"""The fewest steps (one more slice) that make a run of one spacing."""

_RELATIVE: Final = 0.01
_ABSOLUTE_MM: Final = 0.02
_COVERED: Final = 0.8
_GAP_FACTOR: Final = 1.5


@dataclass(frozen=True)
class SpacingRun:
    """Consecutive steps of one spacing.

    Parameters
    ----------
    first, stop
        The steps ``first`` to ``stop - 1``, i.e. slices ``first`` to ``stop`` (0-based, stack order).
    spacing
        The median of those steps, in mm.
    """

    first: int
    stop: int
    spacing: float

    @property
    def steps(self) -> int:
        """How many steps the run has."""
        return self.stop - self.first


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= max(_RELATIVE * min(a, b), _ABSOLUTE_MM)


def _runs(steps: npt.NDArray[np.float64]) -> list[SpacingRun]:
    runs: list[SpacingRun] = []
    start = 0
    for k in range(1, len(steps) + 1):
        if k == len(steps) or not _same(float(steps[k]), float(steps[start])):
            runs.append(SpacingRun(start, k, float(np.median(steps[start:k]))))
            start = k
    return runs


def spacing_runs(steps: npt.NDArray[np.float64]) -> tuple[SpacingRun, ...]:
    """The runs of regular spacing of a stack whose spacing changes part way, or ``()`` when it does not.

    Parameters
    ----------
    steps
        The distances between consecutive slices along the normal (positive, stack order).

    Returns
    -------
    tuple of SpacingRun
        The runs of at least :data:`MIN_RUN_STEPS` steps, in order, when there are two or more, their spacings
        differ, and they cover at least 80 % of the steps; otherwise empty (the stack is regular, unevenly spaced
        or has gaps, which :mod:`gateway.assemble.geometry` handles as before).
    """
    runs = [run for run in _runs(steps) if run.steps >= MIN_RUN_STEPS]
    if len(runs) < 2 or sum(run.steps for run in runs) < _COVERED * len(steps):
        return ()
    spacings = [run.spacing for run in runs]
    if _same(min(spacings), max(spacings)):
        return ()
    return tuple(runs)


def _neighbours(runs: Sequence[SpacingRun], step: int) -> float:
    """The coarsest spacing of the runs just before and after a step that lies outside every run."""
    before = [run.spacing for run in runs if run.stop <= step][-1:]
    after = [run.spacing for run in runs if run.first > step][:1]
    return max(before + after)


def run_gaps(steps: npt.NDArray[np.float64], runs: Sequence[SpacingRun]) -> QCFlag | None:
    """A ``missing-slices`` flag for the steps between runs well above the spacing beside them, or ``None``.

    The grid is resampled across such a gap (interpolated slices fill it), as for uneven spacing.
    """
    inside = {k for run in runs for k in range(run.first, run.stop)}
    gaps = [k for k in range(len(steps)) if k not in inside and steps[k] > _GAP_FACTOR * _neighbours(runs, k)]
    if not gaps:
        return None
    where = ", ".join(f"after slice {k + 1} ({float(steps[k]):.3g} mm)" for k in gaps)
    return QCFlag("missing-slices", f"gap {where} between runs of regular spacing; interpolated across it")


def _mm(value: float) -> str:
    return f"{value:.4g} mm"


def _thickness_set(thicknesses: Sequence[float | None], first: int, last: int) -> set[float]:
    return {round(t, 4) for t in thicknesses[first : last + 1] if t is not None}


def _thickness(thicknesses: Sequence[float | None], first: int, last: int) -> str:
    values = sorted(_thickness_set(thicknesses, first, last))
    if not values:
        return ""
    if len(values) == 1:
        return f", thickness {_mm(values[0])}"
    return f", thickness {values[0]:.4g}-{_mm(values[-1])}"


def _first_owns(before: SpacingRun, after: SpacingRun, thicknesses: Sequence[float | None]) -> bool:
    """Whether the slice two runs share counts in the first: the run whose SliceThickness it has, else the finer."""
    shared = before.stop
    own = _thickness_set(thicknesses, shared, shared)
    first = _thickness_set(thicknesses, before.first, shared - 1)
    second = _thickness_set(thicknesses, shared + 1, after.stop)
    if own and own <= first and not own <= second:
        return True
    if own and own <= second and not own <= first:
        return False
    return before.spacing < after.spacing


def _slice_ranges(runs: Sequence[SpacingRun], thicknesses: Sequence[float | None]) -> list[tuple[int, int]]:
    """The slices (first, last; 0-based, inclusive) each run counts, a slice shared by two runs in one of them."""
    ranges = [[run.first, run.stop] for run in runs]
    for index in range(1, len(runs)):
        if runs[index - 1].stop == runs[index].first:
            if _first_owns(runs[index - 1], runs[index], thicknesses):
                ranges[index][0] += 1
            else:
                ranges[index - 1][1] -= 1
    return [(first, last) for first, last in ranges]


def _describe(runs: Sequence[SpacingRun], thicknesses: Sequence[float | None]) -> list[str]:
    return [
        f"{_mm(run.spacing)} (slices {first + 1}-{last + 1}{_thickness(thicknesses, first, last)})"
        for run, (first, last) in zip(runs, _slice_ranges(runs, thicknesses), strict=True)
    ]


def spacing_change_flag(runs: Sequence[SpacingRun], thicknesses: Sequence[float | None], step: float) -> QCFlag:
    """The ``spacing-changes`` flag: each run's spacing, slices and SliceThickness, and the grid it became.

    Parameters
    ----------
    runs
        From :func:`spacing_runs`.
    thicknesses
        SliceThickness of each slice in stack order (``None`` where absent); may be empty.
    step
        The spacing of the resampled grid, in mm.

    Returns
    -------
    QCFlag
        E.g. ``slice spacing changes from 2.5 mm (slices 1-20, thickness 2.5 mm) to 5 mm (slices 21-40, thickness
        5 mm): resampled to 2.5 mm along the normal``; slices in stack order (ascending along the normal), a slice
        that ends one run and starts the next counted in the run whose SliceThickness it has, else in the finer.
    """
    parts = _describe(runs, thicknesses)
    return QCFlag(
        "spacing-changes",
        f"slice spacing changes from {' to '.join(parts)}: resampled to {_mm(step)} along the normal",
        resampled=True,
    )
