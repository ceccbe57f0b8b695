"""Train ct-nodule-unet on synthetic phantoms generated on the fly; write ``model.pt`` (TorchScript) and ``model.onnx``.

Run from the project root: ``.venv/bin/python models/ct-nodule-unet/train.py`` (10-15 minutes on 2 CPU
threads). Deterministic: phantom seeds 1000 upwards, fixed torch and numpy seeds, one thread pool of 2.

Data: a pool of phantoms on the model grid (1.5 mm, HU window from ``model.yaml``), refreshed as training goes.
Half are rendered straight on the model grid; half on a random scanner grid (256-512 pixels over a 350-420 mm
field of view, 1-5 mm slices) and resampled to the model grid as the gateway does, so the network sees the
interpolation blur and noise it will get at inference. Targets are soft: the fraction of each voxel inside a
nodule. Patches of 32 x 64 x 64 voxels, 60 % centred near a nodule, random flips and small intensity jitter, a
quarter cut to a thin slab padded with air (a series thinner than the inference patch is padded so); loss soft
cross-entropy plus soft Dice; Adam with a cosine learning rate.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.networks.nets.unet import UNet

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from nodule_data import (  # noqa: E402  (the folder is not a package)
    Shape,
    Spacing,
    make_phantom,
    manifest,
    model_grid,
    nodule_index,
    occupancy,
    resize,
    target_spacing,
    window,
)

TRAIN_SEED0 = 1000
PATCH: Shape = (32, 64, 64)
BATCH = 4
POOL = 10  # phantoms held at once
REFRESH = 40  # steps between replacing the oldest phantom
POSITIVE = 0.6  # fraction of patches centred near a nodule
SLAB = 0.25  # fraction of patches cut to a slab of 8-31 slices with air (0) around, as the sliding window pads a
# series thinner than its patch: without these the network takes the slab's tissue for a nodule
CROP_MM = (125.0, 175.0)  # keep |y| and |x| within these: the body is 240 x 340 mm
Array = npt.NDArray[np.float32]


def build_network() -> UNet:
    """The network: MONAI 3D U-Net, 1 channel in, 2 out (background, nodule), batch norm (patch-independent)."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=1,
        norm="batch",
    )


@dataclass(frozen=True)
class Sample:
    """One training phantom on the model grid: windowed image, soft nodule target (float16 to halve the pool's
    memory), nodule centres (voxels)."""

    image: npt.NDArray[np.float16]
    target: npt.NDArray[np.float16]
    centres: tuple[tuple[float, float, float], ...]


def _scanner_grid(rng: np.random.Generator, target: Spacing) -> tuple[Shape, float, float]:
    """A random scanner grid (shape, pixel spacing, slice spacing), or the model grid itself half of the time."""
    extent = rng.uniform(120.0, 300.0)
    if rng.random() < 0.5:
        return (round(extent / target[0]), round(360.0 / target[1]), round(360.0 / target[2])), target[1], target[0]
    pixels = int(rng.choice([256, 384, 512]))
    pixel_spacing = rng.uniform(350.0, 420.0) / pixels
    slice_spacing = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    return (round(extent / slice_spacing), pixels, pixels), pixel_spacing, slice_spacing


def _crop(shape: Shape, spacing: Spacing) -> tuple[slice, slice]:
    """Rows and columns that hold the body (centred grid)."""
    rows = min(shape[1], 2 * math.ceil(CROP_MM[0] / spacing[1]))
    cols = min(shape[2], 2 * math.ceil(CROP_MM[1] / spacing[2]))
    r0, c0 = (shape[1] - rows) // 2, (shape[2] - cols) // 2
    return slice(r0, r0 + rows), slice(c0, c0 + cols)


def make_sample(seed: int) -> Sample:
    """Phantom ``seed`` on the model grid, cropped to the body."""
    m = manifest()
    target = target_spacing(m)
    rng = np.random.default_rng([seed, 1])
    shape, pixel_spacing, slice_spacing = _scanner_grid(rng, target)
    phantom = make_phantom(seed, shape, pixel_spacing, slice_spacing, int(rng.integers(5, 11)))
    grid, spacing = model_grid(shape, phantom.spacing, target)
    image = window(resize(phantom.hu, grid), m)
    soft = occupancy(grid, spacing, phantom.nodules)
    rows, cols = _crop(grid, spacing)
    centres = []
    for nodule in phantom.nodules:
        s, r, c = nodule_index(nodule, grid, spacing)
        centres.append((s, r - rows.start, c - cols.start))
    crop = (slice(None), rows, cols)
    return Sample(image[crop].astype(np.float16), soft[crop].astype(np.float16), tuple(centres))


