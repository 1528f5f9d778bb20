"""Configuration: flags, environment and a config file merged once into frozen data.

Precedence, per setting: command-line flag > config file > environment > default
(the order the Go ncps uses).  The config file is YAML, TOML or JSON, chosen by
its extension, with the dotted ncps keys as nested maps, e.g.::

    cache:
      hostname: cache.example.org
      upstream:
        urls: [https://cache.nixos.org]

Nothing else in ncps reads ``os.environ`` or the command-line options: every
other module receives a :class:`Config`.  Every error is a :class:`ConfigError`
whose message starts with the flag it is about.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import attrs
import yaml

from ncps.errors import ConfigError
from ncps.settings import (
    ALIASES,
    KEY_ALIASES,
    SETTINGS,
    SETTINGS_BY_FLAG,
    UNSUPPORTED,
    UNSUPPORTED_BY_FLAG,
    Setting,
    is_harmless,
)
from ncps.signing import KeyFormatError, PublicKey
from ncps.units import parse_bool, parse_duration

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SETTINGS",
    "SETTINGS_BY_FLAG",
    "Backend",
    "Config",
    "S3Settings",
    "Setting",
    "Warn",
    "build_backend",
    "check_database_url",
    "check_unsupported_flag",
    "environment",
    "load_config",
    "load_database_url",
    "redact_url",
]

# The levels ncps logs at, and what each accepted spelling (Go's zerolog
# names among them) means.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
_LEVEL_SPELLINGS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "fatal": "critical",
    "panic": "critical",
    "critical": "critical",
}
LOG_FORMATS = ("text", "json")

Warn = Callable[[str], None]

DEFAULT_POOL_MAX_OPEN = 25
DEFAULT_POOL_MAX_IDLE = 5


@attrs.frozen
class S3Settings:
    """Where and how to reach the S3 bucket NARs are kept in."""

    bucket: str
    endpoint: str
    region: str | None
    access_key_id: str
    secret_access_key: str = attrs.field(repr=False)
    force_path_style: bool = False


@attrs.frozen
class Backend:
    """Storage and database: what the daemon and the copy tool open.

    Exactly one of ``storage_local`` and ``storage_s3`` is set.
    """

    storage_local: Path | None
    storage_s3: S3Settings | None
    database_url: str
    pool_max_open: int
    pool_max_idle: int
    temp_path: Path


@attrs.frozen
class Config:
    """The whole, validated configuration of one ncps instance.

    Fields added after the first release have defaults, so code that builds a
    Config by hand (tests) keeps working.
    """

    hostname: str
    backend: Backend
    upstream_urls: tuple[str, ...]
    upstream_public_keys: tuple[PublicKey, ...]
    dialer_timeout: float
    response_header_timeout: float
    sign_narinfo: bool
    secret_key_path: Path | None
    netrc_file: Path | None
    listen_host: str
    listen_port: int
    # One of LOG_LEVELS (trace is debug; fatal and panic are critical).
    log_level: str
    # Most NAR downloads from upstreams at once (> 0).
    max_downloads: int = 32
    # Seconds a narinfo no upstream has is remembered as missing (0: never).
    negative_ttl: float = 10.0
    # Keep Compression: none NARs zstd-compressed (ncps.transparent).
    transparent_zstd: bool = True
    # Most client connections at once; 0: derived from the descriptor limit.
    max_connections: int = 0
    # Seconds a client has to send its request line and headers (> 0).
    read_header_timeout: float = 10.0
    # Seconds an idle keep-alive connection is kept open (> 0).
    idle_timeout: float = 60.0
    # One of LOG_FORMATS.
    log_format: str = "text"


def load_config(
    flags: Mapping[str, str | Sequence[str]],
    environ: Mapping[str, str],
    config_file: str | None = None,
    warn: Warn | None = None,
) -> Config:
    """Merge flags, the config file and the environment into a :class:`Config`.

    ``flags`` holds only the flags given on the command line (repeatable ones as
    sequences), keyed by flag name without dashes; deprecated alias names
    (``cache-data-path``) are taken too.  ``config_file`` is the ``--config``
    value; without it ``NCPS_CONFIG_FILE`` and then
    ``$XDG_CONFIG_HOME/ncps/config.yaml`` (only if it exists) are used.
    ``warn`` is called with one line per deprecated name in use and per value
    taken with a guess (an S3 endpoint without a scheme); no line holds a
    secret.  Raises :class:`ConfigError`.
    """
    warnings: list[str] = []
    path, file_values = _config_file(environ, config_file)
    _refuse_unsupported(flags, file_values, environ, path)
    raw = {s.flag: _lookup(s, flags, file_values, environ) for s in SETTINGS}
    warnings.extend(_alias_warnings(flags, environ, SETTINGS_BY_FLAG))
    config = _build(raw, environ, warnings.append)
    for line in warnings:
        if warn is not None:
            warn(line)
    return config


def load_database_url(
    flags: Mapping[str, str],
    environ: Mapping[str, str],
    config_file: str | None = None,
    warn: Warn | None = None,
) -> str:
    """The database URL alone, as ``ncps migrate`` needs it.

    Read like :func:`load_config` reads it (same config file, precedence and
    deprecated aliases, ``cache.database.url`` as a file key too); without a
    URL, the default SQLite file under ``--cache-storage-local``.  ``warn``
    gets one line per deprecated name in use.  Raises :class:`ConfigError`.
    """
    _, file_values = _config_file(environ, config_file)
    wanted = ("cache-database-url", "cache-storage-local")
    lines = _alias_warnings(flags, environ, wanted)
    url = _lookup(SETTINGS_BY_FLAG["cache-database-url"], flags, file_values, environ)
    if not url:
        storage = _lookup(
            SETTINGS_BY_FLAG["cache-storage-local"], flags, file_values, environ
        )
        if not storage:
            raise ConfigError(
                "--cache-database-url: required, or --cache-storage-local for "
                "the default SQLite database (or set CACHE_DATABASE_URL or "
                "cache.database-url)"
            )
        url = f"sqlite:{Path(str(storage)).expanduser().absolute()}/db/ncps.sqlite3"
    check_database_url(str(url))
    for line in lines:
        if warn is not None:
            warn(line)
    return str(url)


def _config_file(
    environ: Mapping[str, str], config_file: str | None
) -> tuple[str | None, dict[str, Any]]:
    """The config file in use (``--config``, ``NCPS_CONFIG_FILE``, or the XDG
    default if it exists) and its flattened values."""
    path = config_file or environ.get("NCPS_CONFIG_FILE")
    if not path:
        xdg = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        default = Path(xdg) / "ncps" / "config.yaml"
        path = str(default) if default.is_file() else None
    return path, _read_config_file(path) if path else {}


def _alias_warnings(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    settings: Collection[str],
) -> list[str]:
    """One line per deprecated flag or variable given for one of ``settings``."""
    return [
        f"--{alias.flag} ({alias.env}) is deprecated; use --{alias.setting} "
        f"({SETTINGS_BY_FLAG[alias.setting].env})"
        for alias in ALIASES
        if alias.setting in settings and (alias.flag in flags or environ.get(alias.env))
    ]


def check_unsupported_flag(flag: str, value: str | None) -> None:
    """Refuse ``--flag[=value]`` if it names a Go ncps setting not implemented.

    ``value`` is None for a bare flag (true for a boolean).  A harmless value
    (one that asks for what ncps does anyway) passes.
    """
    unsupported = UNSUPPORTED_BY_FLAG.get(flag)
    if unsupported is None:
        return
    if value is None and unsupported.boolean:
        value = "true"
    if value is None or not is_harmless(unsupported, value):
        raise ConfigError(unsupported.refusal())


def _refuse_unsupported(
    flags: Mapping[str, str | Sequence[str]],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    path: str | None,
) -> None:
    for flag, given in flags.items():
        for value in [given] if isinstance(given, str) else given:
            check_unsupported_flag(flag, value)
    for unsupported in UNSUPPORTED:
        if unsupported.key is not None and unsupported.key in file_values:
            found = file_values[unsupported.key]
            text = str(found).lower() if isinstance(found, bool | int | str) else "?"
            if found is not None and not is_harmless(unsupported, text):
                raise ConfigError(
                    f"{unsupported.refusal()} (config key {unsupported.key} in {path})"
                )
        if unsupported.env is not None:
            env_value = environ.get(unsupported.env)
            if env_value is not None and not is_harmless(unsupported, env_value):
                raise ConfigError(f"{unsupported.refusal()} (set by {unsupported.env})")


def _lookup(
    setting: Setting,
    flags: Mapping[str, str | Sequence[str]],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
) -> str | tuple[str, ...] | None:
    """The value of ``setting`` from the first place that has it.

    Flag, then file, then environment; at each place the setting's own name
    comes before a deprecated alias.
    """
    aliases = [a for a in ALIASES if a.setting == setting.flag]
    for name in [setting.flag, *(a.flag for a in aliases)]:
        if name in flags:
            given = flags[name]
            if setting.multiple:
                values = [given] if isinstance(given, str) else list(given)
                return tuple(v for text in values for v in _split(text))
            return given if isinstance(given, str) else given[-1]
    if setting.key in file_values:
        return _file_value(setting, file_values[setting.key])
    for env in [setting.env, *(a.env for a in aliases)]:
        if env in environ:
            value = environ[env]
            return _split(value) if setting.multiple else value
    return () if setting.multiple else setting.default


def _split(text: str) -> tuple[str, ...]:
    """A comma-separated list, as Go's StringSlice flags read it."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _file_value(setting: Setting, value: Any) -> str | tuple[str, ...]:
    where = f"--{setting.flag} (config key {setting.key})"
    if setting.multiple:
        if isinstance(value, str):
            return _split(value)
        if not isinstance(value, list) or not all(
            isinstance(v, str | int | float) for v in value
        ):
            raise ConfigError(f"{where}: expected a list of strings")
        return tuple(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConfigError(f"{where}: expected a single value, got {type(value).__name__}")


def _read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML/TOML/JSON file into a flat ``{"dotted.key": value}`` map.

    Keys of settings not supported yet are kept (the caller decides); keys
    nobody knows are refused.
    """
    parsers: dict[str, Callable[[bytes], Any]] = {
        ".toml": lambda b: tomllib.loads(b.decode("utf-8")),
        ".json": json.loads,
    }
    parse = parsers.get(Path(path).suffix.lower(), yaml.safe_load)
    try:
        data = parse(Path(path).read_bytes())
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--config: {path} is not valid: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must contain a map of settings")
    flat: dict[str, Any] = {}
    _flatten(data, "", flat)
    for old, new in KEY_ALIASES.items():
        if old in flat:
            value = flat.pop(old)
            flat.setdefault(new, value)
    known = _KNOWN_KEYS
    for key in flat:
        if key not in known:
            raise ConfigError(f"--config: unknown key {key!r} in {path}")
    return flat


_KNOWN_KEYS = frozenset(
    {s.key for s in SETTINGS} | {u.key for u in UNSUPPORTED if u.key is not None}
)


def _flatten(data: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in _KNOWN_KEYS:
            _flatten(value, dotted + ".", out)
        else:
            out[dotted] = value


def _build(raw: Mapping[str, Any], environ: Mapping[str, str], warn: Warn) -> Config:
    def need(flag: str) -> str:
        value = raw[flag]
        if not value:
            s = SETTINGS_BY_FLAG[flag]
            raise ConfigError(f"--{flag}: required (or set {s.env} or {s.key})")
        assert isinstance(value, str)
        return value

    hostname = need("cache-hostname").strip()
    if "://" in hostname or "/" in hostname or not hostname or " " in hostname:
        raise ConfigError(
            f"--cache-hostname: {redact_url(hostname)!r} must be a bare host name "
            "(no scheme, no path)"
        )
    backend = build_backend(raw, warn=warn)

    urls = tuple(_check_upstream_url(u) for u in raw["cache-upstream-url"])
    if not urls:
        raise ConfigError(
            "--cache-upstream-url: at least one upstream is required "
            "(or set CACHE_UPSTREAM_URLS)"
        )
    if len(set(urls)) != len(urls):
        raise ConfigError("--cache-upstream-url: the same upstream is given twice")
    keys = []
    for text in raw["cache-upstream-public-key"]:
        try:
            keys.append(PublicKey.parse(text))
        except KeyFormatError as e:
            raise ConfigError(f"--cache-upstream-public-key: {e}") from None
    if not keys:
        raise ConfigError(
            "--cache-upstream-public-key: at least one trusted upstream key is "
            "required (or set CACHE_UPSTREAM_PUBLIC_KEYS)"
        )

    secret = raw["cache-secret-key-path"]
    secret_path = Path(secret).expanduser().absolute() if secret else None
    if secret_path is not None and not secret_path.is_file():
        raise ConfigError(f"--cache-secret-key-path: {secret_path} does not exist")

    netrc = raw["netrc-file"]
    if netrc:
        netrc_path: Path | None = Path(netrc).expanduser().absolute()
        assert netrc_path is not None
        if not netrc_path.is_file():
            raise ConfigError(f"--netrc-file: {netrc_path} does not exist")
    else:
        home = environ.get("HOME")
        guess = Path(home) / ".netrc" if home else None
        netrc_path = guess if guess is not None and guess.is_file() else None

    host, port = _parse_listen(raw["server-addr"])
    max_downloads = _count(
        "--cache-upstream-max-downloads", raw.get("cache-upstream-max-downloads")
    )
    if max_downloads < 1:
        raise ConfigError("--cache-upstream-max-downloads: must be at least 1")
    return Config(
        hostname=hostname,
        backend=backend,
        upstream_urls=urls,
        upstream_public_keys=tuple(keys),
        dialer_timeout=_duration("cache-upstream-dialer-timeout", raw),
        response_header_timeout=_duration(
            "cache-upstream-response-header-timeout", raw
        ),
        sign_narinfo=_bool("cache-sign-narinfo", raw),
        secret_key_path=secret_path,
        netrc_file=netrc_path,
        listen_host=host,
        listen_port=port,
        log_level=log_level(str(raw["log-level"])),
        max_downloads=max_downloads,
        negative_ttl=_duration("cache-upstream-negative-ttl", raw, allow_zero=True),
        transparent_zstd=_bool("cache-transparent-zstd", raw),
        max_connections=_count(
            "--server-max-connections", raw.get("server-max-connections")
        ),
        read_header_timeout=_duration("server-read-header-timeout", raw),
        idle_timeout=_duration("server-idle-timeout", raw),
        log_format=log_format(str(raw["log-format"])),
    )


def log_level(text: str) -> str:
    """The ncps level (one of LOG_LEVELS) for a ``--log-level`` spelling."""
    level = _LEVEL_SPELLINGS.get(text.strip().lower())
    if level is None:
        raise ConfigError(
            f"--log-level: {text!r} is not one of trace, debug, info, warn, "
            "error, fatal, panic"
        )
    return level


def log_format(text: str) -> str:
    """``text`` or ``json``, for a ``--log-format`` value."""
    name = text.strip().lower()
    if name not in LOG_FORMATS:
        raise ConfigError(f"--log-format: {text!r} is not one of text, json")
    return name


def _duration(flag: str, raw: Mapping[str, Any], allow_zero: bool = False) -> float:
    try:
        value = parse_duration(str(raw[flag]))
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None
    if value <= 0 and not allow_zero:
        raise ConfigError(f"--{flag}: must be greater than zero")
    return value


def _bool(flag: str, raw: Mapping[str, Any], flag_prefix: str = "") -> bool:
    default = SETTINGS_BY_FLAG[flag].default
    text = str(raw.get(flag) or default)
    # Go's strconv.ParseBool also takes t and f.
    text = {"t": "true", "f": "false"}.get(text.strip().lower(), text)
    try:
        return parse_bool(text)
    except ValueError as e:
        raise ConfigError(f"--{flag_prefix}{flag}: {e}") from None


def build_backend(
    raw: Mapping[str, Any], flag_prefix: str = "", warn: Warn | None = None
) -> Backend:
    """The storage and database settings out of ``raw`` (keyed by flag name).

    ``flag_prefix`` is put in front of flag names in error and warning
    messages (the copy tool's ``from-``/``to-`` sides).  ``warn`` gets one
    line for each value taken with a guess (an S3 endpoint without scheme).
    """

    def flag(name: str) -> str:
        return f"--{flag_prefix}{name}"

    def text(name: str) -> str | None:
        value = raw.get(name)
        return str(value).strip() or None if value is not None else None

    local = text("cache-storage-local")
    s3_values = {
        name: text(f"cache-storage-s3-{name}")
        for name in (
            "bucket",
            "endpoint",
            "region",
            "access-key-id",
            "secret-access-key",
        )
    }
    s3_given = [name for name, value in s3_values.items() if value is not None]
    if local and s3_given:
        raise ConfigError(
            f"{flag('cache-storage-local')}: give either local storage or S3 "
            f"storage, not both ({flag('cache-storage-s3-' + s3_given[0])} is set)"
        )
    storage_local: Path | None = None
    storage_s3: S3Settings | None = None
    if local:
        storage_local = Path(local).expanduser().absolute()
        if storage_local.exists() and not storage_local.is_dir():
            raise ConfigError(
                f"{flag('cache-storage-local')}: {storage_local} is not a directory"
            )
    elif s3_given:
        for name in ("bucket", "endpoint", "access-key-id", "secret-access-key"):
            if s3_values[name] is None:
                s = SETTINGS_BY_FLAG[f"cache-storage-s3-{name}"]
                raise ConfigError(
                    f"{flag(s.flag)}: required with S3 storage (or set {s.env} "
                    f"or {s.key})"
                )
        endpoint = str(s3_values["endpoint"])
        if "://" not in endpoint:
            # The Go ncps's examples give host:port; it means TLS.
            guessed = f"https://{endpoint}"
            if warn is not None:
                warn(
                    f"{flag('cache-storage-s3-endpoint')}: "
                    f"{redact_url(endpoint)!r} has no scheme; using "
                    f"{redact_url(guessed)} (write http:// for plain HTTP)"
                )
            endpoint = guessed
        parts = _split_url(endpoint)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{flag('cache-storage-s3-endpoint')}: {redact_url(endpoint)!r} "
                "must be an http:// or https:// URL"
            )
        storage_s3 = S3Settings(
            bucket=str(s3_values["bucket"]),
            endpoint=endpoint.rstrip("/"),
            region=s3_values["region"],
            access_key_id=str(s3_values["access-key-id"]),
            secret_access_key=str(s3_values["secret-access-key"]),
            force_path_style=_bool(
                "cache-storage-s3-force-path-style", raw, flag_prefix
            ),
        )
    else:
        s = SETTINGS_BY_FLAG["cache-storage-local"]
        raise ConfigError(
            f"{flag('cache-storage-local')}: required, or "
            f"{flag('cache-storage-s3-bucket')} for S3 (or set {s.env} or "
            "CACHE_STORAGE_S3_BUCKET)"
        )

    database_url = text("cache-database-url")
    if database_url is None:
        if storage_local is None:
            raise ConfigError(
                f"{flag('cache-database-url')}: required with S3 storage (or "
                "set CACHE_DATABASE_URL)"
            )
        database_url = f"sqlite:{storage_local}/db/ncps.sqlite3"
    check_database_url(database_url, flag("cache-database-url"))

    pool_open = _count(
        flag("cache-database-pool-max-open-conns"),
        raw.get("cache-database-pool-max-open-conns"),
    )
    pool_idle = _count(
        flag("cache-database-pool-max-idle-conns"),
        raw.get("cache-database-pool-max-idle-conns"),
    )
    pool_open = pool_open or DEFAULT_POOL_MAX_OPEN
    pool_idle = min(pool_idle or DEFAULT_POOL_MAX_IDLE, pool_open)

    temp = text("cache-temp-path")
    if temp:
        temp_path = Path(temp).expanduser().absolute()
    elif storage_local is not None:
        temp_path = storage_local / "store" / "tmp"
    else:
        temp_path = Path(tempfile.gettempdir()) / "ncps"
    if temp_path.exists() and not temp_path.is_dir():
        raise ConfigError(f"{flag('cache-temp-path')}: {temp_path} is not a directory")
    return Backend(
        storage_local=storage_local,
        storage_s3=storage_s3,
        database_url=database_url,
        pool_max_open=pool_open,
        pool_max_idle=pool_idle,
        temp_path=temp_path,
    )


def _count(flag: str, value: Any) -> int:
    try:
        number = int(str(value if value is not None else "0").strip())
    except ValueError:
        raise ConfigError(f"{flag}: {value!r} is not a whole number") from None
    if number < 0:
        raise ConfigError(f"{flag}: must not be negative")
    return number


DATABASE_SCHEMES = ("sqlite", "sqlite3", "postgresql", "postgres", "mysql")


def check_database_url(url: str, flag: str = "--cache-database-url") -> None:
    """Reject a database URL ncps cannot use, with a message naming ``flag``."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme in ("sqlite", "sqlite3"):
        path = rest[2:] if rest.startswith("//") else rest
        if not path or path.startswith("?") or ":memory:" in path:
            raise ConfigError(
                f"{flag}: {url!r} needs a file path, e.g. "
                "sqlite:/var/lib/ncps/db.sqlite3"
            )
        return
    if scheme in ("postgresql", "postgres", "mysql") and rest.startswith("//"):
        try:
            parts = urlsplit(url)
        except ValueError as e:  # e.g. an unclosed "[" of an IPv6 host
            raise ConfigError(
                f"{flag}: {redact_url(url)!r} is not a URL: {e}"
            ) from None
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ConfigError(f"{flag}: {redact_url(url)!r} has a bad port") from None
        if not parts.hostname and scheme == "mysql":
            raise ConfigError(f"{flag}: {redact_url(url)!r} needs a host")
        if not parts.path.strip("/"):
            raise ConfigError(
                f"{flag}: {redact_url(url)!r} needs a database name, e.g. "
                f"{scheme}://user:pass@host:port/ncps"
            )
        return
    raise ConfigError(
        f"{flag}: unsupported database {redact_url(url)!r} (supported: "
        "sqlite:/path/to/file, postgresql://user:pass@host:port/db, "
        "mysql://user:pass@host:port/db)"
    )


def _redact_userinfo(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***``.

    Works on text that is not a valid URL too: whatever sits between the
    first ``:`` after the scheme's ``//`` and the last ``@`` of the authority
    is hidden.
    """
    scheme, sep, rest = url.partition("//")
    if not sep:
        return url
    authority = rest.partition("/")[0]
    if "@" not in authority:
        # A password with a raw "/" cuts the authority short: "user:pa".
        port = authority.rpartition(":")[2]
        if ":" not in authority or port.isdigit() or "@" not in rest:
            return url
        authority = rest.rpartition("@")[0] + "@"
    userinfo, _, host = authority.rpartition("@")
    if ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}//{user}:***@{rest[len(authority) - len(host) :]}"


# libpq and PyMySQL also take a password as a query parameter.
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|sslpassword)=)[^&#]*", re.I)


def redact_url(url: str) -> str:
    """``url`` with any password, in its user info or its query, as ``***``."""
    return _QUERY_SECRET.sub(r"\1***", _redact_userinfo(url))


def _split_url(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _check_upstream_url(url: str) -> str:
    """An upstream URL, possibly with credentials (as Nix takes them).

    Error messages show the URL with its password hidden.
    """
    url = url.strip()
    shown = redact_url(url)
    parts = _split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--cache-upstream-url: {shown!r} must be an http:// or https:// URL"
        )
    if parts.fragment:
        raise ConfigError(f"--cache-upstream-url: {shown!r} must not have a fragment")
    if parts.query:
        # Nix reads "?priority=..." and such as store settings; paths would
        # land inside the query here.
        raise ConfigError(
            f"--cache-upstream-url: {shown!r} must not have a query "
            "(Nix store parameters such as ?priority= are not supported)"
        )
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"--cache-upstream-url: {shown!r} has a bad port") from None
    return url


def _parse_listen(addr: str) -> tuple[str, int]:
    text = str(addr).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"--server-addr: {addr!r} must be [host]:port, e.g. :8501")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--server-addr: {addr!r} has a bad port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--server-addr: port {port} is out of range")
    return host, port


def environment() -> Mapping[str, str]:
    """The process environment (only ``ncps.tap`` and the CLI call this)."""
    return os.environ
