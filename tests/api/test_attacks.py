"""Attacks from a web page the operator opens, tried as the attacker would try them.

- Cross-site "simple requests" (``text/plain``, a form; no CORS preflight, no ``Authorization`` header) to every
  state-changing route the app has, enumerated, so that a route added later is covered too.
- DNS rebinding: the attacker's name resolving to 127.0.0.1, so that its requests carry ``Host: evil.example``,
  against QIDO-RS, WADO-RS, STOW-RS and the API, in process and on a real uvicorn server; ``RetrieveURL`` only
  ever names an allowed host.
"""

from __future__ import annotations

import re
import socket
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import func, select
from starlette.exceptions import StarletteDeprecationWarning

from gateway.api.auth import SAFE_METHODS
from gateway.api.hosts import allowed_hosts, host_name
from gateway.config import HttpSettings, Settings
from gateway.store.index import Instance, Job

from conftest import ADMIN, LiveServer, api_client, http_settings, make_settings
from dicom_files import minimal_ct
from model_packages import manifest_dict, write_package, zip_folder
from peers import wait_until

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

EVIL = "evil.example"
PATIENT = "SECRET^PATIENT"
LOOPBACK = ("127.0.0.1", 50124)
ZIP = {"Content-Type": "application/zip"}
#: Bodies a page can send cross-site without a preflight (the CORS-safelisted request content types).
SIMPLE = {
    "text/plain": "text/plain",
    "form": "application/x-www-form-urlencoded",
    "multipart-form": "multipart/form-data; boundary=x",
}


def stow(path: Path) -> tuple[bytes, dict[str, str]]:
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--B--\r\n"
    return body, {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}


def model_archive(tmp_path: Path) -> bytes:
    folder = write_package(tmp_path / f"pkg-{uuid.uuid4().hex[:6]}", manifest_dict())
    return zip_folder(folder, folder.with_suffix(".zip")).read_bytes()


class Target:
    """A gateway holding a patient's instance and an enabled model, and what an attack could change."""

    def __init__(self, client: TestClient, token: str, tmp_path: Path) -> None:
        self.client, self.token = client, token
        self.instance = pydicom.dcmread(minimal_ct(tmp_path / "patient.dcm", patient_name=PATIENT))
        body, headers = stow(tmp_path / "patient.dcm")
        stored = client.post("/dicomweb/studies", content=body, headers={**headers, **self.auth})
        assert stored.status_code == 200, stored.text
        upload = client.post("/api/models", content=model_archive(tmp_path), headers={**ZIP, **self.auth})
        assert upload.status_code == 201 and upload.json()["enabled"], upload.text
        wait_until(
            lambda: len(client.get("/api/jobs", headers=self.auth).json()) == 1, timeout_s=20, what="the series' job"
        )
        self.archive = model_archive(tmp_path)
        self.stow_body = stow(minimal_ct(tmp_path / "other.dcm"))[0]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def app(self) -> FastAPI:
        app: FastAPI = self.client.app  # type: ignore[assignment]
        return app

    def state(self) -> dict[str, Any]:
        """Everything an attack could change: models, instances, jobs."""
        models = [(m.ref, m.enabled, m.active) for m in self.app.state.gateway.registry.list()]
        with self.app.state.store.sessions() as session:
            instances = session.scalar(select(func.count()).select_from(Instance))
            jobs = [(j.id, j.state) for j in session.scalars(select(Job))]
        files = sorted(p.name for p in (self.app.state.store.data_dir / "instances").rglob("*") if p.is_file())
        return {"models": models, "instances": instances, "jobs": jobs, "files": files}

    def path_values(self) -> dict[str, str]:
        """Real values for the path parameters, so that a request with a token would act."""
        return {
            "name": "tiny-seg",
            "version": "1.0.0",
            "study_instance_uid": str(self.instance.StudyInstanceUID),
            "job_id": "1",
        }

    def body_for(self, path: str) -> bytes:
        return self.archive if path == "/api/models" else self.stow_body


