"""Planes to stacks: one stack per orientation, frame size and split key, sorted along the slice normal.

A series is first split by its stack keys (:data:`~gateway.assemble.planes.STACK_KEYS`: series, ImageType,
EchoNumbers) and by orientation. Planes with no position or orientation, orientations that are close but not
parallel, or mixed frame sizes or pixel spacings within one orientation are refused with the reason. Where slice
positions repeat, the first dimension key (:data:`~gateway.assemble.planes.DIMENSION_KEYS`) that separates them
decides: when every value covers the same positions the stack becomes 4D, otherwise each value is its own stack
(flagged ``split``). Slices are always ordered by their position along the normal of the slices (row cosine x
column cosine, PS3.3 C.7.6.2.1.1), never by InstanceNumber or file name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Plane, QCFlag
from gateway.assemble.planes import DIMENSION_KEYS, STACK_KEYS

__all__ = ["POSITION_TOLERANCE_MM", "RefusedStack", "Stack", "normal_of", "split_stacks"]

POSITION_TOLERANCE_MM: Final = 0.01
"""Two slices closer than this along the normal share a position."""

_ORIENTATION_TOLERANCE: Final = 1e-4
_SAME_FAMILY_DEGREES: Final = 10.0


@dataclass(frozen=True)
class Stack:
    """Parallel planes of one frame size, ready for geometry.

    Parameters
    ----------
    volumes
        One tuple of planes per 3D volume (one for a 3D stack), each sorted by position along the normal; every
        volume of a 4D stack has the same positions.
    dimension_4
        For a 4D stack, ``(key, value)`` for each volume in order; empty for 3D.
    qc
        What stacking did (``split``).
    """

    volumes: tuple[tuple[Plane, ...], ...]
    dimension_4: tuple[tuple[str, Any], ...] = ()
    qc: tuple[QCFlag, ...] = ()

    @property
    def planes(self) -> tuple[Plane, ...]:
        """The planes of the first (or only) volume."""
        return self.volumes[0]


@dataclass(frozen=True)
class RefusedStack:
    """Planes that cannot become a volume, and why (the reason holds no patient data)."""

    planes: tuple[Plane, ...]
    reason: str


def normal_of(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    """The unit slice normal (row cosine x column cosine) of an ImageOrientationPatient."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    unit: npt.NDArray[np.float64] = normal / np.linalg.norm(normal)
    return unit


def _distance(plane: Plane, normal: npt.NDArray[np.float64]) -> float:
    assert plane.position is not None
    return float(np.dot(plane.position, normal))


def _group(planes: Iterable[Plane], key: Callable[[Plane], Hashable]) -> list[list[Plane]]:
    groups: dict[Hashable, list[Plane]] = defaultdict(list)
    for plane in planes:
        groups[key(plane)].append(plane)
    return list(groups.values())


def _key(plane: Plane, name: str) -> Any:
    return dict(plane.keys).get(name)


def _stack_key(plane: Plane) -> Hashable:
    return tuple(_key(plane, name) for name in STACK_KEYS)


def _cluster_orientations(planes: list[Plane]) -> list[list[Plane]]:
    clusters: list[tuple[npt.NDArray[np.float64], list[Plane]]] = []
    for plane in planes:
        iop = np.asarray(plane.orientation, dtype=np.float64)
        for reference, members in clusters:
            if np.max(np.abs(reference - iop)) < _ORIENTATION_TOLERANCE:
                members.append(plane)
                break
        else:
            clusters.append((iop, [plane]))
    return [members for _, members in clusters]


def _angle(a: Plane, b: Plane) -> float:
    assert a.orientation is not None and b.orientation is not None
    cosine = abs(float(np.dot(normal_of(a.orientation), normal_of(b.orientation))))
    return math.degrees(math.acos(min(1.0, cosine)))


def _families(clusters: list[list[Plane]]) -> list[list[list[Plane]]]:
    """Clusters whose normals are within a few degrees: one stack's worth of slices that are not parallel."""
    families: list[list[list[Plane]]] = []
    for cluster in clusters:
        for family in families:
            if _angle(family[0][0], cluster[0]) < _SAME_FAMILY_DEGREES:
                family.append(cluster)
                break
        else:
            families.append([cluster])
    return families


def _geometry_problem(planes: list[Plane]) -> str | None:
    missing = {
        "ImagePositionPatient": sum(p.position is None for p in planes),
        "ImageOrientationPatient": sum(p.orientation is None for p in planes),
        "PixelSpacing": sum(p.pixel_spacing is None for p in planes),
    }
    absent = [f"{name} missing in {count} of {len(planes)} slices" for name, count in missing.items() if count]
    return "; ".join(absent) or None


def _frame_problem(planes: list[Plane]) -> str | None:
    sizes = sorted({(p.rows, p.columns) for p in planes})
    if len(sizes) > 1:
        return "inconsistent frame sizes: " + ", ".join(f"{r}x{c}" for r, c in sizes)
    spacings = sorted({p.pixel_spacing for p in planes if p.pixel_spacing is not None})
    if len(spacings) > 1:
        return f"inconsistent PixelSpacing: {spacings}"
    return None


