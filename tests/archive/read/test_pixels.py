"""Reading at-rest pixels back (kho.archive.read.pixels): a stored JPEG-LS frame is
decoded only into the frame its row describes."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest

from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.read import pixels
from kho.bench.phantom import ct_series_datasets
from kho.codecs import jpegls
from kho.errors import CodecError


def _stored_ct(archive: Archive) -> tuple[InstanceRecord, bytes]:
    (dataset,) = ct_series_datasets(1, rows=64, cols=64)
    uid = archive.ingest_part10(dataset).sop_uid
    assert archive.finisher.wait_idle(timeout=120)
    record = archive.catalog.require_instance(uid)
    assert record.pixel_format == "jpeg-ls"
    return record, archive.store.get(record.pixels_key)


def test_a_stored_frame_decodes_to_its_rows_geometry(archive: Archive) -> None:
    record, payload = _stored_ct(archive)
    codec = pixels._at_rest_codec("jpeg-ls")
    (fragments,) = json.loads(record.frame_index)
    frame = pixels.decode_stored_array(codec, record, payload, fragments)
    assert frame.shape == (64, 64)
    # a row that says otherwise (a damaged catalog or object) is refused, not believed
    wrong = dataclasses.replace(record, rows_=32)
    with pytest.raises(CodecError):
        pixels.decode_stored_array(codec, wrong, payload, fragments)


def test_a_header_claiming_a_huge_frame_is_refused_before_allocating(archive: Archive) -> None:
    record, _payload = _stored_ct(archive)
    noise = np.random.default_rng(0).integers(0, 4096, (64, 64), dtype=np.uint16)
    stream = bytearray(jpegls.encode(noise, bits_stored=12))  # ~6 KB: enough bits for the lines
    sof = stream.index(b"\xff\xf7")  # SOF55: length(2) precision(1) rows(2) columns(2)
    stream[sof + 5 : sof + 9] = (4096).to_bytes(2, "big") * 2  # 4096 x 4096: 32 MiB
    codec = pixels._at_rest_codec("jpeg-ls")
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            pixels.decode_stored_array(codec, record, bytes(stream), [[0, len(stream)]])
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
