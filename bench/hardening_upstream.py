"""A static binary-cache upstream for bench/hardening.py that counts its NAR downloads.

Run as its own process (Twisted, one reactor thread)::

    python hardening_upstream.py CACHE_DIR PORT [NAR_LINK_BYTES_PER_SECOND]

* Serves CACHE_DIR on 127.0.0.1 (GET/HEAD, Range, keep-alive; missing files are 404),
  listen backlog 1024, soft descriptor limit raised to the hard one, no access log.
  Ready when ``/_bench/stats`` answers.
* Counts GETs under /nar/ that are in flight: from the request's arrival to the end of
  its response or the loss of its connection. The most seen at once is the figure.
* With NAR_LINK_BYTES_PER_SECOND (> 0), all NAR bodies share a link of that many
  bytes/s (an upstream across a WAN link: downloads outlive the narinfo burst).
* Control paths (never counted, never hung):
  - ``/_bench/stats``: JSON of the counters;
  - ``/_bench/reset``: zeroes the counters (the in-flight count itself stays true);
  - ``/_bench/hang``: from now on every other request is accepted and never answered
    (an upstream that passed the proxy's startup check, then hung).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import BinaryIO

from twisted.internet import reactor, task
from twisted.web import server, static
from twisted.web.resource import Resource


class Counters:
    def __init__(self) -> None:
        self.hang = False
        self.reset()
        self.nar_in_flight = 0

    def reset(self) -> None:
        self.max_nar_in_flight = 0
        self.nar_gets = 0
        self.nar_aborted = 0
        self.narinfo_gets = 0
        self.other_requests = 0
        self.hung_requests = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class Control(Resource):
    isLeaf = True

    def __init__(self, counters: Counters) -> None:
        super().__init__()
        self.counters = counters

    def render_GET(self, request: server.Request) -> bytes:
        action = request.path.decode().rsplit("/", 1)[-1]
        if action == "reset":
            self.counters.reset()
        elif action == "hang":
            self.counters.hang = True
        elif action != "stats":
            request.setResponseCode(404)
            return b"unknown control path\n"
        request.setHeader("content-type", "application/json")
        return json.dumps(self.counters.as_dict()).encode()


class Hang(Resource):
    isLeaf = True

    def render(self, request: server.Request) -> object:
        return server.NOT_DONE_YET  # accepted, read, never answered


class SharedLink(Resource):
    """``/nar/<file>`` (GET, HEAD) with all bodies sharing ``bps`` bytes/s.

    Every ``TICK`` seconds the link's budget is split evenly among the bodies in
    flight (processor sharing, like one saturated WAN link), so when NARs are asked
    for faster than the link drains them, downloads pile up as they do in the field.
    """

    isLeaf = True
    TICK = 0.05
    MIN_SHARE = 4096

    def __init__(self, nar_dir: Path, bps: int) -> None:
        super().__init__()
        self.nar_dir = nar_dir
        self.budget = max(1, int(bps * self.TICK))
        self.active: dict[server.Request, BinaryIO] = {}
        self.loop: task.LoopingCall | None = None

    def render(self, request: server.Request) -> bytes | int:
        name = request.postpath[-1].decode() if request.postpath else ""
        path = self.nar_dir / name
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            return b""
        if len(request.postpath) != 1 or not name or not path.is_file():
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader("content-type", "application/octet-stream")
        request.setHeader("content-length", str(path.stat().st_size))
        if request.method == b"HEAD":
            return b""
        self.active[request] = path.open("rb")
        request.notifyFinish().addErrback(lambda _: self._drop(request))
        if self.loop is None:
            self.loop = task.LoopingCall(self._tick)
            self.loop.start(self.TICK)
        return server.NOT_DONE_YET

    def _drop(self, request: server.Request) -> None:
        source = self.active.pop(request, None)
        if source is not None:
            source.close()

    def _tick(self) -> None:
        if not self.active:
            return
        share = max(self.MIN_SHARE, self.budget // len(self.active))
        for request, source in list(self.active.items()):
            data = source.read(share)
            if data:
                request.write(data)
            if len(data) < share:
                self._drop(request)
                request.finish()


class Upstream(Resource):
    def __init__(self, cache_dir: Path, counters: Counters, nar_bps: int) -> None:
        super().__init__()
        self.files = static.File(str(cache_dir), defaultType="application/octet-stream")
        self.paced = SharedLink(cache_dir / "nar", nar_bps) if nar_bps > 0 else None
        self.control = Control(counters)
        self.counters = counters

    def getChild(self, name: bytes, request: server.Request) -> Resource:
        c = self.counters
        if name == b"_bench":
            return self.control
        if c.hang:
            c.hung_requests += 1
            return Hang()
        if name == b"nar" and request.method == b"GET":
            c.nar_gets += 1
            c.nar_in_flight += 1
            c.max_nar_in_flight = max(c.max_nar_in_flight, c.nar_in_flight)

            def done(result: object) -> None:
                c.nar_in_flight -= 1
                if result is not None:  # a Failure: the connection went away
                    c.nar_aborted += 1

            request.notifyFinish().addBoth(done)
        elif name.endswith(b".narinfo"):
            c.narinfo_gets += 1
        else:
            c.other_requests += 1
        if name == b"nar" and self.paced is not None:
            return self.paced
        return self.files.getChildWithDefault(name, request)


class QuietSite(server.Site):
    def log(self, request: server.Request) -> None:
        pass


def main(argv: list[str]) -> None:
    cache_dir, port = Path(argv[0]), int(argv[1])
    nar_bps = int(argv[2]) if len(argv) > 2 else 0
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    site = QuietSite(Upstream(cache_dir, Counters(), nar_bps))
    reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
