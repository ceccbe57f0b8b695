"""Siemens mosaics: tiles, their positions and diffusion keys, checked against dcm2niix on a real diffusion series."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from gateway.assemble.model import Plane, SliceRef
from gateway.assemble.mosaic import is_mosaic, mosaic_grid, mosaic_planes, split_mosaic
from gateway.errors import AssemblyError

from conftest import SHARED_DATA

DIFFUSION = Path("dcm_qa_decubitus/In/HFS/4_ep2d_diff_mddw_20_p2")
T1_SAGITTAL = Path("dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Reference:
    """dcm2niix's conversion of the diffusion series."""

    affine: np.ndarray[Any, Any]  # NIfTI, RAS, indexed (column, row from the bottom, slice)
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    bvals: list[float]
    bvecs: np.ndarray[Any, Any]  # (3, volumes), in dcm2niix's image frame


@pytest.fixture(scope="module")
def series() -> list[Path]:
    # Module-scoped (dcm2niix runs once), so it checks for the shared data itself, as the shared_data fixture does.
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DICOM test data not found at {SHARED_DATA}")
    files = sorted((SHARED_DATA / DIFFUSION).glob("*.dcm"))
    assert len(files) == 13
    return files


@pytest.fixture(scope="module")
def reference(series: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    dcm2niix = pytest.importorskip("dcm2niix", reason="dcm2niix (PyPI package) is the reference converter")
    out = tmp_path_factory.mktemp("dcm2niix")
    subprocess.run(
        [str(dcm2niix.bin), "-z", "n", "-o", str(out), str(series[0].parent)], check=True, capture_output=True
    )
    (nii,) = out.glob("*.nii")
    image = nib.Nifti1Image.from_filename(nii)
    return Reference(
        affine=image.affine,
        shape=image.shape,
        data=np.asarray(image.dataobj),
        bvals=[float(b) for b in nii.with_suffix(".bval").read_text().split()],
        bvecs=np.loadtxt(nii.with_suffix(".bvec")),
    )


@pytest.fixture(scope="module")
def planes(series: list[Path]) -> list[list[Plane]]:
    return [mosaic_planes(path) for path in series]


def gateway_affine(nifti_affine: np.ndarray[Any, Any], rows: int) -> np.ndarray[Any, Any]:
    """dcm2niix's affine in the gateway's convention: LPS, indexed (slice, row from the top, column)."""
    lps = LPS_FROM_RAS @ nifti_affine
    affine = np.eye(4)
    affine[:3, 0] = lps[:3, 2]
    affine[:3, 1] = -lps[:3, 1]
    affine[:3, 2] = lps[:3, 0]
    affine[:3, 3] = lps[:3, 3] + (rows - 1) * lps[:3, 1]
    return affine


def implied_affine(planes: list[Plane]) -> np.ndarray[Any, Any]:
    """The affine the planes of one mosaic imply: in-plane axes from the first, slice step from first to last."""
    first, last = planes[0], planes[-1]
    assert first.position is not None and last.position is not None
    assert first.orientation is not None and first.pixel_spacing is not None
    affine = np.eye(4)
    affine[:3, 0] = (np.asarray(last.position) - np.asarray(first.position)) / (len(planes) - 1)
    affine[:3, 1] = np.asarray(first.orientation[3:]) * first.pixel_spacing[0]
    affine[:3, 2] = np.asarray(first.orientation[:3]) * first.pixel_spacing[1]
    affine[:3, 3] = first.position
    return affine


def test_slices_per_mosaic_match_dcm2niix(planes: list[list[Plane]], reference: Reference) -> None:
    columns, rows, slices, volumes = reference.shape
    assert len(planes) == volumes
    for mosaic in planes:
        assert len(mosaic) == slices
        assert {(p.rows, p.columns) for p in mosaic} == {(rows, columns)}


def test_tile_refs_name_the_instance_frame_and_tile(series: list[Path], planes: list[list[Plane]]) -> None:
    uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SOPInstanceUID)
    assert [p.ref for p in planes[0]] == [SliceRef(uid, frame=1, tile=t) for t in range(25)]
    assert all(p.path == series[0] for p in planes[0])


def test_first_and_last_tile_positions_match_dcm2niix(planes: list[list[Plane]], reference: Reference) -> None:
    affine = gateway_affine(reference.affine, reference.shape[1])
    last = reference.shape[2] - 1
    for mosaic in planes:
        assert mosaic[0].position == pytest.approx((affine @ [0, 0, 0, 1])[:3], abs=1e-3)
        assert mosaic[-1].position == pytest.approx((affine @ [last, 0, 0, 1])[:3], abs=1e-3)


def test_implied_affine_matches_dcm2niix(planes: list[list[Plane]], reference: Reference) -> None:
    expected = gateway_affine(reference.affine, reference.shape[1])
    for mosaic in planes:
        np.testing.assert_allclose(implied_affine(mosaic), expected, atol=1e-3)


def test_tiles_are_evenly_spaced_along_the_normal(planes: list[list[Plane]]) -> None:
    positions = np.array([p.position for p in planes[0]])
    steps = np.diff(positions, axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-9)
    assert np.linalg.norm(steps[0]) == pytest.approx(5.2, abs=1e-6)  # SpacingBetweenSlices


def test_b_values_match_dcm2niix(planes: list[list[Plane]], reference: Reference) -> None:
    diffusion = [dict(mosaic[0].keys)["Diffusion"] for mosaic in planes]
    assert [b for b, _ in diffusion] == reference.bvals