def state_changing_routes(app: FastAPI, values: dict[str, str]) -> list[tuple[str, str]]:
    """(method, concrete path) of every route with a method other than GET/HEAD/OPTIONS (unknown parameters: 1)."""
    found = []
    for route in iter_route_contexts(app.routes):
        assert route.path and route.methods, f"{route.original_route!r} is not a plain HTTP route: review it"
        path = re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: values.get(m[1], "1"), route.path)
        found.extend((method, path) for method in sorted(route.methods) if method not in SAFE_METHODS)
    return found


@pytest.fixture(params=["tokens-configured", "no-tokens-configured"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """The gateway as set up with tokens (the tests' admin token), and as it starts with none (its data folder's)."""
    if request.param == "tokens-configured":
        settings = make_settings(tmp_path / "data")
    else:
        settings = make_settings(tmp_path / "data", http=HttpSettings(host="127.0.0.1", port=0))
    with api_client(create_app(settings, start_dimse=False), headers={}, client=LOOPBACK) as client:
        token = client.app.state.gateway.new_admin_token or ADMIN["Authorization"].split()[1]  # type: ignore[attr-defined]
        yield Target(client, token, tmp_path)


# --- cross-site simple requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", list(SIMPLE.values()), ids=list(SIMPLE))
def test_a_simple_request_changes_nothing_on_any_route(target: Target, content_type: str) -> None:
    routes = state_changing_routes(target.app, target.path_values())
    expected = {
        ("POST", "/dicomweb/studies"),
        ("POST", "/api/models"),
        ("POST", "/api/models/tiny-seg/1.0.0/enable"),
        ("POST", "/api/models/tiny-seg/disable"),
        ("DELETE", "/api/models/tiny-seg/1.0.0"),
        ("POST", "/api/jobs/1/retry"),
    }
    assert expected <= set(routes), routes
    before = target.state()
    # What a page on another site can make the browser send: its Origin, a safelisted content type, no credentials.
    cross_site = {"Content-Type": content_type, "Origin": f"http://{EVIL}", "Sec-Fetch-Site": "cross-site"}
    for method, path in routes:
        response = target.client.request(method, path, content=target.body_for(path), headers=cross_site)
        assert response.status_code == 401, f"{method} {path} answered {response.status_code} to a simple request"
        assert "access-control-allow-origin" not in response.headers
    assert target.state() == before


def test_model_upload_takes_archive_media_types_only(target: Target) -> None:
    before = target.state()
    for content_type in SIMPLE.values():
        headers = {"Content-Type": content_type, **target.auth}
        response = target.client.post("/api/models", content=target.archive, headers=headers)
        assert response.status_code == 415, f"{content_type}: {response.status_code}"
    assert target.state() == before


def test_the_same_requests_with_the_token_do_act(target: Target) -> None:
    """The control: the routes the attacks were refused on work for the token's holder."""
    assert target.client.post("/api/models/tiny-seg/disable", headers=target.auth).status_code == 200
    assert target.state()["models"] == [("tiny-seg@1.0.0", False, True)]
    assert target.client.post("/api/models/tiny-seg/1.0.0/enable", headers=target.auth).status_code == 200
    assert target.client.delete("/api/models/tiny-seg/1.0.0", headers=target.auth).status_code == 200
    assert target.state()["models"] == []


def test_a_preflight_is_not_answered_with_permission(target: Target) -> None:
    preflight = {
        "Origin": f"http://{EVIL}",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    response = target.client.options("/api/models", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-headers" not in response.headers


# --- DNS rebinding: a foreign Host ---------------------------------------------------------------------------


def reads(target: Target) -> list[str]:
    study, series, sop = (
        str(target.instance[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    return [
        "/dicomweb/studies?PatientName=*",
        "/dicomweb/instances?includefield=all",
        f"/dicomweb/studies/{study}",
        f"/dicomweb/studies/{study}/metadata",
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
        "/api/jobs",
        "/api/studies",
        "/api/models",
        "/healthz",
        "/openapi.json",
    ]


@pytest.mark.parametrize("host", [EVIL, f"{EVIL}:8080", "127.0.0.1.nip.io", "localhost.evil.example", "[::2]"])
def test_a_foreign_host_reads_and_changes_nothing_in_process(target: Target, host: str) -> None:
    before = target.state()
    for authorised in (False, True):  # a rebinding page has no token; refused even with one
        headers = {"Host": host, **(target.auth if authorised else {})}
        for path in reads(target):
            response = target.client.get(path, headers=headers)
            assert response.status_code == 400, f"GET {path} with Host {host}: {response.status_code}"
            assert PATIENT.split("^")[0] not in response.text and EVIL not in response.text
        body, stow_headers = stow(Path(target.app.state.settings.store.data_dir).parent / "patient.dcm")
        response = target.client.post("/dicomweb/studies", content=body, headers={**stow_headers, **headers})
        assert response.status_code == 400 and "RetrieveURL" not in response.text
        assert target.client.delete("/api/models/tiny-seg/1.0.0", headers=headers).status_code == 400
        upload = target.client.post("/api/models", content=target.archive, headers={**ZIP, **headers})
        assert upload.status_code == 400
    assert target.state() == before
    assert target.client.get("/api/models", headers={"Host": "localhost:8080", **target.auth}).status_code == 200


@pytest.fixture
def rebinding(tmp_path: Path) -> Iterator[tuple[LiveServer, pydicom.Dataset]]:
    """A real server as it starts by default (no tokens: reading open on loopback) holding a patient's instance."""
    settings = make_settings(tmp_path / "data", http=HttpSettings(host="127.0.0.1", port=0))
    instance = minimal_ct(tmp_path / "patient.dcm", patient_name=PATIENT)
    with LiveServer(settings) as server:
        token = server.app.state.gateway.new_admin_token
        body, headers = stow(instance)
        headers["Authorization"] = f"Bearer {token}"
        assert httpx.post(f"{server.url}/dicomweb/studies", content=body, headers=headers).status_code == 200
        yield server, pydicom.dcmread(instance)


def test_a_foreign_host_reads_nothing_from_a_real_server(rebinding: tuple[LiveServer, pydicom.Dataset]) -> None:
    server, instance = rebinding
    study = instance.StudyInstanceUID
    with httpx.Client(base_url=server.url, timeout=10) as http:
        found = http.get("/dicomweb/studies", params={"PatientName": "*"})
        assert found.status_code == 200 and PATIENT in found.text, "the same request with our own Host reads"
        for path in (
            "/dicomweb/studies?PatientName=*",
            f"/dicomweb/studies/{study}",
            f"/dicomweb/studies/{study}/metadata",
            "/api/jobs",
            "/api/models",
        ):
            response = http.get(path, headers={"Host": f"{EVIL}:{server.port}"})
            assert response.status_code == 400, f"{path}: {response.status_code}"
            assert PATIENT not in response.text and "SECRET" not in response.text
        body, headers = stow(Path(str(instance.filename)))
        response = http.post("/dicomweb/studies", content=body, headers={**headers, "Host": EVIL})
        assert response.status_code == 400 and EVIL not in response.text
        response = http.delete("/api/models/x/1", headers={"Host": EVIL})
        assert response.status_code == 400


def test_a_simple_request_is_refused_by_a_real_server(rebinding: tuple[LiveServer, pydicom.Dataset]) -> None:
    server, instance = rebinding
    values = {"name": "x", "version": "1", "study_instance_uid": str(instance.StudyInstanceUID), "job_id": "1"}
    cross_site = {"Content-Type": "text/plain", "Origin": f"http://{EVIL}"}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for method, path in state_changing_routes(server.app, values):
            response = http.request(method, path, content=b"x" * 100, headers=cross_site)
            assert response.status_code == 401, f"{method} {path}: {response.status_code}"
    with server.app.state.store.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1, "nothing stored"


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is on a new connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_a_missing_or_malformed_host_is_refused_on_the_wire(rebinding: tuple[LiveServer, pydicom.Dataset]) -> None:
    server, _ = rebinding
    for request in (
        b"GET /dicomweb/studies HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs no Host: none is not ours
        b"GET /dicomweb/studies HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1@evil.example\r\nConnection: close\r\n\r\n",
        b"GET /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:80:80\r\nConnection: close\r\n\r\n",
        b"GET http://127.0.0.1/dicomweb/studies HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    ):
        answer = raw_request(server.port, request)
        assert answer.startswith(b"HTTP/1.1 400 "), (request, answer[:200])
        assert PATIENT.encode() not in answer
    ok = raw_request(server.port, b"GET /dicomweb/studies HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ") and PATIENT.encode() in ok


# --- RetrieveURL ---------------------------------------------------------------------------------------------


def test_retrieve_urls_name_only_allowed_hosts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", http=http_settings(allowed_hosts=["gateway.example.org"]))
    allowed = allowed_hosts(settings.http)
    hosts = ["localhost", "127.0.0.1:{port}", "[::1]:{port}", "GATEWAY.example.org", "gateway.example.org:443"]
    foreign = [EVIL, "gateway.example.org.evil.example", "evil.example:{port}", "127.0.0.1@evil.example", "a b"]
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, headers=ADMIN, timeout=10) as http:
        for n, host in enumerate(hosts + foreign):
            header = host.format(port=server.port)
            path = minimal_ct(tmp_path / f"{n}.dcm")
            body, headers = stow(path)
            stored = http.post("/dicomweb/studies", content=body, headers={**headers, "Host": header})
            found = http.get("/dicomweb/studies", headers={"Host": header})
            if host in foreign:
                assert stored.status_code == found.status_code == 400, header
                continue
            assert stored.status_code == 200, stored.text
            (referenced,) = stored.json()["00081199"]["Value"]  # ReferencedSOPSequence
            urls = [referenced["00081190"]["Value"][0]]  # its RetrieveURL
            urls += [study["00081190"]["Value"][0] for study in found.json()]
            for url in urls:
                assert host_name(urlsplit(url).netloc) in allowed, url
                assert urlsplit(url).netloc.lower() == header.lower(), url


def test_host_names_are_parsed_as_rfc_9110_says() -> None:
    assert host_name("LocalHost:8080") == "localhost"
    assert host_name("localhost.") == "localhost"
    assert host_name("[0:0::1]:80") == "[::1]"
    assert host_name("[::1]") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1"
    for bad in ("", ":80", "a b", "[::1", "[nothost]", "host:port", "host:", "h@evil", "::1", "host:123456"):
        assert host_name(bad) is None, bad


def test_allowed_hosts_are_the_defaults_the_bound_address_and_the_configured_names() -> None:
    assert allowed_hosts(HttpSettings()) == {"localhost", "127.0.0.1", "[::1]"}
    tokens = http_settings().tokens
    http = HttpSettings(host="10.0.0.5", tokens=tokens, allowed_hosts=["PACS-GW.example.org", "fe80::1", "gw:8443"])
    assert allowed_hosts(http) == {
        "localhost",
        "127.0.0.1",
        "[::1]",
        "10.0.0.5",
        "pacs-gw.example.org",
        "[fe80::1]",
        "gw",
    }
    assert allowed_hosts(HttpSettings(host="0.0.0.0", tokens=tokens)) == {"localhost", "127.0.0.1", "[::1]"}


def test_a_malformed_allowed_host_stops_the_app(tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    settings: Settings = make_settings(tmp_path / "data", http=http_settings(allowed_hosts=["not a name"]))
    with pytest.raises(ConfigError, match="not a name"):
        create_app(settings)
