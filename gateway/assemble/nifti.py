"""Volumes to NIfTI-1, laid out the way dcm2niix writes them, with a JSON sidecar that keeps the provenance.

dcm2niix (its default, no ``-x`` reorientation) stores voxels ``i = column``, ``j = row`` counted from the last
row up (``flipY``), ``k = slice`` in the order of the slices along the normal, and writes the affine in RAS+
scanner coordinates (LPS with x and y negated) as both qform and sform, code 1 (scanner anatomical). The volume
is written the same way, as modality values with no scaling (slope 1, intercept 0), so the same voxel index holds
the same value in both files: as int16 when every voxel is an integer in int16's range (CT in HU, most MR), which
halves the file as dcm2niix's int16 output does, else as float32. Either way the values read back are exactly
the volume's float32 values; the sidecar's ``nifti_data_type`` says which was written.

The sidecar holds the geometry, every QC flag (and whether anything was resampled), the dimension-4 labels, and
the SOPInstanceUID (and frame) of each slice in slice order, so results can be traced to their sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, Final

import nibabel as nib
import numpy as np
import numpy.typing as npt

from gateway.assemble.model import SliceRef, Volume

__all__ = ["nifti_affine", "nifti_array", "sidecar", "to_nifti", "write_nifti"]

_LPS_TO_RAS: Final = np.diag([-1.0, -1.0, 1.0, 1.0])
_SCANNER_CODE: Final = 1
_INT16: Final = np.dtype("<i2")
_FLOAT32: Final = np.dtype("<f4")


def nifti_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """The RAS+ affine of the volume's NIfTI layout (``i`` column, ``j`` row from the bottom, ``k`` slice).

    Parameters
    ----------
    volume
        The volume.

    Returns
    -------
    numpy.ndarray
        4x4 float64, mapping ``[i, j, k, 1]`` to RAS+ millimetres.
    """
    rows = volume.array.shape[-2]
    index = np.zeros((4, 4))
    index[0, 2] = 1.0  # slice <- k
    index[1, 1] = -1.0  # row <- rows - 1 - j
    index[1, 3] = rows - 1
    index[2, 0] = 1.0  # column <- i
    index[3, 3] = 1.0
    affine: npt.NDArray[np.float64] = _LPS_TO_RAS @ volume.affine @ index
    return affine


def nifti_array(volume: Volume) -> npt.NDArray[np.float32]:
    """The volume's voxels in NIfTI order: ``[column, row from the bottom, slice]`` (then the 4th dimension)."""
    order = (3, 2, 1, 0) if volume.array.ndim == 4 else (2, 1, 0)
    data = np.transpose(volume.array, order)
    return data[:, ::-1]  # a view: nibabel writes it slab by slab, so the volume is never copied whole


def to_nifti(volume: Volume) -> nib.Nifti1Image:
    """The volume as an in-memory NIfTI-1 image (float32 modality values, qform = sform, scanner code).

    Parameters
    ----------
    volume
        The volume.

    Returns
    -------
    nibabel.Nifti1Image
        The image; write it with ``nibabel.save`` or use :func:`write_nifti`.
    """
    affine = nifti_affine(volume)
    image = nib.Nifti1Image(nifti_array(volume), affine)  # type: ignore[no-untyped-call]
    header = image.header
    header.set_qform(affine, code=_SCANNER_CODE)  # type: ignore[no-untyped-call]
    header.set_sform(affine, code=_SCANNER_CODE)  # type: ignore[no-untyped-call]
    header.set_xyzt_units("mm", "sec")  # type: ignore[no-untyped-call]
    header.set_slope_inter(1.0, 0.0)  # type: ignore[no-untyped-call]
    return image


