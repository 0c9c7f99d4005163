"""Senders by URI scheme (dcm4chee's ExporterFactory): ``dicom``/``dicoms`` send with
C-STORE (kho.routing.dimse), ``stow+http``/``stow+https`` with STOW-RS.  A sender opens a
session for one batch; the session sends instances and says, per instance, what the
destination answered.  Which instances, in which bytes, is the router's business."""

from __future__ import annotations

import json
import logging
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import urllib3

from kho.routing.commitment import CommitmentReport, request_commitment
from kho.routing.config import ForwardDestination, parse_dicom_url
from kho.routing.dimse import Proposal, StoreAssociation
from kho.routing.errors import DestinationError
from kho.routing.queue import QueueRow

log = logging.getLogger(__name__)

#: C-STORE statuses that say "not now" rather than "never" (PS3.4 B.2.3, PS3.7 C)
_TRANSIENT_STATUS_PREFIXES = (0xA700,)
_TRANSIENT_STATUSES = frozenset({0x0124, 0xFE00, 0x0213})
#: warnings: stored (coerced, elements discarded, not checked)
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


@dataclass
class Outgoing:
    """One instance ready to go: Part 10 bytes (or a dataset, ``offset`` 0 and a
    syntax not as received) and the UIDs as sent."""

    row: QueueRow
    sop_class: str
    sop_uid: str
    syntax: str
    data: bytes
    offset: int

    @property
    def dataset(self) -> memoryview:
        return memoryview(self.data)[self.offset :]


@dataclass
class Result:
    """What the destination answered for one instance."""

    item: Outgoing
    ok: bool
    error: str = ""
    permanent: bool = False


class Session(Protocol):
    def accepted_syntaxes(self, sop_class: str) -> list[str] | None:
        """The syntaxes the destination takes this SOP class in; None: any."""

    def send(self, item: Outgoing) -> list[Result]:
        """Send (or buffer) one instance; the results known now."""

    def finish(self) -> list[Result]:
        """Send what is buffered and close; the remaining results."""

    def abort(self) -> None: ...


class Sender(Protocol):
    #: where it sends, for logs and status (no secrets)
    address: str

    def open(self, proposals: Sequence[Proposal]) -> Session: ...

    def commit(
        self, transaction_uid: str, references: Sequence[tuple[str, str]], wait_s: float
    ) -> CommitmentReport | None: ...


# --- DICOM (C-STORE) -------------------------------------------------------------------------


def status_result(item: Outgoing, status: int, comment: str) -> Result:
    """A Result for a C-STORE status."""
    if status == 0x0000 or status in _WARNINGS:
        return Result(item, ok=True)
    transient = status in _TRANSIENT_STATUSES or (status & 0xFF00) in _TRANSIENT_STATUS_PREFIXES
    detail = f": {comment}" if comment else ""
    return Result(
        item, ok=False, error=f"C-STORE status {status:#06x}{detail}", permanent=not transient
    )


@dataclass
class DicomSender:
    """C-STORE to one AE (``host``, ``port``, ``called_ae``), over TLS with ``tls``."""

    host: str
    port: int
    called_ae: str
    calling_ae: str
    tls: ssl.SSLContext | None
    timeout_s: float
    address: str = field(init=False)

    def __post_init__(self) -> None:
        scheme = "dicoms" if self.tls is not None else "dicom"
        self.address = f"{scheme}://{self.called_ae}@{self.host}:{self.port}"

    def open(self, proposals: Sequence[Proposal]) -> _DicomSession:
        association = StoreAssociation.open(
            self.host,
            self.port,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            proposals=proposals,
            tls=self.tls,
            timeout=self.timeout_s,
        )
        return _DicomSession(association)

    def commit(
        self, transaction_uid: str, references: Sequence[tuple[str, str]], wait_s: float
    ) -> CommitmentReport | None:
        return request_commitment(
            self.host,
            self.port,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            transaction_uid=transaction_uid,
            references=references,
            wait_s=wait_s,
            tls=self.tls,
            timeout=self.timeout_s,
        )


class _DicomSession:
    def __init__(self, association: StoreAssociation) -> None:
        self.association = association

    def accepted_syntaxes(self, sop_class: str) -> list[str] | None:
        return self.association.syntaxes_for(sop_class)

    def send(self, item: Outgoing) -> list[Result]:
        status, comment = self.association.store(
            item.sop_class, item.sop_uid, item.syntax, item.dataset
        )
        return [status_result(item, status, comment)]

    def finish(self) -> list[Result]:
        self.association.release()
        return []

    def abort(self) -> None:
        self.association.abort()


# --- DICOMweb (STOW-RS) ----------------------------------------------------------------------


def stow_url(url: str) -> str:
    """The STOW-RS endpoint of a ``stow+http(s)://`` destination URL."""
    base = url.split("+", 1)[1].rstrip("/")
    return base if base.endswith("/studies") else f"{base}/studies"


