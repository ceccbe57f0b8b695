"""``/api/models``: list, show, upload (limits, bad packages, conflicts), enable, disable, remove, scopes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.exceptions import StarletteDeprecationWarning

from gateway.config import ModelsSettings, Settings, StoreSettings
from gateway.registry.registry import Registry, RegistryIndex

from conftest import ADMIN, LiveServer, api_client, make_settings
from model_packages import manifest_dict, onnx_model, tar_folder, write_package, zip_folder

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

from test_auth import TOKENS, bearer, tokens_http

ZIP = {"Content-Type": "application/zip"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(create_app(settings, start_dimse=False)) as test_client:
        yield test_client


def archive(tmp_path: Path, version: str = "1.0.0", name: str = "tiny-seg", **kwargs: object) -> bytes:
    folder = write_package(tmp_path / f"{name}-{version}", manifest_dict(name, version), **kwargs)
    return zip_folder(folder, tmp_path / f"{name}-{version}.zip").read_bytes()


def test_upload_list_and_show(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/api/models").json() == []
    response = client.post("/api/models", content=archive(tmp_path), headers=ZIP)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ref"] == "tiny-seg@1.0.0" and body["active"] and body["enabled"]
    assert body["dry_run"]["output_shape"] == [1, 3, 8, 16, 16]
    assert body["manifest"]["inference"]["patch_size"] == [8, 16, 16]
    again = client.post("/api/models", content=archive(tmp_path), headers=ZIP)
    assert again.status_code == 200 and again.json()["sha256"] == body["sha256"], "idempotent"

    listed = client.get("/api/models").json()
    assert [(m["ref"], m["active"], m["backend"]) for m in listed] == [("tiny-seg@1.0.0", True, "onnx")]
    assert "manifest" not in listed[0]
    shown = client.get("/api/models/tiny-seg").json()
    assert shown["ref"] == "tiny-seg@1.0.0" and [v["version"] for v in shown["versions"]] == ["1.0.0"]
    assert client.get("/api/models/tiny-seg/1.0.0").json()["manifest"]["name"] == "tiny-seg"
    assert client.get("/api/models/nothing").status_code == 404
    assert client.get("/api/models/tiny-seg/9").json() == {"detail": "no model tiny-seg@9"}


def test_upload_a_tar_gz(client: TestClient, tmp_path: Path) -> None:
    folder = write_package(tmp_path / "pkg", manifest_dict())
    body = tar_folder(folder, tmp_path / "pkg.tar.gz", top="pkg").read_bytes()
    response = client.post("/api/models", content=body, headers={"Content-Type": "application/gzip"})
    assert response.status_code == 201, response.text


def test_refused_uploads(client: TestClient, tmp_path: Path) -> None:
    registered = client.post("/api/models", content=archive(tmp_path), headers=ZIP)
    assert registered.status_code == 201

    data = manifest_dict(version="2.0.0", inferense={})
    bad = zip_folder(write_package(tmp_path / "bad", data), tmp_path / "bad.zip").read_bytes()
    response = client.post("/api/models", content=bad, headers=ZIP)
    assert response.status_code == 422 and "inferense" in response.json()["detail"]

    other = archive(tmp_path / "other", weights=onnx_model(3, seed=7))
    response = client.post("/api/models", content=other, headers=ZIP)
    assert response.status_code == 409 and "already registered with other weights" in response.json()["detail"]

    mismatch = archive(tmp_path, version="3.0.0", out_channels=5)
    response = client.post("/api/models", content=mismatch, headers=ZIP)
    assert response.status_code == 422
    assert (
        response.json()["detail"]
        == "dry run: output has 5 channels, the manifest declares 2 labels, values up to 2 (needs 3)"
    )

    response = client.post("/api/models", content=b"just some text", headers=ZIP)
    assert response.status_code == 400 and "not a .zip or .tar.gz" in response.json()["detail"]
    assert client.post("/api/models", headers=ZIP).status_code == 400, "empty body"
    form = client.post("/api/models", files={"file": ("m.zip", archive(tmp_path), "application/zip")})
    assert form.status_code == 415
    for media_type in (None, "text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        headers = {} if media_type is None else {"Content-Type": media_type}
        response = client.post("/api/models", content=archive(tmp_path, "4.0.0"), headers=headers)
        assert response.status_code == 415, f"{media_type}: only archive media types are accepted"
        assert "application/zip" in response.json()["detail"]

    assert [m["ref"] for m in client.get("/api/models").json()] == ["tiny-seg@1.0.0"]
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    assert list((tmp_path / "data" / "models" / ".staging").iterdir()) == []


def test_refusals_name_no_server_path(client: TestClient, tmp_path: Path) -> None:
    folder = write_package(tmp_path / "broken", manifest_dict())
    (folder / "model.yaml").write_text("name: [unclosed\n", encoding="utf-8")
    response = client.post("/api/models", content=zip_folder(folder, tmp_path / "b.zip").read_bytes(), headers=ZIP)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "model.yaml" in detail and "not valid YAML" in detail
    data_dir = str(client.app.state.settings.store.data_dir)  # type: ignore[attr-defined]
    assert data_dir not in detail and str(tmp_path) not in detail and "/tmp/" not in detail, detail


def test_upload_below_the_free_space_watermark_is_507(tmp_path: Path) -> None:
    full = make_settings(tmp_path / "data", store=StoreSettings(data_dir=tmp_path / "data", min_free_bytes=1 << 62))
    with api_client(create_app(full, start_dimse=False)) as client:
        response = client.post("/api/models", content=archive(tmp_path), headers=ZIP)
        assert response.status_code == 507, response.text
        assert "store.min_free_bytes" in response.json()["detail"]
        chunks = iter([archive(tmp_path)])  # no Content-Length
        assert client.post("/api/models", content=chunks, headers=ZIP).status_code == 507
        assert client.get("/api/models").json() == []
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    small = make_settings(tmp_path / "data", models=ModelsSettings(max_upload_bytes=500, register_shipped=False))
    body = archive(tmp_path)
    assert len(body) > 500
    with api_client(create_app(small, start_dimse=False)) as client:
        response = client.post("/api/models", content=body, headers=ZIP)
        assert response.status_code == 413 and "500 bytes" in response.json()["detail"]
        chunks = iter([body[:400], body[400:]])  # no Content-Length: counted as it arrives
        response = client.post("/api/models", content=chunks, headers=ZIP)
        assert response.status_code == 413
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


def test_enable_disable_remove(client: TestClient, tmp_path: Path) -> None:
    for version in ("1.0.0", "2.0.0"):
        assert client.post("/api/models", content=archive(tmp_path, version), headers=ZIP).status_code == 201
    assert client.get("/api/models/tiny-seg").json()["version"] == "2.0.0"
    enabled = client.post("/api/models/tiny-seg/1.0.0/enable")
    assert enabled.status_code == 200 and enabled.json()["active"]
    assert client.get("/api/models/tiny-seg").json()["version"] == "1.0.0"
    disabled = client.post("/api/models/tiny-seg/disable").json()
    assert [m["enabled"] for m in disabled] == [False, False]
    assert client.app.state.gateway.registry.active() == []  # type: ignore[attr-defined]
    assert client.post("/api/models/tiny-seg@1.0.0/disable").status_code == 400
    removed = client.delete("/api/models/tiny-seg/1.0.0")
    assert removed.status_code == 200 and removed.json()["ref"] == "tiny-seg@1.0.0"
    assert [m["ref"] for m in client.get("/api/models").json()] == ["tiny-seg@2.0.0"]
    assert client.get("/api/models/tiny-seg").json()["active"]
    assert client.delete("/api/models/tiny-seg/1.0.0").status_code == 404
    assert client.post("/api/models/nothing/1/enable").status_code == 404
    assert client.post("/api/models/nothing/disable").status_code == 404


def test_scopes(tmp_path: Path) -> None:
    secured = make_settings(tmp_path / "data", http=tokens_http())
    body = archive(tmp_path)
    with api_client(create_app(secured, start_dimse=False), headers={}) as client:
        assert client.get("/api/models").status_code == 401
        assert client.get("/api/models", headers=bearer(TOKENS["read"])).status_code == 200
        refused = client.post("/api/models", content=body, headers={**ZIP, **bearer(TOKENS["read"])})
        assert refused.status_code == 403 and "'write' scope" in refused.json()["detail"]
        refused = client.post("/api/models", content=body, headers={**ZIP, **bearer(TOKENS["write"])})
        assert refused.status_code == 403 and "'admin' scope" in refused.json()["detail"]
        for method, path in (("POST", "/api/models/tiny-seg/1.0.0/enable"), ("DELETE", "/api/models/tiny-seg/1.0.0")):
            assert client.request(method, path, headers=bearer(TOKENS["write"])).status_code == 403
        admin = client.post("/api/models", content=body, headers={**ZIP, **bearer(TOKENS["admin"])})
        assert admin.status_code == 201
        assert client.get("/api/models/tiny-seg", headers=bearer(TOKENS["read"])).status_code == 200


def test_a_model_registered_beside_the_server_is_served(settings: Settings, tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", manifest_dict())
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, headers=ADMIN) as http:
        assert http.get("/api/models").json() == []
        index = RegistryIndex(settings.store)  # what `gateway models register` does while the gateway runs
        try:
            Registry(index).register(package)
        finally:
            index.close()
        (model,) = http.get("/api/models").json()
        assert model["ref"] == "tiny-seg@1.0.0" and model["active"]
        assert [m.ref for m in server.app.state.gateway.registry.active()] == ["tiny-seg@1.0.0"]
        stream = http.post("/api/models", content=iter([archive(tmp_path, "2.0.0")]), headers=ZIP)
        assert stream.status_code == 201, stream.text
        stored = Path(settings.store.data_dir) / "models" / "tiny-seg" / "2.0.0" / "model.yaml"
        assert yaml.safe_load(stored.read_text())["version"] == "2.0.0"


def test_shipped_models_start_disabled_and_are_enabled_on_purpose(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    write_package(shipped / "tiny-seg", manifest_dict())
    settings = make_settings(tmp_path / "data", models=ModelsSettings(shipped_dir=shipped))
    with api_client(create_app(settings, start_dimse=False)) as client:
        (model,) = client.get("/api/models").json()
        assert model["ref"] == "tiny-seg@1.0.0" and model["active"] and not model["enabled"]
        registry = client.app.state.gateway.registry  # type: ignore[attr-defined]
        assert registry.active() == [], "a shipped demonstration model does not speak unless enabled"
        assert client.post("/api/models/tiny-seg/1.0.0/enable").json()["enabled"]
        assert [m.ref for m in registry.active()] == ["tiny-seg@1.0.0"]
    with api_client(create_app(settings, start_dimse=False)) as client:  # restarted: the operator's choice stands
        assert [m["enabled"] for m in client.get("/api/models").json()] == [True]
        assert client.delete("/api/models/tiny-seg/1.0.0").status_code == 200
    with api_client(create_app(settings, start_dimse=False)) as client:  # and so does a removal
        assert client.get("/api/models").json() == []
        upload = archive(tmp_path)  # the same package uploaded on purpose: registered (and enabled) again
        assert client.post("/api/models", content=upload, headers=ZIP).json()["enabled"]


def test_an_admin_upload_may_trust_a_bundles_code_and_says_which_token(client: TestClient, tmp_path: Path) -> None:
    from model_packages import UNET, bundle_package

    marker = tmp_path / "ran"
    setup = f"$__import__('pathlib').Path('{marker}').write_text(str(__import__('os').getpid()))"
    config = {"setup": setup, "network_def": {**UNET, "_requires_": "@setup"}}
    folder = bundle_package(tmp_path / "trusted", config, trust_code=True)
    body = zip_folder(folder, tmp_path / "trusted.zip").read_bytes()
    response = client.post("/api/models", content=body, headers=ZIP)
    assert response.status_code == 201, response.text
    assert response.json()["dry_run"]["code_allowed_by"].startswith("admin token ")
    assert int(marker.read_text()) != os.getpid(), "the bundle's code ran in the dry run's child, not the server"
