"""TokenManager behaviour through the real gateway and the fake NationBuilder on sockets.

Time moves only with the shared FakeClock. Races are staged with the fake's switches
(hold_tokens, fail_token) and waited for by state, never by sleeping for time to pass.
Two gateways on one database file stand in for two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from conftest import CLIENT_ID, CLIENT_SECRET, PUBLIC_URL, ConnectAccount, Gateway, GatewayFactory

from nbgateway.clock import FakeClock
from nbgateway.config import Settings
from nbgateway.errors import (
    AccountNotFound,
    ReauthorizationRequired,
    RefreshBackoff,
    StoreUnavailable,
)
from nbgateway.fakenb import FakeNationBuilder, RecordedRequest
from nbgateway.models import AccountStatus, EventKind
from nbgateway.redact import Secret
from nbgateway.services import store_for
from nbgateway.store import SQLiteStore
from nbgateway.tokens import Backoff, IssuedToken

SLUG = "acme"
ME = "/api/v2/signups/me"
LIFETIME = 86400.0  # the fake's access-token lifetime
MARGIN = 300.0  # the default NBGW_REFRESH_MARGIN

REFRESH_TOTAL = "nbgw_token_refresh_total"
COALESCED = "nbgw_token_refresh_coalesced_total"
NEEDS_REAUTH = "nbgw_account_needs_reauth"
EXPIRY = "nbgw_access_token_expiry_timestamp_seconds"
LAST_SUCCESS = "nbgw_account_last_refresh_success_timestamp_seconds"
LAST_FAILURE = "nbgw_account_last_refresh_failure_timestamp_seconds"


def bearer(record: RecordedRequest) -> str:
    """The access token a recorded upstream request carried."""
    return record.headers["Authorization"].removeprefix("Bearer ")


async def fetch(gw: Gateway, path: str = ME) -> int:
    """GET through the gateway; the status once the body is read."""
    resp = await gw.client.get(path)
    await resp.read()
    return resp.status


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until `predicate` holds; bounded so a hang fails by name."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


async def stored_access_token(gw: Gateway, slug: str = SLUG) -> str:
    account = await gw.store.get_account(slug)
    assert account is not None and account.access_token is not None
    return account.access_token.reveal()


async def stored_refresh_token(gw: Gateway, slug: str = SLUG) -> str:
    account = await gw.store.get_account(slug)
    assert account is not None and account.refresh_token is not None
    return account.refresh_token.reveal()


async def refresh_status_at_fake(fake_nb: FakeNationBuilder, refresh_token: str) -> int:
    """What the fake's token endpoint answers to a refresh grant with this refresh token."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake_nb.nation_url(SLUG)}/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
        ) as resp,
    ):
        return resp.status


def spy_refresh_lock(monkeypatch: pytest.MonkeyPatch, gw: Gateway) -> list[str]:
    """Record each time `gw` asks its store for the cross-process refresh lock."""
    asked: list[str] = []
    original = gw.store.refresh_lock

    def refresh_lock(slug: str) -> Any:
        asked.append(slug)
        return original(slug)

    monkeypatch.setattr(gw.store, "refresh_lock", refresh_lock)
    return asked


@pytest.fixture
def shared_settings(settings_factory: Callable[..., Settings]) -> Settings:
    """One database file and key for every gateway of a test (several "processes")."""
    return settings_factory()


@pytest.fixture
async def pair(
    gateway_factory: GatewayFactory,
    shared_settings: Settings,
    connect_account: ConnectAccount,
) -> tuple[Gateway, Gateway]:
    """Two gateways on one database, the account connected via the first, both caches warm."""
    a = await gateway_factory(shared_settings)
    b = await gateway_factory(shared_settings)
    await connect_account(a, SLUG)
    await a.tokens.sync(force=True)
    await b.tokens.sync(force=True)
    assert await fetch(a) == 200
    assert await fetch(b) == 200
    return a, b


