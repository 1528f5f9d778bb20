"""The composition root: ``build_service(config, reactor)`` builds everything.

Blocking startup work (creating directories, migrating the database, loading
or creating the signing key) happens here, before anything listens: a failure
raises :class:`~ncps.errors.StartupError` with one line naming the flag.

Start order: thread pools, upstream health checks, the HTTP listener.  Stop
order is the reverse and sequential: the listener first, pools last, the
database engine disposed once its pool is idle.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from ncps.backend import S3_THREADS, db_threads, is_sqlite, open_database, open_store
from ncps.cache import Cache
from ncps.config import Config
from ncps.db.notify import Events
from ncps.db.queries import Database, get_config_thd, put_config_if_absent_thd
from ncps.errors import StartupError, exit_on_startup_error
from ncps.fdlimit import Budget, client_limit, raise_soft_limit
from ncps.logs import ncps_observer
from ncps.sendfile import SendfilePort
from ncps.signing import KeyFormatError, SecretKey, TrustedKeys
from ncps.threads import Runner, ThreadPoolService
from ncps.upstream import HEALTH_INTERVAL, UpstreamPool
from ncps.web import CacheServer, QuietSite
from ncps.wire import ConnectionGate, GatedPort, WireLimits

log = Logger(observer=ncps_observer)

SECRET_KEY_CONFIG = "secret_key"


class SequentialMultiService(MultiService):
    """Stops children one after the other, in reverse start order, waiting for each."""

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)

        async def stop_all() -> None:
            for child in reversed(list(self)):
                # Some services stop synchronously (return None).
                await maybeDeferred(child.stopService)

        return ensureDeferred(stop_all())


class ListenerService(Service):
    """The HTTP listener; a failure to bind stops startup with one line.

    The port is a :class:`~ncps.wire.GatedPort`: it never accepts more client
    connections than ``gate`` allows, and listens with a backlog of 1024; its
    connections send stored NARs with sendfile (:mod:`ncps.sendfile`).
    """

    def __init__(
        self, site: QuietSite, gate: ConnectionGate, host: str, port: int, reactor: Any
    ) -> None:
        self._site = site
        self._gate = gate
        self._host = host
        self._port_number = port
        self._reactor = reactor
        self.port: GatedPort | None = None

    def startService(self) -> None:
        super().startService()
        port = SendfilePort(
            self._port_number,
            self._site,
            self._gate,
            interface=self._host,
            reactor=self._reactor,
        )
        try:
            port.startListening()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            exit_on_startup_error(
                f"--server-addr: cannot listen on {self._host}:{self._port_number}: "
                f"{reason}"
            )
            return
        self.port = port

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()


class _Hook(Service):
    """Runs a callable when stopped (closing connection pools, engines)."""

    def __init__(self, on_stop: Any) -> None:
        self._on_stop = on_stop

    def stopService(self) -> Any:
        super().stopService()
        return self._on_stop()


def load_signing_key_thd(db: Database, config: Config) -> SecretKey:
    """The cache's key: from --cache-secret-key-path, else the database, else new."""
    if config.secret_key_path is not None:
        try:
            return SecretKey.parse(config.secret_key_path.read_text())
        except (OSError, UnicodeDecodeError, KeyFormatError) as e:
            raise StartupError(
                f"--cache-secret-key-path: {config.secret_key_path}: {e}"
            ) from None
    stored = db.call_thd(get_config_thd, SECRET_KEY_CONFIG)
    if stored is None:
        fresh = SecretKey.generate(config.hostname)
        stored = db.call_thd(
            put_config_if_absent_thd, SECRET_KEY_CONFIG, fresh.to_text()
        )
        if stored == fresh.to_text():
            log.info("generated signing key {name}", name=fresh.name)
    try:
        return SecretKey.parse(stored)
    except KeyFormatError as e:
        raise StartupError(
            f"--cache-database-url: stored signing key is invalid: {e}"
        ) from None


def descriptor_budget(config: Config) -> int:
    """Raise the descriptor limit; the client connection limit that fits in it."""
    before, soft = raise_soft_limit()
    if soft > before:
        log.info(
            "raised the file descriptor limit from {before} to {after}",
            before=before,
            after=soft,
        )
    backend = config.backend
    budget = Budget(
        max_downloads=config.max_downloads,
        db_connections=db_threads(backend),
        sqlite=is_sqlite(backend),
        s3_connections=S3_THREADS if backend.storage_s3 is not None else 0,
        upstreams=len(config.upstream_urls),
    )
    return client_limit(soft, budget, config.max_connections)


