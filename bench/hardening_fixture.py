"""Build (once) the binary cache bench/hardening.py substitutes from.

Everything lives under ``<scratch>/hardening-fixture``; ``fixture.json`` is written
last and the fixture is reused while it is there with the same ``version``.

Contents (a fixed seed: the same bytes and store paths on every machine), all
content-addressed source paths (``builtins.path``/``builtins.toFile``), NARs zstd,
signed by a key generated with the fixture:

* ``closure-a``: a root text path referencing 300 files: 297 with sizes log-uniform
  between 1 KB and 3 MB, plus 3 larger ones (10, 20, 40 MB); each file is partly
  random, partly repeated text (its random fraction drawn between 0.2 and 0.9), so
  zstd shrinks some a lot and others little;
* ``closure-b``: the same shape with 300 more files (1 KB..3 MB, no large ones), so
  the cache holds over 600 paths for the narinfo burst;
* ``chain-10``: ten text paths, each referencing the one before (``chain-01`` ..
  ``chain-10``): a closure ten levels deep.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from nixenv import NixEnv, append_cache_info, remove_tree

FIXTURE_VERSION = 1
BLOCK = 64 * 1024
LARGE = [10_000_000, 20_000_000, 40_000_000]


def write_partly_compressible(path: Path, size: int, rng: random.Random) -> None:
    """``size`` bytes: in every 64 KiB block a random fraction, the rest text."""
    random_share = rng.uniform(0.2, 0.9)
    text = f"{path.name}: the ncps hardening bench, lorem ipsum dolor sit amet\n"
    filler = (text * (BLOCK // len(text) + 1)).encode()
    with path.open("wb") as out:
        left = size
        while left:
            n = min(BLOCK, left)
            k = int(n * random_share)
            out.write(rng.randbytes(k) + filler[: n - k])
            left -= n


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def file_sizes(rng: random.Random, count: int, large: list[int]) -> list[int]:
    return [log_uniform(rng, 1_000, 3_000_000) for _ in range(count - len(large))] + [
        *large
    ]


def nix_expression(src: Path, sets: dict[str, list[str]]) -> str:
    lines = ["let"]
    for set_name, files in sets.items():
        for i, name in enumerate(files):
            lines.append(
                f"  {set_name}{i} = builtins.path {{ path = {src / set_name / name};"
                f' name = "{name}"; }};'
            )
        refs = "".join(f"${{{set_name}{i}}}\\n" for i in range(len(files)))
        lines.append(
            f'  root-{set_name} = builtins.toFile "closure-{set_name}" "{refs}";'
        )
    lines.append('  chain1 = builtins.toFile "chain-01" "level 1\\n";')
    for level in range(2, 11):
        lines.append(
            f'  chain{level} = builtins.toFile "chain-{level:02d}"'
            f' "level {level} after ${{chain{level - 1}}}\\n";'
        )
    lines.append("in {")
    for set_name in sets:
        lines.append(f'  {set_name} = "${{root-{set_name}}}";')
    lines.append('  chain = "${chain10}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def build(scratch: Path, log) -> dict:
    """Return the fixture description, building it first if needed."""
    out = scratch / "hardening-fixture"
    meta_file = out / "fixture.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == FIXTURE_VERSION and Path(meta["cache_dir"]).is_dir():
            meta["reused"] = True
            return meta
    remove_tree(out)
    src, store, keys, cache = out / "src", out / "store", out / "keys", out / "cache"
    keys.mkdir(parents=True)
    env = NixEnv(out / "nix-env")
    started = time.monotonic()

    rng = random.Random(20261202)
    sets: dict[str, list[str]] = {}
    for set_name, large in (("a", LARGE), ("b", [])):
        (src / set_name).mkdir(parents=True)
        sets[set_name] = []
        for i, size in enumerate(file_sizes(rng, 300, large)):
            name = f"hb-{set_name}-{i:03d}.bin"
            write_partly_compressible(src / set_name / name, size, rng)
            sets[set_name].append(name)
    log(f"hardening fixture: sources written in {time.monotonic() - started:.1f}s")

    expr = out / "paths.nix"
    expr.write_text(nix_expression(src, sets))
    roots = json.loads(
        env.check_output(
            ["nix", "eval", "--store", str(store), "--json", "--file", str(expr)]
        )
    )
    sk, pubkey = env.generate_signing_key("ncps-bench-hardening-1", keys)
    env.copy_to_cache(
        store, cache, f"compression=zstd&secret-key={sk}", list(roots.values())
    )
    append_cache_info(cache)

    def closure(root: str) -> list[dict]:
        infos = json.loads(
            env.check_output(
                ["nix", "path-info", "--store", str(store), "--json", "-r", root]
            )
        )
        return [{"path": i["path"], "narSize": i["narSize"]} for i in infos]

    closures = {name: closure(root) for name, root in roots.items()}
    file_bytes = sum(p.stat().st_size for p in (cache / "nar").iterdir())
    meta = {
        "version": FIXTURE_VERSION,
        "dir": str(out),
        "cache_dir": str(cache),
        "pubkey": pubkey,
        "roots": roots,
        "closures": closures,
        "all_paths": sorted({p["path"] for c in closures.values() for p in c}),
        "cache_nar_file_bytes": file_bytes,
        "build_s": round(time.monotonic() - started, 1),
    }
    shutil.rmtree(src)  # the cache holds everything the bench needs
    remove_tree(store)
    meta_file.write_text(json.dumps(meta, indent=2))
    meta["reused"] = False
    return meta
