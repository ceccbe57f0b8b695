"""Which gateway processes share the index: each reports itself in ``workers`` and keeps its row fresh.

A process (``gateway serve --role ...``) announces itself at start with its owner name (the ``host/pid/token``
its job leases and delivery claims carry, :func:`gateway.jobs.lifecycle.owner_identity`), its roles, inference
device and models; :class:`PresenceKeeper` renews ``heartbeat_at`` every ``cluster.heartbeat_s`` and sets
``stopped_at`` when it stops. :func:`live_workers` lists them for ``GET /api/workers`` and the UI's workers page:
those alive (a recent heartbeat, not stopped), with the job leases and deliveries they hold, and for a while
those gone (stopped, or silent: a crash), so that an operator sees a process that died. Older rows are pruned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from gateway import __version__
from gateway.errors import one_line
from gateway.jobs.states import LEASED
from gateway.store.index import Delivery, Job, Worker
from gateway.store.store import StoreIndex

__all__ = ["KEEP_GONE_S", "PresenceKeeper", "WorkerView", "announce", "heartbeat", "live_workers", "prune", "stopped"]

log = logging.getLogger(__name__)

#: How long a gone process (stopped or silent) stays listed before its row is pruned.
KEEP_GONE_S = 3600.0
#: How often the keeper prunes rows older than that.
PRUNE_EVERY_S = 60.0
_SENDING = "sending"  # a delivery claimed by an export worker (gateway.export.rows.SENDING)


@dataclass(frozen=True)
class WorkerView:
    """A gateway process as listed: what it said of itself, what it holds now, and whether it is alive."""

    owner: str
    host: str
    pid: int
    roles: tuple[str, ...]
    device: str | None
    models: tuple[str, ...] | None  # None: every model
    version: str
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    last_heartbeat_s: float  # the heartbeat's age
    leases: int  # jobs it holds in a leased state
    sending: int  # deliveries its export workers are sending
    alive: bool

    def as_dict(self) -> dict[str, object]:
        """The view as ``GET /api/workers`` answers it."""
        return {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "roles": list(self.roles),
            "device": self.device,
            "models": None if self.models is None else list(self.models),
            "version": self.version,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "stopped_at": self.stopped_at,
            "last_heartbeat_s": round(self.last_heartbeat_s, 3),
            "leases": self.leases,
            "sending": self.sending,
            "alive": self.alive,
        }


def _host_pid(owner: str) -> tuple[str, int]:
    """The host and pid an owner name ``host/pid/token`` names (pid 0 when it names none)."""
    parts = owner.split("/")
    try:
        pid = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        pid = 0
    return parts[0][:64], pid


def announce(
    store: StoreIndex,
    owner: str,
    *,
    roles: Sequence[str],
    device: str | None,
    models: Sequence[str] | None,
    now: float | None = None,
) -> None:
    """Write (or rewrite) this process's row: started and heard from now, not stopped.

    Parameters
    ----------
    store
        The index.
    owner
        The process's owner name, ``host/pid/token``.
    roles
        The roles it runs (``ingest``, ``worker``, ``export``).
    device
        The inference device of a ``worker`` role (e.g. ``cuda:0``); ``None`` for none.
    models
        The model names it runs; ``None`` for every model.
    """
    if not owner:
        raise ValueError("owner must name the process (host/pid/token)")
    now = time.time() if now is None else now
    host, pid = _host_pid(owner)
    values = {
        "host": host,
        "pid": pid,
        "roles": ",".join(roles),
        "device": device,
        "models": None if models is None else list(models),
        "version": __version__,
        "started_at": now,
        "heartbeat_at": now,
        "stopped_at": None,
    }
    with store.write_sessions.begin() as session:
        row = session.get(Worker, owner, with_for_update=True)
        if row is None:
            session.add(Worker(owner=owner, **values))
        else:
            for name, value in values.items():
                setattr(row, name, value)


def heartbeat(store: StoreIndex, owner: str, now: float | None = None) -> bool:
    """Renew this process's heartbeat; ``False`` when it has no row (pruned meanwhile: announce again)."""
    return _set(store, owner, heartbeat_at=time.time() if now is None else now)


def stopped(store: StoreIndex, owner: str, now: float | None = None) -> bool:
    """Mark this process stopped (cleanly); ``False`` when it has no row."""
    return _set(store, owner, stopped_at=time.time() if now is None else now)


