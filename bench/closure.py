"""The closure section of bench/run (issue 8): a real Nix client substitutes a
301-path closure through ncps and through nginx ``proxy_cache``, cold and warm.

For each compression (zstd, then xz), with one upstream nginx serving that cache of
closure_fixture statically, rounds alternate between three setups:

* ``direct``: the client straight from the upstream (the floor);
* ``nginx``: a fresh nginx ``proxy_cache`` (empty cache dir, ``proxy_cache_lock on``,
  ``tcp_nopush off``) in front of the upstream: one cold run, one warm run, then 4
  clients at once (warm);
* ``ncps``: a fresh daemon with empty storage: the same three runs; its VmHWM is read
  after each.

Every run is ``nix-store -r`` into a fresh client store; medians over the rounds.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import closure_fixture
from measure import MB, hwm_mb, median
from nixenv import NixEnv, remove_tree
from procs import Child, Ncps

COMPRESSIONS = ["zstd", "xz"]
CLIENTS = 4
RUN_TIMEOUT_S = 900.0
# Issue 8's targets. Reported; enforced only with bench/run --strict.
CLOSURE_TARGETS = {
    "zstd_cold_vs_nginx": ("<=", 1.2),
    "zstd_warm_vs_nginx": ("<=", 1.0),
    "xz_cold_vs_nginx": ("<=", 1.3),
    "xz_warm_vs_nginx": ("<=", 1.0),
    "peak_rss_MB": ("<=", 150.0),
}

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush off;
    keepalive_requests 1000000;
{http}
    server {{
        listen 127.0.0.1:{port};
        location / {{
{location}
        }}
    }}
}}
"""

STATIC = "            root {root};"

PROXY_HTTP = """\
    proxy_cache_path {dir}/proxy-cache levels=1:2 keys_zone=nix:16m max_size=8g
                     inactive=1d use_temp_path=off;
    upstream closure_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}"""

PROXY_LOCATION = """\
            proxy_pass http://closure_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache nix;
            proxy_cache_lock on;
            proxy_cache_valid 200 1d;
            proxy_cache_valid 404 1m;"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ClosureNginx(Child):
    """nginx, 1 worker, sendfile on, tcp_nopush off: static (``root``) or a
    ``proxy_cache`` in front of ``upstream_port``."""

    name = "nginx"
    ready_any_status = True

    def __init__(
        self, workdir: Path, root: Path | None = None, upstream_port: int = 0
    ) -> None:
        super().__init__(workdir)
        self.root = root
        self.upstream_port = upstream_port

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "proxy-cache"

    def argv(self) -> list[str]:
        (self.workdir / "tmp").mkdir(exist_ok=True)
        if self.root is not None:
            http, location = "", STATIC.format(root=self.root)
        else:
            http = PROXY_HTTP.format(dir=self.workdir, upstream_port=self.upstream_port)
            location = PROXY_LOCATION
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=self.workdir, port=self.port, http=http, location=location
            )
        )
        return [
            "nginx",
            "-p",
            str(self.workdir),
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(conf),
        ]


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def settle(path: Path, quiet_s: float = 0.5, limit_s: float = 30.0) -> None:
    """Wait until nothing under ``path`` grows for ``quiet_s`` (commits, renames and
    background fetches after the client finished), at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    last = tree_bytes(path)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = tree_bytes(path)
        if now == last:
            return
        last = now


class Runs:
    """The Nix clients of one compression: one for single runs, ``CLIENTS`` for
    concurrent ones, each with its own environment and client stores."""

    def __init__(self, bench: Any, root: str, upstream_key: str) -> None:
        self.nix: NixEnv = bench.nix
        self.store = bench.runs / "closure-client"
        self.many = [NixEnv(bench.scratch / f"nix-env-{i}") for i in range(CLIENTS)]
        self.stores = [bench.runs / f"closure-client-{i}" for i in range(CLIENTS)]
        self.root = [root]
        self.keys = [upstream_key]

    def one(self, url: str, extra_keys: tuple[str, ...] = ()) -> float:
        keys = [*self.keys, *extra_keys]
        return self.nix.substitute(self.store, self.root, url, keys, RUN_TIMEOUT_S)

    def concurrent(self, url: str, extra_keys: tuple[str, ...] = ()) -> float:
        """Wall time of ``CLIENTS`` clients substituting the closure at once."""
        keys = [*self.keys, *extra_keys]
        t = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [
                pool.submit(env.substitute, store, self.root, url, keys, RUN_TIMEOUT_S)
                for env, store in zip(self.many, self.stores, strict=True)
            ]
            for f in futures:
                f.result()
        return time.monotonic() - t

    def clean(self) -> None:
        for store in [self.store, *self.stores]:
            remove_tree(store)


