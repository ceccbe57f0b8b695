"""A research export through a real gateway: a synthetic chest CT goes in by C-STORE (DCMTK ``storescu``), the
nodule model runs, and a research destination (a real C-STORE SCP, MinimalSCP) receives de-identified copies of the
inputs and the outputs (PS3.15 Annex E). Read back with highdicom, the SEG refers to the de-identified CT the
destination holds; every copy records the profile; none holds the patient's name or ID; the key images (burned-in
captions) are refused, not sent."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from gateway.config import DicomSettings, ExportSettings, JobsSettings, Settings
from gateway.export.deidentify import Identity, residual_phi
from gateway.synth.ct import SynthCT, VolumeGeometry, place_nodules, write_synthetic_ct

from conftest import LiveServer, make_settings, require_tool
from peers import MinimalSCP, dcmtk_tool, free_port

pytestmark = pytest.mark.slow

MODELS = Path(__file__).resolve().parents[2] / "models"
SLICES, SIZE = 48, 160
RESULTS = {"SEG", "SR", "PR", "KO"}


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, SynthCT]:
    folder = tmp_path / "study"
    geometry = VolumeGeometry((SLICES, SIZE, SIZE), (360 / SIZE, 360 / SIZE), 2.5)
    nodules = place_nodules(geometry, 1, np.random.default_rng(21), radius_range_mm=(8.0, 10.0))
    return folder, write_synthetic_ct(folder, SLICES, rows=SIZE, columns=SIZE, seed=21, nodules=nodules)


def received_by_modality(scp: MinimalSCP, timeout_s: float = 240) -> dict[str, list[pydicom.Dataset]]:
    """Wait until the SCP holds the CT and each of :data:`RESULTS`; what it holds, by Modality."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held: dict[str, list[pydicom.Dataset]] = {}
        for path in scp.outdir.iterdir():
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, EOFError, OSError):  # still being written: read at the next look
                continue
            held.setdefault(str(ds.Modality), []).append(ds)
        if set(held) >= RESULTS and len(held.get("CT", [])) == SLICES:
            return held
        time.sleep(0.5)
    raise AssertionError(f"the research destination holds {sorted(held)} after {timeout_s} s")


def test_a_research_destination_gets_deidentified_inputs_and_outputs(
    study: tuple[Path, SynthCT], tmp_path: Path
) -> None:
    storescu = dcmtk_tool("storescu") or require_tool("DCMTK storescu")
    folder, synth = study
    original = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    dicom_port = free_port()
    with MinimalSCP(tmp_path / "research") as scp:
        research = {"ae_title": scp.aet, "host": "127.0.0.1", "port": scp.dicom_port}
        export = ExportSettings(
            destinations={"research": {**research, "deidentify": {"options": ["retain_longitudinal_modified_dates"]}}},
            default=["research"],
            backoff_initial_s=0.1,
            backoff_max_s=0.5,
            poll_s=0.05,
        )
        settings = make_settings(
            tmp_path / "data",
            dicom=DicomSettings(host="127.0.0.1", port=dicom_port),
            jobs=JobsSettings(workers=1, poll_s=0.05),
            export=export,
        )
        register_nodule_model(settings)
        with LiveServer(settings, start_dimse=True):
            files = [str(p) for p in sorted(folder.glob("*.dcm"))]
            subprocess.run([storescu, "-aec", "GATEWAY", "127.0.0.1", str(dicom_port), *files], check=True, timeout=120)
            held = received_by_modality(scp)
    ct, seg_ds = held["CT"], held["SEG"][0]
    ct_uids = {str(ds.SOPInstanceUID) for ds in ct}
    assert not ct_uids & set(synth.sop_instance_uids)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct[0].SeriesInstanceUID != synth.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence} <= ct_uids
    assert seg.StudyInstanceUID == ct[0].StudyInstanceUID
    identity = Identity.of(original)
    for ds in [d for copies in held.values() for d in copies]:
        assert ds.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert ds.PatientID == ct[0].PatientID != original.PatientID
        assert residual_phi(ds, identity) is None
    assert "SC" not in held  # key images carry burned-in captions: refused, not sent


def register_nodule_model(settings: Settings) -> None:
    from gateway.registry.registry import Registry, RegistryIndex

    index = RegistryIndex(settings.store)
    try:
        registry = Registry(index)
        registry.register(MODELS / "ct-nodule-unet")
        registry.enable("ct-nodule-unet")
    finally:
        index.close()
