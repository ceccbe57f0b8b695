"""Synthetic series for the assembly tests, built from the synthetic CT with pydicom and then bent on purpose."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from gateway.synth.ct import synth_ct_datasets

SPACING = 2.5
SIZE = 32


def ct_slices(slices: int = 8, size: int = SIZE, seed: int = 0, spacing: float = SPACING) -> list[Dataset]:
    """A small synthetic axial CT series (HFS, z decreasing with InstanceNumber), as datasets."""
    _, datasets = synth_ct_datasets(slices, size, size, seed=seed, slice_spacing=spacing, n_nodules=0)
    return list(datasets)


def renew_uids(datasets: Sequence[Dataset], series_uid: str | None = None) -> list[Dataset]:
    """Copies with fresh SOPInstanceUIDs (and the given SeriesInstanceUID)."""
    copies = []
    for ds in datasets:
        copy = deepcopy(ds)
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if series_uid is not None:
            copy.SeriesInstanceUID = series_uid
        copies.append(copy)
    return copies


def set_z(datasets: Sequence[Dataset], zs: Sequence[float]) -> None:
    """Move each slice to height ``z`` (keeping x, y)."""
    for ds, z in zip(datasets, zs, strict=True):
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z, 6)]
        ds.SliceLocation = round(z, 6)


def tilt(datasets: Sequence[Dataset], degrees: float) -> None:
    """Shear the stack as a gantry tilt does: each slice's origin moves in y by z * tan(tilt)."""
    for ds in datasets:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + z * math.tan(math.radians(degrees)), 6), z]
        ds.GantryDetectorTilt = degrees


def rotate_orientation(ds: Dataset, degrees: float) -> None:
    """Rotate the slice about the x axis (row direction kept), so it is no longer parallel to the others."""
    angle = math.radians(degrees)
    ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(angle), 6), round(math.sin(angle), 6)]


def sagittal(datasets: Sequence[Dataset]) -> None:
    """Turn the slices into a sagittal stack (rows along -z, columns along +y), stepping along x."""
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [round(-10.0 + SPACING * k, 6), -40.0, 40.0]


def write(datasets: Sequence[Dataset], folder: Path, shuffle_seed: int | None = None) -> list[Path]:
    """Write one file per dataset; with ``shuffle_seed`` the files are named (and returned) in a shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(datasets)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    paths = []
    for name, index in enumerate(order):
        path = folder / f"IM{name:04d}.dcm"
        datasets[index].save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stored_hu(datasets: Sequence[Dataset]) -> np.ndarray:
    """HU of the slices in the given order, ``[slice, row, column]``."""
    return np.stack(
        [ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )


def z_ramp(datasets: Sequence[Dataset], hu_per_mm: float = 4.0) -> None:
    """Replace the pixels by ``HU = hu_per_mm * z + column``: linear along z, so interpolation along the normal
    reproduces it exactly, and the column index tells left from right."""
    for ds in datasets:
        z = float(ds.ImagePositionPatient[2])
        columns = np.arange(int(ds.Columns), dtype=np.float64)
        hu = np.broadcast_to(hu_per_mm * z + columns, (int(ds.Rows), int(ds.Columns)))
        stored = np.rint((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = stored.astype(np.uint16).tobytes()


def two_spacings(
    thin: int = 20,
    thick: int = 20,
    thin_mm: float = 2.5,
    thick_mm: float = 5.0,
    transition_mm: float | None = None,
    start_mm: float = 0.0,
    size: int = SIZE,
) -> list[Dataset]:
    """A head CT as older protocols take it: ``thin`` slices ``thin_mm`` apart from z = ``start_mm`` up (the
    posterior fossa), then ``thick`` slices ``thick_mm`` apart above, ``transition_mm`` (default ``thick_mm``) after
    the last thin one; SliceThickness equal to each part's spacing, InstanceNumber 1 at the top (z decreasing),
    pixels a z ramp (:func:`z_ramp`)."""
    step = thick_mm if transition_mm is None else transition_mm
    zs = [start_mm + thin_mm * k for k in range(thin)]
    zs += [zs[-1] + step + thick_mm * k for k in range(thick)]
    datasets = ct_slices(thin + thick, size=size)
    set_z(datasets, zs[::-1])
    for ds, z in zip(datasets, zs[::-1], strict=True):
        ds.SliceThickness = thin_mm if z <= zs[thin - 1] else thick_mm
    z_ramp(datasets)
    return datasets
