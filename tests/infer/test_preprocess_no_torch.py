"""An ONNX model with no ``patch_size`` runs without torch (issue 12): resampling there and back and the softmax
are numpy. Checked in a fresh interpreter, so that what this test session imported does not count. (A
sliding-window model does load torch: MONAI's ``sliding_window_inference``.)"""

from __future__ import annotations

from pathlib import Path

from test_imports import MODEL_RUNTIMES, loaded_after
from tiny_models import Channels, Threshold, save_onnx, segment, write_package

MIDWAY = {"mode": "window", "window": [-1405, 595]}  # 0.5 half way between air (-850) and tissue (40)

RUN = """
import sys
from pathlib import Path
import numpy as np
from gateway.assemble.model import SliceRef, Volume
from gateway.infer.runtime import InferenceRuntime
from gateway.registry.manifest import load_manifest

folder = Path(sys.argv[1])
index = np.indices((12, 40, 44)).astype(np.float64)
sphere = ((index[0] - 6) * 2.5) ** 2 + ((index[1] - 20) * 0.8) ** 2 + ((index[2] - 22) * 0.8) ** 2 <= 49.0
affine = np.array([[0, 0, 0.8, -20], [0, 0.8, 0, -25], [-2.5, 0, 0, 40], [0, 0, 0, 1]], dtype=np.float64)
volume = Volume(
    array=np.where(sphere, 40.0, -850.0).astype(np.float32), affine=affine,
    slices=tuple(SliceRef(f"1.2.3.{i + 1}") for i in range(12)), series_instance_uid="1.2.3",
    study_instance_uid="1.2", frame_of_reference_uid="1.2.4", modality="CT",
)
runtime = InferenceRuntime("cpu")
try:
    result = runtime.run(load_manifest(folder), folder, "ab" * 32, volume)
finally:
    runtime.close()
found = result.labelmap == 1 if result.labelmap is not None else result.masks[1]
assert np.mean(found == sphere) > 0.97, "the model found the sphere (up to partial volumes)"
assert any("resampled from" in note for note in result.notes), result.notes
"""


def _run_fresh(folder: Path) -> list[str]:
    """Which of torch, MONAI and ONNX Runtime a fresh interpreter loaded to run the model in ``folder``."""
    loaded: list[str] = loaded_after(f"import sys\nsys.argv[1:] = [{str(folder)!r}]\n{RUN}", MODEL_RUNTIMES)
    return loaded


def test_a_softmax_onnx_model_loads_no_torch(tmp_path: Path) -> None:
    save_onnx(Threshold(), tmp_path / "model.onnx")
    write_package(
        tmp_path,
        "onnx",
        "model.onnx",
        preprocess={"orientation": "IPL", "spacing_mm": [1.5, 1.5, 1.5], "intensity": MIDWAY},
        outputs={"segmentation": {"labels": [segment(1, "Nodule", ["volume"])]}},
    )
    assert _run_fresh(tmp_path) == ["onnxruntime"]


def test_a_sigmoid_onnx_model_loads_no_torch(tmp_path: Path) -> None:
    save_onnx(Channels(), tmp_path / "model.onnx")
    labels = [segment(0, "Body", ["volume"]), segment(1, "Dense", ["volume"])]
    write_package(
        tmp_path,
        "onnx",
        "model.onnx",
        preprocess={"orientation": "IPL", "spacing_mm": [1.5, 1.5, 1.5], "intensity": MIDWAY},
        outputs={"segmentation": {"kind": "channels", "activation": "sigmoid", "labels": labels}},
    )
    assert _run_fresh(tmp_path) == ["onnxruntime"]