def build_service(config: Config, reactor: Any) -> MultiService:
    """Build the whole ncps service tree for ``config`` on ``reactor``."""
    root = SequentialMultiService()

    backend = config.backend
    connections = descriptor_budget(config)
    cpus = os.cpu_count() or 2
    db_pool = ThreadPoolService("db", max_threads=db_threads(backend))
    io_pool = ThreadPoolService("io", max_threads=max(4, cpus * 2))
    store = open_store(backend)
    # The first child, so it stops last, once no pool writes a temp file:
    # removes this instance's temp directory and unlocks it.
    _Hook(store.release_thd).setServiceParent(root)
    db_pool.setServiceParent(root)
    io_pool.setServiceParent(root)
    store_pool = io_pool
    if store.pool_name == "s3":
        store_pool = ThreadPoolService("s3", max_threads=S3_THREADS)
        store_pool.setServiceParent(root)

    engine, revisions = open_database(backend, isolated_migration=True)
    assert revisions is not None
    before, after = revisions
    if before != after:
        log.info(
            "database schema migrated from {before} to {after}",
            before=before or "empty",
            after=after,
        )
    events = Events(uuid.uuid4().hex[:12])
    db = Database(engine, Runner(reactor, db_pool.pool), origin=events.origin)
    if engine.dialect.name == "postgresql":
        # Other instances sharing the database announce what they stored.
        from ncps.db.pglisten import PostgresListener

        PostgresListener(reactor, backend.database_url, events).setServiceParent(root)
    _Hook(lambda: engine.dispose()).setServiceParent(root)

    key = load_signing_key_thd(db, config)
    trusted = TrustedKeys(config.upstream_public_keys)
    for shadowed in trusted.shadowed():
        log.warn(
            "--cache-upstream-public-key {key} can never match: a later key has "
            "the same name",
            key=shadowed.to_text(),
        )
    for pk in config.upstream_public_keys:
        if pk.name == key.name:
            log.warn(
                "--cache-upstream-public-key {key} has this cache's own key name; "
                "upstream signatures under that name are replaced by ours",
                key=pk.to_text(),
            )

    upstreams = UpstreamPool(
        reactor,
        config.upstream_urls,
        dialer_timeout=config.dialer_timeout,
        header_timeout=config.response_header_timeout,
        netrc_file=config.netrc_file,
    )
    health = TimerService(HEALTH_INTERVAL, upstreams.check_all)
    health.clock = reactor
    health.setServiceParent(root)
    _Hook(lambda: ensureDeferred(upstreams.close())).setServiceParent(root)

    cache = Cache(
        clock=reactor,
        db=db,
        store=store,
        upstreams=upstreams,
        trusted=trusted,
        signer=key if config.sign_narinfo else None,
        io=Runner(reactor, io_pool.pool),
        store_io=Runner(reactor, store_pool.pool),
        max_downloads=config.max_downloads,
        negative_ttl=config.negative_ttl,
        transparent_zstd=config.transparent_zstd,
    )
    events.subscribe(cache.on_event)
    server = CacheServer(
        reactor,
        cache,
        config.hostname,
        key.public_key() if config.sign_narinfo else None,
    )
    limits = WireLimits(
        read_header_timeout=config.read_header_timeout,
        idle_timeout=config.idle_timeout,
    )
    gate = ConnectionGate(reactor, connections)
    site = QuietSite(server.resource(), limits=limits, gate=gate, reactor=reactor)
    listener = ListenerService(
        site, gate, config.listen_host, config.listen_port, reactor
    )
    listener.setServiceParent(root)
    log.info(
        "ncps {hostname} will listen on {addr} ({kind} storage, {db} database, "
        "at most {connections} client connections and {downloads} upstream "
        "downloads at once)",
        hostname=config.hostname,
        addr=f"{config.listen_host}:{config.listen_port}",
        kind=store.kind,
        db=engine.dialect.name,
        connections=connections,
        downloads=config.max_downloads,
    )
    return root
