"""Retention over a real store: purges by age, what is never touched, a crash between commit and unlinks, dry runs,
and the ``gateway purge`` command."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select, text

from gateway.config import HttpSettings, RetentionSettings, StoreSettings, TokenSettings, hash_token
from gateway.ingest.completion import complete_quiet_series
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Instance, Job, Output, Series, SeriesRevision, Study
from gateway.store.outputs import OutputRecord, record_job_outputs
from gateway.store.purge_journal import InstanceEntry, Journal
from gateway.store.retention import DAY_S, PurgeReport, Retention, _hold_writers
from gateway.store.store import InstanceStore

from conftest import LiveServer, make_settings
from dicom_files import minimal_ct

NOW = 1_900_000_000.0  # "now" for every purge here: ages are counted against it, never against the wall clock
GATEWAY_SCRIPT = Path(sys.executable).with_name("gateway")
DAYS = RetentionSettings(instances_days=7, outputs_days=30, failed_days=30, disk_high_watermark=1.0)


@dataclass
class StoredSeries:
    study: str
    uid: str
    job_id: int
    sop_uids: list[str]
    paths: list[Path]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InstanceStore]:
    """A store whose index is SQLite, or a fresh database on a real PostgreSQL (several processes may write there
    while a purge runs: its transaction holds them off, as SQLite's write lock does)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0, database_url=url))
    try:
        yield s
    finally:
        s.close()


def add_series(store: InstanceStore, tmp_path: Path, *, instances: int = 3, study: str | None = None) -> StoredSeries:
    """Store a series over C-STORE's code path (``InstanceStore.put``) and complete it: a ``received`` job."""
    study = study or generate_uid()
    uid = generate_uid()
    sops: list[str] = []
    for i in range(instances):
        sop = generate_uid()
        src = minimal_ct(tmp_path / f"in-{sop}.dcm", StudyInstanceUID=study, SeriesInstanceUID=uid, SOPInstanceUID=sop)
        store.put(src, source="test", now=NOW - 100 * DAY_S + i)
        sops.append(sop)
    (done,) = [
        c for c in complete_quiet_series(store.write_sessions, 0, now=NOW - 99 * DAY_S) if c.series_instance_uid == uid
    ]
    with store.sessions() as session:
        paths = [
            store.path_of(p) for p in session.scalars(select(Instance.path).where(Instance.series_instance_uid == uid))
        ]
    return StoredSeries(study, uid, done.job_id, sops, paths)


def finish(store: InstanceStore, job_id: int, state: JobState, days_ago: float, *, column: bool = True) -> None:
    """Put the job in a final state, finished ``days_ago`` (before :data:`NOW`); without ``column``, as an index
    made before ``finished_at`` existed (retention then counts from ``updated_at``)."""
    with store.write_sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state
        job.updated_at = NOW - days_ago * DAY_S
        job.finished_at = job.updated_at if column else None


def set_state(store: InstanceStore, job_id: int, state: JobState) -> None:
    with store.write_sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state


def add_outputs(store: InstanceStore, job_id: int, *, deliveries: tuple[str, ...] = ("delivered",)) -> list[Path]:
    """Write a job's outputs (a DICOM file, a NIfTI result) and one delivery per state in ``deliveries``."""
    out = store.data_dir / "outputs" / f"job-{job_id}"
    res = store.data_dir / "results" / f"job-{job_id}"
    for folder in (out, res):
        folder.mkdir(parents=True)
    (out / "seg.dcm").write_bytes(b"\0" * 1000)
    (res / "labels.nii.gz").write_bytes(b"\0" * 500)
    with store.write_sessions.begin() as session:
        owner = session.get(Job, job_id)
        assert owner is not None
        record_job_outputs(session, job_id, [output_record(owner.study_instance_uid, f"outputs/job-{job_id}/seg.dcm")])
        for i, state in enumerate(deliveries):
            session.add(
                Delivery(
                    job_id=job_id,
                    path=f"outputs/job-{job_id}/seg.dcm",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                    sop_instance_uid=generate_uid(),
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    destination=f"pacs{i}",
                    state=state,
                    attempts=1,
                    next_attempt_at=NOW,
                    history=[],
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
    return [out, res]


def output_record(study: str, path: str) -> OutputRecord:
    """An output of ``study`` in the index, as the encode stage records a SEG."""
    return OutputRecord(
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        study_instance_uid=study,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="SEG",
        series_number=9000,
        series_description="AI test 1.0.0 SEG",
        instance_number=1,
        rows=4,
        columns=4,
        number_of_frames=1,
        path=path,
        size=1000,
    )


def indexed_outputs(store: InstanceStore, job_id: int) -> int:
    """How many outputs of the job the index holds (what QIDO-RS lists)."""
    with store.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Output).where(Output.job_id == job_id)) or 0)


