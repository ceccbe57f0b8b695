"""Export: AI results to PACS and archives, through a durable queue with retries sized for real downtime.

- :mod:`gateway.export.destinations`: which destinations a series' results go to (``export.unmapped`` for a
  caller ``return_to_sender`` does not map) and the kinds of result each takes (:func:`destinations_for`,
  :func:`output_kind`).
- :mod:`gateway.export.queue`: the ``deliveries`` queue, its one entry point (claim, record with backoff, settle
  the job, queue depth), with :mod:`gateway.export.enqueue` (a run of a job's outputs queued; results with no
  destination flagged undelivered; held results released) and :mod:`gateway.export.requeue` (an operator's retry
  or re-run, and deliveries given up after an outage revived) over :mod:`gateway.export.rows`.
- :mod:`gateway.export.outcome`: what an attempt came to, and the retry policy (give up after a duration).
- :mod:`gateway.export.checks`: whether a destination answers now (C-ECHO, QIDO-RS search or OPTIONS).
- :mod:`gateway.export.workers`: :class:`ExportWorkers`, the threads that send what is due, and the checker that
  resends what an outage killed once the destination answers.
- :mod:`gateway.export.dimse` and :mod:`gateway.export.stow`: the C-STORE and STOW-RS senders.
- :mod:`gateway.export.scu`: C-ECHO and C-STORE of files and folders (``gateway echo``, ``gateway send``).
"""
