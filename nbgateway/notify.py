"""Telling a human that an account needs re-authorization: the optional alert webhook.

`Notifier.notify(slug, reason)` is the TokenManager's `on_needs_reauth` listener. It never
blocks the caller (a request on the proxy path may be the one that discovered the dead
refresh token): it starts a tracked background task and returns. The task POSTs

    {"event": "account_needs_reauthorization", "account": slug, "reason": ...,
     "connect_url": "{public_url}/connect", "at": "<ISO 8601 UTC>"}

to NBGW_ALERT_WEBHOOK, retrying with backoff, and counts every attempt in
`nbgw_alert_webhook_deliveries_total{outcome=delivered|retried|failed}`. The reason passes
through the app's `Redactor`, and the webhook URL itself is registered with it (chat
webhook URLs are credentials), so neither can reach a log line. The WARNING log line for the
event is written by the TokenManager; this module does not repeat it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import aiohttp
from aiohttp import web

from nbgateway.clock import Clock
from nbgateway.metrics import Metrics
from nbgateway.redact import Redactor
from nbgateway.tokens import NeedsReauthListener

log = logging.getLogger("nbgateway.notify")

EVENT = "account_needs_reauthorization"
NOTIFY_GRACE = 3.0  # seconds a stop gives webhook deliveries still on their way
# Waits between attempts: 3 attempts in all, the last about 6 s after the first.
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0)
# Statuses worth retrying among the 4xx: the receiver was busy, not saying "never".
_RETRYABLE_4XX = frozenset({408, 425, 429})


def combine(*listeners: NeedsReauthListener | None) -> NeedsReauthListener | None:
    """One listener calling each given one in turn (None when none is given)."""
    present = [listener for listener in listeners if listener is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def call_all(slug: str, reason: str) -> None:
        for listener in present:
            listener(slug, reason)

    return call_all


class Notifier:
    """Fire-and-forget alert webhook deliveries, retried, counted and awaited at shutdown."""

    def __init__(
        self,
        webhook_url: str,
        public_url: str,
        *,
        metrics: Metrics,
        redactor: Redactor,
        clock: Clock,
        session: aiohttp.ClientSession | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        attempt_timeout: float = 10.0,
        shutdown_grace: float = NOTIFY_GRACE,
    ) -> None:
        self.webhook_url = webhook_url
        self.connect_url = f"{public_url.rstrip('/')}/connect"
        self._metrics = metrics
        self._redactor = redactor
        self._clock = clock
        self._session = session
        self._own_session = False
        self._retry_delays = tuple(retry_delays)
        self._timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self._shutdown_grace = shutdown_grace
        self._tasks: set[asyncio.Task[None]] = set()
        if webhook_url:
            redactor.add(webhook_url)

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url)

    # -- lifetime ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the HTTP session (only when a webhook is configured and none was given)."""
        if self.enabled and self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,  # like the upstream session: no proxy settings from the env
            )
            self._own_session = True

    async def close(self) -> None:
        """Give pending deliveries a short grace, cancel the rest, close an owned session."""
        pending = set(self._tasks)
        if pending and self._shutdown_grace > 0:
            await asyncio.wait(pending, timeout=self._shutdown_grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_session and self._session is not None:
            session, self._session = self._session, None
            self._own_session = False
            await session.close()

    async def context(self, _app: web.Application) -> AsyncIterator[None]:
        """For `app.cleanup_ctx`: open before the services, close after them."""
        await self.open()
        try:
            yield
        finally:
            await self.close()

    async def drain(self) -> None:
        """Wait until every delivery started so far has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the listener --------------------------------------------------------------------

    def payload(self, slug: str, reason: str) -> dict[str, str]:
        """The JSON document sent for one account (no secret values)."""
        at = datetime.fromtimestamp(self._clock.now(), tz=UTC).isoformat(timespec="seconds")
        return {
            "event": EVENT,
            "account": slug,
            "reason": self._redactor.scrub(reason or "the refresh token was rejected"),
            "connect_url": self.connect_url,
            "at": at,
        }

    def notify(self, slug: str, reason: str) -> None:
        """TokenManager's `on_needs_reauth`: schedule a delivery and return at once."""
        if not self.enabled:
            return
        session = self._session
        if session is None or session.closed:
            log.warning(
                "alert webhook not sent: the notifier is not running", extra={"account": slug}
            )
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.warning("alert webhook not sent: no event loop", extra={"account": slug})
            return
        task = loop.create_task(self._deliver(session, self.payload(slug, reason)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, session: aiohttp.ClientSession, payload: dict[str, str]) -> None:
        attempts = len(self._retry_delays) + 1
        account = payload["account"]
        for attempt in range(1, attempts + 1):
            problem, retryable = await self._attempt(session, payload)
            if problem is None:
                self._metrics.webhook_deliveries.labels("delivered").inc()
                log.info("alert webhook delivered", extra={"account": account, "attempt": attempt})
                return
            if not retryable or attempt == attempts:
                self._metrics.webhook_deliveries.labels("failed").inc()
                log.warning(
                    "alert webhook delivery failed; giving up",
                    extra={"account": account, "attempt": attempt, "problem": problem},
                )
                return
            self._metrics.webhook_deliveries.labels("retried").inc()
            delay = self._retry_delays[attempt - 1]
            log.info(
                "alert webhook delivery failed; retrying",
                extra={
                    "account": account,
                    "attempt": attempt,
                    "problem": problem,
                    "retry_in": delay,
                },
            )
            await asyncio.sleep(delay)

    async def _attempt(
        self, session: aiohttp.ClientSession, payload: dict[str, str]
    ) -> tuple[str | None, bool]:
        """One POST. Returns (problem or None, whether another attempt may help)."""
        try:
            async with session.post(
                self.webhook_url,
                json=payload,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                await resp.read()
        except TimeoutError:
            return "the webhook did not answer in time", True
        except aiohttp.ClientError as exc:
            # Say what kind of failure only: exception texts may carry the URL.
            return f"the webhook could not be reached ({type(exc).__name__})", True
        if 200 <= status < 300:
            return None, False
        retryable = status >= 500 or status in _RETRYABLE_4XX
        return f"the webhook answered HTTP {status}", retryable
