"""The rate budget through real sockets: gateway(s) plus the fake NationBuilder's limit.

Tests that need windows to pass use the real clock (shared by the fake and the gateway)
with one-second windows and small budgets; they assert on the fake's counters and on
which window each request landed in, never on durations. Tests that need no window to
pass keep the fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from conftest import ConnectAccount, Gateway, GatewayFactory

from nbgateway import keys
from nbgateway.clock import SystemClock
from nbgateway.fakenb import FakeNationBuilder

# Two gateways on one nation: upstream 429s allowed per window used (see
# docs/architecture.md, "Rate budget").
TWO_GATEWAY_TOLERANCE = 3


async def tool(gw: Gateway, requests: int, path: str = "/api/v2/signups/me") -> list[int]:
    """One tool: `requests` requests one after the other; their statuses."""
    statuses = []
    for _ in range(requests):
        resp = await gw.client.get(path)
        await resp.read()
        statuses.append(resp.status)
    return statuses


async def tool_with_key(
    gw: Gateway, key: str, requests: int, path: str = "/api/v2/signups/me"
) -> list[int]:
    """A tool presenting its client key: `requests` requests one after the other."""
    statuses = []
    for _ in range(requests):
        resp = await gw.client.get(path, headers={"X-NBGW-Key": key})
        await resp.read()
        statuses.append(resp.status)
    return statuses


def windows(fake: FakeNationBuilder) -> Counter[int]:
    """Requests the fake received, by the number of the window they landed in."""
    return Counter(math.floor(r.at / fake.rate_window) for r in fake.api_requests)


async def spend_budget(fake: FakeNationBuilder, token: str) -> None:
    """Use the token's whole window directly (another user of the same token), so that at
    least half a second of the window is left."""
    url = f"{fake.nation_url('acme')}/api/v2/signups/me"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        while True:
            last: dict[str, str] = {}
            for _ in range(fake.rate_limit):
                async with session.get(url, headers=headers) as resp:
                    last = dict(resp.headers)
            left = float(last.get("RateLimit-Reset", "0")) - time.time()
            if last.get("RateLimit-Remaining") == "0" and left >= 0.5:
                return
            await asyncio.sleep(max(0.0, left) + 0.01)


async def until(condition: Any, what: str) -> None:
    """Wait (bounded) for a condition the test cannot await directly."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class TestWithRealWindows:
    @pytest.fixture
    def clock(self) -> SystemClock:
        """The real clock for both sides: the fake's one-second windows really pass."""
        return SystemClock()

    async def test_five_tools_burst_within_the_budget(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Five tools, 20 requests, a budget of 5 per second: all 200, no 429 upstream, no
        window over its budget, and the burst spread over the windows it needs (+1)."""
        fake_nb.rate_limit, fake_nb.rate_window = 5, 1
        gw = await gateway_factory()
        await connect_account(gw, "acme")
        results = await asyncio.gather(*(tool(gw, 4) for _ in range(5)))
        assert [s for statuses in results for s in statuses] == [200] * 20
        assert fake_nb.rate_limited_count <= 1
        per_window = windows(fake_nb)
        assert max(per_window.values()) <= 5 + fake_nb.rate_limited_count
        span = max(per_window) - min(per_window) + 1
        assert span <= math.ceil(20 / 5) + 1
        assert gw.metric("nbgw_rate_limit_wait_seconds_count", account="acme") == 20
        assert gw.metric("nbgw_rate_limit_wait_seconds_sum", account="acme") > 0

    async def test_a_greedy_tool_does_not_starve_another_key(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Client keys are the fairness unit: with 15 requests of one key queued, another
        key's single request goes in the next window (round-robin), not after all of them.
        Both tools share one peer address, so only the keys tell them apart."""
        fake_nb.rate_limit, fake_nb.rate_window = 5, 1
        gw = await gateway_factory(client_auth="required")
        await connect_account(gw, "acme")
        registry = gw.app[keys.CLIENTS]
        greedy = (await registry.add("greedy"))[1].reveal()
        polite = (await registry.add("polite"))[1].reveal()
        await tool_with_key(gw, greedy, 1)  # the first answer teaches the budget
        fake_nb.clear_recordings()
        flood = [asyncio.create_task(tool_with_key(gw, greedy, 1)) for _ in range(15)]
        await until(lambda: len(fake_nb.api_requests) >= 1, "the flood to start")
        assert await tool_with_key(gw, polite, 1, "/api/v2/signups/me?tool=polite") == [200]
        assert [s for t in await asyncio.gather(*flood) for s in t] == [200] * 15
        first = min(math.floor(r.at) for r in fake_nb.api_requests)
        [mine] = [r for r in fake_nb.api_requests if "tool=polite" in r.query_string]
        assert math.floor(mine.at) - first <= 1, "the polite tool waited behind the flood"

    async def test_upstream_429_is_replayed_once_after_the_hold(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Someone else spent the window: the gateway's request meets a 429, waits for its
        Retry-After, is sent once more in the next window and the tool gets 200."""
        fake_nb.rate_limit, fake_nb.rate_window = 2, 2
        gw = await gateway_factory()
        issued = await connect_account(gw, "acme")
        await spend_budget(fake_nb, issued["access_token"])
        fake_nb.clear_recordings()
        resp = await gw.client.get("/api/v2/signups/me")
        assert resp.status == 200
        first, replay = fake_nb.api_requests
        assert fake_nb.rate_limited_count == 1
        assert math.floor(replay.at / 2) > math.floor(first.at / 2)  # after the reset
        assert gw.metric("nbgw_upstream_429_total", account="acme") == 1

    async def test_429_for_a_streamed_body_goes_to_the_client(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A body too large to keep cannot be replayed: NationBuilder's 429 reaches the tool."""
        fake_nb.rate_limit, fake_nb.rate_window = 2, 2
        gw = await gateway_factory(retry_buffer=8)
        issued = await connect_account(gw, "acme")
        await spend_budget(fake_nb, issued["access_token"])
        fake_nb.clear_recordings()
        resp = await gw.client.post("/api/_test/echo", data=b"x" * 100)
        assert resp.status == 429
        assert "X-NBGW-Error" not in resp.headers
        assert len(fake_nb.api_requests) == 1

    @pytest.mark.parametrize(
        ("sent", "expected"), [(None, "1"), ("-5", "1"), ("soon", "1"), ("1.0", "1.0")]
    )
    async def test_a_429_passed_on_tells_the_tool_how_long_to_wait(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        sent: str | None,
        expected: str,
    ) -> None:
        """When the replay is refused too, the tool gets NationBuilder's 429; a missing,
        negative or unreadable Retry-After is replaced by the gateway's own hold (at least
        a second), a usable one is kept."""
        gw = await gateway_factory()
        await connect_account(gw, "acme")
        headers = [("Content-Type", "application/json")]
        if sent is not None:
            headers.append(("Retry-After", sent))
        fake_nb.set_canned(status=429, headers=headers, body=b'{"message": "slow down"}')
        resp = await gw.client.get("/api/_test/canned")
        assert resp.status == 429
        assert "X-NBGW-Error" not in resp.headers
        assert resp.headers.getall("Retry-After") == [expected]
        assert len(fake_nb.api_requests) == 2  # the request and its one replay

    async def test_two_gateways_share_one_budget(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Two gateways on one database and one nation, five tools each: every request 200,
        and at most TWO_GATEWAY_TOLERANCE requests per window beyond the budget."""
        fake_nb.rate_limit, fake_nb.rate_window = 10, 1
        first = await gateway_factory()
        await connect_account(first, "acme")
        second = await gateway_factory()
        await second.tokens.sync(force=True)
        results = await asyncio.gather(*(tool(gw, 4) for gw in (first, second) for _ in range(5)))
        per_window = windows(fake_nb)
        assert [s for statuses in results for s in statuses] == [200] * 40
        assert max(per_window.values()) <= 10 + TWO_GATEWAY_TOLERANCE
        assert fake_nb.rate_limited_count <= TWO_GATEWAY_TOLERANCE * len(per_window)
        assert (
            sum(gw.metric("nbgw_upstream_429_total", account="acme") for gw in (first, second))
            == fake_nb.rate_limited_count
        )


class TestWithoutWindows:
    async def test_queue_timeout_answers_429_before_sending(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Budget spent, reset 10 s away, timeout 5 s: the gateway's own 429 with
        Retry-After, and nothing more reaches NationBuilder."""
        fake_nb.rate_limit, fake_nb.rate_window = 2, 10
        gw = await gateway_factory(rate_queue_timeout=5)
        await connect_account(gw, "acme")
        assert await tool(gw, 2) == [200, 200]
        resp = await gw.client.get("/api/v2/signups/me")
        assert resp.status == 429
        assert resp.headers["X-NBGW-Error"] == "rate_limited"
        assert resp.headers["Retry-After"] == "10"
        body = await resp.json()
        assert body["errors"][0]["code"] == "rate_limited"
        assert len(fake_nb.api_requests) == 2
        assert fake_nb.rate_limited_count == 0
        assert gw.metric("nbgw_proxy_requests_total", account="acme", method="GET", code="429") == 1

    async def test_unanswered_requests_in_flight_time_the_queue_out_as_504(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """NationBuilder stops answering with requests in flight: one queued behind them
        (the in-flight cap, half the announced Remaining) gets 504 upstream_timeout at
        NBGW_RATE_QUEUE_TIMEOUT, not a 429 blaming a budget that is not spent; it is not
        sent, and the metrics count it as a 504."""
        fake_nb.rate_limit, fake_nb.rate_window = 4, 10
        gw = await gateway_factory(rate_queue_timeout=1)
        await connect_account(gw, "acme")
        assert await tool(gw, 1) == [200]  # announced Remaining 3: two in flight at most
        fake_nb.api_hang = True
        limiter = gw.app[keys.RATE_LIMITER]
        hung = [asyncio.create_task(gw.client.get("/api/v2/signups/me")) for _ in range(2)]
        try:
            await until(lambda: limiter.snapshot()["acme"].in_flight == 2, "two in flight")
            resp = await gw.client.get("/api/v2/signups/me")
            assert resp.status == 504
            assert resp.headers["X-NBGW-Error"] == "upstream_timeout"
            assert "Retry-After" not in resp.headers
            [error] = (await resp.json())["errors"]
            assert "answered none of the 2 request(s) in flight" in error["detail"]
            assert "NBGW_RATE_QUEUE_TIMEOUT (1 s)" in error["detail"]
            view = limiter.snapshot()["acme"]
            assert (view.in_flight, view.queued, view.remaining) == (2, 0, 3)
            metric = gw.metric(
                "nbgw_proxy_requests_total", account="acme", method="GET", code="504"
            )
            assert metric == 1
        finally:
            for task in hung:
                task.cancel()
            await asyncio.gather(*hung, return_exceptions=True)

    async def test_client_leaving_the_queue_frees_its_place(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A tool that disconnects while queued leaves the queue; nothing is sent for it."""
        fake_nb.rate_limit, fake_nb.rate_window = 1, 10
        gw = await gateway_factory()
        await connect_account(gw, "acme")
        assert await tool(gw, 1) == [200]
        limiter = gw.app[keys.RATE_LIMITER]
        queued = asyncio.create_task(gw.client.get("/api/v2/signups/me"))
        await until(lambda: limiter.snapshot()["acme"].queued == 1, "the request to queue")
        queued.cancel()
        await until(lambda: limiter.snapshot()["acme"].queued == 0, "the queue to empty")
        assert limiter.snapshot()["acme"].in_flight == 0
        assert len(fake_nb.api_requests) == 1

    async def test_pacing_off_passes_the_spent_budget_through(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """NBGW_RATE_QUEUE_TIMEOUT=0: no waiting, NationBuilder's 429 as it is, counted."""
        fake_nb.rate_limit, fake_nb.rate_window = 1, 10
        gw = await gateway_factory(rate_queue_timeout=0)
        await connect_account(gw, "acme")
        assert await tool(gw, 3) == [200, 429, 429]
        assert len(fake_nb.api_requests) == 3
        assert gw.metric("nbgw_upstream_429_total", account="acme") == 2
        assert gw.metric("nbgw_rate_limit_remaining", account="acme") == 0


class TestAbsurdFigures:
    """Whatever rate figures an answer carries, the answer reaches the tool."""

    @pytest.mark.parametrize("queue_timeout", [1.0, 0.0], ids=["pacing", "pacing-off"])
    async def test_a_429_with_an_overflowing_retry_after_date_is_passed_on(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        caplog: pytest.LogCaptureFixture,
        queue_timeout: float,
    ) -> None:
        """A Retry-After date whose offset overflows is no wait at all, not a 500."""
        caplog.set_level(logging.INFO)
        gw = await gateway_factory(rate_queue_timeout=queue_timeout)
        await connect_account(gw, "acme")
        fake_nb.set_canned(
            status=429,
            headers=[
                ("Content-Type", "application/json"),
                ("Retry-After", "Mon, 01 Jan 2024 00:00:00 +99999999999999999999"),
            ],
            body=b'{"message":"You have made too many requests."}',
        )
        resp = await gw.client.get("/api/_test/canned")
        assert resp.status == 429
        assert not [r for r in caplog.records if r.exc_info]

    @pytest.mark.parametrize("header", ["RateLimit-Remaining", "RateLimit-Limit"])
    async def test_an_executed_post_with_an_absurd_rate_figure_is_answered_as_sent(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        caplog: pytest.LogCaptureFixture,
        header: str,
    ) -> None:
        """NationBuilder carried out the POST (201); a 400-digit rate figure is no figure,
        and the tool hears the 201 (a 500 would make it think the write failed, and
        repeat it)."""
        caplog.set_level(logging.INFO)
        gw = await gateway_factory()
        await connect_account(gw, "acme")
        fake_nb.set_canned(
            status=201,
            headers=[("Content-Type", "application/json"), (header, "9" * 400)],
            body=b'{"data":{"id":"77","type":"signups"}}',
        )
        resp = await gw.client.post("/api/_test/canned", data=b'{"data":{}}')
        assert resp.status == 201
        assert [r.method for r in fake_nb.api_requests] == ["POST"]
        assert not [r for r in caplog.records if r.exc_info]
