"""Proxied requests per account over the last hour, for the admin pages.

Read from the counter the proxy already keeps (`nbgw_proxy_requests_total`), so the request
path does no extra work at all: `sample()` notes every account's running total at most once
a minute (a rolling list of about an hour's samples), and `last_hour()` is the current total
minus the total of the newest sample at least an hour old (or of the first sample, taken
when this process started, while it has been up for less than an hour). The figure is per
process, like the counter it reads; with `--workers`, each worker counts its own requests.
Nothing here knows about HTTP or the admin pages.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

from nbgateway.clock import Clock
from nbgateway.metrics import Metrics

WINDOW = 3600.0
STEP = 60.0


class RequestActivity:
    """Rolling per-minute samples of the per-account request counter."""

    def __init__(
        self, metrics: Metrics, clock: Clock, *, window: float = WINDOW, step: float = STEP
    ) -> None:
        self._counter = metrics.proxy_requests
        self._clock = clock
        self.window = window
        self.step = step
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self.sample()

    def _totals(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for family in self._counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels["account"]] += sample.value
        return totals

    def sample(self) -> None:
        """Note the totals, unless the newest sample is younger than a step."""
        now = self._clock.now()
        if self._samples and now - self._samples[-1][0] < self.step:
            return
        self._samples.append((now, self._totals()))
        # Keep one sample older than the window: it is the baseline for "the last hour".
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def last_hour(self) -> dict[str, int]:
        """Requests answered per account within about the last hour (accounts with any)."""
        self.sample()
        now = self._clock.now()
        baseline = self._samples[0][1]
        for at, totals in self._samples:
            if at > now - self.window:
                break
            baseline = totals
        counts: dict[str, int] = {}
        for account, total in self._totals().items():
            # Below the baseline, the account's series was reset: count it from zero.
            count = total - baseline.get(account, 0.0)
            counts[account] = int(total if count < 0 else count)
        return {account: n for account, n in counts.items() if n > 0}

    async def run(self) -> None:
        """Background loop: a sample every step, so the baseline exists without page views."""
        while True:
            await asyncio.sleep(self.step)
            self.sample()
