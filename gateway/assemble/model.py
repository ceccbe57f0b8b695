"""The values that travel through assembly: planes in, volumes out.

Conventions, used everywhere in the gateway:

- Patient coordinates are DICOM's LPS, in millimetres (PS3.3 C.7.6.2.1.1).
- A volume's ``array`` is indexed ``[slice, row, column]`` (``[n, slice, row, column]`` for 4D), and its
  ``affine`` maps that same index order to LPS: ``affine @ [slice, row, column, 1] = [x, y, z, 1]``. So
  ``affine[:3, 2]`` is the row direction cosine (ImageOrientationPatient[0:3]) times the column spacing
  (PixelSpacing[1]), ``affine[:3, 1]`` the column direction cosine (IOP[3:6]) times the row spacing
  (PixelSpacing[0]), ``affine[:3, 0]`` the step from one slice to the next, and ``affine[:3, 3]`` the
  ImagePositionPatient of the first voxel of slice 0. NIfTI export converts to (i=column, j=row, k=slice) and RAS.
- Every slice keeps a :class:`SliceRef` to the SOP instance and frame it came from, so outputs can reference
  their sources exactly; every resampling, split or refusal is a :class:`QCFlag` on the volume (or the reason of
  an :class:`~gateway.errors.AssemblyError`), never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SliceRef:
    """Where one slice of a volume came from.

    Parameters
    ----------
    sop_instance_uid
        The instance.
    frame
        1-based frame number within the instance (1 for single-frame images).
    tile
        0-based tile index inside a Siemens mosaic frame, or ``None``.
    """

    sop_instance_uid: str
    frame: int = 1
    tile: int | None = None


@dataclass(frozen=True)
class SourcePlane:
    """One source image plane of a volume whose grid assembly resampled, and where it lies on that grid.

    Parameters
    ----------
    ref
        The source image (instance and frame).
    slice
        The volume slice nearest to this plane along the slice normal.
    shift
        The in-plane shift ``(rows, columns)`` in pixels that assembly applied to this plane (gantry tilt):
        volume pixel ``(r, c)`` of that slice shows source pixel ``(r - shift[0], c - shift[1])``.
    exact
        Whether that volume slice lies in this plane (no interpolation along the normal).
    """

    ref: SliceRef
    slice: int
    shift: tuple[float, float] = (0.0, 0.0)
    exact: bool = True


@dataclass(frozen=True)
class Plane:
    """One 2D image plane found in a series, before stacking: its geometry and where its pixels are.

    ``position`` (ImagePositionPatient of its first pixel), ``orientation`` (ImageOrientationPatient, row cosine
    then column cosine) and ``pixel_spacing`` (PixelSpacing: row spacing, column spacing) are ``None`` when the
    source lacks them; stacking refuses such planes for a 3D volume. ``keys`` holds what splits a series into
    stacks (EchoNumbers, TemporalPositionIdentifier, diffusion b-value and gradient, ImageType, AcquisitionNumber,
    ...), as hashable values.
    """

    ref: SliceRef
    path: Path
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    keys: tuple[tuple[str, Any], ...] = ()
    slice_thickness: float | None = None


@dataclass(frozen=True)
class QCFlag:
    """Something assembly noticed or did to the geometry: recorded on the volume and, later, on the job.

    ``code`` is one of ``missing-slices``, ``uneven-spacing``, ``spacing-changes``, ``gantry-tilt``, ``split``,
    ``single-slice``, ``mosaic``, ``multiframe`` (or more as assembly learns); ``resampled`` says whether the voxels
    are no longer the scanner's own (a model's manifest may refuse such input).
    """

    code: str
    message: str
    resampled: bool = False


@dataclass(frozen=True)
class Volume:
    """A 3D (or 4D) image in patient space with exact provenance.

    ``array`` holds modality values (after Rescale Slope/Intercept) as float32, ``[slice, row, column]``, or
    ``[n, slice, row, column]`` with ``dimension_4`` naming what varies along the first axis. ``slices`` has one
    :class:`SliceRef` per slice in array order (per slice of the first 3D volume for 4D; ``slices_4d`` has them
    all). ``padding_mask`` marks Pixel Padding Value voxels when the source declared one. ``source_planes`` lists,
    in stack order, every source image plane of a volume that assembly resampled (gantry tilt, uneven or changing
    spacing) and where each lies on the volume's grid; it is empty when slice ``k`` is the source plane
    ``slices[k]`` itself.
    """

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    slices: tuple[SliceRef, ...]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str | None
    qc: tuple[QCFlag, ...] = ()
    dimension_4: tuple[tuple[str, Any], ...] = ()
    slices_4d: tuple[tuple[SliceRef, ...], ...] = ()
    padding_mask: npt.NDArray[np.bool_] | None = None
    description: dict[str, Any] = field(default_factory=dict)
    source_planes: tuple[SourcePlane, ...] = ()

    def __post_init__(self) -> None:
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (3, 4):
            raise ValueError(f"array must be 3D or 4D, got {self.array.ndim}D")
        spatial_slices = self.array.shape[-3]
        if len(self.slices) != spatial_slices:
            raise ValueError(f"slices has {len(self.slices)} entries for {spatial_slices} slices")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def resampled(self) -> bool:
        """Whether any QC step resampled the voxels."""
        return any(flag.resampled for flag in self.qc)


def diffusion_groups(volume: Volume) -> dict[float, list[int]]:
    """The indices along the 4th dimension of a diffusion volume, by b-value (s/mm2, told apart to 0.1).

    A volume is a diffusion one when it is 4D and every ``dimension_4`` entry is ``("Diffusion", (b, gradient))``
    with a numeric b; for any other volume the answer is empty. Routing counts these groups and inference makes one
    channel of each, so both see the same b-values.
    """
    entries = volume.dimension_4
    if volume.array.ndim != 4 or not entries:
        return {}
    groups: dict[float, list[int]] = {}
    for index, (name, value) in enumerate(entries):
        if name != "Diffusion" or not isinstance(value, tuple) or not isinstance(value[0], int | float):
            return {}
        groups.setdefault(round(float(value[0]), 1), []).append(index)
    return groups
