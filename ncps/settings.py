"""The names of every setting: flag, environment variable and config-file key.

Three tables, all pure data:

* :data:`SETTINGS`, what this ncps implements;
* :data:`ALIASES`, the Go ncps's deprecated spellings, still accepted with a
  warning (the new name wins when both are given in the same place);
* :data:`UNSUPPORTED`, what the Go ncps has and this one does not implement
  yet.  Giving one is refused with "not supported yet", never ignored, except
  for a value that asks for what ncps does anyway (:attr:`Unsupported.harmless`,
  e.g. ``ANALYTICS_REPORTING_ENABLED=false``).
"""

from __future__ import annotations

import attrs

# What Go's strconv.ParseBool reads as false, plus the words ncps.units takes.
FALSE_WORDS = frozenset({"false", "0", "f", "no", "off"})
TRUE_WORDS = frozenset({"true", "1", "t", "yes", "on"})


@attrs.frozen
class Setting:
    """One configurable value and the three names it is known by."""

    flag: str
    env: str
    key: str
    help: str
    default: str | None = None
    multiple: bool = False
    boolean: bool = False


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
        "S3 endpoint URL, e.g. https://s3.eu-west-1.amazonaws.com or "
        "http://127.0.0.1:9000 (without a scheme: https, with a warning).",
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
        boolean=True,
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
        "Upstream binary cache URL; repeat or separate with commas for "
        "several (at least one).",
        multiple=True,
    ),
    Setting(
        "cache-upstream-public-key",
        "CACHE_UPSTREAM_PUBLIC_KEYS",
        "cache.upstream.public-keys",
        "Trusted upstream signing key name:base64; repeat or separate with "
        "commas for several (at least one).",
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
        "cache-upstream-max-downloads",
        "CACHE_UPSTREAM_MAX_DOWNLOADS",
        "cache.upstream.max-downloads",
        "Most NAR downloads from upstreams at once; NARs clients wait for go "
        "first, prefetches use what is left.",
        default="32",
    ),
    Setting(
        "cache-upstream-negative-ttl",
        "CACHE_UPSTREAM_NEGATIVE_TTL",
        "cache.upstream.negative-ttl",
        "How long a narinfo no upstream has is remembered as missing (0: not at all).",
        default="10s",
    ),
    Setting(
        "cache-transparent-zstd",
        "CACHE_TRANSPARENT_ZSTD",
        "cache.transparent-zstd",
        "Keep Compression: none NARs zstd-compressed; they are sent with "
        "Content-Encoding: zstd to clients that take it (Nix does), decoded "
        "for others.",
        default="true",
        boolean=True,
    ),
    Setting(
        "cache-sign-narinfo",
        "CACHE_SIGN_NARINFO",
        "cache.sign-narinfo",
        "Sign served narinfos with this cache's key.",
        default="true",
        boolean=True,
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
        "server-max-connections",
        "SERVER_MAX_CONNECTIONS",
        "server.max-connections",
        "Most client connections at once (0: derived from the file descriptor limit).",
        default="0",
    ),
    Setting(
        "server-read-header-timeout",
        "SERVER_READ_HEADER_TIMEOUT",
        "server.read-header-timeout",
        "Time a client has to send a request line and its headers.",
        default="10s",
    ),
    Setting(
        "server-idle-timeout",
        "SERVER_IDLE_TIMEOUT",
        "server.idle-timeout",
        "Idle keep-alive connections are closed after this long.",
        default="60s",
    ),
    Setting(
        "log-level",
        "LOG_LEVEL",
        "log.level",
        "Minimum log level: trace, debug, info, warn, error, fatal, panic.",
        default="info",
    ),
    Setting(
        "log-format",
        "LOG_FORMAT",
        "log.format",
        "Log line format: text, or json (one JSON object per line).",
        default="text",
    ),
)
SETTINGS_BY_FLAG = {s.flag: s for s in SETTINGS}