class TestCoalescing:
    async def test_hundred_requests_on_an_expired_token_make_one_token_call(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """100 concurrent requests with an expired token share one refresh and its new token."""
        issued = await connect_account(gateway, SLUG)
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        tasks = [asyncio.create_task(fetch(gateway)) for _ in range(100)]
        await fake_nb.wait_for_pending_tokens(1)
        await eventually(
            lambda: gateway.metric(COALESCED, account=SLUG) >= 99, "99 coalesced waiters"
        )
        fake_nb.release_tokens()
        statuses = await asyncio.gather(*tasks)

        assert statuses == [200] * 100
        assert len(fake_nb.token_requests) == 1
        assert gateway.metric(COALESCED, account=SLUG) == 99
        new_token = await stored_access_token(gateway)
        assert new_token != issued["access_token"]
        assert [bearer(r) for r in fake_nb.api_requests] == [new_token] * 100
        assert gateway.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1

    async def test_waiters_count_for_an_account_stored_since_the_last_sync(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """An account another process stored moments ago, not yet in this process's list:
        the requests that wait for its refresh are still counted as coalesced."""
        a = await gateway_factory(shared_settings)
        b = await gateway_factory(shared_settings)
        await connect_account(a, SLUG)
        assert b.tokens.account_count() == 0  # b has not listed it yet
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        tasks = [asyncio.create_task(fetch(b, f"/n/{SLUG}{ME}")) for _ in range(10)]
        await fake_nb.wait_for_pending_tokens(1)
        # In flight means joined: nothing awaits between the count and the join.
        await eventually(
            lambda: b.metric("nbgw_proxy_in_flight_requests") == 10, "10 requests in flight"
        )
        assert b.metric(COALESCED, account=SLUG) == 0  # counted once the refresh is over
        fake_nb.release_tokens()

        assert await asyncio.gather(*tasks) == [200] * 10
        assert len(fake_nb.token_requests) == 1
        assert b.metric(COALESCED, account=SLUG) == 9

    async def test_an_unknown_slug_gets_no_coalesced_label(
        self, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Concurrent requests for a slug that is no account: 404s, and no series for it."""
        statuses = await asyncio.gather(*(fetch(gateway, f"/n/nobody{ME}") for _ in range(5)))
        assert statuses == [404] * 5
        assert gateway.registry.get_sample_value(COALESCED, {"account": "nobody"}) is None


class TestSingleFlight:
    async def test_forced_waiters_on_a_non_forced_task_share_one_new_task(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Several 401 retries that joined a task returning the rejected generation start one
        forced task between them, not one each."""
        tokens = gateway.tokens
        calls: list[bool] = []
        gate = asyncio.Event()

        async def obtain(slug: str, force: bool, stale: int | None) -> IssuedToken:
            calls.append(force)
            await gate.wait()
            return IssuedToken(Secret("token-value-0123"), 2 if force else 1, 1e12, 1e12)

        monkeypatch.setattr(tokens, "_obtain", obtain)
        first = asyncio.create_task(tokens.access_token("acme"))
        await asyncio.sleep(0)
        retries = [asyncio.create_task(tokens.force_refresh("acme", 1)) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(first, *retries)
        assert calls == [False, True]
        assert [r.generation for r in results] == [1, 2, 2, 2]


class TestAcrossProcesses:
    async def test_two_apps_on_one_database_make_one_token_call(
        self,
        pair: tuple[Gateway, Gateway],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Both apps contend for the lock; the loser re-reads the row and adopts the refresh."""
        a, b = pair
        old_token = bearer(fake_nb.api_requests[-1])
        asked_a = spy_refresh_lock(monkeypatch, a)
        asked_b = spy_refresh_lock(monkeypatch, b)
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        fake_nb.clear_recordings()
        ta = asyncio.create_task(fetch(a))
        tb = asyncio.create_task(fetch(b))
        await fake_nb.wait_for_pending_tokens(1)
        # Both read the expired row and asked for the lock: one holds it (its token call is
        # held at the fake), the other waits on SQLite's write lock.
        await eventually(lambda: asked_a == [SLUG] and asked_b == [SLUG], "both at the lock")
        fake_nb.release_tokens()

        assert list(await asyncio.gather(ta, tb)) == [200, 200]
        assert len(fake_nb.token_requests) == 1
        used = {bearer(r) for r in fake_nb.api_requests}
        assert used == {await stored_access_token(a)}
        assert old_token not in used
        refreshes = [gw.metric(REFRESH_TOTAL, account=SLUG, outcome="success") for gw in pair]
        assert sorted(refreshes) == [0, 1]
        kinds = [e.kind for e in await a.store.events(SLUG)]
        assert kinds.count(EventKind.REFRESHED) == 1

    async def test_process_with_a_stale_view_adopts_instead_of_refreshing(
        self,
        pair: tuple[Gateway, Gateway],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A read the old pair before B rotated it; under the lock A adopts B's generation."""
        a, b = pair
        asked_a = spy_refresh_lock(monkeypatch, a)
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        fake_nb.clear_recordings()
        tb = asyncio.create_task(fetch(b))
        await fake_nb.wait_for_pending_tokens(1)  # B holds the lock, its token call is held
        ta = asyncio.create_task(fetch(a))
        # A has read the expired (soon superseded) row and now waits for the lock.
        await eventually(lambda: asked_a == [SLUG], "A at the refresh lock")
        fake_nb.release_tokens()

        assert list(await asyncio.gather(tb, ta)) == [200, 200]
        assert len(fake_nb.token_requests) == 1
        assert a.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 0
        assert a.metric(REFRESH_TOTAL, account=SLUG, outcome="invalid_grant") == 0
        assert a.metric(NEEDS_REAUTH, account=SLUG) == 0
        info = await a.accounts.get(SLUG)
        assert info.status is AccountStatus.ACTIVE
        assert {bearer(r) for r in fake_nb.api_requests} == {await stored_access_token(a)}
        kinds = [e.kind for e in await a.store.events(SLUG)]
        assert EventKind.NEEDS_REAUTH not in kinds

    async def test_start_up_recovery_beside_a_live_refresh_adopts_it_quietly(
        self,
        pair: tuple[Gateway, Gateway],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Workers start together: B's start-up recovery lists the "refresh in flight"
        marker of A's running refresh. It waits for A, adopts A's pair, makes no token call
        and does not warn of a stopped process (that warning is for a holder that died)."""
        a, b = pair
        clock.advance(LIFETIME)
        fake_nb.hold_tokens()
        fake_nb.clear_recordings()
        ta = asyncio.create_task(fetch(a))
        await fake_nb.wait_for_pending_tokens(1)  # A holds the lock, its marker is stored
        info = await b.accounts.get(SLUG)
        assert info.refresh_started_at is not None
        caplog.set_level(logging.INFO, logger="nbgateway.tokens")
        recovery = asyncio.create_task(b.tokens.recover_interrupted())
        await asyncio.sleep(0.2)  # B is waiting for the lock
        fake_nb.release_tokens()

        assert await ta == 200
        assert await recovery == [SLUG]
        assert len(fake_nb.token_requests) == 1
        assert "when a gateway process stopped" not in caplog.text
        assert b.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 0
        assert await fetch(b) == 200
        assert len(fake_nb.token_requests) == 1

    async def test_prefetch_lets_a_process_serve_an_account_while_the_store_is_down(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """B (another worker) has served none of A's accounts. After prefetch it holds the
        valid tokens in memory and serves them with the store down; an account needing
        re-authorization and one due for refresh are not taken."""
        a = await gateway_factory(shared_settings)
        b = await gateway_factory(shared_settings)
        for slug in (SLUG, "beta", "gamma"):
            await connect_account(a, slug)
        async with a.store.refresh_lock("beta") as locked:
            await locked.mark_needs_reauth("revoked")
        fake_nb.clear_recordings()
        await b.tokens.sync(force=True)

        assert await b.tokens.prefetch() == 2
        assert b.tokens.cached_token(SLUG) is not None
        assert b.tokens.cached_token("gamma") is not None
        assert b.tokens.cached_token("beta") is None
        assert fake_nb.token_requests == []
        assert await b.tokens.prefetch() == 0  # held already: nothing read again

        async def down(*_args: Any, **_kwargs: Any) -> Any:
            raise StoreUnavailable("database gone")

        for name in ("get_account", "list_accounts", "refresh_lock", "change_counter"):
            monkeypatch.setattr(b.store, name, down)
        assert await fetch(b, f"/n/{SLUG}{ME}") == 200
        assert await fetch(b, f"/n/gamma{ME}") == 200
        with pytest.raises(StoreUnavailable):
            await b.tokens.prefetch()

    async def test_prefetch_leaves_a_token_due_for_refresh_to_the_refresher(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        a = await gateway_factory(shared_settings)
        b = await gateway_factory(shared_settings)
        await connect_account(a, SLUG)
        clock.advance(LIFETIME - MARGIN / 2)  # inside the refresh margin
        assert await b.tokens.prefetch() == 0
        assert b.tokens.cached_token(SLUG) is None
        assert fake_nb.token_requests == []

    async def test_expired_cache_picks_up_a_pair_rotated_elsewhere(
        self,
        pair: tuple[Gateway, Gateway],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """After B refreshed, A's expired cache adopts B's pair: no token call, no write lock."""
        a, b = pair
        asked_a = spy_refresh_lock(monkeypatch, a)
        clock.advance(LIFETIME)
        assert await fetch(b) == 200
        assert len(fake_nb.token_requests) == 1
        assert await fetch(a) == 200
        assert len(fake_nb.token_requests) == 1
        assert bearer(fake_nb.api_requests[-1]) == await stored_access_token(a)
        assert a.metric(NEEDS_REAUTH, account=SLUG) == 0
        assert asked_a == []

    async def test_upstream_401_after_rotation_elsewhere_adopts_without_refreshing(
        self, pair: tuple[Gateway, Gateway], fake_nb: FakeNationBuilder
    ) -> None:
        """B's refresh killed A's cached access token: A's 401 retry adopts B's pair."""
        a, b = pair
        fake_nb.old_access_token_survives_refresh = False
        await b.accounts.refresh(SLUG)
        assert len(fake_nb.token_requests) == 1
        fake_nb.clear_recordings()

        assert await fetch(a) == 200
        assert fake_nb.token_requests == []
        assert len(fake_nb.api_requests) == 2  # the 401 with the old token, then the retry
        assert bearer(fake_nb.api_requests[-1]) == await stored_access_token(a)
        assert a.metric(NEEDS_REAUTH, account=SLUG) == 0


class TestRotation:
    async def test_rotated_refresh_tokens_survive_cycles_and_a_restart(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Five refreshes each send the latest refresh token; a restart continues from it."""
        gw = await gateway_factory(shared_settings)
        issued = await connect_account(gw, SLUG)
        current = issued["refresh_token"]
        sent: list[str] = []
        for _cycle in range(5):
            clock.advance(LIFETIME - MARGIN + 1)
            assert await fetch(gw) == 200
            assert len(fake_nb.token_requests) == 1
            sent.append(fake_nb.token_requests[-1].params()["refresh_token"])
            assert sent[-1] == current
            assert await refresh_status_at_fake(fake_nb, current) == 400  # rotated: dead
            current = await stored_refresh_token(gw)
            assert current != sent[-1]
            fake_nb.clear_recordings()
        assert len(set(sent)) == 5
        assert gw.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 5

        await gw.client.close()
        restarted = await gateway_factory(shared_settings)
        clock.advance(LIFETIME - MARGIN + 1)
        assert await fetch(restarted) == 200
        assert len(fake_nb.token_requests) == 1
        assert fake_nb.token_requests[-1].params()["refresh_token"] == current
        assert bearer(fake_nb.api_requests[-1]) == await stored_access_token(restarted)
        assert restarted.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1


class TestNeedsReauth:
    async def test_invalid_grant_marks_needs_reauth_and_stops_token_calls(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A dead refresh token: 401 naming /connect, gauge 1, an event, no more token calls."""
        await connect_account(gateway, SLUG)
        fake_nb.revoke(SLUG)
        clock.advance(LIFETIME)

        resp = await gateway.client.get(ME)
        assert resp.status == 401
        assert resp.headers["X-NBGW-Error"] == "account_needs_reauthorization"
        body = await resp.json(content_type=None)
        assert f"{PUBLIC_URL}/connect" in body["errors"][0]["detail"]
        assert len(fake_nb.token_requests) == 1
        assert gateway.metric(REFRESH_TOTAL, account=SLUG, outcome="invalid_grant") == 1
        assert gateway.metric(NEEDS_REAUTH, account=SLUG) == 1
        events = await gateway.store.events(SLUG)
        assert events[0].kind is EventKind.NEEDS_REAUTH
        marked = await gateway.accounts.get(SLUG)
        assert marked.status is AccountStatus.NEEDS_REAUTH
        assert "no usable answer" not in (marked.last_error or "")  # nothing was lost

        assert await fetch(gateway) == 401
        clock.advance(3600)
        assert await fetch(gateway) == 401
        assert await gateway.tokens.refresh_due(lead=LIFETIME) == []
        await gateway.tokens.sync(force=True)
        assert await fetch(gateway) == 401
        assert len(fake_nb.token_requests) == 1
        assert gateway.metric(NEEDS_REAUTH, account=SLUG) == 1

        issued = await connect_account(gateway, SLUG)
        assert await fetch(gateway) == 200
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]
        assert gateway.metric(NEEDS_REAUTH, account=SLUG) == 0

    async def test_invalid_grant_after_an_unanswered_refresh_says_so(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A refresh whose answer was lost (here a 502 page; a timeout or a dropped
        connection alike), then invalid_grant for the same refresh token: NationBuilder
        probably rotated in the lost call, and the reason says that rather than blaming
        another tool."""
        await connect_account(gateway, SLUG)
        fake_nb.fail_token("server_error")
        clock.advance(LIFETIME)
        assert await fetch(gateway) == 503
        fake_nb.revoke(SLUG)  # as if the lost call had rotated the token
        clock.advance(3600)
        assert await fetch(gateway) == 401
        reason = (await gateway.accounts.get(SLUG)).last_error or ""
        assert "got no usable answer" in reason
        assert "invalid_grant" in reason

    async def test_a_rotation_whose_answer_was_lost_says_so(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """NationBuilder rotated in a call whose answer never arrived (the connection
        dropped after the grant): under strict rotation the stored refresh token is dead,
        so the next try gets invalid_grant, and the reason names the lost answer."""
        await connect_account(gateway, SLUG)
        fake_nb.fail_token("lost")
        clock.advance(LIFETIME)
        resp = await gateway.client.get(ME)
        assert resp.status == 503
        clock.advance(int(resp.headers["Retry-After"]))
        assert await fetch(gateway) == 401
        info = await gateway.accounts.get(SLUG)
        assert info.status is AccountStatus.NEEDS_REAUTH
        assert "got no usable answer" in (info.last_error or "")

    async def test_a_lost_answer_is_recovered_when_the_old_refresh_token_survives(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """With Doorkeeper's previous_refresh_token behaviour (the refresh token just used
        stays valid until the new access token is used), the try after a lost answer gets
        a fresh pair with the stored refresh token: the account carries on, needs no
        admin, and the pair it stored keeps refreshing."""
        fake_nb.refresh_token_kept_until_used = True
        await connect_account(gateway, SLUG)
        calls = len(fake_nb.token_requests)
        fake_nb.fail_token("lost")
        clock.advance(LIFETIME)
        resp = await gateway.client.get(ME)
        assert resp.status == 503
        clock.advance(int(resp.headers["Retry-After"]))
        assert await fetch(gateway) == 200
        assert len(fake_nb.token_requests) == calls + 2
        info = await gateway.accounts.get(SLUG)
        assert info.status is AccountStatus.ACTIVE
        assert info.last_error is None
        clock.advance(LIFETIME)  # the kept token is revoked now: the stored pair must work
        assert await fetch(gateway) == 200
        assert len(fake_nb.token_requests) == calls + 3
        assert gateway.metric(NEEDS_REAUTH, account=SLUG) == 0

    async def test_the_next_try_in_another_process_also_says_so(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """The lost answer is noted in the store, so when another process (a worker, a
        replica, `accounts refresh`) makes the next try and gets invalid_grant, its reason
        says the token was probably rotated in that call, not used elsewhere."""
        first = await gateway_factory(shared_settings)
        second = await gateway_factory(shared_settings)
        await connect_account(first, SLUG)
        fake_nb.fail_token("server_error")
        clock.advance(LIFETIME)
        assert await fetch(first) == 503
        fake_nb.revoke(SLUG)  # as if the lost call had rotated the token
        clock.advance(3600)
        await second.tokens.sync(force=True)
        assert await fetch(second) == 401
        reason = (await second.accounts.get(SLUG)).last_error or ""
        assert "got no usable answer" in reason
        assert "invalid_grant" in reason

    @pytest.mark.parametrize("kind", ["rate_limited", "invalid_client"])
    async def test_a_refusal_is_no_lost_answer(
        self,
        kind: str,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A 429 or another 4xx from the token endpoint was an answer that did nothing: a
        later invalid_grant is not put down to NationBuilder rotating in that call."""
        await connect_account(gateway, SLUG)
        fake_nb.fail_token(kind)
        clock.advance(LIFETIME)
        assert await fetch(gateway) == 503
        fake_nb.revoke(SLUG)  # someone else used or revoked the token
        clock.advance(3600)
        assert await fetch(gateway) == 401
        reason = (await gateway.accounts.get(SLUG)).last_error or ""
        assert "invalid_grant" in reason
        assert "no usable answer" not in reason

    async def test_needs_reauth_survives_a_restart(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A restarted gateway knows the account needs re-authorization and calls nobody."""
        gw = await gateway_factory(shared_settings)
        await connect_account(gw, SLUG)
        fake_nb.revoke(SLUG)
        clock.advance(LIFETIME)
        assert await fetch(gw) == 401
        await gw.client.close()

        restarted = await gateway_factory(shared_settings)
        assert restarted.metric(NEEDS_REAUTH, account=SLUG) == 1
        assert await fetch(restarted) == 401
        assert await restarted.tokens.refresh_due(lead=LIFETIME) == []
        assert len(fake_nb.token_requests) == 1

    async def test_admin_refresh_of_a_dead_account_calls_nobody(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Refresh-now on an account that needs re-authorization raises without a token call."""
        await connect_account(gateway, SLUG)
        fake_nb.revoke(SLUG)
        clock.advance(LIFETIME)
        assert await fetch(gateway) == 401
        with pytest.raises(ReauthorizationRequired):
            await gateway.accounts.refresh(SLUG)
        assert len(fake_nb.token_requests) == 1


TRANSIENT = [
    ("server_error", "server_error"),
    ("malformed", "server_error"),
    ("rate_limited", "server_error"),
    ("close", "network_error"),
    ("hang", "timeout"),
]


class TestHungTokenEndpointInTheMargin:
    async def test_a_valid_token_serves_while_its_refresh_hangs(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A token due for refresh but valid for 200 s more, and a token endpoint that
        hangs: the request is answered with that token while the refresh still waits (it
        waited out NBGW_TOKEN_TIMEOUT, and with several processes taking turns at the
        account's lock, 20 s and more); the refresh carries on and fails on its own."""
        gw = await gateway_factory(token_timeout=60.0)
        issued = await connect_account(gw, SLUG)
        assert await fetch(gw) == 200
        clock.advance(LIFETIME - 200)  # inside the margin, still valid
        fake_nb.fail_token("hang")
        status = await asyncio.wait_for(fetch(gw), 30)
        assert status == 200
        assert fake_nb.pending_token_requests == 1  # the refresh is still waiting
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]


class TestTransientFailures:
    @pytest.mark.parametrize(("kind", "outcome"), TRANSIENT)
    async def test_transient_failure_backs_off_without_needs_reauth(
        self,
        kind: str,
        outcome: str,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """503 with Retry-After, outcome counted, account stays active, retried after backoff."""
        gw = await gateway_factory(token_timeout=0.3) if kind == "hang" else await gateway_factory()
        issued = await connect_account(gw, SLUG)
        clock.advance(LIFETIME)
        fake_nb.fail_token(kind)

        resp = await gw.client.get(ME)
        assert resp.status == 503
        assert resp.headers["X-NBGW-Error"] == "token_refresh_failed"
        retry_after = int(resp.headers["Retry-After"])
        assert retry_after >= 1
        assert gw.metric(REFRESH_TOTAL, account=SLUG, outcome=outcome) == 1
        assert gw.metric(NEEDS_REAUTH, account=SLUG) == 0
        failed_at = gw.metric(LAST_FAILURE, account=SLUG)
        assert failed_at == clock.now()  # what the alert compares with the last success
        info = await gw.accounts.get(SLUG)
        assert info.status is AccountStatus.ACTIVE
        assert info.last_error
        event = (await gw.store.events(SLUG))[0]
        assert event.kind is EventKind.REFRESH_FAILED
        for secret in (CLIENT_SECRET, issued["refresh_token"], issued["access_token"]):
            assert secret not in info.last_error
            assert secret not in event.detail
            assert secret not in (await resp.text())

        assert await fetch(gw) == 503  # still backing off: no new call
        assert len(fake_nb.token_requests) == 1

        clock.advance(retry_after)
        assert await fetch(gw) == 200
        assert len(fake_nb.token_requests) == 2
        assert gw.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1
        assert (await gw.accounts.get(SLUG)).last_error is None
        assert gw.metric(LAST_SUCCESS, account=SLUG) > failed_at

    async def test_a_backoff_does_not_move_with_the_wall_clock(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """The wait after a failed refresh is timed on the monotonic clock: the host's
        clock set back an hour does not stop the retries (503 for that hour), nor does a
        step forward cut the wait short."""
        await connect_account(gateway, SLUG)
        clock.advance(LIFETIME + 7200)  # expired two hours ago, whatever the steps below
        fake_nb.fail_token("server_error")
        resp = await gateway.client.get(ME)
        assert resp.status == 503
        retry_after = int(resp.headers["Retry-After"])
        clock.step_wall(3600)  # forward: the backoff is not over for that
        assert await fetch(gateway) == 503
        assert len(fake_nb.token_requests) == 1
        clock.step_wall(-7200)  # back, an hour before the failure
        clock.advance(retry_after)
        assert await fetch(gateway) == 200
        assert len(fake_nb.token_requests) == 2

    async def test_the_token_endpoints_retry_after_is_waited_out(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A 429 from the token endpoint asking for 120 s: no token call before then
        (the backoff alone would retry within seconds), the tools' Retry-After says so,
        and the account's last error names the wait."""
        await connect_account(gateway, SLUG)
        clock.advance(LIFETIME)
        fake_nb.rate_window = 120  # the Retry-After of the fake's 429 page
        fake_nb.fail_token("rate_limited")
        resp = await gateway.client.get(ME)
        assert resp.status == 503
        assert 119 <= int(resp.headers["Retry-After"]) <= 121
        assert "asked to wait 120 s" in ((await gateway.accounts.get(SLUG)).last_error or "")
        clock.advance(60)
        assert await fetch(gateway) == 503
        assert len(fake_nb.token_requests) == 1
        clock.advance(61)
        assert await fetch(gateway) == 200
        assert len(fake_nb.token_requests) == 2

    async def test_still_valid_token_is_used_while_refresh_fails(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Inside the margin but unexpired, a failed refresh leaves requests on the old token."""
        issued = await connect_account(gateway, SLUG)
        assert await fetch(gateway) == 200  # this process has served with the token
        clock.advance(LIFETIME - 100)
        fake_nb.fail_token("server_error")

        assert await fetch(gateway) == 200
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]
        assert len(fake_nb.token_requests) == 1
        assert await fetch(gateway) == 200  # during backoff: old token, no call
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]
        assert len(fake_nb.token_requests) == 1
        assert gateway.metric(REFRESH_TOTAL, account=SLUG, outcome="server_error") == 1

        clock.advance(2.0)  # past a first failure's backoff ceiling; the token is still valid
        assert await fetch(gateway) == 200
        assert len(fake_nb.token_requests) == 2
        assert bearer(fake_nb.api_requests[-1]) == await stored_access_token(gateway)

    async def test_stored_still_valid_token_is_used_when_refresh_fails_after_restart(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A freshly started gateway whose refresh fails serves with the unexpired stored token."""
        setup = await gateway_factory(shared_settings)
        issued = await connect_account(setup, SLUG)
        await setup.client.close()
        clock.advance(LIFETIME - 100)  # inside the margin, not expired
        fake_nb.fail_token("server_error")

        gw = await gateway_factory(shared_settings)
        assert await fetch(gw) == 200
        assert len(fake_nb.token_requests) == 1
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]

    async def test_request_joining_a_failed_background_refresh_keeps_its_valid_token(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A request awaiting the background refresher's failed call still gets the old token."""
        issued = await connect_account(gateway, SLUG)
        clock.advance(LIFETIME - 100)  # inside the margin, not expired
        fake_nb.fail_token("server_error")
        fake_nb.hold_tokens()
        sweep = asyncio.create_task(gateway.tokens.refresh_due(lead=60))
        await fake_nb.wait_for_pending_tokens(1)
        request = asyncio.create_task(fetch(gateway))
        await eventually(lambda: gateway.metric(COALESCED, account=SLUG) == 1, "the waiter")
        fake_nb.release_tokens()

        assert await sweep == [SLUG]
        assert await request == 200
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]

    async def test_backoff_does_not_hide_a_pair_refreshed_elsewhere(
        self, pair: tuple[Gateway, Gateway], fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """A is backing off; B refreshes (forced); A's next request uses B's pair at once."""
        a, b = pair
        clock.advance(LIFETIME)
        fake_nb.fail_token("server_error")
        assert await fetch(a) == 503
        # B refreshes: an admin's "Refresh now" there (a request there would back off
        # with A for a moment, test_processes_back_off_together_after_a_failed_refresh).
        await b.tokens.refresh_now(SLUG)
        assert len(fake_nb.token_requests) == 2

        assert await fetch(a) == 200
        assert len(fake_nb.token_requests) == 2
        assert bearer(fake_nb.api_requests[-1]) == await stored_access_token(a)

    async def test_backoff_retry_skips_a_pair_refreshed_elsewhere(
        self,
        pair: tuple[Gateway, Gateway],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A's refresh failed and backs off; B refreshes. When A's backoff ends, its retry
        sees the newer generation and does not rotate B's fresh pair again."""
        a, b = pair
        clock.advance(LIFETIME)
        fake_nb.fail_token("server_error")
        assert await fetch(a) == 503
        # B refreshes: an admin's "Refresh now" there (a request there would back off
        # with A for a moment, test_processes_back_off_together_after_a_failed_refresh).
        await b.tokens.refresh_now(SLUG)
        assert len(fake_nb.token_requests) == 2
        stored = await stored_access_token(b)

        clock.advance(2.0)  # past a first failure's backoff
        with caplog.at_level(logging.INFO, logger="nbgateway"):
            assert await a.tokens.retry_after_backoff() == []
        assert len(fake_nb.token_requests) == 2
        assert await stored_access_token(a) == stored
        assert any("refreshed by another process" in r.getMessage() for r in caplog.records)
        assert await a.tokens.retry_after_backoff() == []  # the backoff is over
        assert await fetch(a) == 200
        assert bearer(fake_nb.api_requests[-1]) == stored
        assert len(fake_nb.token_requests) == 2

    async def test_backoff_retry_still_runs_after_keeping_a_rotated_token_here(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """This process's refused answer (NationBuilder rotated, but the answer is unusable)
        stores the rotated refresh token, a newer generation with an error: its backoff
        retry still runs, and succeeds with that token."""
        await connect_account(gateway, SLUG)
        clock.advance(LIFETIME)
        fake_nb.mangle_token_answers({"token_type": "mac"})
        assert await fetch(gateway) == 503
        assert len(fake_nb.token_requests) == 1

        clock.advance(2.0)  # past a first failure's backoff
        assert await gateway.tokens.retry_after_backoff() == [SLUG]
        assert len(fake_nb.token_requests) == 2
        assert gateway.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1
        assert await fetch(gateway) == 200


class TestCache:
    async def test_valid_cached_token_touches_neither_sqlite_nor_the_cipher(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Once warm, requests with a token valid beyond the margin never read the store."""
        await connect_account(gateway, SLUG)
        assert await fetch(gateway) == 200

        def forbidden(*_args: object, **_kwargs: object) -> Any:
            raise AssertionError("a cached token must not reach the store or the cipher")

        monkeypatch.setattr(gateway.store, "get_account", forbidden)
        monkeypatch.setattr(gateway.store, "refresh_lock", forbidden)
        store = gateway.store
        assert isinstance(store, SQLiteStore)
        monkeypatch.setattr(store._cipher, "decrypt", forbidden)
        clock.advance(LIFETIME - MARGIN - 10)  # older, but still outside the margin
        statuses = [await fetch(gateway) for _ in range(20)]
        assert statuses == [200] * 20


class TestBackgroundRefresher:
    async def test_a_store_outage_is_one_warning_per_round_without_a_traceback(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The maintenance loop meeting an unavailable store says so in one line and keeps
        going; a traceback is kept for errors nobody expected."""
        rounds = 0

        async def away(*, force: bool = False) -> bool:
            nonlocal rounds
            rounds += 1
            raise StoreUnavailable("database gateway.db cannot be read: disk I/O error")

        monkeypatch.setattr(gateway.tokens, "sync", away)
        monkeypatch.setattr(gateway.tokens, "recover_interrupted", away)
        caplog.set_level(logging.WARNING, logger="nbgateway.tokens")
        loop = asyncio.create_task(gateway.tokens.run(sync_interval=0.01))
        await eventually(lambda: rounds >= 3, "three rounds")
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        outage = [r for r in caplog.records if "the store cannot be used" in r.getMessage()]
        assert len(outage) >= 2
        assert all(r.levelno == logging.WARNING and r.exc_info is None for r in outage)

    async def test_refresh_due_refreshes_only_tokens_expiring_within_margin_plus_lead(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """An account expiring within margin + lead is refreshed; a fresh one is left alone."""
        old = await connect_account(gateway, SLUG)
        clock.advance(LIFETIME - MARGIN - 30)  # acme expires in 330 s
        fresh = await connect_account(gateway, "beta")

        assert await gateway.tokens.refresh_due(lead=0) == []
        assert fake_nb.token_requests == []
        assert await gateway.tokens.refresh_due(lead=60) == [SLUG]
        assert [r.slug for r in fake_nb.token_requests] == [SLUG]
        assert await stored_access_token(gateway, SLUG) != old["access_token"]
        assert await stored_access_token(gateway, "beta") == fresh["access_token"]
        assert gateway.metric(EXPIRY, account=SLUG) == clock.now() + LIFETIME
        assert (await gateway.accounts.get(SLUG)).last_refresh_at == clock.now()

    async def test_short_lived_tokens_are_rotated_once_per_half_life_by_any_number_of_processes(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: Callable[..., Settings],
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Tokens living 90 s with a 30 s margin and the loop's 60 s lead: a token is due at
        half its life, not as soon as it is issued, so two processes sweeping one after the
        other rotate it once (it was twice, 0.2 s apart, then again every 30 s)."""
        fake_nb.access_token_lifetime = 90
        shared = settings_factory(refresh_margin=30)
        first, second = await gateway_factory(shared), await gateway_factory(shared)
        await connect_account(first, SLUG)
        await second.tokens.sync(force=True)
        assert await first.tokens.refresh_due(lead=60) == []  # just issued
        clock.advance(44)
        assert await first.tokens.refresh_due(lead=60) == []
        clock.advance(2)  # 44 s left: past half its life
        assert await first.tokens.refresh_due(lead=60) == [SLUG]
        assert await second.tokens.refresh_due(lead=60) == []  # the new pair is not due
        assert len(fake_nb.token_requests) == 1
        clock.advance(46)
        assert await second.tokens.refresh_due(lead=60) == [SLUG]
        assert await first.tokens.refresh_due(lead=60) == []
        assert len(fake_nb.token_requests) == 2

    async def test_refresh_due_skips_accounts_needing_reauth(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """The sweep never calls the token endpoint for an account marked needs_reauth."""
        await connect_account(gateway, SLUG)
        fake_nb.revoke(SLUG)
        clock.advance(LIFETIME)
        assert await fetch(gateway) == 401
        fake_nb.clear_recordings()
        assert await gateway.tokens.refresh_due(lead=60) == []
        assert fake_nb.token_requests == []

    async def test_refresh_due_waits_out_backoff(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """After a failed sweep the account is skipped until its backoff has passed."""
        await connect_account(gateway, SLUG)
        clock.advance(LIFETIME - MARGIN)
        fake_nb.fail_token("server_error")
        assert await gateway.tokens.refresh_due(lead=60) == [SLUG]
        assert await gateway.tokens.refresh_due(lead=60) == []
        assert len(fake_nb.token_requests) == 1
        clock.advance(2.0)  # a first failure's backoff ceiling
        assert await gateway.tokens.refresh_due(lead=60) == [SLUG]
        assert len(fake_nb.token_requests) == 2
        assert gateway.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1

    async def test_background_task_refreshes_a_due_account(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """With background=True, run() refreshes a due account, serves, and stops cleanly."""
        setup = await gateway_factory(shared_settings)
        old = await connect_account(setup, SLUG)
        await setup.client.close()
        clock.advance(LIFETIME - MARGIN - 30)  # due within the refresher's lead

        gw = await gateway_factory(shared_settings, background=True)
        await eventually(
            lambda: gw.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1,
            "the background refresh",
        )
        assert await fetch(gw) == 200
        assert bearer(fake_nb.api_requests[-1]) not in ("", old["access_token"])
        assert len(fake_nb.token_requests) == 1
        await gw.client.close()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []


class TestSync:
    async def test_sync_notices_removal_by_another_process(
        self, pair: tuple[Gateway, Gateway], fake_nb: FakeNationBuilder
    ) -> None:
        """After B removes the account and A syncs, A answers unknown_account, not from cache."""
        a, b = pair
        assert await b.accounts.remove(SLUG)
        assert await a.tokens.sync() is True
        before = len(fake_nb.api_requests)

        resp = await a.client.get(f"/n/{SLUG}{ME}")
        assert resp.status == 404
        assert resp.headers["X-NBGW-Error"] == "unknown_account"
        assert len(fake_nb.api_requests) == before
        assert a.registry.get_sample_value(EXPIRY, {"account": SLUG}) is None
        assert a.registry.get_sample_value(NEEDS_REAUTH, {"account": SLUG}) is None

    async def test_sync_drops_gauges_of_an_account_removed_elsewhere(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
    ) -> None:
        """A process that never served the account still drops its gauges once it is gone."""
        a = await gateway_factory(shared_settings)
        b = await gateway_factory(shared_settings)
        await connect_account(b, SLUG)
        await a.tokens.sync()
        assert a.registry.get_sample_value(EXPIRY, {"account": SLUG}) is not None
        assert await b.accounts.remove(SLUG)
        await a.tokens.sync()
        assert a.registry.get_sample_value(EXPIRY, {"account": SLUG}) is None
        assert a.registry.get_sample_value(NEEDS_REAUTH, {"account": SLUG}) is None

    async def test_sync_notices_needs_reauth_marked_by_another_process(
        self,
        pair: tuple[Gateway, Gateway],
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """B marks needs_reauth: A's sync drops the cached token; B's reconnect brings A back."""
        a, b = pair
        fake_nb.fail_token("invalid_grant")
        with pytest.raises(ReauthorizationRequired):
            await b.accounts.refresh(SLUG)
        assert await a.tokens.sync() is True
        assert a.metric(NEEDS_REAUTH, account=SLUG) == 1
        before = len(fake_nb.api_requests)

        resp = await a.client.get(ME)
        assert resp.status == 401
        assert resp.headers["X-NBGW-Error"] == "account_needs_reauthorization"
        assert len(fake_nb.api_requests) == before
        assert len(fake_nb.token_requests) == 1

        issued = await connect_account(b, SLUG)
        await a.tokens.sync()
        assert a.metric(NEEDS_REAUTH, account=SLUG) == 0
        assert await fetch(a) == 200
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]

    async def test_a_reconnect_elsewhere_is_seen_by_the_next_request_at_once(
        self,
        pair: tuple[Gateway, Gateway],
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A knows the account needs re-authorization; B reconnects it. A's very next
        request is served (no 401 until A's next sync round), with B's new token."""
        a, b = pair
        fake_nb.fail_token("invalid_grant")
        with pytest.raises(ReauthorizationRequired):
            await b.accounts.refresh(SLUG)
        await a.tokens.sync()
        assert (await a.client.get(ME)).status == 401

        issued = await connect_account(b, SLUG)
        assert await fetch(a) == 200  # no sync in between
        assert bearer(fake_nb.api_requests[-1]) == issued["access_token"]
        assert a.metric(NEEDS_REAUTH, account=SLUG) == 0

    async def test_requests_to_a_refused_account_do_not_reload_the_store(
        self,
        pair: tuple[Gateway, Gateway],
        fake_nb: FakeNationBuilder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A flood of requests to an account needing re-authorization: no listing of the
        accounts, and a read of its row only when the store changed since the last one."""
        a, b = pair
        fake_nb.fail_token("invalid_grant")
        with pytest.raises(ReauthorizationRequired):
            await b.accounts.refresh(SLUG)
        await a.tokens.sync()
        reads: list[str] = []
        real_get = a.store.get_account

        async def counted_get(slug: str) -> Any:
            reads.append(slug)
            return await real_get(slug)

        async def no_listing() -> Any:
            raise AssertionError("a refused account's request must not list every account")

        monkeypatch.setattr(a.store, "get_account", counted_get)
        monkeypatch.setattr(a.store, "list_accounts", no_listing)
        statuses = await asyncio.gather(*(fetch(a) for _ in range(20)))
        assert statuses == [401] * 20
        assert len(reads) <= 1
        await b.store.import_refresh_token("other", Secret("unrelated-CANARY-1"))  # a commit
        before = len(reads)
        assert [await fetch(a) for _ in range(5)] == [401] * 5
        assert len(reads) == before + 1

    async def test_sync_is_cheap_when_nothing_changed(self, pair: tuple[Gateway, Gateway]) -> None:
        """sync() reports no reload when no process committed since the last look."""
        a, _b = pair
        await a.tokens.sync()
        assert await a.tokens.sync() is False


class TestRefreshNow:
    async def test_admin_refresh_rotates_records_an_event_and_sets_metrics(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """AccountService.refresh calls the endpoint once and updates store, events, gauges."""
        issued = await connect_account(gateway, SLUG)
        clock.advance(60)  # a still-fresh token is refreshed anyway
        before = await gateway.accounts.get(SLUG)

        info = await gateway.accounts.refresh(SLUG)
        assert len(fake_nb.token_requests) == 1
        assert info.generation == before.generation + 1
        assert info.expires_at == clock.now() + LIFETIME
        assert info.last_refresh_at == clock.now()
        assert (await gateway.store.events(SLUG))[0].kind is EventKind.REFRESHED
        assert gateway.metric("nbgw_token_refresh_duration_seconds_count", account=SLUG) == 1
        assert gateway.metric(EXPIRY, account=SLUG) == clock.now() + LIFETIME
        assert gateway.metric(LAST_SUCCESS, account=SLUG) == clock.now()

        assert await fetch(gateway) == 200
        assert bearer(fake_nb.api_requests[-1]) != issued["access_token"]
        assert bearer(fake_nb.api_requests[-1]) == await stored_access_token(gateway)
        assert len(fake_nb.token_requests) == 1

    async def test_admin_refresh_ignores_backoff(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A failed refresh-now raises RefreshBackoff; the admin may retry at once."""
        await connect_account(gateway, SLUG)
        fake_nb.fail_token("server_error")
        with pytest.raises(RefreshBackoff):
            await gateway.accounts.refresh(SLUG)
        await gateway.accounts.refresh(SLUG)
        assert len(fake_nb.token_requests) == 2
        assert gateway.metric(REFRESH_TOTAL, account=SLUG, outcome="success") == 1

    async def test_refresh_of_an_unknown_account(
        self, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Refreshing an account that does not exist raises AccountNotFound, calls nobody."""
        with pytest.raises(AccountNotFound):
            await gateway.accounts.refresh("nobody")
        assert fake_nb.token_requests == []


class TestBackoff:
    @pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, 0.999999])
    def test_delay_lies_between_half_the_ceiling_and_the_ceiling(self, draw: float) -> None:
        """Jitter keeps every delay within [ceiling/2, ceiling] for any random draw."""
        policy = Backoff(base=2.0, cap=300.0, rng=lambda: draw)
        for failures in range(1, 30):
            ceiling = min(300.0, 2.0 * 2.0 ** (failures - 1))
            assert ceiling / 2 <= policy.delay(failures) <= ceiling

    def test_ceiling_doubles_then_stops_at_the_cap(self) -> None:
        """With the top draw, delays double from `base` and never pass `cap`."""
        policy = Backoff(base=2.0, cap=300.0, rng=lambda: 1.0)
        delays = [policy.delay(n) for n in range(1, 12)]
        assert delays[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
        assert delays == sorted(delays)
        assert max(delays) == 300.0

    def test_jitter_uses_the_injected_rng(self) -> None:
        """Different draws give different delays for the same failure count."""
        low = Backoff(base=2.0, cap=300.0, rng=lambda: 0.0).delay(4)
        high = Backoff(base=2.0, cap=300.0, rng=lambda: 1.0).delay(4)
        assert (low, high) == (8.0, 16.0)

    def test_delay_stays_at_the_cap_after_very_many_failures(self) -> None:
        """However many failures, the delay is bounded by the cap (no overflow)."""
        policy = Backoff(base=2.0, cap=300.0, rng=lambda: 1.0)
        assert policy.delay(5000) == 300.0


class TestStopping:
    async def test_a_stop_finishes_the_refresh_in_flight_and_stores_its_pair(
        self,
        gateway_factory: GatewayFactory,
        shared_settings: Settings,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A background refresh cancelled by the stop (its caller goes away) still gets its
        answer and stores the new pair before the session and the store close: NationBuilder
        may have rotated already, and the old refresh token would then be spent."""
        gw = await gateway_factory(shared_settings)
        issued = await connect_account(gw, SLUG)
        fake_nb.hold_tokens()
        caller = asyncio.create_task(gw.tokens.refresh_now(SLUG))
        await fake_nb.wait_for_pending_tokens(1)
        caller.cancel()  # as the background loop's await is at the stop
        stopping = asyncio.create_task(gw.client.close())
        await eventually(lambda: caller.done(), "the caller to be cancelled")
        await asyncio.sleep(0.05)  # the stop runs up to the wait for the refresh
        assert not stopping.done()
        fake_nb.release_tokens()
        await stopping

        assert len(fake_nb.token_requests) == 1
        async with store_for(shared_settings, FakeClock()) as store:
            account = await store.get_account(SLUG)
        assert account is not None and account.refresh_token is not None
        assert account.generation == 2
        stored = account.refresh_token.reveal()
        assert stored != issued["refresh_token"]
        assert await refresh_status_at_fake(fake_nb, stored) == 200  # the live one

    async def test_a_hung_token_endpoint_holds_a_stop_no_longer_than_the_token_timeout(
        self,
        gateway_factory: GatewayFactory,
        settings_factory: Callable[..., Settings],
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """The refresh in flight ends with its token call's timeout, so the stop returns
        although the endpoint never answers, and the stored pair is left as it was."""
        settings = settings_factory(token_timeout=0.2)
        gw = await gateway_factory(settings)
        issued = await connect_account(gw, SLUG)
        fake_nb.hold_tokens()
        caller = asyncio.create_task(gw.tokens.refresh_now(SLUG))
        await fake_nb.wait_for_pending_tokens(1)
        caller.cancel()
        await gw.client.close()
        fake_nb.release_tokens()
        async with store_for(settings, FakeClock()) as store:
            account = await store.get_account(SLUG)
        assert account is not None and account.refresh_token is not None
        assert account.refresh_token.reveal() == issued["refresh_token"]
