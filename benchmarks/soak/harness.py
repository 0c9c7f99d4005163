"""What the fault campaigns share: instances to send, DIMSE and STOW senders that record
what was acknowledged, and the archive checks run after every fault.

An instance counts as *acknowledged* only when kho answered success (C-STORE 0x0000, STOW
200 with the instance in its ReferencedSOPSequence).  The checks read through ``Archive``
in this process, next to a live (idle) ``kho serve``: SQLite in WAL mode and PostgreSQL
both let a second process read while the server runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from kho.archive.archive import Archive
from kho.archive.dataset.part10 import read_file_meta
from kho.storage.spool import is_spool_key, segment_of
from tests.helpers.part10 import part10_bytes

CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.10.1425.20"


@dataclass(frozen=True, slots=True)
class Sent:
    """One instance as sent: its UIDs and the SHA-256 of its dataset bytes (everything
    after the File Meta Information, which DIMSE does not carry)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    dataset_sha256: str
    path: Path | None = None
    data: bytes = b""


def dataset_sha256(part10: bytes) -> str:
    return hashlib.sha256(part10[read_file_meta(part10)[1] :]).hexdigest()


class Corpus:
    """Distinct CT instances, grouped into studies of ``per_study`` (one series each);
    every instance has its own pixels, so its own SHA-256."""

    def __init__(self, folder: Path, *, seed: int = 20, size: int = 96, per_study: int = 8) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.per_study = per_study
        self._made = 0
        self._lock = threading.Lock()
        self._study = ""
        self._series = ""

    def make(self, *, to_file: bool = True) -> Sent:
        with self._lock:
            n = self._made
            self._made += 1
            if n % self.per_study == 0:
                self._study, self._series = generate_uid(ROOT + "."), generate_uid(ROOT + ".")
            study, series = self._study, self._series
            pixels = self.rng.integers(0, 4096, (self.size, self.size), dtype=np.uint16)
        return self.instance(study, series, n, pixels, to_file=to_file)

    def instance(
        self,
        study: str,
        series: str,
        number: int,
        pixels: np.ndarray,
        *,
        sop_uid: str | None = None,
        to_file: bool = True,
    ) -> Sent:
        ds = Dataset()
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = sop_uid or generate_uid(ROOT + ".")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = f"SOAK^{study[-6:]}", f"SOAK-{study[-8:]}"
        ds.Modality, ds.StudyDate = "CT", "20260101"
        ds.InstanceNumber = number + 1
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        data = part10_bytes(ds)
        digest = dataset_sha256(data)
        path = None
        if to_file:  # pynetdicom streams a file without loading it
            path = self.folder / f"{ds.SOPInstanceUID}.dcm"
            path.write_bytes(data)
            data = b""
        return Sent(str(ds.SOPInstanceUID), study, series, digest, path, data)


@dataclass
class Ledger:
    """What the senders got back, shared by their threads."""

    acked: dict[str, Sent] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # status -> count
    unanswered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, sent: Sent) -> None:
        with self.lock:
            self.acked[sent.sop_uid] = sent

    def refuse(self, status: str) -> None:
        with self.lock:
            self.refused[status] = self.refused.get(status, 0) + 1

    def lost_answer(self) -> None:
        with self.lock:
            self.unanswered += 1

    def record(self, sent: Sent, status: Any) -> bool:
        """File a C-STORE's answer (a status dataset, empty when none came): acknowledged,
        refused with its status, or unanswered; whether an answer came at all."""
        if "Status" not in status:
            self.lost_answer()
            return False
        if status.Status == 0x0000:
            self.ack(sent)
        else:
            self.refuse(f"0x{int(status.Status):04X}")
        return True


