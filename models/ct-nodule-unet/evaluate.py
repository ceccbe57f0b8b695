"""Evaluate ct-nodule-unet on synthetic phantoms that training never saw, at the phantom's own resolution.

Run from the project root: ``.venv/bin/python models/ct-nodule-unet/evaluate.py`` (TorchScript ``model.pt``;
``--onnx`` for ``model.onnx``). Each phantom is rendered on a scanner grid (default 100 x 512 x 512, 0.703 mm
pixels, 2.5 mm slices), prepared as the gateway does (resampled to the model grid, HU window), segmented with a
sliding window as the gateway runs it (the manifest's patch size, overlap and batch size; logits blended with
Gaussian weights, then softmax), and the nodule probability is resampled back trilinearly to the scanner grid
before thresholding at 0.5. The Dice of that mask against the phantom's exact truth mask is printed per phantom,
with the mean.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference

from gateway.registry.manifest import Manifest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from nodule_data import (  # noqa: E402  (the folder is not a package)
    FloatArray,
    Phantom,
    dice,
    make_phantom,
    manifest,
    model_grid,
    resize,
    target_spacing,
    window,
)

EVAL_SEEDS = tuple(range(2000, 2005))  # training uses 1000-1999; tests use 3000+
Predictor = Callable[[torch.Tensor], torch.Tensor]


def load_torchscript(path: Path) -> Predictor:
    """The TorchScript network as a function from a batch to logits."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = module(batch)
        return out

    return run


def load_onnx(path: Path) -> Predictor:
    """The ONNX network (ONNX Runtime, CPU) as a function from a batch to logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: batch.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(np.asarray(out))

    return run


def predict(predictor: Predictor, phantom: Phantom, m: Manifest) -> FloatArray:
    """Nodule probability on the phantom's own grid (model grid -> sliding window -> softmax -> back)."""
    s, r, c = phantom.hu.shape
    shape, _ = model_grid((s, r, c), phantom.spacing, target_spacing(m))
    image = torch.from_numpy(window(resize(phantom.hu, shape), m))[None, None]
    patch = m.inference.patch_size or shape
    with torch.inference_mode():
        logits = sliding_window_inference(
            image, patch, m.inference.batch_size, predictor, overlap=m.inference.overlap, mode="gaussian"
        )
    assert isinstance(logits, torch.Tensor)
    probability = torch.softmax(logits, dim=1)[0, 1].numpy()
    return resize(probability, (s, r, c))


def evaluate(
    predictor: Predictor,
    seeds: Sequence[int],
    shape: tuple[int, int, int] = (100, 512, 512),
    pixel_spacing: float = 360.0 / 512,
    slice_spacing: float = 2.5,
    n_nodules: int = 3,
) -> list[float]:
    """Dice of the thresholded prediction against the truth, one phantom per seed, at the phantom's resolution."""
    m = manifest()
    scores = []
    for seed in seeds:
        phantom = make_phantom(seed, shape, pixel_spacing, slice_spacing, n_nodules)
        scores.append(dice(predict(predictor, phantom, m) >= 0.5, phantom.truth))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", action="store_true", help="evaluate model.onnx instead of model.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(EVAL_SEEDS))
    parser.add_argument("--shape", type=int, nargs=3, default=[100, 512, 512], metavar=("S", "R", "C"))
    parser.add_argument("--pixel-spacing", type=float, default=360.0 / 512)
    parser.add_argument("--slice-spacing", type=float, default=2.5)
    parser.add_argument("--nodules", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = load_onnx(HERE / "model.onnx") if args.onnx else load_torchscript(HERE / "model.pt")
    start = time.monotonic()
    shape = (args.shape[0], args.shape[1], args.shape[2])
    scores = evaluate(predictor, args.seeds, shape, args.pixel_spacing, args.slice_spacing, args.nodules)
    for seed, score in zip(args.seeds, scores, strict=True):
        print(f"seed {seed}: Dice {score:.4f}")
    print(f"mean Dice {np.mean(scores):.4f} over {len(scores)} phantoms ({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
