"""The benchmark's targets, verdicts and the printed table."""

from __future__ import annotations

import os
import platform
import subprocess

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

    def add(name, label, ncps_key, base_key, unit, ratio_key="ratio"):
        sec = report.get(name)
        if sec is None:
            err = report["errors"].get(name, "skipped")
            rows.append((label, "n/a", "n/a", "-", "", err.splitlines()[0][:60]))
            return
        ncps = sec.get(ncps_key)
        base = sec.get(base_key)
        op, bound = TARGETS[name]
        rows.append(
            (
                label,
                f"{ncps} {unit}" if ncps is not None else "n/a",
                f"{base} {unit}" if base is not None else "n/a",
                str(sec.get(ratio_key, "n/a")),
                f"{op} {bound}" if ratio_key == "ratio" else "",
                ok(sec.get("pass")) if ratio_key == "ratio" else "",
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
    if rss:
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
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
