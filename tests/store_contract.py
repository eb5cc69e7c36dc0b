"""The store contract: one behaviour suite that every `TokenStore` backend must pass.

Every test here runs twice, on SQLite (a real file) and on PostgreSQL (a real server the
suite starts, tests/pgserver.py), through the `backend` fixture. A behaviour that exists
on one backend only cannot pass. Tests see the store only as `TokenStore`; what they must
do behind its back (corrupt a row, read a raw ciphertext, make a lock holder vanish) goes
through the backend's `Backend` helper, the way an operator's tools would.

SQLite-only matters (WAL files, bytes on disk, PRAGMAs) stay in tests/test_store.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pgserver import PgServer
from procs import dead_process_id

from nbgateway.clock import FakeClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.errors import (
    AccountNotFound,
    CorruptRecordError,
    DecryptError,
    StateError,
    StoreError,
    StoreUnavailable,
)
from nbgateway.models import (
    AccountInfo,
    AccountStatus,
    AuditEntry,
    ClientInfo,
    ClientRecord,
    EventKind,
    TokenSet,
)
from nbgateway.redact import Secret
from nbgateway.store import (
    AccountLock,
    ClientExists,
    GenerationConflict,
    StoreDump,
    TokenStore,
)
from nbgateway.store import postgres as pg_backend
from nbgateway.store import sqlite as sqlite_backend
from nbgateway.store.base import AUDIT_PATH_MAX, STATES_KEPT, session_hash, state_hash
from nbgateway.store.postgres import PostgresStore
from nbgateway.store.sqlite import SQLiteStore

STATE_TTL = 600.0
# The longest a test waits for something that must happen (a notice, a lock handed over).
PROMPTLY = 10.0


def client_record(
    name: str,
    clock: FakeClock,
    nations: tuple[str, ...] = (),
    read_only: bool = False,
    key_id: str | None = None,
) -> ClientRecord:
    key_id = key_id or f"{name[:4]:x<4}{len(name):04d}"
    info = ClientInfo(name, nations, read_only, clock.now(), None, f"nbgw_{key_id[:4]}…")
    return ClientRecord(info, key_id, b"salt-" + name.encode(), b"hash-" + name.encode())


def audit_entry(clock: FakeClock, client: str, nation: str, request_id: str) -> AuditEntry:
    return AuditEntry(clock.now(), client, nation, "POST", "/api/v2/signups", 201, request_id)


def token_set(clock: FakeClock, label: str, expires_in: float = 3600.0) -> TokenSet:
    return TokenSet(
        access_token=Secret(f"access-CANARY-{label}-9f8e7d6c"),
        refresh_token=Secret(f"refresh-CANARY-{label}-1a2b3c4d"),
        expires_at=clock.now() + expires_in,
        scope="default",
    )


async def event_kinds(store: TokenStore, slug: str) -> list[EventKind]:
    """The account's event kinds, oldest first."""
    return [e.kind for e in reversed(await store.events(slug, limit=100))]


# -- the two backends -----------------------------------------------------------------------


class Backend:
    """One backend's database and the raw access the tests need behind the store's back."""

    name: str
    current_version: int  # the schema version this nbgateway writes

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    description: str

    def make(self, *keys: str, **kwargs: Any) -> TokenStore:
        """A new (unopened) store on this backend's database."""
        raise NotImplementedError

    def fresh(self) -> Backend:
        """The same kind of backend on a new, empty database."""
        raise NotImplementedError

    async def set_column(self, slug: str, column: str, value: Any) -> None:
        raise NotImplementedError

    async def copy_column(self, column: str, from_slug: str, to_slug: str, to_column: str) -> None:
        """Copy one raw account column into another row or column (ciphertext untouched)."""
        value = await self.column(from_slug, column)
        await self.set_column(to_slug, to_column, value)

    async def column(self, slug: str, column: str) -> Any:
        row = await self.row(slug)
        return row[column]

    async def row(self, slug: str) -> dict[str, Any]:
        raise NotImplementedError

    async def blobs(self) -> list[bytes]:
        """Every stored token ciphertext, raw."""
        raise NotImplementedError

    async def state_hashes(self) -> list[str]:
        raise NotImplementedError

    async def abandon(self, store: TokenStore, lock: AccountLock) -> None:
        """Make `lock`'s holder vanish without releasing it (as a killed process would)."""
        raise NotImplementedError

    async def table(self, name: str) -> list[dict[str, Any]]:
        """Every raw row of a table."""
        raise NotImplementedError

    async def set_marker(self, slug: str, owner: str, started_at: float) -> None:
        """Write a refresh marker into the account's row, as a holder that began its token
        call and could not clear it would leave it."""
        raise NotImplementedError

    async def damage_states(self) -> None:
        """Overwrite every pending authorization's sealed verifier with bytes that do not
        decrypt."""
        raise NotImplementedError

    async def schema_version(self) -> int:
        raise NotImplementedError

    async def table_names(self) -> list[str]:
        """The tables the database holds (none for an empty one, or no SQLite file)."""
        raise NotImplementedError

    async def set_schema_version(self, version: int) -> None:
        """Mark the database as migrated to `version`, as that release would."""
        raise NotImplementedError

    async def create_previous_schema(self, refresh_token: bytes) -> None:
        """Build the database with every migration but the newest, as the previous release
        left it, holding account 'acme' (generation 3, `refresh_token` as its sealed refresh
        token), one event and one client key."""
        raise NotImplementedError


class SQLiteBackend(Backend):
    name = "sqlite"
    current_version = sqlite_backend.SCHEMA_VERSION

    def __init__(self, clock: FakeClock, path: Path) -> None:
        super().__init__(clock)
        self.path = path
        self.description = str(path)

    def fresh(self) -> Backend:
        n = len(list(self.path.parent.glob("fresh-*.db")))
        return SQLiteBackend(self.clock, self.path.parent / f"fresh-{n}.db")

    def make(self, *keys: str, **kwargs: Any) -> TokenStore:
        return SQLiteStore(self.path, Cipher([Secret(k) for k in keys]), self.clock, **kwargs)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with closing(sqlite3.connect(self.path, timeout=5)) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(sql, params).fetchall()
            conn.commit()
            return rows

    async def set_column(self, slug: str, column: str, value: Any) -> None:
        self._query(f"UPDATE accounts SET {column} = ? WHERE slug = ?", (value, slug))

    async def row(self, slug: str) -> dict[str, Any]:
        [row] = self._query("SELECT * FROM accounts WHERE slug = ?", (slug,))
        return dict(row)

    async def blobs(self) -> list[bytes]:
        rows = self._query(
            "SELECT access_token FROM accounts WHERE access_token IS NOT NULL "
            "UNION ALL SELECT refresh_token FROM accounts"
        )
        return [r[0] for r in rows]

    async def state_hashes(self) -> list[str]:
        return [r[0] for r in self._query("SELECT state_hash FROM auth_states")]

    async def abandon(self, store: TokenStore, lock: AccountLock) -> None:
        # As if the holder's process had died: its lease names a pid that no longer runs
        # (SQLite takes such a lease over at once; see test_store.py for the other cases).
        [row] = self._query("SELECT refresh_owner FROM accounts WHERE slug = ?", (lock.slug,))
        host, namespace, _pid, rest = row[0].split("/", 3)
        dead = f"{host}/{namespace}/{dead_process_id()}/{rest}"
        self._query("UPDATE accounts SET refresh_owner = ? WHERE slug = ?", (dead, lock.slug))

    async def table(self, name: str) -> list[dict[str, Any]]:
        return [dict(row) for row in self._query(f"SELECT * FROM {name}")]

    async def damage_states(self) -> None:
        self._query("UPDATE auth_states SET verifier = ?", (b"\x00" * 40,))

    async def set_marker(self, slug: str, owner: str, started_at: float) -> None:
        self._query(
            "UPDATE accounts SET refresh_owner = ?, refresh_deadline = ?, "
            "refresh_started_at = ? WHERE slug = ?",
            (owner, started_at + 60, started_at, slug),
        )

    async def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    async def table_names(self) -> list[str]:
        if not self.path.exists():
            return []
        rows = self._query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [row[0] for row in rows]

    async def set_schema_version(self, version: int) -> None:
        self._query(f"PRAGMA user_version = {version}")

    async def create_previous_schema(self, refresh_token: bytes) -> None:
        previous = sqlite_backend.MIGRATIONS[:-1]
        with closing(sqlite3.connect(self.path)) as conn:
            for migration in previous:
                conn.executescript(migration)
            conn.execute(f"PRAGMA user_version = {len(previous)}")
            conn.execute(
                "INSERT INTO accounts (slug, access_token, refresh_token, expires_at, scope, "
                "status, generation, created_at, updated_at) "
                "VALUES ('acme', NULL, ?, 0, 'default', 'active', 3, ?, ?)",
                (refresh_token, self.clock.now(), self.clock.now()),
            )
            conn.execute(
                "INSERT INTO events (slug, kind, at, detail) VALUES ('acme', 'connected', ?, '')",
                (self.clock.now(),),
            )
            conn.execute(
                "INSERT INTO clients (name, key_id, salt, key_hash, nations, read_only, "
                "created_at) VALUES ('reader', 'read0006', ?, ?, 'acme', 1, ?)",
                (b"salt-reader", b"hash-reader", self.clock.now()),
            )
            conn.commit()


