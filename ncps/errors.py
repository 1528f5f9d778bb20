"""Domain errors, mapped to HTTP statuses in exactly one place (``ncps.web``)."""

from __future__ import annotations

from collections.abc import Sequence


class NcpsError(Exception):
    """Base class of every error ncps raises on purpose."""


class NotFound(NcpsError):
    """The object is not in the cache and no upstream gave a usable copy (404)."""


class BadRequest(NcpsError):
    """The request path or parameters are malformed (400)."""


class UpstreamError(NcpsError):
    """An upstream answered with an error, timed out or could not be reached."""


class IntegrityError(NcpsError):
    """Downloaded bytes do not match what the narinfo promised."""


class StorageError(NcpsError):
    """The NAR store (S3, or the disk) failed; the request may be retried (503)."""


class Overloaded(NcpsError):
    """Too many downloads: a request waited too long for a slot (503, Retry-After)."""


class UpstreamsUnavailable(NcpsError):
    """No upstream could say whether it has a narinfo: each one failed, timed
    out, was backing off or sent one we rejected (503, Retry-After).  Never
    a 404, which Nix would remember for an hour."""


class DatabaseUnavailable(NcpsError):
    """The database failed even after retries; the request may be retried (503)."""


class ConfigError(NcpsError):
    """A bad configuration; the message starts with the flag it is about."""


class StartupError(NcpsError):
    """Something the daemon needs at startup is missing or unusable."""


# Warnings of the configuration (deprecated names, guessed schemes): logged
# as the daemon starts, and repeated by exit_on_startup_error, because a
# startup that fails may never get to write its log.
_startup_warnings: list[str] = []


def note_startup_warnings(lines: Sequence[str]) -> None:
    """Keep ``lines`` to repeat if startup fails (see exit_on_startup_error)."""
    _startup_warnings[:] = lines


def exit_on_startup_error(message: str) -> None:
    """Stop a starting daemon with one line on stderr and a non-zero status.

    The configuration's warnings come first, each on a line of its own: the
    scheme guessed for an endpoint may be why it cannot be reached.
    """
    import sys

    for line in _startup_warnings:
        sys.stderr.write(f"ncps: warning: {line}\n")
    sys.stderr.write(f"ncps: {message}\n")
    sys.stderr.flush()
    raise SystemExit(78)
