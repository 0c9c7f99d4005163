"""One conformance suite for every ObjectStore backend: ``ObjectStoreConformance`` holds the
behaviour the archive relies on, and each backend's ``Test...`` subclass supplies a ``store``
fixture (plus the tests only that backend can have: crash leftovers on a filesystem, an
outage of a real S3 service)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from kho.errors import (
    ConfigError,
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from kho.storage import FilesystemStore, ObjectStore, open_store
from kho.storage.base import MAX_KEY_LENGTH
from kho.storage.filesystem import _TMP_SUFFIX
from kho.storage.s3 import MIN_PART_SIZE, S3Store
from kho.storage.spool import Spool, SpooledStore
from tests.helpers.seaweedfs import SeaweedFS

MIB = 1024 * 1024

BAD_KEYS = [
    "",
    "../x",
    "a/../b",
    "..",
    ".",
    "a/./b",
    "/abs",
    "a//b",
    "a/",
    ".hidden",
    "a b",
    "a\\b",
    "a:b",
    "a?b",
    "a*b",
    "a%2Fb",
    "a\x00b",
    "a\nb",
    "é",
    "x" * (MAX_KEY_LENGTH + 1),
]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


class ObjectStoreConformance:
    """Not collected itself (no Test prefix): subclasses override the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> ObjectStore:
        raise NotImplementedError

    # --- put / get ---------------------------------------------------------------------

    @pytest.mark.parametrize(
        "size",
        [0, 1, 4096, 3 * MIB + 7, 2 * MIN_PART_SIZE + 12345],
        ids=["empty", "1B", "4KiB", "3MiB", "over-part-size"],
    )
    def test_put_get_round_trip(self, store: ObjectStore, size: int) -> None:
        data = payload(size)
        store.put("i/ab/cd/obj.pixels", data)
        assert store.get("i/ab/cd/obj.pixels") == data
        assert store.size("i/ab/cd/obj.pixels") == size
        assert store.exists("i/ab/cd/obj.pixels")

    def test_bytes_bytearray_memoryview(self, store: ObjectStore) -> None:
        source = bytearray(b"xxabcxx")
        inputs: list[bytes | bytearray | memoryview] = [
            b"abc",
            bytearray(b"abc"),
            memoryview(b"abc"),
            memoryview(source)[2:5],
        ]
        for number, data in enumerate(inputs):
            store.put(f"k{number}", data)
        source[2:5] = b"ZZZ"  # changing the caller's buffer afterwards changes nothing stored
        for number in range(len(inputs)):
            assert store.get(f"k{number}") == b"abc"

    def test_overwrite_replaces_the_whole_object(self, store: ObjectStore) -> None:
        store.put("k", b"a longer old content")
        store.put("k", b"new")
        assert store.get("k") == b"new"
        assert store.size("k") == 3
        store.put("k", b"longer again than before")
        assert store.get("k") == b"longer again than before"

    def test_put_many(self, store: ObjectStore) -> None:
        objects = {f"i/00/{name}": payload(100 + n, n) for n, name in enumerate("abcde")}
        store.put_many(objects)  # type: ignore[attr-defined]  # both backends offer it
        for key, data in objects.items():
            assert store.get(key) == data
        with pytest.raises(InvalidKeyError):
            store.put_many({"good": b"1", "../bad": b"2"})  # type: ignore[attr-defined]

    # --- ranges ------------------------------------------------------------------------

    def test_get_range(self, store: ObjectStore) -> None:
        data = bytes(range(200))
        store.put("r", data)
        assert store.get_range("r", 0, 10) == data[:10]  # start
        assert store.get_range("r", 50, 25) == data[50:75]  # middle
        assert store.get_range("r", 190, 10) == data[190:]  # exactly the end
        assert store.get_range("r", 190, 50) == data[190:]  # running past the end
        assert store.get_range("r", 199, 1) == data[199:]
        assert store.get_range("r", 200, 10) == b""  # starting at the end
        assert store.get_range("r", 500, 10) == b""  # starting past the end
        assert store.get_range("r", 5, 0) == b""  # zero length
        assert store.get_range("r", 0, 200) == data
        with pytest.raises(ValueError):
            store.get_range("r", -1, 5)
        with pytest.raises(ValueError):
            store.get_range("r", 0, -5)

    def test_get_range_of_an_empty_object(self, store: ObjectStore) -> None:
        store.put("empty", b"")
        assert store.get_range("empty", 0, 10) == b""
        assert store.get_range("empty", 0, 0) == b""

    def test_get_range_across_part_boundaries(self, store: ObjectStore) -> None:
        data = payload(2 * MIN_PART_SIZE + 1000, 7)
        store.put("big", data)
        for offset, length in [(MIN_PART_SIZE - 10, 20), (2 * MIN_PART_SIZE - 1, 5000)]:
            assert store.get_range("big", offset, length) == data[offset : offset + length]

    # --- exists / size / delete / missing ----------------------------------------------

    def test_missing_key(self, store: ObjectStore) -> None:
        assert not store.exists("nope")
        calls = [
            lambda: store.get("nope"),
            lambda: store.size("nope"),
            lambda: store.get_range("nope", 0, 1),
            lambda: store.get_range("nope", 0, 0),
        ]
        for call in calls:
            with pytest.raises(ObjectNotFoundError) as info:
                call()
            assert isinstance(info.value, KeyError)
            assert isinstance(info.value, StorageError)
            assert not isinstance(info.value, StorageUnavailableError)

    def test_delete(self, store: ObjectStore) -> None:
        store.put("d/x", b"x")
        store.put("d/y", b"y")
        store.delete("d/x")
        assert not store.exists("d/x")
        with pytest.raises(ObjectNotFoundError):
            store.get("d/x")
        assert store.get("d/y") == b"y"  # the neighbour stays
        store.delete("d/x")  # absent: not an error
        store.delete("never/was/here")

    def test_a_folder_is_not_an_object(self, store: ObjectStore) -> None:
        store.put("f/inner/obj", b"x")
        for folder in ("f", "f/inner"):
            assert not store.exists(folder)
            with pytest.raises(ObjectNotFoundError):
                store.get(folder)
            with pytest.raises(ObjectNotFoundError):
                store.size(folder)

    # --- list --------------------------------------------------------------------------

    def test_list_is_ordered_and_filtered(self, store: ObjectStore) -> None:
        keys = [
            "i/00/01/b.header",
            "i/00/01/a.pixels",
            "i/00/02/c.header",
            "i/00/10/deep/er/d.json",
            "j/z",
            "top",
        ]
        for key in reversed(keys):
            store.put(key, b"x")
        assert list(store.list()) == sorted(keys)
        assert list(store.list("")) == sorted(keys)
        assert list(store.list("i/00/01/")) == ["i/00/01/a.pixels", "i/00/01/b.header"]
        assert list(store.list("i/00/01")) == ["i/00/01/a.pixels", "i/00/01/b.header"]
        assert list(store.list("i/00/01/a.")) == ["i/00/01/a.pixels"]
        assert list(store.list("i/00/1")) == ["i/00/10/deep/er/d.json"]
        assert list(store.list("i/")) == sorted(keys)[:4]
        assert list(store.list("nothing/")) == []
        assert list(store.list("to")) == ["top"]

    def test_list_order_is_by_whole_key_not_by_folder(self, store: ObjectStore) -> None:
        # '-' and '.' sort before '/', '0' after it: a folder-by-folder walk gets this wrong
        keys = ["a/b", "a-c", "a.x", "a0", "a/b/c-d", "a/b-c"]
        for key in keys:
            if key != "a/b":  # "a/b" cannot be both a file and a folder on a filesystem
                store.put(key, b"x")
        expected = sorted(k for k in keys if k != "a/b")
        assert list(store.list()) == expected
        assert list(store.list("a")) == expected

    def test_list_after_delete(self, store: ObjectStore) -> None:
        store.put("g/1", b"x")
        store.put("g/2", b"x")
        store.delete("g/1")
        assert list(store.list("g/")) == ["g/2"]
        store.delete("g/2")
        assert list(store.list()) == []

    # --- hostile keys ------------------------------------------------------------------

    @pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
    def test_invalid_keys_are_refused(self, store: ObjectStore, key: str) -> None:
        calls = [
            lambda: store.put(key, b"x"),
            lambda: store.get(key),
            lambda: store.get_range(key, 0, 1),
            lambda: store.exists(key),
            lambda: store.size(key),
        ]
        for call in calls:
            with pytest.raises(InvalidKeyError):
                call()
        assert list(store.list()) == []  # nothing was written anywhere

    @pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "", "a b"], ids=repr)
    def test_delete_refuses_invalid_keys(self, store: ObjectStore, key: str) -> None:
        with pytest.raises(InvalidKeyError):
            store.delete(key)

    def test_non_string_keys_are_refused(self, store: ObjectStore) -> None:
        for key in (None, b"bytes", 5):
            with pytest.raises(InvalidKeyError):
                store.put(key, b"x")  # type: ignore[arg-type]

    def test_invalid_list_prefixes_are_refused(self, store: ObjectStore) -> None:
        for prefix in ("../", "/abs", "a/../", "a b", "a//b/"):
            with pytest.raises(InvalidKeyError):
                list(store.list(prefix))

    def test_longest_valid_key(self, store: ObjectStore) -> None:
        key = "/".join(["k" * 100] * 5) + "/" + "z" * (MAX_KEY_LENGTH - 505 - 1)
        assert len(key) == MAX_KEY_LENGTH - 1
        store.put(key, b"long")
        assert store.get(key) == b"long"
        assert list(store.list()) == [key]

    # --- threads -----------------------------------------------------------------------

    def test_concurrent_writers_and_readers(self, store: ObjectStore) -> None:
        errors: list[BaseException] = []

        def work(thread: int) -> None:
            try:
                for i in range(8):
                    key = f"c/{thread:02d}/{i:02d}"
                    data = payload(1000 + 37 * i, thread)
                    store.put(key, data)
                    assert store.get(key) == data
                    assert store.get_range(key, 10, 20) == data[10:30]
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        assert len(list(store.list("c/"))) == 16 * 8

    def test_readers_never_see_a_torn_object(self, store: ObjectStore) -> None:
        versions = [bytes([n]) * 300_000 for n in range(4)]
        store.put("hot", versions[0])
        stop = threading.Event()
        seen: list[bytes] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while not stop.is_set():
                    seen.append(store.get("hot"))
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(4)]
        for reader in readers:
            reader.start()
        for round_ in range(12):
            store.put("hot", versions[round_ % len(versions)])
        stop.set()
        for reader in readers:
            reader.join()
        if errors:
            raise errors[0]
        assert seen
        assert all(blob in versions for blob in seen)


