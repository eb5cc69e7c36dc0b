"""`/connect/api/*` and `/connect/callback`: the admin API and the OAuth redirect target.

Gateway and fake NationBuilder run on real sockets. The authorization-code flow is driven
the way a browser would: the authorize URL the API returns is opened on the fake, its
consent form is submitted, and the redirect it answers with is followed to the gateway.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, CLIENT_ID, PUBLIC_URL, ConnectAccount, Gateway, GatewayFactory
from yarl import URL

from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import AccountStatus, EventKind

API = "/connect/api/accounts"


class _ConsentForm(HTMLParser):
    """Collects the action and hidden inputs of the fake's consent form."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.hidden: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = values.get("action", "")
        elif tag == "input" and values.get("type") == "hidden":
            self.hidden[values["name"]] = values.get("value", "")


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client standing in for the admin's browser on NationBuilder's pages."""
    async with aiohttp.ClientSession() as session:
        yield session


async def start_connect(gateway: Gateway, admin_headers: dict[str, str], slug: str) -> str:
    resp = await gateway.client.post(API, json={"nation": slug}, headers=admin_headers)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    url: str = body["authorize_url"]
    return url


async def consent(
    browser: aiohttp.ClientSession, fake_nb: FakeNationBuilder, authorize_url: str, decision: str
) -> str:
    """Open the consent page, submit it with `decision`; return the redirect Location."""
    async with browser.get(authorize_url, allow_redirects=False) as page:
        assert page.status == 200, await page.text()
        form = _ConsentForm()
        form.feed(await page.text())
    assert form.action and form.hidden
    async with browser.post(
        f"{fake_nb.base_url}{form.action}",
        data={**form.hidden, "decision": decision},
        allow_redirects=False,
    ) as answer:
        assert answer.status == 302, await answer.text()
        location: str = answer.headers["Location"]
    return location


def callback_path(location: str) -> str:
    """The gateway-relative part of a redirect to {PUBLIC_URL}/connect/callback?..."""
    url = URL(location)
    assert str(url.with_query(None)) == f"{PUBLIC_URL}/connect/callback"
    return url.raw_path_qs


async def approved_callback(
    gateway: Gateway,
    admin_headers: dict[str, str],
    browser: aiohttp.ClientSession,
    fake_nb: FakeNationBuilder,
    slug: str = "acme",
) -> str:
    """Start a connect and approve it; return the callback path (not yet visited)."""
    url = await start_connect(gateway, admin_headers, slug)
    return callback_path(await consent(browser, fake_nb, url, "approve"))


@pytest.fixture
async def acme(gateway: Gateway, connect_account: ConnectAccount) -> Gateway:
    """The default gateway with exactly one account, acme."""
    await connect_account(gateway, "acme")
    return gateway


@pytest.fixture
async def approved_path(
    gateway: Gateway,
    admin_headers: dict[str, str],
    browser: aiohttp.ClientSession,
    fake_nb: FakeNationBuilder,
) -> str:
    """A connect for acme, started and approved: the callback path (not yet visited)."""
    return await approved_callback(gateway, admin_headers, browser, fake_nb)


async def stored_slugs(gateway: Gateway) -> list[str]:
    return [info.slug for info in await gateway.accounts.list_accounts()]


def assert_json_api_error(body: dict[str, Any], status: int, code: str) -> None:
    [error] = body["errors"]
    assert error["status"] == str(status)
    assert error["code"] == code
    assert error["title"] and error["detail"]


class TestAuthentication:
    @pytest.mark.parametrize(
        "authorization",
        [
            None,
            "Bearer wrong-token-0123456789abcdef",
            f"Basic {ADMIN_TOKEN}",
            f"Token {ADMIN_TOKEN}",
            "Bearer ",
            f"Bearer {ADMIN_TOKEN[:-1]}{'0' if ADMIN_TOKEN[-1] != '0' else '1'}",
        ],
        ids=["missing", "wrong", "basic-scheme", "other-scheme", "empty", "last-char-differs"],
    )
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", API),
            ("POST", API),
            ("POST", f"{API}/acme/refresh"),
            ("DELETE", f"{API}/acme"),
        ],
    )
    async def test_refused_without_the_admin_bearer_token(
        self, gateway: Gateway, authorization: str | None, method: str, path: str
    ) -> None:
        """Without exactly `Bearer <admin token>` every API route answers a JSON:API 401."""
        headers = {} if authorization is None else {"Authorization": authorization}
        resp = await gateway.client.request(method, path, headers=headers, json={"nation": "x"})
        assert resp.status == 401
        assert resp.headers["X-NBGW-Error"] == "admin_unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert_json_api_error(await resp.json(content_type=None), 401, "admin_unauthorized")
        assert await stored_slugs(gateway) == []

    @pytest.mark.parametrize("path", [API, "/connect/api/clients"])
    async def test_a_body_over_the_limit_is_the_gateways_413(
        self, gateway_factory: GatewayFactory, admin_headers: dict[str, str], path: str
    ) -> None:
        """A JSON body larger than NBGW_MAX_REQUEST_BODY gets the contract's JSON:API 413
        with X-NBGW-Error, not aiohttp's plain-text one, and nothing is stored."""
        gw = await gateway_factory(max_request_body=1000)
        body = json.dumps({"nation": "acme", "name": "tool", "pad": "x" * 5000})
        resp = await gw.client.post(
            path, data=body, headers={**admin_headers, "Content-Type": "application/json"}
        )
        assert resp.status == 413
        assert resp.headers["X-NBGW-Error"] == "request_too_large"
        doc = await resp.json(content_type=None)
        assert_json_api_error(doc, 413, "request_too_large")
        assert "NBGW_MAX_REQUEST_BODY (1000 bytes)" in doc["errors"][0]["detail"]
        assert await stored_slugs(gw) == []

    async def test_refusal_does_not_echo_the_presented_token(self, gateway: Gateway) -> None:
        """A wrong token is not repeated back in the 401 answer."""
        presented = "Bearer presented-secret-0123456789"
        resp = await gateway.client.get(API, headers={"Authorization": presented})
        assert resp.status == 401
        assert "presented-secret" not in await resp.text()

    async def test_scheme_is_case_insensitive(self, gateway: Gateway) -> None:
        """`bearer` in lower case is the same scheme (RFC 7235)."""
        resp = await gateway.client.get(API, headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
        assert resp.status == 200


class TestListAccounts:
    async def test_empty_list(self, gateway: Gateway, admin_headers: dict[str, str]) -> None:
        """With nothing connected the list is empty and not cacheable."""
        resp = await gateway.client.get(API, headers=admin_headers)
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        assert await resp.json() == {"accounts": []}

    async def test_lists_accounts_without_token_material(
        self,
        gateway: Gateway,
        admin_headers: dict[str, str],
        connect_account: ConnectAccount,
        clock: FakeClock,
    ) -> None:
        """Each account shows slug, status and expiry; no token value or prefix appears."""
        issued = await connect_account(gateway, "acme")
        await connect_account(gateway, "beta")
        resp = await gateway.client.get(API, headers=admin_headers)
        text = await resp.text()
        assert resp.status == 200
        assert "nbfake-" not in text
        assert issued["access_token"] not in text and issued["refresh_token"] not in text
        accounts = json.loads(text)["accounts"]
        assert [a["slug"] for a in accounts] == ["acme", "beta"]
        acme = accounts[0]
        assert acme["status"] == "active"
        assert acme["access_token_expires_at"] is not None
        assert acme["last_error"] is None
        assert not {"access_token", "refresh_token"} & set(acme)


class TestStartConnect:
    async def test_returns_an_authorize_url_with_state_and_pkce(
        self, gateway: Gateway, admin_headers: dict[str, str], fake_nb: FakeNationBuilder
    ) -> None:
        """POST {"nation": slug} answers 201 with the nation's authorize URL, state and S256."""
        url = await start_connect(gateway, admin_headers, "acme")
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == (
            f"{fake_nb.base_url}/acme/oauth/authorize"
        )
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert query["response_type"] == "code"
        assert query["client_id"] == CLIENT_ID
        assert query["redirect_uri"] == f"{PUBLIC_URL}/connect/callback"
        assert len(query["state"]) >= 32
        assert query["code_challenge_method"] == "S256"
        challenge = query["code_challenge"]
        # S256 of anything is 32 bytes: 43 url-safe base64 characters without padding.
        assert len(challenge) == 43
        assert base64.urlsafe_b64decode(challenge + "=")
        assert await stored_slugs(gateway) == []

    async def test_each_start_has_its_own_state_and_challenge(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """Two starts for the same nation never share a state or a PKCE challenge."""
        first = parse_qs(urlsplit(await start_connect(gateway, admin_headers, "acme")).query)
        second = parse_qs(urlsplit(await start_connect(gateway, admin_headers, "acme")).query)
        assert first["state"] != second["state"]
        assert first["code_challenge"] != second["code_challenge"]

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"",
            b"[]",
            b'{"nation": 5}',
            b'{"slug": "acme"}',
            b'{"nation": "Bad_Slug"}',
            b'{"nation": "acme.nationbuilder.com"}',
            b'{"nation": ""}',
        ],
        ids=["not-json", "empty", "array", "number", "no-nation", "uppercase", "dots", "blank"],
    )
    async def test_bad_body_is_invalid_request(
        self, gateway: Gateway, admin_headers: dict[str, str], body: bytes
    ) -> None:
        """A body that is not {"nation": "<valid slug>"} answers 400 invalid_request."""
        resp = await gateway.client.post(
            API, data=body, headers={**admin_headers, "Content-Type": "application/json"}
        )
        assert resp.status == 400
        assert resp.headers["X-NBGW-Error"] == "invalid_request"
        assert_json_api_error(await resp.json(content_type=None), 400, "invalid_request")

    @pytest.mark.parametrize("path", [API, "/connect/api/clients"])
    async def test_json_nested_too_deep_is_invalid_request(
        self,
        gateway: Gateway,
        admin_headers: dict[str, str],
        path: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """100,000 nested arrays (deeper than Python's JSON parser goes): 400
        invalid_request, not a 500 with a RecursionError traceback in the log."""
        resp = await gateway.client.post(
            path,
            data=b"[" * 100_000 + b"]" * 100_000,
            headers={**admin_headers, "Content-Type": "application/json"},
        )
        assert resp.status == 400
        assert resp.headers["X-NBGW-Error"] == "invalid_request"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    @pytest.mark.parametrize("path", [API, "/connect/api/clients"])
    @pytest.mark.parametrize(
        "content_type",
        ["application/json; charset=bogus", "application/json; charset=utf-16", "gzip"],
        ids=["unknown-charset", "wrong-charset", "not-gzip"],
    )
    async def test_a_body_in_an_unreadable_charset_is_invalid_request(
        self, gateway: Gateway, admin_headers: dict[str, str], path: str, content_type: str
    ) -> None:
        """A JSON body declared in a charset that is unknown or does not decode: 400
        invalid_request, not a 500."""
        resp = await gateway.client.post(
            path,
            data=b'{"nation": "acme", "name": "t"}',
            headers={**admin_headers, "Content-Type": content_type}
            if content_type != "gzip"
            else {**admin_headers, "Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert resp.status == 400
        assert resp.headers["X-NBGW-Error"] == "invalid_request"


class TestCallback:
    async def test_full_flow_connects_the_nation(
        self,
        gateway: Gateway,
        admin_headers: dict[str, str],
        approved_path: str,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Approving on NationBuilder and following the redirect stores an active account."""
        resp = await gateway.client.get(approved_path)
        assert resp.status == 200
        assert "acme" in await resp.text()

        [grant] = fake_nb.token_requests
        params = grant.params()
        assert params["grant_type"] == "authorization_code"
        assert params["redirect_uri"] == f"{PUBLIC_URL}/connect/callback"
        assert params["code_verifier"]  # the fake checked it against the S256 challenge

        listing = await gateway.client.get(API, headers=admin_headers)
        [account] = (await listing.json())["accounts"]
        assert account["slug"] == "acme"
        assert account["status"] == "active"
        kinds = [e.kind for e in await gateway.accounts.events("acme")]
        assert kinds == [EventKind.CONNECTED]

        proxied = await gateway.client.get("/n/acme/api/v2/signups/me")
        assert proxied.status == 200

    async def test_denied_consent_stores_nothing(
        self,
        gateway: Gateway,
        admin_headers: dict[str, str],
        browser: aiohttp.ClientSession,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Declining on NationBuilder ends in a 4xx that says so, and nothing is stored."""
        url = await start_connect(gateway, admin_headers, "acme")
        path = callback_path(await consent(browser, fake_nb, url, "deny"))
        resp = await gateway.client.get(path)
        assert 400 <= resp.status < 500
        assert "declined" in (await resp.text()).lower()
        assert await stored_slugs(gateway) == []
        assert fake_nb.token_requests == []
        assert await gateway.accounts.events() == []

    async def test_forged_state_is_refused(
        self,
        gateway: Gateway,
        approved_path: str,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A callback whose state the gateway never issued is refused before any exchange."""
        code = parse_qs(urlsplit(approved_path).query)["code"][0]
        resp = await gateway.client.get(
            "/connect/callback", params={"code": code, "state": "forged-state-value"}
        )
        assert 400 <= resp.status < 500
        assert "unknown" in (await resp.text()).lower()
        assert await stored_slugs(gateway) == []
        assert fake_nb.token_requests == []

    async def test_missing_state_is_refused(self, gateway: Gateway) -> None:
        """A callback without a state is refused with a message."""
        resp = await gateway.client.get("/connect/callback", params={"code": "abc"})
        assert 400 <= resp.status < 500
        assert "state" in (await resp.text()).lower()
        assert await stored_slugs(gateway) == []

    async def test_replayed_callback_is_refused(
        self,
        gateway: Gateway,
        approved_path: str,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """The same callback URL works once; a second visit is refused and changes nothing."""
        assert (await gateway.client.get(approved_path)).status == 200
        before = await gateway.accounts.get("acme")

        again = await gateway.client.get(approved_path)
        assert 400 <= again.status < 500
        assert "already used" in (await again.text()).lower()
        assert await gateway.accounts.get("acme") == before
        assert len(fake_nb.token_requests) == 1
        assert [e.kind for e in await gateway.accounts.events("acme")] == [EventKind.CONNECTED]

    async def test_expired_state_is_refused(
        self,
        gateway: Gateway,
        approved_path: str,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A callback arriving more than ten minutes after the start is refused."""
        clock.advance(601)
        resp = await gateway.client.get(approved_path)
        assert 400 <= resp.status < 500
        assert "expired" in (await resp.text()).lower()
        assert await stored_slugs(gateway) == []
        assert fake_nb.token_requests == []

    async def test_failed_code_exchange_stores_nothing(
        self,
        gateway: Gateway,
        approved_path: str,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """When the token endpoint fails the exchange, the callback says so; nothing is stored."""
        fake_nb.fail_token("server_error")
        resp = await gateway.client.get(approved_path)
        text = (await resp.text()).lower()
        assert 400 <= resp.status < 500
        assert "exchang" in text
        assert "cloudflare" not in text  # NationBuilder's error page is not passed through
        assert len(fake_nb.token_requests) == 1
        assert await stored_slugs(gateway) == []
        assert await gateway.accounts.events() == []

    async def test_reconnect_replaces_a_dead_account(
        self,
        gateway: Gateway,
        admin_headers: dict[str, str],
        browser: aiohttp.ClientSession,
        fake_nb: FakeNationBuilder,
        connect_account: ConnectAccount,
        clock: FakeClock,
    ) -> None:
        """Connecting again an account that needs re-authorization makes it active again."""
        await connect_account(gateway, "acme")
        fake_nb.revoke("acme")
        clock.advance(86400)
        dead = await gateway.client.get("/n/acme/api/v2/signups/me")
        assert dead.status == 401
        assert (await gateway.accounts.get("acme")).status is AccountStatus.NEEDS_REAUTH

        path = await approved_callback(gateway, admin_headers, browser, fake_nb)
        assert (await gateway.client.get(path)).status == 200
        assert (await gateway.accounts.get("acme")).status is AccountStatus.ACTIVE
        assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200


class TestRefresh:
    async def test_refresh_answers_the_new_expiry(
        self,
        acme: Gateway,
        admin_headers: dict[str, str],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """POST .../{slug}/refresh refreshes at once and answers the account's new expiry."""
        before = await acme.client.get(API, headers=admin_headers)
        [old] = (await before.json())["accounts"]
        clock.advance(3600)

        resp = await acme.client.post(f"{API}/acme/refresh", headers=admin_headers)
        assert resp.status == 200
        text = await resp.text()
        assert "nbfake-" not in text
        body = json.loads(text)
        assert body["slug"] == "acme"
        assert body["status"] == "active"
        assert body["access_token_expires_at"] > old["access_token_expires_at"]
        assert body["generation"] == old["generation"] + 1
        assert [r.params()["grant_type"] for r in fake_nb.token_requests] == ["refresh_token"]
        assert (await acme.accounts.events("acme"))[0].kind is EventKind.REFRESHED

    async def test_refresh_unknown_account_is_404(
        self, gateway: Gateway, admin_headers: dict[str, str], fake_nb: FakeNationBuilder
    ) -> None:
        """Refreshing an account that does not exist answers 404 unknown_account."""
        resp = await gateway.client.post(f"{API}/ghost/refresh", headers=admin_headers)
        assert resp.status == 404
        assert_json_api_error(await resp.json(content_type=None), 404, "unknown_account")
        assert fake_nb.token_requests == []

    async def test_refresh_invalid_slug_is_400(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """A path slug that cannot be a nation answers 400 invalid_request."""
        resp = await gateway.client.post(f"{API}/Not_A_Slug/refresh", headers=admin_headers)
        assert resp.status == 400
        assert resp.headers["X-NBGW-Error"] == "invalid_request"

    async def test_refresh_of_a_revoked_account_names_connect(
        self,
        acme: Gateway,
        admin_headers: dict[str, str],
        fake_nb: FakeNationBuilder,
    ) -> None:
        """When NationBuilder rejects the refresh token the answer points at /connect."""
        fake_nb.revoke("acme")
        resp = await acme.client.post(f"{API}/acme/refresh", headers=admin_headers)
        assert resp.status == 401
        body = await resp.json(content_type=None)
        assert_json_api_error(body, 401, "account_needs_reauthorization")
        assert f"{PUBLIC_URL}/connect" in body["errors"][0]["detail"]
        assert (await acme.accounts.get("acme")).status is AccountStatus.NEEDS_REAUTH

    async def test_transient_refresh_failure_is_503_with_retry_after(
        self,
        acme: Gateway,
        admin_headers: dict[str, str],
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A token endpoint outage answers 503 token_refresh_failed with Retry-After."""
        fake_nb.fail_token("server_error")
        resp = await acme.client.post(f"{API}/acme/refresh", headers=admin_headers)
        assert resp.status == 503
        assert resp.headers["X-NBGW-Error"] == "token_refresh_failed"
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await acme.accounts.get("acme")).status is AccountStatus.ACTIVE


class TestRemove:
    async def test_delete_removes_the_account(
        self,
        acme: Gateway,
        admin_headers: dict[str, str],
    ) -> None:
        """DELETE answers 200, the account is gone from the list and a removed event is kept."""
        resp = await acme.client.delete(f"{API}/acme", headers=admin_headers)
        assert resp.status == 200
        assert await resp.json() == {"removed": "acme"}

        listing = await acme.client.get(API, headers=admin_headers)
        assert (await listing.json())["accounts"] == []
        assert (await acme.accounts.events("acme"))[0].kind is EventKind.REMOVED
        proxied = await acme.client.get("/n/acme/api/v2/signups/me")
        assert proxied.status == 404
        assert proxied.headers["X-NBGW-Error"] == "unknown_account"

    async def test_delete_unknown_account_is_404(
        self, gateway: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """Deleting an account that does not exist answers 404 unknown_account."""
        resp = await gateway.client.delete(f"{API}/ghost", headers=admin_headers)
        assert resp.status == 404
        assert_json_api_error(await resp.json(content_type=None), 404, "unknown_account")
        assert await gateway.accounts.events() == []


async def test_removing_the_only_account_leaves_no_default(
    gateway: Gateway, connect_account: ConnectAccount, admin_headers: dict[str, str]
) -> None:
    """After the only account is removed, /api/... says no account is selected (not 404)."""
    await connect_account(gateway, "acme")
    assert (await gateway.client.get("/api/v2/signups/me")).status == 200
    resp = await gateway.client.delete("/connect/api/accounts/acme", headers=admin_headers)
    assert resp.status == 200
    resp = await gateway.client.get("/api/v2/signups/me")
    assert resp.status == 400
    assert resp.headers["X-NBGW-Error"] == "no_account_selected"
