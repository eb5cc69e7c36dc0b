"""SQLite-only tests of the token store, on a real database file: schema and WAL mode,
file errors, who may take over a lease, and what the bytes on disk hold. Behaviour every
backend shares is in tests/store_contract.py, which runs on SQLite too.

Raw inspection of the file (corrupting rows, reading blobs, hashing bytes) uses the stdlib
`sqlite3` module directly, the way an operator's tools or an attacker with a copy would.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import dead_process_id, raw_execute, raw_query

from nbgateway.clients import make_record, new_key
from nbgateway.clock import FakeClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.errors import (
    CorruptRecordError,
    DecryptError,
    RefreshLockBusy,
    StoreError,
    StoreUnavailable,
)
from nbgateway.models import AccountStatus, EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.store import SCHEMA_VERSION, GenerationConflict, LeaseLost, SQLiteStore
from nbgateway.store import sqlite as sqlite_backend

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


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def db_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in db_files(path)}


def db_hashes(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in db_bytes(path).items()}


def assert_absent(files: dict[str, bytes], *values: str) -> None:
    assert files, "no database files found"
    for name, data in files.items():
        for value in values:
            assert value.encode() not in data, f"{value!r} found in clear in {name}"


def raw_write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


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
        assert str(info.value) == (
            f"directory {missing} of the database {missing / 'gateway.db'} does not exist"
        )  # no setting named: the path may come from `migrate --to` as well
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


class TestFileMode:
    async def test_a_new_database_is_private_whatever_the_umask(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """Tokens are sealed, but the file is still nobody else's to read: a database the
        gateway creates, and the -wal and -shm files SQLite adds, are 0600 under umask 022."""
        previous = os.umask(0o022)
        try:
            async with make_store(db_path, clock, key) as store:
                await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
                files = {p.name: file_mode(p) for p in db_files(db_path)}
        finally:
            os.umask(previous)
        assert set(files) == {db_path.name, f"{db_path.name}-wal", f"{db_path.name}-shm"}
        assert set(files.values()) == {0o600}, files

    async def test_an_existing_database_keeps_its_mode(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        await create_database(db_path, clock, key)
        db_path.chmod(0o640)  # noqa: ASYNC240 - the operator's choice (a backup group, say)
        async with make_store(db_path, clock, key):
            pass
        assert file_mode(db_path) == 0o640


class TestRefreshLock:
    @pytest.mark.parametrize(
        ("holder", "lapsed", "marker", "taken"),
        [
            ("dead-here", False, True, True),
            ("reused-pid-here", False, True, True),
            ("live-elsewhere", False, True, False),
            ("live-here", True, True, False),
            ("live-here", True, False, True),
            ("live-elsewhere", True, True, True),
        ],
        ids=[
            "dead-process-here-at-once",
            "pid-reused-by-a-live-process-at-once",
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
        is taken at once, its marker reported as interrupted; so is one whose pid now
        belongs to a live process started at another time (the pid was reused). Another
        host's lease is waited for until its deadline. A live process of this host whose
        lease lapsed during its token call (it could not store the result and may hold the
        rotated pair in memory) is waited for; before any token call, a lapsed lease is
        taken."""
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
                elif holder == "reused-pid-here":
                    assert "." in pid  # pid.start-time: this process, alive
                    pid = pid.split(".")[0] + ".1"  # the same pid, started at another time
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

    @pytest.mark.parametrize("refused", [False, True], ids=["call-failed", "token-refused"])
    async def test_a_late_failure_leaves_the_lease_of_the_process_that_took_it_over(
        self,
        db_path: Path,
        clock: FakeClock,
        key: str,
        monkeypatch: pytest.MonkeyPatch,
        refused: bool,
    ) -> None:
        """A holder on another host that stalled past its deadline, its lease taken over,
        stores nothing when it reports its failure at last (LeaseLost): the new holder's
        lease and marker stay, the row keeps its status, no failure event is written, and
        the new holder's result lands. Its late begin_refresh is refused the same way."""
        await create_database(db_path, clock, key)
        monkeypatch.setattr("nbgateway.store.sqlite.owner_id", lambda: "elsewhere.example/1/2.3/ab")
        a = make_store(db_path, clock, key)
        monkeypatch.undo()
        async with a, make_store(db_path, clock, key) as b:
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked_a:
                await locked_a.begin_refresh()
                clock.advance(b.lease + 1)
                async with b.refresh_lock("acme") as locked_b:
                    assert locked_b.interrupted_at is not None
                    await locked_b.begin_refresh()
                    [lease_b] = raw_query(
                        db_path, "SELECT refresh_owner, refresh_started_at FROM accounts"
                    )
                    assert lease_b[0] is not None and lease_b[1] is not None
                    with pytest.raises(LeaseLost):
                        if refused:
                            await locked_a.mark_needs_reauth("refused: invalid_grant")
                        else:
                            await locked_a.record_failure("timed out", unanswered=True)
                    with pytest.raises(LeaseLost):
                        await locked_a.begin_refresh()
                    [now_b] = raw_query(
                        db_path, "SELECT refresh_owner, refresh_started_at FROM accounts"
                    )
                    assert tuple(now_b) == tuple(lease_b)
                    await locked_b.save_tokens(token_set(clock, "2"))
            account = await b.get_account("acme")
            assert account is not None
            assert account.status is AccountStatus.ACTIVE
            assert account.access_token == token_set(clock, "2").access_token
            kinds = [event.kind for event in await b.events("acme")]
            assert EventKind.REFRESH_FAILED not in kinds
            assert EventKind.NEEDS_REAUTH not in kinds
            [(owner,)] = raw_query(db_path, "SELECT refresh_owner FROM accounts")
            assert owner is None

    async def test_a_write_after_a_reconnect_is_a_conflict_not_a_lost_lease(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A failure reported for a row that was connected again meanwhile is a plain
        GenerationConflict (what the error says: the account changed), not LeaseLost."""
        await create_database(db_path, clock, key)
        async with make_store(db_path, clock, key) as store:
            await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with store.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                await store.save_tokens("acme", token_set(clock, "2"), EventKind.CONNECTED)
                with pytest.raises(GenerationConflict) as info:
                    await locked.record_failure("timed out")
                assert not isinstance(info.value, LeaseLost)


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

    async def test_non_blob_column_is_corrupt(
        self, store: SQLiteStore, clock: FakeClock, db_path: Path
    ) -> None:
        """A token column holding text instead of bytes raises CorruptRecordError."""
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        raw_execute(db_path, "UPDATE accounts SET access_token = 'plain text'")
        with pytest.raises(CorruptRecordError, match="acme"):
            await store.get_account("acme")


class TestAuthStates:
    async def test_state_stored_only_as_hash(self, store: SQLiteStore, db_path: Path) -> None:
        """The database file holds sha256(state), never the state or the verifier in clear."""
        state, verifier = "state-CANARY-55aa66bb", "verifier-CANARY-77cc88dd"
        await store.create_state(state, "acme", Secret(verifier), "sess-1", STATE_TTL)
        rows = raw_query(db_path, "SELECT state_hash FROM auth_states")
        assert [r[0] for r in rows] == [hashlib.sha256(state.encode()).hexdigest()]
        assert_absent(db_bytes(db_path), state, verifier)


class TestChangeHint:
    async def test_list_clients_sees_a_removal_while_another_read_holds_a_snapshot(
        self, store: SQLiteStore, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A statement still open on the shared reader (a listing part-way through) pins
        its snapshot for every statement on that connection; list_clients must still show
        a removal committed after the snapshot began, since change_hint has moved for it."""
        for slug in ("acme", "bravo", "carol"):
            await store.import_refresh_token(slug, Secret(f"refresh-{slug}"))
        await store.add_client(make_record("tool", new_key(), (), False, clock.now()))
        async with make_store(db_path, clock, key) as other:
            hint = store.change_hint()
            async with store.conn.execute("SELECT slug FROM accounts") as held:
                assert await held.fetchone() is not None  # the statement is still open
                assert await other.remove_client("tool")
                assert store.change_hint() != hint
                assert await store.list_clients() == []

    async def test_the_probe_holds_no_read_transaction(
        self, store: SQLiteStore, db_path: Path
    ) -> None:
        """Reading the hint leaves no snapshot open: a checkpoint that truncates the WAL
        (which must wait for every reader) completes right after it."""
        await store.add_client(make_record("tool", new_key(), (), False, 0.0))
        store.change_hint()
        busy, _log, _done = raw_query(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")[0]
        assert busy == 0
        assert (db_path.parent / (db_path.name + "-wal")).stat().st_size == 0

    async def test_a_failing_probe_reads_unsure_warns_once_and_is_opened_again(
        self, store: SQLiteStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """When the probe cannot be read the hint is unsure (whoever follows it reloads every
        0.2 s) and one warning says so; a probe that could not be opened is tried again."""
        assert store.change_hint() >= 0
        store._probe.close()  # type: ignore[union-attr]  # a probe that now fails
        with caplog.at_level(logging.WARNING, logger="nbgateway.store"):
            assert store.change_hint() < 0
            assert store.change_hint() < 0
        warnings = [r for r in caplog.records if "change count" in r.getMessage()]
        assert len(warnings) == 1
        store._probe = None  # as when opening it failed
        assert store.change_hint() >= 0  # opened again


async def test_an_sqlite_library_too_old_is_named_and_nothing_is_written(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python built against an SQLite older than the statements need (RETURNING: 3.35)
    is refused at open with both versions named, before any file is made."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    path = tmp_path / "gateway.db"
    with pytest.raises(StoreError, match=r"SQLite 3\.34\.1; nbgateway needs 3\.35\.0 or newer"):
        async with make_store(path, clock, generate_key()):
            pass
    assert not path.exists()


async def test_a_database_locked_by_another_process_at_open_is_unavailable(
    db_path: Path, clock: FakeClock, key: str
) -> None:
    """Another connection holding the lock while the store opens (a migration, a backup
    tool) is StoreUnavailable, a problem that passes (serve waits for it), not StoreError."""
    await create_database(db_path, clock, key)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable) as info:
            async with make_store(db_path, clock, key, busy_timeout=0.1):
                pass
        assert "locked" in str(info.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    async with make_store(db_path, clock, key):
        pass


async def test_writes_queued_behind_a_locked_database_share_one_busy_timeout(
    db_path: Path, clock: FakeClock, key: str
) -> None:
    """Another process holds the write lock: ten writes of this process started at once
    all fail within about one busy timeout, with the lock named (they queued for this
    process's turn and each then waited its own timeout: the tenth answered after ten,
    and a probe polling /readyz kept the queue full). Once the lock is gone, writes work."""
    await create_database(db_path, clock, key)
    busy = 0.5
    async with make_store(db_path, clock, key, busy_timeout=busy) as store:
        holder = sqlite3.connect(db_path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            loop = asyncio.get_running_loop()
            started = loop.time()

            async def write() -> float:
                with pytest.raises(StoreUnavailable, match="locked"):
                    await store.check_writable()
                return loop.time() - started

            waits = await asyncio.wait_for(asyncio.gather(*(write() for _ in range(10))), 60)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # A bound in busy timeouts, not in seconds: queued one after another it was ten.
        assert max(waits) < 4 * busy, waits
        await store.check_writable()


async def test_a_write_cancelled_while_waiting_for_the_lock_leaves_no_lock_behind(
    db_path: Path, clock: FakeClock, key: str
) -> None:
    """A write cancelled while its BEGIN waits for a lock another process holds (a health
    check's or a client's timeout) must not take the lock once it frees: the BEGIN kept
    running in the connection's thread, got the lock when the other process let go, and
    held it, so every other process read "database is locked" and this one's next write
    failed inside the stale transaction."""
    await create_database(db_path, clock, key)
    async with make_store(db_path, clock, key, busy_timeout=2.0) as store:
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await store.check_writable()
        holder.execute("ROLLBACK")  # the lock frees while the cancelled BEGIN still waits
        other = sqlite3.connect(db_path, isolation_level=None, timeout=10, check_same_thread=False)
        try:
            # Takes the lock at once, or after the abandoned writer let go of it.
            await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()
            holder.close()
        await store.check_writable()  # and this process writes on
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)


class TestTheLeaseAndClosing:
    async def test_a_live_holder_whose_release_failed_is_not_waited_for_as_stuck(
        self, db_path: Path, clock: FakeClock, key: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A's call went unanswered (its start stays in the row, no holder). B, of this
        host, takes the lock, backs off without a token call, and its release write fails
        (the database locked past the busy timeout). B's lease does not carry that start:
        once it lapses, A takes over instead of judging B, alive, stuck with a result and
        waiting for it in vain."""
        async with make_store(db_path, clock, key) as a, make_store(db_path, clock, key) as b:
            a.lease = b.lease = 0.5
            await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                sent = clock.now()
                await locked.record_failure("timed out", unanswered=True)
            original = sqlite_backend._Lease.release

            async def release(self: Any) -> None:
                if self._store is b:
                    raise StoreError("database gateway.db cannot be written: database is locked")
                await original(self)

            monkeypatch.setattr(sqlite_backend._Lease, "release", release)
            async with b.refresh_lock("acme") as backing_off:
                assert backing_off.unanswered_at == sent
            monkeypatch.setattr(sqlite_backend._Lease, "release", original)
            clock.advance(b.lease + 1)
            try:
                async with asyncio.timeout(5.0), a.refresh_lock("acme"):
                    pass
            except RefreshLockBusy as exc:
                pytest.fail(f"A waited for B's empty lease: {exc}")

    async def test_a_write_queued_while_closing_writes_nothing(
        self, db_path: Path, clock: FakeClock, key: str
    ) -> None:
        """A write waiting for the writer's turn when close() runs (a lease release, the
        audit row of a request finishing during shutdown) does not open a new writer
        once the store is closed: nothing lands, and no connection is left open."""
        await create_database(db_path, clock, key)
        store = make_store(db_path, clock, key)
        await store.open()
        inside = asyncio.Event()

        async def first() -> None:
            async with store._write() as conn:
                inside.set()
                await asyncio.sleep(0.3)
                await conn.execute("SELECT 1")

        w1 = asyncio.create_task(first())
        await inside.wait()
        w2 = asyncio.create_task(
            store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        )
        await asyncio.sleep(0.05)  # w2 waits for the writer
        await store.close()
        outcomes = await asyncio.gather(w1, w2, return_exceptions=True)
        assert isinstance(outcomes[1], StoreError)
        leaked = store._writer is not None
        if leaked:
            await store._writer.close()  # type: ignore[union-attr]
        async with make_store(db_path, clock, key) as again:
            landed = await again.get_account("acme") is not None
        assert (leaked, landed) == (False, False)
