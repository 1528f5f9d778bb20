"""A static Nix binary cache over HTTP for the e2e tests (stands in for an upstream).

Run as its own process::

    python upstream.py --dir CACHE_DIR --port-file FILE --log FILE
                       [--port N] [--throttle-bps N] [--throttle-prefix /nar/]
                       [--delay SECONDS] [--fail-status N] [--redirect-to URL]
                       [--basic-auth USER:PASSWORD] [--hang-file FILE]
                       [--hang-spare PATH]...

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
* ``--delay`` holds each response to a ``--throttle-prefix`` path that many seconds
  before its headers, so many NAR downloads are in flight at once. Every request
  record carries ``nar_inflight``: the ``/nar/`` requests being served at that moment,
  this one included (the most concurrent downloads a proxy ever had open).
* Misbehaving on purpose, for ``--throttle-prefix`` paths: ``--fail-status`` answers
  them with that status; ``--redirect-to`` answers 307 with ``Location: URL + path +
  ?X-Amz-...`` (the shape of a presigned S3 URL; the query is ignored when served).
* ``--basic-auth`` answers 401 to any request without those credentials (records get
  ``"auth": "ok" | "missing" | "wrong"``).
* ``--hang-file``: while that file exists, every request is read and never answered
  (the connection stays open until the peer gives up), as a half-dead upstream does;
  except requests for a ``--hang-spare`` path (e.g. ``/nix-cache-info``: an upstream
  whose health check still passes while everything else hangs).
* SIGTERM stops it. Restarting on the same port (SO_REUSEADDR) with another ``--dir`` is
  how a test swaps, say, a corrupt cache for a good one.
"""

from __future__ import annotations

import argparse
import base64
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


class _Behaviour:
    """What ``main``'s flags ask of the handler, and the in-flight NAR counter."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.throttle_bps: int = args.throttle_bps
        self.prefix: str = args.throttle_prefix
        self.delay: float = args.delay
        self.fail_status: int = args.fail_status
        self.redirect_to: str = args.redirect_to.rstrip("/")
        self.hang_file: Path | None = args.hang_file
        self.hang_spare: frozenset[str] = frozenset(args.hang_spare)
        self.expected_auth = (
            "Basic " + base64.b64encode(args.basic_auth.encode()).decode()
            if args.basic_auth
            else ""
        )
        self._lock = threading.Lock()
        self._nar_inflight = 0

    def enter(self, path: str) -> int:
        with self._lock:
            if path.startswith("/nar/"):
                self._nar_inflight += 1
            return self._nar_inflight

    def leave(self, path: str) -> None:
        if path.startswith("/nar/"):
            with self._lock:
                self._nar_inflight -= 1

    def auth(self, header: str | None) -> str:
        if not self.expected_auth:
            return "none"
        if header is None:
            return "missing"
        return "ok" if header == self.expected_auth else "wrong"


def make_handler(
    root: Path, log: _Log, how: _Behaviour
) -> type[BaseHTTPRequestHandler]:
    throttle_bps, throttle_prefix = how.throttle_bps, how.prefix

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

        def _hang(self, path: str) -> None:
            """Never answer: wait until the peer closes the connection."""
            log.write(event="hang", method=self.command, path=path)
            self.close_connection = True
            try:
                while self.connection.recv(65536):
                    pass
            except OSError:
                pass

        def _send_empty(self, status: int, headers: dict[str, str]) -> None:
            body = f"{status} from e2e upstream\n".encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _serve(self, with_body: bool) -> None:
            path = urlsplit(self.path).path
            inflight = how.enter(path)
            try:
                self._serve_counted(path, with_body, inflight)
            finally:
                how.leave(path)

        def _serve_counted(self, path: str, with_body: bool, inflight: int) -> None:
            auth = how.auth(self.headers.get("Authorization"))
            log.write(
                event="request", method=self.command, path=path,
                nar_inflight=inflight, auth=auth,
            )  # fmt: skip
            if (
                how.hang_file is not None
                and path not in how.hang_spare
                and how.hang_file.exists()
            ):
                self._hang(path)
                return
            special = path.startswith(throttle_prefix)
            status, sent, aborted = 404, 0, False
            try:
                if auth in ("missing", "wrong"):
                    status = 401
                    self._send_empty(401, {"WWW-Authenticate": 'Basic realm="e2e"'})
                    return
                if special and how.delay:
                    time.sleep(how.delay)
                if special and how.fail_status:
                    status = how.fail_status
                    self._send_empty(status, {})
                    return
                if special and how.redirect_to:
                    status = 307
                    location = (
                        f"{how.redirect_to}{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                        "&X-Amz-Expires=300&X-Amz-Signature=0123456789abcdef"
                    )
                    self._send_empty(307, {"Location": location})
                    return
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
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-status", type=int, default=0)
    parser.add_argument("--redirect-to", default="")
    parser.add_argument("--basic-auth", default="")
    parser.add_argument("--hang-file", type=Path, default=None)
    parser.add_argument("--hang-spare", action="append", default=[])
    args = parser.parse_args()

    root = args.dir.resolve()
    log = _Log(args.log)
    handler = make_handler(root, log, _Behaviour(args))
    ThreadingHTTPServer.daemon_threads = True
    # A proxy opening hundreds of connections at once must not meet SYN drops.
    ThreadingHTTPServer.request_queue_size = 1024
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
