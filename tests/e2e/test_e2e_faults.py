"""Backend faults with a real Nix client: S3 and the database failing under ncps.

* S3 or the database unusable at startup: exit 78 with one line naming the flag.
* S3 down while a NAR is fetched: the client still gets the verified NAR, but
  nothing is stored (no object, no pending upload, no row, no temp file).
* S3 down when a stored NAR is asked for: 503, never a partial body; S3 cut
  mid-stream: the connection is aborted short of Content-Length.
* The database restarting under a running daemon: 503 meanwhile, then the
  same daemon serves again without a restart.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import time

import pytest
from e2e_harness import (
    PROXY_HOSTNAME,
    REPO_ROOT,
    Backend,
    FaultyProxy,
    StreamingGet,
    daemon_command,
    free_port,
    part_files,
    wait_for_committed_nar,
    wait_until,
)
from servers import PostgresServer

pytestmark = [
    pytest.mark.e2e,
    # These tests choose their own backends: run each once.
    pytest.mark.parametrize("e2e_backend_name", ["faults"]),
]


def _startup_error(tmp_path, nix_fixture, flags: list[str]) -> tuple[int, str, float]:
    cmd = [
        *daemon_command(),
        f"--cache-hostname={PROXY_HOSTNAME}",
        f"--server-addr=127.0.0.1:{free_port()}",
        "--cache-upstream-url=http://127.0.0.1:9",
        f"--cache-upstream-public-key={nix_fixture.upstream_pubkey}",
        *flags,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc.returncode, proc.stderr.decode(), time.monotonic() - started


def test_unusable_backends_stop_startup_with_one_line(
    tmp_path, nix_fixture, s3_server, e2e_backend_name
):
    s3 = [
        f"--cache-storage-s3-access-key-id={s3_server.access_key_id}",
        f"--cache-storage-s3-secret-access-key={s3_server.secret_access_key}",
        "--cache-storage-s3-force-path-style=true",
        f"--cache-temp-path={tmp_path / 'tmp'}",
        f"--cache-database-url=sqlite:{tmp_path}/db.sqlite3",
    ]
    cases = [
        (
            [
                *s3,
                "--cache-storage-s3-bucket=nars",
                f"--cache-storage-s3-endpoint=http://127.0.0.1:{free_port()}",
            ],
            "--cache-storage-s3-endpoint: cannot reach",
        ),
        (
            [
                *s3,
                "--cache-storage-s3-bucket=no-such-bucket",
                f"--cache-storage-s3-endpoint={s3_server.endpoint}",
            ],
            "--cache-storage-s3-bucket: bucket 'no-such-bucket' does not exist",
        ),
        (
            [*s3[:4], "--cache-storage-s3-bucket=nars"],
            "--cache-storage-s3-endpoint: required with S3 storage",
        ),
        (
            [
                f"--cache-storage-local={tmp_path / 'storage'}",
                f"--cache-database-url=postgresql://ncps:pw@127.0.0.1:{free_port()}/x",
            ],
            "--cache-database-url: postgresql://ncps:***@127.0.0.1:",
        ),
    ]
    for flags, expected in cases:
        rc, stderr, took = _startup_error(tmp_path, nix_fixture, flags)
        lines = stderr.strip().splitlines()
        assert rc == 78, (flags, rc, stderr)
        assert len(lines) == 1 and lines[0].startswith("ncps: " + expected), stderr
        assert "pw@" not in stderr
        assert took < 30, took
    # Nothing listened and nothing was stored.
    assert not (tmp_path / "storage" / "store" / "nar").exists() or not any(
        (tmp_path / "storage" / "store" / "nar").rglob("*.nar*")
    )


def _objects(s3_server, bucket: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/")
    return [o["Key"] for o in listing.get("Contents", [])]


def test_s3_outage_never_stores_or_serves_partial_nars(
    tmp_path,
    nix_fixture,
    upstream_factory,
    ncps_factory,
    nix_client_factory,
    s3_server,
    e2e_backend_name,
):
    bucket = s3_server.new_bucket()
    proxy = FaultyProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    try:
        proxied = type(s3_server).__new__(type(s3_server))
        proxied.__dict__.update(s3_server.__dict__)
        proxied.endpoint = proxy.url
        db_url = f"sqlite:{tmp_path}/db/ncps.sqlite3"
        backend = Backend("sqlite-s3", tmp_path / "storage", db_url, proxied, bucket)
        ncps = ncps_factory(upstream_factory("zstd"), backend=backend)
        key = ncps.pubkey()

        # 1. S3 is down while the NARs are fetched: the client is served the
        #    verified bytes from the download itself; nothing is stored.
        proxy.down()
        client = nix_client_factory()
        res = client.substitute([nix_fixture.path("app")], ncps.url, [key])
        assert res.rc == 0, str(res)
        assert client.verify([key]).rc == 0
        temp = tmp_path / "storage" / "tmp"
        wait_until(
            lambda: temp.exists() and not part_files(temp), 30, "temp files removed"
        )
        assert ncps.db_rows("nar_files") == []
        proxy.up()
        assert _objects(s3_server, bucket) == []
        uploads = s3_server.client().list_multipart_uploads(Bucket=bucket)
        assert uploads.get("Uploads", []) == []

        # 2. S3 back: the next request stores the NAR for good.
        narinfo = ncps.narinfo(nix_fixture.hash("big"))
        nar_url = "/" + str(narinfo["URL"])
        assert ncps.get(nar_url).status == 200
        wait_for_committed_nar(ncps, nix_fixture.nar_sha256("big"))
        wait_until(lambda: len(ncps.db_rows("nar_files")) >= 1, 30, "nar_files row")

        # 3. S3 down when a stored NAR is asked for: 503 with Retry-After.
        proxy.down()
        resp = ncps.get(nar_url)
        assert resp.status == 503, resp.status
        assert resp.headers.get("retry-after") == "5"
        assert b"Service Unavailable" in resp.body
        proxy.up()

        # 4. S3 cut mid-stream: the client's connection is aborted before
        #    Content-Length, so it can never take a short NAR for a whole one.
        reader = StreamingGet(ncps.port, nar_url)
        assert reader.status == 200
        length = int(reader.response.getheader("Content-Length"))
        reader.read_at_least(1 << 20)
        proxy.down()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            body = reader.read_all()
            assert len(body) < length  # pragma: no cover - the read must fail
        reader.close()
        proxy.up()

        # And the daemon is fine afterwards.
        resp = ncps.get(nar_url)
        assert resp.status == 200 and len(resp.body) == length
    finally:
        proxy.close()


def test_database_restart_is_survived(
    tmp_path, nix_fixture, upstream_factory, ncps_factory, nix_client_factory,
    e2e_backend_name,
):  # fmt: skip
    server = PostgresServer.create()
    try:
        backend = Backend("postgres-local", tmp_path / "storage", server.new_database())
        upstream = upstream_factory("xz")
        ncps = ncps_factory(upstream, backend=backend)
        key = ncps.pubkey()
        res = nix_client_factory().substitute(
            [nix_fixture.path("leaf")], ncps.url, [key]
        )
        assert res.rc == 0, str(res)
        wait_until(lambda: len(ncps.db_rows("nar_files")) == 1, 30, "leaf stored")
        leaf_info = ncps.narinfo(nix_fixture.hash("leaf"))
        leaf_nar = "/" + str(leaf_info["URL"])

        server.stop()
        assert ncps.get(f"/{nix_fixture.hash('app')}.narinfo").status == 503
        # A stored NAR's recorded size is known in memory: still served.
        stored = ncps.get(leaf_nar)
        assert stored.status == 200
        assert len(stored.body) == int(str(leaf_info["FileSize"]))
        server.start()

        # The same daemon, no restart: new paths are fetched and stored again.
        client = nix_client_factory()
        res = client.substitute([nix_fixture.path("app")], ncps.url, [key])
        assert res.rc == 0, str(res)
        assert client.verify([key]).rc == 0
        wait_until(lambda: len(ncps.db_rows("nar_files")) == 3, 30, "app stored")
        assert ncps.get(leaf_nar).status == 200
    finally:
        server.destroy()
