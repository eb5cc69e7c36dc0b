"""nbgateway benchmark: throughput against a minimal proxy, refresh coalescing, streaming memory.

One command (`make bench`, or `.venv/bin/python bench/run.py`), loopback only, about 140 s on
two cores, stops by itself. Every role runs in its own process, started from this file:

  fastupstream a cheap local stand-in for NationBuilder for the throughput sections: an
               asyncio Protocol HTTP/1.1 server (keep-alive, pipelining) on the proxies' event
               loop that answers /{slug}/api/v2/signups/me with ~300 bytes of fixed JSON; it
               costs the machine about a third of the aiohttp upstream's CPU per request
  upstream     the aiohttp stand-in for the rest: the same /me answer, /{slug}/oauth/token
               issues a pair after a delay and counts the calls (/_count), /{slug}/api/big?mib=N
               streams N MiB
  gateway      the real `nbgateway serve`, configured only through NBGW_* variables, with the
               account `bench` seeded (valid token) in a temporary database
  passthrough  the least a proxy must do, for comparison: one shared ClientSession, forward
               the request, add a fixed bearer token, stream the answer back
  load         wrk (`wrk -t1 -c32`, C) when it is on PATH, else N concurrent aiohttp workers
               in a Python process (`_load`); a warm-up, then a fixed measured window

On two cores the load generator and the upstream share the CPU with the proxy under test;
in production NationBuilder is remote and costs the gateway's host nothing. wrk and the
protocol upstream keep that share small, and every load row prints it (CPU of proxy, load,
upstream, other processes and idle, in % of one core), so a reader sees whether the second
core was free for a second worker.

Measured, then summarised with PASS/MISS against each target:
  1. requests/s and latency p50/p90/p99 through the gateway and through the passthrough, in
     alternating rounds, and their ratio (target >= 0.9); the gateway with its default
     logging (NBGW_LOG_LEVEL=INFO, one access-log line per request) and, labelled, with
     NBGW_ACCESS_LOG=off (every other log line kept); then [1c] (--workers N, default 2)
     the gateway with `serve --workers N` against one process, alternating (target >= 1.8x),
     with the CPU per request of gateway, load and upstream and the ceiling those costs set
     on the machine's cores
  2. 1,000 concurrent requests for an account whose access token has expired, while the
     upstream's token endpoint is slow: how many token calls it saw (target: exactly 1)
  3. a 100 MiB response through the gateway: peak growth of its resident memory (VmRSS,
     sampled every 50 ms; target < 30 MiB)

`--load aiohttp` and `--upstream aiohttp` bring back the Python client and the aiohttp
upstream for [1] and [1c] (the figures before wrk and the protocol upstream).

Exit status: 0 when everything ran (whether or not each target was met), 1 when something
failed to run (a process did not start, a sanity request failed, a step timed out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from nbgateway.server import loop_factory

HOST = "127.0.0.1"
SLUG = "bench"
EXPIRED_SLUG = "bench-expired"
API_PATH = "/api/v2/signups/me"
CHUNK = 64 * 1024
MIB = 1024 * 1024
PASSTHROUGH_TOKEN = "passthrough-fixed-token-0123456789"
CLIENT_ID = "bench-client-id"
CLIENT_SECRET = "bench-client-secret-0123456789"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"

TARGET_RATIO = 0.9
TARGET_TOKEN_CALLS = 1
TARGET_RSS_MIB = 30.0
TARGET_WORKERS_RATIO = 1.8  # `--workers 2` against one process, on two cores
# Other processes using more than this share of a core during a load run make it noisy.
NOISY_OTHER_SHARE = 0.15

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class BenchError(Exception):
    """Something failed to run (not a missed target)."""


# ---------------------------------------------------------------------------------------
# Shared helpers for the server roles
# ---------------------------------------------------------------------------------------


async def _serve_forever(app: web.Application, port: int) -> None:
    """Serve `app` on loopback until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # A deep backlog so the 1,000-connection burst is not throttled by SYN retries.
        await web.TCPSite(runner, HOST, port, backlog=2048).start()
        await stop.wait()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------
# Role: upstream (a fast stand-in for NationBuilder)
# ---------------------------------------------------------------------------------------

# About the size and shape of NationBuilder's v2 answer for /signups/me.
ME_BODY = json.dumps(
    {
        "data": {
            "type": "signups",
            "id": "1",
            "attributes": {
                "first_name": "Ada",
                "last_name": "Lovelace",
                "email": "ada@example.org",
                "phone_number": "+44 20 7946 0000",
                "is_volunteer": False,
                "tags": ["bench"],
                "created_at": "2024-01-02T03:04:05+00:00",
                "updated_at": "2024-06-07T08:09:10+00:00",
            },
        },
        "links": {"self": "/api/v2/signups/me"},
    },
    separators=(",", ":"),
).encode()


