"""Several gateway processes on one database (SQLite, then PostgreSQL): one refresh
between them, never two; one admin login state between them.

Real processes: the fake NationBuilder (`python -m nbgateway.fakenb`), two `nbgateway
serve` instances and the `nbgateway accounts refresh` command, all sharing one database.
NationBuilder's refresh tokens are single-use, so a second refresh of the same token would
kill the account; these tests check the cross-process lock and the adoption of a pair that
another process stored. A logout on one process ends the session on the other, and wrong
admin tokens sent to either count in one throttle.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from procs import (
    FakeNB,
    Processes,
    clean_os_environ,
    eventually,
    gateway_env,
    open_store,
    run_command,
    scrape,
    seed_account,
    start_fake,
    start_gateway,
)

from nbgateway.admin.session import LOGIN_FAILURES, LOGIN_WINDOW
from nbgateway.models import AccountInfo, AccountStatus

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "multiprocess-admin-token-0123456789"
SLUG = "acme"
WAIT_TIMEOUT = 20.0  # seconds for any condition other than a subprocess start to become true


@dataclass
class AsyncFake:
    """The fake NationBuilder subprocess for async tests: each call runs in a thread."""

    fake: FakeNB

    @property
    def url(self) -> str:
        return self.fake.url

    async def control(self, **command: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self.fake.control, **command)

    async def state(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.fake.state)

    async def grants(self, grant: str = "refresh_token") -> int:
        return await asyncio.to_thread(self.fake.grants, SLUG, grant)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Every subprocess of the test; stopped at teardown, their output printed."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
        print(procs.report())  # shown by pytest only when the test failed


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def fake(processes: Processes) -> AsyncFake:
    """The fake NationBuilder as a subprocess on a free port."""
    return AsyncFake(await asyncio.to_thread(start_fake, processes))


@pytest.fixture
def base_env(any_database: Path | str, fake: AsyncFake) -> dict[str, str]:
    """What every gateway process shares: database (SQLite, then PostgreSQL), key,
    NationBuilder app, admin token."""
    return {
        **clean_os_environ(),
        **gateway_env(any_database, ADMIN_TOKEN, fake.url),
        "NBGW_DEFAULT_ACCOUNT": SLUG,
        "NBGW_UPSTREAM_TIMEOUT": "10",
    }


async def read_info(env: dict[str, str]) -> AccountInfo:
    async with open_store(env) as store:
        [info] = [i for i in await store.list_accounts() if i.slug == SLUG]
    return info


@pytest.fixture
async def seeded(base_env: dict[str, str], fake: AsyncFake) -> dict[str, Any]:
    """An account with a fresh pair from the fake, stored as a completed /connect would."""
    issued: dict[str, Any] = (await fake.control(action="issue_tokens", slug=SLUG))["tokens"]
    await seed_account(base_env, SLUG, issued)
    return issued


ServeFactory = Callable[[str], Awaitable[str]]


@pytest.fixture
def serve(processes: Processes, base_env: dict[str, str]) -> ServeFactory:
    """Start `nbgateway serve` on a free port; return its URL once /healthz answers."""

    async def start(name: str) -> str:
        return await asyncio.to_thread(start_gateway, processes, base_env, name)

    return start


async def proxied(http: aiohttp.ClientSession, gateway: str) -> tuple[int, str]:
    async with http.get(f"{gateway}/api/v2/signups/me") as resp:
        return resp.status, await resp.text()


async def metric(gateway: str, name: str, **labels: str) -> float | None:
    """A sample from the gateway's /metrics, or None when the series does not exist."""
    return await asyncio.to_thread(scrape, gateway, name, **labels)


