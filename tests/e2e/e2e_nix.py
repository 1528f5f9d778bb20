"""The Nix side of the e2e suite: the built fixture, NAR bytes, isolated Nix clients."""

from __future__ import annotations

import bz2
import hashlib
import lzma
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import zstandard
from build_fixture import nix_env

# --------------------------------------------------------------------------- fixture


class Fixture:
    """The built fixture (see build_fixture.py), read from its JSON manifest."""

    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest
        self.dir = Path(manifest["dir"])
        self.upstream_pubkey: str = manifest["keys"]["upstream"]["public"]
        self.wrong_pubkey: str = manifest["keys"]["wrong"]["public"]
        self.unrelated_pubkey: str = manifest["keys"]["unrelated"]["public"]

    def path(self, name: str) -> str:
        return self.manifest["paths"][name]["path"]

    def hash(self, name: str) -> str:
        return self.manifest["paths"][name]["hash"]

    def nar_sha256(self, name: str) -> str:
        return self.manifest["paths"][name]["nar_sha256"]

    def nar_url(self, name: str, cache: str) -> str:
        """The NAR URL (relative, ``nar/...``) of ``name`` in upstream ``cache``."""
        return self.manifest["paths"][name]["caches"][cache]["url"]

    def cache(self, name: str) -> Path:
        return Path(self.manifest["caches"][name])

    def all_nar_sha256(self) -> set[str]:
        return {p["nar_sha256"] for p in self.manifest["paths"].values()}


# --------------------------------------------------------------------------- NAR bytes


def decode_nar(body: bytes, compression: str) -> bytes:
    """Undo a binary cache's ``Compression:`` to get the NAR itself."""
    if compression in ("none", ""):
        return body
    if compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if compression == "xz":
        return lzma.decompress(body)
    if compression == "bzip2":
        return bz2.decompress(body)
    raise AssertionError(f"unexpected compression {compression!r}")


def compression_of_file(path: PurePath) -> str:
    """How a stored NAR is compressed, from its name (``.nar``, ``.nar.zst``...);
    ``.nar.transparent.zst`` is an uncompressed NAR kept zstd-compressed."""
    suffix = path.name.split(".nar", 1)[1] if ".nar" in path.name else ""
    return {
        "": "none",
        ".zst": "zstd",
        ".transparent.zst": "zstd",
        ".xz": "xz",
        ".bz2": "bzip2",
    }.get(suffix, suffix)


def parse_narinfo(text: str) -> dict[str, object]:
    fields: dict[str, object] = {"Sig": []}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if key == "Sig":
            fields["Sig"].append(value)  # type: ignore[union-attr]
        else:
            fields[key] = value
    return fields


# --------------------------------------------------------------------------- Nix client


@dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nrc={self.rc}\n--- stdout\n{self.stdout[-3000:]}"
            f"\n--- stderr\n{self.stderr[-6000:]}"
        )


class NixClient:
    """A fresh chroot Nix store with its own isolated environment and narinfo cache."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.store = base / "store"
        self.env = nix_env(base)

    def substitute_cmd(
        self, paths: Iterable[str], substituter: str, keys: Sequence[str]
    ) -> list[str]:
        return [
            "nix-store", "--store", str(self.store), "-r", *paths,
            "--option", "substituters", substituter,
            "--option", "trusted-public-keys", " ".join(keys),
            "--option", "download-attempts", "1",
            "--option", "narinfo-cache-negative-ttl", "0",
            "--option", "narinfo-cache-positive-ttl", "0",
            "--option", "connect-timeout", "5",
            "--option", "stalled-download-timeout", "30",
            "--add-root", str(self.base / "roots" / "result"),
        ]  # fmt: skip

    def run(self, args: Sequence[str], timeout: float = 120) -> Result:
        args = [str(a) for a in args]
        proc = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        return Result(args, proc.returncode, proc.stdout, proc.stderr)

    def substitute(
        self,
        paths: Iterable[str],
        substituter: str,
        keys: Sequence[str],
        timeout: float = 120,
    ) -> Result:
        return self.run(self.substitute_cmd(paths, substituter, keys), timeout=timeout)

    def start_substitute(
        self, paths: Iterable[str], substituter: str, keys: Sequence[str]
    ) -> subprocess.Popen[str]:
        """Like :meth:`substitute`, without waiting (to run many clients at once)."""
        return subprocess.Popen(
            self.substitute_cmd(paths, substituter, keys), env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def verify(self, keys: Sequence[str]) -> Result:
        """``nix store verify --all``: rehash every path and check its signatures."""
        return self.run(
            ["nix", "store", "verify", "--store", str(self.store), "--all",
             "--option", "trusted-public-keys", " ".join(keys)]
        )  # fmt: skip

    def valid_paths(self) -> set[str]:
        if not self.store.exists():
            return set()
        res = self.run(["nix", "path-info", "--store", str(self.store), "--all"])
        assert res.rc == 0, str(res)
        return set(res.stdout.split())

    def nar_sha256(self, store_path: str) -> str:
        """SHA-256 (hex) of the NAR serialisation of ``store_path`` in this store."""
        proc = subprocess.run(
            ["nix", "store", "dump-path", "--store", str(self.store), store_path],
            env=self.env, capture_output=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        return hashlib.sha256(proc.stdout).hexdigest()
