"""No silent failure after an outage: deliveries given up after retrying are resent once their destination answers a
check again (and only those), a job's export can be re-run, results held for an unmapped caller are sent once it is
mapped, a job whose results have no destination is flagged and counted; and, with real peers, a PACS down long
enough for the deliveries to die gets them by itself when it comes back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pacs import EARLIER, deliveries, fast_export, job_of, make_job, outputs, sop_instance_uid, wait_for
from sqlalchemy import update

from gateway.config import ExportSettings, StoreSettings
from gateway.errors import ExportError, JobConflict, NotFound
from gateway.export import queue
from gateway.export.destinations import destinations_for
from gateway.export.outcome import Kind, Outcome, RetryPolicy
from gateway.export.workers import ExportWorkers
from gateway.jobs.states import JobState
from gateway.metrics import GatewayMetrics
from gateway.store.index import Job
from gateway.store.store import InstanceStore

from conftest import require_tool
from peers import StoreSCP, free_port

T0 = 1_000_000.0
POLICY = RetryPolicy(backoff_initial_s=1, backoff_max_s=10, give_up_after_s=60)
DOWN = Outcome(Kind.RETRY, "association failed: destination unreachable")


@pytest.fixture
def instance_store(index_store: InstanceStore) -> InstanceStore:
    """The store of these tests: its index on SQLite, then on a real PostgreSQL server."""
    return index_store


def test_revive_resends_only_what_was_given_up(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs", "vna"], now=T0)
    (first, second) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    assert queue.record(instance_store, first, DOWN, POLICY, now=T0) == "pending"
    assert queue.record(instance_store, second, Outcome(Kind.DEAD, "rejected, status 0xC000", 0xC000), POLICY) == "dead"
    (again,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 60)[1]  # type: ignore[index]
    assert queue.record(instance_store, again, DOWN, POLICY, now=T0 + 60) == "dead", "60 s since the first attempt"
    for item in queue.claim(instance_store, ["vna"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]:  # type: ignore[index]
        queue.record(instance_store, item, Outcome(Kind.DELIVERED, "", 200), POLICY, now=T0)
    assert queue.settle(instance_store, job, now=T0 + 60) == JobState.FAILED

    assert queue.revivable_destinations(instance_store) == ["pacs"]
    assert queue.revive_destination(instance_store, "vna", now=T0 + 100) == 0
    assert queue.revive_destination(instance_store, "pacs", now=T0 + 100) == 1
    rows = {r.id: r for r in deliveries(instance_store, job)}
    revived, rejected = rows[first.id], rows[second.id]
    assert (revived.state, revived.attempts, revived.next_attempt_at) == ("pending", 0, T0 + 100)
    assert [h["outcome"] for h in revived.history] == ["retry", "retry", "requeued"]
    assert revived.history[-1]["reason"] == "destination 'pacs' answers again"
    assert rejected.state == "dead", "a rejection is not revived: it would only be rejected again"
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and "failure" not in state.detail
    assert state.detail["previous_failures"][0]["stage"] == "export"
    assert queue.revivable_destinations(instance_store) == []

    (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 100)[1]  # type: ignore[index]
    assert queue.record(instance_store, item, DOWN, POLICY, now=T0 + 100) == "pending", "a fresh round of retries"
    (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 200)[1]  # type: ignore[index]
    assert queue.record(instance_store, item, Outcome(Kind.DELIVERED, "", 0), POLICY, now=T0 + 200) == "delivered"
    assert queue.settle(instance_store, job, now=T0 + 200) == JobState.FAILED, "the rejected one is still dead"


def test_revive_leaves_jobs_being_run_again_and_purged_ones(instance_store: InstanceStore, tmp_path: Path) -> None:
    jobs = [make_job(instance_store) for _ in range(2)]
    for k, job in enumerate(jobs):
        queue.enqueue(instance_store, job, outputs(tmp_path / f"out{k}", 1, seed=k), ["pacs"], now=T0)
        (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
        queue.record(instance_store, item, DOWN, RetryPolicy(max_attempts=1), now=T0)
        assert queue.settle(instance_store, job, now=T0) == JobState.FAILED
    rerun, purged = jobs
    with instance_store.write_sessions.begin() as session:
        session.execute(update(Job).where(Job.id == rerun).values(state=JobState.RECEIVED))
        row = session.get(Job, purged)
        assert row is not None
        row.detail = {**row.detail, "retention": {"outputs_purged_at": T0}}
    assert queue.revivable_destinations(instance_store) == ["pacs"], "the purged job's delivery is still there"
    assert queue.revive_destination(instance_store, "pacs", now=T0 + 1) == 0
    assert {r.state for r in deliveries(instance_store)} == {"dead"}
    assert job_of(instance_store, purged).state == JobState.FAILED


def test_resend_job_sends_every_delivery_again(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    for item in queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]:  # type: ignore[index]
        queue.record(instance_store, item, Outcome(Kind.DELIVERED, "", 0), POLICY, now=T0 + 1)
    assert queue.settle(instance_store, job, now=T0 + 2) == JobState.EXPORTED
    assert job_of(instance_store, job).detail["timings"]["export_s"] == 2.0

    assert queue.resend_job(instance_store, job, now=T0 + 50) == 2
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and state.finished_at is None and state.detail["encoded_at"] == T0 + 50
    rows = deliveries(instance_store, job)
    assert {(r.state, r.attempts, r.delivered_at) for r in rows} == {("pending", 0, None)}
    assert rows[0].history[-1]["reason"] == "re-run from export"
    for item in queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 50)[1]:  # type: ignore[index]
        queue.record(instance_store, item, Outcome(Kind.DELIVERED, "", 0), POLICY, now=T0 + 53)
    assert queue.settle(instance_store, job, now=T0 + 53) == JobState.EXPORTED
    assert job_of(instance_store, job).detail["timings"]["export_s"] == 3.0

    waiting = make_job(instance_store)
    with pytest.raises(JobConflict, match=f"job {waiting} is inferred"):
        queue.resend_job(instance_store, waiting)
    nowhere = make_job(instance_store)
    queue.enqueue(instance_store, nowhere, outputs(tmp_path / "nowhere", 1, seed=1), [])
    with pytest.raises(ExportError, match="has no delivery to send again: no destination configured"):
        queue.resend_job(instance_store, nowhere)
    with pytest.raises(NotFound):
        queue.resend_job(instance_store, 424242)


def test_results_with_no_destination_are_flagged_and_counted(instance_store: InstanceStore, tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    settings = fast_export(
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        return_to_sender={"CT1": "pacs"},
        unmapped="drop",
    )
    job = make_job(instance_store)
    routing = destinations_for(settings, "dimse:CT9")
    assert queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), routing, metrics=metrics, now=T0) == 0
    state = job_of(instance_store, job)
    assert state.state == JobState.EXPORTED and state.detail["export"]["undelivered"] is True
    assert state.detail["export"]["reason"] == routing.reason and "held" not in state.detail["export"]
    assert metrics.registry.get_sample_value("gateway_jobs_undelivered_total") == 1.0


def test_held_results_are_sent_once_the_caller_is_mapped(instance_store: InstanceStore, tmp_path: Path) -> None:
    pacs = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    holding = fast_export(destinations={"pacs": pacs}, unmapped="hold")
    job = make_job(instance_store)
    files = outputs(instance_store.data_dir / "outputs" / f"job-{job}", 2)
    routing = destinations_for(holding, "dimse:CT9")
    assert queue.enqueue(instance_store, job, files, routing, now=T0) == 0
    export = job_of(instance_store, job).detail["export"]
    assert export["undelivered"] is True and export["reason"].startswith("held: caller 'CT9' is not mapped")
    assert export["held"] == {"caller": "CT9", "files": [f"outputs/job-{job}/{f.name}" for f in files]}

    assert queue.release_held(instance_store, holding) == 0, "still not mapped: it stays held"
    assert job_of(instance_store, job).state == JobState.EXPORTED
    mapped = fast_export(destinations={"pacs": pacs}, unmapped="hold", return_to_sender={"CT9": "pacs"})
    assert queue.release_held(instance_store, mapped, now=T0 + 10) == 1
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and state.detail["export"] == {"deliveries": 2, "destinations": ["pacs"]}
    rows = deliveries(instance_store, job)
    assert {(r.destination, r.state) for r in rows} == {("pacs", "pending")}
    assert {r.sop_instance_uid for r in rows} == {sop_instance_uid(f) for f in files}
    assert queue.release_held(instance_store, mapped) == 0, "released once"


def test_check_now_records_the_check_and_knows_its_destinations(instance_store: InstanceStore) -> None:
    port = free_port()
    settings = fast_export(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}})
    workers = ExportWorkers(instance_store, settings)
    try:
        assert workers.last_checks() == {}
        found = workers.check_now("pacs")
        assert not found.ok and workers.last_checks() == {"pacs": found}
        with pytest.raises(NotFound, match="no export destination 'vna'"):
            workers.check_now("vna")
    finally:
        workers.stop()


def storescp_destination(tmp_path: Path, **values: Any) -> tuple[InstanceStore, StoreSCP, ExportSettings]:
    """A store, a DCMTK storescp (not started) as destination "pacs", and export settings naming it (``values``
    over :func:`fast_export`'s)."""
    require_tool("storescp")
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0))
    scp = StoreSCP(tmp_path / "storescp", aet="PACS")
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": scp.dicom_port}
    return store, scp, fast_export(destinations={"pacs": destination}, **values)