@dataclass
class StowSender:
    """STOW-RS to one DICOMweb service, a batch of instances per request."""

    url: str
    token: str
    tls: ssl.SSLContext | None
    timeout_s: float
    batch_bytes: int
    address: str = field(init=False)
    _pool: urllib3.PoolManager = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.address = self.url
        options: dict[str, Any] = {
            "timeout": urllib3.Timeout(connect=min(10.0, self.timeout_s), read=self.timeout_s),
            "retries": False,
        }
        if self.url.startswith("https://") and self.tls is not None:
            options["ssl_context"] = self.tls
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=8, **options)

    def open(self, proposals: Sequence[Proposal]) -> _StowSession:
        return _StowSession(self)

    def commit(
        self, transaction_uid: str, references: Sequence[tuple[str, str]], wait_s: float
    ) -> CommitmentReport | None:
        raise DestinationError("storage commitment is a DICOM service: not over STOW-RS")

    def post(self, items: list[Outgoing]) -> list[Result]:
        """One STOW-RS request for ``items``; per instance what the service said."""
        boundary = f"kho-{secrets.token_hex(12)}"
        parts: list[bytes] = []
        for item in items:
            parts += [
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                item.data,
                b"\r\n",
            ]
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._pool.request(
                "POST", self.url, body=b"".join(parts), headers=headers, preload_content=True
            )
        except urllib3.exceptions.HTTPError as exc:
            raise DestinationError(f"STOW-RS to {self.url} failed: {exc}") from exc
        return stow_results(items, response.status, response.data)


def stow_results(items: list[Outgoing], status: int, body: bytes) -> list[Result]:
    """Per-instance results of a STOW-RS response (PS3.18 10.5.3): 200 all stored; 202
    some failed (Failed SOP Sequence); 409 none stored; 4xx/5xx the request failed."""
    if status in (401, 403, 404, 408, 429) or status >= 500:
        raise DestinationError(f"STOW-RS answered HTTP {status}")
    if status == 200:
        return [Result(item, ok=True) for item in items]
    if status not in (202, 409):  # 400, 413, 415: the request itself will never pass
        return [
            Result(item, ok=False, error=f"STOW-RS answered HTTP {status}", permanent=True)
            for item in items
        ]
    failed: dict[str, int] = {}
    stored: set[str] = set()
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        document = {}
    for item in _sequence(document, "00081198"):
        failed[_first(item, "00081155")] = int(_first(item, "00081197") or 0x0110)
    for item in _sequence(document, "00081199"):
        stored.add(_first(item, "00081155"))
    out = []
    for item in items:
        reason = failed.get(item.sop_uid)
        if reason is None and (status == 202 or item.sop_uid in stored):
            out.append(Result(item, ok=True))
            continue
        reason = 0x0110 if reason is None else reason
        transient = (reason & 0xFF00) == 0xA700
        out.append(
            Result(
                item,
                ok=False,
                error=f"STOW-RS failure reason {reason:#06x} (HTTP {status})",
                permanent=not transient,
            )
        )
    return out


def _sequence(document: Any, tag: str) -> list[Any]:
    if not isinstance(document, dict):
        return []
    value = document.get(tag, {}).get("Value", [])
    return value if isinstance(value, list) else []


def _first(item: Any, tag: str) -> str:
    values = item.get(tag, {}).get("Value", []) if isinstance(item, dict) else []
    return str(values[0]) if values else ""


class _StowSession:
    def __init__(self, sender: StowSender) -> None:
        self.sender = sender
        self.buffer: list[Outgoing] = []
        self.size = 0

    def accepted_syntaxes(self, sop_class: str) -> list[str] | None:
        return None

    def send(self, item: Outgoing) -> list[Result]:
        if self.buffer and self.size + len(item.data) > self.sender.batch_bytes:
            results = self._flush()
        else:
            results = []
        self.buffer.append(item)
        self.size += len(item.data)
        return results

    def finish(self) -> list[Result]:
        return self._flush()

    def _flush(self) -> list[Result]:
        items, self.buffer, self.size = self.buffer, [], 0
        return self.sender.post(items) if items else []

    def abort(self) -> None:
        self.buffer = []


# --- by scheme --------------------------------------------------------------------------------


def sender_for(
    destination: ForwardDestination,
    *,
    calling_ae: str,
    peers: dict[str, Any],
    client_tls: Any,
) -> DicomSender | StowSender:
    """The sender of a destination.  ``peers``: the AE registry's entries (settings'
    ``dicom_peers``: host, port, tls) for ``dicom://AE`` URLs and registered TLS;
    ``client_tls``: a callable giving kho's client TLS context (made on first use)."""
    scheme = destination.scheme
    if scheme in ("dicom", "dicoms"):
        title, host, port = parse_dicom_url(destination.url)
        peer = peers.get(title)
        if not host:
            if peer is None or not getattr(peer, "host", "") or not getattr(peer, "port", 0):
                raise DestinationError(
                    f"{destination.url}: {title} has no host and port in dicom_peers"
                )
            host, port = peer.host, int(peer.port)
        tls = scheme == "dicoms" or bool(peer is not None and getattr(peer, "tls", False))
        return DicomSender(
            host=host,
            port=port,
            called_ae=title,
            calling_ae=destination.calling_ae or calling_ae,
            tls=client_tls() if tls else None,
            timeout_s=destination.timeout_s,
        )
    url = stow_url(destination.url)
    return StowSender(
        url=url,
        token=destination.token.get_secret_value(),
        tls=client_tls() if url.startswith("https://") else None,
        timeout_s=destination.timeout_s,
        batch_bytes=destination.stow_batch_bytes,
    )


__all__ = [
    "DicomSender",
    "Outgoing",
    "Result",
    "Sender",
    "Session",
    "StowSender",
    "sender_for",
    "status_result",
    "stow_results",
    "stow_url",
]
