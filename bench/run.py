"""ncps benchmark: one command, six sections, each against a baseline from the same run.

1. warm NAR throughput: ncps vs nginx (sendfile) serving the same committed NAR file;
2. warm narinfo requests/s: ncps vs a bare Klein app returning the same bytes (wrk);
3. cold substitution of a ~150 MB closure by a real Nix client: through ncps (empty
   storage, fresh daemon per round) vs directly from the upstream;
4. peak RSS (VmHWM) of ncps while streaming a 1 GB NAR cold from the upstream;
5. Backends (``--only backends``): warm NAR throughput of ncps on S3 (moto) vs ncps on
   local storage, with moto's own GET throughput as the ceiling; narinfo requests/s of
   ncps on PostgreSQL and MariaDB vs SQLite, hot (memory) and database-bound;
6. Closure (``--only closure``): a real Nix client substituting a 301-path closure from
   xz and zstd upstreams through ncps and through nginx proxy_cache, cold and warm, and
   4 clients at once; ncps's peak RSS (about 8 minutes; ``--skip closure``).

Prints a table and writes bench/results/latest.json.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

import backends
import closure
import fixture
import measure
from measure import MB, median
from nixenv import NixEnv, remove_tree
from procs import (
    BenchError,
    KleinBaseline,
    Ncps,
    Nginx,
    http_get,
    ncps_unavailable_reason,
)
from report import TARGETS, machine_info, table, verdict

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = [
    "cold_substitution",
    "peak_rss",
    "nar_throughput",
    "narinfo_rps",
    "s3_nar_throughput",
    "db_narinfo_rps",
    "closure",
]
GROUPS = {"backends": ["s3_nar_throughput", "db_narinfo_rps"]}
NEEDS_NCPS = {"peak_rss", "s3_nar_throughput", "db_narinfo_rps"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scratch: Path = args.scratch
        self.runs = self.scratch / "runs"
        remove_tree(self.runs)
        self.runs.mkdir(parents=True)
        self.stack = contextlib.ExitStack()
        self.fx: dict = {}
        self.upstream: Nginx | None = None
        self.ncps_reason: str | None = None
        self.warm: Ncps | None = None  # daemon holding the 1 GB NAR, for warm tests
        self.nix = NixEnv(self.scratch / "nix-env")

    # -- helpers --------------------------------------------------------------------

    def start(self, child):
        self.stack.enter_context(child)
        return child.start()

    def new_ncps(self, tag: str) -> Ncps:
        """A fresh daemon with an empty storage dir of its own."""
        workdir = self.runs / f"ncps-{tag}"
        remove_tree(workdir)
        assert self.upstream is not None
        daemon = Ncps(
            workdir,
            self.upstream.url,
            self.fx["pubkey"],
            self.args.ncps_arg,
            shlex.split(self.args.ncps_command) if self.args.ncps_command else None,
        )
        return self.start(daemon)

    def discard(self, daemon: Ncps) -> None:
        daemon.stop()
        remove_tree(daemon.workdir)

    # -- sections -------------------------------------------------------------------

    def cold_substitution(self) -> dict:
        rounds = self.args.rounds
        root = self.fx["closure_root"]
        keys = [self.fx["pubkey"]]
        client = self.runs / "client-store"
        res: dict = {
            "closure_root": root,
            "closure_paths": len(self.fx["closure"]),
            "closure_nar_MB": round(self.fx["closure_nar_bytes"] / MB, 1),
            "closure_download_MB": round(self.fx["closure_file_bytes"] / MB, 1),
            "upstream": "nginx 1 worker, sendfile, zstd NARs",
            "rounds": rounds,
        }
        # One unmeasured run so the upstream files are in the page cache for everyone.
        self.nix.substitute(client, [root], self.upstream.url, keys)
        direct: list[float] = []
        through: list[float] = []
        for r in range(rounds):
            order = ("direct", "ncps") if r % 2 == 0 else ("ncps", "direct")
            for which in order:
                if which == "direct":
                    direct.append(
                        self.nix.substitute(client, [root], self.upstream.url, keys)
                    )
                    continue
                if self.ncps_reason:
                    continue
                daemon = self.new_ncps(f"cold-{r}")
                try:
                    ncps_keys = [*keys, daemon.pubkey()]
                    through.append(
                        self.nix.substitute(client, [root], daemon.url, ncps_keys)
                    )
                    if r == 0:
                        self.nix.verify(client, ncps_keys)
                        res["verified"] = "nix store verify --all: OK (round 0)"
                finally:
                    self.discard(daemon)
        remove_tree(client)
        res["direct_s"] = [round(x, 3) for x in direct]
        res["direct_median_s"] = round(median(direct), 3)
        if through:
            res["ncps_s"] = [round(x, 3) for x in through]
            res["ncps_median_s"] = round(median(through), 3)
            res["ratio"] = round(median(through) / median(direct), 3)
        return res

    def peak_rss(self) -> dict:
        huge = self.fx["huge"]
        daemon = self.new_ncps("warm")
        self.warm = daemon
        res: dict = {"nar_bytes": huge["FileSize"], "compression": huge["Compression"]}
        res["idle_hwm_MB"] = round(
            measure.proc_status_kib(daemon.pid, "VmHWM") * 1024 / MB, 1
        )
        status, body = http_get(f"{daemon.url}/{huge['hash']}.narinfo")
        if status != 200:
            raise BenchError(f"ncps GET /{huge['hash']}.narinfo -> {status}")
        nar_url = narinfo_url(body)
        with measure.RssSampler(daemon.pid) as sampler:
            size, seconds = measure.curl_download(f"{daemon.url}/{nar_url}")
        if size != huge["FileSize"]:
            raise BenchError(f"ncps streamed {size} bytes of {huge['FileSize']}")
        hwm = measure.proc_status_kib(daemon.pid, "VmHWM") * 1024 / MB
        res.update(
            peak_MB=round(hwm, 1),
            sampled_max_rss_MB=round(sampler.max_kib * 1024 / MB, 1),
            rss_samples=sampler.samples,
            cold_stream_MBps=round(size / seconds / MB, 1),
            cold_stream_s=round(seconds, 2),
            ratio=round(hwm / res["idle_hwm_MB"], 2),
            ratio_meaning="peak / idle VmHWM of the same daemon",
            ncps_nar_url=nar_url,
        )
        return res

    def committed_nar(self) -> tuple[Path, str]:
        """The 1 GB NAR file in the warm daemon's storage, and its ncps URL path."""
        huge = self.fx["huge"]
        if (
            self.warm is None
            or self.warm.proc is None
            or self.warm.proc.poll() is not None
        ):
            self.warm = self.new_ncps("warm2")
        status, body = http_get(f"{self.warm.url}/{huge['hash']}.narinfo")
        if status != 200:
            raise BenchError(f"ncps GET /{huge['hash']}.narinfo -> {status}")
        nar_url = narinfo_url(body)
        nar_dir = self.warm.storage / "store" / "nar"
        start = time.monotonic()
        fetched = False
        while time.monotonic() < start + 120:
            found = find_nar_file(nar_dir, nar_url, {huge["FileSize"], huge["NarSize"]})
            if found:
                return found, nar_url
            if not fetched and time.monotonic() > start + 10:
                # Not committed by the background prefetch: pull it through once.
                measure.curl_download(f"{self.warm.url}/{nar_url}")
                fetched = True
            time.sleep(0.25)
        raise BenchError(
            f"no committed NAR of the 1 GB path under {nar_dir} after 120s"
        )

    def nar_throughput(self) -> dict:
        huge = self.fx["huge"]
        rounds = self.args.rounds
        if self.ncps_reason:
            nar_file = Path(self.fx["cache_dir"]) / huge["URL"]
            ncps_url = None
        else:
            nar_file, nar_path = self.committed_nar()
            ncps_url = f"{self.warm.url}/{nar_path}"
        nginx = self.start(Nginx(self.runs / "nginx-nar", nar_file.parent))
        nginx_url = f"{nginx.url}/{nar_file.name}"
        size = nar_file.stat().st_size
        res: dict = {
            "file": str(nar_file),
            "bytes": size,
            "rounds": rounds,
            "baseline": "nginx 1 worker, sendfile on, same file",
        }
        targets = {"nginx": nginx_url} | ({"ncps": ncps_url} if ncps_url else {})
        for url in targets.values():  # page cache + first-connection effects
            measure.single_stream_mbps(url, size)
        single: dict[str, list[float]] = {k: [] for k in targets}
        par: dict[str, list[float]] = {k: [] for k in targets}
        for r in range(rounds):
            names = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in names:
                single[name].append(measure.single_stream_mbps(targets[name], size))
        for r in range(max(2, rounds // 2)):
            names = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in names:
                par[name].append(measure.parallel_mbps(targets[name], size, 4))
        for name in targets:
            res[f"{name}_MBps"] = [round(x, 1) for x in single[name]]
            res[f"{name}_median_MBps"] = round(median(single[name]), 1)
            res[f"{name}_c4_MBps"] = [round(x, 1) for x in par[name]]
            res[f"{name}_c4_median_MBps"] = round(median(par[name]), 1)
        if ncps_url:
            res["ratio"] = round(median(single["ncps"]) / median(single["nginx"]), 3)
            res["ratio_c4"] = round(median(par["ncps"]) / median(par["nginx"]), 3)
        nginx.stop()
        return res

    def narinfo_rps(self) -> dict:
        huge = self.fx["huge"]
        name = f"/{huge['hash']}.narinfo"
        workdir = self.runs / "klein"
        workdir.mkdir(exist_ok=True)
        narinfo_file = workdir / "narinfo"
        if self.ncps_reason:
            narinfo_file.write_bytes(
                (Path(self.fx["cache_dir"]) / name.lstrip("/")).read_bytes()
            )
            targets = {}
        else:
            if self.warm is None or self.warm.proc.poll() is not None:
                self.warm = self.new_ncps("warm3")
            status, body = http_get(self.warm.url + name)
            if status != 200:
                raise BenchError(f"ncps GET {name} -> {status}")
            narinfo_file.write_bytes(body)
            targets = {"ncps": self.warm.url + name}
        klein = self.start(KleinBaseline(workdir, name, narinfo_file))
        targets = {"klein": klein.url + name} | targets
        duration = self.args.wrk_seconds
        res: dict = {
            "path": name,
            "narinfo_bytes": narinfo_file.stat().st_size,
            "tool": f"wrk -t1 -c4 -d{duration}s",
            "rounds": self.args.wrk_rounds,
            "baseline": "bare Klein route, same bytes, no access log",
        }
        for url in targets.values():
            measure.wrk_rps(url, 1)  # warm-up
        runs: dict[str, list[dict]] = {k: [] for k in targets}
        for r in range(self.args.wrk_rounds):
            names = list(targets) if r % 2 == 0 else list(reversed(targets))
            for n in names:
                runs[n].append(measure.wrk_rps(targets[n], duration))
        for n, rs in runs.items():
            res[f"{n}_rps"] = [round(x["rps"]) for x in rs]
            res[f"{n}_median_rps"] = round(median([x["rps"] for x in rs]))
            res[f"{n}_latency_p50_p99"] = [(x["p50"], x["p99"]) for x in rs]
            errs = [x["socket_errors"] for x in rs if x["socket_errors"]]
            if errs:
                res[f"{n}_socket_errors"] = errs
        if "ncps" in runs:
            res["ratio"] = round(res["ncps_median_rps"] / res["klein_median_rps"], 3)
        klein.stop()
        return res

    # -- driver ---------------------------------------------------------------------

    def run(self) -> dict:
        report: dict = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(self.nix.env),
            "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
            | {
                f"closure.{k}": f"{op} {v}"
                for k, (op, v) in closure.CLOSURE_TARGETS.items()
            },
            "errors": {},
            "sections": self.args.sections,
        }
        t0 = time.monotonic()
        with self.stack:
            t = time.monotonic()
            if self.args.rebuild_fixture:
                remove_tree(self.scratch / "fixture")
            log(f"fixture in {self.scratch / 'fixture'}")
            self.fx = fixture.build(self.scratch, log)
            report["fixture"] = {
                "dir": self.fx["dir"],
                "reused": self.fx["reused"],
                "build_s": self.fx["build_total_s"],
                "build_steps_s": self.fx["build_timings_s"],
                "this_run_s": round(time.monotonic() - t, 2),
                "closure_paths": len(self.fx["closure"]),
                "closure_nar_MB": round(self.fx["closure_nar_bytes"] / MB, 1),
                "huge_nar_MB": round(self.fx["huge"]["NarSize"] / MB, 1),
            }
            log(
                "fixture "
                + (
                    "reused"
                    if self.fx["reused"]
                    else f"built in {self.fx['build_total_s']}s"
                )
            )
            self.upstream = self.start(
                Nginx(self.runs / "nginx-upstream", Path(self.fx["cache_dir"]))
            )
            self.ncps_reason = (
                None
                if self.args.no_ncps or self.args.ncps_command
                else ncps_unavailable_reason()
            )
            if self.args.no_ncps:
                self.ncps_reason = "--no-ncps given"
            report["ncps"] = {
                "available": self.ncps_reason is None,
                "reason": self.ncps_reason,
                "extra_args": self.args.ncps_arg,
            }
            if self.ncps_reason:
                log("ncps UNAVAILABLE, measuring baselines only: " + self.ncps_reason)
            sections = [
                ("cold_substitution", self.cold_substitution),
                ("peak_rss", self.peak_rss),
                ("nar_throughput", self.nar_throughput),
                ("narinfo_rps", self.narinfo_rps),
                ("s3_nar_throughput", lambda: backends.s3_nar_throughput(self)),
                ("db_narinfo_rps", lambda: backends.db_narinfo_rps(self)),
                ("closure", lambda: closure.run(self)),
            ]
            for name, fn in sections:
                if name not in self.args.sections:
                    continue
                if name in NEEDS_NCPS and self.ncps_reason:
                    report["errors"][name] = "ncps unavailable"
                    continue
                log(f"{name} ...")
                t = time.monotonic()
                try:
                    report[name] = fn()
                    report[name]["section_s"] = round(time.monotonic() - t, 1)
                    if name in TARGETS and (
                        "ratio" in report[name] or name == "peak_rss"
                    ):
                        value = report[name].get(
                            "peak_MB" if name == "peak_rss" else "ratio"
                        )
                        report[name]["pass"] = verdict(name, value)
                except Exception as e:  # one broken section must not hide the others
                    report["errors"][name] = f"{type(e).__name__}: {e}"
                    log(f"{name} FAILED: {e}")
                    if self.args.verbose:
                        traceback.print_exc()
        report["total_s"] = round(time.monotonic() - t0, 1)
        if not self.args.keep:
            remove_tree(self.runs)
        return report


def narinfo_url(body: bytes) -> str:
    for line in body.decode().splitlines():
        if line.startswith("URL: "):
            return line[5:].strip().lstrip("/")
    raise BenchError("narinfo without URL:")


def find_nar_file(nar_dir: Path, nar_url: str, sizes: set[int]) -> Path | None:
    """The committed NAR: a file of the right size, preferably named after the URL."""
    if not nar_dir.is_dir():
        return None
    stem = Path(nar_url).name.split(".")[0]
    hits = [p for p in nar_dir.rglob("*") if p.is_file() and p.stat().st_size in sizes]
    hits.sort(key=lambda p: stem not in p.name)
    return hits[0] if hits else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
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
        "--rounds",
        type=int,
        default=5,
        help="rounds for NAR throughput and cold substitution (default 5)",
    )
    p.add_argument(
        "--closure-rounds",
        type=int,
        help="rounds for the closure section (default: --rounds, at most 3)",
    )
    p.add_argument("--wrk-rounds", type=int, default=3)
    p.add_argument("--wrk-seconds", type=int, default=5)
    p.add_argument(
        "--db-narinfos",
        type=int,
        default=40_000,
        help="narinfo rows per database for db_narinfo_rps (default 40000; more "
        "than ncps keeps in memory)",
    )
    choices = [*SECTIONS, *GROUPS]
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=choices,
        help="leave a section out; 'backends' = s3_nar_throughput + db_narinfo_rps",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        choices=choices,
        help="run only these sections (repeatable); e.g. --only backends",
    )
    p.add_argument(
        "--ncps-arg",
        action="append",
        default=[],
        help="extra daemon flag, repeatable; {workdir} = the daemon's fresh dir",
    )
    p.add_argument(
        "--ncps-command",
        metavar="CMD",
        help="daemon command instead of '<python> -m twisted ncps' (it gets the "
        "contract's flags appended; the availability check is skipped)",
    )
    p.add_argument("--no-ncps", action="store_true", help="baselines only")
    p.add_argument(
        "--keep", action="store_true", help="keep <scratch>/runs (logs, storage)"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    def expand(names: list[str]) -> set[str]:
        return {s for n in names for s in GROUPS.get(n, [n])}

    chosen = expand(args.only) if args.only else set(SECTIONS)
    args.sections = [s for s in SECTIONS if s in chosen - expand(args.skip)]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "wrk", "curl", "nix-store", "nix"):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} not found "
                "(apt-get install nix-bin nginx-light wrk curl)",
                file=sys.stderr,
            )
            return 2
    args.scratch.mkdir(parents=True, exist_ok=True)
    report = Bench(args).run()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "latest.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    fx = report.get("fixture", {})
    print(
        f"\nfixture {'reused' if fx.get('reused') else 'built'} "
        f"(build {fx.get('build_s')}s); whole run {report['total_s']}s; JSON: {out}"
    )
    for name, err in report["errors"].items():
        print(f"error in {name}: {err}", file=sys.stderr)
    if not report["ncps"]["available"]:
        print(
            "\nncps daemon UNAVAILABLE, only baselines measured: "
            + str(report["ncps"]["reason"]),
            file=sys.stderr,
        )
        return 2
    if report["errors"]:
        return 1
    if args.strict and any(
        report.get(k, {}).get("pass") is False for k in [*TARGETS, "closure"]
    ):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
