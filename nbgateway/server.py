"""Running an aiohttp application on a port until SIGINT or SIGTERM (serve and demo), on
uvloop's event loop when it is installed (the `fast` extra), else asyncio's.

`serving` opens the listening socket with the app's `ConnectionGuard` (connections.py)
making each connection's handler, so its limits apply before any request is read.
`raise_open_files_limit` lifts the soft descriptor limit to the hard one before serving.
A `serve --workers` worker serves on the listening socket its parent bound for it (`bind`)
and passed down, and stops as well when its parent goes away (end of file on `parent_fd`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from nbgateway.connections import GUARD
from nbgateway.errors import NBGatewayError

log = logging.getLogger("nbgateway.server")
# Seconds open requests get to finish after a stop (aiohttp's shutdown_timeout).
REQUESTS_GRACE = 60.0

# Response header naming the worker process that answered (`serve --workers` only).
WORKER_HEADER = "X-NBGW-Worker"
# Pending connections the kernel queues for the listening socket (aiohttp's default).
BACKLOG = 128
# How each connection's aiohttp handler reads requests. Bodies reach the handlers exactly
# as sent: the proxy forwards a compressed body with its Content-Encoding (aiohttp would
# otherwise inflate it and the upstream request would be labelled gzip yet plain, under
# the compressed length), and the admin side refuses one (`admin.core.read_form`).
REQUEST_HANDLER_OPTIONS: dict[str, Any] = {"access_log": None, "auto_decompress": False}

T = TypeVar("T")

# Logged on SIGHUP, by one process and by a `--workers` parent.
HANGUP_STOPS = (
    "SIGHUP received: stopping (nbgateway does not reload its configuration; "
    "start it again to apply changes)"
)


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


@dataclass
class SocketGroup:
    """The `--workers` sockets on one address: one per worker, and the `anchor`."""

    sockets: list[socket.socket]
    # Bound and never listening, for the parent's life: the address stays the group's
    # while no worker's socket listens (at start, or every worker crash looping), so a
    # socket rejoining the group can never land in someone else's.
    anchor: socket.socket

    def close(self) -> None:
        for sock in (*self.sockets, self.anchor):
            sock.close()


def bind(host: str, port: int, count: int) -> SocketGroup:
    """`count` TCP sockets on host:port, one per worker, in one SO_REUSEPORT group, and
    the group's anchor.

    The kernel spreads new connections evenly over the group's listening sockets (by a
    hash of the addresses); one socket shared by all workers would let whichever worker
    wakes first take a burst of them. A plain bind comes first, so an address that
    anything (another gateway's group included) already listens on is refused here, as
    one process would be. The sockets are bound but not listening, as `rejoin`'s: each
    takes connections once its worker serves on it, so none wait (and are then reset) on
    the socket of a worker that is still starting or fails to. The anchor is bound
    first, straight after the plain bind: from then on the address is the group's
    (a program setting SO_REUSEADDR could take it from sockets that do not listen).
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        addresses = sorted({str(entry[4][0]) for entry in info})
        if len(addresses) > 1:
            # One process listens on all of them; one group of sockets has one address.
            raise ListenError(
                f"cannot listen on {host_port(host, port)} with --workers: {host!r} names "
                f"{len(addresses)} addresses ({', '.join(addresses)}); give one of them in "
                "NBGW_LISTEN"
            )
        family = info[0][0]
        with socket.create_server((host, port), family=family) as probe:
            port = probe.getsockname()[1]  # the port chosen when 0 was asked for
        # Without SO_REUSEADDR: a plain bind by another program is then refused even
        # while no socket of the group listens (a non-listening socket takes no
        # connections).
        anchor = _group_socket(family, (host, port), reuse_address=False)
        try:
            sockets = [rejoin(family, (host, port)) for _ in range(count)]
        except OSError:
            anchor.close()
            raise
        return SocketGroup(sockets, anchor)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {host_port(host, port)}: {exc.strerror or exc}"
        ) from None


