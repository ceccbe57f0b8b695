"""Wake-ups between the stages of the gateway, within one process and, on PostgreSQL, across processes.

Workers that sit idle (job runners, export workers, the model registry's readers) poll the index every second or
so. A stage that has just committed something another stage can act on publishes on a channel, so the idle side
wakes at once instead of at its next poll:

====================  ==========================================================  ===================================
channel               published after the commit that...                          wakes
====================  ==========================================================  ===================================
:data:`JOBS`          completes a series, hands a job back, re-runs a job         idle job runners (``JobRunner.wake``)
:data:`DELIVERIES`    queues deliveries, or releases (hands back) claimed ones    idle export workers
                                                                                  (``ExportWorkers.wake``)
:data:`MODELS`        registers, removes, enables or disables a model            the processes' model registries
====================  ==========================================================  ===================================

:class:`LocalNotifier` (SQLite, or ``cluster.notify`` off) calls the subscribers of this process only: one process
holds a SQLite index. :class:`PgNotifier` (PostgreSQL) calls them too, and sends ``NOTIFY <channel>`` so that the
other gateway processes sharing the index wake: each holds one dedicated listener connection that ``LISTEN``\\ s on
every subscribed channel, in a daemon thread. A notification says "look again", never what changed, so no patient
data travels or is logged: its payload is the sending notifier's random token, by which a listener skips its own
process's notifications (their subscribers were called at publish). Any other payload, an empty one included
(``NOTIFY gateway_jobs`` from ``psql``), wakes the subscribers.

Notifications are a shortcut, not the source of truth: they are lost while a listener is disconnected, and a
failed ``NOTIFY`` is logged and swallowed. The pollers stay as the fallback, so a lost wake-up costs one poll
period, never a job or a delivery. After reconnecting, the listener calls every subscriber once, as though each
channel had been notified while it was down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Engine

log = logging.getLogger(__name__)

#: A job may be claimable: a series completed, a job was handed back or re-run.
JOBS = "gateway_jobs"
#: Deliveries were queued or released.
DELIVERIES = "gateway_deliveries"
#: The model registry changed.
MODELS = "gateway_models"

#: The ``application_name`` of the listener's connection (as ``pg_stat_activity`` shows it).
LISTENER_APPLICATION_NAME = "gateway-listener"


Callback = Callable[[], None]


class Notifier(Protocol):
    """Wake-ups by channel: :data:`JOBS`, :data:`DELIVERIES`, :data:`MODELS` (see the module docstring)."""

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Call ``callback`` (no arguments, quick, never raising to the caller) on each wake-up of ``channel``."""

    def publish(self, channel: str) -> None:
        """Wake the subscribers of ``channel``; call it after the commit that gives them something to do."""

    def start(self) -> None:
        """Start listening (a no-op where there is nothing to listen to)."""

    def stop(self) -> None:
        """Stop listening; publishing still works (and still calls this process's subscribers)."""

    def problems(self) -> list[str]:
        """What is wrong for ``/healthz`` (empty when nothing is)."""


class LocalNotifier:
    """A :class:`Notifier` within one process: :meth:`publish` calls this process's subscribers, in its thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[str, list[Callback]] = {}

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Call ``callback`` on each :meth:`publish` of ``channel`` (several callbacks per channel are allowed).

        Raises
        ------
        ValueError
            ``channel`` is empty.
        """
        if not channel:
            raise ValueError("channel: must not be empty")
        with self._lock:
            self._callbacks.setdefault(channel, []).append(callback)

    def publish(self, channel: str) -> None:
        """Call the subscribers of ``channel`` now, in this thread; one that raises is logged, never raised here."""
        self._call(channel)

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def problems(self) -> list[str]:
        """Always empty."""
        return []

    def _channels(self) -> list[str]:
        with self._lock:
            return list(self._callbacks)

    def _call(self, channel: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks.get(channel, ()))
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a subscriber of channel %s failed", channel)


def make_notifier(engine: Engine, *, enabled: bool = True) -> Notifier:
    """The notifier for the index behind ``engine``.

    Parameters
    ----------
    engine
        The index engine.
    enabled
        ``cluster.notify``: ``False`` keeps wake-ups within this process even on PostgreSQL.

    Returns
    -------
    Notifier
        A :class:`PgNotifier` for a PostgreSQL index when ``enabled``, else a :class:`LocalNotifier`.
    """
    if not enabled or engine.dialect.name != "postgresql":
        return LocalNotifier()
    from gateway.store.notify_pg import PgNotifier  # psycopg (the ``postgres`` extra): only for a PostgreSQL index

    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    return PgNotifier(engine, conninfo)
