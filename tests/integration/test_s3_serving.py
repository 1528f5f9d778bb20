"""The daemon's service tree with S3 storage, on the real reactor.

``build_service`` with an S3 bucket (moto) and SQLite: a NAR fetched cold is
uploaded (multipart above 8 MiB) and recorded, then served warm from S3 with
identical bytes.  Every boto3 call made while serving runs on the daemon's own
``s3`` pool threads: never on the reactor thread, never in the default pool.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.client
import pytest
import pytest_twisted
from servers import S3Server, free_port
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web import server, static

from ncps.config import Config, load_config
from ncps.service import build_service
from ncps.testing import (
    TEST_UPSTREAM_KEY,
    NarFixture,
    make_nar_fixture,
    nar_of_file,
    random_nar,
)

# Clients the test itself uses to look into the bucket: their calls, made on
# the reactor thread, are not the daemon's.
OBSERVERS: list[Any] = []


@pytest.fixture
def boto_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the threads the daemon's boto3 API calls are made on."""
    names: list[str] = []
    original = botocore.client.BaseClient._make_api_call

    def recording(self: Any, operation: str, params: Any) -> Any:
        if not any(self is c for c in OBSERVERS):
            names.append(threading.current_thread().name)
        return original(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    yield names


def serve_upstream(root: Path, fx: NarFixture) -> IListeningPort:
    """A static binary cache holding ``fx``, on 127.0.0.1."""
    (root / "nar").mkdir(parents=True)
    (root / "nix-cache-info").write_bytes(b"StoreDir: /nix/store\n")
    (root / f"{fx.hash_part}.narinfo").write_bytes(fx.narinfo_text)
    (root / fx.nar_path).write_bytes(fx.file)
    port: IListeningPort = reactor.listenTCP(
        0, server.Site(static.File(str(root))), interface="127.0.0.1"
    )
    return port


def s3_config(
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    upstream: IListeningPort,
    port: int,
) -> Config:
    """The daemon on ``port`` with its NARs in the bucket and SQLite."""
    return load_config(
        {
            "cache-hostname": "cache.test",
            "cache-storage-s3-bucket": s3_bucket,
            "cache-storage-s3-endpoint": s3_server.endpoint,
            "cache-storage-s3-access-key-id": s3_server.access_key_id,
            "cache-storage-s3-secret-access-key": s3_server.secret_access_key,
            "cache-storage-s3-force-path-style": "true",
            "cache-database-url": f"sqlite:{tmp_path}/db.sqlite3",
            "cache-temp-path": str(tmp_path / "tmp"),
            "cache-upstream-url": [f"http://127.0.0.1:{upstream.getHost().port}"],
            "cache-upstream-public-key": [TEST_UPSTREAM_KEY.public_key().to_text()],
            "server-addr": f"127.0.0.1:{port}",
        },
        {},
    )


async def until_recorded(db: Path) -> None:
    """Wait (up to 15 s) for the daemon's first nar_files row."""
    for _ in range(1500):
        with sqlite3.connect(db) as conn:
            if conn.execute("SELECT COUNT(*) FROM nar_files").fetchone()[0]:
                return
        await deferLater(reactor, 0.01, lambda: None)


async def http_get(url: str) -> tuple[int, bytes]:
    import treq

    response = await treq.get(url)
    return response.code, await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_nars_go_up_and_come_back_from_s3_on_the_s3_pool(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, boto_threads: list[str]
) -> None:
    # 12 MiB of incompressible NAR: above the single-PUT limit (8 MiB).
    fx = make_nar_fixture(nar=random_nar(12 << 20, 3), compression="none")
    upstream = serve_upstream(tmp_path / "upstream", fx)
    port = free_port()
    config = s3_config(tmp_path, s3_server, s3_bucket, upstream, port)
    service = build_service(config, reactor)
    assert boto_threads == ["MainThread"]  # the bucket check, before listening
    boto_threads.clear()
    service.startService()
    base = f"http://127.0.0.1:{port}"
    try:
        code, _ = await http_get(f"{base}/{fx.hash_part}.narinfo")
        assert code == 200
        code, cold = await http_get(base + fx.cache_nar_path())
        assert code == 200 and cold == fx.file

        client = s3_server.client()
        OBSERVERS.append(client)
        key = f"store/nar/{fx.nar_key[0]}/{fx.nar_key[:2]}/{fx.nar_key}.nar"
        for _ in range(1500):
            listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="store/")
            if [o["Key"] for o in listing.get("Contents", [])] == [key]:
                break
            await deferLater(reactor, 0.01, lambda: None)
        head = client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ContentLength"] == len(fx.file)
        assert head["ETag"].strip('"').endswith("-2")  # two multipart parts
        # The row is written after the upload; then the NAR is served warm.
        await until_recorded(tmp_path / "db.sqlite3")
        uploads = len(boto_threads)
        code, warm = await http_get(base + fx.cache_nar_path())
        assert code == 200
        assert len(boto_threads) > uploads  # read from S3, not from a temp file
        assert hashlib.sha256(warm).digest() == hashlib.sha256(fx.file).digest()
        # One byte range, asked of the bucket as a range (resume from S3).
        url = base + fx.cache_nar_path()
        gets = len(boto_threads)
        status, fields, body = await deferToThread(
            fetch, url, {"Range": "bytes=10000000-"}
        )
        assert (status, body) == (206, fx.file[10_000_000:])
        assert (
            fields["content-range"]
            == f"bytes 10000000-{len(fx.file) - 1}/{len(fx.file)}"
        )
        assert len(boto_threads) == gets + 2  # the whole-object GET, the ranged GET
        status, fields, body = await deferToThread(fetch, url, {"Range": "bytes=5-9"})
        assert (status, body) == (206, fx.file[5:10])
        status, fields, _ = await deferToThread(
            fetch, url, {"Range": f"bytes={len(fx.file)}-"}
        )
        assert (status, fields["content-range"]) == (416, f"bytes */{len(fx.file)}")
        status, fields, _ = await deferToThread(fetch, url, {}, "HEAD")
        assert fields["accept-ranges"] == "bytes"
        # Nothing but this instance's own (empty) temp dir and its lock file.
        (claimed,) = [p for p in (tmp_path / "tmp").iterdir() if p.is_dir()]
        assert list(claimed.iterdir()) == []
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [
            claimed.name,
            f"{claimed.name}.lock",
        ]
    finally:
        await service.stopService()
        await upstream.stopListening()

        OBSERVERS.clear()

    # Once listening, the daemon called boto3 only on its s3 pool's threads:
    # create, 2 parts and complete for the upload, a get for the warm read.
    assert len(boto_threads) >= 5, boto_threads
    assert {n.split("-ncps-")[-1].rsplit("-", 1)[0] for n in boto_threads} == {"s3"}, (
        boto_threads
    )
    assert all(n.startswith("PoolThread-ncps-s3-") for n in boto_threads)