@pytest.mark.usefixtures("seeded")
async def test_two_processes_refresh_once(
    fake: AsyncFake,
    serve: ServeFactory,
    base_env: dict[str, str],
    http: aiohttp.ClientSession,
) -> None:
    """Two servers that both see upstream 401s call the token endpoint once between them."""
    gateways = [await serve("gateway-a"), await serve("gateway-b")]
    per_gateway = 3
    for gw in gateways:  # warm each token cache with the seeded pair
        assert (await proxied(http, gw))[0] == 200

    await fake.control(action="expire_access_tokens")
    await fake.control(action="hold_tokens")
    await fake.control(action="clear_recordings")
    requests = [
        asyncio.create_task(proxied(http, gw)) for gw in gateways for _ in range(per_gateway)
    ]
    try:

        async def one_refresh_held_after_all_401s() -> bool:
            state = await fake.state()
            held: int = state["pending_token_requests"]
            answered_401: int = state["api_requests"].get(SLUG, 0)
            return held == 1 and answered_401 >= len(requests)

        await eventually(one_refresh_held_after_all_401s, "one held refresh and every 401")
        # Give the other process every chance to send a refresh of its own: it must not.
        await asyncio.sleep(0.5)
        state = await fake.state()
        assert state["pending_token_requests"] == 1
        assert state["token_requests_total"] == 1
    finally:
        await fake.control(action="release_tokens")

    results = await asyncio.wait_for(asyncio.gather(*requests), timeout=WAIT_TIMEOUT)
    assert [status for status, _ in results] == [200] * len(requests), results
    assert (await fake.state())["token_requests"] == {SLUG: {"refresh_token": 1}}
    info = await read_info(base_env)
    assert info.status is AccountStatus.ACTIVE
    assert info.generation == 2  # one rotation, stored once


