"""Watches the database for /metrics: `nbgw_store_up`, from a read every few seconds and
a test write (the stores' `check_writable`: what storing a rotated pair needs) every
minute.

The hot path never touches the database (cached tokens keep requests served through an
outage), and PostgreSQL's change counter comes from its listener, so nothing else would
show an outage until a refresh or an admin page needs the store. The write is rarer than
the read because on SQLite every commit makes every process (this one included) reload
its accounts and client keys. A check that does not answer within its timeout (longer
than the stores' own statement and lock timeouts) counts as down: a hung server, a
black-holed connection.
"""

from __future__ import annotations

import asyncio
import logging

from nbgateway.errors import StoreError
from nbgateway.metrics import Metrics
from nbgateway.store import TokenStore

log = logging.getLogger("nbgateway.store")

INTERVAL = 5.0  # seconds between two checks
WRITE_EVERY = 12  # checks; the first check writes too
TIMEOUT = 20.0  # seconds a check may take (PostgreSQL's statements: 15 s; SQLite's lock: 10 s)


async def watch_store(
    store: TokenStore,
    metrics: Metrics,
    *,
    interval: float | None = None,
    check_timeout: float = TIMEOUT,
) -> None:
    """Set nbgw_store_up to 1 or 0 after each check (every `interval` seconds, INTERVAL by
    default; a test write every WRITE_EVERY checks), and log each change, until
    cancelled."""
    pause = INTERVAL if interval is None else interval
    up: bool | None = None
    checks = 0
    while True:
        try:
            async with asyncio.timeout(check_timeout):
                await store.ping()
                if checks % WRITE_EVERY == 0 or not up:
                    await store.check_writable()  # also until a failed check passes again
            now_up, error = True, ""
        except (StoreError, TimeoutError) as exc:
            now_up, error = False, str(exc) or f"no answer within {check_timeout:g} s"
        checks += 1
        metrics.store_up.set(1 if now_up else 0)
        if up is not None and now_up != up:
            if now_up:
                log.info("the database answers again")
            else:
                log.warning("the database does not answer", extra={"error": error})
        up = now_up
        await asyncio.sleep(pause)
