"""The three example models end to end through the gateway: DICOM files -> assembly -> InferenceRuntime."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import Volume
from gateway.infer.results import ModelResult
from gateway.infer.runtime import InferenceRuntime
from gateway.registry.manifest import load_manifest
from gateway.synth.ct import SliceRenderer, SynthCT, Tissue, nodule_mask, write_synthetic_ct

from model_scripts import MODELS, jit_load

DWI = Path("dcm_qa_decubitus/In/HFS/4_ep2d_diff_mddw_20_p2")
Run = Callable[[str, Volume], ModelResult]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    runtime = InferenceRuntime(device="cpu")

    def run_model(name: str, volume: Volume) -> ModelResult:
        folder = MODELS / name
        manifest = load_manifest(folder)
        sha256 = hashlib.sha256((folder / manifest.weights).read_bytes()).hexdigest()
        return runtime.run(manifest, folder, sha256, volume)

    yield run_model
    runtime.close()


def synthetic_ct(folder: Path, slices: int, size: int, seed: int, nodules: int) -> tuple[SynthCT, Volume]:
    desc = write_synthetic_ct(folder, slices, rows=size, columns=size, seed=seed, n_nodules=nodules)
    result = assemble_series(sorted(folder.iterdir()))
    assert len(result.volumes) == 1
    return desc, result.volumes[0]


def on_volume(truth: npt.NDArray[np.bool_], volume: Volume) -> npt.NDArray[np.bool_]:
    """A truth array in the writer's slice order (head to feet) in the assembled volume's slice order."""
    return truth[::-1] if volume.affine[2, 0] > 0 else truth


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def test_ct_tissue(tmp_path: Path, run: Run) -> None:
    desc, volume = synthetic_ct(tmp_path, 6, 512, seed=7, nodules=0)
    result = run("ct-tissue", volume)
    renderer = SliceRenderer(desc.geometry)
    labels = np.stack([renderer.labels(k) for k in range(desc.shape[0])])
    truth = {
        0: labels != Tissue.AIR,
        1: labels == Tissue.LUNG,
        2: labels == Tissue.FAT,
        3: np.isin(labels, [Tissue.SOFT, Tissue.HEART, Tissue.AORTA, Tissue.CSF]),
        4: labels == Tissue.BONE,
    }
    assert sorted(result.masks) == [0, 1, 2, 3, 4]
    for value, mask in result.masks.items():
        assert mask.shape == volume.array.shape
        assert dice(mask, on_volume(truth[value], volume)) > 0.9, value
    by_value = {m.value: m for m in result.measurements}
    assert -900.0 < by_value[1].values["mean"] < -800.0  # lung, HU
    assert by_value[4].values["mean"] > 300.0  # bone


def test_ct_tissue_on_a_matrix_smaller_than_its_window(tmp_path: Path, run: Run) -> None:
    _, volume = synthetic_ct(tmp_path, 4, 256, seed=1, nodules=0)
    body = run("ct-tissue", volume).masks[0]
    # the phantom's ellipse, 340 x 240 mm in a 360 mm field of view: the sliding window pads the 256 x 256 slices to
    # its 512 x 512 patch with the manifest's pad value (air), which must not close the outline around the image
    assert 0.3 < body.mean() < 0.7


def test_ct_nodule_unet(tmp_path: Path, run: Run) -> None:
    desc, volume = synthetic_ct(tmp_path, 40, 256, seed=3002, nodules=3)
    result = run("ct-nodule-unet", volume)
    truth = on_volume(nodule_mask(desc.shape, desc.pixel_spacing, desc.slice_spacing, desc.nodules), volume)
    assert result.labelmap is not None and result.labelmap.shape == truth.shape
    assert dice(result.labelmap == 1, truth) >= 0.8
    (finding,) = result.classifications
    assert finding.name == "Pulmonary nodule" and finding.probability > 0.9
    (nodules,) = result.measurements
    expected_ml = sum(n.volume_ml for n in desc.nodules)
    assert nodules.values["volume"] == pytest.approx(expected_ml, rel=0.25)
    assert 0.0 < nodules.values["mean"] < 60.0  # nodule HU 10-50


def test_adc_dwi(shared_data: Path, run: Run) -> None:
    folder = shared_data / DWI
    if not folder.is_dir():
        pytest.skip(f"{DWI} not in the shared data")
    (volume,) = assemble_series(sorted(folder.iterdir())).volumes
    result = run("adc-dwi", volume)
    adc = result.maps["ADC"]
    assert adc.shape == volume.array.shape[1:]
    b0 = volume.array[0]
    b1000 = volume.array[1:].mean(axis=0)
    module = jit_load(MODELS / "adc-dwi" / "model.pt")
    signal = torch.from_numpy(np.stack([b0, b1000])[None].astype(np.float32))
    expected = module(signal, torch.tensor([[0.0, 1000.0]])).numpy()[0, 0]
    np.testing.assert_allclose(adc, expected, atol=1e-3)
    assert 500.0 < float(np.median(adc[adc > 0])) < 1500.0
