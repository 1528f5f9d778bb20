"""Tests for ncps.signing against keys and signatures made by real Nix 2.8."""

from __future__ import annotations

import base64

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ncps.narinfo import NarInfo, parse, signature_key_name
from ncps.signing import (
    KeyFormatError,
    PublicKey,
    SecretKey,
    TrustedKeys,
    sign_narinfo,
    strip_signatures,
)


def _lines(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


# `nix-store --generate-binary-cache-key test-1 sk pk` (Nix 2.8.0), and a
# second pair `other-1`. The secret files have no trailing newline.
NIX_SECRET_KEY = (
    "test-1:35908uet/I698MTQIyXTqXBKjURP7gtabm3FLTbGwy1+xe7Uid0Fds58/73eWFe51eNx+"
    "2znw9LusJBQ4lYlEg=="
)
NIX_PUBLIC_KEY = "test-1:fsXu1IndBXbOfP+93lhXudXjcfts58PS7rCQUOJWJRI="
NIX_OTHER_PUBLIC_KEY = "other-1:EC6aszuAZ1IgCviQa2H/xpAUd8d8M7rU0IvvlzWjk/8="

# Signed by `nix copy --to file://...?secret-key=sk`; see test_narinfo.py for
# how these were produced. The app narinfo is also signed by other-1.
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
ALL_NIX_NARINFOS = [NIX_CA_NARINFO, NIX_APP_NARINFO, NIX_DEP_NARINFO]
NARINFO_IDS = ["ca", "app", "dep"]

# protocol-and-peers.md section 1.5: real cache.nixos.org signatures.
CACHE_NIXOS_ORG_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
CACHE_NIXOS_ORG_VECTORS = [
    (
        b"1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;"
        b"sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;"
        b"/nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,"
        b"/nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,"
        b"/nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,"
        b"/nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n",
        "cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCP"
        "MVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==",
    ),
    (
        b"1;/nix/store/0mg3mag909yg8pk14cjsppxs2px7iqfv-openapv-0.2.1.2;"
        b"sha256:1gas028j4n2yial0csbcxzyfswwc8jb58is2x4mrblzx3zx5721y;797328;"
        b"/nix/store/0mg3mag909yg8pk14cjsppxs2px7iqfv-openapv-0.2.1.2,"
        b"/nix/store/1bdzriipn18184zpwh2lfdabk2gqcgxn-glibc-2.42-61",
        "cache.nixos.org-1:FsONxUGa/AiJw7Ke1hbEqEKOQjI2vMmNmmdLGW4oC7luUVhFm+ZSMKm+/"
        "johD9bTtXsAw2PDtxAMTJUfCzDUAA==",
    ),
]


@pytest.fixture
def secret() -> SecretKey:
    return SecretKey.parse(NIX_SECRET_KEY)


@pytest.fixture
def public() -> PublicKey:
    return PublicKey.parse(NIX_PUBLIC_KEY)


def _sig_by(ni: NarInfo, name: str) -> str:
    (sig,) = [s for s in ni.signatures if signature_key_name(s) == name]
    return sig


# --- keys ----------------------------------------------------------------------


def test_nix_key_pair_round_trips(secret: SecretKey, public: PublicKey) -> None:
    assert secret.name == "test-1"
    assert secret.to_text() == NIX_SECRET_KEY
    assert secret.public_key() == public
    assert public.to_text() == NIX_PUBLIC_KEY
    assert base64.b64decode(NIX_SECRET_KEY.split(":")[1])[:32] == secret.seed


def test_secret_key_repr_hides_seed(secret: SecretKey) -> None:
    text = repr(secret)
    assert "test-1" in text
    assert base64.b64encode(secret.seed).decode() not in text
    assert repr(secret.seed) not in text


@pytest.mark.parametrize(
    "text",
    [
        NIX_PUBLIC_KEY + "\n",
        "  " + NIX_PUBLIC_KEY + " \r\n",
        NIX_PUBLIC_KEY[:20] + "\n" + NIX_PUBLIC_KEY[20:],
    ],
)
def test_public_key_tolerates_whitespace(text: str, public: PublicKey) -> None:
    assert PublicKey.parse(text) == public


def test_secret_key_tolerates_trailing_newline(secret: SecretKey) -> None:
    assert SecretKey.parse(NIX_SECRET_KEY + "\n") == secret


def _b64(n: int) -> str:
    return base64.b64encode(bytes(range(n))).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "name:base64"),
        ("fsXu1IndBXbOfP+93lhXudXjcfts58PS7rCQUOJWJRI=", "name:base64"),
        (":fsXu1IndBXbOfP+93lhXudXjcfts58PS7rCQUOJWJRI=", "key name"),
        ("a b:fsXu1IndBXbOfP+93lhXudXjcfts58PS7rCQUOJWJRI=", "key name"),
        ("test-1:", "invalid base64"),
        ("test-1:fsXu1IndBXbOfP+93lhXudXjcfts58PS7rCQUOJWJRI", "invalid base64"),
        ("test-1:fsXu1IndBXbOfP+93lhXudXjcfts58PS7rCQU!JWJRI=", "invalid base64"),
        (f"test-1:{_b64(31)}", "32 bytes, got 31"),
        (f"test-1:{_b64(33)}", "32 bytes, got 33"),
        (NIX_SECRET_KEY, "32 bytes, got 64"),
    ],
)
def test_public_key_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        PublicKey.parse(text)


