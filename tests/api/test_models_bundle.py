"""``POST /api/models`` with a MONAI model-zoo bundle as it comes: no ``model.yaml``, its manifest synthesised."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from gateway.config import Settings

from conftest import api_client
from model_packages import zip_folder
from monai_bundles import spleen_bundle, spleen_weights

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app

ZIP = {"Content-Type": "application/zip"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with api_client(create_app(settings, start_dimse=False)) as test_client:
        yield test_client


def test_upload_a_bare_bundle(client: TestClient, tmp_path: Path) -> None:
    bundle = spleen_bundle(tmp_path / "src", spleen_weights(tmp_path))
    archive = zip_folder(bundle, tmp_path / "bundle.zip", top=bundle.name)
    response = client.post("/api/models", content=archive.read_bytes(), headers=ZIP)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ref"] == "spleen_ct_segmentation@0.5.9" and body["backend"] == "monai-bundle"
    manifest = body["manifest"]
    assert manifest["inference"]["pipeline"] == "bundle" and manifest["select"]["modality"] == ["CT"]
    assert manifest["outputs"]["segmentation"]["labels"][0]["type"]["value"] == "78961009"

    flat = zip_folder(bundle, tmp_path / "flat.zip")
    refused = client.post("/api/models", content=flat.read_bytes(), headers=ZIP)
    assert refused.status_code == 422 and "its folder name is unknown" in refused.json()["detail"], refused.text
    assert str(tmp_path) not in refused.text
