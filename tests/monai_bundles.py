"""The MONAI model-zoo bundles the tests register as they come: configs from ``../shared/data/monai-bundles``, with
weights built from each bundle's own ``network_def`` (the configs are stored without weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.assemble.model import Volume

from conftest import SHARED_DATA

SPLEEN = SHARED_DATA / "monai-bundles" / "spleen_ct_segmentation"


def spleen_weights(folder: Path) -> Path:
    """Write ``model.pt`` for the spleen bundle into ``folder``: the seeded state dict of the network its
    ``network_def`` builds (by MONAI's own parser); skip the test when the bundle's configs are absent."""
    if not (SPLEEN / "configs" / "metadata.json").is_file():
        pytest.skip(f"the MONAI model-zoo spleen bundle's configs are not at {SPLEEN}")
    import torch
    from monai.bundle import ConfigParser

    config = json.loads((SPLEEN / "configs" / "inference.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    network = ConfigParser(config).get_parsed_content("network_def")
    path = folder / "model.pt"
    torch.save(network.state_dict(), path)
    return path


def spleen_bundle(parent: Path, weights: Path, name: str = "spleen_ct_segmentation") -> Path:
    """The spleen bundle as ``python -m monai.bundle download`` leaves it: ``configs/``, ``models/``, ``LICENSE``."""
    bundle = parent / name
    shutil.copytree(SPLEEN, bundle)
    (bundle / "models").mkdir()
    shutil.copyfile(weights, bundle / "models" / "model.pt")
    return bundle


def spleen_weights_with_an_edge(bundle: Path, volume: Volume, *, seed: int = 0, foreground: float = 0.3) -> Path:
    """Write ``bundle/models/model.pt``: the seeded network of its ``network_def``, the last layer's spleen bias
    shifted so that about ``foreground`` of the first 96^3 window of ``volume``, as the bundle's own preprocessing
    gives it, is spleen (a segmentation with an edge, not one label everywhere)."""
    import torch

    from gateway.infer.bundle import build_network
    from gateway.infer.bundle_pipeline import build_sections, volume_image

    torch.manual_seed(seed)
    network = build_network(bundle, trust_code=False).eval()
    sections = build_sections(bundle, trust_code=False)
    image = sections.preprocessing({"image": volume_image(volume)})["image"].as_tensor()[None]
    with torch.inference_mode():
        logits = sections.inferer(image[..., :96, :96, :96], network)
    margin = (logits[0, 1] - logits[0, 0]).flatten()
    bias = [value for key, value in network.state_dict().items() if key.endswith("bias") and value.shape == (2,)]
    with torch.no_grad():
        bias[-1][1] -= float(torch.quantile(margin, 1.0 - foreground))
    (bundle / "models").mkdir(exist_ok=True)
    path = bundle / "models" / "model.pt"
    torch.save(network.state_dict(), path)
    return path
