"""Queueing a run of a job's outputs: a ``deliveries`` row per (output file, destination that takes its kind).

:func:`enqueue` is called by the job runner when the encode stage has written a job's outputs (and by
:func:`release_held` for results held for an unmapped caller); :mod:`gateway.export.queue` then drives each
delivery to a final state. Both are re-exported by :mod:`gateway.export.queue`.

Each destination gets only the kinds of result it takes (its ``send`` setting: a file is queued for a
destination only when the file's kind, read from its SOP class, is one of them; a file of no known kind goes
everywhere); the kinds left out are listed in the job's ``detail.export.not_sent``. A run's structured reports
(SR) and key object selections are queued first, so a destination receives the report a reader waits for before
the larger SEG, presentation states and images.

A research destination (``deidentify`` set: the routing's ``with_inputs``) also gets the job's inputs, the
instances of its series as the job saw them, queued before its outputs; they are de-identified when sent
(:mod:`gateway.export.deidentify`), like the outputs. Inputs go to no other destination.

A job with results and no destination for them (none configured, a caller dropped or held by
``export.unmapped``, or no result of a kind its destinations take) is never silent: it ends ``exported`` with
``detail.export.undelivered`` set and a one-line ``detail.export.reason``, logged at WARNING and counted
(``gateway_jobs_undelivered_total``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.config import ExportSettings, OutputKind
from gateway.errors import ExportError, JobConflict, LeaseLost, one_line
from gateway.export.destinations import NO_DESTINATION, Routing, destinations_for, for_models, output_kind
from gateway.export.rows import PENDING, locked_job, outputs_purged, requeue_row
from gateway.jobs.lifecycle import end_claim
from gateway.jobs.states import JobState
from gateway.store.index import Delivery, Instance, Job, SeriesRevision
from gateway.store.store import StoreIndex

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

__all__ = ["NO_DESTINATION", "NO_KIND_TAKEN", "NO_OUTPUT", "enqueue", "release_held"]

log = logging.getLogger(__name__)

NO_KIND_TAKEN = "no output is of a kind its destinations take (see not_sent)"
NO_OUTPUT = "no output file to send"
_KINDS: tuple[str, ...] = get_args(OutputKind)
_FIRST = {"sr": 0, "ko": 1}  # queued (and so sent) before the other kinds, in this order

#: Destination name -> the kinds of result it takes; ``None``: every file, whatever its kind.
_Plan = dict[str, frozenset[str] | None]


class _Header(NamedTuple):
    path: str  # relative to the data folder when inside it
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def enqueue(
    store: StoreIndex,
    job_id: int,
    files: Sequence[Path],
    destinations: Mapping[str, Collection[str]] | Sequence[str],
    *,
    owner: str | None = None,
    expect: JobState | None = None,
    metrics: GatewayMetrics | None = None,
    now: float | None = None,
) -> int:
    """Queue a run of a job's outputs: each file for each destination that takes its kind (one transaction); the
    job is ``encoded``.

    A file's kind comes from its SOP class (:func:`gateway.export.destinations.output_kind`); a file of no known
    kind goes to every destination. The kinds a destination is not sent are listed in the job's
    ``detail.export.not_sent`` (``{"pacs": ["sc"]}``). Each call is a run of the job: a (file, destination) pair
    queued by an earlier run goes back to ``pending`` (its history kept: a re-run sends again, under the same SOP
    Instance UID), and deliveries of the earlier run that this one does not have are removed. The job's
    ``detail.encoded_at`` is set to ``now``.

    With nothing to send the job goes straight to ``exported`` and its ``detail.export.reason`` says why. When
    there were output files but no destination for them (``destinations`` is empty, or takes none of their
    kinds) the job is flagged ``detail.export.undelivered``, logged at WARNING and counted in ``metrics``; results
    held by ``export.unmapped: hold`` are remembered (``detail.export.held``) for :func:`release_held`.

    Parameters
    ----------
    store
        The instance store (or any :class:`StoreIndex`).
    job_id
        The job whose outputs these are.
    files
        The output files, already written durably (DICOM Part 10).
    destinations
        Destination name -> the kinds of result it takes (:data:`gateway.config.OutputKind` values), as
        :func:`gateway.export.destinations.destinations_for` gives them (a :class:`~gateway.export.destinations.
        Routing`, whose ``reason`` says why it is empty); or just names, each taking every file.
    owner
        The lease owner of a job the runner holds (:mod:`gateway.jobs.lifecycle`): then the job must be
        ``encoding`` under that lease, or nothing is queued (:class:`~gateway.errors.LeaseLost`); the lease ends
        with the move.
    expect
        The state the job must be in (any when omitted), else :class:`~gateway.errors.JobConflict`.
    metrics
        The gateway's metrics: an undelivered job is counted there.
    now
        The time recorded (seconds since the epoch); the wall clock when omitted.

    Returns
    -------
    int
        How many deliveries this run queued.

    Raises
    ------
    ValueError
        If ``destinations`` names a kind that is not an :data:`~gateway.config.OutputKind`.
    gateway.errors.NotFound
        If there is no job ``job_id``.
    gateway.errors.ExportError
        If a file is not a readable DICOM file with SOP Class and SOP Instance UIDs (nothing is queued).
    gateway.errors.LeaseLost
        If ``owner`` is given and the job is not ``encoding`` under that lease.
    gateway.errors.JobConflict
        If ``expect`` is given and the job is in another state.
    """
    now = time.time() if now is None else now
    plan = _plan(destinations)
    headers = _reports_first([_header(store, Path(f), k, len(files)) for k, f in enumerate(files)])
    pairs, not_sent = _routed(headers, plan)
    research = sorted(destinations.with_inputs) if isinstance(destinations, Routing) and headers else []
    with store.write_sessions.begin() as session:
        job = locked_job(session, job_id)
        if owner is not None and (job.state != JobState.ENCODING or job.lease_owner != owner):
            raise LeaseLost(f"job {job_id} is no longer encoding under this worker's lease")
        if expect is not None and job.state != expect:
            raise JobConflict(f"job {job_id} is {job.state}, not {expect.value}")
        if research:  # the series the outputs were made from, first: a reader of the copy finds what they refer to
            pairs = [(header, name) for header in _inputs(session, job) for name in research] + pairs
        queued, requeued, removed = _queue_run(session, job_id, pairs, now)
        nothing = _why_nothing(plan, headers, destinations)
        held = _held(destinations, headers) if not queued else None
        _mark_queued(job, queued, list(plan), nothing, not_sent, held, now)
        if owner is not None:  # the worker's lease ends with the job queued for export: its record closes with it
            end_claim(session, job_id, owner, str(job.state), now)
        undelivered = bool(headers) and not queued
    log.info(
        "job %d: %d deliveries queued for %d destination(s)%s",
        job_id,
        queued,
        len(plan),
        f" ({requeued} sent again, {removed} of an earlier run removed)" if requeued or removed else "",
    )
    if not_sent:
        log.info("job %d: kinds not sent, by destination (their send setting): %s", job_id, not_sent)
    if undelivered:
        log.warning("job %d: results undelivered: %s", job_id, nothing)
        if metrics is not None:
            metrics.job_undelivered()
    return queued


def _queue_run(session: Session, job_id: int, pairs: list[tuple[_Header, str]], now: float) -> tuple[int, int, int]:
    """This run's deliveries of a job: new pairs added, pairs of an earlier run requeued, the rest removed.

    Returns (queued, of them requeued, removed).
    """
    earlier = {(row.sop_instance_uid, row.destination): row for row in session.scalars(_of_job(job_id))}
    wanted: dict[tuple[str, str], _Header] = {}
    for header, name in pairs:
        wanted.setdefault((header.sop_instance_uid, name), header)
    requeued = 0
    for (uid, name), header in wanted.items():
        row = earlier.pop((uid, name), None)
        if row is None:
            session.add(_new_delivery(job_id, header, name, now))
            continue
        row.path, row.sop_class_uid, row.transfer_syntax_uid = (
            header.path,
            header.sop_class_uid,
            header.transfer_syntax_uid,
        )
        row.last_status = row.last_error = row.delivered_at = None
        requeue_row(row, now, "queued again by a new run of the job")
        requeued += 1
    for row in earlier.values():
        session.delete(row)
    return len(wanted), requeued, len(earlier)


def _inputs(session: Session, job: Job) -> list[_Header]:
    """The job's inputs: the instances of its series up to its revision (none once retention purged them)."""
    if job.purged_at is not None:
        return []
    revision = session.get(SeriesRevision, job.revision_id)
    if revision is None:
        return []
    rows = session.execute(
        select(Instance.path, Instance.sop_class_uid, Instance.sop_instance_uid, Instance.transfer_syntax_uid)
        .join(SeriesRevision, Instance.revision_id == SeriesRevision.id)
        .where(Instance.series_instance_uid == job.series_instance_uid, SeriesRevision.revision <= revision.revision)
        .order_by(Instance.instance_number, Instance.sop_instance_uid)
    ).all()
    return [_Header(*row) for row in rows]