def _mismatched_secret() -> str:
    raw = base64.b64decode(NIX_SECRET_KEY.split(":")[1])
    other_pub = base64.b64decode(NIX_OTHER_PUBLIC_KEY.split(":")[1])
    return "test-1:" + base64.b64encode(raw[:32] + other_pub).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "name:base64"),
        (NIX_SECRET_KEY.split(":")[1], "name:base64"),
        (NIX_PUBLIC_KEY, "64 bytes, got 32"),
        (f"test-1:{_b64(63)}", "64 bytes, got 63"),
        ("test-1:" + NIX_SECRET_KEY.split(":")[1][:-2], "invalid base64"),
        (_mismatched_secret(), "does not match"),
    ],
)
def test_secret_key_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        SecretKey.parse(text)


def test_key_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PublicKey.parse("nonsense")


@pytest.mark.parametrize("name", ["", "a:b", "a b", "tab\tname"])
def test_generate_rejects_bad_names(name: str) -> None:
    with pytest.raises(KeyFormatError, match="key name"):
        SecretKey.generate(name)


def test_constructors_validate_sizes() -> None:
    with pytest.raises(KeyFormatError, match="32 bytes"):
        PublicKey("k", b"\x00" * 31)
    with pytest.raises(KeyFormatError, match="32 bytes"):
        SecretKey("k", b"\x00" * 64)


def test_generate_round_trips() -> None:
    key = SecretKey.generate("ncps.example.com")
    assert key.name == "ncps.example.com"
    assert SecretKey.parse(key.to_text()) == key
    assert PublicKey.parse(key.public_key().to_text()) == key.public_key()
    assert SecretKey.generate("ncps.example.com") != key


# --- signatures against real Nix -------------------------------------------------


@pytest.mark.parametrize("text", ALL_NIX_NARINFOS, ids=NARINFO_IDS)
def test_sign_gives_nix_identical_sig(text: str, secret: SecretKey) -> None:
    ni = parse(text)
    assert secret.sign(ni.fingerprint()) == _sig_by(ni, "test-1")
    signed_line = f"Sig: {secret.sign(ni.fingerprint())}\n"
    assert signed_line in text


@pytest.mark.parametrize("text", ALL_NIX_NARINFOS, ids=NARINFO_IDS)
def test_verify_nix_signatures(text: str, public: PublicKey) -> None:
    ni = parse(text)
    assert public.verify(ni.fingerprint(), _sig_by(ni, "test-1"))
    assert TrustedKeys([public]).verify_narinfo(ni)


def test_other_key_signed_only_the_app() -> None:
    other = TrustedKeys([PublicKey.parse(NIX_OTHER_PUBLIC_KEY)])
    assert other.verify_narinfo(parse(NIX_APP_NARINFO))
    # `nix store verify` with only other-1 trusted says the dep is untrusted.
    assert not other.verify_narinfo(parse(NIX_DEP_NARINFO))
    assert not other.verify_narinfo(parse(NIX_CA_NARINFO))


def test_wrong_key_with_same_name_rejects(public: PublicKey) -> None:
    impostor = SecretKey.generate("test-1").public_key()
    assert impostor.name == public.name
    for text in ALL_NIX_NARINFOS:
        ni = parse(text)
        assert not impostor.verify(ni.fingerprint(), _sig_by(ni, "test-1"))
        assert not TrustedKeys([impostor]).verify_narinfo(ni)


def test_tampered_narinfo_rejects(public: PublicKey) -> None:
    ni = parse(NIX_APP_NARINFO)
    trusted = TrustedKeys([public])
    assert trusted.verify_narinfo(ni)
    assert not trusted.verify_narinfo(attrs.evolve(ni, nar_size=ni.nar_size + 1))
    assert not trusted.verify_narinfo(attrs.evolve(ni, references=ni.references[1:]))
    store_path = ni.store_path.replace("ncps-app", "ncps-bpp")
    assert not trusted.verify_narinfo(attrs.evolve(ni, store_path=store_path))


def test_unsigned_narinfo_is_untrusted(public: PublicKey) -> None:
    ni = attrs.evolve(parse(NIX_DEP_NARINFO), signatures=())
    assert not TrustedKeys([public]).verify_narinfo(ni)


def test_signature_name_must_match_key(public: PublicKey) -> None:
    ni = parse(NIX_DEP_NARINFO)
    sig = _sig_by(ni, "test-1")
    renamed = "test-2" + sig.removeprefix("test-1")
    assert not public.verify(ni.fingerprint(), renamed)
    same_bytes_other_name = PublicKey("test-2", public.key)
    assert same_bytes_other_name.verify(ni.fingerprint(), renamed)