def _position_groups(planes: Sequence[Plane], normal: npt.NDArray[np.float64]) -> list[list[Plane]]:
    """Planes grouped by position along the normal, in ascending order."""
    ordered = sorted(planes, key=lambda p: (_distance(p, normal), p.ref.sop_instance_uid))
    groups: list[list[Plane]] = []
    for plane in ordered:
        if groups and _distance(plane, normal) - _distance(groups[-1][-1], normal) < POSITION_TOLERANCE_MM:
            groups[-1].append(plane)
        else:
            groups.append([plane])
    return groups


def _order(value: Any) -> tuple[int, float, str]:
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, int | float):
        return (1, float(value), "")
    if isinstance(value, tuple) and value and isinstance(value[0], int | float):
        return (1, float(value[0]), repr(value[1:]))
    return (2, 0.0, repr(value))


def _acquisition(plane: Plane, name: str) -> float:
    """Acquisition order for volumes told apart by diffusion (b-value and gradient have no order of their own)."""
    if name != "Diffusion":
        return 0.0
    try:
        return float(_key(plane, "AcquisitionNumber"))
    except (TypeError, ValueError):
        return math.inf


def _split_repeats(planes: list[Plane], normal: npt.NDArray[np.float64]) -> tuple[str, list[list[Plane]]]:
    """Separate planes sharing positions by the first dimension key that does it, else by rank at each position."""
    for name in DIMENSION_KEYS:
        groups = _group(planes, lambda p, name=name: _key(p, name))  # type: ignore[misc]
        if len(groups) > 1 and all(len(_position_groups(g, normal)) == len(g) for g in groups):
            return name, sorted(groups, key=lambda g: (_acquisition(g[0], name), _order(_key(g[0], name))))
    ranked: dict[int, list[Plane]] = defaultdict(list)
    for position in _position_groups(planes, normal):
        for rank, plane in enumerate(sorted(position, key=lambda p: p.ref.sop_instance_uid)):
            ranked[rank].append(plane)
    return "", [ranked[rank] for rank in sorted(ranked)]


def _same_positions(groups: list[list[Plane]], normal: npt.NDArray[np.float64]) -> bool:
    first = [_distance(p, normal) for p in groups[0]]
    return all(
        len(g) == len(first)
        and all(abs(_distance(p, normal) - d) < POSITION_TOLERANCE_MM for p, d in zip(g, first, strict=True))
        for g in groups[1:]
    )


def _stacks_of_cluster(planes: list[Plane]) -> list[Stack]:
    assert planes[0].orientation is not None
    normal = normal_of(planes[0].orientation)
    positions = _position_groups(planes, normal)
    if len(positions) == len(planes):
        return [Stack((tuple(p[0] for p in positions),))]
    name, groups = _split_repeats(planes, normal)
    groups = [[p[0] for p in _position_groups(g, normal)] for g in groups]
    if name and _same_positions(groups, normal):
        dimension = tuple((name, _key(g[0], name)) for g in groups)
        return [Stack(tuple(tuple(g) for g in groups), dimension_4=dimension)]
    why = f"by {name}" if name else "by rank at each position (no key tells them apart)"
    flag = QCFlag("split", f"repeated slice positions split into {len(groups)} stacks {why}")
    return [Stack((tuple(g),), qc=(flag,)) for g in groups]


def _split_family(family: list[list[Plane]]) -> tuple[list[Stack], list[RefusedStack]]:
    planes = [p for cluster in family for p in cluster]
    if len(family) > 1:
        angle = max(_angle(family[0][0], cluster[0]) for cluster in family[1:])
        return [], [RefusedStack(tuple(planes), f"non-parallel slices: normals differ by up to {angle:.3g} degrees")]
    problem = _frame_problem(planes)
    if problem is not None:
        return [], [RefusedStack(tuple(planes), problem)]
    return _stacks_of_cluster(planes), []


def split_stacks(planes: Sequence[Plane]) -> tuple[list[Stack], list[RefusedStack]]:
    """Split a series' planes into stacks of parallel slices, refusing those without trustworthy geometry.

    Parameters
    ----------
    planes
        The planes of one series (or several: SeriesInstanceUID is a stack key), in any order.

    Returns
    -------
    tuple of (list of Stack, list of RefusedStack)
        The stacks, each sorted along its slice normal, and the planes refused with the reason.
    """
    stacks: list[Stack] = []
    refused: list[RefusedStack] = []
    for group in _group(planes, _stack_key):
        problem = _geometry_problem(group)
        if problem is not None:
            refused.append(RefusedStack(tuple(group), problem))
            continue
        for family in _families(_cluster_orientations(group)):
            found, bad = _split_family(family)
            stacks.extend(found)
            refused.extend(bad)
    return stacks, refused