def upstream_app(token_delay: float) -> web.Application:
    state = {"token_calls": 0}
    block = b"x" * CHUNK

    def authorized(request: web.Request) -> bool:
        # Any bearer token is accepted; a request without one is refused, which proves that
        # both proxies add it.
        return request.headers.get("Authorization", "").startswith("Bearer ")

    async def me(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.json_response({"code": "unauthorized"}, status=401)
        return web.Response(body=ME_BODY, content_type="application/vnd.api+json")

    async def token(request: web.Request) -> web.Response:
        state["token_calls"] += 1
        await request.read()
        await asyncio.sleep(token_delay)
        return web.json_response(
            {
                "access_token": "at-" + secrets.token_urlsafe(24),
                "refresh_token": "rt-" + secrets.token_urlsafe(24),
                "token_type": "bearer",
                "expires_in": 86400,
                "scope": "default",
                "created_at": int(time.time()),
            }
        )

    async def big(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return web.json_response({"code": "unauthorized"}, status=401)
        size = int(request.query.get("mib", "100")) * MIB
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:  # never more than one chunk in hand
            part = block if size - sent >= CHUNK else block[: size - sent]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def count(request: web.Request) -> web.Response:
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/{slug}/api/v2/signups/me", me)
    app.router.add_post("/{slug}/oauth/token", token)
    app.router.add_get("/{slug}/api/big", big)
    app.router.add_get("/_count", count)
    return app


# ---------------------------------------------------------------------------------------
# Role: fastupstream (the same /me answer, for a fraction of the CPU)
# ---------------------------------------------------------------------------------------

ME_PATH = re.compile(rb"/[^/?]+/api/v2/signups/me")
MAX_HEAD = 64 * 1024  # a request head longer than this is refused (431) and the connection closed


def _http_response(status: str, body: bytes, content_type: bytes, close: bool = False) -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n" + body
    )  # fmt: skip


ME_RESPONSE = _http_response("200 OK", ME_BODY, b"application/vnd.api+json")
UNAUTHORIZED_RESPONSE = _http_response(
    "401 Unauthorized", b'{"code":"unauthorized"}', b"application/json"
)
NOT_FOUND_RESPONSE = _http_response("404 Not Found", b'{"code":"not_found"}', b"application/json")


class FastUpstream(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining, answering only what the throughput load sends.

    `GET /{slug}/api/v2/signups/me` with a bearer token gets ME_BODY (the same bytes as the
    aiohttp upstream), without one a 401; `GET /_count` the request counts; anything else a
    404 (a call to `/{slug}/oauth/token` is counted as a token call). Each request head is
    found by its blank line; a Content-Length body is skipped; requests that arrive together
    are answered in order with one write; a partial head or body waits for the rest. A chunked
    body, a malformed request line or a head over MAX_HEAD is answered 400/431 and the
    connection closed. No framework, no header
    objects: the point is that the upstream costs the machine as little CPU as possible, as
    a remote NationBuilder costs the gateway's host nothing.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        buffer = self.buffer
        buffer += data
        out: list[bytes] = []
        close = False
        start = 0  # where the next request begins in `buffer`
        while not close:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buffer) - start > MAX_HEAD:
                    out.append(refusal("431 Request Header Fields Too Large"))
                    close = True
                break
            head = bytes(buffer[start:end])
            line_end = head.find(b"\r\n")
            request_line = head if line_end < 0 else head[:line_end]
            fields = head[len(request_line) :].lower()  # "\r\nname: value" per header
            parts = request_line.split(b" ")
            length = content_length(fields)
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or length is None:
                # The rest of the stream cannot be framed: answer and close.
                out.append(refusal("400 Bad Request"))
                close = True
                break
            request_end = end + 4 + length
            if len(buffer) < request_end:
                break  # the body is still on its way
            start = request_end
            out.append(self.answer(parts[0], parts[1], fields))
            close = b"\r\nconnection: close" in fields or (
                parts[2] == b"HTTP/1.0" and b"\r\nconnection: keep-alive" not in fields
            )
        del buffer[:start]
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            transport.close()

    def answer(self, method: bytes, target: bytes, fields: bytes) -> bytes:
        path = target.split(b"?", 1)[0]
        if method == b"GET" and ME_PATH.fullmatch(path):
            if b"\r\nauthorization: bearer " not in fields:
                return UNAUTHORIZED_RESPONSE
            self.counts["served"] += 1
            return ME_RESPONSE
        if method == b"GET" and path == b"/_count":
            return _http_response("200 OK", json.dumps(self.counts).encode(), b"application/json")
        if path.endswith(b"/oauth/token"):
            self.counts["token_calls"] += 1
        self.counts["refused"] += 1
        return NOT_FOUND_RESPONSE


def content_length(fields: bytes) -> int | None:
    """The body length of a request whose lower-cased header lines are `fields`.

    0 without Content-Length, None when it cannot be framed here (a chunked body, a
    malformed or repeated Content-Length).
    """
    if b"\r\ntransfer-encoding:" in fields:
        return None
    at = fields.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    if fields.find(b"\r\ncontent-length:", at + 1) >= 0:
        return None
    value_end = fields.find(b"\r\n", at + 17)
    value = fields[at + 17 : value_end if value_end >= 0 else len(fields)].strip()
    return int(value) if value.isdigit() else None


def refusal(status: str) -> bytes:
    return _http_response(status, b"", b"text/plain", close=True)


async def _serve_fast_upstream(port: int) -> None:
    """Serve FastUpstream on loopback until SIGTERM or SIGINT."""
    counts = {"served": 0, "refused": 0, "token_calls": 0}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FastUpstream(counts), HOST, port, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# ---------------------------------------------------------------------------------------
# Role: passthrough (the least a proxy must do)
# ---------------------------------------------------------------------------------------

SESSION = web.AppKey("session", aiohttp.ClientSession)


def passthrough_app(upstream: str) -> web.Application:
    """Forward `/api/...` to `{upstream}/bench/api/...` with a fixed bearer token, streaming."""
    base = f"{upstream.rstrip('/')}/{SLUG}"
    drop_up = HOP_BY_HOP | {"host", "authorization", "content-length"}
    drop_down = HOP_BY_HOP | {"content-length"}

    async def session_ctx(app: web.Application) -> Any:
        # The same pool settings as the gateway's upstream session.
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=100)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            app[SESSION] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in drop_up
        )
        headers["Authorization"] = f"Bearer {PASSTHROUGH_TOKEN}"
        async with request.app[SESSION].request(
            request.method,
            URL(base + request.raw_path, encoded=True),
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status,
                reason=upstream_response.reason,
                headers=CIMultiDict(
                    (k, v)
                    for k, v in upstream_response.headers.items()
                    if k.lower() not in drop_down
                ),
            )
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/api/{tail:.*}", forward)
    return app


