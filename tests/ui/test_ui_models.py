"""The models page: the registry as the API lists it, and an admin's upload, enable and disable."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from model_packages import manifest_dict, write_package, zip_folder
from monai_bundles import spleen_bundle, spleen_weights
from ui_data import TOKENS, add_job, bearer, routing, ui_client, ui_settings

ADMIN = bearer(TOKENS["admin"])


@pytest.fixture
def client(tmp_path: Path) -> Any:
    with ui_client(ui_settings(tmp_path / "data"), headers=ADMIN) as test_client:
        yield test_client


def package(tmp_path: Path, version: str = "1.0.0") -> bytes:
    folder = write_package(tmp_path / f"pkg-{version}", manifest_dict(version=version))
    return zip_folder(folder, folder.with_suffix(".zip")).read_bytes()


def upload(client: Any, data: bytes, name: str = "tiny.zip") -> Any:
    return client.post("/ui/models/upload", files={"package": (name, io.BytesIO(data), "application/zip")})


def test_upload_enable_and_disable_from_the_page(client: Any, tmp_path: Path) -> None:
    assert "No model is registered" in client.get("/ui/models").text
    first = upload(client, package(tmp_path))
    assert first.status_code == 201 and "tiny-seg@1.0.0 is registered and enabled" in first.text, first.text
    again = upload(client, package(tmp_path))
    assert again.status_code == 200 and "was registered already" in again.text
    second = upload(client, package(tmp_path, "1.1.0"))
    assert second.status_code == 201, second.text

    registry = client.app.state.gateway.registry
    by_ref = {m.ref: m for m in registry.list()}
    page = client.get("/ui/models").text
    assert by_ref["tiny-seg@1.0.0"].sha256[:16] in page and "passed" in page
    assert "<code>modality</code>" in page, "the selection rules are shown"
    other = next(m for m in registry.list() if not m.active)
    assert f'hx-post="/ui/models/tiny-seg/{other.version}/enable"' in page, "a version that is not the active one"

    switched = client.post(f"/ui/models/tiny-seg/{other.version}/enable")
    assert switched.status_code == 200 and f"{other.ref} is enabled" in switched.text
    assert registry.get("tiny-seg").version == other.version
    disabled = client.post("/ui/models/tiny-seg/disable")
    assert disabled.status_code == 200 and "tiny-seg is disabled" in disabled.text
    assert not any(m.enabled for m in registry.list())
    assert client.post("/ui/models/tiny-seg/9.9.9/enable").status_code == 404


def test_a_bad_upload_says_why_and_registers_nothing(client: Any, tmp_path: Path) -> None:
    not_archive = upload(client, b"this is not a zip archive at all")
    assert not_archive.status_code == 400 and "not a .zip or .tar.gz archive" in not_archive.text
    broken = write_package(tmp_path / "broken", manifest_dict(description=""))
    refused = upload(client, zip_folder(broken, tmp_path / "broken.zip").read_bytes())
    assert refused.status_code == 422 and "description" in refused.text
    assert str(tmp_path) not in refused.text, "no server path in the reason"
    empty = client.post("/ui/models/upload", files={"other": ("x", io.BytesIO(b"x"), "text/plain")})
    assert empty.status_code == 400 and "choose a .zip or .tar.gz" in empty.text
    assert client.app.state.gateway.registry.list() == []
    assert list((client.app.state.store.data_dir / "tmp").glob("*")) == [], "nothing staged is left behind"


def test_an_upload_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    from gateway.config import ModelsSettings

    settings = ui_settings(tmp_path / "data", models=ModelsSettings(register_shipped=False, max_upload_bytes=1000))
    with ui_client(settings, headers=ADMIN) as client:
        response = upload(client, b"PK\x03\x04" + b"0" * (80 << 10))
        assert response.status_code == 413 and "models.max_upload_bytes" in response.text


def test_write_and_read_tokens_see_the_registry_without_its_buttons(client: Any, tmp_path: Path) -> None:
    assert upload(client, package(tmp_path)).status_code == 201
    for scope in ("read", "write"):
        page = client.get("/ui/models", headers=bearer(TOKENS[scope])).text
        assert "tiny-seg" in page and "Upload and register" not in page and "/disable" not in page, scope
        refused = client.post("/ui/models/tiny-seg/disable", headers=bearer(TOKENS[scope]))
        assert refused.status_code == 403, scope
    assert any(m.enabled for m in client.app.state.gateway.registry.list())


def test_each_models_latency_and_counts_are_shown(client: Any, tmp_path: Path) -> None:
    assert upload(client, package(tmp_path)).status_code == 201
    store = client.app.state.store
    for _ in range(3):
        add_job(store, state="exported", detail={"inference": routing("tiny-seg@1.0.0")})
    page = client.get("/ui/models").text
    row = re.search(r"<code>1.0.0</code>.*?</tr>", page, re.S)
    assert row is not None
    cells = re.findall(r'<td class="num">([^<]*)</td>', row[0])
    assert cells[:1] == ["3"] and cells[-2:] == ["1.00 s", "1.00 s"], cells


def test_a_bundle_as_it_comes_is_uploaded_from_the_page_and_says_how_it_runs(client: Any, tmp_path: Path) -> None:
    """The data scientist's model-zoo download, zipped as it is, registers from the page; the page says the bundle's
    own pipeline runs."""
    weights = tmp_path / "weights"
    weights.mkdir()
    bundle = spleen_bundle(tmp_path, spleen_weights(weights))
    archive = zip_folder(bundle, tmp_path / "spleen.zip", top=bundle.name)
    assert "MONAI model-zoo bundle" in client.get("/ui/models").text, "the upload form says bundles are welcome"
    done = upload(client, archive.read_bytes(), "spleen.zip")
    assert done.status_code == 201 and "spleen_ct_segmentation@0.5.9 is registered and enabled" in done.text, done.text
    page = client.get("/ui/models").text
    assert "the bundle's own preprocessing, inferer and postprocessing" in page
