"""The observer every ncps logger writes to, filtered by ``--log-level``.

Modules create ``log = Logger(observer=ncps_observer)``; ``set_level`` applies
the configured level to ncps's own messages only (Twisted's keep the runner's
level, set with ``twist --log-level``).
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
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


def set_level(level: str) -> None:
    """Show ncps messages at ``level`` and above."""
    _predicate.setLogLevelForNamespace("", LEVELS[level])
