"""Forwarding the journal to an audit record repository: syslog over TLS.

Each record becomes one RFC 5424 message (facility 10, security/authorization; severity
from its outcome; MSGID ``IHE+RFC-3881`` as IHE ATNA asks; the DICOM Audit Message as
UTF-8 with a BOM) sent over TLS with RFC 5425 octet-counting framing (``LEN SP MSG``).

The journal is the spool.  The forwarder reads records in chain order after its position
(one row per destination in ``audit_forwarded``, in the same catalog) and moves the
position only once the receiver's TCP stack has acknowledged every byte sent (the
socket's send queue is empty, Linux ``TIOCOUTQ``) and the receiver has not closed the
connection (and, on TLS 1.3, only on a connection the receiver confirmed: it checks the
archive's certificate after the client's half of the handshake, so the forwarder waits for
its session tickets or its refusal before sending).  So while the receiver is down or
refuses nothing is lost or skipped: records wait in the journal and go out in order when
it returns, reconnecting with exponential backoff.
Delivery is at least once: a connection that breaks after sending and before the
position moved sends those records again (RFC 5425 has no acknowledgements; the
``meta sequenceId`` structured data carries the chain position, so a receiver can drop
duplicates).

Several kho processes may each start a forwarder for one destination: a lease in the
position row lets one of them send at a time, so records are not sent twice in parallel.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import select
import socket
import ssl
import struct
import termios
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kho.archive.catalog import Catalog
from kho.audit.journal import DEFAULT_CHAIN, AuditRecord, ensure_schema, read_after

LOG = logging.getLogger(__name__)

#: RFC 5424 facility 10: security/authorization messages (what IHE ATNA uses)
FACILITY = 10
#: IHE ATNA's MSGID for DICOM/RFC 3881 audit messages
MSGID = "IHE+RFC-3881"
_BOM = b"\xef\xbb\xbf"
#: outcome -> severity: success notice (5), minor failure warning (4), serious error (3),
#: major critical (2)
_SEVERITY = {0: 5, 4: 4, 8: 3, 12: 2}
#: the default port of syslog over TLS (RFC 5425)
SYSLOG_TLS_PORT = 6514


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII, no spaces, at most ``limit``."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def format_message(
    record: AuditRecord, *, hostname: str, app_name: str = "kho", procid: str = "-"
) -> bytes:
    """The RFC 5424 syslog message of one journal record."""
    pri = FACILITY * 8 + _SEVERITY.get(record.outcome, 3)
    stamp = datetime.fromtimestamp(record.event_time, UTC).isoformat(timespec="microseconds")
    stamp = stamp.replace("+00:00", "Z")
    sequence = (record.seq - 1) % 2147483647 + 1  # RFC 5424 7.3.1: 1..2^31-1
    header = " ".join(
        (
            f"<{pri}>1",
            stamp,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            MSGID,
            f'[meta sequenceId="{sequence}"]',
        )
    )
    return header.encode("ascii") + b" " + _BOM + record.message.encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: the message's length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


def client_context(
    *,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A TLS client context for the receiver: TLS 1.2 or newer, the receiver's certificate
    checked against ``ca_file`` (or the system's CAs) and its name; ``cert_file`` and
    ``key_file``: this archive's certificate for mutual TLS (IHE ATNA's node
    authentication)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


class ConnectionLost(OSError):
    """The receiver closed the connection, or did not acknowledge what was sent."""


class SyslogForwarder:
    """Sends one catalog's audit journal to one syslog-TLS receiver; a thread with
    ``start()`` and ``stop()``."""

    def __init__(
        self,
        catalog: Catalog,
        host: str,
        port: int = SYSLOG_TLS_PORT,
        *,
        context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        destination: str | None = None,
        chain_id: str = DEFAULT_CHAIN,
        hostname: str | None = None,
        batch: int = 200,
        poll_s: float = 0.5,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 10.0,
        lease_s: float = 15.0,
        confirm_s: float = 1.0,
    ) -> None:
        """``context``: TLS (client_context()); None sends plain TCP, for a receiver on
        loopback only.  ``destination`` names the position row (default: the address)."""
        self.catalog = catalog
        self.host, self.port = host, port
        self.context = context
        self.server_hostname = server_hostname or host
        self.destination = destination or f"syslog-tls://{host}:{port}"
        self.chain_id = chain_id
        self.hostname = hostname or socket.gethostname()
        self.batch = batch
        self.poll_s = poll_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.confirm_s = confirm_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease_until = 0.0
        # counters
        self.sent = 0
        self.connects = 0
        self.failures = 0
        self.last_error = ""
        ensure_schema(catalog)

    # --- the position and its lease ---------------------------------------------------------

    def position(self) -> int:
        """The last record sent and acknowledged (0: none)."""
        row = self.catalog.fetchone(
            "SELECT seq FROM audit_forwarded WHERE destination = ? AND chain_id = ?",
            (self.destination, self.chain_id),
        )
        return int(row[0]) if row else 0

    def _hold_lease(self) -> bool:
        """Take or renew the right to send to this destination; whether this forwarder
        holds it.  Renewed when a third of it is left."""
        now = time.time()
        if self._lease_until - now > self.lease_s * 2 / 3:
            return True
        until = now + self.lease_s
        with self.catalog.transaction():
            self.catalog.execute(
                "INSERT INTO audit_forwarded (destination, chain_id, seq, owner, lease_until, "
                "updated_at) VALUES (?, ?, 0, '', 0, ?) "
                "ON CONFLICT (destination, chain_id) DO NOTHING",
                (self.destination, self.chain_id, now),
            )
            cursor = self.catalog.execute(
                "UPDATE audit_forwarded SET owner = ?, lease_until = ? WHERE destination = ? "
                "AND chain_id = ? AND (owner = ? OR lease_until < ?)",
                (self.owner, until, self.destination, self.chain_id, self.owner, now),
            )
            held = int(cursor.rowcount) == 1
        self._lease_until = until if held else 0.0
        return held

    def _advance(self, seq: int) -> None:
        with self.catalog.transaction():
            cursor = self.catalog.execute(
                "UPDATE audit_forwarded SET seq = ?, updated_at = ? WHERE destination = ? "
                "AND chain_id = ? AND owner = ? AND seq < ?",
                (seq, time.time(), self.destination, self.chain_id, self.owner, seq),
            )
            if int(cursor.rowcount) != 1:
                self._lease_until = 0.0  # another forwarder took over: ask again
                raise ConnectionLost("the forwarding lease was lost")

    # --- the connection ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is None:
                return raw
            sock = self.context.wrap_socket(raw, server_hostname=self.server_hostname)
        except BaseException:
            raw.close()
            raise
        try:
            self._confirm(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _confirm(self, sock: ssl.SSLSocket) -> None:
        """TLS 1.3: the receiver checks this archive's certificate after the client's
        side of the handshake is done, and its refusal (an alert) or its acceptance (the
        session tickets OpenSSL sends) comes one round trip later.  Wait for either, up
        to ``confirm_s``, before sending: records written into a refused connection would
        be acknowledged by TCP and look sent."""
        if sock.version() != "TLSv1.3":
            return  # TLS 1.2 checks both certificates within the handshake
        timeout = sock.gettimeout()
        deadline = time.monotonic() + self.confirm_s
        try:
            while time.monotonic() < deadline:
                session = sock.session
                if session is not None and session.has_ticket:
                    return
                sock.settimeout(0.05)
                try:
                    data = sock.recv(1)
                except TimeoutError:
                    continue
                except ssl.SSLError as exc:
                    raise ConnectionLost(f"the receiver refused the connection: {exc}") from exc
                if not data:
                    raise ConnectionLost("the receiver closed the connection")
        finally:
            sock.settimeout(timeout)

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    @staticmethod
    def _check_open(sock: socket.socket) -> None:
        """Raise ConnectionLost if the receiver closed the connection (a syslog receiver
        sends nothing, so anything readable is its close or an alert)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            data = sock.recv(1)
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # TLS housekeeping (a session ticket), no data
        except OSError as exc:
            raise ConnectionLost(f"the receiver closed the connection: {exc}") from exc
        finally:
            sock.settimeout(timeout)
        if not data:
            raise ConnectionLost("the receiver closed the connection")

    def _drain(self, sock: socket.socket) -> None:
        """Wait until the receiver's TCP stack acknowledged every byte sent (Linux:
        the send queue is empty), or raise ConnectionLost."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._check_open(sock)
            try:
                unacked = struct.unpack(
                    "i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                )[0]
            except (OSError, AttributeError):
                return  # not knowable here: TCP's own delivery is what there is
            if unacked == 0:
                return
            if time.monotonic() > deadline:
                raise ConnectionLost(f"{unacked} bytes not acknowledged by the receiver")
            time.sleep(0.01)

    # --- sending ----------------------------------------------------------------------------

    def send_pending(self) -> int:
        """Send what the journal holds after the position, in batches, until it is all
        sent; how many records.  Raises OSError (ssl.SSLError, ConnectionLost) when the
        receiver cannot be reached or drops the connection; the position then stays at
        the last acknowledged batch."""
        total = 0
        while not self._stop.is_set():
            if not self._hold_lease():
                return total
            records = read_after(
                self.catalog, self.position(), chain_id=self.chain_id, limit=self.batch
            )
            if not records:
                return total
            if self._sock is not None:
                try:
                    self._check_open(self._sock)
                except ConnectionLost:  # closed while idle (a receiver's idle timeout)
                    self._close()
            if self._sock is None:
                self._sock = self._connect()
                self.connects += 1
            procid = str(os.getpid())
            payload = b"".join(
                frame(format_message(r, hostname=self.hostname, procid=procid)) for r in records
            )
            self._sock.sendall(payload)
            self._drain(self._sock)
            self._advance(records[-1].seq)
            self.sent += len(records)
            total += len(records)
        return total

    def _run(self) -> None:
        backoff = self.min_backoff_s
        while not self._stop.is_set():
            try:
                self.send_pending()
                backoff = self.min_backoff_s
                self._stop.wait(self.poll_s)
            except Exception as exc:  # the receiver or the catalog: try again later
                self._close()
                self.failures += 1
                self.last_error = str(exc)
                if self.failures == 1 or backoff >= self.max_backoff_s:
                    LOG.warning(
                        "audit: forwarding to %s failed (%s); retrying in %.1f s",
                        self.destination,
                        exc,
                        backoff,
                    )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        self._close()

    def start(self) -> SyslogForwarder:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kho-audit-syslog", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._close()

    def stats(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "sent": self.sent,
            "connects": self.connects,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    def __enter__(self) -> SyslogForwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "FACILITY",
    "MSGID",
    "SYSLOG_TLS_PORT",
    "ConnectionLost",
    "SyslogForwarder",
    "client_context",
    "format_message",
    "frame",
]
