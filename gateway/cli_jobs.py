"""``gateway jobs``, ``gateway studies`` and ``gateway series``: what a gateway received and did, and an operator's
moves (re-run, cancel, retry, reprocess, release). Each opens the data folder's index alone, beside a running
gateway, which picks the changes up at its next poll; each names the folder it read (stderr) or says it in its
error."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli_common import ConfigOpt, DataDirOpt, DataFolder, load_settings, opened_index

if TYPE_CHECKING:
    from gateway.registry.registry import RegistryIndex

jobs_app = typer.Typer(
    help="Jobs: list, show, re-run, cancel, retry failed exports.", no_args_is_help=True, add_completion=False
)
studies_app = typer.Typer(help="Studies received: list, reprocess a series.", no_args_is_help=True)
series_app = typer.Typer(
    help="Series: reprocess one, or release one held for instances refused (0xA700).", no_args_is_help=True
)

JobIdArg = Annotated[int, typer.Argument(metavar="ID", help="The job's id (gateway jobs list).")]
SeriesUidArg = Annotated[str, typer.Argument(metavar="SERIES_UID", help="The series' SeriesInstanceUID.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of text.")]


class RerunFrom(StrEnum):
    """The stages a job can be re-run from (:data:`gateway.jobs.operations.RERUN_FROM`)."""

    ASSEMBLE = "assemble"
    EXPORT = "export"


def _operator() -> str:
    """Who asks, as a job records it: ``cli:<login>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name for this uid
        return "cli"


@contextmanager
def _index(config: Path | None, data_dir: Path | None) -> Iterator[tuple[DataFolder, RegistryIndex]]:
    """The data folder and its index; the gateway's errors become one ``error:`` line that names the folder."""
    from gateway.errors import ExportError, JobConflict, NotFound

    folder = DataFolder(load_settings(config, data_dir))
    with opened_index(folder) as index:
        try:
            yield folder, index
        except NotFound as exc:
            folder.not_found(str(exc))
        except (JobConflict, ExportError) as exc:
            folder.fail(exc.reason)


def _echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        typer.echo(line)


# -- gateway jobs ------------------------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state (received, failed, exported, ...).")
    ] = None,
    modality: Annotated[str | None, typer.Option(help="Only jobs of series of this Modality (CT, MR, ...).")] = None,
    problems: Annotated[
        bool, typer.Option("--problems", help="Only failed jobs and jobs whose results reached no destination.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Jobs per page.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Jobs to skip (the next page: --offset 50).")] = 0,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List jobs, newest first: state, series, models run, total time; '!' marks those that need a look."""
    from gateway.cli_show import job_table
    from gateway.jobs.views import job_summaries

    with _index(config, data_dir) as (folder, index):
        page, total = job_summaries(
            index, state=state, modality=modality, problems=problems, limit=limit, offset=offset
        )
    folder.announce()
    if as_json:
        typer.echo(json.dumps({"total": total, "jobs": [s.as_dict() for s in page]}, indent=2))
        return
    if not page:
        typer.echo("no job" + (" matches" if total or state or modality or problems else " yet"), err=True)
        return
    _echo_lines(job_table(page))
    more = f"; --offset {offset + len(page)} for the next page" if offset + len(page) < total else ""
    typer.echo(f"jobs {offset + 1}-{offset + len(page)} of {total}, newest first{more}", err=True)


@jobs_app.command("show")
def jobs_show(
    job_id: JobIdArg, as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Show a job: why each model ran or not, assembly QC, outputs, deliveries with every attempt, failure."""
    from gateway.cli_show import job_lines
    from gateway.errors import NotFound
    from gateway.export.queue import deliveries_of
    from gateway.jobs.views import job_summary
    from gateway.store.index import Job

    with _index(config, data_dir) as (folder, index):
        summary = job_summary(index, job_id)
        with index.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            detail: dict[str, Any] = dict(job.detail or {})
        deliveries = deliveries_of(index, job_id)
    folder.announce()
    if as_json:
        full = {**summary.as_dict(), "attempts": job.attempts, "detail": detail, "deliveries": deliveries}
        typer.echo(json.dumps(full, indent=2))
        return
    _echo_lines(job_lines(summary, detail, deliveries))


