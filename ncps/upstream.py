"""The upstream binary caches: health, priority, and fetching from them with treq.

Upstreams are tried in the order of the ``Priority`` each advertises in its
``nix-cache-info`` (lower first; configuration order breaks ties), healthy
ones before ones whose ``nix-cache-info`` could not be read.  Their
``nix-cache-info`` is read at startup and then every minute.

Connect timeouts come from ``--cache-upstream-dialer-timeout``; a response
whose headers take longer than ``--cache-upstream-response-header-timeout`` is
cancelled.  Bodies are read with a size cap (narinfo) or streamed into a
download (NAR), never buffered whole.
"""

from __future__ import annotations

import base64
import netrc
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IResponse

from ncps.errors import NotFound, UpstreamError
from ncps.logs import ncps_observer

log = Logger(observer=ncps_observer)

DEFAULT_PRIORITY = 40
NARINFO_MAX_BYTES = 1 << 20
HEALTH_INTERVAL = 60.0
USER_AGENT = b"ncps (Nix binary-cache proxy)"
# Statuses a binary cache uses to say "not here" (Nix treats 403 like 404).
ABSENT_STATUSES = frozenset({403, 404, 410})


@attrs.define
class Upstream:
    """One configured upstream cache and what we learned about it."""

    url: str  # base URL, always ending in "/"
    index: int
    priority: int = DEFAULT_PRIORITY
    healthy: bool | None = None  # None: not checked yet
    auth: bytes | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def sort_key(self) -> tuple[int, int, int]:
        return (0 if self.healthy is not False else 1, self.priority, self.index)


