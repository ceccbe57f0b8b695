"""Inputs for the encoder tests: synthetic series (plain, gantry-tilted, multi-frame), model results, validators.

Results come from running the shipped models through the inference runtime where one fits, or are built from the
synthetic phantom directly (a several-label label map, a parametric map) with the runtime's own measurements.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import SliceRef, Volume
from gateway.infer.measure import measure_segments
from gateway.infer.results import Finding, ModelResult
from gateway.infer.runtime import InferenceRuntime
from gateway.registry.manifest import Manifest, load_manifest
from gateway.synth.ct import synth_ct_datasets, write_synthetic_ct

from conftest import require_tool

MODELS = Path(__file__).resolve().parents[2] / "models"
SHA256 = "ab" * 32
GATEWAY_VERSION = "0.1.0"


@dataclass(frozen=True)
class Case:
    """A source series on disk, its volume and its datasets by SOP Instance UID."""

    paths: tuple[Path, ...]
    volume: Volume
    sources: Mapping[str, Dataset]


def read_case(paths: Sequence[Path]) -> Case:
    result = assemble_series(list(paths))
    assert len(result.volumes) == 1, result.refused
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in paths)}
    return Case(tuple(paths), result.volumes[0], sources)


DWI = Path("dcm_qa_decubitus/In/HFS/4_ep2d_diff_mddw_20_p2")


def dwi_case(shared_data: Path) -> Case:
    """The shared Siemens mosaic DWI series (skips when the shared data lacks it)."""
    folder = shared_data / DWI
    if not folder.is_dir():
        pytest.skip(f"{DWI} not in the shared data")
    return read_case(sorted(folder.iterdir()))


def threshold_result(volume: Volume) -> ModelResult:
    """:func:`labelmap_manifest`'s labels drawn from any volume: its brightest 20 % (1) and 3 % (3) voxels."""
    manifest = labelmap_manifest()
    assert manifest.outputs.segmentation is not None
    values = volume.array if volume.array.ndim == 3 else volume.array[0]
    labelmap = np.zeros(values.shape, dtype=np.uint8)
    labelmap[values > np.percentile(values, 80)] = 1
    labelmap[values > np.percentile(values, 97)] = 3
    masks = {1: labelmap == 1, 3: labelmap == 3}
    measurements = measure_segments(masks, volume, manifest.outputs.segmentation.labels)
    return result_of(manifest, volume, labelmap=labelmap, masks=masks, measurements=measurements)


def synthetic_ct(folder: Path, slices: int = 24, size: int = 128, seed: int = 1) -> Case:
    """The issue's synthetic CT: 24 slices of 128x128, seed 1."""
    write_synthetic_ct(folder, slices, rows=size, columns=size, seed=seed)
    return read_case(sorted(folder.iterdir()))


def tilted_ct(folder: Path, degrees: float = 15.0, slices: int = 16, size: int = 64) -> Case:
    """A synthetic CT sheared as a gantry tilt shears it: each slice's origin moves in y by z * tan(tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, datasets = synth_ct_datasets(slices, size, size, seed=2, n_nodules=0)
    paths = []
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + z * math.tan(math.radians(degrees)), 6), z]
        ds.GantryDetectorTilt = degrees
        path = folder / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return read_case(paths)


def multiframe_ct(single: Case, folder: Path) -> Case:
    """The single-frame series as one Legacy Converted Enhanced CT (frames head to feet, so the volume, sorted
    feet to head, takes them in reverse order)."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(p) for p in single.paths]
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, hd.UID(), 50, hd.UID(), 1)
    path = folder / "enhanced.dcm"
    converted.save_as(path, enforce_file_format=True)
    return read_case([path])


def run_model(name: str, volume: Volume) -> ModelResult:
    """One of the shipped models (``models/<name>``) on ``volume``."""
    folder = MODELS / name
    runtime = InferenceRuntime("cpu", batching=False)
    try:
        return runtime.run(load_manifest(folder), folder, SHA256, volume)
    finally:
        runtime.close()


def result_of(manifest: Manifest, volume: Volume, **outputs: Any) -> ModelResult:
    """The result of ``manifest``'s model (weights hash :data:`SHA256`) on ``volume``: ``outputs`` are the other
    :class:`ModelResult` fields."""
    return ModelResult(
        name=manifest.name, version=manifest.version, sha256=SHA256, manifest=manifest, volume=volume, **outputs
    )


