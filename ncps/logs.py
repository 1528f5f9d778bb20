"""Where ncps's log events go: the level filter and the text or JSON lines.

Modules create ``log = Logger(observer=ncps_observer)``; ``set_level`` applies
the configured level to ncps's own messages.  The process-wide output (the
file observer the ``twist`` runner installs) is chosen by
:func:`file_observer_factory`: ``ncps.tap`` hands it to the runner together
with the same level, so ``--log-level`` and ``--log-format`` decide what
``ncps serve`` prints, for Twisted's messages too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from string import Formatter
from typing import IO

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
ncps_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

# Keys of a JSON line; an event field of the same name is not copied over them.
_RESERVED = frozenset({"time", "level", "namespace", "message", "error", "traceback"})


def set_level(level: str) -> None:
    """Show ncps messages at ``level`` (one of :data:`LEVELS`) and above."""
    _predicate.setLogLevelForNamespace("", LEVELS[level])


def event_as_json_line(event: LogEvent) -> str | None:
    """One log event as a JSON object on one line (with its newline).

    Keys: ``time`` (UTC, ISO 8601), ``level``, ``namespace``, ``message`` (the
    formatted text), every field the format string names (plain JSON values
    as they are, anything else as text), and ``error``/``traceback`` for an
    event that carries a failure.
    """
    # LogLevel's members are NamedConstants, not LogLevel instances.
    level = getattr(event.get("log_level"), "name", None)
    when = datetime.fromtimestamp(float(event.get("log_time", 0.0)), UTC)
    record: dict[str, object] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level if isinstance(level, str) else "info",
        "namespace": str(event.get("log_namespace", "")),
        "message": formatEvent(event),
    }
    for name in _format_fields(event.get("log_format")):
        if name in event and name not in _RESERVED and not name.startswith("log_"):
            value = event[name]
            plain = value is None or isinstance(value, str | int | float | bool)
            record[name] = value if plain else str(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, separators=(",", ":")) + "\n"


def _format_fields(log_format: object) -> list[str]:
    if not isinstance(log_format, str):
        return []
    try:
        parsed = list(Formatter().parse(log_format))
    except ValueError:
        return []
    names = []
    for _, field, _, _ in parsed:
        if field:
            # "{a.b}" or "{a[0]}" names the field "a".
            names.append(field.split(".", 1)[0].split("[", 1)[0])
    return names


def json_file_observer(out: IO[str]) -> ILogObserver:
    """An observer writing :func:`event_as_json_line` lines to ``out``."""
    return FileLogObserver(out, event_as_json_line)


def file_observer_factory(log_format: str) -> Callable[[IO[str]], ILogObserver]:
    """The runner's file observer factory for ``text`` or ``json``."""
    if log_format == "json":
        return json_file_observer
    return textFileLogObserver
