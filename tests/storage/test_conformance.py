"""One conformance suite for every ObjectStore backend (the shape of zarr's store tests):
subclassed per backend, the same behaviour demanded of the filesystem and of S3."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kho.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from kho.storage import FilesystemStore, ObjectStore
from kho.storage.s3 import S3Store

BAD_KEYS = ["../x", "/abs", "a//b", "a/./b", "a/../b", "", "a b", "a\\b", "é", "x" * 600, "a/"]


class ObjectStoreConformance:
    """Not collected itself (no Test prefix): subclasses provide the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> ObjectStore:
        raise NotImplementedError

    @pytest.mark.parametrize("size", [0, 1, 4096, 3 * 1024 * 1024 + 7])
    def test_put_get_roundtrip(self, store: ObjectStore, size: int) -> None:
        data = bytes(i % 251 for i in range(size))
        store.put("i/ab/cd/obj.header", data)
        assert store.get("i/ab/cd/obj.header") == data
        assert store.size("i/ab/cd/obj.header") == size
        assert store.exists("i/ab/cd/obj.header")

    def test_bytes_bytearray_memoryview(self, store: ObjectStore) -> None:
        for i, data in enumerate((b"abc", bytearray(b"abc"), memoryview(b"xabcx")[1:4])):
            store.put(f"k{i}", data)
            assert store.get(f"k{i}") == b"abc"

    def test_overwrite_replaces_whole_object(self, store: ObjectStore) -> None:
        store.put("k", b"long old content")
        store.put("k", b"new")
        assert store.get("k") == b"new"

    def test_get_range(self, store: ObjectStore) -> None:
        data = bytes(range(200))
        store.put("r", data)
        assert store.get_range("r", 0, 10) == data[:10]
        assert store.get_range("r", 50, 25) == data[50:75]
        assert store.get_range("r", 190, 50) == data[190:]
        assert store.get_range("r", 500, 10) == b""
        assert store.get_range("r", 5, 0) == b""

    def test_missing_key(self, store: ObjectStore) -> None:
        assert not store.exists("nope")
        for call in (lambda: store.get("nope"), lambda: store.size("nope")):
            with pytest.raises(ObjectNotFoundError) as info:
                call()
            assert isinstance(info.value, KeyError)
        with pytest.raises(ObjectNotFoundError):
            store.get_range("nope", 0, 1)

    def test_delete(self, store: ObjectStore) -> None:
        store.put("d", b"x")
        store.delete("d")
        assert not store.exists("d")
        store.delete("d")  # absent: not an error

    def test_list_is_ordered_and_filtered(self, store: ObjectStore) -> None:
        keys = ["i/00/01/b.header", "i/00/01/a.pixels", "i/00/02/c.header", "j/z"]
        for key in keys:
            store.put(key, b"x")
        assert list(store.list("")) == sorted(keys)
        assert list(store.list("i/00/01/")) == ["i/00/01/a.pixels", "i/00/01/b.header"]
        assert list(store.list("i/00/01/a.")) == ["i/00/01/a.pixels"]
        assert list(store.list("nothing/")) == []

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_hostile_keys_are_refused(self, store: ObjectStore, key: str) -> None:
        with pytest.raises(InvalidKeyError):
            store.put(key, b"x")
        with pytest.raises(InvalidKeyError):
            store.get(key)

    def test_concurrent_writers_and_readers(self, store: ObjectStore) -> None:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(10):
                    key = f"c/{n:02d}/{i:02d}"
                    payload = f"{n}-{i}".encode() * 100
                    store.put(key, payload)
                    assert store.get(key) == payload
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(list(store.list("c/"))) == 160


class TestFilesystemStore(ObjectStoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ObjectStore:
        return FilesystemStore(tmp_path / "objects")

    def test_crash_mid_put_leaves_no_visible_object(self, tmp_path: Path) -> None:
        root = tmp_path / "objects"
        store = FilesystemStore(root)
        store.put("i/aa/bb/x.header", b"whole")
        # what a crash between write and rename leaves behind
        leftover = root / "i" / "aa" / "bb" / "y.header.1234.5.kho-tmp"
        leftover.write_bytes(b"half")
        assert list(store.list("")) == ["i/aa/bb/x.header"]
        assert not store.exists("i/aa/bb/y.header")
        reopened = FilesystemStore(root)  # start-up removes the temporaries
        assert not leftover.exists()
        assert list(reopened.list("")) == ["i/aa/bb/x.header"]

    def test_unwritable_store_raises_storage_error(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path / "objects")
        (tmp_path / "objects" / "blocked").write_bytes(b"a file where a folder must go")
        with pytest.raises(StorageError):
            store.put("blocked/x", b"data")


class TestS3Store(ObjectStoreConformance):
    @pytest.fixture
    def store(self, bucket_url: str) -> ObjectStore:
        return S3Store.from_url(bucket_url, part_size=5 * 1024 * 1024)

    def test_multipart_upload_of_a_large_object(self, bucket_url: str) -> None:
        store = S3Store.from_url(bucket_url, part_size=5 * 1024 * 1024)
        data = bytes(range(256)) * (45 * 1024)  # 11.25 MiB: three parts
        store.put("big", data)
        assert store.get("big") == data
        assert store.get_range("big", 6 * 1024 * 1024, 100) == data[6 * 1024 * 1024 :][:100]

    def test_outage_is_unavailable_then_recovers(self, seaweedfs, bucket_url: str) -> None:
        store = S3Store.from_url(bucket_url, max_retries=2, backoff_s=0.1)
        store.put("before", b"1")
        seaweedfs.stop()
        try:
            with pytest.raises(StorageUnavailableError):
                store.put("during", b"2")
            with pytest.raises(StorageUnavailableError):
                store.get("before")
        finally:
            seaweedfs.start()
        assert store.get("before") == b"1"  # the same store object works again
        store.put("after", b"3")
        assert store.get("after") == b"3"