@pytest.mark.slow
def test_a_pacs_down_long_enough_gets_its_results_when_it_is_back(tmp_path: Path) -> None:
    store, scp, settings = storescp_destination(tmp_path, give_up_after_s=0.5, check_interval_s=0.2)
    metrics = GatewayMetrics()
    files = outputs(tmp_path / "out", 2)
    job = make_job(store)
    queue.enqueue(store, job, files, ["pacs"])
    workers = ExportWorkers(store, settings, metrics=metrics)
    workers.start()
    try:
        wait_for(lambda: job_of(store, job).state == JobState.FAILED, what="the deliveries given up")
        assert all(r.last_error and r.last_error.startswith("gave up after") for r in deliveries(store, job))
        wait_for(lambda: "pacs" in workers.last_checks(), what="the check at start")
        assert not workers.last_checks()["pacs"].ok
        with scp:
            wait_for(lambda: job_of(store, job).state == JobState.EXPORTED, what="the resend")
            assert workers.last_checks()["pacs"].ok
        received = {path.name for path in scp.outdir.iterdir()}
        assert len(received) == 2
        for row in deliveries(store, job):
            outcomes = [h["outcome"] for h in row.history]
            assert outcomes[-2:] == ["requeued", "delivered"] and set(outcomes[:-2]) == {"retry"}, outcomes
        detail = job_of(store, job).detail
        assert detail["previous_failures"][0]["stage"] == "export" and detail["timings"]["export_s"] > 0
    finally:
        workers.stop()
        store.close()
    value = metrics.registry.get_sample_value
    assert value("gateway_export_attempts_total", {"destination": "pacs", "outcome": "dead"}) == 2.0
    assert value("gateway_export_attempts_total", {"destination": "pacs", "outcome": "delivered"}) == 2.0
    assert (value("gateway_export_attempts_total", {"destination": "pacs", "outcome": "retry"}) or 0) >= 2.0


