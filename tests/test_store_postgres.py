"""PostgreSQL-only tests of the token store, on a real server the tests start (pgserver.py):
the password kept out of descriptions and errors, migrations (newer schema, replicas
starting together), bounded lock waits, a cancelled waiter, and the server going away and
coming back under an open store. The behaviour both backends share is in store_contract.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time

import asyncpg
import pytest
from pgserver import PgServer
from procs import eventually

from nbgateway.clock import FakeClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.errors import StoreError, StoreUnavailable
from nbgateway.models import AuditEntry, EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.store import make_store
from nbgateway.store.base import UNSURE_HINT_INTERVAL, SecretListener
from nbgateway.store.pgconn import LISTENER_NAME, lasting, split_password
from nbgateway.store.postgres import SCHEMA_VERSION, PostgresStore

PASSWORD = "pw-CANARY-5e6f7a8b"
PROMPTLY = 15.0  # the listener's reconnect backoff is capped at 5 s


def token_set(clock: FakeClock, label: str) -> TokenSet:
    return TokenSet(
        access_token=Secret(f"access-CANARY-{label}"),
        refresh_token=Secret(f"refresh-CANARY-{label}"),
        expires_at=clock.now() + 3600,
        scope="default",
    )


@pytest.fixture
def key() -> str:
    return generate_key()


def open_store(
    url: str, clock: FakeClock, key: str, on_secret: SecretListener | None = None
) -> PostgresStore:
    """The store `make_store` picks for a postgresql:// URL (not yet opened)."""
    store = make_store(url, Cipher([Secret(key)]), clock, on_secret=on_secret)
    assert isinstance(store, PostgresStore)
    return store


async def fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_split_password() -> None:
    """The URL shown in messages keeps user, hosts, database and options but no password."""
    assert split_password(f"postgresql://gw:{PASSWORD}@db1:5432,db2/tokens?sslmode=require") == (
        "postgresql://gw@db1:5432,db2/tokens?sslmode=require",
        PASSWORD,
    )
    assert split_password(f"postgres://db/tokens?user=gw&password={PASSWORD}") == (
        "postgres://db/tokens?user=gw",
        PASSWORD,
    )
    assert split_password("postgresql://db/tokens") == ("postgresql://db/tokens", None)


def test_tls_refusals_are_lasting_and_outages_are_not() -> None:
    """What serve does not wait out: TLS the server refuses, a certificate that fails."""
    assert lasting(ConnectionError('PostgreSQL server at "db:5432" rejected SSL upgrade'))
    assert lasting(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert not lasting(ConnectionRefusedError(111, "Connect call failed"))
    assert not lasting(TimeoutError())
    assert not lasting(ConnectionResetError(104, "Connection reset by peer"))
    assert lasting(ssl.SSLError(9, "[X509: NO_CERTIFICATE_OR_CRL_FOUND]"))
    assert not lasting(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))


async def test_password_stays_out_of_descriptions_and_errors(
    pg_own_server: PgServer, clock: FakeClock, key: str
) -> None:
    """With a password in NBGW_DATABASE, neither `description` nor the errors raised while
    the server is down contain it; the log redactor is told about it."""
    url = pg_own_server.url().replace("postgres@", f"postgres:{PASSWORD}@")
    told: list[tuple[str, str]] = []
    store = open_store(url, clock, key, on_secret=lambda s, slot: told.append((s.reveal(), slot)))
    assert PASSWORD not in store.description
    assert (PASSWORD, "database/password") in told
    async with store:
        pg_own_server.stop()
        for call in (store.ping(), store.get_account("acme"), store.check_writable()):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert PASSWORD not in str(info.value)
            assert store.description in str(info.value)
    with pytest.raises(StoreUnavailable) as info:
        async with store:
            pass
    assert PASSWORD not in str(info.value)


