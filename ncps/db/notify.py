"""Cross-instance metadata events over PostgreSQL LISTEN/NOTIFY.

Several ncps instances may share one PostgreSQL database.  A writer calls
:func:`notify_thd` inside the transaction that records a narinfo or NAR, so
PostgreSQL delivers ``origin kind arg`` on :data:`CHANNEL` to every listener
if, and only if, the transaction commits.  Each instance runs one
:class:`PostgresListener`: a txpostgres connection (non-blocking, on the
reactor thread, used for nothing but ``LISTEN``) that hands other instances'
events to its :class:`Events`.  SQLAlchemy remains the only query layer; on
SQLite and MySQL ``notify_thd`` does nothing and no listener runs.  The
listener lives in :mod:`ncps.db.pglisten`, imported only for PostgreSQL
(psycopg2 and txpostgres cost memory for nothing elsewhere).

Notifications are not queued for a disconnected listener.  After every outage
(including a first connect that failed) the listener dispatches the synthetic
event ``("resync", "")`` so subscribers reload whatever they cache.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, text
from twisted.logger import Logger, LogLevel

from ncps.logs import ncps_observer

log = Logger(observer=ncps_observer)

CHANNEL = "ncps_events"
RESYNC = "resync"


Listener = Callable[[str, str], None]


class Events:
    """In-process fan-out of metadata events, on the reactor thread.

    ``origin`` identifies this instance in the payloads it sends, so its own
    notifications are not delivered back to it.
    """

    def __init__(self, origin: str) -> None:
        if not origin or " " in origin:
            raise ValueError(f"event origin must be one word, not {origin!r}")
        self.origin = origin
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(kind, arg)`` for every event; twice is a no-op."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def dispatch(self, kind: str, arg: str) -> None:
        """Call every listener in subscription order; a listener raising is logged."""
        for listener in list(self._listeners):
            try:
                listener(kind, arg)
            except Exception:
                log.failure(
                    "event listener {listener!r} failed on {kind} {arg}",
                    level=LogLevel.error,
                    listener=listener,
                    kind=kind,
                    arg=arg,
                )


def _payload(origin: str, kind: str, arg: str) -> str:
    for name, value in (("origin", origin), ("kind", kind)):
        if not value or " " in value:
            raise ValueError(f"event {name} must be one word, not {value!r}")
    if " " in arg:
        raise ValueError(f"event arg must not contain spaces: {arg!r}")
    return f"{origin} {kind} {arg}"


def notify_thd(conn: Connection, origin: str, kind: str, arg: str) -> None:
    """Queue an event in ``conn``'s open transaction (db pool thread).

    On PostgreSQL this runs ``SELECT pg_notify(CHANNEL, payload)``; the server
    delivers it only if the transaction commits.  On other dialects it does
    nothing.  Raises :class:`ValueError` if a field contains a space.
    """
    payload = _payload(origin, kind, arg)
    if conn.dialect.name != "postgresql":
        return
    conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": payload},
    )


def parse_payload(payload: str) -> tuple[str, str, str] | None:
    """Split ``"origin kind arg"``; ``None`` unless it has exactly three fields.

    ``origin`` and ``kind`` must be non-empty; ``arg`` may be empty.
    """
    parts = payload.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    origin, kind, arg = parts
    return origin, kind, arg