def dimse_sender(
    port: int,
    corpus: Corpus,
    ledger: Ledger,
    stop: threading.Event,
    *,
    ae_title: str = "SOAK",
    timeout: float = 5.0,
    instances: Iterable[Sent] | None = None,
) -> None:
    """Store instances over one association until ``stop`` (or the association dies),
    new ones from ``corpus`` or the given ``instances``; clean up its files."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    source = iter(instances) if instances is not None else None
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
        if not assoc.is_established:
            return
        while not stop.is_set():
            if source is not None:
                sent = next(source, None)
                if sent is None:
                    break
            else:
                sent = corpus.make()
            target: Any = sent.path if sent.path else pydicom.dcmread(BytesIO(sent.data))
            status = assoc.send_c_store(target)
            if source is None and sent.path:
                sent.path.unlink(missing_ok=True)
            if not ledger.record(sent, status) and not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()
    except Exception:  # the server dies under us: that is the point
        ledger.lost_answer()


def multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(client: httpx.Client, base: str, parts: list[bytes]) -> httpx.Response:
    body, content_type = multipart(parts)
    return client.post(
        f"{base}/dicom-web/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )


def stow_sender(
    http_port: int,
    corpus: Corpus,
    ledger: Ledger,
    stop: threading.Event,
    *,
    batch: int = 2,
    timeout: float = 5.0,
) -> None:
    """STOW-RS ``batch`` new instances per request until ``stop`` or the server dies."""
    base = f"http://127.0.0.1:{http_port}"
    with httpx.Client(timeout=timeout) as client:
        while not stop.is_set():
            sents = [corpus.make(to_file=False) for _ in range(batch)]
            try:
                response = stow(client, base, [s.data for s in sents])
            except httpx.HTTPError:
                ledger.lost_answer()
                return
            if response.status_code == 200:
                for sent in sents:
                    ledger.ack(sent)
            elif response.status_code == 202:
                # only the instances named in ReferencedSOPSequence were stored
                body = response.json()
                stored = {
                    item["00081155"]["Value"][0]
                    for item in body.get("00081199", {}).get("Value", [])
                }
                for sent in sents:
                    if sent.sop_uid in stored:
                        ledger.ack(sent)
                    else:
                        ledger.refuse("stow-part-failed")
            else:
                ledger.refuse(f"http-{response.status_code}")


# --- checks ----------------------------------------------------------------------------------


def wait_finished(archive: Archive, timeout: float = 120.0) -> float:
    """Seconds until the live server's finisher has drained the queue; raise if not."""
    started = time.monotonic()
    while archive.catalog.unfinished_count():
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"the finisher did not resume: {archive.catalog.unfinished_count()} unfinished"
            )
        time.sleep(0.1)
    return time.monotonic() - started


