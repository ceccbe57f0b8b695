"""A series' files to volumes: read headers, stack, check geometry, decode, rescale, resample where flagged.

:func:`assemble_series` never raises for one bad stack: what cannot become a volume with trustworthy geometry is
returned in :attr:`AssemblyResult.refused` with the reason, beside the volumes that could be built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.assemble.geometry import StackGeometry, resample_stack, stack_geometry
from gateway.assemble.model import Plane, SliceRef, SourcePlane, Volume
from gateway.assemble.planes import SeriesHeader
from gateway.assemble.sources import SourceFile, modality_frames, read_source
from gateway.assemble.stacks import Stack, split_stacks
from gateway.errors import AssemblyError

__all__ = ["AssemblyResult", "Refusal", "assemble_series", "assemble_sources", "assemble_stack"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """Instances that did not become a volume, and why (the reason holds no patient data).

    Parameters
    ----------
    reason
        Why, e.g. ``inconsistent frame sizes: 256x256, 512x512``.
    sop_instance_uids
        The instances concerned, where known.
    paths
        Their files.
    """

    reason: str
    sop_instance_uids: tuple[str, ...]
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class AssemblyResult:
    """The volumes of a series and what was refused.

    Parameters
    ----------
    volumes
        One volume per stack that passed the geometry checks.
    refused
        The rest, with reasons.
    """

    volumes: tuple[Volume, ...]
    refused: tuple[Refusal, ...]


def _modality_values(
    planes: Sequence[Plane], sources: dict[Path, SourceFile]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]:
    return modality_frames(planes, sources)


def _geometry(stack: Stack) -> StackGeometry:
    planes = stack.planes
    first = planes[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    positions = [p.position for p in planes if p.position is not None]
    thicknesses = [p.slice_thickness for p in planes]
    return stack_geometry(positions, first.orientation, first.pixel_spacing, first.slice_thickness, thicknesses)


def _refs(planes: Sequence[Plane], geometry: StackGeometry) -> tuple[SliceRef, ...]:
    nearest = geometry.nearest
    if nearest is None:
        return tuple(p.ref for p in planes)
    return tuple(planes[k].ref for k in nearest)


def _source_planes(planes: Sequence[Plane], geometry: StackGeometry) -> tuple[SourcePlane, ...]:
    """Every source plane of a resampled stack, in stack order, with its nearest output slice and in-plane shift."""
    if geometry.planes is None:
        return ()
    shifts = np.zeros((len(planes), 2)) if geometry.shifts is None else geometry.shifts
    return tuple(
        SourcePlane(plane.ref, k, (float(shift[0]), float(shift[1])), exact)
        for plane, (k, exact), shift in zip(planes, geometry.planes, shifts, strict=True)
    )


def _description(stack: Stack, geometry: StackGeometry) -> dict[str, object]:
    description: dict[str, object] = {"source_slices": [p.ref.sop_instance_uid for p in stack.planes]}
    if geometry.sources is not None:
        description["interpolated_from"] = [
            [stack.planes[k0].ref.sop_instance_uid, stack.planes[k1].ref.sop_instance_uid, w]
            for k0, k1, w in geometry.sources
        ]
    if geometry.shifts is not None:
        description["in_plane_shift_pixels"] = [[float(r), float(c)] for r, c in geometry.shifts]
    return description


def assemble_stack(stack: Stack, header: SeriesHeader, sources: dict[Path, SourceFile] | None = None) -> Volume:
    """Build the volume of one stack: geometry checks, decoding, modality values, resampling where flagged.

    Parameters
    ----------
    stack
        A stack from :func:`~gateway.assemble.stacks.split_stacks`.
    header
        The series-level attributes of its instances.
    sources
        The files its planes come from, as read by :func:`~gateway.assemble.sources.read_source`; read here
        when omitted.

    Returns
    -------
    Volume
        float32 modality values, the affine of the (possibly resampled) grid, one SliceRef per slice and, when
        resampled, one SourcePlane per source plane (of the first 3D volume of a 4D stack).

    Raises
    ------
    AssemblyError
        When the geometry cannot be trusted or a frame does not decode to its declared size.
    """
    if sources is None:
        sources = {p.path: read_source(p.path) for p in stack.planes}
    geometry = _geometry(stack)
    decoded = [_modality_values(planes, sources) for planes in stack.volumes]
    arrays = [resample_stack(values, geometry) for values, _ in decoded]
    masks = [mask for _, mask in decoded]
    resampled = geometry.sources is not None or geometry.shifts is not None
    refs = tuple(_refs(planes, geometry) for planes in stack.volumes)
    is_4d = len(arrays) > 1
    return Volume(
        array=np.stack(arrays) if is_4d else arrays[0],
        affine=geometry.affine,
        slices=refs[0],
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        frame_of_reference_uid=header.frame_of_reference_uid,
        modality=header.modality,
        qc=stack.qc + geometry.qc,
        dimension_4=stack.dimension_4,
        slices_4d=refs if is_4d else (),
        padding_mask=_padding(masks, resampled),
        description=_description(stack, geometry),
        source_planes=_source_planes(stack.planes, geometry),
    )


def _padding(masks: list[npt.NDArray[np.bool_] | None], resampled: bool) -> npt.NDArray[np.bool_] | None:
    """The Pixel Padding mask, kept where the voxels are the scanner's own (not after resampling)."""
    present = [m for m in masks if m is not None]
    if resampled or len(present) != len(masks) or not present:
        return None
    return np.stack(present) if len(present) > 1 else present[0]


