"""Wake-ups: the local notifier (SQLite), and LISTEN/NOTIFY between two notifiers on a real PostgreSQL server, as two
gateway processes sharing one index would hold them (each its own engine and listener connection)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, make_url

from gateway.store.notify import (
    DELIVERIES,
    JOBS,
    LISTENER_APPLICATION_NAME,
    MODELS,
    LocalNotifier,
    Notifier,
    make_notifier,
)
from gateway.store.notify_pg import PgNotifier

from peers import free_port

WAIT_S = 20.0  # generous: these waits end as soon as the wake-up comes
SENTINEL = "zz_test_sentinel"  # sorts after the gateway's channels: a burst dispatches it last


class Wakes:
    """Counts a channel's callbacks and signals each one."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    def wait(self) -> bool:
        return self.event.wait(WAIT_S)


def _conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def make_pg(postgres_url: str) -> Iterator[Callable[[], Notifier]]:
    """A factory of started notifiers on the test's database, each with its own engine ("process")."""
    made: list[tuple[Notifier, Engine]] = []

    def make() -> Notifier:
        engine = create_engine(postgres_url)
        notifier = make_notifier(engine)
        made.append((notifier, engine))
        return notifier

    yield make
    for notifier, engine in made:
        notifier.stop()
        engine.dispose()


def test_local_notifier_calls_this_process_subscribers_past_a_raising_one(caplog: pytest.LogCaptureFixture) -> None:
    notifier = make_notifier(create_engine("sqlite://"))
    assert isinstance(notifier, LocalNotifier)
    first, second, models = Wakes(), Wakes(), Wakes()

    def broken() -> None:
        raise RuntimeError("subscriber bug")

    notifier.subscribe(JOBS, first)
    notifier.subscribe(JOBS, broken)
    notifier.subscribe(JOBS, second)
    notifier.subscribe(MODELS, models)
    notifier.start()
    notifier.publish(JOBS)
    notifier.stop()

    assert (first.calls, second.calls, models.calls) == (1, 1, 0)
    assert "a subscriber of channel gateway_jobs failed" in caplog.text
    assert notifier.problems() == []
    with pytest.raises(ValueError, match="channel"):
        notifier.subscribe("", first)


def test_make_notifier_on_postgresql_honours_enabled(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        assert isinstance(make_notifier(engine), PgNotifier)
        assert type(make_notifier(engine, enabled=False)) is LocalNotifier
    finally:
        engine.dispose()


def test_publish_wakes_another_process_and_this_one_once(make_pg: Callable[[], Notifier]) -> None:
    publisher, listener, third = make_pg(), make_pg(), make_pg()
    here, there, sentinel = Wakes(), Wakes(), Wakes()
    publisher.subscribe(DELIVERIES, here)
    publisher.subscribe(SENTINEL, sentinel)
    listener.subscribe(DELIVERIES, there)
    publisher.start()
    listener.start()
    assert listener.problems() == []

    publisher.publish(DELIVERIES)
    assert here.calls == 1  # at once, in the publisher's thread
    assert there.wait()

    third.publish(SENTINEL)  # the queue is in commit order: once this is dispatched, so is the publisher's echo
    assert sentinel.wait()
    assert here.calls == 1  # its own listener skipped it


def test_channels_are_separate(make_pg: Callable[[], Notifier]) -> None:
    publisher, listener = make_pg(), make_pg()
    jobs, models, sentinel = Wakes(), Wakes(), Wakes()
    listener.subscribe(JOBS, jobs)
    listener.subscribe(MODELS, models)
    listener.subscribe(SENTINEL, sentinel)
    listener.start()

    publisher.publish(JOBS)
    publisher.publish(SENTINEL)  # the queue is in commit order: once this is dispatched, so is JOBS

    assert sentinel.wait()
    assert jobs.calls >= 1
    assert models.calls == 0


def test_subscribe_after_start(make_pg: Callable[[], Notifier]) -> None:
    publisher, listener = make_pg(), make_pg()
    listener.start()
    models = Wakes()
    listener.subscribe(MODELS, models)  # returns once the listener LISTENs on it

    publisher.publish(MODELS)

    assert models.wait()


def test_a_plain_notify_wakes_the_subscriber(make_pg: Callable[[], Notifier], postgres_url: str) -> None:
    listener = make_pg()
    jobs = Wakes()
    listener.subscribe(JOBS, jobs)
    listener.start()

    with psycopg.connect(_conninfo(postgres_url), autocommit=True) as conn:
        conn.execute("NOTIFY gateway_jobs")

    assert jobs.wait()


def test_listener_reconnects_wakes_everyone_once_and_hears_later_notifications(
    make_pg: Callable[[], Notifier], postgres_url: str
) -> None:
    publisher, listener = make_pg(), make_pg()
    jobs, deliveries = Wakes(), Wakes()
    listener.subscribe(JOBS, jobs)
    listener.subscribe(DELIVERIES, deliveries)
    listener.start()

    with psycopg.connect(_conninfo(postgres_url), autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (LISTENER_APPLICATION_NAME,),
        ).fetchall()
    assert killed == [(True,)]

    assert jobs.wait()  # nobody published: the reconnected listener wakes every subscriber
    assert deliveries.wait()
    assert (jobs.calls, deliveries.calls) == (1, 1)
    assert listener.problems() == []

    jobs.event.clear()
    publisher.publish(JOBS)
    assert jobs.wait()


def test_unreachable_database_is_a_problem_never_an_error(caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql+psycopg://gateway:s3cret-pw@127.0.0.1:{free_port()}/index?connect_timeout=2"
    engine = create_engine(url)
    notifier = make_notifier(engine)
    jobs = Wakes()
    notifier.subscribe(JOBS, jobs)
    try:
        with caplog.at_level(logging.DEBUG, logger="gateway.store.notify"):
            notifier.start()
            assert notifier.problems() == ["the notification listener is not connected"]
            notifier.publish(JOBS)  # NOTIFY fails: logged, swallowed; this process's subscriber still runs
            notifier.publish(JOBS)
            notifier.stop()
    finally:
        engine.dispose()

    assert jobs.calls == 2
    assert notifier.problems() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "NOTIFY gateway_jobs failed" in r.message]
    assert len(warnings) == 1  # once per outage
    assert "\n" not in warnings[0].message
    assert "s3cret-pw" not in caplog.text


def test_stop_without_subscribers_twice_then_publish(make_pg: Callable[[], Notifier]) -> None:
    notifier = make_pg()
    notifier.start()
    assert notifier.problems() == []
    notifier.stop()
    notifier.stop()
    notifier.publish(JOBS)
    assert notifier.problems() == []


def test_stop_ends_the_listener_connection(make_pg: Callable[[], Notifier], postgres_url: str) -> None:
    notifier = make_pg()
    notifier.subscribe(JOBS, Wakes())
    notifier.start()
    assert _listeners(postgres_url) == 1
    notifier.stop()

    deadline = time.monotonic() + WAIT_S  # the server ends the closed session's backend on its own time
    while _listeners(postgres_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listeners(postgres_url) == 0


def _listeners(url: str) -> int:
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            (LISTENER_APPLICATION_NAME,),
        ).fetchone()
    assert row is not None
    return int(row[0])
