"""A job's deliveries in ``GET /api/jobs/{id}``; dead deliveries sent again with ``POST /api/jobs/{id}/retry`` (write
scope) and ``gateway jobs retry ID``; the running gateway's export workers deliver them."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pacs import EARLIER, StatusSCP, deliveries, fast_export, job_of, make_job, outputs, sop_instance_uid, wait_for_job
from starlette.exceptions import StarletteDeprecationWarning
from typer.testing import CliRunner

from gateway.cli import app as cli
from gateway.config import HttpSettings, StoreSettings, TokenSettings, hash_token
from gateway.export import queue
from gateway.export.outcome import Kind, Outcome, RetryPolicy
from gateway.jobs.states import JobState
from gateway.store.store import InstanceStore

from conftest import api_client, make_settings

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

READ, WRITE = "retry-read-token-5e1f0a7b3c", "retry-write-token-9d2c4b6a8e"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def scp() -> Iterator[StatusSCP]:
    with StatusSCP(statuses=[0xC000]) as server:  # refuses the first instance, takes every other
        yield server


@pytest.fixture
def client(tmp_path: Path, scp: StatusSCP) -> Iterator[TestClient]:
    tokens = [
        TokenSettings(name="reader", sha256=hash_token(READ), scopes=["read"]),
        TokenSettings(name="writer", sha256=hash_token(WRITE), scopes=["write"]),
    ]
    settings = make_settings(
        tmp_path / "data",
        http=HttpSettings(host="127.0.0.1", port=0, tokens=tokens),
        export=fast_export(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}}),
    )
    with api_client(create_app(settings, start_dimse=False), headers={}) as test_client:
        yield test_client


def test_deliveries_on_the_job_and_retry_through_the_api(client: TestClient, scp: StatusSCP, tmp_path: Path) -> None:
    store: InstanceStore = client.app.state.store  # type: ignore[attr-defined]
    (path,) = outputs(tmp_path / "out", 1)
    job = make_job(store)
    queue.enqueue(store, job, [path], ["pacs"])
    assert wait_for_job(store, job, {JobState.FAILED, JobState.EXPORTED}).state == JobState.FAILED

    shown = client.get(f"/api/jobs/{job}", headers=bearer(READ)).json()
    assert shown["state"] == "failed" and shown["detail"]["failure"]["stage"] == "export"
    (delivery,) = shown["deliveries"]
    assert delivery["sop_instance_uid"] == sop_instance_uid(path) and delivery["destination"] == "pacs"
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == ("dead", 1, 0xC000)
    assert [(h["outcome"], h["status"], h["reason"]) for h in delivery["history"]] == [
        ("dead", 0xC000, "rejected, status 0xC000")
    ]

    refused = client.post(f"/api/jobs/{job}/retry", headers=bearer(READ))
    assert refused.status_code == 403 and "'write' scope" in refused.json()["detail"]
    response = client.post(f"/api/jobs/{job}/retry", headers=bearer(WRITE))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["requeued"] == 1 and body["id"] == job
    assert wait_for_job(store, job, {JobState.FAILED, JobState.EXPORTED}).state == JobState.EXPORTED
    assert scp.received == {sop_instance_uid(path): 1}
    (delivery,) = client.get(f"/api/jobs/{job}", headers=bearer(READ)).json()["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("delivered", 1)
    assert [h["outcome"] for h in delivery["history"]] == ["dead", "requeued", "delivered"]

    again = client.post(f"/api/jobs/{job}/retry", headers=bearer(WRITE))
    assert again.status_code == 409 and "no dead or refused delivery" in again.json()["detail"]
    assert client.post("/api/jobs/999999/retry", headers=bearer(WRITE)).status_code == 404


def test_job_list_and_a_job_without_deliveries(client: TestClient) -> None:
    store: InstanceStore = client.app.state.store  # type: ignore[attr-defined]
    job = make_job(store)
    shown = client.get(f"/api/jobs/{job}", headers=bearer(READ)).json()
    assert shown["deliveries"] == [] and shown["state"] == "inferred"
    assert "deliveries" not in client.get("/api/jobs", headers=bearer(READ)).json()[0]


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_retry(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = InstanceStore(StoreSettings(data_dir=data_dir, min_free_bytes=0))
    try:
        job = make_job(store)
        queue.enqueue(store, job, outputs(tmp_path / "out", 2), ["pacs"])
        _, items = queue.claim(store, ["pacs"], 10, owner=EARLIER, lease_s=60.0) or ("", [])
        for item in items:
            queue.record(store, item, Outcome(Kind.DEAD, "rejected, status 0xA900", 0xA900), RetryPolicy())
        assert queue.settle(store, job) == JobState.FAILED

        code, out, _ = invoke("jobs", "retry", job, "--data-dir", data_dir)
        assert code == 0 and out.strip() == f"job {job}: 2 deliveries requeued; the running gateway sends them"
        assert job_of(store, job).state == JobState.ENCODED
        assert {(r.state, r.attempts) for r in deliveries(store, job)} == {("pending", 0)}

        code, _, err = invoke("jobs", "retry", job, "--data-dir", data_dir)
        assert (
            code == 1 and err.startswith("error: ") and "no dead or refused delivery" in err and "Traceback" not in err
        )
        code, _, err = invoke("jobs", "retry", 424242, "--data-dir", data_dir)
        assert code == 1 and err.startswith("error: no job 424242") and str(data_dir) in err, err
    finally:
        store.close()
