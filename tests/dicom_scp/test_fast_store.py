"""kho's C-STORE receive path: PDVs in any fragmentation assemble to the dataset sent,
everything that is not a C-STORE-RQ reaches pynetdicom untouched, malformed input aborts."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.dataset.part10 import read_file_meta
from kho.dicom_scp import fast_store
from kho.dicom_scp.server import DicomServer
from tests.archive.test_ingest import make_instance
from tests.helpers.part10 import part10_bytes

CT = "1.2.840.10008.5.1.4.1.1.2"
COMMAND, LAST = 0x01, 0x02


def _command(**fields: bytes) -> bytes:
    """An implicit VR little endian command set from (element number in hex) -> value."""
    body = b"".join(
        struct.pack("<HHL", 0, int(tag[1:], 16), len(value)) + value
        for tag, value in sorted(fields.items(), key=lambda kv: int(kv[0][1:], 16))
    )
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def _store_rq(message_id: int = 7, sop: bytes = b"1.2.3.4\x00") -> bytes:
    return _command(
        e0002=CT.encode() + b"\x00",
        e0100=struct.pack("<H", 0x0001),
        e0110=struct.pack("<H", message_id),
        e0700=struct.pack("<H", 0),
        e0800=struct.pack("<H", 0x0000),
        e1000=sop,
    )


def _echo_rq() -> bytes:
    return _command(
        e0002=b"1.2.840.10008.1.1\x00",
        e0100=struct.pack("<H", 0x0030),
        e0110=struct.pack("<H", 1),
        e0800=struct.pack("<H", 0x0101),
    )


class _Harness:
    """A StoreReceiver on a stand-in DUL: records stores, deliveries, sends and events."""

    def __init__(self, status: int = 0, comment: str | None = None) -> None:
        self.stored: list[tuple[bytes, str, str, str, str]] = []
        self.delivered: list[bytes] = []
        self.sent: list[bytes] = []
        self.events: list[str] = []
        context = SimpleNamespace(transfer_syntax=["1.2.840.10008.1.2.1"])
        self.dul: Any = SimpleNamespace(
            assoc=SimpleNamespace(
                _accepted_cx={1: context}, requestor=SimpleNamespace(ae_title="MODALITY")
            ),
            socket=SimpleNamespace(send=self.sent.append),
            event_queue=SimpleNamespace(put=self.events.append),
        )

        def store(parts: Any, ts: str, cls: str, inst: str, ae: str) -> tuple[int, str | None]:
            self.stored.append((b"".join(bytes(p) for p in parts), ts, cls, inst, ae))
            return status, comment

        self.receiver = fast_store.StoreReceiver(self.dul, store, self.delivered.append)

    def pdu(self, *pdvs: tuple[int, int, bytes]) -> None:
        raw = fast_store.p_data_pdu(list(pdvs))
        self.receiver.feed(raw[:6], memoryview(bytearray(raw[6:])))


def _pdvs_of(pdu: bytes) -> list[tuple[int, int, bytes]]:
    found = fast_store.split_pdvs(memoryview(pdu[6:]))
    assert found is not None
    return [(cid, control, bytes(data)) for cid, control, data in found]


@pytest.mark.parametrize("split", [1, 2, 5])
def test_a_store_in_any_fragmentation_is_assembled_and_answered(split: int) -> None:
    harness = _Harness()
    command, dataset = _store_rq(), bytes(range(256)) * 40
    step = -(-len(command) // split)
    pieces = [command[i : i + step] for i in range(0, len(command), step)]
    for i, piece in enumerate(pieces):
        harness.pdu((1, COMMAND | (LAST if i == len(pieces) - 1 else 0), piece))
    chunks = [dataset[i : i + 3000] for i in range(0, len(dataset), 3000)]
    # two dataset fragments per PDU
    for i in range(0, len(chunks), 2):
        pair = chunks[i : i + 2]
        harness.pdu(*[(1, LAST if i + j == len(chunks) - 1 else 0, c) for j, c in enumerate(pair)])
    assert harness.stored == [(dataset, "1.2.840.10008.1.2.1", CT, "1.2.3.4", "MODALITY")]
    assert harness.delivered == [] and harness.events == []
    ((cid, control, response),) = _pdvs_of(harness.sent[0])
    assert (cid, control) == (1, COMMAND | LAST)
    assert response == fast_store.store_response_command(CT, "1.2.3.4", 7, 0)


def test_the_last_command_fragment_and_the_dataset_may_share_a_pdu() -> None:
    harness = _Harness(status=0xA900, comment="differs")
    harness.pdu((1, COMMAND | LAST, _store_rq(9)), (1, 0, b"abcd"), (1, LAST, b"efgh"))
    assert harness.stored[0][0] == b"abcdefgh"
    ((_cid, _control, response),) = _pdvs_of(harness.sent[0])
    assert response == fast_store.store_response_command(CT, "1.2.3.4", 9, 0xA900, "differs")


def test_other_messages_reach_pynetdicom_as_sent() -> None:
    harness = _Harness()
    echo = _echo_rq()
    harness.pdu((1, COMMAND | LAST, echo))
    assert [_pdvs_of(p) for p in harness.delivered] == [[(1, COMMAND | LAST, echo)]]
    # a C-FIND-RQ with its identifier, command and dataset in separate PDUs
    find = _command(
        e0002=b"1.2.840.10008.5.1.4.1.2.2.1\x00",
        e0100=struct.pack("<H", 0x0020),
        e0110=struct.pack("<H", 2),
        e0800=struct.pack("<H", 0x0000),
    )
    harness.pdu((1, COMMAND | LAST, find))
    harness.pdu((1, 0, b"ident"))
    harness.pdu((1, LAST, b"ifier"))
    harness.pdu((1, COMMAND | LAST, _store_rq()), (1, LAST, b"after"))  # and a store again
    assert [_pdvs_of(p) for p in harness.delivered[1:]] == [
        [(1, COMMAND | LAST, find)],
        [(1, 0, b"ident")],
        [(1, LAST, b"ifier")],
    ]
    assert [s[0] for s in harness.stored] == [b"after"]


def test_a_store_on_a_context_never_accepted_is_left_to_pynetdicom() -> None:
    harness = _Harness()
    harness.pdu((3, COMMAND | LAST, _store_rq()))
    harness.pdu((3, LAST, b"data"))
    assert harness.stored == []
    assert len(harness.delivered) == 2  # pynetdicom aborts such an association


def test_malformed_items_are_pynetdicoms_between_messages_and_abort_within_one() -> None:
    harness = _Harness()
    bogus = b"\x04\x00" + struct.pack(">L", 10) + struct.pack(">LBB", 500, 1, 3) + b"xxxx"
    harness.receiver.feed(bogus[:6], memoryview(bytearray(bogus[6:])))
    assert harness.delivered == [bogus] and harness.events == []
    harness.pdu((1, COMMAND | LAST, _store_rq()))
    harness.receiver.feed(bogus[:6], memoryview(bytearray(bogus[6:])))
    assert harness.events == ["Evt19"] and harness.stored == []


@pytest.mark.parametrize(
    "intruder", [(1, COMMAND | LAST, b"\x00" * 12), (5, LAST, b"other context")]
)
def test_a_dataset_interrupted_by_another_message_aborts(intruder: tuple[int, int, bytes]) -> None:
    harness = _Harness()
    harness.pdu((1, COMMAND | LAST, _store_rq()), (1, 0, b"half"))
    harness.pdu(intruder)
    assert harness.events == ["Evt19"] and harness.stored == []
    assert harness.receiver.idle


def test_parse_store_command_refuses_what_is_not_a_store_request() -> None:
    assert fast_store.parse_store_command(_store_rq()) is not None
    assert fast_store.parse_store_command(_echo_rq()) is None
    assert fast_store.parse_store_command(_store_rq()[:-3]) is None  # truncated
    assert fast_store.parse_store_command(_store_rq(sop=b"")) is None  # no instance UID
    no_dataset = _command(
        e0002=CT.encode() + b"\x00",
        e0100=struct.pack("<H", 0x0001),
        e0110=struct.pack("<H", 1),
        e0800=struct.pack("<H", 0x0101),
        e1000=b"1.2\x00",
    )
    assert fast_store.parse_store_command(no_dataset) is None


def _instance_of(size: int, sop_uid: str, seed: int) -> bytes:
    ds = dcmread(BytesIO(make_instance(sop_uid=sop_uid)))
    ds.Rows = ds.Columns = size
    ds.PixelData = bytes((seed + i * 7) % 256 for i in range(size * size * 2))
    return part10_bytes(ds)


def test_echo_and_stores_mixed_on_one_association_in_small_pdus(tmp_path: Path) -> None:
    """A real peer (pynetdicom) fragmenting into 4 KB PDUs: each store lands bit for bit,
    C-ECHOs in between are answered by pynetdicom."""
    settings = Settings(data_dir=tmp_path / "d", dicom_port=0, max_pdu_size=4096)
    uids = [f"1.2.826.0.1.3680043.10.1425.77.{n}" for n in range(3)]
    sent = [_instance_of(64, uid, seed) for seed, uid in enumerate(uids)]  # 8 KB of pixels
    with Archive(settings) as archive:
        server = DicomServer(archive).start()
        try:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="KHO")
            assert assoc.is_established
            try:
                for data in sent:
                    assert assoc.send_c_echo().Status == 0
                    assert assoc.send_c_store(dcmread(BytesIO(data))).Status == 0
                assert assoc.send_c_echo().Status == 0
            finally:
                assoc.release()
        finally:
            server.stop()
        for uid, data in zip(uids, sent, strict=True):
            stored = archive.read_instance(uid)[1]
            assert stored[read_file_meta(stored)[1] :] == data[read_file_meta(data)[1] :]
