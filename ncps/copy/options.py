"""``ncps copy`` flags: :class:`CopyOptions`, per-side messages, sameness checks."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.python import usage

from ncps.config import (
    SETTINGS_BY_FLAG,
    Backend,
    Warn,
    _file_value,
    _read_config_file,
    build_backend,
    log_format,
    log_level,
    redact_url,
)
from ncps.db import engine as db_engine
from ncps.errors import ConfigError

SIDES = ("from", "to")
# Per-side flags: --from-<name> / --to-<name> is setting cache-<name>.
SIDE_PARAMETERS = (
    ("storage-local", "DIR", "Local storage directory (or the S3 flags)."),
    ("storage-s3-bucket", "BUCKET", "S3 bucket."),
    ("storage-s3-endpoint", "URL", "S3 endpoint URL with its scheme."),
    ("storage-s3-region", "REGION", "S3 region (default: us-east-1)."),
    ("storage-s3-access-key-id", "KEY", "S3 access key id."),
    ("storage-s3-secret-access-key", "SECRET", "S3 secret access key."),
    (
        "database-url",
        "URL",
        "Database URL (default with local storage: sqlite:<DIR>/db/ncps.sqlite3).",
    ),
    ("temp-path", "DIR", "Directory for temp files (target side)."),
)
# Also taken from a --from-config/--to-config file (no flags of their own).
FILE_ONLY_SETTINGS = (
    "cache-database-pool-max-open-conns",
    "cache-database-pool-max-idle-conns",
)
BACKEND_SETTINGS = (
    *(f"cache-{name}" for name, _, _ in SIDE_PARAMETERS),
    "cache-storage-s3-force-path-style",
    *FILE_ONLY_SETTINGS,
)

DEFAULT_JOBS = 4
MAX_JOBS = 256


def _side_options() -> tuple[list[list[Any]], list[list[Any]]]:
    params: list[list[Any]] = [
        ["jobs", "j", str(DEFAULT_JOBS), "NARs copied at once."],
        [
            "log-level",
            None,
            None,
            "trace, debug, info, warn, error, fatal or panic; checked, but copy "
            "prints plain lines, not log events.",
        ],
        ["log-format", None, None, "text or json; checked, as --log-level."],
    ]
    flags: list[list[Any]] = [
        ["dry-run", None, "Only show what would be copied; write nothing."],
        ["no-progress", None, "No progress output on stderr."],
    ]
    for side in SIDES:
        params.append(
            [
                f"{side}-config",
                None,
                None,
                "ncps config file (YAML, TOML or JSON); only its storage, "
                "database and temp keys are used; flags win.",
            ]
        )
        for name, metavar, doc in SIDE_PARAMETERS:
            params.append([f"{side}-{name}", None, None, f"{metavar}: {doc}"])
        flags.append(
            [
                f"{side}-storage-s3-force-path-style",
                None,
                "Address the bucket as <endpoint>/<bucket>.",
            ]
        )
    return params, flags


class CopyOptions(usage.Options):
    synopsis = (
        "Usage: ncps copy [--dry-run] [--no-progress] [--jobs N] "
        "(--from-storage-local DIR | --from-storage-s3-bucket B ...) "
        "[--from-database-url URL] (--to-storage-local DIR | ...) "
        "[--to-database-url URL]"
    )
    longdesc = (
        "Boolean flags work bare (--dry-run) and as --flag=true|false, as "
        "in the Go ncps; a flag's value follows '=' or a space."
    )
    optParameters, optFlags = _side_options()

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse Go style, as ``ncps serve`` does (see ncps.tap.go_style_argv).

        Raises UsageError, also for a Go ncps flag not supported yet.
        """
        from ncps.tap import go_style_argv

        argv = list(sys.argv[1:] if options is None else options)
        booleans = [flag[0] for flag in self.optFlags]
        try:
            argv = go_style_argv(
                argv,
                self.longOpt,
                booleans,
                booleans_take_values=False,
                short_with_value=("-j",),
            )
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        super().parseOptions(argv)

    def postOptions(self) -> None:
        try:
            for flag, check in (("log-level", log_level), ("log-format", log_format)):
                if self[flag] is not None:
                    check(self[flag])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def opt_version(self) -> NoReturn:
        """Print ncps's version and exit."""
        from ncps.tap import version

        sys.stdout.write(f"ncps version {version()}\n")
        raise SystemExit(0)

    def backend(self, side: str, warn: Warn | None = None) -> Backend:
        """One side's :class:`Backend`: its config file, then its flags.

        ``warn`` gets each warning line (a value taken with a guess, such as
        an S3 endpoint without a scheme), already naming this side's flags;
        by default it is written to stderr as ``ncps copy: warning: ...``.
        Raises ConfigError naming this side's flag (``--from-storage-local``).
        """
        write = warn or _warn_on_stderr
        try:
            raw: dict[str, Any] = {}
            path = self[f"{side}-config"]
            if path:
                values = _read_config_file(path)
                for flag in BACKEND_SETTINGS:
                    setting = SETTINGS_BY_FLAG[flag]
                    if setting.key in values:
                        raw[flag] = _file_value(setting, values[setting.key])
            for name, _, _ in SIDE_PARAMETERS:
                if self[f"{side}-{name}"] is not None:
                    raw[f"cache-{name}"] = self[f"{side}-{name}"]
            if self[f"{side}-storage-s3-force-path-style"]:
                raw["cache-storage-s3-force-path-style"] = "true"
            return build_backend(
                raw,
                flag_prefix=f"{side}-",
                warn=lambda line: write(side_message(line, side)),
            )
        except ConfigError as e:
            raise ConfigError(side_message(str(e), side)) from None

    def jobs(self) -> int:
        text = str(self["jobs"]).strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_JOBS:
            raise ConfigError(f"--jobs: {text!r} must be a number from 1 to {MAX_JOBS}")
        return int(text)


