"""What an instance costs once finished (`kho stats`): never more than received for one
that arrived uncompressed, at most 3% more for one that arrived compressed, every object
counted; retrieval stays bit for bit; objects stored by older versions (uncompressed
header and metadata) still read."""

from __future__ import annotations

import hashlib
import json
import secrets
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import UID

from kho.archive import keys
from kho.archive.archive import Archive
from kho.archive.catalog import HEADER_OBJECT, PIXELS_OBJECT, InstanceRecord
from kho.archive.config import Settings
from kho.archive.finish import images
from kho.archive.read import metadata, objects, rendering
from kho.bench.phantom import ct_series_datasets
from kho.codecs.render import RenderParams
from kho.errors import DatasetMismatchError, InvalidDicomError
from kho.viewer_api.app import create_app
from tests.archive.test_ingest import make_instance
from tests.conftest import pydicom_test_files, sample_files


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    with Archive(settings) as arc:
        arc.finisher.stop()  # the tests drain by hand
        yield arc


def _objects(archive: Archive, record: InstanceRecord) -> dict[str, int]:
    """Bytes of each object the row points at, by what it is (one object counted once)."""
    out: dict[str, int] = {}
    seen: set[str] = set()
    named = [("header", record.header_key)]
    if record.pixel_format != "none":
        named.append(("pixels", record.pixels_key))
    named += [(str(n), str(k)) for n, k in record.derived_keys.items()]
    for name, key in named:
        if key not in seen:
            seen.add(key)
            out[name] = len(archive.store.get(key))
    return out


def _arrived_compressed(record: InstanceRecord) -> bool:
    syntax = UID(record.transfer_syntax_uid)  # not a transfer syntax: judged uncompressed
    return syntax.is_transfer_syntax and (syntax.is_compressed or syntax.is_deflated)


def _distinct_files() -> list[Path]:
    seen: set[str] = set()
    out = []
    for path in [*sample_files(), *pydicom_test_files()]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(path)
    return out


def test_instances_finished_inline_cost_no_more_than_received(archive: Archive) -> None:
    """finish_in_background = false (encoded and derived before the acknowledgement): the
    same limits, the header compressed as the finisher stores it, bytes back as sent."""
    offenders: list[str] = []
    stored = 0
    for path in _distinct_files():
        data = path.read_bytes()
        try:
            result = archive.ingest_part10(data, defer=False, lenient_identity=True)
        except (InvalidDicomError, DatasetMismatchError):
            continue  # refused at ingest (broken files): nothing stored
        stored += 1
        record, back = archive.read_instance(result.sop_uid)
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest(), path.name
        sizes = _objects(archive, record)
        assert sum(sizes.values()) == record.stored_size, (path.name, sizes)
        limit = record.received_size * (1.03 if _arrived_compressed(record) else 1.0)
        if record.stored_size > limit:
            offenders.append(
                f"{path.name} ({record.transfer_syntax_uid}): received {record.received_size}, "
                f"stored {record.stored_size} {sizes}"
            )
    assert stored > 150
    assert not offenders, "\n".join(offenders)


