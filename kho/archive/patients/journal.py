"""The journal of HL7 messages a tenant received (``hl7_messages``): each message with the
acknowledgement it got, for audit and replay, and what makes a resend idempotent.

A message is known by its sender and Message Control ID (MSH-10).  ``run`` applies a
message's changes and writes its journal row in one transaction: either both are
committed or neither.  A message already answered AA or AE gets the same acknowledgement
again and changes nothing (a resend after a lost ACK); the same control ID with other
content is refused (a sender bug that would otherwise be silently dropped).  Failures of
the archive itself (the catalog unreachable) are journalled under a key of their own and
not remembered as the answer: a resend tries again.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from kho.archive.catalog import Catalog
from kho.errors import CatalogError, KhoError

log = logging.getLogger(__name__)

_COLUMNS = (
    "message_key",
    "sender",
    "control_id",
    "message_type",
    "received_at",
    "ack_code",
    "ack_text",
    "sha256",
    "message",
    "ack",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    message_key: str
    sender: str
    control_id: str
    message_type: str
    received_at: float
    #: AA, AE or AR
    ack_code: str
    ack_text: str
    #: of the message text as decoded
    sha256: str
    message: str
    ack: str


@dataclass(frozen=True, slots=True)
class Received:
    """A message to journal: who sent it, what it is, its text."""

    sender: str
    control_id: str
    message_type: str
    message: str

    @property
    def key(self) -> str:
        return message_key(self.sender, self.control_id)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.message.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a message was answered: its ACK code and text, the ACK itself, and whether it
    was a resend answered from the journal (nothing applied)."""

    ack_code: str
    ack_text: str
    ack: str
    resent: bool = False


class ApplicationFailure(KhoError):
    """The archive could not process a message (not the message's fault)."""


class DuplicateControlIdError(KhoError):
    """A Message Control ID the sender used before for another message."""


def message_key(sender: str, control_id: str) -> str:
    return hashlib.sha256(f"{sender}\x00{control_id}".encode()).hexdigest()[:40]


def answered(catalog: Catalog, key: str) -> JournalEntry | None:
    row = catalog.fetchone(
        f"SELECT {', '.join(_COLUMNS)} FROM hl7_messages WHERE message_key = ?", (key,)
    )
    return JournalEntry(*row) if row is not None else None


def run(
    catalog: Catalog,
    received: Received,
    apply: Callable[[], T],
    acknowledge: Callable[[str, str, KhoError | None], str],
    *,
    refusals: tuple[type[KhoError], ...],
) -> tuple[Outcome, T | None]:
    """Apply a message once: (its outcome, what ``apply`` returned when it ran now).

    ``apply`` runs inside the transaction that writes the journal row; ``acknowledge(code,
    text, error)`` makes the ACK text.  An error of a ``refusals`` type (the message cannot
    be applied) rolls everything back and is answered AE, journalled; any other error is
    answered AE as an application failure, journalled apart and not remembered."""
    key = received.key
    prior = answered(catalog, key)
    if prior is not None:
        return _resend(received, prior, acknowledge), None
    try:
        with catalog.transaction():
            if catalog.fetchone("SELECT 1 FROM hl7_messages WHERE message_key = ?", (key,)):
                raise _AlreadyAnswered()
            result = apply()
            ack = acknowledge("AA", "", None)
            _insert(catalog, key, received, "AA", "", ack)
        return Outcome("AA", "", ack), result
    except _AlreadyAnswered:
        pass
    except refusals as refusal:
        text = str(refusal)
        ack = acknowledge("AE", text, refusal)
        try:
            with catalog.transaction():
                _insert(catalog, key, received, "AE", text, ack)
        except CatalogError:
            log.exception("HL7 journal: the refusal of %s could not be recorded", key)
        return Outcome("AE", text, ack), None
    except CatalogError as exc:
        # a concurrent resend may have answered it first (the journal row's key)
        prior = answered(catalog, key) if _catalog_alive(catalog) else None
        if prior is None:
            return _failed(catalog, received, acknowledge, exc), None
    except Exception as exc:
        log.exception("HL7 message %s from %s failed", received.control_id, received.sender)
        return _failed(catalog, received, acknowledge, exc), None
    prior = answered(catalog, key)
    assert prior is not None
    return _resend(received, prior, acknowledge), None


def record(catalog: Catalog, received: Received, code: str, text: str, ack: str) -> None:
    """Journal a message answered without being applied (AR), under a key of its own."""
    try:
        with catalog.transaction():
            _insert(catalog, _unique_key(), received, code, text, ack)
    except CatalogError:
        log.exception("HL7 journal: message %s could not be recorded", received.control_id)


def entries(
    catalog: Catalog, *, since: float = 0.0, codes: tuple[str, ...] = ("AA",), limit: int = 1000
) -> Iterator[JournalEntry]:
    """Journalled messages received at or after ``since`` with these ACK codes, oldest
    first (for replay and audit), read a page at a time."""
    marks = ", ".join("?" for _ in codes)
    after = since
    seen: set[str] = set()
    while True:
        rows = catalog.fetchall(
            f"SELECT {', '.join(_COLUMNS)} FROM hl7_messages WHERE received_at >= ? "
            f"AND ack_code IN ({marks}) ORDER BY received_at, message_key LIMIT ?",
            (after, *codes, int(limit)),
        )
        fresh = [JournalEntry(*row) for row in rows if row[0] not in seen]
        if not fresh:
            return
        for entry in fresh:
            seen.add(entry.message_key)
            yield entry
        after = fresh[-1].received_at


class _AlreadyAnswered(Exception):
    pass


def _insert(catalog: Catalog, key: str, received: Received, code: str, text: str, ack: str) -> None:
    marks = ", ".join("?" for _ in _COLUMNS)
    catalog.execute(
        f"INSERT INTO hl7_messages ({', '.join(_COLUMNS)}) VALUES ({marks})",
        (
            key,
            received.sender,
            received.control_id,
            received.message_type,
            time.time(),
            code,
            text[:1000],
            received.sha256,
            received.message,
            ack,
        ),
    )


def _resend(
    received: Received,
    prior: JournalEntry,
    acknowledge: Callable[[str, str, KhoError | None], str],
) -> Outcome:
    if prior.sha256 == received.sha256:
        return Outcome(prior.ack_code, prior.ack_text, prior.ack, resent=True)
    # the same control ID for another message: refused, the first one stands
    refusal = DuplicateControlIdError("message control ID already used for another message")
    return Outcome("AE", str(refusal), acknowledge("AE", str(refusal), refusal), resent=True)


def _failed(
    catalog: Catalog,
    received: Received,
    acknowledge: Callable[[str, str, KhoError | None], str],
    exc: Exception,
) -> Outcome:
    text = "the archive could not process the message"
    failure = ApplicationFailure(f"{text}: {type(exc).__name__}")
    ack = acknowledge("AE", text, failure)
    if _catalog_alive(catalog):
        record(catalog, received, "AE", str(failure), ack)
    return Outcome("AE", text, ack)


def _catalog_alive(catalog: Catalog) -> bool:
    try:
        catalog.fetchone("SELECT 1")
    except CatalogError:
        return False
    return True


def _unique_key() -> str:
    return "x" + secrets.token_hex(19)
