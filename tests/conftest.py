"""Shared fixtures: settings over a temporary folder, a running gateway, a live HTTP server, peers' tools."""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.exceptions import StarletteDeprecationWarning
from starlette.types import ASGIApp

from gateway.api.limits import server_config
from gateway.config import (
    DicomSettings,
    HttpSettings,
    IngestSettings,
    JobsSettings,
    ModelsSettings,
    RetentionSettings,
    Settings,
    StoreSettings,
    TokenSettings,
    hash_token,
)
from gateway.runtime import Gateway
from gateway.store.store import InstanceStore

from peers import ADMIN, ADMIN_TOKEN, free_port  # the tests' admin token (make_settings, GatewayServer), its header
from pg import PostgresServer, unavailable_reason

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def http_settings(**values: Any) -> HttpSettings:
    """HTTP settings for tests: loopback, an ephemeral port and :data:`ADMIN_TOKEN` as the one (admin) token."""
    token = TokenSettings(name="test-admin", sha256=hash_token(ADMIN_TOKEN), scopes=["admin"])
    return HttpSettings(**{"host": "127.0.0.1", "port": 0, "tokens": [token], **values})


def api_client(app: ASGIApp, **kwargs: Any) -> TestClient:
    """A TestClient as an operator's own client calls the API: to ``http://localhost`` (an allowed ``Host``), with
    :data:`ADMIN_TOKEN` (``headers=`` replaces it; ``headers={}`` sends none)."""
    kwargs.setdefault("headers", ADMIN)
    return TestClient(app, base_url="http://localhost", **kwargs)


def make_settings(data_dir: Path, **sections: object) -> Settings:
    """Settings for tests: loopback, ephemeral ports, :data:`ADMIN_TOKEN` as the HTTP token (so no data-folder token
    is made), no watermark, a short quiet period, no assembly workers, no shipped models
    (``models=ModelsSettings()`` registers the repository's ``models/`` at start).

    Jobs stay ``received`` unless a test asks for assembly (``jobs=JobsSettings(workers=1)``).
    """
    base: dict[str, object] = {
        "store": StoreSettings(data_dir=data_dir, min_free_bytes=0),
        "dicom": DicomSettings(host="127.0.0.1", port=0),
        "http": http_settings(),
        "ingest": IngestSettings(quiet_period_s=0.5, completion_poll_s=0.1, resend_wait_s=0),
        "jobs": JobsSettings(workers=0, poll_s=0.1),
        "models": ModelsSettings(register_shipped=False),  # tests register the models they need
        # No purge by disk use: a developer's disk may be over 90 % full (tests/store/test_purge*.py set their own).
        "retention": RetentionSettings(disk_high_watermark=1.0, disk_low_watermark=1.0),
    }
    base.update(sections)
    return Settings(**base)  # type: ignore[arg-type]


def require_tool(name: str) -> str:
    """Path of a peer's command-line tool; skips when absent (``make test`` installs them all)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make test installs it)")
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Gateway]:
    gw = Gateway(settings)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def instance_store(tmp_path: Path) -> Iterator[InstanceStore]:
    """An instance store (index and files) over ``tmp_path / "data"``, without the free-space watermark."""
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DICOM test data not found at {SHARED_DATA}")
    return SHARED_DATA


class LiveServer:
    """A gateway app served by uvicorn on 127.0.0.1 in a thread, configured as ``gateway serve`` configures it."""

    def __init__(self, settings: Settings, *, start_dimse: bool = False) -> None:
        from gateway.api.app import create_app

        self.app = create_app(settings, start_dimse=start_dimse)
        self.port = free_port()
        config = server_config(
            self.app, settings.http, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (tests/pg.py) for the whole session; skips when Debian's binaries are absent."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``) of a fresh, empty database for this test alone."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def index_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InstanceStore]:
    """An instance store whose index is SQLite, or a fresh database on a real PostgreSQL server: for the tests of
    what must hold on both engines (the job and delivery state machines)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0, database_url=url))
    try:
        yield store
    finally:
        store.close()