def _of_job(job_id: int) -> Any:
    return select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)


def _held(destinations: object, headers: Sequence[_Header]) -> dict[str, Any] | None:
    """What :func:`release_held` needs of results held for an unmapped caller: the caller and the files."""
    if not isinstance(destinations, Routing) or destinations.held_caller is None or not headers:
        return None
    return {"caller": destinations.held_caller, "files": [header.path for header in headers]}


def _plan(destinations: Mapping[str, Collection[str]] | Sequence[str]) -> _Plan:
    """Destination name -> the kinds it takes (``None``: everything), checked against the known kinds."""
    if not isinstance(destinations, Mapping):
        return dict.fromkeys(destinations)
    plan: _Plan = {}
    for name, kinds in destinations.items():
        unknown = sorted(set(kinds).difference(_KINDS))
        if unknown:
            raise ValueError(f"destinations[{name!r}] names unknown kind(s) {unknown}; known: {list(_KINDS)}")
        plan[name] = frozenset(kinds)
    return plan


def _reports_first(headers: Sequence[_Header]) -> list[_Header]:
    """The structured reports and key object selections first, then the rest in the order given.

    A destination's deliveries go out in queue order, and a report is what a reader waits for: the few kilobytes of
    the SR should not wait behind the tens of megabytes of a SEG (nor a SEG behind the SR's references to it: a
    receiver resolves those when it displays them).
    """
    return sorted(headers, key=lambda header: _FIRST.get(output_kind(header.sop_class_uid) or "", len(_FIRST)))


