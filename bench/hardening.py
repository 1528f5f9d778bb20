"""Field-hardening figures (issue 7): how ncps holds up under a burst, a half-broken
upstream and a 300-path closure.

1. ``burst``: 600+ narinfo GETs over 25 keep-alive connections (what one
   ``nixos-rebuild`` sends) at a fresh ncps whose descriptor limit is 1024 (soft and
   hard). Answers by status, the most NAR downloads in flight at the upstream at once,
   peak descriptors and peak RSS of ncps, and what is left once the downloads settle.
2. ``hang``: a real Nix client substitutes a closure ten levels deep through ncps whose
   FIRST upstream answered the startup check and then hangs (accepts, never answers);
   the second upstream is good. ``--cache-upstream-response-header-timeout=3s``.
3. ``closure``: a real Nix client substitutes a 301-path closure (150 MB of NARs)
   through a cold ncps: time and peak RSS (VmHWM), against the same client straight
   from the upstream.

The upstream is bench/hardening_upstream.py (Twisted static server counting in-flight
NAR GETs); the fixture is bench/hardening_fixture.py. Prints a table and writes
bench/results/hardening-latest.json (plus a timestamped copy). See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import resource
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import hardening_fixture
from measure import MB, RssSampler, fd_count, hwm_mb
from nixenv import NixEnv, remove_tree
from procs import BENCH, REPO, BenchError, Child, Ncps, http_get

RESULTS = BENCH / "results"
SECTIONS = ["burst", "burst_wan", "hang", "closure"]
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def log(msg: str) -> None:
    print(f"[hardening {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class CountingUpstream(Child):
    """bench/hardening_upstream.py serving ``cache_dir``."""

    name = "upstream"
    ready_path = "/_bench/stats"

    def __init__(self, workdir: Path, cache_dir: Path, nar_bps: int = 0) -> None:
        super().__init__(workdir)
        self.cache_dir = cache_dir
        self.nar_bps = nar_bps

    def argv(self) -> list[str]:
        return [
            sys.executable,
            str(BENCH / "hardening_upstream.py"),
            str(self.cache_dir),
            str(self.port),
            str(self.nar_bps),
        ]

    def control(self, action: str) -> dict:
        status, body = http_get(f"{self.url}/_bench/{action}")
        if status != 200:
            raise BenchError(f"upstream /_bench/{action} -> {status}")
        return json.loads(body)


class LimitedNcps(Ncps):
    """The daemon, optionally with RLIMIT_NOFILE set to ``nofile`` (soft and hard)."""

    def __init__(self, *args, nofile: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nofile = nofile

    def popen_kwargs(self) -> dict:
        kwargs = super().popen_kwargs()
        if self.nofile:
            n = self.nofile
            kwargs["preexec_fn"] = lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (n, n)
            )
        return kwargs


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return " ".join(line.split()[3:5])  # soft hard
    return "?"


def run_burst(
    base_url: str, names: list[str], connections: int, deadline_s: float
) -> tuple[list[tuple[str, str, float]], int]:
    """GET every ``/<name>`` over ``connections`` keep-alive connections.

    Returns ([(name, outcome, seconds)], retries): outcome is the status code, or the
    exception's name when the connection failed. A request that fails on a REUSED
    connection before any answer is retried once on a new one (as curl does).
    """
    host, port = base_url.removeprefix("http://").split(":")
    todo: queue.Queue[str] = queue.Queue()
    for n in names:
        todo.put(n)
    results: list[tuple[str, str, float]] = []
    retries = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        used = False
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() > stop_at:
                with lock:
                    results.append((name, "not sent (deadline)", 0.0))
                continue
            t = time.monotonic()
            for attempt in (0, 1):
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=30)
                    used = False
                try:
                    conn.request("GET", "/" + name)
                    resp = conn.getresponse()
                    resp.read()
                    outcome = str(resp.status)
                    used = True
                    if resp.will_close:
                        conn.close()
                        conn = None
                    break
                except (OSError, http.client.HTTPException) as e:
                    outcome = type(e).__name__
                    conn.close()
                    conn = None
                    reusable_failure = isinstance(
                        e,
                        (
                            http.client.RemoteDisconnected,
                            BrokenPipeError,
                            ConnectionResetError,
                        ),
                    )
                    if attempt == 0 and used and reusable_failure:
                        with lock:
                            retries[0] += 1
                        continue
                    break
            with lock:
                results.append((name, outcome, time.monotonic() - t))
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, retries[0]


def is_instance_lock(path: str) -> bool:
    """The lock file a live ncps holds beside its temp directory (not a leftover)."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith("ncps-") and name.endswith(".lock")