def held(store: InstanceStore, series: StoredSeries) -> int:
    with store.sessions() as session:
        return int(
            session.scalar(select(func.count()).where(Instance.series_instance_uid == series.uid).select_from(Instance))
            or 0
        )


def job(store: InstanceStore, job_id: int) -> Job:
    with store.sessions() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def assert_consistent(store: InstanceStore) -> None:
    """Every instance the index names is on disk, and no journal is left."""
    with store.sessions() as session:
        missing = [p for p in session.scalars(select(Instance.path)) if not store.path_of(p).is_file()]
    assert missing == [], "the index names files that are gone"
    assert not list((store.data_dir / "purge").glob("journal-*")), "a purge journal was left"


def purge(store: InstanceStore, settings: RetentionSettings = DAYS, **kwargs: bool) -> PurgeReport:
    return Retention(store, settings, 0).run(now=NOW, **kwargs)


def test_instances_go_by_age_from_the_end_of_their_last_job(store: InstanceStore, tmp_path: Path) -> None:
    old = add_series(store, tmp_path)
    recent = add_series(store, tmp_path)
    failed = add_series(store, tmp_path)
    failed_long_ago = add_series(store, tmp_path)
    legacy = add_series(store, tmp_path)  # finished before finished_at existed: counted from updated_at
    finish(store, old.job_id, JobState.EXPORTED, 8)
    finish(store, recent.job_id, JobState.SKIPPED, 6)
    finish(store, failed.job_id, JobState.FAILED, 8)  # failed jobs keep their inputs 30 days
    finish(store, failed_long_ago.job_id, JobState.FAILED, 31)
    finish(store, legacy.job_id, JobState.EXPORTED, 9, column=False)
    size = sum(p.stat().st_size for s in (old, failed_long_ago, legacy) for p in s.paths)

    report = purge(store)

    assert (report.series, report.instances, report.outputs, report.bytes) == (3, 9, 0, size)
    for gone in (old, failed_long_ago, legacy):
        assert held(store, gone) == 0 and not any(p.exists() for p in gone.paths)
        assert not gone.paths[0].parent.exists(), "the emptied series folder is removed"
        row = job(store, gone.job_id)
        assert row.purged_at == NOW and row.detail["retention"]["instances_purged_for"] == "age"
        assert row.detail["retention"]["instances"] == 3
    for kept in (recent, failed):
        assert held(store, kept) == 3 and all(p.is_file() for p in kept.paths)
        assert job(store, kept.job_id).purged_at is None
    with store.sessions() as session:  # history stays: the study, series and revision rows
        assert session.get(Series, old.uid) is not None
        assert session.scalar(select(func.count()).select_from(Study)) == 5
        assert session.scalar(select(func.count()).select_from(SeriesRevision)) == 5
    assert_consistent(store)
    assert purge(store).series == 0, "a second run finds nothing more"


def test_none_keeps_forever_and_the_longest_keep_of_a_series_wins(store: InstanceStore, tmp_path: Path) -> None:
    forever = add_series(store, tmp_path)
    finish(store, forever.job_id, JobState.EXPORTED, 1000)
    assert purge(store, RetentionSettings(instances_days=None, disk_high_watermark=1.0)).series == 0
    assert held(store, forever) == 3

    two_jobs = add_series(store, tmp_path)
    finish(store, two_jobs.job_id, JobState.EXPORTED, 40)
    # A later revision of the same series, whose job failed 8 days ago.
    src = minimal_ct(tmp_path / "late.dcm", StudyInstanceUID=two_jobs.study, SeriesInstanceUID=two_jobs.uid)
    store.put(src, source="test")
    (late,) = complete_quiet_series(store.write_sessions, 0, now=NOW - 99 * DAY_S)
    finish(store, late.job_id, JobState.FAILED, 8)
    report = purge(store, RetentionSettings(instances_days=None, failed_days=30, disk_high_watermark=1.0))
    assert report.series == 0 and held(store, two_jobs) == 4
    report = purge(store, RetentionSettings(instances_days=7, failed_days=7, disk_high_watermark=1.0))
    assert held(store, two_jobs) == 0 and report.instances == 4 + 3  # with the series kept forever before
    assert job(store, two_jobs.job_id).purged_at == NOW and job(store, late.job_id).purged_at == NOW


