"""``GET /api/workers``: the processes sharing the index as the ``workers`` table has them, with the read scope,
alive within three heartbeats (``cluster.heartbeat_s``)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from gateway.api import workers
from gateway.config import ClusterSettings, HttpSettings, TokenSettings, hash_token
from gateway.jobs import lifecycle
from gateway.jobs.presence import announce, heartbeat, stopped

from conftest import api_client, make_settings
from job_rows import add_job

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

READ = "workers-api-read-token-3f9c1a7e"
OURS = ("gpu-1/41/aa", "gpu-2/42/bb", "web-1/7/cc")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def with_workers_api(app: FastAPI) -> FastAPI:
    """The app, with ``/api/workers`` added if the app factory does not add it (yet)."""
    if not any(getattr(route, "path", None) == "/api/workers" for route in app.routes):
        app.include_router(workers.router)
    return app


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    tokens = [TokenSettings(name="reader", sha256=hash_token(READ), scopes=["read"])]
    settings = make_settings(
        tmp_path / "data",
        http=HttpSettings(host="127.0.0.1", port=0, tokens=tokens),
        cluster=ClusterSettings(heartbeat_s=10.0),
    )
    with api_client(with_workers_api(create_app(settings, start_dimse=False)), headers=bearer(READ)) as test_client:
        yield test_client


def listed(client: TestClient) -> dict[str, dict[str, Any]]:
    response = client.get("/api/workers")
    assert response.status_code == 200, response.text
    return {worker["owner"]: worker for worker in response.json()}


def test_workers_lists_each_process_alive_within_three_heartbeats(client: TestClient) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    now = time.time()
    announce(store, "gpu-1/41/aa", roles=["worker"], device="cuda:0", models=["ct-lung"], now=now - 100)
    announce(store, "gpu-2/42/bb", roles=["worker"], device="cuda:0", models=None, now=now - 100)
    announce(store, "web-1/7/cc", roles=["ingest", "export"], device=None, models=None, now=now - 100)
    assert heartbeat(store, "gpu-1/41/aa", now=now - 20)  # 2 beats of 10 s ago: alive
    assert heartbeat(store, "gpu-2/42/bb", now=now - 40)  # 4 beats ago: gone (a crash)
    stopped(store, "web-1/7/cc", now=now - 5)
    add_job(store)
    assert lifecycle.claim(store, "gpu-1/41/aa", 600.0, max_attempts=3) is not None
    found = listed(client)
    assert {owner: found[owner]["alive"] for owner in OURS} == {
        "gpu-1/41/aa": True,
        "gpu-2/42/bb": False,
        "web-1/7/cc": False,
    }
    gpu = found["gpu-1/41/aa"]
    assert (gpu["host"], gpu["pid"], gpu["roles"], gpu["device"], gpu["models"], gpu["leases"]) == (
        "gpu-1",
        41,
        ["worker"],
        "cuda:0",
        ["ct-lung"],
        1,
    )
    assert gpu["last_heartbeat_s"] >= 19 and gpu["sending"] == 0 and gpu["version"]
    assert found["web-1/7/cc"]["roles"] == ["ingest", "export"] and found["web-1/7/cc"]["stopped_at"] == now - 5
    others = [w for owner, w in found.items() if owner not in OURS]
    assert all(w["alive"] for w in others), "only the gateway serving this test may be listed besides them"


def test_workers_needs_the_read_scope(client: TestClient) -> None:
    assert client.get("/api/workers", headers={"Authorization": ""}).status_code == 401
    assert client.get("/api/workers", headers=bearer("not-a-token-0000000000000")).status_code == 401
