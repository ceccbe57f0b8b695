"""One series, one volume: slice spacing (and thickness) that changes part way is resampled onto the finest spacing.

The synthetic series (:func:`synthetic.two_spacings`) is a head CT as older protocols take it: 20 slices 2.5 mm
apart from z = 0 (thin, through the posterior fossa), then 20 slices 5 mm apart above, pixels ``HU = 4 z +
column``, so a voxel of the resampled grid has a known value wherever it lands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import synthetic
from test_dcm2niix import dcm2niix, ours

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import Volume
from gateway.assemble.spacing import spacing_runs
from gateway.encode import encode_result, write_objects

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "encode"))
import encode_cases  # the SEG cases and checks of tests/encode

GATEWAY = Path(sys.executable).with_name("gateway")
MESSAGE = (
    "slice spacing changes from 2.5 mm (slices 1-20, thickness 2.5 mm) to 5 mm (slices 21-40, thickness 5 mm): "
    "resampled to 2.5 mm along the normal"
)


def one_volume(tmp_path: Path, **kwargs: float) -> tuple[Volume, list[str]]:
    """The only volume of :func:`synthetic.two_spacings` and its SOP Instance UIDs in stack order (ascending z)."""
    datasets = synthetic.two_spacings(**kwargs)  # type: ignore[arg-type]
    result = assemble_series(synthetic.write(datasets, tmp_path / "in", shuffle_seed=3))
    assert result.refused == ()
    (volume,) = result.volumes
    return volume, [str(ds.SOPInstanceUID) for ds in datasets[::-1]]


def slice_z(volume: Volume) -> np.ndarray:
    """z of each slice of the volume's grid."""
    indices = np.arange(volume.array.shape[0])
    return (volume.affine @ np.stack([indices, 0 * indices, 0 * indices, 1 + 0 * indices]))[2]


def expected_hu(volume: Volume) -> np.ndarray:
    """``4 z + column`` on every voxel of the volume's grid."""
    columns = np.arange(volume.array.shape[2])
    return np.broadcast_to(4.0 * slice_z(volume)[:, None, None] + columns, volume.array.shape)


def test_two_spacings_become_one_volume_at_the_finer_spacing(tmp_path: Path) -> None:
    volume, uids = one_volume(tmp_path)
    assert [(f.code, f.message, f.resampled) for f in volume.qc] == [("spacing-changes", MESSAGE, True)]
    assert volume.array.shape == (60, synthetic.SIZE, synthetic.SIZE)
    assert volume.spacing == pytest.approx((2.5, 360 / 32, 360 / 32))
    # the grid reaches from the lowest thin slice (z = 0) to the highest thick one (z = 47.5 + 5 + 19 * 5)
    np.testing.assert_allclose(slice_z(volume)[[0, -1]], [0.0, 147.5])
    np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, 11.25], [0, 11.25, 0], [2.5, 0, 0]])
    np.testing.assert_allclose(volume.array, expected_hu(volume), atol=1e-3)
    # thin slices are grid slices 0-19, thick ones every other slice from 21; the slices between are interpolated
    planes = [(p.ref.sop_instance_uid, p.slice, p.exact) for p in volume.source_planes]
    assert planes == [(uid, k, True) for uid, k in zip(uids, [*range(20), *range(21, 60, 2)], strict=True)]
    assert volume.slices[20].sop_instance_uid in (uids[19], uids[20])


def test_a_transition_off_the_fine_grid_keeps_the_thin_slices_on_it(tmp_path: Path) -> None:
    """Contiguous slabs put the first thick slice 3.75 mm above the last thin one: the grid stays on the thin
    slices (the most of them, the finest detail) and stops within a step of the top."""
    volume, _ = one_volume(tmp_path, transition_mm=3.75)
    assert [f.code for f in volume.qc] == ["spacing-changes"]
    assert volume.array.shape[0] == 59  # z = 0 ... 145, the top slice at 146.25
    np.testing.assert_allclose(slice_z(volume)[[0, -1]], [0.0, 145.0])
    np.testing.assert_allclose(volume.array, expected_hu(volume), atol=1e-3)
    exact = [p.exact for p in volume.source_planes]
    assert exact == [True] * 20 + [False] * 20
    assert [p.slice for p in volume.source_planes][20:] == [round((51.25 + 5 * k) / 2.5) for k in range(20)]


