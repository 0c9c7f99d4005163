"""The ingest spool: appends read back bit for bit, segments rotate, and a segment is
deleted only when no process writes it and nothing refers to it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kho.errors import InvalidKeyError, ObjectNotFoundError, StorageError
from kho.storage import FilesystemStore
from kho.storage.spool import Spool, SpooledStore, is_spool_key, parse_spool_key, segment_of


def _blob(size: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(size))


def test_appends_read_back_bit_for_bit_whole_and_in_ranges(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    blobs = [_blob(n, i) for i, n in enumerate([1, 4096, 300_001, 17])]
    spooled = [spool.append(b) for b in blobs]
    for blob, key in zip(blobs, spooled, strict=True):
        spool.release(key)
        assert is_spool_key(key) and spool.read(key) == blob
        assert spool.read(key, 1, 5) == blob[1:6]
        assert spool.read(key, len(blob)) == b""
        assert spool.exists(key)
    assert len(spool.segment_names()) == 1  # all in one segment
    store = SpooledStore(FilesystemStore(tmp_path / "objects"), spool)
    assert store.get(spooled[2]) == blobs[2]
    assert store.get_range(spooled[2], 100, 10) == blobs[2][100:110]
    assert store.size(spooled[2]) == len(blobs[2])
    segment_file = next((tmp_path / "spool").glob("*.seg"))
    blocks = segment_file.stat().st_blocks
    store.delete(spooled[2])  # its bytes freed (a hole), the segment file stays
    assert segment_file.stat().st_blocks < blocks
    with pytest.raises(ObjectNotFoundError):
        store.get(spooled[2])
    assert not store.exists(spooled[2])
    assert [store.get(k) for k in spooled[:2] + spooled[3:]] == blobs[:2] + blobs[3:]
    # an object with no whole block of its own keeps its bytes until its segment goes:
    # never zeros in place of what a neighbour shares a block with
    store.delete(spooled[1])
    assert store.get(spooled[1]) == blobs[1] and store.get(spooled[0]) == blobs[0]
    spool.close()


def test_concurrent_appends_from_many_threads_are_each_intact(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", segment_bytes=2_000_000)
    results: dict[int, str] = {}

    def worker(n: int) -> None:
        for i in range(20):
            seed = n * 100 + i
            results[seed] = spool.append(_blob(50_000 + seed, seed))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, key in results.items():
        assert spool.read(key) == _blob(50_000 + seed, seed)
        spool.release(key)
    assert len({segment_of(k) for k in results.values()}) > 1  # rotated at 2 MB
    spool.close()


def test_a_full_segment_stays_locked_until_its_appends_are_released(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", segment_bytes=1000)
    first = spool.append(b"a" * 800)
    second = spool.append(b"b" * 800)  # does not fit: a new segment
    assert segment_of(first) != segment_of(second)
    with spool.unlocked_segments() as candidates:
        assert candidates == []  # the first is full but its commit is not done
    spool.release(first)
    with spool.unlocked_segments() as candidates:
        assert candidates == [segment_of(first)]
        assert spool.reclaim({segment_of(first)}, candidates) == 0  # still referred to
        assert spool.reclaim(set(), candidates) == 1
    assert spool.segment_names() == [segment_of(second)]
    with pytest.raises(ObjectNotFoundError):
        spool.read(first)
    spool.release(second)
    spool.close()


def test_a_segment_another_process_writes_is_never_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    theirs = folder / "otherhost-1-abc-000001.seg"
    theirs.write_bytes(b"x" * 10)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(theirs)!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        spool = Spool(folder)
        with spool.unlocked_segments() as candidates:
            assert candidates == []
            assert spool.reclaim(set(), candidates) == 0
        assert theirs.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    # the writer is gone (its lock went with it): nothing refers to it, so it goes
    with spool.unlocked_segments() as candidates:
        assert candidates == ["otherhost-1-abc-000001"]
        assert spool.reclaim(set(), candidates) == 1
    assert not theirs.exists()


def test_an_idle_active_segment_is_retired_so_it_can_be_reclaimed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    key = spool.append(b"data")
    assert not spool.retire_idle(0.0)  # its commit is still in flight
    spool.release(key)
    assert not spool.retire_idle(3600.0)  # appended a moment ago
    assert spool.retire_idle(0.0)
    with spool.unlocked_segments() as candidates:
        assert candidates == [segment_of(key)]
    later = spool.append(b"more")  # a new segment
    assert segment_of(later) != segment_of(key)
    spool.release(later)
    spool.close()


def test_a_segment_cut_short_reads_as_missing(tmp_path: Path) -> None:
    """What a crash between append and flush can leave: the object is not there (and was
    never acknowledged)."""
    spool = Spool(tmp_path / "spool")
    key = spool.append(b"z" * 1000)
    spool.release(key)
    spool.close()
    name, _offset, _length = parse_spool_key(key)
    os.truncate(tmp_path / "spool" / f"{name}.seg", 500)
    reader = Spool(tmp_path / "spool")
    assert not reader.exists(key)
    with pytest.raises(ObjectNotFoundError):
        reader.read(key)


@pytest.mark.parametrize(
    "key",
    [
        "spool/../../etc/passwd/0-10",
        "spool/seg/0-",
        "spool/seg/-1-2",
        "spool//0-1",
        "spool/a/b/0-1",
    ],
)
def test_hostile_spool_keys_are_refused(tmp_path: Path, key: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidKeyError):
        spool.read(key)


def test_spool_keys_cannot_be_written_through_the_store(tmp_path: Path) -> None:
    store = SpooledStore(FilesystemStore(tmp_path / "objects"), Spool(tmp_path / "spool"))
    with pytest.raises(InvalidKeyError):
        store.put("spool/x-1/0-4", b"data")
    with pytest.raises(InvalidKeyError):
        store.put_many({"spool/x-1/0-4": b"data"})


def test_an_unwritable_spool_raises_storage_error_and_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = Spool(folder)
    folder.rmdir()
    folder.write_bytes(b"")  # a file where the folder must be
    with pytest.raises(StorageError):
        spool.append(b"data")
    folder.unlink()
    folder.mkdir()
    key = spool.append(b"data")
    assert spool.read(key) == b"data"
    spool.release(key)
    spool.close()


def test_segments_are_locked_by_their_writer(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    key = spool.append(b"data")
    path = tmp_path / "spool" / f"{segment_of(key)}.seg"
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    spool.release(key)
    spool.close()


def test_closing_waits_for_appends_in_flight_before_closing_their_segment(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    key = spool.append(b"in flight")
    spool.close()
    with pytest.raises(StorageError):
        spool.append(b"after close")
    path = tmp_path / "spool" / f"{segment_of(key)}.seg"
    fd = os.open(path, os.O_RDONLY)
    try:  # still held by the writer until the ingest in flight is done
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        spool.release(key)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released now
    finally:
        os.close(fd)


def test_a_segment_is_never_seen_unlocked_while_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process reclaiming at the moment a segment is created (before its lock) must
    not delete it: it is made under another name, locked, then renamed."""
    import types

    from kho.storage import spool as spool_module

    folder = tmp_path / "spool"
    writer, other = Spool(folder), Spool(folder)
    real_flock = fcntl.flock
    seen: list[list[str]] = []

    def flock(fd: int, operation: int) -> None:
        if not seen:
            with other.unlocked_segments() as candidates:
                seen.append(candidates)
                other.reclaim(set(), candidates)
        real_flock(fd, operation)

    shim = types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(spool_module, "fcntl", shim)
    key = writer.append(b"acknowledged bytes")
    monkeypatch.undo()
    assert seen == [[]]  # the reclaimer saw nothing to take
    assert writer.read(key) == b"acknowledged bytes"
    writer.release(key)
    writer.close()


def test_half_made_segments_of_a_crash_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = Spool(folder)
    (folder / "hdead-1-abc-000001.making").write_bytes(b"")
    assert spool.remove_stale_makings() == 1
    assert list(folder.iterdir()) == []
