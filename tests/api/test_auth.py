"""Bearer tokens with scopes on every route; reading open on loopback only without configured tokens, writing never;
the data folder's admin token; tokens never logged, refusals logged with a rate limit."""

from __future__ import annotations

import json
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

from gateway.admin_token import ADMIN_TOKEN_NAME, admin_token_path, ensure_admin_token, reset_admin_token
from gateway.api.auth import SAFE_METHODS, granted_scopes
from gateway.api.refusals import RefusalLog
from gateway.config import HttpSettings, Scope, Settings, TokenSettings, hash_token
from gateway.errors import ConfigError
from gateway.runtime import Gateway
from gateway.store.index import Instance

from conftest import LiveServer, api_client, make_settings

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
    with api_client(create_app(secured, start_dimse=False), headers={}) as test_client:
        yield test_client


#: The only routes open without a token: the web UI's sign-in form (whose POST needs the page's CSRF token, like
#: sign-out), its static files, and the API docs' page and assets (the schema they show, /openapi.json, needs read).
PUBLIC = {
    ("GET", "/ui/login"),
    ("POST", "/ui/login"),
    ("POST", "/ui/logout"),
    ("GET", "/ui/static/{name}"),
    ("GET", "/docs"),
    ("GET", "/docs/assets/{name}"),
}