@pytest.mark.slow
def test_a_delivery_shows_the_destination_answers_without_waiting_for_the_next_check(tmp_path: Path) -> None:
    """The check at start found the PACS down; it came up before the results: the delivery says it answers."""
    store, scp, settings = storescp_destination(tmp_path, check_interval_s=3600)
    workers = ExportWorkers(store, settings)
    workers.start()
    try:
        wait_for(lambda: "pacs" in workers.last_checks(), what="the check at start")
        assert not workers.last_checks()["pacs"].ok
        with scp:
            job = make_job(store)
            queue.enqueue(store, job, outputs(tmp_path / "out", 1), ["pacs"])
            wait_for(lambda: job_of(store, job).state == JobState.EXPORTED, what="the delivery")
            latest = workers.last_checks()["pacs"]
            assert latest.ok and latest.detail == "delivered 1 object(s)"
    finally:
        workers.stop()
        store.close()


@pytest.mark.slow
def test_a_wake_sends_queued_deliveries_without_waiting_for_the_poll(tmp_path: Path) -> None:
    """What the runner does when a job is encoded: the export starts then, not at the next poll (here 1 h)."""
    store, scp, settings = storescp_destination(tmp_path, poll_s=3600, check_interval_s=3600)
    workers = ExportWorkers(store, settings)
    with scp:
        workers.start()
        try:
            wait_for(lambda: "pacs" in workers.last_checks(), what="the check at start")
            time.sleep(0.2)  # the worker has found the queue empty and waits for the poll
            job = make_job(store)
            queue.enqueue(store, job, outputs(tmp_path / "out", 1), ["pacs"])
            workers.wake()
            wait_for(lambda: job_of(store, job).state == JobState.EXPORTED, what="the delivery after the wake")
        finally:
            workers.stop()
            store.close()
