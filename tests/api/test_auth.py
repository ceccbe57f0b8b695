"""Bearer tokens with scopes on every route; open on loopback without tokens; tokens never logged."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydantic
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.routing import iter_route_contexts
from pydicom import Dataset
from requests import HTTPError
from sqlalchemy import func, select
from starlette.exceptions import StarletteDeprecationWarning

from gateway.api.auth import granted_scopes
from gateway.config import HttpSettings, Scope, Settings, TokenSettings, hash_token
from gateway.store.index import Instance

from conftest import LiveServer, make_settings

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

from dicom_files import minimal_ct

TOKENS: dict[Scope, str] = {
    "read": "read-token-3f9a1c0e5b7d4e21a8c6",
    "write": "write-token-71be0d2c94a34f5f9e0b",
    "admin": "admin-token-c2d58e6a1f0b47c3b9d4",
}
WRONG = "wrong-token-5a6b7c8d9e0f1a2b3c4d"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tokens_http() -> HttpSettings:
    return HttpSettings(
        host="127.0.0.1",
        port=0,
        tokens=[
            TokenSettings(name=f"{scope}-client", sha256=hash_token(token), scopes=[scope])
            for scope, token in TOKENS.items()
        ],
    )


@pytest.fixture
def secured(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data", http=tokens_http())


@pytest.fixture
def client(secured: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(secured, start_dimse=False)) as test_client:
        yield test_client


def routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app, path parameters filled with a valid UID / id."""
    found = []
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        assert route.path and route.methods, f"{route.original_route!r} is not a plain HTTP route: review it"
        path = re.sub(r"\{[^}]+\}", "1", route.path)
        found.extend((method, path) for method in sorted(route.methods) if method != "HEAD")
    return found


def stow_body(tmp_path: Path) -> tuple[bytes, dict[str, str]]:
    part = minimal_ct(tmp_path / "auth.dcm").read_bytes()
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--B--\r\n"
    return body, {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}


# --- every route is protected -------------------------------------------------------------------------------


def test_every_route_rejects_a_request_without_a_token(client: TestClient) -> None:
    found = routes(client)
    assert ("POST", "/dicomweb/studies") in found and ("GET", "/api/jobs") in found
    assert ("GET", "/healthz") in found
    for method, path in found:
        response = client.request(method, path)
        assert response.status_code == 401, f"{method} {path} answered {response.status_code} without a token"
        assert response.headers["www-authenticate"] == "Bearer"
        response = client.request(method, path, headers=bearer(WRONG))
        assert response.status_code == 401, f"{method} {path} accepted an unknown token"
        response = client.request(method, path, headers={"Authorization": f"Basic {TOKENS['admin']}"})
        assert response.status_code == 401, f"{method} {path} accepted a token outside the Bearer scheme"


def test_openapi_docs_are_not_served_once_tokens_are_configured(client: TestClient) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path, headers=bearer(TOKENS["admin"])).status_code == 404, path


def test_read_scope_reads_and_only_reads(client: TestClient) -> None:
    for method, path in routes(client):
        response = client.request(method, path, headers=bearer(TOKENS["read"]))
        if method == "GET":
            assert response.status_code not in (401, 403), f"read token refused on {method} {path}"
        else:
            assert response.status_code == 403, f"read token allowed on {method} {path}"
            assert "'write' scope" in response.json()["detail"]


def test_admin_scope_is_allowed_everywhere(client: TestClient, tmp_path: Path) -> None:
    for method, path in routes(client):
        response = client.request(method, path, headers=bearer(TOKENS["admin"]))
        assert response.status_code not in (401, 403), f"admin token refused on {method} {path}"
    body, headers = stow_body(tmp_path)
    response = client.post("/dicomweb/studies", content=body, headers={**headers, **bearer(TOKENS["admin"])})
    assert response.status_code == 200, response.text


