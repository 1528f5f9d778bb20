"""The upstream binary caches: health, priority, backoff, and fetching with treq.

Upstreams are tried in the order of the ``Priority`` each advertises in its
``nix-cache-info`` (lower first; configuration order breaks ties), healthy
ones before ones whose ``nix-cache-info`` could not be read.  Their
``nix-cache-info`` is read at startup and then every minute.

Failures are remembered.  An upstream that cannot be reached, does not answer
in time or answers 5xx (or 429) is *backing off*: :meth:`UpstreamPool.available`
leaves it out and :meth:`UpstreamPool.fetch_narinfo` refuses it at once with
:class:`BackingOff`, for a window of 1 s that doubles with every further
failure up to 60 s.  When the window is over, one request (not every
concurrent one) probes it again.  Any answer that proves it alive, including
the minutely health check, ends the backoff.

Redirects (301, 302, 303, 307, 308) are followed for every request, up to
:data:`MAX_REDIRECTS` hops, also to other hosts and ports (presigned S3 URLs,
http to https).  Credentials, from the URL (``https://user:pass@host/``, as
Nix accepts them) or from netrc, are sent only to the upstream's own origin
(scheme, host and port); a hop elsewhere goes without them.  The URLs this
module hands out (``Upstream.url`` and what is derived from it) never carry
credentials, and no message it logs or raises quotes one.

Connect timeouts come from ``--cache-upstream-dialer-timeout``; each hop whose
response headers take longer than ``--cache-upstream-response-header-timeout``
is cancelled (the timeout is per hop, as in Go's ``ResponseHeaderTimeout``).
Bodies are read with a size cap (narinfo) or streamed into a download (NAR),
never buffered whole.  A response that will not be read is released: a small
body is drained so the connection goes back to the pool, anything else closes
the connection.
"""

from __future__ import annotations

import netrc
import re
from collections.abc import Sequence
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    ContentDecoderAgent,
    CookieAgent,
    GzipDecoder,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from ncps import responses
from ncps.backoff import Backoff
from ncps.errors import NotFound, UpstreamError
from ncps.logs import ncps_observer
from ncps.responses import Unreachable as Unreachable
from ncps.responses import describe, is_cancellation, read_capped
from ncps.urls import (
    basic_auth,
    describe_target,
    redact,
    redirect_target,
    same_origin,
    split_credentials,
    strip_userinfo,
)
from ncps.urls import resolve_nar_url as resolve_nar_url

log = Logger(observer=ncps_observer)

DEFAULT_PRIORITY = 40
NARINFO_MAX_BYTES = 1 << 20
HEALTH_INTERVAL = 60.0
USER_AGENT = b"ncps (Nix binary-cache proxy)"
# Statuses a binary cache uses to say "not here" (Nix treats 403 like 404).
ABSENT_STATUSES = frozenset({403, 404, 410})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_PERSISTENT_PER_HOST = 16
# Endpoints kept per (scheme, host, port); redirects to presigned URLs on
# ever new hosts only refill it.
MAX_CACHED_ENDPOINTS = 64
# URLs that are already what treq would send (hyperlink's IRI-to-URI
# conversion leaves them as they are): lower-case host names, no default
# port spelled out, no fragment, no empty query, only characters a URI
# allows.  Anything else takes the conversion.
_PLAIN_URL = re.compile(
    r"https?://[a-z0-9.-]+(?::(?!(?:80|443)(?![0-9]))[1-9][0-9]*)?"
    r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?"
    r"(?:\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]+)?"
)


class BackingOff(UpstreamError):
    """Not asked: the upstream failed recently and its backoff window is open."""


@attrs.define
class Upstream:
    """One configured upstream cache and what we learned about it.

    ``url`` never carries credentials; ``auth`` (left out of the repr) is the
    ``Authorization`` value for the upstream's own origin.
    """

    url: str  # base URL, always ending in "/"
    index: int
    priority: int = DEFAULT_PRIORITY
    healthy: bool | None = None  # None: not checked yet
    auth: bytes | None = attrs.field(default=None, repr=False)
    backoff: Backoff = attrs.Factory(Backoff)

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


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietConnectionPool(HTTPConnectionPool):
    """A connection pool that does not log every connection it opens."""

    _factory = _QuietFactory


class HTTPRequester(Protocol):
    """What :class:`UpstreamPool` needs of an HTTP client: treq's
    ``HTTPClient.request`` with these arguments (``StubTreq`` in tests)."""

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        unbuffered: bool,
        allow_redirects: bool,
    ) -> Deferred[IResponse]: ...


