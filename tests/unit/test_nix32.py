"""Tests for ncps.nix32, including vectors produced by real Nix 2.8."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncps import nix32

# (hex digest, nix32) pairs from Nix 2.8.0: `nix hash to-base32 --type <algo> <hex>`
# for the md5/sha1/sha256/sha512 of "", "hello" and "ncps test vector".
NIX_VECTORS: list[tuple[str, str]] = [
    ("d41d8cd98f00b204e9800998ecf8427e", "3y8bwfr609h3lh9ch0izcqq7fl"),
    ("5d41402abc4b2a76b9719d911017c592", "4jqlbi14cxf6wpcajbphm40hax"),
    ("5065aade06325d92c34ae898a5138a92", "4ji89sb6789b1r4p9j0vgalrah"),
    ("da39a3ee5e6b4b0d3255bfef95601890afd80709", "143xibwh31h9bvxzalr0sjvbbvpa6ffs"),
    ("aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d", "9m1skbnr5i43n3yypvda5s65vhfwdx5a"),
    ("a86a24734001374a00fdcac93bc177bf003f26f3", "yck3y05zfz0kpjfazl04ldq181rj8sm8"),
    (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
    ),
    (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
    ),
    (
        "ee69fe6373c5a96fcc31d11e2b1d4e8c5f5918a200d137135476a085eec8ba6a",
        "0smsr3p8b83nah9kgl80l8c5jpwc9qfjn7ni6766zaf5fdizwsgf",
    ),
    (
        "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
        "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
        "0zdl9zrg8r3i9c1g90lgg9ip5ijzv3yhz91i0zzn3r8ap9ws784gkp9dk9j3aglhgf1amq"
        "b0pj21mh7h1nxcl18akqvvf7ggqsy30yg",
    ),
    (
        "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca7"
        "2323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043",
        "11w1pmwfdpz9pisbhp5qiv38q6dmidq2ipcqykw3p0sb6yrqcij79rwcwcjbxyzwbdal34"
        "9qbxrncbk7pmd6snljrfpiwv2pljd4wcv",
    ),
    (
        "da47563fbfd876ad84ea4dc652bf679f785689eb31884bdb8e9e2d0373ea0d84"
        "95aac8d7a1ef3763f12f0adc434263d36d05c55adb2f777c818d28bc7fded6c5",
        "32xdpkzphl8v0bwfwpxnnn50mnx6qs28gf0lbziccvyz8fpr2m9b10dx9rh6bcyivdlp21"
        "ixf4mcy4zcyzm5ijdxa2asxnqpwzmciys",
    ),
]


@pytest.mark.parametrize(("hex_digest", "expected"), NIX_VECTORS)
def test_encode_matches_nix(hex_digest: str, expected: str) -> None:
    assert nix32.encode(bytes.fromhex(hex_digest)) == expected


@pytest.mark.parametrize(("hex_digest", "text"), NIX_VECTORS)
def test_decode_matches_nix(hex_digest: str, text: str) -> None:
    assert nix32.decode(text).hex() == hex_digest


def test_sha256_of_empty_string() -> None:
    digest = hashlib.sha256(b"").digest()
    assert (
        nix32.encode(digest) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    )


def test_nix_accepts_all_z_for_sha1() -> None:
    # 32 chars hold exactly 160 bits, so there are no leftover bits: Nix 2.8
    # decodes `sha1:zzzz...` (32 z) to twenty 0xff bytes.
    assert nix32.decode("z" * 32) == b"\xff" * 20


def test_single_byte_layout() -> None:
    # One byte takes two characters: the high character holds bits 5..7.
    assert nix32.encode(b"\x00") == "00"
    assert nix32.encode(b"\x1f") == "0z"
    assert nix32.encode(b"\x20") == "10"
    assert nix32.encode(b"\xff") == "7z"


def test_little_endian_order() -> None:
    # The first byte is the least significant, so it lands in the last chars.
    assert nix32.encode(b"\x01\x00") == "0001"
    assert nix32.encode(b"\x00\x01") == "0080"


def test_empty() -> None:
    assert nix32.encode(b"") == ""
    assert nix32.decode("") == b""


@pytest.mark.parametrize(
    ("nbytes", "length"),
    [(0, 0), (1, 2), (2, 4), (16, 26), (20, 32), (32, 52), (64, 103)],
)
def test_encoded_length(nbytes: int, length: int) -> None:
    assert nix32.encoded_length(nbytes) == length


def test_encoded_length_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        nix32.encoded_length(-1)


@given(st.binary(max_size=300))
def test_round_trip(data: bytes) -> None:
    text = nix32.encode(data)
    assert len(text) == nix32.encoded_length(len(data))
    assert set(text) <= set(nix32.ALPHABET)
    assert nix32.decode(text) == data


@given(st.text(alphabet=nix32.ALPHABET, max_size=120))
def test_decode_is_canonical(text: str) -> None:
    """Whatever decode accepts, encode gives back unchanged."""
    try:
        data = nix32.decode(text)
    except ValueError:
        return
    assert nix32.encode(data) == text


def test_valid_lengths_are_exactly_the_encoded_lengths() -> None:
    valid = {nix32.encoded_length(n) for n in range(200)}
    for length in range(300):
        text = "0" * length
        if length in valid:
            assert len(nix32.decode(text)) == length * 5 // 8
        else:
            with pytest.raises(ValueError, match="length"):
                nix32.decode(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Rejected by Nix 2.8 too ("invalid base-32 hash"): 'e' is not a digit.
        ("emdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", "character 'e'"),
        ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7o", "character 'o'"),
        ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7u", "character 'u'"),
        ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7t", "character 't'"),
        ("0MDQA9W1P6CMLI6976V4WI0SW9R4P5PRKJ7LZFD1877WK11C9C73", "character 'M'"),
        ("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7-", "character '-'"),
        # 52 chars carry 260 bits for 256: the first char must be 0 or 1.
        # Nix 2.8 rejects this one as "invalid base-32 hash".
        ("2mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", "leftover bits"),
        # 26 chars carry 130 bits for md5's 128; Nix 2.8 rejects all-z.
        ("z" * 26, "leftover bits"),
        ("0", "length 1"),
        ("000", "length 3"),
        ("0" * 51, "length 51"),
    ],
)
def test_decode_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nix32.decode(text)


def test_leftover_bit_boundary() -> None:
    # "1..." still fits in 256 bits (Nix 2.8 accepted this exact string).
    assert (
        nix32.decode("1mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").hex()
        == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8d5"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("g2x3sglj55i4fvk44hj2q6jgqdrx5lvz", True),
        ("0" * 32, True),
        ("z" * 32, True),
        ("g2x3sglj55i4fvk44hj2q6jgqdrx5lv", False),
        ("g2x3sglj55i4fvk44hj2q6jgqdrx5lvzz", False),
        ("e2x3sglj55i4fvk44hj2q6jgqdrx5lvz", False),
        ("G2X3SGLJ55I4FVK44HJ2Q6JGQDRX5LVZ", False),
        ("g2x3sglj55i4fvk44hj2q6jgqdrx5lvz\n", False),
        ("", False),
    ],
)
def test_is_hash_part(value: str, expected: bool) -> None:
    assert nix32.is_hash_part(value) is expected


def test_hash_part_regex_excludes_exactly_e_o_u_t() -> None:
    lowercase_and_digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    accepted = {c for c in lowercase_and_digits if nix32.HASH_PART_RE.match(c * 32)}
    assert accepted == set(nix32.ALPHABET)
    assert set(lowercase_and_digits) - accepted == {"e", "o", "u", "t"}
