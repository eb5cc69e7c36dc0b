"""`serve --workers N`: N processes on one address, watched and stopped by one parent.

Real processes: the fake NationBuilder and `python -m nbgateway serve` with two workers on
one SQLite file. Which worker answered is read from the X-NBGW-Worker header (its pid);
a request is sent to a chosen worker over a keep-alive connection whose first answer came
from it. Process states are read from /proc (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from conftest import ADMIN_TOKEN
from procs import (
    FakeNB,
    Process,
    Processes,
    clean_os_environ,
    dead_process_id,
    free_port,
    gateway_env,
    run_command,
    seed_account,
    start_fake,
    wait_ready,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from nbgateway.clock import FakeClock
from nbgateway.server import WORKER_HEADER, ListenError, bind, rejoin
from nbgateway.workers import (
    EXIT_NOT_STARTED,
    FIRST_BACKOFF,
    METRICS_PREFIX,
    POLL_INTERVAL,
    STEADY_AFTER,
    Workers,
    _remove_stale_metrics_dirs,
)

pytestmark = pytest.mark.slow

SLUG = "acme"
WAIT = 20.0  # seconds for a condition between processes to become true
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


# ---------------------------------------------------------------------- helpers


class Gateway:
    """A `serve --workers` parent on a free port and the tools to reach each worker."""

    def __init__(self, process: Process, url: str) -> None:
        self.process = process
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def worker_of(self, conn: http.client.HTTPConnection) -> int:
        """The pid of the worker that answers /healthz on this connection."""
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        return int(resp.headers[WORKER_HEADER])

    def pinned(self, want: int | None = None, avoid: int | None = None) -> tuple[int, Any]:
        """A keep-alive connection answered by worker `want` (or by any but `avoid`).

        Workers start at their own pace: keep trying fresh connections until WAIT passes.
        """
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            conn = self.connect()
            try:
                pid = self.worker_of(conn)
            except BaseException:
                conn.close()
                raise
            if (want is None or pid == want) and pid != avoid:
                return pid, conn
            conn.close()
        raise AssertionError(f"no connection reached worker {want} (avoiding {avoid})")

    def workers(self, count: int = 2) -> set[int]:
        """The pids of `count` distinct workers, each seen answering on a fresh connection."""
        seen: set[int] = set()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            conn = self.connect()
            try:
                seen.add(self.worker_of(conn))
            finally:
                conn.close()
            if len(seen) == count:
                return seen
        raise AssertionError(f"only workers {seen} answered")

    def metrics(self) -> tuple[int, dict[str, float]]:
        """(answering worker, {sample name with labels: value}) from one fresh scrape."""
        conn = self.connect()
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200
            samples: dict[str, float] = {}
            for family in text_string_to_metric_families(body):
                for s in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    samples[f"{s.name}{{{labels}}}"] = s.value
            return int(resp.headers[WORKER_HEADER]), samples
        finally:
            conn.close()


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: str


def send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
) -> Answer:
    """One request on `conn` (a form body when given); the whole answer."""
    headers = dict(headers or {})
    body = None
    if form is not None:
        body = urlencode(form)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return Answer(resp.status, resp.headers, resp.read().decode())


def get(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None
) -> Answer:
    return send(conn, "GET", path, headers=headers)


def proxied_total(samples: dict[str, float], name: str = "nbgw_proxy_requests_total") -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None without such a process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def state_of(pid: int) -> str:
    """The process's state letter, or "gone" when no such process exists."""
    fields = _stat(pid)
    return "gone" if fields is None else fields[0]


