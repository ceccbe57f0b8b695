"""models/adc-dwi: the TorchScript fit against known ADC values and against an independent numpy fit of real DWI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import Volume

from model_scripts import MODELS, jit_load

DWI = Path("dcm_qa_decubitus/In/HFS/4_ep2d_diff_mddw_20_p2")
Array = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def model() -> Callable[[Array, Array], Array]:
    module = jit_load(MODELS / "adc-dwi" / "model.pt")

    def run(signal: Array, b_values: Array) -> Array:
        with torch.inference_mode():
            out: Array = module(torch.from_numpy(signal), torch.from_numpy(b_values)).numpy()
        return out

    return run


def test_recovers_a_known_adc(model: Callable[[Array, Array], Array]) -> None:
    adc = np.linspace(200.0, 3000.0, 4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6)  # um2/s
    b = np.array([0.0, 50.0, 500.0, 1000.0])
    signal = 1000.0 * np.exp(-b[:, None, None, None] * adc[None] * 1e-6)
    out = model(signal[None].astype(np.float32), b[None].astype(np.float32))
    assert out.shape == (1, 1, 4, 5, 6)
    np.testing.assert_allclose(out[0, 0], adc, rtol=1e-4, atol=0.05)


def test_low_and_non_positive_signal_is_not_fitted(model: Callable[[Array, Array], Array]) -> None:
    b = np.array([[0.0, 1000.0]], dtype=np.float32)
    signal = np.full((1, 2, 1, 4, 100), 0.0, dtype=np.float32)
    signal[0, 0], signal[0, 1] = 1000.0, 400.0  # ADC = ln(2.5) / 1000 mm2/s = 916 um2/s
    signal[0, :, 0, 0, :3] = [[30.0], [10.0]]  # below 10 % of the robust maximum
    signal[0, 1, 0, 1, 0] = 0.0  # a zero at high b
    signal[0, 1, 0, 1, 1] = 1500.0  # signal rising with b: negative ADC, clamped
    out = model(signal, b)[0, 0, 0]
    assert np.all(out[0, :3] == 0.0)
    assert out[1, 0] == 0.0 and out[1, 1] == 0.0
    np.testing.assert_allclose(out[2:], 1e3 * np.log(2.5), rtol=1e-5)


def test_two_batch_items_with_their_own_b_values(model: Callable[[Array, Array], Array]) -> None:
    b = np.array([[0.0, 800.0], [0.0, 1500.0]], dtype=np.float32)
    signal = np.ones((2, 2, 2, 3, 3), dtype=np.float32) * 500.0
    signal[:, 1] *= np.exp(-b[:, 1] * 1e-3)[:, None, None, None]  # ADC 1e-3 mm2/s everywhere
    np.testing.assert_allclose(model(signal, b), 1000.0, rtol=1e-4)


def _dwi(shared_data: Path) -> Volume:
    folder = shared_data / DWI
    if not folder.is_dir():
        pytest.skip(f"{DWI} not in the shared data")
    result = assemble_series(sorted(folder.iterdir()))
    assert len(result.volumes) == 1
    return result.volumes[0]


def _channels(volume: Volume) -> tuple[Array, Array]:
    """Distinct b-values ascending, each channel the mean over its gradient directions (as the runtime does)."""
    groups: dict[float, list[int]] = {}
    for index, (kind, (b_value, _)) in enumerate(volume.dimension_4):
        assert kind == "Diffusion"
        groups.setdefault(float(b_value), []).append(index)
    b_values = sorted(groups)
    signal = np.stack([volume.array[groups[b]].mean(axis=0) for b in b_values]).astype(np.float32)
    return signal, np.array(b_values, dtype=np.float32)


def _numpy_fit(signal: Array, b_values: Array) -> npt.NDArray[np.float64]:
    """Least squares of ln S on [1, -b] for every voxel (numpy lstsq), with the model's mask and clamp."""
    design = np.stack([np.ones_like(b_values), -b_values], axis=1).astype(np.float64)
    logs = np.log(np.where(signal > 0, signal, 1.0).astype(np.float64)).reshape(len(b_values), -1)
    coefficients = np.linalg.lstsq(design, logs, rcond=None)[0]
    adc = np.clip(coefficients[1].reshape(signal.shape[1:]) * 1e6, 0.0, 5000.0)
    lowest = signal[int(np.argmin(b_values))]
    flat = np.sort(lowest.ravel())
    robust = flat[max(1, int(0.99 * flat.size + 0.5)) - 1]
    mask = (lowest > 0.1 * robust) & np.all(signal > 0, axis=0)
    return np.where(mask, adc, 0.0)


def test_real_dwi_matches_a_numpy_fit(shared_data: Path, model: Callable[[Array, Array], Array]) -> None:
    volume = _dwi(shared_data)
    signal, b_values = _channels(volume)
    assert len(b_values) >= 2 and b_values[0] == 0.0
    out = model(signal[None], b_values[None])[0, 0]
    expected = _numpy_fit(signal, b_values)
    assert out.shape == volume.array.shape[1:]
    assert np.array_equal(out > 0, expected > 0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=0.5)
    fitted = out[out > 0]
    assert fitted.size > 0.1 * out.size
    assert 500.0 < float(np.median(fitted)) < 1500.0  # brain parenchyma
    assert 2000.0 < float(np.percentile(fitted, 99)) < 3600.0  # CSF, about 3000
