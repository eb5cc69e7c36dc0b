"""NationBuilderOAuth against the fake NationBuilder on a real socket.

Response shapes the fake never sends (a refresh answer without a refresh_token, odd token
types, secrets in an error description) come from a small scripted endpoint, also on a socket.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import CLIENT_ID, CLIENT_SECRET, PUBLIC_URL
from yarl import URL

from nbgateway.clock import FakeClock
from nbgateway.config import Settings
from nbgateway.errors import OAuthError
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import RefreshOutcome, TokenSet
from nbgateway.oauth import ACCESS_TOKEN_MAX, DEFAULT_LIFETIME, NationBuilderOAuth, bounded
from nbgateway.redact import Secret

SLUG = "acme"
LIFETIME = 86400.0  # the fake's access-token lifetime


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def oauth(http: aiohttp.ClientSession, settings: Settings, clock: FakeClock) -> NationBuilderOAuth:
    return NationBuilderOAuth(http, settings, clock)


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def approve(http: aiohttp.ClientSession, authorize_url: str) -> str:
    """Show the fake's consent page, submit "approve", return the code from the redirect."""
    url = URL(authorize_url)
    async with http.get(url) as page:
        assert page.status == 200
        assert 'value="approve"' in await page.text()
    form = {**url.query, "decision": "approve"}
    async with http.post(url.with_query(None), data=form, allow_redirects=False) as resp:
        assert resp.status == 302
        location = URL(resp.headers["Location"])
    assert str(location.with_query(None)) == f"{PUBLIC_URL}/connect/callback"
    assert location.query["state"] == url.query["state"]
    return location.query["code"]


async def api_status(http: aiohttp.ClientSession, fake_nb: FakeNationBuilder, token: Secret) -> int:
    """What the fake's API answers to a request carrying this access token."""
    headers = {"Authorization": f"Bearer {token.reveal()}"}
    async with http.get(f"{fake_nb.nation_url(SLUG)}/api/v2/signups/me", headers=headers) as resp:
        return resp.status


def closed_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def failure_of(call: Callable[[], Awaitable[object]]) -> OAuthError:
    """The OAuthError that awaiting `call()` raises."""
    with pytest.raises(OAuthError) as info:
        await call()
    return info.value


def assert_no_secret(exc: OAuthError, *secrets: str) -> None:
    text = " ".join([str(exc), repr(exc), *map(str, exc.args)])
    for secret in secrets:
        assert secret not in text


class TestAuthorize:
    async def test_authorize_url_carries_the_code_flow_parameters(
        self, oauth: NationBuilderOAuth, fake_nb: FakeNationBuilder
    ) -> None:
        """response_type, client_id, redirect_uri, state and an S256 challenge, each once."""
        request = oauth.authorize(SLUG)
        url = URL(request.url)
        assert str(url.with_query(None)) == f"{fake_nb.nation_url(SLUG)}/oauth/authorize"
        query = url.query
        assert sorted(query.keys()) == sorted(
            [
                "response_type",
                "client_id",
                "redirect_uri",
                "state",
                "code_challenge",
                "code_challenge_method",
            ]
        )
        assert query["response_type"] == "code"
        assert query["client_id"] == CLIENT_ID
        assert query["redirect_uri"] == f"{PUBLIC_URL}/connect/callback"
        assert query["state"] == request.state
        assert query["code_challenge"] == s256(request.code_verifier.reveal())
        assert query["code_challenge_method"] == "S256"
        assert request.code_verifier.reveal() not in request.url

    async def test_each_authorization_has_a_fresh_state_and_verifier(
        self, oauth: NationBuilderOAuth
    ) -> None:
        """State and verifier are long, RFC 7636-shaped, and never repeat."""
        first, second = oauth.authorize(SLUG), oauth.authorize(SLUG)
        assert first.state != second.state
        assert first.code_verifier != second.code_verifier
        for request in (first, second):
            assert len(request.state) >= 32
            assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", request.code_verifier.reveal())
            assert request.code_verifier.reveal() not in repr(request)