class PostgresBackend(Backend):
    name = "postgres"
    current_version = pg_backend.SCHEMA_VERSION

    def __init__(self, clock: FakeClock, server: PgServer, url: str) -> None:
        super().__init__(clock)
        self.server = server
        self.url = url
        self.description = url  # the test URLs carry no password

    def fresh(self) -> Backend:
        return PostgresBackend(self.clock, self.server, self.server.create_database())

    def make(self, *keys: str, **kwargs: Any) -> TokenStore:
        return PostgresStore(self.url, Cipher([Secret(k) for k in keys]), self.clock, **kwargs)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def set_column(self, slug: str, column: str, value: Any) -> None:
        await self._fetch(f"UPDATE accounts SET {column} = $1 WHERE slug = $2", value, slug)

    async def row(self, slug: str) -> dict[str, Any]:
        [row] = await self._fetch("SELECT * FROM accounts WHERE slug = $1", slug)
        return dict(row)

    async def blobs(self) -> list[bytes]:
        rows = await self._fetch(
            "SELECT access_token FROM accounts WHERE access_token IS NOT NULL "
            "UNION ALL SELECT refresh_token FROM accounts"
        )
        return [r[0] for r in rows]

    async def state_hashes(self) -> list[str]:
        return [r[0] for r in await self._fetch("SELECT state_hash FROM auth_states")]

    async def abandon(self, store: TokenStore, lock: AccountLock) -> None:
        # A killed process: its marker names a pid that no longer runs, and its connection
        # goes away, so PostgreSQL drops its advisory locks. (A holder that still runs is
        # waited for: test_store_postgres.py.)
        [row] = await self._fetch("SELECT refresh_owner FROM accounts WHERE slug = $1", lock.slug)
        host, namespace, _pid, rest = row[0].split("/", 3)
        dead = f"{host}/{namespace}/{dead_process_id()}/{rest}"
        await self._fetch("UPDATE accounts SET refresh_owner = $1 WHERE slug = $2", dead, lock.slug)
        rows = await self._fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())"
        )
        assert rows, "no advisory lock was held"

    async def table(self, name: str) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(f"SELECT * FROM {name}")]

    async def damage_states(self) -> None:
        await self._fetch("UPDATE auth_states SET verifier = $1", b"\x00" * 40)

    async def set_marker(self, slug: str, owner: str, started_at: float) -> None:
        await self._fetch(
            "UPDATE accounts SET refresh_owner = $1, refresh_deadline = $2, "
            "refresh_started_at = $3 WHERE slug = $4",
            owner,
            started_at + 60,
            started_at,
            slug,
        )

    async def schema_version(self) -> int:
        [row] = await self._fetch("SELECT version FROM schema_version")
        return int(row[0])

    async def table_names(self) -> list[str]:
        rows = await self._fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
        )
        return [row[0] for row in rows]

    async def set_schema_version(self, version: int) -> None:
        await self._fetch("UPDATE schema_version SET version = $1", version)

    async def create_previous_schema(self, refresh_token: bytes) -> None:
        previous = pg_backend.MIGRATIONS[:-1]
        conn = await asyncpg.connect(self.url)
        try:
            for migration in previous:
                await conn.execute(migration)
            await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", len(previous))
            now = self.clock.now()
            await conn.execute(
                "INSERT INTO accounts (slug, access_token, refresh_token, expires_at, scope, "
                "status, generation, created_at, updated_at) "
                "VALUES ('acme', NULL, $1, 0, 'default', 'active', 3, $2, $2)",
                refresh_token,
                now,
            )
            await conn.execute(
                "INSERT INTO events (slug, kind, at, detail) VALUES ('acme', 'connected', $1, '')",
                now,
            )
            await conn.execute(
                "INSERT INTO clients (name, key_id, salt, key_hash, nations, read_only, "
                "created_at) VALUES ('reader', 'read0006', $1, $2, 'acme', 1, $3)",
                b"salt-reader",
                b"hash-reader",
                now,
            )
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Backend:
    if request.param == "sqlite":
        return SQLiteBackend(clock, tmp_path / "gateway.db")
    url = request.getfixturevalue("pg_url")
    return PostgresBackend(clock, request.getfixturevalue("pg_server"), url)


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def other_key() -> str:
    return generate_key()


async def create_database(backend: Backend, key: str) -> None:
    """Create and migrate the database once, as an earlier run or `nbgateway check` would."""
    async with backend.make(key):
        pass


@pytest.fixture
async def store(backend: Backend, key: str) -> AsyncIterator[TokenStore]:
    """An open store on a database created by an earlier open."""
    await create_database(backend, key)
    async with backend.make(key) as opened:
        yield opened


# -- tests ----------------------------------------------------------------------------------


