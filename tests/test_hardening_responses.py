"""What the gateway sends back when NationBuilder misbehaves: no upstream cookies on our
origin, redirects and links that stay on the same route and the address the tool used,
bodies passed byte for byte except the rewritten link strings, large rewrites that do not
stall other clients, and an accurate error for an answer that cannot be parsed.

The misbehaving upstream is the fake NationBuilder's ``/api/_test/canned`` endpoint, which
answers exactly the status, headers and body bytes a test sets.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any, cast

import pytest
from aiohttp.test_utils import make_mocked_request
from conftest import PUBLIC_URL, ConnectAccount, Gateway, GatewayFactory, SettingsFactory
from yarl import URL

import nbgateway.links
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.proxy import Proxy, Route
from nbgateway.redact import REDACTED

V2 = "application/vnd.api+json"
HOST = "gw.internal:8080"


@pytest.fixture
async def acme(gateway_factory: GatewayFactory, connect_account: ConnectAccount) -> Gateway:
    """A gateway with exactly one account, acme, that tools may call by any name
    (NBGW_ALLOWED_HOSTS=*): the links are mapped to whatever Host they used."""
    gateway = await gateway_factory(allowed_hosts=("*",))
    await connect_account(gateway, "acme")
    return gateway


@pytest.fixture
async def two_nations(gateway_factory: GatewayFactory, connect_account: ConnectAccount) -> Gateway:
    """alpha and beta connected; beta is the default account; any Host (links are mapped
    to the one the tool used)."""
    gw = await gateway_factory(default_account="beta", allowed_hosts=("*",))
    await connect_account(gw, "alpha")
    await connect_account(gw, "beta")
    return gw


def canned_json(fake: FakeNationBuilder, body: bytes, *, status: int = 200) -> None:
    fake.set_canned(status=status, headers=[("Content-Type", V2)], body=body)


# ---------------------------------------------------------------------- cookies


class TestCookies:
    @pytest.mark.parametrize("prefix", ["/api", "/n/acme/api"])
    @pytest.mark.parametrize("content_type", [V2, "text/plain"])
    async def test_upstream_set_cookie_never_reaches_the_client(
        self, acme: Gateway, fake_nb: FakeNationBuilder, prefix: str, content_type: str
    ) -> None:
        """Set-Cookie (and Set-Cookie2) from upstream are dropped, buffered or streamed;
        the other upstream headers still pass."""
        fake_nb.set_canned(
            headers=[
                ("Content-Type", content_type),
                ("Set-Cookie", "nbgw_session=attacker; Path=/connect; HttpOnly"),
                ("Set-Cookie", "_nbuild_session=abc; Path=/"),
                ("Set-Cookie2", "legacy=1"),
                ("X-Upstream", "kept"),
            ],
            body=b'{"data":[]}',
        )
        resp = await acme.client.get(f"{prefix}/_test/canned")
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers
        assert "Set-Cookie2" not in resp.headers
        assert resp.headers["X-Upstream"] == "kept"
        assert not acme.client.session.cookie_jar.filter_cookies(acme.client.make_url("/connect"))
        assert await resp.read() == b'{"data":[]}'

    @pytest.mark.parametrize("content_type", [V2, "text/plain"])
    async def test_upstream_headers_about_the_origin_never_reach_the_client(
        self, acme: Gateway, fake_nb: FakeNationBuilder, content_type: str
    ) -> None:
        """The gateway's origin is also the /connect pages': NationBuilder's answer does not
        clear the browser's data for it (the admin's session), redirect off it with
        Refresh, open its answers to other sites (CORS), or say where browsers reach it
        or report its errors; an X-NBGW-Error from upstream would pass its answer off as
        the gateway's own error."""
        dropped = [
            ("Clear-Site-Data", '"cookies", "storage"'),
            ("Refresh", "0; url=https://evil.example/"),
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Credentials", "true"),
            ("Access-Control-Expose-Headers", "*"),
            ("Alt-Svc", 'h3=":443"'),
            ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
            ("NEL", '{"report_to":"nb","max_age":86400}'),
            ("Report-To", '{"group":"nb","endpoints":[{"url":"https://r.example/"}]}'),
            ("X-NBGW-Error", "unknown_account"),
        ]
        fake_nb.set_canned(
            headers=[("Content-Type", content_type), *dropped, ("X-Upstream", "kept")],
            body=b'{"data":[]}',
        )
        resp = await acme.client.get("/n/acme/api/_test/canned")
        assert resp.status == 200
        for name, _ in dropped:
            assert name not in resp.headers, name
        assert resp.headers["X-Upstream"] == "kept"