# Flags that may come before the subcommand (``ncps --config=c.yaml serve``).
GLOBAL_FLAGS = ("config", "log-level", "log-format")

# Another spelling of a config-file key (the Go ``migrate`` command's).
KEY_ALIASES = {"cache.database.url": "cache.database-url"}


@attrs.frozen
class Alias:
    """A deprecated Go ncps flag and environment variable for a setting."""

    flag: str
    env: str
    setting: str


ALIASES: tuple[Alias, ...] = (
    Alias("cache-data-path", "CACHE_DATA_PATH", "cache-storage-local"),
    Alias("upstream-cache", "UPSTREAM_CACHES", "cache-upstream-url"),
    Alias("upstream-public-key", "UPSTREAM_PUBLIC_KEYS", "cache-upstream-public-key"),
    Alias(
        "upstream-dialer-timeout",
        "UPSTREAM_DIALER_TIMEOUT",
        "cache-upstream-dialer-timeout",
    ),
    Alias(
        "upstream-response-header-timeout",
        "UPSTREAM_RESPONSE_HEADER_TIMEOUT",
        "cache-upstream-response-header-timeout",
    ),
)
ALIASES_BY_FLAG = {a.flag: a for a in ALIASES}


@attrs.frozen
class Unsupported:
    """A Go ncps setting this ncps does not implement yet.

    ``env`` and ``key`` are None where the Go ncps has no such name.
    ``harmless`` holds the (lower-case) values that ask for what ncps does
    anyway, so giving them is accepted without a word; the empty value is
    always harmless.
    """

    flag: str
    env: str | None
    key: str | None
    boolean: bool = False
    harmless: frozenset[str] = frozenset()

    def refusal(self) -> str:
        return f"--{self.flag}: not supported yet by this ncps"


