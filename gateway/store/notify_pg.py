"""The PostgreSQL notifier: ``NOTIFY`` to the other processes, and a ``LISTEN`` connection in a daemon thread.

See :mod:`gateway.store.notify` for what wakes what; :func:`gateway.store.notify.make_notifier` makes it for a
PostgreSQL index (psycopg 3, the ``postgres`` extra, is imported only then).
"""

from __future__ import annotations

import logging
import secrets
import threading

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from sqlalchemy import Engine, text

from gateway.store.notify import LISTENER_APPLICATION_NAME, Callback, LocalNotifier

log = logging.getLogger("gateway.store.notify")

_NOT_CONNECTED = "the notification listener is not connected"
_POLL_S = 0.5  # how long the listener waits for a notification before checking stop and new subscriptions
_CONNECT_TIMEOUT_S = 3  # psycopg's connect_timeout, in whole seconds (libpq's unit)
_BACKOFF_FIRST_S = 0.25
_BACKOFF_MAX_S = 30.0
_SUBSCRIBE_WAIT_S = 2.0  # how long a subscribe after start waits for the listener's LISTEN
_Conn = psycopg.Connection[TupleRow]


class PgNotifier(LocalNotifier):
    """A :class:`Notifier` across the processes that share one PostgreSQL index (``LISTEN`` / ``NOTIFY``).

    Parameters
    ----------
    engine
        The index engine: :meth:`publish` sends ``NOTIFY`` on one of its pooled connections.
    conninfo
        The libpq connection string (or URL) of the same database, for the listener's own connection.
    """

    def __init__(self, engine: Engine, conninfo: str) -> None:
        super().__init__()
        if engine.dialect.name != "postgresql":
            raise ValueError(f"engine: PostgreSQL needed, got {engine.dialect.name}")
        self._engine = engine
        self._conninfo = conninfo
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = threading.Condition()  # guards the three below; notified when they change
        self._conn: _Conn | None = None
        self._listening: set[str] = set()
        self._connected = False
        self._publish_failing = False
        self._token = secrets.token_hex(8)  # the payload of this notifier's NOTIFYs, skipped by its own listener

    def publish(self, channel: str) -> None:
        """Call this process's subscribers of ``channel``, then ``NOTIFY`` the other processes.

        A failed ``NOTIFY`` is logged (at WARNING once per outage) and swallowed: the pollers are the fallback.
        """
        self._call(channel)
        try:
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("SELECT pg_notify(:channel, :token)"), {"channel": channel, "token": self._token})
        except Exception as exc:
            level = logging.DEBUG if self._publish_failing else logging.WARNING
            reason = _one_line(exc)
            log.log(level, "NOTIFY %s failed (%s); other processes find the work at their next poll", channel, reason)
            self._publish_failing = True
        else:
            if self._publish_failing:
                log.info("NOTIFY works again")
            self._publish_failing = False

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Call ``callback`` on each notification of ``channel``, from this process or another.

        After :meth:`start`, waits (up to about two seconds) for the listener to ``LISTEN`` on a new channel, so
        that a notification sent once this returns is received.
        """
        super().subscribe(channel, callback)
        if threading.current_thread() is self._thread:  # a callback subscribing: the listener LISTENs next round
            return
        with self._state:
            self._state.wait_for(
                lambda: channel in self._listening or not self._connected or self._stopping.is_set(),
                timeout=_SUBSCRIBE_WAIT_S,
            )

    def start(self) -> None:
        """Connect the listener and ``LISTEN`` on the subscribed channels, then listen in a daemon thread.

        Does not raise when the database cannot be reached: :meth:`problems` says so, and the thread keeps trying.
        """
        if self._thread is not None:
            return
        self._stopping.clear()
        conn = self._connect()
        if conn is None:
            log.warning("the notification listener cannot connect; retrying (pollers stand in meanwhile)")
        self._thread = threading.Thread(target=self._run, args=(conn,), name="gateway-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the listener: its thread ends (within about a second) and closes its connection. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        with self._state:
            self._state.notify_all()
        thread.join(timeout=_POLL_S + _CONNECT_TIMEOUT_S + 2)
        if thread.is_alive():
            log.warning("the notification listener did not stop in time; it is a daemon thread and ends with us")

    def problems(self) -> list[str]:
        """``["the notification listener is not connected"]`` while it is started and down, else empty."""
        with self._state:
            down = self._thread is not None and not self._connected
        return [_NOT_CONNECTED] if down else []

    # The listener thread alone uses the listener connection (start() hands it over before the thread runs).

    def _connect(self) -> _Conn | None:
        try:
            conn = psycopg.connect(
                self._conninfo,
                autocommit=True,
                application_name=LISTENER_APPLICATION_NAME,
                connect_timeout=_CONNECT_TIMEOUT_S,
            )
        except psycopg.Error as exc:
            log.debug("notification listener: connecting failed: %s", exc)
            return None
        try:
            self._listen(conn)
        except psycopg.Error as exc:
            log.debug("notification listener: LISTEN failed: %s", exc)
            conn.close()
            return None
        with self._state:
            self._conn = conn
            self._connected = True
            self._state.notify_all()
        return conn

    def _listen(self, conn: _Conn) -> None:
        """``LISTEN`` on the subscribed channels this connection does not listen to yet."""
        for channel in self._channels():
            if channel in self._listening:
                continue
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            with self._state:
                self._listening.add(channel)
                self._state.notify_all()

    def _run(self, conn: _Conn | None) -> None:
        try:
            self._reconnecting_loop(conn)
        finally:
            if self._conn is not None:
                self._disconnect(self._conn)

    def _reconnecting_loop(self, conn: _Conn | None) -> None:
        backoff = _BACKOFF_FIRST_S
        while not self._stopping.is_set():
            if conn is None:
                conn = self._connect()
                if conn is None:
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    continue
                log.info("the notification listener is connected again")
                for channel in self._channels():  # what was notified while down is lost: wake everyone once
                    self._call(channel)
            backoff = _BACKOFF_FIRST_S
            try:
                self._serve(conn)
            except psycopg.Error as exc:
                log.warning("the notification listener lost its connection (%s); reconnecting", type(exc).__name__)
            except Exception:
                log.exception("the notification listener failed; reconnecting")
            self._disconnect(conn)
            conn = None

    def _serve(self, conn: _Conn) -> None:
        """Dispatch notifications until stopped (returns) or the connection fails (raises)."""
        while not self._stopping.is_set():
            self._listen(conn)
            notes = list(conn.notifies(timeout=_POLL_S, stop_after=1))
            if notes:  # coalesce a burst: take what has arrived already, then call each channel once
                notes.extend(conn.notifies(timeout=0))
            channels = {n.channel for n in notes if n.payload != self._token}
            for channel in sorted(channels):
                self._call(channel)

    def _disconnect(self, conn: _Conn) -> None:
        with self._state:
            self._conn = None
            self._connected = False
            self._listening.clear()
            self._state.notify_all()
        try:
            conn.close()
        except psycopg.Error:
            log.debug("notification listener: closing its connection failed", exc_info=True)


def _one_line(exc: Exception) -> str:
    """The first line of what the driver said (SQLAlchemy's wrapper adds the statement on more lines)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