def _refusal(reason: str, planes: Sequence[Plane]) -> Refusal:
    logger.info("refused %d instance(s): %s", len(planes), reason)
    return Refusal(reason, tuple(p.ref.sop_instance_uid for p in planes), tuple(p.path for p in planes))


def _read_all(paths: Sequence[Path]) -> tuple[list[Plane], dict[Path, SourceFile], list[Refusal]]:
    planes: list[Plane] = []
    sources: dict[Path, SourceFile] = {}
    refused: list[Refusal] = []
    for path in map(Path, paths):
        try:
            source = read_source(path)
        except AssemblyError as exc:
            refused.append(Refusal(exc.reason, (), (path,)))
            continue
        sources[path] = source
        planes.extend(source.planes)
    return planes, sources, refused


def assemble_series(paths: Sequence[Path]) -> AssemblyResult:
    """Assemble the image files of a series (single-frame, multi-frame, Siemens mosaics) into volumes.

    Parameters
    ----------
    paths
        The series' files, in any order.

    Returns
    -------
    AssemblyResult
        The volumes (one per stack: orientation, frame size, ImageType, echo; 4D where positions repeat
        regularly) in a stable order, and the refused stacks or files with their reasons.
    """
    planes, sources, refused = _read_all(paths)
    return _assemble(planes, sources, refused)


def assemble_sources(sources: Sequence[SourceFile], refused: Sequence[Refusal] = ()) -> AssemblyResult:
    """:func:`assemble_series` for files whose headers were already read (each header is read only once).

    Parameters
    ----------
    sources
        The series' image files, from :func:`~gateway.assemble.sources.read_source` or
        :func:`~gateway.assemble.sources.source_from_header`.
    refused
        Files of the series already refused (not images, unreadable), reported first.

    Returns
    -------
    AssemblyResult
        As :func:`assemble_series` returns it.
    """
    planes = [plane for source in sources for plane in source.planes]
    return _assemble(planes, {source.path: source for source in sources}, list(refused))


def _assemble(planes: list[Plane], sources: dict[Path, SourceFile], refused: list[Refusal]) -> AssemblyResult:
    stacks, bad = split_stacks(planes)
    refused.extend(_refusal(r.reason, r.planes) for r in bad)
    volumes: list[Volume] = []
    for stack in stacks:
        try:
            volumes.append(assemble_stack(stack, sources[stack.planes[0].path].header, sources))
        except AssemblyError as exc:
            refused.append(_refusal(exc.reason, [p for planes in stack.volumes for p in planes]))
    volumes.sort(key=lambda v: (v.series_instance_uid, v.slices[0].sop_instance_uid))
    return AssemblyResult(tuple(volumes), tuple(refused))
