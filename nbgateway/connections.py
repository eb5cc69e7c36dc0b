"""Connection-level defences, applied from the moment a client connects.

- A peer outside every allow-list (the union of NBGW_ALLOWED_CLIENTS,
  NBGW_ADMIN_ALLOWED_CLIENTS and NBGW_METRICS_ALLOWED_CLIENTS) gets a canned 403
  client_not_allowed and the connection is closed at once: nothing it sends is read.
- At most NBGW_MAX_CONNECTIONS_PER_CLIENT open connections per client address; one more
  gets a canned 429 too_many_connections and is closed.
- A request head must be complete within NBGW_HEADER_TIMEOUT seconds of the connection
  opening, or of the first byte of a later request on it; a request body that stalls (no
  byte while the gateway waits for one) for NBGW_BODY_TIMEOUT seconds closes the
  connection. Idle keep-alive connections close after KEEPALIVE_TIMEOUT seconds.
- A request that is not well-formed HTTP/1.1 (a line over 8190 bytes, Content-Length with
  Transfer-Encoding, broken chunk framing, ...) gets the contract's 400 invalid_request and
  a one-line warning, not aiohttp's plain-text page (which quotes the request's bytes) and
  traceback; a chunked body that breaks after its request was handed on fails its reader
  at once instead of leaving it waiting for NBGW_BODY_TIMEOUT.

`ConnectionGuard` holds the policy and the per-address counts (one per app, under
`GUARD`); `GuardedHandler` is aiohttp's `RequestHandler` with these checks, made by
`ConnectionGuard.protocol_factory` for the listening socket; `track_requests` is the
middleware that tells the handler when a request is being handled. Every closed
connection is counted in `nbgw_connections_closed_total{reason}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from nbgateway.allowlist import AllowList, peer_address
from nbgateway.config import Settings
from nbgateway.errors import (
    ClientNotAllowed,
    GatewayError,
    InvalidRequest,
    NotImplementedByGateway,
    TooManyConnections,
)
from nbgateway.log import request_id_var
from nbgateway.metrics import Metrics
from nbgateway.middleware import (
    CLOSED_WITH,
    REQUEST_ID_HEADER,
    error_response,
    new_request_id,
    raw_error_response,
)

log = logging.getLogger("nbgateway.server")

# Seconds an idle keep-alive connection stays open (aiohttp's keepalive_timeout).
KEEPALIVE_TIMEOUT = 75.0

_NOT_ALLOWED = raw_error_response(
    ClientNotAllowed(
        "this client address is in none of NBGW_ALLOWED_CLIENTS, NBGW_ADMIN_ALLOWED_CLIENTS "
        "and NBGW_METRICS_ALLOWED_CLIENTS"
    )
)


class ConnectionGuard:
    """Who may connect, how many connections per address, and the time limits."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.allowed = AllowList(
            settings.allowed_clients,
            settings.admin_allowed_clients,
            settings.metrics_allowed_clients,
        )
        self.per_client = settings.max_connections_per_client
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self._closed = metrics.connections_refused
        self._open: dict[str, int] = {}
        self._too_many = raw_error_response(
            TooManyConnections(
                f"this client address already has {self.per_client} open connections "
                "(NBGW_MAX_CONNECTIONS_PER_CLIENT; every tool on that host counts); retry "
                "once one of them has closed",
                headers={"Retry-After": "1"},
            )
        )

    def open_connections(self, address: str) -> int:
        """How many connections from `address` are open now."""
        return self._open.get(address, 0)

    def admit(self, peer: str | None) -> tuple[str | None, bytes | None]:
        """(the address the connection is counted under, or the refusal to write)."""
        if not self.allowed.allows(peer):
            self.closed("not_allowed")
            return None, _NOT_ALLOWED
        address = str(peer_address(peer))
        count = self._open.get(address, 0)
        if count >= self.per_client:
            self.closed("client_limit")
            return None, self._too_many
        self._open[address] = count + 1
        return address, None

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def closed(self, reason: str) -> None:
        self._closed.labels(reason).inc()

    def protocol_factory(
        self, server: web.Server, **handler_args: Any
    ) -> Callable[[], GuardedHandler]:
        """What `loop.create_server` needs: one guarded handler per accepted connection."""
        loop = asyncio.get_running_loop()
        handler_args.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)

        def make() -> GuardedHandler:
            return GuardedHandler(server, self, loop=loop, **handler_args)

        return make