def onnx_manifest(name: str, version: str, description: str, outputs: dict[str, Any]) -> Manifest:
    """The manifest of an ONNX model for the tests, with these ``outputs``."""
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "authors": ["Tests"],
        "licence": "CC0",
        "intended_use": "Tests only.",
        "backend": "onnx",
        "weights": "model.onnx",
        "outputs": outputs,
    }
    return Manifest.model_validate(data)


def labelmap_manifest() -> Manifest:
    """A label-map model with two non-overlapping, non-contiguous labels (1 lung, 3 bone) and a finding."""
    code = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
    outputs: dict[str, Any] = {
        "segmentation": {
            "kind": "labelmap",
            "labels": [
                {
                    "value": 1,
                    "name": "lung",
                    "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
                    "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
                    "color": [80, 160, 255],
                    "measurements": ["volume", "mean", "stddev", "min", "max", "voxels"],
                },
                {
                    "value": 3,
                    "name": "bone",
                    "category": code,
                    "type": {"value": "3138006", "scheme": "SCT", "meaning": "Bone"},
                    "color": [240, 240, 220],
                    "measurements": ["volume", "mean"],
                },
            ],
        },
        "classifications": [
            {"name": "Bone", "finding": {"value": "3138006", "scheme": "SCT", "meaning": "Bone"}, "label": 3}
        ],
    }
    return onnx_manifest("phantom-labels", "2.1.0", "Lung and bone from HU thresholds.", outputs)


def labelmap_result(volume: Volume) -> ModelResult:
    """:func:`labelmap_manifest`'s result from HU thresholds: lung below -500 HU inside the body, bone above 200."""
    manifest = labelmap_manifest()
    assert manifest.outputs.segmentation is not None
    hu = volume.array
    labelmap = np.zeros(hu.shape, dtype=np.uint8)
    labelmap[(hu < -500) & (hu > -950)] = 1
    labelmap[hu > 200] = 3
    masks = {1: labelmap == 1, 3: labelmap == 3}
    measurements = measure_segments(masks, volume, manifest.outputs.segmentation.labels)
    bone = Finding("Bone", manifest.outputs.classifications[0].finding, 3, 0.87, measurements[1].values["volume"])
    return result_of(
        manifest,
        volume,
        labelmap=labelmap,
        masks=masks,
        probabilities={1: 0.9, 3: 0.87},
        measurements=measurements,
        classifications=(bone,),
    )


def map_manifest(name: str = "relative-hu") -> Manifest:
    """A model with one parametric map."""
    hu_map = {
        "name": "relative HU",
        "quantity": {"value": "112031", "scheme": "DCM", "meaning": "Attenuation Coefficient"},
        "units": {"value": "[hnsf'U]", "scheme": "UCUM", "meaning": "Hounsfield unit"},
    }
    return onnx_manifest(name, "0.3.0", "A map.", {"parametric_maps": [hu_map]})


def map_result(volume: Volume) -> ModelResult:
    """A parametric map of the volume's HU above air (float32, fractional values)."""
    manifest = map_manifest()
    values = ((volume.array + 1000.0) / 3.0).astype(np.float32)
    return result_of(manifest, volume, maps={"relative HU": values})


