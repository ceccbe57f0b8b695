"""A MONAI model-zoo bundle as it comes, the data scientist's whole path: zip, upload, a CT from the PACS, results.

The bundle is the real ``spleen_ct_segmentation`` (configs from ``../shared/data/monai-bundles``) with weights built
from its own ``network_def``, seeded, and the last layer's bias shifted so that the segmentation has an edge. It is
zipped as it was downloaded (``spleen_ct_segmentation/`` at the top, no ``model.yaml``) and uploaded to a running
``gateway serve`` with the admin token. Orthanc then sends a synthetic CT to the gateway by C-STORE, as a PACS
auto-routes; the gateway runs the bundle's own preprocessing, inferer and postprocessing and sends the SEG and the
TID 1500 SR back to Orthanc (``return_to_sender``). The test reads them from Orthanc: the SEG's spleen is coded SCT
78961009, references the source series and equals, voxel for voxel, what the inference runtime gives on the same
series; DCMTK's ``dsr2html`` renders the SR with its finding, its caveat and the bundle's intended use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest

from gateway.assemble.assemble import assemble_series
from gateway.assemble.model import Volume
from gateway.config import StoreSettings
from gateway.infer.runtime import InferenceRuntime
from gateway.infer.series import result_summary
from gateway.registry.manifest import GENERIC_CATEGORY, GENERIC_TYPE
from gateway.registry.registry import Registry, RegistryIndex
from gateway.synth.ct import SynthCT, write_synthetic_ct

from conftest import require_tool
from model_packages import zip_folder
from monai_bundles import SPLEEN, spleen_weights_with_an_edge
from peers import ADMIN, GatewayServer, Orthanc, orthanc_binary, wait_until

pytestmark = pytest.mark.slow

NAME, VERSION = "spleen_ct_segmentation", "0.5.9"
SPLEEN_CODE = {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}
SLICES, SIZE = 48, 128
BUNDLE_NOTE = "ran the bundle's own preprocessing, inferer and postprocessing"
INTENDED_USE = "This is an example, not to be used for diagnostic purposes"


def copy_spleen(parent: Path, name: str = NAME) -> Path:
    """The spleen bundle's configs and LICENSE copied to ``parent/name`` (no weights yet); skip when absent."""
    if not (SPLEEN / "configs" / "metadata.json").is_file():
        pytest.skip(f"the MONAI model-zoo spleen bundle's configs are not at {SPLEEN}")
    return Path(shutil.copytree(SPLEEN, parent / name))


def synthetic_series(folder: Path, slices: int, size: int, seed: int) -> tuple[SynthCT, Volume]:
    synth = write_synthetic_ct(folder, slices, rows=size, columns=size, seed=seed)
    assembled = assemble_series(sorted(folder.glob("*.dcm")))
    assert assembled.refused == () and len(assembled.volumes) == 1
    return synth, assembled.volumes[0]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    if orthanc_binary() is None:
        require_tool("Orthanc")
    with Orthanc(tmp_path / "orthanc", dicomweb=False) as server:
        yield server


def served_gateway(tmp_path: Path, orthanc: Orthanc) -> GatewayServer:
    """``gateway serve`` whose results for a series Orthanc sent go back to Orthanc by C-STORE."""
    sections = {
        "models": {"register_shipped": False},
        "ingest": {"quiet_period_s": 1.0, "completion_poll_s": 0.2},
        "jobs": {"workers": 1, "poll_s": 0.2},
        "export": {
            "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
            "return_to_sender": {orthanc.aet: "pacs"},
            "default": [],
            "backoff_initial_s": 0.2,
            "backoff_max_s": 0.5,
            "poll_s": 0.1,
        },
    }
    return GatewayServer(tmp_path / "gateway", tmp_path / "data", sections)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float, gateway: GatewayServer) -> None:
    """Poll ``condition``; fail with the gateway's log tail at the deadline or if it exits."""
    try:
        wait_until(condition, timeout_s=timeout_s, what=what, alive=lambda: gateway.alive)
    except Exception as exc:
        pytest.fail(f"{exc}\n--- gateway log ---\n{gateway.log_path.read_text(errors='replace')[-4000:]}")


def api(gateway: GatewayServer, method: str, path: str, *, timeout: float = 10, **kwargs: Any) -> httpx.Response:
    """``METHOD /api/PATH`` with the admin token (``headers`` are added to it)."""
    headers = {**ADMIN, **kwargs.pop("headers", {})}
    url = f"http://127.0.0.1:{gateway.http_port}/api{path}"
    return httpx.request(method, url, headers=headers, timeout=timeout, **kwargs)