def _routed(headers: Iterable[_Header], plan: _Plan) -> tuple[list[tuple[_Header, str]], dict[str, list[str]]]:
    """The (file, destination) pairs to queue, and for each destination the kinds of file it does not take."""
    pairs: list[tuple[_Header, str]] = []
    skipped: dict[str, set[str]] = {}
    for header in headers:
        kind = output_kind(header.sop_class_uid)
        for name, kinds in plan.items():
            if kinds is None or kind is None or kind in kinds:
                pairs.append((header, name))
            else:
                skipped.setdefault(name, set()).add(kind)
    return pairs, {name: _in_order(kinds) for name, kinds in skipped.items()}


def _in_order(kinds: Iterable[str]) -> list[str]:
    return sorted(set(kinds), key=_KINDS.index)


def _why_nothing(plan: _Plan, headers: Sequence[_Header], destinations: object) -> str:
    """What the job's detail says when no delivery is queued (one line)."""
    if not headers:
        return NO_OUTPUT
    if plan:
        return NO_KIND_TAKEN
    routed = destinations.reason if isinstance(destinations, Routing) else ""
    return one_line(routed or NO_DESTINATION)


def _header(store: StoreIndex, path: Path, index: int, count: int) -> _Header:
    """Stored path, SOP Class UID, SOP Instance UID and transfer syntax of output file ``index`` of ``count``.

    The error names the file by its position, not its name: the gateway's output names carry SOP Instance UIDs,
    which stay out of the log.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        values = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
        raise ExportError(f"output file {index + 1} of {count} cannot be queued: {type(exc).__name__}") from None
    absolute = path.resolve()
    stored = absolute.relative_to(store.data_dir) if absolute.is_relative_to(store.data_dir) else absolute
    return _Header(str(stored), *values)


def _new_delivery(job_id: int, header: _Header, destination: str, now: float) -> Delivery:
    return Delivery(
        job_id=job_id,
        path=header.path,
        sop_class_uid=header.sop_class_uid,
        sop_instance_uid=header.sop_instance_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        destination=destination,
        state=PENDING,
        attempts=0,
        next_attempt_at=now,
        history=[],
        created_at=now,
        updated_at=now,
    )


def _mark_queued(
    job: Job,
    total: int,
    names: list[str],
    nothing: str,
    not_sent: dict[str, list[str]],
    held: dict[str, Any] | None,
    now: float,
) -> None:
    detail = dict(job.detail or {})
    export: dict[str, Any] = {"deliveries": total, "destinations": names}
    if not_sent:
        export["not_sent"] = not_sent
    detail["encoded_at"] = round(now, 3)
    if total:
        job.state, job.finished_at = JobState.ENCODED, None
    else:
        export["reason"] = nothing
        if nothing != NO_OUTPUT:
            export["undelivered"] = True
        if held is not None:
            export["held"] = held
        detail["timings"] = {**detail.get("timings", {}), "export_s": 0.0}
        job.state, job.finished_at = JobState.EXPORTED, now
    detail["export"] = export
    job.detail = detail
    job.updated_at = now
    job.lease_owner = job.lease_expires_at = None


def release_held(store: StoreIndex, settings: ExportSettings, *, now: float | None = None) -> int:
    """Queue the results held for unmapped callers (``export.unmapped: hold``) that now have a destination.

    Called when the export workers start: after the operator mapped the caller in ``return_to_sender`` (or set
    ``unmapped: default``) and restarted the gateway, each held job's files are queued to where they now go,
    and the job, ``exported`` until then, is ``encoded`` again. Jobs still without a destination stay held.

    Returns
    -------
    int
        How many held jobs were queued.
    """
    caller = Job.detail[("export", "held", "caller")].as_string()
    with store.sessions() as session:
        held = session.execute(
            select(Job.id, caller).where(Job.state == JobState.EXPORTED, caller.is_not(None)).order_by(Job.id)
        ).all()
    released = 0
    for job_id, name in held:
        routing = for_models(destinations_for(settings, f"dimse:{name}"), settings, _models_of(store, int(job_id)))
        if routing:
            released += _release(store, int(job_id), routing, now)
    if held:
        log.info("export: %d of %d held job(s) queued to their destinations", released, len(held))
    return released


def _models_of(store: StoreIndex, job_id: int) -> set[str]:
    """The names of the models whose results a job recorded (``detail.inference.results``: ``name@version``)."""
    with store.sessions() as session:
        job = session.get(Job, job_id)
        results = ((job.detail or {}).get("inference") or {}).get("results") or [] if job is not None else []
    return {str(r.get("model", "")).split("@", 1)[0] for r in results if isinstance(r, dict)}


def _release(store: StoreIndex, job_id: int, routing: Routing, now: float | None) -> int:
    with store.sessions() as session:
        job = session.get(Job, job_id)
        files = [] if job is None or outputs_purged(job) else job.detail["export"]["held"]["files"]
    if not files:
        return 0
    paths = [Path(f) if Path(f).is_absolute() else store.data_dir / f for f in files]
    try:
        enqueue(store, job_id, paths, routing, expect=JobState.EXPORTED, now=now)
    except (JobConflict, ExportError) as exc:  # re-run or cancelled meanwhile, or a file gone: it stays as it is
        log.warning("job %d: held results not queued: %s", job_id, exc)
        return 0
    return 1
