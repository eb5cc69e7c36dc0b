"""The gateway on PostgreSQL when things fail: the database going away and coming back
(the proxy, and the admin pages, which need it for sessions and the login throttle), and a
process killed in the middle of a refresh.

The PostgreSQL servers are started by the tests (pgserver.py). The first tests run the
gateway in-process with the test clock; the last runs real `nbgateway serve` processes
against the fake NationBuilder subprocess, as in test_multiprocess.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import ConnectAccount, GatewayFactory
from pgserver import PgServer
from procs import (
    Processes,
    clean_os_environ,
    eventually,
    free_port,
    gateway_env,
    http_request,
    open_store,
    run_command,
    seed_account,
    start_fake,
    start_gateway,
    wait_ready,
    wait_until,
)
from test_admin_pages import Browser
from test_workers import gone, started_pids

from nbgateway import health
from nbgateway.admin.core import SESSION_COOKIE
from nbgateway.clock import FakeClock
from nbgateway.crypto import generate_key
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import AccountStatus, EventKind

pytestmark = pytest.mark.slow

SLUG = "acme"
ADMIN_TOKEN = "postgres-admin-token-0123456789"
WAIT_TIMEOUT = 20.0  # seconds for a condition in another process to become true


async def test_postgres_down_cached_token_served_then_reconnects(
    gateway_factory: GatewayFactory,
    connect_account: ConnectAccount,
    fake_nb: FakeNationBuilder,
    clock: FakeClock,
    pg_own_server: PgServer,
) -> None:
    """With PostgreSQL stopped, a request with a valid cached token is still served while
    /readyz says 503, in the refresh margin too (it got 503 for the last 5 minutes of the
    token's life), and one whose token expired gets 503 store_unavailable; once
    PostgreSQL is back (no gateway restart) /readyz is 200, the refresh works, and
    nothing stored before is lost."""
    gw = await gateway_factory(database=pg_own_server.url())
    issued = await connect_account(gw, SLUG)
    assert (await gw.client.get("/api/v2/signups/me")).status == 200
    assert (await gw.client.get("/readyz")).status == 200

    pg_own_server.stop()
    resp = await gw.client.get("/api/v2/signups/me")
    assert resp.status == 200  # the hot path never touches the database
    assert fake_nb.api_requests[-1].headers["Authorization"] == f"Bearer {issued['access_token']}"
    assert (await gw.client.get("/readyz")).status == 503
    clock.advance(86400 - 100)  # due for refresh (inside the margin), still valid
    resp = await gw.client.get("/api/v2/signups/me")
    assert resp.status == 200  # the last NBGW_REFRESH_MARGIN of its life serves too
    assert fake_nb.api_requests[-1].headers["Authorization"] == f"Bearer {issued['access_token']}"
    clock.advance(101)  # expired: now it needs a refresh, which needs the database
    resp = await gw.client.get("/api/v2/signups/me")
    assert resp.status == 503
    assert resp.headers["X-NBGW-Error"] == "store_unavailable"
    assert fake_nb.token_requests == []  # no refresh without a place to keep its result

    pg_own_server.start()
    assert (await gw.client.get("/readyz")).status == 200
    resp = await gw.client.get("/api/v2/signups/me")
    assert resp.status == 200
    assert len(fake_nb.token_requests) == 1
    assert fake_nb.api_requests[-1].headers["Authorization"] != f"Bearer {issued['access_token']}"
    account = await gw.store.get_account(SLUG)
    assert account is not None
    assert account.generation == 2
    assert account.refresh_started_at is None
    kinds = [e.kind for e in reversed(await gw.store.events(SLUG))]
    assert kinds == [EventKind.CONNECTED, EventKind.REFRESHED]


async def test_admin_pages_answer_503_while_postgres_is_down(
    gateway_factory: GatewayFactory, pg_own_server: PgServer
) -> None:
    """With PostgreSQL stopped the admin surface fails closed: a page with a session, the
    login form and the API's Bearer check answer 503 (no token is checked, nothing is
    accepted unchecked), and logging out still clears the cookie and ends the session in
    this process. Once PostgreSQL is back, logging in works again."""
    gw = await gateway_factory(database=pg_own_server.url())
    async with aiohttp.ClientSession(
        base_url=str(gw.client.make_url("/")), cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        browser = Browser(http)
        assert (await browser.login())[0] == 303
        csrf = await browser.csrf()
        old = dict(browser.cookies)

        pg_own_server.stop()
        status, body, headers = await browser.get("/connect")
        assert status == 503, body
        assert headers["X-NBGW-Error"] == "store_unavailable"
        # A page for the browser, with the admin pages' security headers.
        assert headers["Content-Type"].startswith("text/html")
        assert "cannot use its database" in body
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        anonymous = Browser(http)
        status, body, headers = await anonymous.login()
        assert status == 503, body
        assert headers["Retry-After"] == "5"
        assert "cannot use its database" in body
        assert SESSION_COOKIE not in anonymous.cookies
        status, body, headers = await anonymous.request(
            "GET", "/connect/api/accounts", headers={"Authorization": "Bearer wrong-token"}
        )
        assert status == 503, body
        assert headers["X-NBGW-Error"] == "store_unavailable"

        status, _, headers = await browser.post("/connect/logout", {"csrf": csrf})
        assert status == 303
        assert SESSION_COOKIE not in browser.cookies

        pg_own_server.start()
        browser.cookies = old
        status, _, headers = await browser.get("/connect")
        assert (status, headers["Location"]) == (303, "/connect/login")
        assert (await anonymous.login())[0] == 303


# -- a killed process ------------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Every subprocess of the test; stopped at teardown, their output printed."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
        print(procs.report())  # shown by pytest only when the test failed


async def advisory_locks(url: str) -> int:
    """Advisory locks held in this database right now."""
    conn = await asyncpg.connect(url)
    try:
        held: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    return held


async def proxied(http: aiohttp.ClientSession, gateway: str) -> tuple[int, str]:
    async with http.get(f"{gateway}/api/v2/signups/me") as resp:
        return resp.status, await resp.text()


async def test_kill_9_during_a_refresh_does_not_wedge_the_account(
    pg_url: str, processes: Processes
) -> None:
    """A `serve` process killed (SIGKILL) while its refresh call is in flight leaves no lock
    behind: another process refreshes the account right afterwards, sees the interrupted
    marker and stores the new pair; the account stays active."""
    fake = await asyncio.to_thread(start_fake, processes)
    env = {
        **clean_os_environ(),
        **gateway_env(pg_url, ADMIN_TOKEN, fake.url),
        "NBGW_DEFAULT_ACCOUNT": SLUG,
        "NBGW_UPSTREAM_TIMEOUT": "10",
    }
    issued: dict[str, Any] = await asyncio.to_thread(fake.issue_tokens, SLUG)
    await seed_account(env, SLUG, issued)
    first = await asyncio.to_thread(start_gateway, processes, env, "gateway-a")
    victim = processes.started[-1]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        assert (await proxied(http, first))[0] == 200  # warm: the seeded pair
        await asyncio.to_thread(fake.control, action="expire_access_tokens")
        await asyncio.to_thread(fake.control, action="hold_tokens")
        pending = asyncio.create_task(proxied(http, first))

        async def refresh_held() -> bool:
            state = await asyncio.to_thread(fake.state)
            return bool(state["pending_token_requests"] == 1)

        await eventually(refresh_held, "gateway-a's refresh call to be held")
        async with open_store(env) as store:
            [info] = await store.list_accounts()
        assert info.refresh_started_at is not None  # the marker is durable before the call
        assert await advisory_locks(pg_url) == 1  # gateway-a holds the account's lock

        victim.popen.kill()
        await asyncio.to_thread(victim.popen.wait, 10)
        with pytest.raises(aiohttp.ClientError):
            await pending

        async def nothing_pending() -> bool:
            state = await asyncio.to_thread(fake.state)
            return bool(state["pending_token_requests"] == 0)

        # The fake drops the held call when its client goes: it never reached the grant.
        await eventually(nothing_pending, "the fake to drop the dead process's call")

        async def no_lock_held() -> bool:
            return await advisory_locks(pg_url) == 0

        # PostgreSQL dropped the dead connection's lock by itself.
        await eventually(no_lock_held, "PostgreSQL to release the dead process's lock")
        await asyncio.to_thread(fake.control, action="release_tokens")

        second = await asyncio.to_thread(start_gateway, processes, env, "gateway-b")
        status, body = await proxied(http, second)
        assert status == 200, body
        assert (await proxied(http, second))[0] == 200

    # gateway-a's call (dropped before NationBuilder answered it) and gateway-b's refresh.
    assert await asyncio.to_thread(fake.grants, SLUG) == 2
    async with open_store(env) as store:
        [info] = await store.list_accounts()
        kinds = [e.kind for e in reversed(await store.events(SLUG))]
    assert info.status is AccountStatus.ACTIVE
    assert info.refresh_started_at is None
    assert info.generation == 2
    assert kinds == [EventKind.CONNECTED, EventKind.REFRESHED]


def test_serve_waits_for_a_database_that_starts_after_it(
    pg_own_server: PgServer, processes: Processes, tmp_path: Path
) -> None:
    """`serve` started while PostgreSQL is down says it is waiting for the database (not
    "not starting"), and serves once the server is up: a gateway started next to its
    database, or during a short outage, needs no restart policy."""
    url = pg_own_server.url()
    env = {**clean_os_environ(), **gateway_env(url, ADMIN_TOKEN)}
    pg_own_server.stop()
    port = free_port()
    gateway = processes.start(
        "gateway",
        [sys.executable, "-m", "nbgateway", "serve"],
        {**env, "NBGW_LISTEN": f"127.0.0.1:{port}"},
    )
    wait_until(lambda: "waiting for the database" in gateway.output(), 30, "the waiting line")
    assert gateway.alive()
    assert "not starting" not in gateway.output()
    pg_own_server.start()
    wait_ready(gateway, f"http://127.0.0.1:{port}/readyz")


def test_serve_does_not_wait_for_a_database_that_refuses_it(
    pg_url: str, processes: Processes
) -> None:
    """A problem that does not pass by itself (here a wrong key for the stored rows) stops
    `serve` at once with check's message, without waiting."""
    env = {**clean_os_environ(), **gateway_env(pg_url, ADMIN_TOKEN)}
    issued = {"access_token": "a" * 20, "refresh_token": "r" * 20, "expires_in": 86400}
    asyncio.run(seed_account(env, SLUG, {**issued, "scope": "default"}))
    env["NBGW_ENCRYPTION_KEY"] = generate_key()
    result = run_command([sys.executable, "-m", "nbgateway", "serve"], env=env, timeout=30)
    assert result.returncode == 1
    assert "waiting for the database" not in result.stderr
    assert "not starting" in result.stderr