def files_under(path: Path) -> list[str]:
    """Temp files below ``path``, without the running instance's lock file."""
    if not path.is_dir():
        return []
    files = (str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    return sorted(f for f in files if not is_instance_lock(f))


def held_temp_fds(pid: int, workdir: Path) -> list[str]:
    """ncps's open descriptors on temp or deleted files (not its database or log)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inside = target.removeprefix(str(workdir) + "/")
        if inside.startswith("storage/db/") or inside == "ncps.log":
            continue
        if is_instance_lock(target):
            continue
        if "/tmp" in inside or ".part" in target or target.endswith("(deleted)"):
            held.append(target)
    return held


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Hardening:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs = args.scratch / "hardening-runs"
        remove_tree(self.runs)
        self.runs.mkdir(parents=True)
        self.nix = NixEnv(args.scratch / "hardening-nix-env")
        self.fx: dict = {}
        self.children: list[Child] = []

    def start(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        return child

    def stop_all(self) -> None:
        while self.children:
            self.children.pop().stop()

    def upstream(self, tag: str, nar_bps: int = 0) -> CountingUpstream:
        up = CountingUpstream(
            self.runs / f"upstream-{tag}", Path(self.fx["cache_dir"]), nar_bps
        )
        self.start(up)
        return up

    def ncps(
        self, tag: str, upstream_url: str, extra: list[str], nofile: int | None = None
    ) -> LimitedNcps:
        daemon = LimitedNcps(
            self.runs / f"ncps-{tag}",
            upstream_url,
            self.fx["pubkey"],
            [*extra, *self.args.ncps_arg],
            shlex.split(self.args.ncps_command) if self.args.ncps_command else None,
            nofile=nofile,
        )
        self.start(daemon)
        return daemon

    def _substitute_via(
        self, daemon: LimitedNcps, client: Path, root: str, keys: list[str], res: dict
    ) -> None:
        """A Nix client substitutes ``root`` through ``daemon``: ``res["ncps_s"]``
        is the time it took, or None with ``res["error"]`` saying why."""
        timeout = self.args.nix_timeout
        try:
            seconds = self.nix.substitute(
                client, [root], daemon.url, keys, timeout=timeout
            )
            res["ncps_s"] = round(seconds, 2)
        except subprocess.TimeoutExpired:
            res["ncps_s"] = None
            res["error"] = f"nix-store -r killed after {timeout}s"
        except RuntimeError as e:
            res["ncps_s"] = None
            res["error"] = str(e)[-1500:]

    # -- 1. the burst -------------------------------------------------------------

    def burst(self) -> dict:
        return self._burst("burst", 0)

    def burst_wan(self) -> dict:
        return self._burst("burst-wan", self.args.wan_bps)

    def _burst(self, tag: str, nar_bps: int) -> dict:
        up = self.upstream(tag, nar_bps)
        daemon = self.ncps(tag, up.url, [], nofile=self.args.nofile)
        rng = random.Random(7)
        existing = [Path(p).name[:32] + ".narinfo" for p in self.fx["all_paths"]]
        missing = [
            "".join(rng.choice(NIX32) for _ in range(32)) + ".narinfo"
            for _ in range(self.args.burst_missing)
        ]
        names = existing + missing
        rng.shuffle(names)
        res: dict = {
            "requests": len(names),
            "existing_upstream": len(existing),
            "missing_upstream": len(missing),
            "connections": self.args.burst_connections,
            "upstream_nar_pace_Bps": nar_bps or "unpaced",
            "ncps_open_files_limit": open_files_limit(daemon.pid),
            "idle_fds": fd_count(daemon.pid),
            "idle_hwm_MB": hwm_mb(daemon.pid),
        }
        up.control("reset")
        t = time.monotonic()
        with RssSampler(daemon.pid, 0.05, count_fds=True) as during:
            results, retries = run_burst(
                daemon.url,
                names,
                self.args.burst_connections,
                self.args.burst_deadline,
            )
            res["burst_s"] = round(time.monotonic() - t, 2)
            # Let the downloads the burst started finish (or fail) before counting
            # what is left behind.
            settle_t = time.monotonic()
            while time.monotonic() < settle_t + self.args.settle_timeout:
                if daemon.proc.poll() is not None:
                    break
                if up.control("stats")["nar_in_flight"] == 0:
                    break
                time.sleep(0.25)
            time.sleep(2)
            res["settle_s"] = round(time.monotonic() - settle_t, 1)
        missing_set = set(missing)
        by_status: dict[str, Counter] = {"existing": Counter(), "missing": Counter()}
        for name, outcome, _ in results:
            by_status["missing" if name in missing_set else "existing"][outcome] += 1
        latencies = [s for _, o, s in results if o.isdigit()]
        stats = up.control("stats")
        alive = daemon.proc.poll() is None
        res.update(
            existing_by_status=dict(by_status["existing"]),
            missing_by_status=dict(by_status["missing"]),
            existing_200=by_status["existing"]["200"],
            retried_on_reused_connection=retries,
            latency_p50_s=round(percentile(latencies, 0.5), 3),
            latency_p99_s=round(percentile(latencies, 0.99), 3),
            latency_max_s=round(max(latencies, default=0.0), 3),
            upstream_max_concurrent_nar_gets=stats["max_nar_in_flight"],
            upstream_nar_gets=stats["nar_gets"],
            upstream_nar_gets_aborted=stats["nar_aborted"],
            upstream_narinfo_gets=stats["narinfo_gets"],
            upstream_nar_in_flight_after_settle=stats["nar_in_flight"],
            peak_fds=during.max_fds,
            fd_samples=during.samples,
            peak_rss_sampled_MB=round(during.max_kib * 1024 / MB, 1),
            ncps_alive_after=alive,
        )
        if alive:
            res["peak_hwm_MB"] = hwm_mb(daemon.pid)
            res["fds_after_settle"] = fd_count(daemon.pid)
            res["temp_fds_held_after_settle"] = held_temp_fds(
                daemon.pid, daemon.workdir
            )
        tmp_files = files_under(daemon.storage / "store" / "tmp")
        res["temp_files_left_after_settle"] = len(tmp_files)
        res["temp_files_sample"] = tmp_files[:5]
        res["ncps_log_errors"] = log_error_lines(daemon.log_path)
        return res

    # -- 2. the half-broken first upstream ---------------------------------------

    def hang(self) -> dict:
        root = self.fx["roots"]["chain"]
        hung = self.upstream("hung")
        good = self.upstream("good")
        daemon = self.ncps(
            "hang",
            hung.url,
            [
                f"--cache-upstream-url={good.url}",
                "--cache-upstream-response-header-timeout=3s",
            ],
        )
        hung.control("hang")
        hung.control("reset")
        good.control("reset")
        client = self.runs / "client-hang"
        keys = [self.fx["pubkey"], daemon.pubkey()]
        res: dict = {
            "closure_paths": len(self.fx["closures"]["chain"]),
            "response_header_timeout": "3s",
        }
        self._substitute_via(daemon, client, root, keys, res)
        res["hung_upstream_requests"] = hung.control("stats")["hung_requests"]
        res["good_upstream_narinfo_gets"] = good.control("stats")["narinfo_gets"]
        res["direct_s"] = round(
            self.nix.substitute(client, [root], good.url, keys[:1], timeout=60), 2
        )
        remove_tree(client)
        return res

    # -- 3. the 300-path closure -------------------------------------------------

    def closure(self) -> dict:
        root = self.fx["roots"]["a"]
        up = self.upstream("closure")
        client = self.runs / "client-closure"
        keys = [self.fx["pubkey"]]
        self.nix.substitute(client, [root], up.url, keys, timeout=300)  # page cache
        direct = self.nix.substitute(client, [root], up.url, keys, timeout=300)
        daemon = self.ncps("closure", up.url, [])
        up.control("reset")
        res: dict = {
            "closure_paths": len(self.fx["closures"]["a"]),
            "closure_nar_MB": round(
                sum(p["narSize"] for p in self.fx["closures"]["a"]) / MB, 1
            ),
            "idle_hwm_MB": hwm_mb(daemon.pid),
            "direct_s": round(direct, 2),
        }
        keys = [*keys, daemon.pubkey()]
        with RssSampler(daemon.pid, 0.05, count_fds=True) as during:
            self._substitute_via(daemon, client, root, keys, res)
        if res["ncps_s"]:
            res["ratio"] = round(res["ncps_s"] / res["direct_s"], 2)
        stats = up.control("stats")
        res.update(
            peak_hwm_MB=hwm_mb(daemon.pid),
            peak_rss_sampled_MB=round(during.max_kib * 1024 / MB, 1),
            peak_fds=during.max_fds,
            upstream_max_concurrent_nar_gets=stats["max_nar_in_flight"],
            upstream_nar_gets=stats["nar_gets"],
        )
        remove_tree(client)
        return res

    # -- driver --------------------------------------------------------------------

    def run(self) -> dict:
        report: dict = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "label": self.args.label,
            "git_head": git(["rev-parse", "--short", "HEAD"]),
            "git_modified": git(["status", "--short", "--", "ncps"]).splitlines(),
            "ncps_args": self.args.ncps_arg,
            "sections": self.args.sections,
            "errors": {},
        }
        t0 = time.monotonic()
        if self.args.rebuild_fixture:
            remove_tree(self.args.scratch / "hardening-fixture")
        self.fx = hardening_fixture.build(self.args.scratch, log)
        report["fixture"] = {
            "dir": self.fx["dir"],
            "reused": self.fx["reused"],
            "build_s": self.fx["build_s"],
            "paths": len(self.fx["all_paths"]),
            "cache_nar_file_MB": round(self.fx["cache_nar_file_bytes"] / MB, 1),
        }
        log(f"fixture {'reused' if self.fx['reused'] else 'built'}: {self.fx['dir']}")
        for name in self.args.sections:
            log(f"{name} ...")
            t = time.monotonic()
            try:
                report[name] = getattr(self, name)()
                report[name]["section_s"] = round(time.monotonic() - t, 1)
            except Exception as e:  # one broken section must not hide the others
                report["errors"][name] = f"{type(e).__name__}: {e}"
                log(f"{name} FAILED: {e}")
                if self.args.verbose:
                    traceback.print_exc()
            finally:
                self.stop_all()
        report["total_s"] = round(time.monotonic() - t0, 1)
        if not self.args.keep:
            remove_tree(self.runs)
        return report


def git(args: list[str]) -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip()


def log_error_lines(path: Path, limit: int = 6) -> dict:
    """ncps log events at warn level or above: counts by level, first distinct ones."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    levels: Counter = Counter()
    first: list[str] = []
    for line in lines:
        try:
            event = json.loads(line)
            level = (event.get("log_level") or {}).get("name", "?")
            text = str(event.get("log_format") or event.get("log_text") or "")
        except (ValueError, AttributeError):
            level, text = "text", line
            if "Traceback" not in line and "Error" not in line:
                continue
        if level not in ("warn", "error", "critical", "text"):
            continue
        levels[level] += 1
        if text[:160] not in first and len(first) < limit:
            first.append(text[:160])
    return {"by_level": dict(levels), "first": first}


def table(report: dict) -> str:
    rows: list[tuple[str, str]] = []
    for section in ("burst", "burst_wan"):
        if section in report:
            rows += burst_rows(section, report[section])
    h = report.get("hang")
    if h:
        rows += [
            (
                "hang: 10-level closure via ncps",
                (f"{h['ncps_s']} s" if h["ncps_s"] is not None else "FAILED")
                + f" (direct from the good upstream {h['direct_s']} s)",
            ),
            (
                "hang: requests the hung upstream got",
                f"{h['hung_upstream_requests']} (good upstream narinfo GETs "
                f"{h['good_upstream_narinfo_gets']})",
            ),
        ]
    c = report.get("closure")
    if c:
        rows += [
            (
                f"closure: {c['closure_paths']} paths, {c['closure_nar_MB']} MB NAR",
                (f"ncps {c['ncps_s']} s" if c["ncps_s"] is not None else "FAILED")
                + f", direct {c['direct_s']} s"
                + (f" (x{c['ratio']})" if "ratio" in c else ""),
            ),
            (
                "closure: ncps peak RSS (VmHWM)",
                f"{c['peak_hwm_MB']} MB (idle {c['idle_hwm_MB']} MB)",
            ),
            (
                "closure: peak fds / most concurrent NAR GETs",
                f"{c['peak_fds']} / {c['upstream_max_concurrent_nar_gets']}",
            ),
        ]
    for name, err in report["errors"].items():
        rows.append((f"{name}: ERROR", err.splitlines()[0][:200]))
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"{a.ljust(width)}  {v}" for a, v in rows)


