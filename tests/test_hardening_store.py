"""The store under bad conditions, through the real gateway, admin surfaces and CLI.

Issue 8, point 16 (the store's parts): an immutable database is reported as unwritable, not
as unreadable credentials; a corrupt row is listed as unreadable (never as active with no
error) and does not hide the other accounts; one corrupt row does not stop `rotate-key`;
pending authorizations are capped and expire; a foreign session hitting the callback does
not burn the admin's authorization. Issue 9, point 5 (admin state in the store): with a
database that cannot be written, a logout still ends the session in this process and wrong
admin tokens still count here, each with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_admin_pages
from aiohttp import web
from conftest import (
    ADMIN_TOKEN,
    CLIENT_ID,
    CLIENT_SECRET,
    ConnectAccount,
    Gateway,
    GatewayFactory,
    SettingsFactory,
)
from procs import (
    clean_os_environ,
    corrupt_refresh_token,
    create_database_elsewhere,
    gateway_env,
    raw_execute,
    raw_query,
    run_command,
)
from test_admin_pages import BrowserFactory, consent, start
from yarl import URL

from nbgateway import keys
from nbgateway import store as store_package
from nbgateway.accounts import STATE_TTL
from nbgateway.admin.core import SESSION_COOKIE
from nbgateway.admin.session import LOGIN_FAILURES
from nbgateway.clock import FakeClock
from nbgateway.config import Settings
from nbgateway.crypto import Cipher, generate_key
from nbgateway.errors import AuthorizationFailed, StoreError
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import AccountStatus, AuditEntry, EventKind, TokenSet
from nbgateway.proxy import CLIENT_KEY_HEADER, STORE_ERROR_LOG_EVERY
from nbgateway.redact import Secret
from nbgateway.store.base import STATES_KEPT
from nbgateway.store.sqlite import SQLiteStore


def token_set(clock: FakeClock, label: str) -> TokenSet:
    return TokenSet(
        access_token=Secret(f"access-CANARY-{label}-0123456789"),
        refresh_token=Secret(f"refresh-CANARY-{label}-0123456789"),
        expires_at=clock.now() + 3600,
        scope="default",
    )


# The admin pages' browser fixture (separate cookie stores against the test gateway).
browsers = test_admin_pages.browsers

ME = "/api/v2/signups/me"
LIFETIME = 86400.0
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def created_elsewhere(settings: Settings) -> Path:
    """Create and migrate the settings' database in another process, so this one holds
    no connection opened before the file is made unwritable: SQLite may reuse an open
    file descriptor, writable from before, for a later connection."""
    path = settings.database
    assert isinstance(path, Path)
    create_database_elsewhere(
        {
            **clean_os_environ(),
            **gateway_env(path, ADMIN_TOKEN, key=settings.encryption_keys[0].reveal()),
        }
    )
    return path


def database_of(gw: Gateway) -> Path:
    path = gw.settings.database
    assert isinstance(path, Path)
    return path


def chattr(flag: str, path: Path) -> bool:
    """Set or clear a file attribute (+i: immutable, even for root); False if unsupported."""
    done = run_command(["chattr", flag, str(path)])
    return done.returncode == 0


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    if not chattr("+i", path):
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        yield
    finally:
        assert chattr("-i", path)


def cli(gw: Gateway, key: str, *argv: str) -> Any:
    """Run `nbgateway ARGV` on the gateway's database with NBGW_ENCRYPTION_KEY=key."""
    env = {**clean_os_environ(), **gateway_env(database_of(gw), ADMIN_TOKEN, key=key)}
    return run_command([sys.executable, "-m", "nbgateway", *argv], env=env)


async def api_accounts(gw: Gateway) -> dict[str, dict[str, Any]]:
    resp = await gw.client.get("/connect/api/accounts", headers=AUTH)
    assert resp.status == 200, await resp.text()
    return {a["slug"]: a for a in (await resp.json())["accounts"]}


# ---------------------------------------------------------------------- immutable database


@contextlib.asynccontextmanager
async def expired_on_an_immutable_database(
    gateway_factory: GatewayFactory, connect_account: ConnectAccount, clock: FakeClock
) -> AsyncIterator[Gateway]:
    """A gateway whose database file was made immutable after "acme" was connected (by
    another gateway), with acme's access token expired."""
    first = await gateway_factory()
    await connect_account(first, "acme")
    path = database_of(first)
    await first.client.close()
    with immutable(path):
        gw = await gateway_factory(first.settings)
        clock.advance(LIFETIME)
        yield gw


