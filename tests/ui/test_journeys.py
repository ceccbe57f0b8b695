"""What people do with the web UI, in a real browser (Debian's Chromium, driven by Playwright), against a real
``gateway serve`` process and a real PACS (Orthanc) that routes a study to it and gets the results back.

One journey, in the order a new site lives it: an operator signs in; a synthetic chest CT goes from the PACS to the
gateway and its job appears on the overview; the radiologist's page shows the report and an outlined slice, and
steps to the next one; the PACS goes down while the results are sent again, the deliveries give up, the PACS comes
back, and the operator retries them from the job's page; the job is re-run from assembly; a data scientist uploads
a model package and enables it. With ``GATEWAY_PICTURES=DIR`` (``make pictures``) the pages are also saved there
as PNGs for the README.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.synth.ct import VolumeGeometry, place_nodules, write_synthetic_ct

from browser import new_page, open_browser, sign_in
from conftest import require_tool
from model_packages import tar_folder, write_package
from peers import ADMIN, ADMIN_TOKEN, GATEWAY_SCRIPT, GatewayServer, OrthancOn, free_port, orthanc_binary

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api", reason="playwright not installed (make test installs it)").expect

SLICES, SIZE = 48, 160
MODEL = "ct-nodule-unet"
PICTURES = os.environ.get("GATEWAY_PICTURES")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic chest CT with one nodule of 8-10 mm radius."""
    folder = tmp_path_factory.mktemp("study")
    geometry = VolumeGeometry((SLICES, SIZE, SIZE), (360 / SIZE, 360 / SIZE), 2.5)
    nodules = place_nodules(geometry, 1, np.random.default_rng(21), radius_range_mm=(8.0, 10.0))
    write_synthetic_ct(folder, SLICES, rows=SIZE, columns=SIZE, seed=21, nodules=nodules)
    return folder


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[GatewayServer, OrthancOn]]:
    """A gateway whose results go back to the PACS that sent the study (C-STORE), and that PACS, both running."""
    if orthanc_binary() is None:
        require_tool("Orthanc")
    pacs_http, pacs_dicom = free_port(), free_port()
    export = {
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_dicom}},
        "return_to_sender": {"ORTHANC": "pacs"},
        "backoff_initial_s": 0.2,
        "backoff_max_s": 0.5,
        "give_up_after_s": 3,  # an outage longer than 3 s kills a delivery ...
        "check_interval_s": 3600,  # ... and no background check revives it: the operator's retry does
        "poll_s": 0.1,
    }
    gateway = GatewayServer(
        tmp_path / "gateway",
        tmp_path / "data",
        {
            "ingest": {"quiet_period_s": 1.0, "resend_wait_s": 0},
            "jobs": {"workers": 1, "poll_s": 0.1},
            "export": export,
            "retention": {"disk_high_watermark": 1.0, "disk_low_watermark": 1.0},
        },
    )
    enabled = subprocess.run(
        [str(GATEWAY_SCRIPT), "models", "enable", MODEL, "--config", str(gateway.config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
    )
    assert enabled.returncode == 0, enabled.stderr
    pacs = OrthancOn(
        tmp_path / "pacs", pacs_http, pacs_dicom, modalities={"gateway": ("GATEWAY", "127.0.0.1", gateway.dicom_port)}
    )
    with gateway, pacs:
        yield gateway, pacs


@pytest.fixture
def browser() -> Iterator[Any]:
    with open_browser() as launched:
        yield launched


def test_an_operator_a_radiologist_and_a_data_scientist_use_the_ui(
    site: tuple[GatewayServer, OrthancOn], study: Path, browser: Any, tmp_path: Path
) -> None:
    gateway, pacs = site
    base = f"http://localhost:{gateway.http_port}"
    with new_page(browser, base) as page:
        # Sign in.
        sign_in(page, ADMIN_TOKEN)
        assert page.locator("text=Signed in as").is_visible()

        # A study arrives from the PACS; its job shows up on the overview, which refreshes itself.
        for path in sorted(study.glob("*.dcm")):
            pacs.rest("POST", "/instances", path.read_bytes())
        (study_id,) = pacs.rest("GET", "/studies")
        pacs.rest("POST", "/modalities/gateway/store", {"Resources": [study_id], "Synchronous": True})
        exported = page.locator("li", has=page.locator('a[href="/ui/jobs?state=exported"]')).locator("strong")
        expect(exported).to_have_text("1", timeout=180_000)
        picture(page, "ui-overview")
        page.click('a[href="/ui/jobs"]')
        page.wait_for_url("**/ui/jobs")
        job_id = int(page.locator("tbody tr a[href^='/ui/jobs/']").first.get_attribute("href").rsplit("/", 1)[1])
        picture(page, "ui-jobs")
        page.click(f"a[href='/ui/jobs/{job_id}']")
        page.wait_for_url(f"**/ui/jobs/{job_id}")
        assert page.locator("h1 .badge").inner_text() == "exported"
        assert page.locator(".badge.ok", has_text="ran").first.is_visible(), (
            "the routing decision of the model that ran"
        )
        picture(page, "ui-job")
        assert _results_in(pacs) >= {"SEG", "SR"}

        # The radiologist's page: the report with rounded measurements and units, and the outlined key slice.
        page.click("text=Results for the radiologist")
        page.wait_for_url(f"**/ui/jobs/{job_id}/results")
        findings = page.locator("table.findings").inner_text()
        assert " ml" in findings and " mm" in findings, findings
        overlay = page.locator("figure.preview img").first
        overlay.scroll_into_view_if_needed()
        expect(overlay).to_have_js_property("complete", True)
        assert overlay.evaluate("img => img.naturalWidth") >= 256, "the overlay PNG was decoded"
        key_src = overlay.get_attribute("src")
        picture(page, "ui-results")
        page.locator("figure.preview").first.locator("text=next →").click()
        expect(page.locator("figure.preview img").first).not_to_have_attribute("src", key_src, timeout=10_000)

        # The PACS goes down while the results are sent again: the deliveries give up, the job fails.
        pacs.rest("DELETE", f"/studies/{study_id}")
        pacs.stop()
        _job_page(page, job_id)
        page.on("dialog", lambda dialog: dialog.accept())
        page.select_option("select[name=from_stage]", "export")
        with page.expect_response(lambda r: r.url.endswith("/rerun")) as answer:
            page.get_by_role("button", name="Re-run").click()
        assert answer.value.ok, answer.value.status
        answer.value.finished()  # the body too, before the page is left
        _wait_state(page, job_id, "failed")
        assert page.locator("text=dead").first.is_visible()
        picture(page, "ui-job-failed")
        # The PACS is back; the operator retries the dead deliveries from the job's page.
        pacs.start()
        with page.expect_response(lambda r: r.url.endswith("/retry")) as answer:
            page.click("text=Retry dead deliveries")
        assert answer.value.ok, answer.value.status
        answer.value.finished()  # the body too, before the page is left
        _wait_state(page, job_id, "exported")
        assert _results_in(pacs) >= {"SEG", "SR"}, "the PACS holds the results again"
        page.goto("/ui/destinations")
        expect(page.locator("tr", has_text="pacs").locator(".badge").first).to_have_text("reachable")
        picture(page, "ui-destinations")

        # Re-run the job from assembly: it runs again, and its page keeps the previous run.
        _job_page(page, job_id)
        page.select_option("select[name=from_stage]", "assemble")
        with page.expect_response(lambda r: r.url.endswith("/rerun")) as answer:
            page.get_by_role("button", name="Re-run").click()
        assert answer.value.ok, answer.value.status
        answer.value.finished()  # the body too, before the page is left
        _wait_state(page, job_id, "exported", away_first=True)
        assert page.locator("text=Previous runs").is_visible()
        assert _api(gateway, f"/api/jobs/{job_id}")["state"] == "exported"

        # A data scientist uploads a model package and enables it.
        package = write_package(tmp_path / "package")  # "tiny-seg" 1.0.0, an ONNX model
        archive = tar_folder(package, tmp_path / "tiny-seg.tar.gz", top="tiny-seg")
        page.goto("/ui/models")
        page.set_input_files("input[name=package]", str(archive))
        page.click("text=Upload and register")
        expect(page.locator("text=tiny-seg@1.0.0 is registered")).to_be_visible(timeout=60_000)
        panel = page.locator("section#tiny-seg")
        picture(page, "ui-models")
        if panel.get_by_role("button", name="Disable").count():  # a manifest may ask to be enabled at once
            panel.get_by_role("button", name="Disable").click()
            expect(page.locator("section#tiny-seg h2 .badge")).to_have_text("disabled")
        page.locator("section#tiny-seg").get_by_role("button", name="Enable").click()
        expect(page.locator("section#tiny-seg h2 .badge")).to_have_text("enabled")
        assert any(m["name"] == "tiny-seg" and m["enabled"] for m in _api(gateway, "/api/models"))
        assert page.problems == [], page.problems  # type: ignore[attr-defined]


def _job_page(page: Any, job_id: int) -> None:
    page.goto(f"/ui/jobs/{job_id}")
    page.wait_for_load_state("networkidle")


def _wait_state(page: Any, job_id: int, state: str, *, away_first: bool = False, timeout_s: float = 180) -> None:
    """Reload the job's page, as a person would, until its state is ``state`` (after leaving it, if asked)."""
    deadline = time.monotonic() + timeout_s
    left = not away_first
    while time.monotonic() < deadline:
        _job_page(page, job_id)
        shown = page.locator("h1 .badge").first.inner_text()
        left = left or shown != state
        if left and shown == state:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is {shown}, not {state}, after {timeout_s} s")


def _results_in(pacs: OrthancOn) -> set[str]:
    return {s["MainDicomTags"].get("Modality") for s in pacs.rest("GET", "/series?expand")}


def _api(gateway: GatewayServer, path: str) -> Any:
    response = httpx.get(f"http://127.0.0.1:{gateway.http_port}{path}", headers=ADMIN, timeout=30)
    response.raise_for_status()
    return response.json()


def picture(page: Any, name: str) -> None:
    """With ``GATEWAY_PICTURES=DIR``, save the page as ``DIR/NAME.png`` (the README shows them)."""
    if PICTURES:
        Path(PICTURES).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(PICTURES) / f"{name}.png"), full_page=True)
