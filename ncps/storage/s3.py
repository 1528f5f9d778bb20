"""NAR objects in an S3 bucket (AWS or any S3-compatible server).

Objects use the same keys as local storage (``store/nar/<k0>/<k0k1>/<key>.nar[.ext]``
at the bucket's root).  Downloads in progress are local temp files in
``temp_dir``, this instance's own directory under ``--cache-temp-path`` (see
:mod:`ncps.tempdir`); a whole, verified temp file is committed by uploading it: one
``PutObject`` up to :data:`PART_SIZE`, a multipart upload above.  S3 makes an
object visible only once the put or the multipart completion succeeds, so a
failed commit never leaves a partial object.

Every ``*_thd`` method blocks and runs on the store's own "s3" pool.  boto3
runs on those threads only: there is one thread-safe client, and no managed
transfers (``upload_file`` starts threads of its own).  Every botocore failure
becomes :class:`~ncps.errors.StorageError` (or :class:`~ncps.errors.StartupError`
in :meth:`S3Store.prepare_thd`); botocore exceptions never reach callers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ParamValidationError,
    ReadTimeoutError,
)
from twisted.logger import Logger

from ncps import tempdir
from ncps.errors import StartupError, StorageError
from ncps.logs import ncps_observer
from ncps.storage.base import nar_object_key, parse_nar_object_key

log = Logger(observer=ncps_observer)

NAR_CONTENT_TYPE = "application/x-nix-nar"
# Files up to this size are one PutObject; larger ones are uploaded in parts of
# this size (S3's minimum part is 5 MiB), one part in memory at a time.
PART_SIZE = 8 * 1024 * 1024
# S3 allows at most 10,000 parts per upload.
MAX_PARTS = 10_000
NAR_PREFIX = "store/nar/"

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "Forbidden"})
_BotoErrors = (BotoCoreError, ClientError)


class S3StoredNar:
    """A committed object being read from S3 (``fd`` is None: use read_thd).

    Owns the response body; whoever opened it must call :meth:`close_thd`.
    """

    fd: int | None = None

    def __init__(
        self, object_key: str, size: int, body: Any, store: S3Store | None = None
    ) -> None:
        self.size = size
        self._object_key = object_key
        self._body = body
        self._store = store
        self._closed = False

    def read_thd(self, n: int) -> bytes:
        """Up to ``n`` next bytes, ``b""`` at the end.  Raises StorageError."""
        try:
            data: bytes = self._body.read(n)
        except Exception as e:
            # Any failure of a remote read (reset, timeout, short body from
            # botocore or urllib3) is the store failing, whatever its class.
            raise StorageError(f"s3 read {self._object_key}: {_reason(e)}") from None
        return data

    def seek_thd(self, offset: int) -> None:
        """Drop the whole-object response; ask for the bytes from ``offset``."""
        assert self._store is not None, "opened without its store"
        self.close_thd()
        key = self._object_key
        try:
            response = self._store.client.get_object(
                Bucket=self._store.bucket, Key=key, Range=f"bytes={offset}-"
            )
        except (ClientError, BotoCoreError) as e:
            raise StorageError(f"s3 get {key} from {offset}: {_reason(e)}") from None
        self._body = response["Body"]
        self._closed = False
        if int(response["ContentLength"]) != self.size - offset:
            # Replaced meanwhile, or a server that ignored the range.
            self.close_thd()
            raise StorageError(
                f"s3 get {key} from {offset}: {response['ContentLength']} bytes "
                f"of {self.size}"
            )

    def close_thd(self) -> None:
        """Close the response body (idempotent; errors are ignored)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._body.close()
        except Exception:
            # The connection is dropped either way; nothing to recover.
            pass