def upload_bundle(gateway: GatewayServer, bundle: Path, tmp_path: Path) -> dict[str, Any]:
    """Zip the bundle as downloaded (its folder at the top) and ``POST /api/models`` it; check the answer."""
    archive = zip_folder(bundle, tmp_path / f"{bundle.name}.zip", top=bundle.name)
    zipped = {"Content-Type": "application/zip"}
    response = api(gateway, "POST", "/models", content=archive.read_bytes(), headers=zipped, timeout=300)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert (body["name"], body["version"], body["enabled"]) == (NAME, VERSION, True)
    return body


def check_model(gateway: GatewayServer) -> None:
    """``GET /api/models/NAME``: the bundle's own pipeline, its spleen coded, CT only, the bundle's intended use."""
    response = api(gateway, "GET", f"/models/{NAME}")
    assert response.status_code == 200, response.text
    model = response.json()
    manifest = model["manifest"]
    assert (model["version"], model["active"], model["backend"]) == (VERSION, True, "monai-bundle")
    assert manifest["inference"]["pipeline"] == "bundle" and manifest["select"]["modality"] == ["CT"]
    assert manifest["intended_use"] == INTENDED_USE
    (label,) = manifest["outputs"]["segmentation"]["labels"]
    assert (label["value"], label["name"], label["type"]) == (1, "spleen", SPLEEN_CODE)
    assert model["dry_run"], "the registration's dry run of the bundle's pipeline"


def send_from_orthanc(orthanc: Orthanc, gateway: GatewayServer, series: Path) -> None:
    """Store the series in Orthanc, then have Orthanc C-STORE the study to the gateway (as a PACS auto-routes)."""
    for path in sorted(series.glob("*.dcm")):
        orthanc.rest("POST", "/instances", path.read_bytes())
    (study,) = orthanc.rest("GET", "/studies")
    orthanc.rest("PUT", "/modalities/gateway", {"AET": "GATEWAY", "Host": "127.0.0.1", "Port": gateway.dicom_port})
    orthanc.rest("POST", "/modalities/gateway/store", {"Resources": [study], "Synchronous": True})


def exported_job(gateway: GatewayServer) -> dict[str, Any]:
    """Wait for the one job to settle; it must be ``exported``. Its detail (``GET /api/jobs/{id}``)."""
    settled: dict[str, Any] = {}

    def done() -> bool:
        jobs = api(gateway, "GET", "/jobs").json()
        if not jobs:
            return False
        assert len(jobs) == 1, [(j["id"], j["state"]) for j in jobs]
        settled.update(api(gateway, "GET", f"/jobs/{jobs[0]['id']}").json())
        return settled["state"] in ("exported", "skipped", "failed", "cancelled")

    wait_for(done, "the job exported", 300, gateway)
    assert settled["state"] == "exported", json.dumps(settled["detail"], indent=1)[-3000:]
    return settled


def orthanc_results(orthanc: Orthanc) -> dict[str, pydicom.Dataset]:
    """The one instance of each result series Orthanc holds (not the CT), by Modality."""
    held: dict[str, pydicom.Dataset] = {}
    for series in orthanc.rest("GET", "/series?expand"):
        modality = series["MainDicomTags"].get("Modality")
        if modality != "CT":
            (instance,) = series["Instances"]
            held[modality] = pydicom.dcmread(BytesIO(orthanc.rest("GET", f"/instances/{instance}/file")))
    return held


def check_seg(dataset: pydicom.Dataset, synth: SynthCT, volume: Volume) -> np.ndarray:
    """One segment, "spleen", coded SCT 78961009, referencing the source series; its mask in volume order."""
    seg = hd.seg.Segmentation.from_dataset(dataset)
    assert seg.StudyInstanceUID == synth.study_instance_uid
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "spleen"
    (kind,) = segment.SegmentedPropertyTypeCodeSequence
    assert {"value": kind.CodeValue, "scheme": kind.CodingSchemeDesignator, "meaning": kind.CodeMeaning} == SPLEEN_CODE
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == synth.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} <= set(synth.sop_instance_uids)
    uids = [s.sop_instance_uid for s in volume.slices]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    return np.asarray(pixels[..., 0], dtype=bool)


