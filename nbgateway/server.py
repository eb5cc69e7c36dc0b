"""Running an aiohttp application on a port until SIGINT or SIGTERM (serve and demo), on
uvloop's event loop when it is installed (the `fast` extra), else asyncio's.

`serving` opens the listening socket with the app's `ConnectionGuard` (connections.py)
making each connection's handler, so its limits apply before any request is read.
`raise_open_files_limit` lifts the soft descriptor limit to the hard one before serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiohttp import web

from nbgateway.connections import GUARD
from nbgateway.errors import NBGatewayError

log = logging.getLogger("nbgateway.server")

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when uvloop can be imported, else asyncio's default one.

    uvloop (libuv underneath) runs the same aiohttp code with less work per socket event;
    `pip install 'nbgateway[fast]'` adds it. Nothing else changes with the loop.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio": the package that implements `loop`."""
    return type(loop).__module__.split(".", 1)[0]


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


class ListenError(NBGatewayError):
    """The listen address cannot be bound (in use, or not allowed)."""


# The soft open-files limit is raised to the hard limit, but not beyond this.
OPEN_FILES_TARGET = 65536


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit; return the soft limit in force.

    Each client connection holds a descriptor, and the common soft default of 1,024 runs
    out under load; only the hard limit needs the administrator (LimitNOFILE, --ulimit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_TARGET if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep what we have; the log line below says what it is
    return soft


def tune_garbage_collector() -> None:
    """Move start-up objects out of the collector's way and collect young objects less often.

    Every request allocates short-lived objects; with CPython's default thresholds the
    collector keeps rescanning the long-lived ones (modules, the app, the connection pool).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


@asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve `app` on host:port (port 0: any free one) while inside; yields the bound port."""
    # handler_cancellation: a client that disconnects cancels its handler, so a request
    # queued for the rate budget leaves the queue (the tests' TestServer does the same).
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    try:
        assert runner.server is not None
        factory = app[GUARD].protocol_factory(runner.server, access_log=None)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(factory, host, port, backlog=128)
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
    finally:
        await runner.cleanup()


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    open_files = raise_open_files_limit()
    async with serving(app, host, port):
        log.info(
            "nbgateway listening",
            extra={"listen": f"{host}:{port}", "event_loop": loop_name(asyncio.get_running_loop())},
        )
        log.info("open files limit %s", open_files, extra={"limit": open_files})
        tune_garbage_collector()
        if after_start is None or await after_start():
            await stop.wait()
