"""Export: AI results to PACS and archives, through a durable queue with retries.

- :mod:`gateway.export.destinations`: which destinations a series' results go to and the kinds of result each
  takes (:func:`destinations_for`, :func:`output_kind`).
- :mod:`gateway.export.queue`: the ``deliveries`` queue (:func:`enqueue`, delivered / refused / dead, retry of
  dead and refused deliveries, job states).
- :mod:`gateway.export.workers`: :class:`ExportWorkers`, the threads that send what is due.
- :mod:`gateway.export.dimse` and :mod:`gateway.export.stow`: the C-STORE and STOW-RS senders.
- :mod:`gateway.export.scu`: C-ECHO and C-STORE of files and folders (``gateway echo``, ``gateway send``).
"""
