"""The SQLite backend of `TokenStore`: one file, WAL mode, for a single host.

aiosqlite with one reading connection and one writing connection per store; every write
is a short `BEGIN IMMEDIATE` transaction on the writer (serialised in-process by an
asyncio lock, across processes by SQLite's writer lock). Schema versions live in
`PRAGMA user_version`; a migration to this release's version is one transaction, so
processes opening together take turns and none sees a version half way. A third,
read-only plain sqlite3 connection answers `change_hint` on the event loop (`PRAGMA
data_version`, never waiting for a lock); the client keys are read on the writer between
writes, so a reload sees every commit before it began.

Refresh coordination is a per-account lease in the account row (owner, deadline, marker):
claiming it, recording the marker and storing the result are each their own short write
transaction, so the token call runs with no transaction open and a refresh of one nation
never waits for another. The lease outlives the bounded token call (`lease_seconds`); a
lease whose holder died is taken over after its deadline, or at once when the holder was a
process of this host (and PID namespace) that no longer runs. A holder of this host that
still runs but let its lease lapse during a refresh (it could not store the result: the
rotated pair may exist only in its memory) is waited for, not replaced. A holder whose lease
was taken over stores no failure (`LeaseLost`): the new holder's lease and marker stay. A
process waiting for a lease held elsewhere watches `PRAGMA data_version` (the change
counter) rather than the lock, re-checking at least once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import aiosqlite

from nbgateway.clock import Clock
from nbgateway.crypto import Cipher
from nbgateway.errors import (
    AccountNotFound,
    DecryptError,
    RefreshLockBusy,
    StateError,
    StoreError,
    StoreUnavailable,
)
from nbgateway.models import (
    Account,
    AccountInfo,
    AccountStatus,
    AuditEntry,
    ClientRecord,
    Event,
    EventKind,
    TokenSet,
)
from nbgateway.redact import Secret
from nbgateway.store.base import (
    ACCOUNT_FIELDS,
    AUDIT_FIELDS,
    AUDIT_PATH_MAX,
    CLEAR_MARKER,
    CLIENT_FIELDS,
    EVENT_FIELDS,
    EVENTS_KEPT,
    INFO_FIELDS,
    LAST_ERROR_MAX,
    LEASE_RECHECK,
    LOAD_REFUSED_WHEN_HOLDING,
    LOGIN_FAILURES_KEPT,
    ROW_ERRORS,
    SQLITE_BUSY_TIMEOUT,
    STATE_FIELDS,
    STATES_KEPT,
    ClientExists,
    GenerationConflict,
    LeaseLost,
    PendingAuthorization,
    RotationReport,
    Sealer,
    SecretListener,
    StoreDump,
    audit_from_row,
    client_from_row,
    client_row,
    corrupt_rows,
    event_from_row,
    failure_changes,
    holder_runs,
    lease_seconds,
    listed_info_from_row,
    owner_id,
    readable_rows,
    session_hash,
    state_hash,
    unreadable_states,
    unsure_hint,
)

log = logging.getLogger("nbgateway.store")

# Seconds between two tries to open the change probe, when opening it failed.
_PROBE_RETRY = 1.0


def holds_no_database(path: Path) -> bool:
    """Whether the SQLite file `path` holds nothing yet: it does not exist, or it is empty
    (0 bytes, from `: > file` or a failed copy) with no write-ahead log beside it."""
    try:
        if path.stat().st_size > 0:
            return False
    except (FileNotFoundError, NotADirectoryError):
        return True  # as Path.exists() says
    except OSError:
        return False  # cannot look (a directory that cannot be entered): opening will say
    try:
        return path.with_name(path.name + "-wal").stat().st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _create_private(path: Path) -> None:
    """Create a missing database file readable by its owner only, whatever the umask:
    SQLite gives the -wal and -shm files it adds the same mode. An existing file keeps
    its mode."""
    target = path
    if path.is_symlink() and not path.exists():  # a link to a file still to be made
        target = Path(os.path.realpath(path))
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        link = f" (a link to {target})" if target != path else ""
        raise StoreError(f"cannot create database {path}{link}: {exc.strerror}") from None


def _primary_code(exc: sqlite3.Error) -> int:
    """The primary result code of SQLite's (extended) one, 0 when it gave none."""
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether another connection holds the lock (which passes)."""
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _open_error(message: str, exc: sqlite3.Error) -> StoreError:
    """StoreUnavailable when another connection holds the lock (that passes), else StoreError."""
    return StoreUnavailable(message) if _is_busy(exc) else StoreError(message)


def _read_error(message: str, exc: sqlite3.Error, path: Path) -> StoreError:
    """A failed read: StoreError when the file is damaged (waiting will not mend it), else
    StoreUnavailable (locked, gone, an I/O error: it may pass)."""
    if _primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreError(
            f"database {path} is damaged ({exc}): restore it from a backup (docs/deployment.md, "
            "Backup and restore); nothing was changed"
        )
    return StoreUnavailable(message)


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
    # v2: the per-account refresh lease and its "refresh in flight" marker.
    """
    ALTER TABLE accounts ADD COLUMN refresh_owner TEXT;
    ALTER TABLE accounts ADD COLUMN refresh_deadline REAL;
    ALTER TABLE accounts ADD COLUMN refresh_started_at REAL;
    """,
    # v3: client keys (only salted hashes) and the audit trail of proxied writes.
    """
    CREATE TABLE clients (
        name         TEXT PRIMARY KEY,
        key_id       TEXT NOT NULL UNIQUE,
        salt         BLOB NOT NULL,
        key_hash     BLOB NOT NULL,
        nations      TEXT NOT NULL DEFAULT '',
        read_only    INTEGER NOT NULL DEFAULT 0,
        created_at   REAL NOT NULL,
        last_used_at REAL
    );
    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         REAL NOT NULL,
        client     TEXT NOT NULL,
        nation     TEXT NOT NULL,
        method     TEXT NOT NULL,
        path       TEXT NOT NULL,
        status     INTEGER NOT NULL,
        request_id TEXT NOT NULL
    );
    CREATE INDEX audit_by_nation ON audit (nation, id);
    CREATE INDEX audit_by_client ON audit (client, id);
    CREATE INDEX audit_by_time ON audit (at);
    """,
    # v4: logged-out admin sessions and wrong admin-token attempts, shared by every process.
    """
    CREATE TABLE revoked_sessions (
        sid_hash   TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    );
    CREATE INDEX revoked_sessions_by_expiry ON revoked_sessions (expires_at);
    CREATE TABLE login_failures (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        client TEXT NOT NULL,
        at     REAL NOT NULL
    );
    CREATE INDEX login_failures_by_client ON login_failures (client, at);
    CREATE INDEX login_failures_by_time ON login_failures (at);
    """,
    # v5: the last generation of each removed account, so that a new row of that slug
    # starts above it (a refresh or import of the removed row cannot land on the new one).
    """
    CREATE TABLE retired_generations (
        slug       TEXT PRIMARY KEY,
        generation INTEGER NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# The oldest SQLite library the statements here run on (RETURNING came in 3.35).
MIN_SQLITE = (3, 35, 0)

_ACCOUNT_COLUMNS = ", ".join(ACCOUNT_FIELDS)
_INFO_COLUMNS = ", ".join(INFO_FIELDS)
# A new row's generation: above the last one of a removed account of that slug.
_FIRST_GENERATION = "COALESCE((SELECT generation FROM retired_generations WHERE slug = ?), 0) + 1"
_CHANGE_POLL = 0.05


class _Lease:
    """An account row under this process's refresh lease (`AccountLock`)."""

    def __init__(
        self,
        store: SQLiteStore,
        slug: str,
        owner: str,
        generation: int,
        interrupted_at: float | None,
        unanswered_at: float | None,
    ) -> None:
        self._store = store
        self.slug = slug
        self._owner = owner
        self._generation = generation
        self.interrupted_at = interrupted_at
        self.unanswered_at = unanswered_at
        self.released = False
        self._began = False

    async def read(self) -> Account:
        account = await self._store.get_account(self.slug)
        if account is None:
            raise AccountNotFound(self.slug)
        return account

    async def begin_refresh(self) -> None:
        store = self._store
        async with store._write(durable=False) as conn:
            now = store._clock.now()
            cur = await conn.execute(
                "UPDATE accounts SET refresh_started_at = ?, refresh_deadline = ? "
                "WHERE slug = ? AND refresh_owner = ? AND generation = ?",
                (now, now + store.lease, self.slug, self._owner, self._generation),
            )
            changed = cur.rowcount
            await cur.close()
            if changed == 0:  # replaced, or the lease taken over, since it was granted
                await store._lease_conflict(conn, self.slug, self._generation)
        self._began = True

    async def save_tokens(self, tokens: TokenSet) -> Account:
        store = self._store
        async with store._write() as conn:
            account = await store._write_tokens(
                conn, self.slug, tokens, EventKind.REFRESHED, expect_generation=self._generation
            )
        self.released = True
        self._generation = account.generation
        return account

    async def save_refresh_token(self, refresh_token: Secret, message: str) -> Account:
        store = self._store
        sealed = store._sealer.seal(refresh_token, self.slug, "refresh_token")
        async with store._write() as conn:
            cur = await conn.execute(
                "UPDATE accounts SET access_token = NULL, refresh_token = ?, expires_at = 0, "
                "status = ?, generation = generation + 1, last_error = ?, updated_at = ?, "
                f"{CLEAR_MARKER} WHERE slug = ? AND generation = ?",
                (
                    sealed,
                    AccountStatus.ACTIVE.value,  # stored over a refusal of the spent one
                    message[:LAST_ERROR_MAX],
                    store._clock.now(),
                    self.slug,
                    self._generation,
                ),
            )
            changed = cur.rowcount
            await cur.close()
            if changed == 0:
                raise GenerationConflict(f"account {self.slug!r} changed during the refresh")
            await store._insert_event(conn, self.slug, EventKind.REFRESH_FAILED, message)
            account = await store._read_account(conn, self.slug)
        assert account is not None
        self.released = True
        self._generation = account.generation
        return account

    async def record_failure(self, message: str, *, unanswered: bool = False) -> None:
        async with self._store._write() as conn:
            await self._store._write_failure(
                conn,
                self.slug,
                message,
                needs_reauth=False,
                unanswered=unanswered,
                generation=self._generation,
                owner=self._owner,
            )
        self.released = True

    async def mark_needs_reauth(self, message: str) -> None:
        async with self._store._write() as conn:
            await self._store._write_failure(
                conn,
                self.slug,
                message,
                needs_reauth=True,
                generation=self._generation,
                owner=self._owner,
            )
        self.released = True

    def keep(self) -> None:
        self.released = True  # no release write: the lease and the marker stay

    async def release(self) -> None:
        if self.released:
            return
        # No token call under this lease: an unanswered call's start goes back in the row
        # for whoever sends the refresh token next (PostgreSQL's lock leaves it there).
        started = self.unanswered_at if not self._began else None
        async with self._store._write(durable=False) as conn:
            await conn.execute(
                "UPDATE accounts SET refresh_owner = NULL, refresh_deadline = NULL, "
                "refresh_started_at = ? WHERE slug = ? AND refresh_owner = ?",
                (started, self.slug, self._owner),
            )
        self.released = True


def _text_or_bytes(raw: bytes) -> str | bytes:
    """A TEXT value as str; one that is not UTF-8 (a hand-edited cell) as its bytes, so that
    one damaged cell makes its row unreadable (the row checks reject bytes where text
    belongs, and a token cell holds bytes anyway) instead of failing the whole query."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


class SQLiteStore:
    """The SQLite implementation of `TokenStore`. Use as an async context manager."""

    def __init__(
        self,
        path: Path,
        cipher: Cipher,
        clock: Clock,
        *,
        busy_timeout: float = SQLITE_BUSY_TIMEOUT,
        token_timeout: float = 15.0,
        on_secret: SecretListener | None = None,
        events_kept: int = EVENTS_KEPT,
        login_failures_kept: int = LOGIN_FAILURES_KEPT,
        migrate: bool = True,
    ) -> None:
        self.path = Path(path)
        self._migrate_on_open = migrate
        # The schema version found when opened without migrating, while it is older.
        self.pending_version: int | None = None
        self._sealer = Sealer(cipher, on_secret)
        self._cipher = cipher
        self._clock = clock
        self._busy_ms = int(busy_timeout * 1000)
        self.lease = lease_seconds(token_timeout)
        self.events_kept = events_kept
        self.login_failures_kept = login_failures_kept
        self._owner = owner_id()
        self._conn: aiosqlite.Connection | None = None
        self._writer: aiosqlite.Connection | None = None
        self._closing: set[asyncio.Task[None]] = set()  # abandoned writers being closed
        # The client keys' own reader (`list_clients`), opened on first use.
        self._keys_reader: aiosqlite.Connection | None = None
        self._keys_lock = asyncio.Lock()
        self._probe: sqlite3.Connection | None = None
        self._probe_retry_at = float("-inf")
        self._probe_failing = False
        self._write_lock = asyncio.Lock()
        # Per account: this store's lock holder, one at a time (as PostgreSQL's sessions
        # queue for the advisory lock); the row's lease is for the other processes.
        self._turns: dict[str, asyncio.Lock] = {}

    @property
    def description(self) -> str:
        return str(self.path)

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
        conn.text_factory = _text_or_bytes
        try:
            # _scalar reads and closes each cursor: a PRAGMA left unread keeps a lock.
            await self._scalar(conn, f"PRAGMA busy_timeout = {self._busy_ms}")
            # FULL: a committed rotated refresh token survives a power cut, not just a crash.
            await self._scalar(conn, "PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            await conn.close()
            raise _open_error(f"cannot use database {self.path}: {exc}", exc) from None
        except BaseException:
            await conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Open, check the keys against existing rows, then migrate. A wrong key writes nothing."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"this Python uses SQLite {sqlite3.sqlite_version}; nbgateway needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer (Debian 12, Ubuntu 22.04 and the "
                "python:3.11 images have it)"
            )
        if not self.path.parent.exists():
            raise StoreError(
                f"directory {self.path.parent} of the database {self.path} does not exist"
            )
        if not self._migrate_on_open and holds_no_database(self.path):
            # Looked at only, and nothing to look at: no file is made (`serve` makes it).
            self.pending_version = 0
            return
        _create_private(self.path)
        conn = await self._connect()
        try:
            version = await self._user_version(conn)
            if version > SCHEMA_VERSION:
                raise self._newer(version)
            if version > 0:
                await self._check_key_ids(conn)
            if version < SCHEMA_VERSION and not self._migrate_on_open:
                # Looked at only (`nbgateway check`): a migrated file could no longer be
                # opened by the release that made it, and an empty one is set up by `serve`.
                self.pending_version = version
            else:
                await self._use_wal(conn)
                if version < SCHEMA_VERSION:
                    await self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise _open_error(f"database {self.path} is not usable: {exc}", exc) from None
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._probe = self._open_probe()

    def _open_probe(self) -> sqlite3.Connection | None:
        """The read-only connection `change_hint` asks, on the event loop: it never waits
        for a lock (timeout 0). None when it cannot be opened: the hint is then unsure."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            return sqlite3.connect(
                uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error:
            return None

    async def close(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.close()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._keys_reader is not None:
            keys_reader, self._keys_reader = self._keys_reader, None
            await keys_reader.close()
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

    async def _use_wal(self, conn: aiosqlite.Connection) -> None:
        """Put the database in WAL mode (once per file; it stays so), before migrating.

        The switch needs the file to itself and SQLite does not wait for that (no busy
        handler), so processes making one new database together (the workers of `serve
        --workers`, commands run at once) would see "database is locked": it is tried
        again until the busy timeout runs out, as any other lock is waited for."""
        if str(await self._scalar(conn, "PRAGMA journal_mode")).lower() == "wal":
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_ms / 1000
        pause = 0.005
        while True:
            try:
                # Where WAL cannot be had, SQLite stays in its own mode without an error.
                await self._scalar(conn, "PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _newer(self, version: int) -> StoreError:
        return StoreError(
            f"database {self.path} has schema version {version}, newer than this "
            f"nbgateway understands ({SCHEMA_VERSION}); upgrade nbgateway"
        )

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        """Every step from the version found under the write lock to SCHEMA_VERSION, in one
        transaction: processes opening together take turns, and none ever sees (or, with a
        test write, keeps) a version half way."""
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = await self._user_version(conn)
            if version > SCHEMA_VERSION:
                raise self._newer(version)
            for target in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        await conn.execute(statement)
            if version < SCHEMA_VERSION:
                await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise

    async def _check_key_ids(self, conn: aiosqlite.Connection) -> None:
        """Refuse to run when a stored value was sealed by a key we do not have."""
        blobs: list[Any] = []
        for sql in (
            "SELECT refresh_token FROM accounts UNION ALL SELECT access_token FROM accounts",
            "SELECT verifier FROM auth_states",
        ):
            async with conn.execute(sql) as cur:
                blobs.extend([row[0] async for row in cur])
        unknown = self._sealer.unknown_key_ids(blobs)
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
            raise _read_error(f"database not reachable: {exc}", exc, self.path) from None

    async def check_writable(self) -> None:
        """Raise StoreError unless a write can be committed now (disk full, read-only, deleted)."""
        if not self.path.exists():
            raise StoreUnavailable(f"database file {self.path} no longer exists")
        # An open connection keeps writing through its descriptor after the file was made
        # read-only or immutable (commits land in the WAL, checkpoints fail, a restart
        # cannot write): ask the filesystem too.
        if not os.access(self.path, os.W_OK):
            raise StoreUnavailable(f"database file {self.path} is read-only")
        async with self._write(durable=False) as conn:
            # A real page write that changes nothing visible: setting the schema version to
            # itself rewrites the database header page (into the WAL, which needs space).
            # Read under the write lock: another process (a newer release included) may
            # have migrated since this one opened, and its version must stay.
            version = await self._user_version(conn)
            await self._scalar(conn, f"PRAGMA user_version = {version}")

    # -- reading ---------------------------------------------------------------------

    async def _read_account(self, conn: aiosqlite.Connection, slug: str) -> Account | None:
        async with conn.execute(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE slug = ?", (slug,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else self._sealer.account(row)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A read whose sqlite3 failure becomes the store's error (`_read_error`)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise _read_error(
                f"database {self.path} cannot be read: {exc}", exc, self.path
            ) from None

    async def get_account(self, slug: str) -> Account | None:
        """The account with its tokens decrypted, or None. DecryptError on a bad row."""
        with self._reading():
            return await self._read_account(self.conn, slug)

    async def list_accounts(self) -> list[AccountInfo]:
        """Every account without its tokens (nothing is decrypted)."""
        with self._reading():
            async with self.conn.execute(
                f"SELECT {_INFO_COLUMNS} FROM accounts ORDER BY slug"
            ) as cur:
                return [listed_info_from_row(row) async for row in cur]

    async def change_counter(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        with self._reading():
            return int(await self._scalar(self.conn, "PRAGMA data_version"))

    def change_hint(self) -> int:
        """PRAGMA data_version of a connection of its own: it moves with every commit made
        through any other connection (this process's included). Reading it takes a shared
        lock on the WAL index, in memory, and never waits; when SQLite says busy, the hint
        is unsure."""
        if self._conn is None:
            raise StoreError("the store is not open")
        probe = self._probe
        if probe is None:
            now = self._clock.monotonic()
            if now < self._probe_retry_at:
                return unsure_hint(self._clock)
            self._probe_retry_at = now + _PROBE_RETRY
            probe = self._probe = self._open_probe()
            if probe is None:
                return unsure_hint(self._clock)
        try:
            with contextlib.closing(probe.execute("PRAGMA data_version")) as cursor:
                row = cursor.fetchone()
        except sqlite3.Error as exc:
            if not self._probe_failing:
                self._probe_failing = True
                log.warning(
                    "cannot read the database's change count; following changes every 0.2 s",
                    extra={"error": str(exc)},
                )
            return unsure_hint(self._clock)
        self._probe_failing = False
        return int(row[0])

    async def events(self, slug: str | None = None, limit: int = 20) -> list[Event]:
        """Most recent events first, for one account or all."""
        columns = ", ".join(EVENT_FIELDS)
        limit = max(0, limit)
        if slug is None:
            sql, params = f"SELECT {columns} FROM events ORDER BY id DESC LIMIT ?", (limit,)
        else:
            sql = f"SELECT {columns} FROM events WHERE slug = ? ORDER BY id DESC LIMIT ?"
            params = (slug, limit)  # type: ignore[assignment]
        with self._reading():
            async with self.conn.execute(sql, params) as cur:
                rows = await cur.fetchall()
        return readable_rows(rows, event_from_row, "event")

    # -- writing ---------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self, *, durable: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """A short write transaction on the writer connection; StoreError if it fails.

        `durable=False` (lease bookkeeping only) commits without waiting for the disk: in WAL
        mode it still survives a process crash, just not a power cut, and the next durable
        commit makes it durable too. Tokens are always written durably.
        """
        # One writer at a time in this process; the wait for that turn and for SQLite's
        # lock share one busy timeout, so callers queued behind a database another process
        # keeps locked all fail within it (each waited its own timeout after the one before).
        self.conn  # noqa: B018  (StoreError once closed: no writer is opened again)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_ms / 1000
        queued = self._write_lock.locked()  # else the whole timeout is left for SQLite's lock
        try:
            async with asyncio.timeout_at(deadline):
                await self._write_lock.acquire()
        except TimeoutError:
            raise StoreUnavailable(
                f"database {self.path} cannot be written: database is locked (this "
                "process's earlier writes are still waiting for it)"
            ) from None
        try:
            self.conn  # noqa: B018  (closed while this write waited its turn: nothing opens)
            if self._writer is None:
                self._writer = await self._connect()
            conn = self._writer
            left = max(0, int((deadline - loop.time()) * 1000)) if queued else self._busy_ms
            try:
                if left < self._busy_ms:
                    await self._scalar(conn, f"PRAGMA busy_timeout = {left}")
                if not durable:
                    await self._scalar(conn, "PRAGMA synchronous = NORMAL")
                await conn.execute("BEGIN IMMEDIATE")
                if left < self._busy_ms:
                    await self._scalar(conn, f"PRAGMA busy_timeout = {self._busy_ms}")
            except sqlite3.Error as exc:
                await self._drop_writer()  # a new writer starts with the whole busy timeout
                raise StoreUnavailable(f"database {self.path} cannot be written: {exc}") from None
            except BaseException:
                # Cancelled (a timeout, a client gone) while the BEGIN may still wait for
                # the lock in the connection's thread: it would take the lock later and
                # keep it. The connection is closed once that returns (rolling back).
                self._abandon_writer()
                raise
            try:
                yield conn
                await conn.execute("COMMIT")
            except asyncio.CancelledError:
                self._abandon_writer()  # the statement may still run: closing rolls back
                raise
            except BaseException as exc:
                try:
                    await conn.execute("ROLLBACK")
                except sqlite3.Error:
                    await self._drop_writer()
                if isinstance(exc, sqlite3.IntegrityError):
                    # A constraint refused the write: it would be refused again, as on
                    # PostgreSQL (not "unavailable", which says to try again).
                    raise StoreError(f"database {self.path} cannot be written: {exc}") from None
                if isinstance(exc, UnicodeEncodeError):
                    raise StoreError(
                        f"database {self.path} cannot be written: a value is not text that "
                        "can be stored"
                    ) from None
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(
                        f"database {self.path} cannot be written: {exc}"
                    ) from None
                raise
            finally:
                if not durable and self._writer is conn:
                    try:
                        await self._scalar(conn, "PRAGMA synchronous = FULL")
                    except sqlite3.Error:
                        await self._drop_writer()
        finally:
            self._write_lock.release()

    def _abandon_writer(self) -> None:
        """Forget the writer without waiting: it is closed once what its thread is still
        running returns, and closing rolls back any transaction it holds."""
        writer, self._writer = self._writer, None
        if writer is not None:
            task = asyncio.get_running_loop().create_task(_close_quietly(writer))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                await writer.close()
            except sqlite3.Error:
                pass

    async def _insert_event(
        self, conn: aiosqlite.Connection, slug: str, kind: EventKind, detail: str
    ) -> None:
        await conn.execute(
            "INSERT INTO events (slug, kind, at, detail) VALUES (?, ?, ?, ?)",
            (slug, kind.value, self._clock.now(), detail[:LAST_ERROR_MAX]),
        )
        await conn.execute(
            "DELETE FROM events WHERE slug = ? AND id <= (SELECT id FROM events WHERE slug = ? "
            "ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (slug, slug, self.events_kept),
        )

    async def _write_tokens(
        self,
        conn: aiosqlite.Connection,
        slug: str,
        tokens: TokenSet,
        kind: EventKind,
        *,
        expect_generation: int | None = None,
    ) -> Account:
        now = self._clock.now()
        values = self._sealer.token_columns(slug, tokens)
        if expect_generation is None:
            await conn.execute(
                "INSERT INTO accounts (slug, access_token, refresh_token, expires_at, scope, "
                "status, generation, last_refresh_at, last_error, created_at, updated_at) "
                f"VALUES (?, ?, ?, ?, ?, ?, {_FIRST_GENERATION}, ?, NULL, ?, ?) "
                "ON CONFLICT (slug) DO UPDATE SET access_token = excluded.access_token, "
                "refresh_token = excluded.refresh_token, expires_at = excluded.expires_at, "
                "scope = excluded.scope, status = excluded.status, "
                "generation = accounts.generation + 1, last_refresh_at = excluded.last_refresh_at, "
                f"last_error = NULL, updated_at = excluded.updated_at, {CLEAR_MARKER}",
                (slug, *values, slug, now, now, now),
            )
        else:
            cur = await conn.execute(
                "UPDATE accounts SET access_token = ?, refresh_token = ?, expires_at = ?, "
                "scope = ?, status = ?, generation = generation + 1, last_refresh_at = ?, "
                f"last_error = NULL, updated_at = ?, {CLEAR_MARKER} "
                "WHERE slug = ? AND generation = ?",
                (*values, now, now, slug, expect_generation),
            )
            changed = cur.rowcount
            await cur.close()
            if changed == 0:
                raise GenerationConflict(f"account {slug!r} changed during the refresh")
        await self._insert_event(conn, slug, kind, "")
        account = await self._read_account(conn, slug)
        assert account is not None
        return account

    async def _write_failure(
        self,
        conn: aiosqlite.Connection,
        slug: str,
        message: str,
        *,
        needs_reauth: bool,
        generation: int,
        owner: str,
        unanswered: bool = False,
    ) -> None:
        """A refresh's failure, as a compare-and-set on `generation` as `save_tokens` is (a
        token refused, or a call that failed, after a re-connect or an import stored another
        one says nothing of the new one) and on the lease being `owner`'s still (another
        process that took a lapsed lease over is refreshing, or has refreshed, on its own
        account): GenerationConflict or LeaseLost, and nothing written."""
        message = message[:LAST_ERROR_MAX]
        kind, changes = failure_changes(needs_reauth=needs_reauth, unanswered=unanswered)
        cur = await conn.execute(
            f"UPDATE accounts SET last_error = ?, updated_at = ?, {changes} "
            "WHERE slug = ? AND generation = ? AND refresh_owner = ?",
            (message, self._clock.now(), slug, generation, owner),
        )
        changed = cur.rowcount
        await cur.close()
        if changed == 0:
            await self._lease_conflict(conn, slug, generation)
        await self._insert_event(conn, slug, kind, message)

    async def _lease_conflict(
        self, conn: aiosqlite.Connection, slug: str, generation: int
    ) -> NoReturn:
        """Raise why a write under the lease matched no row: LeaseLost when the row is still
        of `generation` (another process took the lapsed lease over), else
        GenerationConflict (re-connected, imported or removed meanwhile)."""
        current = await self._scalar(
            conn, "SELECT generation FROM accounts WHERE slug = ?", (slug,)
        )
        if current is not None and int(current) == generation:
            raise LeaseLost(
                f"the refresh lease of account {slug!r} lapsed and another process took it over"
            )
        raise GenerationConflict(f"account {slug!r} changed during the refresh")

    async def _claim(self, slug: str) -> _Lease:
        """Take the account's refresh lease, waiting while a live holder elsewhere has it."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2 * self.lease
        owner = f"{self._owner}/{uuid.uuid4().hex[:6]}"
        while True:
            async with self._write(durable=False) as conn:
                async with conn.execute(
                    "SELECT generation, refresh_owner, refresh_deadline, refresh_started_at "
                    "FROM accounts WHERE slug = ?",
                    (slug,),
                ) as cur:
                    row = await cur.fetchone()
                if row is None:
                    raise AccountNotFound(slug)
                now = self._clock.now()
                holder, deadline = row["refresh_owner"], row["refresh_deadline"]
                # A lease of this store's own is stale: the token manager holds at most one
                # per account at a time, so it is left over from a failed release.
                own = holder is not None and holder.startswith(self._owner + "/")
                runs = None if holder is None or own else holder_runs(holder)
                lapsed = deadline is None or deadline <= now
                # A holder of this host that still runs, past its deadline with its marker
                # set, could not store the result of its token call (disk full, say) and
                # may hold the rotated pair in memory: the old refresh token is spent, so
                # wait for it rather than take over. A holder that no longer runs is
                # replaced at once.
                stuck_with_result = runs is True and row["refresh_started_at"] is not None
                if holder is None or own or runs is False or (lapsed and not stuck_with_result):
                    # A marker of this store's own stays: it was kept (`keep`) for a pair
                    # this process holds and has yet to store.
                    # (A call left unanswered, no holder: its start is the lease's
                    # `unanswered_at`, put back on release if no call is made meanwhile, so
                    # a live holder that sends nothing never looks stuck with a result.)
                    started = row["refresh_started_at"] if own else None
                    await conn.execute(
                        "UPDATE accounts SET refresh_owner = ?, refresh_deadline = ?, "
                        "refresh_started_at = ? WHERE slug = ?",
                        (owner, now + self.lease, started, slug),
                    )
                    interrupted = (
                        row["refresh_started_at"] if holder is not None and not own else None
                    )
                    unanswered = row["refresh_started_at"] if holder is None else None
                    return _Lease(
                        self, slug, owner, int(row["generation"]), interrupted, unanswered
                    )
                wait = LEASE_RECHECK if lapsed else min(deadline - now, LEASE_RECHECK)
            if loop.time() >= give_up:
                raise RefreshLockBusy(
                    f"another process has held the refresh of account {slug!r} for too long"
                )
            await self._wait_for_change(wait)

    async def _wait_for_change(self, seconds: float) -> None:
        """Return once another connection committed, or after `seconds`."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(seconds, _CHANGE_POLL)
        start = await self.change_counter()
        while loop.time() < until:
            await asyncio.sleep(_CHANGE_POLL)
            if await self.change_counter() != start:
                return

    @asynccontextmanager
    async def refresh_lock(self, slug: str) -> AsyncIterator[_Lease]:
        """Hold the account's refresh lease; released (or settled by a write) on exit."""
        turn = self._turns.setdefault(slug, asyncio.Lock())
        try:
            async with asyncio.timeout(2 * self.lease):
                await turn.acquire()
        except TimeoutError:
            raise RefreshLockBusy(
                f"this process has held the refresh of account {slug!r} for too long"
            ) from None
        try:
            lease = await self._claim(slug)
            try:
                yield lease
            finally:
                try:
                    await asyncio.shield(lease.release())
                except StoreError:
                    pass  # the lease lapses at its deadline; the failure is reported elsewhere
        finally:
            turn.release()

    async def save_tokens(self, slug: str, tokens: TokenSet, kind: EventKind) -> Account:
        """Store tokens from a new authorization or an import (bumps the generation)."""
        async with self._write() as conn:
            return await self._write_tokens(conn, slug, tokens, kind)

    async def import_refresh_token(
        self, slug: str, refresh_token: Secret, *, replaces: int | None = None
    ) -> int:
        """Store a refresh token alone (legacy-token migration); the access token comes
        later. A new row where none is, or in place of the row of generation `replaces`;
        GenerationConflict (nothing stored) when the account is otherwise. Returns the
        row's generation."""
        now = self._clock.now()
        sealed = self._sealer.seal(refresh_token, slug, "refresh_token")
        async with self._write() as conn:
            if replaces is None:
                cur = await conn.execute(
                    "INSERT INTO accounts (slug, access_token, refresh_token, expires_at, "
                    "scope, status, generation, last_refresh_at, last_error, created_at, "
                    f"updated_at) VALUES (?, NULL, ?, 0, '', ?, {_FIRST_GENERATION}, NULL, "
                    "NULL, ?, ?) ON CONFLICT (slug) DO NOTHING RETURNING generation",
                    (slug, sealed, AccountStatus.ACTIVE.value, slug, now, now),
                )
            else:
                cur = await conn.execute(
                    "UPDATE accounts SET access_token = NULL, refresh_token = ?, expires_at = 0, "
                    "status = ?, generation = generation + 1, last_error = NULL, "
                    f"updated_at = ?, {CLEAR_MARKER} WHERE slug = ? AND generation = ? "
                    "RETURNING generation",
                    (sealed, AccountStatus.ACTIVE.value, now, slug, replaces),
                )
            row = await cur.fetchone()
            await cur.close()
            if row is None:
                raise GenerationConflict(f"account {slug!r} changed during the import")
            await self._insert_event(conn, slug, EventKind.IMPORTED, "")
        return int(row[0])

    async def remove_account(self, slug: str, *, generation: int | None = None) -> bool:
        """Delete an account's tokens (only while it is `generation`, when given); its
        events stay as history, and its generation is kept so that a new row of the slug
        starts above it. False if no such row was there."""
        where = "slug = ?"
        params: list[object] = [slug]
        if generation is not None:
            where, params = f"{where} AND generation = ?", [slug, generation]
        async with self._write() as conn:
            cur = await conn.execute(
                f"DELETE FROM accounts WHERE {where} RETURNING generation", params
            )
            row = await cur.fetchone()
            await cur.close()
            if row is not None:
                await conn.execute(
                    "INSERT INTO retired_generations (slug, generation) VALUES (?, ?) "
                    "ON CONFLICT (slug) DO UPDATE SET "
                    "generation = MAX(retired_generations.generation, excluded.generation)",
                    (slug, row[0]),
                )
                await self._insert_event(conn, slug, EventKind.REMOVED, "")
        return row is not None

    # -- authorization states -----------------------------------------------------------

    async def create_state(
        self, state: str, slug: str, verifier: Secret, binding: str, ttl: float
    ) -> None:
        """Remember a started authorization (state hash, nation, sealed PKCE verifier).

        Expired states are dropped, and at most STATES_KEPT stay pending (oldest go first).
        """
        now = self._clock.now()
        sealed = self._sealer.cipher.encrypt(verifier.reveal(), slug=slug, field="code_verifier")
        async with self._write() as conn:
            await conn.execute("DELETE FROM auth_states WHERE expires_at < ?", (now,))
            await conn.execute(
                "DELETE FROM auth_states WHERE state_hash IN (SELECT state_hash FROM auth_states "
                # rowid breaks ties: states started within one clock tick go oldest first.
                "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                (STATES_KEPT - 1,),
            )
            await conn.execute(
                "INSERT INTO auth_states (state_hash, slug, verifier, binding, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (state_hash(state), slug, sealed, binding, now, now + ttl),
            )

    async def consume_state(self, state: str, binding: str) -> PendingAuthorization:
        """Take a state exactly once. StateError if unknown, used, expired or bound elsewhere.

        A state bound to another session is left in place: a foreign browser hitting the
        callback cannot burn the admin's authorization.
        """
        digest = state_hash(state)
        async with self._write() as conn:
            async with conn.execute(
                "SELECT slug, verifier, binding, created_at, expires_at FROM auth_states "
                "WHERE state_hash = ?",
                (digest,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise StateError("this authorization link is unknown or was already used")
            if row["binding"] and row["binding"] != binding:
                raise StateError("this authorization was started in another session")
            await conn.execute("DELETE FROM auth_states WHERE state_hash = ?", (digest,))
        if row["expires_at"] < self._clock.now():
            raise StateError("this authorization link has expired")
        verifier = self._cipher.decrypt(row["verifier"], slug=row["slug"], field="code_verifier")
        return PendingAuthorization(row["slug"], verifier, row["created_at"])

    # -- maintenance ----------------------------------------------------------------------

    async def rotate_keys(self) -> RotationReport:
        """Re-encrypt every value not sealed by the first key; unreadable rows (under any
        key) are skipped and reported."""
        changed = 0
        skipped: list[str] = []
        async with self._write() as conn:
            async with conn.execute(
                "SELECT slug, access_token, refresh_token FROM accounts ORDER BY slug"
            ) as cur:
                rows = await cur.fetchall()
            for row in rows:
                slug = row["slug"]
                try:
                    updates = self._sealer.resealed(row)
                except ROW_ERRORS as exc:
                    skipped.append(f"account {slug!r}: {exc}")
                    continue
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
                try:
                    if not self._cipher.needs_rotation(row["verifier"]):
                        continue
                    plain = self._cipher.decrypt(
                        row["verifier"], slug=row["slug"], field="code_verifier"
                    )
                except ROW_ERRORS:
                    # A pending authorization is disposable: drop it rather than keep it
                    # under a key that is being retired.
                    await conn.execute(
                        "DELETE FROM auth_states WHERE state_hash = ?", (row["state_hash"],)
                    )
                    continue
                await conn.execute(
                    "UPDATE auth_states SET verifier = ? WHERE state_hash = ?",
                    (
                        self._cipher.encrypt(
                            plain.reveal(), slug=row["slug"], field="code_verifier"
                        ),
                        row["state_hash"],
                    ),
                )
        return RotationReport(changed, skipped)

    async def unreadable_accounts(self, slug: str | None = None) -> dict[str, str]:
        """{slug: problem} for every account (or just `slug`) whose row does not parse or
        decrypt: one query, however many accounts."""
        where, params = ("WHERE slug = ?", (slug,)) if slug is not None else ("", ())
        with self._reading():
            async with self.conn.execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts {where} ORDER BY slug", params
            ) as cur:
                rows = await cur.fetchall()
        return self._sealer.unreadable(rows)

    async def verify(self) -> list[str]:
        """Try to decrypt every account and pending authorization and read every event,
        client key and audit entry; return one plain message per unreadable row."""
        problems = list((await self.unreadable_accounts()).values())
        for table, fields, parse in (
            ("events", EVENT_FIELDS, event_from_row),
            ("clients", CLIENT_FIELDS, client_from_row),
            ("audit", AUDIT_FIELDS, audit_from_row),
        ):
            with self._reading():
                async with self.conn.execute(f"SELECT {', '.join(fields)} FROM {table}") as cur:
                    rows = await cur.fetchall()
            problems.extend(corrupt_rows(rows, parse))
        with self._reading():
            async with self.conn.execute(
                "SELECT slug, verifier FROM auth_states WHERE expires_at > ?", (self._clock.now(),)
            ) as cur:
                states = await cur.fetchall()
        problems.extend(unreadable_states(states, self._cipher))
        return problems

    # -- copying between databases -------------------------------------------------------

    async def dump(self) -> StoreDump:
        """Every row as stored (ciphertexts untouched)."""
        out = StoreDump()
        for table, fields, target in (
            ("accounts", ACCOUNT_FIELDS, out.accounts),
            ("events", EVENT_FIELDS, out.events),
            ("auth_states", STATE_FIELDS, out.auth_states),
            ("clients", CLIENT_FIELDS, out.clients),
            ("audit", AUDIT_FIELDS, out.audit),
        ):
            with self._reading():
                async with self.conn.execute(
                    f"SELECT {', '.join(fields)} FROM {table} ORDER BY 1"
                ) as cur:
                    target.extend([{f: row[f] for f in fields} async for row in cur])
        for account in out.accounts:  # a copy starts with no refresh in flight
            account.update(refresh_owner=None, refresh_deadline=None, refresh_started_at=None)
        return out

    async def load(self, dump: StoreDump) -> None:
        """Insert a dump into this (account-free) database in one transaction."""
        async with self._write() as conn:
            for table, what in LOAD_REFUSED_WHEN_HOLDING:
                if await self._scalar(conn, f"SELECT count(*) FROM {table}"):
                    raise StoreError(f"database {self.path} already holds {what}; nothing copied")
            for table, fields, rows in (
                ("accounts", ACCOUNT_FIELDS, dump.accounts),
                ("events", EVENT_FIELDS, dump.events),
                ("auth_states", STATE_FIELDS, dump.auth_states),
                ("clients", CLIENT_FIELDS, dump.clients),
                ("audit", AUDIT_FIELDS, dump.audit),
            ):
                marks = ", ".join("?" for _ in fields)
                await conn.executemany(
                    f"INSERT INTO {table} ({', '.join(fields)}) VALUES ({marks})",
                    [tuple(row[f] for f in fields) for row in rows],
                )

    # -- client keys and the audit trail --------------------------------------------------

    async def add_client(self, record: ClientRecord) -> None:
        """Register a client key (its salted hash). ClientExists if the name is taken."""
        row = client_row(record)
        marks = ", ".join("?" for _ in CLIENT_FIELDS)
        async with self._write() as conn:
            if await self._scalar(
                conn, "SELECT 1 FROM clients WHERE name = ?", (record.info.name,)
            ):
                raise ClientExists(f"a client named {record.info.name!r} already exists")
            await conn.execute(
                f"INSERT INTO clients ({', '.join(CLIENT_FIELDS)}) VALUES ({marks})",
                tuple(row[f] for f in CLIENT_FIELDS),
            )

    async def list_clients(self) -> list[ClientRecord]:
        """Every registered client, by name, as of now: read on a connection of its own,
        one statement at a time, so each listing starts a fresh snapshot. Not the shared
        reader (it may be inside another statement's snapshot, and a removal committed
        after that snapshot began would not show, though `change_hint` already moved for
        it), nor the writer (a write of this process waiting for another process's write
        lock would hold the listing up)."""
        sql = f"SELECT {', '.join(CLIENT_FIELDS)} FROM clients ORDER BY name"
        async with self._keys_lock:
            try:
                if self._keys_reader is None:
                    self._keys_reader = await self._connect()
                async with self._keys_reader.execute(sql) as cur:
                    rows = await cur.fetchall()
            except sqlite3.Error as exc:
                keys_reader, self._keys_reader = self._keys_reader, None
                if keys_reader is not None:
                    with contextlib.suppress(sqlite3.Error):
                        await keys_reader.close()
                raise _read_error(
                    f"database {self.path} cannot be read: {exc}", exc, self.path
                ) from None
        return readable_rows(rows, client_from_row, "client key")

    async def remove_client(self, name: str) -> bool:
        """Delete a client key. False if no client has that name."""
        async with self._write() as conn:
            cur = await conn.execute("DELETE FROM clients WHERE name = ?", (name,))
            removed = cur.rowcount > 0
            await cur.close()
        return removed

    async def touch_clients(self, used: Mapping[str, float]) -> None:
        """Record when each client key (by key id) was last seen (batched by the caller)."""
        if not used:
            return
        async with self._write() as conn:
            await conn.executemany(
                "UPDATE clients SET last_used_at = max(coalesce(last_used_at, 0), ?) "
                "WHERE key_id = ?",
                [(at, key_id) for key_id, at in used.items()],
            )

    async def record_audit(self, entries: Sequence[AuditEntry], keep_after: float) -> None:
        """Append audit entries and drop those older than `keep_after` (epoch seconds)."""
        async with self._write() as conn:
            await conn.executemany(
                "INSERT INTO audit (at, client, nation, method, path, status, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.at,
                        e.client,
                        e.nation,
                        e.method,
                        e.path[:AUDIT_PATH_MAX],
                        e.status,
                        e.request_id,
                    )
                    for e in entries
                ],
            )
            await conn.execute("DELETE FROM audit WHERE at < ?", (keep_after,))

    async def audit(
        self, *, nation: str | None = None, client: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Newest audit entries first, optionally for one nation and/or one client."""
        limit = max(0, limit)
        where, params = [], []
        if nation is not None:
            where.append("nation = ?")
            params.append(nation)
        if client is not None:
            where.append("client = ?")
            params.append(client)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._reading():
            async with self.conn.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM audit {clause} "
                "ORDER BY at DESC, id DESC LIMIT ?",
                (*params, limit),
            ) as cur:
                rows = await cur.fetchall()
        return readable_rows(rows, audit_from_row, "audit")

    # -- admin sessions and the wrong-token throttle ------------------------------------

    async def revoke_session(self, sid: str, expires_at: float, now: float) -> None:
        """Remember a logged-out session (its id's hash) until `expires_at`; revocations
        that have expired by `now` are dropped."""
        async with self._write() as conn:
            await conn.execute("DELETE FROM revoked_sessions WHERE expires_at <= ?", (now,))
            await conn.execute(
                "INSERT INTO revoked_sessions (sid_hash, expires_at) VALUES (?, ?) "
                "ON CONFLICT (sid_hash) DO UPDATE SET "
                "expires_at = max(expires_at, excluded.expires_at)",
                (session_hash(sid), expires_at),
            )

    async def session_revoked(self, sid: str, now: float) -> bool:
        """Whether the session was logged out (and would not have expired by `now`)."""
        with self._reading():
            found = await self._scalar(
                self.conn,
                "SELECT 1 FROM revoked_sessions WHERE sid_hash = ? AND expires_at > ?",
                (session_hash(sid), now),
            )
        return found is not None

    async def record_login_failure(self, client: str, at: float, keep_after: float) -> None:
        """Count a wrong admin token from `client` at `at`; attempts at or before
        `keep_after` (every address's) are dropped, and at most `login_failures_kept` stay
        (the oldest go first)."""
        # Not durable: a count lost to a power cut only gives an address a fresh window.
        async with self._write(durable=False) as conn:
            await conn.execute("DELETE FROM login_failures WHERE at <= ?", (keep_after,))
            await conn.execute(
                "INSERT INTO login_failures (client, at) VALUES (?, ?)", (client, at)
            )
            await conn.execute(
                "DELETE FROM login_failures WHERE id <= (SELECT id FROM login_failures "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.login_failures_kept,),
            )

    async def login_failures(self, client: str, since: float) -> list[float]:
        """When `client` sent wrong admin tokens after `since`, oldest first."""
        with self._reading():
            async with self.conn.execute(
                "SELECT at FROM login_failures WHERE client = ? AND at > ? ORDER BY at, id",
                (client, since),
            ) as cur:
                return [float(row[0]) async for row in cur]

    async def forget_login_failure(self, client: str, at: float) -> None:
        """Take back one attempt `client` made at `at` (counted before its token was
        checked, and the token was right); nothing when there is none."""
        async with self._write(durable=False) as conn:
            await conn.execute(
                "DELETE FROM login_failures WHERE id = (SELECT id FROM login_failures "
                "WHERE client = ? AND at = ? ORDER BY id DESC LIMIT 1)",
                (client, at),
            )


async def _close_quietly(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        await conn.close()
