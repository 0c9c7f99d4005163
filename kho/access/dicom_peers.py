"""The AE registry: which DICOM peers may associate, from where, for which services, and on
behalf of which hospital (tenant).

Each ``[dicom_peers.<AE title>]`` entry of the settings is one known application entity
(kho.archive.config.DicomPeer).  With authentication on, an association is accepted only
from a registered calling AE title, from the network it is registered for, to kho's own
AE title; the peer then acts in its tenant, for the services its entry lists, and a C-MOVE
goes only to registered peers of that tenant that have a port.  With authentication off
every caller is the open platform admin and everything behaves as before the registry.

Mutual TLS: a peer registered with ``tls_subject`` is accepted only over DICOM TLS with a
client certificate (verified against ``tls_ca_file`` in the handshake, kho.access.tls)
whose subject Common Name is that value; a peer registered with ``tls = true`` gets kho's
own associations (C-MOVE) over TLS.

Refusals (an association rejected, a service or move destination refused) are reported
through :func:`report_refusal`: logged on the logger ``kho.access.dicom`` and handed to
every callable in :data:`REFUSAL_OBSERVERS` (audit subscribes there).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from kho.access.callers import Caller, CallerKind, Grant, Role, open_caller
from kho.access.tls import TlsPeer
from kho.archive.config import DIMSE_SERVICES
from kho.errors import AuthenticationError, ConfigError

if TYPE_CHECKING:
    from kho.archive.config import DicomPeer, Settings

#: the logger every DICOM access refusal is written to (a stable name: log routing and
#: audit may rely on it)
REFUSAL_LOGGER = "kho.access.dicom"
log = logging.getLogger(REFUSAL_LOGGER)

#: how long a peer's host name stays resolved (its ``network`` when none is given)
_HOST_CACHE_S = 60.0

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PeerRejection(StrEnum):
    """Why an association is rejected (each maps to an A-ASSOCIATE-RJ reason)."""

    UNKNOWN_CALLING_AE = "calling AE title not recognized"
    WRONG_NETWORK = "calling AE title not allowed from this address"
    WRONG_CALLED_AE = "called AE title not recognized"
    # registered with tls_subject: not over TLS, or without that client certificate
    WRONG_CERTIFICATE = "calling AE title not allowed without its TLS client certificate"
    # kho failed to set up the association (a tenant's archive would not open): transient
    UNAVAILABLE = "the archive could not serve the association"


class PeerRejectedError(AuthenticationError):
    """An association that may not be accepted; ``reason`` says which A-ASSOCIATE-RJ."""

    def __init__(self, reason: PeerRejection, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DicomRefusal:
    """One refused DICOM access: an association rejected (``service`` None) or a DIMSE
    request refused.  Carries no patient data (no identifier keys, no UIDs)."""

    calling_ae: str
    called_ae: str
    address: str
    #: a PeerRejection for a rejected association; "service not granted" or "move
    #: destination unknown" for a refused request; "TLS handshake failed" for a TLS
    #: connection refused before any association (calling and called AE empty)
    reason: str
    #: echo, store, find, get, move; None for the association itself
    service: str | None = None
    #: the tenant the peer acts in (empty when it was not recognised)
    tenant: str = ""
    #: what the reason refers to, when it names something: the C-MOVE destination AE, the
    #: TLS failure (protocol version, certificate verify failed...)
    detail: str = ""


#: called with every DicomRefusal (audit); an observer that raises is logged and skipped
REFUSAL_OBSERVERS: list[Callable[[DicomRefusal], None]] = []

SERVICE_NOT_GRANTED = "service not granted"
MOVE_DESTINATION_UNKNOWN = "move destination unknown"
TLS_HANDSHAKE_FAILED = "TLS handshake failed"


def report_refusal(refusal: DicomRefusal) -> None:
    """Log a refusal (warning, on ``kho.access.dicom``) and tell every observer."""
    if refusal.reason == TLS_HANDSHAKE_FAILED:  # before any A-ASSOCIATE-RQ: no AE titles
        log.warning(
            "DICOM TLS connection refused from %s: %s (%s)",
            refusal.address or "?",
            refusal.reason,
            refusal.detail,
        )
        _notify(refusal)
        return
    what = f"{refusal.service} refused" if refusal.service else "association rejected"
    log.warning(
        "DICOM %s: calling AE %r called AE %r from %s%s: %s%s",
        what,
        refusal.calling_ae,
        refusal.called_ae,
        refusal.address or "?",
        f" (tenant {refusal.tenant})" if refusal.tenant else "",
        refusal.reason,
        f" ({refusal.detail})" if refusal.detail else "",
    )
    _notify(refusal)


def _notify(refusal: DicomRefusal) -> None:
    for observer in list(REFUSAL_OBSERVERS):
        try:
            observer(refusal)
        except Exception:  # an observer never changes the answer
            log.exception("DICOM refusal observer %r failed", observer)


def _address(text: str) -> _Address | None:
    """An IP address from a socket's peer address text (IPv4-mapped IPv6 as IPv4)."""
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _network(text: str) -> _Network | None:
    """An IP network from an address or CIDR text; None when it is neither."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One registered peer, prepared for the association-time checks."""

    title: str
    tenant: str
    services: frozenset[str]
    #: where its associations must come from; None with ``host_name`` set: resolve that
    #: name; None without: anywhere
    network: _Network | None
    host_name: str
    host: str
    port: int
    #: kho's associations to it use TLS
    tls: bool
    #: the Common Name its client certificate must carry (empty: no certificate needed)
    tls_subject: str