class GuardedHandler(web.RequestHandler):
    """aiohttp's request handler, refusing peers and closing slow heads and stalled bodies."""

    def __init__(
        self,
        server: web.Server,
        guard: ConnectionGuard,
        *,
        loop: asyncio.AbstractEventLoop,
        **kw: Any,
    ) -> None:
        super().__init__(server, loop=loop, **kw)
        self._guard = guard
        self._address: str | None = None
        # One head timer per connection, re-armed when it fires early rather than armed and
        # cancelled for every request: `_head_since` is when the pending head began (None
        # while no head is awaited: a request is being handled, or none has begun).
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_since: float | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._request: web.BaseRequest | None = None  # the one being handled
        self._body_failed = False  # its body broke: the connection ends with its answer
        self._last_data = 0.0
        self._opening = b""  # the connection's first bytes: what a refusal's message says

    # -- the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peername = transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) and peername else None
        self._address, refusal = self._guard.admit(peer)
        if refusal is not None:
            # Nothing of the request is read: answer, close, forget.
            if self.transport is not None:
                self.transport.write(refusal)
            self.force_close()
            return
        self._head_since = self._loop.time()
        self._arm_head_timer(self._head_since + self._guard.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        if self._address is not None:
            self._guard.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = self._last_data = self._loop.time()
        if not self._opening:
            self._opening = data[:2]
        if not self._in_request and self._head_since is None and self._address is not None:
            self._head_since = now  # the first byte of the next request head
            if self._head_timer is None:
                self._arm_head_timer(now + self._guard.header_timeout)
        super().data_received(data)
        request = self._request
        if request is not None and self._messages:
            self._fail_body_on_parse_error(request)

    def _fail_body_on_parse_error(self, request: web.BaseRequest) -> None:
        """aiohttp's C parser, failing in a body its request was already handed on with
        (a broken chunk size), queues the error as the next message but leaves that body
        waiting for bytes that never come (its pure-Python parser fails the body): fail it
        here, so the handler answers 400 at once."""
        content = request.content
        if content.is_eof() or content.exception() is not None:
            return
        for message, _payload in self._messages:
            if isinstance(message, web_protocol._ErrInfo) and message.exc is not None:
                content.set_exception(message.exc)
                self._body_failed = True
                self._guard.closed("malformed_request")
                return

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp's parser refused: the contract's JSON 400 and one warning line
        (without the request's bytes, which may hold credentials); anything else as aiohttp
        answers it."""
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        refusal: GatewayError
        if self._opening.startswith(b"\x16\x03"):
            refusal = InvalidRequest(
                "this port speaks plain HTTP, and a TLS handshake arrived: use http://, or "
                "put a TLS reverse proxy in front (see deployment.md); nothing was forwarded"
            )
        elif isinstance(exc, BadHttpMethod) and self._opening[:1].isalpha():
            # RFC 9110: an unrecognised method is 501. The name is not echoed (any bytes).
            refusal = NotImplementedByGateway(
                "the request method is none the gateway's HTTP parser knows (the standard "
                "methods, PATCH, and WebDAV's and a few other registered ones); nothing was "
                "forwarded"
            )
        elif isinstance(exc, LineTooLong):
            refusal = InvalidRequest(
                "a request line or header line is longer than 8190 bytes; nothing was forwarded"
            )
        else:
            refusal = InvalidRequest(
                "the request is not well-formed HTTP/1.1 (its request line, a header, or "
                "the framing of its body); nothing was forwarded"
            )
        self._guard.closed("malformed_request")
        request_id = new_request_id()
        token = request_id_var.set(request_id)
        try:
            log.warning(
                "malformed request refused",
                extra={"peer": self._address, "error": type(exc).__name__},
            )
        finally:
            request_id_var.reset(token)
        response = error_response(refusal)
        response.headers[REQUEST_ID_HEADER] = request_id
        response.force_close()
        return response

    # -- requests (told by `track_requests`) --------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        self._in_request = True
        self._head_since = None  # the head is complete (its timer, if due, finds nothing)
        content = request.content
        if request.body_exists and not content.is_eof():
            self._request = request
            self._last_data = self._loop.time()
            self._body_timer = self._loop.call_at(
                self._last_data + self._guard.body_timeout, self._check_body
            )
            content.on_eof(self._body_complete)

    def request_finished(self) -> None:
        request = self._request
        if request is not None and not self._body_failed:
            # aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS) fails the body itself.
            failure = request.content.exception()
            if isinstance(failure, (HttpProcessingError, RequestPayloadError)):
                self._body_failed = True
                self._guard.closed("malformed_request")
        if self._body_failed and self._request is not None:
            # Nothing after the broken bytes can be parsed: answer this request, then
            # close (no draining of the rest of its body, no next request).
            self._request.content.feed_eof()
            self.close()
        self._in_request = False
        self._request = None
        self._body_complete()

    # -- timers -------------------------------------------------------------------------------

    def _arm_head_timer(self, at: float) -> None:
        self._head_timer = self._loop.call_at(at, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self._in_request or self.transport is None:
            return  # no head awaited now: the next first byte arms the timer again
        due = since + self._guard.header_timeout
        if self._loop.time() >= due:
            self._guard.closed("header_timeout")
            self.force_close()
        else:
            self._arm_head_timer(due)  # a later head than the one this timer was armed for

    def _check_body(self) -> None:
        self._body_timer = None
        transport = self.transport
        if transport is None:
            return
        now = self._loop.time()
        if not transport.is_reading():
            # Paused because the gateway has not consumed what came: not the client's stall.
            self._last_data = now
        due = self._last_data + self._guard.body_timeout
        if now >= due:
            self._guard.closed("body_timeout")
            if self._request is not None:
                self._request[CLOSED_WITH] = 408  # the request timed out, as nginx logs it
            self.force_close()
        else:
            self._body_timer = self._loop.call_at(due, self._check_body)

    def _body_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body_complete()


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell a guarded connection that a request is being handled (stops the head timer)."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedHandler):
        return await handler(request)  # served by another runner (the test client)
    protocol.request_started(request)
    try:
        return await handler(request)
    finally:
        protocol.request_finished()


GUARD = web.AppKey("connection_guard", ConnectionGuard)
