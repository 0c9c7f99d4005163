"""Behind a reverse proxy: the public address of every request, for the URLs kho writes.

Hospitals publish a PACS through a reverse proxy (nginx, Apache, a load balancer), often
terminating TLS there and often under a path prefix (``https://pacs.example.org/kho/``).
kho writes absolute URLs into its answers -- RetrieveURL and BulkDataURI in DICOM JSON,
the viewer's configuration, launch and share links -- and they must name that public
address, not the proxy's upstream (``http://10.0.0.5:8080``).

:class:`ForwardedHeaders` (plain ASGI middleware, outermost) rewrites each request's scope
so that ``request.base_url`` is the public address:

- with the setting ``public_url`` (e.g. ``https://pacs.example.org/kho``): its scheme, host
  and path prefix, for every request (the configuration wins over any header);
- else, for a request whose peer is in ``trusted_proxies`` (addresses or CIDR networks):
  RFC 7239 ``Forwarded`` (``proto=``, ``host=``, ``for=``) or, without it, the de-facto
  ``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Forwarded-Prefix`` and
  ``X-Forwarded-For``.  Of each list the last entry counts: the one the proxy next to kho
  wrote (earlier ones came from further away, or from the client itself).
- otherwise nothing: a client that sends these headers directly is ignored, so it cannot
  make kho write links to a host of its choosing.

A path prefix goes into the scope's ``root_path`` and, as the ASGI specification has it,
in front of ``path`` (the routes strip it again: kho.viewer_api.security.route_path); a
proxy that strips the prefix and one that passes it through both work.  The peer address
becomes the forwarded client's, so audit records name the person's machine, not the proxy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from kho.errors import ConfigError

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*$")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class PublicAddress:
    """What a request's URLs are built on: scheme, host[:port], path prefix ('' or /x)."""

    scheme: str | None = None
    host: str | None = None
    prefix: str = ""
    client: str | None = None


def parse_public_url(url: str) -> PublicAddress:
    """The public_url setting as scheme, host and prefix (ConfigError if it is not an
    http(s) URL with a host and nothing after its path)."""
    parts = urlsplit(url.strip())
    prefix = parts.path.rstrip("/")
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.query
        or parts.fragment
        or not _HOST.match(parts.netloc)
        or not _PREFIX.match(prefix)
    ):
        raise ConfigError(
            f"public_url must be an http:// or https:// URL such as "
            f"https://pacs.example.org/kho, not {url!r}"
        )
    return PublicAddress(parts.scheme, parts.netloc, prefix)


def trusted_networks(entries: Iterable[str]) -> tuple[_Network, ...]:
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {entry!r} is not an address or network") from exc
    return tuple(networks)


def _last(value: str) -> str:
    return value.rsplit(",", 1)[-1].strip()


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def _forwarded_element(header: str) -> dict[str, str]:
    """The last element of an RFC 7239 Forwarded header, as parameter -> value."""
    element = _last(header)
    pairs: dict[str, str] = {}
    for piece in element.split(";"):
        name, sep, value = piece.partition("=")
        if sep:
            pairs[name.strip().lower()] = _unquote(value)
    return pairs


def _client_address(value: str) -> str | None:
    """An address from ``for=`` or X-Forwarded-For (``[v6]:port``, ``v4:port`` or bare);
    None for an obfuscated or unknown one (RFC 7239 6.3)."""
    value = value.strip()
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def forwarded_address(headers: dict[str, str]) -> PublicAddress:
    """What a trusted proxy's headers say (``headers``: lower-case names, first value)."""
    scheme = host = client = None
    prefix = ""
    if "forwarded" in headers:
        element = _forwarded_element(headers["forwarded"])
        scheme = element.get("proto")
        host = element.get("host")
        if element.get("for"):
            client = _client_address(element["for"])
    else:
        if "x-forwarded-proto" in headers:
            scheme = _last(headers["x-forwarded-proto"])
        if "x-forwarded-host" in headers:
            host = _last(headers["x-forwarded-host"])
        if "x-forwarded-for" in headers:
            client = _client_address(_last(headers["x-forwarded-for"]))
    if "x-forwarded-prefix" in headers:  # no Forwarded parameter says this
        prefix = _last(headers["x-forwarded-prefix"]).rstrip("/")
    scheme = scheme.lower() if scheme and scheme.lower() in ("http", "https") else None
    host = host if host and _HOST.match(host) else None
    if not _PREFIX.match(prefix) or "/../" in prefix + "/" or "/./" in prefix + "/":
        prefix = ""
    return PublicAddress(scheme, host, prefix, client)


class ForwardedHeaders:
    """ASGI middleware: the request's public scheme, host and prefix (module note)."""

    def __init__(self, app: ASGIApp, settings: Any) -> None:
        self.app = app
        public_url = str(settings.public_url or "")
        self.public = parse_public_url(public_url) if public_url else None
        self.trusted = trusted_networks(settings.trusted_proxies or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (self.public is not None or self.trusted):
            self.apply(scope)
        await self.app(scope, receive, send)

    def _from_trusted_proxy(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client or not self.trusted:
            return False
        try:
            peer = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return any(peer in network for network in self.trusted)

    def apply(self, scope: Scope) -> None:
        forwarded = PublicAddress()
        if self._from_trusted_proxy(scope):
            names = (
                b"forwarded",
                b"x-forwarded-proto",
                b"x-forwarded-host",
                b"x-forwarded-prefix",
                b"x-forwarded-for",
            )
            headers: dict[str, str] = {}
            for name, value in scope["headers"]:
                if name in names:
                    key = name.decode()
                    # several header lines are one comma-separated list (RFC 9110 5.3)
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
            forwarded = forwarded_address(headers)
            if forwarded.client:
                scope["client"] = (forwarded.client, 0)
        address = self.public or forwarded
        if address.scheme:
            scope["scheme"] = address.scheme
        if address.host:
            host = address.host.encode("latin-1")
            scope["headers"] = [(n, v) for n, v in scope["headers"] if n != b"host"]
            scope["headers"].append((b"host", host))
        if address.prefix:
            _add_prefix(scope, address.prefix)


def _add_prefix(scope: Scope, prefix: str) -> None:
    """``prefix`` before the path and in the root path (ASGI: path includes root_path)."""
    path: str = scope["path"]
    if not (path == prefix or path.startswith(prefix + "/")):
        scope["path"] = prefix + path
        raw = scope.get("raw_path")
        if raw is not None:
            scope["raw_path"] = prefix.encode("latin-1") + raw
    scope["root_path"] = prefix + scope.get("root_path", "")
