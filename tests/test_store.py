"""Tests for the encrypted SQLite token store (nbgateway.store), on a real database file.

Raw inspection of the file (corrupting rows, reading blobs, hashing bytes) uses the stdlib
`sqlite3` module directly, the way an operator's tools or an attacker with a copy would.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from nbgateway.clock import FakeClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.errors import (
    AccountNotFound,
    CorruptRecordError,
    DecryptError,
    StateError,
    StoreError,
)
from nbgateway.models import AccountInfo, AccountStatus, EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.store import SCHEMA_VERSION, SQLiteStore

STATE_TTL = 600.0


# -- helpers --------------------------------------------------------------------------------


def make_store(path: Path, clock: FakeClock, *keys: str, **kwargs: Any) -> SQLiteStore:
    return SQLiteStore(path, Cipher([Secret(k) for k in keys]), clock, **kwargs)


async def create_database(path: Path, clock: FakeClock, key: str) -> None:
    """Create and migrate the database once, as an earlier run or `nbgateway check` would."""
    async with make_store(path, clock, key):
        pass


def token_set(clock: FakeClock, label: str, expires_in: float = 3600.0) -> TokenSet:
    return TokenSet(
        access_token=Secret(f"access-CANARY-{label}-9f8e7d6c"),
        refresh_token=Secret(f"refresh-CANARY-{label}-1a2b3c4d"),
        expires_at=clock.now() + expires_in,
        scope="default",
    )


def db_files(path: Path) -> Iterator[Path]:
    """The database file and its companions (-wal, -shm, -journal)."""
    yield from sorted(path.parent.glob(path.name + "*"))


def db_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in db_files(path)}


def db_hashes(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in db_bytes(path).items()}


def assert_absent(files: dict[str, bytes], *values: str) -> None:
    assert files, "no database files found"
    for name, data in files.items():
        for value in values:
            assert value.encode() not in data, f"{value!r} found in clear in {name}"


def dead_process_id() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def raw_query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    with closing(sqlite3.connect(path, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()


def raw_execute(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    with closing(sqlite3.connect(path, timeout=5)) as conn:
        conn.execute(sql, params)
        conn.commit()


def raw_write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def raw_row(path: Path, slug: str) -> tuple[Any, ...]:
    rows = raw_query(path, "SELECT * FROM accounts WHERE slug = ?", (slug,))
    assert len(rows) == 1
    return tuple(rows[0])


async def event_kinds(store: SQLiteStore, slug: str) -> list[EventKind]:
    """The account's event kinds, oldest first."""
    return [e.kind for e in reversed(await store.events(slug, limit=100))]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def other_key() -> str:
    return generate_key()


@pytest.fixture
async def store(db_path: Path, clock: FakeClock, key: str) -> AsyncIterator[SQLiteStore]:
    """An open store on a database created by an earlier open.

    The very first write after creating a database is covered separately
    (TestOpen.test_first_write_right_after_creating_the_database).
    """
    await create_database(db_path, clock, key)
    async with make_store(db_path, clock, key) as opened:
        yield opened


# -- tests ----------------------------------------------------------------------------------


