"""The workers page, ``/ui/workers``: the processes sharing the index, alive and gone, what each holds, linked from
every page's navigation; and the page in a real browser (Debian's Chromium), saved as ``ui-workers.png`` (in
``GATEWAY_PICTURES=DIR`` when set, as tests/ui/test_journeys.py saves its pages)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from gateway.config import ClusterSettings
from gateway.jobs import lifecycle
from gateway.jobs.presence import announce, heartbeat, stopped
from gateway.store.index import Delivery

from browser import new_page, open_browser, shoot, sign_in
from conftest import LiveServer
from ui_data import TOKENS, add_delivery, add_job, bearer, ui_client, ui_settings

OURS = ("gpu-node-1/4711/a1b2c3d4", "gpu-node-2/802/e5f6a7b8", "web-1/93/c9d0e1f2", "export-1/311/0a1b2c3d")


def add_processes(store: Any) -> None:
    """Four processes: a GPU worker alive holding a job, one silent for a minute (a crash), an ingest process
    stopped, and an export process alive sending a delivery."""
    now = time.time()
    announce(store, OURS[0], roles=["worker"], device="cuda:0", models=["ct-lung-nodules"], now=now - 3600)
    announce(store, OURS[1], roles=["worker"], device="cuda:1", models=None, now=now - 7200)
    announce(store, OURS[2], roles=["ingest"], device=None, models=None, now=now - 600)
    announce(store, OURS[3], roles=["export"], device=None, models=None, now=now - 600)
    heartbeat(store, OURS[0], now=now - 2)
    heartbeat(store, OURS[1], now=now - 60)
    heartbeat(store, OURS[2], now=now - 34)
    heartbeat(store, OURS[3], now=now - 1)
    stopped(store, OURS[2], now=now - 30)
    job = add_job(store)
    assert lifecycle.claim(store, OURS[0], 600.0, max_attempts=3) is not None
    sending = add_delivery(store, job, state="sending")
    with store.write_sessions.begin() as session:
        session.execute(update(Delivery).where(Delivery.id == sending).values(claim_owner=OURS[3]))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    settings = ui_settings(tmp_path / "data", cluster=ClusterSettings(heartbeat_s=5.0))
    with ui_client(settings, headers=bearer(TOKENS["read"])) as test_client:
        yield test_client


def test_the_page_lists_processes_alive_first_and_the_gone_ones_marked(client: Any) -> None:
    add_processes(client.app.state.store)
    page = client.get("/ui/workers")
    assert page.status_code == 200
    text = page.text
    assert 'aria-current="page">Workers</a>' in text
    rows = text.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]
    ours = {owner: next(r for r in rows if owner in r) for owner in OURS}
    assert rows.index(ours[OURS[0]]) < rows.index(ours[OURS[1]]), "the living first"
    assert 'badge ok">alive' in ours[OURS[0]] and "cuda:0" in ours[OURS[0]] and "ct-lung-nodules" in ours[OURS[0]]
    assert "<td>1</td>" in ours[OURS[0]], "the job it holds"
    assert 'badge bad">silent' in ours[OURS[1]] and "problem-failed" in ours[OURS[1]] and "every model" in ours[OURS[1]]
    assert 'badge warn">stopped' in ours[OURS[2]] and "runs no models" in ours[OURS[2]]
    assert 'badge ok">alive' in ours[OURS[3]] and "<td>0</td>\n      <td>1</td>" in ours[OURS[3]], "1 sending"
    assert 'hx-trigger="every 10s"' in text


def test_every_page_links_to_the_workers_page_and_it_needs_a_sign_in(client: Any) -> None:
    for path in ("/ui", "/ui/jobs", "/ui/destinations"):
        assert 'href="/ui/workers"' in client.get(path).text, path
    assert client.get("/ui/workers", headers={"Authorization": ""}).status_code == 401


@pytest.mark.slow
def test_the_page_in_a_browser(tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (make test installs it)")
    with LiveServer(ui_settings(tmp_path / "data")) as server, open_browser() as browser:
        add_processes(server.app.state.store)
        with new_page(browser, server.url) as page:
            sign_in(page, TOKENS["read"], "/ui/workers")
            png = Path(os.environ.get("GATEWAY_PICTURES") or tmp_path) / "ui-workers.png"
            shoot(page, "/ui/workers", png)
            assert png.stat().st_size > 10_000
            assert page.locator("tbody tr").count() >= len(OURS)
            assert page.locator("nav a[aria-current=page]").inner_text() == "Workers"
            assert page.problems == []  # type: ignore[attr-defined]
