"""``twistd ncps`` / ``twist ncps``: command-line options and ``makeService``.

The only module that touches the global reactor.

Flags are spelled as Go's flag parser takes them: a boolean flag alone means
true and never takes the next argument (``--cache-sign-narinfo=false`` turns
it off); every other flag takes ``--flag=value`` or ``--flag value``.  Flags
the Go ncps has and this one does not implement are refused with one line.

Log output: under ``twist`` (``ncps serve`` runs ``twist``) the options hand
the runner ncps's ``--log-format`` observer and ``--log-level``, so one level
and one format govern every line, Twisted's included.  Under ``twistd`` its
own ``--logger`` option decides, and only ``text`` is offered.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from importlib import metadata
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from ncps.config import Config, check_unsupported_flag, environment, load_config
from ncps.errors import (
    ConfigError,
    StartupError,
    exit_on_startup_error,
    note_startup_warnings,
)
from ncps.logs import LEVELS, file_observer_factory, ncps_observer, set_level
from ncps.settings import (
    ALIASES,
    FALSE_WORDS,
    SETTINGS,
    SETTINGS_BY_FLAG,
    TRUE_WORDS,
    UNSUPPORTED_BY_FLAG,
)

_fail = exit_on_startup_error
log = Logger(observer=ncps_observer)


def version() -> str:
    """This ncps's version: the installed package's, else the source tree's."""
    try:
        return metadata.version("ncps")
    except metadata.PackageNotFoundError:
        import ncps

        return str(getattr(ncps, "__version__", "unknown"))


def go_style_argv(
    argv: Sequence[str],
    long_opts: Collection[str],
    booleans: Collection[str],
    booleans_take_values: bool = True,
    short_with_value: Collection[str] = (),
) -> list[str]:
    """``argv`` rewritten so that getopt reads it the way Go's flag parser does.

    ``long_opts`` is a usage.Options ``longOpt`` list (``name=`` takes a
    value).  A boolean given bare becomes ``--name=true`` (or stays bare when
    ``booleans_take_values`` is false, where ``--name=false`` is dropped); a
    flag taking a value gets it joined with ``=``, and is refused if the next
    argument is another flag; an abbreviated or unknown flag is refused.
    Short flags are left to getopt; those in ``short_with_value`` (``-j``)
    keep their separate value.  Parsing stops at the first argument that is
    not a flag, or at ``--``.

    Raises UsageError, or ConfigError for a flag not supported yet.
    """
    takes_value = {o[:-1] for o in long_opts if o.endswith("=")} - set(booleans)
    plain = {o for o in long_opts if not o.endswith("=")} - set(booleans)
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--" or not arg.startswith("--"):
            if arg.startswith("-") and arg not in ("-", "--"):
                out.append(arg)  # a short flag: getopt's business
                if arg in short_with_value and i < len(argv):
                    out.append(argv[i])
                    i += 1
                continue
            out.extend(argv[i - 1 :])
            break
        name, eq, value = arg[2:].partition("=")
        unsupported = UNSUPPORTED_BY_FLAG.get(name)
        if unsupported is not None:
            if not eq and not unsupported.boolean and i < len(argv):
                value, i = argv[i], i + 1
            check_unsupported_flag(
                name, value if eq or not unsupported.boolean else None
            )
            continue  # a harmless value: nothing to do
        if name in booleans:
            if booleans_take_values:
                out.append(f"--{name}={value if eq else 'true'}")
                continue
            word = value.strip().lower() if eq else "true"
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise usage.UsageError(f"--{name}: invalid boolean {value!r}")
            if word in TRUE_WORDS:
                out.append(f"--{name}")
            continue
        if name in takes_value:
            if not eq:
                if i >= len(argv) or (argv[i].startswith("--") and argv[i] != "--"):
                    raise usage.UsageError(f"--{name}: needs a value")
                value, i = argv[i], i + 1
            out.append(f"--{name}={value}")
            continue
        if name in plain and not eq:
            out.append(arg)
            continue
        if name in plain:
            raise usage.UsageError(f"--{name}: takes no value")
        raise usage.UsageError(f"unknown flag --{name}")
    return out


def _help(flag: str) -> str:
    s = SETTINGS_BY_FLAG[flag]
    shown = f"{s.help} [{s.env}]"
    if s.boolean:
        shown += " Alone means true; --" + flag + "=false turns it off."
    if s.default:
        shown += f" (default: {s.default})"
    return shown


