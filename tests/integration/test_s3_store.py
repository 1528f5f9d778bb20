"""S3Store against a real S3 server (moto in server mode) on 127.0.0.1.

The server and fresh buckets come from the shared ``s3_server`` and
``s3_bucket`` fixtures (tests/conftest.py).  Failures moto cannot produce (403
on the bucket, a body cut short) come from a tiny HTTP server in this file that
speaks just enough of S3.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from servers import S3Server, free_port

from ncps.errors import StartupError, StorageError
from ncps.storage.base import nar_object_key
from ncps.storage.s3 import PART_SIZE, S3Store

NAR_KEY = "1b9p07z77phvv2hf6gm9f28syp39f1ag"


# -- helpers ----------------------------------------------------------------


def make_store(
    endpoint: str, bucket: str, temp_dir: Path, *, region: str | None = None
) -> S3Store:
    return S3Store(
        bucket=bucket,
        endpoint=endpoint,
        region=region,
        access_key_id="testing",
        secret_access_key="testing",
        force_path_style=True,
        temp_dir=temp_dir,
    )


@pytest.fixture
def store(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> S3Store:
    s = S3Store(
        bucket=s3_bucket,
        endpoint=s3_server.endpoint,
        region=s3_server.region,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
        force_path_style=True,
        temp_dir=tmp_path / "temp",
    )
    s.prepare_thd()
    return s


def write_temp(store: S3Store, data: bytes, nar_key: str = NAR_KEY) -> Path:
    fd, path = store.new_temp_file_thd(nar_key)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def read_all(store: S3Store, nar_key: str, compression: str) -> bytes:
    nar = store.open_thd(nar_key, compression)
    assert nar is not None
    assert nar.fd is None
    chunks = []
    try:
        while chunk := nar.read_thd(256 * 1024):
            chunks.append(chunk)
    finally:
        nar.close_thd()
        nar.close_thd()  # idempotent
    data = b"".join(chunks)
    assert len(data) == nar.size
    return data


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    return free_port()


# -- startup ----------------------------------------------------------------


def test_prepare_ok_creates_temp_dir(store: S3Store) -> None:
    assert store.temp_dir.is_dir()
    assert store.kind == "s3" and store.pool_name == "s3"
    assert list(store.temp_dir.iterdir()) == []


def test_prepare_missing_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    s = make_store(s3_server.endpoint, "no-such-bucket-here", tmp_path)
    with pytest.raises(StartupError) as e:
        s.prepare_thd()
    message = str(e.value)
    assert message.startswith("--cache-storage-s3-bucket: ")
    assert "'no-such-bucket-here' does not exist" in message
    assert s3_server.endpoint in message
    assert "\n" not in message


def test_prepare_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    s = make_store(endpoint, "bucket", tmp_path)
    started = time.monotonic()
    with pytest.raises(StartupError) as e:
        s.prepare_thd()
    assert time.monotonic() - started < 5
    message = str(e.value)
    assert message.startswith(f"--cache-storage-s3-endpoint: cannot reach {endpoint}: ")
    assert "\n" not in message


def test_prepare_temp_dir_not_writable(s3_server: S3Server, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    s = make_store(s3_server.endpoint, "bucket", blocker / "temp")
    with pytest.raises(StartupError, match=r"^--cache-temp-path: "):
        s.prepare_thd()


def test_prepare_access_denied(fake_s3: _FakeS3, tmp_path: Path) -> None:
    fake_s3.head_status = 403
    s = make_store(fake_s3.endpoint, "bucket", tmp_path)
    with pytest.raises(StartupError) as e:
        s.prepare_thd()
    assert str(e.value) == (
        "--cache-storage-s3-access-key-id: access to bucket 'bucket' denied "
        "(check the access key and secret)"
    )


# -- commit, open, size, delete ---------------------------------------------


def test_commit_small_and_read_back(store: S3Store, s3_server: S3Server) -> None:
    data = os.urandom(1024)
    temp = write_temp(store, data)
    store.commit_thd(temp, NAR_KEY, "xz")
    assert not temp.exists()
    assert store.size_thd(NAR_KEY, "xz") == 1024
    assert read_all(store, NAR_KEY, "xz") == data
    head = s3_server.client().head_object(
        Bucket=store.bucket, Key=nar_object_key(NAR_KEY, "xz")
    )
    assert head["ContentType"] == "application/x-nix-nar"
    assert "-" not in head["ETag"]


def test_commit_large_is_multipart(store: S3Store, s3_server: S3Server) -> None:
    data = os.urandom(20 * 1024 * 1024)
    temp = write_temp(store, data)
    store.commit_thd(temp, NAR_KEY, "zstd")
    assert not temp.exists()
    head = s3_server.client().head_object(
        Bucket=store.bucket, Key=nar_object_key(NAR_KEY, "zstd")
    )
    parts = -(-len(data) // PART_SIZE)
    assert head["ETag"].strip('"').endswith(f"-{parts}")
    assert head["ContentType"] == "application/x-nix-nar"
    assert store.size_thd(NAR_KEY, "zstd") == len(data)
    assert read_all(store, NAR_KEY, "zstd") == data


def test_commit_exactly_one_part_is_a_single_put(store: S3Store) -> None:
    data = os.urandom(PART_SIZE)
    store.commit_thd(write_temp(store, data), NAR_KEY, "none")
    assert read_all(store, NAR_KEY, "none") == data


def test_object_key_layout(store: S3Store, s3_server: S3Server) -> None:
    store.commit_thd(write_temp(store, b"nar"), NAR_KEY, "xz")
    listed = s3_server.client().list_objects_v2(Bucket=store.bucket)
    keys = [o["Key"] for o in listed["Contents"]]
    assert keys == [f"store/nar/1/1b/{NAR_KEY}.nar.xz"]


def test_commit_replaces_existing(store: S3Store) -> None:
    store.commit_thd(write_temp(store, b"same"), NAR_KEY, "xz")
    store.commit_thd(write_temp(store, b"same"), NAR_KEY, "xz")
    assert read_all(store, NAR_KEY, "xz") == b"same"


def test_missing_object(store: S3Store) -> None:
    assert store.open_thd(NAR_KEY, "xz") is None
    assert store.size_thd(NAR_KEY, "xz") is None


def test_delete(store: S3Store) -> None:
    store.commit_thd(write_temp(store, b"x" * 10), NAR_KEY, "xz")
    store.delete_thd(NAR_KEY, "xz")
    assert store.size_thd(NAR_KEY, "xz") is None
    assert store.open_thd(NAR_KEY, "xz") is None
    store.delete_thd(NAR_KEY, "xz")  # missing is fine


def test_discard_temp(store: S3Store) -> None:
    temp = write_temp(store, b"partial")
    assert temp.parent == store.temp_dir
    assert temp.name.startswith(f"{NAR_KEY}-")
    store.discard_thd(temp)
    assert not temp.exists()
    store.discard_thd(temp)  # missing is fine


def test_iter_objects(store: S3Store, s3_server: S3Server) -> None:
    committed = {
        (NAR_KEY, "xz", 3),
        ("0a" + NAR_KEY[2:], "none", 5),
        ("0b" + NAR_KEY[2:], "zstd", 7),
    }
    for key, compression, size in committed:
        store.commit_thd(write_temp(store, b"n" * size, key), key, compression)
    client = s3_server.client()
    for foreign in ("other/x", "store/nar/bogus", "store/nar/x/xy/zz.nar"):
        client.put_object(Bucket=store.bucket, Key=foreign, Body=b"f")
    assert set(store.iter_objects_thd()) == committed


# -- failures ---------------------------------------------------------------


def test_failed_multipart_leaves_nothing(
    store: S3Store, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_upload_part = store.client.upload_part
    calls = []

    def failing_upload_part(**kwargs: Any) -> Any:
        calls.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] == 2:
            raise ConnectionResetError("injected")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(store.client, "upload_part", failing_upload_part)
    temp = write_temp(store, os.urandom(3 * PART_SIZE))
    with pytest.raises(StorageError, match="injected"):
        store.commit_thd(temp, NAR_KEY, "xz")
    assert calls == [1, 2]
    # The caller discards the temp file; the store keeps it on failure.
    assert temp.exists()
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=store.bucket).get("Contents", []) == []
    uploads = client.list_multipart_uploads(Bucket=store.bucket)
    assert uploads.get("Uploads", []) == []
    assert store.size_thd(NAR_KEY, "xz") is None


def test_failed_put_raises_storage_error(tmp_path: Path) -> None:
    s = make_store(f"http://127.0.0.1:{closed_port()}", "bucket", tmp_path)
    temp = write_temp(s, b"data")
    with pytest.raises(StorageError, match=r"s3 upload store/nar/"):
        s.commit_thd(temp, NAR_KEY, "xz")
    assert temp.exists()


def test_unreachable_during_open_and_size(tmp_path: Path) -> None:
    s = make_store(f"http://127.0.0.1:{closed_port()}", "bucket", tmp_path)
    with pytest.raises(StorageError, match="Connection refused"):
        s.open_thd(NAR_KEY, "xz")
    with pytest.raises(StorageError):
        s.size_thd(NAR_KEY, "xz")
    with pytest.raises(StorageError):
        s.delete_thd(NAR_KEY, "xz")
    with pytest.raises(StorageError):
        list(s.iter_objects_thd())


def test_body_cut_short_while_reading(fake_s3: _FakeS3, tmp_path: Path) -> None:
    fake_s3.body_size = 1_000_000
    fake_s3.body_sent = 100_000
    s = make_store(fake_s3.endpoint, "bucket", tmp_path)
    nar = s.open_thd(NAR_KEY, "xz")
    assert nar is not None
    assert nar.size == 1_000_000
    received = 0
    with pytest.raises(StorageError, match=r"^s3 read store/nar/"):
        while chunk := nar.read_thd(64 * 1024):
            received += len(chunk)
    assert received <= 100_000
    nar.close_thd()


# -- a tiny misbehaving S3 ----------------------------------------------------


class _FakeS3:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self.head_status = 200
        self.body_size = 0
        self.body_sent = 0


@pytest.fixture
def fake_s3() -> Iterator[_FakeS3]:
    state: list[_FakeS3] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.send_response(state[0].head_status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            fake = state[0]
            self.send_response(200)
            self.send_header("Content-Length", str(fake.body_size))
            self.send_header("Content-Type", "application/x-nix-nar")
            self.end_headers()
            self.wfile.write(b"\0" * fake.body_sent)
            self.wfile.flush()
            # Stop mid-body, as a server that dies would.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.append(_FakeS3(server))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state[0]
    finally:
        server.shutdown()
        server.server_close()
