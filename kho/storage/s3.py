"""The S3 object store (MinIO, SeaweedFS, Ceph RGW, AWS S3) on the ``minio`` SDK.

A put is durable once the service acknowledges it (S3 PUTs are atomic: readers see the old
object or the new one); objects larger than ``part_size`` go up as a multipart upload, which
stays invisible until it completes.  Every call is retried with exponential backoff on
connection errors, timeouts, 5xx answers and SlowDown; never on 403/404.  When the retries
are spent the call raises StorageUnavailableError, which the archive answers with DIMSE
0xA700 or HTTP 503.  Timeouts are short so that an outage shows in seconds: the worst case
for one call is about ``(max_retries + 1) * timeout_s`` plus the backoff sleeps.

URL form (``S3Store.from_url`` and ``kho.storage.open_store``)::

    s3://ACCESS:SECRET@host:port/bucket[/prefix]?secure=false&region=us-east-1&cert_check=true

``ACCESS`` and ``SECRET`` are percent-encoded (a ``/`` in a secret is ``%2F``); without them
the environment's ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` are used, so a settings
file need not hold the secret.  ``secure=true`` speaks HTTPS.  Keyword arguments given to
``from_url`` override what the URL says.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name

from kho.errors import (
    ConfigError,
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from kho.storage.base import validate_key, validate_prefix

T = TypeVar("T")

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
# S3 error codes that say "try again later" whatever the HTTP status
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "TooManyRequests",
}
_TRUE = ("1", "true", "yes", "on")
_URL_OPTIONS = {"secure", "region", "cert_check", "create_bucket"}


def _is_transient_status(status: int) -> bool:
    # 501 Not Implemented is a permanent answer; 429 is S3-speak for "slow down"
    return status == 429 or (status >= 500 and status != 501)


class S3Store:
    """Objects in one bucket, under an optional key prefix; safe to share between threads."""

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
        connect_timeout_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise ConfigError(f"invalid S3 bucket name {bucket!r}") from exc
        stripped = prefix.strip("/")
        if stripped:
            try:
                validate_key(stripped)
            except InvalidKeyError as exc:
                raise ConfigError(f"invalid S3 key prefix {prefix!r}") from exc
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = stripped + "/" if stripped else ""
        self.part_size = part_size
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s
        # One pool shared by every thread (urllib3 pools are thread-safe); sized for ~16
        # ingest threads, put_many's workers and minio's parallel part uploads (3 per put).
        # urllib3's own retries are off: the loop in _call decides, and knows which errors
        # are worth another try.
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=max_connections,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=timeout_s),
            retries=False,
            cert_reqs="CERT_REQUIRED" if (secure and cert_check) else "CERT_NONE",
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
            cert_check=cert_check,
        )
        self._batch_lock = threading.Lock()
        self._batch_pool: ThreadPoolExecutor | None = None
        if create_bucket:
            self._call(self._ensure_bucket, f"create bucket {bucket}")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        """A store from ``s3://ACCESS:SECRET@host:port/bucket[/prefix]?secure=false``.

        Query parameters: ``secure``, ``region``, ``cert_check``, ``create_bucket``.
        """
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.hostname:
            raise ConfigError("not an s3:// URL with a host (s3://KEY:SECRET@host:port/bucket)")
        bucket, _, prefix = parsed.path.lstrip("/").partition("/")
        if not bucket:
            raise ConfigError("the s3:// URL names no bucket")
        query = {name: values[-1] for name, values in parse_qs(parsed.query).items()}
        unknown = sorted(set(query) - _URL_OPTIONS)
        if unknown:  # a typo must not silently fall back to a default (secure=false...)
            raise ConfigError(
                f"unknown s3:// URL option(s) {unknown}; known: {sorted(_URL_OPTIONS)}"
            )
        host = parsed.hostname
        if ":" in host:  # an IPv6 literal keeps its brackets in the endpoint
            host = f"[{host}]"
        try:
            port = parsed.port
        except ValueError as exc:
            raise ConfigError("the s3:// URL has an invalid port") from exc
        options: dict[str, Any] = {
            "secure": query.get("secure", "false").lower() in _TRUE,
            "region": query.get("region") or None,
            "cert_check": query.get("cert_check", "true").lower() in _TRUE,
            "create_bucket": query.get("create_bucket", "true").lower() in _TRUE,
            "prefix": prefix,
        }
        options.update(kwargs)
        access_key = unquote(parsed.username or "") or os.environ.get("AWS_ACCESS_KEY_ID", "")
        secret_key = unquote(parsed.password or "") or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        endpoint = host + (f":{port}" if port else "")
        return cls(endpoint, bucket, access_key, secret_key, **options)

    def __repr__(self) -> str:  # never shows the credentials
        return f"S3Store({self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    # --- helpers -----------------------------------------------------------------------

    def _ensure_bucket(self) -> None:
        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as exc:
            # another process made it between our check and our create
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _call(self, operation: Callable[[], T], what: str) -> T:
        """Run ``operation``, retrying transient failures with exponential backoff."""
        delay = self.backoff_s
        attempt = 0
        while True:
            try:
                return operation()
            except S3Error as exc:
                status = exc.response.status if exc.response is not None else 0
                if exc.code == "NoSuchKey":
                    raise ObjectNotFoundError(f"{what}: no such object") from None
                if exc.code not in _TRANSIENT_CODES and not _is_transient_status(status):
                    # 403 (credentials, policy), NoSuchBucket, bad requests: retrying won't help
                    message = f"{what}: {exc.code} (HTTP {status}): {exc.message}"
                    raise StorageError(message) from exc
                failure: Exception = exc
            except ServerError as exc:
                if not _is_transient_status(exc.status_code):
                    raise StorageError(f"{what}: HTTP {exc.status_code}") from exc
                failure = exc
            except InvalidResponseError as exc:
                # a non-S3 answer, typically a proxy's 502/503 page
                status = int(getattr(exc, "_code", 0) or 0)
                if not _is_transient_status(status):
                    raise StorageError(f"{what}: unexpected answer: {exc}") from exc
                failure = exc
            except MinioException as exc:
                raise StorageError(f"{what}: {exc}") from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # refused, reset, timed out, truncated body: the service is away or overloaded
                if isinstance(exc, StorageError):
                    raise
                failure = exc
            if attempt >= self.max_retries:
                raise StorageUnavailableError(
                    f"{what}: object store {self.endpoint} unavailable after "
                    f"{attempt + 1} attempts: {type(failure).__name__}: {failure}"
                ) from failure
            attempt += 1
            time.sleep(delay)
            delay *= 2

    # --- protocol ----------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        name = self._name(key)
        payload = data if isinstance(data, bytes) else bytes(data)

        def upload() -> None:
            # a fresh stream per attempt: a retry must send the whole object again
            self.client.put_object(
                self.bucket,
                name,
                io.BytesIO(payload),
                len(payload),
                part_size=self.part_size,
            )

        self._call(upload, f"put {key}")

    def put_many(self, items: Mapping[str, bytes | bytearray | memoryview]) -> None:
        """Several objects, uploaded in parallel (one round trip of latency instead of one
        per object); each is atomic and all are durable when this returns.  On failure some
        may be stored and others not: the caller cleans up by prefix."""
        for key in items:
            validate_key(key)
        if len(items) <= 1:
            for key, data in items.items():
                self.put(key, data)
            return
        pool = self._pool()
        futures = [pool.submit(self.put, key, data) for key, data in items.items()]
        errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
        if errors:
            # an outage outranks a single object's failure: the caller answers "try later"
            for exc in errors:
                if isinstance(exc, StorageUnavailableError):
                    raise exc
            raise errors[0]

    def _pool(self) -> ThreadPoolExecutor:
        with self._batch_lock:
            if self._batch_pool is None:
                self._batch_pool = ThreadPoolExecutor(8, thread_name_prefix="kho-s3-put")
            return self._batch_pool

    def get(self, key: str) -> bytes:
        return self._read(key, 0, None)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            self.size(key)  # nothing to read, but an absent key still raises
            return b""
        return self._read(key, offset, length)

    def _read(self, key: str, offset: int, length: int | None) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            try:
                # offset/length become an HTTP Range header; length=0 means "to the end"
                response = self.client.get_object(
                    self.bucket, name, offset=offset, length=length or 0
                )
            except S3Error as exc:
                if exc.code == "InvalidRange":  # offset at or past the end: nothing there
                    return b""
                raise
            try:
                body = response.read()
                if response.status == 200 and (offset or length is not None):
                    # a server that ignored the Range header sent the whole object
                    end = None if length is None else offset + length
                    body = body[offset:end]
                return bytes(body)
            finally:
                response.close()
                response.release_conn()

        return self._call(read, f"get {key}")

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        name = self._name(key)
        stat = self._call(lambda: self.client.stat_object(self.bucket, name), f"stat {key}")
        if stat.is_dir:  # some servers answer HEAD on a "folder"; S3 has no such object
            raise ObjectNotFoundError(f"stat {key}: no such object")
        return int(stat.size or 0)

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            # S3 DELETE of an absent key already succeeds; NoSuchKey only from odd servers
            self._call(lambda: self.client.remove_object(self.bucket, name), f"delete {key}")
        except ObjectNotFoundError:
            return

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        full = self.prefix + prefix
        names: list[str] = []
        resume_after: str | None = None

        def fetch() -> None:
            # resumes after the last name seen, so a retry does not restart a long listing
            nonlocal resume_after
            for obj in self.client.list_objects(
                self.bucket, prefix=full, recursive=True, start_after=resume_after
            ):
                name = obj.object_name
                if not name or obj.is_dir or name.endswith("/"):
                    continue
                names.append(name[len(self.prefix) :])
                resume_after = name

        self._call(fetch, f"list {prefix or '(all)'}")
        # S3 lists in UTF-8 byte order; a filer-backed server may walk folders first
        # ("a/b" before "a-c"): sorting makes the order the protocol's on every server
        names.sort()
        yield from names

    def close(self) -> None:
        with self._batch_lock:
            if self._batch_pool is not None:
                self._batch_pool.shutdown(wait=True)
                self._batch_pool = None
        self._http.clear()
