"""The operator's pages: what each shows, its 404 and 400 pages, and that no patient data or markup leaks in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.config import DimseDestination, ExportSettings, StowDestination
from gateway.store.index import Job
from gateway.ui.templating import PAGE_HEADERS

from conftest import require_tool
from dicom_files import minimal_ct
from peers import StoreSCP, free_port
from ui_data import TOKENS, add_delivery, add_job, bearer, routing, ui_client, ui_settings

ADMIN = bearer(TOKENS["admin"])

ROUTED: dict[str, Any] = {
    "routing": [
        {
            "model": "ct-nodule@1.0.0",
            "run": True,
            "reason": "runs on volume 0: every rule passed",
            "checks": [
                {"rule": "modality", "passed": True, "detail": "Modality CT is one of CT", "volume": None},
                {"rule": "min_slices", "passed": True, "detail": "48 slices; the model needs at least 20", "volume": 0},
            ],
        },
        {
            "model": "mr-brain@2.0.0",
            "run": False,
            "reason": "Modality CT is not one of MR",
            "checks": [{"rule": "modality", "passed": False, "detail": "Modality CT is not one of MR", "volume": None}],
        },
    ],
    "results": [{"model": "ct-nodule@1.0.0", "timings": {"infer_s": 1.5}}],
    "failures": [],
}
DETAIL: dict[str, Any] = {
    "timings": {"assemble_s": 0.25, "queue_s": 0.5, "infer_s": 1.5, "encode_s": 0.75, "export_s": 2.0},
    "inference": ROUTED,
    "assembly": {
        "volumes": [
            {
                "shape": [48, 160, 160],
                "spacing_mm": [2.5, 2.25, 2.25],
                "modality": "CT",
                "slices": 48,
                "resampled": True,
                "qc": [{"code": "gap", "message": "a missing slice between 12 and 14", "resampled": True}],
            }
        ],
        "refused": [{"reason": "another frame of reference", "instances": 2}],
    },
    "outputs": [
        {"model": "ct-nodule@1.0.0", "kind": "SEG", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4",
         "SOPInstanceUID": "2.25.111", "SeriesInstanceUID": "2.25.222", "file": "job-1/SEG-2.25.111.dcm"},
    ],
}  # fmt: skip


@pytest.fixture
def client(tmp_path: Path) -> Any:
    export = ExportSettings(
        destinations={
            "pacs": DimseDestination(ae_title="PACS", host="127.0.0.1", port=1),
            "cloud": StowDestination(stow_url="https://user:secret@cloud.example/dicomweb/studies", token="s3cr3t-x"),
        },
        default=["pacs"],
        return_to_sender={"MODALITY1": "cloud"},
    )
    with ui_client(ui_settings(tmp_path / "data", export=export), headers=ADMIN) as test_client:
        yield test_client


def store_of(client: Any) -> Any:
    return client.app.state.store


def test_every_page_has_the_security_headers_and_local_assets_only(client: Any) -> None:
    for path in ("/ui", "/ui/jobs", "/ui/studies", "/ui/models", "/ui/destinations", "/ui/login", "/ui/nowhere"):
        response = client.get(path)
        for name, value in PAGE_HEADERS.items():
            assert response.headers[name] == value, (path, name)
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        for url in re.findall(r'(?:src|href)="([^"]*)"', response.text):
            assert url.startswith(("/", "#")) and not url.startswith("//"), (path, url)


def test_overview_shows_ingest_jobs_disk_destinations_and_models(client: Any) -> None:
    add_job(store_of(client), state="received")
    failed = add_job(store_of(client), state="failed", detail={"inference": routing("ct-nodule@1.0.0")})
    page = client.get("/ui")
    assert page.status_code == 200
    text = page.text
    for expected in ("Instances received", "Instances refused", "Oldest waiting job", "Disk", "accepting"):
        assert expected in text, expected
    assert re.search(r'state-failed">failed</span></a> <strong>1</strong>', text)
    assert re.search(r'state-received">received</span></a> <strong>1</strong>', text)
    assert re.search(r'badge bad">1</span>\s*<a href="/ui/jobs\?problems=1">', text), "1 job needs a look"
    assert ">pacs</a>" in text and ">cloud</a>" in text
    assert re.search(r">pacs</a>.*?(not checked yet|reachable|unreachable)", text, re.S)
    assert 'hx-trigger="every 5s"' in text
    live = client.get("/ui/overview/live")
    assert live.status_code == 200 and live.text.lstrip().startswith('<div id="live"') and "<html" not in live.text
    assert failed


def test_jobs_list_filters_pages_and_makes_problems_stand_out(client: Any) -> None:
    store = store_of(client)
    ids = [add_job(store, state="exported", detail={"timings": {"infer_s": 1.0}}) for _ in range(55)]
    failed = add_job(store, state="failed", detail={"failure": {"stage": "infer", "reason": "model exploded"}})
    undelivered = add_job(
        store, state="exported", modality="MR", detail={"export": {"undelivered": True, "reason": "no destination"}}
    )
    page = client.get("/ui/jobs")
    assert page.status_code == 200
    rows = re.findall(r'<tr class="([^"]*)">\s*<td class="num"><a href="/ui/jobs/(\d+)"', page.text)
    assert [int(i) for _, i in rows] == [undelivered, failed, *reversed(ids[-48:])], "newest first, 50 a page"
    assert dict((int(i), c) for c, i in rows)[failed] == "problem-failed"
    assert dict((int(i), c) for c, i in rows)[undelivered] == "problem-undelivered"
    assert "model exploded" in page.text and ">undelivered</span>" in page.text, "a word, not colour alone"
    assert "jobs 1\N{EN DASH}50 of 57" in page.text and 'href="/ui/jobs?page=2"' in page.text
    second = client.get("/ui/jobs?page=2")
    assert "jobs 51\N{EN DASH}57 of 57" in second.text and len(re.findall(r'href="/ui/jobs/\d+"', second.text)) == 7

    problems = client.get("/ui/jobs?problems=1")
    assert re.findall(r'href="/ui/jobs/(\d+)"', problems.text) == [str(undelivered), str(failed)]
    mr = client.get("/ui/jobs?modality=mr")
    assert re.findall(r'href="/ui/jobs/(\d+)"', mr.text) == [str(undelivered)]
    only_failed = client.get("/ui/jobs?state=failed&page=1")
    assert re.findall(r'href="/ui/jobs/(\d+)"', only_failed.text) == [str(failed)]
    assert 'option value="failed" selected' in only_failed.text


@pytest.mark.parametrize("query", ["state=bogus", "page=0", "page=x", "modality=C%3CT"])
def test_a_bad_filter_is_a_400_page(client: Any, query: str) -> None:
    response = client.get(f"/ui/jobs?{query}")
    assert response.status_code == 400 and "<h1>400 · Bad Request</h1>" in response.text


def test_the_stage_bar_has_a_part_per_known_stage_with_its_seconds(client: Any) -> None:
    job = add_job(store_of(client), state="exported", detail={"timings": DETAIL["timings"]})
    page = client.get("/ui/jobs").text
    bar = re.search(r'<div class="bar"[^>]*aria-label="([^"]*)">(.*?)</div>', page, re.S)
    assert bar is not None
    parts = re.findall(r'class="s-(\w+)" style="width: ([\d.]+)%" title="\w+: ([^"]+)"', bar[2])
    assert [p[0] for p in parts] == ["completion", "assemble", "queue", "infer", "encode", "export"]
    assert [p[2] for p in parts] == ["2.50 s", "0.25 s", "0.50 s", "1.50 s", "0.75 s", "2.00 s"]
    assert sum(float(p[1]) for p in parts) == pytest.approx(100, abs=0.05)
    assert float(parts[0][1]) == pytest.approx(100 * 2.5 / 7.5, abs=0.01)
    assert "completion 2.50 s, assemble 0.25 s" in bar[1]
    assert job


def test_job_page_says_why_each_model_ran_or_not_and_what_came_of_it(client: Any) -> None:
    store = store_of(client)
    job = add_job(store, state="failed", detail={**DETAIL, "failure": {"stage": "export", "reason": "PACS said no"}})
    dead = add_delivery(store, job, state="dead", destination="pacs")
    with store.write_sessions.begin() as session:  # an attempt's history, as the export queue records it
        from gateway.store.index import Delivery

        row = session.get(Delivery, dead)
        row.attempts, row.last_status, row.last_error = 3, 0xA700, "out of resources"
        row.history = [{"at": 1000.0, "outcome": "failed", "status": 0xA700, "reason": "out of resources"}]
    page = client.get(f"/ui/jobs/{job}")
    assert page.status_code == 200
    text = page.text
    for expected in (
        "Failed in export:</strong> PACS said no",
        '<code>ct-nodule@1.0.0</code> <span class="badge ok">ran</span>',
        "runs on volume 0: every rule passed",
        '<code>mr-brain@2.0.0</code> <span class="badge">did not run</span>',
        '<td class="check-fail">Modality CT is not one of MR</td>',
        "<code>gap</code> a missing slice between 12 and 14",
        "2 instance(s) left out: another frame of reference",
        "2.25.111",
        "out of resources",
        "1 event(s)",
        "Retry dead deliveries",
        '<option value="assemble">',
        '<option value="export">',
        f'href="/ui/jobs/{job}/results"',
    ):
        assert expected in text, expected
    assert "Cancel job" not in text, "a failed job is finished: nothing to cancel"


def test_an_unknown_job_is_a_404_page_and_a_bad_id_a_400(client: Any) -> None:
    missing = client.get("/ui/jobs/9999")
    assert missing.status_code == 404 and "no job 9999" in missing.text and "<html" in missing.text
    assert client.get("/ui/jobs/abc").status_code == 400
    assert client.post("/ui/jobs/9999/cancel").status_code == 404


def test_job_buttons_retry_rerun_and_cancel(client: Any) -> None:
    store = store_of(client)
    failed = add_job(store, state="failed", detail={"failure": {"stage": "export", "reason": "gave up"}})
    add_delivery(store, failed, state="dead")
    retried = client.post(f"/ui/jobs/{failed}/retry")
    assert retried.status_code == 200 and "1 delivery back in the queue" in retried.text
    assert state_of(store, failed) == "encoded"
    again = client.post(f"/ui/jobs/{failed}/retry")
    assert again.status_code == 409 and "no dead or refused delivery" in again.text

    finished = add_job(store, state="exported", detail={"inference": routing("m@1")})
    rerun = client.post(f"/ui/jobs/{finished}/rerun", data={"from_stage": "assemble"})
    assert rerun.status_code == 200 and "runs again from assemble" in rerun.text
    assert state_of(store, finished) == "received"
    assert client.post(f"/ui/jobs/{finished}/rerun", data={"from_stage": "infer"}).status_code == 400
    conflict = client.post(f"/ui/jobs/{finished}/rerun", data={"from_stage": "assemble"})
    assert conflict.status_code == 409 and "only a finished job can be re-run" in conflict.text

    cancelled = client.post(f"/ui/jobs/{finished}/cancel")
    assert cancelled.status_code == 200 and "The job is cancelled" in cancelled.text
    assert state_of(store, finished) == "cancelled"
    with store.sessions() as session:
        requested = session.get(Job, finished).detail["requested"]
    assert requested["action"] == "cancel" and requested["by"] == "admin-user", "who did it is recorded"


def state_of(store: Any, job_id: int) -> str:
    with store.sessions() as session:
        return str(session.scalar(select(Job.state).where(Job.id == job_id)))


def test_studies_list_series_and_reprocess_one(client: Any, tmp_path: Path) -> None:
    store = store_of(client)
    path = minimal_ct(tmp_path / "a.dcm", patient_name="Doe^Jane")
    store.put(path, source="test")
    from gateway.ingest.completion import complete_quiet_series

    (done,) = complete_quiet_series(store.write_sessions, 0.0)
    with store.write_sessions.begin() as session:
        session.get(Job, done.job_id).state = "exported"
    page = client.get("/ui/studies")
    assert page.status_code == 200 and "Doe" not in page.text, "no patient name on an operator's page"
    assert f'href="/ui/jobs/{done.job_id}"' in page.text and "Reprocess" in page.text
    series_uid = re.search(r'hx-post="/ui/series/([\d.]+)/reprocess', page.text)[1]  # type: ignore[index]
    made = client.post(f"/ui/series/{series_uid}/reprocess")
    assert made.status_code == 200, made.text
    new_job = int(re.search(r"Job (\d+) reprocesses the series", made.text)[1])  # type: ignore[index]
    assert new_job != done.job_id and state_of(store, new_job) == "received"
    busy = client.post(f"/ui/series/{series_uid}/reprocess")
    assert busy.status_code == 409 and "has not finished" in busy.text
    assert client.post("/ui/series/1.2.3/reprocess").status_code == 404
    for path in ("/ui", "/ui/jobs", f"/ui/jobs/{new_job}"):
        assert "Doe" not in client.get(path).text, path


def test_destinations_show_addresses_without_secrets_and_queue_depth(client: Any) -> None:
    job = add_job(store_of(client), state="failed")
    add_delivery(store_of(client), job, state="dead", destination="pacs")
    add_delivery(store_of(client), job, state="pending", destination="pacs")
    page = client.get("/ui/destinations")
    assert page.status_code == 200
    text = page.text
    assert "PACS @ 127.0.0.1:1" in text and "https://cloud.example/dicomweb/studies (bearer token set)" in text
    assert "secret" not in text and "s3cr3t" not in text and "user:" not in text
    assert "caller <code>MODALITY1</code>" in text and "every job (default)" in text
    assert re.search(r"state-dead\">dead</span> 1", text) and re.search(r"state-pending\">pending</span> 1", text)
    assert client.post("/ui/destinations/nowhere/check").status_code == 404


def test_markup_in_the_data_is_shown_as_text(client: Any) -> None:
    evil = '<script>alert("x")</script>'
    job = add_job(
        store_of(client), state="failed", description=evil, detail={"failure": {"stage": "x", "reason": evil}}
    )
    for path in ("/ui/jobs", f"/ui/jobs/{job}", "/ui/studies"):
        text = client.get(path).text
        assert evil not in text and "&lt;script&gt;" in text, path


def test_the_test_button_checks_a_destination_with_c_echo(tmp_path: Path) -> None:
    require_tool("storescp")
    with StoreSCP(tmp_path / "scp") as scp:
        export = ExportSettings(
            destinations={
                "pacs": DimseDestination(ae_title=scp.aet, host="127.0.0.1", port=scp.port),
                "gone": DimseDestination(ae_title="GONE", host="127.0.0.1", port=free_port()),
            }
        )
        with ui_client(ui_settings(tmp_path / "data", export=export), headers=ADMIN) as client:
            answered = client.post("/ui/destinations/pacs/check")
            assert answered.status_code == 200 and "pacs answered in" in answered.text, answered.text
            silent = client.post("/ui/destinations/gone/check")
            assert silent.status_code == 200 and "gone did not answer" in silent.text
            page = client.get("/ui/destinations").text
            assert re.search(r"<strong>pacs</strong>.*?badge ok\">reachable", page, re.S)
            assert re.search(r"<strong>gone</strong>.*?badge bad\">unreachable", page, re.S)
            read = client.post("/ui/destinations/pacs/check", headers=bearer(TOKENS["read"]))
            assert read.status_code == 403
