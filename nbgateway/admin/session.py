"""Admin sessions for the `/connect` pages: signed cookies, CSRF tokens, logged-out
sessions, login throttling.

Sessions are stateless: `sid.expiry.HMAC` under a key derived from NBGW_ADMIN_TOKEN, so
changing the token logs everyone out. The CSRF token and the OAuth `binding` are HMACs of
the session id. Two pieces of state sit in the store, so that every process sharing the
database (`serve --workers`, replicas) agrees: `SessionRevocations` (sessions logged out
before they expire) and `LoginThrottle` (wrong admin tokens per client address). Both take
the store in their constructor and the time from their caller (the injected clock).

When the store cannot be written, both keep what they could not store in this process's
memory (with a warning in the log, never a session id) and go on: a logout still ends the
session here, and a wrong token still counts here. When the store cannot be read, their
checks raise `StoreError`; the pages answer 503 rather than guess (fail closed).
Nothing here knows about HTTP routes or templates.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from nbgateway.errors import StoreError
from nbgateway.redact import same_secret
from nbgateway.store import TokenStore

log = logging.getLogger("nbgateway.admin")

# At most LOGIN_FAILURES wrong tokens per client address within LOGIN_WINDOW seconds.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
# Addresses remembered at most in memory when the store could not take their failures
# (a flood of addresses must not grow memory without bound; the store caps its own rows).
THROTTLE_MAX_CLIENTS = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in admin browser session."""

    sid: str
    expires_at: int
    csrf: str
    binding: str


class Signer:
    """HMAC-SHA256 under a key derived from the admin token, one label per purpose."""

    def __init__(self, admin_token: str) -> None:
        self._key = hmac.new(
            admin_token.encode(), b"nbgateway admin pages v1", hashlib.sha256
        ).digest()

    def sign(self, purpose: str, data: str) -> str:
        return hmac.new(self._key, f"{purpose}:{data}".encode(), hashlib.sha256).hexdigest()

    def valid(self, purpose: str, data: str, signature: str) -> bool:
        if not data.isascii():  # what `sign` signed is ASCII; a raw byte is tampering
            return False
        return same_secret(signature, self.sign(purpose, data))

    def session(self, sid: str, expires_at: int) -> Session:
        return Session(sid, expires_at, self.sign("csrf", sid), self.sign("binding", sid)[:32])

    def session_cookie(self, session: Session) -> str:
        data = f"{session.sid}.{session.expires_at}"
        return f"{data}.{self.sign('session', data)}"

    def read_session(self, value: str, now: float) -> Session | None:
        sid, _, rest = value.partition(".")
        expiry, _, signature = rest.partition(".")
        if not sid or not expiry.isdigit() or not signature:
            return None
        if not self.valid("session", f"{sid}.{expiry}", signature) or int(expiry) <= now:
            return None
        return self.session(sid, int(expiry))

    def flash_cookie(self, message: dict[str, Any]) -> str:
        data = _b64(json.dumps(message, separators=(",", ":")).encode())
        return f"{data}.{self.sign('flash', data)}"

    def read_flash(self, value: str, now: float) -> dict[str, Any] | None:
        data, _, signature = value.partition(".")
        if not data or not self.valid("flash", data, signature):
            return None
        try:
            message = json.loads(_unb64(data))
        except ValueError:
            return None
        if not isinstance(message, dict) or float(message.get("exp", 0)) <= now:
            return None
        return message