def parent_of(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"no process {pid}"
    return int(fields[1])


def gone(pid: int) -> bool:
    """No such process, or only its exit status is left (a zombie nobody reaped yet)."""
    return state_of(pid) in ("gone", "Z", "X")


def started_pids(process: Process) -> list[int]:
    """Worker pids in the order the parent logged starting them."""
    return [
        int(p) for p in re.findall(r"worker started \[worker=\d+ pid=(\d+)\]", process.output())
    ]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
        print(procs.report())  # shown by pytest only when the test failed


@pytest.fixture
def fake(processes: Processes) -> FakeNB:
    return start_fake(processes)


@pytest.fixture
def env(tmp_path: Path, fake: FakeNB) -> dict[str, str]:
    """The environment of a two-worker gateway; temporary files go to tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    return {
        **clean_os_environ(),
        **gateway_env(tmp_path / "gateway.db", ADMIN_TOKEN, fake.url),
        "NBGW_DEFAULT_ACCOUNT": SLUG,
        "TMPDIR": str(tmp_path / "tmp"),
    }


def start(
    processes: Processes, env: dict[str, str], *, flag: bool = True, extra: tuple[str, ...] = ()
) -> Gateway:
    """`serve --workers 2` (or NBGW_WORKERS=2 when not `flag`) with its own URL as public;
    `extra` arguments follow `serve`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = {**env, "NBGW_LISTEN": f"127.0.0.1:{port}", "NBGW_PUBLIC_URL": url}
    argv = [sys.executable, "-m", "nbgateway", "serve", *extra]
    if flag:
        argv += ["--workers", "2"]
    else:
        full["NBGW_WORKERS"] = "2"
    process = processes.start("gateway", argv, full)
    wait_ready(process, f"{url}/healthz")
    return Gateway(process, url)


def seed(env: dict[str, str], fake: FakeNB) -> None:
    """Store a fresh pair from the fake for SLUG, as a completed /connect would."""
    issued = fake.issue_tokens(SLUG)
    asyncio.run(seed_account(env, SLUG, issued))


@pytest.fixture
def gateway(processes: Processes, env: dict[str, str], fake: FakeNB) -> Gateway:
    """A seeded account and a two-worker gateway serving it."""
    seed(env, fake)
    return start(processes, env)


# ---------------------------------------------------------------------- tests


def test_both_workers_serve_proxied_requests(gateway: Gateway, fake: FakeNB) -> None:
    """Fresh connections reach two distinct worker processes, both children of the parent,
    and each one proxies with the stored token."""
    pids = gateway.workers(2)
    assert pids == set(started_pids(gateway.process))
    for pid in pids:
        assert parent_of(pid) == gateway.process.popen.pid
        _, conn = gateway.pinned(want=pid)
        resp = get(conn, "/api/v2/signups/me")
        assert resp.status == 200, resp.body
        assert int(resp.headers[WORKER_HEADER]) == pid
        conn.close()


def test_nbgw_workers_setting_starts_workers(
    processes: Processes, env: dict[str, str], fake: FakeNB
) -> None:
    """NBGW_WORKERS=2 without the flag starts two workers too."""
    gateway = start(processes, env, flag=False)
    assert len(gateway.workers(2)) == 2


def test_expired_token_is_refreshed_once_across_workers(
    processes: Processes, env: dict[str, str], fake: FakeNB
) -> None:
    """Concurrent requests on an access token NationBuilder expired, through both workers,
    make one token call between them; every request is answered."""
    seed(env, fake)
    gateway = start(processes, env)
    pids = sorted(gateway.workers(2))
    fake.control(action="expire_access_tokens")
    fake.control(action="hold_tokens")
    fake.control(action="clear_recordings")
    conns = [gateway.pinned(want=pid)[1] for pid in pids for _ in range(3)]
    results: list[tuple[int, int]] = []

    def one(conn: http.client.HTTPConnection) -> None:
        resp = get(conn, "/api/v2/signups/me")
        results.append((resp.status, int(resp.headers[WORKER_HEADER])))

    threads = [threading.Thread(target=one, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    try:

        def all_waiting() -> bool:
            _, samples = gateway.metrics()
            in_flight = samples.get("nbgw_proxy_in_flight_requests{}", 0)
            state = fake.state()
            answered_401: int = state["api_requests"].get(SLUG, 0)
            return (
                in_flight == len(conns)
                and answered_401 >= len(conns)
                and state["pending_token_requests"] == 1
            )

        wait_until(all_waiting, WAIT, "every request in flight and one held token call")
        time.sleep(0.5)  # give the other worker every chance to send a token call: it must not
        assert fake.state()["token_requests_total"] == 1
    finally:
        fake.control(action="release_tokens")
        for t in threads:
            t.join(timeout=WAIT)
    assert sorted(results) == sorted((200, pid) for pid in pids for _ in range(3))
    assert fake.state()["token_requests"] == {SLUG: {"refresh_token": 1}}
    for conn in conns:
        conn.close()


def test_a_key_removed_with_the_cli_is_refused_by_every_worker_at_once(
    processes: Processes, env: dict[str, str], fake: FakeNB
) -> None:
    """`nbgateway clients remove` while two workers serve with the key: the first request on
    each worker after the command returns is refused (the contract's "at once, in every
    process"), with no second to wait for the background sync. Every log line stays in
    NBGW_LOG_FORMAT (no raw Python warning about multiprocess metrics), and the removed
    client's counts stay in /metrics, no longer growing, until the gateway restarts."""
    seed(env, fake)
    env = {**env, "NBGW_CLIENT_AUTH": "required", "NBGW_LOG_FORMAT": "json"}
    gateway = start(processes, env)
    added = run_command([sys.executable, "-m", "nbgateway", "clients", "add", "tool"], env=env)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip().splitlines()[-1]
    headers = {"X-NBGW-Key": key}
    first, one = gateway.pinned()
    _, two = gateway.pinned(avoid=first)
    for conn in (one, two):
        assert get(conn, "/api/v2/signups/me", headers).status == 200
    removed = run_command([sys.executable, "-m", "nbgateway", "clients", "remove", "tool"], env=env)
    assert removed.returncode == 0, removed.stderr
    for conn in (one, two):
        answer = get(conn, "/api/v2/signups/me", headers)
        assert (answer.status, answer.headers["X-NBGW-Error"]) == (401, "client_key_invalid")
    one.close()
    two.close()
    series = f"nbgw_client_requests_total{{account={SLUG},client=tool,code=200}}"
    assert gateway.metrics()[1][series] == 2
    gateway.process.stop()
    lines = gateway.process.output().splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_a_removed_account_reads_gone_in_every_worker(
    gateway: Gateway, env: dict[str, str]
) -> None:
    """After `accounts remove` (another process), every worker's scrape shows the account's
    token gauges at 0, the value the shipped alerts and dashboards take for "gone": a
    stale expiry would page NBGatewayTokenNearExpiry a day later."""
    pids = sorted(gateway.workers(2))
    for pid in pids:
        _, conn = gateway.pinned(want=pid)
        assert get(conn, "/api/v2/signups/me").status == 200
        conn.close()
    _, samples = gateway.metrics()
    assert samples[f"nbgw_access_token_expiry_timestamp_seconds{{account={SLUG}}}"] > 0

    removed = subprocess.run(
        [sys.executable, "-m", "nbgateway", "accounts", "remove", SLUG],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert removed.returncode == 0, removed.stderr

    answered_by: set[int] = set()

    def gone_everywhere() -> bool:
        pid, samples = gateway.metrics()
        gauges = [
            samples.get(f"{name}{{account={SLUG}}}")
            for name in (
                "nbgw_access_token_expiry_timestamp_seconds",
                "nbgw_account_last_refresh_success_timestamp_seconds",
                "nbgw_account_needs_reauth",
            )
        ]
        if all(value in (0, None) for value in gauges):
            answered_by.add(pid)
        return answered_by == set(pids)

    wait_until(gone_everywhere, WAIT, "every worker's scrape to show the account gone")


def _proc_figures(pid: int) -> tuple[float, float]:
    """(resident bytes, start time) of a process, from /proc as prometheus_client reads them."""
    from prometheus_client import ProcessCollector

    found = {
        f.name: f.samples[0].value
        for f in ProcessCollector(pid=lambda: pid, registry=None).collect()
    }
    return found["process_resident_memory_bytes"], found["process_start_time_seconds"]


def _cpu_seconds(pid: int) -> float:
    from prometheus_client import ProcessCollector

    for family in ProcessCollector(pid=lambda: pid, registry=None).collect():
        if family.name == "process_cpu_seconds":
            return float(family.samples[0].value)
    raise AssertionError(f"no CPU seconds for {pid}")


def test_cpu_seconds_do_not_go_back_when_a_worker_dies(gateway: Gateway) -> None:
    """kill -9 of a worker keeps its CPU seconds in process_cpu_seconds_total (they were
    dropped from the sum, a counter reset that rate() read as a burst of the survivors'
    whole lifetime): the first scrape after the restart is at least the one before plus
    the replacement's own CPU, and none after it goes back."""
    victim, conn = gateway.pinned()
    for _ in range(20):
        assert get(conn, "/api/v2/signups/me").status == 200
    conn.close()
    _, samples = gateway.metrics()
    before = samples["process_cpu_seconds_total{}"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(started_pids(gateway.process)) == 3, WAIT, "a replacement worker")
    replacement = started_pids(gateway.process)[-1]
    gateway.workers(2)
    replacement_cpu = _cpu_seconds(replacement)
    _, samples = gateway.metrics()
    after = samples["process_cpu_seconds_total{}"]
    assert after >= before + replacement_cpu, (before, replacement_cpu, after)
    for _ in range(4):
        _, samples = gateway.metrics()
        assert samples["process_cpu_seconds_total{}"] >= after
        after = samples["process_cpu_seconds_total{}"]


def test_process_series_describe_the_whole_gateway(gateway: Gateway) -> None:
    """process_* on /metrics are the gateway's, whichever worker answers: memory and open
    descriptors summed over the parent and both workers, the start time the parent's
    (they were the answering worker's, so CPU and uptime jumped from scrape to scrape)."""
    pids = gateway.workers(2)
    parent = gateway.process.popen.pid
    every = [parent, *pids]
    answered_by: set[int] = set()
    deadline = time.monotonic() + WAIT
    while len(answered_by) < 2 and time.monotonic() < deadline:
        pid, samples = gateway.metrics()
        answered_by.add(pid)
        resident = samples["process_resident_memory_bytes{}"]
        own = sum(_proc_figures(p)[0] for p in every)
        assert 0.8 * own < resident < 1.2 * own, (resident, own)
        assert resident > 1.5 * _proc_figures(pid)[0]  # more than the answering worker
        assert samples["process_start_time_seconds{}"] == _proc_figures(parent)[1]
        assert samples["process_open_fds{}"] > 3 * 3
    assert answered_by == pids


def test_metrics_total_every_worker_in_every_scrape(gateway: Gateway) -> None:
    """/metrics counts the requests of all workers, whichever worker answers the scrape."""
    pids = sorted(gateway.workers(2))
    sent = {pid: 0 for pid in pids}
    for i in range(20):
        pid, conn = gateway.pinned(want=pids[i % 2])
        assert get(conn, "/api/v2/signups/me").status == 200
        sent[pid] += 1
        conn.close()
    answered_by: set[int] = set()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        pid, samples = gateway.metrics()
        answered_by.add(pid)
        assert proxied_total(samples) == 20, samples
        assert samples[f"nbgw_proxy_request_duration_seconds_count{{account={SLUG}}}"] == 20
        assert samples.get("nbgw_proxy_in_flight_requests{}") == 0
        assert samples["nbgw_account_needs_reauth{account=acme}"] == 0
        python, version = build_labels(samples)
        assert samples[f"nbgw_build_info{{python={python},version={version}}}"] == 1
        if len(answered_by) == 2:
            break
    assert answered_by == set(pids)  # both workers answered a scrape with the same totals


def build_labels(samples: dict[str, float]) -> tuple[str, str]:
    [key] = [k for k in samples if k.startswith("nbgw_build_info{")]
    labels = dict(part.split("=", 1) for part in key[len("nbgw_build_info{") : -1].split(","))
    return labels["python"], labels["version"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_every_process(gateway: Gateway, tmp_path: Path, signum: int) -> None:
    """SIGTERM, SIGINT or SIGHUP (a closed terminal; it was fatal at once, leaving the
    metrics directory behind) to the parent: it exits 0, no worker is left, the port and
    the metrics directory are released."""
    pids = gateway.workers(2)
    assert any((tmp_path / "tmp").iterdir())  # the metrics directory of this run
    gateway.process.popen.send_signal(signum)
    assert gateway.process.popen.wait(timeout=WAIT) == 0
    if signum == signal.SIGHUP:
        assert "SIGHUP received: stopping" in gateway.process.output()
    for pid in pids:
        assert gone(pid), (pid, state_of(pid))
    assert list((tmp_path / "tmp").iterdir()) == []
    with socket.create_server((gateway.host, gateway.port)):
        pass  # the address can be bound again


def test_new_connections_are_refused_while_the_workers_drain(
    gateway: Gateway, fake: FakeNB
) -> None:
    """After SIGTERM the address stops listening at once, as with one process: a request
    still running (here held by NationBuilder) keeps its worker alive, yet a new
    connection is refused rather than queued for nobody until the workers have gone."""
    fake.control(action="set", api_hang=True)
    _, conn = gateway.pinned()
    held = threading.Thread(target=lambda: _swallow(lambda: get(conn, "/api/v2/signups/me")))
    held.start()
    wait_until(lambda: fake.state()["api_requests_total"] >= 1, WAIT, "the held request")
    gateway.process.popen.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection((gateway.host, gateway.port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, WAIT, "new connections to be refused")
    assert gateway.process.popen.poll() is None  # still draining the held request
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes: the drain ends, the test too
    held.join(WAIT)
    conn.close()


def _swallow(call: Any) -> None:
    with contextlib.suppress(Exception):
        call()


def test_killed_worker_is_replaced_and_counts_survive(gateway: Gateway) -> None:
    """kill -9 of a worker: the parent logs it and starts another; serving resumes on
    two workers and the dead worker's requests stay in the totals."""
    victim, conn = gateway.pinned()
    for _ in range(3):
        assert get(conn, "/api/v2/signups/me").status == 200
    conn.close()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(started_pids(gateway.process)) == 3, WAIT, "a replacement worker")
    assert "worker exited; restarting" in gateway.process.output()
    pids = gateway.workers(2)
    assert victim not in pids
    for pid in pids:
        _, conn = gateway.pinned(want=pid)
        assert get(conn, "/api/v2/signups/me").status == 200
        conn.close()
    for _ in range(4):
        _, samples = gateway.metrics()
        assert proxied_total(samples) == 5


def test_dead_workers_files_are_folded_and_counts_stay(gateway: Gateway, tmp_path: Path) -> None:
    """Each kill -9 leaves no files of the dead worker in the metrics directory (they are
    folded into one archive per type), so restarts do not make scrapes slower; every
    request stays counted, in every scrape."""
    sent = 0
    for _ in range(3):
        victim, conn = gateway.pinned()
        for _ in range(2):
            assert get(conn, "/api/v2/signups/me").status == 200
            sent += 1
        conn.close()
        want = len(started_pids(gateway.process)) + 1

        def replaced(want: int = want) -> bool:
            return len(started_pids(gateway.process)) == want

        os.kill(victim, signal.SIGKILL)
        wait_until(replaced, WAIT, "a replacement")
        gateway.workers(2)
        for _ in range(3):
            _, samples = gateway.metrics()
            assert proxied_total(samples) == sent
    [directory] = list((tmp_path / "tmp").iterdir())
    live = gateway.workers(2)
    names = {p.name for p in directory.glob("*.db")}
    pids = {
        int(m.group(1)) for n in names if (m := re.match(r"(?:counter|histogram)_(\d+)\.db", n))
    }
    assert pids <= live, names  # only running workers have files of their own
    assert {"counter_archive.db", "histogram_archive.db"} <= names


STUBBORN_PARENT = """
import os, sys
from nbgateway.clock import SystemClock
from nbgateway.server import bind, rejoin
from nbgateway.workers import Workers

child = (
    "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    # One write per line: two workers share the output, and print() may split a line.
    "os.write(1, b'ignoring SIGTERM %d\\\\n' % os.getpid()); time.sleep(600)"
)
sockets = bind("127.0.0.1", 0, 2)
command = lambda fd, pipe: [sys.executable, "-c", child]
sys.exit(Workers(command, os.environ, sockets, rejoin=rejoin, clock=SystemClock(), grace=1).run())
"""


def test_workers_that_ignore_sigterm_are_killed_after_the_grace(processes: Processes) -> None:
    """A worker still running when the shutdown grace ends gets SIGKILL; the parent then
    exits 0 with nothing left behind."""
    parent = processes.start("parent", [sys.executable, "-c", STUBBORN_PARENT], clean_os_environ())

    def pids() -> list[int]:
        return [int(p) for p in re.findall(r"ignoring SIGTERM (\d+)", parent.output())]

    wait_until(lambda: len(pids()) == 2, WAIT, "two workers ignoring SIGTERM")
    parent.popen.send_signal(signal.SIGTERM)
    assert parent.popen.wait(timeout=WAIT) == 0
    for pid in pids():
        assert gone(pid), (pid, state_of(pid))


def test_workers_exit_when_the_parent_is_killed(
    gateway: Gateway, processes: Processes, env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL to the parent (no chance to clean up): the workers notice and exit; the
    metrics directory it left is removed by the next `serve --workers`, which keeps its own."""
    pids = gateway.workers(2)
    gateway.process.popen.kill()
    gateway.process.popen.wait(timeout=WAIT)
    wait_until(lambda: all(gone(pid) for pid in pids), WAIT, "the orphaned workers to exit")
    [left] = list((tmp_path / "tmp").iterdir())
    start(processes, env).workers(2)
    [kept] = list((tmp_path / "tmp").iterdir())
    assert kept != left and not left.exists()


def failing_workers(tmp_path: Path, env: dict[str, str], status: int) -> dict[str, str]:
    """`env` where every worker (a `serve --listen-fd` process) exits with `status` as soon
    as Python starts, through a sitecustomize module; the parent is not affected."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if any(a.startswith('--listen-fd') for a in sys.argv):\n"
        f"    os._exit({status})\n"
    )
    return {**env, "PYTHONPATH": str(site), "NBGW_LISTEN": f"127.0.0.1:{free_port()}"}


def test_crash_looping_worker_backs_off(
    processes: Processes, env: dict[str, str], tmp_path: Path
) -> None:
    """Workers that die at once are restarted after 0.5 s, then 1 s, then 2 s (each its own
    delay), not in a tight loop; SIGTERM still stops the parent cleanly."""
    argv = [sys.executable, "-m", "nbgateway", "serve", "--workers", "2"]
    process = processes.start("gateway", argv, failing_workers(tmp_path, env, 1))
    pattern = (
        r"worker exited; restarting \[worker=(\d) pid=\d+ exit_code=1 ran_seconds=[\d.]+ "
        r"restart_in_seconds=([\d.]+) taking_connections=False\]"
    )

    def delays() -> dict[str, list[float]]:
        found: dict[str, list[float]] = {"1": [], "2": []}
        for worker, delay in re.findall(pattern, process.output()):
            found[worker].append(float(delay))
        return found

    wait_until(lambda: all(len(d) >= 3 for d in delays().values()), WAIT, "three restarts each")
    for found in delays().values():
        assert found[:3] == [0.5, 1.0, 2.0], delays()
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(timeout=WAIT) == 0


def test_restarts_wait_for_the_backoff_on_the_parents_clock(tmp_path: Path) -> None:
    """A worker that exits at once is restarted only when its backoff has passed on the
    parent's clock (0.5 s, then 1 s): with the clock standing still, however many rounds
    the parent watches, no restart comes; SIGTERM stops the parent."""
    clock = FakeClock()
    starts = tmp_path / "starts"
    script = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(1)"
    parent = Workers(
        lambda fd, pipe: [sys.executable, "-c", script],
        {},
        bind("127.0.0.1", 0, 1),
        rejoin=rejoin,
        clock=clock,
        grace=1,
    )
    watched: list[int] = []
    failures: list[BaseException] = []

    def count() -> int:
        return len(starts.read_text()) if starts.exists() else 0

    def settled(expected: int) -> None:
        """`expected` starts so far, and none more after 10 rounds of the parent's watch."""
        wait_until(lambda: count() >= expected, WAIT, f"start {expected}")
        time.sleep(10 * POLL_INTERVAL)
        watched.append(count())

    def drive() -> None:
        try:
            settled(1)
            clock.advance(FIRST_BACKOFF)  # the first backoff has passed
            settled(2)
            clock.advance(FIRST_BACKOFF)  # half of the second (doubled) one
            settled(2)
            clock.advance(FIRST_BACKOFF)
            settled(3)
        except BaseException as exc:  # reported below, in the test's own thread
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    assert parent.run() == 0
    driver.join()
    assert not failures, failures
    assert watched == [1, 2, 2, 3]


def test_a_worker_that_never_served_backs_off_however_long_it_tried(tmp_path: Path) -> None:
    """A worker whose pre-flight failed after longer than STEADY_AFTER (a database write
    that hung for its whole timeout) still counts as crash looping: not restarted at once,
    and its socket leaves the group so no connection waits on it."""
    clock = FakeClock()
    starts, go = tmp_path / "starts", tmp_path / "go"
    script = (
        "import os, time\n"
        f"open({str(starts)!r}, 'a').write('x')\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
        f"os.remove({str(go)!r})\n"
        f"raise SystemExit({EXIT_NOT_STARTED})\n"
    )
    parent = Workers(
        lambda fd, pipe: [sys.executable, "-c", script],
        {},
        bind("127.0.0.1", 0, 1),
        rejoin=rejoin,
        clock=clock,
        grace=1,
    )
    seen: list[object] = []
    failures: list[BaseException] = []

    def count() -> int:
        return len(starts.read_text()) if starts.exists() else 0

    def drive() -> None:
        try:
            wait_until(lambda: count() == 1, WAIT, "the first start")
            clock.advance(STEADY_AFTER + 5)  # its pre-flight took that long
            go.touch()
            wait_until(lambda: not go.exists(), WAIT, "the worker to give up")
            time.sleep(10 * POLL_INTERVAL)
            seen.extend([count(), parent._slots[0].sock])
            clock.advance(FIRST_BACKOFF)
            wait_until(lambda: count() == 2, WAIT, "the restart after the backoff")
        except BaseException as exc:
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    assert parent.run() == 0
    driver.join()
    assert not failures, failures
    assert seen == [1, None]


def test_the_address_stays_the_gateways_while_every_worker_crash_loops(
    processes: Processes, env: dict[str, str], tmp_path: Path
) -> None:
    """With every worker's socket closed (all crash looping), another program cannot bind
    the listen address: the replacements' fresh sockets can never join someone else's."""
    failing = failing_workers(tmp_path, env, 1)
    argv = [sys.executable, "-m", "nbgateway", "serve", "--workers", "2"]
    process = processes.start("gateway", argv, failing)
    wait_until(
        lambda: process.output().count("taking_connections=False") >= 2, WAIT, "a crash loop"
    )
    host, port = failing["NBGW_LISTEN"].rsplit(":", 1)
    with pytest.raises(OSError) as info:
        socket.create_server((host, int(port)))
    assert info.value.errno == errno.EADDRINUSE
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(timeout=WAIT) == 0
    socket.create_server((host, int(port))).close()  # free once the gateway stopped


def test_a_crash_looping_replacement_holds_no_connections(
    processes: Processes, env: dict[str, str], fake: FakeNB, tmp_path: Path
) -> None:
    """A worker killed while its replacements cannot start (here: they exit at once, as
    with the database down): its socket leaves the group, so every new connection is
    answered by the worker still serving (it was about half of them hanging); once
    replacements start again, both serve."""
    seed(env, fake)
    marker = tmp_path / "replacements-fail"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if any(a.startswith('--listen-fd') for a in sys.argv)"
        f" and os.path.exists({str(marker)!r}):\n"
        "    os._exit(1)\n"
    )
    gateway = start(processes, {**env, "PYTHONPATH": str(site)})
    victim, survivor = sorted(gateway.workers(2))
    marker.touch()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "taking_connections=False" in gateway.process.output(), WAIT, "a crash loop")
    for _ in range(30):
        conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=5)
        try:
            assert gateway.worker_of(conn) == survivor
        finally:
            conn.close()
    # What NBGatewayWorkersDown watches: one worker short.
    _, samples = gateway.metrics()
    assert samples["nbgw_workers_configured{}"] == 2
    assert samples["nbgw_workers_serving{}"] == 1
    marker.unlink()
    assert survivor in gateway.workers(2)
    wait_until(lambda: gateway.metrics()[1]["nbgw_workers_serving{}"] == 2, WAIT, "both serving")


def test_no_connection_waits_on_a_worker_still_starting(
    processes: Processes, env: dict[str, str], fake: FakeNB, tmp_path: Path
) -> None:
    """The first worker to start takes its time and then fails (as a start-up check that
    waits for a lock and gives up): meanwhile every new connection is answered by the
    worker that serves, none waits on the starting one's socket and is reset when it
    exits. (It stays in its start until the test creates the file `release`.)"""
    seed(env, fake)
    slow, release = tmp_path / "slow-worker", tmp_path / "release"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "if any(a.startswith('--listen-fd') for a in sys.argv):\n"
        "    try:\n"
        f"        os.close(os.open({str(slow)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))\n"
        "    except FileExistsError:\n"
        "        pass\n"
        "    else:\n"
        f"        while not os.path.exists({str(release)!r}):\n"
        "            time.sleep(0.05)\n"
        "        os._exit(1)\n"
    )
    gateway = start(processes, {**env, "PYTHONPATH": str(site)})
    answered: set[int] = set()
    for _ in range(30):
        conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=2)
        try:
            answered.add(gateway.worker_of(conn))  # a wait on the slow one: TimeoutError
        finally:
            conn.close()
    assert "worker exited" not in gateway.process.output()  # all sent while it started
    assert len(answered) == 1 and answered < set(started_pids(gateway.process))
    release.touch()
    wait_until(lambda: "worker exited" in gateway.process.output(), WAIT, "the slow one's exit")
    assert len(gateway.workers(2)) == 2  # its replacement serves beside it


