"""Helpers of the export tests: a job to export, output files, an in-process C-STORE SCP with chosen answers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, evt
from sqlalchemy import select

from gateway.config import ExportSettings
from gateway.export.workers import ExportWorkers
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Job, Series, SeriesRevision, Study
from gateway.store.store import StoreIndex
from gateway.synth.ct import write_synthetic_ct

from peers import free_port

_jobs = iter(range(1, 1_000_000))


def fast_export(**values: Any) -> ExportSettings:
    """Export settings for tests: short backoff, poll and timeouts; one worker."""
    base: dict[str, Any] = {
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "poll_s": 0.05,
        "timeout_s": 5.0,
        "workers": 1,
    }
    base.update(values)
    return ExportSettings(**base)


def make_job(store: StoreIndex, state: JobState = JobState.INFERRED) -> int:
    """A job row (with the study, series and revision it needs) in ``state``; its id."""
    k = next(_jobs)
    study, series, now = generate_uid(), generate_uid(), time.time()
    with store.write_sessions.begin() as session:
        session.add(Study(study_instance_uid=study, created_at=now))
        session.flush()
        session.add(Series(series_instance_uid=series, study_instance_uid=study, created_at=now))
        session.flush()
        revision = SeriesRevision(
            series_instance_uid=series, revision=k, state="complete", first_received_at=now, last_received_at=now
        )
        session.add(revision)
        session.flush()
        job = Job(
            revision_id=revision.id,
            study_instance_uid=study,
            series_instance_uid=series,
            state=state,
            created_at=now,
            updated_at=now,
            detail={},
        )
        session.add(job)
        session.flush()
        return int(job.id)


def outputs(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """``n`` small synthetic CT files standing for a job's results."""
    write_synthetic_ct(folder, n, rows=32, columns=32, seed=seed, fresh_uids=True, n_nodules=0)
    return sorted(folder.glob("*.dcm"))


def relabel(src: Path, dest: Path, sop_class_uid: str) -> Path:
    """A copy of ``src`` under another SOP class and a new SOP Instance UID."""
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest, enforce_file_format=True)
    return dest


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def job_of(store: StoreIndex, job_id: int) -> Job:
    with store.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def drain(store: StoreIndex, settings: ExportSettings, job_id: int, timeout_s: float = 30.0) -> str:
    """Run the export workers' loop in this thread until the job leaves ``encoded``; its state."""
    workers = ExportWorkers(store, settings)
    deadline = time.monotonic() + timeout_s
    try:
        while job_of(store, job_id).state == JobState.ENCODED:
            assert time.monotonic() < deadline, f"job {job_id} still encoded after {timeout_s} s"
            if not workers.run_once():
                time.sleep(0.02)
    finally:
        workers.stop()
    return job_of(store, job_id).state


def deliveries(store: StoreIndex, job_id: int | None = None) -> list[Delivery]:
    query = select(Delivery).order_by(Delivery.id)
    if job_id is not None:
        query = query.where(Delivery.job_id == job_id)
    with store.sessions() as session:
        return list(session.scalars(query))


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met after {timeout_s} s"
        time.sleep(0.02)


def wait_for_job(store: StoreIndex, job_id: int, states: Iterable[str], timeout_s: float = 30.0) -> Job:
    wanted = set(states)
    wait_for(lambda: job_of(store, job_id).state in wanted, timeout_s, f"job {job_id} in {sorted(wanted)}")
    return job_of(store, job_id)


class StatusSCP:
    """A pynetdicom C-STORE SCP in this process, answering the statuses a test chooses.

    Parameters
    ----------
    statuses
        Answers to the successive C-STOREs (0x0000 once they run out).
    sop_classes
        The storage SOP classes it accepts (default: all, in every transfer syntax).
    port
        The port to listen on (default: a free one); known before :meth:`start`, so it can start late.
    """

    def __init__(
        self,
        *,
        aet: str = "PACS",
        statuses: Sequence[int] = (),
        sop_classes: Sequence[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.aet = aet
        self.port = port or free_port()
        self.statuses = list(statuses)
        classes = sop_classes or [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        self.contexts = [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]
        self.received: Counter[str] = Counter()
        self.associations: list[set[tuple[str, str]]] = []  # the (SOP class, transfer syntax) pairs each proposed
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000 or status & 0xF000 == 0xB000:
                self.received[str(event.request.AffectedSOPInstanceUID)] += 1
        return status

    def _on_requested(self, event: Any) -> None:
        proposed = {
            (str(cx.abstract_syntax), str(ts))
            for cx in event.assoc.requestor.requested_contexts
            for ts in cx.transfer_syntax
        }
        with self._lock:
            self.associations.append(proposed)

    def start(self) -> None:
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = self.contexts
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