class TestExchangeCode:
    async def test_approved_code_exchanges_for_a_working_pair(
        self,
        oauth: NationBuilderOAuth,
        http: aiohttp.ClientSession,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """The code plus the verifier yields tokens that the API accepts."""
        request = oauth.authorize(SLUG)
        code = await approve(http, request.url)

        tokens = await oauth.exchange_code(SLUG, code, request.code_verifier)
        assert tokens.expires_at == clock.now() + LIFETIME
        assert tokens.scope == "default"
        assert tokens.refresh_token.reveal()
        assert await api_status(http, fake_nb, tokens.access_token) == 200
        sent = fake_nb.token_requests[-1].params()
        assert sent["grant_type"] == "authorization_code"
        assert sent["code"] == code
        assert sent["code_verifier"] == request.code_verifier.reveal()
        assert sent["redirect_uri"] == f"{PUBLIC_URL}/connect/callback"
        assert sent["client_id"] == CLIENT_ID
        assert sent["client_secret"] == CLIENT_SECRET
        headers = fake_nb.token_requests[-1].headers
        assert headers["Content-Type"].startswith("application/x-www-form-urlencoded")

    async def test_wrong_verifier_is_invalid_grant(
        self, oauth: NationBuilderOAuth, http: aiohttp.ClientSession
    ) -> None:
        """A verifier that does not match the challenge is refused as invalid_grant."""
        request = oauth.authorize(SLUG)
        code = await approve(http, request.url)
        wrong = Secret("w" * 64)
        exc = await failure_of(lambda: oauth.exchange_code(SLUG, code, wrong))
        assert exc.outcome is RefreshOutcome.INVALID_GRANT
        assert exc.status == 400
        assert_no_secret(exc, code, wrong.reveal(), CLIENT_SECRET)

    async def test_code_works_only_once(
        self, oauth: NationBuilderOAuth, http: aiohttp.ClientSession
    ) -> None:
        """Replaying a used authorization code is invalid_grant."""
        request = oauth.authorize(SLUG)
        code = await approve(http, request.url)
        await oauth.exchange_code(SLUG, code, request.code_verifier)
        exc = await failure_of(lambda: oauth.exchange_code(SLUG, code, request.code_verifier))
        assert exc.outcome is RefreshOutcome.INVALID_GRANT


class TestRefresh:
    async def test_refresh_rotates_the_pair(
        self,
        oauth: NationBuilderOAuth,
        http: aiohttp.ClientSession,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """A refresh returns a new pair; the used refresh token is dead, the new one works."""
        issued = fake_nb.issue_tokens(SLUG)
        old = Secret(issued["refresh_token"])

        first = await oauth.refresh(SLUG, old)
        assert first.refresh_token != old
        assert first.access_token.reveal() != issued["access_token"]
        assert await api_status(http, fake_nb, first.access_token) == 200
        sent = fake_nb.token_requests[-1].params()
        assert sent == {
            "grant_type": "refresh_token",
            "refresh_token": old.reveal(),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }

        exc = await failure_of(lambda: oauth.refresh(SLUG, old))
        assert exc.outcome is RefreshOutcome.INVALID_GRANT
        second = await oauth.refresh(SLUG, first.refresh_token)
        assert second.refresh_token not in (old, first.refresh_token)

    async def test_expiry_is_measured_from_when_the_request_was_sent(
        self, oauth: NationBuilderOAuth, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """expires_at is the injected clock at send time plus expires_in, not at receipt."""
        issued = fake_nb.issue_tokens(SLUG)
        sent_at = clock.now()
        fake_nb.hold_tokens()
        call = asyncio.create_task(oauth.refresh(SLUG, Secret(issued["refresh_token"])))
        await fake_nb.wait_for_pending_tokens(1)
        clock.advance(1000)
        fake_nb.release_tokens()
        tokens = await call
        assert tokens.expires_at == sent_at + LIFETIME

    async def test_lifetime_follows_expires_in(
        self, oauth: NationBuilderOAuth, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """A different expires_in from the server gives a different expires_at."""
        fake_nb.access_token_lifetime = 7200
        issued = fake_nb.issue_tokens(SLUG)
        tokens = await oauth.refresh(SLUG, Secret(issued["refresh_token"]))
        assert tokens.expires_at == clock.now() + 7200


class TestFailures:
    @pytest.mark.parametrize(
        ("kind", "outcome", "status"),
        [
            ("invalid_grant", RefreshOutcome.INVALID_GRANT, 400),
            ("invalid_client", RefreshOutcome.INVALID_CLIENT, 401),
            ("server_error", RefreshOutcome.SERVER_ERROR, 502),
            ("rate_limited", RefreshOutcome.SERVER_ERROR, 429),
            ("malformed", RefreshOutcome.SERVER_ERROR, 200),
            ("close", RefreshOutcome.NETWORK_ERROR, None),
        ],
    )
    async def test_injected_failure_is_classified(
        self,
        kind: str,
        outcome: RefreshOutcome,
        status: int | None,
        oauth: NationBuilderOAuth,
        fake_nb: FakeNationBuilder,
    ) -> None:
        """Each way the token endpoint can fail maps to one outcome (and HTTP status)."""
        issued = fake_nb.issue_tokens(SLUG)
        fake_nb.fail_token(kind)
        exc = await failure_of(lambda: oauth.refresh(SLUG, Secret(issued["refresh_token"])))
        assert exc.outcome is outcome
        assert exc.status == status
        assert_no_secret(exc, issued["refresh_token"], CLIENT_SECRET)

    async def test_html_error_page_is_named_as_such(
        self, oauth: NationBuilderOAuth, fake_nb: FakeNationBuilder
    ) -> None:
        """A 5xx HTML page is a server_error whose message says it was HTML, not the page."""
        issued = fake_nb.issue_tokens(SLUG)
        fake_nb.fail_token("server_error")
        exc = await failure_of(lambda: oauth.refresh(SLUG, Secret(issued["refresh_token"])))
        assert "HTML" in str(exc)
        assert "Cloudflare" not in str(exc)

    async def test_wrong_client_secret_is_invalid_client(
        self,
        http: aiohttp.ClientSession,
        settings_factory: Callable[..., Settings],
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """The fake rejecting our client credentials is invalid_client, not invalid_grant."""
        wrong = "wrong-client-secret"
        oauth = NationBuilderOAuth(http, settings_factory(client_secret=Secret(wrong)), clock)
        issued = fake_nb.issue_tokens(SLUG)
        exc = await failure_of(lambda: oauth.refresh(SLUG, Secret(issued["refresh_token"])))
        assert exc.outcome is RefreshOutcome.INVALID_CLIENT
        assert exc.status == 401
        assert_no_secret(exc, wrong, issued["refresh_token"])

    async def test_closed_port_is_network_error(
        self,
        http: aiohttp.ClientSession,
        settings_factory: Callable[..., Settings],
        clock: FakeClock,
    ) -> None:
        """Nothing listening at the token URL is a network_error."""
        settings = settings_factory(nation_url=f"http://127.0.0.1:{closed_port()}/{{slug}}")
        oauth = NationBuilderOAuth(http, settings, clock)
        exc = await failure_of(lambda: oauth.refresh(SLUG, Secret("nbfake-rt-unused-value")))
        assert exc.outcome is RefreshOutcome.NETWORK_ERROR
        assert exc.status is None

    async def test_hanging_endpoint_is_timeout(
        self,
        http: aiohttp.ClientSession,
        settings: Settings,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
    ) -> None:
        """A token endpoint that never answers is a timeout after the configured wait."""
        oauth = NationBuilderOAuth(http, settings, clock, timeout=0.2)
        issued = fake_nb.issue_tokens(SLUG)
        fake_nb.fail_token("hang")
        exc = await failure_of(lambda: oauth.refresh(SLUG, Secret(issued["refresh_token"])))
        assert exc.outcome is RefreshOutcome.TIMEOUT

    @pytest.mark.parametrize(
        ("answer_after", "frozen_at"), [(0.3, 0.1), (1.2, 1.1)], ids=["early", "late-in-the-limit"]
    )
    async def test_an_answer_that_came_while_the_process_was_frozen_is_read(
        self,
        http: aiohttp.ClientSession,
        settings: Settings,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        answer_after: float,
        frozen_at: float,
    ) -> None:
        """The process stands still (SIGSTOP, a paused VM) for longer than the whole token
        timeout while NationBuilder answers, early in the call or with little of the limit
        left. When it runs again, the answer (a rotated pair, the only one that now works)
        is read, not dropped by the timeout's timer that came due at the same moment."""
        oauth = NationBuilderOAuth(http, settings, clock, timeout=1.5)
        issued = fake_nb.issue_tokens(SLUG)
        fake_nb.token_delay = answer_after
        asyncio.get_running_loop().call_later(frozen_at, time.sleep, 2.0)  # the whole process
        tokens = await oauth.refresh(SLUG, Secret(issued["refresh_token"]))
        assert tokens.refresh_token != Secret(issued["refresh_token"])

    async def test_a_call_that_never_ends_still_times_out_across_a_freeze(self) -> None:
        """A freeze does not count (the tests above), but the call's own time does: one
        that never ends, frozen part of the way, is still cancelled and reported as a
        timeout."""
        cancelled = asyncio.Event()

        async def never() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        asyncio.get_running_loop().call_later(0.05, time.sleep, 0.6)
        with pytest.raises(TimeoutError):
            await bounded(never(), 0.3)
        assert cancelled.is_set()

    async def test_echoed_secrets_never_reach_the_message(
        self, oauth: NationBuilderOAuth, fake_nb: FakeNationBuilder
    ) -> None:
        """The fake echoes client_secret and refresh_token in its error body; we do not."""
        issued = fake_nb.issue_tokens(SLUG)
        for kind in ("invalid_grant", "invalid_client"):
            fake_nb.fail_token(kind)
            exc = await failure_of(lambda: oauth.refresh(SLUG, Secret(issued["refresh_token"])))
            assert_no_secret(exc, issued["refresh_token"], CLIENT_SECRET, "error_description")


class ScriptedTokenEndpoint:
    """A token endpoint on a real socket that answers whatever the test scripts next."""

    def __init__(self) -> None:
        self.status = 200
        self.payload: object = {}
        self.base_url = ""
        self.app = web.Application()
        self.app.router.add_post("/{slug}/oauth/token", self._token)

    def answer(self, payload: object, status: int = 200) -> None:
        self.status, self.payload = status, payload

    async def _token(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(self.payload, status=self.status)


@pytest.fixture
async def scripted(aiohttp_server: Any) -> ScriptedTokenEndpoint:
    endpoint = ScriptedTokenEndpoint()
    server = await aiohttp_server(endpoint.app)
    endpoint.base_url = str(server.make_url("")).rstrip("/")
    return endpoint


@pytest.fixture
def scripted_oauth(
    scripted: ScriptedTokenEndpoint,
    http: aiohttp.ClientSession,
    settings_factory: Callable[..., Settings],
    clock: FakeClock,
) -> NationBuilderOAuth:
    settings = settings_factory(nation_url=f"{scripted.base_url}/{{slug}}")
    return NationBuilderOAuth(http, settings, clock)


class TestResponseShapes:
    """Answers the fake never gives, from a scripted token endpoint.

    (aioresponses 0.7.9 cannot build responses on aiohttp 3.14: ClientResponse now requires
    `stream_writer`, pnuckowski/aioresponses#289; a real socket is closer to production anyway.)
    """

    async def test_missing_refresh_token_keeps_the_previous_one(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth, clock: FakeClock
    ) -> None:
        """A refresh answer without refresh_token keeps using the token just sent."""
        previous = Secret("nbfake-rt-previous-value")
        scripted.answer({"access_token": "nbfake-at-new", "token_type": "bearer", "expires_in": 60})
        tokens = await scripted_oauth.refresh(SLUG, previous)
        assert tokens == TokenSet(
            access_token=Secret("nbfake-at-new"),
            refresh_token=previous,
            expires_at=clock.now() + 60,
            scope="",
        )

    @pytest.mark.parametrize(
        ("sent", "kept"),
        [
            ("default\x00extra", "default extra"),
            ("default\ud800", "default"),
            ("dé fault", "d fault"),
            ("read\twrite\n", "read write"),
        ],
        ids=["nul", "lone-surrogate", "non-ascii", "whitespace"],
    )
    async def test_a_scope_keeps_only_printable_ascii(
        self,
        scripted: ScriptedTokenEndpoint,
        scripted_oauth: NationBuilderOAuth,
        sent: str,
        kept: str,
    ) -> None:
        """A scope is space-separated printable ASCII (RFC 6749, 3.3); other characters (a
        NUL, a lone surrogate from a JSON escape, a tab) separate words as a space does, so
        the pair they came with can be stored on either database instead of refused."""
        scripted.answer(
            {"access_token": "nbfake-at-new", "refresh_token": "nbfake-rt-new", "scope": sent}
        )
        tokens = await scripted_oauth.refresh(SLUG, Secret("nbfake-rt-old-value"))
        assert tokens.scope == kept

    async def test_code_exchange_without_refresh_token_is_refused(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth
    ) -> None:
        """A code exchange must yield a refresh token; without one it is a server_error."""
        scripted.answer({"access_token": "nbfake-at-new", "token_type": "bearer"})
        exc = await failure_of(
            lambda: scripted_oauth.exchange_code(SLUG, "some-code", Secret("v" * 64))
        )
        assert exc.outcome is RefreshOutcome.SERVER_ERROR

    async def test_missing_expires_in_assumes_a_day(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth, clock: FakeClock
    ) -> None:
        """Without expires_in the token is taken to live NationBuilder's 24 hours."""
        scripted.answer({"access_token": "nbfake-at-new", "refresh_token": "nbfake-rt-new"})
        tokens = await scripted_oauth.refresh(SLUG, Secret("nbfake-rt-old-value"))
        assert tokens.expires_at == clock.now() + DEFAULT_LIFETIME == clock.now() + LIFETIME

    async def test_non_bearer_token_is_refused(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth
    ) -> None:
        """A token type other than bearer is a server_error, never stored."""
        scripted.answer(
            {"access_token": "nbfake-at-new", "refresh_token": "nbfake-rt-new", "token_type": "mac"}
        )
        exc = await failure_of(lambda: scripted_oauth.refresh(SLUG, Secret("nbfake-rt-old-value")))
        assert exc.outcome is RefreshOutcome.SERVER_ERROR

    @pytest.mark.parametrize(
        "access",
        ["nbfake-at\r\nX-Injected: 1", "nbfake-at\x00x", "nbfake at", "nbfake-ät", "a" * 4097],
        ids=["crlf", "nul", "space", "non-ascii", "too-long"],
    )
    async def test_an_unsendable_access_token_is_refused(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth, access: str
    ) -> None:
        """An access token that cannot go in an Authorization header is a server_error that
        hands back the rotated refresh token; the message does not quote the token."""
        scripted.answer(
            {"access_token": access, "refresh_token": "nbfake-rt-new", "token_type": "bearer"}
        )
        exc = await failure_of(lambda: scripted_oauth.refresh(SLUG, Secret("nbfake-rt-old-value")))
        assert exc.outcome is RefreshOutcome.SERVER_ERROR
        assert exc.rotated_refresh_token == Secret("nbfake-rt-new")
        assert "Authorization header" in str(exc)
        assert_no_secret(exc, access, "nbfake-rt-new")

    async def test_the_longest_sendable_access_token_is_taken(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth
    ) -> None:
        access = "a" * ACCESS_TOKEN_MAX
        scripted.answer({"access_token": access, "refresh_token": "nbfake-rt-new"})
        tokens = await scripted_oauth.refresh(SLUG, Secret("nbfake-rt-old-value"))
        assert tokens.access_token == Secret(access)

    async def test_json_that_is_not_an_object_is_a_server_error(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth
    ) -> None:
        """A 200 whose JSON is a list or a string is a server_error, not a crash."""
        for payload in (["nbfake-at-new"], "nbfake-at-new", None):
            scripted.answer(payload)
            exc = await failure_of(
                lambda: scripted_oauth.refresh(SLUG, Secret("nbfake-rt-old-value"))
            )
            assert exc.outcome is RefreshOutcome.SERVER_ERROR

    async def test_error_body_secrets_and_odd_codes_stay_out_of_the_message(
        self, scripted: ScriptedTokenEndpoint, scripted_oauth: NationBuilderOAuth
    ) -> None:
        """Only a well-formed OAuth error code is quoted; descriptions and odd codes are not."""
        refresh = Secret("nbfake-rt-echoed-value")
        scripted.answer(
            {
                "error": f"bad {refresh.reveal()}",
                "error_description": f"client_secret={CLIENT_SECRET} {refresh.reveal()}",
            },
            status=400,
        )
        exc = await failure_of(lambda: scripted_oauth.refresh(SLUG, refresh))
        assert exc.outcome is RefreshOutcome.SERVER_ERROR
        assert exc.status == 400
        assert_no_secret(exc, refresh.reveal(), CLIENT_SECRET)
        assert "unknown" in str(exc)
