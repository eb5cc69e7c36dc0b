"""A rotated refresh token is never thrown away, and readiness tells the truth about the store.

Issue 8, "Data loss" points 1, 2 and 4 and point 15, reproduced against the real gateway and
the fake NationBuilder on sockets: a SQLite database on a real tmpfs that is filled until
SQLite answers "database or disk is full" (and remounted read-only, or deleted), token
answers that rotate but are wrong in another way, and absurd token lifetimes.

Mounting needs root (or CAP_SYS_ADMIN); without it the tmpfs tests are skipped saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, ConnectAccount, Gateway, GatewayFactory, SettingsFactory
from procs import clean_os_environ, gateway_env, run_command
from test_admin_pages import Browser

from nbgateway import tokens as tokens_module
from nbgateway.clock import FakeClock
from nbgateway.config import Settings
from nbgateway.errors import RefreshBackoff, StoreUnavailable
from nbgateway.fakenb import FakeNationBuilder, RecordedRequest
from nbgateway.models import AccountStatus
from nbgateway.oauth import DEFAULT_LIFETIME, MAX_LIFETIME, MIN_LIFETIME
from nbgateway.tokens import MIN_REFRESH_INTERVAL

SLUG = "acme"
ME = "/api/v2/signups/me"
LIFETIME = 86400.0  # the fake's access-token lifetime
PERSIST_FAILURES = "nbgw_token_persist_failures_total"
UNPERSISTED = "nbgw_token_unpersisted"
NEEDS_REAUTH = "nbgw_account_needs_reauth"


# ---------------------------------------------------------------------- helpers


def bearer(record: RecordedRequest) -> str:
    """The access token a recorded upstream request carried."""
    return record.headers["Authorization"].removeprefix("Bearer ")


def refresh_tokens_sent(fake_nb: FakeNationBuilder) -> list[str]:
    """The refresh tokens the token endpoint received, in order."""
    return [
        r.params()["refresh_token"]
        for r in fake_nb.token_requests
        if r.params().get("grant_type") == "refresh_token"
    ]


async def fetch(gw: Gateway, path: str = ME) -> int:
    """GET through the gateway; the status once the body is read."""
    resp = await gw.client.get(path)
    await resp.read()
    return resp.status


async def readyz(gw: Gateway) -> tuple[int, str]:
    resp = await gw.client.get("/readyz")
    return resp.status, await resp.text()


async def stored_refresh_token(gw: Gateway) -> str:
    account = await gw.store.get_account(SLUG)
    assert account is not None and account.refresh_token is not None
    return account.refresh_token.reveal()


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its filesystem has no byte left; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            chunk = b"\0" * size
            while True:
                try:
                    out.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def chattr(flag: str, path: Path) -> bool:
    """Set or clear a file attribute (+i: immutable, even for root); False if unsupported."""
    return subprocess.run(["chattr", flag, str(path)], check=False).returncode == 0


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A small real tmpfs, mounted for this test only (the database goes there)."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as where:
        yield where


# ---------------------------------------------------------------------- point 1: disk full


class TestDiskFullDuringRefresh:
    async def test_rotated_pair_is_served_held_and_stored_once_space_returns(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        disk: Path,
    ) -> None:
        """The COMMIT of a rotated pair fails with a full disk: the request is still served
        with the new access token, the consumed refresh token is never sent again (not even
        by the next refresh), the pair is retried and counted, /readyz says 503, the account
        is never marked needs-reauth; once space is freed the held pair is stored."""
        gw = await gateway_factory(database=disk / "gateway.db")
        issued = await connect_account(gw, SLUG)
        assert await fetch(gw) == 200
        assert (await readyz(gw))[0] == 200

        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        request = asyncio.create_task(fetch(gw))
        await fake_nb.wait_for_pending_tokens(1)  # lease and in-flight marker are committed
        filler = fill(disk)
        fake_nb.release_tokens()
        assert await request == 200

        # The commit really failed: the row still holds the consumed token.
        assert await stored_refresh_token(gw) == issued["refresh_token"]
        assert gw.metric(PERSIST_FAILURES, account=SLUG) >= 1
        assert gw.metric(UNPERSISTED, account=SLUG) == 1
        assert gw.tokens.unpersisted == [SLUG]
        new_access = bearer(fake_nb.api_requests[-1])
        assert new_access != issued["access_token"]

        # Served from memory meanwhile; retries are counted and keep failing.
        for _ in range(5):
            assert await fetch(gw) == 200
        assert {bearer(r) for r in fake_nb.api_requests[-5:]} == {new_access}
        failures = gw.metric(PERSIST_FAILURES, account=SLUG)
        clock.advance(5.0)
        await gw.tokens.persist_pending()
        assert gw.metric(PERSIST_FAILURES, account=SLUG) > failures
        status, body = await readyz(gw)
        assert status == 503
        assert "gateway.db" not in body and str(disk) not in body

        # The in-memory pair expires as well: the next refresh uses the in-memory refresh
        # token, never the consumed one.
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        sent = refresh_tokens_sent(fake_nb)
        assert len(sent) == 2
        assert sent.count(issued["refresh_token"]) == 1
        assert fake_nb.token_requests[-1].params()["refresh_token"] != issued["refresh_token"]

        info = await gw.accounts.get(SLUG)
        assert info.status is AccountStatus.ACTIVE
        assert gw.metric(NEEDS_REAUTH, account=SLUG) == 0

        # Space comes back: still not ready until the held pair is stored.
        filler.unlink()
        assert (await readyz(gw))[0] == 503
        await gw.tokens.persist_pending(force=True)
        assert gw.tokens.unpersisted == []
        assert gw.metric(UNPERSISTED, account=SLUG) == 0
        assert (await readyz(gw))[0] == 200
        latest = await stored_refresh_token(gw)
        assert latest not in (issued["refresh_token"], sent[1])

        # And the stored pair is the live one: the next refresh succeeds with it.
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        assert refresh_tokens_sent(fake_nb)[-1] == latest
        assert (await gw.accounts.get(SLUG)).status is AccountStatus.ACTIVE
        assert len(refresh_tokens_sent(fake_nb)) == len(set(refresh_tokens_sent(fake_nb)))

    async def test_an_admin_refresh_whose_pair_is_held_says_so(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        disk: Path,
    ) -> None:
        """`POST /connect/api/accounts/SLUG/refresh` whose new pair the database refuses:
        503 saying the pair is held in memory and not to restart (it answered 200 with the
        old stored row on SQLite, or "retry shortly" on PostgreSQL)."""
        gw = await gateway_factory(database=disk / "gateway.db")
        await connect_account(gw, SLUG)
        fake_nb.hold_tokens()
        refresh = asyncio.create_task(
            gw.client.post(
                f"/connect/api/accounts/{SLUG}/refresh",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
        )
        await fake_nb.wait_for_pending_tokens(1)
        fill(disk)
        fake_nb.release_tokens()
        resp = await refresh
        body = await resp.json()
        assert resp.status == 503, body
        assert resp.headers["X-NBGW-Error"] == "store_unavailable"
        detail = body["errors"][0]["detail"]
        assert "holds it in memory" in detail and "do not restart" in detail
        assert gw.tokens.unpersisted == [SLUG]

    async def test_cli_refresh_keeps_trying_to_store_the_pair_it_alone_holds(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        encryption_key: str,
        disk: Path,
    ) -> None:
        """`nbgateway accounts refresh` whose new pair the database refuses is the pair's
        only holder and about to exit: it says so and keeps trying to store it, and once
        space returns it stores it and exits 0 (it printed a message meant for a running
        gateway, "holds it in memory ... do not restart", and exited 1 with the pair lost:
        the next refresh met invalid_grant)."""
        database = disk / "gateway.db"
        gw = await gateway_factory(database=database)
        issued = await connect_account(gw, SLUG)
        env = {
            **clean_os_environ(),
            **gateway_env(database, ADMIN_TOKEN, fake_nb.base_url, key=encryption_key),
        }
        fake_nb.hold_tokens()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nbgateway", "accounts", "refresh", SLUG,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await fake_nb.wait_for_pending_tokens(1, timeout=30)
            filler = fill(disk)
            fake_nb.release_tokens()
            assert cli.stderr is not None
            said = b""
            while b"trying again" not in said:
                line = await asyncio.wait_for(cli.stderr.readline(), 30)
                assert line, said
                said += line
            filler.unlink()
            out, err = await asyncio.wait_for(cli.communicate(), 90)
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()
        assert cli.returncode == 0, (said, out, err)
        assert b"the new pair is stored" in out
        assert b"do not restart" not in said + err
        stored = await stored_refresh_token(gw)
        assert stored != issued["refresh_token"]
        assert stored not in refresh_tokens_sent(fake_nb)  # the new one, not spent yet

    async def test_background_sweeps_do_not_rotate_a_held_pair_that_is_still_fresh(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        disk: Path,
    ) -> None:
        """While a fresh pair is held in memory, the stored row looks expired; the background
        refresher must go by the held pair and not rotate it on every sweep."""
        gw = await gateway_factory(database=disk / "gateway.db")
        await connect_account(gw, SLUG)
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        request = asyncio.create_task(fetch(gw))
        await fake_nb.wait_for_pending_tokens(1)
        filler = fill(disk)
        fake_nb.release_tokens()
        assert await request == 200
        assert gw.tokens.unpersisted == [SLUG]

        for _ in range(3):
            clock.advance(30.0)
            await gw.tokens.refresh_due(lead=60.0)
        assert len(refresh_tokens_sent(fake_nb)) == 1
        filler.unlink()
        await gw.tokens.persist_pending(force=True)
        assert gw.tokens.unpersisted == []

    async def test_another_process_waits_for_the_holder_instead_of_spending_the_token(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        disk: Path,
        monkeypatch: pytest.MonkeyPatch,
        settings_factory: SettingsFactory,
    ) -> None:
        """Two processes on one full disk: A holds the rotated pair in memory and could not
        release its lease. Once space returns and A's lease has lapsed, B (needing a fresh
        token too) must not send the consumed refresh token (invalid_grant, needs-reauth):
        it waits while A lives and adopts the pair A stores."""
        settings = settings_factory(database=disk / "gateway.db")
        a, b, issued = await two_processes(gateway_factory, settings, connect_account)
        assert await fetch(b) == 200

        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        request = asyncio.create_task(fetch(a))
        await fake_nb.wait_for_pending_tokens(1)
        filler = fill(disk)
        fake_nb.release_tokens()
        assert await request == 200
        assert a.tokens.unpersisted == [SLUG]

        filler.unlink()
        clock.advance(2 * a.store.lease)
        asked: list[str] = []
        original = b.store.refresh_lock

        def refresh_lock(slug: str) -> Any:
            asked.append(slug)
            return original(slug)

        monkeypatch.setattr(b.store, "refresh_lock", refresh_lock)
        waiting = asyncio.create_task(fetch(b))
        for _ in range(500):
            if asked:
                break
            await asyncio.sleep(0.01)
        assert asked == [SLUG]
        await asyncio.sleep(0.2)  # B is at the lease; it must not have called the endpoint
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"]]
        await a.tokens.persist_pending(force=True)
        assert await asyncio.wait_for(waiting, 30) == 200
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"]]
        assert (await b.accounts.get(SLUG)).status is AccountStatus.ACTIVE
        assert b.metric(NEEDS_REAUTH, account=SLUG) == 0


# ---------------------------------------------------------------------- point 2


class TestAnswerRefusedButRotated:
    @pytest.mark.parametrize(
        "fields",
        [
            {"token_type": "mac"},
            {"access_token": ""},
            # Not sendable in an Authorization header (a header injection, or a 500 on every
            # request for the token's whole life), or longer than any server takes.
            {"access_token": "nbfake-at-x\r\nX-Injected: 1"},
            {"access_token": "nbfake-at-\u0000x"},
            {"access_token": "nbfake at x"},
            {"access_token": "nbfake-at-" + "x" * 4096},
        ],
        ids=["mac", "empty-access", "crlf", "nul", "space", "too-long"],
    )
    async def test_new_refresh_token_is_stored_first_and_bad_access_token_never_used(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        fields: dict[str, Any],
    ) -> None:
        """A 200 that carries a new refresh token but an unusable access token: the request
        gets 503 token_refresh_failed (no bad token goes upstream), the new refresh token is
        stored, and the next refresh uses it and succeeds; the account stays active."""
        issued = await connect_account(gateway, SLUG)
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers(fields)
        fake_nb.clear_recordings()

        resp = await gateway.client.get(ME)
        await resp.read()
        assert resp.status == 503
        assert resp.headers["X-NBGW-Error"] == "token_refresh_failed"
        assert fake_nb.api_requests == []

        rotated = await stored_refresh_token(gateway)
        assert rotated != issued["refresh_token"]
        assert (await gateway.accounts.get(SLUG)).status is AccountStatus.ACTIVE

        clock.advance(600.0)  # past the backoff
        assert await fetch(gateway) == 200
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"], rotated]
        used = bearer(fake_nb.api_requests[-1])
        assert used == (await gateway.store.get_account(SLUG)).access_token.reveal()  # type: ignore[union-attr]
        info = await gateway.accounts.get(SLUG)
        assert info.status is AccountStatus.ACTIVE
        assert info.last_error is None

    async def test_refused_rotation_while_the_disk_is_full_is_held_in_memory(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        disk: Path,
    ) -> None:
        """A mac answer whose refresh token cannot be stored: the refresh token is kept in
        memory and used for the next refresh; the consumed one is never sent again."""
        gw = await gateway_factory(database=disk / "gateway.db")
        issued = await connect_account(gw, SLUG)
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"token_type": "mac"})
        fake_nb.hold_tokens()
        request = asyncio.create_task(fetch(gw))
        await fake_nb.wait_for_pending_tokens(1)
        filler = fill(disk)
        fake_nb.release_tokens()
        assert await request == 503
        assert gw.tokens.unpersisted == [SLUG]

        clock.advance(600.0)
        assert await fetch(gw) == 200
        sent = refresh_tokens_sent(fake_nb)
        assert len(sent) == 2 and sent[1] != issued["refresh_token"]
        filler.unlink()
        await gw.tokens.persist_pending(force=True)
        assert gw.tokens.unpersisted == []
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        assert (await gw.accounts.get(SLUG)).status is AccountStatus.ACTIVE


# ---------------------------------------------------------------------- point 15: /readyz


class TestReadinessChecksWrites:
    async def test_full_disk_is_not_ready(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount, disk: Path
    ) -> None:
        """A store whose disk is full answers reads, but /readyz is 503 until space returns."""
        gw = await gateway_factory(database=disk / "gateway.db")
        await connect_account(gw, SLUG)
        assert (await readyz(gw))[0] == 200
        filler = fill(disk)
        # Enough probes to use up whatever the last WAL page had left.
        statuses = [(await readyz(gw))[0] for _ in range(3)]
        assert statuses[-1] == 503
        filler.unlink()
        assert (await readyz(gw))[0] == 200

    async def test_read_only_database_file_is_not_ready(
        self, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """The database file made immutable (even root cannot write it): /readyz is 503."""
        await connect_account(gateway, SLUG)
        path = gateway.settings.database
        assert isinstance(path, Path)
        if not chattr("+i", path):
            pytest.skip("chattr +i is not supported on this filesystem")
        try:
            status, _ = await readyz(gateway)
        finally:
            assert chattr("-i", path)
        assert status == 503
        assert (await readyz(gateway))[0] == 200

    async def test_deleted_database_file_is_not_ready(
        self, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """The database file deleted under a running gateway: /readyz is 503 (whatever it
        writes now would be lost at the next start)."""
        await connect_account(gateway, SLUG)
        assert (await readyz(gateway))[0] == 200
        path = gateway.settings.database
        assert isinstance(path, Path)
        path.unlink()
        status, body = await readyz(gateway)
        assert status == 503
        assert str(path) not in body


# ---------------------------------------------------------------------- point 4: lifetimes


def cli_accounts_json(gw: Gateway, encryption_key: str) -> subprocess.CompletedProcess[str]:
    """`nbgateway accounts list --json` on the gateway's database, as a separate process."""
    database = gw.settings.database
    assert isinstance(database, Path)
    env = {**clean_os_environ(), **gateway_env(database, ADMIN_TOKEN, key=encryption_key)}
    return run_command([sys.executable, "-m", "nbgateway", "accounts", "list", "--json"], env=env)