def check_retrievable(archive: Archive, sents: Iterable[Sent]) -> list[str]:
    """Acknowledged instances that are missing or whose bytes differ: read back through the
    archive, the SHA-256 of the whole Part 10 against the row's, the dataset against what
    was sent."""
    problems = []
    for sent in sents:
        try:
            record, data = archive.read_instance(sent.sop_uid)
        except Exception as exc:  # every failure is a finding here
            problems.append(f"{sent.sop_uid}: {type(exc).__name__}: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != record.sha256:
            problems.append(f"{sent.sop_uid}: SHA-256 differs from its row")
        elif dataset_sha256(data) != sent.dataset_sha256:
            problems.append(f"{sent.sop_uid}: dataset differs from what was sent")
    return problems


def catalogued(archive: Archive) -> set[str]:
    return {row[0] for row in archive.catalog.fetchall("SELECT sop_uid FROM instances")}


def referenced_keys(record: Any) -> set[str]:
    out = {record.header_key}
    if record.pixel_format != "none":
        out.add(record.pixels_key)
    out.update(str(v) for v in record.derived_keys.values())
    return out


def store_keys(archive: Archive) -> set[str]:
    """Every object in the store: on a filesystem every file (temporary ones included),
    else the store's listing."""
    root = getattr(archive.store, "root", None)
    if root is not None and Path(root).is_dir():
        base = Path(root)
        return {
            str(Path(folder, name).relative_to(base))
            for folder, _dirs, names in os.walk(base)
            for name in names
        }
    return set(archive.store.list(""))


@dataclass
class StoreAudit:
    rows: int = 0
    objects: int = 0
    missing: list[str] = field(default_factory=list)  # rows pointing at absent objects
    orphans: list[str] = field(default_factory=list)  # objects nothing refers to
    pending: int = 0  # journalled ingests in flight
    garbage: int = 0  # objects journalled for deletion
    # unreferenced at the first look, deleted by the second: due garbage the live server
    # collected (deleted, then its entry forgotten) while the listing ran; no orphans
    collected_meanwhile: list[str] = field(default_factory=list)
    spool_segments: int = 0
    spool_referenced: int = 0
    #: objects listed that no garbage entry names (live instances' and strays)
    outside_garbage: list[str] = field(default_factory=list)


def audit_store(archive: Archive) -> StoreAudit:
    """Rows against objects, both ways: a row pointing at a missing object, an object
    (or temporary file) that no row, no pending ingest and no garbage entry refers to.
    Listing first, rows second: an object written in between is referenced by then."""
    found = store_keys(archive)
    garbage = {r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage")}
    pending = set(archive.catalog.pending_prefixes())
    result = StoreAudit(objects=len(found), pending=len(pending), garbage=len(garbage))
    result.outside_garbage = sorted(found - garbage)
    referenced: set[str] = set()
    spool_used: set[str] = set()
    for record in archive.catalog.iter_instances():
        result.rows += 1
        for key in referenced_keys(record):
            if is_spool_key(key):
                spool_used.add(segment_of(key))
                if not archive.spool_reader.exists(key):
                    result.missing.append(key)
            else:
                referenced.add(key)
                if key not in found:
                    result.missing.append(key)
    candidates = []
    for key in found - referenced - garbage:
        prefix = key.rsplit(".", 1)[0]
        if not any(prefix.startswith(p) for p in pending):
            candidates.append(key)
    result.orphans, result.collected_meanwhile = _confirm_orphans(archive, candidates)
    spool_dir = archive.settings.spool_dir
    segments = sorted(p.name for p in spool_dir.iterdir()) if spool_dir.is_dir() else []
    result.spool_segments = len(segments)
    result.spool_referenced = len(spool_used)
    return result


def _confirm_orphans(archive: Archive, candidates: list[str]) -> tuple[list[str], list[str]]:
    """A second look at objects nothing referred to: (still there and still unreferenced,
    gone since).  The listing takes seconds on S3; a garbage object falling due meanwhile
    is deleted and its entry forgotten by the live server's collector before the garbage
    read, so it looks orphaned at the first look and is gone at the second.  A real
    orphan stays: nothing deletes an object that nothing refers to."""
    if not candidates:
        return [], []
    garbage = {r[0] for r in archive.catalog.fetchall("SELECT object_key FROM garbage")}
    pending = set(archive.catalog.pending_prefixes())
    referenced: set[str] = set()
    for record in archive.catalog.iter_instances():
        referenced |= referenced_keys(record)
    orphans, gone = [], []
    for key in sorted(candidates):
        if not _exists(archive, key):
            gone.append(key)
        elif key not in garbage | referenced and not any(
            key.rsplit(".", 1)[0].startswith(p) for p in pending
        ):
            orphans.append(key)
    return orphans, gone


def _exists(archive: Archive, key: str) -> bool:
    root = getattr(archive.store, "root", None)
    if root is not None and Path(root).is_dir():
        return Path(root, key).exists()
    return archive.store.exists(key)


def audited_text(archive: Archive) -> str:
    """Every audit journal message and queued outbox event, as one text to search."""
    journal = archive.catalog.fetchall("SELECT message FROM audit_journal")
    outbox = archive.catalog.fetchall("SELECT event FROM audit_outbox")
    return "\n".join(r[0] for r in journal) + "\n" + "\n".join(r[0] for r in outbox)


_UID = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def check_audited(archive: Archive, sop_uids: Iterable[str]) -> list[str]:
    """The instances no audit record names.  The UIDs in the records are collected into a
    set once: searching the whole text for each instance is quadratic, and a 1,000-kill
    campaign holds hundreds of thousands of instances."""
    named = set(_UID.findall(audited_text(archive)))
    return [sop for sop in sop_uids if sop not in named]
