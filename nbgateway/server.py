"""Running an aiohttp application on a port until SIGINT or SIGTERM (serve and demo)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from nbgateway.errors import NBGatewayError

log = logging.getLogger("nbgateway.server")


class ListenError(NBGatewayError):
    """The listen address cannot be bound (in use, or not allowed)."""


def tune_garbage_collector() -> None:
    """Move start-up objects out of the collector's way and collect young objects less often.

    Every request allocates short-lived objects; with CPython's default thresholds the
    collector keeps rescanning the long-lived ones (modules, the app, the connection pool).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def run_until_stopped(
    app: web.Application,
    host: str,
    port: int,
    *,
    after_start: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Serve `app` on host:port until SIGINT/SIGTERM.

    `after_start` runs once the port is open; returning False stops at once (the demo's
    self-test), True keeps serving until a signal.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        log.info("nbgateway listening", extra={"listen": f"{host}:{port}"})
        tune_garbage_collector()
        if after_start is None or await after_start():
            await stop.wait()
    finally:
        await runner.cleanup()
