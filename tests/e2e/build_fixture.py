"""Build, offline, the Nix store paths and upstream binary caches the e2e suite serves.

Usage: ``python tests/e2e/build_fixture.py OUT_DIR`` (OUT_DIR is wiped). Prints the
path of the JSON manifest it writes (``OUT_DIR/manifest.json``). ``NCPS_E2E_BIG_MB``
sets the size of the big input-addressed path (default 20, megabytes of 10**6 bytes).

Everything runs in an isolated Nix environment (see :func:`nix_env`): no daemon, nothing
read from or written to ``/nix/store``, no substituters, narinfo disk-cache TTLs 0.

What gets built, in the chroot store ``OUT_DIR/store``:

* ``dir``: content-addressed (``nix-store --add``): a directory with an executable, a
  subdirectory and a symlink.
* ``leaf``, ``app`` (references leaf and dir), ``big`` (``NCPS_E2E_BIG_MB`` of
  incompressible, deterministic bytes; references leaf): input-addressed derivation
  outputs built with ``/bin/sh``. Only input-addressed paths make a Nix client check
  signatures, so every signature assertion uses them.

Binary caches (each with ``WantMassQuery: 1`` and ``Priority: 40`` appended to
``nix-cache-info``):

* ``none``, ``zstd``: app and big closures, signed with the committed upstream key.
* ``xz``: the app closure only (xz over an incompressible blob is slow).
* ``unsigned``, ``wrongkey`` (signed with the committed wrong key), ``corrupt``
  (signed, but one byte of the leaf NAR flipped; its narinfo is intact): the app
  closure, uncompressed.

Store paths are the same on every run and machine (content and derivations are fixed).

:func:`build_hardening_fixture` (``--hardening``) builds two more caches, signed and
uncompressed: ``burst`` (``BURST_PATHS`` tiny content-addressed paths, one
``nix-store --add``) and ``chain`` (``CHAIN_LEVELS`` input-addressed paths, each
referring to the one before: a closure that many levels deep).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS_DIR = HERE / "keys"
UPSTREAM_KEY_NAME = "e2e-upstream-1"
WRONG_KEY_NAME = "e2e-wrong-1"
BIG_SEED = b"ncps-e2e-big-input-addressed"
SANDBOX_OPTS = ["--option", "sandbox-paths", "/bin /usr /lib /lib64"]

FIXTURE_NIX = r"""
{ dir, blob }:
let
  sh = attrs: derivation ({
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
  } // attrs);
  dirPath = builtins.path { path = dir; name = "dir"; };
  blobPath = builtins.path { path = blob; name = "big.bin"; };
in rec {
  leaf = sh { name = "leaf"; args = [ "-c" "echo leaf-content > $out" ]; };
  app = sh {
    name = "app";
    args = [ "-c" ''
      read x < ${leaf}; mkdir $out
      echo "$x ${leaf} ${dirPath}" > $out/refs; echo hi > $out/data
    '' ];
  };
  big = sh {
    name = "big-ia";
    args = [ "-c" "mkdir $out; cp ${blobPath} $out/blob; echo ${leaf} > $out/ref" ];
  };
}
"""


BURST_PATHS = 600
CHAIN_LEVELS = 10
CHAIN_NIX = r"""
{ levels }:
let
  sh = attrs: derivation ({
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
  } // attrs);
  level = below: n: sh {
    name = "chain-${toString n}";
    args = [ "-c" ''
      mkdir $out; echo ${toString n} > $out/level; echo ${below} > $out/below
    '' ];
  };
  up = below: n: if n > levels then below else up (level below n) (n + 1);
in up "" 1
"""


def nix_env(base: Path) -> dict[str, str]:
    """Environment for running Nix commands hermetically below ``base``.

    No daemon (``store`` is a chroot store), no ``/etc/nix/nix.conf``, no default
    substituter, no build users, no narinfo disk caching.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NIX_") and k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME")
    }
    conf_dir = base / "nix-conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "nix.conf").touch()
    env.update(
        NIX_CONF_DIR=str(conf_dir),
        NIX_USER_CONF_FILES=str(conf_dir / "nix.conf"),
        NIX_CONFIG="\n".join(
            [
                "experimental-features = nix-command",
                f"store = {base / 'default-store'}",
                "substituters =",
                "build-users-group =",
                "sandbox = false",
                "narinfo-cache-negative-ttl = 0",
                "narinfo-cache-positive-ttl = 0",
            ]
        ),
        XDG_CACHE_HOME=str(base / "xdg-cache"),
        XDG_CONFIG_HOME=str(base / "xdg-config"),
        HOME=str(base / "home"),
    )
    return env


