"""ncps.urls: origins, credentials in URLs, redirect targets, NAR URL safety."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncps.errors import UpstreamError
from ncps.urls import (
    describe_target,
    origin,
    redact,
    redirect_target,
    resolve_nar_url,
    same_origin,
    split_credentials,
    strip_userinfo,
)

BASE = "https://up.example/"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Up.Example/x", ("https", "up.example", 443)),
        ("http://up.example/", ("http", "up.example", 80)),
        ("http://up.example:8080/a", ("http", "up.example", 8080)),
        ("HTTPS://u:p@up.example:443/", ("https", "up.example", 443)),
        ("http://[::1]:9000/", ("http", "::1", 9000)),
    ],
)
def test_origin(url: str, expected: tuple[str, str, int]) -> None:
    assert origin(url) == expected


@pytest.mark.parametrize(
    "url", ["ftp://up.example/", "nar/x.nar", "http:///x", "http://h:99999/"]
)
def test_origin_refuses_what_is_not_an_http_url_with_a_host(url: str) -> None:
    with pytest.raises(ValueError):
        origin(url)


def test_same_origin_compares_scheme_host_and_port() -> None:
    assert same_origin("https://a.test/x", "https://A.TEST:443/y")
    assert not same_origin("https://a.test/", "http://a.test/")
    assert not same_origin("https://a.test/", "https://a.test:8443/")
    assert not same_origin("https://a.test/", "https://b.test/")
    assert not same_origin("https://a.test/", "nar/x")


def test_split_credentials_percent_decodes_and_strips() -> None:
    url, auth = split_credentials("https://al%40ce:p%3Ass%20w@cache.test:8443/sub/")
    assert url == "https://cache.test:8443/sub/"
    assert auth is not None
    assert base64.b64decode(auth.removeprefix(b"Basic ")) == b"al@ce:p:ss w"


def test_split_credentials_user_only_and_none() -> None:
    url, auth = split_credentials("https://token@cache.test/")
    assert url == "https://cache.test/"
    assert auth == b"Basic " + base64.b64encode(b"token:")
    assert split_credentials("https://cache.test/") == ("https://cache.test/", None)


def test_split_credentials_utf8() -> None:
    _, auth = split_credentials("https://%C3%A9:%C3%BC@cache.test/")
    assert auth is not None
    assert base64.b64decode(auth[6:]) == "é:ü".encode()


def test_redact_and_strip() -> None:
    assert redact("https://u:hunter2@h.test/x") == "https://***@h.test/x"
    assert redact("https://h.test/x?a=1") == "https://h.test/x?a=1"
    assert strip_userinfo("https://u:hunter2@h.test:1/x") == "https://h.test:1/x"
    assert strip_userinfo("https://h.test/x") == "https://h.test/x"


@given(
    user=st.text(min_size=1, max_size=8),
    password=st.text(max_size=12),
)
def test_redact_never_shows_a_password(user: str, password: str) -> None:
    from urllib.parse import quote

    url = f"https://{quote(user, safe='')}:{quote(password, safe='')}@h.test/p"
    assert redact(url) == "https://***@h.test/p"


def test_describe_target_drops_userinfo_and_query() -> None:
    assert (
        describe_target("https://u:p@s3.test:9000/b/k?X-Amz-Signature=secret")
        == "https://s3.test:9000/b/k"
    )


# -- redirect targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "target"),
    [
        ("/moved/x.narinfo", "https://up.example/moved/x.narinfo"),
        ("y.narinfo", "https://up.example/cache/y.narinfo"),
        ("../x", "https://up.example/x"),
        ("//other.test:9000/b?sig=1", "https://other.test:9000/b?sig=1"),
        ("http://s3.test:9000/b/k?sig=1", "http://s3.test:9000/b/k?sig=1"),
        ("https://u:p@s3.test/b", "https://s3.test/b"),
        ("https://s3.test/b#frag", "https://s3.test/b"),
    ],
)
def test_redirect_target_resolves_relative_and_drops_userinfo(
    location: str, target: str
) -> None:
    assert redirect_target("https://up.example/cache/x.narinfo", location) == target


@pytest.mark.parametrize(
    "location",
    [
        "ftp://files.test/x",
        "file:///etc/passwd",
        "gopher://x.test/",
        "http:///nohost",
        "https://h.test:99999/",
        "",
        "/with space",
        "/caf\u00e9",
    ],
)
def test_redirect_target_refuses_other_schemes_and_junk(location: str) -> None:
    with pytest.raises(ValueError) as info:
        redirect_target("https://up.example/x", location)
    assert "passwd" not in str(info.value)


# -- absolute NAR URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "url"),
    [
        (BASE, "https://up.example/nar/abc.nar.xz"),
        (BASE, "https://UP.example:443/nar/abc.nar.xz?hash=1"),
        ("https://up.example/sub/", "https://up.example/elsewhere/abc.nar"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/nar/abc.nar"),
    ],
)
def test_absolute_nar_url_on_the_upstreams_own_origin_is_accepted(
    base: str, url: str
) -> None:
    assert resolve_nar_url(base, url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://up.example/nar/abc.nar.xz",  # other scheme
        "https://up.example:8443/nar/abc.nar.xz",  # other port
        "https://evil.example/nar/abc.nar.xz",  # other host
        "https://user:pw@up.example/nar/abc.nar.xz",  # credentials
        "https://up.example",  # no path
        "https://up.example/",
        "https://up.example/nar/../../etc/passwd",
        "https://up.example/nar/%2e%2e/x",
        "https://up.example//nar/x",
        "https://up.example/nar/./x",
        "https://up.example/nar\\x",
        "//up.example/nar/abc.nar",  # scheme-relative
        "https://up.example:bad/nar/x",
    ],
)
def test_absolute_nar_url_elsewhere_or_unsafe_is_refused(url: str) -> None:
    with pytest.raises(UpstreamError, match="refusing") as info:
        resolve_nar_url(BASE, url)
    assert "pw@" not in str(info.value)