class Options(usage.Options):
    """Flags named as in the Go ncps; environment variables and a config file too."""

    synopsis = "[options]"
    longdesc = (
        "Nix binary-cache proxy. Precedence: flag > config file > environment > "
        "default. Every flag has an environment variable (shown in brackets) "
        "and a config file key. List flags take several values separated by "
        "commas, or repeat."
    )
    optParameters = (
        [["config", None, None, "YAML, TOML or JSON config file [NCPS_CONFIG_FILE]."]]
        + [[s.flag, None, None, _help(s.flag)] for s in SETTINGS if not s.multiple]
        + [
            [
                a.flag,
                None,
                None,
                f"Deprecated: use --{a.setting} [{a.env}].",
            ]
            for a in ALIASES
            if not SETTINGS_BY_FLAG[a.setting].multiple
        ]
    )

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {
            s.flag: [] for s in SETTINGS if s.multiple
        }
        self.repeated.update(
            {a.flag: [] for a in ALIASES if SETTINGS_BY_FLAG[a.setting].multiple}
        )
        self.config: Config | None = None
        self.warnings: tuple[str, ...] = ()

    def opt_cache_upstream_url(self, value: str) -> None:
        """Upstream cache URL; repeat or separate with commas for several, at
        least one [CACHE_UPSTREAM_URLS]."""
        self.repeated["cache-upstream-url"].append(value)

    def opt_cache_upstream_public_key(self, value: str) -> None:
        """Trusted upstream key name:base64; repeat or separate with commas
        [CACHE_UPSTREAM_PUBLIC_KEYS]."""
        self.repeated["cache-upstream-public-key"].append(value)

    def opt_upstream_cache(self, value: str) -> None:
        """Deprecated: use --cache-upstream-url [UPSTREAM_CACHES]."""
        self.repeated["upstream-cache"].append(value)

    def opt_upstream_public_key(self, value: str) -> None:
        """Deprecated: use --cache-upstream-public-key [UPSTREAM_PUBLIC_KEYS]."""
        self.repeated["upstream-public-key"].append(value)

    def opt_version(self) -> NoReturn:
        """Print ncps's version and exit."""
        sys.stdout.write(f"ncps version {version()}\n")
        raise SystemExit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        booleans = [s.flag for s in SETTINGS if s.boolean]
        try:
            argv = go_style_argv(argv, self.longOpt, booleans)
        except ConfigError as e:
            _fail(str(e))
        super().parseOptions(argv)

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(
                f"unexpected argument {args[0]!r} (a boolean flag takes its "
                "value after '=', e.g. --cache-sign-narinfo=false)"
            )

    def given_flags(self) -> dict[str, Any]:
        single = [s.flag for s in SETTINGS if not s.multiple] + [
            a.flag for a in ALIASES if a.flag not in self.repeated
        ]
        flags: dict[str, Any] = {f: self[f] for f in single if self[f] is not None}
        flags.update({k: v for k, v in self.repeated.items() if v})
        return flags

    def postOptions(self) -> None:
        warnings: list[str] = []
        try:
            self.config = load_config(
                self.given_flags(), environment(), self["config"], warnings.append
            )
        except ConfigError as e:
            note_startup_warnings(warnings)
            _fail(str(e))
        self.warnings = tuple(warnings)
        self._hand_logging_to_runner(self.config)

    def _hand_logging_to_runner(self, config: Config | None) -> None:
        """Give twist's runner ncps's log format and level.

        The runner reads these keys of its own options after makeService; a
        ``twistd`` parent has none of them.
        """
        assert config is not None
        parent = getattr(self, "parent", None)
        if parent is None:
            return
        if "fileLogObserverFactory" in parent:
            parent["fileLogObserverFactory"] = file_observer_factory(config.log_format)
            parent["logFormat"] = config.log_format
            parent["logLevel"] = LEVELS[config.log_level]
        elif config.log_format != "text":
            _fail(
                "--log-format: json works with `ncps serve` and `twist ncps`; "
                "under twistd use its --logger option"
            )


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ncps.service import build_service

    assert options.config is not None
    set_level(options.config.log_level)
    for line in options.warnings:
        log.warn("{warning}", warning=line)
    note_startup_warnings(options.warnings)
    try:
        return build_service(options.config, reactor)
    except StartupError as e:
        _fail(str(e))
        raise  # unreachable