def _set(store: StoreIndex, owner: str, **values: float) -> bool:
    with store.write_sessions.begin() as session:
        result = session.execute(
            update(Worker).where(Worker.owner == owner).values(**values).execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _gone_before(cutoff: float) -> ColumnElement[bool]:
    """Rows last heard from before ``cutoff``: stopped then, or silent since."""
    return or_(
        and_(Worker.stopped_at.is_not(None), Worker.stopped_at < cutoff),
        and_(Worker.stopped_at.is_(None), Worker.heartbeat_at < cutoff),
    )


def prune(store: StoreIndex, older_than_s: float, *, now: float | None = None) -> int:
    """Delete the rows of processes gone (stopped or silent) for more than ``older_than_s``; return how many."""
    now = time.time() if now is None else now
    with store.write_sessions.begin() as session:
        result = session.execute(
            delete(Worker).where(_gone_before(now - older_than_s)).execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def live_workers(
    store: StoreIndex, *, now: float | None = None, stale_after_s: float, keep_gone_s: float = KEEP_GONE_S
) -> list[WorkerView]:
    """The processes alive (heard from within ``stale_after_s``, not stopped), then those gone within ``keep_gone_s``.

    Each with the jobs it holds in a leased state and the deliveries it is sending. Alive first, then by host,
    roles and start.
    """
    now = time.time() if now is None else now
    with store.sessions() as session:
        rows = session.scalars(select(Worker).where(~_gone_before(now - keep_gone_s))).all()
        owners = [row.owner for row in rows]
        leases, sending = _held(session, owners)
        views = [_view(row, now, stale_after_s, leases.get(row.owner, 0), sending.get(row.owner, 0)) for row in rows]
    return sorted(views, key=lambda v: (not v.alive, v.host, v.roles, v.started_at, v.owner))


def _held(session: Session, owners: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Jobs leased and deliveries being sent, by owner."""
    if not owners:
        return {}, {}
    leases = session.execute(
        select(Job.lease_owner, func.count())
        .where(Job.lease_owner.in_(owners), Job.state.in_(LEASED))
        .group_by(Job.lease_owner)
    ).all()
    sending = session.execute(
        select(Delivery.claim_owner, func.count())
        .where(Delivery.claim_owner.in_(owners), Delivery.state == _SENDING)
        .group_by(Delivery.claim_owner)
    ).all()
    return {str(o): int(n) for o, n in leases}, {str(o): int(n) for o, n in sending}


def _view(row: Worker, now: float, stale_after_s: float, leases: int, sending: int) -> WorkerView:
    age = max(0.0, now - row.heartbeat_at)
    return WorkerView(
        owner=row.owner,
        host=row.host,
        pid=row.pid,
        roles=tuple(r for r in row.roles.split(",") if r),
        device=row.device,
        models=None if row.models is None else tuple(row.models),
        version=row.version,
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        stopped_at=row.stopped_at,
        last_heartbeat_s=age,
        leases=leases,
        sending=sending,
        alive=row.stopped_at is None and age <= stale_after_s,
    )


class PresenceKeeper:
    """A daemon thread that keeps this process's row in ``workers``: announced at :meth:`start`, a heartbeat every
    ``heartbeat_s``, stopped at :meth:`stop`; it prunes long-gone rows once a minute.

    A failed write is logged and tried again at the next beat (the index may be briefly unreachable); a row pruned
    meanwhile (the process was silent for an hour) is announced again.

    Parameters
    ----------
    store
        The index.
    owner
        This process's owner name (the one its job leases and delivery claims carry).
    roles, device, models
        What :func:`announce` records.
    heartbeat_s
        How often to renew the heartbeat (``cluster.heartbeat_s``).
    keep_gone_s
        How long a gone process stays listed before it is pruned.
    """

    def __init__(
        self,
        store: StoreIndex,
        owner: str,
        *,
        roles: Sequence[str],
        device: str | None = None,
        models: Sequence[str] | None = None,
        heartbeat_s: float,
        keep_gone_s: float = KEEP_GONE_S,
    ) -> None:
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, not {heartbeat_s}")
        self._store = store
        self.owner = owner
        self._roles = tuple(roles)
        self._device = device
        self._models = None if models is None else tuple(models)
        self._heartbeat_s = heartbeat_s
        self._keep_gone_s = keep_gone_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._announced = False
        self._last_ok = time.monotonic()
        self._last_prune = 0.0

    def start(self) -> None:
        """Announce this process (a failure is logged and tried again by the thread) and start the heartbeat."""
        self._announce()
        self._thread = threading.Thread(target=self._run, name="presence-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat and mark this process stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self._heartbeat_s))
        try:
            stopped(self._store, self.owner)
        except Exception as exc:
            log.warning(
                "marking this process stopped in the workers table failed (%s); it shows gone once silent", _why(exc)
            )

    def problems(self) -> list[str]:
        """What keeps this process from reporting itself, for ``/healthz`` (empty when all is well or not started)."""
        if self._thread is None or self._stop.is_set():
            return []
        if not self._thread.is_alive():
            return ["the presence heartbeat stopped"]
        silent = time.monotonic() - self._last_ok
        if silent > 3 * self._heartbeat_s:
            return [f"the presence heartbeat has not reached the index for {silent:.0f} s"]
        return []

    def _announce(self) -> None:
        try:
            announce(self._store, self.owner, roles=self._roles, device=self._device, models=self._models)
        except Exception as exc:
            log.warning("announcing this process in the workers table failed (%s); trying again", _why(exc))
            return
        self._announced = True
        self._last_ok = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._beat()
            except Exception as exc:
                log.warning("the presence heartbeat failed (%s); trying again in %.0f s", _why(exc), self._heartbeat_s)

    def _beat(self) -> None:
        if not self._announced or not heartbeat(self._store, self.owner):
            self._announced = False
            self._announce()
        else:
            self._last_ok = time.monotonic()
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = time.monotonic()
            pruned = prune(self._store, self._keep_gone_s)
            if pruned:
                log.info("%d gone gateway process(es) pruned from the workers table", pruned)


def _why(exc: BaseException) -> str:
    """An error in one line, for a log line that repeats while the index is unreachable."""
    return one_line(f"{type(exc).__name__}: {exc}", 300)
