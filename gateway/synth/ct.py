"""Synthetic thorax CT series (DICOM CT Image Storage) with known lung-nodule truth.

Used for demos, tests and benchmarks, and as training data for nodule segmentation: the returned
:class:`SynthCT` carries every nodule's exact centre and radius, and
:func:`nodule_mask` (or :meth:`SliceRenderer.nodule_mask`, per slice) gives the matching voxel mask.

Geometry convention (patient coordinates, DICOM LPS, millimetres):

* Axial slices, ``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``: the column index grows towards the
  patient's left (+x), the row index towards posterior (+y); ``PatientPosition`` is ``HFS``.
* The in-plane field of view is centred on x = y = 0. ``PixelSpacing`` is ``(row spacing, column
  spacing)`` as in DICOM. Its default is ``360 mm / max(rows, columns)`` (0.703125 mm for 512).
* Slice ``k`` (``InstanceNumber = k + 1``) lies at ``z = ((slices - 1) / 2 - k) * slice_spacing``:
  the series is centred on z = 0 and runs from head to feet with *decreasing* z, as a scanner does for
  a head-first supine patient. ``SliceLocation`` equals that z; ``SliceThickness`` equals the spacing.
* Stored pixels are unsigned, 12 bits stored in 16 allocated (``PixelRepresentation = 0``), holding
  ``HU + 1024``; ``RescaleIntercept = -1024``, ``RescaleSlope = 1``, ``RescaleType = HU``. HU is
  rounded and clipped to [-1024, 3071].

Everything is deterministic for a given ``seed``: nodule placement, noise and, unless ``fresh_uids``
is set, every UID (derived with :func:`pydicom.uid.generate_uid` from the seed and all generation
parameters). Slices are rendered lazily from the analytic phantom, one at a time, so memory stays at a
few 2-D arrays whatever the series length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Final, TypedDict, Unpack

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from gateway.synth._nodules import place_nodules
from gateway.synth._phantom import (
    Nodule,
    SliceRenderer,
    Tissue,
    VolumeGeometry,
    nodule_mask,
    phantom_hu,
    rng_streams,
    tissue_labels,
)

__all__ = [
    "Nodule",
    "SliceRenderer",
    "SynthCT",
    "SynthOptions",
    "Tissue",
    "VolumeGeometry",
    "nodule_mask",
    "phantom_hu",
    "place_nodules",
    "rng_streams",
    "synth_ct_datasets",
    "tissue_labels",
    "write_synthetic_ct",
]

_DEFAULT_FOV_MM: Final = 360.0
_HU_OFFSET: Final = 1024
_MAX_STORED: Final = 4095  # 12 bits stored
_BASE_DATE: Final = date(2024, 1, 1)
_STUDY_TIME: Final = "093000"
_SERIES_TIME: Final = "093512"
_UID_TAG: Final = "gateway-synth-ct-v1"


@dataclass(frozen=True)
class SynthCT:
    """Description of a generated series: identifiers, geometry and nodule truth.

    Attributes
    ----------
    study_instance_uid, series_instance_uid : str
        UIDs shared by every slice.
    sop_instance_uids : tuple of str
        One UID per slice, in slice order (``InstanceNumber`` 1 first).
    nodules : tuple of Nodule
        The nodules rendered into the volume, exactly as rendered.
    shape : tuple of int
        ``(slices, rows, columns)``.
    pixel_spacing : tuple of float
        ``(row spacing, column spacing)`` in mm, as DICOM ``PixelSpacing``.
    slice_spacing : float
        Distance between adjacent slice centres in mm (also the slice thickness).
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    nodules: tuple[Nodule, ...]
    shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def geometry(self) -> VolumeGeometry:
        """The voxel geometry of the series."""
        return VolumeGeometry(self.shape, self.pixel_spacing, self.slice_spacing)


