"""watch_store: nbgw_store_up from a ping, down on an error or a check that hangs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from nbgateway.errors import StoreUnavailable
from nbgateway.health import WRITE_EVERY, watch_store
from nbgateway.metrics import Metrics
from nbgateway.store import TokenStore


class Database:
    """A store whose ping answers, fails or hangs, as the test says."""

    def __init__(self) -> None:
        self.mode = "up"
        self.pings = 0
        self.writes = 0

    async def check_writable(self) -> None:
        self.writes += 1
        if self.mode == "full":
            raise StoreUnavailable("database /data/gateway.db cannot be written: disk full")

    async def ping(self) -> None:
        self.pings += 1
        if self.mode == "down":
            raise StoreUnavailable("PostgreSQL is not reachable: connection refused")
        if self.mode == "hung":
            await asyncio.Event().wait()


async def until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_store_up_follows_pings_that_answer_fail_or_hang(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    database = Database()
    store = cast(TokenStore, database)
    caplog.set_level(logging.INFO, logger="nbgateway.store")
    task = asyncio.create_task(watch_store(store, metrics, interval=0.01, check_timeout=0.05))

    def up() -> float | None:
        return registry.get_sample_value("nbgw_store_up")

    try:
        await until(lambda: up() == 1)
        database.mode = "down"
        await until(lambda: up() == 0)
        database.mode = "up"
        await until(lambda: up() == 1)
        database.mode = "hung"  # a ping that never answers counts as down
        await until(lambda: up() == 0)
        database.mode = "up"
        await until(lambda: up() == 1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("the database does not answer") == 2
    assert messages.count("the database answers again") == 2
    errors = [getattr(r, "error", "") for r in caplog.records if "not answer" in r.getMessage()]
    assert errors == ["PostgreSQL is not reachable: connection refused", "no answer within 0.05 s"]


async def test_the_test_write_is_rare_but_a_failed_one_is_checked_each_time() -> None:
    """Every check reads; one in WRITE_EVERY also writes (on SQLite each commit makes every
    process reload its accounts and keys), so a full disk shows within a minute, and once
    a check failed every check writes until one passes."""
    registry = CollectorRegistry()
    database = Database()
    task = asyncio.create_task(
        watch_store(cast(TokenStore, database), Metrics(registry), interval=0.001)
    )
    try:
        await until(lambda: database.pings >= 3 * WRITE_EVERY)
        assert database.writes <= 4  # about one in WRITE_EVERY
        database.mode = "full"  # reads work, writes fail
        await until(lambda: registry.get_sample_value("nbgw_store_up") == 0)
        written = database.writes
        await until(lambda: database.writes >= written + 3)  # written at every check now
        database.mode = "up"
        await until(lambda: registry.get_sample_value("nbgw_store_up") == 1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