def test_outputs_go_after_outputs_days_once_every_delivery_is_final(store: InstanceStore, tmp_path: Path) -> None:
    done = add_series(store, tmp_path)
    queued = add_series(store, tmp_path)
    young = add_series(store, tmp_path)
    finish(store, done.job_id, JobState.FAILED, 31)  # inputs: 30 days for a failed job; outputs: 30 days
    finish(store, queued.job_id, JobState.EXPORTED, 31)
    finish(store, young.job_id, JobState.EXPORTED, 10)
    done_dirs = add_outputs(store, done.job_id, deliveries=("delivered", "refused", "dead"))
    queued_dirs = add_outputs(store, queued.job_id, deliveries=("delivered", "pending"))
    young_dirs = add_outputs(store, young.job_id)

    report = purge(store, RetentionSettings(instances_days=None, failed_days=None, disk_high_watermark=1.0))

    assert (report.series, report.outputs, report.bytes) == (0, 1, 1500)
    assert not any(d.exists() for d in done_dirs)
    assert all(d.is_dir() for d in queued_dirs + young_dirs), "a queued delivery keeps its file; 10 days is young"
    assert job(store, done.job_id).detail["retention"]["outputs_purged_for"] == "age"
    assert job(store, done.job_id).purged_at is None, "purged_at is for the inputs; these are kept"
    assert indexed_outputs(store, done.job_id) == 0, "QIDO-RS no longer lists the purged outputs"
    assert indexed_outputs(store, queued.job_id) == indexed_outputs(store, young.job_id) == 1
    with store.sessions() as session:  # deliveries stay as history
        assert session.scalar(select(func.count()).select_from(Delivery).where(Delivery.job_id == done.job_id)) == 3
    assert held(store, done) == 3


@pytest.mark.parametrize(
    "block",
    ["active job", "open revision", "pending delivery", "sending delivery", "active later job"],
)
def test_a_series_in_use_is_never_purged(store: InstanceStore, tmp_path: Path, block: str) -> None:
    series = add_series(store, tmp_path)
    finish(store, series.job_id, JobState.EXPORTED, 100)
    if block == "active job":
        set_state(store, series.job_id, JobState.INFERRING)
    elif block == "open revision":  # a new instance arrived: its revision is still open
        late = minimal_ct(tmp_path / "late.dcm", StudyInstanceUID=series.study, SeriesInstanceUID=series.uid)
        store.put(late, source="test")
    elif block.endswith("delivery"):
        add_outputs(store, series.job_id, deliveries=(block.split()[0],))
    else:  # a later revision's job still running
        late = minimal_ct(tmp_path / "late.dcm", StudyInstanceUID=series.study, SeriesInstanceUID=series.uid)
        store.put(late, source="test")
        complete_quiet_series(store.write_sessions, 0, now=NOW - 99 * DAY_S)

    report = purge(store, RetentionSettings(instances_days=1, outputs_days=1, disk_high_watermark=1.0))
    watermark = Retention(store, RetentionSettings(disk_high_watermark=1e-9, disk_low_watermark=1e-9), 0)
    forced = watermark.run(now=NOW)  # above the high watermark: purge whatever may be purged

    assert report.series == forced.series == 0 and held(store, series) >= 3
    assert all(p.is_file() for p in series.paths)
    assert job(store, series.job_id).purged_at is None
    if block.endswith("delivery"):
        assert report.outputs == forced.outputs == 0
        assert (store.data_dir / "outputs" / f"job-{series.job_id}" / "seg.dcm").is_file()


