"""Time as an injectable dependency.

Token expiry, refresh margins, backoff and state expiry all read time through a `Clock`,
so tests move time with `FakeClock.advance()` instead of sleeping.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Protocol


def utc_datetime(ts: float | None) -> datetime | None:
    """`ts` (epoch seconds) as an aware UTC datetime; None when it is missing, not finite or
    outside what a datetime can hold (a row stored with an absurd expiry must still render)."""
    if ts is None or not math.isfinite(ts):
        return None
    try:
        return datetime.fromtimestamp(ts, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def iso_utc(ts: float | None) -> str | None:
    """ISO 8601 UTC to the second, or None for no date (missing, 0 or less) and for one no
    calendar can show."""
    when = utc_datetime(ts) if ts is not None and ts > 0 else None
    return None if when is None else when.isoformat(timespec="seconds")


class Clock(Protocol):
    """What token and session logic may ask about time."""

    def now(self) -> float:
        """Wall-clock time in epoch seconds (comparable with token expiry)."""
        ...

    def monotonic(self) -> float:
        """A monotonic reading in seconds, for measuring durations."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when told to; used by tests and benchmarks."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both readings forward by `seconds`."""
        self._now += seconds
        self._mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Move the wall clock only (an NTP step, a host's clock set back): what is timed
        on the monotonic clock does not move."""
        self._now += seconds