def parse_cache_info(text: str) -> dict[str, str]:
    """Parse ``nix-cache-info`` (``Key: value`` lines; others ignored)."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def resolve_nar_url(base: str, url: str) -> str:
    """The absolute upstream URL of a narinfo's ``URL``, refusing unsafe ones.

    Only relative URLs below the upstream's base are followed: an absolute URL
    or one with ``..``, a backslash or a percent-escape could point anywhere
    (SSRF) and is refused with :class:`UpstreamError`.
    """
    parts = urlsplit(url)
    path = parts.path
    if (
        parts.scheme
        or parts.netloc
        or not path
        or path.startswith("/")
        or "\\" in url
        or "%" in path
        or any(seg in ("", ".", "..") for seg in path.split("/"))
        or any(ord(c) < 0x21 or ord(c) > 0x7E for c in url)
    ):
        raise UpstreamError(f"refusing narinfo URL {url!r}")
    return base + url


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    """A connection pool that does not log every connection it opens."""

    _factory = _QuietFactory


class UpstreamPool:
    """Every configured upstream, with one treq client and connection pool."""

    def __init__(
        self,
        reactor: Any,
        urls: Sequence[str],
        *,
        dialer_timeout: float,
        header_timeout: float,
        netrc_file: Path | None = None,
        http: HTTPClient | None = None,
    ) -> None:
        self._clock: IReactorTime = reactor
        self._header_timeout = header_timeout
        if http is None:
            pool = _QuietConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 16
            pool.cachedConnectionTimeout = 30
            self._pool: HTTPConnectionPool | None = pool
            http = HTTPClient(Agent(reactor, connectTimeout=dialer_timeout, pool=pool))
        else:
            self._pool = None
        self.http = http
        credentials = _read_netrc(netrc_file)
        self.upstreams = [
            Upstream(
                url=u if u.endswith("/") else u + "/",
                index=i,
                auth=credentials.get(urlsplit(u).hostname or ""),
            )
            for i, u in enumerate(urls)
        ]
        self._first_check: Deferred[None] | None = None

    def ordered(self) -> list[Upstream]:
        """Upstreams in the order to try them."""
        return sorted(self.upstreams, key=Upstream.sort_key)

    def _headers(self, upstream: Upstream) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {b"User-Agent": [USER_AGENT]}
        if upstream.auth is not None:
            headers[b"Authorization"] = [upstream.auth]
        return headers

    async def _get(
        self, upstream: Upstream, url: str, method: str = "GET"
    ) -> IResponse:
        d = self.http.request(
            method,
            url,
            headers=self._headers(upstream),
            unbuffered=True,
            allow_redirects=False,
        )
        d.addTimeout(self._header_timeout, self._clock)
        try:
            response: IResponse = await d
        except Exception as e:
            raise UpstreamError(f"{method} {url}: {_describe(e)}") from None
        return response

    async def check(self, upstream: Upstream) -> None:
        """Read ``nix-cache-info``: learn the priority, mark healthy or not."""
        url = upstream.url + "nix-cache-info"
        try:
            response = await self._get(upstream, url)
            if response.code != 200:
                raise UpstreamError(f"GET {url}: HTTP {response.code}")
            body = await _read_capped(
                response, 64 * 1024, self._clock, self._header_timeout
            )
            info = parse_cache_info(body.decode("utf-8", "replace"))
            store_dir = info.get("StoreDir", "/nix/store")
            if store_dir != "/nix/store":
                raise UpstreamError(f"{url}: StoreDir {store_dir} is not /nix/store")
            priority = int(info.get("Priority", DEFAULT_PRIORITY))
        except (UpstreamError, ValueError) as e:
            if upstream.healthy is not False:
                log.warn("upstream {url} is unhealthy: {why}", url=upstream.url, why=e)
            upstream.healthy = False
            return
        if upstream.healthy is not True or upstream.priority != priority:
            log.info(
                "upstream {url} is healthy (priority {priority})",
                url=upstream.url,
                priority=priority,
            )
        upstream.priority = priority
        upstream.healthy = True

    def check_all(self) -> Deferred[None]:
        """Check every upstream concurrently; never fails."""
        d = DeferredList(
            [Deferred.fromCoroutine(self.check(u)) for u in self.upstreams],
            consumeErrors=True,
        )
        return d.addCallback(lambda _: None)

    def first_check(self) -> Deferred[None]:
        """Fires once the first health check of every upstream is over."""
        if self._first_check is None:
            self._first_check = self.check_all()
        result: Deferred[None] = Deferred()

        def fan_out(outcome: object) -> object:
            result.callback(None)
            return outcome

        self._first_check.addBoth(fan_out)
        return result

    async def fetch_narinfo(self, upstream: Upstream, hash_part: str) -> bytes:
        """The narinfo text from one upstream.

        Raises :class:`NotFound` if the upstream says it does not have it and
        :class:`UpstreamError` for any other failure.
        """
        url = f"{upstream.url}{hash_part}.narinfo"
        response = await self._get(upstream, url)
        if response.code in ABSENT_STATUSES:
            await _discard(response)
            raise NotFound(url)
        if response.code != 200:
            await _discard(response)
            raise UpstreamError(f"GET {url}: HTTP {response.code}")
        return await _read_capped(
            response, NARINFO_MAX_BYTES, self._clock, self._header_timeout * 4
        )

    async def open_nar(self, upstream: Upstream, url: str) -> IResponse:
        """Start a NAR download; the caller delivers the body somewhere."""
        response = await self._get(upstream, url)
        if response.code == 200:
            return response
        await _discard(response)
        if response.code in ABSENT_STATUSES:
            raise NotFound(url)
        raise UpstreamError(f"GET {url}: HTTP {response.code}")

    def upstream_for(self, url: str) -> Upstream:
        """The configured upstream a stored absolute NAR URL belongs to."""
        for upstream in self.upstreams:
            if url.startswith(upstream.url):
                return upstream
        # A URL recorded under a configuration that changed since: fetch it
        # without credentials rather than leak them to another host.
        return Upstream(url=url, index=len(self.upstreams))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()


def _describe(e: BaseException) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError
    from twisted.web.client import ResponseFailed, ResponseNeverReceived

    if isinstance(e, CancelledError | TimeoutError):
        return "timed out"
    if isinstance(e, ResponseNeverReceived | ResponseFailed) and e.reasons:
        # Agent wraps the cancellation done by addTimeout in these.
        if any(r.check(CancelledError, TimeoutError) for r in e.reasons):
            return "timed out"
        return _describe(e.reasons[0].value)
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


async def _discard(response: IResponse) -> None:
    try:
        await treq.content(response)
    except Exception:
        pass


async def _read_capped(
    response: IResponse, limit: int, clock: IReactorTime, timeout: float
) -> bytes:
    """The whole body, failing if it exceeds ``limit`` bytes or ``timeout``."""
    if (
        response.length is not None
        and isinstance(response.length, int)
        and response.length > limit
    ):
        raise UpstreamError(f"response of {response.length} bytes is too large")
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise UpstreamError(f"response is larger than {limit} bytes")
        chunks.append(data)

    d = treq.collect(response, collect)
    d.addTimeout(timeout, clock)
    try:
        await d
    except UpstreamError:
        raise
    except Exception as e:
        raise UpstreamError(f"reading body: {_describe(e)}") from None
    return b"".join(chunks)


def _read_netrc(path: Path | None) -> dict[str, bytes]:
    """Basic-auth header values per host name from a netrc file."""
    if path is None:
        return {}
    try:
        parsed = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError) as e:
        log.warn("ignoring netrc file {path}: {why}", path=str(path), why=str(e))
        return {}
    result = {}
    for host, (login, _account, password) in parsed.hosts.items():
        token = base64.b64encode(f"{login}:{password or ''}".encode()).decode()
        result[host] = f"Basic {token}".encode()
    return result
