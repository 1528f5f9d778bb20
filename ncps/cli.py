"""The ``ncps`` command: ``ncps serve``, ``ncps migrate up`` and ``ncps copy``.

The command line is the Go ncps's: ``ncps [global flags] <command> [flags]``.

* Global flags (``--config``, ``--log-level``, ``--log-format``) may come
  before the command, as urfave/cli takes them, or after it; given in both
  places, the one after the command wins (it is simply parsed later).  The Go
  ncps's other global flags (telemetry, xz) are refused as not supported yet,
  unless their value asks for what ncps does anyway.
* ``--version`` / ``-v`` and ``--help`` / ``-h`` before the command.
* ``ncps serve [flags]`` (alias ``s``) is ``twist ncps [flags]``.
* ``ncps migrate up`` brings the database schema to the newest revision for
  operators who prefer an explicit step (``serve`` also migrates at
  startup); ``ncps migrate down`` is refused: migrations only go forward.
* ``ncps copy`` copies a whole cache from one backend to another
  (see :mod:`ncps.copy`); it reads no ``--config`` of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Sequence
from typing import NoReturn

from sqlalchemy.exc import SQLAlchemyError
from twisted.python import usage

from ncps.config import environment, load_database_url, log_format, log_level
from ncps.db import engine as db_engine
from ncps.errors import ConfigError, StartupError
from ncps.settings import GLOBAL_FLAGS
from ncps.tap import go_style_argv, version

EXIT_USAGE, EXIT_CONFIG = 2, 78


def go_style_split(
    argv: Sequence[str],
    long_opts: Collection[str],
    booleans: Collection[str],
) -> tuple[list[str], list[str]]:
    """``argv`` as (flags, positional arguments), flags anywhere among them.

    Flags are rewritten by :func:`ncps.tap.go_style_argv` (bare booleans,
    ``--flag value`` joined, unknown or abbreviated flags refused); a bare
    boolean stays bare and ``--flag=false`` is dropped, as getopt wants for
    ``optFlags``.  Everything after ``--`` is positional.
    """
    flags: list[str] = []
    args: list[str] = []
    rest = list(argv)
    while rest:
        out = go_style_argv(rest, long_opts, booleans, booleans_take_values=False)
        first = next(
            (k for k, a in enumerate(out) if a in ("-", "--") or a[:1] != "-"),
            len(out),
        )
        flags += out[:first]
        if first == len(out):
            break
        if out[first] == "--":
            args += out[first + 1 :]
            break
        args.append(out[first])
        rest = out[first + 1 :]
    return flags, args


class _NcpsVersion(usage.Options):
    def opt_version(self) -> NoReturn:
        """Print ncps's version and exit."""
        print_version()


def print_version() -> NoReturn:
    sys.stdout.write(f"ncps version {version()}\n")
    raise SystemExit(0)


_LOG_PARAMETERS = [
    [
        "log-level",
        None,
        None,
        "trace, debug, info, warn, error, fatal or panic; checked, but this "
        "command prints plain lines, not log events.",
    ],
    ["log-format", None, None, "text or json; checked, as --log-level."],
]


class MigrateOptions(_NcpsVersion):
    synopsis = (
        "Usage: ncps [global flags] migrate up [--cache-database-url=URL | "
        "--cache-storage-local=DIR] [--dry-run]\n"
        "Create or upgrade the database schema.  Migrations only go forward: "
        "there is no `migrate down`."
    )
    optFlags = [
        [
            "dry-run",
            None,
            "Only show the current and the newest revision (alone means true; "
            "--dry-run=false migrates).",
        ]
    ]
    optParameters = [
        ["config", None, None, "YAML, TOML or JSON config file [NCPS_CONFIG_FILE]."],
        ["cache-database-url", None, None, "Database URL [CACHE_DATABASE_URL]."],
        [
            "cache-storage-local",
            None,
            None,
            "Storage directory, for the default SQLite database [CACHE_STORAGE_LOCAL].",
        ],
        [
            "cache-data-path",
            None,
            None,
            "Deprecated: use --cache-storage-local [CACHE_DATA_PATH].",
        ],
        *_LOG_PARAMETERS,
    ]

    def __init__(self) -> None:
        super().__init__()
        self.action = "up"

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        flags, args = go_style_split(
            list(sys.argv[1:] if options is None else options),
            self.longOpt,
            ["dry-run"],
        )
        super().parseOptions([*flags, "--", *args])

    def parseArgs(self, *args: str) -> None:
        # Without an action the command migrates up (what `ncps migrate` did).
        if len(args) > 1:
            raise usage.UsageError(f"unexpected argument {args[1]!r}")
        if args and args[0] == "down":
            raise usage.UsageError(
                "down is not supported: ncps migrations only go forward "
                "(restore a backup of the database to go back)"
            )
        if args and args[0] != "up":
            raise usage.UsageError(f"unknown action {args[0]!r} (use: ncps migrate up)")

    def postOptions(self) -> None:
        for flag, check in (("log-level", log_level), ("log-format", log_format)):
            if self[flag] is not None:
                check(self[flag])

    def given_flags(self) -> dict[str, str]:
        names = ("cache-database-url", "cache-storage-local", "cache-data-path")
        return {n: self[n] for n in names if self[n] is not None}


def _warn_migrate(line: str) -> None:
    sys.stderr.write(f"ncps migrate: warning: {line}\n")


