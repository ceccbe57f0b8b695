"""The inference stage of jobs: assembled -> inferring -> inferred / skipped / failed, with every routing reason."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import onnx
import pydicom
import pytest
from onnx import TensorProto, helper
from sqlalchemy import select
from test_assembly import jobs, wait_for_state

from gateway.config import ExportSettings, JobsSettings, ModelsSettings
from gateway.export.scu import Peer, SendReport, scan, send
from gateway.infer.runtime import InferenceRuntime
from gateway.jobs import lifecycle
from gateway.jobs.encoding import EncodeStage
from gateway.jobs.inference import InferenceStage
from gateway.jobs.runner import JobRunner, Pipeline
from gateway.jobs.states import JobState
from gateway.registry.registry import Registry
from gateway.runtime import Gateway
from gateway.store.index import Job
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from conftest import make_settings
from model_packages import manifest_dict, write_package

SEGMENTS = {"segmentation": {"kind": "labelmap", "labels": [manifest_dict()["outputs"]["segmentation"]["labels"][0]]}}


def log_model() -> bytes:
    """An ONNX graph computing log(x): finite on the dry run's random input in [0, 1), NaN on CT's negative HU."""
    nodes = [helper.make_node("Log", ["x"], ["y"])]
    spatial = ["s", "r", "c"]
    graph = helper.make_graph(
        nodes,
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, *spatial])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


def send_ct(gw: Gateway, folder: Path, seed: int) -> None:
    write_synthetic_ct(folder, 12, rows=48, columns=48, seed=seed, fresh_uids=True)
    assert gw.scp is not None
    report = SendReport()
    send(scan([folder], report), Peer("GATEWAY", "127.0.0.1", gw.scp.port), report=report)
    assert report.sent == 12


def test_a_model_registered_while_the_gateway_runs_serves_the_next_job(tmp_path: Path) -> None:
    models = ModelsSettings(register_shipped=False, keep_nifti=True)
    settings = make_settings(tmp_path / "data", jobs=JobsSettings(workers=2, poll_s=0.05), models=models)
    gw = Gateway(settings)
    gw.start()
    try:
        send_ct(gw, tmp_path / "first", seed=1)
        (first,) = wait_for_state(gw.store, {JobState.SKIPPED, JobState.FAILED})
        gw.registry.register(write_package(tmp_path / "pkg", manifest_dict(outputs=SEGMENTS)))
        send_ct(gw, tmp_path / "second", seed=2)
        deadline = time.monotonic() + 60
        while len(jobs(gw.store)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first, second = wait_for_state(gw.store, {JobState.SKIPPED, JobState.EXPORTED, JobState.FAILED})
    finally:
        gw.stop()
    assert first.state == JobState.SKIPPED and first.detail["inference"]["routing"] == []
    assert "no enabled model applies" in first.detail["skipped"]
    assert second.state == JobState.EXPORTED, second.detail  # no export destination configured: nothing to send
    (decision,) = second.detail["inference"]["routing"]
    assert decision["model"] == "tiny-seg@1.0.0" and decision["run"] is True
    (result,) = second.detail["inference"]["results"]
    (measured,) = result["measurements"]
    assert measured["name"] == "label 1" and measured["values"]["volume"] >= 0 and measured["units"]["volume"] == "ml"
    assert {"assemble_s", "infer_s"} <= set(second.detail["timings"])
    files = second.detail["inference"]["files"]["tiny-seg@1.0.0"]
    labels = nib.load(settings.store.data_dir / "results" / next(f for f in files if f.endswith("_labels.nii.gz")))
    assert labels.shape == (48, 48, 12)
    summary = json.loads(
        (settings.store.data_dir / "results" / next(f for f in files if f.endswith(".json"))).read_text()
    )
    assert summary["model"] == "tiny-seg@1.0.0" and summary["labels"][0]["name"] == "label 1"
    outputs = second.detail["outputs"]
    kinds = [output["kind"] for output in outputs]
    assert kinds[:2] == ["SEG", "SR"] and kinds[2:] in ([], ["GSPS", "KO"]), kinds  # outlines when it found any
    seg = outputs[0]
    assert seg["model"] == "tiny-seg@1.0.0"
    written = pydicom.dcmread(settings.store.data_dir / "outputs" / seg["file"])
    assert written.SOPInstanceUID == seg["SOPInstanceUID"] and written.Modality == "SEG"
    assert {"assemble_s", "infer_s", "encode_s"} <= set(second.detail["timings"])


@pytest.fixture
def assembled_job(tmp_path: Path) -> Iterator[tuple[InstanceStore, int]]:
    """A store holding one synthetic CT series whose job is ``assembled``."""
    store = InstanceStore(make_settings(tmp_path / "data").store)
    write_synthetic_ct(tmp_path / "ct", 12, rows=48, columns=48)
    for k, path in enumerate(sorted((tmp_path / "ct").glob("*.dcm"))):
        copy = tmp_path / f"copy-{k}.dcm"
        copy.write_bytes(path.read_bytes())
        store.put(copy, source="test", now=0.0)
    from gateway.ingest.completion import complete_quiet_series

    complete_quiet_series(store.write_sessions, 0.0, now=10.0)
    with store.sessions() as session:
        job_id = session.scalars(select(Job.id)).one()
    yield store, job_id
    store.close()


def run_stage(store: InstanceStore, job_id: int, registry: Registry, tmp_path: Path) -> Job:
    """Take the received job through the runner's stages, in this thread."""
    runtime = InferenceRuntime("cpu")
    infer = InferenceStage(store, registry, runtime, tmp_path / "results")
    encode = EncodeStage(store, ExportSettings(), tmp_path / "outputs")
    try:
        assert JobRunner(store, JobsSettings(workers=0), Pipeline(infer, encode)).run_once()
    finally:
        runtime.close()
    (job,) = jobs(store)
    assert job.id == job_id
    return job


