"""Helpers for the web UI's tests (not a test module): tokens of each scope, a client signed in as a browser is,
and jobs written straight into an index (tests/job_rows.py)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starlette.exceptions import StarletteDeprecationWarning

from gateway.config import HttpSettings, Scope, Settings, TokenSettings, hash_token

from conftest import make_settings
from job_rows import add_delivery, add_job, routing

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

    from gateway.api.app import create_app


__all__ = ["TOKENS", "add_delivery", "add_job", "bearer", "csrf_of", "routing", "sign_in", "ui_client", "ui_settings"]

TOKENS: dict[Scope, str] = {
    "read": "ui-read-token-5d1e0b7c3a9f4e62b8d1",
    "write": "ui-write-token-0c2b6f1e8d7a4395a2c4",
    "admin": "ui-admin-token-7a9e4c2d1b0f4d83b6e5",
}
_CSRF = re.compile(r'"X-CSRF-Token": "([A-Za-z0-9_-]+)"')


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ui_settings(data_dir: Path, **sections: Any) -> Settings:
    """Test settings with a token of each scope (named ``read-user``, ``write-user``, ``admin-user``)."""
    tokens = [TokenSettings(name=f"{s}-user", sha256=hash_token(t), scopes=[s]) for s, t in TOKENS.items()]
    sections.setdefault("http", HttpSettings(host="127.0.0.1", port=0, tokens=tokens))
    return make_settings(data_dir, **sections)


@contextmanager
def ui_client(settings: Settings, **kwargs: Any) -> Iterator[TestClient]:
    """A client of a running app as a browser is: no ``Authorization`` header (unless ``headers`` has one), cookies
    kept."""
    kwargs.setdefault("base_url", "http://localhost")  # an allowed Host, as api_client's
    kwargs.setdefault("headers", {})
    with TestClient(create_app(settings, start_dimse=False), **kwargs) as client:
        yield client


def csrf_of(html: str) -> str:
    """The CSRF token a page carries (what htmx sends back as ``X-CSRF-Token``)."""
    found = _CSRF.search(html)
    assert found is not None, "the page carries no CSRF token"
    return found[1]


def sign_in(client: TestClient, token: str, next_path: str = "/ui") -> str:
    """Sign in with the form as htmx sends it; return the CSRF token of the page signed in to."""
    page = client.get(f"/ui/login?next={next_path}")
    response = client.post(
        "/ui/login",
        data={"token": token, "next": next_path},
        headers={"X-CSRF-Token": csrf_of(page.text), "HX-Request": "true"},
    )
    assert response.status_code == 200 and response.headers["HX-Redirect"] == next_path, response.text
    landed = client.get(next_path)
    assert landed.status_code == 200, landed.text
    return csrf_of(landed.text)