def test_serve_does_not_wait_for_tls_the_server_does_not_offer(
    pg_url: str, processes: Processes
) -> None:
    """`sslmode=require` against a server without TLS (the test server has none) will not
    pass by itself: check names it and serve stops at once instead of waiting a minute."""
    env = {**clean_os_environ(), **gateway_env(pg_url, ADMIN_TOKEN)}
    sep = "&" if "?" in pg_url else "?"
    env["NBGW_DATABASE"] = f"{pg_url}{sep}sslmode=require"
    checked = run_command([sys.executable, "-m", "nbgateway", "check"], env=env, timeout=30)
    assert checked.returncode != 0
    assert "rejected SSL upgrade" in checked.stderr + checked.stdout
    assert "Traceback" not in checked.stderr
    result = run_command([sys.executable, "-m", "nbgateway", "serve"], env=env, timeout=30)
    assert result.returncode == 1
    assert "waiting for the database" not in result.stderr
    assert "not starting" in result.stderr


async def test_every_worker_serves_every_account_while_postgres_is_down(
    pg_own_server: PgServer, processes: Processes
) -> None:
    """`serve --workers 2`: each worker holds every account's valid token in memory from
    its start (not only those it happened to serve), so with PostgreSQL stopped every
    request for every account is answered, whichever worker takes it."""
    fake = await asyncio.to_thread(start_fake, processes)
    env = {**clean_os_environ(), **gateway_env(pg_own_server.url(), ADMIN_TOKEN, fake.url)}
    slugs = ["acme", "beta", "gamma"]
    for slug in slugs:
        await seed_account(env, slug, await asyncio.to_thread(fake.issue_tokens, slug))
    port = free_port()
    gateway = processes.start(
        "gateway",
        [sys.executable, "-m", "nbgateway", "serve", "--workers", "2"],
        {**env, "NBGW_LISTEN": f"127.0.0.1:{port}"},
    )
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_ready, gateway, f"{url}/healthz")
    workers: set[str] = set()

    def both_serve() -> bool:
        workers.add(http_request("GET", f"{url}/healthz")[1]["X-NBGW-Worker"])
        return len(workers) == 2

    await asyncio.to_thread(wait_until, both_serve, 30, "both workers to answer")
    await asyncio.sleep(3)  # each worker's token loop takes its first turn (1 s interval)
    pg_own_server.stop()

    answered: dict[str, set[int]] = {}
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection, any worker
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(8):
            for slug in slugs:
                async with http.get(f"{url}/n/{slug}/api/v2/signups/me") as resp:
                    await resp.read()
                    answered.setdefault(resp.headers["X-NBGW-Worker"], set()).add(resp.status)
    assert len(answered) == 2, answered  # both workers took requests
    assert all(codes == {200} for codes in answered.values()), answered
    assert (await asyncio.to_thread(fake.state))["token_requests"] == {}