# ---------------------------------------------------------------------------------------
# Role: load (the same closed-loop load for every target)
# ---------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time spent busy by all cores together, from /proc/stat (guest time is in user)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def run_load(
    url: str, concurrency: int, warmup: float, duration: float, pids: dict[str, int]
) -> dict[str, Any]:
    """Closed loop: `concurrency` workers, each sending its next request when one ends.

    Only requests that complete inside the measured window count; their latency is from
    send to the last body byte.
    """
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    started = time.perf_counter()
    window_start = started + warmup
    window_end = window_start + duration
    cpu: dict[str, list[float]] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        for name, pid in pids.items():
            cpu[name] = [_cpu_seconds(pid)]
        cpu["machine"] = [_machine_busy_seconds()]
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        for name, pid in pids.items():
            cpu[name].append(_cpu_seconds(pid))
        cpu["machine"].append(_machine_busy_seconds())

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while True:
            sent = time.perf_counter()
            if sent >= window_end:
                return
            try:
                async with session.get(url) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            done = time.perf_counter()
            if window_start <= done < window_end:
                latencies.append(done - sent)
                statuses[status] = statuses.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample_cpu())
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        await sampler

    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "rps": count / duration,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p90_ms": _percentile(latencies, 0.90) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
        "cpu_seconds": {name: after - before for name, (before, after) in cpu.items()},
        "window": duration,
    }


# ---------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    """A server process started by the benchmark, with its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    children: list[Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    wrk: str | None = None  # the wrk binary when the throughput load comes from wrk

    def load_label(self) -> str:
        """Which load generator the throughput sections use, for the output."""
        a = self.args
        if self.wrk:
            return f"load from wrk -t1 -c{a.concurrency}"
        return f"load from the Python aiohttp client, {a.concurrency} workers"

    # -- processes -------------------------------------------------------------------

    def spawn(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> Child:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env if env is not None else os.environ.copy(),
            )
        child = Child(name, proc, port, log)
        self.children.append(child)
        return child

    def spawn_role(self, role: str, *extra: str, name: str = "") -> Child:
        port = _free_port()
        child = self.spawn(
            name or role, [sys.executable, __file__, f"_{role}", "--port", str(port), *extra], port
        )
        wait_ready(child, "/_count" if role.endswith("upstream") else "/api/v2/signups/me")
        return child

    def spawn_gateway(self, name: str, upstream: Child, access_log: str, *serve_args: str) -> Child:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBGW_")}
        env.update(self.env)
        env["NBGW_LISTEN"] = f"{HOST}:{port}"
        env["NBGW_NATION_URL"] = f"{upstream.url}/{{slug}}"
        env["NBGW_LOG_LEVEL"] = "INFO"
        env["NBGW_ACCESS_LOG"] = access_log
        child = self.spawn(name, [*gateway_command(), "serve", *serve_args], port, env)
        wait_ready(child, "/healthz")
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()

    def run_load(
        self, target: Child, upstream: Child, proxy_pids: list[int] | None = None
    ) -> dict[str, Any]:
        """One load run; `proxy_pids` (default: the target's) are metered as the proxy."""
        pids = proxy_pids or [target.pid]
        if self.wrk:
            result = self.wrk_load(self.wrk, target, upstream, pids)
        else:
            result = self.aiohttp_load(target, upstream, pids)
        if target.proc.poll() is not None:
            raise BenchError(f"{target.name} exited during the load:\n{target.tail()}")
        bad = {k: v for k, v in result["statuses"].items() if k != "200"}
        if bad or result["errors"] or not result["requests"]:
            raise BenchError(
                f"{target.name} did not answer 200 under load: statuses {result['statuses']}, "
                f"{result['errors']} connection errors\n{target.tail()}"
            )
        return result

    def wrk_load(self, wrk: str, target: Child, upstream: Child, pids: list[int]) -> dict[str, Any]:
        """wrk for the warm-up, then again for the measured window, metering CPU around it.

        wrk's own CPU time is what this process's reaped children used meanwhile (the only
        child reaped in the window is that wrk run).
        """
        a = self.args
        base = [wrk, "-t1", f"-c{a.concurrency}", "--latency"]
        url = target.url + API_PATH
        if a.warmup > 0:
            subprocess.run(
                [*base, f"-d{max(1, round(a.warmup))}s", url],
                capture_output=True,
                timeout=a.warmup + 30,
                check=False,
            )
        metered = {"proxy": pids, "upstream": [upstream.pid]}
        before = {name: sum(map(_cpu_seconds, group)) for name, group in metered.items()}
        machine = _machine_busy_seconds()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        try:
            done = subprocess.run(
                [*base, f"-d{max(1, round(a.duration))}s", url],
                capture_output=True,
                text=True,
                timeout=a.duration + 30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk against {target.name} timed out") from None
        window = time.perf_counter() - began
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {
            name: sum(map(_cpu_seconds, group)) - before[name] for name, group in metered.items()
        }
        cpu["load"] = (reaped.ru_utime - children.ru_utime) + (reaped.ru_stime - children.ru_stime)
        cpu["machine"] = _machine_busy_seconds() - machine
        row = parse_wrk(done.stdout)
        if row is None:
            raise BenchError(f"could not read wrk's output:\n{done.stdout}\n{done.stderr}")
        row.update(statuses={"200": row["requests"]}, errors=0, cpu_seconds=cpu, window=window)
        return row

    def aiohttp_load(self, target: Child, upstream: Child, pids: list[int]) -> dict[str, Any]:
        """The Python closed-loop client (`run.py _load`), metering CPU from inside."""
        a = self.args
        argv = [
            sys.executable,
            __file__,
            "_load",
            "--url",
            target.url + API_PATH,
            "--concurrency",
            str(a.concurrency),
            "--warmup",
            str(a.warmup),
            "--duration",
            str(a.duration),
            *(f"--pid=proxy{i or ''}={pid}" for i, pid in enumerate(pids)),
            "--pid",
            f"upstream={upstream.pid}",
        ]
        try:
            done = subprocess.run(
                argv, capture_output=True, timeout=a.warmup + a.duration + 60, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"the load generator against {target.name} timed out") from None
        if done.returncode != 0:
            raise BenchError(
                f"the load generator against {target.name} failed:\n{done.stderr.decode()}"
            )
        result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        cpu = result["cpu_seconds"]
        cpu["proxy"] = sum(cpu.pop(f"proxy{i or ''}") for i in range(len(pids)))
        return result


def gateway_command() -> list[str]:
    """`nbgateway` from the running virtualenv, else `python -m nbgateway`."""
    script = Path(sys.executable).parent / "nbgateway"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "nbgateway"]


