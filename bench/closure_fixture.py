"""Build (once) the closure bench/closure.py substitutes, in an xz and a zstd cache.

Everything lives under ``<scratch>/closure-fixture``; ``fixture.json`` is written last
and the fixture is reused while it is there with the same ``version``.

The closure is built with hardening_fixture's recipe (a fixed seed, content-addressed
source paths, a root text path referencing all of them): 301 paths, 297 files with
sizes log-uniform between 1 KB and 3 MB plus three of 20 MB, each partly random and
partly repeated text. Each file's random share is drawn between 0.4 and 0.98 (the
hardening fixture's 0.2..0.9 compresses further than issue 8's closure did): about
170 MB of NAR and 118 MB of zstd. The same paths are published twice, signed by one
key generated with the fixture: ``cache-zstd`` (``compression=zstd``) and ``cache-xz``
(``compression=xz``, compressed in parallel to save build time; decompression is the
same).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from hardening_fixture import file_sizes, nix_expression, write_partly_compressible
from nixenv import NixEnv, append_cache_info, remove_tree

FIXTURE_VERSION = 1
FILES = 300
LARGE = [20_000_000, 20_000_000, 20_000_000]
SHARES = (0.4, 0.98)
COMPRESSIONS = {
    "zstd": "compression=zstd",
    "xz": "compression=xz&parallel-compression=true",
}


class _ShareDraws(random.Random):
    """write_partly_compressible draws a file's random share as ``uniform(0.2, 0.9)``;
    this rng answers that one draw from ``SHARES`` instead (sizes are drawn first,
    from a plain rng)."""

    def uniform(self, a: float, b: float) -> float:
        return super().uniform(*SHARES)


def build(scratch: Path, log: Callable[[str], None]) -> dict:
    """Return the fixture description, building it first if needed (~1 min)."""
    out = scratch / "closure-fixture"
    meta_file = out / "fixture.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == FIXTURE_VERSION and all(
            Path(d).is_dir() for d in meta["caches"].values()
        ):
            meta["reused"] = True
            return meta
    remove_tree(out)
    src, store, keys = out / "src", out / "store", out / "keys"
    (src / "c").mkdir(parents=True)
    keys.mkdir()
    env = NixEnv(out / "nix-env")
    started = time.monotonic()
    timings: dict[str, float] = {}

    sizes = file_sizes(random.Random(20261208), FILES, LARGE)
    rng = _ShareDraws(8)
    names = []
    for i, size in enumerate(sizes):
        name = f"cl-{i:03d}.bin"
        write_partly_compressible(src / "c" / name, size, rng)
        names.append(name)
    timings["sources_s"] = round(time.monotonic() - started, 1)
    log(f"closure fixture: sources written in {timings['sources_s']}s")

    expr = out / "paths.nix"
    expr.write_text(nix_expression(src, {"c": names}))
    root = json.loads(
        env.check_output(
            ["nix", "eval", "--store", str(store), "--json", "--file", str(expr)]
        )
    )["c"]
    sk, pubkey = env.generate_signing_key("ncps-bench-closure-1", keys)
    caches: dict[str, str] = {}
    file_bytes: dict[str, int] = {}
    for compression, params in COMPRESSIONS.items():
        t = time.monotonic()
        cache = out / f"cache-{compression}"
        env.copy_to_cache(store, cache, f"{params}&secret-key={sk}", [root])
        append_cache_info(cache)
        caches[compression] = str(cache)
        file_bytes[compression] = sum(
            p.stat().st_size for p in (cache / "nar").iterdir()
        )
        took = timings[f"copy_{compression}_s"] = round(time.monotonic() - t, 1)
        log(f"closure fixture: {compression} cache in {took}s")

    infos = json.loads(
        env.check_output(
            ["nix", "path-info", "--store", str(store), "--json", "-r", root]
        )
    )
    meta = {
        "version": FIXTURE_VERSION,
        "dir": str(out),
        "caches": caches,
        "pubkey": pubkey,
        "root": root,
        "paths": len(infos),
        "nar_bytes": sum(i["narSize"] for i in infos),
        "file_bytes": file_bytes,
        "largest_nar_bytes": max(i["narSize"] for i in infos),
        "build_steps_s": timings,
        "build_s": round(time.monotonic() - started, 1),
    }
    shutil.rmtree(src)  # the caches hold everything the bench needs
    remove_tree(store)
    remove_tree(out / "nix-env")
    meta_file.write_text(json.dumps(meta, indent=2))
    meta["reused"] = False
    return meta
