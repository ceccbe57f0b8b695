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
