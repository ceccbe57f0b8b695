"""The example models in ``models/`` for their tests: the folder, their scripts loaded as modules, TorchScript files.

A model's folder is not a package (its name has a hyphen), so its scripts are loaded from their paths, with the
folder on ``sys.path`` while they import (they import their sibling modules).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

MODELS = Path(__file__).resolve().parents[2] / "models"


@functools.cache
def load_script(model: str, script: str) -> ModuleType:
    """``models/<model>/<script>.py`` as a module (loaded once per test session)."""
    folder = MODELS / model
    spec = importlib.util.spec_from_file_location(
        f"_models_{model.replace('-', '_')}_{script}", folder / f"{script}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def jit_load(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU in eval mode, without its deprecation warning (tests turn warnings into errors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")
    return module.eval()