def large_labelmap_case(slices: int = 300, size: int = 512) -> tuple[ModelResult, dict[str, Dataset]]:
    """A 512x512x300 label map with 5 spherical segments over header-only sources (the encoders read no pixels).

    The volume's values are a zero view (no memory): only its shape, affine and slices matter to the SEG.
    """
    _, datasets = synth_ct_datasets(1, size, size, seed=0, n_nodules=0)
    template = next(datasets)
    del template.PixelData
    spacing = float(template.PixelSpacing[0])
    sources: dict[str, Dataset] = {}
    for k in range(slices):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(hd.UID())
        ds.ImagePositionPatient = [-180.0, -180.0, float(k)]
        ds.InstanceNumber = k + 1
        sources[str(ds.SOPInstanceUID)] = ds
    affine = np.array(
        [[0, 0, spacing, -180.0], [0, spacing, 0, -180.0], [1.0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    volume = Volume(
        array=np.broadcast_to(np.zeros((1, 1, 1), dtype=np.float32), (slices, size, size)),
        affine=affine,
        slices=tuple(SliceRef(uid) for uid in sources),
        series_instance_uid=str(template.SeriesInstanceUID),
        study_instance_uid=str(template.StudyInstanceUID),
        frame_of_reference_uid=str(template.FrameOfReferenceUID),
        modality="CT",
    )
    z, y, x = np.ogrid[:slices, :size, :size]
    labelmap = np.zeros((slices, size, size), dtype=np.uint8)
    spheres = [
        ((150, 256, 256), 120),
        ((100, 200, 150), 40),
        ((200, 300, 350), 60),
        ((60, 256, 256), 50),
        ((250, 100, 100), 30),
    ]
    for value, ((cz, cy, cx), radius) in enumerate(spheres, start=1):
        labelmap[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < radius**2] = value
    manifest = five_label_manifest()
    masks = {value: labelmap == value for value in range(1, 6)}
    return result_of(manifest, volume, labelmap=labelmap, masks=masks), sources


def five_label_manifest() -> Manifest:
    data = labelmap_manifest().model_dump()
    first = data["outputs"]["segmentation"]["labels"][0]
    data["outputs"]["segmentation"]["labels"] = [{**first, "value": v, "name": f"part {v}"} for v in range(1, 6)]
    data["outputs"]["classifications"] = []
    return Manifest.model_validate(data)


# -- validators ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    errors: list[str]
    warnings: list[str]


_DICOMDIR = "needed to build DICOMDIR"  # dciodvfy's notes on what a DICOMDIR would want, not on the object


def dciodvfy(path: Path) -> Verdict:
    """dicom3tools' IOD validator on one file: its errors and warnings."""
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning") and _DICOMDIR not in line]
    return Verdict(errors, warnings)


def dsrdump(path: Path) -> tuple[str, str]:
    """DCMTK's SR dump: (stdout, stderr)."""
    tool = require_tool("dsrdump")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout, run.stderr


# -- reading back ----------------------------------------------------------------------------------------------


def frame_positions(ds: Dataset) -> np.ndarray:
    """ImagePositionPatient of every frame, ``[frames, 3]``."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for frame in ds.PerFrameFunctionalGroupsSequence:
        group = frame if "PlanePositionSequence" in frame else shared
        out.append([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
    return np.array(out)


def slice_index(volume: Volume, positions: np.ndarray) -> np.ndarray:
    """The volume slice each position lies on (the affine's slice coordinate, which must be an integer)."""
    inverse = np.linalg.inv(volume.affine)
    index = (inverse[:3, :3] @ positions.T + inverse[:3, 3:4])[0]
    rounded = np.rint(index)
    np.testing.assert_allclose(index, rounded, atol=1e-3)
    return rounded.astype(int)


def affine_positions(volume: Volume, indices: np.ndarray) -> np.ndarray:
    return (volume.affine[:3, 0][None, :] * indices[:, None]) + volume.affine[:3, 3][None, :]


def derivation_sources(ds: Dataset) -> list[list[tuple[str, int | None, str]]]:
    """Per frame: (SOP Instance UID, frame number or None, Spatial Locations Preserved) of each cited source."""
    out = []
    for frame in ds.PerFrameFunctionalGroupsSequence:
        cited = []
        for derivation in frame.get("DerivationImageSequence", []):
            for item in derivation.SourceImageSequence:
                numbers = item.get("ReferencedFrameNumber")
                number = None if numbers in (None, "") else int(numbers)
                cited.append((str(item.ReferencedSOPInstanceUID), number, str(item.get("SpatialLocationsPreserved"))))
        out.append(cited)
    return out


def referenced_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs in the ReferencedSeriesSequence."""
    return {
        str(instance.ReferencedSOPInstanceUID)
        for series in ds.ReferencedSeriesSequence
        for instance in series.ReferencedInstanceSequence
    }


UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


# -- irregular series: frames on the source images ---------------------------------------------------------------


def irregular_ct(
    folder: Path,
    *,
    degrees: float = 0.0,
    drop: Sequence[int] = (),
    moved: Mapping[int, float] | None = None,
    slices: int = 16,
    size: int = 64,
) -> Case:
    """:func:`tilted_ct` bent further: the slices ``drop`` (indices in InstanceNumber order) left out, which makes
    a gap, and slices moved along z by ``moved`` (index -> mm), which makes the spacing uneven; ``degrees`` of
    gantry tilt (0 for none)."""
    folder.mkdir(parents=True, exist_ok=True)
    _, datasets = synth_ct_datasets(slices, size, size, seed=2, n_nodules=0)
    shifts = dict(moved or {})
    paths = []
    for k, ds in enumerate(datasets):
        if k in drop:
            continue
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        z = round(z + shifts.get(k, 0.0), 6)
        ds.ImagePositionPatient = [x, round(y + z * math.tan(math.radians(degrees)), 6), z]
        ds.SliceLocation = z
        if degrees:
            ds.GantryDetectorTilt = degrees
        path = folder / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return read_case(paths)


IRREGULAR = {
    "tilt+gap": {"degrees": 20.0, "drop": (5, 6, 11)},
    "uneven+gap": {"drop": (6, 7), "moved": {2: 0.6, 11: -0.4}},
    "tilt+uneven+gap": {"degrees": 20.0, "drop": (6, 7), "moved": {2: 0.6, 11: -0.4}},
}
"""The irregular series the frame tests run on, as :func:`irregular_ct` arguments."""


def image_position(ds: Dataset) -> np.ndarray:
    """ImagePositionPatient of a single-frame image."""
    return np.array([float(v) for v in ds.ImagePositionPatient])


def pixel_positions(ds: Dataset) -> np.ndarray:
    """LPS of every pixel centre of a single-frame image, ``[rows, columns, 3]``, from its own geometry."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    r, c = np.mgrid[: ds.Rows, : ds.Columns]
    steps = r[..., None] * iop[3:] * row_spacing + c[..., None] * iop[:3] * column_spacing
    return image_position(ds) + steps


def _slice_normal(volume: Volume) -> tuple[np.ndarray, float]:
    step = volume.affine[:3, 0]
    return step / np.linalg.norm(step), float(np.linalg.norm(step))


def true_voxel_positions(volume: Volume, sources: Mapping[str, Dataset]) -> np.ndarray:
    """Where each voxel of the (first 3D) volume really lies, ``[slices, rows, columns, 3]``.

    In-plane from the affine; along the normal from the affine after resampling along the normal (uneven
    spacing), else from the slice's own source image (the affine is wrong past a gap)."""
    normal, step = _slice_normal(volume)
    origin = volume.affine[:3, 3]
    uniform = any(flag.code in ("uneven-spacing", "spacing-changes") for flag in volume.qc)
    heights = [
        k * step if uniform else float(np.dot(image_position(sources[ref.sop_instance_uid]) - origin, normal))
        for k, ref in enumerate(volume.slices)
    ]
    rows, columns = volume.array.shape[-2:]
    r, c = np.mgrid[:rows, :columns]
    in_plane = r[..., None] * volume.affine[:3, 1] + c[..., None] * volume.affine[:3, 2] + origin
    return np.stack([in_plane + h * normal for h in heights])


def off_grid_mm(volume: Volume, ds: Dataset) -> float:
    """How far a source image lies along the normal from the nearest slice of the volume's (uniform) grid."""
    normal, step = _slice_normal(volume)
    height = float(np.dot(image_position(ds) - volume.affine[:3, 3], normal)) / step
    return abs(height - round(height)) * step


def ellipsoid(points: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Whether each point ``[..., 3]`` lies inside the axis-aligned ellipsoid."""
    return np.asarray((((points - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=-1) < 1.0)


BODY = ((0.0, 0.0, 0.0), (80.0, 60.0, 12.0))
SPOT = ((30.0, 20.0, 3.0), (20.0, 25.0, 8.0))


def phantom_labels(points: np.ndarray) -> np.ndarray:
    """:func:`labelmap_manifest`'s labels drawn in patient space: ``SPOT`` is 3 (bone), the rest of ``BODY`` 1."""
    labels = np.zeros(points.shape[:-1], dtype=np.uint8)
    labels[ellipsoid(points, *BODY)] = 1
    labels[ellipsoid(points, *SPOT)] = 3
    return labels


def phantom_map(points: np.ndarray) -> np.ndarray:
    """A parametric map linear in patient space (mm): ``x + 2 y + 3 z``."""
    return np.asarray(points @ np.array([1.0, 2.0, 3.0]), dtype=np.float32)


def geometric_result(volume: Volume, sources: Mapping[str, Dataset]) -> ModelResult:
    """:func:`labelmap_manifest`'s result drawn on where the voxels really lie (:func:`phantom_labels`)."""
    labelmap = phantom_labels(true_voxel_positions(volume, sources))
    return result_of(labelmap_manifest(), volume, labelmap=labelmap, masks={1: labelmap == 1, 3: labelmap == 3})


def geometric_map_result(volume: Volume, sources: Mapping[str, Dataset]) -> ModelResult:
    """:func:`map_manifest`'s map drawn on where the voxels really lie (:func:`phantom_map`)."""
    return result_of(map_manifest(), volume, maps={"relative HU": phantom_map(true_voxel_positions(volume, sources))})


def blurred_labels(ds: Dataset, along_normal_mm: float) -> np.ndarray:
    """Where :func:`phantom_labels` on a source image could change within half a pixel in-plane and
    ``along_normal_mm`` along the normal: the pixels a nearest-neighbour resampling may decide either way."""
    points = pixel_positions(ds)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    normal = np.cross(iop[:3], iop[3:])
    centre = phantom_labels(points)
    changes = np.zeros(centre.shape, dtype=bool)
    for dr, dc, dn in np.ndindex(3, 3, 3):
        offset = ((dr - 1) * 0.5 * row_spacing * iop[3:] + (dc - 1) * 0.5 * column_spacing * iop[:3]) + (
            dn - 1
        ) * along_normal_mm * normal
        changes |= phantom_labels(points + offset) != centre
    return changes


def frame_sources(ds: Dataset, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """The one source image each frame cites (asserting there is exactly one, its spatial locations preserved)."""
    cited = []
    for frame, items in enumerate(derivation_sources(ds)):
        assert len(items) == 1, f"frame {frame + 1} cites {items}"
        uid, number, preserved = items[0]
        assert number is None and preserved == "YES", items
        cited.append(sources[uid])
    return cited


def assert_frames_on_their_sources(ds: Dataset, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """Every frame cites exactly one source image and lies where it does (1e-3 mm); returns those images."""
    cited = frame_sources(ds, sources)
    positions = frame_positions(ds)
    np.testing.assert_allclose(positions, [image_position(image) for image in cited], atol=1e-3)
    real = np.array([image_position(image) for image in sources.values()])
    distances = np.linalg.norm(positions[:, None, :] - real[None, :, :], axis=-1)
    assert (distances.min(axis=1) < 1e-3).all()  # no frame where the series has no image
    assert ds.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    return cited


# -- lesions ---------------------------------------------------------------------------------------------------

#: Three nodules of known radii in the phantom's lungs: centre (LPS, mm), radius (mm), HU.
THREE_NODULES = (((-72.0, 0.0, 2.0), 9.0, 30.0), ((72.0, -20.0, 10.0), 6.0, 40.0), ((70.0, 30.0, -14.0), 4.0, 20.0))


def three_nodule_ct(folder: Path) -> Case:
    """A chest CT (60 slices of 1.25 mm, 256x256 pixels of 0.7 mm) with the three :data:`THREE_NODULES`."""
    from gateway.synth._phantom import Nodule

    nodules = [Nodule(centre, radius, hu) for centre, radius, hu in THREE_NODULES]
    write_synthetic_ct(
        folder, 60, rows=256, columns=256, seed=7, slice_spacing=1.25, pixel_spacing=0.7, nodules=nodules
    )
    return read_case(sorted(folder.iterdir()))


def truth_nodule_result(case: Case) -> ModelResult:
    """ct-nodule-unet's manifest with the truth as its output: voxels whose centre lies inside a nodule, each nodule
    a lesion measured by the runtime's own code, the "Pulmonary nodule" finding with probability 0.93."""
    from gateway.infer.lesions import find_lesions

    manifest = load_manifest(MODELS / "ct-nodule-unet")
    assert manifest.outputs.segmentation is not None
    label = manifest.outputs.segmentation.labels[0]
    volume = case.volume
    index = np.indices(volume.array.shape, dtype=np.float64).reshape(3, -1)
    points = (volume.affine[:3, :3] @ index + volume.affine[:3, 3:4]).T.reshape(*volume.array.shape, 3)
    mask = np.zeros(volume.array.shape, dtype=np.bool_)
    for centre, radius, _ in THREE_NODULES:
        mask |= np.linalg.norm(points - np.array(centre), axis=-1) <= radius
    probability = np.where(mask, np.float32(0.93), np.float32(0.0)).astype(np.float32)
    measurements = measure_segments({1: mask}, volume, [label])
    lesions = {1: find_lesions(mask, volume, label, probability)}
    item = manifest.outputs.classifications[0]
    finding = Finding(item.name, item.finding, 1, 0.93, measurements[0].values["volume"])
    return result_of(
        manifest,
        volume,
        labelmap=mask.astype(np.uint8),
        masks={1: mask},
        probabilities={1: 0.93},
        measurements=measurements,
        lesions=lesions,
        classifications=(finding,),
    )
