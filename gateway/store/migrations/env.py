"""Alembic's entry point for the index's revisions (loaded by Alembic, never imported).

At start the gateway hands its own connection, in a transaction that holds the migration lock
(:func:`gateway.store.migrations.upgrade_to_head`); the revisions run in that transaction. Drafting a revision
with :func:`alembic.command.revision` connects to the configuration's ``sqlalchemy.url`` instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from gateway.store.index import Base
from gateway.store.migrations import lock


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch operations copy the table when needed.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    given = context.config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url in the Alembic configuration")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            lock(connection)
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("the index's revisions run online only (a connection, not SQL scripts)")
_run_online()
