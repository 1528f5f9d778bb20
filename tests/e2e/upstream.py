"""A static Nix binary cache over HTTP for the e2e tests (stands in for an upstream).

Run as its own process::

    python upstream.py --dir CACHE_DIR --port-file FILE --log FILE
                       [--port N] [--throttle-bps N] [--throttle-prefix /nar/]

* Serves CACHE_DIR on 127.0.0.1 with GET and HEAD (HTTP/1.1, keep-alive, Content-Length
  always set); anything outside CACHE_DIR or missing is 404; other methods are 405.
* Listens on ``--port`` (0 = any free port) and, once the socket is listening, writes
  the port number to ``--port-file`` (atomically). That file is the readiness signal:
  no probe request has to go through (and pollute) the request log.
* Appends one JSON object per line to ``--log`` for every request when it arrives
  (``"event": "request"``) and when its response is finished (``"event": "done"``, with
  status and body bytes sent; ``"aborted": true`` if the peer went away).
* ``--throttle-bps`` paces bodies of paths starting with ``--throttle-prefix`` to that
  many bytes per second, so a NAR download stays in flight long enough to race it.
* SIGTERM stops it. Restarting on the same port (SO_REUSEADDR) with another ``--dir`` is
  how a test swaps, say, a corrupt cache for a good one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024


class _Log:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)
        self._lock = threading.Lock()

    def write(self, **record: object) -> None:
        record["t"] = time.time()
        line = json.dumps(record, sort_keys=True)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def _content_type(name: str) -> str:
    if name.endswith(".narinfo"):
        return "text/x-nix-narinfo"
    if name == "nix-cache-info":
        return "text/x-nix-cache-info"
    return "application/octet-stream"


def make_handler(
    root: Path, log: _Log, throttle_bps: int, throttle_prefix: str
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "e2e-upstream/1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # the JSON log is the record

        def _resolve(self, url_path: str) -> Path | None:
            candidate = (root / unquote(url_path).lstrip("/")).resolve()
            if candidate != root and root not in candidate.parents:
                return None
            return candidate if candidate.is_file() else None

        def _serve(self, with_body: bool) -> None:
            path = urlsplit(self.path).path
            log.write(event="request", method=self.command, path=path)
            status, sent, aborted = 404, 0, False
            try:
                target = self._resolve(path)
                if target is None:
                    body = b"404 not found\n"
                    self.send_response(404)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if with_body:
                        self.wfile.write(body)
                    return
                status = 200
                size = target.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", _content_type(target.name))
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if with_body:
                    rate = throttle_bps if path.startswith(throttle_prefix) else 0
                    sent = self._send_file(target, rate)
            except (BrokenPipeError, ConnectionResetError):
                aborted = True
                self.close_connection = True
            finally:
                log.write(
                    event="done", method=self.command, path=path, status=status,
                    bytes=sent, aborted=aborted,
                )  # fmt: skip

        def _send_file(self, target: Path, rate: int) -> int:
            sent = 0
            started = time.monotonic()
            with target.open("rb") as f:
                while chunk := f.read(
                    CHUNK if rate == 0 else min(CHUNK, max(1, rate // 20))
                ):
                    if rate:
                        # Pace against the start time, so the average rate is exact.
                        due = started + (sent + len(chunk)) / rate
                        delay = due - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    self.wfile.write(chunk)
                    sent += len(chunk)
            self.wfile.flush()
            return sent

        def do_GET(self) -> None:
            self._serve(with_body=True)

        def do_HEAD(self) -> None:
            self._serve(with_body=False)

        def _not_allowed(self) -> None:
            log.write(
                event="request", method=self.command, path=urlsplit(self.path).path
            )
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = do_DELETE = _not_allowed

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--throttle-bps", type=int, default=0)
    parser.add_argument("--throttle-prefix", default="/nar/")
    args = parser.parse_args()

    root = args.dir.resolve()
    log = _Log(args.log)
    handler = make_handler(root, log, args.throttle_bps, args.throttle_prefix)
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    port = server.server_address[1]
    tmp = args.port_file.with_name(args.port_file.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(args.port_file)
    server.serve_forever(poll_interval=0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
