"""Fixtures shared by every test under tests/: real database and S3 servers.

Session-scoped servers start the first time a test asks for them and are destroyed at
the end of the session (and at interpreter exit, as a safety net):

* ``postgres_server``, ``mariadb_server``, ``s3_server``: see tests/servers.py.
* ``postgres_url``, ``mariadb_url``: a fresh, empty database on that server.
* ``s3_bucket``: a fresh, empty bucket name on ``s3_server``.

A missing server binary makes the fixture fail (not skip), with what to install.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, str(HERE))

from servers import MariaDBServer, PostgresServer, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session."""
    server = PostgresServer.create()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """A MariaDB server for the whole session."""
    server = MariaDBServer.create()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the whole session."""
    server = S3Server.create()
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a fresh database on the session's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture
def mariadb_url(mariadb_server: MariaDBServer) -> str:
    """URL of a fresh database on the session's MariaDB server."""
    return mariadb_server.new_database()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """Name of a fresh bucket on the session's S3 server."""
    return s3_server.new_bucket()
