"""Build ``model.pt``: an apparent diffusion coefficient (ADC) map from diffusion-weighted MR, as TorchScript.

Run from the project root: ``.venv/bin/python models/adc-dwi/build.py``. No training: the module is a per-voxel
log-linear least-squares fit, the same every time it is built.

``forward(signal, b_values)``: ``signal`` ``[batch, channels, slice, row, column]``, one channel per distinct
b-value in s/mm2 (ascending, the lowest usually b = 0, each the mean over gradient directions), ``b_values``
``[batch, channels]``. Returns ``[batch, 1, slice, row, column]``: ADC in um2/s (10^-6 mm2/s), 0 where the
signal is too low to fit.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent

MASK_FRACTION = 0.1  # fit where the lowest-b signal is above this fraction of its robust maximum
ROBUST_QUANTILE = 0.99  # the robust maximum: this quantile of the lowest-b signal over the volume
MAX_ADC = 5000.0  # um2/s; free water at body temperature is about 3000


class ADCFit(nn.Module):
    """Per-voxel fit of ``ln S = ln S0 - b * ADC`` over all channels (ordinary least squares in ``b``).

    The slope is ``sum((b - mean b) * (ln S - mean ln S)) / sum((b - mean b)^2)``; ADC is minus the slope, in
    um2/s, clamped to ``[0, MAX_ADC]``. A voxel is fitted only where every channel is positive and the lowest-b
    channel exceeds ``MASK_FRACTION`` of its ``ROBUST_QUANTILE`` quantile over the volume (background, air and
    noise are 0). With fewer than two distinct b-values there is nothing to fit and the map is 0.

    Parameters
    ----------
    mask_fraction, robust_quantile, max_adc
        The mask and clamp settings (defaults: the module constants).
    """

    def __init__(
        self, mask_fraction: float = MASK_FRACTION, robust_quantile: float = ROBUST_QUANTILE, max_adc: float = MAX_ADC
    ) -> None:
        super().__init__()
        self.mask_fraction = mask_fraction
        self.robust_quantile = robust_quantile
        self.max_adc = max_adc

    def forward(self, signal: torch.Tensor, b_values: torch.Tensor) -> torch.Tensor:
        signal = signal.float()
        b = b_values.float().reshape(b_values.shape[0], b_values.shape[1], 1, 1, 1)
        centred = b - b.mean(dim=1, keepdim=True)
        spread = (centred * centred).sum(dim=1, keepdim=True)
        positive = (signal > 0).all(dim=1, keepdim=True)
        log_signal = torch.log(torch.where(signal > 0, signal, torch.ones_like(signal)))
        log_centred = log_signal - log_signal.mean(dim=1, keepdim=True)
        slope = (centred * log_centred).sum(dim=1, keepdim=True) / torch.clamp(spread, min=1e-12)
        adc = torch.clamp(-slope * 1.0e6, min=0.0, max=self.max_adc)  # mm2/s -> um2/s
        bright = _bright(signal, b_values, self.mask_fraction, self.robust_quantile)
        fitted = positive & bright & (spread > 0)
        return torch.where(fitted, adc, torch.zeros_like(adc))


def _bright(signal: torch.Tensor, b_values: torch.Tensor, fraction: float, quantile: float) -> torch.Tensor:
    """``[batch, 1, ...]``: where the lowest-b channel is above ``fraction`` of its ``quantile`` quantile."""
    lowest = torch.argmin(b_values, dim=1)
    masks = []
    for item in range(signal.shape[0]):
        reference = signal[item, lowest[item]]
        flat = reference.reshape(-1)
        k = max(1, min(flat.numel(), int(quantile * flat.numel() + 0.5)))  # the nearest rank
        robust = torch.kthvalue(flat, k).values
        masks.append((reference > fraction * robust).unsqueeze(0))
    return torch.stack(masks, dim=0)


def script() -> torch.jit.ScriptModule:
    """:class:`ADCFit` compiled with TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        scripted: torch.jit.ScriptModule = torch.jit.script(ADCFit().eval())
    return scripted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "model.pt")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(script(), str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