class _Nix:
    def __init__(self, base: Path) -> None:
        self.env = nix_env(base)

    def run(self, *args: str | Path) -> str:
        proc = subprocess.run(
            [str(a) for a in args], env=self.env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, args))} failed (rc {proc.returncode}):\n"
                + proc.stderr
            )
        return proc.stdout.strip()


def _write_sources(src: Path, big_bytes: int) -> None:
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "a").write_text("a\n")
    (src / "dir" / "a").chmod(0o755)
    (src / "dir" / "sub" / "b").write_text("b\n")
    (src / "dir" / "link").symlink_to("a")
    # SHAKE-256 output: deterministic, and no compressor can shrink it.
    (src / "big.bin").write_bytes(hashlib.shake_256(BIG_SEED).digest(big_bytes))


def _fresh_build_dir(out: Path, *tools: str) -> _Nix:
    """Wipe and recreate ``out`` (never ``/`` or below ``/nix``) once ``tools``
    are found; the hermetic Nix runner for it."""
    resolved = out.resolve()
    if (
        resolved == Path("/")
        or resolved == Path("/nix")
        or Path("/nix") in resolved.parents
    ):
        raise ValueError(f"refusing to build into {out}")
    if any(shutil.which(tool) is None for tool in tools):
        raise RuntimeError(
            f"{'/'.join(tools)} not found: install Nix (apt-get install nix-bin)"
        )
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return _Nix(out)


def _write_cache(
    nix: _Nix,
    store: Path,
    cache: Path,
    compression: str,
    secret_key: Path | None,
    paths: list[str],
) -> None:
    """``nix copy`` the closures of ``paths`` into the binary cache ``cache``
    (signed with ``secret_key`` unless None), then append the cache info."""
    url = f"file://{cache}?compression={compression}"
    if secret_key is not None:
        url += f"&secret-key={secret_key}"
    nix.run("nix", "copy", "--store", store, "--to", url, *paths)
    with (cache / "nix-cache-info").open("a") as f:
        f.write("WantMassQuery: 1\nPriority: 40\n")


