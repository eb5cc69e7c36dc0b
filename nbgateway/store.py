"""Encrypted persistence of accounts, their events and pending authorizations (SQLite).

`TokenStore` is the interface the rest of the gateway uses; `SQLiteStore` implements it
with aiosqlite in WAL mode (a PostgreSQL backend can implement the same protocol for
multi-host deployments). Tokens and PKCE verifiers are sealed by `Cipher` before they touch
the disk. The store knows nothing of HTTP or OAuth.

Cross-process refresh coordination: `refresh_lock(slug)` opens a dedicated connection and
holds `BEGIN IMMEDIATE` (SQLite's single writer lock) for the whole token call, re-reading
the row inside it. The lock cannot expire while the call is in flight: it ends when the
transaction commits, rolls back, or its process dies. The generation counter, bumped on
every token change, lets a waiter see that someone else already refreshed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiosqlite

from nbgateway.clock import Clock
from nbgateway.crypto import Cipher
from nbgateway.errors import (
    AccountNotFound,
    CorruptRecordError,
    DecryptError,
    StateError,
    StoreError,
)
from nbgateway.models import (
    Account,
    AccountInfo,
    AccountStatus,
    Event,
    EventKind,
    TokenSet,
)
from nbgateway.redact import Secret

# Each entry moves the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE accounts (
        slug            TEXT PRIMARY KEY,
        access_token    BLOB,
        refresh_token   BLOB,
        expires_at      REAL,
        scope           TEXT NOT NULL DEFAULT '',
        status          TEXT NOT NULL,
        generation      INTEGER NOT NULL DEFAULT 0,
        last_refresh_at REAL,
        last_error      TEXT,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL
    );
    CREATE TABLE events (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        slug   TEXT NOT NULL,
        kind   TEXT NOT NULL,
        at     REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_by_slug ON events (slug, id);
    CREATE TABLE auth_states (
        state_hash TEXT PRIMARY KEY,
        slug       TEXT NOT NULL,
        verifier   BLOB NOT NULL,
        binding    TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_ACCOUNT_COLUMNS = (
    "slug, access_token, refresh_token, expires_at, scope, status, generation, "
    "last_refresh_at, last_error, created_at, updated_at"
)
_INFO_COLUMNS = (
    "slug, expires_at, scope, status, generation, last_refresh_at, last_error, "
    "created_at, updated_at"
)
_LAST_ERROR_MAX = 300
# Events kept per account: enough history for the admin page and debugging, bounded even
# through a long outage (a failure is recorded at most once per backoff period).
EVENTS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """A consumed authorization state: which nation it was for and its PKCE verifier."""

    slug: str
    code_verifier: Secret
    created_at: float


def _state_hash(state: str) -> str:
    # Only a hash of `state` is stored: a copy of the database cannot complete a flow.
    return hashlib.sha256(state.encode()).hexdigest()


def _status(value: Any, slug: str) -> AccountStatus:
    try:
        return AccountStatus(value)
    except ValueError:
        raise CorruptRecordError(f"account {slug!r} has an unknown status {value!r}") from None


def _info_from_row(row: sqlite3.Row) -> AccountInfo:
    slug = row["slug"]
    return AccountInfo(
        slug=slug,
        status=_status(row["status"], slug),
        expires_at=row["expires_at"],
        scope=row["scope"] or "",
        generation=int(row["generation"]),
        last_refresh_at=row["last_refresh_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class AccountLock(Protocol):
    """An account row held under the cross-process refresh lock (see `refresh_lock`)."""

    slug: str

    async def read(self) -> Account: ...
    async def save_tokens(self, tokens: TokenSet) -> Account: ...
    async def record_failure(self, message: str) -> None: ...
    async def mark_needs_reauth(self, message: str) -> None: ...


class TokenStore(Protocol):
    """What the token manager, the account service and the CLI need from storage."""

    async def get_account(self, slug: str) -> Account | None: ...
    async def list_accounts(self) -> list[AccountInfo]: ...
    async def change_counter(self) -> int: ...
    def refresh_lock(self, slug: str) -> AbstractAsyncContextManager[AccountLock]: ...
    async def save_tokens(self, slug: str, tokens: TokenSet, kind: EventKind) -> Account: ...
    async def import_refresh_token(self, slug: str, refresh_token: Secret) -> None: ...
    async def remove_account(self, slug: str) -> bool: ...
    async def events(self, slug: str | None = None, limit: int = 20) -> list[Event]: ...
    async def create_state(
        self, state: str, slug: str, verifier: Secret, binding: str, ttl: float
    ) -> None: ...
    async def consume_state(self, state: str, binding: str) -> PendingAuthorization: ...
    async def rotate_keys(self) -> int: ...
    async def verify(self) -> list[str]: ...
    async def ping(self) -> None: ...


class LockedAccount:
    """An account row under the cross-process refresh lock. Writes commit with the lock."""

    def __init__(self, store: SQLiteStore, conn: aiosqlite.Connection, slug: str) -> None:
        self._store = store
        self._conn = conn
        self.slug = slug

    async def read(self) -> Account:
        """Re-read the row inside the lock (the truth other processes committed)."""
        account = await self._store._read_account(self._conn, self.slug)
        if account is None:
            raise AccountNotFound(self.slug)
        return account

    async def save_tokens(self, tokens: TokenSet) -> Account:
        """Store a refreshed token pair (bumps the generation)."""
        return await self._store._write_tokens(self._conn, self.slug, tokens, EventKind.REFRESHED)

    async def record_failure(self, message: str) -> None:
        """Remember a transient refresh failure without touching the tokens."""
        await self._store._write_failure(self._conn, self.slug, message, needs_reauth=False)

    async def mark_needs_reauth(self, message: str) -> None:
        """The refresh token is dead: stop using it until an admin re-authorizes."""
        await self._store._write_failure(self._conn, self.slug, message, needs_reauth=True)


class SQLiteStore:
    """The SQLite implementation of `TokenStore`. Use as an async context manager."""

    def __init__(
        self,
        path: Path,
        cipher: Cipher,
        clock: Clock,
        *,
        busy_timeout: float = 130.0,
        on_secret: Callable[[Secret, str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._cipher = cipher
        self._clock = clock
        self._busy_ms = int(busy_timeout * 1000)
        self._on_secret = on_secret
        self._conn: aiosqlite.Connection | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _connect(self) -> aiosqlite.Connection:
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        conn.row_factory = sqlite3.Row
        try:
            # _scalar reads and closes each cursor: a PRAGMA left unread keeps a lock.
            await self._scalar(conn, f"PRAGMA busy_timeout = {self._busy_ms}")
            # FULL: a committed rotated refresh token survives a power cut, not just a crash.
            await self._scalar(conn, "PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot use database {self.path}: {exc}") from None
        except BaseException:
            await conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Open, check the keys against existing rows, then migrate. A wrong key writes nothing."""
        if not self.path.parent.exists():
            raise StoreError(f"directory {self.path.parent} for NBGW_DATABASE does not exist")
        conn = await self._connect()
        try:
            version = await self._user_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"nbgateway understands ({SCHEMA_VERSION}); upgrade nbgateway"
                )
            if version > 0:
                await self._check_key_ids(conn)
            await self._migrate(conn, version)
            mode = await self._scalar(conn, "PRAGMA journal_mode")
            if str(mode).lower() != "wal":
                await self._scalar(conn, "PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise StoreError(f"database {self.path} is not usable: {exc}") from None
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError("the store is not open")
        return self._conn

    @staticmethod
    async def _scalar(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
        async with conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def _user_version(self, conn: aiosqlite.Connection) -> int:
        return int(await self._scalar(conn, "PRAGMA user_version"))

    async def _migrate(self, conn: aiosqlite.Connection, version: int) -> None:
        for target in range(version, SCHEMA_VERSION):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated while we waited for the lock.
                if await self._user_version(conn) > target:
                    await conn.execute("COMMIT")
                    continue
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {target + 1}")
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise

    async def _check_key_ids(self, conn: aiosqlite.Connection) -> None:
        """Refuse to run when a stored value was sealed by a key we do not have."""
        # Only well-formed ciphertexts count; a garbled row is verify()'s to report by name.
        sql = (
            "SELECT DISTINCT hex(substr(refresh_token, 2, 4)) FROM accounts "
            "WHERE substr(refresh_token, 1, 1) = X'01' AND length(refresh_token) >= 33 "
            "UNION SELECT DISTINCT hex(substr(access_token, 2, 4)) FROM accounts "
            "WHERE substr(access_token, 1, 1) = X'01' AND length(access_token) >= 33 "
            "UNION SELECT DISTINCT hex(substr(verifier, 2, 4)) FROM auth_states "
            "WHERE substr(verifier, 1, 1) = X'01' AND length(verifier) >= 33"
        )
        async with conn.execute(sql) as cur:
            stored = {str(row[0]).lower() async for row in cur}
        known = set(self._cipher.key_ids)
        unknown = sorted(stored - known)
        if unknown:
            raise DecryptError(
                f"database {self.path} holds tokens encrypted with key id(s) "
                f"{', '.join(unknown)}, which NBGW_ENCRYPTION_KEY does not contain "
                f"(configured: {', '.join(self._cipher.key_ids)}). Nothing was changed; "
                "set the right key (old keys may follow the new one, comma-separated)."
            )

    async def ping(self) -> None:
        """Raise StoreError unless the database answers."""
        try:
            await self._scalar(self.conn, "SELECT count(*) FROM accounts")
        except sqlite3.Error as exc:
            raise StoreError(f"database not reachable: {exc}") from None

    # -- reading ---------------------------------------------------------------------

    def _open(self, blob: Any, slug: str, field: str) -> Secret | None:
        if blob is None:
            return None
        if not isinstance(blob, bytes):
            raise CorruptRecordError(f"{field} of account {slug!r} is not a ciphertext")
        secret = self._cipher.decrypt(blob, slug=slug, field=field)
        if self._on_secret is not None:
            self._on_secret(secret, f"{slug}/{field}")
        return secret

    def _account_from_row(self, row: sqlite3.Row) -> Account:
        info = _info_from_row(row)
        fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(AccountInfo)}
        return Account(
            **fields,
            access_token=self._open(row["access_token"], info.slug, "access_token"),
            refresh_token=self._open(row["refresh_token"], info.slug, "refresh_token"),
        )

    async def _read_account(self, conn: aiosqlite.Connection, slug: str) -> Account | None:
        async with conn.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE slug = ?", (slug,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else self._account_from_row(row)

    async def get_account(self, slug: str) -> Account | None:
        """The account with its tokens decrypted, or None. DecryptError on a bad row."""
        return await self._read_account(self.conn, slug)

    async def list_accounts(self) -> list[AccountInfo]:
        """Every account without its tokens (nothing is decrypted)."""
        async with self.conn.execute(f"SELECT {_INFO_COLUMNS} FROM accounts ORDER BY slug") as cur:
            return [_info_from_row(row) async for row in cur]

    async def change_counter(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        return int(await self._scalar(self.conn, "PRAGMA data_version"))

    async def events(self, slug: str | None = None, limit: int = 20) -> list[Event]:
        """Most recent events first, for one account or all."""
        if slug is None:
            sql, params = "SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,)
        else:
            sql = "SELECT * FROM events WHERE slug = ? ORDER BY id DESC LIMIT ?"
            params = (slug, limit)  # type: ignore[assignment]
        async with self.conn.execute(sql, params) as cur:
            return [
                Event(row["id"], row["slug"], EventKind(row["kind"]), row["at"], row["detail"])
                async for row in cur
            ]

    # -- writing ---------------------------------------------------------------------

    async def _insert_event(
        self, conn: aiosqlite.Connection, slug: str, kind: EventKind, detail: str
    ) -> None:
        await conn.execute(
            "INSERT INTO events (slug, kind, at, detail) VALUES (?, ?, ?, ?)",
            (slug, kind.value, self._clock.now(), detail[:_LAST_ERROR_MAX]),
        )
        await conn.execute(
            "DELETE FROM events WHERE slug = ? AND id <= (SELECT id FROM events WHERE slug = ? "
            "ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (slug, slug, EVENTS_KEPT),
        )

    async def _write_tokens(
        self, conn: aiosqlite.Connection, slug: str, tokens: TokenSet, kind: EventKind
    ) -> Account:
        now = self._clock.now()
        if self._on_secret is not None:
            self._on_secret(tokens.access_token, f"{slug}/access_token")
            self._on_secret(tokens.refresh_token, f"{slug}/refresh_token")
        access = self._cipher.encrypt(tokens.access_token.reveal(), slug=slug, field="access_token")
        refresh = self._cipher.encrypt(
            tokens.refresh_token.reveal(), slug=slug, field="refresh_token"
        )
        await conn.execute(
            "INSERT INTO accounts (slug, access_token, refresh_token, expires_at, scope, status, "
            "generation, last_refresh_at, last_error, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 1, ?, NULL, ?, ?) "
            "ON CONFLICT (slug) DO UPDATE SET access_token = excluded.access_token, "
            "refresh_token = excluded.refresh_token, expires_at = excluded.expires_at, "
            "scope = excluded.scope, status = excluded.status, "
            "generation = accounts.generation + 1, last_refresh_at = excluded.last_refresh_at, "
            "last_error = NULL, updated_at = excluded.updated_at",
            (
                slug,
                access,
                refresh,
                tokens.expires_at,
                tokens.scope,
                AccountStatus.ACTIVE.value,
                now,
                now,
                now,
            ),
        )
        await self._insert_event(conn, slug, kind, "")
        account = await self._read_account(conn, slug)
        assert account is not None
        return account

    async def _write_failure(
        self, conn: aiosqlite.Connection, slug: str, message: str, *, needs_reauth: bool
    ) -> None:
        message = message[:_LAST_ERROR_MAX]
        if needs_reauth:
            await conn.execute(
                "UPDATE accounts SET status = ?, last_error = ?, updated_at = ?, "
                "generation = generation + 1 WHERE slug = ?",
                (AccountStatus.NEEDS_REAUTH.value, message, self._clock.now(), slug),
            )
            await self._insert_event(conn, slug, EventKind.NEEDS_REAUTH, message)
        else:
            await conn.execute(
                "UPDATE accounts SET last_error = ?, updated_at = ? WHERE slug = ?",
                (message, self._clock.now(), slug),
            )
            await self._insert_event(conn, slug, EventKind.REFRESH_FAILED, message)

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A short write transaction on a dedicated connection (never interleaved)."""
        conn = await self._connect()
        try:
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"database {self.path} stayed locked: {exc}") from None
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
        finally:
            await conn.close()

    @asynccontextmanager
    async def refresh_lock(self, slug: str) -> AsyncIterator[LockedAccount]:
        """Hold the cross-process refresh lock; writes made through it commit on exit."""
        async with self._write_transaction() as conn:
            yield LockedAccount(self, conn, slug)

    async def save_tokens(self, slug: str, tokens: TokenSet, kind: EventKind) -> Account:
        """Store tokens from a new authorization or an import (bumps the generation)."""
        async with self._write_transaction() as conn:
            return await self._write_tokens(conn, slug, tokens, kind)

    async def import_refresh_token(self, slug: str, refresh_token: Secret) -> None:
        """Store a refresh token alone (legacy-token migration); the access token comes later."""
        now = self._clock.now()
        if self._on_secret is not None:
            self._on_secret(refresh_token, f"{slug}/refresh_token")
        sealed = self._cipher.encrypt(refresh_token.reveal(), slug=slug, field="refresh_token")
        async with self._write_transaction() as conn:
            await conn.execute(
                "INSERT INTO accounts (slug, access_token, refresh_token, expires_at, scope, "
                "status, generation, last_refresh_at, last_error, created_at, updated_at) "
                "VALUES (?, NULL, ?, 0, '', ?, 1, NULL, NULL, ?, ?) "
                "ON CONFLICT (slug) DO UPDATE SET access_token = NULL, "
                "refresh_token = excluded.refresh_token, expires_at = 0, status = excluded.status, "
                "generation = accounts.generation + 1, last_error = NULL, "
                "updated_at = excluded.updated_at",
                (slug, sealed, AccountStatus.ACTIVE.value, now, now),
            )
            await self._insert_event(conn, slug, EventKind.IMPORTED, "")

    async def remove_account(self, slug: str) -> bool:
        """Delete an account's tokens; its events stay as history. False if it did not exist."""
        async with self._write_transaction() as conn:
            cur = await conn.execute("DELETE FROM accounts WHERE slug = ?", (slug,))
            removed = cur.rowcount > 0
            await cur.close()
            if removed:
                await self._insert_event(conn, slug, EventKind.REMOVED, "")
        return removed

    # -- authorization states -----------------------------------------------------------

    async def create_state(
        self, state: str, slug: str, verifier: Secret, binding: str, ttl: float
    ) -> None:
        """Remember a started authorization (state hash, nation, sealed PKCE verifier)."""
        now = self._clock.now()
        sealed = self._cipher.encrypt(verifier.reveal(), slug=slug, field="code_verifier")
        async with self._write_transaction() as conn:
            await conn.execute("DELETE FROM auth_states WHERE expires_at < ?", (now,))
            await conn.execute(
                "INSERT INTO auth_states (state_hash, slug, verifier, binding, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (_state_hash(state), slug, sealed, binding, now, now + ttl),
            )

    async def consume_state(self, state: str, binding: str) -> PendingAuthorization:
        """Take a state exactly once. StateError if unknown, used, expired or bound elsewhere."""
        async with (
            self._write_transaction() as conn,
            conn.execute(
                "DELETE FROM auth_states WHERE state_hash = ? RETURNING slug, verifier, binding, "
                "created_at, expires_at",
                (_state_hash(state),),
            ) as cur,
        ):
            row = await cur.fetchone()
        if row is None:
            raise StateError("this authorization link is unknown or was already used")
        if row["expires_at"] < self._clock.now():
            raise StateError("this authorization link has expired")
        if row["binding"] and row["binding"] != binding:
            raise StateError("this authorization was started in another session")
        verifier = self._cipher.decrypt(row["verifier"], slug=row["slug"], field="code_verifier")
        return PendingAuthorization(row["slug"], verifier, row["created_at"])

    # -- maintenance ----------------------------------------------------------------------

    async def rotate_keys(self) -> int:
        """Re-encrypt every value not sealed by the first key. Returns how many rows changed."""
        changed = 0
        async with self._write_transaction() as conn:
            async with conn.execute(
                "SELECT slug, access_token, refresh_token FROM accounts"
            ) as cur:
                rows = await cur.fetchall()
            for row in rows:
                slug = row["slug"]
                updates: dict[str, bytes] = {}
                for field in ("access_token", "refresh_token"):
                    blob = row[field]
                    if blob is not None and self._cipher.needs_rotation(blob):
                        plain = self._cipher.decrypt(blob, slug=slug, field=field)
                        updates[field] = self._cipher.encrypt(
                            plain.reveal(), slug=slug, field=field
                        )
                if updates:
                    assignments = ", ".join(f"{name} = ?" for name in updates)
                    await conn.execute(
                        f"UPDATE accounts SET {assignments} WHERE slug = ?",
                        (*updates.values(), slug),
                    )
                    changed += 1
            async with conn.execute("SELECT state_hash, slug, verifier FROM auth_states") as cur:
                states = await cur.fetchall()
            for row in states:
                if self._cipher.needs_rotation(row["verifier"]):
                    plain = self._cipher.decrypt(
                        row["verifier"], slug=row["slug"], field="code_verifier"
                    )
                    await conn.execute(
                        "UPDATE auth_states SET verifier = ? WHERE state_hash = ?",
                        (
                            self._cipher.encrypt(
                                plain.reveal(), slug=row["slug"], field="code_verifier"
                            ),
                            row["state_hash"],
                        ),
                    )
        return changed

    async def verify(self) -> list[str]:
        """Try to decrypt every row; return one plain message per unreadable account."""
        problems: list[str] = []
        async with self.conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts") as cur:
            rows = await cur.fetchall()
        for row in rows:
            try:
                self._account_from_row(row)
            except (DecryptError, CorruptRecordError) as exc:
                problems.append(str(exc))
        return problems
