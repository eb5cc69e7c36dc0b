"""Several gateway processes on one SQLite file: one refresh between them, never two.

Real processes: the fake NationBuilder (`python -m nbgateway.fakenb`), two `nbgateway
serve` instances and the `nbgateway accounts refresh` command, all sharing one database.
NationBuilder's refresh tokens are single-use, so a second refresh of the same token would
kill the account; these tests check the cross-process lock and the adoption of a pair that
another process stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nbgateway.clock import SystemClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.models import AccountInfo, AccountStatus, EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.store import SQLiteStore

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "multiprocess-admin-token-0123456789"
SLUG = "acme"
READY_TIMEOUT = 20.0  # seconds for a subprocess to start serving
WAIT_TIMEOUT = 20.0  # seconds for any other condition to become true


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_os_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NBGW_")}


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it does not exit promptly; close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The subprocess's first line of output, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = WAIT_TIMEOUT
) -> None:
    """Poll `check` until it is true; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class FakeNB:
    url: str
    http: aiohttp.ClientSession

    async def control(self, **command: Any) -> dict[str, Any]:
        async with self.http.post(f"{self.url}/_fake/control", json=command) as resp:
            answer: dict[str, Any] = await resp.json()
        assert resp.status == 200 and answer["ok"], answer
        return answer

    async def state(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/_fake/state") as resp:
            state: dict[str, Any] = await resp.json()
        return state

    async def grants(self, grant: str = "refresh_token") -> int:
        count: int = (await self.state())["token_requests"].get(SLUG, {}).get(grant, 0)
        return count


@dataclass
class Processes:
    """Every subprocess a test started, with its log; all stopped at teardown."""

    tmp_path: Path
    started: list[tuple[str, subprocess.Popen[str], Path]] = field(default_factory=list)

    def log_of(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, pipe_stdout: bool = False
    ) -> subprocess.Popen[str]:
        log_path = self.tmp_path / f"{name}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log if pipe_stdout else subprocess.STDOUT,
                text=True,
                env=env,
                cwd=self.tmp_path,
            )
        self.started.append((name, proc, log_path))
        return proc

    def stop_all(self) -> None:
        for _name, proc, _log in reversed(self.started):
            stop_process(proc)
        for name, _proc, log_path in self.started:
            # Shown by pytest only when the test failed.
            print(f"----- {name} output -----\n{log_path.read_text(errors='replace')}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def fake(processes: Processes, http: aiohttp.ClientSession) -> FakeNB:
    """The fake NationBuilder as a subprocess on a free port."""
    proc = processes.spawn(
        "fakenb",
        [sys.executable, "-m", "nbgateway.fakenb", "--port", "0"],
        clean_os_environ(),
        pipe_stdout=True,
    )
    line = await asyncio.to_thread(first_line, proc, READY_TIMEOUT)
    assert line.startswith("fake NationBuilder listening on http://"), (
        f"the fake did not start: {line!r}\n{processes.log_of('fakenb')}"
    )
    return FakeNB(line.strip().rsplit(" ", 1)[1], http)


@pytest.fixture
def base_env(tmp_path: Path, fake: FakeNB) -> dict[str, str]:
    """What every gateway process shares: database, key, NationBuilder app, admin token."""
    return {
        **clean_os_environ(),
        "NBGW_DATABASE": str(tmp_path / "gateway.db"),
        "NBGW_ENCRYPTION_KEY": generate_key(),
        "NBGW_NATION_URL": f"{fake.url}/{{slug}}",
        "NBGW_CLIENT_ID": "fake-client-id",
        "NBGW_CLIENT_SECRET": "fake-client-secret",
        "NBGW_ADMIN_TOKEN": ADMIN_TOKEN,
        "NBGW_DEFAULT_ACCOUNT": SLUG,
        "NBGW_UPSTREAM_TIMEOUT": "10",
    }


def store_for(env: dict[str, str]) -> SQLiteStore:
    return SQLiteStore(
        Path(env["NBGW_DATABASE"]),
        Cipher([Secret(env["NBGW_ENCRYPTION_KEY"])]),
        SystemClock(),
    )


async def read_info(env: dict[str, str]) -> AccountInfo:
    async with store_for(env) as store:
        [info] = [i for i in await store.list_accounts() if i.slug == SLUG]
    return info


@pytest.fixture
async def seeded(base_env: dict[str, str], fake: FakeNB) -> dict[str, Any]:
    """An account with a fresh pair from the fake, stored as a completed /connect would."""
    issued: dict[str, Any] = (await fake.control(action="issue_tokens", slug=SLUG))["tokens"]
    async with store_for(base_env) as store:
        # A first write right after creating the file needs the main connection to have run
        # another statement (see test_cli.py::test_first_write_after_creating_the_database).
        await store.ping()
        await store.save_tokens(
            SLUG,
            TokenSet(
                access_token=Secret(issued["access_token"]),
                refresh_token=Secret(issued["refresh_token"]),
                expires_at=time.time() + float(issued["expires_in"]),
                scope=issued["scope"],
            ),
            EventKind.CONNECTED,
        )
    return issued


ServeFactory = Callable[[str], Awaitable[str]]


@pytest.fixture
def serve(
    processes: Processes, base_env: dict[str, str], http: aiohttp.ClientSession
) -> ServeFactory:
    """Start `nbgateway serve` on a free port; return its URL once /healthz answers."""

    async def start(name: str) -> str:
        port = free_port()
        env = {**base_env, "NBGW_LISTEN": f"127.0.0.1:{port}"}
        proc = processes.spawn(name, [sys.executable, "-m", "nbgateway", "serve"], env)
        url = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {proc.returncode}:\n{processes.log_of(name)}"
                )
            try:
                async with http.get(f"{url}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await eventually(healthy, f"{name} to answer /healthz", READY_TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{processes.log_of(name)}") from None
        return url

    return start


