"""HL7 throughput and worklist C-FIND latency.

A server process holds an archive (SQLite in a temporary folder, or ``--catalog`` a
PostgreSQL URL), kho's MLLP listener (kho.hl7.server) and an AE serving the Modality
Worklist handlers (kho.dicom_scp.worklist).  This process is the client:

1. HL7: ``--messages`` ADT^A08 (a new patient each: Vietnamese names, a citizen ID) sent
   over ``--connections`` MLLP connections in parallel, each waiting for its ACK (original
   mode): messages/s sustained and the ACK latency (send -> ACK received) p50/p95.
2. Worklist: ``--items`` scheduled steps (30 days x 20 stations, written through the
   worklist service), then C-FIND on the Modality Worklist model over one pynetdicom
   association (request -> final response) for what modalities ask: today's steps of one
   station, of one modality, by patient name prefix, by accession number.

Writes benchmarks/results/hl7.json and prints a table.  Usage:

  python benchmarks/hl7.py [--messages N] [--connections N] [--items N] [--queries N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from benchmarks.common import machine, summary, write_results

FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng"]
GIVEN = ["Văn An", "Thị Ánh", "Minh Đức", "Thị Hồng", "Quốc Bảo", "Thu Hà", "Đức Thắng"]
MODALITIES = ["CT", "MR", "DX", "US", "MG"]
DAY0 = "20240601"


def _serve(data_dir: str, catalog_url: str, ready: Any, stop: Any) -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES, evt

    from kho.access.service import Access
    from kho.archive.archive import Archive
    from kho.archive.catalog import open_catalog
    from kho.archive.config import Settings
    from kho.dicom_scp import qr
    from kho.dicom_scp import worklist as worklist_scp
    from kho.dicom_scp.door import Door
    from kho.hl7.server import Hl7Server

    settings = Settings(data_dir=Path(data_dir), dicom_port=0, http_port=0, find_result_limit=0)
    catalog = open_catalog(catalog_url) if catalog_url else None
    with Archive(settings, catalog=catalog) as archive:
        archive.finisher.stop()
        hl7 = Hl7Server(archive, port=0).start()
        door = Door(archive, Access(settings, archive))
        ae = AE(ae_title="KHO")
        ae.add_supported_context(ModalityWorklistInformationFind, ALL_TRANSFER_SYNTAXES)
        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, qr.handle_connection_open),  # TCP_NODELAY, as kho serve
                (evt.EVT_REQUESTED, door.association_requested),
                (evt.EVT_C_FIND, worklist_scp.handle_find, [door]),
            ],
        )
        ready.put((hl7.port, server.server_address[1]))
        command = stop.get()
        while command != "stop":
            if command == "fill":
                _fill(archive, stop.get())
                ready.put("filled")
            command = stop.get()
        server.shutdown()
        hl7.stop()


def _fill(archive: Any, items: int) -> None:
    """``items`` scheduled steps over 30 days and 20 stations, through the services."""
    from kho.archive import patients, worklist

    rng = random.Random(7)
    steps = []
    for n in range(items):
        day = n % 30
        station = n % 20
        modality = MODALITIES[station % len(MODALITIES)]
        steps.append(
            worklist.ScheduledStep(
                order_number=f"W{n}",
                patient_id=f"WL{n % 5000}",
                accession_number=f"ACC{n}",
                requested_procedure_id=f"RP{n}",
                sps_id=f"SPS{n}",
                study_uid=f"1.2.826.0.1.3680043.10.1425.98.{n}",
                station_ae=f"{modality}{station:02d}",
                modality=modality,
                start_date=f"202406{day + 1:02d}",
                start_time=f"{7 + n % 11:02d}{rng.randrange(60):02d}00",
            )
        )
    with archive.catalog.transaction():
        for p in range(5000):
            name = f"{FAMILY[p % 10]}^{GIVEN[p % 7]}"
            patients.register(
                archive.catalog,
                patients.PatientRecord(f"WL{p}", name=name, birth_date="19800101", sex="F"),
                citizen_issuer="CCCD",
            )
        for start in range(0, len(steps), 500):
            worklist.schedule(archive.catalog, steps[start : start + 500])


def _adt(n: int, run: int) -> bytes:
    name = f"{FAMILY[n % 10]}^{GIVEN[n % 7]}"
    citizen = f"0{(n % 90) + 1:02d}19{n:07d}"[:12].ljust(12, "0")
    segments = [
        f"MSH|^~\\&|HIS|BV|KHO|PACS|20240601120000||ADT^A08^ADT_A01|B{run}-{n}|P|2.5|||||VNM|"
        "UNICODE UTF-8",
        "EVN|A08|20240601120000",
        f"PID|1||BN{run}-{n:07d}^^^BV^PI~{citizen}^^^CCCD^NI||{name}||19900102|F",
        "PV1|1|O",
    ]
    return ("\r".join(segments) + "\r").encode()


def _sender(
    port: int, run: int, numbers: list[int], latencies: list[float], failures: list[str]
) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    for n in numbers:
        started = time.perf_counter()
        sock.sendall(b"\x0b" + _adt(n, run) + b"\x1c\x0d")
        while b"\x1c\x0d" not in buffer:
            buffer += sock.recv(65536)
        ack, buffer = buffer.split(b"\x1c\x0d", 1)
        latencies.append(time.perf_counter() - started)
        if b"MSA|AA|" not in ack:
            failures.append(ack.decode("utf-8", "replace"))
    sock.close()


def hl7_throughput(port: int, messages: int, connections: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    shares = [list(range(c, messages, connections)) for c in range(connections)]
    threads = [
        threading.Thread(target=_sender, args=(port, connections, share, latencies, failures))
        for share in shares
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    stats = summary([1000 * value for value in latencies])
    return {
        "messages": messages,
        "connections": connections,
        "messages_per_s": round(messages / elapsed, 1),
        "ack_ms": {k: round(v, 2) for k, v in stats.items()},
        "not_aa": len(failures),
    }


def worklist_latency(port: int, queries: int) -> dict[str, Any]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    # a modality's socket without Nagle's delay (pynetdicom does not set it)
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cases = {
        "station + today": {
            "ScheduledStationAETitle": "CT00",
            "ScheduledProcedureStepStartDate": "20240601",
        },
        "modality + today": {"Modality": "MR", "ScheduledProcedureStepStartDate": "20240615"},
        "modality + week": {
            "Modality": "DX",
            "ScheduledProcedureStepStartDate": "20240601-20240607",
        },
        "patient name prefix": {"PatientName": "Nguyễn^Văn*"},
        "accession": {"AccessionNumber": "ACC4242"},
    }
    out: dict[str, Any] = {}
    try:
        for label, keys in cases.items():
            times: list[float] = []
            matches = 0
            for _ in range(queries):
                query = Dataset()
                query.SpecificCharacterSet = "ISO_IR 192"
                query.PatientName = keys.get("PatientName", "")
                query.PatientID = ""
                query.AccessionNumber = keys.get("AccessionNumber", "")
                query.StudyInstanceUID = ""
                step = Dataset()
                step.ScheduledStationAETitle = keys.get("ScheduledStationAETitle", "")
                step.Modality = keys.get("Modality", "")
                step.ScheduledProcedureStepStartDate = keys.get(
                    "ScheduledProcedureStepStartDate", ""
                )
                step.ScheduledProcedureStepStartTime = ""
                step.ScheduledProcedureStepID = ""
                query.ScheduledProcedureStepSequence = [step]
                started = time.perf_counter()
                matches = sum(
                    1
                    for status, _identifier in assoc.send_c_find(
                        query, ModalityWorklistInformationFind
                    )
                    if status and status.Status == 0xFF00
                )
                times.append(1000 * (time.perf_counter() - started))
            stats = summary(times)
            out[label] = {"matches": matches, **{k: round(v, 2) for k, v in stats.items()}}
    finally:
        assoc.release()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--catalog", default="", help="a postgresql:// URL (default SQLite)")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ready, commands = context.Queue(), context.Queue()
    with tempfile.TemporaryDirectory() as data_dir:
        server = context.Process(target=_serve, args=(data_dir, args.catalog, ready, commands))
        server.start()
        try:
            hl7_port, mwl_port = ready.get(timeout=120)
            results: dict[str, Any] = {
                "machine": machine(),
                "catalog": "postgresql" if args.catalog else "sqlite",
            }
            results["hl7"] = [
                hl7_throughput(hl7_port, args.messages, connections)
                for connections in args.connections
            ]
            commands.put("fill")
            commands.put(args.items)
            ready.get(timeout=600)
            results["worklist_items"] = args.items
            results["worklist_cfind_ms"] = worklist_latency(mwl_port, args.queries)
        finally:
            commands.put("stop")
            server.join(60)
    path = write_results("hl7", results)
    for run in results["hl7"]:
        ack = run["ack_ms"]
        print(
            f"HL7 ADT^A08, {run['connections']} connection(s): {run['messages_per_s']} msg/s, "
            f"ACK p50 {ack['median']} ms, p95 {ack['p95']} ms ({run['not_aa']} not AA)"
        )
    for label, stats in results["worklist_cfind_ms"].items():
        print(
            f"MWL C-FIND {label:22s} {stats['matches']:5d} matches: "
            f"median {stats['median']} ms, p95 {stats['p95']} ms"
        )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
