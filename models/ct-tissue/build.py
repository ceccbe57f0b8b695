"""Build ``model.onnx``: a rule-based CT tissue segmenter (no training), exported from a small torch module.

Run from the project root: ``.venv/bin/python models/ct-tissue/build.py``. The output is deterministic (no
weights, no randomness): the graph is a fixed sequence of pooling, thresholds and cumulative sums.

Input ``hu`` ``[batch, 1, slice, row, column]`` in Hounsfield units; output ``tissue`` ``[batch, 5, slice, row,
column]`` of 0/1 floats, one channel per (overlapping) segment: body, air inside the body, fat, soft tissue, bone.
Every operation works within one axial slice, so the model can be run on any stack of slices.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
CHANNELS = ("body", "air", "fat", "soft_tissue", "bone")

BODY_HU = -500.0  # smoothed HU above this is patient (or table, blanket, ...): the outline threshold
AIR_HU = -500.0  # inside the body, smoothed HU below this is gas (lung parenchyma, bowel gas, airways)
FAT_HU = (-190.0, -30.0)  # adipose tissue, inclusive
SOFT_HU = (-30.0, 150.0)  # soft tissue: above the fat range up to and including 150
BONE_HU = 200.0  # bone (cortical and most trabecular), inclusive
CORE = 21  # in-plane erosion window (pixels): what survives it is the core of the patient, not table or holder
REACH = 48  # how far (pixels) the core grows back through dense pixels: the outline, ears, fingers


def _smooth(hu: torch.Tensor) -> torch.Tensor:
    """3x3 mean (edges averaged over the pixels that exist), to tame noise before thresholding."""
    return F.avg_pool2d(hu, 3, stride=1, padding=1, count_include_pad=False)


def _dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary dilation with a ``size`` x ``size`` square, as two separable max-pools."""
    pad = size // 2
    rows = F.max_pool2d(mask, (1, size), stride=1, padding=(0, pad))
    return F.max_pool2d(rows, (size, 1), stride=1, padding=(pad, 0))


def _erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary erosion with a ``size`` x ``size`` square (pixels beyond the image count as set)."""
    return 1.0 - _dilate(1.0 - mask, size)


def _reconstruct(seed: torch.Tensor, mask: torch.Tensor, reach: int) -> torch.Tensor:
    """The part of ``mask`` reachable from ``seed`` within about ``reach`` pixels, moving through ``mask``.

    Each step is a 5x5 dilation kept inside ``mask`` (2 pixels a step: half the steps of a 3x3 one, and a
    5x5 max-pool costs little more than a 3x3 one).
    """
    for _ in range((reach + 1) // 2):
        seed = F.max_pool2d(seed, 5, stride=1, padding=2) * mask
    return seed


def _between(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Where ``mask`` has a set pixel at or before *and* at or after each position along ``dim``.

    The count before comes from a cumulative sum, the count after from the total minus that sum (plus the pixel
    itself): two ``CumSum``/``Slice`` nodes in ONNX, with no loop.
    """
    before = torch.cumsum(mask, dim)
    total = before.narrow(dim, before.shape[dim] - 1, 1)
    after = total - before + mask
    return ((before > 0.5) & (after > 0.5)).to(mask.dtype)


def _classes(hu: torch.Tensor) -> torch.Tensor:
    """The five channels for a stack of slices ``[slices, 1, row, column]``."""
    smooth = _smooth(hu)
    dense = (smooth > BODY_HU).to(hu.dtype)
    patient = _reconstruct(_erode(dense, CORE), dense, REACH)
    body = _between(patient, 3) * _between(patient, 2)
    air = body * (smooth < AIR_HU).to(hu.dtype)
    fat = body * ((smooth >= FAT_HU[0]) & (smooth <= FAT_HU[1])).to(hu.dtype)
    soft = body * ((smooth > SOFT_HU[0]) & (smooth <= SOFT_HU[1])).to(hu.dtype)
    bone = body * (smooth >= BONE_HU).to(hu.dtype)
    return torch.cat([body, air, fat, soft, bone], dim=1)


class CTTissue(nn.Module):
    """Body outline and four HU classes inside it, slice by axial slice.

    Body: smoothed HU above ``BODY_HU`` ("dense"); its core is what survives an erosion with a ``CORE`` square
    (the patient's trunk, head and limbs, but not the table's shells, a head holder's walls, tubes, blankets or
    noise specks); the core is grown back through dense pixels for ``REACH`` pixels (a bounded geodesic
    reconstruction: the outline, ears and fingers come back, separate objects do not), then filled: a pixel is
    inside when the grown mask has a pixel on both sides of it along its row *and* along its column. The fill
    closes the lungs and bowel gas into the body; the AND keeps the air between the arms and the trunk (open above
    and below) and the air around the patient outside. Tissue classes threshold the smoothed HU inside the body.
    """

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        n, _, s, r, c = hu.shape
        planes = hu.permute(0, 2, 1, 3, 4).reshape(n * s, 1, r, c)
        out = _classes(planes)
        return out.reshape(n, s, len(CHANNELS), r, c).permute(0, 2, 1, 3, 4)


def export(path: Path) -> None:
    """Export :class:`CTTissue` to ONNX (opset 17, dynamic batch and spatial axes) at ``path``."""
    example = torch.full((1, 1, 2, 64, 64), -1000.0)
    example[:, :, :, 16:48, 16:48] = 40.0
    axes = {0: "batch", 2: "slices", 3: "rows", 4: "columns"}
    torch.onnx.export(
        CTTissue().eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["hu"],
        output_names=["tissue"],
        dynamic_axes={"hu": axes, "tissue": axes},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "model.onnx")
    args = parser.parse_args()
    export(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