@pytest.mark.usefixtures("seeded")
async def test_three_serve_processes_refresh_an_expired_token_once(
    fake: AsyncFake,
    serve: ServeFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Three servers on one database, concurrent requests through all three while the
    access token has expired upstream: exactly one token call between them, every request
    answered 200."""
    gateways = [await serve(f"gateway-{n}") for n in range(3)]
    for gw in gateways:
        assert (await proxied(http, gw))[0] == 200
    await fake.control(action="expire_access_tokens")
    await fake.control(action="clear_recordings")
    results = await asyncio.wait_for(
        asyncio.gather(*(proxied(http, gw) for gw in gateways for _ in range(4))),
        timeout=WAIT_TIMEOUT,
    )
    assert [status for status, _ in results] == [200] * 12, results
    assert (await fake.state())["token_requests"] == {SLUG: {"refresh_token": 1}}


@pytest.mark.usefixtures("seeded")
async def test_cli_refresh_while_serving_is_adopted(
    fake: AsyncFake,
    serve: ServeFactory,
    base_env: dict[str, str],
    http: aiohttp.ClientSession,
    processes: Processes,
) -> None:
    """`accounts refresh` next to a running server: the server adopts the rotated pair."""
    gateway = await serve("gateway")
    assert (await proxied(http, gateway))[0] == 200  # cached: the seeded access token
    old_expiry = (await read_info(base_env)).expires_at
    # Make the refresh kill the old access token, so only an adopted pair keeps working.
    await fake.control(action="set", old_access_token_survives_refresh=False)

    cli = await asyncio.to_thread(
        run_command,
        [sys.executable, "-m", "nbgateway", "accounts", "refresh", SLUG],
        env=base_env,
        cwd=processes.workdir,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"refreshed {SLUG}" in cli.stdout
    info = await read_info(base_env)
    assert info.generation == 2
    assert info.expires_at is not None and info.expires_at != old_expiry

    async def adopted() -> bool:
        value = await metric(gateway, "nbgw_access_token_expiry_timestamp_seconds", account=SLUG)
        return value is not None and abs(value - float(info.expires_at or 0)) < 0.01

    # The server notices other processes' commits in its 1 s sync loop.
    await eventually(adopted, "the server to adopt the refreshed pair", within=5)

    for _ in range(3):
        status, body = await proxied(http, gateway)
        assert status == 200, body
    assert await metric(gateway, "nbgw_upstream_401_retries_total", account=SLUG) is None
    assert await fake.grants() == 1  # the CLI's: the server never reused the dead token

    async with http.get(
        f"{gateway}/connect/api/accounts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as resp:
        [account] = (await resp.json())["accounts"]
    assert account["status"] == "active"
    assert account["last_error"] is None
    assert account["generation"] == 2
    assert "nbfake-" not in json.dumps(account)


@pytest.mark.usefixtures("seeded")
async def test_two_serve_processes_share_one_rate_budget(
    serve: ServeFactory, fake: AsyncFake, http: aiohttp.ClientSession
) -> None:
    """Two `nbgateway serve` processes, five tools each, on a budget of 10 per second: every
    tool request answers 200, and NationBuilder refuses at most 3 requests per window the
    burst needs (each one held and replayed by its gateway)."""
    tolerance = 3  # per window; tests/test_ratelimit_functional.py states the same bound
    gateways = [await serve("gateway-a"), await serve("gateway-b")]
    await fake.control(action="set", rate_limit=10, rate_window=1)

    async def tool(gateway: str) -> list[int]:
        return [(await proxied(http, gateway))[0] for _ in range(4)]

    results = await asyncio.gather(*(tool(gw) for gw in gateways for _ in range(5)))
    assert [s for statuses in results for s in statuses] == [200] * 40
    state = await fake.state()
    windows_needed = 40 // 10 + 1  # the first window may be partial
    assert state["rate_limited_total"] <= tolerance * windows_needed
    upstream_429 = [
        await metric(gw, "nbgw_upstream_429_total", account=SLUG) or 0.0 for gw in gateways
    ]
    assert sum(upstream_429) == state["rate_limited_total"]


# ---------------------------------------------------------------------- admin state


CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
WRONG_TOKEN = "not-the-admin-token-at-all-0000"


async def admin_request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    cookie: str | None = None,
    **kwargs: Any,
) -> tuple[int, Any, str]:
    """One request as a browser holding the session `cookie` (redirects not followed)."""
    headers = dict(kwargs.pop("headers", {}))
    if cookie is not None:
        headers["Cookie"] = f"nbgw_session={cookie}"
    async with http.request(method, url, headers=headers, allow_redirects=False, **kwargs) as resp:
        return resp.status, resp.headers, await resp.text()


def session_cookie_cleared(headers: Any) -> bool:
    """Whether the response tells the browser to drop its session cookie."""
    for header in headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        morsel = jar.get("nbgw_session")
        if morsel is not None and morsel.value == "" and morsel["max-age"] == "0":
            return True
    return False


async def test_logout_on_one_process_ends_the_session_on_the_other(
    serve: ServeFactory, http: aiohttp.ClientSession
) -> None:
    """Log in on A, use the session on B, log out on A: the same cookie is refused by B
    (and by A) from then on."""
    a, b = await serve("gateway-a"), await serve("gateway-b")
    async with http.post(
        f"{a}/connect/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
        cookie = resp.cookies["nbgw_session"].value
    status, _, page = await admin_request(http, "GET", f"{b}/connect", cookie=cookie)
    assert status == 200, page
    match = CSRF_RE.search(page)
    assert match is not None
    status, headers, body = await admin_request(
        http, "POST", f"{a}/connect/logout", cookie=cookie, data={"csrf": match.group(1)}
    )
    assert status == 303, body
    assert session_cookie_cleared(headers)
    for gateway in (b, a):
        status, headers, _ = await admin_request(http, "GET", f"{gateway}/connect", cookie=cookie)
        assert (status, headers.get("Location")) == (303, "/connect/login")


async def test_wrong_admin_tokens_count_across_processes(
    serve: ServeFactory, http: aiohttp.ClientSession
) -> None:
    """LOGIN_FAILURES wrong admin tokens from one address, spread over A and B and over the
    login form and the API's Bearer, lock that address out of both: the right token then
    gets 429 with Retry-After on either process, by form and by API."""
    a, b = await serve("gateway-a"), await serve("gateway-b")
    wrong_bearer = {"Authorization": f"Bearer {WRONG_TOKEN}"}
    for n in range(LOGIN_FAILURES):
        gateway = (a, b)[n % 2]
        if n % 3 == 0:
            status, _, _ = await admin_request(
                http, "POST", f"{gateway}/connect/login", data={"token": WRONG_TOKEN}
            )
        else:
            status, _, _ = await admin_request(
                http, "GET", f"{gateway}/connect/api/accounts", headers=wrong_bearer
            )
        assert status == 401, (n, gateway)
    right_bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for gateway in (a, b):
        status, headers, _ = await admin_request(
            http, "GET", f"{gateway}/connect/api/accounts", headers=right_bearer
        )
        assert status == 429, gateway
        assert headers["X-NBGW-Error"] == "too_many_attempts"
        assert 1 <= int(headers["Retry-After"]) <= LOGIN_WINDOW
        status, _, page = await admin_request(
            http, "POST", f"{gateway}/connect/login", data={"token": ADMIN_TOKEN}
        )
        assert status == 429, gateway
        assert "Too many wrong admin tokens" in page
