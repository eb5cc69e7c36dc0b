"""aiohttp middlewares and the one renderer of gateway errors.

- `error_response`: a `GatewayError` as a JSON:API error document with `X-NBGW-Error`.
- `only_from`: a middleware refusing (403 client_not_allowed) peers outside an allow-list.
- `request_context`: accepts or generates X-Request-ID (returned on every response), puts
  it in the logging context, answers TRACE and CONNECT with 405 on every path (TRACE
  would reflect the bearer token the proxy adds), renders `GatewayError`s (and store
  failures no handler caught, as `errors.store_failure`), turns unexpected exceptions into
  a 500 without details, and writes one access-log line per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from nbgateway.allowlist import AllowList
from nbgateway.errors import (
    ClientNotAllowed,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    StoreError,
    store_failure,
)
from nbgateway.log import ACCESS_LOGGER, access_handler, request_id_var

log = logging.getLogger(ACCESS_LOGGER)
errlog = logging.getLogger("nbgateway.errors")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID_HEADER = "X-Request-ID"
# Never served nor forwarded: TRACE echoes the request (with the injected token), CONNECT
# asks for a tunnel.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# Per-request facts handlers add for the access log (account, upstream timing ...).
ACCESS_INFO: web.RequestKey[dict[str, Any]] = web.RequestKey("nbgw_access_info", dict)
# The status logged and counted for a request whose connection closed before its answer
# was sent (the client went away, or a stop cut it short): nginx's "client closed request".
CLIENT_CLOSED = 499
# Set by whatever closes a connection for the request's own fault (a stalled body: 408),
# so that its cancelled handler logs that status rather than CLIENT_CLOSED.
CLOSED_WITH: web.RequestKey[int] = web.RequestKey("nbgw_closed_with", int)
# Set by an Expect handler that sent no 100 Continue (the request will be refused): the
# client holds its body back, so the connection closes after the answer.
NO_CONTINUE: web.RequestKey[bool] = web.RequestKey("nbgw_no_continue", bool)


def connection_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed or closing (nothing more reaches it)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def cancelled_status(request: web.Request, status: int) -> int:
    """What to log for a handler cancelled with `status` so far: when the connection is
    gone (aiohttp cancels the handler of a lost connection), CLOSED_WITH's status if the
    gateway closed it, else CLIENT_CLOSED; `status` while the connection is still open."""
    if not connection_gone(request):
        return status
    closed: int = request.get(CLOSED_WITH, CLIENT_CLOSED)
    return closed


def error_document(err: GatewayError) -> bytes:
    """The JSON:API error body of a gateway error."""
    body = {
        "errors": [
            {"status": str(err.status), "code": err.code, "title": err.title, "detail": err.detail}
        ]
    }
    return json.dumps(body).encode()


def error_response(err: GatewayError) -> web.Response:
    """Render a gateway error: JSON:API body, status, X-NBGW-Error and extra headers."""
    headers = {"X-NBGW-Error": err.code, "Cache-Control": "no-store", **err.headers}
    return web.Response(
        status=err.status,
        body=error_document(err),
        content_type="application/vnd.api+json",
        headers=headers,
    )


def raw_error_response(err: GatewayError) -> bytes:
    """A gateway error as a complete HTTP/1.1 response that closes the connection.

    For answers written on a connection before (or instead of) reading a request.
    """
    body = error_document(err)
    head = (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        "Content-Type: application/vnd.api+json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-NBGW-Error: {err.code}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in err.headers.items())
        + "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


_SERVED = "only /api/..., /n/{slug}/api/..., /connect, /metrics, /healthz and /readyz are served"


def router_error(
    request: web.Request, exc: web.HTTPException, served: str = _SERVED
) -> GatewayError | None:
    """The router's own answers (no such route, no such method on it) as gateway errors, so
    they are rendered like every other (`served` says what is there instead of a missing
    route); None for any other HTTP exception."""
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(served)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"{request.method} is not served on this path",
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
    return None


def request_id_of(request: web.Request) -> str:
    """The sanitised id of this request: the one set by `request_context`, else derived."""
    current = request_id_var.get()
    if current is not None:
        return current
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    return incoming if _REQUEST_ID_RE.fullmatch(incoming) else new_request_id()


class _RandomIds:
    """128 random bits as hex per id (what uuid4().hex gives), from os.urandom read 4 KiB at
    a time rather than one system call per request."""

    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        # A forked worker must not reuse the bytes its parent had left.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buffer, self._offset = b"", 0

    def __call__(self) -> str:
        offset = self._offset
        if offset >= len(self._buffer):
            self._buffer, offset = os.urandom(4096), 0
        self._offset = offset + 16
        return self._buffer[offset : offset + 16].hex()


new_request_id = _RandomIds()


def only_from(allowed: AllowList, setting: str) -> Middleware:
    """Refuse every request from a peer outside `allowed` (the list named by `setting`)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allowed.allows(request.remote):
            raise ClientNotAllowed(f"this client address is not in {setting}")
        return await handler(request)

    return check


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, error rendering and the access log."""
    incoming = request.headers.get(REQUEST_ID_HEADER)
    if incoming is not None and _REQUEST_ID_RE.fullmatch(incoming):
        request_id, id_is_ours = incoming, False
    else:
        request_id, id_is_ours = new_request_id(), True
    token = request_id_var.set(request_id)
    info: dict[str, Any] = {}
    request[ACCESS_INFO] = info
    started = time.perf_counter()
    status = 500
    try:
        try:
            if request.method in REFUSED_METHODS:
                raise MethodNotAllowed(
                    f"the gateway does not serve or forward {request.method} requests",
                    headers={"Allow": ALLOWED_METHODS},
                )
            response = await handler(request)
        except asyncio.CancelledError:
            status = cancelled_status(request, status)
            raise
        except GatewayError as err:
            response = error_response(err)
        except web.HTTPException as exc:
            routed = router_error(request, exc)
            if routed is None:
                # Redirects and other answers are raised on (returning them is deprecated).
                status = exc.status
                exc.headers[REQUEST_ID_HEADER] = request_id
                raise
            response = error_response(routed)
        except StoreError as exc:
            # The database failed where no handler expected it: say so, without a traceback.
            errlog.error(
                "request failed: the store could not be used",
                extra={"method": request.method, "error": str(exc)},
            )
            response = error_response(store_failure(exc))
        except Exception:
            errlog.exception("unhandled error", extra={"method": request.method})
            response = error_response(
                GatewayError("The gateway hit an unexpected error; see its log.")
            )
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
            if status >= 400 and request.get(NO_CONTINUE):
                response.force_close()  # the body was never sent: nothing to read after it
        return response
    finally:
        info.setdefault("status", status)
        if log.isEnabledFor(logging.INFO):
            _access_line(request, info, started, id_is_ours)
        request_id_var.reset(token)


def _access_line(
    request: web.Request, info: dict[str, Any], started: float, id_is_ours: bool
) -> None:
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    fields = {"method": request.method, "path": request.path, "peer": request.remote, **info}
    handler = access_handler(log)
    if handler is not None:
        # The line the record would give, without making one (the hot path).
        handler.access(fields, request_id_var.get(), id_is_ours=id_is_ours, duration_ms=duration_ms)
    else:
        fields["duration_ms"] = duration_ms
        log.info("%s %s %s", fields["method"], fields["path"], info["status"], extra=fields)
