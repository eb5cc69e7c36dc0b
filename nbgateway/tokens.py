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
- Transient failures back off (exponential, jittered, bounded, at least the token
  endpoint's Retry-After); a still-valid access token keeps being used meanwhile.
- After an upstream 401: a newer token (`force_refresh`), but no second refresh for a
  token NationBuilder refused right after a refresh made it (`may_cure_401`: a 401 about a
  permission must not rotate the pair on every request).
- `sync()` notices changes made by other processes (PRAGMA data_version) and reconciles the
  cache and the per-account gauges; `run()` is the background refresher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from nbgateway.clock import Clock, iso_utc
from nbgateway.errors import (
    AccountChanged,
    AccountNotFound,
    OAuthError,
    ReauthorizationRequired,
    RefreshBackoff,
    RefreshLockBusy,
    StoreError,
    StoreUnavailable,
    TokenUnavailable,
)
from nbgateway.log import background_round
from nbgateway.metrics import Metrics
from nbgateway.models import Account, AccountInfo, AccountStatus, RefreshOutcome, TokenSet
from nbgateway.oauth import NationBuilderOAuth
from nbgateway.redact import Secret
from nbgateway.store import LEASE_SLACK, AccountLock, GenerationConflict, LeaseLost, TokenStore

log = logging.getLogger("nbgateway.tokens")


# Never refresh one account more often than this (a token endpoint answering tiny lifetimes
# must not turn every request into a rotation).
MIN_REFRESH_INTERVAL = 30.0
# Seconds a request with a still-valid token leaves the store alone after it could not be
# used (each try would wait for its timeouts; the token serves meanwhile).
STORE_RETRY = 5.0
# Seconds a request whose token is due but still valid waits for its refresh before it goes
# on with that token (the refresh carries on: a slow or hung token endpoint, or processes
# taking turns at the account's lock, must not hold requests a valid token can serve).
MARGIN_WAIT = 2.0
# Seconds between attempts to store a rotated pair the store refused (doubling up to the cap).
PERSIST_RETRY_BASE = 1.0
PERSIST_RETRY_CAP = 30.0
# The marker kept for a held pair lasts one lease (`TokenStore.lease`) from its holder's
# last lock on the account, which renews it. After an attempt whose lock was granted, the
# next comes a third of a lease after that lock (or PERSIST_RETRY_BASE after a failing
# write that took longer); a token call from memory (bounded by the lease less
# LEASE_SLACK) starts within this of such a lock, or tries the store first.
RENEW_BEFORE_CALL = LEASE_SLACK / 2
# Background refreshes run at once, at most this many at a time.
REFRESH_CONCURRENCY = 32
# NationBuilder's 401 `unauthorized` also means the user lacks a permission, which no refresh
# cures, and a tool calling such an endpoint in a loop must not rotate the pair on every
# request. A token made by a refresh after a 401 and refused all the same is not refreshed
# for another 401 for this long; one whose retry could not be tried (a body too large to
# replay) not for MIN_REFRESH_INTERVAL.
REFRESH_401_HOLD = 300.0


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token, the generation it belongs to (for 401 retries), and when to renew it."""

    access_token: Secret
    generation: int
    expires_at: float
    refresh_at: float


@dataclass(slots=True)
class _Unpersisted:
    """A pair NationBuilder issued that the store could not take yet: the only valid one.

    `tokens` is None when the answer carried a new refresh token but no usable access token.
    `consumed` is the refresh token it replaced, which must never be sent again; `spent`
    the ones held since (refreshed from memory), each spent too and each possibly stored
    after all by a write that reported a failure (a commit whose answer was lost).
    """

    refresh_token: Secret
    tokens: TokenSet | None
    consumed: Secret | None
    message: str
    failures: int = 0
    next_attempt: float = 0.0
    issued_at: float = 0.0  # when NationBuilder issued `tokens` (for the effective margin)
    spent: list[Secret] = field(default_factory=list)
    stored_generation: int | None = None  # the row's generation once the pair is stored
    stored_failure_at: float | None = None  # when storing it recorded a failure in the row
    refresh_failures: int = 0  # token calls from memory that failed in a row
    refresh_retry_at: float = 0.0  # monotonic: no token call from memory before this
    # Monotonic: when this process's lock on the account, which renews the kept marker's
    # deadline, was last granted; None when the last attempt could not get it.
    claimed_at: float | None = None

    def replace(self, refresh_token: Secret, tokens: TokenSet | None) -> None:
        """NationBuilder rotated the held refresh token: hold its successor instead."""
        self.spent.append(self.refresh_token)
        self.refresh_token, self.tokens = refresh_token, tokens

    def supersedes(self, stored: Secret | None) -> bool:
        """Whether the pair is to be stored over a row holding `stored`: a refresh token
        this pair replaced (what the refresh consumed, or one held and refreshed since)."""
        return stored == self.consumed or stored in self.spent


@dataclass(slots=True)
class _Backoff:
    failures: int
    next_attempt_at: float  # on the monotonic clock: a step of the wall clock moves no retry
    generation: int  # the stored pair's generation that failed to refresh
    failed_at: float  # wall clock: when this process's failure (or the one it took up) was


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


def _answer_lost(exc: OAuthError) -> bool:
    """Whether NationBuilder may have carried out (and rotated in) the refresh that failed
    so: no answer (timeout, dropped connection), a server error, or a success it could not
    be read from; not a 4xx refusal (a 429 or invalid_request did nothing)."""
    if exc.outcome in (RefreshOutcome.TIMEOUT, RefreshOutcome.NETWORK_ERROR):
        return True
    refused = exc.status is not None and 400 <= exc.status < 500
    return exc.outcome is RefreshOutcome.SERVER_ERROR and not refused


def _changed_meanwhile(slug: str, exc: GenerationConflict | None = None) -> AccountChanged:
    if isinstance(exc, LeaseLost):
        log.warning(
            "this refresh outlasted its lease and another process took it over",
            extra={"account": slug},
        )
        return AccountChanged(slug, f"{exc}; retry", taken_over=True)
    log.warning("account changed during the refresh", extra={"account": slug})
    return AccountChanged(slug, f"account {slug!r} changed during the refresh; retry")


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
        # Per account held as needing re-authorization: the store's change hint when its
        # row was last looked at (`_reauthorized_elsewhere`).
        self._reauth_hints: dict[str, int] = {}
        # Accounts whose token is being tried for the first time (`first_exchange`).
        self._trying: set[str] = set()
        self._change_counter: int | None = None
        self._accounts: set[str] = set()
        self._store_retry_at = float("-inf")  # monotonic; see STORE_RETRY
        self._unpersisted: dict[str, _Unpersisted] = {}
        # Per account: one attempt at a time to store its held pair (`_persist`).
        self._persisting: dict[str, asyncio.Lock] = {}
        # Per account: the generation the last pair held here was stored as, which the
        # held token (generation -1) then is (a 401 on it is about that row's token).
        self._held_stored_as: dict[str, int] = {}
        self._closing = False  # `close` began: no new token call is started
        # Per account: the refresh token last sent without a usable answer, and when.
        self._unanswered: dict[str, tuple[Secret, float]] = {}
        # Per account: the generation the last refresh after a 401 made (or last refused
        # fresh), when, and whether NationBuilder refused it too (`may_cure_401`).
        self._after_401: dict[str, tuple[int, float, bool]] = {}

    # -- the request path --------------------------------------------------------------

    def cached_token(self, slug: str) -> IssuedToken | None:
        """The token `access_token` would return at once, or None when it would have to
        wait (no token in memory, or one due for renewal). No await: the hot path."""
        cached = self._cache.get(slug)
        if cached is not None and cached.refresh_at > self._clock.now():
            return cached
        return None

    async def access_token(self, slug: str) -> IssuedToken:
        """A token valid for at least the refresh margin (or the still-valid one in backoff)."""
        cached = self.cached_token(slug)
        if cached is not None:
            return cached
        return await self._single_flight(slug, force=False, stale_generation=None)

    def may_cure_401(
        self, slug: str, generation: int, *, replayable: bool = True, expired: bool = False
    ) -> bool:
        """Whether NationBuilder's 401 on a token of `generation` may be answered with a
        refresh (else only `newer_token`): not within REFRESH_401_HOLD of `refused_fresh`
        for the account, whatever the generation (another process's refresh makes a new
        one; MIN_REFRESH_INTERVAL when NationBuilder says the token `expired`: that a
        refresh can cure, but one answering so to every token must not rotate the pair on
        every request), nor, for a request that cannot be replayed (nothing would show
        whether the refresh cured it), within MIN_REFRESH_INTERVAL of the refresh after a
        401 that made this generation. No await: the hot path."""
        seen = self._after_401.get(slug)
        if seen is None:
            return True
        age = self._clock.monotonic() - seen[1]
        if seen[2]:
            return age >= (MIN_REFRESH_INTERVAL if expired else REFRESH_401_HOLD)
        made = self._refused_generation(slug, seen[0])  # a held pair's, stored since
        return made != generation or replayable or age >= MIN_REFRESH_INTERVAL

    def refused_fresh(self, slug: str, generation: int) -> None:
        """NationBuilder answered 401 to a token of `generation` given out after a 401 (by
        `force_refresh` or `newer_token`): the 401s are about something else, so further
        ones for the account cause no refresh for REFRESH_401_HOLD (`may_cure_401`)."""
        self._after_401[slug] = (generation, self._clock.monotonic(), True)

    async def newer_token(self, slug: str, generation: int) -> IssuedToken | None:
        """A valid token of another generation than `generation` that needs no refresh:
        the cached one, or the stored one (another process refreshed); None if neither
        is (a store failure included)."""
        generation = self._refused_generation(slug, generation)
        cached = self._still_valid(self._cache.get(slug))
        if cached is not None and cached.generation != generation:
            return cached
        try:
            account = await self._store.get_account(slug)
        except StoreError:
            return None
        if account is None or account.generation == generation or not self._usable(account, 0.0):
            return None
        return self._issue(account)

    def _refused_generation(self, slug: str, generation: int) -> int:
        """The generation a token NationBuilder refused belongs to: a held pair's token
        (generation -1) stored since is that row's (here or by the background round)."""
        if generation == -1 and slug not in self._unpersisted:
            return self._held_stored_as.get(slug, -1)
        return generation

    async def force_refresh(self, slug: str, stale_generation: int | None) -> IssuedToken:
        """After an upstream 401 on `stale_generation`: a token of a newer generation
        (remembered for `may_cure_401`)."""
        # Joins a refresh already in flight; if that one only re-issued the rejected
        # generation, _single_flight starts a forced refresh of its own.
        if stale_generation is not None:
            stale_generation = self._refused_generation(slug, stale_generation)
        token = await self._single_flight(slug, force=True, stale_generation=stale_generation)
        seen = self._after_401.get(slug)
        if seen is None or (not seen[2] and seen[0] != token.generation):
            self._after_401[slug] = (token.generation, self._clock.monotonic(), False)
        return token

    async def first_exchange(self, slug: str) -> IssuedToken:
        """`refresh_now` for a token just stored to be tried (an import): a refusal is the
        caller's to report (it removes the row), not an account needing re-authorization,
        so it is neither warned about nor alerted on."""
        self._trying.add(slug)
        try:
            return await self.refresh_now(slug)
        finally:
            self._trying.discard(slug)

    async def refresh_now(self, slug: str) -> IssuedToken:
        """Refresh at once (admin action), ignoring backoff; adopts a concurrent refresh."""
        account = await self._load(slug)
        self._backoff.pop(slug, None)
        held = self._unpersisted.get(slug)
        if held is not None:
            held.refresh_failures, held.refresh_retry_at = 0, 0.0
        return await self._single_flight(slug, force=True, stale_generation=account.generation)

    def only_account(self) -> str | None:
        """The slug of the one stored account, if exactly one exists (as of the last sync)."""
        if len(self._accounts) == 1:
            return next(iter(self._accounts))
        return None

    def is_account(self, slug: str) -> bool:
        """Whether `slug` is known to be stored: listed at the last sync, or a token of it
        loaded, refused or backing off since. Only such a slug may be a metric label."""
        return (
            slug in self._accounts
            or slug in self._cache
            or slug in self._needs_reauth
            or slug in self._backoff
        )

    def account_count(self) -> int:
        """How many accounts are stored (as of the last sync)."""
        return len(self._accounts)

    async def account_changed(self, slug: str) -> None:
        """This process changed `slug` in the store (connect, import, removal): start afresh."""
        self.invalidate(slug)
        await self.sync(force=True)

    def invalidate(self, slug: str) -> None:
        """Forget what is cached for `slug` (after connect, import or removal)."""
        self._cache.pop(slug, None)
        self._backoff.pop(slug, None)
        self._after_401.pop(slug, None)
        self._held_stored_as.pop(slug, None)
        self._needs_reauth.discard(slug)
        self._reauth_hints.pop(slug, None)
        pending = self._unpersisted.get(slug)
        if pending is not None:  # the next request looks at the row again before using it
            pending.next_attempt = 0.0

    async def _reauthorized_elsewhere(self, slug: str) -> bool:
        """Whether an account held here as needing re-authorization was reconnected (or
        removed) by another process since this one last looked: the store's change hint
        first (no I/O that waits), and a read of that one row only when the hint moved,
        at most once per move. Never a full reload, and nothing is ever marked here, so a
        late answer cannot undo a reconnect. Any failure keeps the account as it is."""
        try:
            hint = self._store.change_hint()
        except StoreError:
            return False
        if self._reauth_hints.get(slug) == hint:
            return False
        self._reauth_hints[slug] = hint  # before the read: concurrent requests skip it
        try:
            account = await self._store.get_account(slug)
        except StoreError:  # unavailable, or the row does not read (DecryptError ...)
            return False
        if account is not None and account.status is AccountStatus.NEEDS_REAUTH:
            return False
        if slug not in self._needs_reauth:
            return True  # cleared meanwhile (a sync, a reconnect here)
        self.invalidate(slug)
        if account is not None:
            self._metrics.needs_reauth.labels(slug).set(0)
        return True

    async def _single_flight(
        self, slug: str, *, force: bool, stale_generation: int | None
    ) -> IssuedToken:
        # A loop: a waiter that must still refresh after the task it joined looks again,
        # so several such waiters join one new task instead of each starting their own.
        while (running := self._inflight.get(slug)) is not None and not running[0].done():
            task, task_forced = running
            # Counted when joining for a listed account; for one stored since the last sync
            # (perhaps by another process), once the refresh has shown that it exists, so a
            # slug that is not an account (or one the store could not be asked about) never
            # gets a label.
            listed = slug in self._accounts
            if listed:
                self._metrics.refresh_coalesced.labels(slug).inc()
            try:
                result = await self._wait_refresh(slug, task, force)
            except (TokenUnavailable, StoreUnavailable) as exc:
                if isinstance(exc, TokenUnavailable) and not listed:
                    # The refresh found the account, then failed.
                    self._metrics.refresh_coalesced.labels(slug).inc()
                if force or not isinstance(exc, (RefreshBackoff, StoreUnavailable)):
                    raise
                # The refresh backs off, or could not use the store: a caller that only
                # needs a valid token keeps the one it has.
                cached = self._still_valid(self._cache.get(slug))
                if cached is not None:
                    return cached
                if not task_forced:
                    raise  # the failure of a refresh made for what this caller needs
                # A forced one (admin, background) failed: this caller gets its token from
                # a shared refresh of its own kind (which returns the still-valid stored
                # token without a token call while backing off, and when the store cannot
                # take a refresh). Never _obtain in this task: a client that goes away
                # would cancel it, and the callers that joined would each call the token
                # endpoint with the same refresh token.
                continue
            if not listed:
                self._metrics.refresh_coalesced.labels(slug).inc()
            if stale_generation is not None:  # the held pair refused may be stored by now
                stale_generation = self._refused_generation(slug, stale_generation)
            if not force or task_forced or result.generation != stale_generation:
                return result
        task = asyncio.create_task(self._obtain(slug, force, stale_generation))
        self._inflight[slug] = (task, force)
        task.add_done_callback(lambda _t: self._forget_task(slug, task))
        return await self._wait_refresh(slug, task, force)

    async def _wait_refresh(
        self, slug: str, task: asyncio.Task[IssuedToken], force: bool
    ) -> IssuedToken:
        """What the refresh `task` gives. shield: a cancelled caller (client went away)
        must not cancel the refresh that other callers, and the durability of the rotated
        token, depend on. A caller that only needs a valid token waits at most MARGIN_WAIT
        s, then goes on with the one held, or with the stored one the refresh found still
        valid (while it waits for another process that holds the account's lock)."""
        cached = None if force else self._still_valid(self._cache.get(slug))
        if cached is None:
            if not force:
                # Nothing valid held yet. The refresh may find a stored token that is
                # still valid (it goes into the cache) and then wait for another process's
                # lock: after MARGIN_WAIT, go on with that token too.
                await asyncio.wait({task}, timeout=MARGIN_WAIT)
                cached = None if task.done() else self._still_valid(self._cache.get(slug))
                if cached is not None:
                    return cached
            return await asyncio.shield(task)
        try:
            return await asyncio.wait_for(asyncio.shield(task), MARGIN_WAIT)
        except TimeoutError:
            return cached

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

    def effective_margin(self, expires_at: float, issued_at: float | None) -> float:
        """The refresh margin for one token: never more than half its lifetime, so a token
        that lives shorter than the margin is not refreshed on every request."""
        if issued_at is None or issued_at >= expires_at:
            return self.margin
        return min(self.margin, (expires_at - issued_at) / 2)

    def _due(self, expires_at: float, issued_at: float | None, lead: float) -> bool:
        """Whether the background refresher should renew a token now: it expires within
        its effective margin + `lead` (the loop's own pace), but never while more than half
        its lifetime is left, nor within MIN_REFRESH_INTERVAL of its issue while valid: a
        token living shorter than margin + lead would otherwise be due as soon as it is
        issued, and every process would rotate it again."""
        now = self._clock.now()
        if issued_at is not None and now - issued_at < MIN_REFRESH_INTERVAL and expires_at > now:
            return False
        threshold = self.effective_margin(expires_at, issued_at) + lead
        if issued_at is not None and issued_at < expires_at:
            threshold = min(threshold, (expires_at - issued_at) / 2)
        return expires_at - now <= threshold

    def _usable(self, account: Account, threshold: float | None) -> bool:
        """A valid token for longer than `threshold` seconds (None: the effective margin)."""
        if (
            account.status is not AccountStatus.ACTIVE
            or account.access_token is None
            or account.expires_at is None
        ):
            return False
        if threshold is None:
            threshold = self.effective_margin(account.expires_at, account.last_refresh_at)
            now = self._clock.now()
            recent = (
                account.last_refresh_at is not None
                and now - account.last_refresh_at < MIN_REFRESH_INTERVAL
            )
            if recent and account.expires_at > now:
                return True  # refreshed moments ago: keep it rather than rotate again
        return account.expires_at - self._clock.now() > threshold

    def _issue(self, account: Account) -> IssuedToken:
        assert account.access_token is not None and account.expires_at is not None
        margin = self.effective_margin(account.expires_at, account.last_refresh_at)
        token = IssuedToken(
            account.access_token,
            account.generation,
            account.expires_at,
            account.expires_at - margin,
        )
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
        return 0.0 if state is None else max(0.0, state.next_attempt_at - self._clock.monotonic())

    def _still_valid(self, token: IssuedToken | None) -> IssuedToken | None:
        """`token` if it has not expired yet (inside the margin is fine), else None."""
        if token is not None and token.expires_at > self._clock.now():
            return token
        return None

    async def _obtain(self, slug: str, force: bool, stale_generation: int | None) -> IssuedToken:
        while slug in self._unpersisted:  # another held pair may replace one stored meanwhile
            issued = await self._from_unpersisted(slug, force)
            if issued is not None:
                return issued
        if stale_generation is not None:  # the held pair stored just now, say
            stale_generation = self._refused_generation(slug, stale_generation)
        if slug in self._needs_reauth and not await self._reauthorized_elsewhere(slug):
            raise self._reauth_error(slug)
        backing_off = self._backoff_wait(slug) > 0
        store_away = self._clock.monotonic() < self._store_retry_at
        if (backing_off or store_away) and not force:
            # Keep using a still-valid token without touching the store meanwhile.
            cached = self._still_valid(self._cache.get(slug))
            if cached is not None:
                return cached
        try:
            return await self._obtain_from_store(slug, force, stale_generation, backing_off)
        except StoreUnavailable as exc:
            # The database is away: a token that has not expired serves on (the refresh
            # waits for the database, which must keep its result) instead of a 503 for
            # the last NBGW_REFRESH_MARGIN of its life. (One account's lock held too long
            # elsewhere says nothing of the database: the other accounts use it as ever.)
            if not isinstance(exc, RefreshLockBusy):
                self._store_retry_at = self._clock.monotonic() + STORE_RETRY
            if slug in self._unpersisted:  # rotated, then the store failed: the new pair
                return self._issue_unpersisted(slug)
            cached = None if force else self._still_valid(self._cache.get(slug))
            if cached is None:
                raise
            return cached

    async def _obtain_from_store(
        self, slug: str, force: bool, stale_generation: int | None, backing_off: bool
    ) -> IssuedToken:
        # Without the lock first: another process may already have refreshed.
        account = await self._load(slug)
        if account.status is AccountStatus.NEEDS_REAUTH:
            self._mark_reauth_seen(slug)
            raise self._reauth_error(slug)
        newer = account.generation != stale_generation or not force
        if newer and self._usable(account, 0.0 if force else None):
            return self._issue(account)
        if backing_off:
            if not force and self._usable(account, 0.0):
                return self._issue(account)  # inside the margin, but still valid
            raise RefreshBackoff(
                slug,
                f"refreshing the token of {slug!r} failed recently; retrying later",
                self._backoff_wait(slug),
            )
        if not force and self._usable(account, 0.0):
            # Due, but valid still: a caller may go on with it while the refresh waits.
            self._issue(account)
        try:
            return await self._refresh_locked(slug, force, stale_generation)
        except StoreUnavailable:
            if not force and self._usable(account, 0.0) and slug not in self._unpersisted:
                return self._issue(account)  # read, but cannot be refreshed: still valid
            raise

    async def _refresh_locked(
        self, slug: str, force: bool, stale_generation: int | None
    ) -> IssuedToken:
        failure: OAuthError | None = None
        reauth = marked = False
        reason = "no refresh token is stored"
        async with self._store.refresh_lock(slug) as locked:
            account = await locked.read()
            if account.status is AccountStatus.NEEDS_REAUTH:
                reauth = True
                reason = account.last_error or reason
            elif (account.generation != stale_generation or not force) and self._usable(
                account, 0.0 if force else None
            ):
                return self._issue(account)  # adopted: someone else refreshed
            elif account.refresh_token is None:
                await self._mark_needs_reauth(locked, reason)
                reauth = marked = True
            elif not force and (wait := self._failed_elsewhere(slug, account)) is not None:
                if self._usable(account, 0.0):
                    return self._issue(account)  # still valid: keep using it meanwhile
                raise RefreshBackoff(
                    slug,
                    f"refreshing the token of {slug!r} failed moments ago in another gateway "
                    "process; retrying later",
                    wait,
                )
            else:
                if locked.interrupted_at is not None:
                    # Known only under the lock: a marker seen in a listing may be a live
                    # sibling's refresh, which leaves a new generation (adopted above).
                    log.warning(
                        "a refresh was in flight when a gateway process stopped; refreshing now",
                        extra={"account": slug},
                    )
                self._refuse_when_closing(slug)
                # Durably note the call before making it: if this process dies while
                # NationBuilder answers, the next start knows the refresh token may be spent.
                began = self._clock.monotonic()  # the lease's deadline is renewed from here
                try:
                    await locked.begin_refresh()
                except GenerationConflict as conflict:
                    # Another row's token, not this refresh's to send. A re-connect or an
                    # import that stored a usable pair meanwhile is served as it is (not
                    # to an import's own exchange, which it is not the outcome of).
                    if not isinstance(conflict, LeaseLost) and slug not in self._trying:
                        current = await locked.read()
                        if self._usable(current, 0.0):
                            return self._issue(current)
                    raise _changed_meanwhile(slug, conflict) from None
                try:
                    tokens = await self._call_token_endpoint(slug, account.refresh_token)
                except OAuthError as exc:
                    failure = exc
                    if exc.rotated_refresh_token is not None:
                        await self._keep_rotated(locked, account, exc, began)
                    elif exc.outcome.terminal:
                        current = await locked.read()
                        if current.refresh_token == account.refresh_token:
                            unanswered = self._unanswered_with(slug, account)
                            reason = self._terminal_reason(
                                exc, locked.interrupted_at, unanswered or locked.unanswered_at
                            )
                            await self._mark_needs_reauth(locked, reason)
                            reauth = marked = True
                        elif slug in self._trying:
                            # An import's token refused, and another one stored meanwhile
                            # (a /connect): not this import's success.
                            raise _changed_meanwhile(slug) from None
                        elif self._usable(current, 0.0):
                            return self._issue(current)
                    else:
                        lost = _answer_lost(exc)
                        if lost:
                            # NationBuilder may have rotated in a call whose answer was lost.
                            self._unanswered[slug] = (account.refresh_token, self._clock.now())
                        # In the row too, for the next try whichever process makes it;
                        # not in a row stored meanwhile (a re-connect), which this call
                        # says nothing of.
                        try:
                            await locked.record_failure(str(exc), unanswered=lost)
                        except GenerationConflict as conflict:
                            raise _changed_meanwhile(slug, conflict) from None
                else:
                    self._unanswered.pop(slug, None)
                    saved = await self._save_rotated(locked, account, tokens, began)
                    if saved is None:
                        self._refreshed(slug)  # held, but refreshed: the backoff is over
                        return self._issue_unpersisted(slug)
                    account = saved
        # Leaving the block released the lease; the new pair (or the failure) is committed.
        if reauth:
            self._mark_reauth_seen(slug, reason=reason, marked_here=marked)
            raise self._reauth_error(slug)
        if failure is not None:
            return self._after_transient_failure(slug, failure, force, account)
        self._refreshed(slug)
        return self._issue(account)

    def _refreshed(self, slug: str) -> None:
        """A refresh succeeded: its backoff ends, and the metric and log say so."""
        self._backoff.pop(slug, None)
        self._metrics.last_refresh_success.labels(slug).set(self._clock.now())
        log.info("refreshed token", extra={"account": slug, "outcome": "success"})

    def _unanswered_with(self, slug: str, account: Account) -> float | None:
        """When this process last sent `account`'s refresh token without a usable answer."""
        sent = self._unanswered.get(slug)
        if sent is None or account.refresh_token is None or sent[0] != account.refresh_token:
            return None
        return sent[1]

    @staticmethod
    def _terminal_reason(
        exc: OAuthError, interrupted_at: float | None, unanswered_at: float | None = None
    ) -> str:
        if interrupted_at is not None:
            when = iso_utc(interrupted_at) or "an unknown time"
            return (
                f"the gateway stopped during a refresh (at {when}) and NationBuilder no longer "
                f"accepts the refresh token it held: {exc}"
            )
        if unanswered_at is not None:
            when = iso_utc(unanswered_at) or "an unknown time"
            return (
                f"a refresh at {when} got no usable answer (timeout, dropped connection or "
                "server error), and NationBuilder no longer accepts the refresh token sent "
                f"then: it probably rotated it in that call: {exc}"
            )
        return str(exc)

    # -- rotated pairs the store could not take ---------------------------------------------

    async def _save_rotated(
        self, locked: AccountLock, account: Account, tokens: TokenSet, began: float
    ) -> Account | None:
        """Commit a fresh pair. None when the store refused it: the pair is kept in memory."""
        try:
            return await locked.save_tokens(tokens)
        except GenerationConflict as conflict:
            await self._unless_replaced(locked, account, conflict)
            held = _Unpersisted(tokens.refresh_token, tokens, account.refresh_token, str(conflict))
            self._hold(locked.slug, held, began)
            return None
        except StoreError as exc:
            locked.keep()  # the stored refresh token is spent: others wait for this pair
            self._hold(
                locked.slug,
                _Unpersisted(tokens.refresh_token, tokens, account.refresh_token, str(exc)),
                began,
            )
            return None

    async def _unless_replaced(
        self, locked: AccountLock, account: Account, conflict: GenerationConflict
    ) -> None:
        """After a conflict on storing what NationBuilder issued: raise AccountChanged when
        an admin replaced (or removed) the row meanwhile, whose pair wins and ours is
        dropped unused. Return when the row still holds the refresh token this refresh
        consumed and only its status moved (another process that took a lapsed lease over
        was refused that spent token and marked the account): the new pair is held and
        stored over it (`_persist`)."""
        try:
            current = await locked.read()
        except AccountNotFound:
            raise _changed_meanwhile(locked.slug, conflict) from None
        except StoreError:
            return  # cannot tell now: held, and `_persist` compares once it can read
        if current.refresh_token != account.refresh_token:
            raise _changed_meanwhile(locked.slug, conflict) from None

    @staticmethod
    async def _mark_needs_reauth(locked: AccountLock, reason: str) -> None:
        """Mark the account as needing re-authorization, unless it changed meanwhile (a
        re-connect or an import stored another token: the refused one was not it)."""
        try:
            await locked.mark_needs_reauth(reason)
        except GenerationConflict as conflict:
            raise _changed_meanwhile(locked.slug, conflict) from None

    async def _keep_rotated(
        self, locked: AccountLock, account: Account, exc: OAuthError, began: float
    ) -> None:
        """The answer was refused but NationBuilder rotated: store its refresh token first."""
        assert exc.rotated_refresh_token is not None
        try:
            await locked.save_refresh_token(exc.rotated_refresh_token, str(exc))
        except GenerationConflict as conflict:
            # Removed or connected again meanwhile: the rotated token is the old row's, and
            # neither held nor used for what is stored now. (Marked meanwhile only: held.)
            await self._unless_replaced(locked, account, conflict)
            self._hold(
                locked.slug,
                _Unpersisted(exc.rotated_refresh_token, None, account.refresh_token, str(exc)),
                began,
            )
        except StoreError as store_exc:
            locked.keep()
            self._hold(
                locked.slug,
                _Unpersisted(
                    exc.rotated_refresh_token, None, account.refresh_token, str(store_exc)
                ),
                began,
            )

    def _hold(self, slug: str, pending: _Unpersisted, began: float) -> None:
        """Hold `pending`, made by the token call begun (its lease renewed) at `began`."""
        self._unpersisted[slug] = pending
        pending.issued_at = self._clock.now()
        pending.next_attempt = self._clock.monotonic() + PERSIST_RETRY_BASE
        pending.claimed_at = began
        self._metrics.persist_failures.labels(slug).inc()
        self._metrics.unpersisted.labels(slug).set(1)
        log.error(
            "the store refused a rotated token pair; keeping it in memory and retrying",
            extra={"account": slug, "error": pending.message},
        )

    def _issue_unpersisted(self, slug: str) -> IssuedToken:
        pending = self._unpersisted[slug]
        if pending.tokens is None or pending.tokens.expires_at <= self._clock.now():
            raise RefreshBackoff(
                slug, f"the token of {slug!r} cannot be stored right now; retrying", 5.0
            )
        return self._issue_held(slug, pending.tokens, pending.issued_at)

    def _issue_held(self, slug: str, tokens: TokenSet, issued_at: float) -> IssuedToken:
        margin = self.effective_margin(tokens.expires_at, issued_at)
        # A generation no stored row has: a 401 on it forces a refresh from memory.
        token = IssuedToken(tokens.access_token, -1, tokens.expires_at, tokens.expires_at - margin)
        self._cache[slug] = token
        return token

    async def close(self, grace: float) -> None:
        """Before the store and the HTTP session close: let the refreshes in flight finish
        (a background refresh whose caller was cancelled included; NationBuilder may have
        rotated already, so abandoning the call could lose the only working refresh token),
        then try once more to store the pairs held in memory. Bounded by `grace` s. No
        token call starts after this began (a refresh still waiting for another process's
        lock gets a 503)."""
        self._closing = True
        tasks = [task for task, _forced in self._inflight.values()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace  # real time: how long a stop may take
        if tasks:
            log.info("waiting for token refreshes in flight", extra={"count": len(tasks)})
            await asyncio.wait(tasks, timeout=grace)
        if self._unpersisted:
            left = max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.persist_pending(force=True)
        if self._unpersisted or any(not task.done() for task in tasks):
            log.error(
                "stopping with token refreshes unfinished or pairs held only in memory",
                extra={"accounts": ", ".join(sorted({*self._unpersisted, *self._inflight}))},
            )

    @property
    def unpersisted(self) -> list[str]:
        """Accounts whose current pair exists only in memory (the store refused it)."""
        return sorted(self._unpersisted)

    async def persist_pending(self, *, force: bool = False) -> None:
        """Try again to store every pair held in memory (each on its own backoff), side by
        side: a slow failure of one does not hold back the others' attempts, each of which
        renews its account's kept marker."""
        now = self._clock.monotonic()
        due = [
            self._persist(slug, pending)
            for slug, pending in list(self._unpersisted.items())
            # (one the request path is handling right now is left to it)
            if slug not in self._inflight and (force or pending.next_attempt <= now)
        ]
        outcomes = await asyncio.gather(*due, return_exceptions=True)
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for extra in failed[1:]:
            log.error("storing a held token pair failed", exc_info=extra)
        if failed:
            raise failed[0]

    async def _persist(self, slug: str, pending: _Unpersisted) -> bool:
        """Store a held pair if the account still holds the token it replaced. True once
        `pending` is no longer held (stored, obsolete, or stored by another attempt)."""
        failures = pending.failures
        async with self._persisting.setdefault(slug, asyncio.Lock()):
            if self._unpersisted.get(slug) is not pending:
                return True  # another attempt stored it meanwhile: look again
            if pending.failures != failures:
                return False  # another attempt failed meanwhile: not a second wait now
            return await self._persist_held(slug, pending)

    async def _persist_held(self, slug: str, pending: _Unpersisted) -> bool:
        level, outcome = logging.INFO, "the account of a held token pair was removed"
        removed = granted = False
        started = self._clock.monotonic()
        try:
            for attempt in (1, 2):  # a conflict (the row written meanwhile): read it again
                try:
                    async with self._store.refresh_lock(slug) as locked:
                        granted = True  # the kept marker's deadline is one lease from now
                        pending.claimed_at = started
                        level, outcome = await self._store_held(locked, pending)
                    break
                except GenerationConflict:
                    if attempt == 2:
                        raise
        except AccountNotFound:
            removed = True  # removed meanwhile: nothing to keep
        except StoreError as exc:
            pending.failures += 1
            delay = min(PERSIST_RETRY_CAP, PERSIST_RETRY_BASE * 2 ** min(pending.failures, 10))
            now = self._clock.monotonic()
            if granted:
                # Locks are granted, writes fail (a full disk, a statement timeout): the next
                # lock renews the marker before it lapses, or processes elsewhere would take
                # it over and send the spent refresh token.
                renew_by = started + self._store.lease / 3
                delay = min(delay, max(PERSIST_RETRY_BASE, renew_by - now))
            else:
                pending.claimed_at = None  # the store is away: nobody else can lock either
            pending.next_attempt = now + delay
            self._metrics.persist_failures.labels(slug).inc()
            log.warning(
                "still cannot store the held token pair",
                extra={"account": slug, "error": str(exc), "retry_in": delay},
            )
            return False
        if self._unpersisted.get(slug) is pending:
            del self._unpersisted[slug]
        if pending.stored_generation is not None:
            self._held_stored_as[slug] = pending.stored_generation
        else:
            self._held_stored_as.pop(slug, None)
        if pending.stored_generation is not None and slug in self._needs_reauth:
            # Stored over another process's refusal of the spent refresh token: active.
            self._needs_reauth.discard(slug)
            self._reauth_hints.pop(slug, None)
            self._metrics.needs_reauth.labels(slug).set(0)
        if pending.stored_generation is not None and (
            pending.stored_failure_at is not None or pending.refresh_failures
        ):
            self._carry_backoff(slug, pending, pending.stored_generation)
        self._cache.pop(slug, None)
        if not removed:  # a removed account's series go with it (`sync`)
            self._metrics.unpersisted.labels(slug).set(0)
        log.log(level, outcome, extra={"account": slug})
        return True

    def _carry_backoff(self, slug: str, pending: _Unpersisted, generation: int) -> None:
        """After this process stored a held pair: the held pair's refresh backoff becomes
        the stored one's, and a refresh token stored alone (its refusal recorded in the
        row) counts as this process's own failure, not another process's
        (`_failed_elsewhere`)."""
        state = self._backoff.get(slug)
        failed_at = pending.stored_failure_at or self._clock.now()
        self._backoff[slug] = _Backoff(
            max(pending.refresh_failures, state.failures if state else 1),
            max(pending.refresh_retry_at, state.next_attempt_at if state else 0.0),
            generation,
            max(failed_at, state.failed_at if state else 0.0),
        )

    @staticmethod
    async def _store_held(locked: AccountLock, pending: _Unpersisted) -> tuple[int, str]:
        """Store the held pair under the lock; the log level and line saying what became
        of it. Whatever fails keeps the marker: the pair is still held here only, and the
        other processes must go on waiting for it."""
        try:
            current = await locked.read()
            tokens = pending.tokens
            if current.refresh_token == pending.refresh_token and (
                tokens is None or current.access_token == tokens.access_token
            ):
                # A write that reported a failure had committed it after all. (The same
                # refresh token with another access token: an answer that did not rotate.)
                pending.stored_generation = current.generation
                return logging.INFO, "the held token pair had been stored after all"
            if not pending.supersedes(current.refresh_token):
                # Re-connected (or removed and re-added) meanwhile: the held pair is obsolete.
                return logging.WARNING, "dropping a held token pair: the account changed"
            if tokens is not None:
                saved = await locked.save_tokens(tokens)
            else:
                saved = await locked.save_refresh_token(pending.refresh_token, pending.message)
        except BaseException:  # a cancelled attempt (a stop cut short) included
            locked.keep()
            raise
        pending.stored_generation = saved.generation
        if saved.last_error is not None:  # a refresh token alone: its refusal is recorded
            pending.stored_failure_at = saved.updated_at
        return logging.INFO, "stored the held token pair"

    async def _from_unpersisted(self, slug: str, force: bool) -> IssuedToken | None:
        """Serve (or refresh) from a held pair; None once it is stored (use the store again)."""
        pending = self._unpersisted[slug]
        mono = self._clock.monotonic()
        # A token call from memory that failed is not repeated on every request, nor on a
        # 401 or the background round: it backs off as a stored pair's refresh does.
        waiting = pending.refresh_retry_at > mono
        refresh = (force or self._held_due(pending, 0.0)) and not waiting
        # Before the first token call, the store again whatever its backoff: the write
        # that failed may have committed the pair after all (and cleared the marker), so
        # another process may refresh it from the row; once stored, it is refreshed under
        # the lock. After a failed retry the store is known to be away: its schedule only.
        # And before a token call whose lock was granted more than RENEW_BEFORE_CALL ago
        # (writes failing, locks granted): the attempt renews the kept marker, which must
        # outlast the call.
        renew = pending.claimed_at is not None and mono - pending.claimed_at > RENEW_BEFORE_CALL
        tried = (refresh and (pending.failures == 0 or renew)) or pending.next_attempt <= mono
        if tried and await self._persist(slug, pending):
            if force and not waiting and pending.stored_generation is not None:
                return await self._refresh_locked(slug, True, pending.stored_generation)
            return None
        tokens = pending.tokens
        now = self._clock.now()
        if not refresh:
            if waiting and (force or tokens is None or tokens.expires_at <= now):
                # The old access token of a refused rotation (its successor held alone)
                # serves on while valid, as a stored pair's would.
                cached = None if force else self._still_valid(self._cache.get(slug))
                if cached is not None:
                    return cached
                raise RefreshBackoff(
                    slug,
                    f"refreshing the token of {slug!r} failed recently; retrying later",
                    pending.refresh_retry_at - mono,
                )
            return self._issue_unpersisted(slug)
        # Still not stored: the marker the failed write kept makes the other processes
        # wait, so only this one holds the valid refresh token, and refreshing it needs no
        # lock. The consumed one is never sent again. (Not so if that write committed
        # after all and the store is away for this process only: then another process
        # may refresh the row's copy too; see docs/architecture.md.)
        self._refuse_when_closing(slug)
        try:
            fresh = await self._call_token_endpoint(slug, pending.refresh_token)
        except OAuthError as exc:
            if exc.rotated_refresh_token is not None:
                pending.replace(exc.rotated_refresh_token, None)
            pending.refresh_failures += 1
            delay = self._failure_delay(pending.refresh_failures, exc)
            pending.refresh_retry_at = self._clock.monotonic() + delay
            log.warning(
                "token refresh of a pair held in memory failed; backing off",
                extra={"account": slug, "outcome": exc.outcome.value, "retry_in": round(delay, 1)},
            )
            if tokens is not None and tokens.expires_at > now and not force:
                # Still valid, whether or not the refused answer rotated the refresh token.
                return self._issue_held(slug, tokens, pending.issued_at)
            raise RefreshBackoff(
                slug, f"refreshing the token of {slug!r} failed: {exc}", delay
            ) from None
        pending.replace(fresh.refresh_token, fresh)
        pending.issued_at = now
        pending.refresh_failures, pending.refresh_retry_at = 0, 0.0
        self._refreshed(slug)
        # Stored now if its retry is due (not twice in one call); else on its schedule
        # (`persist_pending`), so a hung store does not hold this request a second time.
        due = not tried and pending.next_attempt <= self._clock.monotonic()
        if due and await self._persist(slug, pending):
            return None
        return self._issue_unpersisted(slug)

    def _refuse_when_closing(self, slug: str) -> None:
        """No token call starts once `close` began: it would not be waited for, and an
        answer cut off may cost the only working refresh token."""
        if self._closing:
            raise RefreshBackoff(slug, f"the gateway is stopping; {slug!r} is not refreshed", 1.0)

    def _held_due(self, pending: _Unpersisted, lead: float) -> bool:
        """Whether a held pair needs refreshing within `lead` seconds (as `_usable` judges a
        stored one: inside its effective margin, and not refreshed moments ago)."""
        tokens = pending.tokens
        if tokens is None:
            return True  # no usable access token: only a refresh yields one
        return self._due(tokens.expires_at, pending.issued_at, lead)

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
            self._metrics.last_refresh_failure.labels(slug).set(self._clock.now())
            raise
        finally:
            in_flight.dec()
            self._metrics.refresh_duration.labels(slug).observe(self._clock.monotonic() - started)
            self._metrics.refresh_total.labels(slug, outcome.value).inc()

    def _failed_elsewhere(self, slug: str, account: AccountInfo) -> float | None:
        """Seconds to back off when the row records a transient refresh failure that
        another process made since this one last failed: it counts as this process's own
        next failure, so the processes sharing a store back off together (one retry
        schedule per account, not one per process). None when there is none to wait for."""
        if account.last_error is None or account.updated_at is None:
            return None
        state = self._backoff.get(slug)
        if state is not None and account.updated_at <= state.failed_at:
            return None  # this process's own failure (or older), whose wait is over
        failures = 1 if state is None else state.failures + 1
        policy = self._backoff_policy
        wait = min(account.updated_at + policy.delay(failures) - self._clock.now(), policy.cap)
        if wait <= 0:
            return None
        self._backoff[slug] = _Backoff(
            failures, self._clock.monotonic() + wait, account.generation, account.updated_at
        )
        log.info(
            "token refresh failed in another gateway process; backing off with it",
            extra={"account": slug, "retry_in": round(wait, 1)},
        )
        return wait

    def _failure_delay(self, failures: int, exc: OAuthError) -> float:
        """The wait after the `failures`-th failed refresh in a row: the policy's, and at
        least the endpoint's own Retry-After (up to the cap)."""
        delay = self._backoff_policy.delay(failures)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self._backoff_policy.cap))
        return delay

    def _after_transient_failure(
        self, slug: str, exc: OAuthError, force: bool, account: Account
    ) -> IssuedToken:
        state = self._backoff.get(slug)
        failures = 1 if state is None else state.failures + 1
        delay = self._failure_delay(failures, exc)
        retry_at = self._clock.monotonic() + delay
        self._backoff[slug] = _Backoff(failures, retry_at, account.generation, self._clock.now())
        held = self._unpersisted.get(slug)
        if held is not None:
            # The refused answer's rotated refresh token, held (the store refused it too):
            # its refresh from memory waits as the stored pair's would.
            held.refresh_failures = max(held.refresh_failures, failures)
            held.refresh_retry_at = max(held.refresh_retry_at, retry_at)
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
        if not marked_here or slug in self._trying:
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
            self._metrics.account_known(info.slug)
            if info.slug in self._unpersisted:
                # The pair held here is newer than the row: its token stays cached, and a
                # refusal of the spent one recorded meanwhile (needs re-authorization) is
                # stored over. The row is looked at again when the pair is stored.
                continue
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
        """Refresh every active account whose token expires within its margin + `lead` seconds.

        Accounts in backoff are skipped until their next attempt, and so are those whose
        refresh failed moments ago in another process (`_failed_elsewhere`), so the
        processes sharing a store back off together here too. Refreshes run concurrently
        (bounded), so one slow nation does not hold up the others. Returns the slugs tried.
        """
        now = self._clock.monotonic()
        due: list[AccountInfo] = []
        for info in await self._store.list_accounts():
            if info.status is not AccountStatus.ACTIVE or info.expires_at is None:
                continue
            held = self._unpersisted.get(info.slug)
            if held is not None:
                # The row is stale: the pair held in memory is the one that counts.
                if not self._held_due(held, lead) or held.refresh_retry_at > now:
                    continue
            elif not self._due(info.expires_at, info.last_refresh_at, lead):
                continue
            state = self._backoff.get(info.slug)
            if state is not None and state.next_attempt_at > now:
                continue
            if held is None and self._failed_elsewhere(info.slug, info) is not None:
                continue  # another process's refresh failed moments ago: back off with it
            due.append(info)
        await self._refresh_each(due, "background refresh failed")
        return [info.slug for info in due]

    async def retry_after_backoff(self) -> list[str]:
        """Refresh every active account whose backoff after a failed refresh has ended.

        A failure (an admin's "Refresh now", a refresh on the request path) sets a backoff
        and the admin page promises a retry when it ends; `refresh_due` alone would wait
        until the token nears expiry. A further failure backs off longer (up to the cap);
        success, or another process having refreshed meanwhile (a newer generation with no
        error: not this process's own keeping of a rotated refresh token whose answer it
        refused), ends the backoff: that pair is not refreshed again. Another process's
        later failure starts a new wait instead (`_failed_elsewhere`): one retry per step
        of the schedule, whichever process makes it, not one from each.
        """
        now = self._clock.monotonic()
        ended = {slug: s for slug, s in self._backoff.items() if s.next_attempt_at <= now}
        if not ended:
            return []
        due = []
        for info in await self._store.list_accounts():
            state = ended.get(info.slug)
            if state is None or info.status is not AccountStatus.ACTIVE:
                continue
            if info.generation != state.generation and info.last_error is None:
                log.info(
                    "refreshed by another process during the backoff; not retried",
                    extra={"account": info.slug},
                )
                continue
            if self._failed_elsewhere(info.slug, info) is not None:
                continue  # another process retried and failed since: back off with it
            due.append(info)
        await self._refresh_each(due, "retrying a failed refresh failed")
        for slug, state in ended.items():
            if self._backoff.get(slug) is state:  # not failed again: nothing left to retry
                del self._backoff[slug]
        return [info.slug for info in due]

    async def recover_interrupted(self) -> list[str]:
        """Refresh at once every account whose store row still carries a "refresh in flight"
        marker (a process stopped during its token call). If NationBuilder then refuses the
        refresh token, the account's needs-reauth reason says the gateway stopped mid-refresh.

        A marker may also be a sibling's refresh that is running right now (workers start
        together): the lock waits for it, its new pair is adopted, and nothing is logged.
        Only a refresh that finds a stopped holder's marker under the lock warns."""
        stranded = [
            info
            for info in await self._store.list_accounts()
            if info.status is AccountStatus.ACTIVE and info.refresh_started_at is not None
        ]
        await self._refresh_each(stranded, "recovering an interrupted refresh failed")
        return [info.slug for info in stranded]

    async def _refresh_each(self, infos: list[AccountInfo], failure_message: str) -> None:
        limit = asyncio.Semaphore(REFRESH_CONCURRENCY)

        async def one(info: AccountInfo) -> None:
            async with limit:
                try:
                    await self._single_flight(
                        info.slug, force=True, stale_generation=info.generation
                    )
                except (TokenUnavailable, AccountNotFound):
                    pass  # recorded and logged where it happened
                except StoreUnavailable as exc:  # an outage: one line, tried next round
                    log.warning(failure_message, extra={"account": info.slug, "error": str(exc)})
                except Exception:
                    log.exception(failure_message, extra={"account": info.slug})

        await asyncio.gather(*(one(info) for info in infos))

    async def prefetch(self) -> int:
        """Hold in memory the token of every active account this process holds none of
        (one read each), so that any process (a `--workers` worker, a replica) serves every
        account from memory: without a store read on its first request, and while the
        store is down. Tokens due for refresh are left to the refresher. Returns how many
        were loaded; a store outage is raised (`run` tries again once the store is back)."""
        loaded = 0
        for info in await self._store.list_accounts():
            slug = info.slug
            if (
                info.status is not AccountStatus.ACTIVE
                or slug in self._cache
                or slug in self._inflight
                or slug in self._unpersisted
            ):
                continue
            try:
                account = await self._store.get_account(slug)
            except StoreUnavailable:
                raise  # the loop reports the outage, and prefetches again afterwards
            except StoreError:
                continue  # an unreadable row: its requests report it
            if (
                account is not None
                and slug not in self._cache  # meanwhile (the awaits above) nothing
                and slug not in self._needs_reauth  # changed it in this process
                and slug not in self._inflight
                and self._usable(account, None)
            ):
                self._issue(account)
                loaded += 1
        return loaded

    async def run(self, *, refresh_interval: float = 30.0, sync_interval: float = 1.0) -> None:
        """Background loop: recover interrupted refreshes once, then notice other processes'
        changes (holding every account's token in memory), retry storing held pairs, retry
        refreshes whose backoff ended, and refresh tokens ahead of time."""
        # Held pairs in a loop of their own, from the start: the recovery or a round below
        # that waits for a lock or a slow store does not delay the attempts that renew
        # their kept markers.
        keeper = asyncio.create_task(self._keep_persisting(sync_interval))
        try:
            try:
                await self.recover_interrupted()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("recovering interrupted refreshes failed; continuing")
            await self._maintain(refresh_interval, sync_interval)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_persisting(self, interval: float) -> None:
        while True:
            await background_round(log, "storing held token pairs", self.persist_pending)
            await asyncio.sleep(interval)

    async def _maintain(self, refresh_interval: float, sync_interval: float) -> None:
        since_refresh = refresh_interval
        changed = True  # the start: nothing is held yet

        async def one_round() -> None:
            nonlocal since_refresh, changed
            changed = await self.sync() or changed
            await self.retry_after_backoff()
            if since_refresh >= refresh_interval:
                since_refresh = 0.0
                await self.refresh_due(lead=2 * refresh_interval)
            if changed:  # last: an outage here delays none of the above
                await self.prefetch()
                changed = False

        while True:
            await background_round(log, "token maintenance", one_round)
            await asyncio.sleep(sync_interval)
            since_refresh += sync_interval