def check_report(dataset: pydicom.Dataset, synth: SynthCT, out: Path) -> str:
    """``dsr2html`` renders the SR; its text names the spleen, says it was not reviewed and the intended use, and
    names the source series of the segmentation."""
    dsr2html = require_tool("dsr2html")
    sr_file = out / "sr.dcm"
    dataset.save_as(sr_file, enforce_file_format=True)
    done = subprocess.run([dsr2html, str(sr_file), str(out / "sr.html")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    html = (out / "sr.html").read_text(errors="replace")
    text = " ".join(html.split())
    assert "Spleen" in text and "not reviewed by a physician" in text and INTENDED_USE in text
    assert synth.series_instance_uid in text, "the source series of the segmentation"
    return html


def runtime_mask(data_dir: Path, volume: Volume) -> np.ndarray:
    """The registered bundle run on the volume by the inference runtime alone (as ``gateway run`` does)."""
    index = RegistryIndex(StoreSettings(data_dir=data_dir, min_free_bytes=0))
    runtime = InferenceRuntime("cpu")
    try:
        model = Registry(index).get(f"{NAME}@{VERSION}")
        result = runtime.run(model.manifest, model.folder, model.sha256, volume)
    finally:
        runtime.close()
        index.close()
    assert result.labelmap is not None
    return np.asarray(result.labelmap == 1)


def test_a_bare_bundle_from_upload_to_results_in_the_pacs(tmp_path: Path, orthanc: Orthanc) -> None:
    synth, volume = synthetic_series(tmp_path / "ct", SLICES, SIZE, seed=5)
    bundle = copy_spleen(tmp_path / "download")
    spleen_weights_with_an_edge(bundle, volume, seed=0, foreground=0.045)  # about 200 ml: a spleen's size
    gateway = served_gateway(tmp_path, orthanc)
    with gateway:
        upload_bundle(gateway, bundle, tmp_path)
        check_model(gateway)
        send_from_orthanc(orthanc, gateway, tmp_path / "ct")
        job = exported_job(gateway)
    (result,) = job["detail"]["inference"]["results"]
    assert result["model"] == f"{NAME}@{VERSION}"
    assert any(BUNDLE_NOTE in note for note in result["notes"]), result["notes"]
    assert job["deliveries"] and all(d["state"] == "delivered" for d in job["deliveries"])

    results = orthanc_results(orthanc)
    assert {"SEG", "SR"} <= results.keys(), sorted(results)
    mask = check_seg(results["SEG"], synth, volume)
    check_report(results["SR"], synth, tmp_path)
    expected = runtime_mask(tmp_path / "data", volume)
    assert mask.shape == expected.shape == (SLICES, SIZE, SIZE)
    differing = int(np.count_nonzero(mask != expected))
    assert differing == 0, f"{differing} of {mask.size} voxels differ from the runtime's own"
    foreground = float(mask.mean())
    assert 0.001 < foreground < 0.5, f"a segmentation with an edge ({foreground:.1%} spleen)"


def test_a_label_the_gateway_cannot_code_is_generic_and_noted(tmp_path: Path) -> None:
    """A bundle whose output channel is named ``splenunculus_x``: coded as a generic anatomical structure, its name
    kept as the SegmentLabel, and the result (what a job records) notes it."""
    bundle = copy_spleen(tmp_path / "download", name="splenunculus_ct")
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] = "splenunculus_x"
    metadata_path.write_text(json.dumps(metadata), encoding="utf-8")
    _, volume = synthetic_series(tmp_path / "ct", 16, 64, seed=6)
    spleen_weights_with_an_edge(bundle, volume, seed=1)

    index = RegistryIndex(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    runtime = InferenceRuntime("cpu")
    try:
        model = Registry(index).register(bundle)
        result = runtime.run(model.manifest, model.folder, model.sha256, volume)
    finally:
        runtime.close()
        index.close()
    assert (model.name, model.version, model.enabled) == ("splenunculus_ct", VERSION, True)
    segmentation = model.manifest.outputs.segmentation
    assert segmentation is not None
    (label,) = segmentation.labels
    assert (label.name, label.category, label.type) == ("splenunculus_x", GENERIC_CATEGORY, GENERIC_TYPE)
    generic = f"label 'splenunculus_x' has no SNOMED CT code the gateway knows: coded as generic {GENERIC_TYPE.meaning}"
    notes = result_summary(result)["notes"]  # what the job's detail records of the result
    assert any(note.startswith(generic) for note in notes), notes
    assert any(BUNDLE_NOTE in note for note in notes), notes
