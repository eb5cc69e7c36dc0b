"""Watches the database for /metrics: `nbgw_store_up`, from a ping and a test write (the
stores' `check_writable`: what storing a rotated pair needs) every few seconds.

The hot path never touches the database (cached tokens keep requests served through an
outage), and PostgreSQL's change counter comes from its listener, so nothing else would
show an outage until a refresh or an admin page needs the store. A check that does not
answer within its timeout counts as down (a hung server, a black-holed connection, a
SQLite writer lock held that long).
"""

from __future__ import annotations

import asyncio
import logging

from nbgateway.errors import StoreError
from nbgateway.metrics import Metrics
from nbgateway.store import TokenStore

log = logging.getLogger("nbgateway.store")

INTERVAL = 5.0  # seconds between two checks
TIMEOUT = 5.0  # seconds a check may take


async def watch_store(
    store: TokenStore,
    metrics: Metrics,
    *,
    interval: float | None = None,
    ping_timeout: float = TIMEOUT,
) -> None:
    """Set nbgw_store_up to 1 or 0 after each check (every `interval` seconds, INTERVAL by
    default), and log each change, until cancelled."""
    pause = INTERVAL if interval is None else interval
    up: bool | None = None
    while True:
        try:
            async with asyncio.timeout(ping_timeout):
                await store.ping()
                await store.check_writable()
            now_up, error = True, ""
        except (StoreError, TimeoutError) as exc:
            now_up, error = False, str(exc) or f"no answer within {ping_timeout:g} s"
        metrics.store_up.set(1 if now_up else 0)
        if up is not None and now_up != up:
            if now_up:
                log.info("the database answers again")
            else:
                log.warning("the database does not answer", extra={"error": error})
        up = now_up
        await asyncio.sleep(pause)