@pytest.mark.parametrize(("fingerprint", "signature"), CACHE_NIXOS_ORG_VECTORS)
def test_cache_nixos_org_vectors(fingerprint: bytes, signature: str) -> None:
    key = PublicKey.parse(CACHE_NIXOS_ORG_KEY)
    assert key.verify(fingerprint, signature)
    parts = fingerprint.split(b";")
    parts[3] = str(int(parts[3]) + 1).encode()
    tampered = b";".join(parts)
    assert tampered != fingerprint
    assert not key.verify(tampered, signature)
    assert not key.verify(fingerprint + b",", signature)
    assert not PublicKey.parse(NIX_PUBLIC_KEY).verify(fingerprint, signature)


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "test-1",
        "test-1:",
        "test-1:!!!!",
        "test-1:AAAA",
        "test-1:" + base64.b64encode(bytes(63)).decode(),
        "test-1:" + base64.b64encode(bytes(65)).decode(),
        "test-1:" + base64.b64encode(bytes(64)).decode(),
        "test-1:" + base64.b64encode(bytes(64)).decode().rstrip("="),
        "test-1: " + base64.b64encode(bytes(64)).decode(),
        "test-1:\u00e9",
    ],
)
def test_verify_never_raises(signature: str, public: PublicKey) -> None:
    fingerprint = parse(NIX_DEP_NARINFO).fingerprint()
    assert public.verify(fingerprint, signature) is False
    assert TrustedKeys([public]).verify(fingerprint, signature) is False


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_sign_verify_property(fingerprint: bytes, other: bytes) -> None:
    key = SecretKey.parse(NIX_SECRET_KEY)
    signature = key.sign(fingerprint)
    assert signature.startswith("test-1:")
    assert key.public_key().verify(fingerprint, signature)
    if other != fingerprint:
        assert not key.public_key().verify(other, signature)


# --- TrustedKeys semantics ---------------------------------------------------------


def test_later_key_with_same_name_wins(public: PublicKey) -> None:
    impostor = SecretKey.generate("test-1").public_key()
    ni = parse(NIX_DEP_NARINFO)

    real_last = TrustedKeys([impostor, public])
    assert real_last.verify_narinfo(ni)
    assert real_last.shadowed() == [impostor]
    assert len(real_last) == 1
    assert real_last.get("test-1") == public

    real_first = TrustedKeys([public, impostor])
    assert not real_first.verify_narinfo(ni)
    assert real_first.shadowed() == [public]


def test_shadowed_ignores_exact_duplicates_and_distinct_names(
    public: PublicKey,
) -> None:
    other = PublicKey.parse(NIX_OTHER_PUBLIC_KEY)
    keys = TrustedKeys([public, other, public])
    assert keys.shadowed() == []
    assert len(keys) == 2
    assert sorted(k.name for k in keys) == ["other-1", "test-1"]
    assert keys.get("missing") is None


def test_any_trusted_signature_suffices(public: PublicKey) -> None:
    ni = parse(NIX_APP_NARINFO)
    bogus = "test-1:" + base64.b64encode(bytes(64)).decode()
    # A broken signature by a trusted name does not veto a good one.
    with_bogus = attrs.evolve(ni, signatures=(bogus, *ni.signatures))
    assert TrustedKeys([public]).verify_narinfo(with_bogus)
    only_bogus = attrs.evolve(ni, signatures=(bogus, _sig_by(ni, "other-1")))
    assert not TrustedKeys([public]).verify_narinfo(only_bogus)


def test_empty_trusted_keys_trust_nothing() -> None:
    assert not TrustedKeys([]).verify_narinfo(parse(NIX_APP_NARINFO))


# --- sign_narinfo / strip_signatures ---------------------------------------------


def test_sign_narinfo_replaces_same_name_and_appends(secret: SecretKey) -> None:
    ni = parse(NIX_APP_NARINFO)
    real = _sig_by(ni, "test-1")
    stale = "test-1:" + base64.b64encode(bytes(64)).decode()
    other = _sig_by(ni, "other-1")
    ni = attrs.evolve(ni, signatures=(stale, other))

    signed = sign_narinfo(ni, secret)
    assert signed.signatures == (other, real)
    assert attrs.evolve(signed, signatures=ni.signatures) == ni


def test_sign_narinfo_keeps_upstream_signatures() -> None:
    ni = parse(NIX_APP_NARINFO)
    ours = SecretKey.generate("ncps.example.com")
    signed = sign_narinfo(ni, ours)
    assert signed.signatures[:2] == ni.signatures
    assert len(signed.signatures) == 3
    assert TrustedKeys([ours.public_key()]).verify_narinfo(signed)
    assert parse(signed.to_text()) == signed
    # Signing twice does not pile up signatures.
    assert sign_narinfo(signed, ours) == signed


def test_strip_signatures() -> None:
    ni = parse(NIX_APP_NARINFO)
    stripped = strip_signatures(ni, "test-1")
    assert stripped.signatures == (_sig_by(ni, "other-1"),)
    assert strip_signatures(ni, "nobody") == ni
    assert strip_signatures(strip_signatures(ni, "other-1"), "test-1").signatures == ()
    # Names are compared whole, not by prefix.
    assert strip_signatures(ni, "test").signatures == ni.signatures