def run(bench: Any) -> dict:
    """The section: fixture info, one dict per compression, target checks."""
    args = bench.args
    rounds = args.closure_rounds or min(args.rounds, 3)
    fx = closure_fixture.build(bench.scratch, log)
    res: dict = {
        "fixture": {
            "dir": fx["dir"],
            "reused": fx["reused"],
            "build_s": fx["build_s"],
            "paths": fx["paths"],
            "nar_MB": round(fx["nar_bytes"] / MB, 1),
            **{f"{c}_MB": round(b / MB, 1) for c, b in fx["file_bytes"].items()},
        },
        "rounds": rounds,
        "clients_concurrent": CLIENTS,
        "client": "nix-store -r into a fresh chroot store (Nix 2.8 defaults: "
        "16 substitutions, 25 connections)",
        "servers": "nginx 1 worker, sendfile on, tcp_nopush off (upstream static; "
        "peer proxy_cache, proxy_cache_lock on)",
    }
    for compression in COMPRESSIONS:
        log(f"closure {compression} ...")
        res[compression] = one_compression(bench, fx, compression, rounds)
    checks: dict[str, dict] = {}
    peaks = [res[c].get("ncps_peak_MB") for c in COMPRESSIONS]
    values: dict[str, float | None] = {
        "peak_rss_MB": None if None in peaks else max(p for p in peaks if p),
    }
    for c in COMPRESSIONS:
        for kind in ("cold", "warm"):
            values[f"{c}_{kind}_vs_nginx"] = res[c].get(f"ncps_{kind}_vs_nginx")
    for name, (op, bound) in CLOSURE_TARGETS.items():
        value = values[name]
        ok = (
            None
            if value is None
            else (value <= bound if op == "<=" else value >= bound)
        )
        checks[name] = {"value": value, "target": f"{op} {bound}", "pass": ok}
    res["targets"] = checks
    verdicts = [c["pass"] for c in checks.values()]
    res["pass"] = False if False in verdicts else (None if None in verdicts else True)
    return res


