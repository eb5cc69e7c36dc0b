"""Each nation's rate budget, shared by every tool: learn it, pace to it, hold on a 429.

NationBuilder allows a fixed number of requests per access token per window and announces
the window on every response (`RateLimit-Limit`, `-Remaining`, `-Reset`; the older
`X-RateLimit-*` spellings too). `RateLimiter` keeps one `_Budget` per account, learnt only
from those announcements (or from `NBGW_RATE_DEFAULT_LIMIT` for nations that send none):

- `acquire(account, client)` gives a `Slot` at once while the budget lasts; when it is
  spent, the request waits in a queue (FIFO per client, round-robin between clients) until
  the window resets, and no longer than the queue timeout: beyond it, or when the wait is
  known to be longer, it raises `RateLimited` (429 with Retry-After) before anything is sent.
  When what held the queue was not the budget but requests in flight that NationBuilder
  did not answer meanwhile (the first request to a nation, which goes alone, or the
  in-flight cap), the waiter gets `UpstreamTimeout` (504) instead: the upstream is slow
  or hung, and a 429 with "retry in 1 s" would send the tool after a budget that is fine.
  `try_acquire(account)` is its first step alone: the slot at once, or None to queue.
- `Slot.report(status, headers)` feeds every upstream answer back: the budget follows the
  announced Remaining (so other processes and other users of the same token are seen), and
  a 429 holds the account's queue until its Retry-After (bounded by `MAX_HOLD`).

The first request to a nation goes alone; the budget its answer announces (or the absence
of one: no pacing) decides for the rest. Several processes share a budget without talking
to each other: each follows the upstream's Remaining, none keeps more than half of the last
announced Remaining in flight, and a new window counts as half announced until its first
answer; what that guarantees is in docs/architecture.md, "Rate budget".

Waiting never polls: waiters are futures, woken by a report or by one timer per account at
the window's reset (`call_later`, injectable so tests drive it with a fake clock). A waiter
whose task is cancelled (the client went away) leaves the queue, or hands its slot back.
Time comes from the injected `Clock`. Nothing here knows HTTP routing.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from multidict import istr

from nbgateway.clock import Clock
from nbgateway.errors import GatewayError, RateLimited, UpstreamTimeout
from nbgateway.metrics import Metrics

# Longest an upstream 429 may hold a nation's queue, whatever its Retry-After says; also
# the furthest an announced reset is believed: a garbled or absurd RateLimit-Reset (a day,
# year 5000) with Remaining 0 would otherwise stop every request to the nation, with no
# answer ever coming to correct it. Past it, the next window is found out by asking.
MAX_HOLD = 60.0
# Shortest hold after a 429 (a missing or zero Retry-After must not turn into a hot loop).
MIN_HOLD = 1.0
# Seconds after the announced reset before a new window is assumed (the reset is whole
# seconds, the answer took its time to arrive).
RESET_MARGIN = 0.05
# An epoch RateLimit-Reset is on NationBuilder's clock. When the answer's Date differs
# from this host's clock by more than this (Date has whole seconds), the reset is moved by
# that difference: a gateway clock a few seconds ahead would otherwise take every reset
# for past, and one behind would wait past every real one.
CLOCK_SKEW_TOLERANCE = 2.0
# Reset values up to this are delta-seconds; from EPOCH_FLOOR on they are epoch seconds;
# anything in between is neither and is ignored.
DELTA_CEILING = 86_400.0
EPOCH_FLOOR = 1_000_000_000.0
# Two announced resets closer than this belong to one window (rounding, delta jitter).
SAME_WINDOW = 0.5

_SPELLINGS = ("RateLimit-", "X-RateLimit-")


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], TimerHandle]


class Announced(NamedTuple):
    """What one response said about its window (each part None when absent or unusable)."""

    limit: int | None
    remaining: int | None
    reset_at: float | None  # epoch seconds


_NOTHING = Announced(None, None, None)
# Each header in both spellings, as case-insensitive keys (looked up without case folding).
_LIMIT, _REMAINING, _RESET = (
    tuple(istr(prefix + name) for prefix in _SPELLINGS) for name in ("Limit", "Remaining", "Reset")
)


def _header(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value.strip()
    return None


# Above this a RateLimit count is not one (and would not fit a metric's float).
_COUNT_MAX = 10**12


def _count(raw: str | None) -> int | None:
    """A RateLimit count: ASCII digits only (no sign, "_" or other scripts' digits)."""
    if raw is None or not (raw.isascii() and raw.isdigit()) or len(raw) > 13:
        return None
    value = int(raw)
    return value if value <= _COUNT_MAX else None


_DATE = istr("Date")


@functools.lru_cache(maxsize=8)  # a Date changes once a second
def _date_epoch(raw: str) -> float | None:
    """An HTTP Date as epoch seconds (None if unusable)."""
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


def upstream_offset(headers: Mapping[str, str], now: float) -> float:
    """How far NationBuilder's clock (its answer's Date) is ahead of `now`, when that is
    more than CLOCK_SKEW_TOLERANCE; else 0."""
    raw = headers.get(_DATE)
    if raw is None:
        return 0.0
    date = _date_epoch(raw)
    if date is None:
        return 0.0
    offset = date - now
    return offset if abs(offset) > CLOCK_SKEW_TOLERANCE else 0.0


def parse_announced(headers: Mapping[str, str], now: float) -> Announced:
    """Read the RateLimit headers of a response; `now` turns a delta-seconds reset into epoch,
    and an epoch reset is moved onto this host's clock (`upstream_offset`)."""
    raw_limit = _header(headers, _LIMIT)
    raw_remaining = _header(headers, _REMAINING)
    raw = _header(headers, _RESET)
    if raw_limit is None and raw_remaining is None and raw is None:
        return _NOTHING
    limit = _count(raw_limit)
    remaining = _count(raw_remaining)
    reset_at: float | None = None
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            if value <= DELTA_CEILING:
                reset_at = now + value
            elif value >= EPOCH_FLOOR:
                reset_at = value - upstream_offset(headers, now)
            if reset_at is not None:
                reset_at = min(reset_at, now + MAX_HOLD)
    if limit == 0:
        limit = None  # a limit of nothing is not a limit anyone can pace to
    return Announced(limit, remaining, reset_at)


def parse_retry_after(raw: str | None, now: float) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date); None if unusable."""
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or "_" in raw:
        return None  # float() would read "1_000" or another script's digits
    try:
        seconds = float(raw)
    except ValueError:
        when = _date_epoch(raw)
        if when is None:
            return None
        seconds = when - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(eq=False)
class _Waiter:
    client: str
    future: asyncio.Future[None]


@dataclass
class _Budget:
    limit: int | None = None
    # What this process may still send in the current window (None: unknown, no pacing).
    remaining: int | None = None
    # The lowest Remaining announced in the current window (caps what is kept in flight).
    announced: int | None = None
    reset_at: float | None = None
    period: float | None = None  # window length, when learnt or configured
    last_reset: float | None = None  # the previous window's reset (to learn the period)
    hold_until: float = 0.0
    local: bool = False  # windows counted by the gateway (NBGW_RATE_DEFAULT_LIMIT)
    answered: bool = False  # an answer has been seen (with or without headers)
    in_flight: int = 0
    reports: int = 0  # answers and failures reported so far
    grants: int = 0  # slots given so far
    queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    queued: int = 0
    timer: TimerHandle | None = None
    timer_at: float = 0.0


@dataclass(frozen=True, slots=True)
class BudgetView:
    """One account's budget as an admin page shows it."""

    limit: int | None
    remaining: int | None
    reset_at: float | None
    hold_until: float | None
    queued: int
    in_flight: int


