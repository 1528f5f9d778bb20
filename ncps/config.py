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
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from ncps.errors import ConfigError
from ncps.signing import KeyFormatError, PublicKey
from ncps.units import parse_bool, parse_duration

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


@attrs.frozen
class Setting:
    """One configurable value and the three names it is known by."""

    flag: str
    env: str
    key: str
    help: str
    default: str | None = None
    multiple: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "cache-hostname",
        "CACHE_HOSTNAME",
        "cache.hostname",
        "Host name of this cache; also the name of its signing key (required).",
    ),
    Setting(
        "cache-storage-local",
        "CACHE_STORAGE_LOCAL",
        "cache.storage.local",
        "Directory where NARs and the default database are kept (this or "
        "--cache-storage-s3-bucket).",
    ),
    Setting(
        "cache-storage-s3-bucket",
        "CACHE_STORAGE_S3_BUCKET",
        "cache.storage.s3.bucket",
        "S3 bucket to keep NARs in (this or --cache-storage-local).",
    ),
    Setting(
        "cache-storage-s3-endpoint",
        "CACHE_STORAGE_S3_ENDPOINT",
        "cache.storage.s3.endpoint",
        "S3 endpoint URL with its scheme, e.g. https://s3.eu-west-1.amazonaws.com.",
    ),
    Setting(
        "cache-storage-s3-region",
        "CACHE_STORAGE_S3_REGION",
        "cache.storage.s3.region",
        "S3 region (default: us-east-1).",
    ),
    Setting(
        "cache-storage-s3-access-key-id",
        "CACHE_STORAGE_S3_ACCESS_KEY_ID",
        "cache.storage.s3.access-key-id",
        "S3 access key id.",
    ),
    Setting(
        "cache-storage-s3-secret-access-key",
        "CACHE_STORAGE_S3_SECRET_ACCESS_KEY",
        "cache.storage.s3.secret-access-key",
        "S3 secret access key.",
    ),
    Setting(
        "cache-storage-s3-force-path-style",
        "CACHE_STORAGE_S3_FORCE_PATH_STYLE",
        "cache.storage.s3.force-path-style",
        "Address the bucket as <endpoint>/<bucket> (MinIO, Garage, moto).",
        default="false",
    ),
    Setting(
        "cache-database-url",
        "CACHE_DATABASE_URL",
        "cache.database-url",
        "Database URL: sqlite:/path, postgresql://user:pass@host:port/db or "
        "mysql://user:pass@host:port/db (default with local storage: "
        "sqlite:<storage>/db/ncps.sqlite3).",
    ),
    Setting(
        "cache-database-pool-max-open-conns",
        "CACHE_DATABASE_POOL_MAX_OPEN_CONNS",
        "cache.database.pool.max-open-conns",
        "Most database connections open at once (0: 25, or 1 writer + 3 "
        "readers for SQLite).",
        default="0",
    ),
    Setting(
        "cache-database-pool-max-idle-conns",
        "CACHE_DATABASE_POOL_MAX_IDLE_CONNS",
        "cache.database.pool.max-idle-conns",
        "Database connections kept open while idle (0: 5).",
        default="0",
    ),
    Setting(
        "cache-temp-path",
        "CACHE_TEMP_PATH",
        "cache.temp-path",
        "Directory for downloads in progress (default: <storage>/store/tmp, or "
        "the system temp directory with S3).",
    ),
    Setting(
        "cache-upstream-url",
        "CACHE_UPSTREAM_URLS",
        "cache.upstream.urls",
        "Upstream binary cache URL; repeat for several (at least one).",
        multiple=True,
    ),
    Setting(
        "cache-upstream-public-key",
        "CACHE_UPSTREAM_PUBLIC_KEYS",
        "cache.upstream.public-keys",
        "Trusted upstream signing key name:base64; repeat for several (at least one).",
        multiple=True,
    ),
    Setting(
        "cache-upstream-dialer-timeout",
        "CACHE_UPSTREAM_DIALER_TIMEOUT",
        "cache.upstream.dialer-timeout",
        "Timeout for connecting to an upstream.",
        default="3s",
    ),
    Setting(
        "cache-upstream-response-header-timeout",
        "CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT",
        "cache.upstream.response-header-timeout",
        "Timeout for an upstream's response headers.",
        default="3s",
    ),
    Setting(
        "cache-sign-narinfo",
        "CACHE_SIGN_NARINFO",
        "cache.sign-narinfo",
        "Sign served narinfos with this cache's key (true/false).",
        default="true",
    ),
    Setting(
        "cache-secret-key-path",
        "CACHE_SECRET_KEY_PATH",
        "cache.secret-key-path",
        "Nix secret key file to sign with (default: generated once and kept "
        "in the database).",
    ),
    Setting(
        "netrc-file",
        "NETRC_FILE",
        "cache.netrc-file",
        "netrc file with credentials for upstreams (default: ~/.netrc if it exists).",
    ),
    Setting(
        "server-addr",
        "SERVER_ADDR",
        "server.addr",
        "Address to listen on, [host]:port.",
        default=":8501",
    ),
    Setting(
        "log-level",
        "LOG_LEVEL",
        "log.level",
        "Minimum log level: debug, info, warn, error.",
        default="info",
    ),
)
SETTINGS_BY_FLAG = {s.flag: s for s in SETTINGS}


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
    """The whole, validated configuration of one ncps instance."""

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
    log_level: str