def _read_narinfo(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def _flip_leaf_byte(cache: Path, leaf_hash: str) -> str:
    """Flip one byte of the leaf NAR in ``cache`` (not its narinfo); return its URL."""
    url = _read_narinfo(cache / f"{leaf_hash}.narinfo")["URL"]
    nar = cache / url
    data = bytearray(nar.read_bytes())
    at = data.find(b"leaf-content")
    assert at >= 0, "leaf NAR does not contain its content"
    data[at] = ord("L")
    nar.write_bytes(bytes(data))
    return url


def build_fixture(out: Path, big_mb: float = 20.0) -> dict:
    """Build everything into ``out`` (wiped first) and return the manifest."""
    t0 = time.monotonic()
    nix = _fresh_build_dir(out, "nix-store", "nix")
    store = out / "store"
    src = out / "src"
    _write_sources(src, int(big_mb * 1_000_000))

    dir_path = nix.run("nix-store", "--store", store, "--add", src / "dir")
    (out / "fixture.nix").write_text(FIXTURE_NIX)
    built = {}
    for attr in ("leaf", "app", "big"):
        built[attr] = nix.run(
            "nix-build", "--store", store, out / "fixture.nix", "-A", attr,
            "--arg", "dir", src / "dir", "--arg", "blob", src / "big.bin",
            "--no-out-link", *SANDBOX_OPTS,
        )  # fmt: skip
    paths = {"dir": dir_path, **built}

    keys = out / "keys"
    keys.mkdir()
    for name in (UPSTREAM_KEY_NAME, WRONG_KEY_NAME):
        for ext in ("sk", "pk"):
            shutil.copyfile(KEYS_DIR / f"{name}.{ext}", keys / f"{name}.{ext}")
    upstream_sk = keys / f"{UPSTREAM_KEY_NAME}.sk"
    wrong_sk = keys / f"{WRONG_KEY_NAME}.sk"
    nix.run(
        "nix-store", "--generate-binary-cache-key", "e2e-unrelated-1",
        keys / "e2e-unrelated-1.sk", keys / "e2e-unrelated-1.pk",
    )  # fmt: skip

    small_roots = [paths["app"]]
    all_roots = [paths["app"], paths["big"]]
    cache_specs = {
        # name: (compression, secret key or None, roots)
        "none": ("none", upstream_sk, all_roots),
        "zstd": ("zstd", upstream_sk, all_roots),
        "xz": ("xz", upstream_sk, small_roots),
        "unsigned": ("none", None, small_roots),
        "wrongkey": ("none", wrong_sk, small_roots),
        "corrupt": ("none", upstream_sk, small_roots),
    }
    caches = {}
    for name, (compression, secret_key, roots) in cache_specs.items():
        cache = out / f"cache-{name}"
        _write_cache(nix, store, cache, compression, secret_key, roots)
        caches[name] = str(cache)

    info = json.loads(
        nix.run("nix", "path-info", "--store", store, "--json", *paths.values())
    )
    by_path = {entry["path"]: entry for entry in info}
    manifest_paths = {}
    for name, store_path in paths.items():
        nar = subprocess.run(
            ["nix", "store", "dump-path", "--store", str(store), store_path],
            env=nix.env, capture_output=True, check=True,
        ).stdout  # fmt: skip
        hash_part = Path(store_path).name[:32]
        contents = {}
        for cache_name, cache in caches.items():
            narinfo = Path(cache) / f"{hash_part}.narinfo"
            if narinfo.exists():
                fields = _read_narinfo(narinfo)
                contents[cache_name] = {
                    "url": fields["URL"],
                    "compression": fields.get("Compression", "bzip2"),
                }
        manifest_paths[name] = {
            "path": store_path,
            "hash": hash_part,
            "nar_size": by_path[store_path]["narSize"],
            "nar_sha256": hashlib.sha256(nar).hexdigest(),
            "references": sorted(by_path[store_path].get("references", [])),
            "input_addressed": "ca" not in by_path[store_path],
            "caches": contents,
        }
    corrupt_url = _flip_leaf_byte(
        Path(caches["corrupt"]), manifest_paths["leaf"]["hash"]
    )

    manifest = {
        "dir": str(out),
        "big_mb": big_mb,
        "paths": manifest_paths,
        "keys": {
            label: {
                "public": (keys / f"{name}.pk").read_text().strip(),
                "secret_file": str(keys / f"{name}.sk"),
            }
            for label, name in (
                ("upstream", UPSTREAM_KEY_NAME),
                ("wrong", WRONG_KEY_NAME),
                ("unrelated", "e2e-unrelated-1"),
            )
        },
        "caches": caches,
        "corrupt_nar_url": corrupt_url,
        "build_seconds": round(time.monotonic() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_hardening_fixture(out: Path) -> dict:
    """Build the ``burst`` and ``chain`` caches into ``out`` (wiped first).

    Returns (and writes to ``out/manifest.json``) ``{"dir", "upstream_pubkey",
    "burst": {"cache", "paths": [{"path", "hash"}...]}, "chain": {"cache",
    "paths": [...]}}``; the chain's paths run from the bottom (no references) to
    the top, whose closure is the whole chain.
    """
    t0 = time.monotonic()
    nix = _fresh_build_dir(out, "nix-store", "nix-build")
    store = out / "store"
    secret_key = KEYS_DIR / f"{UPSTREAM_KEY_NAME}.sk"

    src = out / "burst-src"
    src.mkdir()
    for i in range(BURST_PATHS):
        (src / f"burst-{i:04d}").write_text(f"burst path {i}\n")
    burst = nix.run(
        "nix-store", "--store", store, "--add",
        *sorted(src.iterdir()),
    ).split()  # fmt: skip
    assert len(burst) == BURST_PATHS, f"nix-store --add gave {len(burst)} paths"

    (out / "chain.nix").write_text(CHAIN_NIX)
    top = nix.run(
        "nix-build", "--store", store, out / "chain.nix",
        "--arg", "levels", str(CHAIN_LEVELS), "--no-out-link", *SANDBOX_OPTS,
    )  # fmt: skip
    info = json.loads(
        nix.run("nix", "path-info", "--store", store, "--json", "--recursive", top)
    )
    refs = {e["path"]: [r for r in e.get("references", []) if r != e["path"]]
            for e in info}  # fmt: skip
    chain = [top]
    while refs[chain[0]]:
        (below,) = refs[chain[0]]
        chain.insert(0, below)
    assert len(chain) == CHAIN_LEVELS, f"chain has {len(chain)} levels: {chain}"

    manifest: dict = {
        "dir": str(out),
        "upstream_pubkey": (KEYS_DIR / f"{UPSTREAM_KEY_NAME}.pk").read_text().strip(),
    }
    for name, paths in (("burst", burst), ("chain", chain)):
        cache = out / f"cache-{name}"
        _write_cache(nix, store, cache, "none", secret_key, paths)
        manifest[name] = {
            "cache": str(cache),
            "paths": [{"path": p, "hash": Path(p).name[:32]} for p in paths],
        }
    manifest["build_seconds"] = round(time.monotonic() - t0, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--hardening":
        manifest = build_hardening_fixture(Path(argv[2]).resolve())
        print(Path(manifest["dir"]) / "manifest.json")
        return 0
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    big_mb = float(os.environ.get("NCPS_E2E_BIG_MB", "20"))
    manifest = build_fixture(Path(argv[1]).resolve(), big_mb)
    print(Path(manifest["dir"]) / "manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
