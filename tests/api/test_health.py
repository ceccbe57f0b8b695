"""``/healthz``: 200 while the gateway can do its work, 503 with the reasons while it cannot (low disk, dead
workers), so that a load balancer or a container's health check sees it."""

from __future__ import annotations

import threading
from pathlib import Path

from gateway.api.app import create_app
from gateway.config import JobsSettings, StoreSettings

from conftest import api_client, make_settings


def test_healthz_is_ok_while_the_gateway_can_work(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", jobs=JobsSettings(workers=1)), start_dimse=False)
    with api_client(app) as client:
        answer = client.get("/healthz")
    assert answer.status_code == 200 and answer.json()["status"] == "ok" and "reasons" not in answer.json()


def test_healthz_is_503_with_the_reason_while_ingest_refuses_for_space(tmp_path: Path) -> None:
    full = StoreSettings(data_dir=tmp_path / "data", min_free_bytes=1 << 60)  # more than any disk has
    app = create_app(make_settings(tmp_path / "data", store=full), start_dimse=False)
    with api_client(app) as client:
        answer = client.get("/healthz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "unavailable" and body["accepting"] is False
    (reason,) = body["reasons"]
    assert "low disk" in reason and "store.min_free_bytes" in reason and "0xA700" in reason


def test_healthz_is_503_when_a_job_worker_is_dead(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data", jobs=JobsSettings(workers=2)), start_dimse=False)
    with api_client(app) as client:
        gateway = app.state.gateway
        dead = threading.Thread(target=lambda: None)  # a worker that has ended: a fault that cannot be caused
        dead.start()  # from outside (the supervisor replaces such a thread at its next round)
        dead.join()
        gateway.jobs._workers[0] = dead
        answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["reasons"] == ["1 of 2 job workers stopped"]


def test_healthz_is_503_and_ingest_not_accepting_once_the_store_is_closed(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data"), start_dimse=False)
    with api_client(app) as client:
        gateway = app.state.gateway
        assert client.get("/healthz").status_code == 200 and gateway.ingest_state().accepting
        gateway.store._writer.stop()  # what Gateway.stop does first: no instance can be indexed any more
        answer = client.get("/healthz")
        accepting = gateway.ingest_state().accepting
    assert answer.status_code == 503
    assert answer.json()["reasons"] == ["the instance store is closed (its index writer is stopped)"]
    assert not accepting
