"""An operator's moves (gateway.jobs.operations): re-run, cancel, reprocess a series; on SQLite and PostgreSQL.

Each move is conditional on the job's state, like a worker's: a job cancelled under a worker's lease makes that
worker's next write fail, and a move from the wrong state changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from gateway.errors import JobConflict, LeaseLost, NotFound
from gateway.export import queue
from gateway.jobs import lifecycle, operations
from gateway.jobs.assembly import series_paths
from gateway.jobs.states import FINISHED, TRANSITIONS, JobState
from gateway.store.index import Delivery, Job, SeriesRevision
from gateway.store.store import InstanceStore

from job_rows import add_delivery, add_job, add_stored_series, routing


def job(store: InstanceStore, job_id: int) -> Job:
    with store.sessions() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def delivery_states(store: InstanceStore, job_id: int) -> list[str]:
    with store.sessions() as session:
        return list(session.scalars(select(Delivery.state).where(Delivery.job_id == job_id).order_by(Delivery.id)))


def test_cancelled_is_final_and_every_operator_move_is_in_the_table() -> None:
    assert JobState.CANCELLED in FINISHED
    for state in (JobState.RECEIVED, JobState.ASSEMBLING, JobState.ENCODING, JobState.ENCODED):
        assert (state, JobState.CANCELLED) in TRANSITIONS
    for state in FINISHED:
        assert (state, JobState.RECEIVED) in TRANSITIONS
        assert (state, JobState.CANCELLED) not in TRANSITIONS


# -- cancel --------------------------------------------------------------------------------------------------------


def test_a_job_cancelled_under_a_workers_lease_is_dropped_by_that_worker(index_store: InstanceStore) -> None:
    job_id = add_job(index_store)
    lease = lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=1001.0)
    assert lease is not None and lease.job_id == job_id
    operations.cancel(index_store, job_id, by="alice", now=1002.0)
    row = job(index_store, job_id)
    assert row.state == JobState.CANCELLED and row.lease_owner is None and row.finished_at == 1002.0
    assert row.detail["requested"] == {"action": "cancel", "by": "alice", "at": 1002.0}
    assert row.detail["cancelled"] == {"from": "assembling", "deliveries_not_sent": 0}
    with pytest.raises(LeaseLost):  # the worker's next write: nothing is written, it drops the job
        lifecycle.move(index_store, lease, JobState.ASSEMBLING, JobState.ASSEMBLED)
    assert lifecycle.renew(index_store, "host/1/a", 60.0) == 0
    assert not lifecycle.fail(index_store, lease, "assemble", "boom")
    assert job(index_store, job_id).state == JobState.CANCELLED
    assert lifecycle.reclaim_expired(index_store, now=10_000.0) == []


def test_cancelling_an_encoded_job_stops_its_deliveries_not_yet_sent(index_store: InstanceStore) -> None:
    job_id = add_job(index_store, state="encoded")
    sent = add_delivery(index_store, job_id, state="delivered")
    add_delivery(index_store, job_id, state="pending")
    add_delivery(index_store, job_id, state="sending")
    other = add_job(index_store, state="encoded")
    add_delivery(index_store, other, state="pending", destination="archive")
    operations.cancel(index_store, job_id)
    assert delivery_states(index_store, job_id) == ["delivered", "cancelled", "cancelled"]
    assert job(index_store, job_id).detail["cancelled"]["deliveries_not_sent"] == 2
    assert queue.claim(index_store, ["pacs"], 10, owner="host/1/a", lease_s=60.0, now=1.0) is None, (
        "no export worker takes a cancelled delivery"
    )
    claimed = queue.claim(index_store, ["pacs", "archive"], 10, owner="host/1/a", lease_s=60.0, now=1.0)
    assert claimed is not None and [item.job_id for item in claimed[1]] == [other]
    with index_store.sessions() as session:
        assert session.get(Delivery, sent) is not None


def test_a_finished_job_cannot_be_cancelled_and_an_unknown_one_is_not_found(index_store: InstanceStore) -> None:
    done = add_job(index_store, state="exported", finished_at=1005.0)
    with pytest.raises(JobConflict, match=f"job {done} is exported already"):
        operations.cancel(index_store, done)
    assert job(index_store, done).state == JobState.EXPORTED and "requested" not in job(index_store, done).detail
    with pytest.raises(NotFound, match="no job 424242"):
        operations.cancel(index_store, 424242)


# -- re-run --------------------------------------------------------------------------------------------------------


def test_a_rerun_from_assembly_starts_afresh_and_keeps_the_previous_outcome(index_store: InstanceStore) -> None:
    detail = {
        "timings": {"queue_s": 1.0, "assemble_s": 0.5, "infer_s": 2.0},
        "inference": routing("lung@1.0"),
        "outputs": [{"kind": "SEG", "file": "job-1/SEG.dcm"}],
        "failure": {"stage": "export", "reason": "1 of 1 deliveries dead: pacs: refused"},
        "handed_back": [{"at": 1.0, "from": "assembling", "why": "stopping"}],
    }
    job_id = add_job(index_store, state="failed", detail=detail, finished_at=1010.0)
    assert operations.rerun(index_store, job_id, from_stage="assemble", by="bob", now=2000.0) == JobState.RECEIVED
    row = job(index_store, job_id)
    assert row.state == JobState.RECEIVED and row.finished_at is None and row.attempts == 0
    assert set(row.detail) == {"revision", "instances", "previous_runs", "queued_at", "requested"}
    assert row.detail["requested"] == {"action": "rerun-assemble", "by": "bob", "at": 2000.0}
    (previous,) = row.detail["previous_runs"]
    assert previous == {
        "state": "failed",
        "failure": detail["failure"],
        "finished_at": 1010.0,
        "timings": detail["timings"],
    }
    lease = lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=2003.5)
    assert lease is not None and lease.job_id == job_id
    assert job(index_store, job_id).detail["timings"] == {"queue_s": 3.5}, "the wait counts from the re-run"
    with pytest.raises(JobConflict, match="is assembling: only a finished job can be re-run"):
        operations.rerun(index_store, job_id, from_stage="assemble")
    operations.cancel(index_store, job_id, now=2004.0)
    operations.rerun(index_store, job_id, from_stage="assemble", now=2005.0)
    runs = job(index_store, job_id).detail["previous_runs"]
    assert [r["state"] for r in runs] == ["failed", "cancelled"]
    assert runs[1]["requested"]["action"] == "cancel"


def test_a_rerun_is_refused_for_a_purged_series_an_unknown_stage_or_job(index_store: InstanceStore) -> None:
    purged = add_job(index_store, state="exported")
    with index_store.write_sessions.begin() as session:
        row = session.get(Job, purged)
        assert row is not None
        row.purged_at = 1.0
    with pytest.raises(JobConflict, match="purged by retention"):
        operations.rerun(index_store, purged, from_stage="assemble")
    with pytest.raises(ValueError, match="assemble, export"):
        operations.rerun(index_store, purged, from_stage="infer")
    with pytest.raises(NotFound):
        operations.rerun(index_store, 424242, from_stage="assemble")
    with pytest.raises(NotFound):
        operations.rerun(index_store, 424242, from_stage="export")


def test_a_rerun_from_export_sends_every_output_again(index_store: InstanceStore) -> None:
    outputs = {"outputs": [{"kind": "SEG"}]}
    job_id = add_job(index_store, state="exported", detail=outputs, finished_at=1010.0)
    add_delivery(index_store, job_id, state="delivered")
    add_delivery(index_store, job_id, state="refused")
    assert operations.rerun(index_store, job_id, from_stage="export", by="carol", now=3000.0) == JobState.ENCODED
    row = job(index_store, job_id)
    assert row.state == JobState.ENCODED
    assert row.detail["requested"] == {"action": "rerun-export", "by": "carol", "at": 3000.0}
    assert delivery_states(index_store, job_id) == ["pending", "pending"]

    waiting = add_job(index_store, state="received", detail=outputs)
    with pytest.raises(JobConflict, match="is received"):
        operations.rerun(index_store, waiting, from_stage="export")
    bare = add_job(index_store, state="exported")
    with pytest.raises(JobConflict, match="no outputs"):
        operations.rerun(index_store, bare, from_stage="export")
    nowhere = {**outputs, "export": {"undelivered": True, "reason": "no destination configured"}}
    undelivered = add_job(index_store, state="exported", detail=nowhere)
    with pytest.raises(JobConflict, match="no destination configured"):
        operations.rerun(index_store, undelivered, from_stage="export")
    assert job(index_store, undelivered).state == JobState.EXPORTED


# -- reprocess -----------------------------------------------------------------------------------------------------


def test_reprocessing_a_series_runs_it_whole_as_a_new_revision(index_store: InstanceStore, tmp_path: Path) -> None:
    first = add_stored_series(index_store, tmp_path / "ct", slices=4)
    uid = job(index_store, first).series_instance_uid
    with pytest.raises(JobConflict, match=f"job {first}"):
        operations.reprocess_series(index_store, uid)
    operations.cancel(index_store, first)
    again = operations.reprocess_series(index_store, uid, by="dave", now=5000.0)
    row = job(index_store, again)
    assert row.state == JobState.RECEIVED and again != first
    assert row.detail == {
        "revision": 2,
        "instances": 4,
        "requested": {"action": "reprocess", "by": "dave", "at": 5000.0},
    }
    with index_store.sessions() as session:
        revision = session.get(SeriesRevision, row.revision_id)
        assert revision is not None
        assert (revision.revision, revision.state, revision.instance_count) == (2, "complete", 0)
    assert len(series_paths(index_store, again)) == 4, "the job covers every revision up to its own"
    assert lifecycle.next_claimable(index_store, now=5001.0) == again
    with pytest.raises(NotFound):
        operations.reprocess_series(index_store, "2.25.404")


def test_a_series_still_arriving_is_not_reprocessed(index_store: InstanceStore, tmp_path: Path) -> None:
    first = add_stored_series(index_store, tmp_path / "ct", slices=4)
    operations.cancel(index_store, first)
    late = dcmread(sorted((tmp_path / "ct").glob("[!c]*.dcm"))[0])  # one of the series' files, as written
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.save_as(tmp_path / "late.dcm")
    index_store.put(tmp_path / "late.dcm", source="test", now=6000.0)  # opens the series' revision 2
    with pytest.raises(JobConflict, match="revision 2 is open"):
        operations.reprocess_series(index_store, str(late.SeriesInstanceUID))
