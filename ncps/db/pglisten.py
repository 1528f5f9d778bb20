"""The LISTEN side of :mod:`ncps.db.notify`: one txpostgres connection per
instance (PostgreSQL only; importing this module loads psycopg2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from ncps.db.notify import CHANNEL, RESYNC, Events, parse_payload
from ncps.logs import ncps_observer

log = Logger(observer=ncps_observer)

RETRY_INITIAL = 0.5
RETRY_MAX = 30.0
CONNECT_TIMEOUT = 10.0
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_TIMEOUT = 10.0


def libpq_dsn(database_url: str) -> str:
    """Turn an ncps/SQLAlchemy PostgreSQL URL into a libpq connection URI.

    ``postgres://``, ``postgresql://`` and ``postgresql+driver://`` all become
    ``postgresql://`` with the rest unchanged.  Raises :class:`ValueError` for
    any other scheme.
    """
    scheme, sep, rest = database_url.partition("://")
    base = scheme.lower().split("+", 1)[0]
    if not sep or base not in ("postgres", "postgresql"):
        raise ValueError(f"not a PostgreSQL URL: {scheme}://...")
    return f"postgresql://{rest}"


def _first_line(reason: Failure) -> str:
    text = str(reason.value).strip()
    return text.splitlines()[0] if text else repr(reason.value)


class _ListenConnection(txpostgres.Connection):  # type: ignore[misc]
    """A txpostgres connection that reports its own loss.

    txpostgres keeps the socket registered as a reader to receive NOTIFYs; when
    the server goes away, psycopg2's ``poll()`` raises inside ``doRead``.
    Returning the error instead hands it to the reactor as the reason for
    ``connectionLost`` (instead of an "Unhandled Error" traceback), and
    ``connectionLost`` tells the owner, unless the owner closed us.
    """

    def __init__(
        self,
        reactor: Any,
        cooperator: Cooperator,
        on_lost: Callable[[Failure], None],
    ) -> None:
        super().__init__(reactor=reactor, cooperator=cooperator)
        self._on_lost: Callable[[Failure], None] | None = on_lost

    def doRead(self) -> Exception | None:
        try:
            super().doRead()
        except psycopg2.Error as e:
            error: Exception = e
            return error
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(reason)

    def close(self) -> None:
        self._on_lost = None
        if self.pollable() is not None:
            super().close()


class PostgresListener(Service):
    """One ``LISTEN`` connection feeding other instances' events to ``events``.

    Everything runs on the reactor thread; ``reactor`` must provide
    ``IReactorTime`` and ``IReactorFDSet``.  A lost or failed connection is
    retried with backoff (0.5 s doubling to 30 s); while connected, a
    ``SELECT 1`` every 5 s (10 s timeout) detects a dead peer.  The listener
    owns its connection, its timers and the cooperator that runs txpostgres's
    notify observers; ``stopService`` releases all of them.
    """

    def __init__(self, reactor: Any, database_url: str, events: Events) -> None:
        self._reactor = reactor
        self._dsn = libpq_dsn(database_url)
        self._events = events
        self._conn: _ListenConnection | None = None
        self._cooperator: Cooperator | None = None
        self._listening = False
        self._stopping = False
        self._in_outage = False
        self._delay = RETRY_INITIAL
        self._retry_call: IDelayedCall | None = None
        self._timeout_call: IDelayedCall | None = None
        self._keepalive_call: IDelayedCall | None = None
        self._waiters: list[Deferred[None]] = []

    # -- Service

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._in_outage = False
        self._delay = RETRY_INITIAL
        self._cooperator = Cooperator(scheduler=lambda f: self._reactor.callLater(0, f))
        self._attempt()

    def stopService(self) -> Deferred[None]:
        """Close the connection and cancel every timer; fires a reactor turn later.

        The extra turn lets txpostgres's own ``callLater(0, ...)`` completions
        run, so nothing of ours is left in the reactor when it fires.
        """
        super().stopService()
        self._stopping = True
        self._listening = False
        self._cancel_timers()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self._cooperator is not None:
            self._cooperator.stop()
            self._cooperator = None
        return deferLater(self._reactor, 0, lambda: None)

    def connected(self) -> bool:
        """Whether ``LISTEN`` is active on a live connection now."""
        return self._listening

    def when_listening(self) -> Deferred[None]:
        """A Deferred that fires (with ``None``) once ``LISTEN`` is active."""
        if self._listening:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    # -- connecting

    def _attempt(self) -> None:
        self._retry_call = None
        assert self._cooperator is not None
        conn: _ListenConnection | None = None

        def lost(reason: Failure) -> None:
            assert conn is not None
            self._dead(conn, reason)

        conn = _ListenConnection(self._reactor, self._cooperator, lost)
        self._conn = conn
        conn.addNotifyObserver(self._on_notify)
        self._timeout_call = self._reactor.callLater(
            CONNECT_TIMEOUT,
            self._dead,
            conn,
            Failure(TimeoutError(f"no connection within {CONNECT_TIMEOUT}s")),
        )
        d: Deferred[Any] = conn.connect(self._dsn)
        d.addCallback(lambda _: conn.runOperation(f"LISTEN {CHANNEL}"))
        d.addCallbacks(lambda _: self._listen_ok(conn), lambda f: self._dead(conn, f))

    def _listen_ok(self, conn: _ListenConnection) -> None:
        if conn is not self._conn:
            conn.close()
            return
        self._cancel_timers()
        self._listening = True
        self._delay = RETRY_INITIAL
        self._schedule_keepalive(conn)
        if self._in_outage:
            self._in_outage = False
            log.info("PostgreSQL notifications restored; resyncing")
            self._events.dispatch(RESYNC, "")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _dead(self, conn: _ListenConnection, reason: Failure) -> None:
        """``conn`` failed to connect or died: close it and schedule a retry."""
        if conn is not self._conn or self._stopping:
            return
        self._conn = None
        self._listening = False
        self._cancel_timers()
        conn.close()
        if not self._in_outage:
            self._in_outage = True
            log.warn(
                "PostgreSQL notifications unavailable ({error}); reconnecting",
                error=_first_line(reason),
            )
        delay, self._delay = self._delay, min(self._delay * 2, RETRY_MAX)
        self._retry_call = self._reactor.callLater(delay, self._attempt)

    # -- keepalive

    def _schedule_keepalive(self, conn: _ListenConnection) -> None:
        self._keepalive_call = self._reactor.callLater(
            KEEPALIVE_INTERVAL, self._ping, conn
        )

    def _ping(self, conn: _ListenConnection) -> None:
        self._keepalive_call = None
        if conn is not self._conn:
            return
        self._timeout_call = self._reactor.callLater(
            KEEPALIVE_TIMEOUT,
            self._dead,
            conn,
            Failure(TimeoutError(f"keepalive unanswered for {KEEPALIVE_TIMEOUT}s")),
        )

        def answered(_: object) -> None:
            if conn is self._conn:
                self._cancel_timers()
                self._schedule_keepalive(conn)

        d: Deferred[Any] = conn.runQuery("SELECT 1")
        d.addCallbacks(answered, lambda f: self._dead(conn, f))

    def _cancel_timers(self) -> None:
        for call in (self._timeout_call, self._keepalive_call):
            if call is not None and call.active():
                call.cancel()
        self._timeout_call = None
        self._keepalive_call = None

    # -- notifications

    def _on_notify(self, notify: Any) -> None:
        if notify.channel != CHANNEL:
            return
        parsed = parse_payload(notify.payload)
        if parsed is None:
            log.warn(
                "ignoring malformed notification {payload!r}", payload=notify.payload
            )
            return
        origin, kind, arg = parsed
        if origin == self._events.origin:
            return
        self._events.dispatch(kind, arg)