def test_three_runs_and_a_gap_between_runs(tmp_path: Path) -> None:
    datasets = synthetic.ct_slices(16)
    zs = [0.0, 2.5, 5.0, 7.5, 12.5, 17.5, 22.5, 27.5, 37.5, 40.0, 42.5, 45.0, 47.5, 50.0, 52.5, 55.0]
    synthetic.set_z(datasets, zs[::-1])
    synthetic.z_ramp(datasets)
    (volume,) = assemble_series(synthetic.write(datasets, tmp_path)).volumes
    assert [f.code for f in volume.qc] == ["missing-slices", "spacing-changes"]
    assert "after slice 8 (10 mm)" in volume.qc[0].message
    assert volume.qc[1].message.startswith(
        "slice spacing changes from 2.5 mm (slices 1-4, thickness 2.5 mm) to 5 mm (slices 5-8, thickness 2.5 mm) "
        "to 2.5 mm (slices 9-16, thickness 2.5 mm)"
    )
    assert volume.array.shape[0] == 23 and volume.spacing[0] == pytest.approx(2.5)
    np.testing.assert_allclose(volume.array, expected_hu(volume), atol=1e-3)


@pytest.mark.parametrize(
    "steps",
    [
        [2.5] * 10,  # regular
        [3.0, 2.0, 2.5, 2.0, 2.5],  # uneven
        [2.5] * 4 + [5.0] + [2.5] * 6,  # one missing slice
        [2.5] * 4 + [5.0, 5.0] + [2.5] * 6,  # too short to be a run
        [2.5, 2.51, 2.49, 2.5, 2.5, 2.52],  # jitter
    ],
)
def test_spacing_that_does_not_change_has_no_runs(steps: list[float]) -> None:
    assert spacing_runs(np.array(steps)) == ()


def test_matches_dcm2niix_equalised_volume(tmp_path: Path) -> None:
    """dcm2niix warns that the interslice distance varies and writes an equalised copy (``_Eq_``): ours is it."""
    volume, _ = one_volume(tmp_path)
    images = dcm2niix(tmp_path / "in", tmp_path / "ref")
    (name,) = [name for name in images if "_Eq_" in name]
    reference, mine = images[name], ours(volume, tmp_path)
    assert reference.shape == mine.shape
    np.testing.assert_allclose(mine.affine, reference.affine, atol=1e-3)
    np.testing.assert_allclose(mine.get_fdata(), reference.get_fdata(), atol=0.5)
    # the copy dcm2niix left as is holds the 40 source slices on a uniform affine (which the NIfTI format forces,
    # so only its first slice is where it says): each is the slice of ours its source plane names
    (raw,) = [image for n, image in images.items() if n != name]
    assert raw.shape == (32, 32, 40)
    np.testing.assert_allclose(raw.affine @ [0, 0, 0, 1], mine.affine @ [0, 0, 0, 1], atol=1e-3)
    on_grid = [plane.slice for plane in volume.source_planes]
    np.testing.assert_array_equal(mine.get_fdata()[:, :, on_grid], raw.get_fdata())


