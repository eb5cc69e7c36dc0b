"""kill -9 during the token call: the next start finds the refresh that was in flight.

Issue 8, point 3. Real processes: the fake NationBuilder and `nbgateway serve` as
subprocesses. The fake holds the token request while the gateway is killed with SIGKILL;
NationBuilder is then made to treat the refresh token as spent (revoked). The restarted
gateway must refresh that account at once on start and, meeting invalid_grant, say in the
needs-reauth reason that the gateway stopped during a refresh: in the events, the admin
API, the admin page and the alert webhook.

The database is given by the `database` fixture (a SQLite file today), so the test can be
parametrized over the PostgreSQL backend once its harness exists.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from procs import (
    FakeNB,
    Processes,
    clean_os_environ,
    eventually,
    free_port,
    gateway_env,
    start_fake,
    token_set,
    wait_ready,
)
from test_admin_pages import Browser

from nbgateway.clock import SystemClock
from nbgateway.crypto import Cipher
from nbgateway.models import AccountInfo, AccountStatus, EventKind
from nbgateway.redact import Secret
from nbgateway.store import TokenStore, make_store

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "interrupted-admin-token-0123456789"
SLUG = "acme"
WAIT_TIMEOUT = 20.0  # seconds for a condition to become true (the lease lasts 35 s)
STOPPED = "stopped during a refresh"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
        print(procs.report())  # shown by pytest only when the test failed


@pytest.fixture
def database(any_database: Path | str) -> str:
    """NBGW_DATABASE for this test, on each backend in turn."""
    return str(any_database)


@pytest.fixture
async def fake(processes: Processes) -> FakeNB:
    return await asyncio.to_thread(start_fake, processes)


@pytest.fixture
async def webhook(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An alert-webhook receiver: its URL and every JSON document posted to it."""
    received: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/alert", receive)
    server = await aiohttp_server(app)
    yield str(server.make_url("/alert")), received


def open_store(env: dict[str, str]) -> TokenStore:
    """The store the gateway of `env` uses, whichever backend NBGW_DATABASE names."""
    cipher = Cipher([Secret(k) for k in env["NBGW_ENCRYPTION_KEY"].split(",")])
    return make_store(env["NBGW_DATABASE"], cipher, SystemClock())


async def read_info(env: dict[str, str]) -> AccountInfo:
    async with open_store(env) as store:
        [info] = [i for i in await store.list_accounts() if i.slug == SLUG]
    return info


def start_serving(processes: Processes, env: dict[str, str], name: str) -> tuple[str, Any]:
    """`nbgateway serve` on a free port: its URL and process, once /healthz answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {**env, "NBGW_LISTEN": f"127.0.0.1:{port}", "NBGW_PUBLIC_URL": url}
    process = processes.start(name, [sys.executable, "-m", "nbgateway", "serve"], full_env)
    wait_ready(process, f"{url}/healthz")
    return url, process


def kill_hard(process: Any) -> None:
    """SIGKILL, and reap it (a zombie would still look alive)."""
    process.popen.kill()
    process.popen.wait(timeout=10)


async def test_restart_after_kill_during_the_token_call_reports_the_interrupted_refresh(
    processes: Processes,
    fake: FakeNB,
    database: str,
    webhook: tuple[str, list[dict[str, Any]]],
) -> None:
    """The killed process leaves its in-flight marker in the store; the restarted gateway
    refreshes at once (without waiting out the dead process's lease), meets invalid_grant,
    and its needs-reauth reason says the gateway stopped during a refresh, everywhere."""
    hook_url, alerts = webhook
    env = {
        **clean_os_environ(),
        **gateway_env(Path(database), ADMIN_TOKEN, fake.url),
        "NBGW_DATABASE": database,
        "NBGW_DEFAULT_ACCOUNT": SLUG,
        "NBGW_ALERT_WEBHOOK": hook_url,
    }
    issued = await asyncio.to_thread(fake.issue_tokens, SLUG)
    async with open_store(env) as store:
        await store.ping()
        # Expired: the background refresher takes it up as soon as the gateway starts.
        await store.save_tokens(
            SLUG, token_set(issued, now=time.time() - 2 * 86400), EventKind.CONNECTED
        )
    await asyncio.to_thread(fake.control, action="hold_tokens")

    with processes.explained():
        _, first = await asyncio.to_thread(start_serving, processes, env, "gateway-1")

        async def refresh_held() -> bool:
            state = await asyncio.to_thread(fake.state)
            return bool(state["pending_token_requests"] == 1)

        await eventually(refresh_held, "the first gateway's refresh to be held at the fake")
        marked = await read_info(env)
        assert marked.refresh_started_at is not None
        kill_hard(first)

        # NationBuilder consumed the refresh token it was answering.
        await asyncio.to_thread(fake.control, action="revoke", slug=SLUG)
        await asyncio.to_thread(fake.control, action="release_tokens")
        after_kill = await read_info(env)
        assert after_kill.status is AccountStatus.ACTIVE
        assert after_kill.refresh_started_at == marked.refresh_started_at

        url, second = await asyncio.to_thread(start_serving, processes, env, "gateway-2")

        async def marked_needs_reauth() -> bool:
            return (await read_info(env)).status is AccountStatus.NEEDS_REAUTH

        await eventually(marked_needs_reauth, "the restarted gateway to recover the refresh")
        info = await read_info(env)
        assert info.last_error is not None and STOPPED in info.last_error
        assert info.refresh_started_at is None
        assert "a refresh was in flight when a gateway process stopped" in second.output()
        state = await asyncio.to_thread(fake.state)
        assert state["token_requests"][SLUG]["refresh_token"] == 2
        assert state["api_requests"] == {}  # found on start, not by a request meeting 401

        async with open_store(env) as store:
            events = await store.events(SLUG)
        assert events[0].kind is EventKind.NEEDS_REAUTH
        assert STOPPED in events[0].detail

        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(base_url=url) as http:
            async with http.get("/connect/api/accounts", headers=auth) as resp:
                assert resp.status == 200
                [account] = (await resp.json())["accounts"]
            assert account["status"] == "needs_reauth"
            assert STOPPED in account["last_error"]

            browser = Browser(http)
            assert (await browser.login(ADMIN_TOKEN))[0] == 303
            status, page, _ = await browser.get("/connect")
            assert status == 200
            assert STOPPED in page

        async def alerted() -> bool:
            return bool(alerts)

        await eventually(alerted, "the alert webhook")
        [alert] = alerts
        assert alert["account"] == SLUG
        assert STOPPED in alert["reason"]
        assert issued["refresh_token"] not in str(alert)
