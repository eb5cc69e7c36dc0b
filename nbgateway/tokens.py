"""TokenManager: a valid access token for an account, refreshed once, whoever asks.

- A cache of decrypted access tokens: a request whose token is valid for longer than the
  refresh margin touches neither SQLite nor the cipher.
- Single flight per account: the first caller that needs the store or the token endpoint
  starts one task; every concurrent caller awaits that same task (counted as coalesced).
- Across processes: the refresh happens under the store's refresh lock, after re-reading
  the row; a newer generation found there is adopted instead of refreshing. The new pair is
  committed before the access token is handed out.
- invalid_grant: if the stored refresh token is still the one that failed, the account is
  marked needs_reauth and the token endpoint is not called for it again until it changes.
- Transient failures back off (exponential, jittered, bounded); a still-valid access token
  keeps being used meanwhile.
- `sync()` notices changes made by other processes (PRAGMA data_version) and reconciles the
  cache and the per-account gauges; `run()` is the background refresher.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from nbgateway.clock import Clock
from nbgateway.errors import (
    AccountNotFound,
    OAuthError,
    ReauthorizationRequired,
    RefreshBackoff,
)
from nbgateway.metrics import Metrics
from nbgateway.models import Account, AccountStatus, RefreshOutcome, TokenSet
from nbgateway.oauth import NationBuilderOAuth
from nbgateway.redact import Secret
from nbgateway.store import TokenStore

log = logging.getLogger("nbgateway.tokens")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token and the generation it belongs to (for 401 retries)."""

    access_token: Secret
    generation: int
    expires_at: float


@dataclass(slots=True)
class _Backoff:
    failures: int
    next_attempt_at: float