async def test_newer_schema_is_refused_without_change(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """A database from a newer nbgateway raises StoreError naming the version; nothing is
    written."""
    async with open_store(pg_url, clock, key) as store:
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
    await fetchval(pg_url, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError) as info:
        async with open_store(pg_url, clock, key):
            pass
    assert str(SCHEMA_VERSION + 1) in str(info.value)
    assert "upgrade" in str(info.value)
    assert await fetchval(pg_url, "SELECT version FROM schema_version") == SCHEMA_VERSION + 1
    assert await fetchval(pg_url, "SELECT count(*) FROM events") == 1


async def test_replicas_starting_together_migrate_once(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """Several stores opening one empty database at once all open; the schema is created
    once and records the current version."""
    stores = [open_store(pg_url, clock, key) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        for store in stores:
            assert await store.get_account("acme") is not None
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert await fetchval(pg_url, "SELECT count(*) FROM schema_version") == 1
    assert await fetchval(pg_url, "SELECT version FROM schema_version") == SCHEMA_VERSION


async def test_a_lock_granted_late_leaves_its_writes_the_full_time(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """The wait for an account's lock is bounded by lock_timeout (what is left of twice
    the lease, 1 s here); once granted (here after another holder kept it most of that
    time) the setting is reset, so the lock's own writes wait for a row lock (a connect
    committing) as long as any write may, not only as long as that bound."""
    async with open_store(pg_url, clock, key) as a, open_store(pg_url, clock, key) as b:
        await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        b.lease = 0.5
        granted, row_locked = asyncio.Event(), asyncio.Event()

        async def in_b() -> object:
            async with b.refresh_lock("acme") as locked:
                setting = await locked._conn.fetchval("SHOW lock_timeout")
                granted.set()
                await row_locked.wait()
                await locked.begin_refresh()  # waits for the row lock below
                await locked.record_failure("timed out")
                return setting

        async with a.refresh_lock("acme"):
            waiting = asyncio.create_task(in_b())
            await asyncio.sleep(0.8)  # b's wait of 1 s is nearly over
        await asyncio.wait_for(granted.wait(), 5)
        other = await asyncpg.connect(pg_url)
        try:
            async with other.transaction():
                await other.execute("SELECT 1 FROM accounts WHERE slug = 'acme' FOR UPDATE")
                row_locked.set()
                await asyncio.sleep(1.3)  # longer than b's bound on its lock wait
        finally:
            await other.close()
        assert await asyncio.wait_for(waiting, 10) == "0"
        [info] = await b.list_accounts()
        assert info.last_error == "timed out"


async def test_lock_wait_is_bounded(pg_url: str, clock: FakeClock, key: str) -> None:
    """Waiting for an account's lock held elsewhere ends with StoreUnavailable naming the
    account after twice the lease (shortened here)."""
    async with open_store(pg_url, clock, key) as a, open_store(pg_url, clock, key) as b:
        await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        b.lease = 0.25
        async with a.refresh_lock("acme"):
            with pytest.raises(StoreUnavailable, match="'acme'") as info:
                async with b.refresh_lock("acme"):
                    pass
        assert "too long" in str(info.value)
        async with b.refresh_lock("acme") as locked:  # free again afterwards
            assert (await locked.read()).generation == 1


@pytest.mark.parametrize("offset", [120.0, -120.0], ids=["clock-ahead", "clock-behind"])
async def test_a_lease_elsewhere_is_timed_on_the_database_clock(
    pg_url: str, key: str, offset: float
) -> None:
    """A marker left by a replica on another host is waited for until its deadline, on the
    database server's clock: a replica whose clock runs two minutes ahead does not take a
    live holder's refresh over (a second refresh with a spent token), and one whose clock
    runs behind does not wait past a deadline that has passed."""
    clock_a, clock_b = FakeClock(start=time.time()), FakeClock(start=time.time() + offset)
    async with open_store(pg_url, clock_a, key) as a, open_store(pg_url, clock_b, key) as b:
        await a.save_tokens("acme", token_set(clock_a, "1"), EventKind.CONNECTED)
        conn = await asyncpg.connect(pg_url)
        try:
            async with a.refresh_lock("acme") as locked:
                await locked.begin_refresh()
                marker = await conn.fetchrow(
                    "SELECT refresh_deadline, refresh_started_at FROM accounts"
                )
                assert marker is not None
            # A's session ended with its marker left, and A (on another host) may still run.
            await conn.execute(
                "UPDATE accounts SET refresh_owner = $1, refresh_deadline = $2, "
                "refresh_started_at = $3",
                "elsewhere.example/4026531836/4242.1/ab12cd",
                marker["refresh_deadline"],
                marker["refresh_started_at"],
            )

            async def claim() -> None:
                async with b.refresh_lock("acme"):
                    pass

            with pytest.raises(TimeoutError):  # its deadline has not passed
                await asyncio.wait_for(claim(), 0.5)
            await conn.execute(
                "UPDATE accounts SET refresh_deadline = extract(epoch FROM clock_timestamp()) - 1"
            )
            await asyncio.wait_for(claim(), 5)  # it has now
        finally:
            await conn.close()


async def test_a_role_that_may_not_write_every_table_is_named(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """check_writable (what `nbgateway check` and /readyz ask) fails naming the tables a
    role may read but not write (grants made before a migration added them), not only when
    the write probe's own table refuses."""
    async with open_store(pg_url, clock, key):
        pass  # the schema, made by its owner
    role = f"limited_{os.getpid()}"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        await conn.execute(f"GRANT INSERT, UPDATE, DELETE ON write_probe TO {role}")
        limited = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
        assert limited != pg_url
        async with open_store(limited, clock, key) as store:
            with pytest.raises(StoreError) as info:
                await store.check_writable()
        assert "clients" in str(info.value) and "accounts" in str(info.value)
        assert "write_probe" not in str(info.value)
    finally:
        await conn.execute(f"DROP OWNED BY {role}")  # its grants, in this database
        await conn.execute(f"DROP ROLE {role}")
        await conn.close()


async def test_cancelled_waiter_leaks_no_lock(pg_url: str, clock: FakeClock, key: str) -> None:
    """A task cancelled while waiting for a lock leaves nothing held: once the holder
    releases, a third party takes the lock."""
    async with open_store(pg_url, clock, key) as a, open_store(pg_url, clock, key) as b:
        await a.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        entered = asyncio.Event()

        async def wait_in_b() -> None:
            async with b.refresh_lock("acme"):
                entered.set()

        async with a.refresh_lock("acme"):
            waiter = asyncio.create_task(wait_in_b())
            queued = (
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            while not await fetchval(pg_url, queued):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.02)  # until B is queued for the lock
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert not entered.is_set()
        async with asyncio.timeout(PROMPTLY), a.refresh_lock("acme") as locked:
            assert (await locked.read()).generation == 1


async def test_server_down_and_back(pg_own_server: PgServer, clock: FakeClock, key: str) -> None:
    """While PostgreSQL is stopped reads, writes and locks raise StoreUnavailable and the
    change counter still answers; once it is back the same store works again without being
    reopened, nothing stored before is lost, and the change counter moves (the listener
    reconnected, so the token manager reloads)."""
    url = pg_own_server.url()
    async with open_store(url, clock, key) as store:
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        pg_own_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.get_account("acme")
        with pytest.raises(StoreUnavailable):
            await store.save_tokens("beta", token_set(clock, "b"), EventKind.CONNECTED)
        with pytest.raises(StoreUnavailable):
            async with store.refresh_lock("acme"):
                pass
        counter = await store.change_counter()
        pg_own_server.start()
        account = await store.get_account("acme")
        assert account is not None
        assert account.access_token == token_set(clock, "1").access_token
        async with store.refresh_lock("acme") as locked:
            await locked.begin_refresh()
            saved = await locked.save_tokens(token_set(clock, "2"))
        assert saved.generation == 2
        assert await store.get_account("beta") is None
        async with asyncio.timeout(PROMPTLY):
            while await store.change_counter() == counter:  # noqa: ASYNC110 - polled API
                await asyncio.sleep(0.05)


async def test_lost_listener_reconnects_and_bumps_the_counter(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """When the LISTEN connection is killed, the store reconnects it by itself and moves the
    change counter (notices may have been missed); later notices arrive again."""
    async with open_store(pg_url, clock, key) as store, open_store(pg_url, clock, key) as other:
        before = await store.change_counter()
        killed = await fetchval(
            pg_url,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE application_name = '{LISTENER_NAME}' AND datname = current_database()",
        )
        assert killed == 2  # one listener per store
        async with asyncio.timeout(PROMPTLY):
            while await store.change_counter() == before:  # noqa: ASYNC110 - polled API
                await asyncio.sleep(0.05)
        after_reconnect = await store.change_counter()
        await other.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with asyncio.timeout(PROMPTLY):
            while await store.change_counter() == after_reconnect:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_change_hint_is_unsure_while_the_listener_is_away(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """Notices sent while the LISTEN connection is down are lost, so meanwhile the change
    hint says it cannot tell: a value no reading takes, moving every 0.2 s (whoever follows
    it reloads at that pace); once reconnected it is a real reading again."""
    async with open_store(pg_url, clock, key) as store:
        assert store.change_hint() >= 0
        await fetchval(
            pg_url,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE application_name = '{LISTENER_NAME}' AND datname = current_database()",
        )
        async with asyncio.timeout(PROMPTLY):
            while store.change_hint() >= 0:  # noqa: ASYNC110 - polled API
                await asyncio.sleep(0.01)
        unsure = store.change_hint()  # no await from here on: the listener stays away
        assert store.change_hint() == unsure
        clock.advance(UNSURE_HINT_INTERVAL)
        assert store.change_hint() != unsure
        assert store.change_hint() < 0
        async with asyncio.timeout(PROMPTLY):
            while store.change_hint() < 0:  # noqa: ASYNC110 - polled API
                await asyncio.sleep(0.05)


async def test_a_marker_whose_holder_still_runs_is_waited_for_after_its_session_went(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """The advisory lock goes with its session: a database restart or a dropped lock
    connection releases it while the holder still runs, perhaps holding the rotated pair
    it could not store. Another store then waits (as on SQLite) instead of taking over
    with the spent refresh token; the holder stores its pair, and the waiter gets the
    lock on the stored result, with no interrupted refresh to report."""
    async with open_store(pg_url, clock, key) as holder, open_store(pg_url, clock, key) as other:
        await holder.save_tokens("acme", token_set(clock, "one"), EventKind.CONNECTED)
        async with holder.refresh_lock("acme") as lock:
            await lock.begin_refresh()
            generation = (await lock.read()).generation
            await fetchval(
                pg_url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted",
            )

        async def take() -> tuple[float | None, str]:
            async with other.refresh_lock("acme") as taken:
                account = await taken.read()
                assert account.refresh_token is not None
                return taken.interrupted_at, account.refresh_token.reveal()

        waiter = asyncio.create_task(take())
        await asyncio.sleep(0.3)  # it finds the marker of a holder that runs
        assert not waiter.done()
        async with holder.refresh_lock("acme") as again:  # the held pair, stored
            assert (await again.read()).generation == generation
            await again.save_tokens(token_set(clock, "two"))
        interrupted_at, refresh = await asyncio.wait_for(waiter, PROMPTLY)
        assert interrupted_at is None
        assert refresh == "refresh-CANARY-two"


async def test_change_hint_is_unsure_while_the_listener_stalls(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """A listener whose connection stays open but delivers nothing (a stalled backend, a
    half-open connection) counts as away as soon as its liveness check goes unanswered,
    not only when the connection is finally given up; then it is a real reading again."""
    async with open_store(pg_url, clock, key) as store:
        assert store.change_hint() >= 0
        pid = await fetchval(
            pg_url,
            "SELECT pid FROM pg_stat_activity "
            f"WHERE application_name = '{LISTENER_NAME}' AND datname = current_database()",
        )
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(PROMPTLY):
                while store.change_hint() >= 0:  # noqa: ASYNC110 - polled API
                    await asyncio.sleep(0.02)
        finally:
            os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(PROMPTLY):
            while store.change_hint() < 0:  # noqa: ASYNC110 - polled API
                await asyncio.sleep(0.05)


async def test_a_lock_connection_closed_by_the_server_is_named_as_lost(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """The server ends the refresh lock's session (a restart, pg_terminate_backend) while a
    refresh holds it: storing the new pair raises StoreUnavailable saying the connection
    was lost (not only asyncpg's "released back to the pool"); the stored row is unchanged and
    the account can be locked and written again afterwards."""
    async with open_store(pg_url, clock, key) as store:
        await store.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        async with store.refresh_lock("acme") as lock:
            await lock.begin_refresh()
            await fetchval(
                pg_url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND state IS NOT NULL",
            )
            await asyncio.sleep(0.2)  # the client notices the closed socket
            with pytest.raises(StoreUnavailable) as info:
                await lock.save_tokens(token_set(clock, "2"))
        message = str(info.value)
        assert "the connection to the database was lost (cannot call" in message
        stored = await store.get_account("acme")
        assert stored is not None and stored.refresh_token == token_set(clock, "1").refresh_token
        async with store.refresh_lock("acme") as lock:
            saved = await lock.save_tokens(token_set(clock, "3"))
        assert saved.refresh_token == token_set(clock, "3").refresh_token


def test_a_transaction_cut_short_by_the_server_is_named_as_a_lost_connection(
    clock: FakeClock, key: str
) -> None:
    """asyncpg's words for a transaction whose connection the server closed (a stop in the
    middle of rotate-key) become "the connection to the database was lost", as for a
    pooled connection closed under its holder; the password never appears."""
    store = PostgresStore(
        "postgresql://gw:s3cret-pw@127.0.0.1:1/nbgw", Cipher([Secret(key)]), clock
    )
    closed = "cannot call Transaction.__aexit__(): the underlying connection is closed"
    with pytest.raises(StoreUnavailable) as info, store._errors("cannot be written"):
        raise asyncpg.exceptions.InterfaceError(closed)
    message = str(info.value)
    assert f"cannot be written: the connection to the database was lost ({closed})" in message
    assert "s3cret-pw" not in message


async def test_a_large_audit_trail_is_copied_within_the_time_its_rows_need(
    pg_server: PgServer, pg_url: str, clock: FakeClock, key: str
) -> None:
    """`load` (migrate) gives each table's copy time for its rows on top of the command
    timeout: 20,000 audit entries load into a store whose every other command must finish
    within 0.3 s (a 90-day trail can hold millions of rows)."""
    entries = [
        AuditEntry(clock.now(), "tool", "acme", "POST", f"/api/v2/signups/{n}", 201, f"r{n}")
        for n in range(20_000)
    ]
    async with open_store(pg_url, clock, key) as source:
        await source.save_tokens("acme", token_set(clock, "1"), EventKind.CONNECTED)
        await source.record_audit(entries, 0.0)
        dump = await source.dump()
    assert len(dump.audit) == 20_000
    target_url = pg_server.create_database()
    async with open_store(target_url, clock, key):
        pass  # created and migrated with the usual timeout
    store = PostgresStore(target_url, Cipher([Secret(key)]), clock, command_timeout=0.3)
    async with store as target:
        await target.load(dump)
    async with open_store(target_url, clock, key) as check:  # read back at the usual timeout
        assert len((await check.dump()).audit) == 20_000


async def test_a_statement_held_by_a_table_lock_names_the_lock(
    pg_url: str, clock: FakeClock, key: str
) -> None:
    """A statement past the command timeout because another session holds a lock on the
    gateway's tables (LOCK TABLE, a long transaction) is StoreUnavailable that names a
    lock as a cause, with where to look: "not reachable: TimeoutError" sent operators to
    the network while the server was answering."""
    store = PostgresStore(pg_url, Cipher([Secret(key)]), clock, command_timeout=0.3)
    async with store:
        holder = await asyncpg.connect(pg_url)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(StoreUnavailable) as info:
                    await store.ping()
        finally:
            await holder.close()
        assert "pg_locks" in str(info.value)
        assert "no answer within 0.3 s" in str(info.value)
        await store.ping()


async def _waiting(conn: asyncpg.Connection, sessions: int) -> bool:
    """Whether `sessions` sessions wait for a lock."""
    return int(await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted")) >= sessions


@pytest.mark.parametrize("holder_ends", ["rollback", "commit"])
async def test_a_connect_racing_a_removal_starts_above_the_removed_row(
    pg_url: str, clock: FakeClock, key: str, holder_ends: str
) -> None:
    """One replica removes a nation while another connects it again, and both wait on the
    row (held by a third session: a refresh committing its pair, or giving up). PostgreSQL
    reads at READ COMMITTED: the connect's generation must be computed after the removal
    committed, and the removal must record the generation the row had when it was
    deleted (one on, when the holder committed a refresh), so the new row starts above
    every generation an in-flight operation of the removed row may hold."""
    async with open_store(pg_url, clock, key) as a, open_store(pg_url, clock, key) as b:
        old = await a.save_tokens("race", token_set(clock, "1"), EventKind.CONNECTED)
        holder = await asyncpg.connect(pg_url)
        watcher = await asyncpg.connect(pg_url)
        try:
            tx = holder.transaction()
            await tx.start()
            # What a refresh's save does: the row locked, its generation moved on.
            await holder.execute(
                "UPDATE accounts SET generation = generation + 1 WHERE slug = 'race'"
            )
            remove = asyncio.create_task(a.remove_account("race"))
            await eventually(lambda: _waiting(watcher, 1), "the removal to wait", PROMPTLY)
            connect = asyncio.create_task(
                b.save_tokens("race", token_set(clock, "2"), EventKind.CONNECTED)
            )
            await eventually(lambda: _waiting(watcher, 2), "the connect to wait", PROMPTLY)
            await (tx.commit() if holder_ends == "commit" else tx.rollback())
            assert await remove is True
            new = await connect
        finally:
            await holder.close()
            await watcher.close()
        last_old = old.generation + (1 if holder_ends == "commit" else 0)
        assert new.generation > last_old
        stored = await b.get_account("race")
        assert stored is not None and stored.generation == new.generation
        assert stored.refresh_token == new.refresh_token