def wait_ready(child: Child, path: str, deadline: float = 30.0) -> None:
    """Poll `path` until it answers 200, the process dies or the deadline passes."""
    until = time.monotonic() + deadline
    last = ""
    while time.monotonic() < until:
        if child.proc.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            with urllib.request.urlopen(child.url + path, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{child.name} not ready within {deadline:g} s ({last}):\n{child.tail()}")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def token_calls(upstream: Child) -> int:
    return int(_get_json(upstream.url + "/_count")["token_calls"])


def metric_samples(gateway: Child, name: str, account: str) -> list[float]:
    """The values of `name`'s series labelled with `account` on the gateway's /metrics."""
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(
        rf'^{re.escape(name)}\{{[^}}]*account="{re.escape(account)}"[^}}]*\}} (\S+)$'
    )
    return [float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line))]


def metric_value(gateway: Child, name: str, account: str) -> float:
    return sum(metric_samples(gateway, name, account))


def metric_present(gateway: Child, name: str, account: str) -> bool:
    return bool(metric_samples(gateway, name, account))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


async def seed_account(database: Path, key: str, slug: str, expires_in: float) -> None:
    """Store a token pair for `slug` the way a completed /connect would."""
    from nbgateway.clock import SystemClock
    from nbgateway.crypto import Cipher
    from nbgateway.models import EventKind, TokenSet
    from nbgateway.redact import Secret
    from nbgateway.store import SQLiteStore

    clock = SystemClock()
    cipher = Cipher([Secret(key)])
    async with SQLiteStore(database, cipher, clock, busy_timeout=10) as store:
        await store.save_tokens(
            slug,
            TokenSet(
                access_token=Secret(f"seeded-access-{secrets.token_hex(16)}"),
                refresh_token=Secret(f"seeded-refresh-{secrets.token_hex(16)}"),
                expires_at=clock.now() + expires_in,
                scope="default",
            ),
            EventKind.CONNECTED,
        )


async def sanity(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(url + API_PATH) as response:
        body = await response.read()
        if response.status != 200 or body != ME_BODY:
            raise BenchError(f"{url}{API_PATH} answered {response.status}: {body[:200]!r}")


async def burst(gateway: Child, slug: str, count: int) -> dict[str, int]:
    """`count` requests for `slug`, all started at once on their own connections."""
    connector = aiohttp.TCPConnector(limit=count + 10)
    timeout = aiohttp.ClientTimeout(total=120)
    statuses: dict[str, int] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = asyncio.Event()

        async def one() -> None:
            await start.wait()
            try:
                async with session.get(
                    gateway.url + API_PATH, headers={"X-NB-Nation": slug}
                ) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.gather(*tasks)
    return statuses


async def download(url: str, rate_mib: float = 0.0) -> tuple[int, int, float]:
    """GET `url`, reading and discarding the body: (status, bytes, seconds).

    With `rate_mib` > 0 the reader paces itself to that many MiB/s: a client slower than
    the upstream, which a proxy must answer with backpressure rather than buffering.
    """
    started = time.perf_counter()
    received = 0
    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url) as response,
    ):
        async for chunk in response.content.iter_chunked(CHUNK):
            received += len(chunk)
            if rate_mib > 0:
                ahead = received / (rate_mib * MIB) - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        status = response.status
    return status, received, time.perf_counter() - started


@contextlib.contextmanager
def rss_sampler(pid: int, interval: float = 0.05) -> Iterator[list[int]]:
    """Sample VmRSS (KiB) of `pid` every `interval` s in a thread while the block runs."""
    samples: list[int] = [rss_kib(pid)]
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(OSError, BenchError):
                samples.append(rss_kib(pid))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append(rss_kib(pid))


# -- reporting ---------------------------------------------------------------------------