def uri_bytes(url: str) -> bytes:
    """``url`` as treq sends it (hyperlink's IRI-to-URI conversion), without
    the conversion's cost for the URLs that it would leave unchanged."""
    if _PLAIN_URL.fullmatch(url):
        return url.encode("ascii")
    text: str = EncodedURL.from_text(url).to_uri().to_text()
    return text.encode("ascii")


@implementer(IAgentEndpointFactory)
class _CachedEndpoints:
    """Twisted's standard endpoints (TCP for http, TCP+TLS for https), made
    once per host and port: building one (IDNA checks, a TLS policy) costs
    more than sending a request on a pooled connection.  Endpoints hold no
    per-connection state, so one serves every connection to its host."""

    def __init__(self, reactor: IReactorTCP, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._make(uri)
            if len(self._cache) >= MAX_CACHED_ENDPOINTS:
                self._cache.clear()
            self._cache[key] = endpoint
        return endpoint

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(
                f"The host of the provided URI ({uri.host!r}) contains non-ASCII "
                f"octets, it should be ASCII decodable."
            ) from None
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, timeout=self._timeout
        )
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            policy = self._tls.creatorForNetloc(uri.host, uri.port)
            tls: IStreamClientEndpoint = wrapClientTLS(policy, endpoint)
            return tls
        raise ValueError(f"unsupported scheme {uri.scheme!r}")


class DirectClient:
    """treq's ``HTTPClient.request`` for what the pool sends, minus its
    per-request setup.

    The same agent stack treq builds for every request (cookies kept in one
    jar, gzip ``Content-Encoding`` decoded, no redirects followed: the pool
    follows them itself) is built once here, over endpoints made once per
    host.  Responses are the agent's, unbuffered.
    """

    def __init__(self, agent: IAgent) -> None:
        self.cookies = CookieJar()
        self._agent = ContentDecoderAgent(
            CookieAgent(agent, self.cookies), [(b"gzip", GzipDecoder)]
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Headers,
        unbuffered: bool,
        allow_redirects: bool,
    ) -> Deferred[IResponse]:
        assert unbuffered and not allow_redirects, "the pool reads and redirects"
        d: Deferred[IResponse] = self._agent.request(
            method.encode("ascii").upper(), uri_bytes(url), headers
        )
        return d


