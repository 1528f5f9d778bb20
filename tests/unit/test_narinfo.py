"""Tests for ncps.narinfo, including narinfos written by real Nix 2.8."""

from __future__ import annotations

import base64
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncps import nix32
from ncps.narinfo import (
    COMPRESSIONS,
    MAX_NARINFO_BYTES,
    STORE_DIR,
    NarInfo,
    NarInfoError,
    check_consistency,
    is_store_path,
    is_store_path_basename,
    parse,
    signature_key_name,
)
from ncps.nixhash import HASH_SIZES, NixHash, parse_hash


def _lines(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


# Written by Nix 2.8.0 (Debian nix-bin) in an isolated store:
#   nix-store --generate-binary-cache-key test-1 sk pk
#   nix-store --store /tmp/purevec/s --add somefile
#   nix copy --store /tmp/purevec/s \
#       --to "file:///tmp/purevec/cache?compression=none&secret-key=sk" <path>
# `somefile` holds "hello from ncps pure vectors\n"; the path is
# content-addressed, so Nix writes a CA line.
NIX_CA_NARINFO = _lines(
    "StorePath: /nix/store/g2x3sglj55i4fvk44hj2q6jgqdrx5lvz-somefile",
    "URL: nar/0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2.nar",
    "Compression: none",
    "FileHash: sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2",
    "FileSize: 144",
    "NarHash: sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2",
    "NarSize: 144",
    "References: ",
    "Sig: test-1:QFUgqbpHpKca2xgrHLiQWhvICw54/kX20mSoal4eNB+zSdbuoabZ1c1fDhkRAOcLAJBEi"
    "jnEwr1cbAEM3JpFAA==",
    "CA: fixed:r:sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2",
)

# Input-addressed paths built with nix-build (two trivial /bin/sh derivations,
# app depends on dep and on itself), copied with compression=xz and signed by
# test-1, then `nix store sign --key-file sk2` added other-1's signature.
# Nix keeps signatures in a sorted set, so other-1 comes first.
NIX_APP_NARINFO = _lines(
    "StorePath: /nix/store/10hpn9hzfyl5xnjmlla4cmxd90lif4dl-ncps-app-2.0",
    "URL: nar/1w6nq73m4id934j8wm0ggkvzs9725ddg8xby435wii7rmz8xyqj1.nar.xz",
    "Compression: xz",
    "FileHash: sha256:1w6nq73m4id934j8wm0ggkvzs9725ddg8xby435wii7rmz8xyqj1",
    "FileSize: 216",
    "NarHash: sha256:1ppcxah10cy6yr75k4cwhfxgn2lr6h0ryldn4yakky5sxzpxbrmb",
    "NarSize: 232",
    "References: 10hpn9hzfyl5xnjmlla4cmxd90lif4dl-ncps-app-2.0 "
    "9brrxf84fxv930qckpg8ih27sl169460-ncps-dep-1.0",
    "Deriver: 71ysa3hx4i2qgd6zsc436bnqgvcx5i1n-ncps-app-2.0.drv",
    "Sig: other-1:rM5iyr96luICwXgtr1lnavbmPqpvBEgrhdZsnXfwX/ZCcAKi3XC6J9UMG+2e0/z15+iv8"
    "Bg/ESRgH4Wr43oeCQ==",
    "Sig: test-1:raur+51QHoeqMcCi5JzvoUP5+yWRB8+N1hMUrOqskSvUF9WemYUwy3InJYYF2U0KShIP8"
    "jcfVwDuZeCZO6lsAg==",
)

NIX_DEP_NARINFO = _lines(
    "StorePath: /nix/store/9brrxf84fxv930qckpg8ih27sl169460-ncps-dep-1.0",
    "URL: nar/1xsjkazpfgyyy38br89kz2plvdb4dkqcjl5mh0n2py3ndf0sc48j.nar.xz",
    "Compression: xz",
    "FileHash: sha256:1xsjkazpfgyyy38br89kz2plvdb4dkqcjl5mh0n2py3ndf0sc48j",
    "FileSize: 128",
    "NarHash: sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv",
    "NarSize: 120",
    "References: ",
    "Deriver: 1mni42nglbarpc6j1zlkpapcg9qnzjpr-ncps-dep-1.0.drv",
    "Sig: test-1:SaoeKs9E0uPJN0McVVOvLak0v51V6yROcWjMUnIVxTxA4u1NwTLX7bW0eV2oQTjI3TPNW"
    "Bm1q1J+jP5UfSn/DQ==",
)

APP_FINGERPRINT = (
    b"1;/nix/store/10hpn9hzfyl5xnjmlla4cmxd90lif4dl-ncps-app-2.0;"
    b"sha256:1ppcxah10cy6yr75k4cwhfxgn2lr6h0ryldn4yakky5sxzpxbrmb;232;"
    b"/nix/store/10hpn9hzfyl5xnjmlla4cmxd90lif4dl-ncps-app-2.0,"
    b"/nix/store/9brrxf84fxv930qckpg8ih27sl169460-ncps-dep-1.0"
)

H = "g2x3sglj55i4fvk44hj2q6jgqdrx5lvz"
NAR_HASH = parse_hash("sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2")


# --- real Nix narinfos -------------------------------------------------------


def test_parse_nix_ca_narinfo() -> None:
    ni = parse(NIX_CA_NARINFO)
    assert ni == NarInfo(
        store_path=f"/nix/store/{H}-somefile",
        url="nar/0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2.nar",
        compression="none",
        nar_hash=NAR_HASH,
        nar_size=144,
        file_hash=NAR_HASH,
        file_size=144,
        references=(),
        deriver=None,
        system=None,
        signatures=(
            "test-1:QFUgqbpHpKca2xgrHLiQWhvICw54/kX20mSoal4eNB+zSdbuoabZ1c1fDhkRAOcLAJ"
            "BEijnEwr1cbAEM3JpFAA==",
        ),
        ca="fixed:r:sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2",
    )
    assert ni.hash_part == H


def test_parse_nix_input_addressed_narinfo() -> None:
    ni = parse(NIX_APP_NARINFO)
    assert ni.store_path == "/nix/store/10hpn9hzfyl5xnjmlla4cmxd90lif4dl-ncps-app-2.0"
    assert ni.hash_part == "10hpn9hzfyl5xnjmlla4cmxd90lif4dl"
    assert ni.compression == "xz"
    assert ni.file_size == 216
    assert ni.nar_size == 232
    assert ni.file_hash is not None
    assert ni.file_hash != ni.nar_hash
    assert ni.references == (
        "10hpn9hzfyl5xnjmlla4cmxd90lif4dl-ncps-app-2.0",
        "9brrxf84fxv930qckpg8ih27sl169460-ncps-dep-1.0",
    )
    assert ni.deriver == "71ysa3hx4i2qgd6zsc436bnqgvcx5i1n-ncps-app-2.0.drv"
    assert [signature_key_name(s) for s in ni.signatures] == ["other-1", "test-1"]
    assert ni.ca is None


@pytest.mark.parametrize(
    "text", [NIX_CA_NARINFO, NIX_APP_NARINFO, NIX_DEP_NARINFO], ids=["ca", "app", "dep"]
)
def test_to_text_is_byte_identical_to_nix(text: str) -> None:
    assert parse(text).to_text() == text
    assert parse(text.encode("utf-8")).to_text() == text


def test_fingerprint_of_nix_narinfo() -> None:
    # test_signing checks that Nix's own signatures verify over these bytes.
    assert parse(NIX_APP_NARINFO).fingerprint() == APP_FINGERPRINT
    assert parse(NIX_CA_NARINFO).fingerprint() == (
        b"1;/nix/store/g2x3sglj55i4fvk44hj2q6jgqdrx5lvz-somefile;"
        b"sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2;144;"
    )


# --- fingerprints --------------------------------------------------------------

# protocol-and-peers.md section 1.5, signed by cache.nixos.org-1.
CURL_FINGERPRINT = (
    b"1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;"
    b"sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;"
    b"/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,"
    b"/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,"
    b"/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,"
    b"/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
)


def test_fingerprint_sorts_references_and_renders_nix32() -> None:
    nar_hash = parse_hash("sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0")
    ni = NarInfo(
        store_path="/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin",
        url="nar/x.nar.xz",
        compression="xz",
        # Given in hex: the fingerprint must still say sha256:<nix32>.
        nar_hash=parse_hash(nar_hash.to_hex()),
        nar_size=196040,
        references=(
            "yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n",
            "j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12",
            "0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0",
            "6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115",
        ),
    )
    assert ni.fingerprint() == CURL_FINGERPRINT


def test_fingerprint_without_references_ends_with_semicolon() -> None:
    ni = NarInfo(f"/nix/store/{H}-x", "nar/a.nar", "none", NAR_HASH, 7)
    fingerprint = ni.fingerprint()
    assert fingerprint.endswith(b";7;")
    assert fingerprint.count(b";") == 4


def test_fingerprint_ignores_everything_but_path_hash_size_refs() -> None:
    ni = parse(NIX_APP_NARINFO)
    changed = attrs.evolve(
        ni,
        url="elsewhere",
        compression="zstd",
        file_hash=None,
        file_size=None,
        deriver=None,
        signatures=(),
        ca="text:sha256:" + "0" * 52,
    )
    assert changed.fingerprint() == ni.fingerprint()
    assert attrs.evolve(ni, nar_size=233).fingerprint() != ni.fingerprint()


# --- printing ----------------------------------------------------------------


def test_to_text_order_and_optional_fields() -> None:
    ni = NarInfo(
        store_path=f"/nix/store/{H}-x",
        url="nar/a.nar.zst",
        compression="zstd",
        nar_hash=NAR_HASH,
        nar_size=10,
        file_hash=NixHash("sha256", b"\x01" * 32),
        file_size=5,
        references=(f"{H}-x",),
        deriver=f"{H}-x.drv",
        system="x86_64-linux",
        signatures=("a:AAAA", "b:BBBB"),
        ca="fixed:sha256:abc",
    )
    keys = [line.partition(": ")[0] for line in ni.to_text().splitlines()]
    assert keys == [
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "System",
        "Sig",
        "Sig",
        "CA",
    ]


def test_to_text_minimal() -> None:
    ni = NarInfo(
        f"/nix/store/{H}-x", "nar/a.nar", "none", parse_hash(NAR_HASH.to_hex()), 7
    )
    assert ni.to_text() == (
        f"StorePath: /nix/store/{H}-x\n"
        "URL: nar/a.nar\n"
        "Compression: none\n"
        "NarHash: sha256:0gvm6ijq2fdwyqk6zxb48ib9yy1fskihlz5z4z7y614da6gh5zr2\n"
        "NarSize: 7\n"
        "References: \n"
    )


def test_to_text_refuses_line_breaks() -> None:
    ni = NarInfo(f"/nix/store/{H}-x", "nar/a.nar\nSig: evil:AAAA", "none", NAR_HASH, 7)
    with pytest.raises(NarInfoError, match="URL"):
        ni.to_text()


# --- tolerated variants -----------------------------------------------------------


def _replace(text: str, key: str, new_line: str | None) -> str:
    """Replace (or drop, if ``new_line`` is None) the line starting with key."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(key + ":"):
            if new_line is not None:
                out.append(new_line + "\n")
        else:
            out.append(line)
    return "".join(out)


BASE = NIX_DEP_NARINFO
BASE_NI = parse(BASE)
HEX_NAR_HASH = "sha256:" + BASE_NI.nar_hash.digest.hex()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(BASE.replace("\n", "\r\n"), BASE_NI, id="crlf"),
        # Nix 2.8 itself calls a narinfo without the final newline corrupt.
        pytest.param(BASE.rstrip("\n"), BASE_NI, id="no-final-newline"),
        pytest.param(
            _replace(BASE, "Compression", None),
            attrs.evolve(BASE_NI, compression="bzip2"),
            id="no-compression",
        ),
        pytest.param(
            _replace(BASE, "Compression", "Compression: "),
            attrs.evolve(BASE_NI, compression="bzip2"),
            id="empty-compression",
        ),
        pytest.param(BASE + "Foo: bar\nFoo: baz\n", BASE_NI, id="unknown-keys"),
        pytest.param(BASE.replace("\n", "\n\n"), BASE_NI, id="blank-lines"),
        pytest.param(
            _replace(BASE, "FileSize", "FileSize: 0"),
            attrs.evolve(BASE_NI, file_size=None),
            id="filesize-zero",
        ),
        pytest.param(
            _replace(BASE, "FileSize", None).replace("FileHash: ", "X-FileHash: "),
            attrs.evolve(BASE_NI, file_size=None, file_hash=None),
            id="no-file-fields",
        ),
        pytest.param(
            _replace(BASE, "Deriver", "Deriver: unknown-deriver"),
            attrs.evolve(BASE_NI, deriver=None),
            id="unknown-deriver",
        ),
        pytest.param(
            _replace(BASE, "NarHash", "NarHash: " + HEX_NAR_HASH),
            BASE_NI,
            id="hex-narhash",
        ),
        pytest.param(
            _replace(BASE, "NarHash", "NarHash: " + BASE_NI.nar_hash.to_sri()),
            BASE_NI,
            id="sri-narhash",
        ),
        pytest.param(
            _replace(BASE, "FileHash", "FileHash: sha1:" + "0" * 40),
            attrs.evolve(BASE_NI, file_hash=NixHash("sha1", bytes(20))),
            id="sha1-filehash",
        ),
        pytest.param(
            _replace(BASE, "References", "References:  " + f"{H}-a  {H}-b "),
            attrs.evolve(BASE_NI, references=(f"{H}-a", f"{H}-b")),
            id="extra-spaces-in-references",
        ),
        pytest.param(
            _replace(BASE, "References", None),
            BASE_NI,
            id="no-references-line",
        ),
        pytest.param(BASE + "CA: \n", BASE_NI, id="empty-ca"),
        pytest.param(
            BASE + "System: x86_64-linux\n",
            attrs.evolve(BASE_NI, system="x86_64-linux"),
            id="system",
        ),
        pytest.param(BASE + "System: \n", BASE_NI, id="empty-system"),
        pytest.param(
            BASE + "Sig: ncps.example.com:AAAA\n",
            attrs.evolve(
                BASE_NI, signatures=(*BASE_NI.signatures, "ncps.example.com:AAAA")
            ),
            id="second-sig",
        ),
        pytest.param(
            _replace(BASE, "Sig", None),
            attrs.evolve(BASE_NI, signatures=()),
            id="unsigned",
        ),
    ],
)
def test_parse_tolerates(text: str, expected: NarInfo) -> None:
    assert parse(text) == expected


# --- rejected input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_replace(BASE, "StorePath", None), "StorePath: missing"),
        (_replace(BASE, "URL", None), "URL: missing"),
        (_replace(BASE, "NarHash", None), "NarHash: missing"),
        (_replace(BASE, "NarSize", None), "NarSize: missing"),
        ("", "StorePath: missing"),
        (_replace(BASE, "StorePath", f"StorePath: /gnu/store/{H}-x"), "StorePath"),
        (_replace(BASE, "StorePath", f"StorePath: {H}-x"), "StorePath"),
        (_replace(BASE, "StorePath", f"StorePath: /nix/store/{H}-.x"), "StorePath"),
        (_replace(BASE, "StorePath", f"StorePath: /nix/store/{H}-"), "StorePath"),
        (_replace(BASE, "StorePath", f"StorePath: /nix/store/{H}-a b"), "StorePath"),
        (_replace(BASE, "StorePath", f"StorePath: /nix/store/{H}-a/b"), "StorePath"),
        (
            _replace(BASE, "StorePath", "StorePath: /nix/store/" + "e" * 32 + "-x"),
            "StorePath",
        ),
        (
            _replace(BASE, "StorePath", f"StorePath: /nix/store/{H}-" + "a" * 212),
            "StorePath",
        ),
        (_replace(BASE, "URL", "URL: "), "URL"),
        (_replace(BASE, "URL", "URL: nar/a b.nar"), "URL"),
        (_replace(BASE, "Compression", "Compression: foo"), "Compression"),
        (_replace(BASE, "Compression", "Compression: XZ"), "Compression"),
        (_replace(BASE, "NarHash", "NarHash: sha256:xyz"), "NarHash"),
        (_replace(BASE, "NarHash", "NarHash: " + HEX_NAR_HASH[7:]), "NarHash"),
        # Nix 2.8 accepts a sha512 NarHash; ncps (and every cache) only uses sha256.
        (
            _replace(BASE, "NarHash", "NarHash: sha512:" + "0" * 128),
            "NarHash: must be sha256",
        ),
        (_replace(BASE, "NarSize", "NarSize: 0"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize: -1"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize: +5"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize: 1_000"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize: 12a"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize: \u0661\u0662"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize:  120"), "NarSize"),
        (_replace(BASE, "NarSize", "NarSize: " + str(2**63)), "NarSize"),
        # Nix 2.8 reads this line as NarSize 20 (it skips two characters
        # after the colon); it is rejected here.
        (_replace(BASE, "NarSize", "NarSize:120"), "line 7"),
        (_replace(BASE, "FileSize", "FileSize: -1"), "FileSize"),
        (_replace(BASE, "FileSize", "FileSize: big"), "FileSize"),
        (_replace(BASE, "FileHash", "FileHash: sha256:"), "FileHash"),
        (_replace(BASE, "References", "References: notapath"), "References"),
        (_replace(BASE, "References", f"References: /nix/store/{H}-a"), "References"),
        (_replace(BASE, "Deriver", f"Deriver: {H}-x"), "Deriver"),
        (_replace(BASE, "Deriver", f"Deriver: /nix/store/{H}-x.drv"), "Deriver"),
        (_replace(BASE, "Deriver", "Deriver: "), "Deriver"),
        (BASE + "NarSize: 5\n", "NarSize: appears more than once"),
        (BASE + f"StorePath: /nix/store/{H}-x\n", "StorePath: appears more than once"),
        (BASE + "References: \n", "References: appears more than once"),
        (BASE + "CA: a\nCA: b\n", "CA: appears more than once"),
        (BASE + "System: a\nSystem: b\n", "System: appears more than once"),
        (BASE + "GarbageLine\n", "line 11"),
        (BASE + ": value\n", "line 11"),
        (BASE + "Sig: garbage\n", "Sig"),
        (BASE + "Sig: name:\n", "Sig"),
        (BASE + "Sig: :AAAA\n", "Sig"),
        (BASE + "Sig: name:AA!A\n", "Sig"),
        (BASE + "Sig: a b:AAAA\n", "Sig"),
        (BASE + "System: x86 64\n", "System"),
        (BASE + "CA: a\tb\n", "CA: value contains a control character"),
        (BASE.replace("\n", "\r\r\n"), "control character"),
        (BASE + "Foo: a\x00b\n", "control character"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(NarInfoError, match=message):
        parse(text)


def test_parse_rejects_invalid_utf8() -> None:
    with pytest.raises(NarInfoError, match="UTF-8"):
        parse(BASE.encode("utf-8") + b"Foo: \xff\xfe\n")


def test_parse_rejects_lone_surrogate() -> None:
    with pytest.raises(NarInfoError, match="Unicode"):
        parse(BASE + "Foo: \udc80\n")


def test_size_limit() -> None:
    filler = MAX_NARINFO_BYTES - len(BASE) - len("Foo: \n")
    at_limit = BASE + "Foo: " + "x" * filler + "\n"
    assert len(at_limit) == MAX_NARINFO_BYTES
    assert parse(at_limit) == BASE_NI
    assert parse(at_limit.encode("utf-8")) == BASE_NI
    over = at_limit + "\n"
    for payload in (over, over.encode("utf-8")):
        with pytest.raises(NarInfoError, match="larger than"):
            parse(payload)


def test_size_limit_counts_utf8_bytes() -> None:
    # 2-byte characters: under the limit in characters, over it in bytes.
    text = BASE + "Foo: " + "\u00e9" * (MAX_NARINFO_BYTES // 2) + "\n"
    assert len(text) < MAX_NARINFO_BYTES
    with pytest.raises(NarInfoError, match="larger than"):
        parse(text)


@given(st.text(max_size=400))
def test_parse_raises_only_narinfo_error_on_text(text: str) -> None:
    try:
        parse(text)
    except NarInfoError:
        pass


@given(st.binary(max_size=400))
def test_parse_raises_only_narinfo_error_on_bytes(data: bytes) -> None:
    try:
        parse(data)
    except NarInfoError:
        pass


@given(st.data())
def test_parse_survives_corrupted_real_narinfo(data: st.DataObject) -> None:
    text = NIX_APP_NARINFO
    position = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.text(max_size=3))
    try:
        ni = parse(text[:position] + replacement + text[position + 1 :])
    except NarInfoError:
        return
    ni.validate()


# --- validate / check_consistency -------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"store_path": "/nix/store/x"}, "StorePath"),
        ({"url": ""}, "URL"),
        ({"compression": ""}, "Compression"),
        ({"nar_hash": NixHash("sha1", bytes(20))}, "NarHash"),
        ({"nar_size": 0}, "NarSize"),
        ({"file_size": 0}, "FileSize"),
        ({"file_size": 2**63}, "FileSize"),
        ({"references": ("bad",)}, "References"),
        ({"deriver": "unknown-deriver"}, "Deriver"),
        ({"system": ""}, "System"),
        ({"signatures": ("nocolon",)}, "Sig"),
        ({"ca": ""}, "CA"),
    ],
)
def test_validate_rejects(changes: dict[str, Any], message: str) -> None:
    BASE_NI.validate()
    with pytest.raises(NarInfoError, match=message):
        attrs.evolve(BASE_NI, **changes).validate()


def test_check_consistency() -> None:
    ca = parse(NIX_CA_NARINFO)
    check_consistency(ca)
    check_consistency(attrs.evolve(ca, file_size=None, file_hash=None))
    with pytest.raises(NarInfoError, match="FileSize"):
        check_consistency(attrs.evolve(ca, file_size=145))
    with pytest.raises(NarInfoError, match="FileHash"):
        check_consistency(attrs.evolve(ca, file_hash=NixHash("sha256", bytes(32))))
    # Compressed NARs legitimately differ.
    check_consistency(parse(NIX_APP_NARINFO))


# --- store path helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{H}-somefile", True),
        (f"{H}-a", True),
        (f"{H}-a.b", True),
        (f"{H}-a?=+_-.b", True),
        (f"{H}-glibc-2.34-115", True),
        (f"{H}-" + "a" * 211, True),
        (f"{H}-" + "a" * 212, False),
        (f"{H}-", False),
        (f"{H}-.hidden", False),
        (f"{H}-..", False),
        (f"{H}_x", False),
        (f"{H}-a b", False),
        (f"{H}-a/b", False),
        (f"{H}-\u00e4", False),
        (f"{H}-a\n", False),
        (f"{H[:-1]}-a", False),
        (f"{H[:-1]}e-a", False),
        (f"{H.upper()}-a", False),
        ("", False),
    ],
)
def test_is_store_path_basename(value: str, expected: bool) -> None:
    assert is_store_path_basename(value) is expected
    assert is_store_path(f"{STORE_DIR}/{value}") is expected


@pytest.mark.parametrize(
    "value",
    [
        f"{H}-a",
        f"/nix/store//{H}-a",
        f"/nix/store/{H}-a/",
        f"nix/store/{H}-a",
        f"/nix/{H}-a",
    ],
)
def test_is_store_path_needs_the_store_dir(value: str) -> None:
    assert is_store_path(value) is False


def test_compressions() -> None:
    assert (
        frozenset(
            "none br bzip2 compress grzip gzip lrzip lz4 lzip lzma lzop xz zstd".split()
        )
        == COMPRESSIONS
    )


# --- round trip -------------------------------------------------------------------

_NAME_FIRST = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-_?="
_NAME_REST = _NAME_FIRST + "."


@st.composite
def basenames(draw: st.DrawFn, suffix: str = "") -> str:
    hash_part = draw(st.text(alphabet=nix32.ALPHABET, min_size=32, max_size=32))
    first = draw(st.sampled_from(_NAME_FIRST))
    rest_max = 210 - len(suffix)
    rest = draw(
        st.text(alphabet=_NAME_REST, max_size=draw(st.sampled_from([20, rest_max])))
    )
    return f"{hash_part}-{first}{rest}{suffix}"


def _hashes(algorithms: list[str]) -> st.SearchStrategy[NixHash]:
    return st.sampled_from(algorithms).flatmap(
        lambda algo: st.binary(
            min_size=HASH_SIZES[algo], max_size=HASH_SIZES[algo]
        ).map(lambda digest: NixHash(algo, digest))
    )


_SIZES = st.integers(min_value=1, max_value=2**63 - 1)
_WORD = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Z"]),
    min_size=1,
    max_size=30,
)
_SIGNATURES = st.builds(
    lambda name, sig: f"{name}:{sig}",
    st.from_regex(r"[A-Za-z0-9.\-]{1,20}", fullmatch=True),
    st.binary(min_size=1, max_size=64).map(
        lambda raw: base64.b64encode(raw).decode("ascii")
    ),
)
_CA = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]),
    min_size=1,
    max_size=80,
)

narinfos = st.builds(
    NarInfo,
    store_path=basenames().map(lambda b: f"{STORE_DIR}/{b}"),
    url=_WORD,
    compression=st.sampled_from(sorted(COMPRESSIONS)),
    nar_hash=_hashes(["sha256"]),
    nar_size=_SIZES,
    file_hash=st.none() | _hashes(sorted(HASH_SIZES)),
    file_size=st.none() | _SIZES,
    references=st.lists(basenames(), max_size=5).map(tuple),
    deriver=st.none() | basenames(suffix=".drv"),
    system=st.none() | _WORD,
    signatures=st.lists(_SIGNATURES, max_size=4).map(tuple),
    ca=st.none() | _CA,
)


@given(narinfos)
def test_round_trip(ni: NarInfo) -> None:
    ni.validate()
    text = ni.to_text()
    assert text.endswith("\n")
    assert parse(text) == ni
    assert parse(text.encode("utf-8")) == ni
    assert parse(text.replace("\n", "\r\n")) == ni
    assert parse(text).to_text() == text


@given(narinfos)
def test_hash_part_is_a_hash_part(ni: NarInfo) -> None:
    assert nix32.is_hash_part(ni.hash_part)
    assert ni.store_path.startswith(f"{STORE_DIR}/{ni.hash_part}-")