def _warn_on_stderr(line: str) -> None:
    sys.stderr.write(f"ncps copy: warning: {line}\n")


_FLAG_RE = re.compile(r"--(?:(?:from|to)-)?cache-((?:storage|database|temp)[\w-]*)")
_ENV_HINT_RE = re.compile(r"\s*\(or set [^)]*\)")


def side_message(message: str, side: str) -> str:
    """A backend error message with the flags of ``side`` (``--to-database-url``).

    The backend code names the daemon's flags (``--cache-storage-local``, or
    ``--to-cache-storage-local`` with a prefix) and points at environment
    variables, which copy does not read.
    """
    message = _FLAG_RE.sub(lambda m: f"--{side}-{m.group(1)}", message)
    message = re.sub(r"^--config:", f"--{side}-config:", message)
    return _ENV_HINT_RE.sub("", message)


def _storage_flag(backend: Backend, side: str) -> str:
    if backend.storage_local is not None:
        return f"--{side}-storage-local"
    return f"--{side}-storage-s3-bucket"


def _database_identity(url: str) -> tuple[object, ...]:
    sa_url, sqlite_file = db_engine.sqlalchemy_url(url)
    if sqlite_file is not None:
        return ("sqlite", os.path.realpath(sqlite_file))
    default_port = {"postgresql": 5432, "mysql": 3306}.get(sa_url.get_backend_name())
    return (
        sa_url.get_backend_name(),
        (sa_url.host or "localhost").lower(),
        sa_url.port or default_port,
        sa_url.database,
    )


def _storage_identity(backend: Backend) -> tuple[str, ...]:
    if backend.storage_local is not None:
        return ("local", os.path.realpath(backend.storage_local))
    assert backend.storage_s3 is not None
    s3 = backend.storage_s3
    return ("s3", s3.endpoint.rstrip("/").lower(), s3.bucket)


def check_distinct(source: Backend, target: Backend) -> bool:
    """Refuse a target that is the source; True when only the storage is shared.

    The same database on both sides is refused too: every row would already
    be there, so nothing (not even the objects) would be copied.
    """
    same_db = _database_identity(source.database_url) == _database_identity(
        target.database_url
    )
    same_storage = _storage_identity(source) == _storage_identity(target)
    if same_db and same_storage:
        raise ConfigError(
            f"{_storage_flag(target, 'to')}: the target is the source itself "
            "(same storage and same database)"
        )
    if same_db:
        raise ConfigError(
            f"--to-database-url: {redact_url(target.database_url)} is also the "
            "source's database; give the target a database of its own"
        )
    return same_storage
