"""Forwarding to a syslog-TLS receiver started by the test on loopback (certificates made
by the test): RFC 5424 messages in RFC 5425 octet-counting frames, every record in order
after the receiver was down, nothing skipped when TLS fails."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kho.access.callers import Caller
from kho.archive.catalog import Catalog
from kho.audit import journal
from kho.audit import messages as m
from kho.audit.service import AuditLog
from kho.audit.syslog import SyslogForwarder, client_context
from tests.audit.certs import Pki, make_pki
from tests.helpers.dcmtk import free_port

# RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
SYSLOG = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) "
    rb"(?P<msgid>\S+) (?P<sd>-|(?:\[[^\]]*\])+) (?P<msg>.*)",
    re.DOTALL,
)


@dataclass
class Message:
    pri: int
    time: str
    host: str
    app: str
    msgid: str
    structured: str
    xml: ET.Element

    @property
    def sequence(self) -> int:
        found = re.search(r'sequenceId="(\d+)"', self.structured)
        assert found, self.structured
        return int(found.group(1))


def read_frames(stream: socket.socket) -> Iterator[bytes]:
    """RFC 5425 octet counting: MSG-LEN SP SYSLOG-MSG, repeated."""
    buffer = b""
    while True:
        while b" " not in buffer[:12]:
            chunk = stream.recv(65536)
            if not chunk:
                return
            buffer += chunk
        length_text, buffer = buffer.split(b" ", 1)
        assert length_text.isdigit() and not length_text.startswith(b"0"), length_text
        length = int(length_text)
        while len(buffer) < length:
            chunk = stream.recv(65536)
            if not chunk:
                raise AssertionError("a frame was cut short")
            buffer += chunk
        yield buffer[:length]
        buffer = buffer[length:]


def parse(frame: bytes) -> Message:
    matched = SYSLOG.fullmatch(frame)
    assert matched, frame[:200]
    body = matched["msg"]
    assert body.startswith(b"\xef\xbb\xbf")  # RFC 5424 MSG-UTF8: a BOM, then UTF-8
    return Message(
        int(matched["pri"]),
        matched["time"].decode(),
        matched["host"].decode(),
        matched["app"].decode(),
        matched["msgid"].decode(),
        matched["sd"].decode(),
        ET.fromstring(body[3:].decode("utf-8")),
    )


class Receiver:
    """A syslog-TLS receiver (an audit record repository's listener) on a fixed port,
    which the test starts and stops."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.messages: list[Message] = []
        self.errors: list[str] = []
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(str(exc))
            raw.close()
            return
        with self._lock:
            self._connections.append(conn)
        try:
            for frame in read_frames(conn):
                message = parse(frame)
                with self._lock:
                    self.messages.append(message)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        if self._listener is not None:  # shutdown wakes the thread blocked in accept()
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def sequences(self) -> list[int]:
        with self._lock:
            return [message.sequence for message in self.messages]


def server_context(pki: Pki, *, require_client_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def add_records(log: AuditLog, caller: Caller, start: int, count: int) -> None:
    for n in range(start, start + count):
        log.record(
            m.instances_accessed(
                caller,
                patient=m.Patient(f"PAT-{n}", "Müller^Jürgen"),  # octets differ from chars
                study=m.Study(f"1.2.{n}"),
            )
        )
        if n % 3 == 0:
            log.record(m.security_alert(m.AlertReason.BAD_TOKEN, user="mallory", subject="/x"))
    log.flush()


def test_every_record_arrives_in_order_after_the_receiver_was_down(
    sqlite_catalog: Catalog, radiologist: Caller, pki: Pki, source
) -> None:
    port = free_port()
    receiver = Receiver(port, server_context(pki))
    log = AuditLog(sqlite_catalog, source=source)
    add_records(log, radiologist, 0, 10)  # before the forwarder and while the receiver is down
    forwarder = SyslogForwarder(
        sqlite_catalog,
        "127.0.0.1",
        port,
        context=client_context(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key),
        hostname="archive-1.example.org",
        batch=7,
        poll_s=0.05,
        min_backoff_s=0.05,
        max_backoff_s=0.3,
    )
    try:
        forwarder.start()
        wait_until(lambda: forwarder.failures >= 2)  # connection refused, retried
        add_records(log, radiologist, 10, 10)  # spooled in the journal meanwhile
        assert forwarder.position() == 0
        receiver.start()
        total = len(journal.read_after(sqlite_catalog, 0))
        wait_until(lambda: forwarder.position() == total)
        wait_until(lambda: len(receiver.messages) >= total)
        assert receiver.sequences() == list(range(1, total + 1))

        receiver.stop()  # down again, while more records come
        add_records(log, radiologist, 20, 10)
        failures = forwarder.failures
        wait_until(lambda: forwarder.failures > failures)
        receiver.start()
        total = len(journal.read_after(sqlite_catalog, 0))
        wait_until(lambda: forwarder.position() == total)
        wait_until(lambda: len(set(receiver.sequences())) >= total)
    finally:
        forwarder.stop()
        receiver.stop()
    arrived = list(dict.fromkeys(receiver.sequences()))  # at least once: first arrivals
    assert arrived == list(range(1, total + 1))
    assert receiver.errors == []

    records = {r.seq: r for r in journal.read_after(sqlite_catalog, 0)}
    for message in receiver.messages:
        record = records[message.sequence]
        assert message.pri == 10 * 8 + (5 if record.outcome == 0 else 4)  # authpriv
        assert message.msgid == "IHE+RFC-3881"
        assert message.app == "kho"
        assert message.host == "archive-1.example.org"
        assert message.time.endswith("Z")
        assert ET.tostring(message.xml, encoding="unicode") == ET.tostring(
            ET.fromstring(record.message), encoding="unicode"
        )
        event_id = message.xml.find("EventIdentification/EventID")
        assert event_id is not None
        expected = m.EVENT_IDS[m.EventKind(record.event_kind)].code
        assert event_id.get("csd-code") == expected


def test_a_receiver_with_a_certificate_of_another_ca_gets_nothing(
    sqlite_catalog: Catalog, radiologist: Caller, pki: Pki, tmp_path: Path, source
) -> None:
    """The forwarder refuses the handshake; the records stay, unsent, for the day the
    right receiver answers."""
    impostor = make_pki(tmp_path / "impostor", "impostor")
    port = free_port()
    receiver = Receiver(port, server_context(impostor, require_client_certificate=False))
    add_records(AuditLog(sqlite_catalog, source=source), radiologist, 0, 3)
    forwarder = SyslogForwarder(
        sqlite_catalog,
        "127.0.0.1",
        port,
        context=client_context(ca_file=pki.ca),
        poll_s=0.05,
        min_backoff_s=0.05,
        max_backoff_s=0.2,
    )
    receiver.start()
    try:
        forwarder.start()
        wait_until(lambda: forwarder.failures >= 2)
    finally:
        forwarder.stop()
        receiver.stop()
    assert "CERTIFICATE_VERIFY_FAILED" in forwarder.last_error
    assert receiver.messages == []
    assert forwarder.position() == 0


def test_a_receiver_requiring_a_client_certificate_refuses_an_archive_without(
    sqlite_catalog: Catalog, radiologist: Caller, pki: Pki, source
) -> None:
    port = free_port()
    receiver = Receiver(port, server_context(pki))
    add_records(AuditLog(sqlite_catalog, source=source), radiologist, 0, 3)
    forwarder = SyslogForwarder(
        sqlite_catalog,
        "localhost",
        port,
        context=client_context(ca_file=pki.ca),
        poll_s=0.05,
        min_backoff_s=0.05,
        max_backoff_s=0.2,
    )
    receiver.start()
    try:
        forwarder.start()
        wait_until(lambda: forwarder.failures >= 2)
    finally:
        forwarder.stop()
        receiver.stop()
    assert "CERTIFICATE_REQUIRED" in forwarder.last_error  # TLS 1.3: refused after the
    assert receiver.messages == []  # client's handshake, caught before anything was sent
    assert forwarder.position() == 0


def test_one_forwarder_per_destination_sends(catalog: Catalog, source) -> None:
    """Each kho process may start a forwarder; the lease lets one of them send."""
    first = SyslogForwarder(catalog, "127.0.0.1", 6514, context=None, lease_s=60)
    second = SyslogForwarder(catalog, "127.0.0.1", 6514, context=None, lease_s=60)
    assert first._hold_lease()
    assert not second._hold_lease()
    assert first._hold_lease()  # renewing its own
    other_destination = SyslogForwarder(catalog, "127.0.0.1", 6515, context=None)
    assert other_destination._hold_lease()