def burst_rows(section: str, b: dict) -> list[tuple[str, str]]:
    other = {k: v for k, v in b["existing_by_status"].items() if k != "200"}
    pace = b["upstream_nar_pace_Bps"]
    return [
        (
            f"{section}: narinfo GETs / connections",
            f"{b['requests']} / {b['connections']}, ncps open files limit "
            f"{b['ncps_open_files_limit']}, NARs "
            + (f"share a {pace} B/s link" if pace != "unpaced" else "unpaced"),
        ),
        (
            f"{section}: existing upstream -> 200",
            f"{b['existing_200']} of {b['existing_upstream']}; others: "
            f"{other or 'none'}",
        ),
        (f"{section}: missing upstream", str(b["missing_by_status"])),
        (
            f"{section}: most concurrent upstream NAR GETs",
            f"{b['upstream_max_concurrent_nar_gets']} "
            f"({b['upstream_nar_gets']} NAR GETs in all)",
        ),
        (
            f"{section}: peak descriptors (50 ms samples)",
            f"{b['peak_fds']} (idle {b['idle_fds']}, after settle "
            f"{b.get('fds_after_settle', '-')})",
        ),
        (
            f"{section}: peak RSS (VmHWM)",
            f"{b.get('peak_hwm_MB', '-')} MB (idle {b['idle_hwm_MB']} MB)",
        ),
        (
            f"{section}: wall time; latency p50 p99 max",
            f"{b['burst_s']} s; {b['latency_p50_s']} {b['latency_p99_s']} "
            f"{b['latency_max_s']} s",
        ),
        (
            f"{section}: settle; temp files left; held open",
            f"{b['settle_s']} s; {b['temp_files_left_after_settle']}; "
            f"{len(b.get('temp_fds_held_after_settle', []))}",
        ),
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run --only hardening",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scratch",
        type=Path,
        default=Path(os.environ.get("NCPS_BENCH_DIR", "/tmp/ncps-bench")),
        help="scratch dir; the fixture in it is reused (default /tmp/ncps-bench)",
    )
    p.add_argument("--rebuild-fixture", action="store_true")
    p.add_argument(
        "--section",
        action="append",
        choices=SECTIONS,
        help="run only these (repeatable; default all)",
    )
    p.add_argument("--nofile", type=int, default=1024, help="ncps's RLIMIT_NOFILE")
    p.add_argument("--burst-connections", type=int, default=25)
    p.add_argument(
        "--burst-missing",
        type=int,
        default=40,
        help="narinfos not in the upstream, mixed into the burst (default 40)",
    )
    p.add_argument("--burst-deadline", type=float, default=150.0)
    p.add_argument(
        "--wan-bps",
        type=int,
        default=20_000_000,
        help="burst_wan: the NAR bodies share a link of this many bytes/s "
        "(default 20 MB/s)",
    )
    p.add_argument("--settle-timeout", type=float, default=90.0)
    p.add_argument("--nix-timeout", type=float, default=240.0)
    p.add_argument(
        "--ncps-arg",
        action="append",
        default=[],
        help="extra daemon flag, repeatable; {workdir} = the daemon's fresh dir",
    )
    p.add_argument("--ncps-command", metavar="CMD")
    p.add_argument("--label", default="", help="stored in the JSON (e.g. before)")
    p.add_argument("--keep", action="store_true", help="keep the runs' dirs and logs")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s for s in SECTIONS if s in (args.section or SECTIONS)]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    bench = Hardening(args)
    try:
        report = bench.run()
    finally:
        bench.stop_all()
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    out = RESULTS / "hardening-latest.json"
    out.write_text(text)
    (RESULTS / f"hardening-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    print(table(report))
    print(f"\nwhole run {report['total_s']}s; JSON: {out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