def test_finished_instances_cost_no_more_than_received(archive: Archive) -> None:
    """Every file of the samples and of pydicom's test data, finished one by one (many share
    a SOP Instance UID): stored <= received (uncompressed) or <= 1.03x (compressed), the
    catalog's stored_size is what the objects hold, and the bytes come back as sent."""
    offenders: list[str] = []
    problems: list[str] = []
    finished = 0
    for path in _distinct_files():
        data = path.read_bytes()
        try:
            result = archive.ingest_part10(data, defer=True, lenient_identity=True)
        except (InvalidDicomError, DatasetMismatchError):
            continue  # refused at ingest (broken files): nothing stored
        finished += archive.finisher.drain()
        record, back = archive.read_instance(result.sop_uid)
        name = path.name
        if archive.catalog.unfinished_count():
            problems.append(f"{name}: not finished")
        if hashlib.sha256(back).hexdigest() != hashlib.sha256(data).hexdigest():
            problems.append(f"{name}: retrieved bytes differ from those sent")
        sizes = _objects(archive, record)
        if sum(sizes.values()) != record.stored_size:
            problems.append(f"{name}: stored_size {record.stored_size}, objects {sizes}")
        limit = record.received_size * (1.03 if _arrived_compressed(record) else 1.0)
        if record.stored_size > limit:
            offenders.append(
                f"{name} ({record.transfer_syntax_uid}): received {record.received_size}, "
                f"stored {record.stored_size} {sizes}"
            )
        # the metadata is served, and the same whether stored or made from the header
        document = json.loads(metadata.instance_document(archive, record))
        assert document == json.loads(metadata.document_from_header(archive, record)), name
        thumbnail = rendering.stored_thumbnail(archive, record)
        assert thumbnail is None or thumbnail[:2] == b"\xff\xd8", name
    assert finished > 150
    assert not problems, "\n".join(problems)
    assert not offenders, "instances grown past their allowance:\n" + "\n".join(offenders)


def test_viewer_objects_kept_where_the_savings_pay_for_them(archive: Archive) -> None:
    """A CT slice JPEG-LS shrinks keeps everything a viewer reads first; a radiograph that
    arrived as JPEG 2000 keeps its metadata, thumbnail and the coarse tile levels; a 4x4
    image keeps no thumbnail (it is smaller than one)."""
    ct = next(iter(ct_series_datasets(1, rows=256, cols=256)))
    radiograph = (sample_files()[0].parent / "RG3_J2KR.dcm").read_bytes()
    tiny = make_instance()
    records = []
    for data in (ct, radiograph, tiny):
        result = archive.ingest_part10(data, defer=True)
        archive.finisher.drain()
        records.append(archive.catalog.require_instance(result.sop_uid))
    ct_record, rg_record, tiny_record = records
    assert {"metadata", "thumbnail"} <= set(ct_record.derived_keys)
    assert ct_record.header_key.endswith(keys.COMPRESSED_SUFFIX)
    assert ct_record.stored_size < ct_record.received_size / 2
    assert {"metadata", "thumbnail", "tiles"} <= set(rg_record.derived_keys)
    assert rg_record.stored_size <= rg_record.received_size * 1.03
    # level 0 (1760x1760) does not fit in 3%: rendered on request, the coarser ones stored
    assert rendering.stored_tile(archive, rg_record, 0, 0, 0) is None
    assert rendering.stored_tile(archive, rg_record, 3, 0, 0) is not None
    with pytest.raises(IndexError):
        rendering.stored_tile(archive, rg_record, 0, 7, 0)
    assert "thumbnail" not in tiny_record.derived_keys
    assert tiny_record.stored_size <= tiny_record.received_size
    client = TestClient(create_app(archive))
    for record in records:
        base = (
            f"/dicom-web/studies/{record.study_uid}/series/{record.series_uid}"
            f"/instances/{record.sop_uid}"
        )
        assert client.get(base + "/thumbnail").status_code == 200
        answer = client.get(base + "/metadata")
        assert answer.status_code == 200
        assert answer.json()[0]["00080018"]["Value"] == [record.sop_uid]
    tile = client.get(
        f"/dicom-web/studies/{rg_record.study_uid}/series/{rg_record.series_uid}"
        f"/instances/{rg_record.sop_uid}/frames/1/tiles/0/1/1"
    )
    assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"