def fetch(url: str, headers: dict[str, str], method: str = "GET") -> Any:
    """(status, headers, body) of one request sent exactly as given."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.putrequest(method, parts.path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        fields = {k.lower(): v for k, v in response.getheaders()}
        return response.status, fields, response.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_an_uncompressed_nar_is_kept_zstd_compressed_in_the_bucket(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    text = b"".join(b"/nix/store/%d-lib/share\n" % (i % 977) for i in range(200_000))
    fx = make_nar_fixture(nar=nar_of_file(text), compression="none")
    upstream = serve_upstream(tmp_path / "upstream", fx)
    port = free_port()
    config = s3_config(tmp_path, s3_server, s3_bucket, upstream, port)
    service = build_service(config, reactor)
    service.startService()
    url = f"http://127.0.0.1:{port}" + fx.cache_nar_path()
    try:
        code, _ = await http_get(f"http://127.0.0.1:{port}/{fx.hash_part}.narinfo")
        assert code == 200
        client = s3_server.client()
        key = (
            f"store/nar/{fx.nar_key[0]}/{fx.nar_key[:2]}/"
            f"{fx.nar_key}.nar.transparent.zst"
        )
        await until_recorded(tmp_path / "db.sqlite3")
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="store/")
        assert [o["Key"] for o in listing.get("Contents", [])] == [key]
        stored = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert len(stored) < len(fx.file) // 10

        status, fields, body = await deferToThread(
            fetch, url, {"Accept-Encoding": "gzip, zstd"}
        )
        assert (status, fields.get("content-encoding"), body) == (200, "zstd", stored)
        status, fields, body = await deferToThread(fetch, url, {})
        assert (status, body) == (200, fx.file)
        assert "content-encoding" not in fields
        assert fields["content-length"] == str(len(fx.file))
        status, fields, body = await deferToThread(
            fetch, url, {"Range": "bytes=1000000-1000099"}
        )
        assert (status, body) == (206, fx.file[1_000_000:1_000_100])
        status, fields, _ = await deferToThread(fetch, url, {}, "HEAD")
        assert (status, fields["content-length"]) == (200, str(len(fx.file)))
    finally:
        await service.stopService()
        await upstream.stopListening()
