"""Job states and the transition table: who may move a job from which state to which.

A job is made ``received`` when its series revision completes (:mod:`gateway.ingest.completion`), or when an
operator reprocesses the series (:func:`gateway.jobs.operations.reprocess_series`). A worker of
:mod:`gateway.jobs.runner` claims it under a lease and takes it through assembly, inference and encoding in
memory; ``encoded`` hands it to the export queue (:mod:`gateway.export.queue`), which ends it ``exported`` or
``failed``::

    received --claim--> assembling --> assembled --> inferring --> inferred --> encoding --> encoded --> exported
                            |                           |    \\--> skipped                     |     \\--> failed
                            v                           v                                      v
                          failed                      failed                                 failed
    any of assembling .. encoding --hand back (stop, lease expired, out of space)--> received

An operator (:mod:`gateway.jobs.operations`) may also move a job::

    received, assembling .. encoding, encoded --cancel--> cancelled
    exported, skipped, failed, cancelled --re-run from assembly--> received
    exported, failed --retry or re-run from export--> encoded

Two states are durable, meaning the work up to them is on disk: ``received`` (the instances) and ``encoded`` (the
outputs and their deliveries). The states between them hold volumes and results in a worker's memory, so a job
found there without a live lease goes back to ``received``, never to ``failed``. ``exported``, ``skipped``,
``failed`` and ``cancelled`` are final (until an operator's retry or re-run). A job cancelled while a worker holds
it loses its lease with the move: the worker's next write fails (:class:`~gateway.errors.LeaseLost`) and it drops
the job.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job stands."""

    RECEIVED = "received"
    ASSEMBLING = "assembling"
    ASSEMBLED = "assembled"
    INFERRING = "inferring"
    INFERRED = "inferred"
    SKIPPED = "skipped"  # no enabled model applies: the job's routing decisions say why
    ENCODING = "encoding"
    ENCODED = "encoded"
    EXPORTED = "exported"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by an operator: its pending deliveries are not sent


#: The states whose work is on disk: where a job goes back to, and where a worker or the export queue takes it.
DURABLE: frozenset[JobState] = frozenset({JobState.RECEIVED, JobState.ENCODED})

#: The states a job is in only while a worker holds its lease (volumes and results in that worker's memory).
LEASED: frozenset[JobState] = frozenset(
    {JobState.ASSEMBLING, JobState.ASSEMBLED, JobState.INFERRING, JobState.INFERRED, JobState.ENCODING}
)

#: Final states: the job's work is over (retention counts ages from reaching one of them).
FINISHED: frozenset[JobState] = frozenset({JobState.EXPORTED, JobState.SKIPPED, JobState.FAILED, JobState.CANCELLED})

#: Every allowed move: (from, to). The runner refuses any other, and every write is conditional on ``from``.
TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.RECEIVED, JobState.ASSEMBLING),  # claim, under a lease
        (JobState.ASSEMBLING, JobState.ASSEMBLED),
        (JobState.ASSEMBLING, JobState.FAILED),
        (JobState.ASSEMBLED, JobState.INFERRING),
        (JobState.INFERRING, JobState.INFERRED),
        (JobState.INFERRING, JobState.SKIPPED),
        (JobState.INFERRING, JobState.FAILED),
        (JobState.INFERRED, JobState.ENCODING),
        (JobState.ENCODING, JobState.ENCODED),  # deliveries queued in the same transaction
        (JobState.ENCODING, JobState.EXPORTED),  # nothing to send: no destination, or no kind it takes
        (JobState.ENCODING, JobState.FAILED),
        (JobState.ENCODED, JobState.EXPORTED),  # the export queue: every delivery delivered or refused
        (JobState.ENCODED, JobState.FAILED),  # ... or some dead
        (JobState.FAILED, JobState.ENCODED),  # an operator's retry of dead or refused deliveries
        (JobState.EXPORTED, JobState.ENCODED),  # ... or of refused ones
        *((state, JobState.RECEIVED) for state in LEASED),  # handed back: stop, expired lease, no space
        *((state, JobState.FAILED) for state in LEASED),  # the supervisor's last word on an unexpected error
        *((state, JobState.CANCELLED) for state in {*DURABLE, *LEASED}),  # an operator's cancel
        *((state, JobState.RECEIVED) for state in FINISHED),  # an operator's re-run from assembly
    }
)


def allowed(current: JobState, to: JobState) -> bool:
    """Whether the table lets a job move from ``current`` to ``to``."""
    return (current, to) in TRANSITIONS