class _MemoryFailures:
    """Wrong-token times per client address, in memory: the attempts the store could not
    take. Bounded by THROTTLE_MAX_CLIENTS addresses."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def add(self, client: str, now: float) -> None:
        if client not in self._failures and len(self._failures) >= THROTTLE_MAX_CLIENTS:
            for known in list(self._failures):
                if not self.recent(known, now):
                    del self._failures[known]
            if len(self._failures) >= THROTTLE_MAX_CLIENTS:
                self._failures.pop(next(iter(self._failures)))
        failures = self.recent(client, now)
        failures.append(now)
        self._failures[client] = failures

    def take_back(self, client: str, at: float) -> bool:
        """Remove one attempt of `client` at `at`; False when there is none here."""
        failures = self._failures.get(client)
        if failures is None or at not in failures:
            return False
        failures.remove(at)
        return True


@dataclass(frozen=True)
class Verdict:
    """The outcome of `LoginThrottle.check`: the token was right, or not; `wait` is set
    when it was not checked at all (over the limit: the seconds until the next try)."""

    right: bool
    wait: int | None


class LoginThrottle:
    """Wrong-token attempts per client address within a sliding window, counted in the
    store: every process sharing the database sees the same count.

    A token check is counted before it is made (`attempt`): racing guesses, in this
    process or another, each see the others, so at most `limit` are checked per window
    however many arrive at once. A right token takes its own count back (`take_back`); the
    wrong ones before it still count until they age out, so a tool that also knows the
    token does not reset a guesser's count. `retry_after` and `attempt` raise StoreError
    when the store cannot be read (the caller refuses: fail closed). An attempt the store
    cannot take is counted in this process's memory instead, with a warning.
    """

    def __init__(
        self, store: TokenStore, limit: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW
    ) -> None:
        self.limit = limit
        self.window = window
        self._store = store
        self._unstored = _MemoryFailures(window)
        # Per address checking right now: its lock and how many checks hold or await it.
        self._serial: dict[str, tuple[asyncio.Lock, int]] = {}

    async def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until `client` may try again, or None when it may try now."""
        stored = await self._store.login_failures(client, now - self.window)
        failures = sorted([*stored, *self._unstored.recent(client, now)])
        if len(failures) < self.limit:
            return None
        # Processes racing may have stored more than `limit`: the address may try again
        # once fewer than `limit` remain in the window.
        return max(1, math.ceil(failures[-self.limit] + self.window - now))

    async def check(self, client: str, now: float, right: Callable[[], bool]) -> Verdict:
        """One token check by `client`: counted first (`attempt`), made (`right()`) only
        within the limit, its count taken back when right (`take_back`). This process makes
        one check per address at a time, so a tool's parallel calls with the right token
        are not counted together as if they were guesses; checks in other processes at the
        same moment still count together (guesses never get more than `limit`)."""
        async with self._one_at_a_time(client):
            wait = await self.attempt(client, now)
            if wait is not None:
                return Verdict(right=False, wait=wait)
            if not right():
                return Verdict(right=False, wait=None)
            await self.take_back(client, now)
            return Verdict(right=True, wait=None)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, client: str) -> AsyncIterator[None]:
        lock, users = self._serial.get(client, (asyncio.Lock(), 0))
        self._serial[client] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._serial[client]
            if users == 1:
                del self._serial[client]  # bounded by the addresses checking right now
            else:
                self._serial[client] = (lock, users - 1)

    async def attempt(self, client: str, now: float) -> int | None:
        """Count one token check by `client` before it is made: None when it may be made,
        else the seconds to wait (the count is taken back: the token is not checked).
        StoreError when the count cannot be read (the attempt is taken back first)."""
        try:
            await self._store.record_login_failure(client, now, now - self.window)
        except StoreError as exc:
            log.warning(
                "admin token attempt counted in this process only: the store cannot be written",
                extra={"peer": client, "error": str(exc)},
            )
            self._unstored.add(client, now)
        try:
            stored = await self._store.login_failures(client, now - self.window)
        except StoreError:
            await self.take_back(client, now)  # not checked, so not counted
            raise
        failures = sorted([*stored, *self._unstored.recent(client, now)])
        if len(failures) <= self.limit:
            return None
        await self.take_back(client, now)  # not checked, so not counted
        failures.remove(now)
        return max(1, math.ceil(failures[-self.limit] + self.window - now))

    async def take_back(self, client: str, now: float) -> None:
        """Take back the count `attempt` made at `now`: the token was right, or it was not
        checked (best effort: otherwise it ages out of the window)."""
        if self._unstored.take_back(client, now):
            return
        try:
            await self._store.forget_login_failure(client, now)
        except StoreError as exc:
            log.warning(
                "an admin token attempt stays counted: the store cannot be written",
                extra={"peer": client, "error": str(exc)},
            )


class SessionRevocations:
    """Sessions logged out before they expire, kept in the store (as a hash of the session
    id) so that a logged-out cookie is refused by every process sharing the database.

    A logout the store cannot take is remembered in this process's memory until the
    session would have expired, with a warning: the other processes accept that cookie
    until then (or until NBGW_ADMIN_TOKEN changes). `revoked` raises StoreError when the
    store cannot be read; the caller answers 503 rather than accept a session it cannot
    check.
    """

    def __init__(self, store: TokenStore) -> None:
        self._store = store
        self._unstored: dict[str, int] = {}  # session id -> expiry

    async def revoke(self, session: Session, now: float) -> bool:
        """End `session`; False when only this process will refuse it."""
        self._unstored = {sid: exp for sid, exp in self._unstored.items() if exp > now}
        try:
            await self._store.revoke_session(session.sid, session.expires_at, now)
        except StoreError as exc:
            self._unstored[session.sid] = session.expires_at
            log.warning(
                "logout remembered by this process only: the store cannot be written; other "
                "processes accept the session until it expires",
                extra={"error": str(exc)},
            )
            return False
        return True

    async def revoked(self, session: Session, now: float) -> bool:
        """Whether `session` was logged out (StoreError when that cannot be known)."""
        if session.sid in self._unstored:
            return True
        return await self._store.session_revoked(session.sid, now)
