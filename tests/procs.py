"""Subprocess and seeding helpers shared by the slow tests.

The slow tests run the real programs on loopback: the fake NationBuilder
(`python -m nbgateway.fakenb`), `python -m nbgateway serve`, the CLI and Prometheus. This
module starts them with a readiness deadline, keeps each one's output in a log file so a
failing test can print it, stops them (SIGTERM, then SIGKILL), talks to the fake's control
endpoint, and seeds accounts into a gateway database the way a completed /connect would.
Apart from `seed_account` (the store is async) and `eventually` (polling with an awaitable
check), everything here is synchronous; async tests call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import CLIENT_ID, CLIENT_SECRET
from prometheus_client.parser import text_string_to_metric_families

from nbgateway.clock import SystemClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.models import EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.store import TokenStore, is_postgres_url, make_store

READY_TIMEOUT = 20.0  # seconds for a subprocess to start serving
STOP_TIMEOUT = 10.0  # seconds for a subprocess to exit after SIGTERM (and again after SIGKILL)
FAKE_LISTENING = "fake NationBuilder listening on http://"  # the fake's first line of output


# ---------------------------------------------------------------------- plain helpers


def dead_process_id() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def clean_os_environ() -> dict[str, str]:
    """This process's environment without any NBGW_* variable (the base for a subprocess)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NBGW_")}


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_request(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request (`body`, if any, sent as JSON); (status, headers, body) for every status.

    Raises OSError when nothing answers (refused, reset, timed out).
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Poll `check` (another process's or session's state) until it is true; fail naming
    `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    """Poll `check` until it is true; fail naming `what` after `within` seconds.

    An OSError from `check` counts as "not yet" (the server is not listening yet).
    """
    give_up = time.monotonic() + within
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        time.sleep(0.05)  # polling another process's state, not waiting for time to pass


def run_command(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with its output captured as text; never raises on its status.

    `env` defaults to this process's environment without NBGW_* variables. Raises
    subprocess.TimeoutExpired when it runs longer than `timeout` seconds.
    """
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_os_environ() if env is None else env,
        cwd=cwd,
        check=False,
    )


def scrape(gateway_url: str, name: str, **labels: str) -> float | None:
    """A sample from a running gateway's /metrics, or None when the series does not exist."""
    _, _, body = http_request("GET", f"{gateway_url}/metrics", timeout=5)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


# ---------------------------------------------------------------------- subprocesses


@dataclass
class Process:
    """A started subprocess and the file that holds its output."""

    name: str
    popen: subprocess.Popen[str]
    log_path: Path

    def output(self, tail: int | None = None) -> str:
        """What it wrote so far (its last `tail` characters, when given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def answers(self, url: str) -> bool:
        """True once `url` answers 200; fails at once if the process has exited."""
        if not self.alive():
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}")
        return http_request("GET", url, timeout=1)[0] == 200

    def first_line(self, within: float) -> str:
        """Its first line on stdout (started with pipe_stdout), or "" after `within` seconds."""
        assert self.popen.stdout is not None, "started without pipe_stdout"
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            if not sel.select(within):
                return ""
        return self.popen.stdout.readline()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit promptly; close its pipes."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=STOP_TIMEOUT)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


@dataclass
class Processes:
    """Every subprocess a test (or module) started, each logging to `workdir/<name>.log`."""

    workdir: Path
    started: list[Process] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], env: dict[str, str], *, pipe_stdout: bool = False
    ) -> Process:
        """Start `argv` in `workdir`; stdout and stderr go to the log, or only stderr does
        when `pipe_stdout` is set (to read a first line that announces readiness)."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("w") as log:
            popen = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log if pipe_stdout else subprocess.STDOUT,
                text=True,
                env=env,
                cwd=self.workdir,
            )
        process = Process(name, popen, log_path)
        self.started.append(process)
        return process

    def report(self, tail: int | None = None) -> str:
        """Each process's state and output, for a failure message."""
        parts = []
        for process in self.started:
            state = "running" if process.alive() else f"exited {process.popen.returncode}"
            parts.append(f"----- {process.name} ({state}) -----\n{process.output(tail)}")
        return "\n".join(parts)

    @contextmanager
    def explained(self, tail: int | None = None) -> Iterator[None]:
        """On failure, print every subprocess's output (pytest shows it with the failure)."""
        try:
            yield
        except BaseException:
            print(self.report(tail))
            raise

    def stop_all(self) -> None:
        """Stop every process, the last started first."""
        for process in reversed(self.started):
            process.stop()


def wait_ready(process: Process, url: str, within: float = READY_TIMEOUT) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits first or
    the deadline passes."""
    try:
        wait_until(lambda: process.answers(url), within, f"{process.name} to answer {url}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{process.output()}") from None


# ---------------------------------------------------------------------- the fake NationBuilder


@dataclass
class FakeNB:
    """The fake NationBuilder running as a subprocess, driven through its HTTP endpoints."""

    url: str

    def control(self, **command: Any) -> dict[str, Any]:
        """POST `command` to /_fake/control; its answer, which must say ok."""
        status, _, body = http_request("POST", f"{self.url}/_fake/control", command, timeout=5)
        answer: dict[str, Any] = json.loads(body)
        assert status == 200 and answer["ok"], answer
        return answer

    def state(self) -> dict[str, Any]:
        """What /_fake/state reports (recorded token and API requests, held calls)."""
        _, _, body = http_request("GET", f"{self.url}/_fake/state", timeout=5)
        state: dict[str, Any] = json.loads(body)
        return state

    def grants(self, slug: str, grant: str = "refresh_token") -> int:
        """How many token requests of this grant type the nation received."""
        count: int = self.state()["token_requests"].get(slug, {}).get(grant, 0)
        return count

    def issue_tokens(self, slug: str) -> dict[str, Any]:
        """A fresh pair for `slug`, as the token endpoint returns it."""
        tokens: dict[str, Any] = self.control(action="issue_tokens", slug=slug)["tokens"]
        return tokens


def start_fake(processes: Processes, name: str = "fakenb", within: float = READY_TIMEOUT) -> FakeNB:
    """Start `python -m nbgateway.fakenb` on a free loopback port; return it once it listens."""
    process = processes.start(
        name,
        [sys.executable, "-m", "nbgateway.fakenb", "--host", "127.0.0.1", "--port", "0"],
        clean_os_environ(),
        pipe_stdout=True,
    )
    line = process.first_line(within)
    assert line.startswith(FAKE_LISTENING), f"{name} did not start: {line!r}\n{process.output()}"
    return FakeNB(line.strip().rsplit(" ", 1)[1])


# ---------------------------------------------------------------------- the gateway


def gateway_env(
    database: Path | str, admin_token: str, fake_url: str | None = None, key: str | None = None
) -> dict[str, str]:
    """The NBGW_* settings of a gateway on `database` (a fresh key unless `key` is given),
    the fake's client credentials and, with `fake_url`, the fake as every nation's URL."""
    env = {
        "NBGW_DATABASE": str(database),
        "NBGW_ENCRYPTION_KEY": key or generate_key(),
        "NBGW_CLIENT_ID": CLIENT_ID,
        "NBGW_CLIENT_SECRET": CLIENT_SECRET,
        "NBGW_ADMIN_TOKEN": admin_token,
    }
    if fake_url is not None:
        env["NBGW_NATION_URL"] = f"{fake_url}/{{slug}}"
    return env


def start_gateway(
    processes: Processes,
    env: dict[str, str],
    name: str = "gateway",
    *,
    public: bool = False,
    within: float = READY_TIMEOUT,
) -> str:
    """Start `python -m nbgateway serve` on a free loopback port; return its URL once /healthz
    answers. `env` is added to this process's environment without NBGW_* variables;
    `public` makes the gateway's own URL its NBGW_PUBLIC_URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {**clean_os_environ(), **env, "NBGW_LISTEN": f"127.0.0.1:{port}"}
    if public:
        full_env["NBGW_PUBLIC_URL"] = url
    process = processes.start(name, [sys.executable, "-m", "nbgateway", "serve"], full_env)
    wait_ready(process, f"{url}/healthz", within)
    return url


# ---------------------------------------------------------------------- seeding the database


def open_store(env: Mapping[str, str], keys: str | None = None) -> TokenStore:
    """A store on the environment's NBGW_DATABASE (a SQLite path or a postgresql:// URL),
    opened with `keys` (comma-separated) or its NBGW_ENCRYPTION_KEY; use it as `async with`."""
    key_list = (keys or env["NBGW_ENCRYPTION_KEY"]).split(",")
    database = env["NBGW_DATABASE"]
    return make_store(
        database if is_postgres_url(database) else Path(database),
        Cipher([Secret(k) for k in key_list]),
        SystemClock(),
    )


async def create_database(env: Mapping[str, str]) -> None:
    """Create and migrate the environment's database, empty (what a first `serve` does)."""
    async with open_store(env):
        pass


def create_database_elsewhere(env: Mapping[str, str]) -> None:
    """`create_database` in a child process, so this one keeps no descriptor of the file."""
    code = (
        "import asyncio, os, sys; sys.path.insert(0, sys.argv[1]); import procs; "
        "asyncio.run(procs.create_database(os.environ))"
    )
    result = run_command(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent)], env={**env}
    )
    assert result.returncode == 0, result.stderr


def token_set(issued: Mapping[str, Any], now: float | None = None) -> TokenSet:
    """The pair a token endpoint answered (`access_token`, `refresh_token`, `expires_in`,
    `scope`) with its expiry made absolute from `now` (default: the wall clock)."""
    start = time.time() if now is None else now
    return TokenSet(
        access_token=Secret(issued["access_token"]),
        refresh_token=Secret(issued["refresh_token"]),
        expires_at=start + float(issued["expires_in"]),
        scope=issued["scope"],
    )


async def seed_account(env: Mapping[str, str], slug: str, issued: Mapping[str, Any]) -> None:
    """Store the `issued` pair for `slug` in the environment's database, as /connect would."""
    async with open_store(env) as store:
        # A first write right after creating the file needs the main connection to have run
        # another statement (see test_cli.py::test_first_write_after_creating_the_database).
        await store.ping()
        await store.save_tokens(slug, token_set(issued), EventKind.CONNECTED)


def raw_query(database: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Rows of `sql` read straight from a SQLite file (as an operator's sqlite3 would)."""
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()


def raw_execute(database: Path | str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Run and commit `sql` straight on a SQLite file (a hand edit behind the store's back)."""
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as conn, conn:
        conn.execute(sql, params)


def corrupt_refresh_token(database: Path | str, slug: str) -> None:
    """Flip one ciphertext byte of `slug`'s stored refresh token in a SQLite database (the
    key id stays intact, so the row is damaged, not encrypted with another key)."""
    [(blob,)] = raw_query(database, "SELECT refresh_token FROM accounts WHERE slug = ?", (slug,))
    damaged = blob[:-1] + bytes([blob[-1] ^ 0x01])
    raw_execute(database, "UPDATE accounts SET refresh_token = ? WHERE slug = ?", (damaged, slug))
