"""The benchmark's targets, verdicts and the printed table."""

from __future__ import annotations

import os
import platform
import subprocess

import closure
from procs import REPO

TARGETS = {
    "nar_throughput": (">=", 0.7),
    "narinfo_rps": (">=", 0.6),
    "cold_substitution": ("<=", 1.15),
    "peak_rss": ("<=", 150.0),  # absolute, MB
}


def verdict(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, bound = TARGETS[name]
    return value >= bound if op == ">=" else value <= bound


def machine_info(env: dict[str, str]) -> dict:
    """Versions and load. ``env`` keeps nix-store off /nix: --version opens a store."""

    def version(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, env=env)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nix": version(["nix-store", "--version"]),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "--version"]),
        "git_head": version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


def table(report: dict) -> str:
    rows = [("figure", "ncps", "baseline", "ratio", "target", "ok")]

    def ok(flag):
        return {True: "PASS", False: "FAIL", None: "-"}[flag]

    selected = report.get("sections")

    def shown(name):
        return selected is None or name in selected

    def add(name, label, ncps_key, base_key, unit, ratio_key="ratio"):
        if not shown(name):
            return
        sec = report.get(name)
        if sec is None:
            err = report["errors"].get(name, "skipped")
            rows.append((label, "n/a", "n/a", "-", "", err.splitlines()[0][:60]))
            return
        ncps = sec.get(ncps_key)
        base = sec.get(base_key)
        targeted = name in TARGETS and ratio_key == "ratio"
        op, bound = TARGETS.get(name, ("", ""))
        rows.append(
            (
                label,
                f"{ncps} {unit}" if ncps is not None else "n/a",
                f"{base} {unit}" if base is not None else "n/a",
                str(sec.get(ratio_key, "n/a")),
                f"{op} {bound}" if targeted else "",
                ok(sec.get("pass")) if targeted else "",
            )
        )

    add(
        "nar_throughput",
        "warm NAR 1 conn (vs nginx)",
        "ncps_median_MBps",
        "nginx_median_MBps",
        "MB/s",
    )
    add(
        "nar_throughput",
        "warm NAR 4 conns (vs nginx)",
        "ncps_c4_median_MBps",
        "nginx_c4_median_MBps",
        "MB/s",
        "ratio_c4",
    )
    add(
        "narinfo_rps",
        "warm narinfo wrk -c4 (vs Klein)",
        "ncps_median_rps",
        "klein_median_rps",
        "req/s",
    )
    add(
        "cold_substitution",
        "cold closure subst. (vs direct)",
        "ncps_median_s",
        "direct_median_s",
        "s",
    )
    rss = report.get("peak_rss")
    if not shown("peak_rss"):
        pass
    elif rss:
        rows.append(
            (
                "peak RSS, 1 GB cold stream",
                f"{rss['peak_MB']} MB",
                f"{rss['idle_hwm_MB']} MB idle",
                str(rss["ratio"]),
                "<= 150 MB",
                ok(rss.get("pass")),
            )
        )
    else:
        err = report["errors"].get("peak_rss", "skipped")
        rows.append(
            (
                "peak RSS, 1 GB cold stream",
                "n/a",
                "n/a",
                "-",
                "<= 150 MB",
                err.splitlines()[0][:60],
            )
        )
    if shown("s3_nar_throughput"):
        s3 = "s3_nar_throughput"
        add(
            s3,
            "S3 warm NAR 1 conn (vs local)",
            "s3_median_MBps",
            "local_median_MBps",
            "MB/s",
        )
        add(
            s3,
            "S3 warm NAR 4 conns (vs local)",
            "s3_c4_median_MBps",
            "local_c4_median_MBps",
            "MB/s",
            "ratio_c4",
        )
        add(
            s3,
            "S3 warm NAR 1 conn (vs raw moto GET)",
            "s3_median_MBps",
            "moto_median_MBps",
            "MB/s",
            "s3_vs_moto_raw",
        )
        add(
            s3,
            "S3 warm NAR 4 conns (vs raw moto GET)",
            "s3_c4_median_MBps",
            "moto_c4_median_MBps",
            "MB/s",
            "s3_vs_moto_raw_c4",
        )
    if shown("db_narinfo_rps"):
        for kind, label in (("hot", "hot narinfo"), ("db", "db-bound narinfo")):
            add(
                "db_narinfo_rps",
                f"{label} SQLite (vs Klein)",
                f"sqlite_{kind}_median_rps",
                f"klein_{kind}_median_rps",
                "req/s",
                f"sqlite_{kind}_vs_klein",
            )
            for db, name in (("postgresql", "PostgreSQL"), ("mariadb", "MariaDB")):
                add(
                    "db_narinfo_rps",
                    f"{label} {name} (vs SQLite)",
                    f"{db}_{kind}_median_rps",
                    f"sqlite_{kind}_median_rps",
                    "req/s",
                    f"{db}_{kind}_vs_sqlite",
                )
    if shown("closure"):
        error = report["errors"].get("closure")
        rows.extend(closure.table_rows(report.get("closure"), error))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if shown("closure") and report.get("closure"):
        lines += ["", closure.summary(report["closure"])]
    return "\n".join(lines)