def one_compression(bench: Any, fx: dict, compression: str, rounds: int) -> dict:
    upstream = bench.start(
        ClosureNginx(
            bench.runs / f"closure-upstream-{compression}",
            root=Path(fx["caches"][compression]),
        )
    )
    runs = Runs(bench, fx["root"], fx["pubkey"])
    times: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        times.setdefault(key, []).append(round(value, 3))

    res: dict = {"upstream": upstream.url}
    runs.one(upstream.url)  # unmeasured: the upstream's files into the page cache
    for r in range(rounds):
        setups = ["direct", "nginx", "ncps"]
        if r % 2:
            setups.reverse()
        for setup in setups:
            if setup == "direct":
                note("direct", runs.one(upstream.url))
            elif setup == "nginx":
                proxy = bench.start(
                    ClosureNginx(
                        bench.runs / f"closure-nginx-{compression}-{r}",
                        upstream_port=upstream.port,
                    )
                )
                try:
                    note("nginx_cold", runs.one(proxy.url))
                    settle(proxy.cache_dir)
                    note("nginx_warm", runs.one(proxy.url))
                    note("nginx_c4", runs.concurrent(proxy.url))
                finally:
                    proxy.stop()
                    remove_tree(proxy.workdir)
            elif not bench.ncps_reason:
                ncps_round(bench, fx, upstream, runs, r, compression, note, peaks, res)
        log(
            f"closure {compression} round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {v[-1]}s" for k, v in times.items())
        )
    runs.clean()
    upstream.stop()
    for key, values in times.items():
        res[f"{key}_s"] = values
        res[f"{key}_median_s"] = round(median(values), 3)
    for key, values in peaks.items():
        res[f"ncps_{key}_MB"] = values
    if peaks:
        res["ncps_peak_MB"] = max(peaks["hwm_warm"])
        res["ncps_peak_c4_MB"] = max(peaks["hwm_c4"])

    def ratio(a: str, b: str) -> float | None:
        x, y = res.get(f"{a}_median_s"), res.get(f"{b}_median_s")
        return round(x / y, 3) if x is not None and y else None

    ratios = {
        "nginx_cold_vs_direct": ratio("nginx_cold", "direct"),
        "nginx_warm_vs_direct": ratio("nginx_warm", "direct"),
        "ncps_cold_vs_nginx": ratio("ncps_cold", "nginx_cold"),
        "ncps_warm_vs_nginx": ratio("ncps_warm", "nginx_warm"),
        "ncps_cold_vs_direct": ratio("ncps_cold", "direct"),
        "ncps_warm_vs_direct": ratio("ncps_warm", "direct"),
        "ncps_c4_vs_nginx": ratio("ncps_c4", "nginx_c4"),
    }
    res.update((k, v) for k, v in ratios.items() if v is not None)
    return res


def ncps_round(
    bench: Any,
    fx: dict,
    upstream: ClosureNginx,
    runs: Runs,
    r: int,
    compression: str,
    note: Callable[[str, float], None],
    peaks: dict[str, list[float]],
    res: dict,
) -> None:
    """Cold, warm and 4 clients through one fresh daemon; VmHWM after each."""
    args = bench.args
    workdir = bench.runs / f"closure-ncps-{compression}-{r}"
    remove_tree(workdir)
    daemon = bench.start(
        Ncps(
            workdir,
            upstream.url,
            fx["pubkey"],
            args.ncps_arg,
            shlex.split(args.ncps_command) if args.ncps_command else None,
        )
    )
    try:
        key = (daemon.pubkey(),)
        peaks.setdefault("hwm_idle", []).append(hwm_mb(daemon.pid))
        note("ncps_cold", runs.one(daemon.url, key))
        peaks.setdefault("hwm_cold", []).append(hwm_mb(daemon.pid))
        if r == 0:
            runs.nix.verify(runs.store, [*runs.keys, *key])
            res["verified"] = "nix store verify --all: OK (round 1, ncps cold)"
        settle(daemon.storage)
        note("ncps_warm", runs.one(daemon.url, key))
        peaks.setdefault("hwm_warm", []).append(hwm_mb(daemon.pid))
        note("ncps_c4", runs.concurrent(daemon.url, key))
        peaks.setdefault("hwm_c4", []).append(hwm_mb(daemon.pid))
    finally:
        daemon.stop()
        remove_tree(workdir)


# -- report -------------------------------------------------------------------------


def _s(sec: dict, key: str) -> str:
    value = sec.get(f"{key}_median_s")
    return "n/a" if value is None else f"{value:.2f} s"


