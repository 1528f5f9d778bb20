"""Build (once) the upstream binary cache the benchmark substitutes from.

Everything lives under ``<scratch>/fixture``: a chroot Nix store with the source paths,
a signing key, and ``cache/``, a signed ``file://`` binary cache that a static server
publishes as "the upstream".  ``fixture.json`` is written last; when it exists and its
``version`` matches, the fixture is reused as is.

Contents (deterministic, so store paths are the same on every machine):

* a ~150 MB closure rooted at an input-addressed derivation output (``bench-app``):
  two incompressible blobs (96 MB, 32 MB), eight 2 MB blobs, a tree of 400 small text
  files, and a text path referencing all of them; NARs compressed with zstd;
* a 1 GB incompressible path (``bench-huge.bin``), NAR stored uncompressed (xz of 1 GB
  would take minutes; zstd would only add CPU work the RSS figure is not about).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from nixenv import NixEnv, append_cache_info

FIXTURE_VERSION = 1
CHUNK = 16 * 1024 * 1024


def write_incompressible(path: Path, size: int, seed: bytes) -> None:
    """Write ``size`` bytes of a SHAKE-256 stream, chunk by chunk (constant memory)."""
    with path.open("wb") as out:
        index = 0
        remaining = size
        while remaining:
            n = min(CHUNK, remaining)
            out.write(hashlib.shake_256(seed + index.to_bytes(8, "big")).digest(n))
            remaining -= n
            index += 1


def write_tree(root: Path, files: int) -> None:
    """A directory of small, compressible text files (per-file NAR overhead)."""
    for i in range(files):
        sub = root / f"d{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        line = f"file {i} of the ncps bench tree: lorem ipsum dolor sit amet\n"
        (sub / f"f{i:04d}.txt").write_text(line * (10000 // len(line)))
    (root / "bin").mkdir(exist_ok=True)
    script = root / "bin" / "hello"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)


def _nix_lines(env: NixEnv, *args: str) -> str:
    return env.check_output(list(args)).strip()


def build(scratch: Path, log) -> dict:
    """Return the fixture description, building it first if needed."""
    out = scratch / "fixture"
    meta_file = out / "fixture.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == FIXTURE_VERSION and Path(meta["cache_dir"]).is_dir():
            meta["reused"] = True
            return meta
    if out.exists():
        shutil.rmtree(out)
    src = out / "src"
    store = out / "store"
    keys = out / "keys"
    cache = out / "cache"
    for d in (src, keys):
        d.mkdir(parents=True)
    env = NixEnv(out / "nix-env")
    timings: dict[str, float] = {}
    started = time.monotonic()

    t = time.monotonic()
    blobs = {"bench-blob-a.bin": 96_000_000, "bench-blob-b.bin": 32_000_000}
    blobs.update({f"bench-part-{i}.bin": 2_000_000 for i in range(8)})
    for name, size in blobs.items():
        write_incompressible(src / name, size, name.encode())
    write_tree(src / "bench-tree", 400)
    huge_src = src / "bench-huge.bin"
    write_incompressible(huge_src, 1_000_000_000, b"ncps-bench-huge")
    timings["generate_sources_s"] = time.monotonic() - t
    log(f"fixture: sources generated in {timings['generate_sources_s']:.1f}s")

    t = time.monotonic()
    sources = [*blobs, "bench-tree"]
    nix_expr = out / "closure.nix"
    path_lets = "\n".join(
        f'  p{i} = builtins.path {{ path = {src / name}; name = "{name}"; }};'
        for i, name in enumerate(sources)
    )
    refs = "".join(f"${{p{i}}}\\n" for i in range(len(sources)))
    nix_expr.write_text(
        f"""let
{path_lets}
  root = builtins.toFile "bench-closure-root" "{refs}";
  sh = attrs: derivation ({{
    system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  }} // attrs);
in {{
  app = sh {{
    name = "bench-app";
    args = [ "-c" "mkdir $out; echo ${{root}} > $out/root; echo app > $out/data" ];
  }};
}}
"""
    )
    app = _nix_lines(
        env,
        "nix-build",
        "--store",
        str(store),
        str(nix_expr),
        "-A",
        "app",
        "--no-out-link",
        "--option",
        "sandbox-paths",
        "/bin /usr /lib /lib64",
    )
    timings["closure_store_paths_s"] = time.monotonic() - t
    log(f"fixture: closure store paths in {timings['closure_store_paths_s']:.1f}s")

    t = time.monotonic()
    huge = _nix_lines(env, "nix-store", "--store", str(store), "--add", str(huge_src))
    huge_src.unlink()  # the store holds a copy; 1 GB less on disk
    timings["huge_store_add_s"] = time.monotonic() - t
    log(f"fixture: 1 GB path added in {timings['huge_store_add_s']:.1f}s")

    sk, pubkey = env.generate_signing_key("ncps-bench-upstream-1", keys)

    t = time.monotonic()
    env.copy_to_cache(store, cache, f"compression=zstd&secret-key={sk}", [app])
    timings["copy_closure_zstd_s"] = time.monotonic() - t
    t = time.monotonic()
    env.copy_to_cache(store, cache, f"compression=none&secret-key={sk}", [huge])
    timings["copy_huge_none_s"] = time.monotonic() - t
    append_cache_info(cache)
    log(
        f"fixture: cache written (closure {timings['copy_closure_zstd_s']:.1f}s, "
        f"1 GB {timings['copy_huge_none_s']:.1f}s)"
    )

    infos = json.loads(
        env.check_output(
            ["nix", "path-info", "--store", str(store), "--json", "-r", app]
        )
    )
    closure = [
        {"path": i["path"], "narSize": i["narSize"], **narinfo_fields(cache, i["path"])}
        for i in infos
    ]
    meta = {
        "version": FIXTURE_VERSION,
        "dir": str(out),
        "cache_dir": str(cache),
        "store_dir": str(store),
        "pubkey": pubkey,
        "closure_root": app,
        "closure": closure,
        "closure_nar_bytes": sum(p["narSize"] for p in closure),
        "closure_file_bytes": sum(p["FileSize"] for p in closure),
        "huge": {"path": huge, **narinfo_fields(cache, huge)},
        "build_timings_s": {k: round(v, 2) for k, v in timings.items()},
        "build_total_s": round(time.monotonic() - started, 2),
    }
    meta_file.write_text(json.dumps(meta, indent=2))
    meta["reused"] = False
    return meta


def narinfo_fields(cache: Path, store_path: str) -> dict:
    """Hash part, NAR URL and sizes of ``store_path`` as the upstream cache has them."""
    hash_part = Path(store_path).name[:32]
    fields = {}
    for line in (cache / f"{hash_part}.narinfo").read_text().splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return {
        "hash": hash_part,
        "URL": fields["URL"],
        "FileSize": int(fields.get("FileSize", fields["NarSize"])),
        "NarSize": int(fields["NarSize"]),
        "Compression": fields.get("Compression", "none"),
    }
