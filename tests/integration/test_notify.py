"""LISTEN/NOTIFY between ncps instances, against a real PostgreSQL.

Each "instance" is an :class:`Events` with its own origin and a
:class:`PostgresListener` on the same database.  Writers use a plain
SQLAlchemy engine (psycopg2) on a thread, as the db pool does.  "Nothing
arrived" is proved without sleeping: a marker notification is sent after the
one that must not arrive, and PostgreSQL delivers notifications in commit
order, so once the marker is in, anything earlier would be too.

The restart tests use a private server (``PostgresServer.create()``) so the
shared session server is never stopped.  Every wait has a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from servers import PostgresServer  # tests/ is on sys.path (tests/conftest.py)
from sqlalchemy import Engine, create_engine, event, text
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from ncps.db import pglisten
from ncps.db.notify import CHANNEL, Events, notify_thd, parse_payload
from ncps.db.pglisten import PostgresListener, libpq_dsn

reactor: Any = global_reactor

# -- pure parts, no server


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("a1b2 narinfo 0123abcd", ("a1b2", "narinfo", "0123abcd")),
        ("a1b2 nar key:zstd", ("a1b2", "nar", "key:zstd")),
        ("a1b2 flush ", ("a1b2", "flush", "")),
        ("", None),
        ("garbage", None),
        ("a1b2 narinfo", None),
        ("a1b2 narinfo x y", None),
        (" narinfo x", None),
        ("a1b2  x", None),
    ],
)
def test_parse_payload(payload: str, expected: tuple[str, str, str] | None) -> None:
    assert parse_payload(payload) == expected


def test_events_fan_out_in_order_and_survive_a_failing_listener() -> None:
    events = Events("origin1")
    seen: list[tuple[str, str, str]] = []

    def first(kind: str, arg: str) -> None:
        seen.append(("first", kind, arg))

    def broken(kind: str, arg: str) -> None:
        raise RuntimeError("listener bug")

    def last(kind: str, arg: str) -> None:
        seen.append(("last", kind, arg))

    for listener in (first, broken, last, first):
        events.subscribe(listener)
    events.dispatch("narinfo", "h1")
    assert seen == [("first", "narinfo", "h1"), ("last", "narinfo", "h1")]

    events.unsubscribe(first)
    events.unsubscribe(first)  # unknown now: ignored
    events.dispatch("nar", "k:xz")
    assert seen[2:] == [("last", "nar", "k:xz")]
    assert events.origin == "origin1"


@pytest.mark.parametrize(
    ("url", "dsn"),
    [
        (
            "postgresql://u:p@h:5/db?sslmode=disable",
            "postgresql://u:p@h:5/db?sslmode=disable",
        ),
        ("postgres://u@h/db", "postgresql://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_libpq_dsn(url: str, dsn: str) -> None:
    assert libpq_dsn(url) == dsn


def test_libpq_dsn_rejects_other_databases() -> None:
    with pytest.raises(ValueError):
        libpq_dsn("sqlite:///tmp/x.db")


def test_notify_thd_is_a_no_op_on_sqlite() -> None:
    engine = create_engine("sqlite://")
    statements: list[str] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    with engine.begin() as conn:
        notify_thd(conn, "origin1", "narinfo", "h1")
    assert statements == []


def test_notify_thd_rejects_fields_with_spaces() -> None:
    engine = create_engine("sqlite://")
    with engine.begin() as conn, pytest.raises(ValueError):
        notify_thd(conn, "origin1", "narinfo", "two words")


# -- helpers for the real reactor


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every 20 ms; fail the test after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


async def bounded(d: Deferred[Any], timeout: float) -> Any:
    return await d.addTimeout(timeout, reactor)


def sa_engine(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))


@attrs.define
class Instance:
    """One ncps instance's view: its Events, its listener and what it received."""

    events: Events
    listener: PostgresListener
    received: list[tuple[str, str]]

    def got(self, kind: str, arg: str) -> bool:
        return (kind, arg) in self.received


def make_instance(url: str, origin: str) -> Instance:
    events = Events(origin)
    received: list[tuple[str, str]] = []
    events.subscribe(lambda kind, arg: received.append((kind, arg)))
    return Instance(events, PostgresListener(reactor, url, events), received)


async def started(instance: Instance, timeout: float = 10) -> Instance:
    instance.listener.startService()
    await bounded(instance.listener.when_listening(), timeout)
    assert instance.listener.connected()
    return instance


async def commit(engine: Engine, origin: str, kind: str, arg: str) -> None:
    def work() -> None:
        with engine.begin() as conn:
            notify_thd(conn, origin, kind, arg)

    await bounded(deferToThread(work), 10)


async def raw_notify(engine: Engine, payload: str) -> None:
    def work() -> None:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": payload})

    await bounded(deferToThread(work), 10)


