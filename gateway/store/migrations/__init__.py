"""Alembic migrations of the index (:mod:`gateway.store.index`), run in code at start: no ``alembic.ini``.

:func:`upgrade_to_head` brings a database to this gateway's schema. A fresh database is created by the
revisions; a database made by gateway 0.1.0 (its tables, no ``alembic_version``) is stamped at :data:`BASELINE`
first; a database at a revision this gateway does not know (made by a newer gateway) is refused with
:class:`~gateway.errors.IndexSchemaError`. Only one process migrates a database at a time: SQLite's
``BEGIN IMMEDIATE`` (the caller's transaction) or PostgreSQL's transaction-level advisory lock (:func:`lock`).

A schema change is a column or table in :mod:`gateway.store.index` plus a revision in ``versions/``
(``tests/store/test_migrations.py`` fails until both agree). To draft one from the difference::

    from alembic import command
    from gateway.store.migrations import alembic_config
    command.revision(alembic_config(url="sqlite:///path/to/head.sqlite3"), "what changes", autogenerate=True,
                     rev_id="0003")

Revisions never import the gateway's code: they spell out the tables, names and states as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from gateway.errors import IndexSchemaError

#: The revision of the schema gateway 0.1.0 made with ``create_all`` (its databases carry no revision).
BASELINE = "0001"

#: The tables of gateway 0.1.0: a database holding them all but no revision is stamped at :data:`BASELINE`.
BASELINE_TABLES = frozenset(
    {"studies", "series", "series_revisions", "instances", "jobs", "deliveries", "models", "removed_models"}
)

#: Key of PostgreSQL's advisory lock held while a process migrates (any constant; ``"gwindex"`` in ASCII).
LOCK_KEY = 0x6777696E646578

_HERE = Path(__file__).resolve().parent


def alembic_config(*, connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic configuration over the packaged scripts.

    Parameters
    ----------
    connection
        The connection the revisions run on, in the caller's transaction (``env.py`` uses it as is).
    url
        A database URL for ``env.py`` to connect to instead (drafting a revision with ``alembic`` commands).
    """
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("file_template", "rev%%(rev)s_%%(slug)s")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The revision this gateway's index schema is at."""
    current = _scripts().get_current_head()
    assert current is not None
    return current


def current_revision(conn: Connection) -> str | None:
    """The revision recorded in the database (``None``: none recorded)."""
    return MigrationContext.configure(conn).get_current_revision()


def lock(conn: Connection) -> None:
    """Hold the database's migration lock until the end of ``conn``'s transaction.

    PostgreSQL: a transaction-level advisory lock. SQLite: nothing to do, the caller's ``BEGIN IMMEDIATE`` already
    holds the database's only write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


def upgrade_to_head(conn: Connection) -> tuple[str | None, str] | None:
    """Bring the database of ``conn`` to :func:`head` inside ``conn``'s transaction.

    The caller commits. Returns ``(from, to)`` when the schema changed (``from`` is ``None`` for a fresh database),
    ``None`` when it was already at head.

    Raises
    ------
    IndexSchemaError
        The database is at a revision this gateway does not know (a newer gateway made it), holds some of the
        0.1.0 tables without a revision, or a revision failed (the caller's transaction then rolls back).
    """
    lock(conn)
    target = head()
    current = current_revision(conn)
    if current == target:
        return None
    if current is None and _holds_baseline(conn):
        current = BASELINE
        _run(command.stamp, conn, BASELINE, "record revision 0001 (gateway 0.1.0) in")
    elif current is not None and not _known(current):
        raise IndexSchemaError(
            f"the index is at schema revision {current}, which this gateway (schema revision {target}) does not "
            "know: a newer gateway made it; run that gateway, or restore a backup of the data folder"
        )
    _run(command.upgrade, conn, "head", f"upgrade from {current or 'an empty database'} to {target}")
    return current, target


def _run(step: Callable[[Config, str], None], conn: Connection, revision: str, what: str) -> None:
    try:
        step(alembic_config(connection=conn), revision)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc  # the database's own message, without the statement
        raise IndexSchemaError(f"could not {what} the index's schema, nothing changed: {cause}") from exc


def _known(revision: str) -> bool:
    return revision in {script.revision for script in _scripts().walk_revisions()}


def _holds_baseline(conn: Connection) -> bool:
    """Whether the database holds gateway 0.1.0's tables (all of them), so that it is stamped, not created."""
    present = BASELINE_TABLES & set(inspect(conn).get_table_names())
    if present and present != BASELINE_TABLES:
        missing = ", ".join(sorted(BASELINE_TABLES - present))
        raise IndexSchemaError(
            f"the index holds some of gateway 0.1.0's tables but no schema revision, and lacks {missing}: "
            "it was not made by a released gateway"
        )
    return bool(present)