def test_gateway_volume_writes_one_flagged_volume(tmp_path: Path) -> None:
    synthetic.write(synthetic.two_spacings(), tmp_path / "in")
    result = subprocess.run(
        [str(GATEWAY), "volume", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1 volume(s) written, 0 refused" in result.stdout
    assert "spacing-changes (resampled)" in result.stdout
    (image_path,) = (tmp_path / "out").glob("*.nii")
    assert nib.Nifti1Image.from_filename(image_path).shape == (32, 32, 60)
    sidecar = json.loads(image_path.with_suffix(".json").read_text())
    assert sidecar["resampled"] is True
    assert sidecar["qc"] == [{"code": "spacing-changes", "message": MESSAGE, "resampled": True}]
    assert len(sidecar["slices"]) == 60


def test_seg_frames_lie_on_the_source_images(tmp_path: Path) -> None:
    """A SEG drawn on the resampled grid has one frame per source image it covers, at that image's position, citing
    it alone, with the labels that lie there; no frame on the interpolated slices between the thick ones."""
    datasets = synthetic.two_spacings(thin=8, thick=6, start_mm=-15.0, size=64)  # z -15 ... 2.5, then 7.5 ... 32.5
    case = encode_cases.read_case(synthetic.write(datasets, tmp_path / "in"))
    volume = case.volume
    assert [f.code for f in volume.qc] == ["spacing-changes"] and volume.array.shape[0] == 20
    rows, columns = np.mgrid[: volume.array.shape[1], : volume.array.shape[2]]
    grid = np.stack(
        [np.stack([k + 0 * rows, rows, columns, 1 + 0 * rows], axis=-1) @ volume.affine.T for k in range(20)]
    )[..., :3]
    labelmap = encode_cases.phantom_labels(grid)
    manifest = encode_cases.labelmap_manifest()
    result = encode_cases.result_of(manifest, volume, labelmap=labelmap, masks={1: labelmap == 1, 3: labelmap == 3})
    item = encode_result(result, case.sources, series_number=61, gateway_version=encode_cases.GATEWAY_VERSION)[0]
    cited = encode_cases.assert_frames_on_their_sources(item.dataset, case.sources)
    covered = {str(ds.SOPInstanceUID) for ds in datasets if abs(float(ds.ImagePositionPatient[2])) < 12.0}
    assert {str(image.SOPInstanceUID) for image in cited} == covered  # BODY reaches 12 mm from z = 0
    assert len(covered) == 7  # z = -10 ... 2.5 (thin), 7.5 (thick)
    seg = hd.seg.Segmentation.from_dataset(item.dataset)
    for uid in sorted(covered):
        image = case.sources[uid]
        pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2], combine_segments=True)[0]
        written = np.where(pixels == 2, 3, pixels)  # segment 2 is label 3
        expected = encode_cases.phantom_labels(encode_cases.pixel_positions(image))
        decided = ~encode_cases.blurred_labels(image, 1e-3)
        np.testing.assert_array_equal(written[decided], expected[decided])
    path = write_objects([item], tmp_path / "out")[0]
    assert encode_cases.dciodvfy(path).errors == []


def test_gantry_tilt_and_a_spacing_change_together(tmp_path: Path) -> None:
    datasets = synthetic.two_spacings()
    synthetic.tilt(datasets, 10.0)
    (volume,) = assemble_series(synthetic.write(datasets, tmp_path)).volumes
    assert [f.code for f in volume.qc] == ["spacing-changes", "gantry-tilt"]
    assert volume.array.shape[0] == 60 and volume.spacing[0] == pytest.approx(2.5)
    assert [p.slice for p in volume.source_planes] == [*range(20), *range(21, 60, 2)]
    # each source plane is shifted by its own drift (y = z tan 10 degrees), in rows of 11.25 mm
    shifts = [p.shift[0] for p in volume.source_planes]
    heights = [float(ds.ImagePositionPatient[2]) for ds in datasets[::-1]]
    np.testing.assert_allclose(shifts, [z * np.tan(np.radians(10.0)) / 11.25 for z in heights], atol=1e-4)
    # values do not vary along the rows, so the shift leaves them as they were inside the image
    inside = volume.array[:, 5:-5, :]
    np.testing.assert_allclose(inside, expected_hu(volume)[:, 5:-5, :], atol=1e-3)
