"""RateLimiter units: header parsing, pacing, queue timeout, cancellation, fairness, 429 hold.

Time is a `FakeClock`; the limiter's timers run on `Timers`, which fires them when the test
moves the clock, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import email.utils
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from prometheus_client import CollectorRegistry

from nbgateway.clock import FakeClock
from nbgateway.errors import RateLimited, UpstreamTimeout
from nbgateway.metrics import Metrics
from nbgateway.ratelimit import (
    MAX_HOLD,
    Announced,
    RateLimiter,
    Slot,
    parse_announced,
    parse_retry_after,
)

NOW = 1_700_000_000.0  # FakeClock's start, a multiple of 10


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """`call_later` on a FakeClock: callbacks run when `advance` moves the clock past them."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[[], None], _Handle]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        at = self.clock.monotonic() + delay
        heapq.heappush(self._heap, (at, next(self._seq), callback, handle))
        return handle

    def fire(self, seconds: float) -> None:
        """Move the clock and run due timers, without letting woken tasks run yet."""
        target = self.clock.monotonic() + seconds
        while self._heap and self._heap[0][0] <= target:
            at, _, callback, handle = heapq.heappop(self._heap)
            self.clock.advance(max(0.0, at - self.clock.monotonic()))
            if not handle.cancelled:
                callback()
        self.clock.advance(target - self.clock.monotonic())

    async def advance(self, seconds: float) -> None:
        """Move the clock, firing due timers at their time, and let woken tasks run."""
        await settle()  # tasks created just before get to arm their timers first
        target = self.clock.monotonic() + seconds
        while self._heap and self._heap[0][0] <= target:
            at, _, callback, handle = heapq.heappop(self._heap)
            self.clock.advance(max(0.0, at - self.clock.monotonic()))
            if not handle.cancelled:
                callback()
            await settle()
        self.clock.advance(target - self.clock.monotonic())
        await settle()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def timers(clock: FakeClock) -> Timers:
    return Timers(clock)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


LimiterFactory = Callable[..., RateLimiter]


@pytest.fixture
def make_limiter(clock: FakeClock, timers: Timers, registry: CollectorRegistry) -> LimiterFactory:
    def make(
        queue_timeout: float = 30.0, default_limit: tuple[int, float] | None = None
    ) -> RateLimiter:
        return RateLimiter(
            clock,
            Metrics(registry),
            queue_timeout=queue_timeout,
            default_limit=default_limit,
            call_later=timers.call_later,
        )

    return make


def announce(remaining: int, limit: int = 5, reset: float = NOW + 10) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(int(reset)),
    }


async def learn(
    limiter: RateLimiter, remaining: int, limit: int = 5, reset: float = NOW + 10
) -> None:
    """One request answered with the given announcement (the limiter has then seen one)."""
    slot = await limiter.acquire("acme", "tool")
    slot.report(200, announce(remaining, limit, reset))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---------------------------------------------------------------------- parsing