class AeRegistry:
    """The settings' AE registry, asked by the DICOM door at association and per request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.auth_on
        self.ae_title = settings.ae_title.strip()
        self.tenant_names = settings.tenant_names
        self._entries = {
            title.strip(): self._entry(title.strip(), peer)
            for title, peer in settings.dicom_peers.items()
        }
        self._resolved: dict[str, tuple[float, frozenset[_Address]]] = {}
        self._resolve_lock = threading.Lock()
        bound = [t for t, e in self._entries.items() if e.tls_subject]
        if bound and not (settings.tls_ca_file and settings.dicom_tls):
            # fail at start, not with every association of these peers rejected
            raise ConfigError(
                f"dicom_peers {bound}: tls_subject needs a DICOM TLS port (tls_cert_file, "
                "tls_key_file) and tls_ca_file (the CA their certificates are checked against)"
            )

    def _entry(self, title: str, peer: DicomPeer) -> _Entry:
        network: _Network | None = None
        host_name = ""
        if peer.network.strip():
            network = _network(peer.network)
            if network is None:
                raise ConfigError(
                    f"dicom_peers.{title}.network {peer.network!r} is not an IP address "
                    "or CIDR network (e.g. 10.1.2.0/24)"
                )
        elif peer.host.strip():
            network = _network(peer.host)  # an IP literal: that address alone
            if network is None:
                host_name = peer.host.strip()  # a name: resolved when a call comes
        return _Entry(
            title=title,
            tenant=peer.tenant or self.settings.default_tenant,
            services=frozenset(peer.services),
            network=network,
            host_name=host_name,
            host=peer.host.strip(),
            port=peer.port,
            tls=peer.tls,
            tls_subject=peer.tls_subject.strip(),
        )

    # --- association ---------------------------------------------------------------------

    def authenticate(
        self,
        calling_ae: str,
        called_ae: str,
        address: str = "",
        *,
        tls: TlsPeer | None = None,
    ) -> Caller:
        """The caller behind an A-ASSOCIATE-RQ; ``tls``: what the TLS handshake of its
        connection established (None: plain TCP).  Raises PeerRejectedError (an
        AuthenticationError) for a called AE title other than kho's (with authentication
        off only when ``require_called_ae`` is set), and with authentication on for an
        unregistered calling AE title, a call from outside its network, or, for a peer
        registered with ``tls_subject``, a call without a client certificate of that
        Common Name."""
        calling = calling_ae.strip()
        called = called_ae.strip()
        if not self.enabled:
            if self.settings.require_called_ae and called != self.ae_title:
                raise PeerRejectedError(
                    PeerRejection.WRONG_CALLED_AE, f"called AE title {called!r} is not this AE"
                )
            # named after its AE title: audit records and logs say which peer acted
            return replace(open_caller(self.settings.default_tenant, address), name=calling)
        entry = self._entries.get(calling)
        if entry is None:
            raise PeerRejectedError(
                PeerRejection.UNKNOWN_CALLING_AE, f"calling AE title {calling!r} is not registered"
            )
        if not self._address_allowed(entry, address):
            raise PeerRejectedError(
                PeerRejection.WRONG_NETWORK,
                f"calling AE title {calling!r} may not associate from {address or 'here'}",
            )
        if entry.tls_subject and (tls is None or entry.tls_subject not in tls.common_names):
            if tls is None:
                came = "over plain TCP"
            elif tls.common_names:
                came = f"with the certificate of {', '.join(tls.common_names)!r}"
            else:
                came = "without a client certificate"
            raise PeerRejectedError(
                PeerRejection.WRONG_CERTIFICATE,
                f"calling AE title {calling!r} must come over TLS with the certificate of "
                f"{entry.tls_subject!r}; it came {came}",
            )
        if called != self.ae_title:
            raise PeerRejectedError(
                PeerRejection.WRONG_CALLED_AE, f"called AE title {called!r} is not this AE"
            )
        return Caller(
            CallerKind.DICOM,
            entry.title,
            _grants(entry),
            home_tenant=entry.tenant,
            address=address,
        )

    def _address_allowed(self, entry: _Entry, address: str) -> bool:
        if entry.network is None and not entry.host_name:
            return True  # registered for any address
        peer = _address(address)
        if peer is None:
            return False
        if entry.network is not None:
            return peer.version == entry.network.version and peer in entry.network
        return peer in self._host_addresses(entry.host_name)

    def _host_addresses(self, name: str) -> frozenset[_Address]:
        """The addresses a peer's host name resolves to (cached a minute; none when it does
        not resolve, so its associations are rejected until it does)."""
        now = time.monotonic()
        with self._resolve_lock:
            cached = self._resolved.get(name)
            if cached is not None and now - cached[0] < _HOST_CACHE_S:
                return cached[1]
        found: set[_Address] = set()
        try:
            for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP):
                parsed = _address(str(info[4][0]))
                if parsed is not None:
                    found.add(parsed)
        except OSError as exc:
            log.warning("DICOM peer host %r does not resolve: %s", name, exc)
        addresses = frozenset(found)
        with self._resolve_lock:
            self._resolved[name] = (now, addresses)
        return addresses

    # --- services ------------------------------------------------------------------------

    def services(self, caller: Caller) -> frozenset[str]:
        """The DIMSE services ``caller`` may use (authentication off: all of them)."""
        if not self.enabled or caller.kind == CallerKind.OPEN:
            return frozenset(DIMSE_SERVICES)
        if caller.kind != CallerKind.DICOM:
            return frozenset()
        entry = self._entries.get(caller.name)
        if entry is None or entry.tenant != caller.home_tenant:
            return frozenset()
        return entry.services

    def allows(self, caller: Caller, service: str) -> bool:
        """Whether ``caller`` may use the DIMSE ``service`` (echo, store, find, get, move)."""
        return service in self.services(caller)

    def move_destination(self, caller: Caller, ae_title: str) -> tuple[str, int] | None:
        """(host, port) of a C-MOVE destination ``caller`` may send to, or None.  With
        authentication on: registered peers of the caller's tenant that have a host and a
        port; off: the settings' ``move_destinations`` (as before the registry)."""
        title = ae_title.strip()
        if not self.enabled or caller.kind == CallerKind.OPEN:
            return self.settings.move_destination(title)
        entry = self._entries.get(title)
        if entry is None or not entry.port or not entry.host:
            return None
        if entry.tenant != caller.home_tenant:
            return None  # another hospital's AE: as unknown as an unregistered one
        return entry.host, entry.port

    def uses_tls(self, ae_title: str) -> bool:
        """Whether kho's associations to the registered peer ``ae_title`` use TLS."""
        entry = self._entries.get(ae_title.strip())
        return entry is not None and entry.tls

    def peer_titles(self, tenant: str | None = None) -> list[str]:
        """The registered AE titles (of one tenant), sorted."""
        return sorted(t for t, e in self._entries.items() if tenant in (None, e.tenant))


def _grants(entry: _Entry) -> frozenset[Grant]:
    """The roles a peer's services amount to, in its tenant: query and retrieval read
    (viewer), storage writes (uploader).  Echo alone grants nothing."""
    grants = set()
    if entry.services & {"find", "get", "move"}:
        grants.add(Grant(Role.VIEWER, entry.tenant))
    if "store" in entry.services:
        grants.add(Grant(Role.UPLOADER, entry.tenant))
    return frozenset(grants)


__all__ = [
    "MOVE_DESTINATION_UNKNOWN",
    "REFUSAL_LOGGER",
    "REFUSAL_OBSERVERS",
    "SERVICE_NOT_GRANTED",
    "TLS_HANDSHAKE_FAILED",
    "AeRegistry",
    "DicomRefusal",
    "PeerRejectedError",
    "PeerRejection",
    "report_refusal",
]