def our_delayed_calls(instance: Instance) -> list[Any]:
    """Delayed calls whose function is a method of the listener."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if call.active() and getattr(call.func, "__self__", None) is instance.listener
    ]


def backends(engine: Engine) -> int:
    """Other sessions connected to this engine's database."""
    with engine.connect() as conn:
        count = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    return int(count)


@pytest_twisted.async_yield_fixture
async def pair(postgres_url: str) -> AsyncIterator[tuple[Instance, Instance, Engine]]:
    """Instances A and B listening on one fresh database, plus a writer engine."""
    a = make_instance(postgres_url, "aaaa")
    b = make_instance(postgres_url, "bbbb")
    engine = sa_engine(postgres_url)
    try:
        await started(a)
        await started(b)
        yield a, b, engine
    finally:
        await bounded(a.listener.stopService(), 5)
        await bounded(b.listener.stopService(), 5)
        engine.dispose()


# -- two instances on one database


@pytest_twisted.ensureDeferred
async def test_a_commit_reaches_the_other_instance_but_not_its_sender(
    pair: tuple[Instance, Instance, Engine],
) -> None:
    a, b, engine = pair
    await commit(engine, "aaaa", "narinfo", "0" * 32)
    await wait_for(lambda: b.got("narinfo", "0" * 32), 2, "B to hear A's narinfo")

    await commit(engine, "bbbb", "nar", "key:zstd")
    await wait_for(lambda: a.got("nar", "key:zstd"), 2, "A to hear B's marker")
    assert a.received == [("nar", "key:zstd")]
    assert b.received == [("narinfo", "0" * 32)]


@pytest_twisted.ensureDeferred
async def test_a_rolled_back_transaction_delivers_nothing(
    pair: tuple[Instance, Instance, Engine],
) -> None:
    _, b, engine = pair

    def rolled_back() -> None:
        with engine.connect() as conn:
            notify_thd(conn, "aaaa", "narinfo", "1" * 32)
            conn.rollback()

    await bounded(deferToThread(rolled_back), 10)
    await commit(engine, "aaaa", "narinfo", "marker")
    await wait_for(lambda: b.got("narinfo", "marker"), 2, "the marker")
    assert b.received == [("narinfo", "marker")]


@pytest_twisted.ensureDeferred
async def test_malformed_payloads_are_ignored(
    pair: tuple[Instance, Instance, Engine],
) -> None:
    _, b, engine = pair
    for payload in ("", "garbage", "aaaa narinfo", "aaaa narinfo x y"):
        await raw_notify(engine, payload)
    await commit(engine, "aaaa", "narinfo", "marker")
    await wait_for(lambda: b.got("narinfo", "marker"), 2, "the marker")
    assert b.received == [("narinfo", "marker")]
    assert b.listener.connected()


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_timers_and_no_connection(postgres_url: str) -> None:
    engine = sa_engine(postgres_url)
    try:
        instance = await started(make_instance(postgres_url, "aaaa"))
        assert our_delayed_calls(instance)  # the keepalive
        assert await bounded(deferToThread(backends, engine), 10) == 1

        await bounded(instance.listener.stopService(), 5)
        assert not instance.listener.connected()
        assert our_delayed_calls(instance) == []

        async def gone() -> None:
            deadline = reactor.seconds() + 5
            while await bounded(deferToThread(backends, engine), 10) != 0:
                if reactor.seconds() > deadline:
                    pytest.fail("the LISTEN session is still open")
                await deferLater(reactor, 0.05, lambda: None)

        await gone()
    finally:
        engine.dispose()


def listener_backend_pids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).all()
    return [int(row.pid) for row in rows]


@pytest_twisted.ensureDeferred
async def test_a_killed_session_is_replaced_and_resyncs(
    pair: tuple[Instance, Instance, Engine],
) -> None:
    a, b, engine = pair

    def kill_b() -> None:
        [pid] = listener_backend_pids(engine)
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    # Stop A so that B's session is the only one left to find.
    await bounded(a.listener.stopService(), 5)
    await wait_for(lambda: len(listener_backend_pids(engine)) == 1, 5, "A to leave")
    await bounded(deferToThread(kill_b), 10)
    await wait_for(lambda: b.got("resync", ""), 10, "B to resync")
    assert b.listener.connected()
    await commit(engine, "aaaa", "narinfo", "3" * 32)
    await wait_for(lambda: b.got("narinfo", "3" * 32), 2, "B after reconnecting")


