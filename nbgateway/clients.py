"""Client keys: who may use which nation, and the audit trail of what they changed.

- A key is `nbgw_` + 43 url-safe characters (32 random bytes). Its first 12 characters
  after the prefix are a public lookup id; the store keeps that id, a random salt and
  SHA-256(salt + key), never the key. Keys are random, not passwords: a fast salted hash
  is enough (no stretching), and the id makes the lookup one dictionary access.
- `ClientRegistry` holds every registered key in memory, so identifying the caller costs
  no database round trip. Before it trusts a presented key it reads the store's change
  hint (`TokenStore.change_hint`, no I/O that waits); when that moved since the keys were
  loaded, the request waits for one reload (`catch_up`, shared by concurrent requests): a
  key removed in any process is refused by every other from the next request on. A key
  it does not know yet sends it to the store once (`identify_after_sync`): a key added in
  another process works on its first request.
- `identify` and `authorize` answer the proxy's one question per request (which client,
  and may it do this); `record` queues the per-client bookkeeping (last use, and an audit
  entry for each write), which `flush` writes in batches off the request path.

It knows nothing of HTTP: the proxy extracts the presented key and passes it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import replace
from enum import StrEnum
from typing import Any

from nbgateway.clock import Clock, iso_utc
from nbgateway.errors import (
    ClientForbidden,
    ClientKeyInvalid,
    ClientKeyRequired,
    StoreError,
    StoreUnavailable,
)
from nbgateway.log import background_round
from nbgateway.metrics import Metrics
from nbgateway.models import AuditEntry, ClientInfo, ClientRecord, is_valid_slug
from nbgateway.redact import REDACTED, Redactor, Secret
from nbgateway.store import TokenStore

log = logging.getLogger("nbgateway.clients")

KEY_PREFIX = "nbgw_"
_KEY_ID_LENGTH = 12
_KEY_RE = re.compile(r"^nbgw_[A-Za-z0-9_-]{43}$")
# A key anywhere in a text (a cookie, a header of the tool's own).
_KEY_IN_TEXT = re.compile(r"nbgw_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
# The same in a query string, where an encoder may have written "_" and "-" as %5F, %2D.
_KEY_CHAR = r"(?:[A-Za-z0-9_-]|%5[Ff]|%2[Dd])"
_KEY_IN_QUERY = re.compile(rf"nbgw(?:_|%5[Ff]){_KEY_CHAR}{{43}}(?!{_KEY_CHAR})")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ANONYMOUS = "anonymous"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Seconds between two writes of the clients' last-use times.
LAST_USED_INTERVAL = 60.0
# Least seconds between two store looks for keys this process does not know (requests
# presenting random keys cannot make it query the store more often).
MISS_SYNC_INTERVAL = 0.2
# The longest a request waits for a reload of the keys before it is judged by the keys
# already loaded (the store is slow or down), and how long after a failed reload the
# loaded keys are used without trying again.
CATCH_UP_WAIT = 0.5
CATCH_UP_RETRY = 1.0
_UNKNOWN_KEY = "the client key presented is not registered (or was removed)"
# Audit entries waiting to be written; beyond this (a long store outage) the oldest go.
_AUDIT_BUFFER = 10_000
# At shutdown, how often the last entries are offered to a store that refuses them.
_CLOSE_RETRY = 0.5


class ClientAuth(StrEnum):
    """NBGW_CLIENT_AUTH."""

    OFF = "off"
    OPTIONAL = "optional"
    REQUIRED = "required"


def new_key() -> Secret:
    """A fresh client key (shown once; only its hash is stored)."""
    return Secret(KEY_PREFIX + secrets.token_urlsafe(32))


def looks_like_key(value: str) -> bool:
    """True for a string of the client-key form (the proxy's cheap first test)."""
    return value.startswith(KEY_PREFIX)


def without_keys(text: str) -> str:
    """`text` with every client key in it replaced by REDACTED (keys never go upstream,
    wherever a tool put one)."""
    return _KEY_IN_TEXT.sub(REDACTED, text)


def without_keys_in_query(query: str) -> str:
    """`query` (a raw query string) with every client key in it replaced by REDACTED,
    percent-encoded or not."""
    return _KEY_IN_QUERY.sub(REDACTED, query)


def hash_key(key: str, salt: bytes) -> bytes:
    return hashlib.sha256(salt + key.encode()).digest()


def make_record(
    name: str, key: Secret, nations: tuple[str, ...], read_only: bool, now: float
) -> ClientRecord:
    """The stored form of a new key: lookup id, salt and salted hash."""
    value = key.reveal()
    key_id = value[len(KEY_PREFIX) : len(KEY_PREFIX) + _KEY_ID_LENGTH]
    salt = secrets.token_bytes(16)
    info = ClientInfo(
        name=name,
        nations=nations,
        read_only=read_only,
        created_at=now,
        last_used_at=None,
        key_hint=f"{KEY_PREFIX}{key_id[:4]}…",
    )
    return ClientRecord(info, key_id, salt, hash_key(value, salt))


def is_valid_name(name: str) -> bool:
    """Whether `name` can be a client's name."""
    return bool(_NAME_RE.fullmatch(name)) and name != ANONYMOUS


def check_client(name: str, nations: tuple[str, ...]) -> None:
    """ValueError unless `name` and `nations` can make a client (before anything is stored)."""
    check_name(name)
    for slug in nations:
        if not is_valid_slug(slug):
            raise ValueError(f"{slug!r} is not a nation slug")


def check_name(name: str) -> str:
    """`name` for a new client; ValueError unless it is valid and no spelling of
    `anonymous` (which the audit trail and the metrics use for requests without a key)."""
    if not is_valid_name(name) or name.lower() == ANONYMOUS:
        raise ValueError(
            "a client name is 1-64 letters, digits, dots, dashes or underscores, starting "
            f"with a letter or digit (and not {ANONYMOUS!r} in any case)"
        )
    return name


def client_json(info: ClientInfo) -> dict[str, object]:
    """A client as JSON for `clients list --json` and `/connect/api/clients` (never the key).
    `nations` is always a list, as the API takes it: empty for every nation."""
    return {
        "name": info.name,
        "nations": list(info.nations),
        "read_only": info.read_only,
        "created_at": iso_utc(info.created_at),
        "last_used_at": iso_utc(info.last_used_at),
        "key_hint": info.key_hint,
    }


def audit_json(entry: AuditEntry) -> dict[str, object]:
    """An audit entry as JSON for `nbgateway audit --json` and the admin API."""
    return {
        "at": iso_utc(entry.at),
        "client": entry.client,
        "nation": entry.nation,
        "method": entry.method,
        "path": entry.path,
        "status": entry.status,
        "request_id": entry.request_id,
    }


class ClientRegistry:
    """Registered client keys in memory, the scope checks, and the batched bookkeeping."""

    def __init__(
        self,
        store: TokenStore,
        clock: Clock,
        metrics: Metrics,
        *,
        mode: ClientAuth,
        audit_retention: float,
        redactor: Redactor,
    ) -> None:
        self._store = store
        self._redactor = redactor
        self._clock = clock
        self._metrics = metrics
        self.mode = mode
        self._retention = audit_retention
        self._by_key_id: dict[str, ClientRecord] = {}
        self._names: set[str] = set()
        self._counter: int | None = None
        self._used: dict[str, float] = {}
        self._used_written = float("-inf")
        self._miss_sync: asyncio.Future[bool] | None = None
        self._miss_synced = float("-inf")
        self._miss_failed = False  # whether that reload failed (the store was away)
        self._hint: int | None = None
        self._sync_lock = asyncio.Lock()
        self._catch_up: asyncio.Future[None] | None = None
        self._catch_up_started = float("-inf")
        self._catch_up_failed = float("-inf")
        self._audit: list[AuditEntry] = []
        self._scrubbed = 0  # how many of the first queued entries were scrubbed already
        self._dropped = 0  # entries the full buffer dropped since the store last took any

    # -- the request path ----------------------------------------------------------------

    def identify(self, presented: str | None) -> ClientInfo | None:
        """The client a presented key belongs to; None for an anonymous request.

        Raises ClientKeyRequired (mode required, no key) or ClientKeyInvalid.
        """
        if presented is None:
            if self.mode is ClientAuth.REQUIRED:
                raise ClientKeyRequired(
                    "this gateway needs a client key: send it as Authorization: Bearer "
                    "nbgw_..., the access_token query parameter, or X-NBGW-Key"
                )
            return None
        record = None
        if _KEY_RE.fullmatch(presented):
            record = self._by_key_id.get(
                presented[len(KEY_PREFIX) : len(KEY_PREFIX) + _KEY_ID_LENGTH]
            )
        if record is None or not hmac.compare_digest(
            hash_key(presented, record.salt), record.key_hash
        ):
            raise ClientKeyInvalid(_UNKNOWN_KEY)
        # By key id, not name: a key removed and re-added under its name is another key.
        self._used[record.key_id] = self._clock.now()
        return record.info

    def current(self) -> bool:
        """Whether the keys in memory are the store's (nobody committed since they were
        loaded). Cheap: one read of the store's change hint."""
        return self._store.change_hint() == self._hint

    async def catch_up(self) -> None:
        """Reload the keys until they are `current` (call it when they are not).

        Concurrent callers share one reload; a caller that sees the store move again
        after the reload it joined began waits for the next one. Bounded: a reload that
        failed less than CATCH_UP_RETRY s ago is not tried, and no caller waits past
        CATCH_UP_WAIT s from its own arrival or from the start of a reload in flight; the
        keys already loaded then judge the request (the store is in trouble; the
        background sync keeps trying)."""
        arrived = self._clock.monotonic()
        while not self.current():
            now = self._clock.monotonic()
            if self._catch_up is None:
                if now - self._catch_up_failed < CATCH_UP_RETRY:
                    return
                self._catch_up = asyncio.ensure_future(self._sync_to_catch_up())
                self._catch_up_started = now
            remaining = min(arrived, self._catch_up_started) + CATCH_UP_WAIT - now
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(asyncio.shield(self._catch_up), remaining)
            except TimeoutError:
                return

    async def _sync_to_catch_up(self) -> None:
        try:
            await self.sync(force=True)
        except Exception as exc:
            self._catch_up_failed = self._clock.monotonic()
            log.warning(
                "could not reload the client keys; judging requests by the keys loaded before",
                extra={"error": str(exc)},
            )
        finally:
            self._catch_up = None

    async def identify_after_sync(self, presented: str) -> ClientInfo:
        """`identify` for a key `identify` refused, after one reload of the keys: the key may
        have been added by another process (whose change notice may not have arrived yet).
        Concurrent misses share one reload, and there is at most one per MISS_SYNC_INTERVAL
        (a miss within it waits for the next);
        ClientKeyInvalid when the key is still unknown, StoreError when the store cannot be
        read or the reload takes longer than CATCH_UP_WAIT s (the caller hears 503)."""
        if self._miss_sync is None:
            wait = self._miss_synced + MISS_SYNC_INTERVAL - self._clock.monotonic()
            if wait > 0 and self._miss_failed:  # the store could not say: no verdict
                raise StoreUnavailable(
                    "the client keys cannot be reloaded from the database right now "
                    "to check this key; retry"
                )
            # Within MISS_SYNC_INTERVAL of the last look, the next one waits for the
            # interval's end rather than refuse: a key added elsewhere just after that look
            # (its change notice not here yet) is still found.
            self._miss_sync = asyncio.ensure_future(self._sync_for_miss(max(wait, 0.0)))
            # A caller that stopped waiting (CATCH_UP_WAIT) does not see how it ended.
            self._miss_sync.add_done_callback(_retrieved)
        try:
            await asyncio.wait_for(asyncio.shield(self._miss_sync), CATCH_UP_WAIT)
        except TimeoutError:
            raise StoreUnavailable(
                "the client keys could not be reloaded in time to check this key; retry"
            ) from None
        result = self.identify(presented)
        assert result is not None  # a presented key gives a client or ClientKeyInvalid
        return result

    async def _sync_for_miss(self, delay: float) -> bool:
        if delay:
            await asyncio.sleep(delay)
        self._miss_failed = True
        try:
            changed = await self.sync(force=True)
            self._miss_failed = False
            return changed
        finally:
            self._miss_synced = self._clock.monotonic()
            self._miss_sync = None

    @staticmethod
    def authorize(client: ClientInfo | None, slug: str, method: str) -> None:
        """Raise ClientForbidden unless `client` may send `method` to nation `slug`."""
        if client is None:
            return
        if client.nations and slug not in client.nations:
            raise ClientForbidden(f"the client key {client.name!r} may not use the nation {slug!r}")
        if client.read_only and method not in READ_METHODS:
            raise ClientForbidden(
                f"the client key {client.name!r} is read-only: {method} is not allowed"
            )

    def label(self, client: ClientInfo | None) -> str:
        """The metric label for a client: its registered name, or anonymous."""
        if client is None or client.name not in self._names:
            return ANONYMOUS
        return client.name

    def record(
        self,
        client: ClientInfo | None,
        nation: str,
        method: str,
        path: str,
        status: int,
        request_id: str,
    ) -> None:
        """Queue an audit entry for a write (any method but READ_METHODS, as for read-only
        keys; the proxy calls it for those only).
        `flush` writes it, never the request path."""
        if len(self._audit) >= _AUDIT_BUFFER:
            dropped = len(self._audit) - _AUDIT_BUFFER + 1
            del self._audit[:dropped]
            self._scrubbed = max(0, self._scrubbed - dropped)
            if not self._dropped:  # once per outage; the count comes when it ends
                log.error(
                    "audit buffer full while the store cannot be written; dropping the "
                    "oldest entries",
                    extra={"buffer": _AUDIT_BUFFER},
                )
            self._dropped += 1
        self._audit.append(
            AuditEntry(
                at=self._clock.now(),
                client=client.name if client is not None else ANONYMOUS,
                nation=nation,
                method=method,
                path=path,
                status=status,
                request_id=request_id,
            )
        )

    # -- keeping up with the store ---------------------------------------------------------

    async def sync(self, *, force: bool = False) -> bool:
        """Reload the keys if anyone committed since the last look. True when it reloaded.

        One at a time: a slower look started earlier never overwrites a newer one."""
        async with self._sync_lock:
            hint = self._store.change_hint()  # before reading: a later commit moves it again
            counter = await self._store.change_counter()
            if not force and counter == self._counter:
                # Not a reason to trust the keys for `hint`: the counter may come from an
                # older snapshot, or miss changes (a PostgreSQL listener that is away).
                return False
            records = await self._store.list_clients()
            self._counter = counter
            self._hint = hint
            self._by_key_id = {r.key_id: r for r in records}
            names = {r.info.name for r in records}
            for gone in self._names - names:
                self._metrics.forget_client(gone)
            self._names = names
            return True

    async def flush(self, *, force: bool = False) -> None:
        """Write queued audit entries, and last-use times at most once a minute (each write
        moves the store's change counter, which makes every process reload); what cannot be
        written is kept for the next try."""
        queued, self._audit = self._audit, []
        scrub = self._redactor.scrub
        # Path and request id come from the tool: scrubbed as in the access log, here
        # off the request path (a secret a tool put in them is not kept for 90 days);
        # entries put back after a failed write were scrubbed already.
        entries = queued[: self._scrubbed] + [
            replace(entry, path=scrub(entry.path), request_id=scrub(entry.request_id))
            for entry in queued[self._scrubbed :]
        ]
        self._scrubbed = 0
        used: dict[str, float] = {}
        now = self._clock.monotonic()
        if force or now - self._used_written >= LAST_USED_INTERVAL:
            used, self._used = self._used, {}
            self._used_written = now
        try:
            if entries:
                await self._store.record_audit(entries, self._clock.now() - self._retention)
        except StoreError as exc:
            log.warning(
                "could not write the audit trail; retrying",
                extra={"error": str(exc), "queued": len(entries) + len(self._audit)},
            )
            self._audit[:0] = entries
            self._scrubbed = len(entries)
            self._keep_used(used)
            return
        except BaseException:  # cancelled (the shutdown grace ran out): still queued
            self._audit[:0] = entries
            self._scrubbed = len(entries)
            self._keep_used(used)
            raise
        try:
            if used:
                await self._store.touch_clients(used)
        except StoreError as exc:  # the entries are written: only the times wait
            log.warning("could not write the keys' last use; retrying", extra={"error": str(exc)})
            self._keep_used(used)
        if self._dropped:
            log.error(
                "audit entries were lost while the store could not be written",
                extra={"entries": self._dropped},
            )
            self._dropped = 0

    def _keep_used(self, used: dict[str, float]) -> None:
        for key_id, at in used.items():
            self._used.setdefault(key_id, at)

    async def close(self, grace: float) -> None:
        """The last flush, at shutdown: offered again while the store refuses (it may be
        back within the grace), `grace` seconds at most in all (a write that hangs is cut
        off); what is still queued then is lost with this process, and an error says how
        many."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.flush(force=True)
                while self._audit:
                    await asyncio.sleep(_CLOSE_RETRY)
                    await self.flush(force=True)
        if self._audit:
            log.error(
                "audit entries lost at shutdown: the store could not take them",
                extra={"entries": len(self._audit) + self._dropped},
            )

    async def _one_round(self) -> None:
        await self.sync()
        await self.flush()

    async def run(self, interval: float = 1.0) -> None:
        """Background loop: follow the store's keys and write the bookkeeping."""
        while True:
            await background_round(log, "client key maintenance", self._one_round)
            await asyncio.sleep(interval)

    # -- admin operations ------------------------------------------------------------------

    async def add(
        self, name: str, nations: tuple[str, ...] = (), read_only: bool = False
    ) -> tuple[ClientInfo, Secret]:
        """Register a client; returns it and its key (the only time the key is seen)."""
        check_client(name, nations)
        key = new_key()
        record = make_record(name, key, tuple(sorted(set(nations))), read_only, self._clock.now())
        await self._store.add_client(record)
        await self.sync(force=True)
        log.info("client key added", extra={"client": name})
        return record.info, key

    async def list(self) -> list[ClientInfo]:
        return [r.info for r in await self._store.list_clients()]

    async def remove(self, name: str) -> bool:
        removed = await self._store.remove_client(name)
        await self.sync(force=True)
        if removed:
            log.info("client key removed", extra={"client": name})
        return removed


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a background reload's failure as seen (its waiters heard of it, or timed out)."""
    if not task.cancelled():
        task.exception()
