"""The proxy end to end: the real gateway and the fake NationBuilder on real sockets.

Routing and account selection, hostile input refused before any upstream connection,
methods, headers both ways, streamed bodies and size limits, the one retry after an
upstream 401, upstream failures, link rewriting, the client allow-list, request ids and
metrics. Requests whose target the aiohttp client would normalise (dot segments, `//`,
absolute-form) are written as raw bytes on a socket.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import ipaddress
import json
import re
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PUBLIC_URL, ConnectAccount, Gateway, GatewayFactory
from multidict import CIMultiDict
from yarl import URL

from nbgateway.clock import FakeClock
from nbgateway.fakenb import MSG_EXPIRED, MSG_UNAUTHORIZED, FakeNationBuilder
from nbgateway.tokens import MIN_REFRESH_INTERVAL, REFRESH_401_HOLD

MiB = 1024 * 1024


# ---------------------------------------------------------------------- helpers


@dataclass
class RawResponse:
    """An HTTP/1.1 response read off a socket."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    gw: Gateway,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    method: str = "GET",
) -> RawResponse | None:
    """Send a request line and headers exactly as given; None if the server answered nothing."""
    sent = list(headers)
    names = {name.lower() for name, _ in sent}
    if "host" not in names:
        sent.insert(0, ("Host", "gateway.test"))
    if "connection" not in names:
        sent.append(("Connection", "close"))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in sent)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n")
        await writer.drain()
        try:
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = status_and_headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        parsed: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                parsed.add(name.strip(), value.strip())
        if "Content-Length" in parsed:
            body = await reader.readexactly(int(parsed["Content-Length"]))
        elif parsed.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                parts.append(await reader.readexactly(size))
                await reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = await reader.read()
        return RawResponse(status, parsed, body)
    finally:
        writer.close()
        await writer.wait_closed()


def enc(path: str) -> URL:
    """A relative URL sent exactly as written (no re-quoting by the client)."""
    return URL(path, encoded=True)


def assert_gateway_error(status: int, headers: Any, body: bytes, expected: int, code: str) -> None:
    """The response is the gateway's own JSON:API error with that status and code."""
    assert status == expected
    assert headers["X-NBGW-Error"] == code
    doc = json.loads(body)
    assert set(doc) == {"errors"}
    [error] = doc["errors"]
    assert set(error) >= {"status", "code", "title", "detail"}
    assert error["status"] == str(expected)
    assert error["code"] == code
    assert error["title"]
    assert error["detail"]


async def expect_error(resp: aiohttp.ClientResponse, expected: int, code: str) -> dict[str, Any]:
    body = await resp.read()
    assert_gateway_error(resp.status, resp.headers, body, expected, code)
    doc: dict[str, Any] = json.loads(body)["errors"][0]
    return doc