def _start(centre: float, size: int, extent: int, rng: np.random.Generator) -> int:
    jitter = rng.uniform(-size / 4, size / 4)
    return int(np.clip(round(centre + jitter - size / 2), 0, max(0, extent - size)))


def sample_patch(sample: Sample, rng: np.random.Generator) -> tuple[Array, Array]:
    """One (image, target) patch: near a nodule with probability ``POSITIVE``, else anywhere, with augmentation."""
    extent = sample.image.shape
    if sample.centres and rng.random() < POSITIVE:
        centre = sample.centres[int(rng.integers(len(sample.centres)))]
        start = [_start(centre[i], PATCH[i], extent[i], rng) for i in range(3)]
    else:
        start = [int(rng.integers(0, max(1, extent[i] - PATCH[i] + 1))) for i in range(3)]
    box = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
    image = _pad(sample.image[box].astype(np.float32), 0.0)
    target = _pad(sample.target[box].astype(np.float32), 0.0)
    for axis in (1, 2):
        if rng.random() < 0.5:
            image, target = np.flip(image, axis), np.flip(target, axis)
    gain, offset, noise = rng.normal(1.0, 0.03), rng.normal(0.0, 0.015), rng.uniform(0.0, 0.01)
    image = image * np.float32(gain) + np.float32(offset) + rng.normal(0.0, noise, image.shape).astype(np.float32)
    image, target = np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target, dtype=np.float32)
    if rng.random() < SLAB:
        keep = int(rng.integers(8, PATCH[0]))
        first = int(rng.integers(0, PATCH[0] - keep + 1))
        for array in (image, target):
            array[:first] = 0.0
            array[first + keep :] = 0.0
    return image, target


def _pad(array: Array, value: float) -> Array:
    """Pad a patch cut at the volume's edge up to ``PATCH``."""
    widths = [(0, p - n) for n, p in zip(array.shape, PATCH, strict=True)]
    return np.pad(array, widths, constant_values=value) if any(w for _, w in widths) else array


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy plus soft Dice on the nodule channel (over the whole batch)."""
    soft = torch.cat([1.0 - target, target], dim=1)
    ce = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    p = torch.softmax(logits, dim=1)[:, 1:]
    dice = (2.0 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)
    return ce + (1.0 - dice)


def batches(steps: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches from a rolling pool of phantoms (seeds ``TRAIN_SEED0`` upwards)."""
    seeds = itertools.count(TRAIN_SEED0)
    pool = [make_sample(next(seeds)) for _ in range(POOL)]
    for step in range(steps):
        if step and step % REFRESH == 0:
            pool = [*pool[1:], make_sample(next(seeds))]
        pairs = [sample_patch(pool[int(rng.integers(len(pool)))], rng) for _ in range(BATCH)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        targets = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        yield images, targets


def train(steps: int, lr: float = 3e-3) -> UNet:
    """Train a fresh network for ``steps`` batches and return it in eval mode."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_network()
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=lr / 30)
    start, running = time.monotonic(), 0.0
    net.train()
    for step, (images, targets) in enumerate(batches(steps, rng), start=1):
        loss = loss_fn(net(images), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        value = loss.detach().item()
        running = 0.98 * running + 0.02 * value if step > 1 else value
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps}  loss {running:.4f}  {time.monotonic() - start:.0f} s", flush=True)
    return net.eval()


def export(net: UNet, folder: Path) -> None:
    """Write ``model.pt`` (TorchScript, traced) and ``model.onnx`` (opset 17, dynamic batch and spatial axes)."""
    example = torch.zeros(1, 1, 48, 96, 96)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(net, example)
        torch.jit.save(traced, str(folder / "model.pt"))
        axes = {0: "batch", 2: "slices", 3: "rows", 4: "columns"}
        torch.onnx.export(
            net,
            (example,),
            str(folder / "model.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(2)
    net = train(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    export(net, args.out)
    from evaluate import evaluate, load_torchscript

    scores = evaluate(load_torchscript(args.out / "model.pt"), seeds=(2000, 2001))
    print(f"held-out Dice: {', '.join(f'{s:.3f}' for s in scores)}")


if __name__ == "__main__":
    main()
