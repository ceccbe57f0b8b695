"""Jobs written straight into an index (study, series, revision, job rows), in any state with any detail: for the
tests of what reads and moves jobs (views, operations), where running real stages would add nothing but time."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydicom import dcmread

from gateway.ingest.completion import complete_quiet_series
from gateway.store.index import Delivery, Job, Series, SeriesRevision, Study
from gateway.store.store import InstanceStore, StoreIndex
from gateway.synth.ct import write_synthetic_ct

_numbers = itertools.count(1)


def routing(*models: str, not_run: tuple[str, ...] = ()) -> dict[str, Any]:
    """An ``inference`` detail whose routing ran ``models`` (and not ``not_run``), each with a result."""
    ran = [{"model": m, "run": True, "reason": "runs on volume 0: every rule passed"} for m in models]
    skipped = [{"model": m, "run": False, "reason": "Modality MR is not one of CT"} for m in not_run]
    return {
        "routing": ran + skipped,
        "results": [{"model": m, "timings": {"infer_s": 1.0}} for m in models],
        "failures": [],
    }


def add_job(
    store: StoreIndex,
    *,
    state: str = "received",
    detail: dict[str, Any] | None = None,
    modality: str | None = "CT",
    description: str | None = "Chest",
    series_uid: str | None = None,
    created_at: float = 1000.0,
    last_received_at: float = 990.0,
    completed_at: float | None = 992.5,
    revision: int = 1,
    finished_at: float | None = None,
) -> int:
    """Add a job (and its study, series and revision when new) straight to the index; its id."""
    n = next(_numbers)
    series_uid = series_uid or f"2.25.{n}"
    with store.write_sessions.begin() as session:
        series = session.get(Series, series_uid)
        if series is None:
            study_uid = f"2.25.9{n}"
            session.add(Study(study_instance_uid=study_uid, created_at=created_at))
            session.flush()
            series = Series(
                series_instance_uid=series_uid,
                study_instance_uid=study_uid,
                modality=modality,
                series_description=description,
                created_at=created_at,
            )
            session.add(series)
            session.flush()
        rev = SeriesRevision(
            series_instance_uid=series_uid,
            revision=revision,
            state="complete",
            first_received_at=last_received_at - 1,
            last_received_at=last_received_at,
            completed_at=completed_at,
            instance_count=3,
        )
        session.add(rev)
        session.flush()
        job = Job(
            revision_id=rev.id,
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series_uid,
            state=state,
            created_at=created_at,
            updated_at=created_at,
            finished_at=finished_at,
            detail={"revision": revision, "instances": 3, **(detail or {})},
        )
        session.add(job)
        session.flush()
        return int(job.id)


def add_delivery(store: StoreIndex, job_id: int, *, state: str = "pending", destination: str = "pacs") -> int:
    """Queue one (made-up) output file of a job for ``destination``, as the export queue's rows are; its id."""
    n = next(_numbers)
    with store.write_sessions.begin() as session:
        row = Delivery(
            job_id=job_id,
            path=f"outputs/job-{job_id}/SEG-{n}.dcm",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            sop_instance_uid=f"2.25.7{n}",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            destination=destination,
            state=state,
            attempts=0,
            next_attempt_at=0.0,
            history=[],
            created_at=0.0,
            updated_at=0.0,
        )
        session.add(row)
        session.flush()
        return int(row.id)


def add_stored_series(
    store: InstanceStore,
    folder: Path,
    *,
    slices: int = 4,
    seed: int = 0,
    now: float = 0.0,
    modality: str | None = None,
) -> int:
    """Store a small synthetic CT series (its Modality changed to ``modality`` if given, for routing) and complete it
    (real ingest and completion); the new job's id."""
    write_synthetic_ct(folder, slices, rows=32, columns=32, seed=seed)
    for path in sorted(folder.glob("*.dcm")):
        copy = folder / f"copy-{path.name}"
        if modality is None:
            copy.write_bytes(path.read_bytes())
        else:
            ds = dcmread(path)
            ds.Modality = modality
            ds.save_as(copy)
        store.put(copy, source="test", now=now)
    (done,) = complete_quiet_series(store.write_sessions, 0.0, now=now + 1)
    return done.job_id
