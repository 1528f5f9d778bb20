"""Tests for ncps.nixhash, including vectors produced by real Nix 2.8."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncps.nixhash import HASH_SIZES, NixHash, parse_hash

# From Nix 2.8.0, for the md5/sha1/sha256/sha512 of "hello" (and sha256 of ""):
#   nix hash to-base32 --type A HEX; nix hash to-base64 --type A HEX;
#   nix hash to-sri --type A HEX
# Columns: algorithm, hex, nix32, base64.
NIX_VECTORS: list[tuple[str, str, str, str]] = [
    (
        "md5",
        "5d41402abc4b2a76b9719d911017c592",
        "4jqlbi14cxf6wpcajbphm40hax",
        "XUFAKrxLKna5cZ2REBfFkg==",
    ),
    (
        "sha1",
        "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
        "9m1skbnr5i43n3yypvda5s65vhfwdx5a",
        "qvTGHdzF6KLavt4PO0gs2a6pQ00=",
    ),
    (
        "sha256",
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
        "LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=",
    ),
    (
        "sha256",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
    ),
    (
        "sha512",
        "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca7"
        "2323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043",
        "11w1pmwfdpz9pisbhp5qiv38q6dmidq2ipcqykw3p0sb6yrqcij79rwcwcjbxyzwbdal34"
        "9qbxrncbk7pmd6snljrfpiwv2pljd4wcv",
        "m3HSJL1i83hdltRq0+o9czGb+8KJDKra4t/3JRlnPKcjI8PZm6XBHXx6zG4UuMXaDEZjR1"
        "wuXDre9G9zvN7AQw==",
    ),
]

IDS = [f"{v[0]}-{v[1][:8]}" for v in NIX_VECTORS]


@pytest.mark.parametrize(("algo", "hex_digest", "b32", "b64"), NIX_VECTORS, ids=IDS)
def test_parse_every_encoding_nix_prints(
    algo: str, hex_digest: str, b32: str, b64: str
) -> None:
    expected = NixHash(algo, bytes.fromhex(hex_digest))
    assert parse_hash(f"{algo}:{hex_digest}") == expected
    # Nix 2.8 also accepts upper-case hex.
    assert parse_hash(f"{algo}:{hex_digest.upper()}") == expected
    assert parse_hash(f"{algo}:{b32}") == expected
    assert parse_hash(f"{algo}:{b64}") == expected
    assert parse_hash(f"{algo}-{b64}") == expected


@pytest.mark.parametrize(("algo", "hex_digest", "b32", "b64"), NIX_VECTORS, ids=IDS)
def test_render_like_nix(algo: str, hex_digest: str, b32: str, b64: str) -> None:
    h = NixHash(algo, bytes.fromhex(hex_digest))
    assert h.to_nix32() == f"{algo}:{b32}"
    assert str(h) == f"{algo}:{b32}"
    assert h.to_hex() == f"{algo}:{hex_digest}"
    assert h.to_base64() == f"{algo}:{b64}"
    assert h.to_sri() == f"{algo}-{b64}"
    assert h.nix32_digest() == b32


def test_hash_sizes() -> None:
    assert HASH_SIZES == {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
    for algo, size in HASH_SIZES.items():
        assert hashlib.new(algo).digest_size == size


@st.composite
def nix_hashes(draw: st.DrawFn) -> NixHash:
    algo = draw(st.sampled_from(sorted(HASH_SIZES)))
    size = HASH_SIZES[algo]
    return NixHash(algo, draw(st.binary(min_size=size, max_size=size)))


@given(nix_hashes())
def test_round_trip_all_encodings(h: NixHash) -> None:
    assert parse_hash(h.to_nix32()) == h
    assert parse_hash(h.to_hex()) == h
    assert parse_hash(h.to_base64()) == h
    assert parse_hash(h.to_sri()) == h


SHA256_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SHA256_B32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
SHA256_B64 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no algorithm prefix"),
        (SHA256_HEX, "no algorithm prefix"),
        # Nix 2.8: "unknown hash algorithm 'sha257'" / "'SHA256'".
        ("sha257:abc", "unknown hash algorithm 'sha257'"),
        (f"SHA256:{SHA256_HEX}", "unknown hash algorithm 'SHA256'"),
        (f"blake3:{SHA256_HEX}", "unknown hash algorithm"),
        # Nix 2.8: "has wrong length for hash type 'sha256'".
        (f"sha256:{SHA256_HEX[:-1]}", "wrong length"),
        (f"sha256:{SHA256_B64.rstrip('=')}", "wrong length"),
        (f"sha256:{SHA256_HEX}0", "wrong length"),
        ("sha256:", "wrong length"),
        (f"sha1:{SHA256_HEX}", "wrong length"),
        # Nix 2.8: "invalid base-16 hash".
        (f"sha256:g{SHA256_HEX[1:]}", "invalid hex"),
        (f"sha256: {SHA256_HEX[1:]}", "invalid hex"),
        # Nix 2.8: "invalid base-32 hash".
        (f"sha256:e{SHA256_B32[1:]}", "invalid nix32"),
        (f"sha256:2{SHA256_B32[1:]}", "invalid nix32"),
        ("md5:" + "z" * 26, "invalid nix32"),
        (f"sha256:!{SHA256_B64[1:]}", "invalid base64"),
        (f"sha256:{SHA256_B64[:-2]}==", "decodes to 31 bytes"),
        (f"sha256:={SHA256_B64[:-1]}", "invalid base64"),
        # Nix 2.8: "invalid SRI hash": SRI is base64 only.
        (f"sha256-{SHA256_HEX}", "SRI"),
        (f"sha1-{'143xibwh31h9bvxzalr0sjvbbvpa6ffs'}", "SRI"),
        (f"sha256-{SHA256_B64.rstrip('=')}", "SRI"),
        (f"sha256-!{SHA256_B64[1:]}", "invalid base64"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hash(text)


def test_colon_wins_over_dash() -> None:
    # Like Nix, a ':' anywhere means the prefixed form, never SRI.
    with pytest.raises(ValueError, match="unknown hash algorithm 'sha256-x'"):
        parse_hash(f"sha256-x:{SHA256_HEX}")


@pytest.mark.parametrize(
    ("algo", "digest", "message"),
    [
        ("sha256", b"\x00" * 31, "32 bytes"),
        ("sha256", b"\x00" * 33, "32 bytes"),
        ("sha1", b"\x00" * 32, "20 bytes"),
        ("sha384", b"\x00" * 48, "unknown hash algorithm"),
    ],
)
def test_constructor_validates(algo: str, digest: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NixHash(algo, digest)


def test_equality_and_hash() -> None:
    a = parse_hash(f"sha256:{SHA256_HEX}")
    b = parse_hash(f"sha256:{SHA256_B32}")
    assert a == b
    assert hash(a) == hash(b)
    assert a != NixHash("sha256", b"\x00" * 32)