class SynthOptions(TypedDict, total=False):
    """Keyword arguments of :func:`synth_ct_datasets` that :func:`write_synthetic_ct` passes on."""

    slice_spacing: float
    pixel_spacing: float | None
    n_nodules: int
    study_instance_uid: str | None
    patient_id: str
    nodules: Sequence[Nodule] | None
    fresh_uids: bool


@dataclass(frozen=True)
class _SeriesInfo:
    """Per-series values shared by all slices."""

    desc: SynthCT
    frame_of_reference_uid: str
    patient_id: str
    seed: int


def _ds_number(value: float) -> float:
    """Round so that the decimal string fits a DICOM DS (16 characters)."""
    return round(float(value), 6)


def _uid(fresh: bool, *parts: object) -> str:
    if fresh:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[_UID_TAG, *(str(p) for p in parts)]))


def _validate(
    slices: int, rows: int, columns: int, seed: int, slice_spacing: float, pixel_spacing: float | None
) -> None:
    if min(slices, rows, columns) < 1:
        raise ValueError(f"slices, rows and columns must be positive, got {(slices, rows, columns)}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if slice_spacing <= 0 or (pixel_spacing is not None and pixel_spacing <= 0):
        raise ValueError(f"spacings must be positive, got {slice_spacing} and {pixel_spacing}")


def _set_patient_study(ds: Dataset, info: _SeriesInfo) -> None:
    study_date = (_BASE_DATE + timedelta(days=info.seed % 365)).strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "SYNTH^PHANTOM"
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = info.desc.study_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = _SERIES_TIME
    ds.AccessionNumber = f"SYN{info.seed % 10**13:013d}"
    ds.StudyID = f"S{info.seed % 10**8}"
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = "SYNTH CHEST CT"


def _set_series_equipment(ds: Dataset, info: _SeriesInfo) -> None:
    ds.Modality = "CT"
    ds.SeriesInstanceUID = info.desc.series_instance_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Synthetic thorax phantom (seed {info.seed})"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "gateway-synth"
    ds.ManufacturerModelName = "thorax-phantom"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic"
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _set_ct_acquisition(ds: Dataset, info: _SeriesInfo) -> None:
    geom = info.desc.geometry
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "STANDARD"
    ds.GantryDetectorTilt = 0
    ds.ReconstructionDiameter = _ds_number(geom.shape[2] * geom.pixel_spacing[1])
    ds.SliceThickness = _ds_number(geom.slice_spacing)
    ds.SpacingBetweenSlices = _ds_number(geom.slice_spacing)
    ds.PixelSpacing = [_ds_number(s) for s in geom.pixel_spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PatientOrientation = ["L", "P"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _set_pixel_module(ds: Dataset, rows: int, columns: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -_HU_OFFSET, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]


def _slice_dataset(info: _SeriesInfo, k: int, stored: npt.NDArray[np.uint16]) -> Dataset:
    sop_uid = UID(info.desc.sop_instance_uids[k])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    _set_patient_study(ds, info)
    _set_series_equipment(ds, info)
    _set_ct_acquisition(ds, info)
    _set_pixel_module(ds, stored.shape[0], stored.shape[1])
    position = info.desc.geometry.image_position(k)
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_number(v) for v in position]
    ds.SliceLocation = _ds_number(position[2])
    ds.PixelData = stored.astype("<u2", copy=False).tobytes()
    return ds


def _to_stored(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    stored: npt.NDArray[np.uint16] = np.clip(np.rint(hu) + _HU_OFFSET, 0, _MAX_STORED).astype(np.uint16)
    return stored


def _iter_datasets(info: _SeriesInfo, noise_rng: np.random.Generator) -> Iterator[Dataset]:
    renderer = SliceRenderer(info.desc.geometry)
    for k in range(info.desc.shape[0]):
        yield _slice_dataset(info, k, _to_stored(renderer.hu(k, info.desc.nodules, noise_rng)))


def synth_ct_datasets(
    slices: int = 100,
    rows: int = 512,
    columns: int = 512,
    *,
    seed: int = 0,
    slice_spacing: float = 2.5,
    pixel_spacing: float | None = None,
    n_nodules: int = 3,
    study_instance_uid: str | None = None,
    patient_id: str = "SYNTH0001",
    nodules: Sequence[Nodule] | None = None,
    fresh_uids: bool = False,
) -> tuple[SynthCT, Iterator[Dataset]]:
    """Describe a synthetic thorax CT series and return a lazy iterator over its slice datasets.

    Parameters
    ----------
    slices, rows, columns : int
        Volume shape.
    seed : int
        Non-negative seed; the same seed and parameters give the same pixels and UIDs.
    slice_spacing : float
        Distance between slice centres in mm (also written as ``SliceThickness``).
    pixel_spacing : float, optional
        Square pixel size in mm; default ``360 / max(rows, columns)`` (rounded to 1e-6 mm).
    n_nodules : int
        Number of random nodules to place (ignored when ``nodules`` is given).
    study_instance_uid : str, optional
        Put the series in this study; by default a study UID is derived from the parameters.
    patient_id : str
        ``PatientID`` of every slice.
    nodules : sequence of Nodule, optional
        Explicit nodules to render instead of random ones (not checked for placement).
    fresh_uids : bool
        Draw random UIDs instead of deriving them from the seed and parameters.

    Returns
    -------
    tuple of (SynthCT, iterator of pydicom.Dataset)
        The description (available before any pixel is rendered) and the slices, in slice order,
        each a complete CT Image Storage dataset with Explicit VR Little Endian file meta. The
        iterator renders one slice per step and keeps no reference to earlier slices.

    Raises
    ------
    ValueError
        On a non-positive size or spacing, a negative seed, or when nodules cannot be placed.
    """
    _validate(slices, rows, columns, seed, slice_spacing, pixel_spacing)
    spacing = _ds_number(pixel_spacing if pixel_spacing is not None else _DEFAULT_FOV_MM / max(rows, columns))
    geom = VolumeGeometry((slices, rows, columns), (spacing, spacing), _ds_number(slice_spacing))
    place_rng, noise_rng = rng_streams(seed)
    truth = tuple(nodules) if nodules is not None else place_nodules(geom, n_nodules, place_rng)
    params = (seed, geom.shape, geom.pixel_spacing, geom.slice_spacing, truth, patient_id)
    study = study_instance_uid or _uid(fresh_uids, "study", *params)
    series = _uid(fresh_uids, "series", study, *params)
    desc = SynthCT(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uids=tuple(_uid(fresh_uids, "sop", series, k) for k in range(slices)),
        nodules=truth,
        shape=geom.shape,
        pixel_spacing=geom.pixel_spacing,
        slice_spacing=geom.slice_spacing,
    )
    info = _SeriesInfo(desc, _uid(fresh_uids, "frame-of-reference", series), patient_id, seed)
    return desc, _iter_datasets(info, noise_rng)


def write_synthetic_ct(
    outdir: Path,
    slices: int = 100,
    *,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    **kwargs: Unpack[SynthOptions],
) -> SynthCT:
    """Write a synthetic series as one DICOM file per slice (``CT000001.dcm``, ...).

    Parameters
    ----------
    outdir : pathlib.Path
        Output directory, created (with parents) if missing; existing files of the same name are
        overwritten.
    slices, rows, columns : int
        Volume shape.
    seed : int
        Non-negative seed.
    **kwargs
        Further options of :func:`synth_ct_datasets` (see :class:`SynthOptions`).

    Returns
    -------
    SynthCT
        The description of the written series.
    """
    desc, datasets = synth_ct_datasets(slices, rows, columns, seed=seed, **kwargs)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets, start=1):
        ds.save_as(outdir / f"CT{k:06d}.dcm", enforce_file_format=True)
    return desc
