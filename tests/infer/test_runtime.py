"""A volume through a model end to end: label maps, masks, maps, measurements, classifications, failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import (
    ADC,
    CODE,
    Channels,
    LabelValues,
    NaNNet,
    Threshold,
    at_once,
    cuda_or_skip,
    make_volume,
    save_onnx,
    save_torchscript,
    segment,
    torchscript_package,
    write_package,
)

from gateway.errors import InferenceError, ModelError
from gateway.infer.results import ModelResult
from gateway.infer.runtime import InferenceRuntime
from gateway.infer.series import result_summary

SPACING = (2.5, 0.8, 0.8)
RADIUS = 7.0
WINDOW = {"mode": "window", "window": [-1000, 1000]}
MIDWAY = {"mode": "window", "window": [-1405, 595]}  # 0.5 half way between air (-850) and tissue (40)
NODULE = {"name": "Nodule", "finding": CODE, "label": 1, "min_volume_ml": 0.5}


@pytest.fixture
def runtime() -> Iterator[InferenceRuntime]:
    rt = InferenceRuntime("cpu")
    yield rt
    rt.close()


def axial(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]]) * np.array(spacing)
    affine[:3, 3] = (-20.0, -25.0, 40.0)
    return affine


def sphere_volume(shape: tuple[int, int, int] = (16, 48, 52), centre: Any = (7.3, 22.1, 27.6)) -> Any:
    """Air (-850 HU) with a 7 mm sphere of soft tissue (40 HU)."""
    index = np.indices(shape).astype(np.float64)
    distance = np.sqrt(sum(((index[i] - centre[i]) * SPACING[i]) ** 2 for i in range(3)))
    array = np.where(distance <= RADIUS, 40.0, -850.0).astype(np.float32)
    return make_volume(array, axial()), distance <= RADIUS


def threshold_package(tmp_path: Path, backend: str = "torchscript", name: str = "tiny", **inference: Any) -> Any:
    weights = "model.pt" if backend == "torchscript" else "model.onnx"
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_torchscript(Threshold(), tmp_path / "model.pt")
    save_onnx(Threshold(), tmp_path / "model.onnx")
    labels = [segment(1, "Nodule", ["volume", "mean", "max"])]
    return write_package(
        tmp_path,
        backend,
        weights,
        preprocess={"orientation": "IPL", "spacing_mm": [1.5, 1.5, 1.5], "intensity": MIDWAY},
        inference=inference,
        outputs={"segmentation": {"labels": labels}, "classifications": [NODULE]},
        name=name,
    )


def test_labelmap_measurements_and_classification(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = threshold_package(tmp_path)
    volume, truth = sphere_volume()
    result = runtime.run(manifest, tmp_path, "ab" * 32, volume)
    assert isinstance(result, ModelResult)
    assert (result.name, result.version, result.sha256, result.volume) == ("tiny", "1.0", "ab" * 32, volume)
    assert result.labelmap is not None and result.labelmap.dtype == np.uint8
    assert result.labelmap.shape == volume.array.shape
    np.testing.assert_array_equal(result.masks[1], result.labelmap == 1)
    assert np.mean(result.masks[1] == truth) > 0.995
    (measured,) = result.measurements
    true_ml = 4 / 3 * np.pi * RADIUS**3 / 1000
    assert measured.values["volume"] == pytest.approx(true_ml, rel=0.08)
    assert measured.values["max"] == 40.0
    (finding,) = result.classifications
    assert finding.name == "Nodule" and finding.probability > 0.99
    assert finding.volume_ml == pytest.approx(measured.values["volume"])
    assert set(result.timings) == {"prepare_s", "infer_s", "forward_s", "restore_s", "measure_s"}
    assert 0 < result.timings["forward_s"] <= result.timings["infer_s"]  # the forward passes within infer_s
    assert any("resampled from 2.5x0.8x0.8 to" in note for note in result.notes)


def test_small_segments_are_not_classified(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = threshold_package(tmp_path)
    volume = make_volume(np.full((8, 16, 16), -850.0, np.float32), axial())
    result = runtime.run(manifest, tmp_path, "0" * 64, volume)
    assert result.classifications == ()
    assert result.measurements[0].values == {"volume": 0.0}


def run_concurrently(runtime: InferenceRuntime, manifest: Any, folder: Path, volumes: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(volumes)

    def run(index: int) -> None:
        results[index] = runtime.run(manifest, folder, "c" * 64, volumes[index])

    at_once(run, len(volumes), timeout_s=120)
    return results


def test_sliding_window_jobs_share_forward_passes(tmp_path: Path, runtime: InferenceRuntime) -> None:
    whole = threshold_package(tmp_path / "whole")
    patched = threshold_package(
        tmp_path / "patched", "onnx", "tiny-patched", patch_size=[32, 32, 16], batch_size=4, max_wait_ms=300
    )
    volumes = [sphere_volume(centre=c)[0] for c in ((7.3, 22.1, 27.6), (8.0, 25.0, 20.0), (6.5, 20.0, 30.0))]
    results = run_concurrently(runtime, patched, tmp_path / "patched", volumes)
    for volume, result in zip(volumes, results, strict=True):
        expected = runtime.run(whole, tmp_path / "whole", "w" * 64, volume)
        assert np.mean(result.labelmap == expected.labelmap) > 0.999
    stats = runtime.stats()["tiny-patched@1.0"]
    assert stats.forward_passes < stats.requests  # patches of concurrent jobs shared forward passes
    assert stats.items == 6  # two patches per job (27x26x28 voxels on the model grid)
    assert stats.items_per_pass > 2  # more than one job's patches per pass


def test_overlapping_channels(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = torchscript_package(
        tmp_path,
        Channels(),
        preprocess={"intensity": WINDOW},
        outputs={
            "segmentation": {
                "kind": "channels",
                "activation": "sigmoid",
                "labels": [segment(0, "Body", ["volume"]), segment(1, "Dense", ["volume", "mean"])],
            }
        },
    )
    array = np.full((6, 10, 10), -1000.0, np.float32)
    array[1:5, 2:8, 2:8] = 0.0
    array[2:4, 4:6, 4:6] = 1000.0
    result = runtime.run(manifest, tmp_path, "d" * 64, make_volume(array))
    assert result.labelmap is None
    np.testing.assert_array_equal(result.masks[0], array >= 0)
    np.testing.assert_array_equal(result.masks[1], array == 1000)
    assert result.measurements[1].values == {"volume": pytest.approx(0.008), "mean": 1000.0}
    assert result.probabilities[1] > 0.99


def test_single_channel_label_values(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = torchscript_package(
        tmp_path,
        LabelValues(),
        preprocess={"intensity": MIDWAY, "spacing_mm": [1.0, 1.0, 1.0]},
        outputs={"segmentation": {"activation": "none", "labels": [segment(3, "Three")]}},
    )
    volume, truth = sphere_volume()
    result = runtime.run(manifest, tmp_path, "e" * 64, volume)
    assert result.labelmap is not None
    assert set(np.unique(result.labelmap)) == {0, 3}
    assert np.mean((result.labelmap == 3) == truth) > 0.99
    assert result.probabilities == {3: 1.0}


def adc_volume() -> tuple[Any, np.ndarray]:
    """Three b-values (two directions each above 0); ADC grows along the columns."""
    adc = np.broadcast_to(np.linspace(0.5, 3.0, 12, dtype=np.float32), (4, 8, 12))  # 10^-3 mm2/s
    entries, volumes = [], []
    for b, gradient in ((0.0, None), (500.0, (1, 0, 0)), (500.0, (0, 1, 0)), (1000.0, (1, 0, 0)), (1000.0, (0, 1, 0))):
        entries.append(("Diffusion", (b, gradient)))
        volumes.append(800.0 * np.exp(-b * adc * 1e-3))
    return make_volume(np.stack(volumes).astype(np.float32), modality="MR", dimension_4=tuple(entries)), adc


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_diffusion_parametric_map(tmp_path: Path, runtime: InferenceRuntime, backend: str) -> None:
    save_torchscript(ADC(), tmp_path / "model.pt")
    save_onnx(ADC(), tmp_path / "model.onnx", channels=3, b_values=True)
    units = {"value": "um2/s", "scheme": "UCUM", "meaning": "um2/s"}
    manifest = write_package(
        tmp_path,
        backend,
        "model.pt" if backend == "torchscript" else "model.onnx",
        select={"diffusion": True},
        inference={"input_channels": 3},
        outputs={"parametric_maps": [{"name": "ADC", "quantity": CODE, "units": units}]},
    )
    volume, adc = adc_volume()
    result = runtime.run(manifest, tmp_path, "f" * 64, volume)
    assert result.maps["ADC"].dtype == np.float32 and result.maps["ADC"].shape == (4, 8, 12)
    np.testing.assert_allclose(result.maps["ADC"], adc, rtol=1e-4)
    assert result.measurements == () and result.labelmap is None


def test_nan_output_and_wrong_channel_count_are_inference_errors(tmp_path: Path, runtime: InferenceRuntime) -> None:
    volume, _ = sphere_volume()
    nan = torchscript_package(tmp_path / "nan", NaNNet())
    with pytest.raises(InferenceError, match="NaN or infinite"):
        runtime.run(nan, tmp_path / "nan", "1" * 64, volume)
    labels = [segment(1, "One"), segment(2, "Two")]
    few = torchscript_package(tmp_path / "few", Threshold(), outputs={"segmentation": {"labels": labels}})
    with pytest.raises(InferenceError, match=r"2 channel\(s\); the manifest's outputs need 3"):
        runtime.run(few, tmp_path / "few", "2" * 64, volume)


def test_models_are_loaded_once_and_unloaded(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = threshold_package(tmp_path)
    volume, _ = sphere_volume()
    runtime.run(manifest, tmp_path, "a" * 64, volume)
    (tmp_path / "model.pt").unlink()  # loaded already: not read again
    runtime.run(manifest, tmp_path, "a" * 64, volume)
    assert runtime.stats()["tiny@1.0"].requests == 2
    runtime.unload("tiny", "1.0")
    assert runtime.stats() == {}
    with pytest.raises(ModelError, match=r"model\.pt not found"):
        runtime.run(manifest, tmp_path, "a" * 64, volume)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_runtime_without_cuda_is_refused() -> None:
    with pytest.raises(ModelError, match="no CUDA device"):
        InferenceRuntime("cuda")


@pytest.mark.gpu
def test_cuda_runtime_matches_cpu(tmp_path: Path) -> None:
    device = cuda_or_skip()
    manifest = threshold_package(tmp_path, patch_size=[16, 16, 16], batch_size=4)
    volume, _ = sphere_volume()
    results = []
    for where in ("cpu", device):
        runtime = InferenceRuntime(where)
        try:
            results.append(runtime.run(manifest, tmp_path, "g" * 64, volume))
        finally:
            runtime.close()
    cpu, gpu = results
    assert cpu.labelmap is not None and gpu.labelmap is not None
    assert np.mean(cpu.labelmap == gpu.labelmap) > 0.9999
    assert gpu.probabilities[1] == pytest.approx(cpu.probabilities[1], abs=1e-4)


def lesion_label(value: int, name: str, min_volume_ml: float = 0.0) -> dict[str, Any]:
    return {**segment(value, name, ["volume", "mean"]), "lesions": True, "min_volume_ml": min_volume_ml}


def two_spheres() -> tuple[Any, list[tuple[tuple[float, float, float], float]]]:
    """Air with two soft-tissue spheres (7 and 4.5 mm) and a 1.5 mm speck."""
    shape = (20, 56, 64)
    spheres = [((12.3, 20.1, 40.6), 4.5), ((7.2, 30.4, 16.8), 7.0), ((16.0, 48.0, 56.0), 1.5)]
    index = np.indices(shape).astype(np.float64)
    inside = np.zeros(shape, dtype=np.bool_)
    for centre, radius in spheres:
        inside |= np.sqrt(sum(((index[i] - centre[i]) * SPACING[i]) ** 2 for i in range(3))) <= radius
    return make_volume(np.where(inside, 40.0, -850.0).astype(np.float32), axial()), spheres


def test_lesions_of_a_segment_declared_lesions(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = torchscript_package(
        tmp_path,
        Threshold(),
        preprocess={"orientation": "IPL", "spacing_mm": [1.5, 1.5, 1.5], "intensity": MIDWAY},
        outputs={"segmentation": {"labels": [lesion_label(1, "Nodule", min_volume_ml=0.05)]}},
    )
    volume, spheres = two_spheres()
    result = runtime.run(manifest, tmp_path, "h" * 64, volume)
    assert list(result.lesions) == [1]
    found = result.lesions[1]
    assert (found.name, found.min_volume_ml) == ("Nodule", 0.05)
    assert [lesion.number for lesion in found.lesions] == [1, 2]
    for lesion, (centre, radius) in zip(found.lesions, [spheres[1], spheres[0]], strict=True):
        assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * radius**3 / 1000, rel=0.15)
        assert lesion.values["long_axis"] == pytest.approx(2 * radius, abs=2.0)
        inside = np.stack([lesion.mask_on(k, volume.array.shape[1:]) for k in range(volume.array.shape[0])])
        assert lesion.values["mean"] == pytest.approx(float(volume.array[inside].mean()))
        assert lesion.probability is not None and lesion.probability > 0.99  # the argmax's winning probability
        np.testing.assert_allclose(lesion.centre_index, centre, atol=0.5)
    assert found.left_out == 1  # the speck
    whole = result.measurements[0].values["volume"]  # the whole segment, speck included
    assert 0.0 < whole - sum(lesion.volume_ml for lesion in found.lesions) < 0.05
    summary = result_summary(result)["lesions"]
    assert summary == [found.as_dict()] and summary[0]["lesions"][0]["number"] == 1


def test_lesions_of_label_values_have_no_probability(tmp_path: Path, runtime: InferenceRuntime) -> None:
    manifest = torchscript_package(
        tmp_path,
        LabelValues(),
        preprocess={"intensity": MIDWAY, "spacing_mm": [1.0, 1.0, 1.0]},
        outputs={"segmentation": {"activation": "none", "labels": [lesion_label(3, "Three")]}},
    )
    volume, _ = two_spheres()
    found = runtime.run(manifest, tmp_path, "i" * 64, volume).lesions[3]
    assert len(found.lesions) >= 2 and all(lesion.probability is None for lesion in found.lesions)


def test_lesions_of_overlapping_channels_use_their_own_probability(tmp_path: Path, runtime: InferenceRuntime) -> None:
    labels = [lesion_label(0, "Body"), lesion_label(1, "Dense")]
    manifest = torchscript_package(
        tmp_path,
        Channels(),
        preprocess={"intensity": WINDOW},
        outputs={"segmentation": {"kind": "channels", "activation": "sigmoid", "labels": labels}},
    )
    array = np.full((6, 12, 12), -1000.0, np.float32)
    array[1:5, 2:10, 2:10] = 0.0
    array[2:4, 3:5, 3:5] = 1000.0
    array[2:4, 7:9, 7:9] = 500.0
    result = runtime.run(manifest, tmp_path, "j" * 64, make_volume(array))
    (body,) = result.lesions[0].lesions
    assert body.voxels == 4 * 8 * 8 and body.probability == pytest.approx(1.0)
    dense = result.lesions[1].lesions
    assert [lesion.voxels for lesion in dense] == [8, 8]
    probabilities = sorted(float(lesion.probability or 0.0) for lesion in dense)
    assert probabilities == pytest.approx([1 / (1 + np.exp(-50 * 0.05)), 1 / (1 + np.exp(-50 * 0.3))], abs=1e-4)
