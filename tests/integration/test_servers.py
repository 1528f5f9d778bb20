"""The real servers of tests/servers.py answer real round trips."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pymysql
import pytest
from botocore.exceptions import ClientError
from servers import MariaDBServer, PostgresServer, S3Server, ServerError


def test_postgres_round_trip(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    url = urlsplit(postgres_url)
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == ("127.0.0.1", postgres_server.port)
    assert url.path.startswith("/ncps_")
    conn = psycopg2.connect(postgres_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (k text PRIMARY KEY, v bigint)")
            cur.execute("INSERT INTO t VALUES ('a', 1), ('b', 2)")
        with conn.cursor() as cur:
            cur.execute("SELECT current_database(), sum(v) FROM t")
            assert cur.fetchone() == (url.path[1:], 3)
    finally:
        conn.close()


def test_postgres_databases_are_fresh(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.new_database(), postgres_server.new_database()
    assert first != second
    conn = psycopg2.connect(second)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


def test_postgres_stop_start_keeps_data() -> None:
    server = PostgresServer.create()
    try:
        url = server.new_database()
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v text)")
            cur.execute("INSERT INTO kept VALUES ('still here')")
        conn.close()
        port = server.port
        server.stop()
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(url, connect_timeout=2)
        server.start()
        assert server.port == port
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT v FROM kept")
                assert cur.fetchall() == [("still here",)]
        finally:
            conn.close()
    finally:
        server.destroy()
    assert not server.directory.exists()


def _mariadb_connect(url: str) -> Any:
    parts = urlsplit(url)
    assert parts.scheme == "mysql" and parts.username == "root"
    return pymysql.connect(
        host=parts.hostname, port=parts.port, user="root", password="",
        database=parts.path[1:],
    )  # fmt: skip


def test_mariadb_round_trip(mariadb_server: MariaDBServer, mariadb_url: str) -> None:
    assert urlsplit(mariadb_url).port == mariadb_server.port
    conn = _mariadb_connect(mariadb_url)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (k varchar(64) PRIMARY KEY, v bigint)")
            cur.execute("INSERT INTO t VALUES ('a', 1), ('A', 2)")  # _bin: distinct
            conn.commit()
            cur.execute("SELECT DATABASE(), SUM(v), COUNT(*) FROM t")
            name, total, count = cur.fetchone()
            assert (name, int(total), count) == (urlsplit(mariadb_url).path[1:], 3, 2)
            cur.execute(
                "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
                "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = DATABASE()"
            )
            assert cur.fetchone() == ("utf8mb4", "utf8mb4_bin")
    finally:
        conn.close()


def test_mariadb_stop_start_keeps_data(mariadb_server: MariaDBServer) -> None:
    url = mariadb_server.new_database()
    conn = _mariadb_connect(url)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (v text)")
        cur.execute("INSERT INTO kept VALUES ('still here')")
    conn.commit()
    conn.close()
    mariadb_server.stop()
    with pytest.raises(pymysql.err.OperationalError):
        _mariadb_connect(url)
    mariadb_server.start()
    conn = _mariadb_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchall() == (("still here",),)
    finally:
        conn.close()


def test_s3_round_trip(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = s3_server.client()
    data = os.urandom(1 << 20)
    s3.put_object(Bucket=s3_bucket, Key="nar/x.nar", Body=data)
    assert s3.get_object(Bucket=s3_bucket, Key="nar/x.nar")["Body"].read() == data
    with pytest.raises(ClientError) as excinfo:
        s3.head_object(Bucket=s3_bucket, Key="missing.narinfo")
    assert excinfo.value.response["Error"]["Code"] == "404"
    assert s3_server.new_bucket() != s3_bucket


def test_s3_restart_same_port_loses_data() -> None:
    server = S3Server.create()
    try:
        bucket = server.new_bucket()
        server.stop()
        server.start()
        buckets = server.client().list_buckets()["Buckets"]
        assert bucket not in [b["Name"] for b in buckets]
        server.client().create_bucket(Bucket=bucket)
    finally:
        server.destroy()
    assert not server.directory.exists()


def test_missing_postgres_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    import glob

    import servers

    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    monkeypatch.setattr(servers, "_which", lambda name: None)
    with pytest.raises(ServerError, match="apt-get install postgresql"):
        PostgresServer.create()