def test_a_worker_started_while_the_database_is_down_does_not_outlive_its_parent(
    pg_own_server: PgServer, processes: Processes
) -> None:
    """With `--workers`, the parent waits for the database at start and restarts workers;
    a worker started again while PostgreSQL is down exits (to be restarted with a backoff)
    rather than waiting itself, so kill -9 of the parent leaves no worker behind. What the
    worker reports is a log line like every other (it was bare stderr text, outside
    NBGW_LOG_FORMAT, with `nbgateway check` advice)."""
    env = {**clean_os_environ(), **gateway_env(pg_own_server.url(), ADMIN_TOKEN)}
    port = free_port()
    gateway = processes.start(
        "gateway",
        [sys.executable, "-m", "nbgateway", "serve", "--workers", "2"],
        {**env, "NBGW_LISTEN": f"127.0.0.1:{port}"},
    )
    wait_ready(gateway, f"http://127.0.0.1:{port}/healthz")
    answered: set[str] = set()

    def both_serve() -> bool:
        # Both workers past their start (one still starting would exit on its own).
        answered.add(http_request("GET", f"http://127.0.0.1:{port}/healthz")[1]["X-NBGW-Worker"])
        return len(answered) == 2

    wait_until(both_serve, 30, "both workers to answer")
    pg_own_server.stop()
    first = started_pids(gateway)
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(started_pids(gateway)) >= 4, 30, "the replacement to be restarted")
    assert "waiting for the database" not in gateway.output()
    wait_until(lambda: "worker not starting" in gateway.output(), 30, "the worker's report")
    output = gateway.output()
    assert re.search(r"\d{2}:\d{2}:\d{2},\d{3} ERROR nbgateway.cli: worker not starting", output)
    assert not re.search(r"^(problem|error|not starting)\b", output, re.MULTILINE), output
    gateway.popen.kill()
    gateway.popen.wait(10)
    pids = started_pids(gateway)
    wait_until(lambda: all(gone(pid) for pid in pids), 20, "every worker to exit")


