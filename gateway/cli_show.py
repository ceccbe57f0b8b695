"""Jobs and studies as ``gateway jobs list|show`` and ``gateway studies list`` print them: plain text, one fact a line.

Pure functions from what :mod:`gateway.jobs.views` and the job's detail hold to lines of text; the commands in
:mod:`gateway.cli_jobs` print them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from gateway.jobs.views import JobSummary, StageTimes, StudySummary

__all__ = ["job_lines", "job_table", "study_lines", "when"]

_DESCRIPTION_WIDTH = 24
_MODELS_WIDTH = 28
_NOTE_WIDTH = 70


def when(at: float | None) -> str:
    """A time as the operator's clock shows it (``-`` when unknown)."""
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def seconds(value: float | None) -> str:
    """``1.41 s``, ``2 min 5 s``, or ``-`` when unknown."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _cut(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _stages(stages: StageTimes) -> str:
    return " | ".join(f"{name} {seconds(value)}" for name, value in stages.as_dict().items())


def job_table(jobs: Sequence[JobSummary]) -> Iterator[str]:
    """``gateway jobs list``: a header and a row per job; ``!`` marks a job that needs a look."""
    yield (
        f"{'':1} {'ID':>7}  {'STATE':<10} {'MOD':<4} {'SERIES':<{_DESCRIPTION_WIDTH}} "
        f"{'MODELS':<{_MODELS_WIDTH}} {'CREATED':<19} {'TIME':>9}  NOTE"
    )
    for job in jobs:
        note = job.failure or ("undelivered: no destination took the results" if job.undelivered else "")
        models = ", ".join(job.models_run)
        yield (
            f"{'!' if job.problem else '':1} {job.id:>7}  {job.state:<10} {job.modality or '-':<4} "
            f"{_cut(job.series_description, _DESCRIPTION_WIDTH):<{_DESCRIPTION_WIDTH}} "
            f"{_cut(models, _MODELS_WIDTH):<{_MODELS_WIDTH}} {when(job.created_at):<19} "
            f"{seconds(job.stages.total or None):>9}  {_cut(note, _NOTE_WIDTH) if note else ''}".rstrip()
        )


def job_lines(summary: JobSummary, detail: Mapping[str, Any], deliveries: Sequence[Mapping[str, Any]]) -> list[str]:
    """``gateway jobs show``: the job, then its routing, assembly, outputs, deliveries and history."""
    lines = _heading(summary, detail)
    for title, section in (
        ("routing (why each model ran or not)", _routing(detail)),
        ("assembly", _assembly(detail)),
        ("outputs", _outputs(detail)),
        ("deliveries", _deliveries(deliveries)),
        ("previous runs", _previous_runs(detail)),
    ):
        if section:
            lines += ["", title, *section]
    return lines


def _heading(summary: JobSummary, detail: Mapping[str, Any]) -> list[str]:
    description = f' "{summary.series_description}"' if summary.series_description else ""
    lines = [
        f"job {summary.id}: {summary.state}" + ("  (undelivered)" if summary.undelivered else ""),
        f"  series     {summary.modality or '-'}{description} {summary.series_instance_uid}, revision "
        f"{summary.revision}, {detail.get('instances', '?')} instance(s)",
        f"  study      {summary.study_instance_uid}",
        f"  created    {when(summary.created_at)}   updated {when(summary.updated_at)}   "
        f"finished {when(summary.finished_at)}",
        f"  stages     {_stages(summary.stages)}",
    ]
    failure = detail.get("failure") or {}
    if summary.failure:
        lines.append(f"  failure    {failure.get('stage', '?')}: {summary.failure}")
    if detail.get("skipped"):
        lines.append(f"  skipped    {detail['skipped']}")
    export = detail.get("export") or {}
    if export.get("reason"):
        lines.append(f"  export     {export['reason']}")
    for kinds_of, kinds in (export.get("not_sent") or {}).items():
        lines.append(f"  not sent   to {kinds_of}: {', '.join(kinds)} (its send setting)")
    requested = detail.get("requested")
    if requested:
        by = f" by {requested['by']}" if requested.get("by") else ""
        lines.append(f"  requested  {requested.get('action')}{by} at {when(requested.get('at'))}")
    return lines


def _routing(detail: Mapping[str, Any]) -> list[str]:
    lines = []
    inference = detail.get("inference") or {}
    for decision in inference.get("routing") or []:
        ran = "run" if decision.get("run") else "not run"
        lines.append(f"  {decision.get('model', '?'):<28} {ran:<8} {decision.get('reason', '')}")
        if not decision.get("run"):
            for check in decision.get("checks") or []:
                if not check.get("passed", True):
                    lines.append(f"  {'':<28} {'':<8} x {check.get('rule')}: {check.get('detail', '')}")
    for failure in inference.get("failures") or []:
        lines.append(f"  {failure.get('model', '?'):<28} {'FAILED':<8} {failure.get('reason', '')}")
    return lines


def _assembly(detail: Mapping[str, Any]) -> list[str]:
    assembly = detail.get("assembly") or {}
    lines = []
    for k, volume in enumerate(assembly.get("volumes") or []):
        shape = " x ".join(str(n) for n in volume.get("shape", []))
        spacing = " x ".join(f"{s:g}" for s in volume.get("spacing_mm", []))
        resampled = ", resampled" if volume.get("resampled") else ""
        lines.append(
            f"  volume {k}  {volume.get('modality') or '-'}  {shape}  spacing {spacing} mm  "
            f"{volume.get('slices', '?')} slices{resampled}"
        )
        flags = volume.get("qc") or []
        lines += [
            f"    QC {flag.get('code')}{' (resampled)' if flag.get('resampled') else ''}: {flag.get('message', '')}"
            for flag in flags
        ] or ["    QC: no flag"]
    lines += [
        f"  refused  {refused.get('instances', '?')} instance(s): {refused.get('reason', '')}"
        for refused in assembly.get("refused") or []
    ]
    return lines


def _outputs(detail: Mapping[str, Any]) -> list[str]:
    return [
        f"  {output.get('kind', '?'):<5} {output.get('model', '-'):<28} {output.get('SOPInstanceUID', '-')}  "
        f"{output.get('file', '')}"
        for output in detail.get("outputs") or []
    ]


def _deliveries(deliveries: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for row in deliveries:
        attempts = row.get("attempts", 0)
        due = f", next attempt {when(row['next_attempt_at'])}" if row.get("next_attempt_at") else ""
        lines.append(
            f"  {row.get('destination', '?'):<12} {(row.get('kind') or '?').upper():<5} {row.get('state', '?'):<10} "
            f"{attempts} attempt{'s' if attempts != 1 else ''}{due}  {row.get('sop_instance_uid', '')}"
        )
        for entry in row.get("history") or []:
            status = f" status 0x{entry['status']:04X}" if isinstance(entry.get("status"), int) else ""
            reason = f": {entry['reason']}" if entry.get("reason") else ""
            lines.append(f"      {when(entry.get('at'))}  {entry.get('outcome', '?')}{status}{reason}")
    return lines


def _previous_runs(detail: Mapping[str, Any]) -> list[str]:
    lines = []
    for run in detail.get("previous_runs") or []:
        failure = run.get("failure") or {}
        why = f": {failure.get('stage', '?')}: {failure.get('reason')}" if failure.get("reason") else ""
        lines.append(f"  {run.get('state', '?'):<10} finished {when(run.get('finished_at'))}{why}")
    for failure in detail.get("previous_failures") or []:
        lines.append(f"  export failure (retried): {failure.get('reason', '')}")
    return lines


def study_lines(studies: Sequence[StudySummary]) -> Iterator[str]:
    """``gateway studies list``: each study, then a row per series (its newest job, what reprocess would follow)."""
    for study in studies:
        yield f"study {study.study_instance_uid}  date {study.study_date or '-'}  received {when(study.received_at)}"
        for s in study.series:
            job = f"job {s.last_job_id} {s.last_job_state}" if s.last_job_id is not None else "no job"
            yield (
                f"  {s.modality or '-':<4} {_cut(s.series_description, _DESCRIPTION_WIDTH):<{_DESCRIPTION_WIDTH}} "
                f"{s.instances:>5} inst  rev {s.revisions} {s.revision_state or '-':<8} {job:<22} "
                f"{s.series_instance_uid}"
            )
