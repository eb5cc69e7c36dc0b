"""PostgreSQL plumbing for the PostgreSQL store: which driver errors mean "unavailable",
the URL without its password, and the change listener.

`ChangeListener` keeps one LISTEN connection on the `nbgateway_changes` channel and counts
the notices. A liveness check each second that goes unanswered for LISTEN_SUSPECT s makes
it count as away meanwhile. When that connection is lost (the server restarted, a network
failure found by the liveness check) it reconnects with a bounded backoff and bumps the
counter once, since notices sent meanwhile are lost: whoever watches the counter reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("nbgateway.store")

CHANNEL = "nbgateway_changes"
# The change listener: reconnect delay (doubling up to the cap) and liveness check period.
LISTEN_RETRY_BASE = 0.2
LISTEN_RETRY_CAP = 5.0
LISTEN_KEEPALIVE = 1.0
# A liveness check unanswered this long makes the listener count as away (notices may be
# lost: a stalled server or a half-open connection) until it answers.
LISTEN_SUSPECT = 0.25
LISTENER_NAME = "nbgateway-listener"  # its application_name, as pg_stat_activity shows it

# Errors meaning "PostgreSQL cannot be reached or written right now" (StoreUnavailable).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, timed out (TimeoutError is an OSError)
    asyncpg.exceptions.InterfaceError,  # the connection is closed, the pool is closing
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, too many connections
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby or a read-only database
    # A pooled connection left mid-protocol by a server shutting down ("cannot switch to
    # state ...; another operation is in progress"): the next call gets another connection.
    asyncpg.exceptions.InternalClientError,
)


# TLS errors of a connection cut during the handshake (a server going down): they pass.
_PASSING_SSL_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def lasting(exc: BaseException) -> bool:
    """Whether an UNAVAILABLE_ERRORS error is one that waiting will not cure: the TLS the
    URL asks for (sslmode=require, verify-full) refused by a server without it, a
    certificate that does not verify, or a certificate file that is not one."""
    if isinstance(exc, ssl.SSLError):
        return not isinstance(exc, _PASSING_SSL_ERRORS)
    return isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc)


# Everything the driver raises for a failed operation.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    *UNAVAILABLE_ERRORS,
    asyncpg.exceptions.PostgresError,
)


def split_password(url: str) -> tuple[str, str | None]:
    """The URL without its password (for messages), and the password if it has one."""
    parts = urlsplit(url)
    password: str | None = None
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        user, sep, secret = userinfo.partition(":")
        if sep:
            password = unquote(secret)
        netloc = f"{user}@{hosts}" if user else hosts
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k.lower() != "password"]
    password = password or next((v for k, v in query if k.lower() == "password"), None)
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(kept))), password


class ChangeListener:
    """Counts `NOTIFY nbgateway_changes` notices on a connection of its own (see above)."""

    def __init__(self, url: str, connect_timeout: float, command_timeout: float) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._task: asyncio.Task[None] | None = None
        self._suspect = False  # a liveness check is overdue
        self.counter = 0

    async def start(self) -> None:
        """Connect and listen (driver errors propagate), then keep listening in a task."""
        self._conn = await self._connect()
        self._task = asyncio.create_task(self._run(), name="nbgateway-pg-listener")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    @property
    def connected(self) -> bool:
        """Whether notices can arrive now (the connection is up and answers)."""
        conn = self._conn
        return conn is not None and not conn.is_closed() and not self._suspect

    def _on_notice(self, *_args: object) -> None:
        self.counter += 1

    async def _connect(self) -> asyncpg.Connection[asyncpg.Record]:
        conn = await asyncpg.connect(
            self._url,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            server_settings={"application_name": LISTENER_NAME},
        )
        try:
            await conn.add_listener(CHANNEL, self._on_notice)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _wait_until_lost(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not lost.is_set() and not conn.is_closed():
            try:
                await asyncio.wait_for(lost.wait(), LISTEN_KEEPALIVE)
            except TimeoutError:
                # A silent network failure or a stalled server shows only when we ask.
                ping = asyncio.ensure_future(conn.execute("SELECT 1", timeout=LISTEN_KEEPALIVE))
                try:
                    done, _ = await asyncio.wait({ping}, timeout=LISTEN_SUSPECT)
                    self._suspect = not done
                    await ping
                except DRIVER_ERRORS:
                    return
                finally:
                    self._suspect = False
                    ping.cancel()

    async def _run(self) -> None:
        delay = LISTEN_RETRY_BASE
        while True:
            conn = self._conn
            if conn is not None:
                await self._wait_until_lost(conn)
                self._conn = None
                conn.terminate()
                log.warning("lost the PostgreSQL change listener; reconnecting")
            await asyncio.sleep(delay)
            try:
                self._conn = await self._connect()
            except DRIVER_ERRORS:
                delay = min(delay * 2, LISTEN_RETRY_CAP)
                continue
            delay = LISTEN_RETRY_BASE
            # Notices sent while we were away are lost: make the watchers reload.
            self.counter += 1
            log.info("PostgreSQL change listener reconnected")
