"""The pool's own HTTP client (``ncps.upstream.DirectClient``): the request
treq would send, without treq's per-request setup."""

from __future__ import annotations

import pytest
from hyperlink import EncodedURL
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import HostnameEndpoint
from twisted.web.client import URI

from ncps.upstream import _CachedEndpoints, uri_bytes


def treq_uri(url: str) -> bytes:
    """What ``treq.HTTPClient.request`` sends for ``url``."""
    text: str = EncodedURL.from_text(url).to_uri().to_text()
    return text.encode("ascii")


@pytest.mark.parametrize(
    "url",
    [
        "http://cache.test/abc.narinfo",
        "http://cache.test:8080/nar/0a1b.nar.xz",
        "https://bucket.s3.test/nar/x.nar.zst?X-Amz-Signature=ab%2Fcd&X-Amz-Date=1",
        "http://Cache.TEST/upper",  # hyperlink lowers the host
        "http://cache.test/x?",  # and drops an empty query
        "http://cache.test/with space",
        "http://cache.test/x#fragment",
        "http://cache.test/caf\u00e9",
        "http://b\u00fccher.test/x",
        "http://cache.test/%7e%zz?a=%2f&b",
    ],
)
def test_uri_is_what_treq_sends(url: str) -> None:
    assert uri_bytes(url) == treq_uri(url)


path_text = st.text(
    alphabet=st.sampled_from("abcXYZ019-._~!$&'()*+,;=:@%/? #\u00e9"), max_size=30
)


@given(
    host=st.sampled_from(["cache.test", "Cache.test", "a-b.c", "127.0.0.1"]),
    port=st.sampled_from(["", ":80", ":443", ":8443", ":0800", ":8080"]),
    rest=path_text,
)
def test_uri_matches_treq_for_any_path(host: str, port: str, rest: str) -> None:
    url = f"http://{host}{port}/{rest}"
    assert uri_bytes(url) == treq_uri(url)


def test_endpoints_are_made_once_per_host_and_port() -> None:
    from twisted.internet import reactor

    endpoints = _CachedEndpoints(reactor, 7.0)
    a = endpoints.endpointForURI(URI.fromBytes(b"http://cache.test/a.narinfo"))
    b = endpoints.endpointForURI(URI.fromBytes(b"http://cache.test/nar/b.nar"))
    other_port = endpoints.endpointForURI(URI.fromBytes(b"http://cache.test:81/a"))
    tls = endpoints.endpointForURI(URI.fromBytes(b"https://cache.test/a"))
    assert a is b
    assert other_port is not a
    assert tls is not a and not isinstance(tls, HostnameEndpoint)
    assert isinstance(a, HostnameEndpoint)
    assert a._timeout == 7.0
    with pytest.raises(ValueError, match="scheme"):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://cache.test/a"))