def host_port(host: str, port: int) -> str:
    """host:port as NBGW_LISTEN writes it ([::1]:8080 for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rejoin(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    """A socket for the SO_REUSEPORT group on `address` (made by `bind`, which also makes
    the first ones with it), bound but not listening: it takes connections only once the
    worker given it serves on it (asyncio listens then), so a worker that fails to start
    holds none up."""
    return _group_socket(family, address, reuse_address=True)


def _group_socket(
    family: socket.AddressFamily, address: tuple[str, int], *, reuse_address: bool
) -> socket.socket:
    """A bound, not listening TCP socket with SO_REUSEPORT (and SO_REUSEADDR if asked)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as socket.create_server sets it
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _name_worker(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[WORKER_HEADER] = str(os.getpid())


def tune_garbage_collector() -> None:
    """Move start-up objects out of the collector's way and collect young objects less often.

    Every request allocates short-lived objects; with CPython's default thresholds the
    collector keeps rescanning the long-lived ones (modules, the app, the connection pool).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


@asynccontextmanager
async def serving(
    app: web.Application, host: str, port: int, *, sock: socket.socket | None = None
) -> AsyncIterator[int]:
    """Serve `app` on host:port (port 0: any free one), or on the listening `sock` a
    `--workers` parent passed down, while inside; yields the bound port."""
    # handler_cancellation: a client that disconnects cancels its handler, so a request
    # queued for the rate budget leaves the queue (the tests' TestServer does the same).
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=REQUESTS_GRACE,
    )
    await runner.setup()
    try:
        assert runner.server is not None
        factory = app[GUARD].protocol_factory(runner.server, **REQUEST_HANDLER_OPTIONS)
        loop = asyncio.get_running_loop()
        try:
            if sock is None:
                server = await loop.create_server(factory, host, port, backlog=BACKLOG)
            else:
                server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {host_port(host, port)}: {exc.strerror or exc}"
            ) from None
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
    sock: socket.socket | None = None,
    parent_fd: int | None = None,
) -> None:
    """Serve `app` on host:port until SIGINT, SIGTERM or SIGHUP.

    `after_start` runs once the port is open; returning False stops at once (the demo's
    self-test), True keeps serving until a signal. A worker passes the inherited listening
    `sock` (host and port are then only named in the log) and `parent_fd`, the read end of
    a pipe its parent holds open: when it becomes readable (end of file: the parent exited,
    even by SIGKILL) the worker stops as on SIGTERM. Workers name themselves in every
    response's X-NBGW-Worker header (their process id).
    """
    if sock is not None:
        app.on_response_prepare.append(_name_worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def hang_up() -> None:
        # A closed terminal or ssh session, or a "reload" out of habit: stop gracefully,
        # as on SIGTERM (a refresh in flight still stores its pair), and say so.
        if parent_fd is None:
            log.warning(HANGUP_STOPS)
        else:  # a --workers worker: its parent starts another, with the same settings
            log.warning("SIGHUP received by a worker: stopping; the parent starts a new one")
        stop.set()

    loop.add_signal_handler(signal.SIGHUP, hang_up)
    if parent_fd is not None:

        def parent_gone() -> None:
            loop.remove_reader(parent_fd)
            log.warning("parent process gone; worker stopping")
            stop.set()

        loop.add_reader(parent_fd, parent_gone)
    open_files = raise_open_files_limit()
    try:
        async with serving(app, host, port, sock=sock):
            where: dict[str, object] = {
                "listen": host_port(host, port),
                "event_loop": loop_name(asyncio.get_running_loop()),
            }
            if sock is not None:
                where["pid"] = os.getpid()
            log.info("nbgateway listening", extra=where)
            log.info("open files limit %s", open_files, extra={"limit": open_files})
            tune_garbage_collector()
            if after_start is None or await after_start():
                await stop.wait()
    finally:
        if parent_fd is not None:
            loop.remove_reader(parent_fd)
