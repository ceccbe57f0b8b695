"""The durable queue on its own: enqueue (each destination the kinds it takes), claim, record with backoff, settle
the job (refused deliveries do not fail it), resume, retry; on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pacs import EARLIER, deliveries, job_of, make_job, outputs, result_files, sop_instance_uid
from sqlalchemy import update

from gateway.config import DEFAULT_SEND, ExportSettings
from gateway.errors import ExportError, NotFound
from gateway.export import queue
from gateway.export.outcome import Kind, Outcome, RetryPolicy
from gateway.jobs.lifecycle import owner_identity
from gateway.jobs.states import JobState
from gateway.store.index import Job
from gateway.store.store import InstanceStore

POLICY = RetryPolicy(max_attempts=3, backoff_initial_s=10, backoff_max_s=100)
T0 = 1_000_000.0


@pytest.fixture
def instance_store(index_store: InstanceStore) -> InstanceStore:
    """The store of these tests: its index on SQLite, then on a real PostgreSQL server."""
    return index_store


def test_enqueue_one_delivery_per_file_and_destination(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    inside = outputs(instance_store.data_dir / "results" / f"job-{job}", 2)
    outside = outputs(tmp_path / "elsewhere", 1, seed=1)
    assert queue.enqueue(instance_store, job, [*inside, *outside], ["pacs", "vna", "pacs"], now=T0) == 6
    rows = deliveries(instance_store, job)
    assert [(r.destination, r.state, r.attempts, r.next_attempt_at) for r in rows[:2]] == [
        ("pacs", "pending", 0, T0),
        ("vna", "pending", 0, T0),
    ]
    assert {r.sop_instance_uid for r in rows} == {sop_instance_uid(p) for p in [*inside, *outside]}
    assert rows[0].path == f"results/job-{job}/{inside[0].name}", "inside the data folder: relative"
    assert rows[-1].path == str(outside[0].resolve())
    assert rows[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert rows[0].transfer_syntax_uid == "1.2.840.10008.1.2.1"
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and state.detail["export"] == {
        "deliveries": 6,
        "destinations": ["pacs", "vna"],
    }
    assert state.detail["encoded_at"] == T0


def test_enqueue_again_is_a_new_run(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    files = outputs(tmp_path / "out", 2)
    assert queue.enqueue(instance_store, job, files, ["pacs", "vna"], now=T0) == 4
    for _ in range(2):  # one destination per claim
        for item in queue.claim(instance_store, ["pacs", "vna"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]:  # type: ignore[index]
            queue.record(instance_store, item, Outcome(Kind.DELIVERED, "", 0), POLICY, now=T0 + 1)
    assert queue.settle(instance_store, job, now=T0 + 2) == JobState.EXPORTED
    before = {(r.sop_instance_uid, r.destination): r.id for r in deliveries(instance_store, job)}

    assert queue.enqueue(instance_store, job, files, ["pacs", "ris"], now=T0 + 10) == 4, "the whole run, again"
    rows = deliveries(instance_store, job)
    assert {r.destination for r in rows} == {"pacs", "ris"}, "vna is not part of this run: removed"
    again = [r for r in rows if r.destination == "pacs"]
    assert all(before[(r.sop_instance_uid, "pacs")] == r.id for r in again), "the same rows, requeued"
    assert {(r.state, r.attempts, r.next_attempt_at, r.delivered_at) for r in again} == {("pending", 0, T0 + 10, None)}
    assert [h["outcome"] for h in again[0].history] == ["delivered", "requeued"]
    assert again[0].history[-1]["reason"] == "queued again by a new run of the job"
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and state.detail["encoded_at"] == T0 + 10
    assert state.detail["export"] == {"deliveries": 4, "destinations": ["pacs", "ris"]}


def test_enqueue_without_destination_exports_at_once(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    assert queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), [], now=T0) == 0
    state = job_of(instance_store, job)
    assert state.state == JobState.EXPORTED and state.detail["export"]["reason"] == queue.NO_DESTINATION
    assert state.detail["export"]["undelivered"] is True and state.finished_at == T0
    assert state.detail["timings"]["export_s"] == 0.0


def test_enqueue_without_output_is_not_undelivered(instance_store: InstanceStore) -> None:
    job = make_job(instance_store)
    assert queue.enqueue(instance_store, job, [], ["pacs"]) == 0
    export = job_of(instance_store, job).detail["export"]
    assert export["reason"] == queue.NO_OUTPUT and "undelivered" not in export


def test_enqueue_sends_each_destination_the_kinds_it_takes(instance_store: InstanceStore, tmp_path: Path) -> None:
    files = result_files(tmp_path / "results")
    (ct,) = outputs(tmp_path / "ct", 1, seed=1)  # a SOP class of no known kind goes everywhere
    job = make_job(instance_store)
    plan = {"pacs": ["seg", "sr"], "vna": DEFAULT_SEND}
    assert queue.enqueue(instance_store, job, [*files.values(), ct], plan, now=T0) == 3 + 5
    kinds = {uid: kind for kind, uid in ((k, sop_instance_uid(p)) for k, p in files.items())}
    sent = {(r.destination, kinds.get(r.sop_instance_uid, "ct")) for r in deliveries(instance_store, job)}
    assert sent == {("pacs", k) for k in ("seg", "sr", "ct")} | {("vna", k) for k in ("seg", "sr", "gsps", "ko", "ct")}
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and state.detail["export"] == {
        "deliveries": 8,
        "destinations": ["pacs", "vna"],
        "not_sent": {"pacs": ["gsps", "ko", "sc"], "vna": ["sc"]},
    }
    views = queue.deliveries_of(instance_store, job)
    assert {v["kind"] for v in views} == {"seg", "sr", "gsps", "ko", None}
    assert queue.enqueue(instance_store, job, [files["sc"]], {"pacs": ["sc"]}, now=T0) == 1, "a new run"
    assert "not_sent" not in job_of(instance_store, job).detail["export"]
    assert [v["kind"] for v in queue.deliveries_of(instance_store, job)] == ["sc"]


def test_the_report_is_queued_and_claimed_first(instance_store: InstanceStore, tmp_path: Path) -> None:
    """The SR (then the key objects) go out before the SEG and the rest, whatever order the encoder wrote them in."""
    files = result_files(tmp_path / "results")
    job = make_job(instance_store)
    written = [files[k] for k in ("seg", "gsps", "sc", "sr", "ko")]
    assert queue.enqueue(instance_store, job, written, ["pacs"], now=T0) == 5
    assert [v["kind"] for v in queue.deliveries_of(instance_store, job)] == ["sr", "ko", "seg", "gsps", "sc"]
    name, items = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)  # type: ignore[misc]
    kinds = {sop_instance_uid(p): k for k, p in files.items()}
    assert name == "pacs" and [kinds[i.sop_instance_uid] for i in items] == ["sr", "ko", "seg", "gsps", "sc"]


def test_enqueue_of_no_kind_a_destination_takes_exports_at_once(instance_store: InstanceStore, tmp_path: Path) -> None:
    files = result_files(tmp_path / "results")
    job = make_job(instance_store)
    assert queue.enqueue(instance_store, job, [files["sc"], files["ko"]], {"pacs": ["seg"], "vna": ["sr"]}) == 0
    state = job_of(instance_store, job)
    assert state.state == JobState.EXPORTED and state.detail["export"] == {
        "deliveries": 0,
        "destinations": ["pacs", "vna"],
        "not_sent": {"pacs": ["ko", "sc"], "vna": ["ko", "sc"]},
        "reason": queue.NO_KIND_TAKEN,
        "undelivered": True,
    }


def test_enqueue_refuses_a_kind_it_does_not_know(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    with pytest.raises(ValueError, match=r"destinations\['pacs'\] names unknown kind\(s\) \['segmentation'\]"):
        queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), {"pacs": ["segmentation"]})
    assert deliveries(instance_store, job) == [] and job_of(instance_store, job).state == JobState.INFERRED


def test_enqueue_refuses_an_unreadable_file_and_queues_nothing(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not DICOM")
    with pytest.raises(ExportError, match=r"^output file 3 of 3 cannot be queued: InvalidDicomError$"):
        queue.enqueue(instance_store, job, [*outputs(tmp_path / "out", 2), bad], ["pacs"])
    assert deliveries(instance_store, job) == [] and job_of(instance_store, job).state == JobState.INFERRED
    with pytest.raises(NotFound):
        queue.enqueue(instance_store, 9999, [], ["pacs"])


def test_claim_takes_due_deliveries_of_one_destination(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs", "vna"], now=T0)
    early = queue.claim(instance_store, ["pacs", "vna"], 10, owner=EARLIER, lease_s=60.0, now=T0 - 1)
    assert early is None, "not due yet"
    elsewhere = queue.claim(instance_store, ["ris"], 10, owner=EARLIER, lease_s=60.0, now=T0)
    assert elsewhere is None, "no delivery for that destination"
    name, items = queue.claim(instance_store, ["pacs", "vna"], 2, owner=EARLIER, lease_s=60.0, now=T0) or ("", [])
    assert name == "pacs" and len(items) == 2 and all(i.path.is_file() for i in items)
    name, items = queue.claim(instance_store, ["pacs", "vna"], 10, owner=EARLIER, lease_s=60.0, now=T0) or ("", [])
    assert name == "vna" and len(items) == 3, "the destination whose oldest delivery is due first"
    name, items = queue.claim(instance_store, ["pacs", "vna"], 10, owner=EARLIER, lease_s=60.0, now=T0) or ("", [])
    assert name == "pacs" and len(items) == 1
    rest = queue.claim(instance_store, ["pacs", "vna"], 10, owner=EARLIER, lease_s=60.0, now=T0)
    assert rest is None, "everything is sending"
    assert {r.state for r in deliveries(instance_store, job)} == {"sending"}


def test_retry_backs_off_then_gives_up(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    busy = Outcome(Kind.RETRY, "out of resources, status 0xA700", 0xA700)
    now = T0
    for attempt in (1, 2):
        (item,) = (queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=now) or ("", []))[1]
        assert queue.record(instance_store, item, busy, POLICY, jitter=0.5, now=now) == "pending"
        (row,) = deliveries(instance_store, job)
        assert row.next_attempt_at == now + 0.75 * 10 * 2 ** (attempt - 1) and row.attempts == attempt
        early = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=row.next_attempt_at - 0.001)
        assert early is None
        now = row.next_attempt_at
        assert queue.settle(instance_store, job, now=now) is None, "still pending"
    (item,) = (queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=now) or ("", []))[1]
    assert queue.record(instance_store, item, busy, POLICY, jitter=0.5, now=now) == "dead"
    (row,) = deliveries(instance_store, job)
    assert row.last_error == "gave up after 3 attempts; last: out of resources, status 0xA700"
    assert [h["outcome"] for h in row.history] == ["retry"] * 3 and row.history[0]["status"] == 0xA700
    assert queue.settle(instance_store, job, now=now) == JobState.FAILED
    detail = job_of(instance_store, job).detail
    assert detail["failure"]["stage"] == "export"
    assert detail["failure"]["reason"] == "1 of 1 deliveries dead: pacs: " + row.last_error
    assert detail["export"]["dead"] == 1


def test_job_exported_when_all_delivered_with_warnings_counted(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    first, second = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    assert (
        queue.record(instance_store, first, Outcome(Kind.DELIVERED, "", 0), POLICY, jitter=0.5, now=T0) == "delivered"
    )
    assert queue.settle(instance_store, job) is None, "one is still sending"
    warning = Outcome(Kind.WARNING, "warning status 0xB000", 0xB000)
    assert queue.record(instance_store, second, warning, POLICY, jitter=0.5, now=T0) == "delivered"
    assert queue.record(instance_store, second, warning, POLICY, jitter=0.5, now=T0) is None, "no longer claimed"
    assert queue.settle(instance_store, job) == JobState.EXPORTED
    detail = job_of(instance_store, job).detail["export"]
    assert (detail["delivered"], detail["warnings"], detail["dead"]) == (2, 1, 0)
    assert [r.delivered_at for r in deliveries(instance_store, job)] == [T0, T0]


def test_dead_outcome_is_final_at_once(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    outcome = Outcome(Kind.DEAD, "rejected, status 0xA900", 0xA900)
    assert queue.record(instance_store, item, outcome, POLICY, jitter=0.5, now=T0) == "dead"
    (row,) = deliveries(instance_store, job)
    assert (row.attempts, row.last_status, row.last_error) == (1, 0xA900, "rejected, status 0xA900")


def test_refused_is_final_and_the_job_is_exported_with_the_reasons(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs"], now=T0)
    first, second, third = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    refused = Outcome(Kind.REFUSED, "SOP class 1.2.3 not supported, status 0x0122", 0x0122)
    assert queue.record(instance_store, first, refused, POLICY, jitter=0.5, now=T0) == "refused"
    assert queue.record(instance_store, second, refused, POLICY, jitter=0.5, now=T0) == "refused"
    assert queue.settle(instance_store, job) is None, "one is still sending"
    assert queue.record(instance_store, third, Outcome(Kind.DELIVERED, "", 0), POLICY, jitter=0.5, now=T0)
    assert queue.settle(instance_store, job) == JobState.EXPORTED
    detail = job_of(instance_store, job).detail
    assert "failure" not in detail
    assert {k: v for k, v in detail["export"].items() if k != "destinations"} == {
        "deliveries": 3,
        "delivered": 1,
        "warnings": 0,
        "refused": 2,
        "dead": 0,
        "refused_reasons": ["pacs: SOP class 1.2.3 not supported, status 0x0122"],
    }
    row = deliveries(instance_store, job)[0]
    assert (row.state, row.attempts, row.last_status, row.delivered_at) == ("refused", 1, 0x0122, None)
    assert [(h["outcome"], h["status"]) for h in row.history] == [("refused", 0x0122)]
    later = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 1000)
    assert later is None, "never sent again by itself"


def test_dead_fails_the_job_even_beside_refused_ones(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    first, second = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, first, Outcome(Kind.REFUSED, "not supported"), POLICY, jitter=0.5, now=T0)
    queue.record(instance_store, second, Outcome(Kind.DEAD, "rejected, status 0xC000"), POLICY, jitter=0.5, now=T0)
    assert queue.settle(instance_store, job) == JobState.FAILED
    detail = job_of(instance_store, job).detail
    assert detail["failure"]["reason"] == "1 of 2 deliveries dead: pacs: rejected, status 0xC000"
    assert (detail["export"]["refused"], detail["export"]["dead"]) == (1, 1)


def test_refused_reasons_are_listed_once_each_and_at_most_five(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 8), ["pacs"], now=T0)
    items = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    for k, item in enumerate(items):
        outcome = Outcome(Kind.REFUSED, f"SOP class 1.2.{min(k, 6)} not supported")
        queue.record(instance_store, item, outcome, POLICY, jitter=0.5, now=T0)
    assert queue.settle(instance_store, job) == JobState.EXPORTED
    export = job_of(instance_store, job).detail["export"]
    assert export["refused"] == 8
    assert export["refused_reasons"] == [f"pacs: SOP class 1.2.{k} not supported" for k in range(5)] + ["(and 2 more)"]


def test_resume_and_release(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs", "gone"], now=T0)
    items = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, items[0], Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0)
    assert queue.release(instance_store, [items[1].id], at=T0 + 5, now=T0) == 1
    assert queue.resume(instance_store, ["pacs"], owner=owner_identity(), now=T0 + 1) == (1, 3)
    states = [(r.destination, r.state) for r in deliveries(instance_store, job)]
    assert states.count(("pacs", "pending")) == 2 and states.count(("pacs", "delivered")) == 1
    assert states.count(("gone", "dead")) == 3
    gone = next(r for r in deliveries(instance_store, job) if r.destination == "gone")
    assert gone.last_error == "destination 'gone' is no longer configured"
    released = next(r for r in deliveries(instance_store, job) if r.id == items[1].id)
    assert released.next_attempt_at == T0 + 5 and released.attempts == 0


def test_resume_settles_a_job_whose_deliveries_all_ended(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    queue.record(
        instance_store, item, Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0
    )  # then a crash before settle
    assert job_of(instance_store, job).state == JobState.ENCODED
    queue.resume(instance_store, ["pacs"], owner=owner_identity())
    assert job_of(instance_store, job).state == JobState.EXPORTED


def test_retry_job_requeues_dead_deliveries(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    first, second = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, first, Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0)
    queue.record(
        instance_store, second, Outcome(Kind.DEAD, "rejected, status 0xC000", 0xC000), POLICY, jitter=0.5, now=T0
    )
    assert queue.settle(instance_store, job) == JobState.FAILED
    assert queue.retry_job(instance_store, job, now=T0 + 60) == 1
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and "failure" not in state.detail
    assert state.detail["previous_failures"][0]["stage"] == "export"
    delivered, requeued = deliveries(instance_store, job)
    assert delivered.state == "delivered" and delivered.attempts == 1
    assert (requeued.state, requeued.attempts, requeued.next_attempt_at) == ("pending", 0, T0 + 60)
    assert [h["outcome"] for h in requeued.history] == ["dead", "requeued"]
    with pytest.raises(ExportError, match="no dead or refused delivery"):
        queue.retry_job(instance_store, job)
    with pytest.raises(NotFound):
        queue.retry_job(instance_store, 9999)


def test_retry_job_requeues_refused_deliveries_of_an_exported_job(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    first, second = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, first, Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0)
    queue.record(instance_store, second, Outcome(Kind.REFUSED, "not supported"), POLICY, jitter=0.5, now=T0)
    assert queue.settle(instance_store, job) == JobState.EXPORTED
    assert queue.retry_job(instance_store, job, now=T0 + 60) == 1
    state = job_of(instance_store, job)
    assert state.state == JobState.ENCODED and "previous_failures" not in state.detail
    delivered, requeued = deliveries(instance_store, job)
    assert delivered.state == "delivered"
    assert (requeued.state, requeued.attempts, requeued.next_attempt_at) == ("pending", 0, T0 + 60)
    assert [h["outcome"] for h in requeued.history] == ["refused", "requeued"]
    (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 60)[1]  # type: ignore[index]
    queue.record(instance_store, item, Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0 + 61)
    assert queue.settle(instance_store, job) == JobState.EXPORTED
    export = job_of(instance_store, job).detail["export"]
    assert (export["delivered"], export["refused"]) == (2, 0) and "refused_reasons" not in export
    with pytest.raises(ExportError, match=f"job {job} has no dead or refused delivery to retry"):
        queue.retry_job(instance_store, job)


def test_deliveries_view(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    (path,) = outputs(tmp_path / "out", 1)
    queue.enqueue(instance_store, job, [path], ["pacs"], now=T0)
    (view,) = queue.deliveries_of(instance_store, job)
    assert view["sop_instance_uid"] == sop_instance_uid(path) and view["destination"] == "pacs"
    assert (view["state"], view["attempts"], view["history"], view["next_attempt_at"]) == ("pending", 0, [], T0)
    assert "path" not in view and view["kind"] is None, "a CT image is of no known kind of result"


def test_a_batch_that_failed_together_is_due_again_together(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    items = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    busy = Outcome(Kind.RETRY, "HTTP 503", 503)
    for k, item in enumerate(items):  # the answers came in at different times
        queue.record(instance_store, item, busy, POLICY, jitter=0.2, now=T0 + 3 + k, retry_from=T0)
    assert {r.next_attempt_at for r in deliveries(instance_store, job)} == {T0 + 10 * 0.6}
    assert len(queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0 + 6)[1]) == 2  # type: ignore[index]


def _attempts_until(
    store: InstanceStore, job: int, policy: RetryPolicy, outage_s: float, limit: int = 500
) -> list[float]:
    """Attempt the job's one delivery whenever it is due, failing while the destination is down (the first
    ``outage_s`` seconds), until it ends; the times of the attempts."""
    times: list[float] = []
    down = Outcome(Kind.RETRY, "association failed: destination unreachable", None)
    for _ in range(limit):
        (row,) = deliveries(store, job)
        if row.state != "pending":
            return times
        now = row.next_attempt_at
        (item,) = queue.claim(store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=now)[1]  # type: ignore[index]
        outcome = down if now - T0 < outage_s else Outcome(Kind.DELIVERED, "", 0)
        queue.record(store, item, outcome, policy, jitter=0.0, now=now)
        times.append(now)
    raise AssertionError(f"still pending after {limit} attempts")


def test_a_short_outage_no_longer_kills_deliveries(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    policy = RetryPolicy.from_settings(ExportSettings())  # the defaults: 24 h, backoff capped at 10 min
    times = _attempts_until(instance_store, job, policy, outage_s=150)
    (row,) = deliveries(instance_store, job)
    assert row.state == "delivered" and row.attempts == len(times) == 9, times
    assert [round(b - a) for a, b in itertools.pairwise(times)] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert {h["first_attempt_at"] for h in row.history[:-1]} == {T0}, "the round's start, on every retry"
    assert queue.settle(instance_store, job, now=times[-1]) == JobState.EXPORTED
    assert job_of(instance_store, job).detail["timings"]["export_s"] == times[-1] - T0

    old = make_job(instance_store)  # what 8 attempts did to the same outage
    queue.enqueue(instance_store, old, outputs(tmp_path / "old", 1, seed=1), ["pacs"], now=T0)
    _attempts_until(instance_store, old, RetryPolicy(max_attempts=8, backoff_max_s=300), outage_s=150)
    (row,) = deliveries(instance_store, old)
    assert row.state == "dead" and row.last_error is not None and row.last_error.startswith("gave up after 8 attempts")


def test_an_outage_longer_than_give_up_after_kills_them(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    policy = RetryPolicy(backoff_initial_s=2, backoff_max_s=600, give_up_after_s=3600)
    times = _attempts_until(instance_store, job, policy, outage_s=7200)
    (row,) = deliveries(instance_store, job)
    assert row.state == "dead" and times[-1] == T0 + 3600, "the last wait is cut short to fall on the deadline"
    assert max(b - a for a, b in itertools.pairwise(times)) == 600 * 0.5, "the backoff is capped (jitter 0: x 0.5)"
    assert row.last_error == (
        f"gave up after 60.0 min and {len(times)} attempts; last: association failed: destination unreachable"
    )
    assert queue.revivable_destinations(instance_store) == ["pacs"]
    assert queue.settle(instance_store, job, now=times[-1]) == JobState.FAILED
    reason = job_of(instance_store, job).detail["failure"]["reason"]
    assert reason == "1 of 1 deliveries dead: pacs: " + row.last_error and "\n" not in reason


def test_reasons_are_recorded_on_one_line(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    (item,) = queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    text = "the output file cannot be sent: OSError:\n  line two\n" + "x" * 2000
    queue.record(instance_store, item, Outcome(Kind.DEAD, text), POLICY, now=T0)
    (row,) = deliveries(instance_store, job)
    assert row.last_error is not None and "\n" not in row.last_error and len(row.last_error) <= 1024
    assert row.last_error.startswith("the output file cannot be sent: OSError: line two xxx")
    assert "\n" not in row.history[-1]["reason"]
    queue.settle(instance_store, job)
    reason = job_of(instance_store, job).detail["failure"]["reason"]
    assert "\n" not in reason and len(reason) <= 500


def test_depth_counts_deliveries_by_destination_and_state(instance_store: InstanceStore, tmp_path: Path) -> None:
    assert queue.depth(instance_store) == {}
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs", "vna"], now=T0)
    (item, *_) = queue.claim(instance_store, ["pacs"], 1, owner=EARLIER, lease_s=60.0, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, item, Outcome(Kind.DEAD, "rejected, status 0xC000"), POLICY, now=T0)
    assert queue.depth(instance_store) == {"pacs": {"pending": 2, "dead": 1}, "vna": {"pending": 3}}


def test_only_deliveries_of_an_encoded_job_are_claimed(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    with instance_store.write_sessions.begin() as session:  # as a cancel, or a re-run from assembly, leaves it
        session.execute(update(Job).where(Job.id == job).values(state=JobState.RECEIVED))
    assert queue.claim(instance_store, ["pacs"], 10, owner=EARLIER, lease_s=60.0, now=T0) is None
