"""Job views (gateway.jobs.views): summaries paged and filtered in SQL, stage times, counts, model latency.

They run on SQLite and on a real PostgreSQL server (the ``index_store`` fixture): the filters (``problems`` reads
a JSON flag of the job's detail) must give the same answers on both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import NotFound
from gateway.jobs import lifecycle, views
from gateway.jobs.states import JobState
from gateway.store.store import InstanceStore

from job_rows import add_job, add_stored_series, routing


def test_a_page_is_newest_first_with_the_total_of_all_that_match(index_store: InstanceStore) -> None:
    ids = [add_job(index_store, created_at=1000.0 + k) for k in range(7)]
    page, total = views.job_summaries(index_store, limit=3)
    assert total == 7 and [s.id for s in page] == ids[::-1][:3]
    page, total = views.job_summaries(index_store, limit=3, offset=6)
    assert total == 7 and [s.id for s in page] == [ids[0]]
    assert views.job_summaries(index_store, limit=3, offset=7) == ([], 7)
    with pytest.raises(ValueError, match="negative"):
        views.job_summaries(index_store, offset=-1)


def test_filters_by_state_modality_and_problems(index_store: InstanceStore) -> None:
    failed = add_job(index_store, state="failed", detail={"failure": {"stage": "infer", "reason": "m: boom"}})
    undelivered = add_job(
        index_store,
        state="exported",
        modality="MR",
        detail={"export": {"undelivered": True, "reason": "no destination configured for this caller"}},
    )
    delivered = add_job(index_store, state="exported", detail={"export": {"deliveries": 4, "delivered": 4}})
    waiting = add_job(index_store, modality="MR")
    flagged_false = add_job(index_store, state="exported", detail={"export": {"undelivered": False}})

    def ids(**filters: object) -> tuple[list[int], int]:
        page, total = views.job_summaries(index_store, **filters)  # type: ignore[arg-type]
        return [s.id for s in page], total

    assert ids(problems=True) == ([undelivered, failed], 2)
    assert ids(state="exported") == ([flagged_false, delivered, undelivered], 3)
    assert ids(modality="MR") == ([waiting, undelivered], 2)
    assert ids(modality="MR", problems=True) == ([undelivered], 1)
    assert ids(state="received", problems=True) == ([], 0)
    summary = views.job_summary(index_store, undelivered)
    assert summary.undelivered and summary.problem and summary.failure is None
    assert views.job_summary(index_store, failed).problem and not views.job_summary(index_store, delivered).problem


def test_a_summary_says_what_ran_what_failed_and_each_stage_time(index_store: InstanceStore) -> None:
    detail = {
        "timings": {"assemble_s": 0.5, "infer_s": 2.0, "encode_s": 0.25, "export_s": 1.5},
        "inference": routing("lung@1.0", "nodule@2.1", not_run=("brain@1.0",)),
        "failure": {"stage": "export", "reason": "1 of 4 deliveries dead:\n  pacs: association rejected"},
    }
    job_id = add_job(
        index_store, state="failed", detail=detail, description="Thorax 1mm", last_received_at=990.0, completed_at=995.5
    )
    summary = views.job_summary(index_store, job_id)
    assert summary.models_run == ("lung@1.0", "nodule@2.1")
    assert summary.failure == "1 of 4 deliveries dead: pacs: association rejected"
    assert (summary.series_description, summary.modality, summary.revision) == ("Thorax 1mm", "CT", 1)
    assert summary.stages == views.StageTimes(
        completion=5.5, assemble=0.5, queue=None, infer=2.0, encode=0.25, export=1.5
    )
    assert list(summary.stages.as_dict()) == ["completion", "assemble", "queue", "infer", "encode", "export"]
    assert summary.stages.total == 9.75
    compact = summary.as_dict()
    assert compact["models_run"] == ["lung@1.0", "nodule@2.1"] and "detail" not in compact
    with pytest.raises(NotFound, match="no job 999"):
        views.job_summary(index_store, 999)


def test_the_queue_time_is_recorded_at_the_claim(index_store: InstanceStore) -> None:
    first = add_job(index_store, created_at=1000.0)
    lease = lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=1004.25)
    assert lease is not None and lease.job_id == first
    assert views.job_summary(index_store, first).stages.queue == 4.25
    # handed back at 1010: its next wait counts from then, not from its creation
    lifecycle.hand_back(index_store, "host/1/a", reason="stopping", now=1010.0)
    assert lifecycle.claim(index_store, "host/1/a", 60.0, max_attempts=3, now=1013.0) is not None
    assert views.job_summary(index_store, first).stages.queue == 3.0


def test_states_count_and_the_oldest_waiting_job(index_store: InstanceStore) -> None:
    assert views.oldest_waiting(index_store) is None
    add_job(index_store, state="exported")
    oldest = add_job(index_store, created_at=1000.0)
    add_job(index_store, created_at=1100.0)
    counts = views.states_count(index_store)
    assert counts[JobState.RECEIVED] == 2 and counts[JobState.EXPORTED] == 1 and counts[JobState.FAILED] == 0
    assert set(counts) >= {s.value for s in JobState}
    waiting = views.oldest_waiting(index_store, now=1060.0)
    assert waiting is not None and waiting.id == oldest and waiting.stages.queue == 60.0


def test_model_latency_over_recent_jobs(index_store: InstanceStore) -> None:
    for k in range(20):
        inference = routing("lung@1.0")
        inference["results"][0]["timings"]["infer_s"] = float(k + 1)
        add_job(index_store, state="exported", detail={"inference": inference})
    failed = {"routing": [{"model": "lung@1.0", "run": True}], "results": [], "failures": [{"model": "lung@1.0"}]}
    add_job(index_store, state="failed", detail={"inference": failed})
    add_job(index_store, state="received", detail={"inference": routing("ignored@1")})  # has not run inference
    latency = views.model_latency(index_store)
    assert set(latency) == {"lung@1.0"}
    lung = latency["lung@1.0"]
    assert (lung.runs, lung.failures) == (21, 1)
    assert lung.p50_s == 10.5 and lung.p95_s == pytest.approx(19.05)
    recent = views.model_latency(index_store, last=3)["lung@1.0"]  # the failed job and the two newest results
    assert (recent.runs, recent.failures, recent.p50_s) == (3, 1, 19.5)


def test_study_summaries_list_each_series_with_its_newest_revision_and_job(
    index_store: InstanceStore, tmp_path: Path
) -> None:
    stored = add_stored_series(index_store, tmp_path / "ct", slices=4, now=5000.0)
    first = add_job(index_store, state="exported", series_uid="2.25.77", created_at=100.0)
    second = add_job(index_store, state="failed", series_uid="2.25.77", revision=2, created_at=200.0)
    page, total = views.study_summaries(index_store)
    assert total == 2 and [len(s.series) for s in page] == [1, 1]
    newest, oldest = page
    (real,) = newest.series
    assert (real.instances, real.revisions, real.revision_state, real.last_job_id) == (4, 1, "complete", stored)
    assert real.modality == "CT" and real.last_job_state == "received"
    (made,) = oldest.series
    assert (made.revisions, made.last_job_id, made.last_job_state) == (2, second, "failed") and first < second
    assert views.study_summaries(index_store, limit=1, offset=1)[0] == [oldest]
