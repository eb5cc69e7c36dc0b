"""The /connect admin pages over HTTP: login, sessions, CSRF, accounts, connect, actions."""

from __future__ import annotations

import asyncio
import gzip
import html
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, PUBLIC_URL, ConnectAccount, Gateway, GatewayFactory
from prometheus_client import CollectorRegistry
from yarl import URL

from nbgateway import keys
from nbgateway.accounts import check_slug
from nbgateway.activity import RequestActivity
from nbgateway.admin.core import FLASH_COOKIE, SESSION_COOKIE
from nbgateway.admin.session import LOGIN_WINDOW, Signer
from nbgateway.admin.views import (
    form_action_sources,
    normalize_nation,
    parse_nations,
    rate_words,
    reauthorized_at,
    span,
)
from nbgateway.clock import FakeClock
from nbgateway.errors import CorruptRecordError, RefreshBackoff, StoreUnavailable
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.metrics import Metrics
from nbgateway.models import AccountInfo, AccountStatus, Event, EventKind, TokenSet, is_valid_slug
from nbgateway.redact import Secret

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """One browser: its own cookies (sent and updated by hand), redirects not followed."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.http = session
        self.cookies: dict[str, str] = {}
        self.last_set_cookie: list[str] = []

    def _remember(self, resp: aiohttp.ClientResponse) -> None:
        self.last_set_cookie = resp.headers.getall("Set-Cookie", [])
        for header in self.last_set_cookie:
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                if morsel.value == "" or morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, str, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        async with self.http.request(
            method, path, headers=headers, allow_redirects=False, **kwargs
        ) as resp:
            text = await resp.text()
            self._remember(resp)
            return resp.status, text, resp.headers

    async def get(self, path: str) -> tuple[int, str, Any]:
        return await self.request("GET", path)

    async def post(self, path: str, data: dict[str, str]) -> tuple[int, str, Any]:
        return await self.request("POST", path, data=data)

    async def submit(self, path: str, **fields: str) -> tuple[int, str, Any]:
        """POST a form of the admin pages with this session's CSRF token."""
        return await self.post(path, {**fields, "csrf": await self.csrf()})

    async def login(self, token: str = ADMIN_TOKEN) -> tuple[int, str, Any]:
        return await self.post("/connect/login", {"token": token})

    async def csrf(self) -> str:
        status, text, _ = await self.get("/connect")
        assert status == 200, text
        match = CSRF_RE.search(text)
        assert match is not None
        return match.group(1)


BrowserFactory = Callable[..., Awaitable[Browser]]


@pytest.fixture
async def browsers(gateway: Gateway) -> AsyncIterator[BrowserFactory]:
    """Separate browsers (cookie stores) against the test gateway."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(gw: Gateway | None = None, *, logged_in: bool = True) -> Browser:
        target = gw or gateway
        session = aiohttp.ClientSession(
            base_url=str(target.client.make_url("/")), cookie_jar=aiohttp.DummyCookieJar()
        )
        sessions.append(session)
        browser = Browser(session)
        if logged_in:
            status, _, _ = await browser.login()
            assert status == 303
        return browser

    yield make
    for session in sessions:
        await session.close()


@pytest.fixture
async def admin(browsers: BrowserFactory) -> Browser:
    return await browsers()


async def consent(fake_nb: FakeNationBuilder, authorize_url: str, decision: str) -> str:
    """Press Authorize or Deny on the fake's consent page; return the callback path+query."""
    url = URL(authorize_url)
    form = {**dict(url.query), "decision": decision}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake_nb.base_url}{url.path}", data=form, allow_redirects=False) as resp,
    ):
        assert resp.status == 302, await resp.text()
        return URL(resp.headers["Location"]).path_qs


async def start(browser: Browser, nation: str) -> str:
    """Submit the connect form; return the authorize URL it redirects to."""
    status, text, headers = await browser.submit("/connect/accounts", nation=nation)
    assert status == 303, text
    return str(headers["Location"])


async def mark_needs_reauth(gw: Gateway, slug: str, reason: str) -> None:
    async with gw.store.refresh_lock(slug) as locked:
        await locked.mark_needs_reauth(reason)
    await gw.tokens.sync(force=True)


class TestHelpers:
    def test_span_words(self) -> None:
        """Durations read as words in the largest sensible unit, rounded to the nearest."""
        assert span(30) == "less than a minute"
        assert span(-300) == "5 minutes"
        assert span(3600) == "1 hour"
        assert span(3590) == "1 hour"
        assert span(86399) == "24 hours"
        assert span(23 * 3600 + 1700) == "23 hours"
        assert span(3 * 86400) == "3 days"

    def test_form_action_allows_the_nation_origins(self) -> None:
        """The real host template becomes a wildcard; a path template gives its origin."""
        real = form_action_sources("https://{slug}.nationbuilder.com")
        assert real == "'self' https://*.nationbuilder.com"
        fake = form_action_sources("http://127.0.0.1:8099/{slug}")
        assert fake == "'self' http://127.0.0.1:8099"

    def test_nation_input_is_normalized(self) -> None:
        """Case, the .nationbuilder.com suffix and a pasted URL are forgiven."""
        assert normalize_nation("  Acme ") == "acme"
        assert normalize_nation("https://acme.nationbuilder.com/") == "acme"
        assert normalize_nation("https://acme.nationbuilder.com/admin/people?x=1") == "acme"
        assert normalize_nation("acme.nationbuilder.com/admin") == "acme"
        assert normalize_nation("my-nation") == "my-nation"  # not a host: left as typed

    def test_the_slug_refusal_names_every_rule(self) -> None:
        """At most 63 characters, never starting with a hyphen, and the refusal says so
        (an 80-character slug got only the character rules)."""
        assert is_valid_slug("a") and is_valid_slug("my-nation") and is_valid_slug("x" * 63)
        for bad in ("x" * 64, "-x", "My", "a.b", ""):
            assert not is_valid_slug(bad), bad
        with pytest.raises(ValueError, match="at most 63 characters, starting with a letter"):
            check_slug("x" * 80)

    def test_session_cookie_depends_on_the_admin_token(self) -> None:
        """A cookie signed under one admin token is not valid under another."""
        one, two = Signer("a" * 32), Signer("b" * 32)
        session = one.session("sid", 2_000_000_000)
        cookie = one.session_cookie(session)
        assert one.read_session(cookie, 1_700_000_000) == session
        assert two.read_session(cookie, 1_700_000_000) is None


