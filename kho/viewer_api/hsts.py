"""HTTP Strict Transport Security (RFC 6797) for an HTTPS-only kho: every response tells
the browser to use HTTPS alone for this host for a year, so a later ``http://`` link (or an
attacker stripping TLS) never reaches the network in clear text.

A plain ASGI wrapper around the whole application (below kho's own middleware it would miss
the responses they answer themselves: a 401, a CORS preflight, the fast path); added by
kho.viewer_api.server only when the server speaks TLS, since RFC 6797 7.2 forbids the header
over plain HTTP."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: one year, the value browsers' HSTS preload lists ask for
HSTS_MAX_AGE_S = 31536000
_HEADER = b"strict-transport-security"


class StrictTransportSecurity:
    """Adds ``Strict-Transport-Security: max-age=<max_age>`` to every HTTP response."""

    def __init__(self, app: ASGIApp, max_age: int = HSTS_MAX_AGE_S) -> None:
        self.app = app
        self._value = f"max-age={max_age}".encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() != _HEADER
                ]
                headers.append((_HEADER, self._value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
