"""Assembles the gateway: services, their lifetimes, routes.

`create_app(settings, ...)` is the one factory used by `serve`, `demo` and the tests.
Every external collaborator (clock, metrics registry, upstream HTTP session, redactor) can
be passed in; otherwise production defaults are built. Services are opened and closed in
`cleanup_ctx` order: the alert notifier, then the store, HTTP session, token manager and
its background task (closed in reverse).

Who may use what: the proxy checks NBGW_ALLOWED_CLIENTS itself; `/connect` (pages, API,
callback) is limited to NBGW_ADMIN_ALLOWED_CLIENTS and `/metrics` to
NBGW_METRICS_ALLOWED_CLIENTS; `/healthz` and `/readyz` answer every peer the connection
guard (`connections.py`, used by `server.serving`) lets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from nbgateway import admin_api, keys
from nbgateway.activity import RequestActivity
from nbgateway.admin import routes as admin_routes
from nbgateway.admin.session import LoginThrottle, SessionRevocations
from nbgateway.allowlist import AllowList
from nbgateway.browsers import own_hosts
from nbgateway.clock import Clock, SystemClock
from nbgateway.config import Settings
from nbgateway.connections import GUARD, ConnectionGuard, track_requests
from nbgateway.errors import ClientNotAllowed, NBGatewayError
from nbgateway.health import watch_store
from nbgateway.metrics import Metrics
from nbgateway.middleware import only_from, request_context
from nbgateway.notify import Notifier, combine
from nbgateway.proxy import Proxy
from nbgateway.ratelimit import RateLimiter
from nbgateway.redact import Redactor
from nbgateway.services import open_services
from nbgateway.tokens import NeedsReauthListener

log = logging.getLogger("nbgateway.app")

PROXY = web.AppKey("proxy", Proxy)

# Seconds between two looks at the store for changes made by other processes.
SYNC_INTERVAL = 1.0
# Seconds between two sweeps of the background refresher.
REFRESH_INTERVAL = 30.0


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    session: aiohttp.ClientSession | None = None,
    redactor: Redactor | None = None,
    background: bool = True,
    on_needs_reauth: NeedsReauthListener | None = None,
    metrics_dir: Path | None = None,
) -> web.Application:
    """Build the gateway application. Nothing is opened until the app starts.

    `metrics_dir` is set in a `serve --workers` worker: /metrics then shows every worker.
    """
    clock = clock or SystemClock()
    redactor = redactor or Redactor()
    metrics = Metrics(registry, multiprocess_dir=metrics_dir)

    app = web.Application(
        middlewares=[track_requests, request_context], client_max_size=settings.max_request_body
    )
    app[keys.SETTINGS] = settings
    app[GUARD] = ConnectionGuard(settings, metrics)
    app[keys.CLOCK] = clock
    app[keys.REDACTOR] = redactor
    limiter = RateLimiter(
        clock,
        metrics,
        queue_timeout=settings.rate_queue_timeout,
        default_limit=settings.rate_default_limit,
    )
    app[keys.RATE_LIMITER] = limiter
    activity = RequestActivity(metrics, clock)
    app[keys.ACTIVITY] = activity
    notifier = Notifier(
        settings.alert_webhook, settings.public_url, metrics=metrics, redactor=redactor, clock=clock
    )
    # Before the services: open when their first sync may already report an account, closed
    # (pending deliveries awaited) after them.
    app.cleanup_ctx.append(notifier.context)

    async def services(app: web.Application) -> AsyncIterator[None]:
        async with open_services(
            settings,
            clock=clock,
            metrics=metrics,
            redactor=redactor,
            session=session,
            on_needs_reauth=combine(notifier.notify, on_needs_reauth),
        ) as svc:
            app[keys.STORE] = svc.store
            app[keys.TOKENS] = svc.tokens
            app[keys.ACCOUNTS] = svc.accounts
            app[keys.CLIENTS] = svc.clients
            app[keys.ADMIN_THROTTLE] = LoginThrottle(svc.store)
            app[keys.SESSION_REVOCATIONS] = SessionRevocations(svc.store)
            app[PROXY] = Proxy(settings, svc.tokens, svc.http, metrics, svc.clients, limiter, clock)
            # This process serves: its store is open (a worker whose pre-flight fails never
            # gets here, so the sum over the workers shows one that cannot start).
            metrics.workers_configured.set(settings.workers)
            metrics.workers_serving.set(1)
            tasks: list[asyncio.Task[None]] = []
            if background:
                tasks = [
                    asyncio.create_task(
                        svc.tokens.run(
                            refresh_interval=REFRESH_INTERVAL, sync_interval=SYNC_INTERVAL
                        )
                    ),
                    asyncio.create_task(svc.clients.run(SYNC_INTERVAL)),
                    asyncio.create_task(activity.run()),
                    asyncio.create_task(watch_store(svc.store, metrics)),
                ]
            try:
                yield
            finally:
                app[PROXY].close()
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    app.cleanup_ctx.append(services)

    async def proxy_handler(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle(request)

    async def proxy_expect(request: web.Request) -> web.StreamResponse | None:
        return await request.app[PROXY].expect_continue(request)

    for pattern in ("/api", "/api/{tail:.*}", "/n/{slug}/api", "/n/{slug}/api/{tail:.*}"):
        app.router.add_route("*", pattern, proxy_handler, expect_handler=proxy_expect)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    metrics_allowed = AllowList(settings.metrics_allowed_clients)
    hosts = own_hosts(settings.public_url, settings.allowed_hosts)

    async def metrics_handler(request: web.Request) -> web.StreamResponse:
        if not metrics_allowed.allows(request.remote):
            raise ClientNotAllowed("this client address is not in NBGW_METRICS_ALLOWED_CLIENTS")
        hosts.check(request.headers)  # a rebound page would read every slug
        # prometheus_client's encoder, in a worker thread: with a thousand nations the
        # text runs to megabytes and takes a second to make, which on the event loop
        # would hold up every proxied request meanwhile.
        encoder, content_type = choose_encoder(",".join(request.headers.getall("Accept", [])))
        registry: Collector = metrics.exposition
        names = request.query.getall("name[]", [])
        if names:
            registry = metrics.exposition.restricted_registry(names)
        body = await asyncio.to_thread(metrics.expose, encoder, registry)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    app.router.add_get("/metrics", metrics_handler)

    connect = web.Application(
        middlewares=[
            only_from(AllowList(settings.admin_allowed_clients), "NBGW_ADMIN_ALLOWED_CLIENTS")
        ]
    )
    admin_api.add_routes(connect)
    admin_routes.setup(connect, settings)
    app.add_subapp("/connect", connect)
    return app


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The database answers and can be written, the configured key opens what it holds, and
    no rotated token pair is held only in memory."""
    store = request.app[keys.STORE]
    try:
        await store.ping()
        await store.check_writable()
        problems = await store.verify()
    except NBGatewayError as exc:
        # The details (paths, key ids) go to the log, not to whoever can reach /readyz.
        log.error("not ready", extra={"error": str(exc)})
        return web.json_response(
            {"status": "unavailable", "detail": "the database or the key cannot be used"},
            status=503,
        )
    if problems:
        return web.json_response(
            {"status": "degraded", "detail": f"{len(problems)} row(s) unreadable"},
            status=503,
        )
    held = request.app[keys.TOKENS].unpersisted
    if held:
        log.error("not ready: token pairs held only in memory", extra={"accounts": ", ".join(held)})
        return web.json_response(
            {"status": "degraded", "detail": f"{len(held)} token pair(s) not yet stored"},
            status=503,
        )
    return web.json_response({"status": "ok"})