class TestOpen:
    async def test_reopening_keeps_data(self, backend: Backend, clock: FakeClock, key: str) -> None:
        """A second open neither migrates again nor loses rows."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with backend.make(key) as store:
            account = await store.get_account("acme")
        assert account is not None
        assert account.access_token == token_set(clock, "1").access_token

    async def test_first_write_on_a_new_database(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A brand-new database accepts a write straight after the first open."""
        async with backend.make(key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            assert await store.get_account("acme") is not None

    async def test_first_opens_at_once_all_succeed(self, backend: Backend, key: str) -> None:
        """Several processes starting together on a database nobody made yet (`serve
        --workers`, replicas) each open it: one creates it, the others wait their turn;
        none is refused as locked. Several rounds, each on a new database."""
        for round_ in range(8):
            fresh = backend.fresh() if round_ else backend
            stores = [fresh.make(key) for _ in range(4)]
            results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
            for s, result in zip(stores, results, strict=True):
                if result is None:
                    await s.check_writable()
                    await s.close()
            assert [r for r in results if r is not None] == [], f"round {round_}"
            assert await fresh.schema_version() == backend.current_version

    async def test_ping_and_check_writable(self, store: TokenStore) -> None:
        """ping() and check_writable() succeed on an open, healthy store."""
        await store.ping()
        await store.check_writable()

    async def test_ping_after_close(self, backend: Backend, key: str) -> None:
        """ping() raises StoreError once the store is closed."""
        store = backend.make(key)
        await store.open()
        await store.close()
        with pytest.raises(StoreError):
            await store.ping()

    async def test_description_names_the_database(
        self, store: TokenStore, backend: Backend
    ) -> None:
        """description says where the data lives."""
        assert store.description == backend.description


class TestAccounts:
    async def test_round_trip(self, store: TokenStore, clock: FakeClock) -> None:
        """save_tokens then get_account returns the same tokens and metadata."""
        tokens = token_set(clock, "1")
        saved = await store.save_tokens("acme", tokens, EventKind.CONNECTED)
        account = await store.get_account("acme")
        assert account == saved
        assert account is not None
        assert account.access_token == tokens.access_token
        assert account.refresh_token == tokens.refresh_token
        assert account.expires_at == tokens.expires_at
        assert account.scope == "default"
        assert account.status is AccountStatus.ACTIVE
        assert account.generation == 1
        assert account.last_refresh_at == clock.now()
        assert account.last_error is None
        assert account.created_at == account.updated_at == clock.now()
        assert account.refresh_started_at is None

    async def test_unknown_account(self, store: TokenStore) -> None:
        """get_account of an unknown slug is None."""
        assert await store.get_account("nobody") is None

    async def test_generation_increments_on_every_save(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """Each token save, direct or under the refresh lock, bumps the generation by one."""
        generations = []
        for label in ("1", "2", "3"):
            saved = await store.save_tokens("acme", token_set(clock, label), EventKind.CONNECTED)
            generations.append(saved.generation)
        async with store.refresh_lock("acme") as locked:
            generations.append((await locked.save_tokens(token_set(clock, "4"))).generation)
        assert generations == [1, 2, 3, 4]
        account = await store.get_account("acme")
        assert account is not None
        assert account.generation == 4
        assert account.access_token == token_set(clock, "4").access_token

    async def test_update_keeps_created_at(self, store: TokenStore, clock: FakeClock) -> None:
        """A later save moves updated_at and last_refresh_at but keeps created_at."""
        first = await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        clock.advance(100)
        second = await store.save_tokens("acme", token_set(clock, "2"), EventKind.CONNECTED)
        assert second.created_at == first.created_at
        assert second.updated_at == first.updated_at + 100
        assert second.last_refresh_at == clock.now()

    async def test_accounts_are_separate(self, store: TokenStore, clock: FakeClock) -> None:
        """Two accounts keep their own tokens and generations."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "b2"), EventKind.CONNECTED)
        acme = await store.get_account("acme")
        beta = await store.get_account("beta")
        assert acme is not None and beta is not None
        assert acme.refresh_token == token_set(clock, "a").refresh_token
        assert beta.refresh_token == token_set(clock, "b2").refresh_token
        assert (acme.generation, beta.generation) == (1, 2)

    async def test_list_accounts_has_no_tokens(self, store: TokenStore, clock: FakeClock) -> None:
        """list_accounts returns sorted AccountInfo without any token value."""
        await store.save_tokens("zeta", token_set(clock, "z"), EventKind.CONNECTED)
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        infos = await store.list_accounts()
        assert [i.slug for i in infos] == ["acme", "zeta"]
        assert all(type(i) is AccountInfo for i in infos)
        text = repr(infos)
        for label in ("a", "z"):
            tokens = token_set(clock, label)
            assert tokens.access_token.reveal() not in text
            assert tokens.refresh_token.reveal() not in text

    async def test_list_accounts_decrypts_nothing(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """An undecryptable row still shows in list_accounts."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await backend.set_column("acme", "access_token", b"\x00")
        assert [i.slug for i in await store.list_accounts()] == ["acme"]

    async def test_import_refresh_token(self, store: TokenStore) -> None:
        """An imported refresh token is stored alone; the access token comes later."""
        await store.import_refresh_token("acme", Secret("legacy-token-CANARY-0123"))
        account = await store.get_account("acme")
        assert account is not None
        assert account.refresh_token == Secret("legacy-token-CANARY-0123")
        assert account.access_token is None
        assert account.status is AccountStatus.ACTIVE
        assert account.generation == 1

    async def test_import_over_dead_account(self, store: TokenStore, clock: FakeClock) -> None:
        """Importing over an account needing re-auth makes it active and bumps the generation."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.mark_needs_reauth("invalid_grant")
        generation = await store.import_refresh_token(
            "acme", Secret("legacy-token-CANARY-0123"), replaces=2
        )
        account = await store.get_account("acme")
        assert account is not None
        assert account.status is AccountStatus.ACTIVE
        assert account.last_error is None
        assert account.access_token is None
        assert account.refresh_token == Secret("legacy-token-CANARY-0123")
        assert account.generation == generation == 3

    async def test_an_import_stores_only_over_what_it_looked_at(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """Two imports (or an import and a /connect) of one nation at once: an import that
        found no row stores none over one written since, and one that found generation g
        replaces only that; both refuse with GenerationConflict and change nothing."""
        connected = await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        with pytest.raises(GenerationConflict):
            await store.import_refresh_token("acme", Secret("legacy-A"))
        with pytest.raises(GenerationConflict):
            await store.import_refresh_token(
                "acme", Secret("legacy-B"), replaces=connected.generation - 1
            )
        with pytest.raises(GenerationConflict):
            await store.import_refresh_token("beta", Secret("legacy-C"), replaces=1)
        assert await store.get_account("acme") == connected
        assert await store.get_account("beta") is None
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED]

    async def test_a_refusal_does_not_mark_an_account_changed_meanwhile(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """A refresh token refused after an admin re-connected the account (their new pair
        stored while the call ran) does not mark the new pair as needing re-authorization:
        GenerationConflict, and the account stays active."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.read()
            reconnected = await store.save_tokens(
                "acme", token_set(clock, "2"), EventKind.CONNECTED
            )
            with pytest.raises(GenerationConflict):
                await locked.mark_needs_reauth("invalid_grant")
        account = await store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        assert account.refresh_token == reconnected.refresh_token

    async def test_new_tokens_clear_needs_reauth(self, store: TokenStore, clock: FakeClock) -> None:
        """Saving tokens after needs_reauth makes the account active with no last error."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.mark_needs_reauth("invalid_grant")
        account = await store.save_tokens("acme", token_set(clock, "2"), EventKind.CONNECTED)
        assert account.status is AccountStatus.ACTIVE
        assert account.last_error is None

    async def test_remove_account_of_a_generation(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """remove_account(generation=g) removes the row only while it is generation g."""
        saved = await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        assert await store.remove_account("acme", generation=saved.generation + 1) is False
        assert await store.get_account("acme") == saved
        assert await store.remove_account("acme", generation=saved.generation) is True
        assert await store.get_account("acme") is None

    async def test_a_new_row_of_a_removed_nation_is_not_the_old_one(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """A nation removed and connected or imported again while a refresh or import of
        the old row still runs: the new row's generation is above every one the old row
        had, so what the old row's refresh, failure, refusal, import or remove writes
        lands nowhere (GenerationConflict, or False), and the new pair stays as it was
        stored, with no error, event or in-flight marker of the old row's call."""
        old = await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            assert (await locked.read()).generation == old.generation
            assert await store.remove_account("acme") is True
            new = await store.save_tokens("acme", token_set(clock, "2"), EventKind.CONNECTED)
            assert new.generation > old.generation
            with pytest.raises(GenerationConflict):  # the new row's token is not sent
                await locked.begin_refresh()
            with pytest.raises(GenerationConflict):
                await locked.save_tokens(token_set(clock, "3"))
            with pytest.raises(GenerationConflict):
                await locked.save_refresh_token(Secret("rotated"), "exchanged")
            for unanswered in (False, True):
                with pytest.raises(GenerationConflict):
                    await locked.record_failure("timed out", unanswered=unanswered)
            with pytest.raises(GenerationConflict):
                await locked.mark_needs_reauth("invalid_grant")
        [info] = await store.list_accounts()
        assert info.last_error is None and info.refresh_started_at is None
        assert [e.kind for e in await store.events("acme")] == [
            EventKind.CONNECTED,
            EventKind.REMOVED,
            EventKind.CONNECTED,
        ]
        with pytest.raises(GenerationConflict):
            await store.import_refresh_token("acme", Secret("legacy"), replaces=old.generation)
        assert await store.remove_account("acme", generation=old.generation) is False
        account = await store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        assert account.refresh_token == new.refresh_token
        assert account.generation == new.generation

        assert await store.remove_account("acme") is True
        imported = await store.import_refresh_token("acme", Secret("legacy-2"))
        assert imported > new.generation
        stored = await store.get_account("acme")
        assert stored is not None and stored.generation == imported

    async def test_remove_account(self, store: TokenStore, clock: FakeClock) -> None:
        """remove_account deletes the account once and reports whether it existed."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        assert await store.remove_account("acme") is True
        assert await store.get_account("acme") is None
        assert await store.list_accounts() == []
        assert await store.remove_account("acme") is False

    async def test_decrypted_tokens_are_reported(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """on_secret receives every token the store writes or decrypts (for the log redactor)."""
        await create_database(backend, key)
        tokens = token_set(clock, "1")
        async with backend.make(key) as writer:
            await writer.save_tokens("acme", tokens, EventKind.CONNECTED)
        seen: list[tuple[Secret, str]] = []
        async with backend.make(
            key, on_secret=lambda secret, slot: seen.append((secret, slot))
        ) as reader:
            await reader.get_account("acme")
        assert (tokens.access_token, "acme/access_token") in seen
        assert (tokens.refresh_token, "acme/refresh_token") in seen


class TestEvents:
    async def test_history_is_bounded_per_account(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """Only the newest `events_kept` events of an account are kept; others' are untouched."""
        await create_database(backend, key)
        async with backend.make(key, events_kept=3) as store:
            await store.save_tokens("other", token_set(clock, "0"), EventKind.CONNECTED)
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            for n in range(5):
                async with store.refresh_lock("acme") as locked:
                    await locked.record_failure(f"failure {n}")
            details = [e.detail for e in await store.events("acme", limit=10)]
            assert details == ["failure 4", "failure 3", "failure 2"]
            assert [e.kind for e in await store.events("other")] == [EventKind.CONNECTED]

    async def test_connected(self, store: TokenStore, clock: FakeClock) -> None:
        """save_tokens with CONNECTED records a connected event."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED]

    async def test_refreshed(self, store: TokenStore, clock: FakeClock) -> None:
        """Saving tokens under the refresh lock records a refreshed event."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.save_tokens(token_set(clock, "2"))
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED, EventKind.REFRESHED]

    async def test_refresh_failed(self, store: TokenStore, clock: FakeClock) -> None:
        """record_failure records refresh_failed with the message and keeps tokens and status."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.record_failure("token endpoint returned 503")
        events = await store.events("acme")
        assert events[0].kind is EventKind.REFRESH_FAILED
        assert events[0].detail == "token endpoint returned 503"
        account = await store.get_account("acme")
        assert account is not None
        assert account.last_error == "token endpoint returned 503"
        assert account.status is AccountStatus.ACTIVE
        assert account.generation == 1
        assert account.refresh_token == token_set(clock, "1").refresh_token

    async def test_needs_reauth(self, store: TokenStore, clock: FakeClock) -> None:
        """mark_needs_reauth records needs_reauth, sets the status and bumps the generation."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.mark_needs_reauth("invalid_grant: token revoked")
        assert (await event_kinds(store, "acme"))[-1] is EventKind.NEEDS_REAUTH
        account = await store.get_account("acme")
        assert account is not None
        assert account.status is AccountStatus.NEEDS_REAUTH
        assert account.last_error == "invalid_grant: token revoked"
        assert account.generation == 2
        [info] = await store.list_accounts()
        assert info.status is AccountStatus.NEEDS_REAUTH

    @pytest.mark.parametrize("write", ["save_tokens", "save_refresh_token"])
    async def test_a_token_stored_over_a_refusal_makes_the_account_active(
        self, store: TokenStore, clock: FakeClock, write: str
    ) -> None:
        """Another process marked the account needing re-authorization (NationBuilder refused
        the spent refresh token it sent) while this one held the rotated successor; storing
        that successor, a pair or a refresh token alone, makes the account active again:
        the row holds a refresh token nobody sent yet."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.mark_needs_reauth("invalid_grant: token revoked")
        async with store.refresh_lock("acme") as locked:
            assert (await locked.read()).status is AccountStatus.NEEDS_REAUTH
            if write == "save_tokens":
                saved = await locked.save_tokens(token_set(clock, "2"))
            else:
                saved = await locked.save_refresh_token(Secret("rotated-2"), "refused answer")
        assert saved.status is AccountStatus.ACTIVE
        account = await store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        [info] = await store.list_accounts()
        assert info.status is AccountStatus.ACTIVE

    async def test_removed_event_survives_the_account(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """remove_account records removed; the history stays after the row is gone."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.remove_account("acme")
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED, EventKind.REMOVED]

    async def test_removing_unknown_account_records_nothing(self, store: TokenStore) -> None:
        """remove_account of an unknown slug adds no event."""
        await store.remove_account("nobody")
        assert await store.events("nobody") == []

    async def test_imported(self, store: TokenStore) -> None:
        """import_refresh_token records an imported event."""
        await store.import_refresh_token("acme", Secret("legacy-token-CANARY-0123"))
        assert await event_kinds(store, "acme") == [EventKind.IMPORTED]

    async def test_last_error_is_truncated(self, store: TokenStore, clock: FakeClock) -> None:
        """A very long failure message is stored, cut short, on the account and the event."""
        message = "upstream said: " + "x" * 5000
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.record_failure(message)
        account = await store.get_account("acme")
        assert account is not None
        assert account.last_error is not None
        assert message.startswith(account.last_error)
        assert account.last_error.startswith("upstream said: ")
        assert len(account.last_error) < 1000
        detail = (await store.events("acme"))[0].detail
        assert message.startswith(detail)
        assert len(detail) < 1000

    async def test_events_newest_first_and_limited(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """events() lists the most recent first, across accounts when no slug is given."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        clock.advance(1)
        await store.save_tokens("beta", token_set(clock, "2"), EventKind.CONNECTED)
        clock.advance(1)
        await store.remove_account("acme")
        every = await store.events()
        assert [(e.slug, e.kind) for e in every] == [
            ("acme", EventKind.REMOVED),
            ("beta", EventKind.CONNECTED),
            ("acme", EventKind.CONNECTED),
        ]
        assert [e.at for e in every] == [clock.now(), clock.now() - 1, clock.now() - 2]
        assert len(await store.events(limit=2)) == 2


class TestRefreshLock:
    async def test_read_sees_the_row(self, store: TokenStore, clock: FakeClock) -> None:
        """AccountLock.read returns the current row with its tokens."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            account = await locked.read()
            assert locked.interrupted_at is None
        assert account.refresh_token == token_set(clock, "1").refresh_token

    async def test_read_of_missing_account(self, store: TokenStore) -> None:
        """Locking (or reading) an unknown slug raises AccountNotFound."""
        with pytest.raises(AccountNotFound):
            async with store.refresh_lock("nobody") as locked:
                await locked.read()

    async def test_exception_releases_the_lock(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """An exception inside the lock releases it: another store takes it at once and sees
        no refresh in flight (writes made before the exception stay committed)."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            with pytest.raises(RuntimeError, match="boom"):
                async with a.refresh_lock("acme") as locked:
                    await locked.begin_refresh()
                    raise RuntimeError("boom")
            async with b.refresh_lock("acme") as locked_b:
                assert locked_b.interrupted_at is None
                account = await locked_b.read()
            assert await event_kinds(a, "acme") == [EventKind.CONNECTED]
        assert account.generation == 1
        assert account.refresh_started_at is None

    async def test_second_store_waits_then_sees_the_new_generation(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """While one store holds an account's lock another cannot enter; once it is released
        the other enters and reads the generation the first one stored."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            b_entered = asyncio.Event()

            async def refresh_in_b() -> int:
                async with b.refresh_lock("acme") as locked:
                    b_entered.set()
                    return (await locked.read()).generation

            async with a.refresh_lock("acme") as locked_a:
                b_task = asyncio.create_task(refresh_in_b())
                # Waiting for something NOT to happen: B must still be outside the lock.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(b_entered.wait()), 0.3)
                await locked_a.save_tokens(token_set(clock, "2"))
            generation_seen_by_b = await asyncio.wait_for(b_task, 30)
        assert generation_seen_by_b == 2

    @pytest.mark.parametrize("same_store", [True, False], ids=["same-store", "other-store"])
    async def test_other_account_never_waits(
        self, backend: Backend, clock: FakeClock, key: str, same_store: bool
    ) -> None:
        """While account A's lock is held (mid-refresh), account B's lock is taken, used and
        released, by the same store (one process) or another (a second process); A's lock
        stays held throughout. (A wait would end only with the bounded lock timeout.)"""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            other = a if same_store else b
            await a.save_tokens("acme", token_set(clock, "a1"), EventKind.CONNECTED)
            await a.save_tokens("beta", token_set(clock, "b1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked_a:
                await locked_a.begin_refresh()
                async with asyncio.timeout(PROMPTLY), other.refresh_lock("beta") as locked_b:
                    await locked_b.begin_refresh()
                    saved_b = await locked_b.save_tokens(token_set(clock, "b2"))
                # A is still held: its marker is there and B's save did not touch it.
                infos = {i.slug: i for i in await b.list_accounts()}
                assert infos["acme"].refresh_started_at is not None
                assert infos["beta"].refresh_started_at is None
                saved_a = await locked_a.save_tokens(token_set(clock, "a2"))
        assert (saved_a.generation, saved_b.generation) == (2, 2)

    async def test_begin_refresh_leaves_a_visible_marker(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """begin_refresh records when the refresh started, visible to every store as
        AccountInfo.refresh_started_at; storing the result clears it."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                started = clock.now()
                clock.advance(2)
                [info] = await b.list_accounts()
                assert info.refresh_started_at == started
                account = await b.get_account("acme")
                assert account is not None and account.refresh_started_at == started
                await locked.save_tokens(token_set(clock, "2"))
                [info] = await b.list_accounts()
                assert info.refresh_started_at is None

    async def test_marker_cleared_when_the_lock_ends_without_a_result(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """A lock left after begin_refresh with no result stored leaves no marker behind."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.begin_refresh()
        [info] = await store.list_accounts()
        assert info.refresh_started_at is None

    @pytest.mark.parametrize(
        "settle", ["record_failure", "mark_needs_reauth", "save_refresh_token"]
    )
    async def test_every_result_clears_the_marker(
        self, store: TokenStore, clock: FakeClock, settle: str
    ) -> None:
        """Each way of storing a refresh's outcome clears the in-flight marker."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.begin_refresh()
            if settle == "record_failure":
                await locked.record_failure("503")
            elif settle == "mark_needs_reauth":
                await locked.mark_needs_reauth("invalid_grant")
            else:
                await locked.save_refresh_token(Secret("rotated-CANARY-1"), "bad answer")
            [info] = await store.list_accounts()
            assert info.refresh_started_at is None
        if settle == "save_refresh_token":
            account = await store.get_account("acme")
            assert account is not None
            assert account.refresh_token == Secret("rotated-CANARY-1")
            assert account.access_token is None
            assert account.generation == 2

    async def test_vanished_holder_is_replaced_and_reported(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A holder that dies mid-refresh without releasing is replaced, and the new holder
        sees when the interrupted refresh started (interrupted_at)."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked_a:
                await locked_a.begin_refresh()
                started = clock.now()
                await backend.abandon(a, locked_a)
                async with b.refresh_lock("acme") as locked_b:
                    assert locked_b.interrupted_at == started
                    saved = await locked_b.save_tokens(token_set(clock, "2"))
            # The vanished holder's exit neither raised nor undid the new holder's work.
            account = await b.get_account("acme")
        assert account is not None
        assert account.generation == saved.generation == 2
        assert account.refresh_started_at is None
        assert account.access_token == token_set(clock, "2").access_token

    async def test_a_marker_this_store_left_is_no_interrupted_refresh(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A marker the same store left behind (its clearing failed, the process runs on)
        is taken over without being reported as a stopped refresh (interrupted_at None);
        another holder's is reported (test_vanished_holder_is_replaced_and_reported)."""
        await create_database(backend, key)
        async with backend.make(key) as a:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                [row] = await backend.table("accounts")
                owner, started = row["refresh_owner"], row["refresh_started_at"]
            assert owner and started is not None
            await backend.set_marker("acme", owner, started)
            clock.advance(1)
            async with a.refresh_lock("acme") as again:
                assert again.interrupted_at is None
                assert (await again.read()).generation == 1

    async def test_a_kept_marker_is_renewed_when_its_holder_locks_again(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A marker kept for a pair held in memory (`keep`: its store failed) outlives the
        lock. When the same store locks the account again to store that pair, the marker
        stays, is not reported as a stopped refresh, and its lease is renewed: the holder
        runs on, so processes elsewhere keep waiting for it rather than send the spent
        refresh token once the first lease ran out."""
        await create_database(backend, key)
        async with backend.make(key) as a:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                locked.keep()
            [row] = await backend.table("accounts")
            started = row["refresh_started_at"]
            assert started is not None and row["refresh_owner"]
            await backend.set_column("acme", "refresh_deadline", 0.0)  # long lapsed
            async with a.refresh_lock("acme") as again:
                assert again.interrupted_at is None
                [row] = await backend.table("accounts")
                assert row["refresh_deadline"] > started
                assert row["refresh_started_at"] == started
                again.keep()
            [row] = await backend.table("accounts")
        assert row["refresh_started_at"] == started

    async def test_an_unanswered_call_is_seen_by_the_next_holder(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """record_failure(unanswered=True) keeps when the call was sent: the next holder,
        in another store, sees it as unanswered_at (not as a stopped refresh, and listings
        show no refresh in flight); after a plain failure the next holder sees none."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                assert locked.unanswered_at is None
                await locked.begin_refresh()
                sent = clock.now()
                clock.advance(5)
                await locked.record_failure("timed out", unanswered=True)
            [info] = await b.list_accounts()
            assert info.refresh_started_at is None
            assert info.last_error == "timed out"
            clock.advance(5)
            async with b.refresh_lock("acme") as again:
                assert again.unanswered_at == sent
                assert again.interrupted_at is None
                await again.begin_refresh()
                await again.record_failure("HTTP 400 (invalid_request)")
            async with a.refresh_lock("acme") as third:
                assert third.unanswered_at is None

    async def test_save_after_another_writer_conflicts(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """save_tokens under the lock after another writer (a re-connect) changed the account
        raises GenerationConflict and stores nothing; the other writer's pair stays."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                await b.save_tokens("acme", token_set(clock, "admin"), EventKind.CONNECTED)
                with pytest.raises(GenerationConflict):
                    await locked.save_tokens(token_set(clock, "refreshed"))
                with pytest.raises(GenerationConflict):
                    await locked.save_refresh_token(Secret("rotated-CANARY-2"), "refused")
            account = await a.get_account("acme")
            kinds = await event_kinds(a, "acme")
        assert account is not None
        assert account.refresh_token == token_set(clock, "admin").refresh_token
        assert account.generation == 2
        assert kinds == [EventKind.CONNECTED, EventKind.CONNECTED]

    async def test_writes_commit_at_once(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A refresh saved under the lock is visible to another store before the lock ends."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.save_tokens(token_set(clock, "2"))
                account = await b.get_account("acme")
        assert account is not None
        assert account.access_token == token_set(clock, "2").access_token

    async def test_change_counter_moves_after_another_store_writes(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """change_counter() changes once another store commits a change."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            before = await a.change_counter()
            await b.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with asyncio.timeout(PROMPTLY):
                while await a.change_counter() == before:  # noqa: ASYNC110 - polled API
                    await asyncio.sleep(0.02)  # a notice arrives on another connection


class TestEncryptionAtRest:
    async def test_wrong_key_changes_nothing(
        self, backend: Backend, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """Opening with a key that does not match raises DecryptError and changes nothing."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            await store.create_state("state-1", "acme", Secret("verifier-1"), "", STATE_TTL)
            before = await store.dump()
        with pytest.raises(DecryptError) as info:
            async with backend.make(other_key):
                pass
        message = str(info.value)
        assert Cipher([Secret(key)]).primary_key_id in message
        assert "nothing was changed" in message.lower()
        assert key not in message
        assert other_key not in message
        async with backend.make(key) as store:
            assert await store.dump() == before
            account = await store.get_account("acme")
        assert account is not None
        assert account.refresh_token == token_set(clock, "1").refresh_token

    async def test_corrupt_row(self, store: TokenStore, clock: FakeClock, backend: Backend) -> None:
        """A garbage token column fails to decrypt naming the account; verify lists it; no write."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "2"), EventKind.CONNECTED)
        await backend.set_column("acme", "access_token", b"garbage, not a ciphertext at all")
        before = await backend.row("acme")
        with pytest.raises((DecryptError, CorruptRecordError)) as info:
            await store.get_account("acme")
        assert "'acme'" in str(info.value)
        problems = await store.verify()
        assert len(problems) == 1
        assert "'acme'" in problems[0]
        assert await store.get_account("beta") is not None
        assert await backend.row("acme") == before

    async def test_a_row_with_an_unknown_status_is_listed_as_unreadable(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """One row whose status column is garbage does not break the listing: it is listed as
        unreadable with the reason, and the others as they are."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "2"), EventKind.CONNECTED)
        await backend.set_column("acme", "status", "half-deleted")
        listed = {info.slug: info for info in await store.list_accounts()}
        assert listed["acme"].status is AccountStatus.UNREADABLE
        assert "cannot be read" in (listed["acme"].last_error or "")
        assert listed["beta"].status is AccountStatus.ACTIVE

    async def test_tampered_ciphertext(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """A single flipped byte in a stored ciphertext fails to decrypt and is reported."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        blob = bytearray(await backend.column("acme", "refresh_token"))
        blob[-1] ^= 0x01
        await backend.set_column("acme", "refresh_token", bytes(blob))
        with pytest.raises(DecryptError, match="acme"):
            await store.get_account("acme")
        assert any("acme" in p for p in await store.verify())

    async def test_ciphertext_moved_to_another_account(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """A refresh token copied from account a into account b's row does not decrypt."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
        await backend.copy_column("refresh_token", "acme", "beta", "refresh_token")
        with pytest.raises(DecryptError, match="beta"):
            await store.get_account("beta")
        assert await store.get_account("acme") is not None
        problems = await store.verify()
        assert len(problems) == 1
        assert "beta" in problems[0]

    async def test_ciphertext_moved_to_another_column(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """A refresh token copied into the same row's access_token column does not decrypt."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        await backend.copy_column("refresh_token", "acme", "acme", "access_token")
        with pytest.raises(DecryptError, match="access_token"):
            await store.get_account("acme")

    async def test_unreadable_accounts_names_each_bad_row_once(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """unreadable_accounts() maps every account whose tokens do not open to the problem
        (all of them, or the one asked for); readable ones are not in it."""
        for slug in ("acme", "beta", "gamma"):
            await store.save_tokens(slug, token_set(clock, slug), EventKind.CONNECTED)
        await backend.set_column("beta", "access_token", b"\xde\xad\xbe\xef")
        damaged = bytearray(await backend.column("gamma", "refresh_token"))
        damaged[-1] ^= 0x01
        await backend.set_column("gamma", "refresh_token", bytes(damaged))
        problems = await store.unreadable_accounts()
        assert sorted(problems) == ["beta", "gamma"]
        assert "access_token" in problems["beta"] and "refresh_token" in problems["gamma"]
        assert await store.unreadable_accounts("gamma") == {"gamma": problems["gamma"]}
        assert await store.unreadable_accounts("acme") == {}
        assert await store.unreadable_accounts("nobody") == {}
        assert sorted(await store.verify()) == sorted(problems.values())

    async def test_verify_healthy_store(self, store: TokenStore, clock: FakeClock) -> None:
        """verify() reports nothing when every row decrypts."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.import_refresh_token("beta", Secret("legacy-token-CANARY-0123"))
        assert await store.verify() == []

    async def test_verify_reports_a_pending_authorization_that_does_not_decrypt(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A started connect whose sealed PKCE verifier is damaged is one of verify()'s
        problems, naming its nation (that connect cannot be completed)."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.create_state("state-1", "acme", Secret("verifier-CANARY-1"), "b", 600)
            assert await store.verify() == []
        await backend.damage_states()
        async with backend.make(key) as store:
            [problem] = await store.verify()
            assert "pending authorization" in problem and "'acme'" in problem
            assert "CANARY" not in problem
            clock.advance(601)  # expired: it can no longer be completed anyway
            assert await store.verify() == []

    async def test_store_with_a_corrupt_row_still_opens(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """After a restart, a corrupt row is reported by verify() rather than blocking open."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            await store.save_tokens("beta", token_set(clock, "2"), EventKind.CONNECTED)
        await backend.set_column("acme", "access_token", b"\xde\xad\xbe\xef")
        async with backend.make(key) as store:
            problems = await store.verify()
            assert await store.get_account("beta") is not None
        assert len(problems) == 1
        assert "acme" in problems[0]


class TestRotateKeys:
    async def test_rotation_reencrypts_under_the_first_key(
        self, backend: Backend, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """rotate_keys re-seals old-key rows with the first key, returns the count, keeps data."""
        old_key, new_key = key, other_key
        await create_database(backend, old_key)
        async with backend.make(old_key) as store:
            await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
            await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
            await store.import_refresh_token("gamma", Secret("legacy-token-CANARY-0123"))

        cipher = Cipher([Secret(new_key), Secret(old_key)])
        new_id, old_id = cipher.key_ids
        assert {cipher.key_id_of(b) for b in await backend.blobs()} == {old_id}

        async with backend.make(new_key, old_key) as store:
            assert (await store.rotate_keys()).changed == 3
            assert {cipher.key_id_of(b) for b in await backend.blobs()} == {new_id}
            assert (await store.rotate_keys()).changed == 0

        async with backend.make(new_key) as store:  # the old key can go now
            acme = await store.get_account("acme")
            gamma = await store.get_account("gamma")
            assert await store.verify() == []
        assert acme is not None and gamma is not None
        assert acme.access_token == token_set(clock, "a").access_token
        assert acme.refresh_token == token_set(clock, "a").refresh_token
        assert gamma.refresh_token == Secret("legacy-token-CANARY-0123")

    async def test_rotation_skips_an_unreadable_row(
        self, backend: Backend, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """A row that does not decrypt is reported as skipped and left as it is; the others
        are re-encrypted."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
            await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
        good = bytearray(await backend.column("acme", "refresh_token"))
        good[-1] ^= 0x01  # still sealed under the old key id, but no longer opens
        await backend.set_column("acme", "refresh_token", bytes(good))
        before = await backend.row("acme")
        async with backend.make(other_key, key) as store:
            report = await store.rotate_keys()
            beta = await store.get_account("beta")
        assert report.changed == 1
        assert len(report.skipped) == 1
        assert "'acme'" in report.skipped[0]
        assert await backend.row("acme") == before
        assert beta is not None
        assert beta.refresh_token == token_set(clock, "b").refresh_token

    async def test_rotation_reports_a_damaged_row_under_the_first_key(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """A row already under the first key but damaged is still reported (rotate-key run
        again, or with the current key alone, must not call a damaged database fine)."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
        damaged = bytearray(await backend.column("acme", "refresh_token"))
        damaged[-1] ^= 0x01
        await backend.set_column("acme", "refresh_token", bytes(damaged))
        before = await backend.row("acme")
        report = await store.rotate_keys()
        assert report.changed == 0
        assert len(report.skipped) == 1
        assert "'acme'" in report.skipped[0] and "refresh_token" in report.skipped[0]
        assert await backend.row("acme") == before

    async def test_rotation_keeps_generation_and_events(
        self, backend: Backend, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """Re-encryption is not a token change: generation and history stay as they were."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        async with backend.make(other_key, key) as store:
            await store.rotate_keys()
            account = await store.get_account("acme")
            kinds = await event_kinds(store, "acme")
        assert account is not None
        assert account.generation == 1
        assert kinds == [EventKind.CONNECTED]

    async def test_nothing_to_rotate(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """With every row already under the first key, rotate_keys changes nothing."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        before = await backend.row("acme")
        assert (await store.rotate_keys()).changed == 0
        assert await backend.row("acme") == before

    async def test_pending_authorizations_are_rotated(
        self, backend: Backend, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """A state created under the old key can be consumed with only the new key afterwards."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            await store.create_state("state-1", "acme", Secret("verifier-1"), "", STATE_TTL)
        async with backend.make(other_key, key) as store:
            await store.rotate_keys()
        async with backend.make(other_key) as store:
            pending = await store.consume_state("state-1", "")
        assert pending.code_verifier == Secret("verifier-1")


class TestAuthStates:
    async def test_round_trip(self, store: TokenStore, clock: FakeClock) -> None:
        """consume_state returns the nation, the PKCE verifier and when it started."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        pending = await store.consume_state("state-1", "sess-1")
        assert pending.slug == "acme"
        assert pending.code_verifier == Secret("verifier-1")
        assert pending.created_at == clock.now()

    async def test_single_use(self, store: TokenStore) -> None:
        """A state can be consumed only once."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        await store.consume_state("state-1", "sess-1")
        with pytest.raises(StateError):
            await store.consume_state("state-1", "sess-1")

    async def test_unknown_state(self, store: TokenStore) -> None:
        """A state never created raises StateError."""
        with pytest.raises(StateError):
            await store.consume_state("never-made", "sess-1")

    async def test_expired(self, store: TokenStore, clock: FakeClock) -> None:
        """A state older than its ttl raises StateError."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        clock.advance(601)
        with pytest.raises(StateError, match="expired"):
            await store.consume_state("state-1", "sess-1")

    async def test_valid_until_ttl(self, store: TokenStore, clock: FakeClock) -> None:
        """A state is still accepted just before its ttl runs out."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        clock.advance(599)
        assert (await store.consume_state("state-1", "sess-1")).slug == "acme"

    async def test_binding_mismatch_leaves_the_state(self, store: TokenStore) -> None:
        """A state bound to one session raises StateError when consumed from another, and
        stays usable by its own session."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        with pytest.raises(StateError):
            await store.consume_state("state-1", "sess-2")
        assert (await store.consume_state("state-1", "sess-1")).slug == "acme"

    async def test_states_are_independent(self, store: TokenStore) -> None:
        """Several pending states each return their own nation and verifier."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "s", STATE_TTL)
        await store.create_state("state-2", "beta", Secret("verifier-2"), "s", STATE_TTL)
        second = await store.consume_state("state-2", "s")
        first = await store.consume_state("state-1", "s")
        assert (first.slug, first.code_verifier) == ("acme", Secret("verifier-1"))
        assert (second.slug, second.code_verifier) == ("beta", Secret("verifier-2"))

    async def test_state_stored_only_as_hash(self, store: TokenStore, backend: Backend) -> None:
        """The database holds sha256(state) as the state's key, never the state itself."""
        await store.create_state("state-CANARY-55aa66bb", "acme", Secret("v"), "s", STATE_TTL)
        assert await backend.state_hashes() == [state_hash("state-CANARY-55aa66bb")]

    async def test_expired_states_are_purged(
        self, store: TokenStore, clock: FakeClock, backend: Backend
    ) -> None:
        """Creating a state removes pending states that have expired."""
        await store.create_state("old", "acme", Secret("verifier-1"), "s", STATE_TTL)
        clock.advance(601)
        await store.create_state("new", "acme", Secret("verifier-2"), "s", STATE_TTL)
        assert await backend.state_hashes() == [state_hash("new")]

    async def test_pending_states_are_capped(self, store: TokenStore, clock: FakeClock) -> None:
        """At most STATES_KEPT authorizations stay pending; the oldest goes first."""
        for n in range(STATES_KEPT + 1):
            await store.create_state(f"state-{n}", "acme", Secret("v"), "s", STATE_TTL)
            clock.advance(0.001)
        with pytest.raises(StateError):
            await store.consume_state("state-0", "s")
        assert (await store.consume_state("state-1", "s")).slug == "acme"
        assert (await store.consume_state(f"state-{STATES_KEPT}", "s")).slug == "acme"


class TestDumpLoad:
    async def _fill(self, store: TokenStore, clock: FakeClock) -> None:
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.record_failure("503")
        await store.import_refresh_token("beta", Secret("legacy-token-CANARY-0123"))
        await store.save_tokens("gone", token_set(clock, "g"), EventKind.CONNECTED)
        await store.remove_account("gone")
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess", STATE_TTL)
        await store.add_client(client_record("reader", clock, ("acme",), read_only=True))
        await store.record_audit([audit_entry(clock, "reader", "acme", "req-1")], 0.0)
        await store.revoke_session("sid-1", clock.now() + 3600, clock.now())
        await store.record_login_failure("192.0.2.1", clock.now(), clock.now() - 300)

    async def test_round_trip_through_sqlite_and_back(
        self, backend: Backend, clock: FakeClock, key: str, tmp_path: Path
    ) -> None:
        """A dump loaded into an empty SQLite file, dumped from there and loaded into an empty
        database of this backend gives the same rows, accounts, events and pending states,
        readable with the same key; events added afterwards get new ids. Logged-out sessions
        and wrong admin-token attempts are short-lived and not copied."""
        await create_database(backend, key)
        async with backend.make(key) as source:
            await self._fill(source, clock)
            dump = await source.dump()
            accounts = [await source.get_account(i.slug) for i in await source.list_accounts()]
            events = await source.events(limit=100)
        assert dump.counts() == {
            "accounts": 2,
            "events": 5,
            "auth_states": 1,
            "clients": 1,
            "audit": 1,
        }
        async with SQLiteStore(tmp_path / "copy.db", Cipher([Secret(key)]), clock) as middle:
            await middle.load(dump)
            copied = await middle.dump()
        assert copied == dump
        async with backend.fresh().make(key) as target:
            await target.load(copied)
            assert await target.dump() == dump
            assert [await target.get_account(i.slug) for i in await target.list_accounts()] == (
                accounts
            )
            assert await target.events(limit=100) == events
            pending = await target.consume_state("state-1", "sess")
            assert pending.code_verifier == Secret("verifier-1")
            assert await target.list_clients() == [
                client_record("reader", clock, ("acme",), read_only=True)
            ]
            await target.save_tokens("delta", token_set(clock, "d"), EventKind.CONNECTED)
            [newest] = await target.events(limit=1)
            await target.record_audit([audit_entry(clock, "reader", "acme", "req-2")], 0.0)
            assert [e.request_id for e in await target.audit()] == ["req-2", "req-1"]
            assert await target.session_revoked("sid-1", clock.now()) is False
            assert await target.login_failures("192.0.2.1", 0.0) == []
        assert newest.slug == "delta"
        assert newest.id > max(e.id for e in events)

    async def test_load_refused_when_accounts_exist(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """load into a database that holds accounts raises StoreError and copies nothing."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        dump = StoreDump(
            accounts=[{**(await store.dump()).accounts[0], "slug": "other"}],
        )
        before = await store.dump()
        with pytest.raises(StoreError, match="already holds accounts"):
            await store.load(dump)
        assert await store.dump() == before

    async def test_load_refused_when_client_keys_exist(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """load into a database without accounts that holds a client key (the same name as
        one in the dump) is refused up front with the store's message, not the driver's
        unique-key error, and copies nothing."""
        await create_database(backend, key)
        other = backend.fresh()
        await create_database(other, key)
        async with backend.make(key) as source, other.make(key) as target:
            await source.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
            await source.add_client(client_record("tool", clock))
            await target.add_client(client_record("tool", clock, read_only=True))
            before = await target.dump()
            with pytest.raises(StoreError, match="already holds client keys; nothing copied"):
                await target.load(await source.dump())
            assert await target.dump() == before


class TestClients:
    async def test_add_list_remove(self, store: TokenStore, clock: FakeClock) -> None:
        """Clients are listed by name with what was stored; removal reports whether one
        existed."""
        zed = client_record("zed", clock)
        reader = client_record("reader", clock, ("acme", "beta"), read_only=True)
        await store.add_client(zed)
        await store.add_client(reader)
        assert await store.list_clients() == [reader, zed]
        assert await store.remove_client("zed") is True
        assert await store.remove_client("zed") is False
        assert await store.list_clients() == [reader]

    async def test_name_taken(self, store: TokenStore, clock: FakeClock) -> None:
        """A second client with a taken name raises ClientExists and changes nothing."""
        first = client_record("tool", clock)
        await store.add_client(first)
        with pytest.raises(ClientExists):
            await store.add_client(client_record("tool", clock, read_only=True))
        assert await store.list_clients() == [first]

    async def test_touch_keeps_the_latest_use(self, store: TokenStore, clock: FakeClock) -> None:
        """touch_clients records the last use (by key id) and never moves it back; unknown
        key ids are ignored."""
        tool = client_record("tool", clock)
        await store.add_client(tool)
        await store.touch_clients({tool.key_id: 200.0, "ghost0005": 300.0})
        await store.touch_clients({tool.key_id: 100.0})
        await store.touch_clients({})
        [record] = await store.list_clients()
        assert record.info.last_used_at == 200.0

    async def test_a_re_added_name_does_not_inherit_the_old_keys_use(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """A key removed and added again under its name is a new key: use of the old one
        (written late, from a batch) does not show as the new one's last use."""
        old = client_record("tool", clock, key_id="oldk0001")
        await store.add_client(old)
        assert await store.remove_client("tool") is True
        await store.add_client(client_record("tool", clock, key_id="newk0001"))
        await store.touch_clients({old.key_id: clock.now()})
        [record] = await store.list_clients()
        assert record.key_id == "newk0001"
        assert record.info.last_used_at is None

    async def test_another_store_notices_a_client_change(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """change_counter() changes once another store adds a client key."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            before = await a.change_counter()
            await b.add_client(client_record("tool", clock))
            async with asyncio.timeout(PROMPTLY):
                while await a.change_counter() == before:  # noqa: ASYNC110 - polled API
                    await asyncio.sleep(0.02)

    async def test_change_hint_moves_without_waiting_once_another_store_commits(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """change_hint() (read on the request path, never waiting) stays put while nobody
        writes and moves once another store removes a client key: on SQLite as soon as
        the commit returns, on PostgreSQL once the notice arrives."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            start = a.change_hint()
            await b.add_client(client_record("tool", clock))
            async with asyncio.timeout(PROMPTLY):
                while a.change_hint() == start:  # noqa: ASYNC110 - the add's notice first
                    await asyncio.sleep(0.02)
            before = a.change_hint()
            assert before >= 0  # a real reading, not an unsure one
            assert a.change_hint() == before
            assert await b.remove_client("tool")
            if isinstance(backend, SQLiteBackend):
                assert a.change_hint() != before
            async with asyncio.timeout(PROMPTLY):
                while a.change_hint() == before:  # noqa: ASYNC110 - polled API
                    await asyncio.sleep(0.02)
            moved = a.change_hint()
            assert moved >= 0
            assert a.change_hint() == moved


class TestAudit:
    async def test_newest_first_and_filtered(self, store: TokenStore, clock: FakeClock) -> None:
        """audit() lists newest first, by nation and/or client, limited."""
        await store.record_audit(
            [
                audit_entry(clock, "reader", "acme", "r1"),
                audit_entry(clock, "writer", "acme", "r2"),
                audit_entry(clock, "writer", "beta", "r3"),
            ],
            0.0,
        )
        assert [e.request_id for e in await store.audit()] == ["r3", "r2", "r1"]
        assert [e.request_id for e in await store.audit(nation="acme")] == ["r2", "r1"]
        assert [e.request_id for e in await store.audit(client="writer")] == ["r3", "r2"]
        assert [e.request_id for e in await store.audit(nation="acme", client="writer")] == ["r2"]
        assert [e.request_id for e in await store.audit(limit=1)] == ["r3"]
        [entry] = await store.audit(nation="beta")
        assert entry == audit_entry(clock, "writer", "beta", "r3")

    async def test_newest_first_across_batches_written_out_of_order(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """Each process (each `--workers` worker) writes its own batch: the listing follows
        when the requests happened, not which batch reached the store first."""
        early = audit_entry(clock, "sync-job", "acme", "early")
        clock.advance(0.25)
        late = audit_entry(clock, "writer", "acme", "late")
        await store.record_audit([late], 0.0)  # the faster worker's batch
        await store.record_audit([early], 0.0)
        assert [e.request_id for e in await store.audit()] == ["late", "early"]

    async def test_retention_and_path_limit(self, store: TokenStore, clock: FakeClock) -> None:
        """Entries older than keep_after go when new ones are recorded, one exactly at it
        stays; paths are cut to their first AUDIT_PATH_MAX characters."""
        await store.record_audit([audit_entry(clock, "tool", "acme", "old")], 0.0)
        clock.advance(50)
        await store.record_audit([audit_entry(clock, "tool", "acme", "edge")], 0.0)
        clock.advance(50)
        long = AuditEntry(clock.now(), "tool", "acme", "PUT", "/x" * 1000, 200, "new")
        await store.record_audit([long], clock.now() - 50)
        assert [e.request_id for e in await store.audit()] == ["new", "edge"]
        entry = (await store.audit())[0]
        assert entry.path == long.path[:AUDIT_PATH_MAX]
        assert len(entry.path) == AUDIT_PATH_MAX


class TestMigration:
    async def test_previous_schema_gains_the_session_tables_with_its_data_intact(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A database left by the previous release (every migration but the newest) opens:
        it moves to the current schema version, its account, event and client key are
        unchanged and readable with the same key, and the new session and login-failure
        tables work."""
        sealed = Cipher([Secret(key)]).encrypt(
            "refresh-CANARY-old-5e6f7a8b", slug="acme", field="refresh_token"
        )
        await backend.create_previous_schema(sealed)
        async with backend.make(key) as store:
            account = await store.get_account("acme")
            assert account is not None
            assert account.refresh_token == Secret("refresh-CANARY-old-5e6f7a8b")
            assert account.generation == 3
            assert await event_kinds(store, "acme") == [EventKind.CONNECTED]
            assert [c.info.name for c in await store.list_clients()] == ["reader"]
            assert await store.verify() == []
            await store.revoke_session("sid-1", clock.now() + 60, clock.now())
            assert await store.session_revoked("sid-1", clock.now()) is True
            await store.record_login_failure("192.0.2.7", clock.now(), clock.now() - 300)
            assert await store.login_failures("192.0.2.7", clock.now() - 300) == [clock.now()]
        assert await backend.schema_version() == backend.current_version

    async def test_opened_without_migrating_the_previous_schema_stays(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """`nbgateway check` opens with migrate=False: a database of the previous release
        keeps its schema version (that release can still open it), says which it is, and
        can be pinged and test-written; the next ordinary open migrates it."""
        sealed = Cipher([Secret(key)]).encrypt(
            "refresh-CANARY-old-5e6f7a8b", slug="acme", field="refresh_token"
        )
        await backend.create_previous_schema(sealed)
        previous = await backend.schema_version()
        async with backend.make(key, migrate=False) as store:
            assert store.pending_version == previous
            await store.ping()
            await store.check_writable()
        assert await backend.schema_version() == previous
        async with backend.make(key) as store:
            assert store.pending_version is None
        assert await backend.schema_version() > previous

    async def test_opened_without_migrating_an_empty_database_stays_empty(
        self, backend: Backend, key: str
    ) -> None:
        """`nbgateway check` before any gateway started on the database: it creates
        nothing (no table; on SQLite no file), says the database is empty
        (`pending_version` 0), and the next ordinary open sets it up."""
        empty = backend.fresh()
        async with empty.make(key, migrate=False) as store:
            assert store.pending_version == 0
        assert await empty.table_names() == []
        async with empty.make(key) as store:
            assert store.pending_version is None
            await store.ping()
            await store.check_writable()
            assert await store.list_accounts() == []
        assert "accounts" in await empty.table_names()
        assert await empty.schema_version() == empty.current_version

    async def test_a_look_before_a_migration_keeps_the_migrated_version(
        self, backend: Backend, key: str
    ) -> None:
        """`nbgateway check` opened the previous release's database, then a `serve`
        migrated it: the check's test write leaves the new version, and the next open works
        (it wrote back the version it had seen, and every later open failed: "table ...
        already exists")."""
        sealed = Cipher([Secret(key)]).encrypt("refresh-old", slug="acme", field="refresh_token")
        await backend.create_previous_schema(sealed)
        async with backend.make(key, migrate=False) as looking:
            async with backend.make(key):
                pass
            await looking.check_writable()
        assert await backend.schema_version() == backend.current_version
        async with backend.make(key) as store:
            assert await store.get_account("acme") is not None

    async def test_the_test_write_keeps_a_newer_version(
        self, store: TokenStore, backend: Backend
    ) -> None:
        """A newer release migrated the database while this one still serves (an overlapping
        upgrade): `/readyz`'s and the health check's test write leave its version as it is,
        so the newer release's next start does not run its migration again."""
        await backend.set_schema_version(backend.current_version + 1)
        await store.check_writable()
        assert await backend.schema_version() == backend.current_version + 1


class TestRevokedSessions:
    async def test_revoked_until_it_would_have_expired(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """A revoked session is reported revoked until its expiry, and not after; another
        session id is not revoked."""
        now = clock.now()
        await store.revoke_session("sid-CANARY-a1", now + 100, now)
        assert await store.session_revoked("sid-CANARY-a1", now) is True
        assert await store.session_revoked("sid-CANARY-a1", now + 99.5) is True
        assert await store.session_revoked("sid-CANARY-a1", now + 100) is False
        assert await store.session_revoked("sid-CANARY-b2", now) is False

    async def test_another_store_sees_the_revocation(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A logout stored through one store is seen by another store on the same database
        (another process or replica)."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            assert await b.session_revoked("sid-1", clock.now()) is False
            await a.revoke_session("sid-1", clock.now() + 3600, clock.now())
            assert await b.session_revoked("sid-1", clock.now()) is True

    async def test_only_a_hash_of_the_session_id_is_stored(
        self, store: TokenStore, backend: Backend, clock: FakeClock
    ) -> None:
        """The table holds a hash of the session id (a bearer secret of the cookie), never
        the id itself."""
        await store.revoke_session("sid-CANARY-77cc88dd", clock.now() + 60, clock.now())
        [row] = await backend.table("revoked_sessions")
        assert row["sid_hash"] == session_hash("sid-CANARY-77cc88dd")
        assert "sid-CANARY-77cc88dd" not in repr(row)

    async def test_expired_revocations_are_pruned(
        self, store: TokenStore, backend: Backend, clock: FakeClock
    ) -> None:
        """Revoking a session drops the revocations that have expired: the table holds only
        sessions that could still be presented."""
        for n in range(3):
            await store.revoke_session(f"old-{n}", clock.now() + 10, clock.now())
        await store.revoke_session("long", clock.now() + 3600, clock.now())
        clock.advance(10)
        await store.revoke_session("new", clock.now() + 3600, clock.now())
        hashes = sorted(row["sid_hash"] for row in await backend.table("revoked_sessions"))
        assert hashes == sorted([session_hash("long"), session_hash("new")])

    async def test_revoking_twice_keeps_the_later_expiry(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """Revoking the same session again never shortens its revocation."""
        now = clock.now()
        await store.revoke_session("sid", now + 100, now)
        await store.revoke_session("sid", now + 50, now)
        assert await store.session_revoked("sid", now + 75) is True


class TestLoginFailures:
    async def test_counted_within_the_window(self, store: TokenStore, clock: FakeClock) -> None:
        """login_failures lists an address's attempts after `since`, oldest first."""
        start = clock.now()
        for offset in (0.0, 10.0, 20.0):
            at = start + offset
            await store.record_login_failure("192.0.2.1", at, at - 300)
        assert await store.login_failures("192.0.2.1", start - 1) == [start, start + 10, start + 20]
        assert await store.login_failures("192.0.2.1", start + 5) == [start + 10, start + 20]
        assert await store.login_failures("192.0.2.1", start + 20) == []

    async def test_addresses_are_independent_and_one_attempt_is_taken_back(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """Each address has its own count; forget_login_failure takes back exactly one
        attempt of that address at that time, even when several share it."""
        now = clock.now()
        for client in ("192.0.2.1", "192.0.2.1", "2001:db8::1"):
            await store.record_login_failure(client, now, now - 300)
        await store.record_login_failure("192.0.2.1", now + 1, now - 299)
        assert len(await store.login_failures("192.0.2.1", now - 300)) == 3
        assert len(await store.login_failures("2001:db8::1", now - 300)) == 1
        assert await store.login_failures("198.51.100.9", now - 300) == []
        await store.forget_login_failure("192.0.2.1", now)
        await store.forget_login_failure("198.51.100.9", now)  # nothing to take back is fine
        assert await store.login_failures("192.0.2.1", now - 300) == [now, now + 1]
        assert await store.login_failures("2001:db8::1", now - 300) == [now]

    async def test_another_store_counts_together(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """Attempts recorded by two stores on one database are one count."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            now = clock.now()
            await a.record_login_failure("192.0.2.1", now, now - 300)
            await b.record_login_failure("192.0.2.1", now + 1, now - 299)
            assert await a.login_failures("192.0.2.1", now - 300) == [now, now + 1]
            await b.forget_login_failure("192.0.2.1", now)
            assert await a.login_failures("192.0.2.1", now - 300) == [now + 1]

    async def test_old_attempts_of_every_address_are_pruned(
        self, store: TokenStore, backend: Backend, clock: FakeClock
    ) -> None:
        """Recording an attempt drops every address's attempts at or before `keep_after`."""
        for n in range(5):
            await store.record_login_failure(f"192.0.2.{n}", clock.now(), clock.now() - 300)
        clock.advance(301)
        await store.record_login_failure("198.51.100.1", clock.now(), clock.now() - 300)
        assert [row["client"] for row in await backend.table("login_failures")] == ["198.51.100.1"]

    async def test_rows_are_capped_oldest_first(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A flood of addresses within one window keeps at most `login_failures_kept` rows:
        the newest attempts stay, the oldest go."""
        await create_database(backend, key)
        async with backend.make(key, login_failures_kept=3) as store:
            for n in range(6):
                await store.record_login_failure(f"192.0.2.{n}", clock.now(), clock.now() - 300)
                clock.advance(0.5)
            rows = await backend.table("login_failures")
            assert sorted(row["client"] for row in rows) == ["192.0.2.3", "192.0.2.4", "192.0.2.5"]
            assert await store.login_failures("192.0.2.0", 0.0) == []


class TestTheBackendsAgree:
    """Where the two backends' own mechanics (a lease in the row, a session's advisory lock;
    the driver's errors; the database's collation) could make them answer differently."""

    async def test_an_unanswered_call_outlives_a_holder_that_sends_nothing(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """A holder that takes the lock and leaves without a token call (it backs off, or
        adopts a token still valid) leaves the unanswered call's start time in the row:
        the holder after it still sees it as unanswered_at."""
        await create_database(backend, key)
        async with backend.make(key) as a, backend.make(key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                sent = clock.now()
                clock.advance(5)
                await locked.record_failure("timed out", unanswered=True)
            clock.advance(5)
            async with b.refresh_lock("acme") as backing_off:
                assert backing_off.unanswered_at == sent
                # RefreshBackoff ("failed moments ago in another process"): no call made
            clock.advance(60)
            async with a.refresh_lock("acme") as next_try:
                assert next_try.unanswered_at == sent

    async def test_a_key_id_taken_is_a_lasting_refusal(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """A client key whose key id another key has is refused with StoreError, not
        StoreUnavailable (waiting will not cure it); nothing is stored."""
        await store.add_client(client_record("alpha", clock, key_id="same0001"))
        with pytest.raises(StoreError) as refused:
            await store.add_client(client_record("beta", clock, key_id="same0001"))
        assert not isinstance(refused.value, StoreUnavailable), repr(refused.value)
        assert [c.info.name for c in await store.list_clients()] == ["alpha"]

    async def test_a_state_started_twice_is_a_lasting_refusal(self, store: TokenStore) -> None:
        """The same state stored twice is refused with StoreError, not StoreUnavailable."""
        await store.create_state("state-1", "acme", Secret("verifier-CANARY"), "b", STATE_TTL)
        with pytest.raises(StoreError) as refused:
            await store.create_state("state-1", "acme", Secret("verifier-CANARY"), "b", STATE_TTL)
        assert not isinstance(refused.value, StoreUnavailable), repr(refused.value)

    @pytest.mark.parametrize(
        "odd", [{"scope": "default\x00extra"}, {"scope": "default\ud800"}, {"refresh": "r\ud800"}]
    )
    async def test_text_that_cannot_be_stored_is_a_store_error(
        self, store: TokenStore, clock: FakeClock, odd: dict[str, str]
    ) -> None:
        """A value one of the databases cannot hold as text (a NUL; a lone surrogate, which
        JSON's "\\ud800" decodes to) is refused by both with StoreError, which
        TokenManager._save_rotated catches to hold the rotated pair (nothing else
        escapes), and the stored pair stays. (oauth drops such characters from a scope.)"""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        pair = token_set(clock, "2")
        if "scope" in odd:
            pair = replace(pair, scope=odd["scope"])
        else:
            pair = replace(pair, refresh_token=Secret(odd["refresh"]))
        with pytest.raises(StoreError):
            await store.save_tokens("beta", pair, EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.begin_refresh()
            with pytest.raises(StoreError):
                await locked.save_tokens(pair)
            locked.keep()
        assert [info.slug for info in await store.list_accounts()] == ["acme"]
        account = await store.get_account("acme")
        assert account is not None
        assert account.refresh_token == token_set(clock, "1").refresh_token

    async def test_one_store_does_not_lock_an_account_twice_at_once(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """Two tasks of one store locking one account take turns: the second gets in only
        once the first left its block."""
        await create_database(backend, key)
        async with backend.make(key, token_timeout=0.5) as a:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            entered = asyncio.Event()

            async def other() -> None:
                async with a.refresh_lock("acme"):
                    entered.set()

            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                waiter = asyncio.create_task(other())
                await asyncio.sleep(1.0)
                inside_while_held = entered.is_set()
                await locked.record_failure("HTTP 503")
            async with asyncio.timeout(PROMPTLY):
                await waiter
        assert not inside_while_held

    async def test_rotation_reports_skipped_rows_in_slug_order(
        self, backend: Backend, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """RotationReport.skipped lists the unreadable rows by slug, whatever order they
        were stored in."""
        await create_database(backend, key)
        async with backend.make(key) as store:
            for slug in ("zeta", "alpha"):
                await store.save_tokens(slug, token_set(clock, slug), EventKind.CONNECTED)
        for slug in ("zeta", "alpha"):
            bad = bytearray(await backend.column(slug, "refresh_token"))
            bad[-1] ^= 0x01
            await backend.set_column(slug, "refresh_token", bytes(bad))
        async with backend.make(other_key, key) as store:
            report = await store.rotate_keys()
        assert ["'alpha'" in report.skipped[0], "'zeta'" in report.skipped[1]] == [True, True], (
            report.skipped
        )

    async def test_a_closed_store_writes_nothing(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """After close() a write is refused (StoreError, as a read is) and nothing lands."""
        await create_database(backend, key)
        closed = backend.make(key)
        async with closed:
            pass
        try:
            with pytest.raises(StoreError):
                await closed.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        finally:
            await closed.close()  # else the writer SQLite opened keeps the process from exiting
        async with backend.make(key) as reopened:
            assert await reopened.get_account("acme") is None

    async def test_listings_keep_the_same_order_on_a_linguistic_collation(
        self, backend: Backend, clock: FakeClock, key: str
    ) -> None:
        """list_clients is in the same order whatever the database's collation (a cluster
        made by initdb with a linguistic locale, here ICU en-US): code point order, as
        SQLite gives it."""
        if isinstance(backend, PostgresBackend):
            name = "nbgw_parity_icu"
            backend.server.sql(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
                "ICU_LOCALE 'en-US' LOCALE 'C'"
            )
            backend = PostgresBackend(clock, backend.server, backend.server.url(name))
        try:
            async with backend.make(key) as store:
                for name_ in ("beta", "Zed", "alpha"):
                    await store.add_client(client_record(name_, clock))
                names = [c.info.name for c in await store.list_clients()]
        finally:
            if isinstance(backend, PostgresBackend):
                backend.server.drop_database(backend.url)
        assert names == ["Zed", "alpha", "beta"]

    async def test_a_negative_limit_lists_nothing(
        self, store: TokenStore, clock: FakeClock
    ) -> None:
        """events and audit with a limit below zero list nothing, on both (SQLite's LIMIT -1
        would be every row; PostgreSQL refuses it)."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        assert await store.events("acme", limit=-1) == []
        assert await store.events(limit=-1) == []
        assert await store.audit(limit=-1) == []