class TestParsing:
    @pytest.mark.parametrize("prefix", ["RateLimit-", "X-RateLimit-", "ratelimit-"])
    def test_both_spellings_in_any_case(self, prefix: str) -> None:
        """RateLimit-* and the older X-RateLimit-* are read, header names case-insensitive."""
        from multidict import CIMultiDict

        headers = CIMultiDict(
            {
                f"{prefix}Limit": "250",
                f"{prefix}Remaining": "17",
                f"{prefix}Reset": str(int(NOW + 7)),
            }
        )
        assert parse_announced(headers, NOW) == Announced(250, 17, NOW + 7)

    def test_absent_headers_give_nothing(self) -> None:
        """An answer without RateLimit headers announces nothing."""
        assert parse_announced({}, NOW) == Announced(None, None, None)

    @pytest.mark.parametrize(
        "value", ["many", "", "1.5", "-3", "10s", "+3", "1_000", "\u0663", "9" * 400]
    )
    def test_non_numeric_counts_are_ignored(self, value: str) -> None:
        """A Limit or Remaining that is not a whole number >= 0 in ASCII digits, of a size a
        budget can have, counts as absent."""
        seen = parse_announced({"RateLimit-Limit": value, "RateLimit-Remaining": value}, NOW)
        assert (seen.limit, seen.remaining) == (None, None)

    def test_small_reset_is_delta_seconds(self) -> None:
        """A reset of a few seconds means "from now"."""
        assert parse_announced({"RateLimit-Reset": "8"}, NOW).reset_at == NOW + 8

    def test_large_reset_is_epoch_seconds(self) -> None:
        """A reset in epoch seconds is taken as it is, also a fractional one."""
        assert parse_announced({"RateLimit-Reset": f"{NOW + 3.5}"}, NOW).reset_at == NOW + 3.5

    @pytest.mark.parametrize("skew", [8.0, -8.0, 3.0, -30.0])
    def test_an_epoch_reset_is_moved_by_nationbuilders_clock(self, skew: float) -> None:
        """RateLimit-Reset in epoch seconds is on NationBuilder's clock: when the answer's
        Date is more than CLOCK_SKEW_TOLERANCE off this host's, the reset moves with it (a
        gateway clock ahead took every reset for past; one behind waited past each)."""
        date = email.utils.formatdate(NOW + skew, usegmt=True)  # whole seconds
        headers = {"RateLimit-Reset": f"{NOW + skew + 4}", "Date": date}
        reset_at = parse_announced(headers, NOW).reset_at
        assert reset_at is not None
        assert NOW + 4 <= reset_at < NOW + 5  # late by Date's fraction at most, never early

    @pytest.mark.parametrize("date", [None, "garbage", "Sat, 01 Jan 2000 00:00:00"])
    def test_a_close_missing_or_unusable_date_leaves_the_reset(self, date: str | None) -> None:
        headers = {"RateLimit-Reset": f"{NOW + 4}"}
        if date is not None:
            headers["Date"] = date  # no zone: unusable
        assert parse_announced(headers, NOW).reset_at == NOW + 4
        close = {**headers, "Date": email.utils.formatdate(NOW + 1, usegmt=True)}
        assert parse_announced(close, NOW).reset_at == NOW + 4  # within the tolerance

    @pytest.mark.parametrize("value", ["86400", "99999999999", f"{NOW + 3600}"])
    def test_a_far_reset_is_believed_for_a_minute_at_most(self, value: str) -> None:
        """A day, the year 5138 or an hour: held no longer than MAX_HOLD."""
        assert parse_announced({"RateLimit-Reset": value}, NOW).reset_at == NOW + MAX_HOLD

    @pytest.mark.parametrize("value", ["soon", "nan", "inf", "-1", "5000000"])
    def test_unusable_reset_is_ignored(self, value: str) -> None:
        """Neither a delta (<= 1 day) nor an epoch: no reset."""
        assert parse_announced({"RateLimit-Reset": value}, NOW).reset_at is None

    def test_limit_of_zero_is_no_limit(self) -> None:
        """RateLimit-Limit: 0 cannot be paced to and is ignored."""
        assert parse_announced({"RateLimit-Limit": "0"}, NOW).limit is None

    def test_retry_after_seconds_and_http_date(self) -> None:
        """Retry-After in seconds or as an HTTP date gives seconds from now."""
        assert parse_retry_after("7", NOW) == 7
        date = format_datetime(datetime.fromtimestamp(NOW + 12, UTC), usegmt=True)
        assert parse_retry_after(date, NOW) == 12
        past = format_datetime(datetime.fromtimestamp(NOW - 100, UTC), usegmt=True)
        assert parse_retry_after(past, NOW) == 0

    @pytest.mark.parametrize(
        "value",
        [
            None,
            "later",
            "Tue, 99 Foo 2026",
            "nan",
            "Mon, 01 Jan 2024 00:00:00 +99999999999999999999",  # an offset that overflows
            "Fri, 31 Dec 99999999999999999999 00:00:00 GMT",  # so does the year
            "1_000",
            "\u0663",  # another script's digit
        ],
    )
    def test_unusable_retry_after(self, value: str | None) -> None:
        """A missing or malformed Retry-After gives None (the caller picks a bounded hold)."""
        assert parse_retry_after(value, NOW) is None


