"""The /connect admin pages over HTTP: login, sessions, CSRF, accounts, connect, actions."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, ConnectAccount, Gateway, GatewayFactory
from yarl import URL

from nbgateway.admin_pages import (
    FLASH_COOKIE,
    SESSION_COOKIE,
    form_action_sources,
    normalize_nation,
    span,
)
from nbgateway.admin_session import Signer
from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import EventKind, TokenSet
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


class TestAccountsPage:
    async def test_shows_status_expiry_refresh_and_events(
        self,
        admin: Browser,
        gateway: Gateway,
        connect_account: ConnectAccount,
        clock: FakeClock,
    ) -> None:
        """An account shows its status in words, relative and exact expiry, and its events."""
        await connect_account(gateway, "acme")
        clock.advance(3600)
        status, text, _ = await admin.get("/connect")
        assert status == 200
        assert "acme" in text
        assert 'class="badge badge-ok">active<' in text
        assert ">in 23 hours</time>" in text
        assert '<time datetime="2023-11-15T22:13:20Z" title="2023-11-15 22:13:20 UTC">' in text
        assert ">1 hour ago</time>" in text  # last refresh
        assert "<td>connected</td>" in text

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
        assert text.count(">Re-authorize acme</button>") == 2  # banner and card
        assert '<input type="hidden" name="nation" value="acme">' in text

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
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "<img src=x" not in text
        assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in text
        assert (
            "/connect/accounts/%3Cimg%20src%3Dx%20onerror%3D%22alert%282%29%22%3E/refresh" in text
        )

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
            assert headers["Referrer-Policy"] == "no-referrer"
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

    async def test_approved_flow_lands_on_accounts_with_a_message(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """After consent the callback stores tokens and the accounts page says so."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        status, _, headers = await admin.get(callback)
        assert status == 303
        assert headers["Location"] == "/connect"
        assert FLASH_COOKIE in admin.cookies
        _, text, _ = await admin.get("/connect")
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

    async def test_failed_code_exchange_is_explained(
        self, admin: Browser, gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A token endpoint failure during the exchange lands on a page saying so."""
        callback = await consent(fake_nb, await start(admin, "acme"), "approve")
        fake_nb.fail_token("server_error")
        status, text, _ = await admin.get(callback)
        assert status == 400
        assert "NationBuilder did not hand over the tokens" in text
        assert "Try again: connect acme" in text
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
        assert headers["Location"] == "/connect"
        assert len(fake_nb.token_requests) == 1
        _, text, _ = await admin.get("/connect")
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
