"""What the pages load comes from the gateway itself: vendored htmx, the stylesheet, and Swagger UI for /docs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.ui.assets import STATIC_DIR

from ui_data import TOKENS, bearer, sign_in, ui_client, ui_settings

HTMX_VERSION = "2.0.11"
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"


@pytest.fixture
def client(tmp_path: Path) -> Any:
    with ui_client(ui_settings(tmp_path / "data")) as test_client:
        yield test_client


def test_docs_reference_no_other_host_and_their_assets_load(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert urls, page.text
    assert not re.search(r"https?://", page.text), "no absolute URL: nothing is loaded from another host"
    for url in urls:
        assert urlsplit(url).netloc == "" and url.startswith("/"), url
        if url == "/openapi.json":
            continue
        response = client.get(url)
        assert response.status_code == 200 and len(response.content) > 1000, url
    assert '"validatorUrl": null' in page.text, "no validator badge fetched from its host"


def test_the_schema_needs_read_and_a_signed_in_browser_has_it(client: Any) -> None:
    assert client.get("/openapi.json").status_code == 401
    sign_in(client, TOKENS["read"])
    schema = client.get("/openapi.json").json()
    assert "/api/jobs" in schema["paths"] and not any(p.startswith("/ui") for p in schema["paths"])


def test_htmx_is_the_vendored_release_with_its_licence(client: Any) -> None:
    script = client.get("/ui/static/htmx.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert hashlib.sha256(script.content).hexdigest() == HTMX_SHA256
    assert f'version:"{HTMX_VERSION}"' in script.text
    assert "Zero-Clause BSD" in (STATIC_DIR / "htmx.LICENSE").read_text()
    readme = (STATIC_DIR / "README.md").read_text()
    assert HTMX_VERSION in readme and HTMX_SHA256 in readme


def test_pages_load_their_script_and_stylesheet_from_the_gateway(client: Any) -> None:
    page = client.get("/ui/login")
    for url in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text):
        assert client.get(url).status_code == 200, url
    assert '<script src="/ui/static/htmx.min.js' in page.text
    assert client.get("/ui/static/ui.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("name", ["nope.js", "..%2Fsession.py", "README.md", "htmx.LICENSE"])
def test_only_the_listed_files_are_served(client: Any, name: str) -> None:
    assert client.get(f"/ui/static/{name}").status_code == 404
    assert client.get(f"/docs/assets/{name}").status_code == 404


def test_static_files_need_no_token_and_pages_do(client: Any) -> None:
    assert client.get("/ui/static/ui.css").status_code == 200
    assert client.get("/ui/jobs").status_code == 401
    assert client.get("/ui/jobs", headers=bearer(TOKENS["read"])).status_code == 200