class Backoff:
    """Exponential backoff with full jitter between `base` and `cap` seconds."""

    def __init__(
        self, base: float = 2.0, cap: float = 300.0, rng: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng

    def delay(self, failures: int) -> float:
        # The exponent is capped so a failure streak of days cannot overflow a float.
        ceiling = min(self.cap, self.base * 2.0 ** min(max(0, failures - 1), 62))
        # Never less than half the ceiling, so a burst of failures cannot retry at once.
        return ceiling / 2 + self._rng() * ceiling / 2


NeedsReauthListener = Callable[[str, str], None]


class TokenManager:
    """Hands out access tokens; owns refresh, coalescing, backoff and the background refresher."""

    def __init__(
        self,
        store: TokenStore,
        oauth: NationBuilderOAuth,
        metrics: Metrics,
        clock: Clock,
        *,
        margin: float,
        backoff: Backoff | None = None,
        on_needs_reauth: NeedsReauthListener | None = None,
    ) -> None:
        self._store = store
        self._oauth = oauth
        self._metrics = metrics
        self._clock = clock
        self.margin = margin
        self._backoff_policy = backoff or Backoff()
        self._on_needs_reauth = on_needs_reauth
        self._cache: dict[str, IssuedToken] = {}
        self._inflight: dict[str, tuple[asyncio.Task[IssuedToken], bool]] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._needs_reauth: set[str] = set()
        self._change_counter: int | None = None
        self._accounts: set[str] = set()

    # -- the request path --------------------------------------------------------------

    async def access_token(self, slug: str) -> IssuedToken:
        """A token valid for at least the refresh margin (or the still-valid one in backoff)."""
        cached = self._cache.get(slug)
        if cached is not None and cached.expires_at - self._clock.now() > self.margin:
            return cached
        return await self._single_flight(slug, force=False, stale_generation=None)

    async def force_refresh(self, slug: str, stale_generation: int | None) -> IssuedToken:
        """After an upstream 401 on `stale_generation`: a token of a newer generation."""
        # Joins a refresh already in flight; if that one only re-issued the rejected
        # generation, _single_flight starts a forced refresh of its own.
        return await self._single_flight(slug, force=True, stale_generation=stale_generation)

    async def refresh_now(self, slug: str) -> IssuedToken:
        """Refresh at once (admin action), ignoring backoff; adopts a concurrent refresh."""
        self._backoff.pop(slug, None)
        account = await self._load(slug)
        return await self._single_flight(slug, force=True, stale_generation=account.generation)

    def only_account(self) -> str | None:
        """The slug of the one stored account, if exactly one exists (as of the last sync)."""
        if len(self._accounts) == 1:
            return next(iter(self._accounts))
        return None

    async def account_changed(self, slug: str) -> None:
        """This process changed `slug` in the store (connect, import, removal): start afresh."""
        self.invalidate(slug)
        await self.sync(force=True)

    def invalidate(self, slug: str) -> None:
        """Forget what is cached for `slug` (after connect, import or removal)."""
        self._cache.pop(slug, None)
        self._backoff.pop(slug, None)
        self._needs_reauth.discard(slug)

    async def _single_flight(
        self, slug: str, *, force: bool, stale_generation: int | None
    ) -> IssuedToken:
        # A loop: a waiter that must still refresh after the task it joined looks again,
        # so several such waiters join one new task instead of each starting their own.
        while (running := self._inflight.get(slug)) is not None:
            task, task_forced = running
            if slug in self._accounts:  # never a label for a slug that is not an account
                self._metrics.refresh_coalesced.labels(slug).inc()
            try:
                result = await asyncio.shield(task)
            except RefreshBackoff:
                # A forced refresh (admin, background) failed; a caller that only needs
                # a valid token keeps the one it has, or the still-valid stored one
                # (_obtain returns that without a new attempt while backing off).
                if force:
                    raise
                cached = self._still_valid(self._cache.get(slug))
                if cached is not None:
                    return cached
                # The still-valid stored token, if any; while backing off _obtain makes no
                # token call, so running it outside single flight is cheap.
                return await self._obtain(slug, False, stale_generation)
            if not force or task_forced or result.generation != stale_generation:
                return result
        task = asyncio.create_task(self._obtain(slug, force, stale_generation))
        self._inflight[slug] = (task, force)
        task.add_done_callback(lambda _t: self._forget_task(slug, task))
        # shield: a cancelled caller (client went away) must not cancel the refresh that
        # other callers, and the durability of the rotated token, depend on.
        return await asyncio.shield(task)

    def _forget_task(self, slug: str, task: asyncio.Task[IssuedToken]) -> None:
        current = self._inflight.get(slug)
        if current is not None and current[0] is task:
            del self._inflight[slug]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters received it already

    # -- obtaining a token -------------------------------------------------------------

    async def _load(self, slug: str) -> Account:
        account = await self._store.get_account(slug)
        if account is None:
            self.invalidate(slug)
            raise AccountNotFound(slug)
        return account

    def _usable(self, account: Account, threshold: float) -> bool:
        return (
            account.status is AccountStatus.ACTIVE
            and account.access_token is not None
            and account.expires_at is not None
            and account.expires_at - self._clock.now() > threshold
        )

    def _issue(self, account: Account) -> IssuedToken:
        assert account.access_token is not None and account.expires_at is not None
        token = IssuedToken(account.access_token, account.generation, account.expires_at)
        self._cache[account.slug] = token
        self._needs_reauth.discard(account.slug)
        self._metrics.token_expiry.labels(account.slug).set(account.expires_at)
        self._metrics.needs_reauth.labels(account.slug).set(0)
        return token

    def _reauth_error(self, slug: str) -> ReauthorizationRequired:
        return ReauthorizationRequired(
            slug, f"account {slug!r} needs to be re-authorized by an admin at /connect"
        )

    def _backoff_wait(self, slug: str) -> float:
        """Seconds until the next refresh attempt is allowed (0 when not backing off)."""
        state = self._backoff.get(slug)
        return 0.0 if state is None else max(0.0, state.next_attempt_at - self._clock.now())

    def _still_valid(self, token: IssuedToken | None) -> IssuedToken | None:
        """`token` if it has not expired yet (inside the margin is fine), else None."""
        if token is not None and token.expires_at > self._clock.now():
            return token
        return None

    async def _obtain(self, slug: str, force: bool, stale_generation: int | None) -> IssuedToken:
        if slug in self._needs_reauth:
            raise self._reauth_error(slug)
        backing_off = self._backoff_wait(slug) > 0
        if backing_off and not force:
            # Keep using a still-valid token without touching the store meanwhile.
            cached = self._still_valid(self._cache.get(slug))
            if cached is not None:
                return cached

        # Without the lock first: another process may already have refreshed.
        account = await self._load(slug)
        if account.status is AccountStatus.NEEDS_REAUTH:
            self._mark_reauth_seen(slug)
            raise self._reauth_error(slug)
        if account.generation != stale_generation or not force:
            threshold = 0.0 if force else self.margin
            if self._usable(account, threshold):
                return self._issue(account)
        if backing_off:
            if not force and self._usable(account, 0.0):
                return self._issue(account)  # inside the margin, but still valid
            raise RefreshBackoff(
                slug,
                f"refreshing the token of {slug!r} failed recently; retrying later",
                self._backoff_wait(slug),
            )
        return await self._refresh_locked(slug, force, stale_generation)

    async def _refresh_locked(
        self, slug: str, force: bool, stale_generation: int | None
    ) -> IssuedToken:
        failure: OAuthError | None = None
        reauth = marked = False
        async with self._store.refresh_lock(slug) as locked:
            account = await locked.read()
            if account.status is AccountStatus.NEEDS_REAUTH:
                reauth = True
            elif (account.generation != stale_generation or not force) and self._usable(
                account, 0.0 if force else self.margin
            ):
                return self._issue(account)  # adopted: someone else refreshed
            elif account.refresh_token is None:
                await locked.mark_needs_reauth("no refresh token is stored")
                reauth = marked = True
            else:
                try:
                    tokens = await self._call_token_endpoint(slug, account.refresh_token)
                except OAuthError as exc:
                    failure = exc
                    if exc.outcome.terminal:
                        current = await locked.read()
                        if current.refresh_token == account.refresh_token:
                            await locked.mark_needs_reauth(str(exc))
                            reauth = marked = True
                        elif self._usable(current, 0.0):
                            return self._issue(current)
                    else:
                        await locked.record_failure(str(exc))
                else:
                    account = await locked.save_tokens(tokens)
        # Leaving the block committed the new pair (or the failure record).
        if reauth:
            reason = str(failure) if failure else "no refresh token is stored"
            self._mark_reauth_seen(slug, reason=reason, marked_here=marked)
            raise self._reauth_error(slug)
        if failure is not None:
            return self._after_transient_failure(slug, failure, force, account)
        self._backoff.pop(slug, None)
        self._metrics.last_refresh_success.labels(slug).set(self._clock.now())
        log.info("refreshed token", extra={"account": slug, "outcome": "success"})
        return self._issue(account)

    async def _call_token_endpoint(self, slug: str, refresh_token: Secret) -> TokenSet:
        """One refresh call, measured: in-flight gauge, duration and outcome."""
        in_flight = self._metrics.refresh_in_flight.labels(slug)
        in_flight.inc()
        started = self._clock.monotonic()
        outcome = RefreshOutcome.SUCCESS
        try:
            return await self._oauth.refresh(slug, refresh_token)
        except OAuthError as exc:
            outcome = exc.outcome
            raise
        finally:
            in_flight.dec()
            self._metrics.refresh_duration.labels(slug).observe(self._clock.monotonic() - started)
            self._metrics.refresh_total.labels(slug, outcome.value).inc()

    def _after_transient_failure(
        self, slug: str, exc: OAuthError, force: bool, account: Account
    ) -> IssuedToken:
        state = self._backoff.get(slug)
        failures = 1 if state is None else state.failures + 1
        delay = self._backoff_policy.delay(failures)
        self._backoff[slug] = _Backoff(failures, self._clock.now() + delay)
        log.warning(
            "token refresh failed; backing off",
            extra={"account": slug, "outcome": exc.outcome.value, "retry_in": round(delay, 1)},
        )
        if not force and self._usable(account, 0.0):
            return self._issue(account)  # the stored token is still valid: keep using it
        raise RefreshBackoff(slug, f"refreshing the token of {slug!r} failed: {exc}", delay)

    def _mark_reauth_seen(self, slug: str, reason: str = "", *, marked_here: bool = False) -> None:
        """Stop using the account. Only the process that marked it warns and notifies:
        others (and restarts) see the status in the store and the banner, not a repeat alert."""
        self._cache.pop(slug, None)
        self._metrics.needs_reauth.labels(slug).set(1)
        if slug in self._needs_reauth:
            return
        self._needs_reauth.add(slug)
        if not marked_here:
            log.info("account needs re-authorization", extra={"account": slug})
            return
        log.warning(
            "account needs re-authorization at /connect",
            extra={"account": slug, "outcome": "needs_reauth"},
        )
        if self._on_needs_reauth is not None:
            self._on_needs_reauth(slug, reason or "the refresh token was rejected")

    # -- keeping up with the store ---------------------------------------------------------

    async def sync(self, *, force: bool = False) -> bool:
        """Reconcile cache and gauges with the store if anyone committed since the last look.

        Cheap when nothing changed (one PRAGMA). Returns True when it reloaded.
        """
        counter = await self._store.change_counter()
        if not force and counter == self._change_counter:
            return False
        self._change_counter = counter
        infos = await self._store.list_accounts()
        present = {info.slug for info in infos}
        known = self._accounts | set(self._cache) | self._needs_reauth | set(self._backoff)
        for slug in known - present:  # removed, here or by another process
            self.invalidate(slug)
            self._metrics.forget_account(slug)
        self._accounts = present
        for info in infos:
            cached = self._cache.get(info.slug)
            if cached is not None and cached.generation != info.generation:
                self._cache.pop(info.slug, None)
            if info.status is AccountStatus.NEEDS_REAUTH:
                self._mark_reauth_seen(info.slug, reason=info.last_error or "")
            else:
                if info.slug in self._needs_reauth:
                    # Re-authorized elsewhere: start afresh.
                    self.invalidate(info.slug)
                self._metrics.needs_reauth.labels(info.slug).set(0)
                if info.expires_at is not None:
                    self._metrics.token_expiry.labels(info.slug).set(info.expires_at)
            if info.last_refresh_at is not None and info.last_error is None:
                self._metrics.last_refresh_success.labels(info.slug).set(info.last_refresh_at)
        return True

    async def refresh_due(self, lead: float) -> list[str]:
        """Refresh every active account whose token expires within margin + `lead` seconds.

        Accounts in backoff are skipped until their next attempt. Returns the slugs tried.
        """
        now = self._clock.now()
        tried: list[str] = []
        for info in await self._store.list_accounts():
            if info.status is not AccountStatus.ACTIVE or info.expires_at is None:
                continue
            if info.expires_at - now > self.margin + lead:
                continue
            state = self._backoff.get(info.slug)
            if state is not None and state.next_attempt_at > now:
                continue
            tried.append(info.slug)
            try:
                await self._single_flight(info.slug, force=True, stale_generation=info.generation)
            except (ReauthorizationRequired, RefreshBackoff, AccountNotFound):
                pass  # recorded and logged where it happened
            except Exception:
                log.exception("background refresh failed", extra={"account": info.slug})
        return tried

    async def run(self, *, refresh_interval: float = 30.0, sync_interval: float = 1.0) -> None:
        """Background loop: notice other processes' changes and refresh tokens ahead of time."""
        since_refresh = refresh_interval
        while True:
            try:
                await self.sync()
                if since_refresh >= refresh_interval:
                    since_refresh = 0.0
                    await self.refresh_due(lead=2 * refresh_interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("token maintenance loop failed; continuing")
            await asyncio.sleep(sync_interval)
            since_refresh += sync_interval