def routes(client: TestClient, *, public: bool = False) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app but the :data:`PUBLIC` ones (only those, with
    ``public``), path parameters filled with a valid UID / id."""
    found = []
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        assert route.path and route.methods, f"{route.original_route!r} is not a plain HTTP route: review it"
        path = re.sub(r"\{[^}]+\}", "1", route.path)
        methods = [m for m in sorted(route.methods) if m != "HEAD" and ((m, route.path) in PUBLIC) == public]
        found.extend((method, path) for method in methods)
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


def test_only_the_sign_in_static_files_and_the_docs_page_are_public(client: TestClient) -> None:
    found = routes(client, public=True)
    assert {(m, re.sub(r"/1$", "/{name}", p)) for m, p in found} == PUBLIC
    for method, path in found:
        response = client.request(method, path)
        if method == "GET":
            assert response.status_code in (200, 404), f"{method} {path}: {response.status_code}"
        else:  # no CSRF token: refused before the route
            assert response.status_code == 401, f"{method} {path}: {response.status_code}"


def test_the_openapi_schema_needs_a_token_once_tokens_are_configured(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=bearer(TOKENS["read"])).json()["openapi"].startswith("3.")
    assert client.get("/docs").status_code == 200, "the page is public: it holds nothing of the gateway's"
    assert client.get("/redoc").status_code == 404


def test_read_scope_reads_and_only_reads(client: TestClient) -> None:
    for method, path in routes(client):
        response = client.request(method, path, headers=bearer(TOKENS["read"]))
        if method == "GET":
            assert response.status_code not in (401, 403), f"read token refused on {method} {path}"
        else:
            assert response.status_code == 403, f"read token allowed on {method} {path}"
            if path.startswith("/ui/"):  # a page says it in HTML
                assert "lacks the &#39;write&#39; scope" in response.text, path
            else:
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


LOOPBACK = ("127.0.0.1", 50123)  # a TestClient's peer address; its default ("testclient") is not loopback


def open_settings(tmp_path: Path, **http: object) -> Settings:
    """Loopback settings without configured tokens (the data folder gets its admin token on the first start)."""
    return make_settings(tmp_path / "data", http=HttpSettings(host="127.0.0.1", port=0, **http))  # type: ignore[arg-type]


def test_without_configured_tokens_loopback_reads_and_only_the_data_folder_token_writes(tmp_path: Path) -> None:
    settings = open_settings(tmp_path)
    body, headers = stow_body(tmp_path)
    with api_client(create_app(settings, start_dimse=False), headers={}, client=LOOPBACK) as client:
        token = client.app.state.gateway.new_admin_token  # type: ignore[attr-defined]
        assert token is not None, "the first start made the data folder's admin token"
        for method, path in routes(client):
            response = client.request(method, path)
            if method in SAFE_METHODS:
                assert response.status_code not in (401, 403), f"{method} {path} refused from loopback"
            else:
                assert response.status_code == 401, f"{method} {path} allowed without a token from loopback"
        assert client.get("/openapi.json").status_code == 200, "docs are public while reading is"
        assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 401
        stored = client.post("/dicomweb/studies", content=body, headers={**headers, **bearer(token)})
        assert stored.status_code == 200, stored.text
        assert client.post("/api/jobs/999/retry", headers=bearer(token)).status_code == 404, "admin can do anything"
    with api_client(create_app(settings, start_dimse=False), headers={}) as remote:  # a peer that is not loopback
        assert remote.app.state.gateway.new_admin_token is None, "made once, on the first start"  # type: ignore[attr-defined]
        assert remote.get("/api/jobs").status_code == 401
        assert remote.get("/dicomweb/studies").status_code == 401
        assert remote.get("/api/jobs", headers=bearer(token)).status_code == 200


@pytest.mark.parametrize(
    ("configured", "anonymous_read", "open_"),
    [
        (False, None, True),
        (True, None, False),
        (False, False, False),
        (True, True, True),
    ],
    ids=["no-tokens-default", "tokens-default", "no-tokens-closed", "tokens-opened"],
)
def test_anonymous_read_follows_the_setting(
    tmp_path: Path, configured: bool, anonymous_read: bool | None, open_: bool
) -> None:
    tokens = tokens_http().tokens if configured else []
    settings = open_settings(tmp_path, tokens=tokens, anonymous_read=anonymous_read)
    with api_client(create_app(settings, start_dimse=False), headers={}, client=LOOPBACK) as client:
        for method, path in routes(client):
            status = client.request(method, path).status_code
            if method in SAFE_METHODS and open_:
                assert status not in (401, 403), f"{method} {path}"
            else:
                assert status == 401, f"{method} {path} answered {status} without a token"
        assert (client.get("/openapi.json").status_code == 200) == open_


def test_ipv6_and_mapped_loopback_peers_read_anonymously(tmp_path: Path) -> None:
    app = create_app(open_settings(tmp_path), start_dimse=False)
    for peer, allowed in ((("::1", 1), True), (("::ffff:127.0.0.1", 1), True), (("10.0.0.7", 1), False)):
        with api_client(app, headers={}, client=peer) as client:
            assert (client.get("/api/jobs").status_code == 200) == allowed, peer


# --- the data folder's admin token --------------------------------------------------------------------------


def test_data_folder_token_is_kept_as_a_hash_readable_by_its_owner_only(tmp_path: Path) -> None:
    settings = open_settings(tmp_path)
    token = ensure_admin_token(settings)
    assert token is not None
    path = admin_token_path(settings.store.data_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {"name": ADMIN_TOKEN_NAME, "sha256": hash_token(token), "scopes": ["admin"]}
    assert token not in path.read_text()
    assert ensure_admin_token(settings) is None, "made once"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no staging file left behind"

    path.chmod(0o644)
    assert ensure_admin_token(settings) is None
    assert path.stat().st_mode & 0o777 == 0o600, "a secret's file made readable by others is closed again"


@pytest.mark.parametrize("scopes", [["read"], ["write"], ["read", "write"]])
def test_data_folder_token_is_made_unless_a_configured_token_can_administer(
    tmp_path: Path, scopes: list[Scope]
) -> None:
    entry = TokenSettings(name="pacs", sha256=hash_token("pacs-token-value-1234567890"), scopes=scopes)
    assert ensure_admin_token(open_settings(tmp_path / "a", tokens=[entry])) is not None
    admin = TokenSettings(name="ops", sha256=hash_token("ops-token-value-1234567890"), scopes=["admin"])
    settings = open_settings(tmp_path / "b", tokens=[entry, admin])
    assert ensure_admin_token(settings) is None
    assert not admin_token_path(settings.store.data_dir).exists()


def test_a_reset_token_replaces_the_old_one_on_the_running_server(tmp_path: Path) -> None:
    settings = open_settings(tmp_path)
    with api_client(create_app(settings, start_dimse=False), headers={}) as client:
        old = client.app.state.gateway.new_admin_token  # type: ignore[attr-defined]
        assert client.get("/api/jobs", headers=bearer(old)).status_code == 200
        new = reset_admin_token(settings.store.data_dir)
        assert client.get("/api/jobs", headers=bearer(old)).status_code == 401
        assert client.post("/api/jobs/1/retry", headers=bearer(new)).status_code == 404
        admin_token_path(settings.store.data_dir).unlink()  # how an operator revokes it
        assert client.get("/api/jobs", headers=bearer(new)).status_code == 401


def test_a_damaged_token_file_stops_the_start(tmp_path: Path) -> None:
    settings = open_settings(tmp_path)
    path = admin_token_path(settings.store.data_dir)
    path.parent.mkdir(parents=True)
    path.write_text('{"name": "admin", "sha256": "not a digest"}')
    gateway = Gateway(settings, dimse=False)
    try:
        with pytest.raises(ConfigError, match=r"admin-token\.json is not a valid token entry"):
            gateway.start()
    finally:
        gateway.store.close()


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


def test_refusals_are_logged_with_a_rate_limit(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(logging.getLogger("test.refusals"), limit=3, window_s=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "test.refusals")
    for i in range(10):
        refusals.refused("refused %d", i)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2"]
    now[0] = 59.9
    refusals.refused("refused %d", 10)
    assert len(caplog.records) == 3
    now[0] = 60.0
    refusals.refused("refused %d", 11)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "8 more refusal(s) in the last 60 s were not logged (rate limit)",
        "refused 11",
    ]
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


def test_a_flood_of_unknown_tokens_logs_a_few_lines(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(100):
        assert client.get("/api/jobs", headers=bearer(WRONG)).status_code == 401
        assert client.post("/api/jobs/1/retry", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 401
    refused = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert 0 < len(refused) <= 10, f"{len(refused)} lines for 200 refusals"
    assert WRONG not in caplog.text