def test_trimmed_pyramid_keeps_the_coarsest_levels_byte_for_byte(archive: Archive) -> None:
    yy, xx = np.mgrid[0:1300, 0:1100]
    values = (2000 + 1500 * np.sin(xx / 90.0) * np.cos(yy / 70.0)).astype(np.uint16)
    params = RenderParams(window_center=2000.0, window_width=3000.0)
    full = images.encode_pyramid(values, params)
    assert images.trim_pyramid(full, len(full)) == full
    trimmed = images.trim_pyramid(full, len(full) // 2)
    assert trimmed is not None and len(trimmed) <= len(full) // 2
    for fits in (full, trimmed):
        assert images.trim_pyramid(fits, 10) is None  # not even the top level

    def tiles(blob: bytes, level: int) -> list[bytes | None]:
        key = f"test/{secrets.token_hex(8)}.tiles"
        archive.store.put(key, blob)
        record = SimpleNamespace(derived_keys={rendering.TILES_OBJECT: key})
        across = -(-values.shape[1] // (rendering.TILE_SIZE << level))
        return [
            rendering.stored_tile(archive, record, level, x, 0)  # type: ignore[arg-type]
            for x in range(across)
        ]

    assert all(tile is None for tile in tiles(trimmed, 0))  # left out: rendered on request
    assert all(tile is not None for tile in tiles(full, 0))
    for level in (2, 3):
        assert tiles(trimmed, level) == tiles(full, level)
    with pytest.raises(IndexError):  # outside the pyramid, stored level or not
        tiles(trimmed, 4)


def _as_old_version_stored_it(archive: Archive, record: InstanceRecord) -> InstanceRecord:
    """Rewrite a finished instance as versions before compression wrote it: the header
    uncompressed at ``<prefix>.header`` (not named in ``derived``), the metadata plain
    JSON at its key."""
    header = objects.read_header_object(archive.store, record.header_key)
    archive.store.put(keys.header_key(record.object_prefix), header)
    archive.store.delete(record.header_key)
    names = dict(record.derived_keys)
    names.pop(HEADER_OBJECT)
    metadata_key = names["metadata"]
    archive.store.put(metadata_key, metadata.instance_document(archive, record))
    archive.catalog.execute(
        "UPDATE instances SET derived = ?, header_size = ? WHERE sop_uid = ?",
        (json.dumps(names, separators=(",", ":")), len(header), record.sop_uid),
    )
    old = archive.catalog.require_instance(record.sop_uid)
    assert old.header_key == keys.header_key(record.object_prefix)
    assert archive.store.get(metadata_key)[:1] == b"{"
    return old


def test_objects_stored_uncompressed_by_older_versions_still_read(archive: Archive) -> None:
    sent = [next(iter(ct_series_datasets(1, rows=256, cols=256)))]
    sent.append((sample_files()[0].parent / "MR2_J2KR.dcm").read_bytes())
    for data in sent:
        result = archive.ingest_part10(data, defer=True)
        archive.finisher.drain()
        new = archive.catalog.require_instance(result.sop_uid)
        assert new.header_key.endswith(keys.COMPRESSED_SUFFIX)
        document = metadata.instance_document(archive, new)
        header = metadata.stored_header(archive, new)
        old = _as_old_version_stored_it(archive, new)
        assert PIXELS_OBJECT in old.derived_keys and not old.stored_as_received
        assert archive.read_part10(old) == data
        assert [p for _r, p in archive.verify() if p] == []
        assert metadata.instance_document(archive, old) == document
        assert metadata.stored_header(archive, old) == header
        thumbnail = rendering.stored_thumbnail(archive, old)
        assert thumbnail is not None and thumbnail[:2] == b"\xff\xd8"
        client = TestClient(create_app(archive))
        base = f"/dicom-web/studies/{old.study_uid}/series/{old.series_uid}"
        answer = client.get(base + "/metadata")
        assert answer.status_code == 200
        assert answer.json()[0]["00080018"]["Value"] == [old.sop_uid]
        served = client.get(f"{base}/instances/{old.sop_uid}/thumbnail")
        assert served.status_code == 200 and served.content == thumbnail
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = pydicom.dcmread(BytesIO(archive.read_part10(old)))
        assert back.SOPInstanceUID == old.sop_uid