async def every_admin_surface_lists(
    gw: Gateway, encryption_key: str, slugs: list[str]
) -> dict[str, Any]:
    """The accounts API, the /connect page and `accounts list --json` all answer and name
    every account; returns the API's account objects by slug."""
    resp = await gw.client.get(
        "/connect/api/accounts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert resp.status == 200, await resp.text()
    api = {a["slug"]: a for a in (await resp.json())["accounts"]}
    assert sorted(api) == sorted(slugs)

    async with aiohttp.ClientSession(base_url=str(gw.client.make_url("/"))) as http:
        browser = Browser(http)
        status, _, _ = await browser.login()
        assert status == 303
        status, page, _ = await browser.get("/connect")
    assert status == 200, page
    for slug in slugs:
        assert slug in page

    done = await asyncio.to_thread(cli_accounts_json, gw, encryption_key)
    assert done.returncode == 0, done.stderr
    assert sorted(row["slug"] for row in json.loads(done.stdout)) == sorted(slugs)
    return api


class TestAbsurdLifetimes:
    @pytest.mark.parametrize(
        ("expires_in", "lifetime"),
        [
            (1e12, MAX_LIFETIME),
            (1e20, MAX_LIFETIME),
            (math.inf, MAX_LIFETIME),  # sent as the JSON extension Infinity (what 1e400 parses to)
            ("Infinity", MAX_LIFETIME),
            (math.nan, DEFAULT_LIFETIME),
            ("soon", DEFAULT_LIFETIME),
            (-5, MIN_LIFETIME),
            (0, MIN_LIFETIME),
        ],
        ids=["1e12", "1e20", "inf", "Infinity-string", "nan", "text", "negative", "zero"],
    )
    async def test_stored_lifetime_is_clamped_and_every_surface_still_lists(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        encryption_key: str,
        expires_in: Any,
        lifetime: float,
    ) -> None:
        """A refresh answering an absurd expires_in stores a lifetime within the sane range;
        the accounts API, the /connect page and the CLI keep listing every account."""
        await connect_account(gateway, SLUG)
        await connect_account(gateway, "other")
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"expires_in": expires_in})
        assert await fetch(gateway, f"/n/{SLUG}{ME}") == 200
        account = await gateway.store.get_account(SLUG)
        assert account is not None and account.expires_at is not None
        assert account.expires_at - clock.now() == lifetime
        await every_admin_surface_lists(gateway, encryption_key, [SLUG, "other"])

    async def test_dates_written_by_an_older_version_render(
        self, gateway: Gateway, connect_account: ConnectAccount, encryption_key: str
    ) -> None:
        """Rows stored before lifetimes were clamped (expiry 1e20, infinity, -1e20, a
        connection time far beyond year 9999) do not break any listing."""
        slugs = [SLUG, "huge", "infinite", "negative"]
        for slug in slugs:
            await connect_account(gateway, slug)
        path = gateway.settings.database
        assert isinstance(path, Path)
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            for slug, value in (("huge", 1e20), ("infinite", math.inf), ("negative", -1e20)):
                conn.execute(
                    "UPDATE accounts SET expires_at = ?, last_refresh_at = ?, created_at = ? "
                    "WHERE slug = ?",
                    (value, value, abs(value), slug),
                )
        await gateway.tokens.sync(force=True)
        api = await every_admin_surface_lists(gateway, encryption_key, slugs)
        assert api[SLUG]["access_token_expires_at"] is not None
        for slug in ("huge", "infinite", "negative"):
            assert api[slug]["access_token_expires_at"] is None

    @pytest.mark.parametrize(
        ("expires_in", "most"),
        # 100 s: renewed at half its life. Negative: clamped to MIN_LIFETIME (60 s), renewed
        # no more often than MIN_REFRESH_INTERVAL (30 s): at 0, 30, 60 and 90 s.
        [(100, 2), (-5, 1 + int(95 // MIN_REFRESH_INTERVAL))],
        ids=["shorter-than-margin", "negative"],
    )
    async def test_short_lifetime_does_not_refresh_on_every_request(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        expires_in: int,
        most: int,
    ) -> None:
        """Lifetimes not longer than the margin (300 s): 20 requests over 95 s make a few
        refreshes (margin = min(margin, lifetime / 2), and a minimum interval between
        refreshes), not one per request."""
        await connect_account(gateway, SLUG)
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"expires_in": expires_in}, times=50)
        fake_nb.clear_recordings()
        statuses = [await fetch(gateway)]
        for _ in range(19):
            clock.advance(5.0)
            statuses.append(await fetch(gateway))
        assert statuses == [200] * 20
        assert 1 <= len(refresh_tokens_sent(fake_nb)) <= most

    @pytest.mark.parametrize("expires_in", [100, -5, 0], ids=["100s", "negative", "zero"])
    async def test_twenty_requests_at_one_instant_refresh_once(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        expires_in: int,
    ) -> None:
        """20 requests at one instant after a refresh that answered a lifetime not longer
        than the margin: one refresh in all (the issue saw 21 for 20)."""
        await connect_account(gateway, SLUG)
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"expires_in": expires_in}, times=50)
        fake_nb.clear_recordings()
        for _ in range(20):
            assert await fetch(gateway) == 200
        assert len(refresh_tokens_sent(fake_nb)) == 1


