"""The background finisher: instances acknowledged as received are encoded and derived
afterwards, stay bit-exact throughout, and leave nothing behind, whatever happens meanwhile
(replacement, two finishers, failures, SIGKILL)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kho.archive.archive import Archive
from kho.archive.catalog import PIXELS_OBJECT
from kho.archive.config import Settings
from kho.archive.dataset.part10 import read_file_meta
from kho.archive.finish import finisher as finisher_module
from kho.bench.phantom import ct_series_datasets
from kho.storage.spool import is_spool_key, segment_of
from tests.archive.test_ingest import make_instance
from tests.helpers import dcmtk
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ENGINES, archive_on
from tests.helpers.server import kho_serve


@pytest.fixture(scope="module")
def ct_slices() -> list[bytes]:
    """Realistic, compressible CT slices (JPEG-LS holds them in about a third)."""
    return list(ct_series_datasets(6, rows=128, cols=128))


@pytest.fixture(params=ENGINES)
def archive(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Archive]:
    with archive_on(request.param, settings) as archive:
        yield archive


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _referenced_keys(archive: Archive) -> set[str]:
    """Every object key the catalog points at, plus those listed as garbage."""

    out: set[str] = set()
    for record in archive.catalog.iter_instances():
        out.add(record.header_key)
        if record.pixel_format != "none":
            out.add(record.pixels_key)
        out.update(str(v) for v in record.derived_keys.values())
    out.update(r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage"))
    return out


def _expire_garbage(archive: Archive) -> None:
    archive.catalog.execute("UPDATE garbage SET not_before = 0")


def test_acknowledged_as_received_then_encoded_bit_for_bit(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    archive.finisher.stop()  # this test drains by hand, step by step
    results = [archive.ingest_part10(data, defer=True) for data in ct_slices]
    assert archive.catalog.unfinished_count() == len(ct_slices)
    for data, result in zip(ct_slices, results, strict=True):
        record, back = archive.read_instance(result.sop_uid)
        assert record.pixel_format == "raw" and record.stored_as_received
        assert record.derived_keys == {"header": record.pixels_key, "pixels": record.pixels_key}
        assert archive.store.get(record.pixels_key) == data  # one object, the bytes received
        assert back == data  # retrievable at once, as received

    assert archive.finisher.drain() == len(ct_slices)
    assert archive.catalog.unfinished_count() == 0
    for data, result in zip(ct_slices, results, strict=True):
        record, back = archive.read_instance(result.sop_uid)
        assert record.pixel_format == "jpeg-ls" and not record.stored_as_received
        assert {"metadata", "thumbnail", PIXELS_OBJECT} <= set(record.derived_keys)
        assert _sha(back) == _sha(data) == record.sha256
        assert record.pixel_size < 128 * 128 * 2 / 2  # 12-bit CT: about a third
    assert archive.stats()["unfinished"] == 0

    # the received pixel objects are garbage now, deleted once their grace period ends
    raw_keys = [r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage")]
    assert len(raw_keys) == len(ct_slices)
    assert all(archive.store.exists(k) for k in raw_keys)
    _expire_garbage(archive)
    assert finisher_module.collect_garbage(archive) == len(ct_slices)
    assert not archive.catalog.fetchall("SELECT object_key FROM garbage")
    if archive.spool is not None:  # spooled: freed with the segment, once none is in use
        assert all(is_spool_key(k) for k in raw_keys)
        assert finisher_module.reclaim_spool(archive, archive.spool, force=True) == 1
        assert archive.spool.segment_names() == []
    assert not any(archive.store.exists(k) for k in raw_keys)
    assert set(archive.store.list("")) == _referenced_keys(archive)
    assert [p for _r, p in archive.verify() if p] == []


def test_background_threads_finish_what_ingest_queues(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    results = [archive.ingest_part10(data, defer=True) for data in ct_slices]
    assert archive.finisher.wait_idle(timeout=120)
    for data, result in zip(ct_slices, results, strict=True):
        record, back = archive.read_instance(result.sop_uid)
        assert record.pixel_format == "jpeg-ls"
        assert back == data


def test_a_finisher_thread_survives_an_unexpected_failure(
    archive: Archive, ct_slices: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is no KhoError (found by the crash campaign: a catalog mid-edit)
    must not end the thread for good: the queue would stay undrained until a restart."""
    finisher = archive.finisher
    real_claim = finisher._claim_next
    failures: list[int] = []

    def claim_failing_first() -> object:
        if not failures:
            failures.append(1)
            raise RuntimeError("an unexpected failure (test)")
        return real_claim()

    monkeypatch.setattr(finisher, "_claim_next", claim_failing_first)
    results = [archive.ingest_part10(data, defer=True) for data in ct_slices[:3]]
    assert archive.finisher.wait_idle(timeout=120)
    assert failures == [1]
    for data, result in zip(ct_slices, results, strict=False):
        record, back = archive.read_instance(result.sop_uid)
        assert record.pixel_format == "jpeg-ls"
        assert back == data