class TestLogin:
    async def test_unauthenticated_pages_redirect_to_login(self, browsers: BrowserFactory) -> None:
        """Without a session, admin pages answer 303 to the login form."""
        anon = await browsers(logged_in=False)
        for path in ("/connect", "/connect/", "/connect/accounts/acme/disconnect"):
            status, _, headers = await anon.get(path)
            assert status == 303
            assert headers["Location"] == "/connect/login"

    async def test_login_page_is_a_labelled_form(self, browsers: BrowserFactory) -> None:
        """The login page asks for the admin token with a labelled password field."""
        anon = await browsers(logged_in=False)
        status, text, _ = await anon.get("/connect/login")
        assert status == 200
        assert '<label for="token">Admin token</label>' in text
        assert 'type="password" id="token" name="token"' in text

    async def test_login_sets_a_restricted_session_cookie(self, browsers: BrowserFactory) -> None:
        """The right token sets an HttpOnly, SameSite=Lax, 12-hour cookie (not Secure on http)."""
        anon = await browsers(logged_in=False)
        status, _, headers = await anon.login()
        assert status == 303
        assert headers["Location"] == "/connect"
        (cookie,) = [c for c in anon.last_set_cookie if c.startswith(f"{SESSION_COOKIE}=")]
        attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
        assert "httponly" in attributes
        assert attributes["samesite"].strip() == "SameSite=Lax"
        assert attributes["max-age"].strip() == "Max-Age=43200"
        assert attributes["path"].strip() == "Path=/connect"
        assert "secure" not in attributes
        status, text, _ = await anon.get("/connect")
        assert status == 200
        assert "Connect a nation" in text

    async def test_cookie_is_secure_behind_https(
        self, gateway_factory: GatewayFactory, browsers: BrowserFactory
    ) -> None:
        """With an https public URL the session cookie carries Secure."""
        gw = await gateway_factory(public_url="https://gateway.example")
        anon = await browsers(gw, logged_in=False)
        status, _, _ = await anon.login()
        assert status == 303
        (cookie,) = [c for c in anon.last_set_cookie if c.startswith(f"{SESSION_COOKIE}=")]
        assert "Secure" in cookie

    async def test_wrong_token_is_refused(self, browsers: BrowserFactory) -> None:
        """A wrong token gets 401, the form again, and no session."""
        anon = await browsers(logged_in=False)
        status, text, _ = await anon.login("not-the-admin-token-at-all")
        assert status == 401
        assert "That is not the admin token" in text
        assert SESSION_COOKIE not in anon.cookies
        assert (await anon.get("/connect"))[0] == 303

    async def test_repeated_wrong_tokens_are_throttled(
        self, browsers: BrowserFactory, clock: FakeClock
    ) -> None:
        """After 5 wrong tokens in 5 minutes even the right one gets 429 until the window passes."""
        anon = await browsers(logged_in=False)
        for _ in range(5):
            assert (await anon.login("wrong-wrong-wrong-wrong"))[0] == 401
        status, text, headers = await anon.login()
        assert status == 429
        assert int(headers["Retry-After"]) == 300
        assert "Too many wrong admin tokens" in text
        clock.advance(120)
        status, _, headers = await anon.login()
        assert status == 429
        assert int(headers["Retry-After"]) == 180
        clock.advance(181)
        assert (await anon.login())[0] == 303

    async def test_empty_and_cross_site_logins_do_not_lock_the_admin_out(
        self, browsers: BrowserFactory, clock: FakeClock
    ) -> None:
        """Another site's page can make the admin's browser post the login form, and an
        empty form guesses nothing: neither is counted, so neither can lock the admin out.
        A post from the gateway's own page (or from no browser) still counts."""
        anon = await browsers(logged_in=False)
        for _ in range(6):
            status, text, _ = await anon.post("/connect/login", {"token": ""})
            assert status == 400 and "Enter the admin token" in text
            assert (await anon.post("/connect/login", {}))[0] == 400
        cross = [
            {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            {"Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
            # A sandboxed frame of any site, posting to a plain-http address that is not
            # loopback (no Sec-Fetch-Site there): an opaque origin, sent as null.
            {"Origin": "null"},
        ]
        for headers in cross * 2:
            status, text, _ = await anon.request(
                "POST", "/connect/login", data={"token": "wrong-wrong-wrong"}, headers=headers
            )
            assert status == 403, headers
            assert "another site" in text
        assert (await anon.login())[0] == 303  # not locked out

        # The pages' own form, as a browser sends it: with Sec-Fetch-Site (a page cached
        # under the former no-referrer policy sends Origin: null), or without it over
        # plain http, with the real Origin (Referrer-Policy: same-origin).
        for own in (
            {"Sec-Fetch-Site": "same-origin", "Origin": "null"},
            {"Sec-Fetch-Site": "same-origin", "Origin": PUBLIC_URL.rstrip("/")},
            {"Origin": PUBLIC_URL.rstrip("/")},
        ):
            other = await browsers(logged_in=False)
            for _ in range(5):
                status, _, _ = await other.request(
                    "POST", "/connect/login", data={"token": "wrong-wrong-wrong"}, headers=own
                )
                assert status == 401, own
            assert (await other.login())[0] == 429
            clock.advance(LOGIN_WINDOW + 1)  # the address's count is over

    async def test_a_form_over_the_body_limit_gets_the_413_page(
        self, gateway_factory: GatewayFactory
    ) -> None:
        """A login form larger than NBGW_MAX_REQUEST_BODY gets the gateway's 413 page (with
        X-NBGW-Error), not aiohttp's plain text."""
        gw = await gateway_factory(max_request_body=1000)
        resp = await gw.client.post("/connect/login", data={"token": "x" * 5000})
        assert resp.status == 413
        assert resp.headers["X-NBGW-Error"] == "request_too_large"
        assert resp.content_type == "text/html"
        assert "NBGW_MAX_REQUEST_BODY" in await resp.text()

    async def test_a_pasted_token_with_spaces_around_it_logs_in(
        self, browsers: BrowserFactory
    ) -> None:
        """The form forgives the spaces a paste brings along, as the API's Bearer does,
        and such a login is no wrong token."""
        anon = await browsers(logged_in=False)
        status, _, headers = await anon.post("/connect/login", {"token": f"  {ADMIN_TOKEN} \n"})
        assert status == 303, headers
        assert SESSION_COOKIE in anon.cookies

    async def test_a_login_from_the_public_address_is_not_cross_site(
        self, browsers: BrowserFactory
    ) -> None:
        """Behind a proxy the Origin is NBGW_PUBLIC_URL's, whatever Host reaches the
        gateway; the Host the browser used is the gateway's own too."""
        anon = await browsers(logged_in=False)
        origin = PUBLIC_URL.rstrip("/")
        status, _, _ = await anon.request(
            "POST", "/connect/login", data={"token": ADMIN_TOKEN}, headers={"Origin": origin}
        )
        assert status == 303
        for host in ("gw:8080", "10.0.0.5:8080", "[::1]:8080", "admin.localhost"):
            again = await browsers(logged_in=False)  # a name of the gateway's own
            status, _, _ = await again.request(
                "POST",
                "/connect/login",
                data={"token": ADMIN_TOKEN},
                headers={"Origin": f"http://{host}", "Host": host},
            )
            assert status == 303, host
        spelled = await browsers(logged_in=False)  # the default port spelled out
        status, _, _ = await spelled.request(
            "POST",
            "/connect/login",
            data={"token": ADMIN_TOKEN},
            headers={"Origin": f"{origin}:80"},
        )
        assert status == 303
        other_scheme = await browsers(logged_in=False)
        status, _, _ = await other_scheme.request(
            "POST",
            "/connect/login",
            data={"token": ADMIN_TOKEN},
            headers={"Origin": origin.replace("http://", "https://")},
        )
        assert status == 403

    async def test_a_rebound_domain_cannot_lock_the_admin_out(
        self, browsers: BrowserFactory
    ) -> None:
        """A page whose domain the attacker points at the gateway's address (DNS
        rebinding) posts the login form as its own origin: Sec-Fetch-Site says same-origin
        and Origin matches Host. A Host that is none of the gateway's names is refused
        before the token is counted, with a message naming the address to use."""
        anon = await browsers(logged_in=False)
        rebound = [
            {"Origin": "http://evil.example:8080", "Sec-Fetch-Site": "same-origin"},
            {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
            {"Origin": "http://evil.example:8080"},
        ]
        for headers in rebound * 2:
            status, text, _ = await anon.request(
                "POST",
                "/connect/login",
                data={"token": "wrong-wrong-wrong"},
                headers={**headers, "Host": "evil.example:8080"},
            )
            assert status == 403, headers
            assert "not an address of the gateway" in text
            assert f"{PUBLIC_URL}/connect/login" in text
        assert (await anon.login())[0] == 303  # not locked out

    async def test_logout_ends_the_session(self, admin: Browser) -> None:
        """Logging out deletes the cookie, and the old cookie no longer opens the pages."""
        old = dict(admin.cookies)
        status, _, headers = await admin.submit("/connect/logout")
        assert status == 303
        assert headers["Location"] == "/connect/login"
        assert SESSION_COOKIE not in admin.cookies
        status, text, _ = await admin.get("/connect/login")
        assert status == 200
        assert "You are logged out." in text
        admin.cookies = old
        assert (await admin.get("/connect"))[0] == 303

    async def test_session_expires_after_12_hours(self, admin: Browser, clock: FakeClock) -> None:
        """A session is good for 12 hours by the gateway's clock, then sends you to log in."""
        clock.advance(12 * 3600 - 10)
        assert (await admin.get("/connect"))[0] == 200
        clock.advance(11)
        status, _, headers = await admin.get("/connect")
        assert status == 303
        assert headers["Location"] == "/connect/login"

    async def test_tampered_cookie_is_refused(self, admin: Browser) -> None:
        """Changing the expiry inside the cookie breaks its signature."""
        sid, expiry, signature = admin.cookies[SESSION_COOKIE].split(".")
        admin.cookies[SESSION_COOKIE] = f"{sid}.{int(expiry) + 86400}.{signature}"
        assert (await admin.get("/connect"))[0] == 303


class TestCsrf:
    @pytest.mark.parametrize("token", [None, "wrong"], ids=["missing", "wrong"])
    @pytest.mark.parametrize(
        "path,data",
        [
            ("/connect/accounts", {"nation": "beta"}),
            ("/connect/accounts/acme/refresh", {}),
            ("/connect/accounts/acme/disconnect", {}),
            ("/connect/logout", {}),
        ],
        ids=["connect", "refresh", "disconnect", "logout"],
    )
    async def test_forms_without_the_csrf_token_are_refused(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        path: str,
        data: dict[str, str],
        token: str | None,
    ) -> None:
        """Every POST form needs this session's CSRF token; otherwise 403 and nothing changes."""
        await connect_account(gateway, "acme")
        form = dict(data)
        if token is not None:
            form["csrf"] = token
        status, text, _ = await admin.post(path, form)
        assert status == 403
        assert "This form was refused" in text
        assert [a.slug for a in await gateway.accounts.list_accounts()] == ["acme"]
        assert fake_nb.token_requests == []
        assert (await admin.get("/connect"))[0] == 200  # still logged in

    async def test_csrf_token_of_another_session_is_refused(
        self, browsers: BrowserFactory, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """A CSRF token is tied to its session."""
        await connect_account(gateway, "acme")
        one, two = await browsers(), await browsers()
        status, _, _ = await two.post(
            "/connect/accounts/acme/disconnect", {"csrf": await one.csrf()}
        )
        assert status == 403
        assert len(await gateway.accounts.list_accounts()) == 1

    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            (b"--xx\r\nbroken", "multipart/form-data; boundary=xx"),
            (
                b"--xx\r\nContent-Disposition: form-data; name=a\r\n\r\nv",
                "multipart/form-data; boundary=xx",
            ),
            (b"\xff\xfe=1", "application/x-www-form-urlencoded; charset=utf-8"),
            (b"token=x", "application/x-www-form-urlencoded; charset=bogus-charset"),
            (
                b"--xx\r\nContent-Disposition: form-data; name=a\r\n"
                b"Content-Transfer-Encoding: bogus\r\n\r\nv\r\n--xx--\r\n",
                "multipart/form-data; boundary=xx",
            ),
            (
                b"--xx\r\nContent-Disposition: form-data; name=a\r\n"
                b"Content-Type: text/plain; charset=bogus\r\n\r\nv\r\n--xx--\r\n",
                "multipart/form-data; boundary=xx",
            ),
        ],
        ids=[
            "bad-part-header",
            "truncated",
            "not-utf-8",
            "unknown-charset",
            "unknown-transfer-encoding",
            "unknown-part-charset",
        ],
    )
    @pytest.mark.parametrize("path", ["/connect/login", "/connect/accounts"])
    async def test_a_body_that_is_no_form_is_a_400_page_without_a_traceback(
        self,
        admin: Browser,
        gateway: Gateway,
        caplog: pytest.LogCaptureFixture,
        path: str,
        body: bytes,
        content_type: str,
    ) -> None:
        """A malformed form body (logged in or not) gets the HTML error page with 400 and
        nothing is logged above a warning; the session and the login throttle are as before."""
        with caplog.at_level(logging.INFO):
            status, text, headers = await admin.request(
                "POST", path, data=body, headers={"Content-Type": content_type}
            )
        assert status == 400
        assert headers["Content-Type"].startswith("text/html")
        assert "the form could not be read" in text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert await gateway.accounts.list_accounts() == []
        assert (await admin.get("/connect"))[0] == 200  # still logged in

    @pytest.mark.parametrize(
        "body", [b"not gzip at all", gzip.compress(b"token=x")], ids=["undecodable", "gzip"]
    )
    @pytest.mark.parametrize("path", ["/connect/login", "/connect/accounts"])
    async def test_a_compressed_form_is_a_400_page_without_an_error_logged(
        self,
        admin: Browser,
        gateway: Gateway,
        caplog: pytest.LogCaptureFixture,
        path: str,
        body: bytes,
    ) -> None:
        """A form body with Content-Encoding (browsers send none) is refused with the 400
        page, unread; an undecodable one no longer logs aiohttp's "Unhandled exception"
        when the connection is drained after the answer."""
        with caplog.at_level(logging.INFO):
            status, text, _ = await admin.request(
                "POST",
                path,
                data=body,
                headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Content-Encoding": "gzip",
                },
            )
            await asyncio.sleep(0.2)  # the drain after the answer, where the error was logged
        assert status == 400
        assert "uncompressed" in text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert (await admin.get("/connect"))[0] == 200  # still logged in


class TestAccountsPage:
    async def test_shows_status_expiry_refresh_and_events(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        clock: FakeClock,
    ) -> None:
        """The table shows status in words, expiry (relative, exact on hover) and last refresh;
        the nation's own page adds its events."""
        await connect_account(gateway, "acme")
        clock.advance(3600)
        status, text, _ = await admin.get("/connect")
        assert status == 200
        assert '<a href="/connect/nations/acme">acme</a>' in text
        assert 'class="badge badge-ok">active<' in text
        assert ">in 23 hours</time>" in text
        assert '<time datetime="2023-11-15T22:13:20Z" title="2023-11-15 22:13:20 UTC">' in text
        assert ">1 hour ago</time>" in text  # last refresh
        assert "<td>connected</td>" not in text  # events are on the nation's page
        status, text, _ = await admin.get("/connect/nations/acme")
        assert status == 200
        assert "<td>connected</td>" in text
        assert ">in 23 hours</time>" in text

    async def test_refreshing_soon_and_expired(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        clock: FakeClock,
    ) -> None:
        """Near the refresh margin it says "refreshing soon"; past expiry, how long ago."""
        await connect_account(gateway, "acme")
        clock.advance(86400 - 300 - 200)
        await admin.login()  # the first session has expired meanwhile
        _, text, _ = await admin.get("/connect")
        assert ">refreshing soon<" in text
        clock.advance(500 + 300)
        _, text, _ = await admin.get("/connect")
        assert ">expired 5 minutes ago</time>" in text

    async def test_needs_reauth_shows_banner_and_button(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """An account needing a human gets a banner and a prominent re-authorize button."""
        await connect_account(gateway, "acme")
        await mark_needs_reauth(
            gateway, "acme", "the token endpoint answered HTTP 400 (invalid_grant)"
        )
        _, text, _ = await admin.get("/connect")
        assert "1 nation needs re-authorization" in text
        assert 'class="badge badge-reauth">needs re-authorization<' in text
        assert "NationBuilder no longer accepts the stored refresh token." in text
        assert 'title="the token endpoint answered HTTP 400 (invalid_grant)"' in text  # exact
        assert text.count(">Re-authorize acme</button>") == 1  # the banner
        assert '<input type="hidden" name="nation" value="acme">' in text
        _, text, _ = await admin.get("/connect/nations/acme")
        assert text.count(">Re-authorize acme</button>") == 2  # banner and the nation's card

    async def test_banner_is_on_every_admin_page(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """The needs-reauth banner also shows on the confirmation page."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        await mark_needs_reauth(gateway, "beta", "no refresh token is stored")
        _, text, _ = await admin.get("/connect/accounts/acme/disconnect")
        assert "1 nation needs re-authorization" in text
        assert ">Re-authorize beta</button>" in text

    async def test_hostile_text_is_escaped(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount, clock: FakeClock
    ) -> None:
        """A slug or error text holding markup is shown as text, never as markup."""
        await connect_account(gateway, "acme")
        async with gateway.store.refresh_lock("acme") as locked:
            await locked.record_failure("<script>alert(1)</script>")
        hostile = '<img src=x onerror="alert(2)">'
        tokens = TokenSet(Secret("x" * 20), Secret("y" * 20), clock.now() + 3600, "")
        await gateway.store.save_tokens(hostile, tokens, EventKind.CONNECTED)
        _, text, _ = await admin.get("/connect")
        assert "<script>alert(1)</script>" not in text
        assert "<img src=x" not in text
        assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in text
        quoted = "%3Cimg%20src%3Dx%20onerror%3D%22alert%282%29%22%3E"
        assert f'href="/connect/nations/{quoted}"' in text
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "<script>alert(1)</script>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        status, text, _ = await admin.get(f"/connect/nations/{quoted}")
        assert status == 200
        assert "<img src=x" not in text
        assert f"/connect/accounts/{quoted}/refresh" in text

    async def test_no_token_material_on_any_page(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """No page shows a token, not even a prefix of one."""
        issued = await connect_account(gateway, "acme")
        csrf = await admin.csrf()
        pages = [
            await admin.get("/connect"),
            await admin.post("/connect/accounts/acme/refresh", {"csrf": csrf}),
            await admin.get("/connect"),
            await admin.get("/connect/nations/acme"),
            await admin.get("/connect/clients"),
            await admin.get("/connect/accounts/acme/disconnect"),
            await admin.get("/connect/login"),
        ]
        fake_nb.revoke("acme")
        pages.append(await admin.post("/connect/accounts/acme/refresh", {"csrf": csrf}))
        pages.append(await admin.get("/connect"))
        for _, text, _ in pages:
            assert "nbfake-" not in text
            assert issued["access_token"][:16] not in text

    async def test_security_headers_on_every_page(
        self, browsers: BrowserFactory, admin: Browser, fake_nb: FakeNationBuilder
    ) -> None:
        """Every /connect response carries a no-inline-script CSP and the other headers."""
        anon = await browsers(logged_in=False)
        responses = [
            await admin.get("/connect"),
            await admin.get("/connect/nations/acme"),  # 303 back: not connected
            await admin.get("/connect/clients"),
            await admin.get("/connect/static/admin.css"),
            await admin.post("/connect/accounts", {"nation": "x"}),  # 403 page
            await anon.get("/connect/login"),
            await anon.get("/connect"),  # redirect
            await anon.get("/connect/callback?state=forged"),
        ]
        origin = fake_nb.base_url
        for _, text, headers in responses:
            csp = headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp
            assert "style-src 'self'" in csp
            assert "script-src" not in csp
            assert f"form-action 'self' {origin};" in csp
            assert "frame-ancestors 'none'" in csp
            assert "base-uri 'none'" in csp
            assert headers["X-Frame-Options"] == "DENY"
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "same-origin"
            assert headers["Cache-Control"] == "no-store"
            assert "<script" not in text
            assert "style=" not in text

    async def test_stylesheet_is_served(self, browsers: BrowserFactory) -> None:
        """The stylesheet is package data served at /connect/static/admin.css."""
        anon = await browsers(logged_in=False)
        status, text, headers = await anon.get("/connect/static/admin.css")
        assert status == 200
        assert headers["Content-Type"].startswith("text/css")
        assert ".banner" in text


class TestConnect:
    async def test_connect_form_redirects_to_authorize(
        self, admin: Browser, fake_nb: FakeNationBuilder
    ) -> None:
        """The connect form starts the flow and sends the browser to the nation's consent page."""
        location = await start(admin, "acme")
        assert location.startswith(f"{fake_nb.nation_url('acme')}/oauth/authorize?")
        assert "code_challenge_method=S256" in location

    async def test_bad_slug_rerenders_the_form_with_a_message(self, admin: Browser) -> None:
        """An invalid slug gets 400 and the form again, explaining what a slug is."""
        status, text, _ = await admin.submit("/connect/accounts", nation='no such "nation"!')
        assert status == 400
        assert "A nation slug is the part before .nationbuilder.com" in text
        assert 'value="no such &#34;nation&#34;!"' in text
        assert '<label for="nation">Nation slug</label>' in text
        assert "the part before .nationbuilder.com" in text

    async def test_pasted_hostname_is_accepted(
        self, admin: Browser, fake_nb: FakeNationBuilder
    ) -> None:
        """Typing the nation's hostname connects the slug."""
        location = await start(admin, "Acme.nationbuilder.com")
        assert location.startswith(f"{fake_nb.nation_url('acme')}/oauth/authorize?")

    async def test_the_flow_uses_the_callback_registered_at_nationbuilder(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """NationBuilder insists on the app's registered callback: the flow sends exactly
        {NBGW_PUBLIC_URL}/connect/callback, which a fake holding that one registration
        accepts; with another registered, the fake's error page names the redirect URI
        (troubleshooting.md says what to fix)."""
        fake_nb.registered_redirect_uri = gateway.settings.redirect_uri
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        assert (await admin.get(callback))[0] == 303
        assert [a.slug for a in await gateway.accounts.list_accounts()] == ["acme"]

        fake_nb.registered_redirect_uri = "https://gateway.example.org/connect/callback"
        url = URL(await start(admin, "bravo"))
        async with aiohttp.ClientSession() as http, http.get(str(url)) as resp:
            assert resp.status == 400
            assert "The redirect uri included is not valid." in await resp.text()

    async def test_approved_flow_lands_on_accounts_with_a_message(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """After consent the callback stores tokens and the nation's page says so."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        status, _, headers = await admin.get(callback)
        assert status == 303
        assert headers["Location"] == "/connect/nations/acme"
        assert FLASH_COOKIE in admin.cookies
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "Connected acme." in text
        assert 'class="badge badge-ok">active<' in text
        assert FLASH_COOKIE not in admin.cookies  # shown once
        _, text, _ = await admin.get("/connect")
        assert "Connected acme." not in text
        assert [a.slug for a in await gateway.accounts.list_accounts()] == ["acme"]

    async def test_denied_consent_explains_and_offers_a_retry(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """Pressing Deny lands on a 400 page that says so and offers to try again."""
        callback = await consent(fake_nb, await start(admin, "beta"), "deny")
        status, text, _ = await admin.get(callback)
        assert status == 400
        assert "Authorization was declined" in text
        assert "<title>Authorization was declined · nbgateway</title>" in text  # not generic
        assert "Try again: connect beta" in text
        assert '<input type="hidden" name="nation" value="beta">' in text
        assert await gateway.accounts.list_accounts() == []

    async def test_replayed_callback_is_refused(
        self, admin: Browser, fake_nb: FakeNationBuilder
    ) -> None:
        """A callback URL works once; replaying it explains that the link was used."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        assert (await admin.get(callback))[0] == 303
        status, text, _ = await admin.get(callback)
        assert status == 400
        assert "This authorization link cannot be used" in text
        assert "already used" in text
        assert ">Back to the nations to try again</a>" in text

    async def test_forged_state_is_refused(self, admin: Browser) -> None:
        """A state the gateway never issued is refused with an explanation."""
        status, text, _ = await admin.get("/connect/callback?state=forged&code=whatever")
        assert status == 400
        assert "This authorization link cannot be used" in text
        assert "unknown" in text

    async def test_expired_state_is_refused(
        self, admin: Browser, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """Coming back after the 10-minute limit explains that the link expired."""
        authorize = await start(admin, "acme")
        clock.advance(601)
        status, text, _ = await admin.get(await consent(fake_nb, authorize, "approve"))
        assert status == 400
        assert "this authorization link has expired" in text

    @pytest.mark.parametrize(
        ("failure", "advice", "not_said"),
        [
            ("server_error", "This is often temporary", "app credentials"),
            ("invalid_grant", "refused the authorization code", "often temporary"),
            ("invalid_client", "NBGW_CLIENT_SECRET", "often temporary"),
        ],
    )
    async def test_failed_code_exchange_is_explained(
        self,
        admin: Browser,
        gateway: Gateway,
        fake_nb: FakeNationBuilder,
        failure: str,
        advice: str,
        not_said: str,
    ) -> None:
        """A token endpoint failure during the exchange lands on a page saying so, with
        advice that fits it: a refused code or refused app credentials are not called
        temporary."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        fake_nb.fail_token(failure)
        status, text, _ = await admin.get(callback)
        assert status == 400
        assert "NationBuilder did not hand over the tokens" in text
        assert advice in text
        assert not_said not in text
        assert "Try again: connect acme" in text
        assert await gateway.accounts.list_accounts() == []

    async def test_a_head_request_does_not_use_up_the_callback(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """HEAD on the callback (a link checker, a prefetch) is 405 and neither exchanges
        the code nor spends the state: the GET that follows connects the nation."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        status, _, headers = await admin.request("HEAD", callback)
        assert status == 405
        assert "GET" in headers["Allow"]
        assert fake_nb.token_requests == []
        status, _, headers = await admin.get(callback)
        assert status == 303
        assert [a.slug for a in await gateway.accounts.list_accounts()] == ["acme"]

    @pytest.mark.parametrize(
        ("error", "description"),
        [
            ("invalid_scope", "The requested scope is invalid, unknown, or malformed."),
            ("server_error", None),
        ],
    )
    async def test_an_oauth_error_is_named_and_logged(
        self,
        admin: Browser,
        gateway: Gateway,
        fake_nb: FakeNationBuilder,
        caplog: pytest.LogCaptureFixture,
        error: str,
        description: str | None,
    ) -> None:
        """NationBuilder answering with an OAuth error other than access_denied: the page
        names the error (and its description) without claiming access was granted, and the
        log has a warning with the account and the reason, never the state."""
        callback = URL(await consent(fake_nb, await start(admin, "acme"), "approve"))
        state = callback.query["state"]
        query = {"state": state, "error": error}
        if description:
            query["error_description"] = description
        with caplog.at_level(logging.WARNING, logger="nbgateway"):
            status, text, _ = await admin.get(str(callback.with_query(query)))
        assert status == 400
        page = html.unescape(text)
        assert "NationBuilder refused the authorization" in page
        assert f"NationBuilder answered with the error '{error}'" in page
        if description:
            assert f"({description})" in page
        assert "was granted" not in text
        assert await gateway.accounts.list_accounts() == []
        [record] = [r for r in caplog.records if r.getMessage() == "authorization callback refused"]
        assert (record.account, record.reason) == ("acme", "refused")  # type: ignore[attr-defined]
        assert error in record.error  # type: ignore[attr-defined]
        assert state not in repr(record.__dict__)

    async def test_a_callback_with_neither_code_nor_error_is_incomplete(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A valid state but no code and no error: said as such, not "granted"."""
        callback = URL(await consent(fake_nb, await start(admin, "acme"), "approve"))
        status, text, _ = await admin.get(
            str(callback.with_query({"state": callback.query["state"]}))
        )
        assert status == 400
        page = html.unescape(text)
        assert "NationBuilder's answer is incomplete" in page
        assert "neither a code nor an error" in page
        assert "was granted" not in text
        assert await gateway.accounts.list_accounts() == []

    async def test_state_is_bound_to_the_session_that_started_it(
        self, browsers: BrowserFactory, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A flow started in session A cannot be completed with session B's cookie."""
        a, b = await browsers(), await browsers()
        callback = await consent(fake_nb, await start(a, "acme"), "approve")
        status, text, _ = await b.get(callback)
        assert status == 400
        assert "started in another session" in text
        assert await gateway.accounts.list_accounts() == []
        anon = await browsers(logged_in=False)
        callback = await consent(fake_nb, await start(a, "acme"), "approve")
        assert (await anon.get(callback))[0] == 400

    async def test_api_started_flow_completes_without_a_session(
        self,
        browsers: BrowserFactory,
        gateway: Gateway,
        fake_nb: FakeNationBuilder,
        admin_headers: dict[str, str],
    ) -> None:
        """A flow started through /connect/api is unbound and ends on a plain success page."""
        resp = await gateway.client.post(
            "/connect/api/accounts", json={"nation": "acme"}, headers=admin_headers
        )
        authorize = (await resp.json())["authorize_url"]
        anon = await browsers(logged_in=False)
        status, text, _ = await anon.get(await consent(fake_nb, authorize, "approve"))
        assert status == 200
        assert "Connected acme" in text


class TestActions:
    async def test_refresh_now_reports_the_new_expiry(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Refresh now refreshes once and the page names the new expiry."""
        await connect_account(gateway, "acme")
        clock.advance(7200)
        status, _, headers = await admin.submit("/connect/accounts/acme/refresh")
        assert status == 303
        assert headers["Location"] == "/connect/nations/acme"
        assert len(fake_nb.token_requests) == 1
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "Refreshed acme. Its new access token expires in 24 hours" in text
        assert "<td>token refreshed</td>" in text

    async def test_refresh_of_a_revoked_account_says_reauthorize(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """When NationBuilder rejects the refresh token, the page says to re-authorize."""
        await connect_account(gateway, "acme")
        fake_nb.revoke("acme")
        await admin.submit("/connect/accounts/acme/refresh")
        _, text, _ = await admin.get("/connect")
        assert "acme needs re-authorization" in text
        assert "1 nation needs re-authorization" in text

    async def test_transient_refresh_failure_says_when_it_retries(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A server error during refresh is reported with the retry delay."""
        await connect_account(gateway, "acme")
        fake_nb.fail_token("server_error")
        await admin.submit("/connect/accounts/acme/refresh")
        _, text, _ = await admin.get("/connect")
        assert re.search(r"Refreshing acme failed; the gateway retries in \d+ s\.", text)
        assert "NationBuilder answered with a server error." in text

    async def test_refresh_of_an_unknown_account(self, admin: Browser) -> None:
        """Refreshing a nation that is not connected says so."""
        await admin.submit("/connect/accounts/ghost/refresh")
        _, text, _ = await admin.get("/connect")
        assert "There is no account named ghost." in text

    @pytest.mark.parametrize(
        "path",
        [
            "/connect/nations/{text}",
            "/connect/accounts/{text}/disconnect",
            "/connect/clients/{text}/remove",
        ],
    )
    async def test_an_address_cannot_put_its_words_into_the_message(
        self, admin: Browser, path: str
    ) -> None:
        """A link whose "slug" or client name is a sentence (phishing text in the trusted
        page) gets a message that does not repeat it."""
        text = "demo.%20SECURITY%20NOTICE%3A%20paste%20your%20token%20at%20evil.example"
        status, _, headers = await admin.get(path.format(text=text))
        assert status == 303
        _, page, _ = await admin.get(headers["Location"])
        assert "SECURITY NOTICE" not in page
        assert "evil.example" not in page
        assert "There is no" in page and "at that address." in page

    async def test_disconnect_asks_then_deletes(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """Disconnect shows a confirmation first; confirming deletes the tokens."""
        await connect_account(gateway, "acme")
        status, text, _ = await admin.get("/connect/accounts/acme/disconnect")
        assert status == 200
        assert "Disconnect acme?" in text
        assert "This deletes its tokens." in text
        assert len(await gateway.accounts.list_accounts()) == 1  # asking changed nothing
        match = CSRF_RE.search(text)
        assert match is not None
        status, _, headers = await admin.post(
            "/connect/accounts/acme/disconnect", {"csrf": match.group(1)}
        )
        assert status == 303
        assert headers["Location"] == "/connect"
        _, text, _ = await admin.get("/connect")
        assert "Disconnected acme. Its tokens were deleted." in text
        assert 'id="nation-acme"' not in text
        assert await gateway.accounts.list_accounts() == []

    async def test_confirmation_for_an_unknown_account(self, admin: Browser) -> None:
        """Asking to disconnect a nation that is not connected goes back with a message."""
        status, _, headers = await admin.get("/connect/accounts/ghost/disconnect")
        assert status == 303
        assert headers["Location"] == "/connect"
        _, text, _ = await admin.get("/connect")
        assert "There is no account named ghost." in text


ROW_RE = re.compile(r'<tr id="nation-([^"]+)" class="row-')
KEY_RE = re.compile(r"nbgw_[A-Za-z0-9_-]{43}")


def table_order(text: str) -> list[str]:
    """The slugs of the nations table, top to bottom."""
    return ROW_RE.findall(text)


class TestNationsTable:
    async def test_no_nation_says_so(self, admin: Browser) -> None:
        """Without nations the page says none is connected and shows no table or search."""
        _, text, _ = await admin.get("/connect")
        assert "No nation is connected yet." in text
        assert "<table" not in text
        assert 'name="q"' not in text

    async def test_needs_reauth_first_then_failing_then_the_rest(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount, clock: FakeClock
    ) -> None:
        """Status decides the order: needs re-authorization, failing refreshes, about to
        expire, active; alphabetical within each."""
        for slug in ("alpha", "bravo", "charlie", "delta", "echo"):
            await connect_account(gateway, slug)
        await mark_needs_reauth(gateway, "echo", "invalid_grant")
        async with gateway.store.refresh_lock("delta") as locked:
            await locked.record_failure("the token endpoint answered HTTP 502")
        _, text, _ = await admin.get("/connect")
        assert table_order(text) == ["echo", "delta", "alpha", "bravo", "charlie"]
        assert 'class="badge badge-fail">refresh failing<' in text
        assert "NationBuilder answered with a server error." in text
        assert "5 nations</h2>" in text

    async def test_search_filters_by_slug_without_javascript(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """The search is a GET form; ?q= keeps the nations whose slug contains the text."""
        for slug in ("north-east", "north-west", "south"):
            await connect_account(gateway, slug)
        _, text, _ = await admin.get("/connect")
        assert '<form method="get" action="/connect" class="search" role="search">' in text
        _, text, _ = await admin.get("/connect?q=NORTH")
        assert table_order(text) == ["north-east", "north-west"]
        assert "2 match “NORTH”" in text
        assert 'value="NORTH"' in text
        _, text, _ = await admin.get("/connect?q=zzz")
        assert table_order(text) == []
        assert "No nation matches “zzz”." in text
        _, text, _ = await admin.get("/connect?q=%3Cb%3E")
        assert "<b>" not in text

    async def test_requests_in_the_last_hour(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount, clock: FakeClock
    ) -> None:
        """The column counts proxied requests per nation over the last hour, then forgets."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        for _ in range(3):
            assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
        assert (await gateway.client.get("/n/beta/api/v2/signups/me")).status == 200
        assert gateway.app[keys.ACTIVITY].last_hour() == {"acme": 3, "beta": 1}
        _, text, _ = await admin.get("/connect")
        assert re.search(r'nation-acme".*?<td class="num">3</td>', text, re.S)
        clock.advance(120)  # a sample after the requests ...
        assert gateway.app[keys.ACTIVITY].last_hour() == {"acme": 3, "beta": 1}
        clock.advance(3600)  # ... is the baseline an hour later
        assert (await gateway.client.get("/n/beta/api/v2/signups/me")).status == 200
        assert gateway.app[keys.ACTIVITY].last_hour() == {"beta": 1}
        await admin.login()  # the session expired meanwhile
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "<dt>Requests, last hour</dt>\n    <dd>0</dd>" in text

    async def test_rate_limit_reading_in_words(self) -> None:
        """The rate-limit column reads remaining, limit and reset, or "not known"."""

        class Reading:
            limit: int | None = 100
            remaining: int | None = 41
            reset_at: float | None = 1300.0

        assert rate_words(None, 1000.0) == "not known"
        assert rate_words(Reading(), 1000.0) == "41 of 100 left, resets in 5 minutes"
        reading = Reading()
        reading.limit = None
        reading.reset_at = None
        assert rate_words(reading, 1000.0) == "41 left"

    async def test_rate_limit_column_reads_the_limiter(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Before any answer announced a budget the column says "not known"; after one, it
        shows what the rate limiter learnt, on the table and on the nation's page."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        _, text, _ = await admin.get("/connect")
        assert text.count("<td>not known</td>") == 2
        fake_nb.rate_limit = 100
        assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
        _, text, _ = await admin.get("/connect")
        assert re.search(r'nation-acme".*?<td>99 of 100 left', text, re.S)
        assert text.count("<td>not known</td>") == 1  # beta
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "<dd>99 of 100 left" in text


class TestActivity:
    def test_counts_from_the_proxy_counter_with_a_rolling_baseline(self, clock: FakeClock) -> None:
        """Samples at most once a step; an hour later the oldest useful sample is the base."""
        metrics = Metrics(CollectorRegistry())
        activity = RequestActivity(metrics, clock)
        metrics.proxied("acme", "GET", 200, 0.01)
        metrics.proxied("acme", "POST", 500, 0.01)
        assert activity.last_hour() == {"acme": 2}
        for _ in range(70):  # 70 minutes of samples, one request each minute
            clock.advance(60)
            metrics.proxied("acme", "GET", 200, 0.01)
            activity.sample()
        assert activity.last_hour() == {"acme": 60}


class TestNationPage:
    async def test_unknown_nation_goes_back_with_a_message(self, admin: Browser) -> None:
        """The page of a nation that is not connected sends back to the list, saying so."""
        status, _, headers = await admin.get("/connect/nations/ghost")
        assert status == 303
        assert headers["Location"] == "/connect"
        _, text, _ = await admin.get("/connect")
        assert "There is no account named ghost." in text

    async def test_audit_trail_lists_writes_not_reads(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """The nation's page shows the proxied writes to it, newest first, and no reads."""
        await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
        resp = await gateway.client.post("/n/acme/api/v2/signups?secret=1", json={"a": 1})
        assert resp.status < 500
        resp = await gateway.client.post("/n/beta/api/v2/donations", json={"a": 1})
        await gateway.app[keys.CLIENTS].flush()
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "<code>POST /api/v2/signups</code>" in text
        assert "secret=1" not in text
        assert "<td>anonymous</td>" in text
        assert "donations" not in text
        assert "signups/me" not in text
        _, text, _ = await admin.get("/connect/nations/beta")
        assert "<code>POST /api/v2/donations</code>" in text

    async def test_reauthorization_shows_when(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """Re-authorizing says "Re-authorized" and the page shows its time beside the first
        connection, which stays."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        assert (await admin.get(callback))[0] == 303
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "Connected acme." in text
        assert "<dt>Re-authorized</dt>" not in text
        clock.advance(3 * 86400)
        await admin.login()
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        status, _, headers = await admin.get(callback)
        assert status == 303
        assert headers["Location"] == "/connect/nations/acme"
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "Re-authorized acme." in text
        assert re.search(r"<dt>Connected</dt>\s*<dd><time [^>]*>3 days ago</time>", text)
        assert re.search(r"<dt>Re-authorized</dt>\s*<dd><time [^>]*>just now</time>", text)

    async def test_connecting_again_after_a_disconnect_is_a_connection(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """Connect, disconnect, connect again: the second is "Connected" (the events of
        the disconnected connection do not make it a re-authorization)."""
        assert (await admin.get(await consent(fake_nb, await start(admin, "acme"), "approve")))[
            0
        ] == 303
        clock.advance(60)
        await admin.submit("/connect/accounts/acme/disconnect")
        assert await gateway.accounts.list_accounts() == []
        clock.advance(60)
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        assert (await admin.get(callback))[0] == 303
        _, text, _ = await admin.get("/connect/nations/acme")
        assert "Connected acme." in text
        assert "Re-authorized" not in text


class TestRetryAfterBackoff:
    async def test_failed_refresh_is_retried_when_its_backoff_ends(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """The page's "retries in N s" holds: once N s have passed, the background loop's
        retry refreshes the nation, and then stops retrying."""
        await connect_account(gateway, "acme")
        fake_nb.fail_token("server_error")
        await admin.submit("/connect/accounts/acme/refresh")
        _, text, _ = await admin.get("/connect/nations/acme")
        match = re.search(r"Refreshing acme failed; the gateway retries in (\d+) s\.", text)
        assert match is not None
        assert len(fake_nb.token_requests) == 1
        assert await gateway.tokens.retry_after_backoff() == []  # not yet
        clock.advance(int(match.group(1)))
        assert await gateway.tokens.retry_after_backoff() == ["acme"]
        assert len(fake_nb.token_requests) == 2
        info = await gateway.accounts.get("acme")
        assert info.last_error is None
        assert info.last_refresh_at == clock.now()
        clock.advance(3600)
        assert await gateway.tokens.retry_after_backoff() == []  # nothing left to retry
        assert len(fake_nb.token_requests) == 2

    async def test_the_background_loop_runs_the_retry(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """With the background loop on, nothing else is needed: the retry comes by itself
        within a tick or two once the backoff has ended."""
        gw = await gateway_factory(background=True)
        await connect_account(gw, "acme")
        fake_nb.fail_token("server_error")
        with pytest.raises(RefreshBackoff):
            await gw.tokens.refresh_now("acme")
        assert len(fake_nb.token_requests) == 1
        clock.advance(300)  # beyond any first delay
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while loop.time() < deadline:  # until the retried refresh is stored
            info = await gw.accounts.get("acme")
            if info.last_error is None and info.refresh_started_at is None:
                break
            await asyncio.sleep(0.1)
        assert info.last_error is None
        assert info.last_refresh_at == clock.now()
        assert len(fake_nb.token_requests) == 2

    async def test_a_retry_that_fails_again_backs_off_longer(
        self,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A retry that fails keeps the nation in backoff for a later retry (not every tick)."""
        await connect_account(gateway, "acme")
        fake_nb.fail_token("server_error", times=2)
        with pytest.raises(RefreshBackoff):
            await gateway.tokens.refresh_now("acme")
        clock.advance(300)  # beyond any first delay
        assert await gateway.tokens.retry_after_backoff() == ["acme"]
        assert len(fake_nb.token_requests) == 2
        assert await gateway.tokens.retry_after_backoff() == []  # backing off again
        clock.advance(300)
        assert await gateway.tokens.retry_after_backoff() == ["acme"]
        assert len(fake_nb.token_requests) == 3
        assert (await gateway.accounts.get("acme")).last_error is None


async def create_client(admin: Browser, **fields: str) -> tuple[int, str, Any]:
    return await admin.submit("/connect/clients", **fields)


class TestClientsPage:
    async def test_empty_list_and_the_form(self, admin: Browser) -> None:
        """Without keys the page says so and offers the labelled form."""
        status, text, _ = await admin.get("/connect/clients")
        assert status == 200
        assert "No client key exists yet." in text
        assert '<label for="client-name">Name</label>' in text
        assert '<label for="client-nations">Nations</label>' in text
        assert 'name="read_only"' in text

    async def test_created_key_is_shown_once_and_works(
        self, admin: Browser, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """The POST answer shows the key (not a redirect, no cookie, no-store); the list then
        shows its hint, never the key; the key opens its nation."""
        await connect_account(gateway, "acme")
        status, text, headers = await create_client(
            admin, name="print-server", nations="acme, beta", read_only="on"
        )
        assert status == 200
        assert headers["Cache-Control"] == "no-store"
        assert "Location" not in headers
        found = KEY_RE.findall(text)
        assert len(set(found)) == 1
        key = found[0]
        assert "shown only this once" in text
        assert all(key not in c for c in admin.last_set_cookie)
        assert key[:9] not in str(admin.cookies)
        clients = await gateway.app[keys.CLIENTS].list()
        assert [(c.name, c.nations, c.read_only) for c in clients] == [
            ("print-server", ("acme", "beta"), True)
        ]
        _, text, _ = await admin.get("/connect/clients")
        assert key not in text
        assert KEY_RE.search(text) is None
        assert "<td>acme, beta</td>" in text
        assert "<td>read-only</td>" in text
        assert f"<code>{key[:9]}…</code>" in text
        resp = await gateway.client.get(
            "/n/acme/api/v2/signups/me", headers={"Authorization": f"Bearer {key}"}
        )
        assert resp.status == 200

    async def test_resubmitting_the_form_does_not_show_a_key_again(
        self, admin: Browser, gateway: Gateway
    ) -> None:
        """A reload re-posts the form: the name exists, so it is refused without a key."""
        csrf = await admin.csrf()
        form = {"name": "sync", "nations": "", "csrf": csrf}
        status, text, _ = await admin.post("/connect/clients", form)
        assert status == 200 and KEY_RE.search(text)
        status, text, _ = await admin.post("/connect/clients", form)
        assert status == 400
        assert KEY_RE.search(text) is None
        assert "already exists" in text
        assert len(await gateway.app[keys.CLIENTS].list()) == 1

    async def test_bad_input_is_explained_and_kept(self, admin: Browser, gateway: Gateway) -> None:
        """A bad name or nation re-renders the form with the message and the typed values."""
        status, text, _ = await create_client(admin, name="no spaces", nations="acme")
        assert status == 400
        assert "A client name is 1-64 letters" in text
        assert 'value="no spaces"' in text
        assert 'value="acme"' in text
        status, text, _ = await create_client(admin, name="ok", nations="Not_A_Slug!")
        assert status == 400
        assert "is not a nation slug" in text
        assert await gateway.app[keys.CLIENTS].list() == []

    async def test_create_and_remove_need_the_csrf_token(
        self, admin: Browser, gateway: Gateway
    ) -> None:
        """Without this session's CSRF token nothing is created or removed."""
        status, text, _ = await admin.post("/connect/clients", {"name": "x"})
        assert status == 403
        assert KEY_RE.search(text) is None
        await gateway.app[keys.CLIENTS].add("keep")
        status, _, _ = await admin.post("/connect/clients/keep/remove", {"csrf": "wrong"})
        assert status == 403
        assert [c.name for c in await gateway.app[keys.CLIENTS].list()] == ["keep"]

    async def test_remove_asks_then_removes(self, admin: Browser, gateway: Gateway) -> None:
        """Removing shows a confirmation first; confirming removes the key at once."""
        _, key = await gateway.app[keys.CLIENTS].add("old-tool")
        status, text, _ = await admin.get("/connect/clients/old-tool/remove")
        assert status == 200
        assert "Remove the client key old-tool?" in text
        assert len(await gateway.app[keys.CLIENTS].list()) == 1
        match = CSRF_RE.search(text)
        assert match is not None
        status, _, headers = await admin.post(
            "/connect/clients/old-tool/remove", {"csrf": match.group(1)}
        )
        assert status == 303
        assert headers["Location"] == "/connect/clients"
        _, text, _ = await admin.get("/connect/clients")
        assert "Removed the client key old-tool. It no longer works." in text
        assert await gateway.app[keys.CLIENTS].list() == []
        assert key.reveal() not in text

    async def test_removing_an_unknown_key_says_so(self, admin: Browser) -> None:
        """Asking to remove a key that does not exist goes back with a message."""
        status, _, headers = await admin.get("/connect/clients/ghost/remove")
        assert status == 303
        assert headers["Location"] == "/connect/clients"
        _, text, _ = await admin.get("/connect/clients")
        assert "There is no client key named ghost." in text

    def test_nations_field_accepts_commas_spaces_and_hostnames(self) -> None:
        """The nations field splits on commas and spaces and normalizes each nation."""
        assert parse_nations(" acme, Beta.nationbuilder.com  gamma,,") == ("acme", "beta", "gamma")
        assert parse_nations("") == ()


class TestStoreFailures:
    """The database failing inside a page, after the session was checked (SQLite busy past
    its timeout, PostgreSQL gone between two queries, a corrupt row)."""

    @pytest.mark.parametrize(
        "failure,status,code",
        [
            (StoreUnavailable("database is locked"), 503, "store_unavailable"),
            (CorruptRecordError("row 'acme' has no slug"), 500, "token_store_error"),
        ],
        ids=["unavailable", "corrupt"],
    )
    @pytest.mark.parametrize("path", ["/connect", "/connect/nations/acme", "/connect/clients"])
    async def test_a_page_answers_an_error_page_with_its_security_headers(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        path: str,
        failure: Exception,
        status: int,
        code: str,
    ) -> None:
        """An HTML page saying what failed (not a 500 "unexpected error" in JSON), with the
        CSP and no-store headers of every admin page, and one log line without a traceback."""
        await connect_account(gateway, "acme")

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise failure

        for name in ("list_accounts", "get_account", "list_clients"):
            monkeypatch.setattr(gateway.store, name, fail)
        with caplog.at_level(logging.ERROR, logger="nbgateway"):
            got, text, headers = await admin.get(path)
        assert got == status, text
        assert headers["Content-Type"].startswith("text/html")
        assert headers["X-NBGW-Error"] == code
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert headers["Cache-Control"] == "no-store"
        assert ("Retry-After" in headers) == (status == 503)
        assert "unexpected error" not in text
        assert "cannot use its database" in text or "cannot be read" in text
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "admin request failed: the store could not be used"
        ]
        assert all(r.exc_info is None for r in errors)

    async def test_the_admin_api_answers_json_503(
        self, gateway: Gateway, connect_account: ConnectAccount, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The admin API keeps its JSON errors: 503 store_unavailable with Retry-After."""
        await connect_account(gateway, "acme")

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("database is locked")

        for name in ("list_accounts", "list_clients", "remove_account"):
            monkeypatch.setattr(gateway.store, name, fail)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for method, path in [
            ("GET", "/connect/api/accounts"),
            ("GET", "/connect/api/clients"),
            ("DELETE", "/connect/api/accounts/acme"),
        ]:
            resp = await gateway.client.request(method, path, headers=auth)
            assert resp.status == 503, (path, await resp.text())
            assert resp.headers["X-NBGW-Error"] == "store_unavailable"
            assert resp.headers["Retry-After"] == "5"
            body = await resp.json(content_type=None)
            assert body["errors"][0]["code"] == "store_unavailable"


class TestMistypedAddresses:
    """A wrong address or method under /connect: answered like every admin page."""

    async def test_a_missing_page_is_an_html_page_with_the_security_headers(
        self, gateway: Gateway
    ) -> None:
        """A mistyped admin URL gets a 404 page (not the proxy's JSON), with the CSP and
        no-store headers of every admin page and the request id."""
        resp = await gateway.client.get("/connect/nation/acme")
        text = await resp.text()
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith("text/html")
        assert resp.headers["X-NBGW-Error"] == "not_found"
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["X-Request-ID"]
        assert "no admin page at this address" in text

    async def test_a_missing_admin_api_path_is_json_with_the_security_headers(
        self, gateway: Gateway
    ) -> None:
        resp = await gateway.client.get("/connect/api/acounts")
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith("application/vnd.api+json")
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        body = await resp.json(content_type=None)
        assert body["errors"][0]["code"] == "not_found"

    async def test_a_wrong_method_names_the_allowed_ones(self, gateway: Gateway) -> None:
        """GET on a form's POST-only address: 405 with Allow, as a page."""
        resp = await gateway.client.get("/connect/accounts/acme/refresh")
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert resp.headers["Content-Type"].startswith("text/html")
        assert resp.headers["X-NBGW-Error"] == "method_not_allowed"
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_a_reauthorization_within_a_second_of_the_first_connection_counts() -> None:
    """A second "connected" event is a re-authorization however soon it follows the
    first; the first connection alone is not."""

    def info() -> AccountInfo:
        return AccountInfo(
            slug="acme",
            status=AccountStatus.ACTIVE,
            expires_at=None,
            scope="default",
            generation=3,
            last_refresh_at=None,
            last_error=None,
            created_at=100.0,
            updated_at=100.5,
            refresh_started_at=None,
        )

    def event(n: int, kind: EventKind, at: float) -> Event:
        return Event(id=n, slug="acme", kind=kind, at=at, detail="")

    first = event(1, EventKind.CONNECTED, 100.0)
    assert reauthorized_at(info(), [first]) is None
    again = [
        event(3, EventKind.CONNECTED, 100.5),
        event(2, EventKind.NEEDS_REAUTH, 100.3),
        first,
    ]
    assert reauthorized_at(info(), again) == 100.5
    assert reauthorized_at(info(), [event(9, EventKind.CONNECTED, 5000.0)]) == 5000.0  # pruned
    # Events of an earlier connection of the same slug (disconnected since) do not count.
    earlier_life = [first, event(0, EventKind.REMOVED, 50.0), event(-1, EventKind.CONNECTED, 10.0)]
    assert reauthorized_at(info(), earlier_life) is None