class Slot:
    """Permission to send one request upstream; report its answer (or its failure) once."""

    __slots__ = ("_done", "_limiter", "account")

    def __init__(self, limiter: RateLimiter, account: str) -> None:
        self._limiter = limiter
        self.account = account
        self._done = False

    def report(self, status: int | None, headers: Mapping[str, str] | None = None) -> None:
        """The upstream answered `status` with `headers`; None: no answer (error, timeout)."""
        if self._done:
            return
        self._done = True
        self._limiter._report(self.account, status, headers or {})


class RateLimiter:
    """Per-account budgets, the wait queue and the 429 hold. One instance per process."""

    def __init__(
        self,
        clock: Clock,
        metrics: Metrics,
        *,
        queue_timeout: float,
        default_limit: tuple[int, float] | None = None,
        call_later: CallLater | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._timeout = queue_timeout
        self._default = default_limit
        self._call_later = call_later
        self._budgets: dict[str, _Budget] = {}

    @property
    def pacing(self) -> bool:
        """False when NBGW_RATE_QUEUE_TIMEOUT is 0: learn and count, but never wait or replay."""
        return self._timeout > 0

    def snapshot(self) -> dict[str, BudgetView]:
        """Every known account's last learnt budget."""
        now = self._clock.now()
        views = {}
        for slug, b in sorted(self._budgets.items()):
            self._roll(b, now)
            views[slug] = BudgetView(
                limit=b.limit,
                remaining=b.announced if b.announced is not None else b.remaining,
                reset_at=b.reset_at,
                hold_until=b.hold_until if b.hold_until > now else None,
                queued=b.queued,
                in_flight=b.in_flight,
            )
        return views

    def retry_after(self, account: str, sent: str | None) -> str | None:
        """For a 429 passed on to the tool (its replay was refused too): a Retry-After to
        send instead of NationBuilder's `sent` when that is missing or unusable (negative,
        not a number or date), from the hold this 429 put on the account's queue; None to
        keep what was sent."""
        now = self._clock.now()
        if parse_retry_after(sent, now) is not None and not (sent or "").strip().startswith("-"):
            return None
        b = self._budgets.get(account)
        if b is None or b.hold_until <= now:
            return None
        return str(max(1, math.ceil(b.hold_until - now)))

    # -- asking for a slot -----------------------------------------------------------------

    def try_acquire(self, account: str) -> Slot | None:
        """A slot at once when the budget allows one with nobody queued, else None (then
        `acquire` queues the request). The hot path: no coroutine, no client identity."""
        b = self._budget(account)
        if not self.pacing:
            self._grant(b)
            return Slot(self, account)
        now = self._clock.now()
        self._roll(b, now)
        if b.queued == 0 and self._can_go(b, now):
            self._grant(b)
            self._metrics.rate_waited(account, 0.0)
            return Slot(self, account)
        return None

    async def acquire(self, account: str, client: str, *, replay: bool = False) -> Slot:
        """A slot for one upstream request: at once, after a wait, or `RateLimited`.

        `client` names the tool (fairness is round-robin between clients); `replay` puts
        the request at the head of its client's queue (it was sent once already).
        """
        slot = self.try_acquire(account)
        if slot is not None:
            return slot
        b = self._budget(account)
        now = self._clock.now()
        known_wait = self._known_wait(b, now, client, replay=replay)
        if known_wait > self._timeout:
            raise self._refusal(known_wait)

        started = self._clock.monotonic()
        progress = (b.reports, b.grants)
        waiter = _Waiter(client, asyncio.get_running_loop().create_future())
        queue = b.queues.setdefault(client, deque())
        if replay:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        b.queued += 1

        def on_timeout() -> None:
            if not waiter.future.done():
                self._remove(b, waiter)
                waiter.future.set_exception(self._timed_out(b, progress, client))

        deadline = self._later(self._timeout, on_timeout)
        self._dispatch(b)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.exception() is None:
                    self._give_back(b)  # granted, but the client went away before using it
            else:
                self._remove(b, waiter)
                self._dispatch(b)
            raise
        finally:
            deadline.cancel()
        self._observe_wait(account, self._clock.monotonic() - started)
        return Slot(self, account)

    # -- internals ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.now()

    def _later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        if self._call_later is not None:
            return self._call_later(delay, callback)
        return asyncio.get_running_loop().call_later(delay, callback)

    def _budget(self, account: str) -> _Budget:
        b = self._budgets.get(account)
        if b is None:
            b = self._budgets[account] = _Budget()
            if self._default is not None:
                limit, period = self._default
                b.local, b.limit, b.period = True, limit, period
                b.remaining = b.announced = limit
        return b

    def _observe_wait(self, account: str, seconds: float) -> None:
        self._metrics.rate_waited(account, max(0.0, seconds))

    def _refusal(self, wait: float) -> RateLimited:
        retry = max(1, math.ceil(wait - RESET_MARGIN))  # whole seconds, as NationBuilder says
        return RateLimited(
            f"the nation's rate budget is spent; the wait would exceed "
            f"NBGW_RATE_QUEUE_TIMEOUT ({self._timeout:g} s); retry in {retry} s",
            headers={"Retry-After": str(retry)},
        )

    def _timed_out(self, b: _Budget, progress: tuple[int, int], client: str) -> GatewayError:
        """Why a waiter that joined at `progress` (reports, grants) gives up at its timeout.

        Upstream's fault only when the same requests were in flight for the whole wait,
        none of them answered: nothing reported and nothing granted since it joined (a
        grant means the queue moved: the budget, not the upstream, held the rest)."""
        if b.in_flight and (b.reports, b.grants) == progress:
            return UpstreamTimeout(
                f"NationBuilder answered none of the {b.in_flight} request(s) in flight to "
                f"this nation while this one waited NBGW_RATE_QUEUE_TIMEOUT "
                f"({self._timeout:g} s) for its turn; it was not sent"
            )
        return self._refusal(self._known_wait(b, self._now(), client))

    def _roll(self, b: _Budget, now: float) -> None:
        """Start a new window when the announced reset (or a 429 hold) has passed."""
        if b.hold_until and now >= b.hold_until:
            b.hold_until = 0.0
            self._new_window(b)
        elif b.reset_at is not None and now >= b.reset_at + RESET_MARGIN:
            self._new_window(b)

    def _new_window(self, b: _Budget) -> None:
        if b.reset_at is not None:
            b.last_reset = b.reset_at
        b.reset_at = None  # learnt again from the next answer (or started by the next grant)
        if b.limit is None:
            b.remaining = b.announced = None
        else:
            b.remaining = b.limit - b.in_flight
            # Until an answer from the new window says otherwise, count half the limit as
            # announced: another process starting the same window then takes its share too.
            b.announced = math.ceil(b.limit / 2)

    def _can_go(self, b: _Budget, now: float) -> bool:
        if now < b.hold_until:
            return False
        if not b.answered and not b.local:
            # Nothing is known yet: one request goes alone, and its answer says whether
            # (and to what) the rest are paced. No limit is guessed.
            return b.in_flight == 0
        if b.remaining is None:
            return True  # no budget announced: no pacing
        if b.remaining <= 0:
            return False
        # Keep at most half the announced Remaining in flight: another process following
        # the same announcements then cannot push the sum over the budget.
        cap = max(1, math.ceil((b.announced if b.announced is not None else b.remaining) / 2))
        return b.local or b.in_flight < cap

    def _known_wait(self, b: _Budget, now: float, client: str, *, replay: bool = False) -> float:
        """A lower bound on how long a request of `client` joining the queue now must wait
        (a replay joins at the head of its client's queue)."""
        wait = 0.0
        if now < b.hold_until:
            wait = b.hold_until - now
        elif b.remaining is not None and b.remaining <= 0 and b.reset_at is not None:
            wait = b.reset_at + RESET_MARGIN - now
        if b.limit and b.period:
            beyond = self._ahead(b, client, replay) + 1 - max(0, b.remaining or 0)
            if beyond > 0:
                wait += ((beyond - 1) // b.limit) * b.period
        return max(0.0, wait)

    @staticmethod
    def _ahead(b: _Budget, client: str, replay: bool = False) -> int:
        """How many queued requests go before one `client` adds now. Round-robin serves
        each client with a queue once per round, in queue order: its own queue first, then
        from a client before it in the round one per round until its turn, from one after
        it one per round before (not a greedy tool's whole backlog). A replay goes to the
        head of its client's queue: none of its own is ahead of it."""
        own = 0 if replay else len(b.queues.get(client, ()))
        ahead = own
        after = False
        for other, queue in b.queues.items():
            if other == client:
                after = True
            else:
                ahead += min(len(queue), own if after else own + 1)
        return ahead

    def _grant(self, b: _Budget) -> None:
        b.in_flight += 1
        b.grants += 1
        if b.remaining is not None:
            b.remaining -= 1
        if b.local and b.reset_at is None and b.period is not None:
            b.reset_at = self._now() + b.period

    def _give_back(self, b: _Budget) -> None:
        b.in_flight -= 1
        if b.remaining is not None:
            b.remaining += 1
        self._dispatch(b)

    def _remove(self, b: _Budget, waiter: _Waiter) -> None:
        queue = b.queues.get(waiter.client)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        b.queued -= 1
        if not queue:
            del b.queues[waiter.client]

    def _next_waiter(self, b: _Budget) -> _Waiter:
        client = next(iter(b.queues))
        queue = b.queues.pop(client)
        waiter = queue.popleft()
        b.queued -= 1
        if queue:
            b.queues[client] = queue  # to the back of the round
        return waiter

    def _dispatch(self, b: _Budget) -> None:
        """Wake as many queued requests as the budget allows; arm the timer for the rest."""
        now = self._now()
        self._roll(b, now)
        while b.queued and self._can_go(b, now):
            waiter = self._next_waiter(b)
            if waiter.future.done():
                continue
            self._grant(b)
            waiter.future.set_result(None)
        if not b.queued:
            return
        if now < b.hold_until:
            self._arm(b, b.hold_until)
        elif b.reset_at is not None and b.remaining is not None and b.remaining <= 0:
            self._arm(b, b.reset_at + RESET_MARGIN)
        # Otherwise what blocks the queue is requests in flight: their reports wake it.

    def _arm(self, b: _Budget, at: float) -> None:
        if b.timer is not None:
            if b.timer_at <= at:
                return  # an earlier wake-up re-arms for the rest
            b.timer.cancel()

        def fire() -> None:
            b.timer = None
            self._dispatch(b)

        b.timer_at = at
        b.timer = self._later(max(0.0, at - self._now()), fire)

    def _report(self, account: str, status: int | None, headers: Mapping[str, str]) -> None:
        b = self._budgets.get(account)
        if b is None:
            return  # forgotten meanwhile
        b.in_flight = max(0, b.in_flight - 1)
        b.answered = b.answered or status is not None
        b.reports += 1
        now = self._now()
        if status == 429:
            self._metrics.upstream_429.labels(account).inc()
        seen = parse_announced(headers, now) if status is not None else _NOTHING
        changed_limit = seen.limit if seen.limit != b.limit else None
        self._metrics.rate_announced(account, seen.remaining, changed_limit)
        if seen.limit is not None:
            b.limit = seen.limit
        fresh = seen.remaining is not None and seen.reset_at is not None and seen.reset_at > now
        if fresh and seen.reset_at is not None and seen.remaining is not None:
            b.local = False
            self._learn(b, seen.remaining, seen.reset_at)
        if status == 429 and self.pacing:
            hold = parse_retry_after(headers.get("Retry-After"), now)
            to_reset = seen.reset_at - now if seen.reset_at is not None else None
            if to_reset is not None and to_reset > 0 and (hold is None or hold <= to_reset + 1):
                # The announced reset is exact where Retry-After is rounded up to a whole
                # second; holding past the reset would start this process's window late,
                # mid-way through another process's use of it.
                hold = to_reset + RESET_MARGIN
            else:
                hold = max(MIN_HOLD, hold if hold is not None else MIN_HOLD)
            hold = min(MAX_HOLD, hold)
            b.hold_until = max(b.hold_until, now + hold)
            b.remaining = 0
        elif (
            b.reset_at is None
            and b.in_flight == 0
            and b.remaining is not None
            and b.remaining <= 0
            and not b.local
        ):
            b.remaining = None  # spent, but no horizon to wait for: do not pace blind
        if b.queued:
            self._dispatch(b)

    def _learn(self, b: _Budget, remaining: int, reset_at: float) -> None:
        if b.reset_at is None or reset_at > b.reset_at + SAME_WINDOW:
            previous = b.reset_at if b.reset_at is not None else b.last_reset
            # The window ending at reset_at began at `previous` only if none was skipped:
            # after k quiet windows, now is at least k/(k+1) of the gap past `previous`.
            # Under half is therefore the next window, and the gap its length; otherwise
            # the gap may span several windows and says nothing.
            if (
                previous is not None
                and SAME_WINDOW < reset_at - previous <= 3600
                and self._now() - previous < (reset_at - previous) / 2
            ):
                b.period = reset_at - previous
            b.reset_at = reset_at
            b.remaining = remaining - b.in_flight
            b.announced = remaining
        elif reset_at >= b.reset_at - SAME_WINDOW:
            # The same window: the lower figure wins (answers can overtake each other).
            own = b.remaining if b.remaining is not None else remaining
            b.remaining = min(own, remaining - b.in_flight)
            b.announced = min(b.announced if b.announced is not None else remaining, remaining)
        # An older window's answer arriving late says nothing about this one.
