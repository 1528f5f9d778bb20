"""Fixtures for the end-to-end suite: a real Nix client, ncps, a static upstream.

* ``nix_fixture`` (session): store paths + signed/unsigned/corrupt upstream caches,
  built offline once per session into a temporary directory (build_fixture.py).
* ``upstream_factory``: start ``upstream.py`` serving one of those caches.
* ``ncps_factory``: start the daemon against upstreams; a failed test's report gets the
  tail of its log.
* ``nix_client_factory``: a fresh, isolated client store per call.
* ``hardening_fixture`` (session): a 600-path cache for the burst test and a chain of
  10 paths, each referring to the one before (build_fixture.build_hardening_fixture).

The suite fails (it does not skip) when Nix is not installed.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, str(HERE))

from build_fixture import build_fixture, build_hardening_fixture  # noqa: E402
from e2e_harness import Backend, Ncps, UpstreamServer, remove_tree  # noqa: E402
from e2e_nix import Fixture, NixClient  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """On failure, attach the tail of every daemon log of the test to the report."""
    report = yield
    if report.failed:
        for daemon in getattr(item, "e2e_daemons", []):
            report.sections.append(
                (f"ncps log tail ({daemon.log_path})", daemon.log_tail(150))
            )
    return report


@pytest.fixture(scope="session")
def nix_fixture(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    missing = [
        tool for tool in ("nix-store", "nix", "nix-build") if shutil.which(tool) is None
    ]
    if missing:
        pytest.fail(
            f"e2e suite needs a Nix client; not found on PATH: {', '.join(missing)} "
            "(Debian/Ubuntu: apt-get install nix-bin)",
            pytrace=False,
        )
    big_mb = float(os.environ.get("NCPS_E2E_BIG_MB", "20"))
    manifest = build_fixture(tmp_path_factory.mktemp("nix-fixture"), big_mb)
    return Fixture(manifest)


@pytest.fixture(scope="session")
def hardening_fixture(
    tmp_path_factory: pytest.TempPathFactory, nix_fixture: Fixture
) -> dict:
    """The burst and chain caches (see build_hardening_fixture), once per session."""
    return build_hardening_fixture(tmp_path_factory.mktemp("nix-hardening"))


@pytest.fixture
def upstream_factory(
    tmp_path: Path, nix_fixture: Fixture
) -> Iterator[Callable[..., UpstreamServer]]:
    """``start(cache="none", throttle_bps=0, extra_args=())``.

    ``cache``: a fixture cache name or a directory; ``extra_args``: more
    ``upstream.py`` flags (delays, failures, redirects, auth, hanging).
    """
    servers: list[UpstreamServer] = []

    def start(
        cache: str | Path = "none",
        throttle_bps: int = 0,
        extra_args: Sequence[str] = (),
    ) -> UpstreamServer:
        cache_dir = nix_fixture.cache(cache) if isinstance(cache, str) else cache
        server = UpstreamServer(
            tmp_path / f"upstream-{len(servers)}", cache_dir, throttle_bps, extra_args
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# Every test using ncps_factory runs once per backend pair the issue names:
# storage and database as a home lab, a team and a MariaDB shop run them.
BACKENDS = ("sqlite-local", "postgres-s3", "mariadb-local")


@pytest.fixture(params=BACKENDS)
def e2e_backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ncps_factory(
    tmp_path: Path,
    nix_fixture: Fixture,
    request: pytest.FixtureRequest,
    e2e_backend_name: str,
) -> Iterator[Callable[..., Ncps]]:
    """``start(upstreams, keys=None, extra_args=(), backend=None, argv=None,
    nofile_limit=None)`` -> a daemon.

    ``upstreams`` is one UpstreamServer/URL or a list; ``keys`` defaults to the
    fixture's upstream public key.  Each daemon gets ``backend`` or a fresh
    one of the kind ``e2e_backend_name`` names (a new bucket and database on
    the shared servers, or a new directory).  ``argv(port)`` replaces the whole
    command line; ``nofile_limit`` is the daemon's ``ulimit -n`` (soft and hard).
    """
    daemons: list[Ncps] = []
    request.node.e2e_daemons = daemons

    def new_backend(storage: Path) -> Backend:
        if e2e_backend_name == "postgres-s3":
            s3 = request.getfixturevalue("s3_server")
            pg = request.getfixturevalue("postgres_server")
            return Backend(
                e2e_backend_name, storage, pg.new_database(), s3, s3.new_bucket()
            )
        if e2e_backend_name == "mariadb-local":
            db = request.getfixturevalue("mariadb_server")
            return Backend(e2e_backend_name, storage, db.new_database())
        return Backend(e2e_backend_name, storage)

    def start(
        upstreams: UpstreamServer | str | Sequence[UpstreamServer | str],
        keys: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        backend: Backend | None = None,
        argv: Callable[[int], Sequence[str]] | None = None,
        nofile_limit: int | None = None,
    ) -> Ncps:
        if isinstance(upstreams, (UpstreamServer, str)):
            upstreams = [upstreams]
        urls = [u.url if isinstance(u, UpstreamServer) else u for u in upstreams]
        n = len(daemons)
        daemon = Ncps(
            tmp_path / f"ncps-{n}",
            backend or new_backend(tmp_path / f"ncps-{n}" / "storage"),
            urls,
            [nix_fixture.upstream_pubkey] if keys is None else keys,
            extra_args,
            argv,
            nofile_limit,
        )
        daemons.append(daemon)
        return daemon.start()

    yield start
    errors = []
    for daemon in daemons:
        try:
            daemon.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture
def nix_client_factory(tmp_path: Path) -> Iterator[Callable[[], NixClient]]:
    """``new()`` -> a client with a fresh chroot store (deleted after the test)."""
    clients: list[NixClient] = []

    def new_client() -> NixClient:
        client = NixClient(tmp_path / f"client-{len(clients)}")
        clients.append(client)
        return client

    yield new_client
    # 16 x 20 MB per concurrency run would pile up in pytest's kept tmp dirs.
    for client in clients:
        remove_tree(client.store)