@jobs_app.command("rerun")
def jobs_rerun(
    job_id: JobIdArg,
    from_stage: Annotated[
        RerunFrom,
        typer.Option(
            "--from",
            help="assemble: run the job afresh with the models registered now; export: send its outputs again.",
        ),
    ],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run a finished job again from a stage; exit 1 if there is no such job or its state does not allow it."""
    from gateway.jobs.operations import rerun

    with _index(config, data_dir) as (folder, index):
        state = rerun(index, job_id, from_stage=from_stage.value, by=_operator())
    folder.announce()
    what = "runs it" if from_stage is RerunFrom.ASSEMBLE else "sends its outputs"
    typer.echo(f"job {job_id}: re-run from {from_stage.value}, now {state.value}; the running gateway {what}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobIdArg, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Cancel a job that has not finished (its deliveries not yet sent are not sent); exit 1 if it has."""
    from gateway.jobs.operations import cancel

    with _index(config, data_dir) as (folder, index):
        cancel(index, job_id, by=_operator())
    folder.announce()
    typer.echo(f"job {job_id}: cancelled")


@jobs_app.command("retry")
def jobs_retry(job_id: JobIdArg, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Send a job's dead and refused deliveries again (attempts reset); exit 1 if there is none."""
    from gateway.export.queue import retry_job

    with _index(config, data_dir) as (folder, index):
        requeued = retry_job(index, job_id)
    folder.announce()
    typer.echo(f"job {job_id}: {requeued} deliveries requeued; the running gateway sends them")


# -- gateway studies / series --------------------------------------------------------------------------------------


@studies_app.command("list")
def studies_list(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Studies per page.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Studies to skip.")] = 0,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List studies received, newest first, each series with its instances, revisions and newest job."""
    from gateway.cli_show import study_lines
    from gateway.jobs.views import study_summaries

    with _index(config, data_dir) as (folder, index):
        page, total = study_summaries(index, limit=limit, offset=offset)
    folder.announce()
    if not page:
        typer.echo("no study" + (" on this page" if total else " received yet"), err=True)
        return
    _echo_lines(study_lines(page))
    typer.echo(f"studies {offset + 1}-{offset + len(page)} of {total}, newest first", err=True)


def reprocess(series_uid: SeriesUidArg, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Run a series again, as stored, with the models registered now (a new revision and its job).

    Exit 1 if the series is unknown, has a job that has not finished, or is still arriving.
    """
    from gateway.jobs.operations import reprocess_series

    with _index(config, data_dir) as (folder, index):
        job_id = reprocess_series(index, series_uid, by=_operator())
    folder.announce()
    typer.echo(f"job {job_id}: the series reprocessed with the current models; the running gateway runs it")


studies_app.command("reprocess")(reprocess)
series_app.command("reprocess", help="The same as `gateway studies reprocess`.")(reprocess)


@series_app.command("release")
def series_release(series_uid: SeriesUidArg, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Run a held series on what was stored of it, its refused instances given up; exit 1 if it is unknown."""
    from gateway.ingest.completion import release_series

    with _index(config, data_dir) as (folder, index):
        release = release_series(index.write_sessions, series_uid)
    folder.announce()
    if release.completion is not None:
        done = release.completion
        typer.echo(f"released: job {done.job_id} on {done.instance_count} instance(s); the running gateway runs it")
    elif release.refusals_dropped:
        typer.echo(f"{release.refusals_dropped} refused instance(s) given up; the series completes when quiet")
    else:
        typer.echo("nothing held: the series has no held revision and no refused instance")