def table_rows(sec: dict | None, error: str | None) -> list[tuple[str, ...]]:
    """Rows for report.table: figure, ncps, baseline, ratio, target, ok."""
    if sec is None:
        msg = (error or "skipped").splitlines()[0][:60]
        return [("closure 301 paths", "n/a", "n/a", "-", "", msg)]

    def ok(name: str) -> str:
        flag = sec["targets"].get(name, {}).get("pass")
        return {True: "PASS", False: "FAIL", None: "-"}[flag]

    def target(name: str) -> str:
        return sec["targets"][name]["target"] if name in CLOSURE_TARGETS else ""

    rows: list[tuple[str, ...]] = []
    for c in COMPRESSIONS:
        cs = sec.get(c, {})
        for kind in ("cold", "warm"):
            name = f"{c}_{kind}_vs_nginx"
            rows.append(
                (
                    f"closure {c} {kind} (vs nginx {kind})",
                    _s(cs, f"ncps_{kind}"),
                    _s(cs, f"nginx_{kind}"),
                    str(cs.get(f"ncps_{kind}_vs_nginx", "n/a")),
                    target(name),
                    ok(name) if name in CLOSURE_TARGETS else "",
                )
            )
        for kind in ("cold", "warm"):
            rows.append(
                (
                    f"closure {c} {kind} (vs direct)",
                    _s(cs, f"ncps_{kind}"),
                    _s(cs, "direct"),
                    str(cs.get(f"ncps_{kind}_vs_direct", "n/a")),
                    "",
                    "",
                )
            )
        rows.append(
            (
                f"closure {c} {CLIENTS} clients warm (vs nginx)",
                _s(cs, "ncps_c4"),
                _s(cs, "nginx_c4"),
                str(cs.get("ncps_c4_vs_nginx", "n/a")),
                "",
                "",
            )
        )
    peak = sec["targets"]["peak_rss_MB"]["value"]
    idle = [v for c in COMPRESSIONS for v in sec.get(c, {}).get("ncps_hwm_idle_MB", [])]
    rows.append(
        (
            "closure ncps peak RSS (VmHWM)",
            "n/a" if peak is None else f"{peak} MB",
            f"{max(idle)} MB idle" if idle else "n/a",
            "-",
            target("peak_rss_MB"),
            ok("peak_rss_MB"),
        )
    )
    return rows


def summary(sec: dict | None) -> str:
    """Issue 8's table: one row per setup, one column per compression."""
    if not sec:
        return ""
    fx = sec["fixture"]
    head = (
        f"closure: {fx['paths']} paths, {fx['nar_MB']} MB of NAR "
        f"(zstd {fx.get('zstd_MB')} MB, xz {fx.get('xz_MB')} MB); "
        f"medians of {sec['rounds']} rounds"
    )

    def cell(c: str, key: str, vs: str = "") -> str:
        cs = sec.get(c, {})
        text = _s(cs, key)
        if vs and cs.get(f"{key}_vs_{vs}") is not None:
            text += f" ({cs[f'{key}_vs_{vs}']}x {vs})"
        return text

    def rss(c: str) -> str:
        cs = sec.get(c, {})
        if "ncps_peak_MB" not in cs:
            return "n/a"
        return f"{cs['ncps_peak_MB']} MB / {cs['ncps_peak_c4_MB']} MB"

    rows = [
        ("setup", *(f"{c} upstream" for c in COMPRESSIONS)),
        (
            "direct from the upstream (nginx static)",
            *(cell(c, "direct") for c in COMPRESSIONS),
        ),
        ("nginx proxy_cache, cold", *(cell(c, "nginx_cold") for c in COMPRESSIONS)),
        ("nginx proxy_cache, warm", *(cell(c, "nginx_warm") for c in COMPRESSIONS)),
        ("ncps, cold", *(cell(c, "ncps_cold", "nginx") for c in COMPRESSIONS)),
        ("ncps, warm", *(cell(c, "ncps_warm", "nginx") for c in COMPRESSIONS)),
        (
            "ncps cold / direct",
            *(
                str(sec.get(c, {}).get("ncps_cold_vs_direct", "n/a"))
                for c in COMPRESSIONS
            ),
        ),
        (
            "ncps warm / direct",
            *(
                str(sec.get(c, {}).get("ncps_warm_vs_direct", "n/a"))
                for c in COMPRESSIONS
            ),
        ),
        (
            f"{CLIENTS} clients at once, nginx warm",
            *(cell(c, "nginx_c4") for c in COMPRESSIONS),
        ),
        (
            f"{CLIENTS} clients at once, ncps warm",
            *(cell(c, "ncps_c4", "nginx") for c in COMPRESSIONS),
        ),
        (
            f"ncps peak RSS (1 client / {CLIENTS} clients)",
            *(rss(c) for c in COMPRESSIONS),
        ),
    ]
    lines = [head, ""]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(row) + " |")
        if i == 0:
            lines.append("|" + "---|" * len(row))
    return "\n".join(lines)
