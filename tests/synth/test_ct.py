"""Tests of the synthetic thorax CT generator (gateway.synth.ct)."""

from __future__ import annotations

import math
import shutil
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from gateway.synth.ct import (
    Nodule,
    SliceRenderer,
    SynthCT,
    Tissue,
    VolumeGeometry,
    nodule_mask,
    phantom_hu,
    place_nodules,
    rng_streams,
    synth_ct_datasets,
    tissue_labels,
    write_synthetic_ct,
)

SMALL = (40, 128, 128)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthCT, list[pydicom.Dataset]]:
    outdir = tmp_path_factory.mktemp("synth") / "nested" / "series"
    desc = write_synthetic_ct(outdir, 40, rows=128, columns=128, seed=1)
    files = sorted(outdir.iterdir())
    assert [f.name for f in files] == [f"CT{i:06d}.dcm" for i in range(1, 41)]
    return desc, [pydicom.dcmread(f) for f in files]


def _hu(ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def _stack(datasets: Iterator[pydicom.Dataset]) -> npt.NDArray[np.uint16]:
    return np.stack([ds.pixel_array for ds in datasets])


def test_written_files_are_ct_image_storage(written: tuple[SynthCT, list[pydicom.Dataset]]) -> None:
    desc, datasets = written
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.SOPInstanceUID == desc.sop_instance_uids[k]
        assert ds.StudyInstanceUID == desc.study_instance_uid
        assert ds.SeriesInstanceUID == desc.series_instance_uid
        assert ds.InstanceNumber == k + 1
        assert ds.PatientPosition == "HFS" and ds.BodyPartExamined == "CHEST"
        assert str(ds.PatientName) == "SYNTH^PHANTOM" and ds.Manufacturer == "gateway-synth"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (128, 128, 16, 0)
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (-1024.0, 1.0, "HU")
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1


def test_geometry_is_consistent(written: tuple[SynthCT, list[pydicom.Dataset]]) -> None:
    desc, datasets = written
    assert desc.shape == (40, 128, 128)
    assert desc.pixel_spacing == (360 / 128, 360 / 128) and desc.slice_spacing == 2.5
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    for ds in datasets:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert tuple(float(v) for v in ds.PixelSpacing) == desc.pixel_spacing
        assert float(ds.SliceThickness) == desc.slice_spacing
    normal = np.cross([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    steps = np.diff(positions @ normal)
    np.testing.assert_allclose(steps, -desc.slice_spacing, atol=1e-6)  # head to feet: z decreases
    np.testing.assert_allclose(positions[:, :2], np.broadcast_to(positions[0, :2], (40, 2)))
    np.testing.assert_allclose([float(ds.SliceLocation) for ds in datasets], positions[:, 2])
    np.testing.assert_allclose(positions[:, 2].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(positions[0], desc.geometry.image_position(0), atol=1e-5)
    # field of view centred on the isocentre
    np.testing.assert_allclose(positions[0, 0] + 127 / 2 * desc.pixel_spacing[1], 0.0, atol=1e-5)


def test_rescaled_hu_per_tissue(written: tuple[SynthCT, list[pydicom.Dataset]]) -> None:
    desc, datasets = written
    renderer = SliceRenderer(desc.geometry)
    truth = nodule_mask(desc.shape, desc.pixel_spacing, desc.slice_spacing, desc.nodules)
    expected = {
        Tissue.AIR: (-1010, -990),
        Tissue.LUNG: (-870, -830),
        Tissue.FAT: (-110, -90),
        Tissue.SOFT: (30, 50),
    }
    expected[Tissue.BONE] = (650, 750)
    for k in (5, 20, 34):
        hu, labels = _hu(datasets[k]), renderer.labels(k)
        for label, (low, high) in expected.items():
            values = hu[(labels == label) & ~truth[k]]
            assert values.size > 0 and low < values.mean() < high, (k, label, values.mean())
        assert hu.min() >= -1024 and hu[labels == Tissue.LUNG].std() < 40


def test_uids_unique_valid_and_deterministic(written: tuple[SynthCT, list[pydicom.Dataset]]) -> None:
    desc, datasets = written
    uids = [*desc.sop_instance_uids, desc.study_instance_uid, desc.series_instance_uid]
    uids.append(datasets[0].FrameOfReferenceUID)
    assert len(set(uids)) == len(uids) == 43
    assert all(UID(u).is_valid for u in uids)
    again, _ = synth_ct_datasets(*SMALL, seed=1)
    assert again == desc
    fresh, _ = synth_ct_datasets(*SMALL, seed=1, fresh_uids=True)
    assert fresh.nodules == desc.nodules
    assert not {fresh.study_instance_uid, fresh.series_instance_uid} & set(uids)
    other, _ = synth_ct_datasets(*SMALL, seed=2, study_instance_uid=desc.study_instance_uid)
    assert other.study_instance_uid == desc.study_instance_uid
    assert other.series_instance_uid != desc.series_instance_uid
    assert not set(other.sop_instance_uids) & set(desc.sop_instance_uids)


def test_same_seed_same_pixels_other_seed_differs() -> None:
    small = (24, 64, 64)
    first = _stack(synth_ct_datasets(*small, seed=7)[1])
    second = _stack(synth_ct_datasets(*small, seed=7)[1])
    third = _stack(synth_ct_datasets(*small, seed=8)[1])
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, third)


def test_pixels_match_phantom_hu() -> None:
    desc, datasets = synth_ct_datasets(*SMALL, seed=3)
    volume = phantom_hu(desc.shape, desc.pixel_spacing, desc.slice_spacing, desc.nodules, rng_streams(3)[1])
    assert volume.dtype == np.float32 and volume.shape == desc.shape
    expected = np.clip(np.rint(volume) + 1024, 0, 4095)
    np.testing.assert_array_equal(_stack(datasets), expected)


@pytest.mark.parametrize("seed", [0, 11])
def test_nodule_truth_matches_rendered_voxels(seed: int) -> None:
    desc, datasets = synth_ct_datasets(64, 512, 512, seed=seed, slice_spacing=1.25)
    geom = desc.geometry
    xs, ys = np.meshgrid(geom.x_mm(), geom.y_mm())
    voxel_ml = geom.pixel_spacing[0] * geom.pixel_spacing[1] * geom.slice_spacing / 1000
    renderer = SliceRenderer(geom)
    counts, truth_counts = [0] * len(desc.nodules), [0] * len(desc.nodules)
    for k, ds in enumerate(datasets):
        dense, truth = _hu(ds) > -300, renderer.nodule_mask(k, desc.nodules)
        for i, nodule in enumerate(desc.nodules):
            cx, cy, cz = nodule.center_mm
            near = (xs - cx) ** 2 + (ys - cy) ** 2 + (geom.z_mm(k) - cz) ** 2 <= (nodule.radius_mm + 1.5) ** 2
            counts[i] += int(np.count_nonzero(dense & near))
            truth_counts[i] += int(np.count_nonzero(truth & near))
    for nodule, count, truth_count in zip(desc.nodules, counts, truth_counts, strict=True):
        assert count == truth_count  # surroundings are lung, the nodule is exactly the mask
        assert count * voxel_ml == pytest.approx(nodule.volume_ml, rel=0.10)


def test_spheres_are_spheres_in_millimetres() -> None:
    nodule = Nodule((4.3, -2.1, 1.7), 7.5, 30.0)
    for pixel_spacing, slice_spacing in [((0.4, 0.6), 1.0), ((0.7, 0.7), 2.5), ((1.0, 0.5), 0.8)]:
        shape = (int(30 / slice_spacing), int(40 / pixel_spacing[0]), int(40 / pixel_spacing[1]))
        mask = nodule_mask(shape, pixel_spacing, slice_spacing, [nodule])
        voxel_ml = pixel_spacing[0] * pixel_spacing[1] * slice_spacing / 1000
        assert mask.sum() * voxel_ml == pytest.approx(nodule.volume_ml, rel=0.05)
        geom = VolumeGeometry(shape, pixel_spacing, slice_spacing)
        ks, rows, cols = np.nonzero(mask)
        extents = [float(np.ptp(geom.x_mm()[cols])), float(np.ptp(geom.y_mm()[rows]))]
        extents.append(max(geom.z_mm(int(k)) for k in ks) - min(geom.z_mm(int(k)) for k in ks))
        spacings = [pixel_spacing[1], pixel_spacing[0], slice_spacing]
        for extent, spacing in zip(extents, spacings, strict=True):
            assert 2 * nodule.radius_mm - 2 * spacing <= extent <= 2 * nodule.radius_mm
        hu = phantom_hu(shape, pixel_spacing, slice_spacing, [nodule], np.random.default_rng(0))
        assert abs(hu[mask].mean() - 30.0) < 2.0


@pytest.mark.parametrize("seed", range(6))
def test_nodule_placement_constraints(seed: int) -> None:
    geom = VolumeGeometry((40, 128, 128), (2.8125, 2.8125), 2.5)
    nodules = place_nodules(geom, 4, np.random.default_rng(seed))
    assert len(nodules) == 4
    z_lo, z_hi = geom.z_mm(39), geom.z_mm(0)
    directions = np.random.default_rng(99).normal(size=(200, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for i, nodule in enumerate(nodules):
        assert 3.0 <= nodule.radius_mm <= 12.0 and 10.0 <= nodule.hu <= 50.0
        assert z_lo <= nodule.center_mm[2] - nodule.radius_mm
        assert nodule.center_mm[2] + nodule.radius_mm <= z_hi
        shell = np.asarray(nodule.center_mm) + (nodule.radius_mm + 1.0) * directions
        assert np.all(tissue_labels(shell[:, 0], shell[:, 1], shell[:, 2]) == Tissue.LUNG)
        for other in nodules[i + 1 :]:
            assert math.dist(nodule.center_mm, other.center_mm) > nodule.radius_mm + other.radius_mm


def test_renderer_labels_match_pointwise_labels() -> None:
    geom = VolumeGeometry((60, 96, 96), (3.75, 3.75), 5.0)
    renderer = SliceRenderer(geom)
    xs, ys = np.meshgrid(geom.x_mm(), geom.y_mm())
    for k in range(0, 60, 3):
        pointwise = tissue_labels(xs, ys, np.full(xs.shape, geom.z_mm(k)))
        assert np.count_nonzero(renderer.labels(k) != pointwise) <= 3
    found = set(np.unique(np.stack([renderer.labels(k) for k in range(60)])).tolist())
    assert found == {
        Tissue.AIR,
        Tissue.FAT,
        Tissue.SOFT,
        Tissue.LUNG,
        Tissue.HEART,
        Tissue.AORTA,
        Tissue.BONE,
        Tissue.CSF,
    }


def test_datasets_are_generated_lazily() -> None:
    tracemalloc.start()
    try:
        desc, datasets = synth_ct_datasets(120, 256, 256, seed=5)
        assert isinstance(desc, SynthCT) and iter(datasets) is datasets
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        count = sum(1 for _ in datasets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 120
    volume_bytes = 120 * 256 * 256 * 2
    assert peak - base < volume_bytes / 4


def test_explicit_nodules_and_validation() -> None:
    nodule = Nodule((-70.0, 0.0, 0.0), 5.0, 40.0)
    assert nodule.volume_ml == pytest.approx(4 / 3 * math.pi * 125 / 1000)
    desc, _ = synth_ct_datasets(*SMALL, nodules=[nodule])
    assert desc.nodules == (nodule,)
    with pytest.raises(ValueError):
        synth_ct_datasets(0, 64, 64)
    with pytest.raises(ValueError):
        synth_ct_datasets(10, 64, 64, seed=-1)
    with pytest.raises(ValueError):
        synth_ct_datasets(10, 64, 64, pixel_spacing=0.0)
    with pytest.raises(ValueError, match="nodules"):
        synth_ct_datasets(2, 64, 64, n_nodules=1)
    assert synth_ct_datasets(2, 64, 64, n_nodules=0)[0].nodules == ()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_reports_no_errors_or_warnings(tmp_path: Path) -> None:
    write_synthetic_ct(tmp_path, 12, rows=64, columns=64, n_nodules=0)
    for path in (tmp_path / "CT000001.dcm", tmp_path / "CT000012.dcm"):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        report = result.stdout + result.stderr
        assert "Error" not in report and "Warning" not in report, report