def _unsupported() -> tuple[Unsupported, ...]:
    def off(flag: str, env: str | None, key: str | None) -> Unsupported:
        # A feature switch whose "off" is what ncps does.
        return Unsupported(flag, env, key, boolean=True, harmless=FALSE_WORDS)

    def value(flag: str, env: str | None, key: str | None) -> Unsupported:
        return Unsupported(flag, env, key)

    def cache(name: str, key: str | None = None) -> tuple[str, str, str]:
        env = "CACHE_" + name.upper().replace("-", "_")
        dotted = key or f"cache.{name}"
        return f"cache-{name}", env, dotted

    table = [
        # Global flags.
        off("otel-enabled", "OTEL_ENABLED", "opentelemetry.enabled"),
        value("otel-grpc-url", "OTEL_GRPC_URL", "opentelemetry.grpc-url"),
        off("prometheus-enabled", "PROMETHEUS_ENABLED", "prometheus.enabled"),
        off(
            "analytics-reporting-enabled",
            "ANALYTICS_REPORTING_ENABLED",
            "analytics.reporting.enabled",
        ),
        off("analytics-reporting-samples", None, None),
        off("use-xz-binary", "USE_XZ_BINARY", "use-xz-binary"),
        value("xz-binary-path", "XZ_BINARY_PATH", "xz-binary-path"),
        Unsupported("log-console-writer-enabled", None, None, boolean=True),
        value("log-console-writer-prefix", None, None),
        # serve: uploads, deletes, access control.
        off(*cache("allow-put-verb")),
        off(*cache("allow-delete-verb")),
        value(*cache("get-token")),
        off(*cache("require-trusted-signature")),
        value(
            "cache-trusted-upload-key",
            "CACHE_TRUSTED_UPLOAD_KEYS",
            "cache.trusted-upload-keys",
        ),
        # serve: LRU.
        value(*cache("max-size")),
        value("cache-lru-schedule", "CACHE_LRU_SCHEDULE", "cache.lru.schedule"),
        value(
            "cache-lru-schedule-timezone", "CACHE_LRU_SCHEDULE_TZ", "cache.lru.timezone"
        ),
        value("pprof-addr", "PPROF_ADDR", "pprof.addr"),
        # serve: Redis and distributed locks.
        value("cache-redis-addrs", "CACHE_REDIS_ADDRS", "cache.redis.addrs"),
        value("cache-redis-username", "CACHE_REDIS_USERNAME", "cache.redis.username"),
        value("cache-redis-password", "CACHE_REDIS_PASSWORD", "cache.redis.password"),
        value("cache-redis-db", "CACHE_REDIS_DB", "cache.redis.db"),
        off("cache-redis-use-tls", "CACHE_REDIS_USE_TLS", "cache.redis.use-tls"),
        value(
            "cache-redis-pool-size", "CACHE_REDIS_POOL_SIZE", "cache.redis.pool-size"
        ),
        Unsupported(
            "cache-lock-backend",
            "CACHE_LOCK_BACKEND",
            "cache.lock.backend",
            harmless=frozenset({"local"}),
        ),
        value(
            "cache-lock-redis-key-prefix",
            "CACHE_LOCK_REDIS_KEY_PREFIX",
            "cache.lock.redis.key-prefix",
        ),
        value(
            "cache-lock-download-ttl",
            "CACHE_LOCK_DOWNLOAD_TTL",
            "cache.lock.download-lock-ttl",
        ),
        value("cache-lock-lru-ttl", "CACHE_LOCK_LRU_TTL", "cache.lock.lru-lock-ttl"),
        value(
            "cache-lock-retry-max-attempts",
            "CACHE_LOCK_RETRY_MAX_ATTEMPTS",
            "cache.lock.retry.max-attempts",
        ),
        value(
            "cache-lock-retry-initial-delay",
            "CACHE_LOCK_RETRY_INITIAL_DELAY",
            "cache.lock.retry.initial-delay",
        ),
        value(
            "cache-lock-retry-max-delay",
            "CACHE_LOCK_RETRY_MAX_DELAY",
            "cache.lock.retry.max-delay",
        ),
        off(
            "cache-lock-retry-jitter",
            "CACHE_LOCK_RETRY_JITTER",
            "cache.lock.retry.jitter",
        ),
        off(
            "cache-lock-allow-degraded-mode",
            "CACHE_LOCK_ALLOW_DEGRADED_MODE",
            "cache.lock.allow-degraded-mode",
        ),
        value(
            "cache-download-poll-timeout",
            "CACHE_DOWNLOAD_POLL_TIMEOUT",
            "cache.download.poll-timeout",
        ),
    ]
    for name in (
        "min",
        "avg",
        "max",
        "background-workers",
        "delete-delay",
        "lazy-recovery-schedule",
        "lazy-recovery-batch-size",
        "lazy-cleanup-schedule",
        "chunk-wait-timeout",
    ):
        table.append(value(*cache(f"cdc-{name}", f"cache.cdc.{name}")))
    for name in ("enabled", "lazy-chunking-enabled"):
        table.append(off(*cache(f"cdc-{name}", f"cache.cdc.{name}")))
    table.append(
        off(*cache("inflight-staging-enabled", "cache.inflight-staging.enabled"))
    )
    for name in ("retention", "part-size"):
        table.append(
            value(*cache(f"inflight-staging-{name}", f"cache.inflight-staging.{name}"))
        )
    return tuple(table)


UNSUPPORTED: tuple[Unsupported, ...] = _unsupported()
UNSUPPORTED_BY_FLAG = {u.flag: u for u in UNSUPPORTED}
UNSUPPORTED_GLOBAL_FLAGS = (
    "otel-enabled",
    "otel-grpc-url",
    "prometheus-enabled",
    "analytics-reporting-enabled",
    "analytics-reporting-samples",
    "use-xz-binary",
    "xz-binary-path",
    "log-console-writer-enabled",
    "log-console-writer-prefix",
)


def is_harmless(unsupported: Unsupported, value: str) -> bool:
    """Whether giving ``value`` for ``unsupported`` asks for nothing ncps lacks."""
    word = value.strip().lower()
    return not word or word in unsupported.harmless