def test_a_model_failing_on_the_input_fails_the_job_with_the_model_and_reason(
    assembled_job: tuple[InstanceStore, int], tmp_path: Path
) -> None:
    store, job_id = assembled_job
    registry = Registry(store)
    maps = {
        "parametric_maps": [
            {
                "name": "log",
                "channel": 0,
                "quantity": {"value": "113041", "scheme": "DCM", "meaning": "Apparent Diffusion Coefficient"},
                "units": {"value": "1", "scheme": "UCUM", "meaning": "no units"},
            }
        ]
    }
    registry.register(write_package(tmp_path / "log", manifest_dict("log-map", outputs=maps), weights=log_model()))
    job = run_stage(store, job_id, registry, tmp_path)
    assert job.state == JobState.FAILED
    assert job.detail["failure"]["stage"] == "infer"
    assert job.detail["failure"]["reason"].startswith("log-map@1.0.0: ")
    assert "NaN" in job.detail["failure"]["reason"]


def test_routing_reasons_are_recorded_when_no_model_applies(
    assembled_job: tuple[InstanceStore, int], tmp_path: Path
) -> None:
    store, job_id = assembled_job
    registry = Registry(store)
    mr_only = manifest_dict("mr-only", select={"modality": ["MR"]}, outputs=SEGMENTS)
    registry.register(write_package(tmp_path / "mr", mr_only))
    job = run_stage(store, job_id, registry, tmp_path)
    assert job.state == JobState.SKIPPED
    (decision,) = job.detail["inference"]["routing"]
    assert decision["run"] is False and "modality" in decision["reason"] and "MR" in decision["reason"]


def test_an_interrupted_inference_is_assembled_again_after_a_restart(
    assembled_job: tuple[InstanceStore, int], tmp_path: Path
) -> None:
    store, job_id = assembled_job
    with store.write_sessions.begin() as session:  # as a process killed during inference leaves it
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.lease_owner, job.lease_expires_at, job.attempts = JobState.INFERRING, "gone/1/x", 0.0, 1
    assert lifecycle.reclaim_expired(store) == [job_id]
    (job,) = jobs(store)
    assert job.state == JobState.RECEIVED, "volumes live in memory only: the job is assembled again"
    assert job.lease_owner is None and job.attempts == 1, "the lost attempt counts"
