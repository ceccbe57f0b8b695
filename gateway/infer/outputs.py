"""A model's results as files: NIfTI label maps, masks and parametric maps on the source grid, plus a JSON summary.

The NIfTI files use the same layout and RAS+ affine as ``gateway volume`` writes for the source volume
(:mod:`gateway.assemble.nifti`, like dcm2niix), so they overlay it voxel for voxel in any NIfTI viewer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from gateway.assemble.model import Volume
from gateway.assemble.nifti import nifti_affine, nifti_array
from gateway.infer.results import ModelResult
from gateway.infer.series import result_summary

__all__ = ["write_model_outputs"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_").lower() or "output"


def _save(volume: Volume, array: npt.NDArray[Any], path: Path) -> Path:
    layout = nifti_array(dataclasses.replace(volume, array=array))
    affine = nifti_affine(volume)
    image = nib.Nifti1Image(np.ascontiguousarray(layout), affine)  # type: ignore[no-untyped-call]
    image.header.set_qform(affine, code=1)  # type: ignore[no-untyped-call]
    image.header.set_sform(affine, code=1)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm", "sec")  # type: ignore[no-untyped-call]
    tmp = path.with_name(f".partial-{path.name}")  # nibabel picks the format from the extension: keep it last
    nib.save(image, tmp)
    tmp.replace(path)
    return path


def write_model_outputs(result: ModelResult, outdir: Path, stem: str) -> list[Path]:
    """Write ``result`` under ``outdir`` as ``<stem>_<model>_*.nii.gz`` and ``<stem>_<model>.json``.

    Parameters
    ----------
    result
        What one model gave for one volume.
    outdir
        The folder (created if needed).
    stem
        The source volume's file stem.

    Returns
    -------
    list of Path
        The files written: the label map (a ``labelmap`` segmentation), one mask per segment (a ``channels``
        segmentation, whose segments may overlap), one file per parametric map, and the JSON summary.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    base = f"{stem}_{_slug(result.name)}"
    volume = result.volume
    written: list[Path] = []
    segmentation = result.manifest.outputs.segmentation
    names = {label.value: label.name for label in segmentation.labels} if segmentation else {}
    if result.labelmap is not None:
        written.append(_save(volume, result.labelmap, outdir / f"{base}_labels.nii.gz"))
    elif segmentation is not None:
        for value, mask in sorted(result.masks.items()):
            name = _slug(names.get(value, str(value)))
            written.append(_save(volume, mask.astype(np.uint8), outdir / f"{base}_{name}.nii.gz"))
    for name, array in sorted(result.maps.items()):
        written.append(_save(volume, array.astype(np.float32, copy=False), outdir / f"{base}_{_slug(name)}.nii.gz"))
    summary = {
        **result_summary(result),
        "SeriesInstanceUID": volume.series_instance_uid,
        "labels": [label.model_dump() for label in segmentation.labels] if segmentation else [],
        "parametric_maps": [m.model_dump() for m in result.manifest.outputs.parametric_maps],
        "files": [p.name for p in written],
    }
    sidecar = outdir / f"{base}.json"
    sidecar.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    written.append(sidecar)
    return written