class S3Store:
    """The NAR store in an S3 bucket; see the module docstring."""

    kind = "s3"
    pool_name = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str,
        region: str | None,
        access_key_id: str,
        secret_access_key: str,
        force_path_style: bool,
        temp_dir: Path,
        max_pool_connections: int = 16,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self.region = region or "us-east-1"
        self._temp = tempdir.TempSpace(temp_dir, "--cache-temp-path")
        self._addressing_style = "path" if force_path_style else "auto"
        # Explicit keys: botocore never searches the environment, config files
        # or instance metadata for credentials, and ignores AWS_PROFILE and
        # ~/.aws/config (ncps's configuration is the only source).
        isolated = botocore.session.Session(
            session_vars={
                "profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
            }
        )
        self._session = boto3.session.Session(
            botocore_session=isolated,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=self.region,
        )
        self.client: Any = self._make_client(
            connect_timeout=5,
            read_timeout=30,
            max_attempts=3,
            max_pool_connections=max_pool_connections,
        )

    def _make_client(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        max_pool_connections: int,
    ) -> Any:
        config = BotoConfig(
            s3={"addressing_style": self._addressing_style},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            # S3-compatible servers (MinIO, Garage, Ceph...) do not all accept
            # the CRC checksums newer botocore sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            return self._session.client("s3", endpoint_url=self.endpoint, config=config)
        except ValueError:
            raise StartupError(
                f"--cache-storage-s3-endpoint: invalid endpoint {self.endpoint!r}"
            ) from None

    # -- startup and shutdown ----------------------------------------------

    @property
    def temp_dir(self) -> Path:
        """This instance's directory for downloads in progress (once prepared)."""
        return self._temp.path

    def prepare_thd(self) -> None:
        """Claim a temp dir and check the bucket is there and ours (startup).

        Removes what dead instances left in the temp dir first.  Uses a
        client of its own with a short timeout and no retries, so a dead
        endpoint fails startup within seconds.  Raises StartupError with one
        line naming the flag at fault, and then holds no temp dir.
        """
        self._temp.claim_thd()
        try:
            self._check_bucket_thd()
        except StartupError:
            self.release_thd()
            raise

    def release_thd(self) -> None:
        """Remove our temp dir and unlock it (shutdown; idempotent)."""
        self._temp.release_thd()

    def _check_bucket_thd(self) -> None:
        probe_client = self._make_client(
            connect_timeout=3, read_timeout=10, max_attempts=1, max_pool_connections=1
        )
        try:
            probe_client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code, status = _error_code(e)
            if status == 404 or code in ("NoSuchBucket", *_NOT_FOUND_CODES):
                raise StartupError(
                    f"--cache-storage-s3-bucket: bucket {self.bucket!r} does not "
                    f"exist at {self.endpoint}"
                ) from None
            if status == 403 or code in _DENIED_CODES:
                raise StartupError(
                    f"--cache-storage-s3-access-key-id: access to bucket "
                    f"{self.bucket!r} denied (check the access key and secret)"
                ) from None
            raise StartupError(
                f"--cache-storage-s3-bucket: checking bucket {self.bucket!r} at "
                f"{self.endpoint} failed: {_reason(e)}"
            ) from None
        except ParamValidationError:
            raise StartupError(
                f"--cache-storage-s3-bucket: invalid bucket name {self.bucket!r}"
            ) from None
        except BotoCoreError as e:
            raise StartupError(
                f"--cache-storage-s3-endpoint: cannot reach {self.endpoint}: "
                f"{_reason(e)}"
            ) from None
        finally:
            probe_client.close()

    # -- temp files (always local) -------------------------------------------

    def new_temp_file_thd(self, nar_key: str) -> tuple[int, Path]:
        """A fresh, exclusively created temp file in temp_dir: (fd, path)."""
        fd, path = tempfile.mkstemp(
            prefix=f"{nar_key}-", suffix=".part", dir=self._temp.claim_thd()
        )
        return fd, Path(path)

    def discard_thd(self, temp_path: Path) -> None:
        """Remove a temp file that will never be committed (missing is fine)."""
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass

    # -- committed objects ---------------------------------------------------

    def commit_thd(self, temp_path: Path, nar_key: str, compression: str) -> None:
        """Upload a whole temp file as the object, then remove the temp file.

        The object is visible only once the upload completed.  Raises
        StorageError (and keeps the temp file for the caller to discard);
        an aborted multipart upload leaves nothing behind.
        """
        key = nar_object_key(nar_key, compression)
        try:
            size = os.stat(temp_path).st_size
        except OSError as e:
            raise StorageError(f"s3 upload {key}: {temp_path}: {e.strerror}") from None
        if size <= PART_SIZE:
            self._put_thd(temp_path, key, size)
        else:
            self._multipart_thd(temp_path, key, size)
        self.discard_thd(temp_path)

    def _put_thd(self, temp_path: Path, key: str, size: int) -> None:
        try:
            with open(temp_path, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentLength=size,
                    ContentType=NAR_CONTENT_TYPE,
                )
        except (*_BotoErrors, OSError) as e:
            raise StorageError(f"s3 upload {key}: {_reason(e)}") from None

    def _multipart_thd(self, temp_path: Path, key: str, size: int) -> None:
        # Grow parts (in whole MiB) only for objects past 10,000 x 8 MiB.
        mib = 1024 * 1024
        per_part = -(-size // MAX_PARTS)
        part_size = max(PART_SIZE, -(-per_part // mib) * mib)
        try:
            upload_id: str = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=NAR_CONTENT_TYPE
            )["UploadId"]
        except _BotoErrors as e:
            raise StorageError(f"s3 upload {key}: {_reason(e)}") from None
        try:
            parts: list[dict[str, Any]] = []
            with open(temp_path, "rb") as src:
                number = 1
                while chunk := src.read(part_size):
                    etag = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ContentLength=len(chunk),
                    )["ETag"]
                    parts.append({"PartNumber": number, "ETag": etag})
                    number += 1
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except Exception as e:
            self._abort_thd(key, upload_id)
            raise StorageError(f"s3 upload {key}: {_reason(e)}") from None

    def _abort_thd(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except _BotoErrors as e:
            # The bucket's lifecycle rules (if any) must reap it now.
            log.warn(
                "s3: could not abort multipart upload {upload_id} of {key}: {reason}",
                upload_id=upload_id,
                key=key,
                reason=_reason(e),
            )

    def size_thd(self, nar_key: str, compression: str) -> int | None:
        """Size of the committed object, None if it is not there."""
        key = nar_object_key(nar_key, compression)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise StorageError(f"s3 head {key}: {_reason(e)}") from None
        except BotoCoreError as e:
            raise StorageError(f"s3 head {key}: {_reason(e)}") from None
        return int(head["ContentLength"])

    def open_thd(self, nar_key: str, compression: str) -> S3StoredNar | None:
        """Start reading the committed object, None if it is not there."""
        key = nar_object_key(nar_key, compression)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise StorageError(f"s3 get {key}: {_reason(e)}") from None
        except BotoCoreError as e:
            raise StorageError(f"s3 get {key}: {_reason(e)}") from None
        return S3StoredNar(key, int(response["ContentLength"]), response["Body"], self)

    def delete_thd(self, nar_key: str, compression: str) -> None:
        """Remove the committed object (missing is fine)."""
        key = nar_object_key(nar_key, compression)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _is_not_found(e):
                return
            raise StorageError(f"s3 delete {key}: {_reason(e)}") from None
        except BotoCoreError as e:
            raise StorageError(f"s3 delete {key}: {_reason(e)}") from None

    def iter_objects_thd(self) -> Iterator[tuple[str, str, int]]:
        """Every committed object as (nar_key, compression, size).

        Keys outside the NAR layout are skipped.  Raises StorageError, possibly
        after some objects were yielded.
        """
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=NAR_PREFIX):
                for obj in page.get("Contents", ()):
                    parsed = parse_nar_object_key(obj["Key"])
                    if parsed is not None:
                        yield parsed[0], parsed[1], int(obj["Size"])
        except _BotoErrors as e:
            raise StorageError(f"s3 list {NAR_PREFIX}: {_reason(e)}") from None


def _error_code(e: ClientError) -> tuple[str, int | None]:
    """(error code, HTTP status) of a ClientError."""
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else None


def _is_not_found(e: ClientError) -> bool:
    """The object (not the bucket) is missing."""
    code, status = _error_code(e)
    return code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket")


def _reason(e: BaseException) -> str:
    """A short, one-line reason for an error from botocore, urllib3 or the OS."""
    if isinstance(e, ClientError):
        code, status = _error_code(e)
        message = e.response.get("Error", {}).get("Message") or ""
        text = f"{code} {message}".strip() or f"HTTP {status}"
        return text.splitlines()[0]
    if isinstance(e, ConnectTimeoutError):
        return "connect timed out"
    if isinstance(e, ReadTimeoutError):
        return "read timed out"
    # The OS-level cause (e.g. "Connection refused") is the useful part of
    # botocore's and urllib3's wrapping.
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        nested = getattr(cause, "kwargs", {}).get("error")
        cause = (
            nested
            if isinstance(nested, BaseException)
            else (cause.__cause__ or cause.__context__)
        )
    # Some botocore messages (parameter validation) continue on more lines.
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
