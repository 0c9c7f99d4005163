"""Storage fixtures: a fresh bucket per test on the session's SeaweedFS S3 server (the
``seaweedfs`` fixture of tests/conftest.py, started by tests.helpers.seaweedfs.run_seaweedfs
and shared with the archive's S3 tests)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

from kho.storage.s3 import MIN_PART_SIZE, S3Store
from tests.helpers.seaweedfs import SeaweedFS


def _remove_bucket(server: SeaweedFS, bucket: str) -> None:
    """Empty and drop a test bucket; SeaweedFS then frees the bucket's volume."""
    if not server.running:
        return
    client = server.client()
    with contextlib.suppress(Exception):
        for obj in client.list_objects(bucket, recursive=True):
            if obj.object_name:
                client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """The name of a fresh bucket, removed after the test."""
    bucket = f"kho-test-{secrets.token_hex(5)}"
    yield bucket
    _remove_bucket(seaweedfs, bucket)


@pytest.fixture
def s3_store(seaweedfs: SeaweedFS, s3_bucket: str) -> Iterator[S3Store]:
    """An S3Store on a fresh bucket, with the smallest part size S3 allows (so a few MB
    already go up as a multipart upload) and quick retries."""
    store = S3Store.from_url(
        seaweedfs.url(s3_bucket), part_size=MIN_PART_SIZE, max_retries=2, backoff_s=0.1
    )
    yield store
    store.close()