def test_read_token_cannot_store(client: TestClient, tmp_path: Path) -> None:
    body, headers = stow_body(tmp_path)
    response = client.post("/dicomweb/studies", content=body, headers={**headers, **bearer(TOKENS["read"])})
    assert response.status_code == 403
    with client.app.state.store.sessions() as session:  # type: ignore[attr-defined]
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_write_token_stores_and_reads_with_dicomweb_client(secured: Settings, tmp_path: Path) -> None:
    path = minimal_ct(tmp_path / "a.dcm")
    source = pydicom.dcmread(path)
    uid = source.SOPInstanceUID
    with LiveServer(secured) as server:
        anonymous = DICOMwebClient(url=f"{server.url}/dicomweb")
        with pytest.raises(HTTPError) as refused:
            anonymous.store_instances([source])
        assert refused.value.response.status_code == 401

        writer = DICOMwebClient(url=f"{server.url}/dicomweb", headers=bearer(TOKENS["write"]))
        result = writer.store_instances([source])
        assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [uid]
        found = writer.search_for_instances(study_instance_uid=source.StudyInstanceUID)
        assert [Dataset.from_json(obj).SOPInstanceUID for obj in found] == [uid]
        retrieved = writer.retrieve_instance(source.StudyInstanceUID, source.SeriesInstanceUID, uid)
        assert retrieved.PixelData == source.PixelData

        reader = DICOMwebClient(url=f"{server.url}/dicomweb", headers=bearer(TOKENS["read"]))
        with pytest.raises(HTTPError) as forbidden:
            reader.store_instances([source])
        assert forbidden.value.response.status_code == 403
        assert len(reader.search_for_studies()) == 1


def test_granted_scopes_follow_the_implications() -> None:
    http = tokens_http()
    assert granted_scopes(http, TOKENS["read"]) == {"read"}
    assert granted_scopes(http, TOKENS["write"]) == {"read", "write"}
    assert granted_scopes(http, TOKENS["admin"]) == {"read", "write", "admin"}
    assert granted_scopes(http, WRONG) is None and granted_scopes(http, None) is None


# --- open on loopback ---------------------------------------------------------------------------------------


def test_without_tokens_on_loopback_every_route_is_open(settings: Settings, tmp_path: Path) -> None:
    assert settings.http.tokens == [] and settings.http.is_loopback
    with TestClient(create_app(settings, start_dimse=False)) as client:
        for method, path in routes(client):
            response = client.request(method, path)
            assert response.status_code not in (401, 403), f"{method} {path} refused without tokens"
        assert client.get("/openapi.json").status_code == 200, "docs are public while the server is open"
        body, headers = stow_body(tmp_path)
        assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example.org", ""])
def test_beyond_loopback_without_tokens_is_refused(host: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"http\.tokens") as excinfo:
        HttpSettings(host=host)
    assert "is not loopback" in str(excinfo.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.53"])
def test_loopback_without_tokens_is_allowed(host: str) -> None:
    assert HttpSettings(host=host).is_loopback


def test_beyond_loopback_with_tokens_is_allowed() -> None:
    http = HttpSettings(host="0.0.0.0", tokens=tokens_http().tokens)
    assert not http.is_loopback


def test_malformed_token_hash_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="sha256"):
        TokenSettings(name="x", sha256=TOKENS["read"])


# --- logging ------------------------------------------------------------------------------------------------


@contextmanager
def uvicorn_logs_into(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Feed uvicorn's loggers (which do not propagate to the root logger) to caplog at DEBUG.

    Call it once the server's uvicorn.Config exists: creating the config reconfigures these loggers.
    """
    saved = []
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)


def test_tokens_are_never_logged(secured: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body, headers = stow_body(tmp_path)
    server = LiveServer(secured)
    assert server.server.config.access_log, "stricter than `gateway serve`, which turns the access log off"
    with uvicorn_logs_into(caplog), server, httpx.Client(base_url=server.url) as http:
        for token in (*TOKENS.values(), WRONG):
            assert http.get("/dicomweb/studies", headers=bearer(token)).status_code in (200, 401)
            http.get("/api/jobs", headers=bearer(token))
            http.get("/healthz", headers=bearer(token))
            http.post("/dicomweb/studies", content=body, headers={**headers, **bearer(token)})
        http.get("/dicomweb/studies")
    text = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "uvicorn.access" in text, "the access log was captured"
    assert "authorised for token 'write-client'" in text, "the token's name is what gets logged"
    assert "refused GET /dicomweb/studies: missing or unknown bearer token" in text
    assert "token 'read-client' lacks the 'write' scope" in text
    for token in (*TOKENS.values(), WRONG):
        assert token not in text and token not in caplog.text
        assert hash_token(token) not in text
