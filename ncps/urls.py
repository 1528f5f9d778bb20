"""Upstream URLs: origins, credentials in the URL, redirect targets, redaction.

Pure functions (no Twisted, no I/O).  An *origin* is what a credential or a
NAR URL is scoped to: the scheme, the host name and the port (the default
port when none is written), as browsers and curl compare them.
"""

from __future__ import annotations

import base64
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from ncps.errors import UpstreamError

DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def origin(url: str) -> Origin:
    """``(scheme, host, port)`` of an http(s) URL; raises ValueError otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    port = parts.port  # raises ValueError for a bad port
    return (scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme])


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs share scheme, host and port (False if either is odd)."""
    try:
        return origin(a) == origin(b)
    except ValueError:
        return False


def _visible_ascii(text: str) -> bool:
    """Whether ``text`` is printable ASCII without spaces or control characters."""
    return all(0x21 <= ord(c) <= 0x7E for c in text)


def _host_port(parts: SplitResult) -> str:
    """The netloc without any ``user:password@``."""
    return parts.netloc.rpartition("@")[2]


def strip_userinfo(url: str) -> str:
    """``url`` without the ``user:password@`` part, otherwise unchanged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=_host_port(parts)).geturl()


def split_credentials(url: str) -> tuple[str, bytes | None]:
    """The URL without credentials, and the ``Authorization`` value they make.

    ``https://user:pa%40ss@host/`` gives ``("https://host/", b"Basic ...")``
    with the percent-decoded ``user:pa@ss`` encoded as UTF-8, as Nix (curl)
    sends it.  A URL without userinfo gives ``(url, None)``.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    header = basic_auth(unquote(user), unquote(password))
    return parts._replace(netloc=_host_port(parts)).geturl(), header


def basic_auth(user: str, password: str) -> bytes:
    """The ``Authorization`` value for HTTP Basic auth (``user:password`` as UTF-8)."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def redact(url: str) -> str:
    """``url`` fit for a log line or an error: any userinfo becomes ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + _host_port(parts)).geturl()


def describe_target(url: str) -> str:
    """A redirect target for messages: no userinfo and no query.

    Presigned URLs carry their signature in the query; it is a credential too.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{_host_port(parts)}{parts.path}"


def redirect_target(current: str, location: str) -> str:
    """The absolute URL a ``Location`` header sends ``current`` to.

    Relative locations are resolved against ``current``.  Only http and https
    targets with a host are followed; userinfo in the target is dropped (it
    would be a credential we were never given).  Raises ValueError, with a
    message that quotes no credential or query, for anything else.
    """
    if not location or not _visible_ascii(location):
        raise ValueError("redirect with an empty or non-ASCII Location")
    target = urljoin(current, location)
    parts = urlsplit(target)
    if parts.scheme.lower() not in DEFAULT_PORTS:
        raise ValueError(f"refusing redirect to a {parts.scheme or 'schemeless'} URL")
    try:
        origin(target)
    except ValueError:
        raise ValueError("refusing redirect to a URL without a valid host") from None
    return strip_userinfo(parts._replace(fragment="").geturl())


def resolve_nar_url(base: str, url: str) -> str:
    """The absolute upstream URL of a narinfo's ``URL``, refusing unsafe ones.

    A relative URL is taken below the upstream's ``base``.  An absolute one
    is accepted, as Nix accepts it, only on the base's own origin (scheme,
    host and port) and without credentials; it is returned as written.
    Anything else (another host, ``..``, a backslash, a percent-escape in the
    path, ...) could point anywhere (SSRF) and is refused with
    :class:`UpstreamError`.
    """
    refused = UpstreamError(f"refusing narinfo URL {redact(url)!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise refused from None
    if "\\" in url or "%" in parts.path or not _visible_ascii(url):
        raise refused
    relative = parts.path
    if parts.scheme or parts.netloc:
        if (
            not parts.scheme
            or "@" in parts.netloc
            or not same_origin(url, base)
            or not relative.startswith("/")
        ):
            raise refused
        relative = relative[1:]
    if not relative or any(seg in ("", ".", "..") for seg in relative.split("/")):
        raise refused
    return url if parts.scheme else base + url