def test_above_the_high_watermark_finished_series_go_whatever_their_age(
    store: InstanceStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    young = add_series(store, tmp_path)
    active = add_series(store, tmp_path)
    finish(store, young.job_id, JobState.EXPORTED, 0.01)
    add_outputs(store, young.job_id)
    # Any real disk is above 1e-9 used: the purge wants to go below the low watermark and never can.
    settings = RetentionSettings(
        instances_days=None, outputs_days=None, disk_high_watermark=1e-9, disk_low_watermark=1e-9
    )
    retention = Retention(store, settings, 0)
    with caplog.at_level(logging.WARNING, logger="gateway.store.retention"):
        first = retention.run(now=NOW)
        second = retention.run(now=NOW)
    assert (first.series, first.outputs, first.for_space) == (1, 1, 2) and first.starved
    assert held(store, young) == 0 and held(store, active) == 3
    assert job(store, young.job_id).detail["retention"]["instances_purged_for"] == "disk space"
    assert second.starved and second.series == 0
    starved = [r for r in caplog.records if "nothing more may be purged" in r.getMessage()]
    assert len(starved) == 1, "the warning is said once per episode"
    assert_consistent(store)


def test_dry_run_frees_nothing_and_reports_what_the_real_run_frees(store: InstanceStore, tmp_path: Path) -> None:
    series = [add_series(store, tmp_path, instances=n) for n in (2, 3, 4)]
    finish(store, series[0].job_id, JobState.EXPORTED, 8)
    finish(store, series[1].job_id, JobState.FAILED, 31)
    finish(store, series[2].job_id, JobState.EXPORTED, 1)
    add_outputs(store, series[1].job_id)

    dry = purge(store, dry_run=True)
    assert all(p.is_file() for s in series for p in s.paths)
    assert [held(store, s) for s in series] == [2, 3, 4] and (store.data_dir / "outputs").is_dir()
    assert job(store, series[0].job_id).purged_at is None

    size = sum(p.stat().st_size for s in series[:2] for p in s.paths) + 1500
    real = purge(store)
    assert dry.dry_run and not real.dry_run
    counts = ("series", "instances", "outputs", "bytes", "for_space")
    assert [getattr(dry, k) for k in counts] == [getattr(real, k) for k in counts] == [2, 5, 1, size, 0]
    assert "would free 2 series (5 instances), the outputs of 1 jobs" in dry.summary()


def kill_during_unlinks(data_dir: Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a purge in a child process (on the index at ``url``, else the folder's SQLite) that is SIGKILLed once its
    transaction has committed, before any file is removed: a crash, with no cleanup of any kind."""
    script = (
        "import os, signal, sys\n"
        "import gateway.store.retention as retention\n"
        "from gateway.config import HttpSettings, RetentionSettings, StoreSettings, TokenSettings, hash_token\n"
        "from gateway.registry.registry import RegistryIndex\n"
        "retention.remove_files = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "url = sys.argv[3] or None\n"
        "index = RegistryIndex(StoreSettings(data_dir=sys.argv[1], min_free_bytes=0, database_url=url))\n"
        "retention.Retention(index, RetentionSettings(disk_high_watermark=1.0), 0).run(now=float(sys.argv[2]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(data_dir), str(NOW), url or ""], capture_output=True, text=True, timeout=120
    )


def test_a_crash_between_commit_and_unlinks_is_finished_by_the_next_run(store: InstanceStore, tmp_path: Path) -> None:
    gone = add_series(store, tmp_path)
    again = add_series(store, tmp_path)
    kept = add_series(store, tmp_path)
    finish(store, gone.job_id, JobState.EXPORTED, 8)
    finish(store, again.job_id, JobState.EXPORTED, 8)

    crashed = kill_during_unlinks(store.data_dir, store.settings.database_url)

    assert crashed.returncode == -9, crashed.stderr
    assert held(store, gone) == held(store, again) == 0, "the transaction committed"
    assert all(p.is_file() for p in gone.paths + again.paths), "no file was removed"
    assert len(list((store.data_dir / "purge").glob("journal-*.json"))) == 1
    assert job(store, gone.job_id).purged_at == NOW
    # Meanwhile the PACS sends one of the purged instances again: it is stored (over the file left behind) and
    # indexed, and the finished purge must not remove it.
    resent = minimal_ct(
        tmp_path / "resent.dcm",
        StudyInstanceUID=again.study,
        SeriesInstanceUID=again.uid,
        SOPInstanceUID=again.sop_uids[0],
    )
    assert not store.put(resent, source="test").duplicate

    report = purge(store)

    assert report.recovered == 1
    assert not any(p.exists() for p in gone.paths)
    assert again.paths[0].is_file() and not any(p.exists() for p in again.paths[1:])
    assert held(store, again) == 1 and held(store, kept) == 3
    assert_consistent(store)


def test_a_journal_whose_transaction_never_committed_removes_nothing(store: InstanceStore, tmp_path: Path) -> None:
    series = add_series(store, tmp_path)
    with store.sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    journal = Journal.create(store.data_dir / "purge")  # what a purge that died before its commit leaves
    journal.write([InstanceEntry(path, sop, None) for sop, path in rows], [])
    journal.release()
    torn = store.data_dir / "purge" / "journal-1-2-torn.json"
    torn.write_text('{"instances": [["instances/')

    report = purge(store)

    assert report.recovered == 1 and report.series == 0
    assert held(store, series) == 3 and all(p.is_file() for p in series.paths)
    assert_consistent(store)
    assert not torn.exists()


def test_a_live_purge_journal_is_left_alone(store: InstanceStore, tmp_path: Path) -> None:
    live = Journal.create(store.data_dir / "purge")  # locked, as while its purge runs in another process
    live.write([], [])
    try:
        assert Retention(store, DAYS, 0).finish_journals() == 0
        assert live.path.is_file()
    finally:
        live.discard()


def gateway_purge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [str(GATEWAY_SCRIPT), "purge", *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_gateway_purge_command(store: InstanceStore, tmp_path: Path) -> None:
    old = add_series(store, tmp_path, instances=4)
    finish(store, old.job_id, JobState.EXPORTED, 8)
    # The command counts from the wall clock: make the job's end old by that clock.
    with store.write_sessions.begin() as session:
        row = session.get(Job, old.job_id)
        assert row is not None
        row.finished_at = time.time() - 8 * DAY_S
    config = tmp_path / "gateway.yaml"
    url = store.settings.database_url
    config.write_text(
        f"store:\n  data_dir: {store.data_dir}\n  min_free_bytes: 0\n"
        + (f"  database_url: {url}\n" if url else "")
        + "retention:\n  instances_days: 7\n  disk_high_watermark: 1.0\n  disk_low_watermark: 1.0\n"
    )
    size = sum(p.stat().st_size for p in old.paths)

    dry = gateway_purge("--dry-run", "--config", str(config), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"would free 1 series (4 instances), the outputs of 0 jobs: {size / 1e6:.1f} MB ({size} bytes)" in dry.stdout
    assert "disk:" in dry.stdout and held(store, old) == 4

    real = gateway_purge("--config", str(config), "--data-dir", str(store.data_dir), cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    assert f"freed 1 series (4 instances), the outputs of 0 jobs: {size / 1e6:.1f} MB ({size} bytes)" in real.stdout
    assert held(store, old) == 0 and not any(p.exists() for p in old.paths)
    assert "DOE" not in dry.stdout + dry.stderr + real.stdout + real.stderr, "no patient data"

    missing = gateway_purge("--data-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "no data folder" in missing.stderr


def test_healthz_and_storage_show_the_disk(tmp_path: Path) -> None:
    token = "a-reader"
    http = HttpSettings(host="127.0.0.1", port=0, tokens=[TokenSettings(name="r", sha256=hash_token(token))])
    settings = make_settings(tmp_path / "data", http=http, retention=RetentionSettings(disk_high_watermark=0.9))
    with LiveServer(settings) as server:
        auth = {"Authorization": f"Bearer {token}"}
        health = httpx.get(f"{server.url}/healthz", headers=auth, timeout=10).json()
        deadline = time.monotonic() + 30
        storage = httpx.get(f"{server.url}/api/storage", headers=auth, timeout=10).json()
        while storage["last_purge"] is None and time.monotonic() < deadline:  # the first purge runs at start
            time.sleep(0.05)
            storage = httpx.get(f"{server.url}/api/storage", headers=auth, timeout=10).json()
        assert httpx.get(f"{server.url}/api/storage", timeout=10).status_code == 401
    total = shutil.disk_usage(tmp_path).total
    assert health["status"] == "ok" and health["accepting"] is True
    assert health["disk"]["total_bytes"] == storage["disk"]["total_bytes"] == total
    assert health["disk"]["min_free_bytes"] == 0 and health["disk"]["high_watermark"] == 0.9
    assert 0 < health["disk"]["used_fraction"] < 1
    assert storage["held"] == {"instances": 0, "instance_bytes": 0}
    assert storage["retention"]["instances_days"] == 7 and storage["retention"]["interval_s"] == 300
    assert storage["last_purge"]["series"] == 0 and storage["last_purge"]["dry_run"] is False


def test_a_purge_batch_holds_off_other_processes_writers_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """On PostgreSQL another process's arrival waits for the purge batch's commit (SQLite's write lock does so
    for every writer): no instance lands in a series while its rows are being taken out."""
    store = InstanceStore(StoreSettings(data_dir=tmp_path / "data", min_free_bytes=0, database_url=postgres_url))
    try:
        series = add_series(store, tmp_path)
        arrived: list[bool] = []
        with store.write_sessions.begin() as purge:
            _hold_writers(purge)
            src = minimal_ct(tmp_path / "late.dcm", StudyInstanceUID=series.study, SeriesInstanceUID=series.uid)
            writer = threading.Thread(target=lambda: arrived.append(not store.put(src, source="test").duplicate))
            writer.start()
            watcher = create_engine(postgres_url)
            waiting = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation IS NOT NULL")
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with watcher.connect() as conn:
                        if conn.execute(waiting).scalar():
                            break
                    time.sleep(0.02)
                else:
                    pytest.fail("the arrival never waited for the purge's lock")
            finally:
                watcher.dispose()
            assert arrived == [], "the arrival was indexed while the purge batch held the tables"
        writer.join(timeout=30)
        assert arrived == [True], "the arrival went ahead once the purge batch committed"
    finally:
        store.close()