class UpstreamPool:
    """Every configured upstream, with one HTTP client and connection pool.

    Runs on the reactor thread.  ``reactor`` provides the clock for timeouts
    and backoff windows (a ``task.Clock`` in tests, with ``http`` a fake).
    """

    def __init__(
        self,
        reactor: Any,
        urls: Sequence[str],
        *,
        dialer_timeout: float,
        header_timeout: float,
        netrc_file: Path | None = None,
        http: HTTPClient | HTTPRequester | None = None,
        max_persistent_per_host: int = MAX_PERSISTENT_PER_HOST,
    ) -> None:
        self._clock: IReactorTime = reactor
        self._header_timeout = header_timeout
        if http is None:
            pool = _QuietConnectionPool(reactor, persistent=True)
            # Idle connections kept per host; busy ones are bounded by the
            # callers (the cache's download limit).
            pool.maxPersistentPerHost = max_persistent_per_host
            pool.cachedConnectionTimeout = 30
            self._pool: HTTPConnectionPool | None = pool
            endpoints = _CachedEndpoints(reactor, dialer_timeout)
            http = DirectClient(Agent.usingEndpointFactory(reactor, endpoints, pool))
        else:
            self._pool = None
        self.http: HTTPClient | HTTPRequester = http
        credentials = _read_netrc(netrc_file)
        self.upstreams = []
        for i, given in enumerate(urls):
            url, auth = split_credentials(given)
            if not url.endswith("/"):
                url += "/"
            if auth is None:
                auth = credentials.get(_hostname(url))
            self.upstreams.append(Upstream(url=url, index=i, auth=auth))
        self._first_check: Deferred[None] | None = None

    # -- order and backoff -------------------------------------------------------

    def ordered(self) -> list[Upstream]:
        """Every upstream, in the order to try them (backing off or not)."""
        return sorted(self.upstreams, key=Upstream.sort_key)

    def available(self) -> list[Upstream]:
        """:meth:`ordered`, without the upstreams that are backing off.

        One whose window is over and that no request is probing yet is
        included: the first :meth:`fetch_narinfo` for it is the probe.
        """
        now = self._clock.seconds()
        return [u for u in self.ordered() if u.backoff.may_ask(now)]

    def backing_off(self, upstream: Upstream) -> bool:
        """Whether a narinfo request to ``upstream`` would be refused now."""
        return not upstream.backoff.may_ask(self._clock.seconds())

    def record_failure(
        self, upstream: Upstream, why: str, *, probe: bool = False
    ) -> None:
        """Note that ``upstream`` failed (unreachable, too slow, 5xx).

        For failures seen outside this pool too, e.g. a NAR body that
        stalls.  ``why`` must not hold credentials.  ``probe`` is for this
        pool's own probe requests.  See :class:`ncps.backoff.Backoff`.
        """
        window = upstream.backoff.failed(self._clock.seconds(), probe)
        if window is None:
            return
        if upstream.backoff.failures == 1:
            log.warn(
                "upstream {url} failed ({why}); skipping it for {seconds} s, "
                "longer while it keeps failing",
                url=upstream.url,
                why=why,
                seconds=window,
            )
        else:
            log.debug(
                "upstream {url} still failing ({why}); next try in {seconds} s",
                url=upstream.url,
                why=why,
                seconds=window,
            )

    def record_success(self, upstream: Upstream) -> None:
        """Note that ``upstream`` answered; ends any backoff."""
        if upstream.backoff.succeeded():
            log.info("upstream {url} is answering again", url=upstream.url)

    # -- requests ------------------------------------------------------------------

    def _headers(self, upstream: Upstream, url: str) -> Headers:
        headers = Headers({b"User-Agent": [USER_AGENT]})
        if upstream.auth is not None and same_origin(url, upstream.url):
            headers.setRawHeaders(b"Authorization", [upstream.auth])
        return headers

    async def _send(self, upstream: Upstream, url: str, method: str) -> IResponse:
        """One request, no redirects; raises :class:`Unreachable` on failure.

        An outside cancellation is passed on as ``CancelledError``.
        """
        d = self.http.request(
            method,
            url,
            headers=self._headers(upstream, url),
            unbuffered=True,
            allow_redirects=False,
        )
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._clock.callLater(self._header_timeout, expire)
        try:
            response: IResponse = await d
        except Exception as e:
            if timed_out:
                raise Unreachable("timed out") from None
            if is_cancellation(e):
                raise CancelledError() from None
            raise Unreachable(describe(e)) from None
        finally:
            if timer.active():
                timer.cancel()
        return response

    async def _follow(self, upstream: Upstream, url: str, method: str) -> IResponse:
        """The first response that is not a redirect we follow.

        Raises :class:`Unreachable` when a hop fails and :class:`UpstreamError`
        for a redirect we will not follow.  Messages name ``url`` (redacted)
        and, for a failed later hop, its target without query.
        """
        shown = redact(url)
        target = url
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                response = await self._send(upstream, target, method)
            except Unreachable as e:
                where = "" if target == url else f" at {describe_target(target)}"
                raise Unreachable(f"{method} {shown}{where}: {e}") from None
            if response.code not in REDIRECT_STATUSES:
                return response
            location = response.headers.getRawHeaders(b"location")
            self.release(response)
            if not location:
                raise UpstreamError(
                    f"{method} {shown}: HTTP {response.code} without a Location"
                )
            try:
                target = redirect_target(target, location[0].decode("latin-1"))
            except ValueError as e:
                raise UpstreamError(f"{method} {shown}: {e}") from None
            if response.code == 303 and method != "HEAD":
                method = "GET"
        raise UpstreamError(
            f"{method} {shown}: too many redirects (more than {MAX_REDIRECTS})"
        )

    async def _get(
        self, upstream: Upstream, url: str, method: str = "GET", probe: bool = False
    ) -> IResponse:
        """:meth:`_follow`, recording whether the upstream answered.

        A failure to answer (:class:`Unreachable`) and a 5xx or 429 response
        (returned) count as failures; any other outcome, including a
        redirect we refuse, proves the upstream alive.
        """
        try:
            response = await self._follow(upstream, url, method)
        except Unreachable as e:
            self.record_failure(upstream, str(e), probe=probe)
            raise
        except UpstreamError:
            self.record_success(upstream)
            raise
        except BaseException:
            if probe:
                upstream.backoff.unclaim()
            raise
        if response.code >= 500 or response.code == 429:
            self.record_failure(upstream, f"HTTP {response.code}", probe=probe)
        else:
            self.record_success(upstream)
        return response

    def release(self, response: IResponse) -> None:
        """Let go of a response whose body will not be read (see
        :func:`ncps.responses.release`): the connection is reused or closed."""
        responses.release(response, self._clock)

    def abort(self, response: IResponse) -> None:
        """Close the connection of a response whose body will not be read.

        For a body already delivered to a protocol, that protocol's
        ``transport.stopProducing()`` closes the connection instead.
        """
        responses.abort(response, self._clock)

    # -- health --------------------------------------------------------------------

    async def check(self, upstream: Upstream) -> None:
        """Read ``nix-cache-info``: learn the priority, mark healthy or not."""
        url = upstream.url + "nix-cache-info"
        try:
            response = await self._get(upstream, url)
            if response.code != 200:
                self.release(response)
                raise UpstreamError(f"GET {url}: HTTP {response.code}")
            try:
                body = await read_capped(
                    response, 64 * 1024, self._clock, self._header_timeout
                )
            except Unreachable as e:
                self.record_failure(upstream, str(e))
                raise
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

    # -- narinfos and NARs -------------------------------------------------------

    async def fetch_narinfo(self, upstream: Upstream, hash_part: str) -> bytes:
        """The narinfo text from one upstream.

        Raises :class:`NotFound` if the upstream says it does not have it,
        :class:`BackingOff` at once (no request) while it is backing off, and
        :class:`UpstreamError` (:class:`Unreachable` for a failure that put
        it in backoff) for any other failure.
        """
        probe = upstream.backoff.claim(self._clock.seconds())
        if probe is None:
            raise BackingOff(f"upstream {upstream.url} is backing off")
        url = f"{upstream.url}{hash_part}.narinfo"
        response = await self._get(upstream, url, probe=probe)
        if response.code != 200:
            raise self._refusal(response, url)
        try:
            return await read_capped(
                response, NARINFO_MAX_BYTES, self._clock, self._header_timeout * 4
            )
        except Unreachable as e:
            self.record_failure(upstream, str(e))
            raise UpstreamError(f"GET {url}: {e}") from None

    async def open_nar(self, upstream: Upstream, url: str) -> IResponse:
        """Start a NAR download; the caller delivers the body somewhere.

        Never refused for backoff (a client is waiting for this NAR), but
        its outcome is recorded.  Raises :class:`NotFound` for 403/404/410
        and :class:`UpstreamError` for anything else but 200.
        """
        response = await self._get(upstream, url)
        if response.code != 200:
            raise self._refusal(response, url)
        return response

    def _refusal(self, response: IResponse, url: str) -> NotFound | UpstreamError:
        """Release a GET's response that is not a 200; the error to raise for it:
        :class:`NotFound` for 403/404/410, :class:`Unreachable` for a 5xx (the
        pool counted it as a failure), else :class:`UpstreamError`."""
        self.release(response)
        if response.code in ABSENT_STATUSES:
            return NotFound(redact(url))
        error = Unreachable if response.code >= 500 else UpstreamError
        return error(f"GET {redact(url)}: HTTP {response.code}")

    def upstream_for(self, url: str) -> Upstream:
        """The configured upstream a stored absolute NAR URL belongs to.

        The one whose base URL the NAR URL starts with (the longest), else
        the one on the same origin (an absolute NAR URL elsewhere on the
        upstream's host).
        """
        url = strip_userinfo(url)
        below = [u for u in self.upstreams if url.startswith(u.url)]
        if below:
            return max(below, key=lambda u: len(u.url))
        for upstream in self.upstreams:
            if same_origin(url, upstream.url):
                return upstream
        # A URL recorded under a configuration that changed since: fetch it
        # without credentials rather than leak them to another host.
        return Upstream(url=url, index=len(self.upstreams))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()


def _hostname(url: str) -> str:
    return urlsplit(url).hostname or ""


def _read_netrc(path: Path | None) -> dict[str, bytes]:
    """Basic-auth header values per host name from a netrc file.

    A ``default`` entry is not used: it would send one password to every
    host.  Parse errors are reported by line only (the offending token could
    be a password).
    """
    if path is None:
        return {}
    try:
        parsed = netrc.netrc(str(path))
    except netrc.NetrcParseError as e:
        log.warn(
            "ignoring netrc file {path}: syntax error at line {line}",
            path=str(path),
            line=e.lineno,
        )
        return {}
    except OSError as e:
        log.warn("ignoring netrc file {path}: {why}", path=str(path), why=str(e))
        return {}
    result = {}
    for host, (login, _account, password) in parsed.hosts.items():
        if host == "default":
            continue
        result[host] = basic_auth(login, password or "")
    return result