# ------------------------------------------------- a pair held in memory, and the others


def lock_class(database: Path | str) -> Any:
    """The backend's refresh-lock class (whose writes the tests below make fail)."""
    from nbgateway.store import postgres as pg_store
    from nbgateway.store import sqlite as sqlite_store

    return pg_store._AdvisoryLock if isinstance(database, str) else sqlite_store._Lease


def fail_first_save(
    monkeypatch: pytest.MonkeyPatch,
    database: Path | str,
    store: Any,
    *,
    committed: bool = False,
    method: str = "save_tokens",
) -> None:
    """`store`'s first commit of a refreshed pair (`method`: or of a refresh token alone,
    "save_refresh_token") fails as a write that waited out the database's lock does
    (StoreUnavailable); later ones, and other stores', go through. With `committed`, that
    first commit lands before the failure is reported (the connection dropped after the
    COMMIT reached the server)."""
    cls = lock_class(database)
    original = getattr(cls, method)
    failed: list[bool] = []

    async def save(self: Any, *args: Any) -> Any:
        if not failed and self._store is store:
            failed.append(True)
            if committed:
                await original(self, *args)
            raise StoreUnavailable("database gateway.db cannot be written: database is locked")
        return await original(self, *args)

    monkeypatch.setattr(cls, method, save)


def store_away(slug: str) -> contextlib.AbstractAsyncContextManager[Any]:
    """A store's `refresh_lock` while the database cannot be reached."""
    raise StoreUnavailable("database gateway.db cannot be reached")


async def two_processes(
    gateway_factory: GatewayFactory,
    settings: Settings,
    connect_account: ConnectAccount,
) -> tuple[Gateway, Gateway, dict[str, Any]]:
    """Gateways A and B sharing one store: A connected the nation, and B has seen it.
    Returns A, B and the tokens the connect issued."""
    a = await gateway_factory(settings)
    b = await gateway_factory(settings)
    issued = await connect_account(a, SLUG)
    await b.tokens.sync(force=True)
    return a, b, issued


def elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lease holder runs on another host (or PID namespace): whether it still runs
    cannot be told, and its deadline alone decides."""
    from nbgateway.store import postgres, sqlite

    for module in (sqlite, postgres):
        monkeypatch.setattr(module, "holder_runs", lambda holder: None)


async def takes_over(store: Any, slug: str = SLUG) -> bool:
    """Whether `store`'s process would take the account's refresh over now, instead of
    waiting for the holder (the lock granted within a moment)."""
    try:
        async with asyncio.timeout(0.1):
            async with store.refresh_lock(slug):
                return True
    except TimeoutError:
        return False


async def hold_a_pair(
    gw: Gateway,
    connect_account: ConnectAccount,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connect, then refresh with the store refusing the new pair: it is held in memory."""
    await connect_account(gw, SLUG)
    fail_first_save(monkeypatch, Path(), gw.store)
    clock.advance(LIFETIME)
    assert await fetch(gw) == 200
    assert gw.tokens.unpersisted == [SLUG]


class TestAPairHeldInMemory:
    async def test_another_process_waits_for_the_held_pair_instead_of_spending_the_token(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        any_database: Path | str,
    ) -> None:
        """A's refresh cannot store its new pair (a write that failed once: the database
        locked past the busy timeout, a statement timeout) and holds it in memory; the
        stored refresh token is spent. B, another process, needing a token too, must not
        send it (invalid_grant, needs-reauth, or with family revocation a dead account):
        the marker stays while A runs, B waits, and adopts the pair A then stores."""
        fake_nb.revoke_family_on_reuse = True
        settings = settings_factory(database=any_database)
        a, b, issued = await two_processes(gateway_factory, settings, connect_account)
        fail_first_save(monkeypatch, any_database, a.store)
        clock.advance(LIFETIME)
        assert await fetch(a) == 200
        assert a.tokens.unpersisted == [SLUG]
        [info] = await b.store.list_accounts()
        assert info.refresh_started_at is not None  # the marker stayed
        waiting = asyncio.create_task(fetch(b))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"]]
        await a.tokens.persist_pending(force=True)
        assert a.tokens.unpersisted == []
        assert await asyncio.wait_for(waiting, 30) == 200
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"]]
        [info] = await b.store.list_accounts()
        assert info.status is AccountStatus.ACTIVE and info.refresh_started_at is None
        assert bearer(fake_nb.api_requests[-1]) == bearer(fake_nb.api_requests[-2])

    @pytest.mark.parametrize("refreshed", [False, True], ids=["as-it-was", "refreshed-since"])
    async def test_a_pair_whose_store_reported_a_failure_but_committed_is_kept(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        any_database: Path | str,
        refreshed: bool,
    ) -> None:
        """The refresh's commit lands but reports a failure, so the new pair R1 is held in
        memory though stored. When the store takes writes again the held pair is found
        stored already (not "dropped: the account changed"); and if it was refreshed from
        memory meanwhile, the store still away (a 401 on the held token: R1 spent, R2
        held), R2 is stored over the row's R1. Before, R2 was dropped and the row kept the
        spent R1: the account needed re-authorization."""
        gw = await gateway_factory(database=any_database)
        await connect_account(gw, SLUG)
        fail_first_save(monkeypatch, any_database, gw.store, committed=True)
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        assert gw.tokens.unpersisted == [SLUG]
        r1 = await stored_refresh_token(gw)
        if refreshed:
            with monkeypatch.context() as m:
                m.setattr(gw.store, "refresh_lock", store_away)
                await gw.tokens.force_refresh(SLUG, -1)  # the held token's generation
            assert refresh_tokens_sent(fake_nb)[-1] == r1
            assert gw.tokens.unpersisted == [SLUG]
        clock.advance(5.0)
        with caplog.at_level(logging.INFO, logger="nbgateway"):
            await gw.tokens.persist_pending()
        assert gw.tokens.unpersisted == []
        assert "dropping a held token pair" not in caplog.text
        stored = await stored_refresh_token(gw)
        assert (stored == r1) is not refreshed
        assert stored not in refresh_tokens_sent(fake_nb)  # not spent
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        assert refresh_tokens_sent(fake_nb)[-1] == stored
        [info] = await gw.store.list_accounts()
        assert info.status is AccountStatus.ACTIVE

    @pytest.mark.parametrize("family", [False, True], ids=["plain", "family-revocation"])
    async def test_processes_refreshing_a_pair_stored_after_all_take_turns(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        any_database: Path | str,
        family: bool,
    ) -> None:
        """A's commit of R1 lands but reports a failure: A holds R1 in memory, while the
        row holds R1 with no marker (the commit cleared it), so B may refresh it from the
        row. A 401 on the token then reaches both at once. A tries the store before its
        token call, finds the pair stored and refreshes under the lock, so B waits and
        adopts: R1 is sent once. (Before, A refreshed from memory without the lock, both
        sent R1, B marked the account for re-authorization, and with family revocation
        the pair A stored was dead.)"""
        fake_nb.revoke_family_on_reuse = family
        settings = settings_factory(database=any_database)
        a, b, _ = await two_processes(gateway_factory, settings, connect_account)
        fail_first_save(monkeypatch, any_database, a.store, committed=True)
        clock.advance(LIFETIME)
        assert await fetch(a) == 200
        assert a.tokens.unpersisted == [SLUG]
        [info] = await b.store.list_accounts()
        assert info.refresh_started_at is None  # the commit cleared the marker
        fake_nb.hold_tokens()
        in_a = asyncio.create_task(a.tokens.force_refresh(SLUG, -1))
        await fake_nb.wait_for_pending_tokens(1)
        in_b = asyncio.create_task(b.tokens.force_refresh(SLUG, info.generation))
        await asyncio.sleep(0.5)  # B waits for A's lock instead of sending R1 too
        fake_nb.release_tokens()
        token_a, token_b = await asyncio.wait_for(asyncio.gather(in_a, in_b), 30)
        sent = refresh_tokens_sent(fake_nb)
        assert len(sent) == len(set(sent)) == 2, "a refresh token was sent twice"
        assert token_a.access_token == token_b.access_token
        assert a.tokens.unpersisted == []
        clock.advance(LIFETIME)
        assert await fetch(b) == 200
        [info] = await a.store.list_accounts()
        assert info.status is AccountStatus.ACTIVE

    async def test_a_refresh_token_stored_alone_later_is_refreshed_without_more_backoff(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """NationBuilder rotates but its answer is refused (a `mac` token), and the store
        cannot take the new refresh token at first: it is held alone. Once stored (its
        refusal recorded in the row), the next request past the refresh's own backoff
        refreshes at once: the process does not take its own write for another process's
        failure and back off a second time (it answered 503 for a few seconds more)."""
        gw = await gateway_factory()
        await connect_account(gw, SLUG)
        fail_first_save(monkeypatch, Path(), gw.store, method="save_refresh_token")
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"token_type": "mac"})
        assert await fetch(gw) == 503
        assert gw.tokens.unpersisted == [SLUG]
        clock.advance(5.0)  # past the refresh's backoff (2 s at most after one failure)
        assert await fetch(gw) == 200
        assert gw.tokens.unpersisted == []
        sent = refresh_tokens_sent(fake_nb)
        assert len(sent) == len(set(sent)) == 2

    async def test_a_failing_refresh_of_a_held_pair_backs_off(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A pair held in memory (the store still away) falls due while the token endpoint
        fails. Its refresh from memory backs off as a stored pair's does: requests go on
        with the still-valid held token, or get a 503 with Retry-After once it expired,
        without a token call each (there was one per request)."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        monkeypatch.setattr(gw.store, "refresh_lock", store_away)
        clock.advance(LIFETIME - 60)  # the held pair is due, and valid for a minute more
        fake_nb.fail_token("server_error", times=10)
        calls = len(fake_nb.token_requests)
        assert await fetch(gw) == 200
        assert len(fake_nb.token_requests) == calls + 1
        for _ in range(3):
            assert await fetch(gw) == 200
        assert len(fake_nb.token_requests) == calls + 1  # backing off
        clock.advance(120)  # expired
        resp = await gw.client.get(ME)
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert len(fake_nb.token_requests) == calls + 2  # its wait was over: one more
        for _ in range(3):
            assert await fetch(gw) == 503
        assert len(fake_nb.token_requests) == calls + 2
        clock.advance(10)
        assert await fetch(gw) == 503
        assert len(fake_nb.token_requests) == calls + 3

    @pytest.mark.parametrize("caller", ["background", "401"])
    async def test_a_held_pairs_refresh_backoff_holds_for_every_caller(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        caller: str,
    ) -> None:
        """The token endpoint answers the held pair's refresh with 429 Retry-After 280. The
        background refresher (every 30 s) and requests meeting 401s wait that out as they
        would for a stored pair: no token call until then (each made one)."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        monkeypatch.setattr(gw.store, "refresh_lock", store_away)
        clock.advance(LIFETIME - 60)  # the held pair is due
        fake_nb.rate_window = 280
        fake_nb.fail_token("rate_limited", times=20)
        calls = len(fake_nb.token_requests)
        assert await fetch(gw) == 200  # still valid: served while its refresh failed
        assert len(fake_nb.token_requests) == calls + 1
        if caller == "401":
            fake_nb.expire_access_tokens(SLUG)  # every API call now answers 401
        for _ in range(4):
            clock.advance(10)
            if caller == "background":
                await gw.tokens.refresh_due(lead=60)
            else:
                resp = await gw.client.get(ME)
                await resp.read()
                assert resp.status in (401, 503)
        assert len(fake_nb.token_requests) == calls + 1
        clock.advance(300)
        await gw.tokens.refresh_due(lead=60)
        assert len(fake_nb.token_requests) == calls + 2

    async def test_a_held_pairs_backoff_outlives_storing_it(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A held pair's refresh meets 429 Retry-After 280, then the store takes the pair:
        the stored pair's refresh waits out the rest of that Retry-After (it called the
        endpoint again at once)."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        with monkeypatch.context() as m:
            m.setattr(gw.store, "refresh_lock", store_away)
            clock.advance(LIFETIME - 60)
            fake_nb.rate_window = 280
            fake_nb.fail_token("rate_limited", times=10)
            calls = len(fake_nb.token_requests)
            assert await fetch(gw) == 200
            assert len(fake_nb.token_requests) == calls + 1
        clock.advance(5)
        await gw.tokens.persist_pending(force=True)
        assert gw.tokens.unpersisted == []
        clock.advance(35)  # past the guard against refreshing a pair stored moments ago
        await gw.tokens.refresh_due(lead=60)
        assert await fetch(gw) == 200  # valid for 20 s more
        assert len(fake_nb.token_requests) == calls + 1

    async def test_a_refresh_token_from_a_memory_refresh_stored_alone_needs_no_more_wait(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A refresh of the held pair from memory rotates, but its answer is refused (a
        `mac` token): the new refresh token is held alone. Once the store takes it (its
        refusal recorded in the row), the next request past that refresh's backoff
        refreshes at once: the process does not take its own write for another process's
        failure."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        with monkeypatch.context() as m:
            m.setattr(gw.store, "refresh_lock", store_away)
            clock.advance(LIFETIME - 60)
            fake_nb.mangle_token_answers({"token_type": "mac"})
            await fetch(gw)
            assert gw.tokens._unpersisted[SLUG].tokens is None
        clock.advance(5.0)  # past that refresh's backoff (2 s at most after one failure)
        assert await fetch(gw) == 200
        assert gw.tokens.unpersisted == []
        sent = refresh_tokens_sent(fake_nb)
        assert len(sent) == len(set(sent)) == 3

    async def test_a_hung_store_holds_a_refresh_from_memory_at_most_once(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """With the store hung, a forced refresh of a held pair (a 401) tries the store
        once before its first token call, and later ones leave it to its retry schedule:
        a request waits for the store's timeout at most once, not before and after every
        token call."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        attempts: list[str] = []

        def hung(slug: str) -> contextlib.AbstractAsyncContextManager[Any]:
            attempts.append(slug)  # stands for a busy or statement timeout
            raise StoreUnavailable("database gateway.db cannot be written: database is locked")

        monkeypatch.setattr(gw.store, "refresh_lock", hung)
        for expected in (1, 1, 1):
            await gw.tokens.force_refresh(SLUG, -1)
            assert len(attempts) == expected
        clock.advance(60)  # the store's retry is due
        await gw.tokens.force_refresh(SLUG, -1)
        assert len(attempts) == 2

    async def test_an_admin_refresh_the_store_refuses_keeps_the_held_pairs_backoff(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An admin's "Refresh now" that fails at once (the store cannot be read) leaves
        the held pair's backoff (429 Retry-After 280) in place: the background round
        does not call the endpoint meanwhile."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        monkeypatch.setattr(gw.store, "refresh_lock", store_away)
        clock.advance(LIFETIME - 60)
        fake_nb.rate_window = 280
        fake_nb.fail_token("rate_limited", times=20)
        calls = len(fake_nb.token_requests)
        assert await fetch(gw) == 200
        assert len(fake_nb.token_requests) == calls + 1

        async def unreadable(slug: str) -> Any:
            raise StoreUnavailable("database gateway.db cannot be reached")

        monkeypatch.setattr(gw.store, "get_account", unreadable)
        with pytest.raises(StoreUnavailable):
            await gw.tokens.refresh_now(SLUG)
        clock.advance(5)
        await gw.tokens.refresh_due(lead=60)
        assert len(fake_nb.token_requests) == calls + 1

    async def test_a_request_does_not_wait_for_a_hung_store_after_the_background_retry(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The background retry is waiting on a hung store when a request for the
        expired held pair arrives: the request waits for that attempt, then does not
        make one of its own (two store timeouts in a row)."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        attempts: list[str] = []

        @contextlib.asynccontextmanager
        async def hung(slug: str) -> AsyncIterator[Any]:
            attempts.append(slug)
            await asyncio.sleep(0.3)  # stands for a busy timeout
            raise StoreUnavailable("database gateway.db cannot be written: database is locked")
            yield  # type: ignore[unreachable]  # pragma: no cover

        monkeypatch.setattr(gw.store, "refresh_lock", hung)
        clock.advance(LIFETIME + 10)  # the held token expired; the store's retry is due
        retry = asyncio.create_task(gw.tokens.persist_pending())
        await asyncio.sleep(0.05)
        assert await fetch(gw) == 200  # refreshed from memory
        await retry
        assert len(attempts) == 1

    async def test_a_refresh_held_in_memory_ends_the_backoff_of_the_failure_before(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A refresh fails, the next succeeds but its pair is held in memory: the failure's
        backoff is over, so its retry a moment later does not rotate the pair issued a
        second before."""
        gw = await gateway_factory()
        await connect_account(gw, SLUG)
        clock.advance(LIFETIME + 1)  # expired
        fake_nb.fail_token("server_error")
        assert await fetch(gw) == 503
        clock.advance(5)
        fail_first_save(monkeypatch, Path(), gw.store)
        assert await fetch(gw) == 200
        assert gw.tokens.unpersisted == [SLUG]
        monkeypatch.setattr(gw.store, "refresh_lock", store_away)
        calls = len(fake_nb.token_requests)
        clock.advance(1)
        await gw.tokens.retry_after_backoff()
        assert len(fake_nb.token_requests) == calls

    async def test_two_attempts_to_store_one_held_pair_take_turns(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The background retry and an admin's "Refresh now" both set out to store the
        pair held in memory. They take turns: the second finds it stored and refreshes
        the stored pair under the lock, so the newest pair NationBuilder issued is the one
        stored and nothing raises (it was a 500 and a spent token stored)."""
        gw = await gateway_factory()
        await connect_account(gw, SLUG)
        cls = lock_class(Path())
        original = cls.save_tokens
        calls = 0
        second_set_out, first_done = asyncio.Event(), asyncio.Event()

        async def save_tokens(self: Any, tokens: Any) -> Any:
            # The order that lost the pair: the retry's commit lands between the admin's
            # read and its commit. (Taking turns, the admin's never starts meanwhile.)
            nonlocal calls
            calls += 1
            if calls == 1:  # the refresh's own commit fails: the pair is held in memory
                raise StoreUnavailable("database is full")
            if calls == 2:  # the background retry: until the admin's attempt set out
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(second_set_out.wait(), 0.5)
                try:
                    return await original(self, tokens)
                finally:
                    first_done.set()
            if calls == 3:
                second_set_out.set()
                await asyncio.wait_for(first_done.wait(), 5)
            return await original(self, tokens)

        monkeypatch.setattr(cls, "save_tokens", save_tokens)
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        clock.advance(2.0)
        retry = asyncio.create_task(gw.tokens.persist_pending(force=True))
        for _ in range(200):
            if calls >= 2:
                break
            await asyncio.sleep(0.01)
        admin = asyncio.create_task(gw.tokens.refresh_now(SLUG))
        results = await asyncio.gather(retry, admin, return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert gw.tokens.unpersisted == []
        # The stored refresh token is the live one: the next refresh with it succeeds.
        clock.advance(LIFETIME)
        assert await fetch(gw) == 200
        account = await gw.store.get_account(SLUG)
        assert account is not None and account.status is AccountStatus.ACTIVE

    @pytest.mark.parametrize("answer", ["pair", "refused, rotated"])
    async def test_a_late_pair_lands_over_the_refusal_of_the_process_that_took_over(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        answer: str,
    ) -> None:
        """A (on another host, as B sees it) sends the refresh token and stalls past its
        lease; B takes the refresh over, sends the same token, is refused (NationBuilder
        rotated it for A) and marks the account. A's result, stored late, is the only live
        one: it is kept (held, then stored over the refusal), not dropped as if an admin
        had connected the nation again, and the account is active again. So when A's
        answer was refused but rotated (a `mac` token): only its new refresh token is
        kept, which nobody has sent, and the account is refreshed with it instead of
        waiting for an admin to re-authorize a healthy account. Until it is stored, A
        does not take B's mark for its own."""
        from nbgateway.store import sqlite as sqlite_store

        settings = settings_factory()
        a, b, _ = await two_processes(gateway_factory, settings, connect_account)
        elsewhere(monkeypatch)
        marked = asyncio.Event()
        method = "save_tokens" if answer == "pair" else "save_refresh_token"
        save, mark = getattr(sqlite_store._Lease, method), sqlite_store._Lease.mark_needs_reauth

        async def stalled_save(self: Any, *args: Any) -> Any:
            if self._store is a.store:
                await marked.wait()  # A stalled until B has marked the account
            return await save(self, *args)

        async def mark_needs_reauth(self: Any, message: str) -> None:
            await mark(self, message)
            marked.set()

        monkeypatch.setattr(sqlite_store._Lease, method, stalled_save)
        monkeypatch.setattr(sqlite_store._Lease, "mark_needs_reauth", mark_needs_reauth)
        clock.advance(LIFETIME)
        if answer != "pair":
            fake_nb.mangle_token_answers({"token_type": "mac"})
        fake_nb.hold_tokens()
        from_a = asyncio.create_task(fetch(a))
        await fake_nb.wait_for_pending_tokens(1)
        clock.advance(a.store.lease + 1)
        from_b = asyncio.create_task(fetch(b))
        await fake_nb.wait_for_pending_tokens(2)
        fake_nb.release_tokens()  # A's call is answered first: B's meets invalid_grant
        assert await from_a == (200 if answer == "pair" else 503)
        assert await from_b == 401  # what B saw then
        assert a.tokens.unpersisted == [SLUG]  # held, not dropped
        await a.tokens.sync(force=True)  # A sees B's mark: the held result outranks it
        assert a.metric(NEEDS_REAUTH, account=SLUG) != 1
        fake_nb.mangle_token_answers({})
        clock.advance(2.0)
        await a.tokens.persist_pending()  # the background retry: over the refusal
        assert a.tokens.unpersisted == []
        live = await stored_refresh_token(a)
        assert live not in refresh_tokens_sent(fake_nb)
        account = await a.store.get_account(SLUG)
        assert account is not None and account.status is AccountStatus.ACTIVE
        clock.advance(600.0)  # a refusal's backoff is over
        assert await fetch(a) == 200
        await b.tokens.sync(force=True)
        assert await fetch(b) == 200
        clock.advance(LIFETIME)
        assert await fetch(b) == 200  # the stored refresh token is the live one
        assert live in refresh_tokens_sent(fake_nb)

    async def test_no_token_call_starts_once_the_gateway_is_stopping(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A's refresh waits for B's lock when SIGTERM reaches A; B's call then fails. A,
        stopping, does not make a token call of its own that its close would not wait for
        (cut off, NationBuilder may have rotated): that request gets a 503 and the stored
        refresh token stays the live one."""
        settings = settings_factory()
        a, b, _ = await two_processes(gateway_factory, settings, connect_account)
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        from_b = asyncio.create_task(fetch(b))  # B holds the lock; its call is held
        await fake_nb.wait_for_pending_tokens(1)
        from_a = asyncio.create_task(fetch(a))  # A waits for B's lock
        await asyncio.sleep(0.3)
        closing = asyncio.create_task(a.tokens.close(1.0))
        fake_nb.fail_token("server_error")
        fake_nb.release_tokens()
        await closing
        assert await from_a == 503
        assert await from_b == 503
        assert len(refresh_tokens_sent(fake_nb)) == 1  # B's only
        assert fake_nb.pending_token_requests == 0
        clock.advance(10)
        assert await fetch(b) == 200  # B's retry: the stored token was never spent

    async def test_a_process_that_waits_for_the_held_pair_serves_the_stored_valid_token(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A holds a pair its store refused (the marker kept); B, started later with
        nothing cached, gets a request while the stored access token is due but still
        valid. B does not hold that request for as long as it waits for A (twice the
        lease): after MARGIN_WAIT it goes on with the stored token, and adopts A's pair
        once A stores it."""
        settings = settings_factory()
        a = await gateway_factory(settings)
        issued = await connect_account(a, SLUG)
        fail_first_save(monkeypatch, Path(), a.store)
        clock.advance(LIFETIME - 60)  # inside the margin, valid for another minute
        await a.tokens.refresh_now(SLUG)
        assert a.tokens.unpersisted == [SLUG]
        b = await gateway_factory(settings)
        assert await asyncio.wait_for(fetch(b), 10) == 200
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"]]
        await a.tokens.persist_pending(force=True)
        for _ in range(500):
            if not b.tokens._inflight:
                break
            await asyncio.sleep(0.01)
        assert not b.tokens._inflight
        assert await fetch(b) == 200
        assert bearer(fake_nb.api_requests[-1]) != issued["access_token"]
        assert refresh_tokens_sent(fake_nb) == [issued["refresh_token"]]

    async def test_kept_markers_outlast_a_long_run_of_failing_writes(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        any_database: Path | str,
    ) -> None:
        """A holds four nations' pairs its store keeps refusing while locks are still
        granted (a full disk, a statement timeout), each failing write taking a third of
        a lease; B runs on another host, so it cannot tell whether A still runs and goes by
        the markers' deadlines alone. A's retries renew each marker before it lapses,
        however far apart its growing backoff would put them, and one nation's slow
        failure does not hold back another's retry: B never takes a refresh over (it would
        send the spent refresh token: needs-reauth, and with family revocation a dead
        account), and adopts the pairs once A stores them. (Lease and retry base are
        scaled down so that the run takes seconds; the fake clock follows real time,
        PostgreSQL's deadline being on its own clock.)"""
        fake_nb.revoke_family_on_reuse = True
        slugs = ["acme", "beta", "gamma", "delta"]
        settings = settings_factory(database=any_database)
        a = await gateway_factory(settings)
        b = await gateway_factory(settings)
        issued = {slug: await connect_account(a, slug) for slug in slugs}
        await b.tokens.sync(force=True)
        elsewhere(monkeypatch)
        lease = 2.0
        a.store.lease = b.store.lease = lease
        monkeypatch.setattr(tokens_module, "PERSIST_RETRY_BASE", 0.1)
        cls = lock_class(any_database)
        original = cls.save_tokens
        refusing = [True]

        async def save_tokens(self: Any, tokens: Any) -> Any:
            if self._store is a.store and refusing[0]:
                await asyncio.sleep(lease / 3)  # waited for the database, then failed
                raise StoreUnavailable("database cannot be written: statement timeout")
            return await original(self, tokens)

        monkeypatch.setattr(cls, "save_tokens", save_tokens)
        clock.advance(LIFETIME)
        answers = await asyncio.gather(*(fetch(a, f"/n/{slug}{ME}") for slug in slugs))
        assert answers == [200] * len(slugs)
        assert a.tokens.unpersisted == sorted(slugs)
        loop = asyncio.get_running_loop()
        failures = 0
        for _ in range(10):  # A's background round
            started = loop.time()
            await asyncio.sleep(lease / 8)
            await a.tokens.persist_pending()
            clock.advance(loop.time() - started)
            failures = min(a.tokens._unpersisted[slug].failures for slug in slugs)
            taken = await asyncio.gather(*(takes_over(b.store, slug) for slug in slugs))
            assert not any(taken), f"B took over {dict(zip(slugs, taken, strict=True))}"
        assert failures >= 4  # the backoff alone would have let the markers lapse by then
        refusing[0] = False
        await a.tokens.persist_pending(force=True)
        assert a.tokens.unpersisted == []
        sent = refresh_tokens_sent(fake_nb)
        for slug in slugs:
            assert await fetch(b, f"/n/{slug}{ME}") == 200
            assert sent.count(issued[slug]["refresh_token"]) == 1

    async def test_a_failed_read_while_storing_a_held_pair_keeps_the_marker(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        any_database: Path | str,
    ) -> None:
        """A retry to store a held pair gets its lock, but the read under it fails (a
        statement cancelled, a read timeout). The marker stays for the other processes:
        B waits instead of sending the spent refresh token, and adopts the pair once A
        stores it."""
        fake_nb.revoke_family_on_reuse = True
        settings = settings_factory(database=any_database)
        a, b, issued = await two_processes(gateway_factory, settings, connect_account)
        fail_first_save(monkeypatch, any_database, a.store)
        clock.advance(LIFETIME)
        assert await fetch(a) == 200
        assert a.tokens.unpersisted == [SLUG]
        cls = lock_class(any_database)
        original = cls.read
        failed: list[bool] = []

        async def read(self: Any) -> Any:
            if self._store is a.store and not failed:
                failed.append(True)
                raise StoreUnavailable("database cannot be read: canceling statement")
            return await original(self)

        monkeypatch.setattr(cls, "read", read)
        await a.tokens.persist_pending(force=True)
        assert failed and a.tokens.unpersisted == [SLUG]
        [info] = await b.store.list_accounts()
        assert info.refresh_started_at is not None  # the marker is kept
        await a.tokens.persist_pending(force=True)
        assert a.tokens.unpersisted == []
        assert await fetch(b) == 200
        assert refresh_tokens_sent(fake_nb).count(issued["refresh_token"]) == 1

    async def test_a_cancelled_attempt_to_store_a_held_pair_keeps_the_marker(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: SettingsFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        any_database: Path | str,
    ) -> None:
        """An attempt to store a held pair is cancelled inside its write (a stop cut short
        by its grace): the marker stays, so the other processes go on waiting for the
        pair (or, once this one is gone, know the stored refresh token may be spent)."""
        settings = settings_factory(database=any_database)
        a, b, _ = await two_processes(gateway_factory, settings, connect_account)
        fail_first_save(monkeypatch, any_database, a.store)
        clock.advance(LIFETIME)
        assert await fetch(a) == 200
        assert a.tokens.unpersisted == [SLUG]
        cls = lock_class(any_database)
        original = cls.save_tokens
        writing = asyncio.Event()

        async def hung(self: Any, tokens: Any) -> Any:
            writing.set()
            await asyncio.Event().wait()  # never answers

        monkeypatch.setattr(cls, "save_tokens", hung)
        attempt = asyncio.create_task(a.tokens.persist_pending(force=True))
        await asyncio.wait_for(writing.wait(), 10)
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attempt
        [info] = await b.store.list_accounts()
        assert info.refresh_started_at is not None
        monkeypatch.setattr(cls, "save_tokens", original)
        await a.tokens.persist_pending(force=True)
        assert a.tokens.unpersisted == []

    async def test_a_refused_rotation_held_alone_honours_the_backoff_of_its_failure(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A refresh's answer is refused but rotated (a `mac` token), and the store refuses
        the new refresh token too: it is held alone. The failure backs off: the next
        request, the store still away, makes no token call from memory at once, as none
        would be made for a stored pair in the same state."""
        gw = await gateway_factory()
        await connect_account(gw, SLUG)
        fail_first_save(monkeypatch, Path(), gw.store, method="save_refresh_token")
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"token_type": "mac"})
        assert await fetch(gw) == 503
        assert gw.tokens.unpersisted == [SLUG]
        calls = len(fake_nb.token_requests)
        monkeypatch.setattr(gw.store, "refresh_lock", store_away)
        assert await fetch(gw) == 503  # still inside the backoff: no valid token either
        assert len(fake_nb.token_requests) == calls
        fake_nb.mangle_token_answers({})
        clock.advance(600.0)
        assert await fetch(gw) == 200  # after it, refreshed from memory
        assert len(fake_nb.token_requests) == calls + 1

    async def test_a_refused_rotation_from_memory_serves_the_still_valid_token(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A held pair is due but valid for another minute, the store away. Its refresh
        from memory is refused but rotated (a `mac` token): the new refresh token is held
        alone, and the valid access token serves on, for that request and the next ones
        while the failure backs off, as a stored pair's would."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        held = gw.tokens._unpersisted[SLUG].tokens
        assert held is not None
        monkeypatch.setattr(gw.store, "refresh_lock", store_away)
        clock.advance(LIFETIME - 60)
        fake_nb.mangle_token_answers({"token_type": "mac"})
        calls = len(fake_nb.token_requests)
        for _ in range(3):
            assert await fetch(gw) == 200
            assert bearer(fake_nb.api_requests[-1]) == held.access_token.reveal()
        assert len(fake_nb.token_requests) == calls + 1
        assert gw.tokens._unpersisted[SLUG].tokens is None  # the new refresh token alone

    async def test_a_sync_leaves_the_held_token_cached(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Another process's commit makes `sync` reload; the held token (newer than the
        row) stays cached, so requests go on without waiting for a hung store while the
        pair's retry is due."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        assert gw.tokens.cached_token(SLUG) is not None
        await gw.tokens.sync(force=True)
        assert gw.tokens.cached_token(SLUG) is not None

        @contextlib.asynccontextmanager
        async def hung(slug: str) -> AsyncIterator[Any]:
            await asyncio.sleep(6.0)  # stands for a busy timeout
            if slug:  # always: the lock is never granted
                raise StoreUnavailable("database gateway.db cannot be written: database is locked")
            yield None

        monkeypatch.setattr(gw.store, "refresh_lock", hung)
        clock.advance(5.0)  # the pair's retry is due (the background round is not running)
        assert await asyncio.wait_for(fetch(gw), 2.0) == 200

    async def test_a_401_on_the_held_token_is_not_answered_with_that_token(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The held pair's refresh from memory backs off (429, Retry-After 280). A 401 on
        the held token comes when the store is back: the pair is stored, and the stored
        row's token, the one NationBuilder just refused, is not handed back as a cure;
        the refresh waits for its backoff, as a stored pair's does."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        with monkeypatch.context() as m:
            m.setattr(gw.store, "refresh_lock", store_away)
            clock.advance(LIFETIME - 60)
            fake_nb.rate_window = 280
            fake_nb.fail_token("rate_limited", times=10)
            assert await fetch(gw) == 200
        calls = len(fake_nb.token_requests)
        clock.advance(5)  # the store's retry is due; the refresh's backoff is not
        with pytest.raises(RefreshBackoff):
            await gw.tokens.force_refresh(SLUG, -1)
        assert gw.tokens.unpersisted == []  # stored
        assert len(fake_nb.token_requests) == calls

    @pytest.mark.parametrize("where", ["tokens", "proxy"])
    async def test_a_401_on_the_held_token_stored_by_the_background_round(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        where: str,
    ) -> None:
        """A request goes out with the held token; meanwhile the background round stores
        the pair; NationBuilder answers 401 (token expired). The refresh after the 401
        does not hand back the row's token, the one just refused: it refreshes, and the
        request's retry gets 200."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        held = gw.tokens._unpersisted[SLUG].tokens
        assert held is not None
        if where == "tokens":
            await gw.tokens.persist_pending(force=True)
            assert gw.tokens.unpersisted == []
            token = await gw.tokens.force_refresh(SLUG, -1)
            assert token.access_token != held.access_token
            return
        original = gw.tokens.force_refresh

        async def stored_meanwhile(slug: str, stale: int | None) -> Any:
            await gw.tokens.persist_pending(force=True)  # the background round, meanwhile
            return await original(slug, stale)

        monkeypatch.setattr(gw.tokens, "force_refresh", stored_meanwhile)
        fake_nb.expire_access_tokens(SLUG)
        calls = len(fake_nb.token_requests)
        assert await fetch(gw) == 200
        assert len(fake_nb.token_requests) == calls + 1

    async def test_a_401_on_the_held_token_joining_a_plain_token_call(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The background round stored the held pair. A new request asks for a token (a
        plain call reading the row) while one that went out with the held token gets a
        401: joining the plain call, it is not handed the row's token, the one refused."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        held = gw.tokens._unpersisted[SLUG].tokens
        assert held is not None
        await gw.tokens.persist_pending(force=True)
        assert gw.tokens.unpersisted == []
        assert await gw.tokens.newer_token(SLUG, -1) is None  # the row's is the one refused
        original = gw.store.get_account

        async def slow_get(slug: str) -> Any:
            await asyncio.sleep(0.05)
            return await original(slug)

        monkeypatch.setattr(gw.store, "get_account", slow_get)
        plain = asyncio.create_task(gw.tokens.access_token(SLUG))
        await asyncio.sleep(0)  # its task is in flight
        after_401 = await gw.tokens.force_refresh(SLUG, -1)
        await plain
        assert after_401.access_token != held.access_token

    @pytest.mark.parametrize("where", ["tokens", "proxy"])
    async def test_a_401_on_the_held_token_joining_a_plain_call_that_stores_it(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        where: str,
    ) -> None:
        """The held pair is due; another request's plain call stores it (and hands out the
        row's token, the held one) while a request that went out with the held token gets
        a 401 and joins that call: it is not handed the row's token, the one refused, but
        refreshes (through the proxy: the retry gets 200)."""
        gw = await gateway_factory()
        await hold_a_pair(gw, connect_account, clock, monkeypatch)
        held = gw.tokens._unpersisted[SLUG].tokens
        assert held is not None
        original_get = gw.store.get_account

        async def slow_get(slug: str) -> Any:
            await asyncio.sleep(0.05)
            return await original_get(slug)

        def another_request() -> asyncio.Task[Any]:
            clock.advance(held.expires_at - clock.now() - gw.tokens.margin / 2)  # due, valid
            monkeypatch.setattr(gw.store, "get_account", slow_get)
            return asyncio.create_task(gw.tokens.access_token(SLUG))

        if where == "tokens":
            plain = another_request()
            await asyncio.sleep(0)
            assert gw.tokens.unpersisted == [SLUG]  # still held when the 401 comes back
            after_401 = await gw.tokens.force_refresh(SLUG, -1)
            assert (await plain).access_token == held.access_token
            assert after_401.access_token != held.access_token
            return
        original = gw.tokens.force_refresh
        others: list[asyncio.Task[Any]] = []

        async def meanwhile(slug: str, stale: int | None) -> Any:
            others.append(another_request())
            await asyncio.sleep(0)
            return await original(slug, stale)

        monkeypatch.setattr(gw.tokens, "force_refresh", meanwhile)
        fake_nb.expire_access_tokens(SLUG)
        assert await fetch(gw) == 200
        await asyncio.gather(*others)

    async def test_a_401_on_a_held_token_stored_since_is_held_back_like_a_stored_ones(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The refresh after a 401 made a pair the store refused (held, generation -1),
        stored since by the background round: a 401 on that token for a request that
        cannot be replayed causes no second rotation within MIN_REFRESH_INTERVAL, as for a
        pair stored at once."""
        gw = await gateway_factory()
        await connect_account(gw, SLUG)
        token = await gw.tokens.access_token(SLUG)
        fail_first_save(monkeypatch, Path(), gw.store)
        fresh = await gw.tokens.force_refresh(SLUG, token.generation)
        assert fresh.generation == -1 and gw.tokens.unpersisted == [SLUG]
        assert not gw.tokens.may_cure_401(SLUG, -1, replayable=False)
        await gw.tokens.persist_pending(force=True)
        stored = await gw.tokens.access_token(SLUG)
        assert stored.access_token == fresh.access_token
        assert not gw.tokens.may_cure_401(SLUG, stored.generation, replayable=False)

    async def test_a_held_pair_is_retried_while_the_start_recovers_another_account(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The background loop begins by recovering interrupted refreshes, which may wait
        (a lock held elsewhere, a slow token endpoint). A pair held meanwhile (another
        account's refresh could not store it) is retried all the same: the retries that
        renew its kept marker do not wait for the recovery."""
        gw = await gateway_factory()
        await connect_account(gw, "acme")
        await connect_account(gw, "beta")
        async with gw.store.refresh_lock("beta") as locked:  # a stopped refresh of beta
            await locked.begin_refresh()
            locked.keep()
        blocked, release = asyncio.Event(), asyncio.Event()
        original = gw.tokens._call_token_endpoint

        async def call(slug: str, refresh_token: Any) -> Any:
            if slug == "beta":
                blocked.set()
                await release.wait()  # the recovery waits
            return await original(slug, refresh_token)

        monkeypatch.setattr(gw.tokens, "_call_token_endpoint", call)
        runner = asyncio.create_task(gw.tokens.run(refresh_interval=30.0, sync_interval=0.05))
        try:
            await asyncio.wait_for(blocked.wait(), 5)
            fail_first_save(monkeypatch, Path(), gw.store)
            clock.advance(LIFETIME)
            assert await fetch(gw, f"/n/acme{ME}") == 200
            assert gw.tokens.unpersisted == ["acme"]
            for _ in range(10):  # well past the first retry, on both clocks
                clock.advance(1.0)
                await asyncio.sleep(0.1)
            assert gw.tokens.unpersisted == []
        finally:
            release.set()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def test_a_held_pair_from_an_answer_that_did_not_rotate_is_stored(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """NationBuilder's answer kept the refresh token (none in it), and the store refused
        the new access token: storing the held pair later writes that access token, not
        "had been stored after all" for a row still holding the old one."""
        gw = await gateway_factory()
        await connect_account(gw, SLUG)
        fail_first_save(monkeypatch, Path(), gw.store)
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"refresh_token": None})
        assert await fetch(gw) == 200
        held = gw.tokens._unpersisted[SLUG].tokens
        assert held is not None
        with caplog.at_level(logging.INFO, logger="nbgateway"):
            await gw.tokens.persist_pending(force=True)
        assert gw.tokens.unpersisted == []
        assert "stored the held token pair" in caplog.messages
        account = await gw.store.get_account(SLUG)
        assert account is not None and account.access_token == held.access_token