def fmt_load_row(label: str, r: dict[str, Any]) -> str:
    """One result: throughput, latency, proxy CPU per request and where the CPU went."""
    cpu = r.get("cpu_seconds", {})
    per_request = cpu.get("proxy", float("nan")) / r["requests"] * 1e6 if r["requests"] else 0
    row = (
        f"  {label:<40} {r['rps']:>7.0f} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f} "
        f"{r['p99_ms']:>7.2f} {per_request:>7.0f}"
    )
    shares = cpu_shares(r)
    if shares:
        row += "  " + " ".join(f"{100 * shares[k]:>5.0f}" for k in SHARE_COLUMNS)
    return row


SHARE_COLUMNS = ("proxy", "load", "upstream", "other", "idle")


def cpu_shares(r: dict[str, Any]) -> dict[str, float]:
    """Where the machine's CPU went during the window, in cores (empty without a window).

    proxy, load and upstream are the benchmark's processes; other is the machine's busy time
    minus those (other engineers' work); idle is what no one used, of all cores.
    """
    cpu = r.get("cpu_seconds", {})
    window = r.get("window")
    if not window or "machine" not in cpu:
        return {}
    shares = {k: float(cpu.get(k, 0.0)) / window for k in ("proxy", "load", "upstream")}
    busy = float(cpu["machine"]) / window
    shares["other"] = max(0.0, busy - sum(shares.values()))
    shares["idle"] = max(0.0, (os.cpu_count() or 1) - busy)
    return shares


def load_header() -> str:
    return (
        f"  {'':<40} {'':>7} {'':>7} {'':>7} {'':>7} {'proxy':>7}  "
        f"{'CPU, % of one core':^29}\n"
        f"  {'target':<40} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'us/req':>7}  {'proxy':>5} {'load':>5} {'upstr':>5} {'other':>5} {'idle':>5}"
    )


def mean_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms")
    merged: dict[str, Any] = {k: statistics.fmean(r[k] for r in results) for k in keys}
    merged["requests"] = sum(r["requests"] for r in results)
    names = set().union(*(r["cpu_seconds"] for r in results))
    merged["cpu_seconds"] = {
        name: sum(r["cpu_seconds"].get(name, 0.0) for r in results) for name in names
    }
    if all("window" in r for r in results):
        merged["window"] = sum(r["window"] for r in results)
    return merged


def other_cpu_share(r: dict[str, Any]) -> float:
    """CPU used by processes outside the benchmark during the window, in cores."""
    return cpu_shares(r).get("other", 0.0)


def starved(r: dict[str, Any]) -> bool:
    """Whether other processes took CPU the run could have used: above NOISY_OTHER_SHARE of a
    core while less than that was left idle (one process may leave a core idle undisturbed).
    """
    shares = cpu_shares(r)
    return bool(shares) and shares["other"] > NOISY_OTHER_SHARE > shares["idle"]


def quiet_rounds_line(runs: list[dict[str, Any]], against: list[dict[str, Any]]) -> str:
    """The req/s ratio over the rounds in which neither run was starved of CPU."""
    quiet = [
        r["rps"] / a["rps"]
        for r, a in zip(runs, against, strict=True)
        if not starved(r) and not starved(a)
    ]
    return (
        f"    rounds in which no run lacked CPU (other processes above"
        f" {100 * NOISY_OTHER_SHARE:.0f}% of a core with less idle): {len(quiet)} of {len(runs)}"
        + (f", ratio {statistics.fmean(quiet):.2f}" if quiet else "")
    )


def cpu_per_request(r: dict[str, Any], *names: str) -> float:
    """CPU µs per request of the named processes (default: the proxy under test)."""
    cpu = r["cpu_seconds"]
    return sum(float(cpu.get(n, 0.0)) for n in names or ("proxy",)) / float(r["requests"]) * 1e6


