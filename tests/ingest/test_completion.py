"""Series completion: a revision completes once after its quiet period, across threads, revisions and restarts."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import StarletteDeprecationWarning

from gateway.config import DicomSettings, IngestSettings, Settings
from gateway.export.scu import Peer, SendReport, scan, send
from gateway.ingest.completion import Completion, complete_quiet_series
from gateway.runtime import Gateway
from gateway.store.index import Instance, Job, SeriesRevision
from gateway.store.store import InstanceStore

from conftest import api_client, make_settings
from dicom_files import minimal_ct
from peers import wait_until

with warnings.catch_warnings():
    # Starlette 1.x warns that its TestClient prefers httpx2 over httpx; not our code, and harmless here.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from gateway.api.app import create_app

T0 = 1_700_000_000.0  # arrival times are explicit: completion is a function of them and of `now`
QUIET = 10.0
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_B = "1.2.826.0.1.3680043.8.498.1.2"


class SeriesFiles:
    """Instances of one series written once; ``put`` stores a copy (the store consumes what it is given)."""

    def __init__(self, folder: Path, series_uid: str, count: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.uid = series_uid
        self.files = [
            minimal_ct(folder / f"{i:03d}.dcm", StudyInstanceUID=STUDY, SeriesInstanceUID=series_uid)
            for i in range(count)
        ]

    def put(self, store: InstanceStore, index: int, now: float | None) -> bool:
        """Store a copy of instance ``index`` arriving at ``now``; whether it was a duplicate."""
        copy = self.folder / f"copy-{index:03d}-{time.monotonic_ns()}.part"
        shutil.copyfile(self.files[index], copy)
        outcome = store.put(copy, source="test", now=now)
        assert not copy.exists(), "put consumes its source"
        return outcome.duplicate


@pytest.fixture
def store(settings: Settings) -> Iterator[InstanceStore]:
    s = InstanceStore(settings.store)
    try:
        yield s
    finally:
        s.close()


def jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def revisions(sessions: sessionmaker[Session], series_uid: str) -> list[SeriesRevision]:
    with sessions() as session:
        return list(
            session.scalars(
                select(SeriesRevision)
                .where(SeriesRevision.series_instance_uid == series_uid)
                .order_by(SeriesRevision.revision)
            )
        )


def instance_revisions(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        return {row.sop_instance_uid: row.revision_id for row in session.scalars(select(Instance))}


def test_complete_only_after_the_quiet_period(store: InstanceStore, tmp_path: Path) -> None:
    series = SeriesFiles(tmp_path / "a", SERIES_A, 3)
    for i, at in enumerate((T0, T0 + 2.0, T0 + 1.0)):  # the last to arrive is not the latest arrival time
        assert not series.put(store, i, now=at)

    assert complete_quiet_series(store.write_sessions, QUIET, now=T0 + 2.0) == []
    assert complete_quiet_series(store.write_sessions, QUIET, now=T0 + 2.0 + QUIET - 0.5) == [], (
        "quiet period counts from the latest arrival time, not the last call to put"
    )
    assert jobs(store.sessions) == []
    (rev,) = revisions(store.sessions, SERIES_A)
    assert (rev.state, rev.instance_count, rev.last_received_at) == ("open", 3, T0 + 2.0)

    (done,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 2.0 + QUIET + 0.5)
    assert (done.study_instance_uid, done.series_instance_uid) == (STUDY, SERIES_A)
    assert (done.revision, done.instance_count) == (1, 3)
    (job,) = jobs(store.sessions)
    assert job.id == done.job_id and job.revision_id == done.revision_id == rev.id
    assert job.state == "received"
    assert job.detail == {"revision": 1, "instances": 3}
    (rev,) = revisions(store.sessions, SERIES_A)
    assert (rev.state, rev.completed_at) == ("complete", T0 + 2.0 + QUIET + 0.5)


def test_an_arrival_in_the_quiet_period_restarts_it(store: InstanceStore, tmp_path: Path) -> None:
    series = SeriesFiles(tmp_path / "a", SERIES_A, 2)
    series.put(store, 0, now=T0)
    series.put(store, 1, now=T0 + QUIET - 1)
    assert complete_quiet_series(store.write_sessions, QUIET, now=T0 + QUIET + 1) == []
    (done,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 2 * QUIET)
    assert done.instance_count == 2


def test_repeated_calls_complete_once(store: InstanceStore, tmp_path: Path) -> None:
    series = SeriesFiles(tmp_path / "a", SERIES_A, 2)
    series.put(store, 0, now=T0)
    series.put(store, 1, now=T0)
    first = complete_quiet_series(store.write_sessions, QUIET, now=T0 + QUIET + 1)
    assert len(first) == 1
    for later in (T0 + QUIET + 1, T0 + QUIET + 2, T0 + 100 * QUIET):
        assert complete_quiet_series(store.write_sessions, QUIET, now=later) == []
    assert [j.id for j in jobs(store.sessions)] == [first[0].job_id]


def test_concurrent_calls_complete_each_revision_once(settings: Settings, tmp_path: Path) -> None:
    """Eight threads over two engines on one index (as two processes would be): one job per series."""
    stores = [InstanceStore(settings.store), InstanceStore(settings.store)]
    try:
        uids = [f"{SERIES_A}.{k}" for k in range(3)]
        for k, uid in enumerate(uids):
            series = SeriesFiles(tmp_path / f"s{k}", uid, 2)
            series.put(stores[0], 0, now=T0)
            series.put(stores[1], 1, now=T0 + k)
        barrier = threading.Barrier(8)
        results: list[list[Completion]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def race(store: InstanceStore) -> None:
            try:
                barrier.wait(timeout=30)
                done = complete_quiet_series(store.write_sessions, QUIET, now=T0 + QUIET + 5)
            except BaseException as exc:  # reported below, in the test's thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(done)

        threads = [threading.Thread(target=race, args=(stores[i % 2],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        completed = [c for done in results for c in done]
        assert sorted(c.series_instance_uid for c in completed) == sorted(uids), "each series exactly once"
        assert sorted(j.series_instance_uid for j in jobs(stores[0].sessions)) == sorted(uids)
        assert all(len(revisions(stores[0].sessions, uid)) == 1 for uid in uids)
    finally:
        for s in stores:
            s.close()


def test_arrivals_after_completion_open_a_new_revision(store: InstanceStore, tmp_path: Path) -> None:
    series = SeriesFiles(tmp_path / "a", SERIES_A, 5)
    for i in range(3):
        series.put(store, i, now=T0 + i)
    (first,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 20)

    for i in (3, 4):
        assert not series.put(store, i, now=T0 + 30 + i)
    rev1, rev2 = revisions(store.sessions, SERIES_A)
    assert (rev1.revision, rev1.state, rev1.instance_count, rev1.completed_at) == (1, "complete", 3, T0 + 20)
    assert (rev2.revision, rev2.state, rev2.instance_count) == (2, "open", 2)
    assert rev2.first_received_at == T0 + 33 and rev2.last_received_at == T0 + 34
    by_revision = instance_revisions(store.sessions)
    assert sorted(by_revision.values()) == [rev1.id] * 3 + [rev2.id] * 2

    assert complete_quiet_series(store.write_sessions, QUIET, now=T0 + 34 + QUIET - 1) == []
    (second,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 34 + QUIET + 1)
    assert (second.revision, second.instance_count, second.revision_id) == (2, 2, rev2.id)
    job1, job2 = jobs(store.sessions)
    assert (job1.id, job1.revision_id, job1.detail) == (
        first.job_id,
        rev1.id,
        {"revision": 1, "instances": 3},
    )
    assert (job2.id, job2.revision_id, job2.detail) == (
        second.job_id,
        rev2.id,
        {"revision": 2, "instances": 2},
    )
    rev1_again, _ = revisions(store.sessions, SERIES_A)
    assert (rev1_again.completed_at, rev1_again.instance_count) == (T0 + 20, 3), "revision 1 untouched"


def test_a_duplicate_after_completion_opens_no_revision(store: InstanceStore, tmp_path: Path) -> None:
    series = SeriesFiles(tmp_path / "a", SERIES_A, 2)
    series.put(store, 0, now=T0)
    series.put(store, 1, now=T0)
    (done,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + QUIET + 1)
    assert series.put(store, 1, now=T0 + 50), "a duplicate is reported as one"
    (rev,) = revisions(store.sessions, SERIES_A)
    assert (rev.state, rev.instance_count, rev.last_received_at) == ("complete", 2, T0)
    assert complete_quiet_series(store.write_sessions, QUIET, now=T0 + 50 + QUIET + 1) == []
    assert [j.id for j in jobs(store.sessions)] == [done.job_id]


def test_two_series_complete_independently(store: InstanceStore, tmp_path: Path) -> None:
    a = SeriesFiles(tmp_path / "a", SERIES_A, 2)
    b = SeriesFiles(tmp_path / "b", SERIES_B, 3)
    a.put(store, 0, now=T0)
    b.put(store, 0, now=T0 + 1)
    a.put(store, 1, now=T0 + 2)
    b.put(store, 1, now=T0 + 6)
    b.put(store, 2, now=T0 + 7)
    (done_a,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 2 + QUIET + 1)
    assert (done_a.series_instance_uid, done_a.instance_count) == (SERIES_A, 2)
    assert revisions(store.sessions, SERIES_B)[0].state == "open"
    (done_b,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 7 + QUIET + 1)
    assert (done_b.series_instance_uid, done_b.instance_count) == (SERIES_B, 3)
    assert {j.series_instance_uid: j.detail["instances"] for j in jobs(store.sessions)} == {
        SERIES_A: 2,
        SERIES_B: 3,
    }


def wait_for_jobs(sessions: sessionmaker[Session], count: int, timeout_s: float = 15) -> list[Job]:
    wait_until(lambda: len(jobs(sessions)) >= count, timeout_s=timeout_s, what=f"{count} job(s)")
    return jobs(sessions)


def test_series_sent_over_dimse_completes_once(gateway: Gateway, tmp_path: Path) -> None:
    paths = [minimal_ct(tmp_path / f"{i}.dcm", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES_A) for i in range(12)]
    assert gateway.scp is not None
    report = SendReport()
    send(scan(paths, report), Peer("GATEWAY", "127.0.0.1", gateway.scp.port), associations=3, report=report)
    assert report.sent == 12 and not report.failed
    (job,) = wait_for_jobs(gateway.store.sessions, 1)
    assert (job.series_instance_uid, job.state, job.detail) == (
        SERIES_A,
        "received",
        {"revision": 1, "instances": 12},
    )
    (rev,) = revisions(gateway.store.sessions, SERIES_A)
    assert rev.completed_at is not None
    assert rev.completed_at >= rev.last_received_at + gateway.settings.ingest.quiet_period_s
    assert complete_quiet_series(gateway.store.write_sessions, 0.0, now=time.time() + 3600) == []
    assert len(jobs(gateway.store.sessions)) == 1


def test_restart_in_the_quiet_period_completes_once(tmp_path: Path) -> None:
    quiet = 1.5
    ingest = IngestSettings(quiet_period_s=quiet, completion_poll_s=0.05, resend_wait_s=0)
    settings = make_settings(tmp_path / "data", ingest=ingest)
    series = SeriesFiles(tmp_path / "a", SERIES_A, 4)

    first = Gateway(settings, dimse=False)
    first.start()
    try:
        for i in range(4):
            series.put(first.store, i, now=None)
        (rev,) = revisions(first.store.sessions, SERIES_A)
        assert rev.state == "open" and jobs(first.store.sessions) == []
    finally:
        first.stop()
    assert time.time() < rev.last_received_at + quiet, "the first gateway must stop inside the quiet period"

    second = Gateway(settings, dimse=False)
    second.start()
    try:
        (job,) = wait_for_jobs(second.store.sessions, 1)
        assert job.detail == {"revision": 1, "instances": 4}
        (rev,) = revisions(second.store.sessions, SERIES_A)
        assert rev.completed_at is not None and rev.completed_at >= rev.last_received_at + quiet
    finally:
        second.stop()

    third = Gateway(settings, dimse=False)
    third.start()
    try:
        assert complete_quiet_series(third.store.write_sessions, quiet, now=time.time() + 3600) == []
        assert [j.id for j in jobs(third.store.sessions)] == [job.id], "restarting after completion adds nothing"
    finally:
        third.stop()


def test_jobs_and_studies_api(settings: Settings, tmp_path: Path) -> None:
    series = SeriesFiles(tmp_path / "a", SERIES_A, 4)
    past = time.time() - 60  # already quiet: the app's monitor completes it at its first poll
    before = InstanceStore(settings.store)
    try:
        for i in range(3):
            series.put(before, i, now=past)
    finally:
        before.close()
    app = create_app(settings, start_dimse=False)
    with api_client(app) as client:
        wait_until(lambda: len(client.get("/api/jobs").json()) == 1, timeout_s=15, what="first job")
        series.put(app.state.store, 3, now=past + 1)
        wait_until(lambda: len(client.get("/api/jobs").json()) == 2, timeout_s=15, what="second job")

        listed = client.get("/api/jobs")
        assert listed.status_code == 200
        newest, oldest = listed.json()
        assert newest["id"] > oldest["id"], "newest first"
        assert listed.headers["X-Total-Count"] == "2"
        for job, revision, count in ((oldest, 1, 3), (newest, 2, 1)):
            assert job["state"] == "received" and job["revision"] == revision
            assert (job["study_instance_uid"], job["series_instance_uid"]) == (STUDY, SERIES_A)
            assert "detail" not in job, "the list is compact"
            single = client.get(f"/api/jobs/{job['id']}").json()
            assert single["detail"] == {"revision": revision, "instances": count}
            assert single["deliveries"] == [], "one job also lists its output deliveries (none yet)"
            assert {key: single[key] for key in ("id", "state", "created_at")} == {
                key: job[key] for key in ("id", "state", "created_at")
            }
        assert client.get("/api/jobs/999999").status_code == 404
        assert client.get("/api/jobs", params={"state": "received", "limit": 1}).json() == [newest]
        assert client.get("/api/jobs", params={"state": "failed"}).json() == []

        studies = client.get("/api/studies")
        assert studies.status_code == 200
        (study,) = studies.json()
        assert study["study_instance_uid"] == STUDY
        (entry,) = study["series"]
        assert (entry["series_instance_uid"], entry["modality"], entry["instances"]) == (SERIES_A, "CT", 4)
        assert [(r["revision"], r["state"], r["instances"], r["job_id"]) for r in entry["revisions"]] == [
            (1, "complete", 3, oldest["id"]),
            (2, "complete", 1, newest["id"]),
        ]
        assert all(r["completed_at"] >= r["last_received_at"] for r in entry["revisions"])


def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    """The DICOM port is taken: start fails, and neither the monitor nor the index writer is left running."""

    def running() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name in ("completion-monitor", "index-writer"))

    before = running()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = Gateway(make_settings(tmp_path / "data", dicom=DicomSettings(host="127.0.0.1", port=port)))
        with pytest.raises(OSError):
            gw.start()
    assert running() == before


def test_after_a_restart_a_series_cut_off_mid_transfer_waits_a_quiet_period_for_its_resend(tmp_path: Path) -> None:
    """Instances stored long before a (re)start are not completed at once: the sender, cut off by the stop or a
    kill -9, re-sends within a quiet period and the series completes once, whole (found by the soak)."""
    from gateway.ingest.completion import CompletionMonitor

    store = InstanceStore(make_settings(tmp_path / "data").store)
    try:
        same = {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES_A}
        files = [minimal_ct(tmp_path / f"{k}.dcm", InstanceNumber=k + 1, **same) for k in range(4)]
        long_ago = time.time() - 3600
        for path in files[:2]:  # what the gateway stored before it was killed
            store.put(path, source="test", now=long_ago)
        monitor = CompletionMonitor(store.write_sessions, quiet_period_s=1.5, poll_s=0.05)
        monitor.start()
        try:
            time.sleep(0.5)
            for path in files[2:]:  # the resend, within a quiet period of the start
                store.put(path, source="test")
            wait_until(lambda: bool(jobs_of(store)), timeout_s=30, what="the series to complete")
        finally:
            monitor.stop()
        (job,) = jobs_of(store)
        assert job.detail["instances"] == 4, "one job, on the whole series"
    finally:
        store.close()


def jobs_of(store: InstanceStore) -> list[Job]:
    with store.sessions() as session:
        return list(session.scalars(select(Job)))


def test_next_quiet_at_is_when_the_first_open_revision_falls_quiet(store: InstanceStore, tmp_path: Path) -> None:
    from gateway.ingest.completion import next_quiet_at

    assert next_quiet_at(store.sessions, QUIET) is None, "nothing open"
    a = SeriesFiles(tmp_path / "a", SERIES_A, 2)
    b = SeriesFiles(tmp_path / "b", SERIES_B, 1)
    a.put(store, 0, now=T0)
    b.put(store, 0, now=T0 + 1)
    a.put(store, 1, now=T0 + 2)  # A's quiet period starts again
    assert next_quiet_at(store.sessions, QUIET) == T0 + 1 + QUIET
    assert next_quiet_at(store.sessions, QUIET, not_last_before=T0 + 1.5) == T0 + 2 + QUIET, "after a restart"
    (done,) = complete_quiet_series(store.write_sessions, QUIET, now=T0 + 1 + QUIET)
    assert done.series_instance_uid == SERIES_B
    assert next_quiet_at(store.sessions, QUIET) == T0 + 2 + QUIET
    complete_quiet_series(store.write_sessions, QUIET, now=T0 + 2 + QUIET)
    assert next_quiet_at(store.sessions, QUIET) is None


def test_the_monitor_completes_a_series_when_it_falls_quiet_not_at_its_poll(tmp_path: Path) -> None:
    """With a poll far longer than the test, the series still completes: the monitor wakes when it falls quiet."""
    from gateway.ingest.completion import CompletionMonitor

    store = InstanceStore(make_settings(tmp_path / "data").store)
    try:
        woken = threading.Event()
        monitor = CompletionMonitor(store.write_sessions, quiet_period_s=0.5, poll_s=3600, on_complete=woken.set)
        monitor.start()
        try:
            series = SeriesFiles(tmp_path / "a", SERIES_A, 3)
            for k in range(3):
                series.put(store, k, now=None)
            assert woken.wait(timeout=60), "the monitor did not complete the series"
        finally:
            monitor.stop()
        (job,) = jobs_of(store)
        assert job.detail == {"revision": 1, "instances": 3}
        (rev,) = revisions(store.sessions, SERIES_A)
        assert rev.completed_at is not None and rev.completed_at >= rev.last_received_at + 0.5
    finally:
        store.close()
