"""The S3 object store (MinIO, SeaweedFS, Ceph RGW, AWS S3) on the ``minio`` SDK.

A put is durable once the service acknowledges it; large objects go up in parts.  Reads
and writes are retried with exponential backoff on connection errors and 5xx answers;
after the retries an outage raises StorageUnavailableError (DIMSE 0xA700, HTTP 503).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import urllib3
from minio import Minio
from minio.error import S3Error

from kho.errors import ObjectNotFoundError, StorageError, StorageUnavailableError
from kho.storage.base import validate_key, validate_prefix

T = TypeVar("T")
_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


class S3Store:
    """Objects in one bucket (under an optional key prefix)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        part_size: int = 16 * 1024 * 1024,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        prefix: str = "",
        cert_check: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = max(5 * 1024 * 1024, part_size)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # short timeouts and no urllib3-level retries: kho's own retry loop decides
        http = urllib3.PoolManager(
            num_pools=4,
            maxsize=32,
            timeout=urllib3.Timeout(connect=min(3.0, timeout_s), read=timeout_s),
            retries=False,
            cert_reqs="CERT_REQUIRED" if (secure and cert_check) else "CERT_NONE",
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
            cert_check=cert_check,
        )
        if create_bucket:
            self._retry(self._ensure_bucket, "create bucket")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        """``s3://ACCESS:SECRET@host:port/bucket[/prefix]?secure=false&region=r``."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.hostname:
            raise StorageError(f"not an s3:// URL: {url}")
        parts = parsed.path.lstrip("/").split("/", 1)
        if not parts[0]:
            raise StorageError("s3 URL names no bucket")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        endpoint = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
        return cls(
            endpoint,
            parts[0],
            unquote(parsed.username or ""),
            unquote(parsed.password or ""),
            secure=query.get("secure", "false").lower() in ("1", "true", "yes"),
            region=query.get("region"),
            prefix=parts[1] if len(parts) > 1 else "",
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"

    # --- helpers -----------------------------------------------------------------------

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _retry(self, operation: Callable[[], T], what: str) -> T:
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                return operation()
            except S3Error as exc:
                if exc.code in _MISSING:
                    raise ObjectNotFoundError(f"{what}: no such object") from exc
                status = getattr(exc.response, "status", 0) if exc.response else 0
                if status < 500 and exc.code != "SlowDown":
                    raise StorageError(f"{what}: {exc.code}: {exc.message}") from exc
                error: Exception = exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = exc
            if attempt == self.max_retries:
                raise StorageUnavailableError(f"{what}: object store unavailable: {error}")
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    # --- protocol ----------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        name = self._name(key)
        payload = bytes(data)

        def upload() -> None:
            self.client.put_object(
                self.bucket,
                name,
                io.BytesIO(payload),
                len(payload),
                part_size=self.part_size,
            )

        self._retry(upload, f"put {key}")

    def get(self, key: str) -> bytes:
        return self._read(key, 0, 0)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            self.size(key)  # absent keys still raise
            return b""
        size = self.size(key)
        if offset >= size:
            return b""
        return self._read(key, offset, min(length, size - offset))

    def _read(self, key: str, offset: int, length: int) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            response = self.client.get_object(self.bucket, name, offset=offset, length=length)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._retry(read, f"get {key}")

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        name = self._name(key)
        stat = self._retry(lambda: self.client.stat_object(self.bucket, name), f"stat {key}")
        return int(stat.size or 0)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._retry(lambda: self.client.remove_object(self.bucket, name), f"delete {key}")
        except ObjectNotFoundError:
            return

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        objects = self._retry(
            lambda: list(self.client.list_objects(self.bucket, prefix=full, recursive=True)),
            f"list {prefix}",
        )
        yield from sorted(o.object_name[len(self.prefix) :] for o in objects if o.object_name)

    def close(self) -> None:
        self.client._http.clear()
