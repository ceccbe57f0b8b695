"""``gateway jobs list|show|rerun|cancel|retry``, ``gateway studies list|reprocess`` and ``gateway series reprocess``
against a real data folder: a series stored and run through the real stages with a small model.

Every command names the data folder it used (its first line on stderr, or in its error); ``GATEWAY_DATA_DIR`` and
``--config`` choose it; a folder with no index is refused, not created; the exit statuses are those ``--help``
lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import ExportSettings, JobsSettings, StoreSettings
from gateway.infer.runtime import InferenceRuntime
from gateway.ingest.completion import complete_quiet_series
from gateway.jobs.encoding import EncodeStage
from gateway.jobs.inference import InferenceStage
from gateway.jobs.runner import JobRunner, Pipeline
from gateway.registry.registry import Registry
from gateway.store.index import Job
from gateway.store.store import InstanceStore
from gateway.synth.ct import write_synthetic_ct

from model_packages import manifest_dict, write_package


@dataclass(frozen=True)
class Folder:
    """A data folder with one job run to its end (``done``) and one waiting (``waiting``)."""

    path: Path
    done: int
    waiting: int
    series_uid: str  # the finished job's series
    waiting_series_uid: str


def store_series(store: InstanceStore, folder: Path, *, seed: int, now: float) -> tuple[int, str]:
    ct = write_synthetic_ct(folder, 8, rows=32, columns=32, seed=seed)
    for path in sorted(folder.glob("*.dcm")):
        store.put(path, source="test", now=now)
    (done,) = complete_quiet_series(store.write_sessions, 0.0, now=now + 1)
    return done.job_id, ct.series_instance_uid


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Folder]:
    """Built once with the gateway's own stages: ingest, completion, the runner, a registered model."""
    root = tmp_path_factory.mktemp("cli-jobs")
    store = InstanceStore(StoreSettings(data_dir=root / "data", min_free_bytes=0))
    runtime = InferenceRuntime("cpu", batching=False)
    try:
        registry = Registry(store)
        registry.register(write_package(root / "tiny", manifest_dict("tiny-seg")))
        pipeline = Pipeline(
            InferenceStage(store, registry, runtime, None), EncodeStage(store, ExportSettings(), root / "outputs")
        )
        done, series_uid = store_series(store, root / "ct1", seed=1, now=100.0)
        assert JobRunner(store, JobsSettings(workers=0), pipeline).run_once()
        waiting, waiting_uid = store_series(store, root / "ct2", seed=2, now=200.0)
    finally:
        runtime.close()
        store.close()
    yield Folder((root / "data").resolve(), done, waiting, series_uid, waiting_uid)


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def gateway(*args: object, env: dict[str, str] | None = None) -> Ran:
    """Run the command in this process; the data folder only from ``env`` (the test's own environment's unset)."""
    unset: dict[str, str | None] = {"GATEWAY_DATA_DIR": None, "GATEWAY_STORE__DATA_DIR": None}
    result = CliRunner().invoke(app, [str(a) for a in args], env={**unset, **(env or {})})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return Ran(result.exit_code, result.stdout, result.stderr)


def in_folder(folder: Folder, *args: object) -> Ran:
    return gateway(*args, env={"GATEWAY_DATA_DIR": str(folder.path)})


def test_help_lists_the_exit_statuses_and_where_the_data_folder_comes_from() -> None:
    shown = gateway("--help")
    assert shown.code == 0
    text = " ".join(shown.out.replace("│", " ").split())
    assert "Exit status: 0 done; 1 the command failed or found nothing to do" in text
    assert "2 bad usage or input" in text and "3 the server did not start" in text
    assert "--data-dir, else GATEWAY_DATA_DIR" in text


def test_list_names_the_folder_and_shows_each_job(folder: Folder) -> None:
    listed = in_folder(folder, "jobs", "list")
    assert listed.code == 0, listed.err
    assert listed.err.splitlines()[0] == f"data folder: {folder.path}"
    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "MOD"]
    assert [int(row[1:].split()[0]) for row in rows] == [folder.waiting, folder.done], "newest first"
    done_row = next(row for row in rows if row[1:].split()[0] == str(folder.done))
    assert "tiny-seg@" in done_row and "CT" in done_row
    assert "jobs 1-2 of 2, newest first" in listed.err

    page = in_folder(folder, "jobs", "list", "--limit", "1", "--json")
    body = json.loads(page.out)
    assert body["total"] == 2 and [j["id"] for j in body["jobs"]] == [folder.waiting]
    assert in_folder(folder, "jobs", "list", "--state", "failed").err.splitlines()[1] == "no job matches"


def test_show_says_why_each_model_ran_what_came_out_and_where_it_went(folder: Folder) -> None:
    shown = in_folder(folder, "jobs", "show", folder.done)
    assert shown.code == 0, shown.err
    assert shown.err == f"data folder: {folder.path}\n"
    lines = shown.out.splitlines()
    assert lines[0].startswith(f"job {folder.done}: ")
    assert any(line.split()[:2] == ["stages", "completion"] for line in lines)
    routing = lines.index("routing (why each model ran or not)")
    assert lines[routing + 1].split()[1:3] == ["run", "runs"], lines[routing + 1]
    outputs = lines.index("outputs")
    assert {line.split()[0] for line in lines[outputs + 1 : outputs + 3]} == {"SEG", "SR"}
    assert "QC" in shown.out and "volume 0  CT" in shown.out

    full = json.loads(in_folder(folder, "jobs", "show", folder.done, "--json").out)
    assert full["id"] == folder.done and full["detail"]["inference"]["routing"][0]["run"] is True
    assert full["stages"]["infer"] > 0 and full["stages"]["queue"] is not None


