"""HEAD wherever GET works (RFC 9110 9.3.2): the GET's status and headers, no content.

FastAPI registers only the methods a route names; rather than a HEAD twin of every GET
route, a HEAD request is handed to the application as a GET and the body it produces is
dropped here.  The headers (Content-Type, Content-Length...) are the GET's, so a client
learns the size of a resource without transferring it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """ASGI middleware: HEAD served by the GET route, body withheld."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        finished = False

        async def send_headers_only(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body":
                # the GET's body is computed (a streamed retrieve reads every part) but not
                # sent: one empty closing message when the GET's last one comes
                if finished or message.get("more_body", False):
                    return
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