def machine_line() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    loop = "uvloop" if loop_factory() is not asyncio.new_event_loop else "asyncio"
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, {platform.system()} {platform.release()}; "
        f"gateway and passthrough on the {loop} event loop"
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- the run -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    started = time.monotonic()
    print(f"nbgateway benchmark on {machine_line()}")
    print(
        f"load: {args.concurrency} concurrent keep-alive connections, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured, {args.rounds} alternating round(s); the load "
        "generator, the proxy under test and the upstream share the same cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="nbgw-bench-") as tmpdir:
        bench = Bench(args, Path(tmpdir))
        if args.load != "aiohttp":
            bench.wrk = shutil.which("wrk")
            if bench.wrk is None and args.load == "wrk":
                print("\nFAILED TO RUN: --load wrk, but wrk is not on PATH", file=sys.stderr)
                return 1
        print(
            f"throughput sections: {bench.load_label()}"
            + ("" if bench.wrk or args.load == "aiohttp" else " (wrk not on PATH)")
            + f"; upstream stand-in: {args.upstream}",
            flush=True,
        )
        try:
            return measure(bench, started)
        except (BenchError, subprocess.SubprocessError, OSError) as exc:
            print(f"\nFAILED TO RUN: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()


def raise_fd_limit() -> None:
    """1,000 concurrent connections need more than the common soft limit of 1,024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def measure(bench: Bench, started: float) -> int:
    args = bench.args
    tmp = bench.tmp
    database = tmp / "gateway.db"
    key = subprocess.run(
        [*gateway_command(), "keygen"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    bench.env = {
        "NBGW_DATABASE": str(database),
        "NBGW_ENCRYPTION_KEY": key,
        "NBGW_CLIENT_ID": CLIENT_ID,
        "NBGW_CLIENT_SECRET": CLIENT_SECRET,
        "NBGW_ADMIN_TOKEN": ADMIN_TOKEN,
        "NBGW_DEFAULT_ACCOUNT": SLUG,
        # All load comes from this one address: lift the per-address cap above the burst.
        "NBGW_MAX_CONNECTIONS_PER_CLIENT": str(args.burst * 2 + 100),
    }
    # A token valid for a day: far outside the refresh margin, so the load never refreshes.
    asyncio.run(seed_account(database, key, SLUG, expires_in=86400))

    upstream = bench.spawn_role("upstream", "--token-delay", str(args.token_delay))
    # The throughput sections run against the cheap upstream (unless --upstream aiohttp);
    # sections 2 and 3 need the aiohttp one (token endpoint, streaming).
    fast = bench.spawn_role("fastupstream") if args.upstream == "fast" else upstream
    passthrough = bench.spawn_role("passthrough", "--upstream", fast.url)
    gateway = bench.spawn_gateway("gateway", fast, "on")
    quiet = bench.spawn_gateway("gateway-no-access-log", fast, "off") if args.quiet else None
    slow: tuple[Child, Child] | None = None
    if fast is not upstream:
        # The pair for sections 2 and 3, idle until then (started now so that a failure to
        # start shows before the long part of the run).
        slow = (
            bench.spawn_role("passthrough", "--upstream", upstream.url, name="passthrough-slow"),
            bench.spawn_gateway("gateway-slow", upstream, "on"),
        )
    for target in (passthrough, gateway, *([quiet] if quiet else []), *(slow or ())):
        asyncio.run(sanity(target.url))
    calls_at_start = token_calls(fast)

    # 1. throughput and latency, alternating targets round by round
    targets: list[tuple[str, Child]] = [
        ("passthrough (minimal aiohttp proxy)", passthrough),
        ("gateway, NBGW_LOG_LEVEL=INFO", gateway),
    ]
    if quiet is not None:
        targets.append(("gateway, NBGW_ACCESS_LOG=off", quiet))
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in targets}
    print(f"\n[1] throughput and latency ({bench.load_label()}, {fast.name})", flush=True)
    print(load_header())
    for round_no in range(1, args.rounds + 1):
        for label, target in targets:
            r = bench.run_load(target, fast)
            results[label].append(r)
            print(fmt_load_row(f"{label} #{round_no}", r), flush=True)
    workers_summary = compare_workers(bench, fast, gateway) if args.workers > 1 else ""
    if token_calls(fast) != calls_at_start:
        raise BenchError("the load made the gateway call the token endpoint; the seed is wrong")
    if quiet is not None:
        quiet.stop()  # one gateway on the database from here on
    if slow is not None:
        # Sections 2 and 3 through the same kind of processes, on the aiohttp upstream.
        for child in (gateway, passthrough, fast):
            child.stop()
        passthrough, gateway = slow

    # 2. 1,000 concurrent requests on an expired token
    print(f"\n[2] {args.burst} concurrent requests on an expired access token", flush=True)
    asyncio.run(seed_account(database, key, EXPIRED_SLUG, expires_in=-60))
    # The gateway counts coalesced waiters only for accounts it has listed (it looks at the
    # store every second): wait for that, so the burst's counter is complete.
    until = time.monotonic() + 10
    while not metric_present(gateway, "nbgw_access_token_expiry_timestamp_seconds", EXPIRED_SLUG):
        if time.monotonic() > until:
            raise BenchError(f"the gateway did not list {EXPIRED_SLUG} within 10 s")
        time.sleep(0.05)
    before = token_calls(upstream)
    coalesced_before = metric_value(gateway, "nbgw_token_refresh_coalesced_total", EXPIRED_SLUG)
    burst_started = time.perf_counter()
    statuses = asyncio.run(burst(gateway, EXPIRED_SLUG, args.burst))
    burst_seconds = time.perf_counter() - burst_started
    refreshes = token_calls(upstream) - before
    coalesced = (
        metric_value(gateway, "nbgw_token_refresh_coalesced_total", EXPIRED_SLUG) - coalesced_before
    )
    ok_count = statuses.get("200", 0)
    print(
        f"  token calls seen by the upstream: {refreshes}; answered 200: {ok_count}/{args.burst}"
        f" (all statuses {statuses}); coalesced onto the one refresh: {coalesced:.0f};"
        f" {burst_seconds:.2f} s for the burst, token endpoint delay {args.token_delay:g} s",
        flush=True,
    )
    if gateway.proc.poll() is not None:
        raise BenchError(f"the gateway exited during the burst:\n{gateway.tail()}")

    # 3. a big response through the gateway (and the passthrough for comparison), once at
    # full speed and once to a reader paced well below what the upstream can send
    print(
        f"\n[3] a {args.big_mib} MiB response, streamed: full speed, then to a reader paced at"
        f" {args.big_rate:g} MiB/s; VmRSS sampled every 50 ms",
        flush=True,
    )
    rss: dict[str, float] = {}
    for label, target in (("gateway", gateway), ("passthrough", passthrough)):
        peak_growth = 0.0
        for rate in (0.0, args.big_rate):
            with rss_sampler(target.pid) as samples:
                status, received, seconds = asyncio.run(
                    download(f"{target.url}/api/big?mib={args.big_mib}", rate)
                )
            if status != 200 or received != args.big_mib * MIB:
                raise BenchError(f"{label}: big download answered {status} with {received} bytes")
            first, peak = samples[0] / 1024, max(samples) / 1024
            peak_growth = max(peak_growth, peak - first)
            mode = "full speed" if rate == 0 else "paced"
            print(
                f"  {label:<12} {mode:<10} RSS before {first:6.1f} MiB, peak {peak:6.1f} MiB,"
                f" growth {peak - first:5.1f} MiB ({len(samples):>3} samples);"
                f" {received / MIB / seconds:6.0f} MiB/s in {seconds:.1f} s",
                flush=True,
            )
        rss[label] = peak_growth

    # Summary
    pt = mean_result(results[targets[0][0]])
    gw = mean_result(results[targets[1][0]])
    ratio = gw["rps"] / pt["rps"]
    paired = [
        g["rps"] / p["rps"]
        for g, p in zip(results[targets[1][0]], results[targets[0][0]], strict=True)
    ]
    print("\n" + "=" * 80)
    print("SUMMARY (means over rounds)")
    print(load_header())
    for label, _ in targets:
        print(fmt_load_row(label, mean_result(results[label])))
    print()
    print(f"  load generator: {bench.load_label()}; upstream for [1] and [1c]: {fast.name}")
    print(
        "  proxy CPU per request: gateway "
        f"{cpu_per_request(gw):.0f} us, passthrough {cpu_per_request(pt):.0f} us"
        f" ({cpu_per_request(gw) / cpu_per_request(pt):.2f}x)"
    )
    print(
        f"  ratio gateway/passthrough req/s (default logging): {ratio:.2f}"
        f"  [per round: {', '.join(f'{p:.2f}' for p in paired)}]"
        f"  target >= {TARGET_RATIO}: {verdict(ratio >= TARGET_RATIO)}"
    )
    print(quiet_rounds_line(results[targets[1][0]], results[targets[0][0]]))
    if quiet is not None:
        qw = mean_result(results[targets[2][0]])
        quiet_ratio = qw["rps"] / pt["rps"]
        print(
            f"  ratio gateway/passthrough req/s (NBGW_ACCESS_LOG=off): {quiet_ratio:.2f}"
            "  (informational)"
        )
    if workers_summary:
        print(workers_summary)
    refresh_ok = refreshes == TARGET_TOKEN_CALLS and ok_count == args.burst
    print(
        f"  {args.burst} concurrent requests, expired token: {refreshes} token call(s), "
        f"{ok_count} x 200  target 1 call and all 200: {verdict(refresh_ok)}"
    )
    growth = rss["gateway"]
    print(
        f"  {args.big_mib} MiB response: gateway RSS growth {growth:.1f} MiB "
        f"(passthrough {rss['passthrough']:.1f} MiB)  target < {TARGET_RSS_MIB:g} MiB: "
        f"{verdict(growth < TARGET_RSS_MIB)}"
    )
    noisy = [
        (label, i + 1, share)
        for label, runs in results.items()
        for i, r in enumerate(runs)
        if (share := other_cpu_share(r)) > NOISY_OTHER_SHARE
    ]
    if noisy:
        print(
            f"  NOTE: other processes used more than {100 * NOISY_OTHER_SHARE:.0f}% of a core in"
            f" {len(noisy)} of {sum(map(len, results.values()))} load runs"
            f" (up to {100 * max(n[2] for n in noisy):.0f}%): req/s and latency are noisy;"
            " CPU us/req is the steadier figure"
        )
    print(f"  whole run: {time.monotonic() - started:.0f} s")
    return 0


def worker_pids(gateway: Child, count: int, deadline: float = 30.0) -> list[int]:
    """The pids of a `serve --workers` gateway's workers, once each has answered /healthz."""
    seen: set[int] = set()
    until = time.monotonic() + deadline
    while len(seen) < count and time.monotonic() < until:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{gateway.url}/healthz", timeout=2) as resp,
        ):
            seen.add(int(resp.headers["X-NBGW-Worker"]))
        time.sleep(0.02)
    if len(seen) < count:
        raise BenchError(f"only {len(seen)} of {count} workers answered:\n{gateway.tail()}")
    return sorted(seen)


def compare_workers(bench: Bench, upstream: Child, single: Child) -> str:
    """[1c] The same load on `serve --workers N` and on the one-process gateway, alternating.

    The proxy CPU of the workers is the sum over the worker processes. Returns the summary
    line (ratio of req/s against the target).
    """
    a = bench.args
    multi = bench.spawn_gateway("gateway-workers", upstream, "on", "--workers", str(a.workers))
    pids = worker_pids(multi, a.workers)
    asyncio.run(sanity(multi.url))
    label_one, label_n = "gateway, 1 process", f"gateway, --workers {a.workers}"
    results: dict[str, list[dict[str, Any]]] = {label_one: [], label_n: []}
    print(
        f"\n[1c] one process against --workers {a.workers} (default logging;"
        f" {bench.load_label()}, {upstream.name})",
        flush=True,
    )
    print(load_header())
    for round_no in range(1, a.rounds + 1):
        for label, target, proxy_pids in ((label_one, single, None), (label_n, multi, pids)):
            r = bench.run_load(target, upstream, proxy_pids)
            results[label].append(r)
            print(fmt_load_row(f"{label} #{round_no}", r), flush=True)
    multi.stop()
    one, many = mean_result(results[label_one]), mean_result(results[label_n])
    ratio = many["rps"] / one["rps"]
    paired = [
        m["rps"] / o["rps"] for m, o in zip(results[label_n], results[label_one], strict=True)
    ]
    lines = [
        f"  ratio --workers {a.workers}/one process req/s: {ratio:.2f}"
        f" ({many['rps']:.0f} against {one['rps']:.0f};"
        f" per round: {', '.join(f'{p:.2f}' for p in paired)})"
        f"  target >= {TARGET_WORKERS_RATIO}: {verdict(ratio >= TARGET_WORKERS_RATIO)}"
    ]
    lines.append(quiet_rounds_line(results[label_n], results[label_one]))
    lines.extend(workers_cpu_lines(one, many, a.workers))
    return "\n".join(lines)


def workers_cpu_lines(one: dict[str, Any], many: dict[str, Any], workers: int) -> list[str]:
    """Where the CPU went in [1c], and the ceiling the measured CPU costs set on this machine.

    With the machine to itself, N workers serve at most cores / (gateway + load + upstream
    CPU per request), since all three share the cores (and min(N, cores) / gateway CPU per
    request); one process at most one core / its own CPU per request, or less when load
    and upstream do not fit on the other cores.
    """
    cores = os.cpu_count() or 1
    lines = []
    for label, r in (("1 process", one), (f"--workers {workers}", many)):
        shares = cpu_shares(r)
        if not shares:
            continue
        lines.append(
            f"    {label:<12} CPU per request: gateway {cpu_per_request(r):.0f} us,"
            f" load {cpu_per_request(r, 'load'):.0f} us, upstream"
            f" {cpu_per_request(r, 'upstream'):.0f} us; cores used: gateway"
            f" {shares['proxy']:.2f}, load + upstream {shares['load'] + shares['upstream']:.2f},"
            f" other processes {shares['other']:.2f}, idle {shares['idle']:.2f} (of {cores})"
        )
    if cpu_shares(one) and cpu_shares(many):
        all_n = cpu_per_request(many, "proxy", "load", "upstream")
        all_one = cpu_per_request(one, "proxy", "load", "upstream")
        ceiling_n = min(min(workers, cores) / cpu_per_request(many), cores / all_n) * 1e6
        ceiling_one = min(1 / cpu_per_request(one), cores / all_one) * 1e6
        lines.append(
            f"    ceiling on {cores} idle cores at these costs: --workers {workers}"
            f" {ceiling_n:.0f} req/s ({cores} cores / {all_n:.0f} us), one process"
            f" {ceiling_one:.0f} req/s (1 core / {cpu_per_request(one):.0f} us):"
            f" at most {ceiling_n / ceiling_one:.2f}x"
        )
    return lines


def parse_wrk(text: str) -> dict[str, Any] | None:
    """wrk's --latency report as a result row (None when it is not one)."""
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    pct = {
        q: float(value) * scale[unit]
        for q, value, unit in re.findall(
            r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)$", text, re.MULTILINE
        )
    }
    if not rps or not total or len(pct) != 3:
        return None
    if "Non-2xx" in text or "Socket errors" in text:
        raise BenchError(f"wrk saw failed requests:\n{text}")
    row: dict[str, Any] = {"rps": float(rps.group(1)), "requests": int(total.group(1))}
    for q, value in pct.items():
        row[f"p{q}_ms"] = value
    return row


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_upstream":
        p = argparse.ArgumentParser(prog="run.py _upstream")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--token-delay", type=float, default=1.0)
        a = p.parse_args(argv[1:])
        asyncio.run(_serve_forever(upstream_app(a.token_delay), a.port))
        return 0
    if argv and argv[0] == "_fastupstream":
        p = argparse.ArgumentParser(prog="run.py _fastupstream")
        p.add_argument("--port", type=int, required=True)
        a = p.parse_args(argv[1:])
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_serve_fast_upstream(a.port))
        return 0
    if argv and argv[0] == "_passthrough":
        p = argparse.ArgumentParser(prog="run.py _passthrough")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--upstream", required=True)
        a = p.parse_args(argv[1:])
        # The gateway's own choice of event loop (uvloop when installed): like for like.
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(_serve_forever(passthrough_app(a.upstream), a.port))
        return 0
    if argv and argv[0] == "_load":
        p = argparse.ArgumentParser(prog="run.py _load")
        p.add_argument("--url", required=True)
        p.add_argument("--concurrency", type=int, required=True)
        p.add_argument("--warmup", type=float, required=True)
        p.add_argument("--duration", type=float, required=True)
        p.add_argument("--pid", action="append", default=[], help="name=pid to meter CPU of")
        a = p.parse_args(argv[1:])
        pids = {name: int(pid) for name, pid in (item.split("=", 1) for item in a.pid)}
        pids["load"] = os.getpid()
        result = asyncio.run(run_load(a.url, a.concurrency, a.warmup, a.duration, pids))
        print(json.dumps(result))
        return 0

    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark nbgateway against a minimal aiohttp proxy (loopback only).",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="load workers (default 32)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--burst", type=int, default=1000, help="requests on the expired token")
    parser.add_argument("--token-delay", type=float, default=1.0, help="token endpoint delay")
    parser.add_argument("--big-mib", type=int, default=100, help="size of the streamed response")
    parser.add_argument(
        "--big-rate", type=float, default=50.0, help="MiB/s of the paced reader (default 50)"
    )
    parser.add_argument(
        "--no-quiet",
        dest="quiet",
        action="store_false",
        help="skip the extra gateway run with NBGW_ACCESS_LOG=off",
    )
    parser.add_argument(
        "--load",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="load generator for [1] and [1c]: wrk (C, cheap), the Python aiohttp client,"
        " or auto (default: wrk when it is on PATH, else aiohttp)",
    )
    parser.add_argument(
        "--upstream",
        choices=("fast", "aiohttp"),
        default="fast",
        help="upstream stand-in for [1] and [1c]: fast (asyncio protocol, default) or the"
        " aiohttp app that sections 2 and 3 use",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also measure `serve --workers N` next to one worker (default 2; 1 skips it)",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