def test_an_unknown_job_is_named_with_the_folder(folder: Folder) -> None:
    for command in (("show",), ("cancel",), ("retry",), ("rerun", "--from", "assemble")):
        missing = in_folder(folder, "jobs", command[0], 424242, *command[1:])
        assert (missing.code, missing.err) == (1, f"error: no job 424242 in {folder.path}\n"), command
    unknown = in_folder(folder, "studies", "reprocess", "2.25.404")
    assert (unknown.code, unknown.err) == (1, f"error: no such series in {folder.path}\n")


def test_the_data_folder_comes_from_the_flag_the_environment_or_the_config(folder: Folder, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store:\n  data_dir: {folder.path}\n", encoding="utf-8")
    by_config = gateway("jobs", "list", "--config", config)
    assert by_config.code == 0 and by_config.err.startswith(f"data folder: {folder.path}\n")
    by_flag = gateway("jobs", "list", "--data-dir", tmp_path / "elsewhere", env={"GATEWAY_DATA_DIR": str(folder.path)})
    assert by_flag.code == 2 and f"no data folder at {tmp_path / 'elsewhere'}" in by_flag.err, "the flag wins"
    by_env_over_config = gateway("jobs", "list", "--config", config, env={"GATEWAY_DATA_DIR": str(tmp_path / "x")})
    assert by_env_over_config.code == 2 and str(tmp_path / "x") in by_env_over_config.err, "env beats the file"
    both = gateway(
        "jobs", "list", env={"GATEWAY_DATA_DIR": str(folder.path), "GATEWAY_STORE__DATA_DIR": str(tmp_path / "y")}
    )
    assert both.code == 2 and "name different folders" in both.err


def test_a_folder_with_no_index_is_refused_and_not_created(tmp_path: Path) -> None:
    for args in (
        ("jobs", "list"),
        ("jobs", "show", 1),
        ("studies", "list"),
        ("series", "reprocess", "1.2"),
        ("purge",),
    ):
        refused = gateway(*args, "--data-dir", tmp_path / "empty")
        assert refused.code == 2, (args, refused.err)
        assert refused.err.startswith(f"error: no data folder at {tmp_path / 'empty'}: nothing was received there")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "bare").mkdir()
    bare = gateway("jobs", "list", "--data-dir", tmp_path / "bare")
    assert bare.code == 2 and bare.err.startswith(f"error: no index at {tmp_path / 'bare'}")
    assert list((tmp_path / "bare").iterdir()) == []


def test_cancel_rerun_and_reprocess(folder: Folder) -> None:
    busy = in_folder(folder, "series", "reprocess", folder.waiting_series_uid)
    assert busy.code == 1 and busy.err.startswith("error: the series has a job that has not finished")
    assert f"(data folder {folder.path})" in busy.err

    cancelled = in_folder(folder, "jobs", "cancel", folder.waiting)
    assert (cancelled.code, cancelled.out) == (0, f"job {folder.waiting}: cancelled\n")
    assert cancelled.err == f"data folder: {folder.path}\n"
    again = in_folder(folder, "jobs", "cancel", folder.waiting)
    assert again.code == 1 and "is cancelled already" in again.err

    rerun = in_folder(folder, "jobs", "rerun", folder.waiting, "--from", "assemble")
    assert rerun.code == 0 and rerun.out.startswith(f"job {folder.waiting}: re-run from assemble, now received")
    bad_stage = in_folder(folder, "jobs", "rerun", folder.waiting, "--from", "infer")
    assert bad_stage.code == 2
    nothing_sent = in_folder(folder, "jobs", "rerun", folder.done, "--from", "export")
    assert nothing_sent.code == 1 and nothing_sent.err.startswith(f"error: job {folder.done} ")

    in_folder(folder, "jobs", "cancel", folder.waiting)
    reprocessed = in_folder(folder, "studies", "reprocess", folder.series_uid)
    assert reprocessed.code == 0, reprocessed.err
    new_job = int(reprocessed.out.split()[1].rstrip(":"))
    store = InstanceStore(StoreSettings(data_dir=folder.path, min_free_bytes=0))
    try:
        with store.sessions() as session:
            job = session.get(Job, new_job)
            assert job is not None and job.state == "received" and job.series_instance_uid == folder.series_uid
            assert job.detail["requested"]["action"] == "reprocess"
            assert job.detail["requested"]["by"].startswith("cli")
    finally:
        store.close()
    in_folder(folder, "jobs", "cancel", new_job)


def test_studies_list(folder: Folder) -> None:
    listed = in_folder(folder, "studies", "list")
    assert listed.code == 0 and listed.err.startswith(f"data folder: {folder.path}\n")
    studies = [line for line in listed.out.splitlines() if line.startswith("study ")]
    series = [line for line in listed.out.splitlines() if line.startswith("  ")]
    assert len(studies) == 2 and len(series) == 2
    assert any(folder.series_uid in line and "8 inst" in line for line in series)