def test_inline_ingest_queues_nothing(archive: Archive, ct_slices: list[bytes]) -> None:
    result = archive.ingest_part10(ct_slices[0], defer=False)
    assert archive.catalog.unfinished_count() == 0
    assert archive.catalog.require_instance(result.sop_uid).pixel_format == "jpeg-ls"


def test_replaced_while_finishing_leaves_nothing_behind(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    archive.finisher.stop()
    first = ct_slices[0]
    ds = pydicom.dcmread(BytesIO(first))
    ds.SeriesDescription = "corrected"
    second = part10_bytes(ds)

    result = archive.ingest_part10(first, defer=True)
    ((sop_uid, old_prefix, _attempts),) = archive.catalog.claim_unfinished(1, 600)
    archive.ingest_part10(second, defer=True)  # replaces it before the finisher is done
    assert archive.finisher.finish_one(sop_uid, old_prefix) is False
    archive.recover(grace_s=0)  # the replaced version's objects are deleted
    _expire_garbage(archive)
    finisher_module.collect_garbage(archive)
    assert not [k for k in archive.store.list("") if k.startswith(old_prefix)]

    assert archive.finisher.drain() == 1
    record, back = archive.read_instance(result.sop_uid)
    assert back == second and record.pixel_format == "jpeg-ls"
    _expire_garbage(archive)
    finisher_module.collect_garbage(archive)
    assert set(archive.store.list("")) == _referenced_keys(archive)


def test_two_finishers_on_one_catalog_finish_each_instance_once(
    settings: Settings, ct_slices: list[bytes]
) -> None:
    with Archive(settings) as first, Archive(settings) as second:
        first.finisher.stop()
        second.finisher.stop()
        for data in ct_slices:
            first.ingest_part10(data, defer=True)
        counts: list[int] = []
        threads = [
            threading.Thread(target=lambda a=a: counts.append(a.finisher.drain()))
            for a in (first, second)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(counts) == len(ct_slices)
        assert first.catalog.unfinished_count() == 0
        assert {r.pixel_format for r in first.catalog.iter_instances()} == {"jpeg-ls"}


def test_an_instance_that_cannot_be_finished_stays_as_received(
    archive: Archive, ct_slices: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[0], defer=True)

    def broken_deriver(*_args: object) -> dict[str, bytes]:
        raise RuntimeError("deriver bug")

    monkeypatch.setattr(archive, "derivers", [broken_deriver])
    for _ in range(finisher_module.MAX_ATTEMPTS):
        assert archive.finisher.drain() == 0
    assert archive.catalog.unfinished_count() == 0  # given up on, not retried forever
    record, back = archive.read_instance(result.sop_uid)
    assert record.pixel_format == "raw" and back == ct_slices[0] and record.stored_as_received
    # what the failed attempts wrote is unreferenced but harmless: the next attempt (or the
    # deletion of the prefix) overwrites it; nothing is visible
    assert [p for _r, p in archive.verify() if p] == []


def test_small_and_pixel_less_instances_are_finished_too(archive: Archive) -> None:
    archive.finisher.stop()
    tiny = make_instance()
    result = archive.ingest_part10(tiny, defer=True)
    assert archive.finisher.drain() == 1
    record, back = archive.read_instance(result.sop_uid)
    assert back == tiny
    assert "metadata" in record.derived_keys


def test_sigkill_while_finishing_then_restart_finishes_everything(tmp_path: Path) -> None:
    """kho serve acknowledges a CT series, is killed while its finisher encodes it, and a
    restarted kho serve finishes the rest: every instance bit-exact, no orphan objects."""
    folder = tmp_path / "ct"
    folder.mkdir()
    files = []
    for i, data in enumerate(ct_series_datasets(40)):
        path = folder / f"CT{i:03d}.dcm"
        path.write_bytes(data)
        files.append(path)
    data_dir = tmp_path / "data"
    with kho_serve(data_dir) as (proc, port):
        sent = subprocess.run(
            [dcmtk.tool("storescu"), "-aec", "KHO", "127.0.0.1", str(port), *map(str, files)],
            env=dcmtk.env(),
            capture_output=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr.decode(errors="replace")[-500:]
        with Archive(Settings(data_dir=data_dir)) as probe:
            probe.finisher.stop()
            left = probe.catalog.unfinished_count()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert left > 0, "the kill must land while instances are still being finished"

    with kho_serve(data_dir), Archive(Settings(data_dir=data_dir)) as archive:
        archive.finisher.stop()  # the server's finisher does the work, not this probe
        deadline = time.monotonic() + 120
        while archive.catalog.unfinished_count() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert archive.catalog.unfinished_count() == 0
    with Archive(Settings(data_dir=data_dir)) as archive:
        archive.finisher.stop()
        assert archive.catalog.counts()["instances"] == len(files)
        for path in files:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            record, data = archive.read_instance(sop)
            assert record.pixel_format == "jpeg-ls"
            original = path.read_bytes()
            assert data[read_file_meta(data)[1] :] == original[read_file_meta(original)[1] :]
        assert [p for _r, p in archive.verify() if p] == []
        _expire_garbage(archive)
        finisher_module.collect_garbage(archive)
        assert set(archive.store.list("")) == _referenced_keys(archive)


def test_compressed_instances_stay_one_object_with_frames_found_inside(archive: Archive) -> None:
    """An instance received compressed keeps its fragments as received (nothing to
    re-encode): kept whole where it is already in the store, else (spooled) split into a
    compressed header and the fragments; its frames are ranged reads before and after
    finishing.  Its thumbnail would cost 13% of it: left to be rendered on request."""
    from pydicom.encaps import generate_frames

    from kho.archive.read.pixels import stored_frame
    from tests.conftest import SAMPLES_DIR

    archive.finisher.stop()
    data = (SAMPLES_DIR / "JLSL_16_15_1_1F.dcm").read_bytes()
    ds = pydicom.dcmread(BytesIO(data))
    expected = next(generate_frames(ds.PixelData, number_of_frames=1))
    result = archive.ingest_part10(data, defer=True)
    received_key = archive.catalog.require_instance(result.sop_uid).pixels_key
    for finished in (False, True):
        record = archive.catalog.require_instance(result.sop_uid)
        assert record.pixel_format == "encapsulated"
        assert record.stored_as_received is (not finished or not is_spool_key(received_key))
        frame, syntax = stored_frame(archive, record, 1)
        assert frame.rstrip(b"\x00") == expected.rstrip(b"\x00")
        assert syntax == ds.file_meta.TransferSyntaxUID
        assert archive.read_instance(result.sop_uid)[1] == data
        assert ("metadata" in record.derived_keys) is finished
        assert "thumbnail" not in record.derived_keys
        assert record.stored_size <= record.received_size * 1.03
        if not finished:
            assert archive.finisher.drain() == 1
    garbage = [r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage")]
    if is_spool_key(received_key):  # out of the spool: header and fragments, apart
        assert garbage == [received_key] and not is_spool_key(record.pixels_key)
        assert record.header_key.endswith("-zstd")
    else:  # nothing to re-encode: the received object stays
        assert garbage == [] and record.pixels_key == received_key


def test_a_record_loaded_before_the_switch_still_reads_after_the_grace(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    """A C-MOVE loads its records first; the finisher may switch one and its received
    object be deleted before the move reaches it: the instance is rebuilt from the row."""
    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[0], defer=True)
    stale = archive.catalog.require_instance(result.sop_uid)
    assert archive.finisher.drain() == 1
    _expire_garbage(archive)
    assert finisher_module.collect_garbage(archive) == 1
    if archive.spool is not None:  # a spooled object goes with its segment
        assert finisher_module.reclaim_spool(archive, archive.spool, force=True) == 1
    assert not archive.store.exists(stale.pixels_key)
    assert archive.read_part10(stale) == ct_slices[0]


def test_a_second_finisher_with_a_stale_record_changes_nothing(
    archive: Archive, ct_slices: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes finishing one instance (a lease ran out): the one that switches second
    must not point the row back at the received object, which is garbage by then."""
    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[0], defer=True)
    prefix = archive.catalog.require_instance(result.sop_uid).object_prefix
    stale = archive.catalog.require_instance(result.sop_uid)
    assert archive.finisher.drain() == 1  # process A switched the row
    finished = archive.catalog.require_instance(result.sop_uid)
    # process B, holding the row as it was, with no codec at hand (keeps it raw)
    monkeypatch.setattr(archive, "at_rest_codec", False)
    real_get = archive.catalog.get_instance
    calls: list[str] = []

    def stale_first(sop: str) -> Any:  # B read the row before A switched it
        calls.append(sop)
        return stale if len(calls) == 1 else real_get(sop)

    monkeypatch.setattr(archive.catalog, "get_instance", stale_first)
    assert archive.finisher.finish_one(result.sop_uid, prefix) is False
    monkeypatch.undo()
    assert archive.catalog.require_instance(result.sop_uid) == finished
    _expire_garbage(archive)
    finisher_module.collect_garbage(archive)
    assert archive.read_instance(result.sop_uid)[1] == ct_slices[0]
    assert set(archive.store.list("")) == _referenced_keys(archive)


def test_an_instance_claimed_too_often_is_given_up(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    """A process that dies on an instance (a crash in native code) must not take every
    process with it forever: after MAX_ATTEMPTS claims it stays as received."""
    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[0], defer=True)
    archive.catalog.execute("UPDATE unfinished SET attempts = ?", (finisher_module.MAX_ATTEMPTS,))
    claimed = archive.catalog.claim_unfinished(1, 600, finisher_module.MAX_ATTEMPTS)
    if archive.spool is not None:
        # spooled: claimed once more, only to be copied out of the spool as received
        assert [c[2] for c in claimed] == [finisher_module.MAX_ATTEMPTS + 1]
        archive.finisher._finish_claimed(*claimed[0])
        record = archive.catalog.require_instance(result.sop_uid)
        assert record.pixel_format == "raw" and not is_spool_key(record.pixels_key)
    else:
        assert claimed == []
    assert archive.catalog.unfinished_count() == 0
    assert archive.read_instance(result.sop_uid)[1] == ct_slices[0]


# --- the ingest spool (kho.storage.spool) -----------------------------------------------


def test_spooled_instances_survive_a_restart_and_leave_the_spool_when_finished(
    settings: Settings, ct_slices: list[bytes]
) -> None:
    """Acknowledged from the spool, read back by the next process, moved into the object
    store by its finisher, and the segment deleted once nothing refers to it."""
    with Archive(settings) as first:
        first.finisher.stop()
        results = [first.ingest_part10(data, defer=True) for data in ct_slices]
        spooled = first.catalog.require_instance(results[0].sop_uid).pixels_key
        assert is_spool_key(spooled)
    with Archive(settings) as second:  # the first one's segment is nobody's now
        second.finisher.stop()
        assert second.spool is not None
        assert finisher_module.reclaim_spool(second, second.spool, force=True) == 0
        for data, result in zip(ct_slices, results, strict=True):
            assert second.read_instance(result.sop_uid)[1] == data
        assert second.finisher.drain() == len(ct_slices)
        _expire_garbage(second)
        finisher_module.collect_garbage(second)
        assert finisher_module.reclaim_spool(second, second.spool, force=True) == 1
        assert second.spool.segment_names() == []
        for data, result in zip(ct_slices, results, strict=True):
            record, back = second.read_instance(result.sop_uid)
            assert _sha(back) == _sha(data) and record.pixel_format == "jpeg-ls"
        assert [p for _r, p in second.verify() if p] == []


def test_a_process_never_deletes_the_segment_another_is_writing(
    settings: Settings, ct_slices: list[bytes]
) -> None:
    with Archive(settings) as writer, Archive(settings) as other:
        writer.finisher.stop()
        other.finisher.stop()
        result = writer.ingest_part10(ct_slices[0], defer=True)
        writer.catalog.execute("DELETE FROM unfinished")  # as if nothing referred to it
        assert other.spool is not None
        assert finisher_module.reclaim_spool(other, other.spool, force=True) == 0
        assert other.read_instance(result.sop_uid)[1] == ct_slices[0]  # read across


def test_an_instance_no_finishing_succeeds_on_is_moved_out_of_the_spool(
    archive: Archive, ct_slices: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given up after MAX_ATTEMPTS, it stays as received, in the object store: its spool
    segment can go."""
    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[0], defer=True)
    spooled = archive.catalog.require_instance(result.sop_uid).pixels_key
    assert is_spool_key(spooled)

    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("a codec bug")

    monkeypatch.setattr(finisher_module, "encode_pixels", broken)
    for _ in range(finisher_module.MAX_ATTEMPTS):
        archive.finisher.drain()
        archive.catalog.execute("UPDATE unfinished SET claimed_at = 0, owner = ''")
    assert archive.catalog.unfinished_count() == 0
    record, back = archive.read_instance(result.sop_uid)
    assert back == ct_slices[0] and record.pixel_format == "raw"
    assert not is_spool_key(record.pixels_key) and record.stored_as_received
    garbage = [r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage")]
    assert garbage == [spooled]


def test_the_catalog_knows_which_spool_segments_are_in_use(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[0], defer=True)
    segment = segment_of(archive.catalog.require_instance(result.sop_uid).pixels_key)
    assert archive.catalog.spool_segments_in_use() == {segment}  # queued
    assert archive.finisher.drain() == 1
    assert archive.catalog.spool_segments_in_use() == {segment}  # garbage, in its grace
    _expire_garbage(archive)
    finisher_module.collect_garbage(archive)
    assert archive.catalog.spool_segments_in_use() == set()


def test_transient_failures_never_give_up_a_spooled_instance(
    archive: Archive, ct_slices: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outages are not the instance's fault: its attempts are not counted, and even a
    spooled instance given up on (a process dying on it) stays queued until it is out of
    the spool; its segment is never deleted under it."""
    from kho.errors import StorageError

    archive.finisher.stop()
    monkeypatch.setattr(archive.finisher._stop, "wait", lambda *_a, **_k: False)
    result = archive.ingest_part10(ct_slices[0], defer=True)
    assert is_spool_key(archive.catalog.require_instance(result.sop_uid).pixels_key)

    def outage(*_args: object, **_kwargs: object) -> None:
        raise StorageError("object store unavailable")

    monkeypatch.setattr(finisher_module, "put_objects", outage)
    for _ in range(finisher_module.MAX_ATTEMPTS + 1):
        archive.finisher.drain(timeout=0.3)
    assert archive.catalog.fetchall("SELECT attempts FROM unfinished") == [(0,)]
    # as if processes had died on it MAX_ATTEMPTS times
    archive.catalog.execute("UPDATE unfinished SET attempts = ?", (finisher_module.MAX_ATTEMPTS,))
    archive.finisher.drain(timeout=0.3)  # still an outage: it stays queued, in the spool
    assert archive.catalog.unfinished_count() == 1
    assert archive.spool is not None
    finisher_module.reclaim_spool(archive, archive.spool, force=True)
    assert archive.read_instance(result.sop_uid)[1] == ct_slices[0]
    monkeypatch.undo()
    monkeypatch.setattr(archive.finisher._stop, "wait", lambda *_a, **_k: False)
    archive.catalog.execute(
        "UPDATE unfinished SET attempts = ?, owner = '', claimed_at = 0",
        (finisher_module.MAX_ATTEMPTS,),
    )
    archive.finisher.drain(timeout=0.3)  # given up: moved out as received, not encoded
    assert archive.catalog.unfinished_count() == 0
    record, back = archive.read_instance(result.sop_uid)
    assert back == ct_slices[0] and record.pixel_format == "raw"
    assert not is_spool_key(record.pixels_key)
    _expire_garbage(archive)
    finisher_module.collect_garbage(archive)
    assert finisher_module.reclaim_spool(archive, archive.spool, force=True) == 1
    assert archive.read_instance(result.sop_uid)[1] == ct_slices[0]


def test_a_replaced_spooled_version_keeps_its_grace(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    archive.finisher.stop()
    first = archive.ingest_part10(ct_slices[0], defer=True)
    stale = archive.catalog.require_instance(first.sop_uid)
    ds = pydicom.dcmread(BytesIO(ct_slices[0]))
    ds.SeriesDescription = "corrected"
    archive.ingest_part10(part10_bytes(ds), defer=True)  # replaces it
    garbage = [r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage")]
    assert stale.pixels_key in garbage  # its segment stays through a reader's grace
    assert archive.read_part10(stale) == ct_slices[0]


def test_spooled_bytes_that_do_not_match_their_sha256_stay_where_they_are(
    archive: Archive, ct_slices: list[bytes]
) -> None:
    """The finisher is about to make a spooled instance's bytes its only copy: bytes that
    changed on the disk (or on the way from another host) are not moved or encoded; the
    instance stays queued and in the spool, and verify names it."""
    from kho.storage.spool import parse_spool_key

    archive.finisher.stop()
    result = archive.ingest_part10(ct_slices[1], defer=True)
    record = archive.catalog.require_instance(result.sop_uid)
    assert is_spool_key(record.pixels_key)
    segment, offset, length = parse_spool_key(record.pixels_key)
    with open(archive.spool_reader.folder / f"{segment}.seg", "r+b") as segment_file:
        segment_file.seek(offset + length - 100)
        segment_file.write(b"\x55\xaa\x55\xaa")
    assert archive.finisher.drain() == 0
    assert archive.catalog.require_instance(result.sop_uid) == record
    assert archive.catalog.unfinished_count() == 1
    assert archive.catalog.spool_segments_in_use() == {segment}
    problems = [p for r, p in archive.verify() if p and r.sop_uid == result.sop_uid]
    assert problems and "SHA-256" in problems[0]


def test_the_finisher_waits_while_any_process_of_the_host_receives(tmp_path: Path) -> None:
    """kho serve --workers: one worker's finisher must not take the CPU another worker is
    receiving with; the processes of a host share when it last took an instance in."""
    settings = Settings(data_dir=tmp_path / "data")
    with Archive(settings) as receiving, Archive(settings) as idle:
        receiving.finisher.stop()
        idle.finisher.stop()
        assert idle.seconds_since_ingest() > finisher_module.QUIET_S
        receiving.ingest_part10(make_instance())
        assert idle.seconds_since_ingest() < finisher_module.QUIET_S
        assert idle.finisher._receiving()
