"""`middleware.request_context` rendering what a handler raised, on a real aiohttp server."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web

from nbgateway.errors import CorruptRecordError, StoreUnavailable
from nbgateway.middleware import request_context


def app_raising(exc: Exception) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        raise exc

    app = web.Application(middlewares=[request_context])
    app.router.add_get("/", handler)
    return app


@pytest.mark.parametrize(
    "exc,status,code,retry",
    [
        (StoreUnavailable("database is locked"), 503, "store_unavailable", "5"),
        (CorruptRecordError("row has no slug"), 500, "token_store_error", None),
    ],
    ids=["unavailable", "corrupt"],
)
async def test_a_store_failure_no_handler_caught_is_a_store_error_not_a_crash(
    aiohttp_client: Any,
    caplog: pytest.LogCaptureFixture,
    exc: Exception,
    status: int,
    code: str,
    retry: str | None,
) -> None:
    """The client learns the database failed (503 with Retry-After while it is unusable),
    the log has one line naming the failure and no traceback."""
    client = await aiohttp_client(app_raising(exc))
    with caplog.at_level(logging.ERROR, logger="nbgateway"):
        resp = await client.get("/")
        body = await resp.json(content_type=None)
    assert resp.status == status
    assert resp.headers["X-NBGW-Error"] == code
    assert resp.headers.get("Retry-After") == retry
    assert body["errors"][0]["code"] == code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["request failed: the store could not be used"]
    assert errors[0].exc_info is None
    assert errors[0].__dict__["error"] == str(exc)


async def test_an_unexpected_exception_is_a_500_without_details(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything else: 500 internal_error whose body says nothing of the exception; the
    traceback goes to the log."""
    client = await aiohttp_client(app_raising(RuntimeError("internal detail 0xdeadbeef")))
    with caplog.at_level(logging.ERROR, logger="nbgateway"):
        resp = await client.get("/")
        text = await resp.text()
    assert resp.status == 500
    assert resp.headers["X-NBGW-Error"] == "internal_error"
    assert "0xdeadbeef" not in text
    assert any(r.exc_info is not None for r in caplog.records)


async def test_a_method_the_route_does_not_serve_is_a_json_405(aiohttp_client: Any) -> None:
    """The router's 405 is answered like every gateway error: JSON:API, X-NBGW-Error, and
    the route's methods in Allow."""
    app = app_raising(RuntimeError("not reached"))
    client = await aiohttp_client(app)
    resp = await client.post("/")
    body = await resp.json(content_type=None)
    assert resp.status == 405
    assert resp.headers["X-NBGW-Error"] == "method_not_allowed"
    assert resp.headers["Allow"] == "GET, HEAD"
    assert body["errors"][0]["code"] == "method_not_allowed"
