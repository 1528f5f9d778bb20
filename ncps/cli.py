"""The ``ncps`` command: ``ncps serve`` (the daemon), ``ncps migrate``, ``ncps copy``.

``ncps serve [flags]`` is ``twist ncps [flags]``.  ``ncps migrate`` brings the
database schema to the newest revision for operators who prefer an explicit
step (``serve`` also migrates at startup).  ``ncps copy`` copies a whole cache
from one backend to another (see :mod:`ncps.copy`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from twisted.python import usage

from ncps.config import (
    SETTINGS_BY_FLAG,
    _read_config_file,
    check_database_url,
    environment,
)
from ncps.db import engine as db_engine
from ncps.errors import ConfigError, StartupError


class MigrateOptions(usage.Options):
    synopsis = "[--cache-database-url=URL | --cache-storage-local=DIR] [--dry-run]"
    optFlags = [["dry-run", None, "Only show the current and the newest revision."]]
    optParameters = [
        ["config", None, None, "YAML, TOML or JSON config file [NCPS_CONFIG_FILE]."],
        ["cache-database-url", None, None, "Database URL [CACHE_DATABASE_URL]."],
        [
            "cache-storage-local",
            None,
            None,
            "Storage directory, for the default SQLite database [CACHE_STORAGE_LOCAL].",
        ],
    ]

    def database_url(self) -> str:
        env = environment()
        path = self["config"] or env.get("NCPS_CONFIG_FILE")
        file_values = _read_config_file(path) if path else {}

        def pick(flag: str) -> str | None:
            s = SETTINGS_BY_FLAG[flag]
            value = self[flag] or file_values.get(s.key) or env.get(s.env)
            return None if value is None else str(value)

        url = pick("cache-database-url")
        if url is None:
            storage = pick("cache-storage-local")
            if storage is None:
                raise ConfigError(
                    "--cache-database-url: required (or --cache-storage-local for "
                    "the default SQLite database)"
                )
            url = f"sqlite:{Path(storage).expanduser().absolute()}/db/ncps.sqlite3"
        check_database_url(url)
        return url


def migrate(argv: Sequence[str]) -> int:
    options = MigrateOptions()
    try:
        options.parseOptions(list(argv))
        url = options.database_url()
        engine = db_engine.open_engine(url, max_open=1, max_idle=1)
        current = db_engine.current_revision(engine)
        head = db_engine.head_revision()
        if options["dry-run"]:
            state = "up to date" if current == head else "needs migrating"
            sys.stdout.write(
                f"database at {current or 'empty'}, newest {head}: {state}\n"
            )
            return 0
        before, after = db_engine.migrate(engine)
        engine.dispose()
    except usage.UsageError as e:
        sys.stderr.write(f"ncps migrate: {e}\n{options}")
        return 2
    except (ConfigError, StartupError) as e:
        sys.stderr.write(f"ncps migrate: {e}\n")
        return 78
    except SQLAlchemyError as e:
        sys.stderr.write(
            f"ncps migrate: --cache-database-url: {str(e).splitlines()[0]}\n"
        )
        return 1
    sys.stdout.write(f"database migrated from {before or 'empty'} to {after}\n")
    return 0


USAGE = """usage: ncps <command> [flags]

commands:
  serve     run the proxy (same as `twist ncps`); `ncps serve --help` lists flags
  migrate   create or upgrade the database schema (`ncps migrate --help`)
  copy      copy a whole cache to another backend (`ncps copy --help`)
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "serve":
        from twisted.application.twist._twist import Twist

        Twist.main(["ncps serve", "ncps", *rest])
        return
    if command == "migrate":
        raise SystemExit(migrate(rest))
    if command == "copy":
        from ncps.copy import run as copy

        raise SystemExit(copy(rest))
    sys.stderr.write(f"ncps: unknown command {command!r}\n{USAGE}")
    raise SystemExit(2)


if __name__ == "__main__":
    main()