def test_gradients_match_dcm2niix_bvecs(planes: list[list[Plane]], reference: Reference) -> None:
    # dcm2niix writes the gradient in its image frame: (row cosine, flipped column cosine, slice normal).
    first = planes[0][0]
    assert first.orientation is not None
    row, column = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    frame = np.stack([row, -column, np.cross(row, column)])
    for volume, mosaic in enumerate(planes):
        b_value, gradient = dict(mosaic[0].keys)["Diffusion"]
        if b_value == 0:
            assert gradient is None
            continue
        np.testing.assert_allclose(frame @ np.asarray(gradient), reference.bvecs[:, volume], atol=1e-3)


def test_keys_separate_every_mosaic_and_agree_within_one(planes: list[list[Plane]]) -> None:
    for mosaic in planes:
        assert len({p.keys for p in mosaic}) == 1
    assert len({mosaic[0].keys for mosaic in planes}) == len(planes)
    assert len({dict(mosaic[0].keys)["Diffusion"] for mosaic in planes}) == len(planes)


def test_split_real_mosaic_matches_dcm2niix_voxels(series: list[Path], reference: Reference) -> None:
    ds = pydicom.dcmread(series[1])
    columns, rows, slices, _ = reference.shape
    tiles = split_mosaic(ds.pixel_array, slices, rows, columns)
    # NIfTI voxel [i, j, k] is tile k, row (rows - 1 - j), column i.
    expected = np.transpose(reference.data[:, ::-1, :, 1], (2, 1, 0))
    np.testing.assert_array_equal(tiles, expected)


def test_split_mosaic_places_tiles_row_by_row() -> None:
    n_tiles, tile_rows, tile_cols = 7, 2, 3
    tiles = np.arange(n_tiles * tile_rows * tile_cols, dtype=np.int16).reshape(n_tiles, tile_rows, tile_cols)
    grid = mosaic_grid(n_tiles)
    frame = np.full((grid * tile_rows, grid * tile_cols), -1, dtype=np.int16)
    for t in range(n_tiles):
        r, c = divmod(t, grid)
        frame[r * tile_rows : (r + 1) * tile_rows, c * tile_cols : (c + 1) * tile_cols] = tiles[t]
    split = split_mosaic(frame, n_tiles, tile_rows, tile_cols)
    assert split.dtype == np.int16
    np.testing.assert_array_equal(split, tiles)
    assert not np.shares_memory(split, frame)


@pytest.mark.parametrize(("n_tiles", "grid"), [(1, 1), (2, 2), (4, 2), (5, 3), (9, 3), (10, 4), (25, 5), (64, 8)])
def test_mosaic_grid_is_ceil_sqrt(n_tiles: int, grid: int) -> None:
    assert mosaic_grid(n_tiles) == grid


def test_split_mosaic_refuses_a_frame_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="frame has shape"):
        split_mosaic(np.zeros((10, 9)), 9, 3, 3)
    with pytest.raises(ValueError, match="n_tiles"):
        split_mosaic(np.zeros((3, 3)), 0, 3, 3)


def test_a_plain_slice_is_not_a_mosaic(shared_data: Path) -> None:
    path = next((shared_data / T1_SAGITTAL).glob("*.dcm"))
    assert not is_mosaic(pydicom.dcmread(path, stop_before_pixels=True))
    with pytest.raises(AssemblyError, match="not a Siemens mosaic"):
        mosaic_planes(path)


def test_mosaic_is_detected(series: list[Path]) -> None:
    assert is_mosaic(pydicom.dcmread(series[0], stop_before_pixels=True))


def test_private_tile_count_is_used_without_the_csa_header(series: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(series[1])
    del ds[0x0029, 0x1010]  # the CSA image header; (0019,100A) NumberOfImagesInMosaic remains
    path = tmp_path / "no_csa.dcm"
    ds.save_as(path)
    planes = mosaic_planes(path)
    assert len(planes) == 25
    assert dict(planes[0].keys)["Diffusion"][0] == 1000.0  # from the private (0019,100C) B_value


def test_unreadable_file_is_an_assembly_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom")
    with pytest.raises(AssemblyError, match="cannot read"):
        mosaic_planes(path)


def test_without_a_slice_spacing_no_tile_has_a_position(series: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(series[1], stop_before_pixels=True)
    del ds.SpacingBetweenSlices, ds.SliceThickness
    path = tmp_path / "no_spacing.dcm"
    ds.save_as(path)
    planes = mosaic_planes(path)
    assert {p.position for p in planes} == {None}
    assert {p.orientation for p in planes} == {tuple(float(v) for v in ds.ImageOrientationPatient)}


def test_a_mosaic_that_does_not_fit_its_grid_is_refused(series: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(series[1], stop_before_pixels=True)
    ds.Rows = 642
    path = tmp_path / "odd_size.dcm"
    ds.save_as(path)
    with pytest.raises(AssemblyError, match="cannot hold 25 tiles on a 5x5 grid"):
        mosaic_planes(path)


@pytest.mark.parametrize("length", [3, 100, 2000])
def test_a_truncated_csa_header_is_an_assembly_error(series: list[Path], tmp_path: Path, length: int) -> None:
    ds = pydicom.dcmread(series[1], stop_before_pixels=True)
    ds[0x0029, 0x1010].value = ds[0x0029, 0x1010].value[:length]
    path = tmp_path / "truncated_csa.dcm"
    ds.save_as(path)
    with pytest.raises(AssemblyError, match="unreadable Siemens CSA image header"):
        mosaic_planes(path)