# ---------------------------------------------------------------------- pacing


class TestPacing:
    async def test_first_request_goes_alone_then_unpaced_without_headers(
        self, make_limiter: LimiterFactory
    ) -> None:
        """Before any answer only one request is out; an answer without headers lifts that."""
        limiter = make_limiter()
        first = await limiter.acquire("acme", "tool")
        second = asyncio.create_task(limiter.acquire("acme", "tool"))
        await settle()
        assert not second.done()
        first.report(200, {})
        await settle()
        assert second.done()
        slots = [await limiter.acquire("acme", "tool") for _ in range(50)]
        assert len(slots) == 50  # no headers: never paced

    async def test_try_acquire_grants_only_what_acquire_would_grant_at_once(
        self, make_limiter: LimiterFactory, registry: CollectorRegistry
    ) -> None:
        """`try_acquire` is `acquire` without the wait: a slot (and a zero wait counted) when
        one is free with nobody queued, None when the request would have to queue."""
        limiter = make_limiter()
        first = limiter.try_acquire("acme")
        assert first is not None
        assert limiter.try_acquire("acme") is None  # the first request goes alone
        queued = asyncio.create_task(limiter.acquire("acme", "tool"))
        await settle()
        first.report(200, announce(1, limit=5))
        await settle()
        assert queued.done()
        assert limiter.try_acquire("acme") is None  # half the announced 1 is in flight
        queued.result().report(200, announce(4, limit=5, reset=NOW + 20))  # a new window
        assert limiter.try_acquire("acme") is not None
        # Three slots, each counted once as a wait (none waited on the fake clock).
        assert sample(registry, "nbgw_rate_limit_wait_seconds_count", account="acme") == 3
        assert sample(registry, "nbgw_rate_limit_wait_seconds_sum", account="acme") == 0.0

    async def test_spent_budget_waits_for_the_reset_in_order(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """With Remaining 0, requests wait until the reset and then go first come, first served."""
        limiter = make_limiter()
        await learn(limiter, remaining=0, limit=12, reset=NOW + 10)
        order: list[int] = []

        async def one(i: int) -> Slot:
            slot = await limiter.acquire("acme", "tool")
            order.append(i)
            return slot

        tasks = [asyncio.create_task(one(i)) for i in range(3)]
        await timers.advance(9.9)
        assert order == []
        assert limiter.snapshot()["acme"].queued == 3
        await timers.advance(0.2)
        assert order == [0, 1, 2]
        for task in tasks:
            task.result().report(200, announce(2, reset=NOW + 20))

    async def test_budget_follows_remaining_and_in_flight(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """Remaining 2 lets exactly 2 more go in this window; the third waits for the reset."""
        limiter = make_limiter()
        await learn(limiter, remaining=2, limit=4, reset=NOW + 10)
        (await limiter.acquire("acme", "tool")).report(200, announce(1, limit=4))
        (await limiter.acquire("acme", "tool")).report(200, announce(0, limit=4))
        c = asyncio.create_task(limiter.acquire("acme", "tool"))
        await settle()
        assert not c.done()
        await timers.advance(10.1)
        assert c.done()

    async def test_in_flight_is_capped_at_half_the_announced_remaining(
        self, make_limiter: LimiterFactory
    ) -> None:
        """With Remaining 6 announced, 3 go at once; the 4th waits for an answer."""
        limiter = make_limiter()
        await learn(limiter, remaining=6, limit=10)
        slots = [await limiter.acquire("acme", "tool") for _ in range(3)]
        fourth = asyncio.create_task(limiter.acquire("acme", "tool"))
        await settle()
        assert not fourth.done()
        slots[0].report(200, announce(5, limit=10))
        await settle()
        assert fourth.done()

    async def test_an_absurd_reset_with_nothing_left_holds_a_minute_then_asks(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """Remaining 0 with a reset in the year 5138 (a garbled header) does not lock the
        nation out: after MAX_HOLD one request goes, and its answer decides again."""
        limiter = make_limiter(queue_timeout=2 * MAX_HOLD)
        await learn(limiter, remaining=0, reset=99_999_999_999)
        waiting = asyncio.create_task(limiter.acquire("acme", "tool"))
        await timers.advance(MAX_HOLD - 1)
        assert not waiting.done()
        await timers.advance(1.1)
        slot = await asyncio.wait_for(waiting, 1)
        slot.report(200, announce(4, reset=NOW + MAX_HOLD + 10))
        assert len([await limiter.acquire("acme", "tool") for _ in range(2)]) == 2

    async def test_reset_in_the_past_does_not_pace(self, make_limiter: LimiterFactory) -> None:
        """Remaining 0 with a reset already gone says nothing: requests go."""
        limiter = make_limiter()
        await learn(limiter, remaining=0, reset=NOW - 5)
        slots = [await limiter.acquire("acme", "tool") for _ in range(10)]
        assert len(slots) == 10

    async def test_garbage_headers_do_not_pace(self, make_limiter: LimiterFactory) -> None:
        """Non-numeric figures leave the budget unknown: requests go."""
        limiter = make_limiter()
        slot = await limiter.acquire("acme", "tool")
        slot.report(200, {"RateLimit-Remaining": "none", "RateLimit-Reset": "whenever"})
        slots = [await limiter.acquire("acme", "tool") for _ in range(10)]
        assert len(slots) == 10

    async def test_old_window_answer_arriving_late_is_ignored(
        self, make_limiter: LimiterFactory
    ) -> None:
        """An answer from the previous window cannot take the new window's budget away."""
        limiter = make_limiter()
        await learn(limiter, remaining=4, limit=10, reset=NOW + 20)
        slot = await limiter.acquire("acme", "tool")
        slot.report(200, announce(0, limit=10, reset=NOW + 10))
        assert limiter.snapshot()["acme"].remaining == 4

    async def test_default_limit_paces_nations_without_headers(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """NBGW_RATE_DEFAULT_LIMIT=3/10: three go, the fourth after the gateway's own window."""
        limiter = make_limiter(default_limit=(3, 10.0))
        for _ in range(3):
            (await limiter.acquire("acme", "tool")).report(200, {})
        fourth = asyncio.create_task(limiter.acquire("acme", "tool"))
        await timers.advance(9.0)
        assert not fourth.done()
        await timers.advance(1.1)
        assert fourth.done()

    async def test_metrics_record_remaining_limit_and_waits(
        self, make_limiter: LimiterFactory, timers: Timers, registry: CollectorRegistry
    ) -> None:
        """The remaining and limit gauges follow answers; the wait histogram counts waits."""
        limiter = make_limiter()
        await learn(limiter, remaining=0, limit=7)
        assert sample(registry, "nbgw_rate_limit_remaining", account="acme") == 0
        assert sample(registry, "nbgw_rate_limit_limit", account="acme") == 7
        waiter = asyncio.create_task(limiter.acquire("acme", "tool"))
        await timers.advance(10.5)
        assert waiter.done()
        assert sample(registry, "nbgw_rate_limit_wait_seconds_count", account="acme") == 2
        assert sample(registry, "nbgw_rate_limit_wait_seconds_sum", account="acme") >= 10


# ---------------------------------------------------------------------- refusing


class TestQueueTimeout:
    async def test_known_long_wait_is_refused_at_once(self, make_limiter: LimiterFactory) -> None:
        """A reset 10 s away with a 5 s timeout: 429 at once, Retry-After 10."""
        limiter = make_limiter(queue_timeout=5)
        await learn(limiter, remaining=0, reset=NOW + 10)
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("acme", "tool")
        assert caught.value.status == 429
        assert caught.value.headers["Retry-After"] == "10"
        assert limiter.snapshot()["acme"].queued == 0

    async def test_wait_beyond_the_timeout_is_refused_when_it_expires(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """Queued behind more requests than the next window holds: refused at the timeout,
        as the budget's 429 (the spent budget held them; the one request sent at the reset
        is unanswered, but it was not in flight for their whole wait)."""
        limiter = make_limiter(queue_timeout=5)
        await learn(limiter, remaining=0, limit=2, reset=NOW + 3)
        waiters = [asyncio.create_task(limiter.acquire("acme", "tool")) for _ in range(3)]
        await timers.advance(3.1)
        assert [w.done() for w in waiters] == [True, False, False]  # in flight cap: 1 of 2
        await timers.advance(2.0)  # that one is not answered: the budget held the rest first
        assert all(w.done() for w in waiters)
        refused = [w for w in waiters if w.exception() is not None]
        assert len(refused) == 2
        assert all(isinstance(w.exception(), RateLimited) for w in refused)
        assert limiter.snapshot()["acme"].queued == 0

    async def test_unanswered_first_request_times_the_rest_out_as_504(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """The first request to a nation goes alone; when NationBuilder does not answer it,
        the requests queued behind it give up at the timeout with 504 upstream_timeout
        (the budget is not what held them), saying so; the late answer still counts."""
        limiter = make_limiter(queue_timeout=5)
        first = await limiter.acquire("acme", "tool")
        queued = [asyncio.create_task(limiter.acquire("acme", "tool")) for _ in range(2)]
        await timers.advance(5.1)
        for task in queued:
            err = task.exception()
            assert isinstance(err, UpstreamTimeout)
            assert (err.status, err.code) == (504, "upstream_timeout")
            assert "answered none of the 1 request(s) in flight" in err.detail
            assert "NBGW_RATE_QUEUE_TIMEOUT (5 s)" in err.detail
            assert "Retry-After" not in err.headers
        assert limiter.snapshot()["acme"].queued == 0
        first.report(200, {})
        assert len([await limiter.acquire("acme", "tool") for _ in range(3)]) == 3

    async def test_in_flight_cap_without_answers_is_504_with_answers_429(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """Held by the in-flight cap (half the announced Remaining): 504 when nothing in
        flight was answered during the wait, 429 when answers kept coming meanwhile."""
        limiter = make_limiter(queue_timeout=5)
        await learn(limiter, remaining=10, limit=50, reset=NOW + 100)  # cap: 5 in flight
        hung = [await limiter.acquire("acme", "tool") for _ in range(5)]
        waiting = asyncio.create_task(limiter.acquire("acme", "tool"))
        await timers.advance(5.1)
        assert isinstance(waiting.exception(), UpstreamTimeout)
        assert "none of the 5 request(s)" in waiting.exception().detail  # type: ignore[union-attr]

        hung.pop().report(200, announce(5, limit=50, reset=NOW + 100))  # cap 3, 4 in flight
        late = asyncio.create_task(limiter.acquire("acme", "tool"))
        await timers.advance(2.0)
        hung.pop().report(200, announce(4, limit=50, reset=NOW + 100))  # cap 2, 3 in flight
        await timers.advance(3.1)
        assert isinstance(late.exception(), RateLimited)
        assert limiter.snapshot()["acme"].queued == 0

    async def test_queue_longer_than_the_timeout_allows_is_refused_at_once(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """With the period learnt (10 s), the request 3 windows back is refused without waiting."""
        limiter = make_limiter(queue_timeout=15)
        await learn(limiter, remaining=0, limit=2, reset=NOW + 10)
        await timers.advance(10.1)
        await learn(limiter, remaining=0, limit=2, reset=NOW + 20)
        queued = [asyncio.create_task(limiter.acquire("acme", "tool")) for _ in range(4)]
        await settle()
        with pytest.raises(RateLimited):
            await limiter.acquire("acme", "tool")
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)

    async def test_a_quiet_spell_is_not_taken_for_the_window_length(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """Windows of 10 s, then ten quiet minutes: the gap to the last window seen is
        not the window's length (it was learnt as 600 s, so a request that goes in the
        next window was refused with Retry-After: 605)."""
        limiter = make_limiter(queue_timeout=30)
        await learn(limiter, remaining=4, limit=5, reset=NOW + 10)
        await timers.advance(10.1)
        await learn(limiter, remaining=4, limit=5, reset=NOW + 20)
        await timers.advance(600)
        await learn(limiter, remaining=0, limit=5, reset=NOW + 620)
        queued = [asyncio.create_task(limiter.acquire("acme", "tool")) for _ in range(5)]
        await settle()
        late = asyncio.create_task(limiter.acquire("acme", "tool"))  # the window after next
        await settle()
        assert not late.done()  # waits for its window (about 20 s), not refused
        for task in [*queued, late]:
            task.cancel()
        await asyncio.gather(*queued, late, return_exceptions=True)

    async def test_the_window_length_is_learnt_from_consecutive_windows(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """With the window of 10 s learnt from two windows in a row, a request two full
        windows back is refused at once with the wait it would have had."""
        limiter = make_limiter(queue_timeout=15)
        await learn(limiter, remaining=0, limit=2, reset=NOW + 10)
        await timers.advance(10.1)
        await learn(limiter, remaining=0, limit=2, reset=NOW + 20)
        queued = [asyncio.create_task(limiter.acquire("acme", "tool")) for _ in range(4)]
        await settle()
        with pytest.raises(RateLimited) as refused:
            await limiter.acquire("acme", "tool")
        assert 15 < int(refused.value.headers["Retry-After"]) <= 21
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)

    async def test_pacing_off_never_waits(
        self, make_limiter: LimiterFactory, registry: CollectorRegistry
    ) -> None:
        """NBGW_RATE_QUEUE_TIMEOUT=0: a spent budget and a 429 still let requests through."""
        limiter = make_limiter(queue_timeout=0)
        assert not limiter.pacing
        await learn(limiter, remaining=0)
        slot = await limiter.acquire("acme", "tool")
        slot.report(429, {**announce(0), "Retry-After": "10"})
        slots = [await limiter.acquire("acme", "tool") for _ in range(5)]
        assert len(slots) == 5
        assert sample(registry, "nbgw_upstream_429_total", account="acme") == 1


class TestCancellation:
    async def test_cancelled_waiter_frees_its_place(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """A waiter whose client went away leaves the queue; the one behind it goes next."""
        limiter = make_limiter()
        await learn(limiter, remaining=0, limit=1, reset=NOW + 10)
        gone = asyncio.create_task(limiter.acquire("acme", "a"))
        stays = asyncio.create_task(limiter.acquire("acme", "b"))
        await settle()
        gone.cancel()
        await settle()
        assert limiter.snapshot()["acme"].queued == 1
        await timers.advance(10.1)
        assert stays.done() and not stays.cancelled()
        assert limiter.snapshot()["acme"].in_flight == 1

    async def test_granted_but_cancelled_slot_is_handed_back(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """Cancelled between being woken and running: the slot returns to the budget."""
        limiter = make_limiter()
        await learn(limiter, remaining=0, limit=1, reset=NOW + 10)
        waiter = asyncio.create_task(limiter.acquire("acme", "a"))
        await settle()
        timers.fire(10.1)  # the reset wakes the waiter...
        waiter.cancel()  # ...but its client is gone before it runs
        await settle()
        assert waiter.cancelled()
        assert limiter.snapshot()["acme"].in_flight == 0
        assert (await limiter.acquire("acme", "b")) is not None


class TestFairness:
    async def test_round_robin_between_clients(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """A greedy client queued first does not starve another: turns alternate."""
        limiter = make_limiter(queue_timeout=100)
        await learn(limiter, remaining=0, limit=1, reset=NOW + 10)
        order: list[str] = []

        async def one(client: str) -> None:
            slot = await limiter.acquire("acme", client)
            order.append(client)
            # Each window has room for exactly one request.
            slot.report(200, announce(0, limit=1, reset=timers.clock.now() + 10))

        tasks = [asyncio.create_task(one("greedy")) for _ in range(4)]
        await settle()
        tasks += [asyncio.create_task(one("polite")) for _ in range(2)]
        for _ in range(6):
            await timers.advance(10.1)
        assert order == ["greedy", "polite", "greedy", "polite", "greedy", "greedy"]
        await asyncio.gather(*tasks)

    async def test_a_greedy_backlog_does_not_get_another_tool_refused(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """120 requests of one tool queued over 5-per-window budgets: another tool's one
        request goes in the next round (the next window), so it is queued, not refused
        at once as if it were behind the whole backlog."""
        limiter = make_limiter(queue_timeout=30)
        await learn(limiter, remaining=4, limit=5, reset=NOW + 10)
        await timers.advance(10.1)
        await learn(limiter, remaining=0, limit=5, reset=NOW + 20)
        greedy = [asyncio.create_task(limiter.acquire("acme", "greedy")) for _ in range(120)]
        await settle()
        polite = asyncio.create_task(limiter.acquire("acme", "polite"))
        await settle()
        assert not polite.done()
        await timers.advance(10)  # the next window: polite's turn comes in its first round
        assert polite.done() and polite.exception() is None
        polite.result().report(200, announce(3, limit=5, reset=timers.clock.now() + 10))
        refused = [t for t in greedy if t.done() and isinstance(t.exception(), RateLimited)]
        assert len(refused) > 90  # greedy's own backlog past the timeout is refused
        for task in greedy:
            task.cancel()
        await asyncio.gather(*greedy, return_exceptions=True)

    async def test_a_replay_is_not_refused_for_its_own_tools_backlog(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """A replay after an upstream 429 goes to the head of its tool's queue, so the
        tool's own backlog is not ahead of it: it goes in the next window (it was refused
        at once with Retry-After 40, and the 429 the gateway promises to absorb reached
        the tool)."""
        limiter = make_limiter(queue_timeout=30)
        await learn(limiter, remaining=4, limit=5, reset=NOW + 10)
        await timers.advance(10.1)
        await learn(limiter, remaining=0, limit=5, reset=NOW + 20)
        backlog = [asyncio.create_task(limiter.acquire("acme", "sync")) for _ in range(15)]
        await settle()
        replay = asyncio.create_task(limiter.acquire("acme", "sync", replay=True))
        await settle()
        assert not replay.done()
        await timers.advance(10)
        assert replay.done() and replay.exception() is None
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)


class TestUpstream429:
    async def test_429_holds_the_queue_for_retry_after(
        self, make_limiter: LimiterFactory, timers: Timers, registry: CollectorRegistry
    ) -> None:
        """After a 429 with Retry-After 4, the next request waits 4 s, not less."""
        limiter = make_limiter()
        slot = await limiter.acquire("acme", "tool")
        slot.report(429, {"Retry-After": "4"})
        assert sample(registry, "nbgw_upstream_429_total", account="acme") == 1
        replay = asyncio.create_task(limiter.acquire("acme", "tool", replay=True))
        await timers.advance(3.9)
        assert not replay.done()
        await timers.advance(0.2)
        assert replay.done()

    async def test_hold_is_bounded(self, make_limiter: LimiterFactory) -> None:
        """Retry-After: 3600 holds at most MAX_HOLD; beyond the timeout it is refused at once."""
        limiter = make_limiter(queue_timeout=30)
        slot = await limiter.acquire("acme", "tool")
        slot.report(429, {"Retry-After": "3600"})
        with pytest.raises(RateLimited) as caught:
            await limiter.acquire("acme", "tool")
        assert caught.value.headers["Retry-After"] == str(int(MAX_HOLD))

    async def test_429_without_retry_after_holds_at_least_a_second(
        self, make_limiter: LimiterFactory, timers: Timers
    ) -> None:
        """No Retry-After, no reset: a 1 s hold, never an immediate retry."""
        limiter = make_limiter()
        (await limiter.acquire("acme", "tool")).report(429, {})
        waiter = asyncio.create_task(limiter.acquire("acme", "tool"))
        await timers.advance(0.5)
        assert not waiter.done()
        await timers.advance(0.6)
        assert waiter.done()

    async def test_failed_send_returns_nothing_but_the_in_flight_place(
        self, make_limiter: LimiterFactory
    ) -> None:
        """A request that got no answer (error) frees its in-flight place."""
        limiter = make_limiter()
        slot = await limiter.acquire("acme", "tool")
        slot.report(None)
        slot.report(None)  # reported twice: counted once
        assert limiter.snapshot()["acme"].in_flight == 0