# ---------------------------------------------------------------------- same origin


class TestSandbox:
    @pytest.mark.parametrize("content_type", [V2, "text/html", "text/plain"])
    async def test_every_proxied_answer_is_sandboxed(
        self, acme: Gateway, fake_nb: FakeNationBuilder, content_type: str
    ) -> None:
        """Proxied answers share the admin pages' origin: each one (rewritten JSON or
        streamed) carries `Content-Security-Policy: sandbox` and nosniff, so a page among
        them runs no script there (tests/browser has the attack in Chromium)."""
        fake_nb.set_canned(headers=[("Content-Type", content_type)], body=b"<b>x</b>")
        resp = await acme.client.get("/api/_test/canned")
        assert resp.headers.getall("Content-Security-Policy") == ["sandbox"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"

    async def test_upstream_policies_stay_beside_the_sandbox(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Upstream's own policy still applies (a browser enforces each), and its nosniff
        is not doubled."""
        fake_nb.set_canned(
            headers=[
                ("Content-Type", "text/html"),
                ("Content-Security-Policy", "default-src 'self'"),
                ("X-Content-Type-Options", "nosniff"),
            ],
            body=b"<b>x</b>",
        )
        resp = await acme.client.get("/api/_test/canned")
        assert sorted(resp.headers.getall("Content-Security-Policy")) == [
            "default-src 'self'",
            "sandbox",
        ]
        assert resp.headers.getall("X-Content-Type-Options") == ["nosniff"]


# ---------------------------------------------------------------------- Location


class TestLocation:
    @pytest.mark.parametrize("header", ["Location", "Content-Location"])
    @pytest.mark.parametrize(
        ("target", "upstream", "expected"),
        [
            ("/n/alpha/api", "/api/v2/signups/2", "/n/alpha/api/v2/signups/2"),
            (
                "/n/alpha/api",
                "{nation}/api/v2/signups/2",
                f"http://{HOST}/n/alpha/api/v2/signups/2",
            ),
            ("/api", "/api/v2/signups/2", "/api/v2/signups/2"),
            ("/api", "{nation}/api/v2/signups/2", f"http://{HOST}/api/v2/signups/2"),
            ("/n/alpha/api", "signups/2", "signups/2"),
            (
                "/n/alpha/api",
                "https://example.invalid/elsewhere",
                "https://example.invalid/elsewhere",
            ),
            ("/n/alpha/api", "{nation}/login", "{nation}/login"),
        ],
        ids=[
            "prefix-relative",
            "prefix-absolute",
            "header-relative",
            "header-absolute",
            "path-relative",
            "foreign",
            "nation-outside-api",
        ],
    )
    async def test_location_is_mapped_like_body_links(
        self,
        two_nations: Gateway,
        fake_nb: FakeNationBuilder,
        header: str,
        target: str,
        upstream: str,
        expected: str,
    ) -> None:
        """A link into the nation's /api/ in Location or Content-Location leads back through
        the route the tool used; anything else is passed as sent."""
        fake_nb.set_canned(status=301, headers=[(header, upstream)], body=b"moved")
        resp = await two_nations.client.get(
            f"{target}/_test/canned",
            headers={"Host": HOST, "X-NB-Nation": "alpha"},
            allow_redirects=False,
        )
        assert resp.status == 301
        assert resp.headers[header] == expected.replace("{nation}", fake_nb.nation_url("alpha"))
        assert [r.slug for r in fake_nb.api_requests] == ["alpha"]

    async def test_the_token_never_reaches_the_tool_in_a_header(
        self, gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder
    ) -> None:
        """NationBuilder's answer quoting the access token the gateway sent, in a Location
        outside the nation's /api/ or in any other header: the token is replaced by the
        redaction mark before the answer goes to the tool; the rest is kept."""
        token = (await connect_account(gateway, "acme"))["access_token"]
        fake_nb.set_canned(
            status=302,
            headers=[
                ("Location", f"{{nation}}/login?access_token={token}&next=1"),
                ("WWW-Authenticate", f'Bearer error="invalid_token", token="{token}"'),
                ("X-Debug", token),
            ],
            body=b"moved",
        )
        resp = await gateway.client.get("/api/_test/canned", allow_redirects=False)
        assert resp.status == 302
        for name, value in resp.headers.items():
            assert token not in value, name
        nation = fake_nb.nation_url("acme")
        assert resp.headers["Location"] == f"{nation}/login?access_token={REDACTED}&next=1"
        assert resp.headers["WWW-Authenticate"] == (
            f'Bearer error="invalid_token", token="{REDACTED}"'
        )
        assert resp.headers["X-Debug"] == REDACTED

    async def test_link_header_urls_are_mapped_like_body_links(
        self, two_nations: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A Link header (RFC 8288) with pagination URLs into the nation's /api/ leads back
        through the route the tool used; other URLs and the parameters are kept."""
        nation = fake_nb.nation_url("alpha")
        fake_nb.set_canned(
            status=200,
            headers=[
                (
                    "Link",
                    f'<{nation}/api/v2/signups?page=2>; rel="next", '
                    '</api/v2/signups?page=1>; rel="prev", '
                    '<https://example.invalid/docs>; rel="help"',
                )
            ],
            body=b"{}",
        )
        resp = await two_nations.client.get(
            "/n/alpha/api/_test/canned", headers={"Host": HOST}, allow_redirects=False
        )
        assert resp.headers["Link"] == (
            f'<http://{HOST}/n/alpha/api/v2/signups?page=2>; rel="next", '
            '</n/alpha/api/v2/signups?page=1>; rel="prev", '
            '<https://example.invalid/docs>; rel="help"'
        )

    @pytest.mark.parametrize("target", ["/api", "/n/alpha/api"])
    async def test_a_token_in_a_link_does_not_reach_the_tool(
        self, two_nations: Gateway, fake_nb: FakeNationBuilder, target: str
    ) -> None:
        """An access_token in a link NationBuilder sends (v1 pagination once carried the
        caller's) is dropped from the mapped link, in the body and in Link; the rest of the
        query and the fragment stay."""
        nation = fake_nb.nation_url("alpha")
        body = json.dumps(
            {
                "links": {
                    "next": f"{nation}/api/v1/people?page=2&access_token=UPSTREAM-TOKEN#top",
                    "prev": "/api/v1/people?access_token=UPSTREAM-TOKEN",
                    "self": f"{nation}/api/v1/people#top?access_token=is-fragment-text",
                }
            }
        ).encode()
        fake_nb.set_canned(
            headers=[
                ("Content-Type", "application/json"),
                ("Link", f'<{nation}/api/v1/people?access_token=UPSTREAM-TOKEN&page=3>; rel="x"'),
            ],
            body=body,
        )
        resp = await two_nations.client.get(
            f"{target}/_test/canned", headers={"Host": HOST, "X-NB-Nation": "alpha"}
        )
        text = await resp.text()
        assert "UPSTREAM-TOKEN" not in text  # (the fragment is the page's, not a query)
        assert "UPSTREAM-TOKEN" not in resp.headers["Link"]
        route = "/n/alpha" if target.startswith("/n/") else ""
        links = json.loads(text)["links"]
        assert links["next"] == f"http://{HOST}{route}/api/v1/people?page=2#top"
        assert links["prev"] == f"{route}/api/v1/people"
        assert (
            links["self"] == f"http://{HOST}{route}/api/v1/people#top?access_token=is-fragment-text"
        )
        assert resp.headers["Link"] == f'<http://{HOST}{route}/api/v1/people?page=3>; rel="x"'

    async def test_following_a_relative_redirect_stays_on_the_nation(
        self, two_nations: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """alpha answers `301 Location: /api/v2/signups/2`; following it through the gateway
        reaches alpha again, not the default account beta."""
        fake_nb.set_canned(status=301, headers=[("Location", "/api/v2/signups/2")])
        resp = await two_nations.client.get("/n/alpha/api/_test/canned", allow_redirects=False)
        assert resp.status == 301
        followed = await two_nations.client.get(URL(resp.headers["Location"], encoded=True))
        assert followed.status == 200
        doc = await followed.json(content_type=None)
        assert doc["data"]["attributes"]["email"].endswith("@alpha.example")
        assert [r.slug for r in fake_nb.api_requests] == ["alpha", "alpha"]


# ---------------------------------------------------------------------- bodies byte for byte


def deep(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


LINKS = b'"links":{"self":"/api/v2/signups?page[number]=1","next":"/api/v2/signups?page[number]=2"}'
REWRITTEN = (
    b'"links":{"self":"/n/acme/api/v2/signups?page[number]=1",'
    b'"next":"/n/acme/api/v2/signups?page[number]=2"}'
)
ODD_VALUES = {
    "overflowing-float": b"1e400",
    "negative-overflow": b"-1E+400",
    "big-integer": b"1" * 5000,
    "precise-float": b"0.1000000000000000055511151231257827021181583404541015625",
    "float-spelling": b"[1.0, 1E2, 0e0, -0.0, 100]",
    "lone-surrogate": b'"\\ud800 and \\udfff"',
    "escapes-kept": b'"\\u00e9\\/\\"\\t \xc3\xa9"',
    "deep-nesting": deep(50_000),
    "duplicate-keys": b'{"a":1,"a":2,"a":{"x":[],"x":null}}',
    "whitespace": b'{ \n\t"a" :\r\n [ 1 , 2 ] }',
}


REAL = "https://{slug}.nationbuilder.com"


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        (
            "http://acme.nationbuilder.com/api/v2/signups?page[number]=2",
            "http://gw.internal:8080/n/acme/api/v2/signups?page[number]=2",
        ),
        (
            "https://ACME.NationBuilder.com/api/v2/Tags",
            "http://gw.internal:8080/n/acme/api/v2/Tags",
        ),
        ("https://acme.nationbuilder.com:443/api/v2/x", "http://gw.internal:8080/n/acme/api/v2/x"),
        (
            "https://www.nationbuilder.com/api/v1/people?access_token=t0k&limit=5",
            "http://gw.internal:8080/n/acme/api/v1/people?limit=5",
        ),
        ("https://nationbuilder.com/api/v2/x", "http://gw.internal:8080/n/acme/api/v2/x"),
        ("https://other.nationbuilder.com/api/v2/x", None),
        ("https://acme.nationbuilder.com.evil.example/api/v2/x", None),
        ("https://acme.nationbuilder.com@evil.example/api/v2/x", None),
        ("https://evil.example/?next=https://acme.nationbuilder.com/api", None),
        ("https://acme.nationbuilder.com:8443/api/v2/x", None),
        ("https://acme.nationbuilder.com/admin/people", None),
    ],
)
def test_links_on_the_real_nations_host_in_any_form_are_mapped(
    link: str, expected: str | None, settings_factory: SettingsFactory
) -> None:
    """With the real host template, a link to the nation's own host in another case or
    scheme, with its default port, or on the domain's own or www host, leads back through
    the gateway like one written exactly as NBGW_NATION_URL; other nations, look-alike
    hosts, other ports and pages outside /api/ are left as they are."""
    proxy = Proxy(settings_factory(nation_url=REAL), *(cast(Any, None),) * 6)
    try:
        request = make_mocked_request(
            "GET", "/n/acme/api/v2/signups", headers={"Host": "gw.internal:8080"}
        )
        mapper = proxy._link_mapper(request, Route("acme", "v2/signups", "", by_prefix=True))
        assert mapper(link) == expected
    finally:
        proxy.close()


class TestBodiesAreKeptExactly:
    @pytest.mark.parametrize("value", list(ODD_VALUES.values()), ids=list(ODD_VALUES))
    async def test_only_link_strings_change(
        self, acme: Gateway, fake_nb: FakeNationBuilder, value: bytes
    ) -> None:
        """Whatever Python's json module would lose or refuse elsewhere in the document, the
        client gets the upstream bytes with only the link strings replaced."""
        body = b'{"data":[],"meta":{"odd":' + value + b"}," + LINKS + b"}"
        canned_json(fake_nb, body)
        resp = await acme.client.get("/n/acme/api/_test/canned")
        assert resp.status == 200
        assert "X-NBGW-Error" not in resp.headers
        assert await resp.read() == body.replace(LINKS, REWRITTEN)

    async def test_links_of_resources_next_to_deep_nesting(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Resource and relationship links are rewritten even when a sibling attribute nests
        deeper than Python's recursion limit."""
        resource = (
            b'{"id":"1","attributes":{"tree":' + deep(50_000) + b'},"links":{"self":"/api/v2/s/1"},'
            b'"relationships":{"r":{"links":{"related":{"href":"/api/v2/r?x=1","meta":{}}}}}}'
        )
        canned_json(fake_nb, b'{"data":[' + resource + b"]}")
        body = await (await acme.client.get("/n/acme/api/_test/canned")).read()
        expected = resource.replace(b'"/api/v2/s/1"', b'"/n/acme/api/v2/s/1"').replace(
            b'"/api/v2/r?x=1"', b'"/n/acme/api/v2/r?x=1"'
        )
        assert body == b'{"data":[' + expected + b"]}"

    async def test_duplicate_link_members_are_all_rewritten(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """With a duplicated `links` member, whichever one the tool's parser keeps points at
        the gateway."""
        body = b'{"links":{"next":"/api/v2/a"},"links":{"next":"/api/v2/b","next":"/api/v2/c"}}'
        canned_json(fake_nb, body)
        got = await (await acme.client.get("/n/acme/api/_test/canned")).read()
        assert got == body.replace(b'"/api/', b'"/n/acme/api/')

    async def test_escaped_link_keeps_the_rest_escaped(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A link written with escapes is replaced by its mapped value; other escaped strings
        stay escaped exactly as sent."""
        body = b'{"meta":{"w":"\\/api\\/v2\\/x"},"links":{"next":"\\/api\\/v2\\/signups"}}'
        canned_json(fake_nb, body)
        got = await (await acme.client.get("/n/acme/api/_test/canned")).read()
        assert got == b'{"meta":{"w":"\\/api\\/v2\\/x"},"links":{"next":"/n/acme/api/v2/signups"}}'

    @pytest.mark.parametrize(
        "body",
        [
            b'{"links":{"next":"/api/v2/x"}} trailing',
            b'{"links":{"next":"/api/v2/x"},}',
            b'{"links":{"next":"/api/v2/x"}',
            b'{"links":{"next":"/api/v2/x\x01"}}',
            b'{"links":{"next":"/api/v2/x"},"bad":"\xff"}',
            b'{"links":{"next":"/api/v2/x"},"bad":[1,}',
            b'["/api/v2/x", {"links": {"next": "/api/v2/x"}}]',
        ],
        ids=["trailing", "comma", "truncated", "control", "not-utf8", "bad-value", "array"],
    )
    async def test_what_is_not_a_json_object_passes_verbatim(
        self, acme: Gateway, fake_nb: FakeNationBuilder, body: bytes
    ) -> None:
        """A body labelled JSON that is not a well-formed JSON object reaches the client as
        sent, with the upstream status."""
        canned_json(fake_nb, body, status=201)
        resp = await acme.client.get("/n/acme/api/_test/canned")
        assert resp.status == 201
        assert await resp.read() == body

    async def test_a_post_answer_is_never_turned_into_an_error(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """After a POST upstream executed, an answer Python cannot re-encode (lone surrogate,
        1e400) still reaches the client as 201 with its bytes; upstream saw one POST."""
        body = (
            b'{"data":{"id":"9","attributes":{"name":"\\udc00","score":1e400},'
            b'"links":{"self":"/api/v2/signups/9"}}}'
        )
        canned_json(fake_nb, body, status=201)
        resp = await acme.client.post("/n/acme/api/_test/canned", json={"x": 1})
        assert resp.status == 201
        assert await resp.read() == body.replace(b'"/api/v2/', b'"/n/acme/api/v2/')
        assert [r.method for r in fake_nb.api_requests] == ["POST"]


# ---------------------------------------------------------------------- large rewrites


def big_page(size: int) -> bytes:
    """A v2 page of about `size` bytes: many resources, each with links to rewrite."""
    item = (
        b'{"id":"%d","type":"signups","attributes":{"note":"' + b"x" * 300 + b'"},'
        b'"links":{"self":"/api/v2/signups/%d"}}'
    )
    items = []
    total = 0
    n = 0
    while total < size:
        piece = item % (n, n)
        items.append(piece)
        total += len(piece) + 1
        n += 1
    return b'{"data":[' + b",".join(items) + b'],"links":{"next":"/api/v2/signups?p=2"}}'


class TestLargeRewrites:
    async def test_health_answers_while_a_12_mib_page_is_rewritten(
        self, acme: Gateway, fake_nb: FakeNationBuilder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """/healthz is answered while a 12 MiB rewrite is still in progress: the rewrite does
        not hold the event loop. (The rewrite is held open until /healthz has answered, or
        a few seconds pass.)"""
        body = big_page(12 * 1024 * 1024)
        canned_json(fake_nb, body)
        real: Callable[..., Any] = nbgateway.links.rewrite_body
        started, release = threading.Event(), threading.Event()
        state = {"in_progress": False, "health_during_rewrite": None}

        def held_rewrite(*args: Any, **kwargs: Any) -> Any:
            state["in_progress"] = True
            started.set()
            try:
                result = real(*args, **kwargs)
                release.wait(timeout=5)  # on the loop this would block /healthz: it times out
                return result
            finally:
                state["in_progress"] = False

        monkeypatch.setattr("nbgateway.proxy.rewrite_body", held_rewrite)
        page = asyncio.create_task(acme.client.get("/n/acme/api/_test/canned"))
        assert await asyncio.to_thread(started.wait, 30)
        health = await acme.client.get("/healthz")
        state["health_during_rewrite"] = state["in_progress"]
        release.set()
        assert health.status == 200
        resp = await page
        got = await resp.read()
        assert state["health_during_rewrite"] is True
        assert resp.status == 200
        assert got == body.replace(b'"/api/v2/', b'"/n/acme/api/v2/')

    async def test_concurrent_large_rewrites_arrive_complete(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Three 4 MiB pages rewritten at once (in worker threads) each arrive complete and
        correctly rewritten, while /healthz requests sent meanwhile are answered."""
        body = big_page(4 * 1024 * 1024)
        canned_json(fake_nb, body)
        pages = [asyncio.create_task(acme.client.get("/n/acme/api/_test/canned")) for _ in range(3)]
        answered = 0
        while not all(p.done() for p in pages):
            assert (await acme.client.get("/healthz")).status == 200
            answered += 1
        expected = body.replace(b'"/api/v2/', b'"/n/acme/api/v2/')
        for page in pages:
            assert await (await page).read() == expected
        assert answered >= 1


# ---------------------------------------------------------------------- invalid answers


class TestInvalidAnswers:
    async def test_oversized_upstream_header_is_reported_as_such(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A 64 KiB upstream header is a 502 that says NationBuilder answered with an
        invalid response, not that it could not be reached."""
        fake_nb.set_canned(headers=[("X-Huge", "a" * 65536)], body=b"{}")
        resp = await acme.client.get("/api/_test/canned")
        assert resp.status == 502
        assert resp.headers["X-NBGW-Error"] == "upstream_invalid_response"
        [error] = (await resp.json())["errors"]
        assert error["code"] == "upstream_invalid_response"
        assert "invalid" in error["title"].lower()
        assert "could not be reached" not in error["detail"]
        assert "header" in error["detail"].lower()
        assert "a" * 100 not in error["detail"]
        assert len(fake_nb.api_requests) == 1

    @pytest.mark.parametrize(
        ("answer", "code"),
        [
            (b"HTTP/1.1 200 OK\r\nThis is not a header\r\n\r\n", "upstream_invalid_response"),
            (b"SMTP ready\r\n\r\n", "upstream_invalid_response"),
            (b"", "upstream_unreachable"),
        ],
        ids=["bad-header-line", "not-http", "closed-without-answer"],
    )
    async def test_raw_upstream_answers(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        answer: bytes,
        code: str,
    ) -> None:
        """An upstream that answers with a head that is not HTTP is upstream_invalid_response;
        one that closes the connection without answering is still upstream_unreachable."""
        received = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            received.set()
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            gw = await gateway_factory(nation_url=f"http://127.0.0.1:{port}/{{slug}}")
            await connect_account(gw, "acme")
            resp = await gw.client.get("/api/v2/signups")
            assert resp.status == 502
            assert resp.headers["X-NBGW-Error"] == code
            assert received.is_set()
        finally:
            server.close()
            await server.wait_closed()


class TestHeaderBytes:
    async def test_latin1_header_bytes_keep_their_characters_both_ways(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """Header bytes that are not UTF-8 (raw Latin-1, as older servers and tools send a
        filename) are not silently cut out of the value: they go on as the same Latin-1
        characters, written in UTF-8, to NationBuilder and back to the tool."""
        seen: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\n"
                b'Content-Disposition: attachment; filename="r\xe9sum\xe9.csv"\r\n'
                b"X-Utf: caf\xc3\xa9\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            gw = await gateway_factory(nation_url=f"http://127.0.0.1:{port}/{{slug}}")
            await connect_account(gw, "acme")
            gw_port = gw.client.server.port
            assert gw_port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", gw_port)
            writer.write(
                b"GET /api/v2/exports/1 HTTP/1.1\r\nHost: gw\r\nX-Tool: caf\xe9\r\n"
                b"X-Utf: caf\xc3\xa9\r\nX-Mixed: \xc3\xa9 caf\xe9\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        [upstream_head] = seen
        assert b"\r\nX-Tool: caf\xc3\xa9\r\n" in upstream_head
        assert b"\r\nX-Utf: caf\xc3\xa9\r\n" in upstream_head
        assert b"\r\nX-Mixed: \xc3\xa9 caf\xc3\xa9\r\n" in upstream_head  # UTF-8 kept as it was
        assert answer.startswith(b"HTTP/1.1 200")
        assert b'filename="r\xc3\xa9sum\xc3\xa9.csv"' in answer
        assert b"\r\nX-Utf: caf\xc3\xa9\r\n" in answer


# ---------------------------------------------------------------------- the address links use


class TestLinkOrigin:
    @pytest.mark.parametrize(
        ("headers", "origin"),
        [
            ({"Host": HOST}, f"http://{HOST}"),
            (
                {"Host": "nbgw.example.org", "X-Forwarded-Proto": "https"},
                "https://nbgw.example.org",
            ),
            ({"Host": "[::1]:8080"}, "http://[::1]:8080"),
            ({"Host": "evil.example/x?"}, PUBLIC_URL),
            ({"Host": HOST, "X-Forwarded-Proto": "javascript"}, f"http://{HOST}"),
        ],
        ids=["internal", "behind-tls-proxy", "ipv6", "malformed-host", "odd-proto"],
    )
    @pytest.mark.parametrize("route", ["/n/acme/api", "/api"])
    async def test_absolute_links_use_the_address_the_tool_used(
        self,
        acme: Gateway,
        fake_nb: FakeNationBuilder,
        headers: dict[str, str],
        origin: str,
        route: str,
    ) -> None:
        """Absolute nation links become links on the scheme and Host of the request and the
        route form it used (/n/{slug}/api/ or /api/); a malformed Host falls back to
        NBGW_PUBLIC_URL."""
        doc = await (await acme.client.get(f"{route}/_test/absolute-links", headers=headers)).json(
            content_type=None
        )
        expected = f"{origin}{route}/v2/signups?"
        assert doc["links"]["next"] == f"{expected}page[number]=2&page[size]=1"
        related = doc["data"][0]["relationships"]["petition_signatures"]["links"]["related"]
        assert related.startswith(f"{origin}{route}/v2/petition_signatures?")
        assert fake_nb.base_url not in json.dumps(doc)

    async def test_internal_caller_is_not_sent_to_the_public_url(
        self, acme: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A tool calling the internal address follows links.next on that address, through
        the gateway, and gets page 2."""
        fake_nb.absolute_links = True
        first = await (await acme.client.get("/n/acme/api/v2/signups?page[size]=5")).json(
            content_type=None
        )
        next_link = URL(first["links"]["next"], encoded=True)
        assert not first["links"]["next"].startswith(PUBLIC_URL)
        assert (next_link.host, next_link.port) == (
            acme.client.server.host,
            acme.client.server.port,
        )
        second = await (await acme.client.get(next_link.relative())).json(content_type=None)
        assert [r["id"] for r in second["data"]] == ["6", "7", "8", "9", "10"]


class TestCodingsWhoseLinksCannotBeMapped:
    @pytest.mark.parametrize("coding", ["br", "zstd", "compress"])
    async def test_a_json_page_in_a_coding_not_asked_for_is_refused(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        coding: str,
    ) -> None:
        """The gateway asks NationBuilder only for codings it reads (a tool's br or zstd
        is dropped from Accept-Encoding). A JSON page in another coding all the same
        cannot have its links mapped: passed on, the root-relative `next` of
        /n/alpha/api would lead the tool to the default account, another nation. It is
        refused as an invalid answer instead."""
        gw = await gateway_factory(default_account="beta")
        await connect_account(gw, "alpha")
        await connect_account(gw, "beta")
        page = b'{"data":[],"links":{"next":"/api/v2/signups?page%5Bsize%5D=1"}}'
        fake_nb.set_canned(headers=[("Content-Type", V2), ("Content-Encoding", coding)], body=page)
        accept = {"Accept-Encoding": f"gzip, deflate, {coding}"}
        resp = await gw.client.get(
            "/n/alpha/api/_test/canned", headers=accept, auto_decompress=False
        )
        assert fake_nb.api_requests[-1].headers["Accept-Encoding"] == "gzip, deflate"
        assert resp.status == 502
        assert (await resp.json())["errors"][0]["code"] == "upstream_invalid_response"

    async def test_x_gzip_is_read_as_gzip(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """x-gzip is gzip (RFC 9110): its links are mapped under the nation's prefix."""
        import gzip

        gw = await gateway_factory()
        await connect_account(gw, "alpha")
        page = gzip.compress(b'{"data":[],"links":{"next":"/api/v2/signups?page=2"}}')
        fake_nb.set_canned(
            headers=[("Content-Type", V2), ("Content-Encoding", "x-gzip")], body=page
        )
        resp = await gw.client.get("/n/alpha/api/_test/canned")
        assert resp.status == 200
        assert (await resp.json())["links"]["next"].endswith("/n/alpha/api/v2/signups?page=2")

    @pytest.mark.parametrize("status", [204, 404, 429, 500])
    async def test_an_answer_without_a_page_keeps_its_status_in_any_coding(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        status: int,
    ) -> None:
        """Only a page (a 2xx with a body) is refused for a coding the gateway cannot read:
        a 204 has no links, and an error's status (a 429's Retry-After, a 404) is what the
        tool needs to hear; they pass as sent."""
        gw = await gateway_factory(rate_queue_timeout=0.0)
        await connect_account(gw, "acme")
        body = b"" if status == 204 else b"\x0b\x02\x80{}\x03"  # br of "{}"
        fake_nb.set_canned(
            status=status,
            headers=[("Content-Type", V2), ("Content-Encoding", "br"), ("Retry-After", "5")],
            body=body,
        )
        resp = await gw.client.get("/api/_test/canned", auto_decompress=False)
        assert resp.status == status
