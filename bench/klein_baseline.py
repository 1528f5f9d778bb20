"""The narinfo baseline: a bare Klein app answering every GET with one narinfo's bytes.

    python bench/klein_baseline.py PORT NARINFO_FILE LOG_FILE

Listens on 127.0.0.1:PORT with the default reactor (epoll here, the one
``python -m twisted`` installs for the daemon too).  No lookup, no signing and no
per-request access log: the floor Twisted + Klein put under any narinfo route.
Startup messages and errors go to LOG_FILE.
"""

from __future__ import annotations

import sys
from pathlib import Path

from klein import Klein
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site


class QuietSite(Site):
    def log(self, request) -> None:
        """No access log: measure the framework, not the log formatter."""


def make_app(narinfo: bytes) -> Klein:
    app = Klein()

    @app.route("/<string:name>", methods=["GET", "HEAD"])
    async def narinfo_route(request, name: str) -> bytes:
        request.setHeader(b"Content-Type", b"text/x-nix-narinfo")
        return narinfo

    return app


def main(port: int, narinfo_file: Path, log_file: Path) -> None:
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log_file.open("a"))], redirectStandardIO=False
    )
    app = make_app(narinfo_file.read_bytes())
    reactor.listenTCP(port, QuietSite(app.resource()), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
