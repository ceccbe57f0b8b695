"""Limits of the HTTP server: how long a request's head and body may take, and how many connections may be open.

uvicorn (0.55, h11) closes a keep-alive connection that stays idle after a response (``timeout_keep_alive``), but
it has no deadline for a request's head: a connection that sends nothing, or sends a head a byte now and then, stays
open for ever, and enough of them use up the process's file descriptors (which the DICOM listener and the index
need too). Its ``limit_concurrency`` answers 503 only once a request arrives, so idle connections beyond it still
hold their descriptors. And an application that waits for a request body waits as long as the client likes.

- :class:`LimitedH11Protocol` gives every request head ``http.header_timeout_s`` (counted from the connection's start
  or the previous response's end, whatever arrives meanwhile; an incomplete head is answered 408), and answers a
  connection beyond ``http.max_connections`` 503 at once and closes it.
- :class:`BodyTimeout` (ASGI middleware) ends a request whose body stalls for ``http.body_timeout_s`` with
  :class:`RequestBodyTimeout`, which the app answers 408; the route's ``finally``/``except`` blocks remove what it
  staged (a STOW-RS part, a model archive).
- :func:`server_config` puts them together for ``gateway serve`` and the tests' live server.
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any, ClassVar, cast

import anyio
import h11
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from gateway.api.refusals import RefusalLog
from gateway.config import HttpSettings
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

#: How long a refused connection is kept to read what the client sends, so that closing it does not reset the
#: connection before the client has read the 503.
REFUSED_LINGER_S = 2.0


class RequestBodyTimeout(GatewayError):
    """A request body stalled: no data within ``http.body_timeout_s`` (answered 408)."""


def raw_response(status: int, text: str) -> bytes:
    """A complete HTTP/1.1 response with a plain-text body that closes the connection, as bytes (for answers that
    h11's state machine does not allow: before or without a request)."""
    body = text.encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a limit on open connections.

    The limits are class attributes: :func:`limited_protocol` makes a subclass with the configured values.
    """

    header_timeout_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int] = 256
    refusals: ClassVar[RefusalLog] = RefusalLog(log)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._headed_cycle: RequestResponseCycle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection's data is read and dropped
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._headed_cycle:  # a request's head has arrived
            self._headed_cycle = self.cycle
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_timer()  # before the pipelined request the base class may handle now
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head, and no answer owed
            self.refusals.refused(
                "closed an HTTP connection: request head incomplete after %g s", self.header_timeout_s
            )
            self.transport.write(raw_response(408, "request head incomplete within the time limit"))
        self.transport.close()

    def _refuse(self) -> None:
        self.connections.discard(self)  # it neither counts against the limit nor waits for a graceful shutdown
        self._refused = True
        self.refusals.refused("refused an HTTP connection: %d are open (http.max_connections)", self.max_connections)
        self.transport.write(raw_response(503, "too many connections; try again later"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._head_timer = self.loop.call_later(REFUSED_LINGER_S, self.transport.close)


def limited_protocol(settings: HttpSettings, refusals: RefusalLog) -> type[LimitedH11Protocol]:
    """A :class:`LimitedH11Protocol` with the limits of ``settings``, logging refusals to ``refusals``."""

    class Protocol(LimitedH11Protocol):
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    Protocol.refusals = refusals
    return Protocol


class BodyTimeout:
    """ASGI middleware: raise :class:`RequestBodyTimeout` in the app when the next part of a request body does not
    arrive within ``timeout_s`` (only while a body is still expected: a response streamed afterwards waits for the
    client's disconnect as long as it takes).

    Parameters
    ----------
    app
        The application behind it.
    timeout_s
        The longest wait for the next part of a body.
    refusals
        Where stalled bodies are logged (rate limited).
    """

    def __init__(self, app: ASGIApp, timeout_s: float, refusals: RefusalLog) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_expected = True

        async def receive_in_time() -> Message:
            nonlocal body_expected
            if not body_expected:
                return await receive()
            try:
                with anyio.fail_after(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                self.refusals.refused(
                    "%s %s: request body stalled for %g s", scope["method"], scope["path"], self.timeout_s
                )
                raise RequestBodyTimeout(f"request body stalled: no data for {self.timeout_s:g} s") from None
            body_expected = message["type"] == "http.request" and bool(message.get("more_body", False))
            return message

        await self.app(scope, receive_in_time, send)


async def body_timed_out(request: Request, exc: Exception) -> Response:
    """The app's answer to :class:`RequestBodyTimeout`: 408, and the connection is closed (the body is unread)."""
    return JSONResponse({"detail": str(exc)}, status_code=408, headers={"Connection": "close"})


def server_config(
    app: ASGIApp, settings: HttpSettings, *, host: str | None = None, port: int | None = None, **options: Any
) -> uvicorn.Config:
    """The uvicorn configuration of the gateway's HTTP server with the limits of ``settings``.

    Parameters
    ----------
    app
        The ASGI app (:func:`gateway.api.app.create_app`).
    settings
        The HTTP settings: address, timeouts, connection limit.
    host, port
        Override ``settings.host`` and ``settings.port`` (the tests' live server binds a free port).
    options
        Further :class:`uvicorn.Config` arguments, e.g. ``log_level``, ``access_log``.
    """
    refusals = RefusalLog(logging.getLogger("gateway.api.connections"))
    return uvicorn.Config(
        app,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        http=limited_protocol(settings, refusals),
        # uvicorn annotates this as int, but hands it to loop.call_later, which takes (fractional) seconds.
        timeout_keep_alive=cast(int, settings.keep_alive_s),
        **options,
    )