@pytest_twisted.ensureDeferred
async def test_an_unanswered_keepalive_triggers_a_reconnect(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pglisten, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(pglisten, "KEEPALIVE_TIMEOUT", 0.5)
    engine = sa_engine(postgres_url)
    instance = make_instance(postgres_url, "bbbb")
    frozen: list[int] = []
    try:
        await started(instance)
        [pid] = await bounded(deferToThread(listener_backend_pids, engine), 10)
        os.kill(pid, signal.SIGSTOP)  # the session hangs, its socket stays open
        frozen.append(pid)
        await wait_for(lambda: instance.got("resync", ""), 10, "a resync")
        assert instance.listener.connected()
        await commit(engine, "aaaa", "nar", "key:none")
        await wait_for(lambda: instance.got("nar", "key:none"), 2, "the event")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        await bounded(instance.listener.stopService(), 5)
        engine.dispose()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest_twisted.ensureDeferred
async def test_stop_while_waiting_to_retry_cancels_the_retry() -> None:
    url = f"postgresql://postgres@127.0.0.1:{unused_port()}/nothing"
    instance = make_instance(url, "aaaa")
    instance.listener.startService()
    await wait_for(
        lambda: bool(our_delayed_calls(instance)) and not instance.listener._conn,
        5,
        "a scheduled retry",
    )
    assert not instance.listener.connected()
    await bounded(instance.listener.stopService(), 5)
    assert our_delayed_calls(instance) == []


# -- restarts, on a private server


@pytest.fixture
def private_server() -> Iterator[PostgresServer]:
    """A server of this test's own, free to stop and start."""
    server = PostgresServer.create()
    try:
        yield server
    finally:
        server.destroy()


@pytest_twisted.ensureDeferred
async def test_listener_reconnects_after_a_restart_and_resyncs(
    private_server: PostgresServer,
) -> None:
    url = private_server.new_database()
    a = make_instance(url, "aaaa")
    b = make_instance(url, "bbbb")
    engine = sa_engine(url)
    try:
        await started(a)
        await started(b)

        await deferToThread(private_server.stop)
        await wait_for(
            lambda: not (a.listener.connected() or b.listener.connected()),
            10,
            "both to notice",
        )
        await deferToThread(private_server.start)

        await bounded(a.listener.when_listening(), 20)
        await bounded(b.listener.when_listening(), 20)
        assert b.received == [("resync", "")]
        assert a.received == [("resync", "")]

        engine.dispose()  # its pooled connections died with the server
        await commit(engine, "aaaa", "narinfo", "2" * 32)
        await wait_for(lambda: b.got("narinfo", "2" * 32), 2, "B after restart")
    finally:
        await bounded(a.listener.stopService(), 5)
        await bounded(b.listener.stopService(), 5)
        engine.dispose()


@pytest_twisted.ensureDeferred
async def test_listener_started_while_the_database_is_down_connects_later(
    private_server: PostgresServer,
) -> None:
    url = private_server.new_database()
    engine = sa_engine(url)
    instance = make_instance(url, "bbbb")
    try:
        await deferToThread(private_server.stop)
        instance.listener.startService()
        await wait_for(lambda: bool(our_delayed_calls(instance)), 5, "a retry")
        assert not instance.listener.connected()
        await deferToThread(private_server.start)

        await bounded(instance.listener.when_listening(), 20)
        assert instance.received == [("resync", "")]
        await commit(engine, "aaaa", "nar", "key:xz")
        await wait_for(lambda: instance.got("nar", "key:xz"), 2, "the event")
    finally:
        await bounded(instance.listener.stopService(), 5)
        engine.dispose()


# -- the daemon's own writes


@pytest_twisted.ensureDeferred
async def test_database_writes_announce_narinfos_and_nars(
    pair: tuple[Instance, Instance, Engine], postgres_url: str
) -> None:
    """ncps.db.queries.Database, as the daemon builds it, notifies on commit."""
    import attrs as _attrs

    from ncps.db.engine import migrate, open_engine
    from ncps.db.queries import Database, NarFile, NarInfoRecord
    from ncps.testing import SyncRunner, make_nar_fixture

    a, b, _ = pair
    engine = open_engine(postgres_url, max_open=2, max_idle=1)
    try:
        migrate(engine)
        db = Database(engine, SyncRunner(), origin=a.events.origin)  # type: ignore[arg-type]
        fx = make_nar_fixture(seed=7, references=(), deriver=None)
        record = NarInfoRecord(
            narinfo=_attrs.evolve(fx.narinfo, url=f"nar/{fx.nar_key}.nar.xz"),
            nar_key=fx.nar_key,
            upstream_url="http://up.test/x",
        )
        await db.put_narinfo(record)
        await db.put_nar_file(
            NarFile(
                nar_key=fx.nar_key,
                compression="xz",
                file_size=1,
                nar_hash=fx.narinfo.nar_hash,
                nar_size=fx.narinfo.nar_size,
            )
        )
        hash_part = fx.narinfo.hash_part
        await wait_for(
            lambda: b.got("narinfo", hash_part) and b.got("nar", f"{fx.nar_key}:xz"),
            5,
            "B to hear of A's narinfo and NAR",
        )
        assert not a.got("narinfo", hash_part)
    finally:
        engine.dispose()