def test_sigterm_stops_serve_while_it_waits_for_the_database(
    pg_own_server: PgServer, processes: Processes
) -> None:
    """SIGTERM while `serve` waits for its database ends it at once with 143, as the
    default action would (a handler of its own, so that it also holds for PID 1 in a
    container, where the default action does not apply)."""
    env = {**clean_os_environ(), **gateway_env(pg_own_server.url(), ADMIN_TOKEN)}
    pg_own_server.stop()
    gateway = processes.start(
        "gateway",
        [sys.executable, "-m", "nbgateway", "serve"],
        {**env, "NBGW_LISTEN": f"127.0.0.1:{free_port()}"},
    )
    wait_until(lambda: "waiting for the database" in gateway.output(), 30, "the waiting line")
    gateway.popen.terminate()
    assert gateway.popen.wait(10) == 143


async def test_slugs_named_while_postgres_is_down_get_no_metric_labels(
    gateway_factory: GatewayFactory,
    connect_account: ConnectAccount,
    pg_own_server: PgServer,
) -> None:
    """With the database away the gateway cannot tell an account from any slug a client
    makes up: those requests get 503 store_unavailable and count under account="none",
    so a client cannot grow the label values (and Prometheus's memory) one slug at a
    time. The connected account keeps its own label."""
    gw = await gateway_factory(database=pg_own_server.url())
    await connect_account(gw, SLUG)
    assert (await gw.client.get("/api/v2/signups/me")).status == 200
    pg_own_server.stop()
    for n in range(3):
        resp = await gw.client.get(f"/n/ghost-{n}/api/v2/people")
        assert resp.status == 503
        assert resp.headers["X-NBGW-Error"] == "store_unavailable"
    accounts = {
        sample.labels.get("account")
        for family in gw.registry.collect()
        for sample in family.samples
        if "account" in sample.labels
    }
    assert not any(str(value).startswith("ghost") for value in accounts), accounts
    assert SLUG in accounts
    errors = gw.metric("nbgw_gateway_errors_total", account="none", error="store_unavailable")
    assert errors == 3
    pg_own_server.start()


async def test_store_up_follows_the_database(
    gateway_factory: GatewayFactory, pg_own_server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nbgw_store_up (what the NBGatewayStoreUnavailable alert watches) is 1 while the
    maintenance loop's look at the database each second succeeds, 0 within a few
    seconds of PostgreSQL going away, and 1 again once it is back: an outage shows on
    /metrics even while cached tokens keep every request served."""
    monkeypatch.setattr(health, "INTERVAL", 0.2)
    gw = await gateway_factory(database=pg_own_server.url(), background=True)

    async def store_up(value: float) -> bool:
        return gw.metric("nbgw_store_up") == value

    await eventually(lambda: store_up(1), "nbgw_store_up to be 1")
    pg_own_server.stop()
    await eventually(lambda: store_up(0), "nbgw_store_up to drop to 0")
    pg_own_server.start()
    await eventually(lambda: store_up(1), "nbgw_store_up to be 1 again")