def test_a_replacement_runs_the_configuration_the_parent_checked(
    processes: Processes, env: dict[str, str], fake: FakeNB, tmp_path: Path
) -> None:
    """With --config, a worker started after the file was edited (here: broken) runs the
    settings read at start, like its siblings; the gateway keeps serving."""
    seed(env, fake)
    config = tmp_path / "gateway.toml"
    config.write_text('log_level = "INFO"\n')
    gateway = start(processes, env, extra=("--config", str(config)))
    victim, _ = sorted(gateway.workers(2))
    config.write_text('log_level = "INFOO"\nmax_request_body = 10\n')
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(started_pids(gateway.process)) == 3, WAIT, "a replacement worker")
    pids = gateway.workers(2)
    assert victim not in pids
    for pid in pids:
        _, conn = gateway.pinned(want=pid)
        conn.request("POST", f"/n/{SLUG}/api/v2/signups", body=b"x" * 100)
        resp = conn.getresponse()
        resp.read()
        assert resp.status != 413, pid  # not the edited max_request_body
        conn.close()
    assert gateway.process.popen.poll() is None
    assert "refused the configuration" not in gateway.process.output()


def test_a_worker_that_cannot_start_is_retried_not_fatal(
    processes: Processes, env: dict[str, str], tmp_path: Path
) -> None:
    """A worker whose pre-flight found a problem (EXIT_NOT_STARTED: the settings were
    checked by the parent, so it is something passing) is started again with a backoff;
    the parent keeps running (systemd does not restart a parent that exits with the usage
    status), and SIGTERM stops it with 0."""
    argv = [sys.executable, "-m", "nbgateway", "serve", "--workers", "2"]
    process = processes.start("gateway", argv, failing_workers(tmp_path, env, EXIT_NOT_STARTED))
    wait_until(
        lambda: process.output().count(f"exit_code={EXIT_NOT_STARTED}") >= 4, WAIT, "retries"
    )
    assert process.popen.poll() is None
    assert "taking_connections=False" in process.output()
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(timeout=WAIT) == 0