class TestFilesystemStore(ObjectStoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ObjectStore:
        return FilesystemStore(tmp_path / "objects")

    def test_crash_mid_put_leaves_no_visible_object(self, tmp_path: Path) -> None:
        root = tmp_path / "objects"
        store = FilesystemStore(root)
        store.put("i/aa/bb/x.header", b"whole")
        # what a crash between write and rename leaves behind: a new object's temp file,
        # and the temp file of an overwrite of x.header
        folder = root / "i" / "aa" / "bb"
        leftovers = [
            folder / f"y.header.{os.getpid()}.7{_TMP_SUFFIX}",
            folder / f"x.header.{os.getpid()}.8{_TMP_SUFFIX}",
        ]
        for leftover in leftovers:
            leftover.write_bytes(b"half")
        assert list(store.list()) == ["i/aa/bb/x.header"]
        assert not store.exists("i/aa/bb/y.header")
        assert store.get("i/aa/bb/x.header") == b"whole"

        reopened = FilesystemStore(root)  # start-up removes the temporaries
        assert not any(leftover.exists() for leftover in leftovers)
        assert list(reopened.list()) == ["i/aa/bb/x.header"]
        assert reopened.get("i/aa/bb/x.header") == b"whole"

    def test_unwritable_place_raises_storage_error(self, tmp_path: Path) -> None:
        store = FilesystemStore(tmp_path / "objects")
        (tmp_path / "objects" / "blocked").write_bytes(b"a file where a folder must go")
        with pytest.raises(StorageError):
            store.put("blocked/x", b"data")
        assert list(store.list()) == ["blocked"]  # no temp file is left visible


class TestSpooledStore(ObjectStoreConformance):
    """The archive's store is the object store with the spool beside it: everything that is
    not a spool key behaves exactly as the backend does (tests/storage/test_spool.py has
    the spool's own)."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> ObjectStore:
        return SpooledStore(FilesystemStore(tmp_path / "objects"), Spool(tmp_path / "spool"))


class TestS3Store(ObjectStoreConformance):
    @pytest.fixture
    def store(self, s3_store: S3Store) -> ObjectStore:
        return s3_store

    def test_a_multipart_upload_in_progress_is_invisible(self, s3_store: S3Store) -> None:
        # what a crash mid-put leaves on S3: an upload that was never completed
        # (minio's multipart calls are private; this is the one place that needs them)
        name = s3_store.prefix + "i/aa/half"
        client = s3_store.client
        upload_id = client._create_multipart_upload(s3_store.bucket, name, {})
        client._upload_part(s3_store.bucket, name, b"x" * MIN_PART_SIZE, None, upload_id, 1)
        assert not s3_store.exists("i/aa/half")
        assert list(s3_store.list()) == []
        client._abort_multipart_upload(s3_store.bucket, name, upload_id)

    def test_prefixes_separate_key_spaces(self, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
        tenant_a = S3Store.from_url(seaweedfs.url(f"{s3_bucket}/site-a"))
        tenant_b = open_store(seaweedfs.url(f"{s3_bucket}/site-b/"))
        tenant_a.put("i/x", b"a")
        tenant_b.put("i/x", b"b")
        assert tenant_a.get("i/x") == b"a"
        assert tenant_b.get("i/x") == b"b"
        assert list(tenant_a.list()) == ["i/x"]  # keys come back without the prefix
        tenant_a.delete("i/x")
        assert tenant_b.get("i/x") == b"b"
        tenant_a.close()
        tenant_b.close()

    def test_wrong_credentials_are_a_storage_error_not_an_outage(
        self, seaweedfs: SeaweedFS, s3_bucket: str
    ) -> None:
        url = seaweedfs.url(s3_bucket).replace(seaweedfs.secret_key, "not-the-secret")
        with pytest.raises(StorageError) as info:
            S3Store.from_url(url, max_retries=4, backoff_s=5.0)  # no retry: would take 75 s
        assert not isinstance(info.value, StorageUnavailableError)

    def test_outage_is_unavailable_then_recovers(
        self, seaweedfs: SeaweedFS, s3_store: S3Store
    ) -> None:
        before = payload(MIN_PART_SIZE + 10, 3)  # a multipart object, to read back after
        s3_store.put("before", before)
        seaweedfs.stop()
        try:
            calls = [
                lambda: s3_store.put("during", b"2"),
                lambda: s3_store.put("during-big", before),
                lambda: s3_store.get("before"),
                lambda: s3_store.get_range("before", 0, 10),
                lambda: s3_store.exists("before"),  # not False: "don't know" is not "absent"
                lambda: s3_store.size("before"),
                lambda: s3_store.delete("before"),
                lambda: list(s3_store.list()),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(StorageUnavailableError):
                    call()
                # recorded for the report, not asserted: timings vary with the machine
                print(f"outage detected in {time.monotonic() - started:.2f} s")
        finally:
            seaweedfs.start()
        # the same store object works again, and what was acknowledged before survived
        assert s3_store.get("before") == before
        s3_store.put("after", b"3")
        assert s3_store.get("after") == b"3"
        assert list(s3_store.list()) == ["after", "before"]

    def test_a_hung_server_times_out(self, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
        # a frozen process accepts connections (the kernel does) but never answers: only
        # the read timeout can tell, so it must be short
        store = S3Store.from_url(
            seaweedfs.url(s3_bucket), timeout_s=0.5, max_retries=1, backoff_s=0.05
        )
        store.put("k", b"v")
        os.kill(seaweedfs.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StorageUnavailableError):
                store.get("k")
        finally:
            os.kill(seaweedfs.pid, signal.SIGCONT)
        store.max_retries = 4  # the thawed server may need a moment to find its volume
        assert store.get("k") == b"v"
        store.close()


class TestOpenStore:
    def test_paths_and_file_urls_open_the_filesystem_store(self, tmp_path: Path) -> None:
        for url in (str(tmp_path / "a"), f"file://{tmp_path / 'b'}"):
            store = open_store(url)
            assert isinstance(store, FilesystemStore)
            store.put("k", b"v")
        assert (tmp_path / "a" / "k").read_bytes() == b"v"
        assert (tmp_path / "b" / "k").read_bytes() == b"v"

    @pytest.mark.parametrize(
        "url",
        [
            "s3://key:secret@127.0.0.1:9000",  # no bucket
            "s3://key:secret@127.0.0.1:9000/",
            "s3:///bucket",  # no host
            "s3://key:secret@127.0.0.1:9000/Bad_Bucket",  # not a valid bucket name
            "s3://key:secret@127.0.0.1:9000/bucket/../escape",
            "s3://key:secret@127.0.0.1:notaport/bucket",
            "s3://key:secret@127.0.0.1:9000/bucket?secrue=true",  # typo: must not be ignored
        ],
    )
    def test_bad_s3_urls_are_config_errors(self, url: str) -> None:
        with pytest.raises(ConfigError):
            open_store(url, create_bucket=False)

    def test_s3_url_parts(self) -> None:
        store = S3Store.from_url(
            "s3://AK%2F1:se%2Bcret@127.0.0.1:9000/bucket/a/b/?secure=false&region=eu-1",
            create_bucket=False,
        )
        assert store.endpoint == "127.0.0.1:9000"
        assert store.bucket == "bucket"
        assert store.prefix == "a/b/"
        assert "se+cret" not in repr(store)  # credentials stay out of logs
        store.close()

    def test_s3_options_need_an_s3_url(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError):
            open_store(str(tmp_path), part_size=MIN_PART_SIZE)
