"""Client-side measurements: curl downloads, wrk runs, /proc memory readings.

The clients share the machine's two cores with the server under test; every figure is
therefore compared with a baseline server measured the same way in the same run.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

MB = 1_000_000


def curl_download(url: str) -> tuple[int, float]:
    """GET ``url`` on one fresh connection, body discarded; (bytes, seconds)."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if len(out) != 3 or out[0] != "200":
        raise RuntimeError(f"GET {url} -> {' '.join(out) or 'no answer'}")
    return int(out[1]), float(out[2])


def single_stream_mbps(url: str, expected_bytes: int) -> float:
    size, seconds = curl_download(url)
    if size != expected_bytes:
        raise RuntimeError(f"GET {url}: {size} bytes, expected {expected_bytes}")
    return size / seconds / MB


def parallel_mbps(url: str, expected_bytes: int, connections: int) -> float:
    """``connections`` concurrent full downloads; aggregate MB/s over the wall time."""
    fmt = "%{http_code} %{size_download}\n"
    t = time.monotonic()
    procs = [
        subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-w", fmt, url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(connections)
    ]
    outs = [p.communicate()[0].split() for p in procs]
    elapsed = time.monotonic() - t
    for out in outs:
        if out != ["200", str(expected_bytes)]:
            raise RuntimeError(f"parallel GET {url} -> {out}")
    return expected_bytes * connections / elapsed / MB


def wrk_rps(
    url: str, duration_s: int, connections: int = 4, script: Path | None = None
) -> dict:
    """One wrk run (1 thread); requests/s, failing if any answer was not 2xx/3xx.

    ``script``: a wrk Lua script (e.g. one choosing each request's path).
    """
    extra = ["-s", str(script)] if script else []
    proc = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s}s",
            "--latency",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    text = proc.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk {url} failed: {proc.stdout}{proc.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if bad:
        raise RuntimeError(f"wrk {url}: {bad.group(1)} non-2xx answers")
    errors = re.search(r"Socket errors:.*", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    done = re.search(r"(\d+) requests in", text)
    return {
        "rps": float(m.group(1)),
        "requests": int(done.group(1)) if done else 0,
        "p50": p50.group(1) if p50 else None,
        "p99": p99.group(1) if p99 else None,
        "socket_errors": errors.group(0) if errors else None,
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM, ...) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def hwm_mb(pid: int) -> float:
    """Peak resident memory of ``pid`` so far (VmHWM), in MB."""
    return round(proc_status_kib(pid, "VmHWM") * 1024 / MB, 1)


def fd_count(pid: int) -> int:
    """How many descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval`` seconds in a thread (max kept);
    with ``count_fds``, its open descriptors too (``max_fds``)."""

    def __init__(
        self, pid: int, interval: float = 0.02, count_fds: bool = False
    ) -> None:
        self.pid = pid
        self.interval = interval
        self.count_fds = count_fds
        self.max_kib = 0
        self.max_fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.count_fds:
                    self.max_fds = max(self.max_fds, fd_count(self.pid))
                self.max_kib = max(self.max_kib, proc_status_kib(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return  # the process is gone
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
