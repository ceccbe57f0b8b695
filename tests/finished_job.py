"""A data folder holding one finished job, run through the gateway's real stages, for the tests of what a reader sees
of results (tests/ui/test_results*.py) and of the gateway's DICOMweb listing them (tests/api/test_qido_outputs.py).

A synthetic chest CT (48 slices of 160 x 160, two nodules of 6-10 mm radius) is stored in a gateway that runs
``ct-nodule-unet`` (a SEG, its TID 1500 SR, outlines and key images) and, with ``maps=True``, a tiny ONNX model
writing one parametric map (a Parametric Map); the job ends ``exported`` (no destination).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from gateway.config import JobsSettings, Settings
from gateway.runtime import Gateway
from gateway.store.index import Job
from gateway.synth.ct import Nodule, SynthCT, VolumeGeometry, place_nodules, write_synthetic_ct

from conftest import make_settings
from model_packages import manifest_dict, onnx_model, write_package

MODELS = Path(__file__).resolve().parents[1] / "models"
SLICES, SIZE = 48, 160
SPACING = 360 / SIZE
FINAL = ("exported", "failed", "skipped", "cancelled")
_MAP = {
    "name": "weighted HU",
    "channel": 0,
    "quantity": {"value": "112031", "scheme": "DCM", "meaning": "Attenuation Coefficient"},
    "units": {"value": "[hnsf'U]", "scheme": "UCUM", "meaning": "Hounsfield unit"},
}


@dataclass(frozen=True)
class FinishedJob:
    """The data folder, the job and what went in."""

    data_dir: Path
    job_id: int
    ct: SynthCT
    detail: dict[str, Any]

    @property
    def nodules(self) -> tuple[Nodule, ...]:
        return self.ct.nodules

    def outputs(self, kind: str) -> list[tuple[int, dict[str, Any]]]:
        """``(index, output)`` of the job's outputs of ``kind`` (``SEG``, ``SR``, ``PM`` ...)."""
        return [(k, o) for k, o in enumerate(self.detail["outputs"]) if o["kind"] == kind]

    def settings(self, **sections: Any) -> Settings:
        """Settings of a gateway over the folder that runs nothing more (no job workers)."""
        return make_settings(self.data_dir, **sections)


def pixel_of(nodule: Nodule, size: int = SIZE) -> tuple[float, float]:
    """(column, row) of a nodule's centre on the phantom's axial images (pixel centres at integers)."""
    x, y, _ = nodule.center_mm
    half = (size - 1) / 2.0
    return x / SPACING + half, y / SPACING + half


def run_job(root: Path, *, maps: bool = False, timeout_s: float = 300.0) -> FinishedJob:
    """Store the synthetic CT in a gateway over ``root / "data"`` running the models, and wait for its job."""
    geometry = VolumeGeometry((SLICES, SIZE, SIZE), (SPACING, SPACING), 2.5)
    nodules = place_nodules(geometry, 2, np.random.default_rng(21), radius_range_mm=(6.0, 10.0))
    ct = write_synthetic_ct(root / "ct", SLICES, rows=SIZE, columns=SIZE, seed=21, nodules=nodules)
    data = root / "data"
    gateway = Gateway(make_settings(data, jobs=JobsSettings(workers=1, poll_s=0.05)), dimse=False)
    gateway.start()
    try:
        gateway.registry.register(MODELS / "ct-nodule-unet")
        if maps:
            manifest = manifest_dict("tiny-map", outputs={"parametric_maps": [_MAP]}, inference={"patch_size": None})
            gateway.registry.register(write_package(root / "tiny-map", manifest, weights=onnx_model(out_channels=1)))
        for path in sorted((root / "ct").glob("*.dcm")):
            gateway.store.put(path, source="test")
        job_id, detail = _wait(gateway, timeout_s)
    finally:
        gateway.stop()
    assert detail.get("outputs"), f"the job made no output: {detail.get('failure')}"
    return FinishedJob(data, job_id, ct, detail)


def _wait(gateway: Gateway, timeout_s: float) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with gateway.store.sessions() as session:
            job = session.scalars(select(Job)).first()
            if job is not None and job.state in FINAL:
                return job.id, dict(job.detail)
        time.sleep(0.1)
    raise AssertionError(f"the job did not finish within {timeout_s:.0f} s")