class TestOpen:
    async def test_fresh_database_gets_schema_and_wal(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """Opening a new file creates the schema at SCHEMA_VERSION in WAL mode."""
        async with make_store(db_path, clock, key):
            pass
        assert raw_query(db_path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
        assert raw_query(db_path, "PRAGMA journal_mode")[0][0] == "wal"
        tables = {r[0] for r in raw_query(db_path, "SELECT name FROM sqlite_master")}
        assert {"accounts", "events", "auth_states"} <= tables

    async def test_reopening_keeps_data_and_version(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A second open neither migrates again nor loses rows."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with make_store(db_path, clock, key) as store:
            account = await store.get_account("acme")
        assert account is not None
        assert account.access_token == token_set(clock, "1").access_token
        assert raw_query(db_path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION

    async def test_first_write_right_after_creating_the_database(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A brand-new database accepts a write straight after open."""
        async with make_store(db_path, clock, key, busy_timeout=0.5) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            assert await store.get_account("acme") is not None

    async def test_missing_directory(self, tmp_path: Path, clock: FakeClock, key: str) -> None:
        """A database path in a missing directory raises StoreError naming it; nothing is made."""
        missing = tmp_path / "no-such-dir"
        with pytest.raises(StoreError) as info:
            async with make_store(missing / "gateway.db", clock, key):
                pass
        assert str(missing) in str(info.value)
        assert "NBGW_DATABASE" in str(info.value)
        assert not missing.exists()

    async def test_newer_schema_is_refused_without_change(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A database from a newer nbgateway raises StoreError and is left byte-identical."""
        raw_execute(db_path, "CREATE TABLE future (x)")
        raw_execute(db_path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        before = db_hashes(db_path)
        with pytest.raises(StoreError) as info:
            async with make_store(db_path, clock, key):
                pass
        assert str(SCHEMA_VERSION + 1) in str(info.value)
        assert "upgrade" in str(info.value)
        assert db_hashes(db_path) == before

    async def test_file_that_is_not_a_database(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A file that is not SQLite raises StoreError naming the file."""
        raw_write(db_path, b"this is not a database " * 200)
        with pytest.raises(StoreError, match=r"gateway\.db"):
            async with make_store(db_path, clock, key):
                pass

    async def test_ping(self, store: SQLiteStore) -> None:
        """ping() succeeds on an open store."""
        await store.ping()

    async def test_ping_after_close(self, db_path: Path, clock: FakeClock, key: str) -> None:
        """ping() raises StoreError once the store is closed."""
        store = make_store(db_path, clock, key)
        await store.open()
        await store.close()
        with pytest.raises(StoreError):
            await store.ping()


class TestAccounts:
    async def test_round_trip(self, store: SQLiteStore, clock: FakeClock) -> None:
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

    async def test_unknown_account(self, store: SQLiteStore) -> None:
        """get_account of an unknown slug is None."""
        assert await store.get_account("nobody") is None

    async def test_generation_increments_on_every_save(
        self, store: SQLiteStore, clock: FakeClock
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

    async def test_update_keeps_created_at(self, store: SQLiteStore, clock: FakeClock) -> None:
        """A later save moves updated_at and last_refresh_at but keeps created_at."""
        first = await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        clock.advance(100)
        second = await store.save_tokens("acme", token_set(clock, "2"), EventKind.CONNECTED)
        assert second.created_at == first.created_at
        assert second.updated_at == first.updated_at + 100
        assert second.last_refresh_at == clock.now()

    async def test_accounts_are_separate(self, store: SQLiteStore, clock: FakeClock) -> None:
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

    async def test_list_accounts_has_no_tokens(self, store: SQLiteStore, clock: FakeClock) -> None:
        """list_accounts returns sorted AccountInfo without any token value."""
        await store.save_tokens("zeta", token_set(clock, "z"), EventKind.CONNECTED)
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        infos = await store.list_accounts()
        assert [i.slug for i in infos] == ["acme", "zeta"]
        assert all(type(i) is AccountInfo for i in infos)
        assert not any(hasattr(i, "access_token") or hasattr(i, "refresh_token") for i in infos)
        text = repr(infos)
        for label in ("a", "z"):
            tokens = token_set(clock, label)
            assert tokens.access_token.reveal() not in text
            assert tokens.refresh_token.reveal() not in text

    async def test_list_accounts_decrypts_nothing(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """An undecryptable row still shows in list_accounts."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        raw_execute(db_path, "UPDATE accounts SET access_token = X'00' WHERE slug = 'acme'")
        assert [i.slug for i in await store.list_accounts()] == ["acme"]

    async def test_import_refresh_token(self, store: SQLiteStore) -> None:
        """An imported refresh token is stored alone; the access token comes later."""
        await store.import_refresh_token("acme", Secret("legacy-token-CANARY-0123"))
        account = await store.get_account("acme")
        assert account is not None
        assert account.refresh_token == Secret("legacy-token-CANARY-0123")
        assert account.access_token is None
        assert account.status is AccountStatus.ACTIVE
        assert account.generation == 1

    async def test_import_over_dead_account(self, store: SQLiteStore, clock: FakeClock) -> None:
        """Importing over an account needing re-auth makes it active and bumps the generation."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.mark_needs_reauth("invalid_grant")
        await store.import_refresh_token("acme", Secret("legacy-token-CANARY-0123"))
        account = await store.get_account("acme")
        assert account is not None
        assert account.status is AccountStatus.ACTIVE
        assert account.last_error is None
        assert account.access_token is None
        assert account.refresh_token == Secret("legacy-token-CANARY-0123")
        assert account.generation == 3

    async def test_new_tokens_clear_needs_reauth(
        self, store: SQLiteStore, clock: FakeClock
    ) -> None:
        """Saving tokens after needs_reauth makes the account active with no last error."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.mark_needs_reauth("invalid_grant")
        account = await store.save_tokens("acme", token_set(clock, "2"), EventKind.CONNECTED)
        assert account.status is AccountStatus.ACTIVE
        assert account.last_error is None

    async def test_remove_account(self, store: SQLiteStore, clock: FakeClock) -> None:
        """remove_account deletes the account once and reports whether it existed."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        assert await store.remove_account("acme") is True
        assert await store.get_account("acme") is None
        assert await store.list_accounts() == []
        assert await store.remove_account("acme") is False

    async def test_decrypted_tokens_are_reported(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """on_secret receives every token the store writes or decrypts (for the log redactor)."""
        await create_database(db_path, clock, key)
        tokens = token_set(clock, "1")
        async with make_store(db_path, clock, key) as writer:
            await writer.save_tokens("acme", tokens, EventKind.CONNECTED)
        seen: list[tuple[Secret, str]] = []
        async with make_store(
            db_path, clock, key, on_secret=lambda secret, slot: seen.append((secret, slot))
        ) as reader:
            await reader.get_account("acme")
        assert (tokens.access_token, "acme/access_token") in seen
        assert (tokens.refresh_token, "acme/refresh_token") in seen


class TestEvents:
    async def test_history_is_bounded_per_account(
        self, store: SQLiteStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Only the newest EVENTS_KEPT events of an account are kept; others' are untouched."""
        store.events_kept = 3
        await store.save_tokens("other", token_set(clock, "0"), EventKind.CONNECTED)
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        for n in range(5):
            async with store.refresh_lock("acme") as locked:
                await locked.record_failure(f"failure {n}")
        details = [e.detail for e in await store.events("acme", limit=10)]
        assert details == ["failure 4", "failure 3", "failure 2"]
        assert [e.kind for e in await store.events("other")] == [EventKind.CONNECTED]

    async def test_connected(self, store: SQLiteStore, clock: FakeClock) -> None:
        """save_tokens with CONNECTED records a connected event."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED]

    async def test_refreshed(self, store: SQLiteStore, clock: FakeClock) -> None:
        """Saving tokens under the refresh lock records a refreshed event."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            await locked.save_tokens(token_set(clock, "2"))
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED, EventKind.REFRESHED]

    async def test_refresh_failed(self, store: SQLiteStore, clock: FakeClock) -> None:
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

    async def test_needs_reauth(self, store: SQLiteStore, clock: FakeClock) -> None:
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

    async def test_removed_event_survives_the_account(
        self, store: SQLiteStore, clock: FakeClock
    ) -> None:
        """remove_account records removed; the history stays after the row is gone."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.remove_account("acme")
        assert await event_kinds(store, "acme") == [EventKind.CONNECTED, EventKind.REMOVED]

    async def test_removing_unknown_account_records_nothing(self, store: SQLiteStore) -> None:
        """remove_account of an unknown slug adds no event."""
        await store.remove_account("nobody")
        assert await store.events("nobody") == []

    async def test_imported(self, store: SQLiteStore) -> None:
        """import_refresh_token records an imported event."""
        await store.import_refresh_token("acme", Secret("legacy-token-CANARY-0123"))
        assert await event_kinds(store, "acme") == [EventKind.IMPORTED]

    async def test_last_error_is_truncated(self, store: SQLiteStore, clock: FakeClock) -> None:
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
        self, store: SQLiteStore, clock: FakeClock
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
    async def test_read_sees_the_row(self, store: SQLiteStore, clock: FakeClock) -> None:
        """LockedAccount.read returns the current row with its tokens."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as locked:
            account = await locked.read()
        assert account.refresh_token == token_set(clock, "1").refresh_token

    async def test_read_of_missing_account(self, store: SQLiteStore) -> None:
        """LockedAccount.read raises AccountNotFound for an unknown slug."""
        with pytest.raises(AccountNotFound):
            async with store.refresh_lock("nobody") as locked:
                await locked.read()

    async def test_exception_releases_the_lease(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """An exception inside the lock releases the lease: another store can take it at once
        and sees no refresh in flight (writes made before the exception stay committed)."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as a, make_store(db_path, clock, key) as b:
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

    async def test_serialises_two_stores_on_one_file(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """While one store holds the lock another cannot enter; it then sees the new row."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as a, make_store(db_path, clock, key) as b:
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
                    await asyncio.wait_for(b_entered.wait(), 0.3)
                await locked_a.save_tokens(token_set(clock, "2"))
            generation_seen_by_b = await asyncio.wait_for(b_task, 30)
        assert generation_seen_by_b == 2

    async def test_writes_commit_on_exit(self, db_path: Path, clock: FakeClock, key: str) -> None:
        """A refresh made under the lock is visible to another store after the lock ends."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as a, make_store(db_path, clock, key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.save_tokens(token_set(clock, "2"))
            account = await b.get_account("acme")
        assert account is not None
        assert account.access_token == token_set(clock, "2").access_token

    @pytest.mark.parametrize(
        ("holder", "lapsed", "marker", "taken"),
        [
            ("dead-here", False, True, True),
            ("live-elsewhere", False, True, False),
            ("live-here", True, True, False),
            ("live-here", True, False, True),
            ("live-elsewhere", True, True, True),
        ],
        ids=[
            "dead-process-here-at-once",
            "live-elsewhere-before-deadline-waits",
            "live-here-lapsed-mid-call-waits",
            "live-here-lapsed-before-call-taken",
            "elsewhere-lapsed-taken",
        ],
    )
    async def test_who_may_take_over_a_lease(
        self,
        db_path: Path,
        clock: FakeClock,
        key: str,
        holder: str,
        lapsed: bool,
        marker: bool,
        taken: bool,
    ) -> None:
        """A lease left by a process of this host that no longer runs (kill -9 mid-refresh)
        is taken at once, its marker reported as interrupted. Another host's lease is
        waited for until its deadline. A live process of this host whose lease lapsed
        during its token call (it could not store the result and may hold the rotated pair
        in memory) is waited for; before any token call, a lapsed lease is taken."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as a, make_store(db_path, clock, key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                if marker:
                    await locked.begin_refresh()
                [(owner,)] = raw_query(db_path, "SELECT refresh_owner FROM accounts")
                host, namespace, pid, rest = owner.split("/", 3)
                if holder == "dead-here":
                    pid = str(dead_process_id())
                elif holder == "live-elsewhere":
                    host = "elsewhere.example"
                raw_execute(
                    db_path,
                    "UPDATE accounts SET refresh_owner = ?",
                    (f"{host}/{namespace}/{pid}/{rest}",),
                )
                if lapsed:
                    clock.advance(b.lease + 1)

                async def claim_in_b() -> float | None:
                    async with b.refresh_lock("acme") as locked_b:
                        return locked_b.interrupted_at

                if taken:
                    interrupted = await asyncio.wait_for(claim_in_b(), 5)
                    assert (interrupted is not None) == marker
                else:
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(claim_in_b(), 0.3)


class TestEncryptionAtRest:
    async def test_no_plaintext_in_database_files(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """Tokens, imported tokens, states and verifiers never reach any database file in clear."""
        await create_database(db_path, clock, key)
        tokens = token_set(clock, "1")
        refreshed = token_set(clock, "2")
        secrets = [
            tokens.access_token.reveal(),
            tokens.refresh_token.reveal(),
            refreshed.access_token.reveal(),
            refreshed.refresh_token.reveal(),
            "legacy-token-CANARY-0123",
            "state-CANARY-55aa66bb",
            "verifier-CANARY-77cc88dd",
            key,
        ]
        async with make_store(db_path, clock, key) as store:
            await store.save_tokens("acme", tokens, EventKind.CONNECTED)
            async with store.refresh_lock("acme") as locked:
                await locked.save_tokens(refreshed)
            await store.import_refresh_token("beta", Secret("legacy-token-CANARY-0123"))
            await store.create_state(
                "state-CANARY-55aa66bb", "acme", Secret("verifier-CANARY-77cc88dd"), "b", 600
            )
            open_files = db_bytes(db_path)
            # The writes are still in the write-ahead log while the store is open.
            assert open_files.get(f"{db_path.name}-wal")
            assert_absent(open_files, *secrets)
        assert_absent(db_bytes(db_path), *secrets)

    async def test_wrong_key_changes_no_byte(
        self, db_path: Path, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """Opening with a key that does not match raises DecryptError and changes nothing."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        before = db_hashes(db_path)
        with pytest.raises(DecryptError) as info:
            async with make_store(db_path, clock, other_key):
                pass
        assert db_hashes(db_path) == before
        message = str(info.value)
        assert Cipher([Secret(key)]).primary_key_id in message
        assert "nothing was changed" in message.lower()
        assert key not in message
        assert other_key not in message
        async with make_store(db_path, clock, key) as store:
            account = await store.get_account("acme")
        assert account is not None
        assert account.refresh_token == token_set(clock, "1").refresh_token

    async def test_corrupt_row(self, store: SQLiteStore, clock: FakeClock, db_path: Path) -> None:
        """A garbage token column fails to decrypt naming the account; verify lists it; no write."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "2"), EventKind.CONNECTED)
        raw_execute(
            db_path,
            "UPDATE accounts SET access_token = ? WHERE slug = 'acme'",
            (b"garbage, not a ciphertext at all",),
        )
        before = raw_row(db_path, "acme")
        with pytest.raises((DecryptError, CorruptRecordError)) as info:
            await store.get_account("acme")
        assert "'acme'" in str(info.value)
        problems = await store.verify()
        assert len(problems) == 1
        assert "'acme'" in problems[0]
        assert await store.get_account("beta") is not None
        assert raw_row(db_path, "acme") == before

    async def test_tampered_ciphertext(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """A single flipped byte in a stored ciphertext fails to decrypt and is reported."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        blob = bytearray(raw_query(db_path, "SELECT refresh_token FROM accounts")[0][0])
        blob[-1] ^= 0x01
        raw_execute(db_path, "UPDATE accounts SET refresh_token = ?", (bytes(blob),))
        with pytest.raises(DecryptError, match="acme"):
            await store.get_account("acme")
        assert any("acme" in p for p in await store.verify())

    async def test_non_blob_column_is_corrupt(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """A token column holding text instead of bytes raises CorruptRecordError."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        raw_execute(db_path, "UPDATE accounts SET access_token = 'plain text'")
        with pytest.raises(CorruptRecordError, match="acme"):
            await store.get_account("acme")

    async def test_ciphertext_moved_to_another_account(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """A refresh token copied from account a into account b's row does not decrypt."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
        raw_execute(
            db_path,
            "UPDATE accounts SET refresh_token = "
            "(SELECT refresh_token FROM accounts WHERE slug = 'acme') WHERE slug = 'beta'",
        )
        with pytest.raises(DecryptError, match="beta"):
            await store.get_account("beta")
        assert await store.get_account("acme") is not None
        problems = await store.verify()
        assert len(problems) == 1
        assert "beta" in problems[0]

    async def test_ciphertext_moved_to_another_column(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """A refresh token copied into the same row's access_token column does not decrypt."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        raw_execute(db_path, "UPDATE accounts SET access_token = refresh_token")
        with pytest.raises(DecryptError, match="access_token"):
            await store.get_account("acme")

    async def test_verify_healthy_store(self, store: SQLiteStore, clock: FakeClock) -> None:
        """verify() reports nothing when every row decrypts."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await store.import_refresh_token("beta", Secret("legacy-token-CANARY-0123"))
        assert await store.verify() == []

    async def test_store_with_a_corrupt_row_still_opens(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """After a restart, a corrupt row is reported by verify() rather than blocking open."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            await store.save_tokens("beta", token_set(clock, "2"), EventKind.CONNECTED)
        raw_execute(db_path, "UPDATE accounts SET access_token = X'DEADBEEF' WHERE slug = 'acme'")
        async with make_store(db_path, clock, key) as store:
            problems = await store.verify()
            assert await store.get_account("beta") is not None
        assert len(problems) == 1
        assert "acme" in problems[0]


class TestRotateKeys:
    async def test_rotation_reencrypts_under_the_first_key(
        self, db_path: Path, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """rotate_keys re-seals old-key rows with the first key, returns the count, keeps data."""
        old_key, new_key = key, other_key
        await create_database(db_path, clock, old_key)
        async with make_store(db_path, clock, old_key) as store:
            await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
            await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
            await store.import_refresh_token("gamma", Secret("legacy-token-CANARY-0123"))

        cipher = Cipher([Secret(new_key), Secret(old_key)])
        new_id, old_id = cipher.key_ids
        blobs_sql = (
            "SELECT access_token AS b FROM accounts WHERE access_token IS NOT NULL "
            "UNION ALL SELECT refresh_token FROM accounts"
        )
        assert {cipher.key_id_of(r[0]) for r in raw_query(db_path, blobs_sql)} == {old_id}

        async with make_store(db_path, clock, new_key, old_key) as store:
            assert (await store.rotate_keys()).changed == 3
            assert {cipher.key_id_of(r[0]) for r in raw_query(db_path, blobs_sql)} == {new_id}
            assert (await store.rotate_keys()).changed == 0

        async with make_store(db_path, clock, new_key) as store:  # the old key can go now
            acme = await store.get_account("acme")
            gamma = await store.get_account("gamma")
            assert await store.verify() == []
        assert acme is not None and gamma is not None
        assert acme.access_token == token_set(clock, "a").access_token
        assert acme.refresh_token == token_set(clock, "a").refresh_token
        assert gamma.refresh_token == Secret("legacy-token-CANARY-0123")

    async def test_rotation_keeps_generation_and_events(
        self, db_path: Path, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """Re-encryption is not a token change: generation and history stay as they were."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as store:
            await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        async with make_store(db_path, clock, other_key, key) as store:
            await store.rotate_keys()
            account = await store.get_account("acme")
            kinds = await event_kinds(store, "acme")
        assert account is not None
        assert account.generation == 1
        assert kinds == [EventKind.CONNECTED]

    async def test_nothing_to_rotate(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """With every row already under the first key, rotate_keys changes nothing."""
        await store.save_tokens("acme", token_set(clock, "a"), EventKind.CONNECTED)
        before = raw_row(db_path, "acme")
        assert (await store.rotate_keys()).changed == 0
        assert raw_row(db_path, "acme") == before

    async def test_pending_authorizations_are_rotated(
        self, db_path: Path, clock: FakeClock, key: str, other_key: str
    ) -> None:
        """A state created under the old key can be consumed with only the new key afterwards."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as store:
            await store.create_state("state-1", "acme", Secret("verifier-1"), "", STATE_TTL)
        async with make_store(db_path, clock, other_key, key) as store:
            await store.rotate_keys()
        async with make_store(db_path, clock, other_key) as store:
            pending = await store.consume_state("state-1", "")
        assert pending.code_verifier == Secret("verifier-1")


class TestAuthStates:
    async def test_round_trip(self, store: SQLiteStore, clock: FakeClock) -> None:
        """consume_state returns the nation, the PKCE verifier and when it started."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        pending = await store.consume_state("state-1", "sess-1")
        assert pending.slug == "acme"
        assert pending.code_verifier == Secret("verifier-1")
        assert pending.created_at == clock.now()

    async def test_single_use(self, store: SQLiteStore) -> None:
        """A state can be consumed only once."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        await store.consume_state("state-1", "sess-1")
        with pytest.raises(StateError):
            await store.consume_state("state-1", "sess-1")

    async def test_unknown_state(self, store: SQLiteStore) -> None:
        """A state never created raises StateError."""
        with pytest.raises(StateError):
            await store.consume_state("never-made", "sess-1")

    async def test_expired(self, store: SQLiteStore, clock: FakeClock) -> None:
        """A state older than its ttl raises StateError."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        clock.advance(601)
        with pytest.raises(StateError, match="expired"):
            await store.consume_state("state-1", "sess-1")

    async def test_valid_until_ttl(self, store: SQLiteStore, clock: FakeClock) -> None:
        """A state is still accepted just before its ttl runs out."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        clock.advance(599)
        assert (await store.consume_state("state-1", "sess-1")).slug == "acme"

    async def test_binding_mismatch(self, store: SQLiteStore) -> None:
        """A state bound to one session raises StateError when consumed from another."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "sess-1", STATE_TTL)
        with pytest.raises(StateError):
            await store.consume_state("state-1", "sess-2")

    async def test_states_are_independent(self, store: SQLiteStore) -> None:
        """Several pending states each return their own nation and verifier."""
        await store.create_state("state-1", "acme", Secret("verifier-1"), "s", STATE_TTL)
        await store.create_state("state-2", "beta", Secret("verifier-2"), "s", STATE_TTL)
        second = await store.consume_state("state-2", "s")
        first = await store.consume_state("state-1", "s")
        assert (first.slug, first.code_verifier) == ("acme", Secret("verifier-1"))
        assert (second.slug, second.code_verifier) == ("beta", Secret("verifier-2"))

    async def test_state_stored_only_as_hash(self, store: SQLiteStore, db_path: Path) -> None:
        """The database holds sha256(state), never the state or the verifier in clear."""
        state, verifier = "state-CANARY-55aa66bb", "verifier-CANARY-77cc88dd"
        await store.create_state(state, "acme", Secret(verifier), "sess-1", STATE_TTL)
        rows = raw_query(db_path, "SELECT state_hash FROM auth_states")
        assert [r[0] for r in rows] == [hashlib.sha256(state.encode()).hexdigest()]
        assert_absent(db_bytes(db_path), state, verifier)

    async def test_expired_states_are_purged(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """Creating a state removes pending states that have expired."""
        await store.create_state("old", "acme", Secret("verifier-1"), "s", STATE_TTL)
        clock.advance(601)
        await store.create_state("new", "acme", Secret("verifier-2"), "s", STATE_TTL)
        assert raw_query(db_path, "SELECT count(*) FROM auth_states")[0][0] == 1
