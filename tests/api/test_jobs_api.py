"""The jobs JSON API: compact summaries with their total and filters, one job in full, and an operator's re-run,
cancel and reprocess (``write`` scope; 409 with the reason when the state does not allow it, 404 when unknown)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from gateway.config import HttpSettings, TokenSettings, hash_token
from gateway.ingest.completion import complete_quiet_series
from gateway.store.index import Job
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from conftest import api_client, make_settings

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

READ, WRITE = "jobs-api-read-token-0c3e9a1d", "jobs-api-write-token-7b5f2e4c"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    tokens = [
        TokenSettings(name="reader", sha256=hash_token(READ), scopes=["read"]),
        TokenSettings(name="writer", sha256=hash_token(WRITE), scopes=["write"]),
    ]
    settings = make_settings(tmp_path / "data", http=HttpSettings(host="127.0.0.1", port=0, tokens=tokens))
    with api_client(create_app(settings, start_dimse=False), headers=bearer(READ)) as test_client:
        yield test_client


def add_series(store: InstanceStore, folder: Path, *, seed: int, now: float) -> tuple[int, str]:
    """A small synthetic CT series stored and completed (its job ``received``): the job id and the series UID."""
    ct = write_synthetic_ct(folder, 8, rows=32, columns=32, seed=seed)
    for path in sorted(folder.glob("*.dcm")):
        store.put(path, source="test", now=now)
    (done,) = complete_quiet_series(store.write_sessions, 0.0, now=now + 1)
    return done.job_id, ct.series_instance_uid


def set_job(store: InstanceStore, job_id: int, state: str, **detail: object) -> None:
    """Put a job where a stage would have left it (state and detail entries)."""
    with store.write_sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.finished_at = state, 50.0
        job.detail = {**job.detail, **detail}


def test_the_list_is_compact_with_a_total_and_filters(client: TestClient, tmp_path: Path) -> None:
    store: InstanceStore = client.app.state.store  # type: ignore[attr-defined]
    waiting, _ = add_series(store, tmp_path / "a", seed=1, now=10.0)
    failed, _ = add_series(store, tmp_path / "b", seed=2, now=20.0)
    nowhere, _ = add_series(store, tmp_path / "c", seed=3, now=30.0)
    set_job(store, failed, "failed", failure={"stage": "infer", "reason": "tiny@1: out of memory"})
    set_job(store, nowhere, "exported", export={"undelivered": True, "reason": "no destination configured"})

    listed = client.get("/api/jobs")
    assert listed.status_code == 200 and listed.headers["X-Total-Count"] == "3"
    assert [j["id"] for j in listed.json()] == [nowhere, failed, waiting]
    newest = listed.json()[0]
    assert "detail" not in newest and newest["undelivered"] is True and newest["modality"] == "CT"
    assert set(newest["stages"]) == {"completion", "assemble", "queue", "infer", "encode", "export"}
    assert newest["stages"]["completion"] == pytest.approx(1.0)
    assert len(listed.content) < 2000, "a page of summaries is small"

    page = client.get("/api/jobs", params={"limit": 1, "offset": 1})
    assert [j["id"] for j in page.json()] == [failed] and page.headers["X-Total-Count"] == "3"
    problems = client.get("/api/jobs", params={"problems": "true"})
    assert [j["id"] for j in problems.json()] == [nowhere, failed]
    assert problems.json()[1]["failure"] == "tiny@1: out of memory"
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "received"}).json()] == [waiting]
    assert client.get("/api/jobs", params={"modality": "MR"}).json() == []
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 400


def test_one_job_in_full(client: TestClient, tmp_path: Path) -> None:
    store: InstanceStore = client.app.state.store  # type: ignore[attr-defined]
    job_id, series_uid = add_series(store, tmp_path / "a", seed=1, now=10.0)
    shown = client.get(f"/api/jobs/{job_id}")
    assert shown.status_code == 200
    body = shown.json()
    assert body["detail"] == {"revision": 1, "instances": 8} and body["deliveries"] == []
    assert body["series_instance_uid"] == series_uid and body["models_run"] == [] and body["failure"] is None
    missing = client.get("/api/jobs/424242")
    assert missing.status_code == 404 and missing.json()["detail"] == "no job 424242"


def test_cancel_rerun_and_reprocess_need_write_and_say_why_they_cannot(client: TestClient, tmp_path: Path) -> None:
    store: InstanceStore = client.app.state.store  # type: ignore[attr-defined]
    job_id, series_uid = add_series(store, tmp_path / "a", seed=1, now=10.0)
    write = bearer(WRITE)

    refused = client.post(f"/api/jobs/{job_id}/cancel")
    assert refused.status_code == 403 and "'write' scope" in refused.json()["detail"]
    busy = client.post(f"/api/series/{series_uid}/reprocess", headers=write)
    assert busy.status_code == 409 and f"job {job_id}" in busy.json()["detail"]
    early = client.post(f"/api/jobs/{job_id}/rerun", params={"from": "assemble"}, headers=write)
    assert early.status_code == 409 and "only a finished job can be re-run" in early.json()["detail"]

    cancelled = client.post(f"/api/jobs/{job_id}/cancel", headers=write)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["detail"]["requested"]["by"] == "writer"
    again = client.post(f"/api/jobs/{job_id}/cancel", headers=write)
    assert (
        again.status_code == 409
        and again.json()["detail"] == f"job {job_id} is cancelled already: there is nothing to cancel"
    )

    no_outputs = client.post(f"/api/jobs/{job_id}/rerun", params={"from": "export"}, headers=write)
    assert no_outputs.status_code == 409
    assert client.post(f"/api/jobs/{job_id}/rerun", params={"from": "infer"}, headers=write).status_code == 400
    assert client.post(f"/api/jobs/{job_id}/rerun", headers=write).status_code == 400
    rerun = client.post(f"/api/jobs/{job_id}/rerun", params={"from": "assemble"}, headers=write)
    assert rerun.status_code == 200, rerun.text
    body = rerun.json()
    assert body["state"] == "received"
    assert body["detail"]["requested"]["action"] == "rerun-assemble"
    assert [run["state"] for run in body["detail"]["previous_runs"]] == ["cancelled"]

    client.post(f"/api/jobs/{job_id}/cancel", headers=write)
    reprocessed = client.post(f"/api/series/{series_uid}/reprocess", headers=write)
    assert reprocessed.status_code == 200, reprocessed.text
    new = reprocessed.json()
    assert new["job_id"] != job_id and new["job"]["state"] == "received" and new["job"]["revision"] == 2
    assert client.post("/api/series/2.25.404/reprocess", headers=write).status_code == 404
    assert client.post("/api/jobs/424242/cancel", headers=write).status_code == 404
    assert client.post("/api/jobs/424242/rerun", params={"from": "assemble"}, headers=write).status_code == 404
