"""`kho serve` wires the HIS door: an order sent over MLLP to the running archive (its HL7
port) becomes a worklist item that dcmtk's `findscu -W` reads from the archive's DICOM port,
with the Vietnamese name as the HIS sent it."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.dicom_scp.test_worklist import findscu
from tests.helpers.dcmtk import free_port
from tests.helpers.server import kho_serve
from tests.hl7.mllp_client import MllpClient, msa
from tests.hl7.test_mllp_door import NAME, orm


def _hl7_port(log: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"kho: HL7 \(MLLP\) on [^:]+:(\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise TimeoutError("kho serve did not report its HL7 port")


def test_an_order_sent_to_kho_serve_is_on_its_worklist(tmp_path: Path) -> None:
    hl7_port = free_port()
    with kho_serve(tmp_path / "data", env={"KHO_HL7_PORT": str(hl7_port)}) as (_proc, port):
        assert _hl7_port(tmp_path / f"serve-{port}.log") == hl7_port
        with MllpClient(hl7_port) as client:
            ack = client.send(orm("NW", "ORD901"))
        assert msa(ack)[1] == "AA", ack
        found = findscu(port, tmp_path / "wl", "AccessionNumber=ACCORD901", "PatientName")
    assert len(found) == 1
    assert found[0].AccessionNumber == "ACCORD901"
    assert str(found[0].PatientName) == NAME  # UTF-8 from the HIS, ISO_IR 192 to the modality