def load_config(
    flags: Mapping[str, str | Sequence[str]],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> Config:
    """Merge flags, the config file and the environment into a :class:`Config`.

    ``flags`` holds only the flags given on the command line (repeatable ones as
    sequences).  ``config_file`` is the ``--config`` value; without it
    ``NCPS_CONFIG_FILE`` and then ``$XDG_CONFIG_HOME/ncps/config.yaml`` (only if
    it exists) are used.  Raises :class:`ConfigError`.
    """
    path = config_file or environ.get("NCPS_CONFIG_FILE")
    if not path:
        xdg = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        default = Path(xdg) / "ncps" / "config.yaml"
        path = str(default) if default.is_file() else None
    file_values = _read_config_file(path) if path else {}
    raw = {s.flag: _lookup(s, flags, file_values, environ) for s in SETTINGS}
    return _build(raw, environ)


def _lookup(
    setting: Setting,
    flags: Mapping[str, str | Sequence[str]],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
) -> str | tuple[str, ...] | None:
    if setting.flag in flags:
        given = flags[setting.flag]
        if setting.multiple:
            return (given,) if isinstance(given, str) else tuple(given)
        return given if isinstance(given, str) else given[-1]
    if setting.key in file_values:
        return _file_value(setting, file_values[setting.key])
    if setting.env in environ:
        value = environ[setting.env]
        if setting.multiple:
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value
    return () if setting.multiple else setting.default


def _file_value(setting: Setting, value: Any) -> str | tuple[str, ...]:
    where = f"--{setting.flag} (config key {setting.key})"
    if setting.multiple:
        if isinstance(value, str):
            value = [value]
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
    """Read a YAML/TOML/JSON file into a flat ``{"dotted.key": value}`` map."""
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
    known = {s.key for s in SETTINGS}
    for key in flat:
        if key not in known:
            raise ConfigError(f"--config: unknown key {key!r} in {path}")
    return flat


def _flatten(data: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not any(s.key == dotted for s in SETTINGS):
            _flatten(value, dotted + ".", out)
        else:
            out[dotted] = value


def _build(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
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
            f"--cache-hostname: {hostname!r} must be a bare host name (no scheme, "
            "no path)"
        )
    backend = build_backend(raw)

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
    level = str(raw["log-level"]).lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"--log-level: {raw['log-level']!r} is not one of {', '.join(LOG_LEVELS)}"
        )
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
        log_level=level,
    )


def _duration(flag: str, raw: Mapping[str, Any]) -> float:
    try:
        value = parse_duration(str(raw[flag]))
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None
    if value <= 0:
        raise ConfigError(f"--{flag}: must be greater than zero")
    return value


def _bool(flag: str, raw: Mapping[str, Any], flag_prefix: str = "") -> bool:
    default = SETTINGS_BY_FLAG[flag].default
    try:
        return parse_bool(str(raw.get(flag) or default))
    except ValueError as e:
        raise ConfigError(f"--{flag_prefix}{flag}: {e}") from None


def build_backend(raw: Mapping[str, Any], flag_prefix: str = "") -> Backend:
    """The storage and database settings out of ``raw`` (keyed by flag name).

    ``flag_prefix`` is put in front of flag names in error messages (the copy
    tool's ``from-``/``to-`` sides).
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
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{flag('cache-storage-s3-endpoint')}: {endpoint!r} must be an "
                "http:// or https:// URL"
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
        parts = urlsplit(url)
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


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _check_upstream_url(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--cache-upstream-url: {url!r} must be an http:// or https:// URL"
        )
    if parts.fragment:
        raise ConfigError(f"--cache-upstream-url: {url!r} must not have a fragment")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"--cache-upstream-url: {url!r} has a bad port") from None
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