def test_admin_login_and_connect_callback_on_different_workers(
    processes: Processes, env: dict[str, str], fake: FakeNB
) -> None:
    """Log in on one worker, start /connect on the other, complete the callback on the
    first, log out on the second: sessions, OAuth states and logouts do not belong to a
    process (the logged-out cookie is refused by the first worker too)."""
    gateway = start(processes, env)
    first, a = gateway.pinned()
    _, b = gateway.pinned(avoid=first)
    cookies: dict[str, str] = {}

    def browse(
        conn: http.client.HTTPConnection, method: str, path: str, form: dict[str, str] | None = None
    ) -> Answer:
        """A browser's request: the cookies it holds go along, those it is given are kept."""
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        answer = send(conn, method, path, headers={"Cookie": cookie}, form=form)
        for header in answer.headers.get_all("Set-Cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                cookies[name] = morsel.value
        return answer

    assert browse(a, "POST", "/connect/login", {"token": ADMIN_TOKEN}).status == 303
    page = browse(b, "GET", "/connect")
    assert page.status == 200, page.body
    match = CSRF_RE.search(page.body)
    assert match is not None
    started = browse(b, "POST", "/connect/accounts", {"nation": SLUG, "csrf": match.group(1)})
    assert started.status == 303, started.body
    authorize = urlsplit(started.headers["Location"])
    form = {**dict(parse_qsl(authorize.query)), "decision": "approve"}
    approved = consent(fake, authorize.path, form)
    assert approved.status == 302, approved.body
    callback = urlsplit(approved.headers["Location"])
    done = browse(a, "GET", f"{callback.path}?{callback.query}")
    assert done.status == 303, done.body
    assert done.headers["Location"].startswith("/connect")
    listing = get(a, "/connect/api/accounts", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert [acc["slug"] for acc in json.loads(listing.body)["accounts"]] == [SLUG]
    logged_in = dict(cookies)
    page = browse(b, "GET", "/connect")
    match = CSRF_RE.search(page.body)
    assert match is not None
    assert browse(b, "POST", "/connect/logout", {"csrf": match.group(1)}).status == 303
    cookies.clear()
    cookies.update(logged_in)  # a copy of the cookie, kept after the logout
    refused = browse(a, "GET", "/connect")
    assert (refused.status, refused.headers["Location"]) == (303, "/connect/login")
    for conn in (a, b):
        conn.close()


def consent(fake: FakeNB, path: str, form: dict[str, str]) -> Answer:
    """Press Authorize on the fake's consent page (a form POST)."""
    parts = urlsplit(fake.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        return send(conn, "POST", path, form=form)
    finally:
        conn.close()


def serve_twice(env: dict[str, str], port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbgateway", "serve", "--workers", "2"],
        env={**env, "NBGW_LISTEN": f"127.0.0.1:{port}"},
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def test_port_in_use_is_refused_before_any_worker_starts(env: dict[str, str]) -> None:
    """A busy listen address fails in the parent with the one-process message."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = serve_twice(env, port)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "worker started" not in result.stderr


def test_the_address_is_the_gateways_from_bind_on() -> None:
    """The sockets `bind` returns do not listen yet (each worker's listens once it serves),
    but from its return on no other program can take the address, not even one that sets
    SO_REUSEADDR as asyncio's servers do (it could, until the anchor was made later)."""
    group = bind("127.0.0.1", 0, 2)
    try:
        port = group.anchor.getsockname()[1]
        with pytest.raises(OSError) as info:
            socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR on POSIX
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        group.close()


def test_second_gateway_cannot_join_the_workers_address(
    gateway: Gateway, env: dict[str, str]
) -> None:
    """The workers' SO_REUSEPORT group does not let another gateway share its address."""
    result = serve_twice(env, gateway.port)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{gateway.port}" in result.stderr
    assert len(gateway.workers(2)) == 2  # the running gateway is untouched


@pytest.mark.parametrize("count", ["0", "65"])
def test_out_of_range_worker_count_is_a_usage_error(env: dict[str, str], count: str) -> None:
    """`serve --workers` outside 1..64 exits 2 with a message and starts nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "nbgateway", "serve", "--workers", count],
        env={**env, "NBGW_LISTEN": f"127.0.0.1:{free_port()}"},
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 2
    assert "--workers must be from 1 to 64" in result.stderr
    assert "worker started" not in result.stderr


def test_stale_metrics_directories_are_removed_even_under_this_pid(tmp_path: Path) -> None:
    """A killed parent's directory is removed by the next run: one whose pid no longer runs,
    and one named with this process's own pid (a container's PID 1, killed and started
    again, gets the same pid); a running parent's stays."""
    base = Path(tempfile.gettempdir())
    own = base / f"{METRICS_PREFIX}{os.getpid()}-earlier"
    dead = base / f"{METRICS_PREFIX}{dead_process_id()}-earlier"
    live = base / f"{METRICS_PREFIX}{os.getppid()}-running"
    for path in (own, dead, live):
        path.mkdir()
    try:
        _remove_stale_metrics_dirs()
        assert not own.exists()
        assert not dead.exists()
        assert live.exists()
    finally:
        for path in (own, dead, live):
            shutil.rmtree(path, ignore_errors=True)


def test_a_listen_name_with_several_addresses_is_refused_with_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One process listens on every address of a name (`localhost`: 127.0.0.1 and ::1);
    a --workers group has one. Rather than serve on the first only (a proxy pointed at the
    other is refused), bind says so, naming the addresses."""
    real = socket.getaddrinfo

    def both(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "twofold.test":
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
            ]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", both)
    with pytest.raises(ListenError) as info:
        bind("twofold.test", free_port(), 2)
    assert "127.0.0.1, ::1" in str(info.value)
    assert "NBGW_LISTEN" in str(info.value)


def test_a_removed_metrics_directory_is_made_again_for_the_next_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A clean-up of the temporary directory removing the run's metrics directory would
    keep every replacement from starting (prometheus_client needs it); the parent makes
    it again before the next start, and says so."""
    clock = FakeClock()
    seen = tmp_path / "seen"
    script = (
        "import os, shutil, sys\n"
        "d = os.environ['PROMETHEUS_MULTIPROC_DIR']\n"
        f"open({str(seen)!r}, 'a').write(str(os.path.isdir(d)) + '\\n')\n"
        "shutil.rmtree(d)\n"
        "sys.exit(1)\n"
    )
    parent = Workers(
        lambda fd, pipe: [sys.executable, "-c", script],
        {},
        bind("127.0.0.1", 0, 1),
        rejoin=rejoin,
        clock=clock,
        grace=1,
    )
    failures: list[BaseException] = []

    def drive() -> None:
        try:
            wait_until(lambda: seen.exists() and seen.read_text().count("\n") >= 1, WAIT, "1")
            time.sleep(5 * POLL_INTERVAL)
            clock.advance(FIRST_BACKOFF)
            wait_until(lambda: seen.read_text().count("\n") >= 2, WAIT, "the second start")
        except BaseException as exc:
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    with caplog.at_level(logging.ERROR, logger="nbgateway.workers"):
        assert parent.run() == 0
    driver.join()
    assert not failures, failures
    assert seen.read_text().splitlines()[:2] == ["True", "True"]
    assert "metrics directory was removed" in caplog.text
