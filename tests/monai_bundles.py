"""The MONAI model-zoo bundles the tests register as they come: configs from ``../shared/data/monai-bundles``, with
weights built from each bundle's own ``network_def`` (the configs are stored without weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