async def echoed(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.status == 200, await resp.text()
    doc: dict[str, Any] = await resp.json(content_type=None)
    return doc


def samples(gw: Gateway, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of a metric."""
    return [
        dict(sample.labels)
        for family in gw.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


@pytest.fixture
async def acme(gateway: Gateway, connect_account: ConnectAccount) -> Gateway:
    """The default gateway with exactly one account, acme."""
    await connect_account(gateway, "acme")
    return gateway


# ---------------------------------------------------------------------- a second upstream


class Sink:
    """A tiny upstream for what the fake NationBuilder cannot do: uploads above its 1 MiB
    body limit (hashed while streaming), gzip-encoded JSON, JSON with escaped slashes, and a
    request that waits until the test lets it go."""

    def __init__(self) -> None:
        self.uploads: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{slug}/api/upload", self._upload)
        self.app.router.add_get("/{slug}/api/gzip-links", self._gzip_links)
        self.app.router.add_get("/{slug}/api/gzip-plain", self._gzip_plain)
        self.app.router.add_get("/{slug}/api/gzip-bomb", self._gzip_bomb)
        self.app.router.add_get("/{slug}/api/escaped-links", self._escaped_links)
        self.app.router.add_get("/{slug}/api/gate", self._gate)
        self.app.router.add_get("/{slug}/api/echo-raw/{tail:.*}", self._echo_raw)
        self.app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.release.set()

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            size += len(chunk)
        record = {
            "size": size,
            "sha256": digest.hexdigest(),
            "content_length": request.headers.get("Content-Length"),
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
            "content_encoding": request.headers.get("Content-Encoding"),
        }
        self.uploads.append(record)
        return web.json_response(record)

    @staticmethod
    def _gzip_json(doc: dict[str, Any]) -> web.Response:
        return web.Response(
            body=gzip.compress(json.dumps(doc).encode()),
            headers={"Content-Type": "application/vnd.api+json", "Content-Encoding": "gzip"},
        )

    async def _gzip_links(self, request: web.Request) -> web.Response:
        return self._gzip_json(
            {"data": [], "links": {"next": "/api/v2/signups?page[number]=2&page[size]=1"}}
        )

    async def _gzip_plain(self, request: web.Request) -> web.Response:
        return self._gzip_json({"data": [], "meta": {"gzip": True}})

    async def _gzip_bomb(self, request: web.Request) -> web.Response:
        # About 40 KiB on the wire, 40 MiB once inflated (more than the rewrite limit).
        inflated = b'{"links":{"next":"/api/v2/x"},"pad":"' + b" " * (40 * MiB) + b'"}'
        return web.Response(
            body=gzip.compress(inflated, compresslevel=1),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    async def _escaped_links(self, request: web.Request) -> web.Response:
        body = b'{"data":[],"links":{"next":"\\/api\\/v2\\/signups?page[number]=2"}}'
        return web.Response(body=body, content_type="application/vnd.api+json")

    async def _echo_raw(self, request: web.Request) -> web.Response:
        return web.json_response({"raw_path": request.raw_path})

    async def _gate(self, request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"released": True})


@pytest.fixture
async def sink(aiohttp_server: Any) -> tuple[Sink, str]:
    """The sink upstream on a real socket and its base URL."""
    upstream = Sink()
    server: TestServer = await aiohttp_server(upstream.app)
    return upstream, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def sink_gateway(
    sink: tuple[Sink, str], gateway_factory: GatewayFactory, connect_account: ConnectAccount
) -> tuple[Gateway, Sink]:
    """A gateway whose nations live on the sink upstream, with acme connected."""
    upstream, base = sink
    gw = await gateway_factory(nation_url=f"{base}/{{slug}}")
    await connect_account(gw, "acme")
    return gw, upstream


# ---------------------------------------------------------------------- routing


class TestRouting:
    async def test_default_account_serves_plain_api(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """With NBGW_DEFAULT_ACCOUNT, /api/... goes to that account even when several exist."""
        gw = await gateway_factory(default_account="acme")
        issued = await connect_account(gw, "acme")
        await connect_account(gw, "beta")
        resp = await gw.client.get("/api/v2/signups/me")
        assert resp.status == 200
        [seen] = fake_nb.api_requests
        assert seen.slug == "acme"
        assert seen.headers["Authorization"] == f"Bearer {issued['access_token']}"

    async def test_single_account_needs_no_default(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """With exactly one connected account and no default, /api/... goes to it."""
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 200
        assert [r.slug for r in fake_nb.api_requests] == ["acme"]

    async def test_two_accounts_without_default_is_no_account_selected(
        self, gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder
    ) -> None:
        """Two accounts, no default and no selector: 400 no_account_selected, nothing upstream."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        resp = await gateway.client.get("/api/v2/signups/me")
        doc = await expect_error(resp, 400, "no_account_selected")
        assert resp.content_type == "application/vnd.api+json"
        assert doc["detail"].startswith("several nations are connected: name one with")
        assert fake_nb.requests == []

    async def test_no_account_at_all_says_none_is_connected(
        self, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """With no nation connected, the error says exactly that and where to connect one."""
        resp = await gateway.client.get("/api/v2/signups/me")
        doc = await expect_error(resp, 400, "no_account_selected")
        assert doc["detail"] == "no nation is connected yet: connect one at /connect"
        assert "several" not in doc["detail"]
        assert fake_nb.requests == []

    async def test_prefix_route_selects_the_account(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """/n/{slug}/api/... uses that account's token, whatever the default."""
        gw = await gateway_factory(default_account="acme")
        await connect_account(gw, "acme")
        issued = await connect_account(gw, "beta")
        resp = await gw.client.get("/n/beta/api/v2/signups/me")
        assert resp.status == 200
        [seen] = fake_nb.api_requests
        assert seen.slug == "beta"
        assert seen.path == "/beta/api/v2/signups/me"
        assert seen.headers["Authorization"] == f"Bearer {issued['access_token']}"

    async def test_nation_header_selects_the_account(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """X-NB-Nation picks the account on /api/... and is not forwarded upstream."""
        gw = await gateway_factory(default_account="acme")
        await connect_account(gw, "acme")
        await connect_account(gw, "beta")
        resp = await gw.client.get("/api/v2/signups/me", headers={"X-NB-Nation": "beta"})
        assert resp.status == 200
        [seen] = fake_nb.api_requests
        assert seen.slug == "beta"
        assert "X-NB-Nation" not in seen.headers

    @pytest.mark.parametrize(
        ("path", "headers"),
        [
            ("/n/nope/api/v2/signups", {}),
            ("/api/v2/signups", {"X-NB-Nation": "nope"}),
        ],
        ids=["prefix", "header"],
    )
    async def test_unknown_account_is_404(
        self, acme: Gateway, fake_nb: FakeNationBuilder, path: str, headers: dict[str, str]
    ) -> None:
        """A well-formed slug that is not connected: 404 unknown_account, nothing upstream."""
        resp = await acme.client.get(path, headers=headers)
        error = await expect_error(resp, 404, "unknown_account")
        assert "nope" in error["detail"]
        assert fake_nb.requests == []


# ---------------------------------------------------------------------- hostile input


def assert_refused_before_upstream(resp: RawResponse | None, fake_nb: FakeNationBuilder) -> None:
    """The gateway answered 400 invalid_request itself and sent nothing to NationBuilder."""
    assert resp is not None
    assert_gateway_error(resp.status, resp.headers, resp.body, 400, "invalid_request")
    assert fake_nb.requests == []


BAD_SLUGS = ["ACME", "a_b", "a.b", "..", "%2e%2e", "a%2Fb", "a" * 70]


class TestHostileInput:
    @pytest.mark.parametrize("slug", BAD_SLUGS)
    async def test_bad_slug_in_path(
        self, acme: Gateway, fake_nb: FakeNationBuilder, slug: str
    ) -> None:
        """/n/{bad slug}/api/... is 400 invalid_request and never reaches upstream."""
        resp = await raw_request(acme, f"/n/{slug}/api/v2/signups")
        assert_refused_before_upstream(resp, fake_nb)

    @pytest.mark.parametrize("value", ["ACME", "a_b", "a.b", "..", "a/b", "a" * 70, "", "acme x"])
    async def test_bad_nation_header(
        self, acme: Gateway, fake_nb: FakeNationBuilder, value: str
    ) -> None:
        """An X-NB-Nation value that is not a slug is 400 invalid_request, nothing upstream."""
        resp = await raw_request(acme, "/api/v2/signups", [("X-NB-Nation", value)])
        assert_refused_before_upstream(resp, fake_nb)

    @pytest.mark.parametrize(
        "target",
        [
            "/api/../connect",
            "/api/%2e%2e/x",
            "/api/v2/%2E%2E/%2E%2E/oauth/token",
            "/api/v2/./signups",
            "/api/a%2Fb",
            "/api/a%2fb",
            "/api/a%5Cb",
            "/api/a\\b",
            "/api/a%00b",
            "/n/acme/api/../../oauth/token",
            "/n/acme/api/%2e%2e/%2e%2e/oauth/token",
            "http://evil.example/api/v2/signups",
        ],
    )
    async def test_escaping_targets_are_refused(
        self, acme: Gateway, fake_nb: FakeNationBuilder, target: str
    ) -> None:
        """Targets that could leave the nation's /api/ are 400 invalid_request, nothing upstream."""
        resp = await raw_request(acme, target)
        assert_refused_before_upstream(resp, fake_nb)

    @pytest.mark.parametrize("target", ["/n/acme/oauth/token", "//evil.example/api", "/n//api/x"])
    async def test_unrouted_targets_never_reach_upstream(
        self, acme: Gateway, fake_nb: FakeNationBuilder, target: str
    ) -> None:
        """Targets outside the proxy routes are not forwarded (whatever the answer)."""
        resp = await raw_request(acme, target)
        assert resp is None or 400 <= resp.status < 500
        assert fake_nb.requests == []

    @pytest.mark.parametrize("target", ["/n/acme/oauth/token", "//evil.example/api", "/n//api/x"])
    async def test_unrouted_targets_get_404(self, acme: Gateway, target: str) -> None:
        """Targets outside the proxy routes are answered 404 as a gateway error (not_found)."""
        resp = await raw_request(acme, target)
        assert resp is not None
        assert resp.status == 404
        assert resp.headers["X-NBGW-Error"] == "not_found"


# ---------------------------------------------------------------------- methods and headers


class TestMethods:
    @pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def test_method_and_body_arrive_unchanged(
        self, acme: Gateway, fake_nb: FakeNationBuilder, method: str
    ) -> None:
        """Each method reaches NationBuilder as itself, with the body byte for byte."""
        payload = f"\x00{method} body \xff".encode("latin-1")
        resp = await acme.client.request(method, "/api/_test/echo", data=payload)
        doc = await echoed(resp)
        assert doc["method"] == method
        assert base64.b64decode(doc["body_b64"]) == payload
        [seen] = fake_nb.api_requests
        assert (seen.method, seen.body) == (method, payload)

    async def test_head_arrives_as_head(self, acme: Gateway, fake_nb: FakeNationBuilder) -> None:
        """HEAD reaches NationBuilder as HEAD and the client gets headers without a body."""
        resp = await acme.client.head("/api/_test/echo")
        assert resp.status == 200
        assert resp.headers["ETag"] == '"echo"'
        assert await resp.read() == b""
        [seen] = fake_nb.api_requests
        assert (seen.method, seen.body) == ("HEAD", b"")


class TestRequestHeaders:
    async def test_end_to_end_headers_pass(self, acme: Gateway) -> None:
        """Custom and content-negotiation headers reach NationBuilder unchanged."""
        sent = {
            "X-Foo": "bar baz",
            "Accept": "application/vnd.api+json",
            "If-None-Match": '"abc"',
            "Content-Type": "application/vnd.api+json; charset=utf-8",
        }
        resp = await acme.client.post("/api/_test/echo", data=b"{}", headers=sent)
        headers = (await echoed(resp))["headers"]
        for name, value in sent.items():
            assert headers[name] == value

    async def test_hop_by_hop_headers_are_dropped(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Connection, Keep-Alive, TE, Upgrade, Proxy-Authorization and Connection-listed
        headers stop at the gateway; the client's Host is replaced by NationBuilder's."""
        resp = await raw_request(
            acme,
            "/api/_test/echo",
            [
                ("Host", "client"),
                ("Connection", "close, X-Drop-Me"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
                ("X-Drop-Me", "1"),
                ("X-Keep-Me", "2"),
            ],
        )
        assert resp is not None
        assert resp.status == 200
        headers = CIMultiDict(resp.json()["headers"])
        for name in ("Keep-Alive", "TE", "Upgrade", "Proxy-Authorization", "X-Drop-Me"):
            assert name not in headers
        assert headers.get("Connection", "").lower() in ("", "keep-alive")
        assert "x-drop-me" not in headers.get("Connection", "").lower()
        assert headers["X-Keep-Me"] == "2"
        assert headers["Host"] == URL(fake_nb.base_url).raw_authority

    async def test_forwarded_headers(self, acme: Gateway) -> None:
        """X-Forwarded-For gets the peer appended to the client's; X-Forwarded-Proto is set."""
        resp = await acme.client.get("/api/_test/echo", headers={"X-Forwarded-For": "203.0.113.9"})
        headers = (await echoed(resp))["headers"]
        assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
        assert headers["X-Forwarded-Proto"] == "http"

    async def test_forwarded_for_without_client_header(self, acme: Gateway) -> None:
        """Without a client X-Forwarded-For, upstream sees just the peer."""
        headers = (await echoed(await acme.client.get("/api/_test/echo")))["headers"]
        assert headers["X-Forwarded-For"] == "127.0.0.1"

    async def test_client_authorization_is_replaced(
        self, gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder
    ) -> None:
        """The client's Authorization never reaches NationBuilder; the stored bearer does."""
        issued = await connect_account(gateway, "acme")
        resp = await gateway.client.get(
            "/api/_test/echo", headers={"Authorization": "Bearer client-own-secret"}
        )
        await echoed(resp)
        [seen] = fake_nb.api_requests
        assert seen.headers.getall("Authorization") == [f"Bearer {issued['access_token']}"]
        assert "client-own-secret" not in json.dumps(dict(seen.headers))

    @pytest.mark.parametrize(
        ("query", "kept"),
        [
            ("access_token=leak&a=1", "a=1"),
            ("a=1&access_token=leak", "a=1"),
            ("access_token=leak", ""),
            (
                "page%5Bnumber%5D=2&access_token=leak&filter[email]=a%40b.c",
                "page%5Bnumber%5D=2&filter[email]=a%40b.c",
            ),
            ("ACCESS_TOKEN=leak&a=1", "a=1"),
            ("access%5Ftoken=leak&a=1", "a=1"),
            ("Access_Token=leak&access_token=leak2&a=1", "a=1"),
            # ";" separates parameters too on servers that still split on it (Rack 2).
            ("limit=10;access_token=leak", "limit=10"),
            ("access_token=leak;limit=10&page=2", "limit=10&page=2"),
            ("a=1&b=2;c=3", "a=1&b=2;c=3"),
            # Rack and PHP read these as access_token too.
            ("access_token[]=leak&a=1", "a=1"),
            ("access_token%5B%5D=leak&a=1", "a=1"),
            ("access_token[x]=leak&a=1", "a=1"),
            ("access_token+=leak&a=1", "a=1"),
            # Rack reads the first run without brackets after any leading ones.
            ("[access_token]=leak&a=1", "a=1"),
            ("%5Baccess_token%5D=leak&a=1", "a=1"),
            ("]access_token=leak&a=1", "a=1"),
            ("access_token]=leak&a=1", "a=1"),
            ("[[access_token]x]=leak&a=1", "a=1"),
            ("access_tokens=kept&a=1", "access_tokens=kept&a=1"),
            ("[x]access_token=kept&a=1", "[x]access_token=kept&a=1"),
        ],
    )
    async def test_access_token_parameter_is_dropped(
        self, acme: Gateway, query: str, kept: str
    ) -> None:
        """Any access_token query parameter is removed; every other byte is kept as sent."""
        resp = await acme.client.get(enc(f"/api/_test/echo?{query}"))
        doc = await echoed(resp)
        expected = "/acme/api/_test/echo" + (f"?{kept}" if kept else "")
        assert doc["raw_path"] == expected
        assert "leak" not in doc["raw_path"]

    async def test_query_bytes_are_kept_exactly(self, acme: Gateway) -> None:
        """Percent-encoding and literal brackets in the query arrive exactly as sent."""
        raw = "page%5Bnumber%5D=2&filter[email]=a%40b.c&x=%2F%3F%26&y=a+b"
        doc = await echoed(await acme.client.get(enc(f"/api/_test/echo?{raw}")))
        assert doc["raw_path"] == f"/acme/api/_test/echo?{raw}"

    async def test_path_encoding_is_kept_exactly(self, sink_gateway: tuple[Gateway, Sink]) -> None:
        """Percent-encoded path bytes below /api/ reach NationBuilder exactly as sent."""
        gw, _ = sink_gateway
        target = "/api/echo-raw/a%20b/%C3%A9%3Bx/c+d?q=%2F"
        resp = await gw.client.get(enc(f"/n/acme{target}"))
        assert (await resp.json())["raw_path"] == f"/acme{target}"


class TestResponseHeaders:
    async def test_upstream_headers_pass_through(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """RateLimit-*, ETag and custom upstream headers reach the client."""
        fake_nb.rate_limit = 250
        resp = await acme.client.get("/api/_test/echo")
        assert resp.status == 200
        assert resp.headers["ETag"] == '"echo"'
        assert resp.headers["X-Custom-Upstream"] == "yes"
        assert resp.headers["RateLimit-Limit"] == "250"
        assert resp.headers["RateLimit-Remaining"] == "249"
        assert "RateLimit-Reset" in resp.headers

    async def test_rate_limited_answer_passes_through(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """With pacing off, NationBuilder's 429 reaches the client with Retry-After and
        RateLimit-* intact (and is not replayed)."""
        acme = await gateway_factory(rate_queue_timeout=0)
        await connect_account(acme, "acme")
        fake_nb.rate_limit = 1
        assert (await acme.client.get("/api/v2/signups/me")).status == 200
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["RateLimit-Limit"] == "1"
        assert resp.headers["RateLimit-Remaining"] == "0"
        assert "X-NBGW-Error" not in resp.headers
        assert "too many requests" in (await resp.json(content_type=None))["message"].lower()
        assert len(fake_nb.api_requests) == 2
        assert acme.metric("nbgw_upstream_429_total", account="acme") == 1


# ---------------------------------------------------------------------- bodies


class TestBodies:
    async def test_large_upload_is_streamed_intact(
        self, sink_gateway: tuple[Gateway, Sink]
    ) -> None:
        """A 5 MiB upload (above the retry buffer) arrives whole, with its Content-Length."""
        gw, upstream = sink_gateway
        payload = bytes(i * 7 % 251 for i in range(5 * MiB))
        resp = await gw.client.put("/api/upload", data=io.BytesIO(payload))
        assert resp.status == 200
        [record] = upstream.uploads
        assert record["size"] == len(payload)
        assert record["sha256"] == hashlib.sha256(payload).hexdigest()
        assert record["content_length"] == str(len(payload))

    async def test_chunked_upload_is_streamed_intact(
        self, sink_gateway: tuple[Gateway, Sink]
    ) -> None:
        """A chunked upload without a length arrives whole, still chunked."""
        gw, upstream = sink_gateway
        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            for i in range(40):
                chunk = bytes([i]) * 100_000
                digest.update(chunk)
                yield chunk

        resp = await gw.client.post("/api/upload", data=body())
        assert resp.status == 200
        [record] = upstream.uploads
        assert record["size"] == 4_000_000
        assert record["sha256"] == digest.hexdigest()
        assert record["transfer_encoding"] == "chunked"

    @pytest.mark.parametrize("size", [2_000, 5 * MiB], ids=["buffered", "streamed"])
    async def test_a_compressed_upload_goes_up_as_sent(
        self, sink_gateway: tuple[Gateway, Sink], size: int
    ) -> None:
        """A gzip request body (within the retry buffer, and above it) is forwarded as sent:
        the compressed bytes under their own Content-Length and Content-Encoding, which
        NationBuilder inflates to the payload (it was a 500, the body inflated by the
        gateway's HTTP parser)."""
        gw, upstream = sink_gateway
        payload = bytes(i * 7 % 251 for i in range(size))
        compressed = gzip.compress(payload)
        resp = await gw.client.post(
            "/api/upload",
            data=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )
        assert resp.status == 200
        [record] = upstream.uploads
        assert record["content_encoding"] == "gzip"
        assert record["content_length"] == str(len(compressed))
        assert record["sha256"] == hashlib.sha256(payload).hexdigest()

    async def test_large_download_is_streamed_intact(self, acme: Gateway) -> None:
        """A 20 MB download arrives with its length and every byte in order (p % 256)."""
        total = 20_000_000
        resp = await acme.client.get(f"/api/_test/bytes?n={total}")
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(total)
        pattern = bytes(range(256)) * (64 * 1024 // 256 + 2)
        offset = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            start = offset % 256
            assert chunk == pattern[start : start + len(chunk)], f"mismatch near byte {offset}"
            offset += len(chunk)
        assert offset == total

    async def test_declared_oversized_body_is_413(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A Content-Length above NBGW_MAX_REQUEST_BODY is 413 request_too_large, nothing sent."""
        gw = await gateway_factory(max_request_body=1000)
        await connect_account(gw, "acme")
        resp = await gw.client.post("/api/_test/echo", data=b"x" * 1001)
        await expect_error(resp, 413, "request_too_large")
        assert fake_nb.requests == []
        ok = await gw.client.post("/api/_test/echo", data=b"x" * 1000)
        assert ok.status == 200

    async def test_oversized_chunked_body_is_never_forwarded_whole(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A chunked body growing past the limit is cut off: upstream never records it."""
        gw = await gateway_factory(max_request_body=1000)
        await connect_account(gw, "acme")

        async def body() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 500

        try:
            resp = await gw.client.post("/api/_test/echo", data=body())
            assert resp.status in (413, 502)
            assert resp.status != 200
        except aiohttp.ClientError:
            pass  # cutting the connection is an acceptable answer too
        assert all(len(r.body) <= 1000 for r in fake_nb.requests)
        assert all(r.method != "POST" for r in fake_nb.api_requests)

    async def test_oversized_chunked_body_is_413(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """A chunked body growing past the limit is answered 413 request_too_large."""
        gw = await gateway_factory(max_request_body=1000)
        await connect_account(gw, "acme")

        async def body() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 500

        resp = await gw.client.post("/api/_test/echo", data=body())
        await expect_error(resp, 413, "request_too_large")


# ---------------------------------------------------------------------- upstream 401


def retries(gw: Gateway, outcome: str) -> float:
    """nbgw_upstream_401_retries_total for acme with this outcome."""
    return gw.metric("nbgw_upstream_401_retries_total", account="acme", outcome=outcome)


class TestUpstream401:
    async def test_one_401_is_recovered_by_one_retry(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """One upstream 401: one refresh, one retry with the new token, 200 to the client."""
        fake_nb.api_fail_401_times = 1
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 200
        assert len(fake_nb.token_requests) == 1
        first, second = fake_nb.api_requests
        assert first.headers["Authorization"] != second.headers["Authorization"]
        assert retries(acme, "recovered") == 1

    async def test_second_401_goes_to_the_client_untouched(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Two upstream 401s: exactly two attempts, NationBuilder's flat 401 body unchanged."""
        fake_nb.api_fail_401_times = 2
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 401
        assert "X-NBGW-Error" not in resp.headers
        assert (
            await resp.read()
            == json.dumps({"code": "token_expired", "message": MSG_EXPIRED}).encode()
        )
        assert resp.content_type == "application/vnd.api+json"
        assert len(fake_nb.api_requests) == 2
        assert retries(acme, "still_unauthorized") == 1
        assert retries(acme, "recovered") == 0

    async def test_a_401_that_persists_refreshes_once_per_hold(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A tool calling an endpoint NationBuilder keeps refusing (a permission the user
        lacks): one refresh and retry, then the 401s pass on with no token call until
        REFRESH_401_HOLD has passed, bodies too large to replay included."""
        acme = await gateway_factory(retry_buffer=10)
        await connect_account(acme, "acme")
        fake_nb.api_fail_401_code = "unauthorized"
        fake_nb.api_fail_401_times = 1000
        for _ in range(5):
            resp = await acme.client.get("/api/v2/signups/me")
            assert resp.status == 401
        assert len(fake_nb.token_requests) == 1
        assert len(fake_nb.api_requests) == 6  # 2 for the first, 1 each for the rest
        assert retries(acme, "still_unauthorized") == 1
        assert (await acme.client.post("/api/_test/echo", data=b"y" * 100)).status == 401
        assert len(fake_nb.token_requests) == 1

        clock.advance(REFRESH_401_HOLD + 1)
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 401
        assert len(fake_nb.token_requests) == 2
        assert retries(acme, "still_unauthorized") == 2

        fake_nb.api_fail_401_times = 0  # other endpoints were never affected
        assert (await acme.client.get("/api/v2/signups/me")).status == 200
        assert len(fake_nb.token_requests) == 2

    async def test_bodies_too_large_to_replay_rotate_at_most_every_30_s(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A 401 to a body too large to replay cannot show whether a refresh cures it: the
        token is refreshed for the next request, but another such 401 on the new token
        within MIN_REFRESH_INTERVAL refreshes nothing."""
        gw = await gateway_factory(retry_buffer=10)
        await connect_account(gw, "acme")
        fake_nb.api_fail_401_code = "unauthorized"
        fake_nb.api_fail_401_times = 1000
        for _ in range(3):
            assert (await gw.client.post("/api/_test/echo", data=b"y" * 100)).status == 401
        assert len(fake_nb.token_requests) == 1
        clock.advance(MIN_REFRESH_INTERVAL)
        assert (await gw.client.post("/api/_test/echo", data=b"y" * 100)).status == 401
        assert len(fake_nb.token_requests) == 2

    async def test_the_hold_keeps_across_processes(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Two processes on one database, a tool's requests to a forbidden endpoint spread
        over both: each holds the account (whatever generation the other's refresh made),
        so ten requests cost one rotation per process, not one each."""
        first, second = await gateway_factory(), await gateway_factory()
        await connect_account(first, "acme")
        fake_nb.api_fail_401_code = "unauthorized"
        fake_nb.api_fail_401_times = 10_000
        for n in range(10):
            gw = (first, second)[n % 2]
            await gw.tokens.sync(force=True)  # each process follows the database
            assert (await gw.client.get("/api/v2/signups/me")).status == 401
        assert len(fake_nb.token_requests) == 2

    async def test_token_expired_is_refreshed_even_while_held(
        self, acme: Gateway, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """One tool's forbidden endpoint holds the fresh token; when NationBuilder then
        expires that token early (401 token_expired), the hold does not apply: the next
        request refreshes and every tool is served again."""
        fake_nb.api_fail_401_code = "unauthorized"
        fake_nb.api_fail_401_times = 2
        assert (await acme.client.get("/api/v2/signups/me")).status == 401  # held now
        assert len(fake_nb.token_requests) == 1
        clock.advance(60)
        fake_nb.expire_access_tokens("acme")
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 200
        assert len(fake_nb.token_requests) == 2

    async def test_token_expired_for_every_token_rotates_at_most_every_30_s(
        self, acme: Gateway, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """NationBuilder answering token_expired to every token, fresh ones too (its clock
        ahead, its own bug): one refresh, then none for MIN_REFRESH_INTERVAL however many
        requests come (it was one rotation per request), then one more."""
        fake_nb.api_fail_401_times = 1000
        for _ in range(20):
            assert (await acme.client.get("/api/v2/signups/me")).status == 401
            clock.advance(1)
        assert len(fake_nb.token_requests) == 1
        clock.advance(MIN_REFRESH_INTERVAL)
        assert (await acme.client.get("/api/v2/signups/me")).status == 401
        assert len(fake_nb.token_requests) == 2

    async def test_a_compressed_token_expired_is_read_too(
        self, acme: Gateway, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """The held 401's code is found in a gzip-encoded body as well."""
        fake_nb.api_fail_401_code = "unauthorized"
        fake_nb.api_fail_401_times = 2
        assert (await acme.client.get("/api/v2/signups/me")).status == 401  # held now
        body = gzip.compress(json.dumps({"code": "token_expired", "message": "x"}).encode())
        fake_nb.set_canned(
            status=401,
            headers=[("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            body=body,
        )
        clock.advance(MIN_REFRESH_INTERVAL)
        resp = await acme.client.get("/api/_test/canned", headers={"Accept-Encoding": "gzip"})
        assert resp.status == 401
        assert len(fake_nb.token_requests) == 2  # refreshed for it, and retried

    async def test_a_held_401_reaches_the_tool_byte_for_byte(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A 401 passed on under the hold (its body read for NationBuilder's code) still
        reaches the tool exactly as NationBuilder sent it."""
        fake_nb.api_fail_401_code = "unauthorized"
        fake_nb.api_fail_401_times = 3
        assert (await acme.client.get("/api/v2/signups/me")).status == 401
        resp = await acme.client.get("/api/v2/signups/me")
        assert resp.status == 401
        assert (
            await resp.read()
            == json.dumps({"code": "unauthorized", "message": MSG_UNAUTHORIZED}).encode()
        )
        assert len(fake_nb.api_requests) == 3

    async def test_a_token_refused_again_after_a_cure_is_refreshed_again(
        self, acme: Gateway, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """A 401 the refresh cured holds nothing back: when NationBuilder expires the new
        token early too, a minute later, the next request refreshes and retries again."""
        fake_nb.expire_access_tokens("acme")
        assert (await acme.client.get("/api/v2/signups/me")).status == 200
        clock.advance(60)
        fake_nb.expire_access_tokens("acme")
        assert (await acme.client.get("/api/v2/signups/me")).status == 200
        assert len(fake_nb.token_requests) == 2
        assert retries(acme, "recovered") == 2

    async def test_a_held_401_is_retried_with_a_token_another_process_stored(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Within the hold, a 401 on the held token is retried once with a newer token
        another process refreshed meanwhile (NationBuilder revoked the held one), without
        a token call of this process's own."""
        gw = await gateway_factory()
        other = await gateway_factory()
        await connect_account(gw, "acme")
        fake_nb.api_fail_401_times = 2
        assert (await gw.client.get("/api/v2/signups/me")).status == 401
        assert len(fake_nb.token_requests) == 1

        fake_nb.old_access_token_survives_refresh = False
        await other.tokens.refresh_now("acme")  # revokes the token gw holds
        assert len(fake_nb.token_requests) == 2
        resp = await gw.client.get("/api/v2/signups/me")
        assert resp.status == 200
        assert len(fake_nb.token_requests) == 2
        assert retries(gw, "recovered") == 1

    async def test_replayed_body_is_byte_identical(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A small POST body is sent again byte for byte on the retry."""
        fake_nb.api_fail_401_times = 1
        payload = b'{"data": {"type": "signups", "attributes": {"email": "\xc3\xa9@x.example"}}}'
        resp = await acme.client.post(
            "/api/_test/echo", data=payload, headers={"Content-Type": "application/json"}
        )
        doc = await echoed(resp)
        assert base64.b64decode(doc["body_b64"]) == payload
        first, second = fake_nb.api_requests
        assert first.body == second.body == payload
        assert first.method == second.method == "POST"
        assert second.headers["Content-Length"] == str(len(payload))

    async def test_a_small_chunked_body_is_replayed_too(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A body sent chunked (no Content-Length, as a tool streaming a file or a
        generator does) that fits NBGW_RETRY_BUFFER is kept and sent again on the retry,
        like one with a length (it was streamed, so the 401 went back to the tool)."""
        fake_nb.api_fail_401_times = 1
        payload = b'{"data": {"type": "signups", "attributes": {"email": "a@x.example"}}}'

        async def chunks() -> AsyncIterator[bytes]:
            yield payload[:10]
            yield payload[10:]

        resp = await acme.client.post("/api/_test/echo", data=chunks())
        doc = await echoed(resp)
        assert base64.b64decode(doc["body_b64"]) == payload
        first, second = fake_nb.api_requests
        assert first.body == second.body == payload
        assert retries(acme, "recovered") == 1

    async def test_a_chunked_body_above_the_retry_buffer_streams_whole_once(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A chunked body past NBGW_RETRY_BUFFER still arrives whole (what was read to
        find out, then the rest), once; the 401 goes back to the client."""
        gw = await gateway_factory(retry_buffer=10)
        await connect_account(gw, "acme")
        fake_nb.api_fail_401_times = 1

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield bytes([65 + i]) * 7

        resp = await gw.client.post("/api/_test/echo", data=chunks())
        assert resp.status == 401
        [seen] = fake_nb.api_requests
        assert seen.body == b"".join(bytes([65 + i]) * 7 for i in range(5))

    async def test_body_above_retry_buffer_is_not_retried(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A body too large to keep is sent once; the 401 goes back to the client."""
        gw = await gateway_factory(retry_buffer=10)
        await connect_account(gw, "acme")
        fake_nb.api_fail_401_times = 1
        resp = await gw.client.post("/api/_test/echo", data=b"y" * 100)
        assert resp.status == 401
        assert "X-NBGW-Error" not in resp.headers
        [seen] = fake_nb.api_requests
        assert seen.body == b"y" * 100
        for outcome in ("recovered", "still_unauthorized", "refresh_failed"):
            assert retries(gw, outcome) == 0

    async def test_refresh_failure_during_retry(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A 401 whose refresh is refused: 401 account_needs_reauthorization naming /connect."""
        fake_nb.api_fail_401_times = 1
        fake_nb.fail_token("invalid_grant")
        resp = await acme.client.get("/api/v2/signups/me")
        error = await expect_error(resp, 401, "account_needs_reauthorization")
        assert f"{PUBLIC_URL}/connect" in error["detail"]
        assert len(fake_nb.api_requests) == 1
        assert retries(acme, "refresh_failed") == 1


# ---------------------------------------------------------------------- upstream failures


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TestUpstreamFailures:
    async def test_unreachable_upstream_is_502(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """Nothing listening at the nation URL: 502 upstream_unreachable."""
        gw = await gateway_factory(nation_url=f"http://127.0.0.1:{closed_port()}/{{slug}}")
        await connect_account(gw, "acme")
        resp = await gw.client.get("/api/v2/signups")
        await expect_error(resp, 502, "upstream_unreachable")

    async def test_hanging_upstream_is_504(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """NationBuilder silent past NBGW_UPSTREAM_TIMEOUT: 504 upstream_timeout."""
        gw = await gateway_factory(upstream_timeout=0.3)
        await connect_account(gw, "acme")
        fake_nb.api_hang = True
        resp = await gw.client.get("/api/v2/signups")
        await expect_error(resp, 504, "upstream_timeout")
        assert len(fake_nb.api_requests) == 1

    async def test_redirects_are_not_followed(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """An upstream 302 reaches the client with its Location; the gateway does not follow."""
        resp = await acme.client.get("/api/_test/status/302", allow_redirects=False)
        assert resp.status == 302
        assert resp.headers["Location"] == "https://example.invalid/elsewhere"
        assert len(fake_nb.requests) == 1

    async def test_upstream_error_page_passes_untouched(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A 503 HTML page from NationBuilder reaches the client as sent, not as our error."""
        resp = await acme.client.get("/api/_test/status/503")
        body = await resp.read()
        assert resp.status == 503
        assert "X-NBGW-Error" not in resp.headers
        direct_status, direct_type, direct = await fetch_direct(fake_nb, "/api/_test/status/503")
        assert (direct_status, direct_type) == (503, resp.headers["Content-Type"])
        # Only the Cloudflare Ray ID differs between two pages; everything else is identical.
        ray = re.compile(rb'(<strong class="font-semibold">)[0-9a-f]+(</strong>)')
        assert ray.search(body) is not None
        assert ray.sub(rb"\1RAY\2", body) == ray.sub(rb"\1RAY\2", direct)

    @pytest.mark.parametrize("prefix", ["/api", "/n/acme/api"])
    async def test_validation_error_passes_untouched(
        self, acme: Gateway, fake_nb: FakeNationBuilder, prefix: str
    ) -> None:
        """NationBuilder's 422 JSON:API validation errors reach the client byte for byte."""
        payload = {"data": {"type": "signups", "attributes": {"first_name": "No Email"}}}
        resp = await acme.client.post(f"{prefix}/v2/signups", json=payload)
        body = await resp.read()
        assert resp.status == 422
        assert "X-NBGW-Error" not in resp.headers
        status, ctype, direct = await fetch_direct(
            fake_nb, "/api/v2/signups", method="POST", json_body=payload
        )
        assert (status, ctype) == (422, resp.headers["Content-Type"])
        assert body == direct


async def fetch_direct(
    fake: FakeNationBuilder,
    path: str,
    *,
    method: str = "GET",
    json_body: Any = None,
) -> tuple[int, str, bytes]:
    """Ask the fake directly (with a fresh valid token): status, Content-Type and body."""
    token = fake.issue_tokens("acme")["access_token"]
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            fake.nation_url("acme") + path,
            json=json_body,
            headers={"Authorization": f"Bearer {token}"},
            allow_redirects=False,
        ) as resp,
    ):
        return resp.status, resp.headers["Content-Type"], await resp.read()


# ---------------------------------------------------------------------- link rewriting


class TestLinkRewriting:
    async def test_prefix_route_rewrites_v2_links(self, acme: Gateway) -> None:
        """Via /n/acme, links.* and relationship links point back into /n/acme/api/."""
        resp = await acme.client.get("/n/acme/api/v2/signups?page[size]=10&page[number]=2")
        doc = await resp.json(content_type=None)
        links = doc["links"]
        for name in ("self", "next", "prev"):
            assert links[name].startswith("/n/acme/api/v2/signups?"), links[name]
        assert len(doc["data"]) == 10
        for resource in doc["data"]:
            related = resource["relationships"]["petition_signatures"]["links"]["related"]
            assert related.startswith("/n/acme/api/v2/petition_signatures?"), related

    async def test_following_next_stays_on_the_account(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """links.next followed through the gateway gives page 2 of the same account."""
        gw = await gateway_factory(default_account="beta")
        await connect_account(gw, "acme")
        await connect_account(gw, "beta")
        first = await (await gw.client.get("/n/acme/api/v2/signups?page[size]=10")).json(
            content_type=None
        )
        resp = await gw.client.get(enc(first["links"]["next"]))
        second = await resp.json(content_type=None)
        assert [r["id"] for r in second["data"]] == [str(i) for i in range(11, 21)]
        assert {r["attributes"]["email"].split("@")[1] for r in second["data"]} == {"acme.example"}
        assert [r.slug for r in fake_nb.api_requests] == ["acme", "acme"]

    async def test_plain_route_leaves_relative_links(self, acme: Gateway) -> None:
        """Via plain /api/, root-relative links are already right and stay unchanged."""
        doc = await (await acme.client.get("/api/v2/signups?page[size]=10")).json(content_type=None)
        assert doc["links"]["next"] == "/api/v2/signups?page[number]=2&page[size]=10"
        related = doc["data"][0]["relationships"]["petition_signatures"]["links"]["related"]
        assert related == "/api/v2/petition_signatures?filter[signup_id]=1"

    @pytest.mark.parametrize("prefix", ["/api", "/n/acme/api"])
    async def test_absolute_links_point_at_the_gateway(
        self, acme: Gateway, fake_nb: FakeNationBuilder, prefix: str
    ) -> None:
        """Absolute nation links become links on the address and route the tool used
        (http://{Host}{prefix}/...), not on NBGW_PUBLIC_URL."""
        doc = await (await acme.client.get(f"{prefix}/_test/absolute-links")).json(
            content_type=None
        )
        origin = str(acme.client.make_url("")).rstrip("/")
        expected = f"{origin}{prefix}/v2/signups?"
        assert doc["links"]["self"].startswith(expected)
        assert doc["links"]["next"] == f"{expected}page[number]=2&page[size]=1"
        related = doc["data"][0]["relationships"]["petition_signatures"]["links"]["related"]
        assert related.startswith(f"{origin}{prefix}/v2/petition_signatures?")
        assert PUBLIC_URL not in json.dumps(doc)
        assert fake_nb.base_url not in json.dumps(doc)

    async def test_absolute_links_switch(self, acme: Gateway, fake_nb: FakeNationBuilder) -> None:
        """With absolute links everywhere, list pages point at the gateway too."""
        fake_nb.absolute_links = True
        doc = await (await acme.client.get("/api/v2/signups?page[size]=5")).json(content_type=None)
        origin = str(acme.client.make_url("")).rstrip("/")
        assert doc["links"]["next"] == f"{origin}/api/v2/signups?page[number]=2&page[size]=5"

    async def test_v1_cursor_link_keeps_its_tokens(self, acme: Gateway) -> None:
        """v1 `next` is rewritten with __nonce/__token intact: following it gives page 2."""
        first = await (await acme.client.get("/n/acme/api/v1/people?limit=5")).json(
            content_type=None
        )
        assert [p["id"] for p in first["results"]] == [1, 2, 3, 4, 5]
        next_link = first["next"]
        assert next_link.startswith("/n/acme/api/v1/people?")
        query = URL(next_link).query
        assert query["__nonce"] and query["__token"]
        second = await (await acme.client.get(enc(next_link))).json(content_type=None)
        assert [p["id"] for p in second["results"]] == [6, 7, 8, 9, 10]
        assert second["prev"].startswith("/n/acme/api/v1/people?")

    async def test_gzip_json_is_rewritten(self, sink_gateway: tuple[Gateway, Sink]) -> None:
        """A gzip-encoded JSON body is decoded, rewritten and sent without Content-Encoding."""
        gw, _ = sink_gateway
        resp = await gw.client.get("/n/acme/api/gzip-links", headers={"Accept-Encoding": "gzip"})
        assert resp.status == 200
        assert "Content-Encoding" not in resp.headers
        doc = json.loads(await resp.read())
        assert doc["links"]["next"] == "/n/acme/api/v2/signups?page[number]=2&page[size]=1"

    async def test_gzip_json_without_links_passes_encoded(
        self, sink_gateway: tuple[Gateway, Sink]
    ) -> None:
        """A gzip JSON body with nothing to rewrite keeps its encoding and decodes intact."""
        gw, _ = sink_gateway
        resp = await gw.client.get(
            "/n/acme/api/gzip-plain", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
        )
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(await resp.read())) == {
            "data": [],
            "meta": {"gzip": True},
        }

    async def test_gzip_body_inflating_past_the_limit_passes_through_encoded(
        self, sink_gateway: tuple[Gateway, Sink]
    ) -> None:
        """A small gzip body that would inflate beyond the rewrite limit is sent on as it came."""
        gw, _ = sink_gateway
        resp = await gw.client.get(
            "/n/acme/api/gzip-bomb", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
        )
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        body = await resp.read()
        assert len(body) < MiB
        assert gzip.decompress(body).startswith(b'{"links":{"next":"/api/v2/x"}')

    async def test_escaped_slashes_are_rewritten(self, sink_gateway: tuple[Gateway, Sink]) -> None:
        """Links written with JSON-escaped slashes are found and rewritten."""
        gw, _ = sink_gateway
        doc = await (await gw.client.get("/n/acme/api/escaped-links")).json(content_type=None)
        assert doc["links"]["next"] == "/n/acme/api/v2/signups?page[number]=2"


# ---------------------------------------------------------------------- client allow-list


class TestAllowList:
    @pytest.fixture
    async def fenced(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> Gateway:
        gw = await gateway_factory(allowed_clients=(ipaddress.ip_network("10.0.0.0/8"),))
        await connect_account(gw, "acme")
        return gw

    async def test_client_outside_the_list_is_403(
        self, fenced: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A peer outside NBGW_ALLOWED_CLIENTS gets 403 client_not_allowed; nothing upstream."""
        for path in ("/api/v2/signups", "/n/acme/api/v2/signups"):
            await expect_error(await fenced.client.get(path), 403, "client_not_allowed")
        assert fake_nb.requests == []

    async def test_forwarded_for_does_not_get_in(
        self, fenced: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A client-sent X-Forwarded-For inside the list does not change the decision."""
        resp = await fenced.client.get(
            "/api/v2/signups", headers={"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3"}
        )
        await expect_error(resp, 403, "client_not_allowed")
        assert fake_nb.requests == []

    async def test_probes_still_answer_and_metrics_follow_the_list(self, fenced: Gateway) -> None:
        """/healthz and /readyz answer probes from outside the list; /metrics, whose own list
        defaults to NBGW_ALLOWED_CLIENTS, does not."""
        assert (await fenced.client.get("/healthz")).status == 200
        assert (await fenced.client.get("/readyz")).status == 200
        await expect_error(await fenced.client.get("/metrics"), 403, "client_not_allowed")


# ---------------------------------------------------------------------- request ids

_GENERATED_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class TestRequestId:
    async def test_generated_when_absent(self, acme: Gateway) -> None:
        """Without X-Request-ID the gateway makes one and returns it."""
        first = (await acme.client.get("/api/v2/signups/me")).headers["X-Request-ID"]
        second = (await acme.client.get("/api/v2/signups/me")).headers["X-Request-ID"]
        assert _GENERATED_ID.fullmatch(first)
        assert first != second

    async def test_sane_id_is_echoed_and_forwarded(self, acme: Gateway) -> None:
        """A well-formed X-Request-ID comes back unchanged and reaches NationBuilder."""
        resp = await acme.client.get("/api/_test/echo", headers={"X-Request-ID": "job-42.a:b"})
        assert resp.headers["X-Request-ID"] == "job-42.a:b"
        assert (await echoed(resp))["headers"]["X-Request-ID"] == "job-42.a:b"

    @pytest.mark.parametrize("hostile", ["has spaces in it", "x" * 300, "<script>"])
    async def test_hostile_id_is_replaced(self, acme: Gateway, hostile: str) -> None:
        """A malformed X-Request-ID is not echoed; a fresh one is returned instead."""
        resp = await acme.client.get("/api/v2/signups/me", headers={"X-Request-ID": hostile})
        returned = resp.headers["X-Request-ID"]
        assert returned != hostile
        assert _GENERATED_ID.fullmatch(returned)

    @pytest.mark.parametrize("sent", [None, "has spaces in it", "x" * 300])
    async def test_upstream_sees_the_returned_id(self, acme: Gateway, sent: str | None) -> None:
        """NationBuilder receives the same request id the client gets back."""
        headers = {} if sent is None else {"X-Request-ID": sent}
        resp = await acme.client.get("/api/_test/echo", headers=headers)
        assert (await echoed(resp))["headers"]["X-Request-ID"] == resp.headers["X-Request-ID"]

    async def test_returned_on_gateway_errors_and_health(self, acme: Gateway) -> None:
        """Gateway errors, /healthz and /metrics carry X-Request-ID too."""
        for path in ("/n/nope/api/v2/signups", "/healthz", "/metrics"):
            resp = await acme.client.get(path, headers={"X-Request-ID": "rid-1"})
            assert resp.headers["X-Request-ID"] == "rid-1", path

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("HEAD", "/api/_test/echo"),
            ("GET", "/api/_test/status/503"),
            ("GET", "/api/_test/bytes?n=10"),
        ],
    )
    async def test_returned_on_streamed_responses(
        self, acme: Gateway, method: str, path: str
    ) -> None:
        """Streamed upstream answers (HEAD, HTML, binary) carry X-Request-ID too."""
        resp = await acme.client.request(method, path, headers={"X-Request-ID": "rid-2"})
        assert resp.headers.get("X-Request-ID") == "rid-2"


# ---------------------------------------------------------------------- metrics


class TestMetrics:
    async def test_request_counters_and_histograms(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Requests are counted by account, method and code, with durations observed."""
        await acme.client.get("/api/v2/signups/me")
        await acme.client.get("/n/acme/api/v2/signups/me")
        await acme.client.post("/api/_test/echo", data=b"{}")
        await acme.client.get("/api/v2/signups/999999")
        assert (
            acme.metric("nbgw_proxy_requests_total", account="acme", method="GET", code="200") == 2
        )
        assert (
            acme.metric("nbgw_proxy_requests_total", account="acme", method="POST", code="200") == 1
        )
        assert (
            acme.metric("nbgw_proxy_requests_total", account="acme", method="GET", code="404") == 1
        )
        assert acme.metric("nbgw_proxy_request_duration_seconds_count", account="acme") == 4
        assert acme.metric("nbgw_upstream_request_duration_seconds_count", account="acme") == 4
        assert acme.metric("nbgw_proxy_in_flight_requests") == 0

    async def test_in_flight_gauge_rises_and_falls(
        self, sink_gateway: tuple[Gateway, Sink]
    ) -> None:
        """The in-flight gauge counts a request while it waits upstream and drops after."""
        gw, upstream = sink_gateway
        task = asyncio.create_task(gw.client.get("/api/gate"))
        await asyncio.wait_for(upstream.arrived.wait(), timeout=5)
        assert gw.metric("nbgw_proxy_in_flight_requests") == 1
        upstream.release.set()
        resp = await task
        assert resp.status == 200
        await resp.release()
        assert gw.metric("nbgw_proxy_in_flight_requests") == 0

    async def test_unknown_and_invalid_slugs_count_as_none(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Requests for unknown or malformed accounts are labelled account="none"."""
        await acme.client.get("/n/nope/api/v2/signups")
        await acme.client.get("/n/nope2/api/v2/signups")
        await acme.client.get("/n/ACME/api/v2/signups")
        assert (
            acme.metric("nbgw_proxy_requests_total", account="none", method="GET", code="404") == 2
        )
        assert (
            acme.metric("nbgw_proxy_requests_total", account="none", method="GET", code="400") == 1
        )
        accounts = {labels["account"] for labels in samples(acme, "nbgw_proxy_requests_total")}
        assert accounts == {"none"}
        assert acme.metric("nbgw_proxy_in_flight_requests") == 0

    async def test_unusual_methods_count_as_other(self, acme: Gateway) -> None:
        """A method outside the usual set is labelled method="other"."""
        resp = await acme.client.request("PROPFIND", "/api/_test/echo")
        methods = {labels["method"] for labels in samples(acme, "nbgw_proxy_requests_total")}
        assert methods == {"other"}
        assert (
            acme.metric(
                "nbgw_proxy_requests_total", account="acme", method="other", code=str(resp.status)
            )
            == 1
        )