def _refs(refs: tuple[SliceRef, ...]) -> list[dict[str, Any]]:
    return [{"SOPInstanceUID": r.sop_instance_uid, "frame": r.frame, "tile": r.tile} for r in refs]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def sidecar(volume: Volume, *, data_type: str | None = None) -> dict[str, Any]:
    """The JSON sidecar of a volume: geometry, QC, provenance (UIDs only, no patient data).

    Parameters
    ----------
    volume
        The volume.
    data_type
        The NIfTI data type the voxels were written as (``int16`` or ``float32``), recorded as
        ``nifti_data_type`` when given.

    Returns
    -------
    dict
        JSON-serialisable description.
    """
    return {
        "SeriesInstanceUID": volume.series_instance_uid,
        "StudyInstanceUID": volume.study_instance_uid,
        "FrameOfReferenceUID": volume.frame_of_reference_uid,
        "Modality": volume.modality,
        "shape_nifti": list(nifti_array(volume).shape),
        **({"nifti_data_type": data_type} if data_type is not None else {}),
        "spacing_mm": {"slice": volume.spacing[0], "row": volume.spacing[1], "column": volume.spacing[2]},
        "affine_lps_slice_row_column": volume.affine.tolist(),
        "affine_ras_nifti": nifti_affine(volume).tolist(),
        "resampled": volume.resampled,
        "qc": [{"code": f.code, "message": f.message, "resampled": f.resampled} for f in volume.qc],
        "dimension_4": _jsonable(volume.dimension_4),
        "slices": _refs(volume.slices),
        "slices_4d": [_refs(refs) for refs in volume.slices_4d],
        "description": _jsonable(volume.description),
    }


def write_nifti(volume: Volume, path: Path) -> tuple[Path, Path]:
    """Write a volume as an uncompressed ``.nii`` file and its ``.json`` sidecar.

    The voxels are written as int16 when every one is an integer in int16's range, else as float32; both read
    back as the volume's values exactly (no scaling). Slab by slab, so the volume is never copied whole.

    Parameters
    ----------
    volume
        The volume.
    path
        Where to write the image; a suffix other than ``.nii`` is replaced.

    Returns
    -------
    tuple of (pathlib.Path, pathlib.Path)
        The image and the sidecar paths.
    """
    image_path = Path(path).with_suffix(".nii")
    sidecar_path = image_path.with_suffix(".json")
    image = to_nifti(volume)
    image.update_header()  # type: ignore[no-untyped-call]
    header = image.header
    with image_path.open("wb") as fp:
        for dtype in (_INT16, _FLOAT32):  # float32 overwrites a failed int16 attempt, being twice as long: no
            fp.seek(0)  # truncation, which would make ext4 flush the file on close (auto_da_alloc)
            header.set_data_dtype(dtype)  # type: ignore[no-untyped-call]
            header.write_to(fp)  # type: ignore[no-untyped-call]
            fp.seek(header.get_data_offset())  # type: ignore[no-untyped-call]
            if _write_voxels(volume.array, fp, dtype):
                break
    data_type = str(header.get_data_dtype().name)  # type: ignore[no-untyped-call]
    sidecar_path.write_text(json.dumps(sidecar(volume, data_type=data_type), indent=2), encoding="utf-8")
    return image_path, sidecar_path


def _write_voxels(array: npt.NDArray[np.float32], fp: BinaryIO, dtype: np.dtype[Any]) -> bool:
    """Write the voxels in NIfTI order, one ``[row, column]`` plane at a time, rows flipped; ``False`` (stopped) as
    soon as a plane does not survive the conversion to ``dtype`` exactly."""
    shape = array.shape[-2:]
    converted, flipped, exact = np.empty(shape, dtype), np.empty(shape, dtype), np.empty(shape, bool)
    for index in np.ndindex(array.shape[:-2]):  # NIfTI [i, j, k, t] is C order [t, k, j, i]: planes in turn
        source = array[index]
        if dtype == array.dtype:
            np.copyto(flipped, source[::-1])
        else:  # converted and checked in source order (contiguous: twice as fast as through the flipped view)
            with np.errstate(invalid="ignore"):  # NaN or out of range: caught by the comparison
                np.copyto(converted, source, casting="unsafe")
            if not np.equal(converted, source, out=exact).all():
                return False
            np.copyto(flipped, converted[::-1])
        fp.write(flipped.data)
    return True
