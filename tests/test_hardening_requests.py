"""Request-side hardening (issue 8): hostile connections and requests, on real sockets.

- Slowloris: peers outside every allow-list are refused when they connect, one address
  holds at most NBGW_MAX_CONNECTIONS_PER_CLIENT connections, request heads that are not
  complete within NBGW_HEADER_TIMEOUT and bodies that stall for NBGW_BODY_TIMEOUT are
  closed; a gateway with a small descriptor limit keeps serving allowed clients.
- The admin API's Bearer shares the login form's throttle.
- TRACE and CONNECT are answered 405 without contacting NationBuilder.
- Duplicate X-NB-Nation headers are refused.
- The admin pages, /connect/api and /metrics have their own allow-lists; /healthz and
  /readyz answer probes.
- Upstream gets the client's own headers only (Accept-Encoding as sent, nothing invented);
  transfer codings other than chunked get 501; `Expect: 100-continue` with a declared body
  over the limit gets 413, not 100.

The connection-level tests run the gateway through `server.serving` (the listening path of
`nbgateway serve`); the others use the usual test client. Peers other than 127.0.0.1 are
other loopback addresses (127.0.0.2, 127.0.0.3), which Linux routes to the same host.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import json
import logging
import resource
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, ConnectAccount, Gateway, GatewayFactory, SettingsFactory
from multidict import CIMultiDict
from procs import (
    Processes,
    clean_os_environ,
    free_port,
    gateway_env,
    http_request,
    scrape,
    wait_until,
)
from prometheus_client import CollectorRegistry

from nbgateway import keys
from nbgateway.admin.session import LOGIN_FAILURES, LOGIN_WINDOW, LoginThrottle
from nbgateway.app import create_app
from nbgateway.clock import FakeClock
from nbgateway.config import Settings, load_settings
from nbgateway.errors import StoreUnavailable
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import ClientInfo, EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.server import OPEN_FILES_TARGET, raise_open_files_limit, serving

ECHO = "/n/acme/api/_test/echo"
REFUSED_PEER = "127.0.0.2"
OTHER_PEER = "127.0.0.3"


def net(cidr: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return (ipaddress.ip_network(cidr),)


# ---------------------------------------------------------------------- raw HTTP on sockets


@dataclass
class Answer:
    """One HTTP/1.1 response read off a socket."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def error_code(self) -> str:
        code: str = json.loads(self.body)["errors"][0]["code"]
        assert self.headers["X-NBGW-Error"] == code
        return code


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return Answer(int(lines[0].split(" ", 2)[1]), headers, body)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts too)."""
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 20):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def request_bytes(
    method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: gateway.test",
        *(f"{n}: {v}" for n, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def exchange(port: int, data: bytes, source: str = "127.0.0.1") -> Answer:
    reader, writer = await connect(port, source)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    finally:
        await hang_up(writer)


HALF_HEAD = b"GET /api/v2/people HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: "


# ---------------------------------------------------------------------- a served gateway


@dataclass
class Served:
    """A gateway listening through `server.serving`, and its metrics."""

    port: int
    registry: CollectorRegistry

    def closed(self, reason: str) -> float:
        value = self.registry.get_sample_value("nbgw_connections_closed_total", {"reason": reason})
        return 0.0 if value is None else value


@pytest.fixture
async def serve(
    settings_factory: SettingsFactory, clock: FakeClock, fake_nb: FakeNationBuilder
) -> AsyncIterator[Any]:
    """Start gateways on real ports the way `nbgateway serve` does; each has account acme."""
    started: list[Any] = []

    async def start(**overrides: Any) -> Served:
        settings = settings_factory(**overrides)
        registry = CollectorRegistry()
        app = create_app(settings, clock=clock, registry=registry, background=False)
        context = serving(app, "127.0.0.1", 0)
        port = await context.__aenter__()
        started.append(context)
        issued = fake_nb.issue_tokens("acme")
        await app[keys.STORE].save_tokens(
            "acme",
            TokenSet(
                access_token=Secret(issued["access_token"]),
                refresh_token=Secret(issued["refresh_token"]),
                expires_at=clock.now() + float(issued["expires_in"]),
                scope=issued["scope"],
            ),
            EventKind.CONNECTED,
        )
        await app[keys.TOKENS].sync(force=True)
        return Served(port, registry)

    yield start
    for context in reversed(started):
        await context.__aexit__(None, None, None)


def proxied_count(gw: Served, code: int, method: str = "GET") -> float:
    labels = {"account": "acme", "method": method, "code": str(code)}
    value = gw.registry.get_sample_value("nbgw_proxy_requests_total", labels)
    return 0.0 if value is None else value


async def counted(gw: Served, code: int, method: str = "GET") -> None:
    """Wait (bounded) until one proxied request with `code` is counted."""
    for _ in range(200):
        if proxied_count(gw, code, method) == 1:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"no {method} counted with {code}")


class TestClientGoesAway:
    """A client that hangs up is not a gateway failure: its request is counted and logged
    as 499 (nginx's "client closed request"), or with the status already sent; the gateway
    closing a stalled body logs 408. None of them is a 500 or blamed on NationBuilder."""

    async def test_hanging_up_while_nationbuilder_thinks_is_499(
        self, serve: Any, fake_nb: FakeNationBuilder, caplog: pytest.LogCaptureFixture
    ) -> None:
        gw = await serve()
        fake_nb.api_delay = 2.0
        caplog.set_level(logging.INFO)
        _reader, writer = await connect(gw.port)
        writer.write(request_bytes("GET", ECHO))
        await writer.drain()
        await asyncio.sleep(0.3)
        await hang_up(writer)
        await counted(gw, 499)
        assert proxied_count(gw, 500) == 0
        [line] = [r for r in caplog.records if r.name == "nbgateway.access"]
        assert line.status == 499  # type: ignore[attr-defined]

    @pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "buffered"])
    async def test_hanging_up_halfway_through_an_upload_is_499(
        self, serve: Any, fake_nb: FakeNationBuilder, streamed: bool
    ) -> None:
        gw = await serve(retry_buffer=1000 if streamed else 1_000_000)
        _reader, writer = await connect(gw.port)
        writer.write(request_bytes("POST", ECHO, [("Content-Length", "90000")], b"x" * 40000))
        await writer.drain()
        await asyncio.sleep(0.3)
        await hang_up(writer)
        await counted(gw, 499, "POST")
        assert proxied_count(gw, 500, "POST") == 0

    async def test_abandoning_a_download_keeps_its_status_and_blames_no_one(
        self, serve: Any, fake_nb: FakeNationBuilder, caplog: pytest.LogCaptureFixture
    ) -> None:
        gw = await serve()
        fake_nb.set_canned(headers=[("Content-Type", "text/csv")], body=b"a,b\n" * 4_000_000)
        caplog.set_level(logging.INFO)
        reader, writer = await connect(gw.port)
        writer.write(request_bytes("GET", "/n/acme/api/_test/canned"))
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.read(65536)
        await hang_up(writer)
        await counted(gw, 200)
        assert proxied_count(gw, 499) == 0
        assert proxied_count(gw, 500) == 0
        assert "upstream response broke off" not in caplog.text


MALFORMED = {
    "length-and-chunked": b"POST /api/v2/people HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "long-header": b"GET /api/v2/people HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "bad-first-chunk": b"POST /api/v2/people HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer CALLER-SECRET-0123\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "tls-hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
}


class TestMalformedRequests:
    """What aiohttp's parser refuses gets the contract's JSON 400 and one warning line,
    never aiohttp's text page (which quotes the request bytes back) or a traceback."""

    @pytest.mark.parametrize("name", MALFORMED)
    async def test_a_request_that_is_not_http_gets_the_contract_error(
        self, serve: Any, fake_nb: FakeNationBuilder, caplog: pytest.LogCaptureFixture, name: str
    ) -> None:
        gw = await serve()
        caplog.set_level(logging.DEBUG)
        fake_nb.clear_recordings()
        reader, writer = await connect(gw.port)
        writer.write(MALFORMED[name])
        await writer.drain()
        answer = await read_answer(reader)
        assert answer.status == 400
        assert answer.error_code() == "invalid_request"
        assert answer.headers["Content-Type"] == "application/vnd.api+json"
        assert answer.headers["X-Request-ID"]
        assert b"CALLER-SECRET" not in answer.body and b"aaaa" not in answer.body
        if name == "tls-hello":  # https:// on the plain port: the message says so
            assert "TLS handshake" in json.loads(answer.body)["errors"][0]["detail"]
        assert await until_closed(reader) == b""
        await hang_up(writer)
        assert gw.closed("malformed_request") == 1
        assert fake_nb.api_requests == []
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert "CALLER-SECRET" not in caplog.text
        [warning] = [r for r in caplog.records if r.getMessage() == "malformed request refused"]
        assert warning.levelno == logging.WARNING

    async def test_a_method_the_parser_does_not_know_is_501(
        self, serve: Any, fake_nb: FakeNationBuilder
    ) -> None:
        """`curl -X FOO`: aiohttp's parser knows only registered methods. The answer is
        RFC 9110's 501 for an unrecognised method, saying so (it was 400 "not
        well-formed HTTP/1.1"), and does not echo the method; a registered one
        (PROPFIND) is forwarded like any other."""
        gw = await serve()
        fake_nb.clear_recordings()
        answer = await exchange(gw.port, b"FOO /n/acme/api/v2/signups HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 501
        assert answer.error_code() == "not_implemented"
        assert "method" in json.loads(answer.body)["errors"][0]["detail"]
        assert b"FOO" not in answer.body
        assert fake_nb.api_requests == []
        forwarded = await exchange(
            gw.port, request_bytes("PROPFIND", ECHO, [("Connection", "close")])
        )
        assert "X-NBGW-Error" not in forwarded.headers  # NationBuilder's own answer
        assert fake_nb.api_requests[-1].method == "PROPFIND"

    @pytest.mark.parametrize("retry_buffer", [100, 1_000_000], ids=["streamed", "buffered"])
    async def test_a_chunk_that_breaks_midway_is_answered_at_once(
        self, serve: Any, caplog: pytest.LogCaptureFixture, retry_buffer: int
    ) -> None:
        """A broken chunk size after the first chunks: 400 at once (not after
        NBGW_BODY_TIMEOUT), one answer, then the connection closes; nothing unhandled."""
        gw = await serve(retry_buffer=retry_buffer, body_timeout=30.0)
        caplog.set_level(logging.INFO)
        reader, writer = await connect(gw.port)
        head = request_bytes("POST", ECHO, [("Transfer-Encoding", "chunked")])
        writer.write(head + b"1000\r\n" + b"A" * 4096 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # the request is being handled, its body being read
        writer.write(b"zz\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)
        assert answer.status == 400
        assert answer.error_code() == "invalid_request"
        assert "chunked framing is malformed" in json.loads(answer.body)["errors"][0]["detail"]
        assert await until_closed(reader) == b""  # no second answer for the same bytes
        await hang_up(writer)
        assert gw.closed("malformed_request") == 1
        await counted(gw, 400, "POST")
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


class TestServedBodies:
    async def test_a_compressed_body_is_forwarded_as_sent(
        self, serve: Any, fake_nb: FakeNationBuilder
    ) -> None:
        """Served the way `nbgateway serve` does, a gzip request body goes up compressed,
        under its own length (NationBuilder, here the fake, inflates it to the payload)."""
        served = await serve()
        fake_nb.clear_recordings()
        payload = b'{"data": {"type": "signups"}}' * 40
        body = gzip.compress(payload)
        headers = [
            ("Content-Length", str(len(body))),
            ("Content-Encoding", "gzip"),
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ]
        answer = await exchange(served.port, request_bytes("POST", ECHO, headers, body))
        assert answer.status == 200
        [sent] = fake_nb.api_requests
        assert sent.headers["Content-Encoding"] == "gzip"
        assert sent.headers["Content-Length"] == str(len(body))
        assert sent.body == payload


# ---------------------------------------------------------------------- point 5: slowloris


class TestConnectionGuard:
    async def test_refused_peer_is_answered_and_closed_without_being_read(self, serve: Any) -> None:
        """A peer outside every allow-list gets 403 client_not_allowed at once, each of its
        half-sent heads is closed, and an allowed client is served meanwhile."""
        gw = await serve(allowed_clients=net("127.0.0.1/32"))
        held = [await connect(gw.port, REFUSED_PEER) for _ in range(50)]
        for _, writer in held:
            writer.write(HALF_HEAD)
        for reader, writer in held:
            received = await until_closed(reader)
            await hang_up(writer)
            # The canned answer, unless the half head arriving after it turned it into a reset.
            assert received == b"" or received.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert gw.closed("not_allowed") == 50
        answer = await exchange(gw.port, request_bytes("GET", ECHO, [("Connection", "close")]))
        assert answer.status == 200

    async def test_refusal_names_the_lists(self, serve: Any) -> None:
        """The refusal written to a silent refused peer is the JSON:API client_not_allowed."""
        gw = await serve(allowed_clients=net("127.0.0.1/32"))
        reader, writer = await connect(gw.port, REFUSED_PEER)
        answer = await read_answer(reader)
        await hang_up(writer)
        assert answer.status == 403
        assert answer.error_code() == "client_not_allowed"
        assert "NBGW_ADMIN_ALLOWED_CLIENTS" in answer.body.decode()

    async def test_a_peer_allowed_only_for_metrics_is_let_in(self, serve: Any) -> None:
        """The accept-time check uses the union of the lists: a peer in only
        NBGW_METRICS_ALLOWED_CLIENTS reaches /metrics (and the proxy still refuses it)."""
        gw = await serve(
            allowed_clients=net("127.0.0.1/32"), metrics_allowed_clients=net("127.0.0.2/32")
        )
        close = [("Connection", "close")]
        metrics = await exchange(gw.port, request_bytes("GET", "/metrics", close), REFUSED_PEER)
        assert metrics.status == 200
        proxied = await exchange(gw.port, request_bytes("GET", ECHO, close), REFUSED_PEER)
        assert proxied.status == 403
        assert proxied.error_code() == "client_not_allowed"

    async def test_connections_beyond_the_per_client_cap_are_refused(self, serve: Any) -> None:
        """One address holds at most NBGW_MAX_CONNECTIONS_PER_CLIENT connections: the next
        gets 429 too_many_connections; other addresses are served, and closing one of the
        held connections makes room again."""
        gw = await serve(max_connections_per_client=5, header_timeout=60.0)
        held = [await connect(gw.port, OTHER_PEER) for _ in range(5)]
        for _, writer in held:
            writer.write(HALF_HEAD)
            await writer.drain()
        reader, writer = await connect(gw.port, OTHER_PEER)
        answer = await read_answer(reader)
        await hang_up(writer)
        assert answer.status == 429
        assert answer.error_code() == "too_many_connections"
        assert answer.headers["Retry-After"] == "1"  # a tool can tell when to try again
        assert gw.closed("client_limit") == 1

        served = await exchange(gw.port, request_bytes("GET", ECHO, [("Connection", "close")]))
        assert served.status == 200

        first_reader, first_writer = held.pop(0)
        await hang_up(first_writer)
        await until_closed(first_reader)
        again = await until_served(gw.port, OTHER_PEER)
        assert again.status == 200
        for _, w in held:
            await hang_up(w)

    async def test_half_sent_head_is_closed_after_the_header_timeout(self, serve: Any) -> None:
        """A head that never completes is closed (header_timeout), however slowly it trickles
        on: the server hangs up long before the head could be complete."""
        gw = await serve(header_timeout=0.3)
        reader, writer = await connect(gw.port)
        head = request_bytes("GET", "/healthz", [("X-Pad", "a" * 400)])
        hung_up = asyncio.create_task(until_closed(reader))
        sent = 0
        while sent < len(head) and not hung_up.done():
            writer.write(head[sent : sent + 1])
            try:
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            await asyncio.sleep(0.05)
        assert await hung_up == b""
        assert sent < len(head)
        await hang_up(writer)
        assert gw.closed("header_timeout") == 1

    async def test_next_head_on_a_kept_alive_connection_is_timed_too(self, serve: Any) -> None:
        """After a served request, a second head that stalls is closed the same way."""
        gw = await serve(header_timeout=0.3)
        reader, writer = await connect(gw.port)
        writer.write(request_bytes("GET", "/healthz"))
        assert (await read_answer(reader)).status == 200
        writer.write(HALF_HEAD)
        assert await until_closed(reader) == b""
        await hang_up(writer)
        assert gw.closed("header_timeout") == 1

    async def test_each_head_gets_the_whole_timeout_on_a_busy_connection(self, serve: Any) -> None:
        """The timeout runs from each head's first byte, not from an earlier request's: a
        second head begun just before the first head's deadline still gets its full time,
        and requests kept coming for longer than the timeout are all served."""
        gw = await serve(header_timeout=0.6)
        reader, writer = await connect(gw.port)
        writer.write(request_bytes("GET", "/healthz"))
        assert (await read_answer(reader)).status == 200
        await asyncio.sleep(0.35)
        head = request_bytes("GET", "/healthz")
        writer.write(head[:5])  # begun 0.25 s before the first head's deadline ...
        await asyncio.sleep(0.45)
        writer.write(head[5:])  # ... and complete 0.2 s after it, within its own 0.6 s
        assert (await read_answer(reader)).status == 200
        for _ in range(8):  # 1.2 s of requests, twice the timeout
            writer.write(request_bytes("GET", "/healthz"))
            assert (await read_answer(reader)).status == 200
            await asyncio.sleep(0.15)
        await hang_up(writer)
        assert gw.closed("header_timeout") == 0

    async def test_stalled_body_is_closed_and_nothing_goes_upstream(
        self, serve: Any, fake_nb: FakeNationBuilder
    ) -> None:
        """A body that stops arriving is closed after the body timeout; the buffered request
        never reaches NationBuilder."""
        gw = await serve(body_timeout=0.3)
        reader, writer = await connect(gw.port)
        writer.write(request_bytes("POST", ECHO, [("Content-Length", "100")], b"x" * 10))
        assert await until_closed(reader) == b""
        await hang_up(writer)
        assert gw.closed("body_timeout") == 1
        assert fake_nb.api_requests == []
        await counted(gw, 408, "POST")  # the request timed out: not the client's 499
        assert proxied_count(gw, 499, "POST") == 0

    async def test_body_that_keeps_arriving_is_not_cut(
        self, serve: Any, fake_nb: FakeNationBuilder
    ) -> None:
        """Each arriving byte restarts the body timeout: a body sent in pieces over longer than
        the timeout, never pausing that long, is forwarded whole."""
        gw = await serve(body_timeout=1.5)
        reader, writer = await connect(gw.port)
        pieces = [bytes([65 + i]) * 10 for i in range(10)]
        writer.write(request_bytes("POST", ECHO, [("Content-Length", "100")]))
        for piece in pieces:
            await asyncio.sleep(0.25)
            writer.write(piece)
            await writer.drain()
        answer = await read_answer(reader)
        await hang_up(writer)
        assert answer.status == 200
        assert base64.b64decode(json.loads(answer.body)["body_b64"]) == b"".join(pieces)
        assert gw.closed("body_timeout") == 0


async def until_served(port: int, source: str) -> Answer:
    """A request from `source` once the gateway has noticed a closed connection of it."""
    for _ in range(100):
        answer = await exchange(
            port, request_bytes("GET", "/healthz", [("Connection", "close")]), source
        )
        if answer.status != 429:
            return answer
        await asyncio.sleep(0.05)
    raise AssertionError("the closed connection was never released")


# ---------------------------------------------------------------------- the descriptor limit


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    with procs.explained(tail=4000):
        yield procs
    procs.stop_all()


def test_small_descriptor_limit_survives_a_flood_of_half_heads(
    processes: Processes, tmp_path: Path
) -> None:
    """`nbgateway serve` under a 400-descriptor limit: 300 half-sent heads from a refused
    peer and 300 from an allowed peer over its cap leave it serving other clients, and the
    capped peer's own half heads are closed after the header timeout."""
    port = free_port()
    env = {
        **clean_os_environ(),
        **gateway_env(tmp_path / "gw.db", ADMIN_TOKEN),
        "NBGW_LISTEN": f"127.0.0.1:{port}",
        "NBGW_ALLOWED_CLIENTS": "127.0.0.1/32,127.0.0.3/32",
        "NBGW_MAX_CONNECTIONS_PER_CLIENT": "20",
        "NBGW_HEADER_TIMEOUT": "2",
        "NBGW_LOG_LEVEL": "WARNING",
    }
    argv = [
        "sh",
        "-c",
        'ulimit -n 400 && exec "$0" "$@"',
        sys.executable,
        "-m",
        "nbgateway",
        "serve",
    ]
    process = processes.start("gateway", argv, env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: process.answers(f"{url}/healthz"), 20, "the gateway to start")

    held: list[socket.socket] = []
    try:
        for source in (REFUSED_PEER, OTHER_PEER):
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
                try:
                    sock.sendall(HALF_HEAD)
                except OSError:
                    pass  # already refused and closed: that is the point
                held.append(sock)
        status, _, _ = http_request("GET", f"{url}/healthz", timeout=10)
        assert status == 200
        wait_until(
            lambda: scrape(url, "nbgw_connections_closed_total", reason="not_allowed") == 300,
            20,
            "every refused connection to be counted",
        )

        def capped_peer_done() -> bool:
            # Each of its 300 connections was refused over the cap or, once admitted, closed
            # by the header timeout (which also makes room for later ones: hence the sum).
            limit = scrape(url, "nbgw_connections_closed_total", reason="client_limit") or 0
            late = scrape(url, "nbgw_connections_closed_total", reason="header_timeout") or 0
            return limit + late == 300 and late >= 20

        wait_until(capped_peer_done, 20, "the capped peer's connections to be refused or closed")
        status, _, _ = http_request("GET", f"{url}/healthz", timeout=10)
        assert status == 200
        assert "Too many open files" not in process.output()
    finally:
        for sock in held:
            sock.close()


def test_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    """Before serving, a low soft descriptor limit is lifted to the hard limit (capped)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = OPEN_FILES_TARGET if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_TARGET)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, expected), hard))
    try:
        assert raise_open_files_limit() == expected
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------- point 6: Bearer throttle


class TestAdminTokenThrottle:
    async def test_wrong_bearers_are_throttled_like_the_login_form(
        self, gateway: Gateway, clock: FakeClock, admin_headers: dict[str, str]
    ) -> None:
        """After LOGIN_FAILURES wrong Bearer tokens the address gets 429 too_many_attempts
        with Retry-After, even with the right token, until the window has passed."""
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
        for _ in range(LOGIN_FAILURES):
            resp = await gateway.client.get("/connect/api/accounts", headers=wrong)
            assert resp.status == 401
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 429
        assert resp.headers["X-NBGW-Error"] == "too_many_attempts"
        assert 1 <= int(resp.headers["Retry-After"]) <= LOGIN_WINDOW
        clock.advance(LOGIN_WINDOW + 1)
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 200

    async def test_one_throttle_for_the_form_and_the_api(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """Wrong tokens at the login form count for /connect/api, and wrong Bearers lock the
        login form."""
        for _ in range(LOGIN_FAILURES - 1):
            resp = await gateway.client.post("/connect/login", data={"token": "wrong-token"})
            assert resp.status == 401
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
        assert (await gateway.client.get("/connect/api/accounts", headers=wrong)).status == 401
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 429
        form = await gateway.client.post(
            "/connect/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
        )
        assert form.status == 429

    async def test_throttles_on_one_database_count_together(
        self, gateway: Gateway, clock: FakeClock
    ) -> None:
        """Two throttles on one store (two processes) share one count per address: the
        check over LOGIN_FAILURES is refused and not counted, and the wait runs until the
        oldest attempt leaves the window; a right token takes back only its own count (the
        wrong ones before it still count), and other addresses are never affected."""
        first, second = LoginThrottle(gateway.store), LoginThrottle(gateway.store)
        start = clock.now()
        for n in range(LOGIN_FAILURES):
            assert await (first, second)[n % 2].attempt("192.0.2.1", start + n) is None
        now = start + LOGIN_FAILURES
        expected = int(start + LOGIN_WINDOW - now)
        assert await first.attempt("192.0.2.1", now) == expected
        assert await first.retry_after("192.0.2.1", now) == expected
        assert await second.retry_after("192.0.2.1", now) == expected
        assert len(await gateway.store.login_failures("192.0.2.1", start - 1)) == LOGIN_FAILURES
        assert await second.retry_after("192.0.2.2", now) is None

        for n in range(LOGIN_FAILURES - 1):  # another address: four wrong, then the right one
            assert await first.attempt("192.0.2.3", now + n) is None
        assert await second.attempt("192.0.2.3", now + 10) is None
        await second.take_back("192.0.2.3", now + 10)
        assert await first.attempt("192.0.2.3", now + 11) is None  # the fifth check
        assert await first.attempt("192.0.2.3", now + 12) is not None

    async def test_guesses_sent_at_once_are_checked_at_most_five_times(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """Forty wrong Bearers sent at the same moment: each is counted before its token is
        checked, so LOGIN_FAILURES get 401 and the rest 429 (all forty were checked, and
        counted only afterwards); the right token is then refused as well."""
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}

        async def guess() -> int:
            resp = await gateway.client.get("/connect/api/accounts", headers=wrong)
            return resp.status

        statuses = await asyncio.gather(*(guess() for _ in range(40)))
        assert sorted(statuses) == [401] * LOGIN_FAILURES + [429] * (40 - LOGIN_FAILURES)
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 429

    async def test_parallel_calls_with_the_right_token_are_all_served(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """A tool making thirty API calls at once with the right token, after four typos:
        every call is answered 200 (the checks are made one at a time per address, so
        right tokens in flight never count as guesses; it was five 200s and 429s with a
        false Retry-After of 300 s)."""
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
        for _ in range(LOGIN_FAILURES - 1):
            assert (await gateway.client.get("/connect/api/accounts", headers=wrong)).status == 401

        async def call() -> int:
            resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
            return resp.status

        assert await asyncio.gather(*(call() for _ in range(30))) == [200] * 30
        assert (await gateway.client.get("/connect/api/accounts", headers=wrong)).status == 401
        assert (await gateway.client.get("/connect/api/accounts", headers=wrong)).status == 429

    async def test_requests_without_credentials_do_not_lock_anyone_out(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """A request with no Authorization header guesses nothing and is not counted."""
        for _ in range(LOGIN_FAILURES * 2):
            assert (await gateway.client.get("/connect/api/accounts")).status == 401
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 200


# ---------------------------------------------------------------------- points 7, 10, 14: the proxy


@pytest.fixture
async def acme(gateway_factory: GatewayFactory, connect_account: ConnectAccount) -> Gateway:
    gw = await gateway_factory()
    await connect_account(gw, "acme")
    return gw


def port_of(gw: Gateway) -> int:
    port = gw.client.server.port
    assert port is not None
    return port


class TestRefusedMethods:
    @pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
    async def test_method_is_405_and_never_forwarded(
        self, acme: Gateway, fake_nb: FakeNationBuilder, method: str
    ) -> None:
        """TRACE (which would reflect the injected token) and CONNECT get 405
        method_not_allowed with an Allow header; NationBuilder sees nothing."""
        fake_nb.clear_recordings()
        for target in (ECHO, "/api/_test/echo"):
            answer = await exchange(
                port_of(acme), request_bytes(method, target, [("Connection", "close")])
            )
            assert answer.status == 405
            assert answer.error_code() == "method_not_allowed"
            assert "TRACE" not in answer.headers["Allow"]
            assert "GET" in answer.headers["Allow"]
        assert fake_nb.requests == []


class TestRequestsFromWebPages:
    """A page on any site can make the browser of someone on an allowed address send
    requests to the gateway, and one whose domain is rebound to the gateway's address can
    read the answers: what a page sends is refused, what a tool sends is not."""

    @pytest.mark.parametrize(
        "headers",
        [
            {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "same-origin"},  # a rebound domain: same-origin to the browser
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": "https://evil.example"},  # a browser without Sec-Fetch-Site
            {"Origin": "null"},
        ],
    )
    async def test_a_request_a_page_sent_is_refused_and_never_forwarded(
        self, acme: Gateway, fake_nb: FakeNationBuilder, headers: dict[str, str]
    ) -> None:
        fake_nb.clear_recordings()
        for method in ("GET", "POST"):
            resp = await acme.client.request(
                method, "/n/acme/api/v2/signups", headers={**headers, "Host": "evil.example"}
            )
            assert resp.status == 403, (method, headers)
            assert resp.headers["X-NBGW-Error"] == "client_not_allowed"
            assert "web page" in await resp.text()
        assert fake_nb.api_requests == []
        assert acme.metric("nbgw_proxy_requests_total", account="none", method="POST", code="403")

    async def test_a_host_that_is_none_of_the_gateways_names_is_refused(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A browser sends no Sec-Fetch-Site to a plain-http address, and no Origin with a
        GET: a rebound page's read looks like a tool's but for its Host, the page's own
        domain. Such a Host is refused (nothing forwarded, the message names the setting);
        the gateway's own names and NBGW_ALLOWED_HOSTS's are served."""
        gw = await gateway_factory(allowed_hosts=("gw.corp.example", "*.svc.cluster.local"))
        await connect_account(gw, "acme")
        fake_nb.clear_recordings()
        for host in ("evil.example", "evil.example:8080", "gw.corp.example.evil.example"):
            for path in ("/n/acme/api/v2/signups/me", "/metrics"):  # /metrics names slugs
                resp = await gw.client.get(path, headers={"Host": host})
                assert resp.status == 403, (host, path)
                assert resp.headers["X-NBGW-Error"] == "client_not_allowed"
                # The name to add, as NBGW_ALLOWED_HOSTS takes it (no port).
                assert f"add {host.split(':')[0]!r} to NBGW_ALLOWED_HOSTS" in await resp.text()
        assert fake_nb.api_requests == []
        assert (await gw.client.get("/metrics", headers={"Host": "gw.corp.example"})).status == 200
        served = (
            "gateway.test",  # NBGW_PUBLIC_URL's
            "GATEWAY.TEST.",
            "10.1.2.3:8080",
            "[::1]:8080",
            "nbgateway:8080",  # a container's service name
            "localhost",
            "gw.corp.example:8080",
            "nbgw.tools.svc.cluster.local",
        )
        for host in served:
            resp = await gw.client.get("/n/acme/api/v2/signups/me", headers={"Host": host})
            assert resp.status == 200, host
        anything = await gateway_factory(replace(gw.settings, allowed_hosts=("*",)))
        resp = await anything.client.get("/n/acme/api/v2/signups/me", headers={"Host": "x.example"})
        assert resp.status == 200

    async def test_the_admin_api_refuses_a_rebound_host_before_counting(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """Over plain http a rebound page's fetch carries no Sec-Fetch-Site; its Host gives
        it away, and its wrong tokens are not counted against the admin's address."""
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all", "Host": "evil.example"}
        for _ in range(LOGIN_FAILURES + 1):
            resp = await gateway.client.get("/connect/api/accounts", headers=wrong)
            assert resp.status == 403
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 200

    async def test_a_tool_and_a_typed_address_are_served(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """No Sec-Fetch-Site or Origin (curl, scripts), or Sec-Fetch-Site: none (an address
        typed into the browser, a bookmark)."""
        for headers in ({}, {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}):
            resp = await acme.client.get("/n/acme/api/v2/signups/me", headers=headers)
            assert resp.status == 200, headers

    async def test_the_admin_api_refuses_a_page_before_counting_its_token(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """A rebound page can send any header, Authorization included: its wrong tokens
        would lock the admin's address out of the API and the login form."""
        wrong = {"Authorization": "Bearer not-the-admin-token-at-all"}
        page = {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"}
        for _ in range(LOGIN_FAILURES + 1):
            resp = await gateway.client.get("/connect/api/accounts", headers={**wrong, **page})
            assert resp.status == 403
            assert resp.headers["X-NBGW-Error"] == "client_not_allowed"
        resp = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 200


class TestNationHeader:
    async def test_duplicate_nation_headers_are_refused(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Two X-NB-Nation headers (different or equal) are 400 invalid_request, on either
        path form; nothing goes upstream."""
        fake_nb.clear_recordings()
        for values, target in (
            (("acme", "other"), "/api/_test/echo"),
            (("acme", "acme"), "/api/_test/echo"),
            (("acme", "other"), ECHO),
        ):
            headers = [("X-NB-Nation", v) for v in values] + [("Connection", "close")]
            answer = await exchange(port_of(acme), request_bytes("GET", target, headers))
            assert answer.status == 400
            assert answer.error_code() == "invalid_request"
            assert "X-NB-Nation" in json.loads(answer.body)["errors"][0]["detail"]
        assert fake_nb.requests == []

    async def test_one_nation_header_still_selects(self, acme: Gateway) -> None:
        """A single X-NB-Nation header still picks the account."""
        answer = await exchange(
            port_of(acme),
            request_bytes(
                "GET", "/api/_test/echo", [("X-NB-Nation", "acme"), ("Connection", "close")]
            ),
        )
        assert answer.status == 200


class TestRequestHeadersUpstream:
    async def test_no_accept_encoding_from_the_client_means_none_upstream(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A client that sends no Accept-Encoding gets none added upstream."""
        fake_nb.clear_recordings()
        answer = await exchange(
            port_of(acme), request_bytes("GET", ECHO, [("Connection", "close")])
        )
        assert answer.status == 200
        [recorded] = fake_nb.api_requests
        assert "Accept-Encoding" not in recorded.headers

    @pytest.mark.parametrize(
        ("sent", "forwarded"),
        [
            ("gzip;q=1.0, identity;q=0.5", "gzip;q=1.0, identity;q=0.5"),
            ("gzip, deflate, br, zstd", "gzip, deflate"),
            ("br;q=1.0, identity;q=0.5", "identity;q=0.5"),
            ("br", "identity"),
            ("*", "identity"),
            ("br, identity;q=0", "identity"),  # none left the tool takes: identity
            ("gzip;q=0, br", "identity"),
        ],
    )
    async def test_accept_encoding_keeps_the_codings_whose_links_are_mapped(
        self, acme: Gateway, fake_nb: FakeNationBuilder, sent: str, forwarded: str
    ) -> None:
        """The client's Accept-Encoding reaches NationBuilder with only the codings the
        gateway reads to map links (gzip, deflate, identity), as they were written: a br or
        zstd page would pass with its links unmapped, and the next page of /n/{slug}/api
        be read from the default account."""
        fake_nb.clear_recordings()
        headers = [("Accept-Encoding", sent), ("Connection", "close")]
        assert (await exchange(port_of(acme), request_bytes("GET", ECHO, headers))).status == 200
        [recorded] = fake_nb.api_requests
        assert recorded.headers.getall("Accept-Encoding") == [forwarded]

    @pytest.mark.parametrize("body", [b"", b'{"a": 1}'])
    async def test_bare_post_gains_no_headers(
        self, acme: Gateway, fake_nb: FakeNationBuilder, body: bytes
    ) -> None:
        """A POST with only Host and Content-Length reaches NationBuilder without
        Content-Type, Accept, Accept-Encoding or a User-Agent of aiohttp's."""
        fake_nb.clear_recordings()
        headers = [("Content-Length", str(len(body))), ("Connection", "close")]
        answer = await exchange(port_of(acme), request_bytes("POST", ECHO, headers, body))
        assert answer.status == 200
        [recorded] = fake_nb.api_requests
        for name in ("Content-Type", "Accept", "Accept-Encoding", "User-Agent"):
            assert name not in recorded.headers, name
        assert recorded.body == body

    async def test_client_headers_are_kept(self, acme: Gateway, fake_nb: FakeNationBuilder) -> None:
        """What the client did send (Content-Type, Accept, User-Agent) is forwarded as sent."""
        fake_nb.clear_recordings()
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port_of(acme)}{ECHO}"
            sent = {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": "tool/1.0",
            }
            async with session.post(url, data=b"{}", headers=sent) as resp:
                assert resp.status == 200
        [recorded] = fake_nb.api_requests
        for name, value in sent.items():
            assert recorded.headers.getall(name) == [value]


class TestTransferCoding:
    @pytest.mark.parametrize("coding", ["gzip, chunked", "deflate, chunked", "x-custom,chunked"])
    async def test_transfer_codings_but_chunked_are_501(
        self, acme: Gateway, fake_nb: FakeNationBuilder, coding: str
    ) -> None:
        """A request body in a transfer coding other than chunked is 501 not_implemented,
        never forwarded undecoded."""
        fake_nb.clear_recordings()
        body = b"5\r\nhello\r\n0\r\n\r\n"
        headers = [("Transfer-Encoding", coding), ("Connection", "close")]
        answer = await exchange(port_of(acme), request_bytes("POST", ECHO, headers, body))
        assert answer.status == 501
        assert answer.error_code() == "not_implemented"
        assert fake_nb.api_requests == []

    async def test_unframed_transfer_coding_is_refused(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """`Transfer-Encoding: gzip` alone leaves the body's length unknown: refused with 400
        (RFC 9112 section 6.3) before anything is read or forwarded."""
        fake_nb.clear_recordings()
        headers = [("Transfer-Encoding", "gzip"), ("Connection", "close")]
        answer = await exchange(port_of(acme), request_bytes("POST", ECHO, headers, b"hello"))
        assert answer.status == 400
        assert fake_nb.api_requests == []

    async def test_chunked_still_streams(self, acme: Gateway, fake_nb: FakeNationBuilder) -> None:
        """A chunked body is still accepted and forwarded."""
        fake_nb.clear_recordings()
        headers = [("Transfer-Encoding", "chunked"), ("Connection", "close")]
        body = b"5\r\nhello\r\n0\r\n\r\n"
        answer = await exchange(port_of(acme), request_bytes("POST", ECHO, headers, body))
        assert answer.status == 200
        assert fake_nb.api_requests[0].body == b"hello"


class TestExpectContinue:
    async def test_declared_body_over_the_limit_gets_413_not_100(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """`Expect: 100-continue` with a Content-Length over NBGW_MAX_REQUEST_BODY is
        answered 413 request_too_large at once (no 100 first); nothing goes upstream."""
        gw = await gateway_factory(max_request_body=1000)
        await connect_account(gw, "acme")
        fake_nb.clear_recordings()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        writer.write(
            request_bytes("POST", ECHO, [("Content-Length", "5000"), ("Expect", "100-continue")])
        )
        answer = await read_answer(reader)
        await hang_up(writer)
        assert answer.status == 413
        assert answer.error_code() == "request_too_large"
        assert fake_nb.api_requests == []

    async def test_acceptable_body_gets_100_and_is_forwarded(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Within the limit, the client gets 100 Continue, then its body is forwarded."""
        fake_nb.clear_recordings()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(acme))
        writer.write(
            request_bytes(
                "POST",
                ECHO,
                [("Content-Length", "5"), ("Expect", "100-continue"), ("Connection", "close")],
            )
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        answer = await read_answer(reader)
        await hang_up(writer)
        assert answer.status == 200
        assert fake_nb.api_requests[0].body == b"hello"
        # Answered here: forwarded, aiohttp's client would wait for an upstream 100 (without
        # a timeout) before sending the body, and an upstream that sends none would hang it.
        assert "Expect" not in fake_nb.api_requests[0].headers

    async def test_unknown_expectation_is_a_gateway_error(
        self,
        acme: Gateway,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An Expect value other than 100-continue gets 417 expectation_failed as a JSON:API
        error with the request id (not aiohttp's bare text), before the body; nothing goes
        upstream, no token is looked at, and the answer is counted, audited and logged like
        any other refusal."""
        caplog.set_level(logging.INFO)
        fake_nb.clear_recordings()
        clock.advance(86400)  # expired: due for a refresh that a refused request must not do
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(acme))
        writer.write(
            request_bytes("POST", ECHO, [("Content-Length", "5"), ("Expect", "something-else")])
        )
        answer = await read_answer(reader)
        assert await reader.read() == b""  # closed: the body was never sent
        await hang_up(writer)
        assert answer.status == 417
        assert answer.error_code() == "expectation_failed"
        assert "100-continue" in answer.body.decode()
        request_id = answer.headers["X-Request-ID"]
        assert fake_nb.api_requests == [] and fake_nb.token_requests == []
        counted = {"account": "acme", "method": "POST", "code": "417"}
        assert acme.metric("nbgw_proxy_requests_total", **counted) == 1
        assert acme.metric("nbgw_gateway_errors_total", account="acme", error="expectation_failed")
        await acme.app[keys.CLIENTS].flush()
        [entry] = await acme.store.audit(limit=5)
        assert (entry.nation, entry.method, entry.status) == ("acme", "POST", 417)
        assert entry.request_id == request_id
        [line] = [r for r in caplog.records if r.name == "nbgateway.access"]
        assert line.status == 417  # type: ignore[attr-defined]

    async def test_an_unknown_expectation_is_never_forwarded_while_the_store_comes_back(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The first look-up of the client key fails (the store is away) and later ones
        work: a request with an unknown Expect value is refused all the same, with the
        store's 503 or with 417, and nothing is forwarded. (The Expect value was looked at
        only after the key: a failed look-up left it unnoted, and the handler, finding the
        store back, forwarded the request.)"""
        gw = await gateway_factory(client_auth="required")
        await connect_account(gw, "acme")
        registry = gw.app[keys.CLIENTS]
        _, key = await registry.add("tool")
        identify, calls = registry.identify, []

        def away_at_first(presented: str | None) -> ClientInfo | None:
            calls.append(presented)
            if len(calls) == 1:
                raise StoreUnavailable("database gateway.db is not reachable")
            return identify(presented)

        monkeypatch.setattr(registry, "identify", away_at_first)
        fake_nb.clear_recordings()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        headers = [
            ("Content-Length", "5"),
            ("Expect", "something-else"),
            ("X-NBGW-Key", key.reveal()),
        ]
        writer.write(request_bytes("POST", ECHO, headers) + b"hello")
        answer = await read_answer(reader)
        while answer.status == 100:  # what a gateway about to forward the body sends
            answer = await read_answer(reader)
        await hang_up(writer)
        assert calls  # the store was asked, and was away
        assert fake_nb.api_requests == []
        refusals = {417: "expectation_failed", 503: "store_unavailable"}
        assert answer.status in refusals
        assert answer.error_code() == refusals[answer.status]

    @pytest.mark.parametrize(
        ("target", "status", "code"),
        [
            ("/n/Bad_Slug/api/v2/people", 400, "invalid_request"),
            ("/n/acme/api/%2e%2e/x", 400, "invalid_request"),
            ("/n/acme/api/v2/people", 401, "client_key_required"),
        ],
        ids=["slug", "dot-segment", "no-key"],
    )
    async def test_a_request_the_route_or_keys_refuse_gets_no_100(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        target: str,
        status: int,
        code: str,
    ) -> None:
        """What the route or the client keys would refuse is refused before the body too
        (it got 100 Continue, the client uploaded everything, then the 400 or 401)."""
        gw = await gateway_factory(client_auth="required")
        await connect_account(gw, "acme")
        fake_nb.clear_recordings()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        writer.write(
            request_bytes("POST", target, [("Content-Length", "50000"), ("Expect", "100-continue")])
        )
        answer = await read_answer(reader)
        await hang_up(writer)
        assert answer.status == status
        assert answer.error_code() == code
        assert fake_nb.api_requests == []


# ---------------------------------------------------------------------- point 11: allow-lists


class TestAdminAndMetricsAllowLists:
    async def test_admin_pages_api_and_metrics_follow_the_proxy_list_by_default(
        self, gateway_factory: GatewayFactory, admin_headers: dict[str, str]
    ) -> None:
        """With only NBGW_ALLOWED_CLIENTS set (and 127.0.0.1 outside it), the admin pages,
        /connect/api, the callback and /metrics answer 403 client_not_allowed; /healthz and
        /readyz still answer."""
        gw = await gateway_factory(allowed_clients=net("10.0.0.0/8"))
        for path in ("/connect", "/connect/login", "/connect/api/accounts", "/connect/callback"):
            resp = await gw.client.get(path, headers=admin_headers, allow_redirects=False)
            assert resp.status == 403, path
            assert resp.headers["X-NBGW-Error"] == "client_not_allowed"
            assert "NBGW_ADMIN_ALLOWED_CLIENTS" in await resp.text()
            # Like every /connect answer (docs/admin.md), the refusal has the headers too.
            assert resp.headers["X-Frame-Options"] == "DENY", path
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], path
        resp = await gw.client.get("/metrics")
        assert resp.status == 403
        assert "NBGW_METRICS_ALLOWED_CLIENTS" in await resp.text()
        assert (await gw.client.get("/healthz")).status == 200
        assert (await gw.client.get("/readyz")).status == 200

    async def test_own_lists_open_admin_and_metrics_only(
        self, gateway_factory: GatewayFactory, admin_headers: dict[str, str]
    ) -> None:
        """NBGW_ADMIN_ALLOWED_CLIENTS and NBGW_METRICS_ALLOWED_CLIENTS let a peer use the admin
        side and /metrics without letting it use the proxy."""
        gw = await gateway_factory(
            allowed_clients=net("10.0.0.0/8"),
            admin_allowed_clients=net("127.0.0.1/32"),
            metrics_allowed_clients=net("127.0.0.1/32"),
        )
        assert (await gw.client.get("/connect/api/accounts", headers=admin_headers)).status == 200
        assert (await gw.client.get("/metrics")).status == 200
        resp = await gw.client.get("/n/acme/api/v2/people")
        assert resp.status == 403
        assert resp.headers["X-NBGW-Error"] == "client_not_allowed"

    async def test_proxy_peer_can_be_kept_off_the_admin_side(
        self, gateway_factory: GatewayFactory, admin_headers: dict[str, str]
    ) -> None:
        """A peer the proxy serves is refused by the admin side when outside its list."""
        gw = await gateway_factory(
            admin_allowed_clients=net("10.9.9.9/32"), metrics_allowed_clients=net("10.9.9.9/32")
        )
        resp = await gw.client.get("/connect/api/accounts", headers=admin_headers)
        assert resp.status == 403
        assert (await gw.client.get("/metrics")).status == 403


class TestAllowListSettings:
    def test_admin_and_metrics_lists_default_to_the_proxy_list(self) -> None:
        """Unset, the admin and metrics lists are NBGW_ALLOWED_CLIENTS."""
        s = load_settings({"NBGW_ALLOWED_CLIENTS": "10.1.0.0/16"}, required=())
        assert s.admin_allowed_clients == s.allowed_clients == net("10.1.0.0/16")
        assert s.metrics_allowed_clients == s.allowed_clients

    def test_connection_settings_have_defaults(self) -> None:
        """Header and body timeouts and the per-client cap have sensible defaults."""
        s: Settings = load_settings({}, required=())
        assert s.header_timeout == 10.0
        assert s.body_timeout == 30.0
        assert s.max_connections_per_client == 100


class TestHttp10:
    async def test_a_body_of_unknown_length_ends_with_the_connection(self, serve: Any) -> None:
        """HTTP/1.0 has no chunked framing: an upstream answer without Content-Length is
        sent close-delimited, and the connection closes after it even when the client
        asked for keep-alive (it stayed open: the client waited for the idle timeout, and
        a pipelined second answer was read as part of the first body)."""
        gw = await serve()
        reader, writer = await connect(gw.port)
        try:
            ask = (
                b"GET /n/acme/api/_test/bytes?n=5000&framing=chunked HTTP/1.0\r\n"
                b"Host: gateway.test\r\nConnection: keep-alive\r\n\r\n"
            )
            writer.write(ask + ask)  # the second must not be answered into the first body
            received = await until_closed(reader)
        finally:
            await hang_up(writer)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head
        assert b"content-length" not in head.lower()
        assert body == bytes(range(256)) * 19 + bytes(range(136))

    async def test_a_body_of_known_length_keeps_the_connection(self, serve: Any) -> None:
        """With Content-Length an HTTP/1.0 keep-alive client keeps its connection."""
        gw = await serve()
        reader, writer = await connect(gw.port)
        try:
            ask = (
                b"GET /n/acme/api/_test/bytes?n=300 HTTP/1.0\r\n"
                b"Host: gateway.test\r\nConnection: keep-alive\r\n\r\n"
            )
            for _ in range(2):
                writer.write(ask)
                answer = await read_answer(reader)
                assert answer.status == 200
                assert answer.body == bytes(range(256)) + bytes(range(44))
        finally:
            await hang_up(writer)


class TestRawBytesInAdminCredentials:
    """A raw byte that is not UTF-8 in an admin credential (aiohttp hands it on as a lone
    surrogate) is a wrong credential like any other, not a 500."""

    @staticmethod
    async def ask(gw: Gateway, target: str, header: bytes) -> Answer:
        data = (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + header
            + b"\r\nConnection: close\r\n\r\n"
        )
        return await exchange(port_of(gw), data)

    async def test_an_admin_bearer_with_a_raw_byte_is_refused_with_401(
        self, gateway: Gateway
    ) -> None:
        answer = await self.ask(gateway, "/connect/api/accounts", b"Authorization: Bearer \xff\xfe")
        assert answer.status == 401

    @pytest.mark.parametrize(
        "cookie",
        [
            b"nbgw_session=\xff\xfe.99999999999.abc",
            b"nbgw_session=abc.99999999999.\xff",
            b"nbgw_flash=\xff.abc",
        ],
    )
    async def test_an_admin_cookie_with_a_raw_byte_is_ignored(
        self, gateway: Gateway, cookie: bytes
    ) -> None:
        answer = await self.ask(gateway, "/connect/login", b"Cookie: " + cookie)
        assert answer.status == 200
