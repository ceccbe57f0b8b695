"""The durable queue on its own: enqueue (each destination the kinds it takes), claim, record with backoff, settle
the job (refused deliveries do not fail it), resume, retry; on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pytest
from pacs import deliveries, job_of, make_job, outputs, result_files, sop_instance_uid

from gateway.config import DEFAULT_SEND
from gateway.errors import ExportError, NotFound
from gateway.export import queue
from gateway.export.outcome import Kind, Outcome, RetryPolicy
from gateway.jobs.states import JobState
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
    assert queue.enqueue(instance_store, job, inside, ["pacs", "ris"], now=T0) == 2, "only what is not queued yet"


def test_enqueue_without_destination_exports_at_once(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    assert queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), []) == 0
    state = job_of(instance_store, job)
    assert state.state == JobState.EXPORTED and state.detail["export"]["reason"] == queue.NO_DESTINATION


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
    assert queue.enqueue(instance_store, job, [files["sc"]], {"pacs": ["sc"]}, now=T0) == 1
    assert job_of(instance_store, job).detail["export"]["not_sent"] == {"pacs": ["gsps", "ko", "sc"], "vna": ["sc"]}
    views = queue.deliveries_of(instance_store, job)
    assert {v["kind"] for v in views} == {"seg", "sr", "gsps", "ko", "sc", None}


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
    with pytest.raises(ExportError, match=r"bad\.dcm cannot be queued"):
        queue.enqueue(instance_store, job, [*outputs(tmp_path / "out", 2), bad], ["pacs"])
    assert deliveries(instance_store, job) == [] and job_of(instance_store, job).state == JobState.INFERRED
    with pytest.raises(NotFound):
        queue.enqueue(instance_store, 9999, [], ["pacs"])


def test_claim_takes_due_deliveries_of_one_destination(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs", "vna"], now=T0)
    assert queue.claim(instance_store, ["pacs", "vna"], 10, now=T0 - 1) is None, "not due yet"
    assert queue.claim(instance_store, ["ris"], 10, now=T0) is None, "no delivery for that destination"
    name, items = queue.claim(instance_store, ["pacs", "vna"], 2, now=T0) or ("", [])
    assert name == "pacs" and len(items) == 2 and all(i.path.is_file() for i in items)
    name, items = queue.claim(instance_store, ["pacs", "vna"], 10, now=T0) or ("", [])
    assert name == "vna" and len(items) == 3, "the destination whose oldest delivery is due first"
    name, items = queue.claim(instance_store, ["pacs", "vna"], 10, now=T0) or ("", [])
    assert name == "pacs" and len(items) == 1
    assert queue.claim(instance_store, ["pacs", "vna"], 10, now=T0) is None, "everything is sending"
    assert {r.state for r in deliveries(instance_store, job)} == {"sending"}


def test_retry_backs_off_then_gives_up(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 1), ["pacs"], now=T0)
    busy = Outcome(Kind.RETRY, "out of resources, status 0xA700", 0xA700)
    now = T0
    for attempt in (1, 2):
        (item,) = (queue.claim(instance_store, ["pacs"], 10, now=now) or ("", []))[1]
        assert queue.record(instance_store, item, busy, POLICY, jitter=0.5, now=now) == "pending"
        (row,) = deliveries(instance_store, job)
        assert row.next_attempt_at == now + 0.75 * 10 * 2 ** (attempt - 1) and row.attempts == attempt
        assert queue.claim(instance_store, ["pacs"], 10, now=row.next_attempt_at - 0.001) is None
        now = row.next_attempt_at
        assert queue.settle(instance_store, job, now=now) is None, "still pending"
    (item,) = (queue.claim(instance_store, ["pacs"], 10, now=now) or ("", []))[1]
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
    first, second = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
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
    (item,) = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
    outcome = Outcome(Kind.DEAD, "rejected, status 0xA900", 0xA900)
    assert queue.record(instance_store, item, outcome, POLICY, jitter=0.5, now=T0) == "dead"
    (row,) = deliveries(instance_store, job)
    assert (row.attempts, row.last_status, row.last_error) == (1, 0xA900, "rejected, status 0xA900")


def test_refused_is_final_and_the_job_is_exported_with_the_reasons(
    instance_store: InstanceStore, tmp_path: Path
) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 3), ["pacs"], now=T0)
    first, second, third = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
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
    assert queue.claim(instance_store, ["pacs"], 10, now=T0 + 1000) is None, "never sent again by itself"


def test_dead_fails_the_job_even_beside_refused_ones(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    first, second = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, first, Outcome(Kind.REFUSED, "not supported"), POLICY, jitter=0.5, now=T0)
    queue.record(instance_store, second, Outcome(Kind.DEAD, "rejected, status 0xC000"), POLICY, jitter=0.5, now=T0)
    assert queue.settle(instance_store, job) == JobState.FAILED
    detail = job_of(instance_store, job).detail
    assert detail["failure"]["reason"] == "1 of 2 deliveries dead: pacs: rejected, status 0xC000"
    assert (detail["export"]["refused"], detail["export"]["dead"]) == (1, 1)


def test_refused_reasons_are_listed_once_each_and_at_most_five(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 8), ["pacs"], now=T0)
    items = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
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
    items = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
    queue.record(instance_store, items[0], Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0)
    assert queue.release(instance_store, [items[1].id], at=T0 + 5, now=T0) == 1
    assert queue.resume(instance_store, ["pacs"], now=T0 + 1) == (1, 3)
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
    (item,) = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
    queue.record(
        instance_store, item, Outcome(Kind.DELIVERED), POLICY, jitter=0.5, now=T0
    )  # then a crash before settle
    assert job_of(instance_store, job).state == JobState.ENCODED
    queue.resume(instance_store, ["pacs"])
    assert job_of(instance_store, job).state == JobState.EXPORTED


def test_retry_job_requeues_dead_deliveries(instance_store: InstanceStore, tmp_path: Path) -> None:
    job = make_job(instance_store)
    queue.enqueue(instance_store, job, outputs(tmp_path / "out", 2), ["pacs"], now=T0)
    first, second = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
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
    first, second = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
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
    (item,) = queue.claim(instance_store, ["pacs"], 10, now=T0 + 60)[1]  # type: ignore[index]
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
    items = queue.claim(instance_store, ["pacs"], 10, now=T0)[1]  # type: ignore[index]
    busy = Outcome(Kind.RETRY, "HTTP 503", 503)
    for k, item in enumerate(items):  # the answers came in at different times
        queue.record(instance_store, item, busy, POLICY, jitter=0.2, now=T0 + 3 + k, retry_from=T0)
    assert {r.next_attempt_at for r in deliveries(instance_store, job)} == {T0 + 10 * 0.6}
    assert len(queue.claim(instance_store, ["pacs"], 10, now=T0 + 6)[1]) == 2  # type: ignore[index]