class TestImmutableDatabase:
    async def test_is_reported_as_unwritable_not_as_unreadable_credentials(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A gateway on an immutable database file: a request that needs a refresh, and an
        admin refresh, get 503 store_unavailable (the database cannot be written), the log
        says so, nothing claims the stored credentials are unreadable; /readyz is 503."""
        async with expired_on_an_immutable_database(gateway_factory, connect_account, clock) as gw:
            with caplog.at_level(logging.ERROR, logger="nbgateway"):
                resp = await gw.client.get(ME)
                body = await resp.text()
                admin = await gw.client.post("/connect/api/accounts/acme/refresh", headers=AUTH)
                admin_body = await admin.text()
                ready = await gw.client.get("/readyz")
        assert resp.status == 503, body
        assert resp.headers["X-NBGW-Error"] == "store_unavailable"
        assert admin.status == 503, admin_body
        assert admin.headers["X-NBGW-Error"] == "store_unavailable"
        assert ready.status == 503
        messages = [r.getMessage() for r in caplog.records]
        assert "token store unavailable" in messages
        assert not any("unreadable" in m for m in messages)
        assert "cannot be read" not in body + admin_body

    async def test_an_outage_is_logged_once_per_interval_not_once_per_request(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Every request that needs the store while it cannot be written gets its 503 (and
        its access line), but the error line is written once per STORE_ERROR_LOG_EVERY,
        the next one saying how many were left out: an outage under load wrote one error
        line per request."""
        async with expired_on_an_immutable_database(gateway_factory, connect_account, clock) as gw:
            with caplog.at_level(logging.ERROR, logger="nbgateway"):
                statuses = [(await gw.client.get(ME)).status for _ in range(4)]
                logged_first = [r for r in caplog.records if r.msg == "token store unavailable"]
                clock.advance(STORE_ERROR_LOG_EVERY)
                statuses.append((await gw.client.get(ME)).status)
        assert statuses == [503] * 5
        assert len(logged_first) == 1
        lines = [r for r in caplog.records if r.msg == "token store unavailable"]
        assert len(lines) == 2
        assert lines[1].left_out == 3  # type: ignore[attr-defined]


class TestAdminStateOnAnUnwritableDatabase:
    async def test_logout_clears_the_cookie_and_is_kept_in_this_process(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        browsers: BrowserFactory,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A logout the store cannot take still clears the cookie and ends the session in
        this process; the warning says so and holds no session id."""
        settings = settings_factory()
        path = created_elsewhere(settings)
        with immutable(path):
            gw = await gateway_factory(settings)
            admin = await browsers(gw)
            old = dict(admin.cookies)
            sid = old[SESSION_COOKIE].split(".")[0]
            with caplog.at_level(logging.WARNING, logger="nbgateway"):
                status, _, headers = await admin.submit("/connect/logout")
            assert status == 303
            assert headers["Location"] == "/connect/login"
            assert SESSION_COOKIE not in admin.cookies
            admin.cookies = old
            status, _, headers = await admin.get("/connect")
            assert (status, headers["Location"]) == (303, "/connect/login")
        messages = [r.getMessage() for r in caplog.records]
        assert any("logout remembered by this process only" in m for m in messages)
        assert not any(sid in repr(r.__dict__) for r in caplog.records)

    async def test_wrong_tokens_still_count_in_this_process(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Wrong admin tokens the store cannot take are counted in this process: after
        LOGIN_FAILURES of them the right token gets 429, and the log says why."""
        settings = settings_factory()
        path = created_elsewhere(settings)
        with immutable(path):
            gw = await gateway_factory(settings)
            wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
            with caplog.at_level(logging.WARNING, logger="nbgateway"):
                for _ in range(LOGIN_FAILURES):
                    resp = await gw.client.get("/connect/api/accounts", headers=wrong)
                    assert resp.status == 401
            resp = await gw.client.get("/connect/api/accounts", headers=AUTH)
            assert resp.status == 429
            assert resp.headers["X-NBGW-Error"] == "too_many_attempts"
            form = await gw.client.post(
                "/connect/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
            )
            assert form.status == 429
        messages = [r.getMessage() for r in caplog.records]
        assert any("counted in this process only" in m for m in messages)


# ---------------------------------------------------------------------- corrupt rows


class TestCorruptRows:
    async def test_undecryptable_row_is_listed_as_unreadable_with_its_error(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        browsers: BrowserFactory,
        encryption_key: str,
    ) -> None:
        """A row whose refresh token fails authentication is shown as unreadable with the
        problem, in the admin API, the /connect page and `accounts list --json`; the other
        account stays active with no error."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        corrupt_refresh_token(database_of(gateway), "acme")

        listed = await api_accounts(gateway)
        assert listed["acme"]["status"] == "unreadable"
        assert "cannot be read" in listed["acme"]["last_error"]
        assert listed["beta"]["status"] == "active"
        assert listed["beta"]["last_error"] is None

        status, page, _ = await (await browsers()).get("/connect")
        assert status == 200
        assert "stored credentials unreadable" in page

        done = await asyncio.to_thread(cli, gateway, encryption_key, "accounts", "list", "--json")
        assert done.returncode == 0, done.stderr
        rows = {r["slug"]: r for r in json.loads(done.stdout)}
        assert rows["acme"]["status"] == "unreadable"
        assert rows["beta"]["status"] == "active"
        assert "nbfake-" not in done.stdout + done.stderr

    async def test_the_listing_reads_every_account_at_once(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Listing many nations (every admin page) checks their rows in one query, never
        one read per account: get_account is not called, the damaged row is still found."""
        for i in range(12):
            await connect_account(gateway, f"nation-{i}")
        corrupt_refresh_token(database_of(gateway), "nation-7")

        def per_account(*_args: object) -> None:
            raise AssertionError("the listing must not read accounts one by one")

        monkeypatch.setattr(gateway.store, "get_account", per_account)
        listed = await api_accounts(gateway)
        assert len(listed) == 12
        assert [s for s, a in listed.items() if a["status"] == "unreadable"] == ["nation-7"]
        assert (await gateway.accounts.get("nation-7")).status.value == "unreadable"
        assert (await gateway.accounts.get("nation-3")).status.value == "active"

    async def test_row_with_an_unknown_status_does_not_hide_the_others(
        self, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """A row whose status column holds nonsense is listed as unreadable; the listing of
        every other account, and the token manager's sync, keep working."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        raw_execute(
            database_of(gateway), "UPDATE accounts SET status = 'zombie' WHERE slug = ?", ("acme",)
        )
        await gateway.tokens.sync(force=True)
        listed = await api_accounts(gateway)
        assert listed["acme"]["status"] == "unreadable"
        assert "unknown status" in listed["acme"]["last_error"]
        assert listed["beta"]["status"] == "active"
        resp = await gateway.client.get(f"/n/beta{ME}")
        assert resp.status == 200
        assert [i.slug for i in await gateway.store.list_accounts()] == ["acme", "beta"]
        assert (await gateway.store.list_accounts())[0].status is AccountStatus.UNREADABLE

    @pytest.mark.parametrize(
        "value", ["'abc'", "X'FF00'", "9e999", "1.5"], ids=["text", "blob", "huge", "fraction"]
    )
    async def test_a_generation_that_is_no_number_leaves_only_that_row_unreadable(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        browsers: BrowserFactory,
        encryption_key: str,
        caplog: pytest.LogCaptureFixture,
        value: str,
    ) -> None:
        """A hand-edited generation cell: the listing (admin API and pages) shows that account
        unreadable and the rest as they are, its proxied requests get a clear error without
        a traceback, and `check` names it in one problem line."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        raw_execute(
            database_of(gateway),
            f"UPDATE accounts SET generation = {value} WHERE slug = ?",
            ("acme",),
        )
        gateway.tokens.invalidate("acme")
        listed = await api_accounts(gateway)
        assert listed["acme"]["status"] == "unreadable", listed["acme"]
        assert listed["beta"]["status"] == "active"
        assert (await (await browsers()).get("/connect"))[0] == 200
        with caplog.at_level(logging.INFO):
            resp = await gateway.client.get(f"/n/acme{ME}")
        assert resp.status == 500
        assert resp.headers["X-NBGW-Error"] == "token_store_error"
        assert not any(r.exc_info for r in caplog.records)
        assert (await gateway.client.get(f"/n/beta{ME}")).status == 200

        done = await asyncio.to_thread(cli, gateway, encryption_key, "check")
        assert done.returncode == 1, done.stdout + done.stderr
        problems = [line for line in done.stderr.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1 and "acme" in problems[0], done.stderr
        assert "Traceback" not in done.stderr

    async def test_rotate_key_skips_and_names_a_corrupt_row(
        self, gateway: Gateway, connect_account: ConnectAccount, encryption_key: str
    ) -> None:
        """`rotate-key` with one corrupt row re-encrypts the others, names the skipped one on
        stderr and exits non-zero; afterwards the new key alone opens the good row."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        corrupt_refresh_token(database_of(gateway), "acme")
        new = generate_key()
        done = await asyncio.to_thread(cli, gateway, f"{new},{encryption_key}", "rotate-key")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "re-encrypted 1 account(s)" in done.stdout
        assert "'acme'" in done.stderr
        assert "'beta'" not in done.stderr
        with contextlib.closing(sqlite3.connect(database_of(gateway))) as conn:
            blobs = dict(conn.execute("SELECT slug, refresh_token FROM accounts").fetchall())
        assert blobs["beta"][1:5].hex() == Cipher([Secret(new)]).primary_key_id
        assert blobs["acme"][1:5].hex() == Cipher([Secret(encryption_key)]).primary_key_id
        checked = await asyncio.to_thread(cli, gateway, f"{new},{encryption_key}", "check")
        assert checked.returncode == 1
        assert "'acme'" in checked.stderr and "'beta'" not in checked.stderr


# ---------------------------------------------------------------------- authorization states


def state_of(url: str) -> str:
    return URL(url).query["state"]


async def pending_states(gw: Gateway) -> int:
    def count() -> int:
        with contextlib.closing(sqlite3.connect(database_of(gw))) as conn:
            (n,) = conn.execute("SELECT count(*) FROM auth_states").fetchone()
            return int(n)

    return await asyncio.to_thread(count)


class TestCorruptClientAndAuditRows:
    """SQLite does not enforce column types: a hand-edited or damaged row in `clients` or
    `audit` must neither stop the gateway nor hide the other rows, and `check` names it."""

    async def test_a_corrupt_client_key_row_is_left_out_and_named_by_check(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        encryption_key: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A gateway starts on the database (the keys.sync at start-up does not fail), the
        good key works, the damaged one is refused (fail closed) and stays stored; `check`
        exits 1 naming the row; `clients list` lists the good one; a wrong `at` or `status`
        in the audit trail does the same for `audit`."""
        first = await gateway_factory(client_auth="required")
        await connect_account(first, "acme")
        _, good = await first.app[keys.CLIENTS].add("good-tool")
        _, bad = await first.app[keys.CLIENTS].add("bad-tool")
        headers = {CLIENT_KEY_HEADER: good.reveal()}
        assert (await first.client.get(f"/n/acme{ME}", headers=headers)).status == 200
        write = await first.client.post("/n/acme/api/v2/signups", json={}, headers=headers)
        await write.read()  # a write: one audit entry
        await first.app[keys.CLIENTS].flush(force=True)
        assert len(await first.store.audit()) == 1
        path = database_of(first)
        await first.client.close()
        raw_execute(path, "UPDATE clients SET created_at = 'x' WHERE name = 'bad-tool'")
        raw_execute(path, "UPDATE audit SET status = 'x'")

        with caplog.at_level(logging.ERROR, logger="nbgateway.store"):
            gw = await gateway_factory(first.settings)
        assert (await gw.client.get(f"/n/acme{ME}", headers=headers)).status == 200
        refused = await gw.client.get(f"/n/acme{ME}", headers={CLIENT_KEY_HEADER: bad.reveal()})
        assert refused.status == 401
        assert refused.headers["X-NBGW-Error"] == "client_key_invalid"
        assert "a stored client key row cannot be read; left out" in caplog.messages

        check = await asyncio.to_thread(cli, gw, encryption_key, "check")
        assert check.returncode == 1, check.stdout + check.stderr
        assert "created_at of client key 'bad-tool' is not a number" in check.stdout + check.stderr
        assert "status of audit entry" in check.stdout + check.stderr
        listed = await asyncio.to_thread(cli, gw, encryption_key, "clients", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [c["name"] for c in json.loads(listed.stdout)] == ["good-tool"]
        audit = await asyncio.to_thread(cli, gw, encryption_key, "audit")
        assert audit.returncode == 0, audit.stderr
        assert "Traceback" not in audit.stderr + listed.stderr + check.stderr
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT count(*) FROM clients").fetchone() == (2,)


class TestPendingAuthorizations:
    async def test_are_capped_oldest_first(
        self, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """More started authorizations than STATES_KEPT: at most STATES_KEPT stay pending,
        the oldest is refused at the callback, the newest still completes."""
        urls = [await gateway.accounts.start_connect("acme") for _ in range(STATES_KEPT + 5)]
        assert await pending_states(gateway) == STATES_KEPT

        oldest = await gateway.client.get(await consent(fake_nb, urls[0], "approve"))
        assert oldest.status == 400
        assert "unknown" in await oldest.text()
        newest = await gateway.client.get(await consent(fake_nb, urls[-1], "approve"))
        assert newest.status == 200, await newest.text()
        assert [i.slug for i in await gateway.accounts.list_accounts()] == ["acme"]

    async def test_expire_and_are_purged(
        self, gateway: Gateway, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """A pending authorization older than its TTL is refused and purged by the next."""
        url = await gateway.accounts.start_connect("acme")
        callback = await consent(fake_nb, url, "approve")
        clock.advance(STATE_TTL + 1)
        await gateway.accounts.start_connect("beta")
        assert await pending_states(gateway) == 1
        resp = await gateway.client.get(callback)
        assert resp.status == 400
        assert await gateway.accounts.list_accounts() == []

    async def test_foreign_session_at_the_callback_does_not_burn_the_admins_state(
        self, gateway: Gateway, browsers: BrowserFactory, fake_nb: FakeNationBuilder
    ) -> None:
        """Another browser (logged in or not) opening the admin's callback URL is refused,
        and the admin's own browser then completes the same authorization."""
        admin, other, anon = await browsers(), await browsers(), await browsers(logged_in=False)
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        for foreign in (other, anon):
            status, text, _ = await foreign.get(callback)
            assert status == 400
            assert "another session" in text
        assert await gateway.accounts.list_accounts() == []
        status, text, _ = await admin.get(callback)
        assert status == 303, text  # connected: back to the accounts page
        assert [i.slug for i in await gateway.accounts.list_accounts()] == ["acme"]


class TestCellsThatAreNotUtf8:
    """A hand-edited cell holding TEXT that is not UTF-8 (SQLite accepts it; PostgreSQL's
    typed columns cannot hold it): only its row is unreadable."""

    @pytest.mark.parametrize("column", ["access_token", "last_error", "scope"])
    async def test_only_that_row_is_unreadable(
        self, gateway: Gateway, connect_account: ConnectAccount, encryption_key: str, column: str
    ) -> None:
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        raw_execute(
            database_of(gateway),
            f"UPDATE accounts SET {column} = CAST(X'C3FFAB' AS TEXT) WHERE slug = ?",
            ("acme",),
        )
        await gateway.tokens.sync(force=True)
        listed = await api_accounts(gateway)
        assert listed["acme"]["status"] == "unreadable", listed["acme"]
        assert listed["beta"]["status"] == "active"
        resp = await gateway.client.get(f"/n/beta{ME}")
        assert resp.status == 200

        done = await asyncio.to_thread(cli, gateway, encryption_key, "check")
        assert done.returncode == 1, done.stdout + done.stderr
        [problem] = [line for line in done.stderr.splitlines() if line.startswith("problem:")]
        assert "acme" in problem
        assert "beta" not in problem

    @pytest.mark.parametrize(
        "change",
        ["detail = CAST(X'C3FFAB' AS TEXT)", "kind = 'bogus'"],
        ids=["detail-not-utf8", "unknown-kind"],
    )
    async def test_a_damaged_event_is_left_out_and_named(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        browsers: BrowserFactory,
        encryption_key: str,
        change: str,
    ) -> None:
        """One damaged event row: the nation's page and the event lists show the others,
        and `check` names the row."""
        await connect_account(gateway, "acme")
        await gateway.accounts.refresh("acme")
        [(first,)] = raw_query(database_of(gateway), "SELECT min(id) FROM events")
        raw_execute(database_of(gateway), f"UPDATE events SET {change} WHERE id = ?", (first,))

        kinds = [e.kind for e in await gateway.accounts.events("acme")]
        assert kinds == [EventKind.REFRESHED]
        browser = await browsers()
        await browser.login()
        status, page, _ = await browser.get("/connect/nations/acme")
        assert status == 200
        assert "acme" in page

        done = await asyncio.to_thread(cli, gateway, encryption_key, "check")
        assert done.returncode == 1, done.stdout + done.stderr
        [problem] = [line for line in done.stderr.splitlines() if line.startswith("problem:")]
        assert f"event {first}" in problem


@pytest.mark.parametrize("table", ["events", "audit"])
async def test_every_sqlite_read_of_a_damaged_table_is_the_stores_error(
    table: str, tmp_path: Path, clock: FakeClock
) -> None:
    """A table whose pages are garbage: events(), audit(), verify() and dump() each raise
    the store's "is damaged" error (what the admin pages, the API and the CLI turn into a
    message), not sqlite3's own."""
    key = generate_key()
    path = tmp_path / "gateway.db"
    entries = [
        AuditEntry(clock.now(), "tool", "acme", "POST", f"/api/v2/signups/{n}", 201, f"r{n}")
        for n in range(300)
    ]
    async with SQLiteStore(path, Cipher([Secret(key)]), clock) as store:
        for n in range(300):
            await store.save_tokens(f"n{n}", token_set(clock, str(n)), EventKind.CONNECTED)
        await store.record_audit(entries, 0.0)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = dict(conn.execute("SELECT name, rootpage FROM sqlite_master"))[table]
    with path.open("r+b") as f:
        f.seek((root - 1) * 4096)
        f.write(b"\xff" * 4096)
    async with SQLiteStore(path, Cipher([Secret(key)]), clock) as store:
        reads: dict[str, Callable[[], Awaitable[object]]] = {
            "events": store.events,
            "audit": store.audit,
            "verify": store.verify,
            "dump": store.dump,
        }
        for name in (table, "verify", "dump"):
            with pytest.raises(StoreError, match="is damaged"):
                await reads[name]()


class TestLockedDatabaseDuringARefresh:
    async def test_a_request_joining_a_background_refresh_keeps_its_valid_token(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Another program holds SQLite's writer lock (a backup, a `sqlite3` session) while
        the background refresher renews a token 200 s from expiry: a request that joins that
        refresh is served with the still-valid token (it got 503 store_unavailable once
        the refresher's write gave up), and the refresher logs one line, no traceback."""
        monkeypatch.setattr(store_package, "SQLITE_BUSY_TIMEOUT", 0.5)
        gw = await gateway_factory()
        issued = await connect_account(gw, "acme")
        clock.advance(86400 - 200)  # inside the refresh margin, still valid
        other = sqlite3.connect(gw.settings.database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            background = asyncio.create_task(gw.tokens.refresh_due(lead=60))
            await fake_nb_idle()
            resp = await gw.client.get("/n/acme/api/v2/signups/me")
            assert resp.status == 200, await resp.text()
            assert fake_nb.api_requests[-1].headers["Authorization"] == (
                f"Bearer {issued['access_token']}"
            )
            await background
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert fake_nb.token_requests == []  # nothing rotated without a place to keep it
        assert not [r for r in caplog.records if r.exc_info]


class TestJoinersOfAFailedRefresh:
    """Requests that joined a refresh the store could not finish (another program held
    SQLite's writer lock past the busy timeout) never call the token endpoint from their
    own handlers: that would be one call per request with the same refresh token, and a
    call a client that goes away cancels, its rotated pair lost with it."""

    @pytest.fixture
    async def fake_nb(self, clock: FakeClock) -> AsyncIterator[FakeNationBuilder]:
        """The fake, finishing a request whose client went away, as NationBuilder does."""
        fake = FakeNationBuilder(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock.now)
        runner = web.AppRunner(fake.app, handler_cancellation=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        fake.base_url = f"http://127.0.0.1:{port}"
        yield fake
        fake.release_tokens()
        await runner.cleanup()

    async def _stage(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        joiners: int,
        *,
        forced: bool,
    ) -> tuple[Gateway, list[asyncio.Task[Any]]]:
        """An expired token; a refresh (a request's, or an admin's forced one) that fails
        because the store is locked, with `joiners` requests waiting on it; then the lock is
        freed and the token endpoint held, so any token call shows."""
        gw = await gateway_factory()
        await connect_account(gw, "acme")
        clock.advance(86400 + 60)
        other = sqlite3.connect(gw.settings.database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        fake_nb.hold_tokens()
        first: asyncio.Future[Any] = asyncio.ensure_future(
            gw.tokens.force_refresh("acme", None) if forced else gw.client.get("/n/acme" + ME)
        )
        for _ in range(500):
            if "acme" in gw.tokens._inflight:
                break
            await asyncio.sleep(0.01)
        others = [asyncio.create_task(gw.client.get("/n/acme" + ME)) for _ in range(joiners)]
        await asyncio.sleep(0.2)  # they are waiting on the refresh
        outcome = await asyncio.gather(first, return_exceptions=True)
        if forced:
            assert isinstance(outcome[0], StoreError), outcome
        else:
            assert not isinstance(outcome[0], BaseException) and outcome[0].status == 503
        other.execute("ROLLBACK")
        other.close()
        return gw, others

    @pytest.mark.parametrize("forced", [False, True], ids=["request", "forced"])
    async def test_one_token_call_at_most_and_the_account_stays_connected(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        forced: bool,
    ) -> None:
        monkeypatch.setattr(store_package, "SQLITE_BUSY_TIMEOUT", 1.0)
        gw, others = await self._stage(
            gateway_factory, connect_account, fake_nb, clock, 2, forced=forced
        )
        await asyncio.sleep(0.5)  # time for any token call the joiners would make
        assert fake_nb.peak_pending_tokens <= 1
        fake_nb.release_tokens()
        for task in others:
            assert (await task).status in (200, 503)
        clock.advance(10)  # past the store's retry pause
        resp = await gw.client.get("/n/acme" + ME)
        assert resp.status == 200, await resp.text()
        account = await gw.store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE

    async def test_a_joiner_that_goes_away_loses_no_pair(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(store_package, "SQLITE_BUSY_TIMEOUT", 1.0)
        gw, [joiner] = await self._stage(
            gateway_factory, connect_account, fake_nb, clock, 1, forced=False
        )
        await asyncio.sleep(0.5)
        joiner.cancel()  # the tool gives up
        await asyncio.gather(joiner, return_exceptions=True)
        await asyncio.sleep(0.2)
        fake_nb.release_tokens()  # an answer NationBuilder gives goes to a live refresh
        for _ in range(300):
            if not gw.tokens._inflight and fake_nb.pending_token_requests == 0:
                break
            await asyncio.sleep(0.01)
        clock.advance(10)
        resp = await gw.client.get("/n/acme" + ME)
        assert resp.status == 200, await resp.text()
        account = await gw.store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE


async def fake_nb_idle() -> None:
    """Let the refresher reach its wait for the lock."""
    for _ in range(5):
        await asyncio.sleep(0.02)


class TestAdminsAtTheSameTime:
    """Two admins (or an admin and a script) acting on one nation at once, on two gateway
    processes of one database: what one stored is never overwritten, marked dead or
    removed because of what the other was still doing."""

    async def test_a_reconnect_during_a_refused_refresh_stays_active(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """An admin refresh whose old refresh token NationBuilder refuses, while another
        admin re-connects the nation elsewhere: the refusal marks nothing, the refresh
        answers with the new pair, and it serves. (The store's compare-and-set behind it:
        store_contract.py, test_a_refusal_does_not_mark_an_account_changed_meanwhile.)"""
        here, elsewhere = await gateway_factory(), await gateway_factory()
        await connect_account(here, "acme")
        fake_nb.hold_tokens()
        refresh = asyncio.create_task(here.accounts.refresh("acme"))
        await fake_nb.wait_for_pending_tokens(1)
        fresh = await connect_account(elsewhere, "acme")
        fake_nb.fail_token("invalid_grant")
        fake_nb.release_tokens()
        assert (await refresh).status is AccountStatus.ACTIVE
        account = await here.store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        assert account.refresh_token == Secret(fresh["refresh_token"])
        resp = await here.client.get("/n/acme" + ME)
        assert resp.status == 200, await resp.text()

    @pytest.mark.parametrize("failure", ["server_error", "lost", "rotated_but_refused"])
    async def test_a_remove_and_reconnect_during_a_failing_refresh_leave_the_new_row_clean(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        failure: str,
    ) -> None:
        """An admin refresh whose token call fails (a 502, an answer lost after
        NationBuilder rotated, or an answer refused that carries a rotated refresh token)
        while another admin removes the nation and connects it again elsewhere: the failure
        is not the new row's (no error, no backoff, no event, no pair held in memory), the
        admin's refresh is told the account changed meanwhile (not "no access token is
        available"), and the next request is served with the new pair."""
        here, elsewhere = await gateway_factory(), await gateway_factory()
        await connect_account(here, "acme")
        fake_nb.hold_tokens()
        refresh = asyncio.create_task(
            here.client.post("/connect/api/accounts/acme/refresh", headers=AUTH)
        )
        await fake_nb.wait_for_pending_tokens(1)
        assert await elsewhere.accounts.remove("acme")
        fresh = await connect_account(elsewhere, "acme")
        if failure == "rotated_but_refused":
            fake_nb.mangle_token_answers({"token_type": "mac"})
        else:
            fake_nb.fail_token(failure)
        fake_nb.release_tokens()
        answer = await refresh
        assert answer.status == 503
        assert answer.headers["X-NBGW-Error"] == "token_refresh_failed"
        assert answer.headers["Retry-After"] == "1"
        assert "connected again, imported or removed" in await answer.text()
        account = await here.store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        assert account.refresh_token == Secret(fresh["refresh_token"])
        [info] = await here.store.list_accounts()
        assert info.last_error is None and info.refresh_started_at is None
        kinds = [event.kind for event in await here.store.events("acme")]
        assert EventKind.REFRESH_FAILED not in kinds
        assert here.tokens.unpersisted == []
        calls = len(fake_nb.token_requests)
        resp = await here.client.get("/n/acme" + ME)
        assert resp.status == 200, await resp.text()
        assert resp.headers.get("X-NBGW-Error") is None
        assert (
            fake_nb.api_requests[-1].headers["Authorization"] == f"Bearer {fresh['access_token']}"
        )
        assert len(fake_nb.token_requests) == calls  # the new pair is fresh: no token call

    async def test_processes_back_off_together_after_a_failed_refresh(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        any_database: Path | str,
    ) -> None:
        """A refresh in one process fails (a 502). Another process sharing the store that
        needs the token moments later takes that failure as its own: it backs off with
        Retry-After instead of calling the failing endpoint again at once, so the processes
        keep one retry schedule between them; once that wait is over it refreshes."""
        here = await gateway_factory(database=any_database)
        other = await gateway_factory(database=any_database)
        await connect_account(here, "acme")
        clock.advance(2 * 86400)  # expired
        fake_nb.fail_token("server_error")
        first = await here.client.get("/n/acme" + ME)
        assert first.status == 503
        calls = len(fake_nb.token_requests)
        await other.tokens.sync(force=True)
        second = await other.client.get("/n/acme" + ME)
        assert second.status == 503, await second.text()
        assert second.headers["X-NBGW-Error"] == "token_refresh_failed"
        assert int(second.headers["Retry-After"]) >= 1
        assert len(fake_nb.token_requests) == calls  # no call of its own meanwhile
        clock.advance(int(second.headers["Retry-After"]) + 1)
        third = await other.client.get("/n/acme" + ME)
        assert third.status == 200, await third.text()
        assert len(fake_nb.token_requests) == calls + 1

    async def test_a_background_retry_is_skipped_after_another_processs_later_failure(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Both processes back off after a failure; when their waits end, the first to
        retry fails again. The other's retry loop then takes that failure up and waits
        with it instead of calling the failing endpoint too."""
        here = await gateway_factory()
        other = await gateway_factory()
        await connect_account(here, "acme")
        clock.advance(2 * 86400)  # expired
        fake_nb.fail_token("server_error", times=2)
        assert (await here.client.get("/n/acme" + ME)).status == 503
        await other.tokens.sync(force=True)
        assert (await other.client.get("/n/acme" + ME)).status == 503  # took it up
        calls = len(fake_nb.token_requests)
        clock.advance(5)  # both waits are over
        assert await here.tokens.retry_after_backoff() == ["acme"]  # and fails again
        assert len(fake_nb.token_requests) == calls + 1
        assert await other.tokens.retry_after_backoff() == []
        assert len(fake_nb.token_requests) == calls + 1
        clock.advance(30)
        assert (await other.client.get("/n/acme" + ME)).status == 200

    async def test_the_background_refresher_backs_off_with_another_processs_failure(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        any_database: Path | str,
    ) -> None:
        """A token nears expiry. One process's background refresh fails (a 502); the
        other's background refresher, due at the same time, takes that failure up and waits
        with it instead of calling the failing endpoint at once (each process retried once
        before). The request path meanwhile serves the still-valid token, and the retry,
        once the shared wait is over, refreshes."""
        here = await gateway_factory(database=any_database)
        other = await gateway_factory(database=any_database)
        await connect_account(here, "acme")
        await other.tokens.sync(force=True)
        clock.advance(86400 - 60)  # inside the refresh margin, still valid
        fake_nb.fail_token("server_error")
        assert await here.tokens.refresh_due(lead=60) == ["acme"]
        calls = len(fake_nb.token_requests)
        await other.tokens.sync(force=True)
        assert await other.tokens.refresh_due(lead=60) == []
        assert len(fake_nb.token_requests) == calls
        resp = await other.client.get("/n/acme" + ME)
        assert resp.status == 200, await resp.text()
        assert len(fake_nb.token_requests) == calls
        clock.advance(5)
        assert await other.tokens.retry_after_backoff() == ["acme"]
        assert len(fake_nb.token_requests) == calls + 1
        [info] = await other.store.list_accounts()
        assert info.last_error is None and info.generation == 2

    async def test_a_refresh_lock_held_too_long_elsewhere_is_a_refresh_failure(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        any_database: Path | str,
    ) -> None:
        """Another process holds one account's refresh lock for longer than a refresh can
        take (frozen, say): that account's request is told so, 503 token_refresh_failed
        with Retry-After, not that the database is away, and other accounts go on using the
        database (their refreshes are not held back as in an outage)."""
        here = await gateway_factory(database=any_database)
        other = await gateway_factory(database=any_database)
        await connect_account(here, "acme")
        await connect_account(here, "beta")
        clock.advance(2 * 86400)  # both expired
        here.store.lease = 0.25
        async with other.store.refresh_lock("acme"):
            resp = await here.client.get("/n/acme" + ME)
            assert resp.status == 503
            assert resp.headers["X-NBGW-Error"] == "token_refresh_failed"
            assert resp.headers["Retry-After"] == "5"
            assert "another gateway process" in await resp.text()
            beta = await here.client.get("/n/beta" + ME)
            assert beta.status == 200, await beta.text()

    async def test_a_reconnect_just_before_the_token_call_is_served_not_refused(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        any_database: Path | str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A request on an expired token takes the refresh lock; before its token call an
        admin connects the nation again on another gateway. The refresh sends no token
        (the stored one is another row's), and the request is served with the admin's new
        pair, not told to retry."""
        here = await gateway_factory(database=any_database)
        elsewhere = await gateway_factory(database=any_database)
        await connect_account(here, "acme")
        clock.advance(2 * 86400)  # expired
        original = here.store.refresh_lock
        fresh: dict[str, Any] = {}

        @contextlib.asynccontextmanager
        async def refresh_lock(slug: str) -> AsyncIterator[Any]:
            async with original(slug) as locked:
                begin = locked.begin_refresh

                async def connected_meanwhile() -> None:
                    fresh.update(await connect_account(elsewhere, slug))
                    await begin()

                locked.begin_refresh = connected_meanwhile  # type: ignore[method-assign]
                yield locked

        monkeypatch.setattr(here.store, "refresh_lock", refresh_lock)
        resp = await here.client.get("/n/acme" + ME)
        assert resp.status == 200, await resp.text()
        assert fresh, "the re-connect ran"
        sent = fake_nb.api_requests[-1].headers["Authorization"]
        assert sent == f"Bearer {fresh['access_token']}"
        # No refresh, with the replaced token or any other.
        grants = [r.params().get("grant_type") for r in fake_nb.token_requests]
        assert "refresh_token" not in grants
        account = await here.store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        assert account.refresh_token == Secret(fresh["refresh_token"])

    @pytest.mark.parametrize("failure", ["server_error", "invalid_grant"])
    async def test_a_stalled_refresh_taken_over_elsewhere_leaves_the_new_holders_refresh(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        failure: str,
    ) -> None:
        """A gateway on another host whose token call outlasts its lease (the process
        stalled) has its refresh taken over by a second gateway. When the stalled call then
        fails (a 502, or the token refused), nothing of it is stored: the stalled side is
        told its refresh was taken over (503, Retry-After 1), not that the account changed
        or needs re-authorization; the second gateway's lease and marker stay as they were,
        and both gateways serve afterwards."""
        with monkeypatch.context() as patched:
            patched.setattr("nbgateway.store.sqlite.owner_id", lambda: "elsewhere.example/1/2.3/ab")
            stalled = await gateway_factory()
        other = await gateway_factory()
        await connect_account(other, "acme")
        fake_nb.hold_tokens()
        late = asyncio.create_task(
            stalled.client.post("/connect/api/accounts/acme/refresh", headers=AUTH)
        )
        await fake_nb.wait_for_pending_tokens(1)
        clock.advance(other.store.lease + 1)
        async with other.store.refresh_lock("acme") as taken:
            await taken.begin_refresh()
            [before] = await other.store.list_accounts()
            fake_nb.fail_token(failure)
            fake_nb.release_tokens()
            answer = await late
            assert answer.status == 503, await answer.text()
            assert answer.headers["X-NBGW-Error"] == "token_refresh_failed"
            assert answer.headers["Retry-After"] == "1"
            assert "another gateway process took it over" in await answer.text()
            [during] = await other.store.list_accounts()
            assert during == before  # the taken-over lease and its marker, untouched
            assert during.status is AccountStatus.ACTIVE and during.last_error is None
        [info] = await other.store.list_accounts()
        assert info.status is AccountStatus.ACTIVE and info.refresh_started_at is None
        await stalled.tokens.sync(force=True)
        for gateway in (stalled, other):
            resp = await gateway.client.get("/n/acme" + ME)
            assert resp.status == 200, await resp.text()

    @pytest.mark.parametrize("accepted", [False, True], ids=["refused", "accepted"])
    async def test_an_import_while_the_nation_is_connected_says_so_and_keeps_the_connection(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        accepted: bool,
    ) -> None:
        """`accounts import` with a token NationBuilder refuses (or accepts), while an
        admin connects the same nation at /connect: the import fails saying so (it said
        "imported"), removes nothing, and the connection stays."""
        here, elsewhere = await gateway_factory(), await gateway_factory()
        fake_nb.hold_tokens()
        legacy = "legacy-nobody-issued-0123456789"
        if accepted:
            fake_nb.add_legacy_token("acme", legacy)
        imported = asyncio.create_task(here.accounts.import_legacy("acme", Secret(legacy)))
        await fake_nb.wait_for_pending_tokens(1)
        fresh = await connect_account(elsewhere, "acme")
        fake_nb.release_tokens()
        with pytest.raises(AuthorizationFailed, match="connected or imported elsewhere") as info:
            await imported
        assert "token was not kept" in str(info.value)
        account = await here.store.get_account("acme")
        assert account is not None and account.status is AccountStatus.ACTIVE
        assert account.refresh_token == Secret(fresh["refresh_token"])

    async def test_an_import_that_looked_before_another_stored_changes_nothing(
        self,
        gateway_factory: GatewayFactory,
        fake_nb: FakeNationBuilder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Two imports of one nation at once, the second having looked before the first
        stored its row: the second is refused and stores nothing, so the first's exchanged
        pair is kept (the second overwrote it with the spent legacy token, then removed
        the account when NationBuilder refused that)."""
        legacy = "legacy-token-twice-0123456789"
        fake_nb.add_legacy_token("acme", legacy)
        first, second = await gateway_factory(), await gateway_factory()
        await first.accounts.import_legacy("acme", Secret(legacy))
        stored = await first.store.get_account("acme")
        assert stored is not None and stored.access_token is not None

        async def looked_earlier(slug: str) -> None:
            return None  # what it saw before the first import's row was there

        monkeypatch.setattr(second.accounts, "_find", looked_earlier)
        with pytest.raises(AuthorizationFailed, match="changed while importing") as info:
            await second.accounts.import_legacy("acme", Secret(legacy))
        assert info.value.reason == "invalid"
        assert await first.store.get_account("acme") == stored
        assert len(fake_nb.token_requests) == 1  # the first import's exchange only