async def proxied(http: aiohttp.ClientSession, gateway: str) -> tuple[int, str]:
    async with http.get(f"{gateway}/api/v2/signups/me") as resp:
        return resp.status, await resp.text()


async def metric(
    http: aiohttp.ClientSession, gateway: str, name: str, **labels: str
) -> float | None:
    """A sample from the gateway's /metrics, or None when the series does not exist."""
    async with http.get(f"{gateway}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_two_processes_refresh_once(
    seeded: dict[str, Any],
    fake: FakeNB,
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


async def test_cli_refresh_while_serving_is_adopted(
    seeded: dict[str, Any],
    fake: FakeNB,
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
        subprocess.run,
        [sys.executable, "-m", "nbgateway", "accounts", "refresh", SLUG],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env,
        cwd=processes.tmp_path,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"refreshed {SLUG}" in cli.stdout
    info = await read_info(base_env)
    assert info.generation == 2
    assert info.expires_at is not None and info.expires_at != old_expiry

    async def adopted() -> bool:
        value = await metric(
            http, gateway, "nbgw_access_token_expiry_timestamp_seconds", account=SLUG
        )
        return value is not None and abs(value - float(info.expires_at or 0)) < 0.01

    # The server notices other processes' commits in its 1 s sync loop.
    await eventually(adopted, "the server to adopt the refreshed pair", within=5)

    for _ in range(3):
        status, body = await proxied(http, gateway)
        assert status == 200, body
    assert await metric(http, gateway, "nbgw_upstream_401_retries_total", account=SLUG) is None
    assert await fake.grants() == 1  # the CLI's: the server never reused the dead token

    async with http.get(
        f"{gateway}/connect/api/accounts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as resp:
        [account] = (await resp.json())["accounts"]
    assert account["status"] == "active"
    assert account["last_error"] is None
    assert account["generation"] == 2
    assert "nbfake-" not in json.dumps(account)