def migrate(argv: Sequence[str]) -> int:
    """``ncps migrate [up] [flags]``; returns the exit status.

    0 done, 2 a usage error (``down`` among them), 78 a bad configuration,
    1 a database error.
    """
    options = MigrateOptions()
    try:
        options.parseOptions(list(argv))
        url = load_database_url(
            options.given_flags(),
            environment(),
            options["config"],
            _warn_migrate,
        )
        engine = db_engine.open_engine(url, max_open=1, max_idle=1)
        try:
            current = db_engine.current_revision(engine)
            head = db_engine.head_revision()
            if options["dry-run"]:
                state = "up to date" if current == head else "needs migrating"
                sys.stdout.write(
                    f"database at {current or 'empty'}, newest {head}: {state}\n"
                )
                return 0
            before, after = db_engine.migrate(engine)
        finally:
            engine.dispose()
    except usage.UsageError as e:
        sys.stderr.write(f"ncps migrate: {e}\n")
        return EXIT_USAGE
    except (ConfigError, StartupError) as e:
        sys.stderr.write(f"ncps migrate: {e}\n")
        return EXIT_CONFIG
    except SQLAlchemyError as e:
        sys.stderr.write(
            f"ncps migrate: --cache-database-url: {str(e).splitlines()[0]}\n"
        )
        return 1
    sys.stdout.write(f"database migrated from {before or 'empty'} to {after}\n")
    return 0


def serve(argv: Sequence[str]) -> int:
    """``ncps serve [flags]``: run ``twist ncps`` (returns only on a clean stop)."""
    from twisted.application.twist._twist import Twist

    Twist.main(["ncps serve", "ncps", *argv])
    return 0


def copy(argv: Sequence[str]) -> int:
    """``ncps copy [flags]`` (see :mod:`ncps.copy`); the exit status."""
    from ncps.copy import run

    return run(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "serve": serve,
    "s": serve,
    "migrate": migrate,
    "copy": copy,
}

USAGE = """usage: ncps [global flags] <command> [flags]

commands:
  serve, s     run the proxy (same as `twist ncps`); `ncps serve --help` lists flags
  migrate up   create or upgrade the database schema (`ncps migrate --help`);
               migrations only go forward, `migrate down` is refused
  copy         copy a whole cache to another backend (`ncps copy --help`)

global flags, before or after the command (given in both places, the one
after the command wins):
  --config=FILE       YAML, TOML or JSON config file [NCPS_CONFIG_FILE]
                      (serve, migrate; copy takes --from-config/--to-config)
  --log-level=LEVEL   trace, debug, info, warn, error, fatal or panic
                      (default: info) [LOG_LEVEL]
  --log-format=FORMAT text or json, one JSON object per line (default: text)
                      [LOG_FORMAT]; json only under `ncps serve`/`twist`
  -v, --version       print the version and exit
  -h, --help          show this help and exit

The Go ncps's other global flags (--otel-*, --prometheus-enabled,
--analytics-*, --use-xz-binary, --xz-binary-path, --log-console-writer-*)
are refused as not supported yet, unless they ask for what ncps does anyway
(e.g. --prometheus-enabled=false).  Boolean flags work bare (--flag) and as
--flag=true|false.
"""


def split_global_flags(args: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """``ncps``'s argv as (global flags, command, the command's arguments).

    Global flags come back as ``--name=value``, and ``-h``/``-v`` as
    ``--help``/``--version``.  Raises UsageError for a flag that is not
    global, ConfigError for a Go ncps global flag not supported yet.
    """
    long_opts = [f"{name}=" for name in GLOBAL_FLAGS] + ["help", "version"]
    try:
        out = go_style_argv(args, long_opts, ())
    except usage.UsageError as e:
        if not str(e).startswith("unknown flag"):
            raise
        raise usage.UsageError(
            f"{e} before the command (only global flags go there; the "
            "command's flags go after it, e.g. ncps serve --cache-hostname=...)"
        ) from None
    short = {"-h": "--help", "-v": "--version"}
    flags: list[str] = []
    for position, arg in enumerate(out):
        if arg == "--":
            position += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            flags.append(arg)
        elif arg in short:
            flags.append(short[arg])
        else:
            raise usage.UsageError(f"unknown flag {arg} before the command")
    else:
        position = len(out)
    rest = out[position:]
    return flags, (rest[0] if rest else None), rest[1:]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        flags, command, rest = split_global_flags(args)
    except usage.UsageError as e:
        sys.stderr.write(f"ncps: {e}\n")
        raise SystemExit(EXIT_USAGE) from None
    except ConfigError as e:
        sys.stderr.write(f"ncps: {e}\n")
        raise SystemExit(EXIT_CONFIG) from None
    for flag in flags:
        if flag == "--version":
            print_version()
        if flag == "--help":
            sys.stdout.write(USAGE)
            raise SystemExit(0)
    if command == "help":
        sys.stdout.write(USAGE)
        raise SystemExit(0)
    if command is None:
        sys.stderr.write(f"ncps: no command given\n{USAGE}")
        raise SystemExit(EXIT_USAGE)
    run = COMMANDS.get(command)
    if run is None:
        sys.stderr.write(f"ncps: unknown command {command!r}\n{USAGE}")
        raise SystemExit(EXIT_USAGE)
    if run is copy and any(f.startswith("--config=") for f in flags):
        sys.stderr.write(
            "ncps copy: --config: copy reads no config file of its own; use "
            "--from-config and --to-config\n"
        )
        raise SystemExit(EXIT_USAGE)
    raise SystemExit(run([*flags, *rest]))


if __name__ == "__main__":
    main()
