"""A fake NationBuilder server (OAuth + API v1/v2) that the gateway's tests and demo run against.

Its one responsibility is to behave like NationBuilder as the project's research notes on
NationBuilder's OAuth and API describe it, with a switch for every behaviour the notes mark as
unknown or flaky, and with recordings so tests can assert what the gateway sent upstream.

Each nation lives under a path prefix instead of its own host: ``{base_url}/{slug}/oauth/...``
and ``{base_url}/{slug}/api/...``. Links in API bodies are root-relative like real NationBuilder
(``/api/v2/signups?...``, without the ``/{slug}`` prefix) unless ``absolute_links`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.utils
import hashlib
import html
import json
import math
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, quote

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from yarl import URL

__all__ = ["FAIL_KINDS", "CannedAnswer", "FakeNationBuilder", "RecordedRequest", "main"]

SLUG_RE: Final = re.compile(r"[a-z0-9-]+")
# Every fail_token() kind; see FakeNationBuilder.fail_token for what each one does.
FAIL_KINDS: Final = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "server_error",
        "malformed",
        "hang",
        "close",
        "rate_limited",
        "lost",
    }
)
AUTH_CODE_LIFETIME: Final = 600.0  # NB: codes last 10 minutes
SEED_PEOPLE: Final = 45
V1_DEFAULT_LIMIT: Final = 10
V2_DEFAULT_PAGE_SIZE: Final = 20
MAX_PAGE_SIZE: Final = 100
ME_ID: Final = 1  # the seeded person who "authorized the app"; /me answers with them

V2_TYPE: Final = "application/vnd.api+json"
V1_TYPE: Final = "application/json"

MSG_UNAUTHORIZED: Final = (
    "You are not authorized to access this content. Your access token may be missing. "
    "The resource owner also may not have a permission level sufficient to grant access."
)
MSG_EXPIRED: Final = "Your access token has expired. Please refresh your token and try again."
MSG_UPGRADE: Final = "A JWT is required: v1 (legacy) access tokens do not work on the v2 API."
MSG_RATE_LIMITED: Final = "You have made too many requests. Please try again later."
MSG_NOT_FOUND: Final = "Record not found"

_GRANT_DESCRIPTIONS: Final = {
    "invalid_grant": (
        "The provided authorization grant is invalid, expired, revoked, does not match the "
        "redirection URI used in the authorization request, or was issued to another client."
    ),
    "invalid_client": (
        "Client authentication failed due to unknown client, no client authentication "
        "included, or unsupported authentication method."
    ),
    "invalid_request": (
        "The request is missing a required parameter, includes an unsupported parameter "
        "value, or is otherwise malformed."
    ),
    "unsupported_grant_type": (
        "The authorization grant type is not supported by the authorization server."
    ),
}
_TOKEN_ERROR_STATUS: Final = {"invalid_client": 401}  # everything else is 400, per RFC 6749

_FIRST_NAMES: Final = (
    "Grace", "Ada", "Alan", "Katherine", "Linus", "Margaret", "Dennis", "Barbara",
    "Ken", "Frances", "Edsger", "Radia", "Tim", "Hedy", "John",
)  # fmt: skip
_LAST_NAMES: Final = (
    "Hopper", "Lovelace", "Turing", "Johnson", "Torvalds", "Hamilton", "Ritchie", "Liskov",
    "Thompson", "Allen", "Dijkstra", "Perlman", "Lee", "Lamarr", "McCarthy",
)  # fmt: skip

# Attributes the control endpoint may "set", with the accepted JSON type of each value.
_SETTABLE: Final[dict[str, type]] = {
    "token_delay": float,
    "api_fail_401_times": int,
    "api_fail_401_code": str,
    "api_delay": float,
    "api_hang": bool,
    "refresh_grace_seconds": float,
    "revoke_family_on_reuse": bool,
    "old_access_token_survives_refresh": bool,
    "refresh_token_kept_until_used": bool,
    "accept_basic_auth": bool,
    "auto_approve": bool,
    "absolute_links": bool,
    "access_token_lifetime": int,
    "rate_limit": int,
    "rate_window": int,
    "app_name": str,
    "registered_redirect_uri": str,
}

_FILTER_RE: Final = re.compile(r"filter\[([a-z_]+)\](?:\[([a-z_]+)\])?")
_FILTERABLE: Final = frozenset({"id", "email", "first_name", "last_name"})


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it (body fully read), for test assertions."""

    method: str
    path: str
    query: MultiDictProxy[str]
    headers: CIMultiDictProxy[str]
    body: bytes
    slug: str
    query_string: str = ""
    at: float = 0.0  # the injected clock's time of arrival

    def params(self) -> dict[str, str]:
        """Form or JSON body parameters (what a token request carried); {} if neither parses."""
        return _parse_body_params(self.headers.get("Content-Type", ""), self.body) or {}


@dataclass(frozen=True)
class CannedAnswer:
    """What ``/api/_test/canned`` answers: any status, headers and body bytes, exactly.

    For a misbehaving NationBuilder: cookies, redirects, JSON that Python cannot round-trip,
    huge bodies or headers. ``{nation}`` in a header value or the body is replaced with the
    nation's own base URL (``{base_url}/{slug}``), so absolute links can be canned too.
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass
class _AuthCode:
    slug: str
    client_id: str
    redirect_uri: str
    code_challenge: str | None
    expires_at: float
    used: bool = False


@dataclass
class _AccessToken:
    slug: str
    family: str
    expires_at: float
    expired: bool = False  # forced by expire_access_tokens()
    revoked: bool = False
    # The refresh token this one was rotated from, while it is kept (Doorkeeper's
    # previous_refresh_token): revoked when this token is first used.
    previous_refresh: str | None = None


@dataclass
class _RefreshToken:
    slug: str
    family: str
    access_token: str
    used_at: float | None = None
    # The pair this token was rotated into: returned again on reuse inside the grace window.
    rotated_into: dict[str, Any] | None = None
    revoked: bool = False


@dataclass
class _Bucket:
    window_start: float
    count: int = 0


@dataclass
class _Nation:
    slug: str
    people: dict[int, dict[str, Any]]
    next_person_id: int
    codes: dict[str, _AuthCode] = field(default_factory=dict)
    # legacy access token -> still alive (False once consumed by the refresh grant or revoked)
    legacy_tokens: dict[str, bool] = field(default_factory=dict)
    # (__nonce, __token) -> offset for v1 token pagination
    v1_cursors: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class _ApiCall:
    """What an API route handler needs: the request, its nation and the rate-limit headers."""

    request: web.Request
    nation: _Nation
    match: re.Match[str]
    headers: dict[str, str]
    force_absolute: bool = False


class _TokenError(Exception):
    """An OAuth error answer from the token endpoint (RFC 6749 section 5.2)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def _parse_body_params(content_type: str, body: bytes) -> dict[str, str] | None:
    """Token-endpoint parameters from a JSON or form body; None if the body does not parse."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/json" or mime.endswith("+json"):
        try:
            obj = json.loads(body or b"{}")
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        return {str(k): "" if v is None else str(v) for k, v in obj.items()}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Blank values are kept: an empty client_secret was still "sent" and must be echoed.
    return dict(parse_qsl(text, keep_blank_values=True))


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _query_string(params: Iterable[tuple[str, str]]) -> str:
    # Brackets stay literal like the documented links (/api/v2/signups?page[number]=2...);
    # values are percent-encoded so an email filter survives the round trip.
    return "&".join(f"{key}={quote(value, safe='')}" for key, value in params)


def _cloudflare_page(status: int, title: str) -> str:
    ray = secrets.token_hex(8)
    return (
        '<!DOCTYPE html>\n<html lang="en-US"><head><meta charset="UTF-8">'
        f"<title>{status}: {html.escape(title)} | nationbuilder.com | Cloudflare</title></head>"
        '<body><div id="cf-wrapper"><div id="cf-error-details" class="cf-error-details-wrapper">'
        f'<h1><span class="cf-error-type">Error</span> <span class="cf-error-code">{status}'
        f"</span></h1><h2>{html.escape(title)}</h2>"
        f'<p>Cloudflare Ray ID: <strong class="font-semibold">{ray}</strong></p>'
        "</div></div></body></html>\n"
    )


def _plain_error_page(status: int, message: str) -> web.Response:
    body = (
        "<!DOCTYPE html>\n<html><head><title>OAuth error</title></head><body>"
        f"<h1>An error has occurred</h1><p>{html.escape(message)}</p></body></html>\n"
    )
    return web.Response(status=status, text=body, content_type="text/html")


class FakeNationBuilder:
    """An in-memory NationBuilder: every nation's OAuth server and API, plus test switches."""

    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",  # noqa: S107 - a fake's well-known test secret
        clock: Callable[[], float] = time.time,
        auto_approve: bool = False,
        access_token_lifetime: int = 86400,
        absolute_links: bool = False,
        rate_limit: int = 0,
        rate_window: int = 10,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.auto_approve = auto_approve
        self.access_token_lifetime = access_token_lifetime
        self.absolute_links = absolute_links
        # Requests per token per window (NationBuilder v2: 250 per 10 s); 0: no limit and no
        # RateLimit headers, so tests that do not care never meet a 429.
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.rate_limited_count = 0  # 429 answers given for an exhausted budget
        self.app_name = "NB Gateway"
        self.base_url = ""
        self._clock = clock

        # Options for what the notes list as unknown about refresh-token rotation.
        self.refresh_grace_seconds: float = 0.0
        self.revoke_family_on_reuse: bool = False
        self.old_access_token_survives_refresh: bool = True
        # Doorkeeper's previous_refresh_token: a refresh token just used stays valid (each
        # use mints another pair) until an access token it was rotated into is first used.
        self.refresh_token_kept_until_used: bool = False
        # Whether HTTP Basic client authentication works is unknown; off like every known client.
        self.accept_basic_auth: bool = False
        # The app's registered callback, as NationBuilder insists on it; "" takes any
        # absolute http(s) URL (the tests' gateways run on ports chosen at random).
        self.registered_redirect_uri: str = ""

        # Switches; reset_switches() puts them back.
        self.token_delay: float = 0.0
        self.api_fail_401_times: int = 0
        # The code of those 401s: token_expired, or unauthorized (a permission the
        # authorizing user lacks, which no refresh cures).
        self.api_fail_401_code: str = "token_expired"
        self.api_delay: float = 0.0
        self.api_hang: bool = False
        self.canned = CannedAnswer()
        self._token_failures: list[str] = []
        # Fields replaced in the next successful token answers (the grant happens as usual:
        # a rotated refresh token is spent), for answers that are wrong in other ways.
        self._token_answers: list[dict[str, Any]] = []
        self._tokens_held = False
        self._token_gate = asyncio.Event()
        self._token_gate.set()
        self._pending_tokens = 0
        # The most token requests held or delayed at once (how far refreshes overlapped).
        self.peak_pending_tokens = 0
        self._pending_changed = asyncio.Event()  # pulsed whenever _pending_tokens changes
        # Set while the server shuts down so hung and held handlers return instead of
        # making runner.cleanup() wait out its shutdown timeout.
        self._closing = asyncio.Event()

        self.requests: list[RecordedRequest] = []
        self.token_requests: list[RecordedRequest] = []
        self.api_requests: list[RecordedRequest] = []

        self._nations: dict[str, _Nation] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._runner: web.AppRunner | None = None

        # Large enough for the gateway's own body limit (NBGW_MAX_REQUEST_BODY, 10 MiB default).
        self.app = web.Application(
            middlewares=[self._record_middleware], client_max_size=64 * 1024 * 1024
        )
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        slug = "{slug:[a-z0-9-]+}"
        self.app.router.add_get("/_fake/state", self._state_handler)
        self.app.router.add_post("/_fake/control", self._control_handler)
        self.app.router.add_route(
            "*", f"/{slug}/oauth/authorize", self._authorize_handler, name="authorize"
        )
        self.app.router.add_post(f"/{slug}/oauth/token", self._token_handler, name="token")
        self.app.router.add_route("*", f"/{slug}/api/{{tail:.*}}", self._api_handler, name="api")

        # (method, path pattern under /api/, handler): dispatched after auth and rate limiting.
        self._api_routes: list[tuple[frozenset[str], re.Pattern[str], _ApiHandler]] = [
            (_m("GET"), re.compile(r"v2/signups"), self._v2_list),
            (_m("POST"), re.compile(r"v2/signups"), self._v2_create),
            (_m("GET"), re.compile(r"v2/signups/me"), self._v2_me),
            (_m("GET"), re.compile(r"v2/signups/(?P<id>[^/]+)"), self._v2_show),
            (_m("PATCH", "PUT"), re.compile(r"v2/signups/(?P<id>[^/]+)"), self._v2_update),
            (_m("DELETE"), re.compile(r"v2/signups/(?P<id>[^/]+)"), self._v2_delete),
            (_m("GET"), re.compile(r"v2/petition_signatures"), self._v2_petition_signatures),
            (_m("GET"), re.compile(r"v1/people"), self._v1_list),
            (_m("POST"), re.compile(r"v1/people"), self._v1_create),
            (_m("GET"), re.compile(r"v1/people/me"), self._v1_me),
            (_m("GET"), re.compile(r"v1/people/(?P<id>[^/]+)"), self._v1_show),
            (_m("PUT", "PATCH"), re.compile(r"v1/people/(?P<id>[^/]+)"), self._v1_update),
            (_m("DELETE"), re.compile(r"v1/people/(?P<id>[^/]+)"), self._v1_delete),
            (_ANY_METHOD, re.compile(r"_test/echo"), self._test_echo),
            (_m("GET"), re.compile(r"_test/bytes"), self._test_bytes),
            (_ANY_METHOD, re.compile(r"_test/status/(?P<code>\d{3})"), self._test_status),
            (_m("GET"), re.compile(r"_test/absolute-links"), self._test_absolute_links),
            (_ANY_METHOD, re.compile(r"_test/canned"), self._test_canned),
        ]

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("FakeNationBuilder is already running")
        # handler_cancellation matches pytest-aiohttp's TestServer, so a client that gives up
        # on a held/hung request frees its handler the same way in both setups.
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host  # noqa: S104
        if url_host == "::":
            url_host = "::1"
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self.base_url = f"http://{url_host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; hung and held requests are released first so this returns promptly."""
        self._closing.set()
        self._token_gate.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def nation_url(self, slug: str) -> str:
        """The base URL the gateway uses for a nation: ``{base_url}/{slug}``."""
        if not self.base_url:
            raise RuntimeError("base_url is not set: call start() or assign it")
        return f"{self.base_url.rstrip('/')}/{_check_slug(slug)}"

    async def _on_startup(self, _app: web.Application) -> None:
        self._closing.clear()
        if self._tokens_held:
            self._token_gate.clear()

    async def _on_shutdown(self, _app: web.Application) -> None:
        # Also reached when pytest-aiohttp's TestServer closes, which never calls stop().
        self._closing.set()
        self._token_gate.set()

    # ------------------------------------------------------------------ direct helpers for tests

    def issue_tokens(self, slug: str) -> dict[str, Any]:
        """A fresh token pair for a nation, exactly as the token endpoint would return it."""
        self._nation(slug)
        return self._mint_pair(slug, family=secrets.token_hex(8))

    def add_legacy_token(self, slug: str, token: str) -> None:
        """Register a never-expiring legacy access token (works on v1, the refresh grant once)."""
        self._nation(slug).legacy_tokens[token] = True

    def expire_access_tokens(self, slug: str | None = None) -> None:
        """Make every current access token (of slug, or of all nations) answer token_expired."""
        for token in self._access.values():
            if slug is None or token.slug == slug:
                token.expired = True

    def revoke(self, slug: str) -> None:
        """Kill every refresh, access and legacy token of a nation (admin revoked the app)."""
        nation = self._nation(slug)
        for access in self._access.values():
            if access.slug == slug:
                access.revoked = True
        for refresh in self._refresh.values():
            if refresh.slug == slug:
                refresh.revoked = True
        for legacy in nation.legacy_tokens:
            nation.legacy_tokens[legacy] = False

    def clear_recordings(self) -> None:
        """Forget recorded requests (the token/nation state is kept)."""
        self.requests.clear()
        self.token_requests.clear()
        self.api_requests.clear()
        self.rate_limited_count = 0

    # ------------------------------------------------------------------ switches

    def fail_token(self, kind: str, times: int = 1) -> None:
        """Make the next `times` token requests fail in the given way (see FAIL_KINDS).

        invalid_grant: 400 JSON; invalid_client: 401 JSON (both echo the request parameters,
        secrets included, like NB reportedly does); server_error: 502 Cloudflare HTML;
        malformed: 200 with a truncated, non-JSON body; hang: never answer; close: drop the
        connection without a response; rate_limited: 429 Cloudflare HTML with Retry-After;
        lost: the grant is made (a refresh token is rotated) and then the connection is
        dropped, so the new pair never reaches the caller.
        """
        if kind not in FAIL_KINDS:
            raise ValueError(
                f"unknown fail_token kind {kind!r}; expected one of {sorted(FAIL_KINDS)}"
            )
        if times < 0:
            raise ValueError("times must be >= 0")
        self._token_failures.extend([kind] * times)

    def mangle_token_answers(self, fields: dict[str, Any], times: int = 1) -> None:
        """Replace `fields` in the next `times` successful token answers (after the grant:
        NationBuilder has rotated), e.g. {"token_type": "mac"} or {"expires_in": 1e20}.
        Floats such as inf and nan go out as the JSON extensions Infinity and NaN."""
        if times < 0:
            raise ValueError("times must be >= 0")
        self._token_answers.extend([dict(fields)] * times)

    def hold_tokens(self) -> None:
        """Block every token request until release_tokens() (or stop())."""
        self._tokens_held = True
        self._token_gate.clear()

    def release_tokens(self) -> None:
        """Let held token requests (and later ones) through."""
        self._tokens_held = False
        self._token_gate.set()

    @property
    def pending_token_requests(self) -> int:
        """Token requests currently held by hold_tokens() or sleeping through token_delay."""
        return self._pending_tokens

    async def wait_for_pending_tokens(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 - the agreed public signature
    ) -> None:
        """Return once at least n token requests are held/waiting; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while self._pending_tokens < n:
                self._pending_changed.clear()
                await self._pending_changed.wait()

    def set_canned(
        self,
        *,
        status: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | str = b"",
    ) -> None:
        """Make ``/api/_test/canned`` answer exactly this (see CannedAnswer)."""
        if not 200 <= status <= 599:
            raise ValueError("status must be 200..599")
        raw = body.encode() if isinstance(body, str) else bytes(body)
        self.canned = CannedAnswer(status, tuple((str(n), str(v)) for n, v in headers), raw)

    def reset_switches(self) -> None:
        """Undo every failure switch: queued failures, delays, holds, API 401s/hangs and the
        canned answer."""
        self.canned = CannedAnswer()
        self._token_failures.clear()
        self._token_answers.clear()
        self.token_delay = 0.0
        self.api_fail_401_times = 0
        self.api_fail_401_code = "token_expired"
        self.api_delay = 0.0
        self.api_hang = False
        self.release_tokens()

    # ------------------------------------------------------------------ internals: state

    def _now(self) -> float:
        return self._clock()

    def _nation(self, slug: str) -> _Nation:
        nation = self._nations.get(slug)
        if nation is None:
            nation = _Nation(
                slug=_check_slug(slug), people=_seed_people(slug), next_person_id=SEED_PEOPLE + 1
            )
            self._nations[slug] = nation
        return nation

    def _mint_pair(self, slug: str, family: str) -> dict[str, Any]:
        now = self._now()
        access = "nbfake-at-" + secrets.token_urlsafe(24)
        refresh = "nbfake-rt-" + secrets.token_urlsafe(24)
        self._access[access] = _AccessToken(
            slug=slug, family=family, expires_at=now + self.access_token_lifetime
        )
        self._refresh[refresh] = _RefreshToken(slug=slug, family=family, access_token=access)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": self.access_token_lifetime,
            "scope": "default",
            "created_at": int(now),
        }

    def _kill_family(self, family: str) -> None:
        for access in self._access.values():
            if access.family == family:
                access.revoked = True
        for refresh in self._refresh.values():
            if refresh.family == family:
                refresh.revoked = True

    def _grant_authorization_code(self, slug: str, params: dict[str, str]) -> dict[str, Any]:
        nation = self._nation(slug)
        code = nation.codes.get(params.get("code", ""))
        if code is None or code.used or self._now() >= code.expires_at:
            raise _TokenError("invalid_grant")
        if code.client_id != params.get("client_id") or code.redirect_uri != params.get(
            "redirect_uri"
        ):
            raise _TokenError("invalid_grant")
        if code.code_challenge is not None:
            verifier = params.get("code_verifier", "")
            if not verifier or not secrets.compare_digest(_s256(verifier), code.code_challenge):
                raise _TokenError("invalid_grant")
        code.used = True
        return self._mint_pair(slug, family=secrets.token_hex(8))

    def _grant_refresh_token(self, slug: str, params: dict[str, str]) -> dict[str, Any]:
        value = params.get("refresh_token", "")
        nation = self._nation(slug)
        current = self._refresh.get(value)
        if current is None or current.slug != slug:
            # Migration trick: a live legacy access token works once as a refresh token.
            if nation.legacy_tokens.get(value):
                nation.legacy_tokens[value] = False
                return self._mint_pair(slug, family=secrets.token_hex(8))
            raise _TokenError("invalid_grant")
        if current.revoked:
            raise _TokenError("invalid_grant")
        now = self._now()
        if current.used_at is None:
            if not self.refresh_token_kept_until_used:
                current.used_at = now
            if not self.old_access_token_survives_refresh:
                old_access = self._access.get(current.access_token)
                if old_access is not None:
                    old_access.revoked = True
            pair = self._mint_pair(slug, current.family)
            current.rotated_into = dict(pair)
            if self.refresh_token_kept_until_used:
                self._access[pair["access_token"]].previous_refresh = value
            return pair
        # Reuse of a rotated refresh token.
        successor = current.rotated_into
        if (
            successor is not None
            and self.refresh_grace_seconds > 0
            and now - current.used_at <= self.refresh_grace_seconds
            and self._refresh_alive(str(successor["refresh_token"]))
        ):
            return dict(successor)
        if self.revoke_family_on_reuse:
            self._kill_family(current.family)
        raise _TokenError("invalid_grant")

    def _refresh_alive(self, value: str) -> bool:
        token = self._refresh.get(value)
        return token is not None and not token.revoked and token.used_at is None

    def _access_error(self, slug: str, token: str, *, v2: bool) -> str | None:
        """The 401 code for this token on this nation, or None if it may proceed."""
        if not token:
            return "unauthorized"
        access = self._access.get(token)
        if access is not None and access.slug == slug:
            if access.revoked:
                return "unauthorized"
            if access.expired or self._now() >= access.expires_at:
                return "token_expired"
            if access.previous_refresh is not None:
                # First use of a token rotated under refresh_token_kept_until_used.
                previous = self._refresh.get(access.previous_refresh)
                if previous is not None:
                    previous.revoked = True
                access.previous_refresh = None
            return None
        nation = self._nations.get(slug)
        if nation is not None and nation.legacy_tokens.get(token):
            return "token_upgrade_required" if v2 else None
        return "unauthorized"

    def _rate_limit(self, token: str) -> tuple[bool, dict[str, str]]:
        """Count one request against the token's fixed window; (allowed, RateLimit-* headers).

        Windows are aligned to multiples of `rate_window` epoch seconds (as a Rack::Attack
        style throttle counts them), so the announced reset is exact in whole seconds.
        """
        if self.rate_limit <= 0:
            return True, {}
        now = self._now()
        window = max(1, self.rate_window)
        start = math.floor(now / window) * window
        bucket = self._buckets.get(token)
        if bucket is None or bucket.window_start != start:
            bucket = _Bucket(window_start=start)
            self._buckets[token] = bucket
        reset_at = bucket.window_start + window
        headers = {
            "RateLimit-Limit": str(self.rate_limit),
            "RateLimit-Reset": str(math.ceil(reset_at)),
            # The reset and the Date come from one clock, as a real server's do (the
            # gateway corrects an epoch reset by the Date when the clocks differ).
            "Date": email.utils.formatdate(now, usegmt=True),
        }
        if bucket.count >= self.rate_limit:
            self.rate_limited_count += 1
            headers["RateLimit-Remaining"] = "0"
            headers["Retry-After"] = str(max(1, math.ceil(reset_at - now)))
            return False, headers
        bucket.count += 1
        headers["RateLimit-Remaining"] = str(self.rate_limit - bucket.count)
        return True, headers

    def _public_base(self, request: web.Request) -> str:
        return self.base_url.rstrip("/") or f"{request.scheme}://{request.host}"

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early at shutdown so stop() never waits out a delay."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)

    async def _never_answer(self, request: web.Request) -> web.StreamResponse:
        """Hang until shutdown, then drop the connection: the client never gets an answer."""
        await self._closing.wait()
        return _drop_connection(request)

    # ------------------------------------------------------------------ recording

    @web.middleware
    async def _record_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        body = await request.read()
        route_name = request.match_info.route.name
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=MultiDictProxy(MultiDict(request.query)),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            slug=request.match_info.get("slug", ""),
            query_string=request.query_string,
            at=self._now(),
        )
        self.requests.append(record)
        if route_name == "token":
            self.token_requests.append(record)
        elif route_name == "api":
            self.api_requests.append(record)
        return await handler(request)

    # ------------------------------------------------------------------ OAuth: authorize

    async def _authorize_handler(self, request: web.Request) -> web.StreamResponse:
        slug = request.match_info["slug"]
        self._nation(slug)
        if request.method == "POST":
            form = await request.post()
            params = {k: v for k, v in form.items() if isinstance(v, str)}
        elif request.method == "GET":
            params = dict(request.query)
        else:
            return _plain_error_page(405, "Method not allowed.")

        problem = self._authorize_problem(params)
        if problem is not None:
            # Like NB (Doorkeeper), bad client/redirect parameters get an error page, never a
            # redirect: redirecting to an unverified URI would be an open redirect.
            return _plain_error_page(400, problem)

        if request.method == "GET" and not self.auto_approve:
            return self._consent_page(request, slug, params)
        decision = "approve" if request.method == "GET" else params.get("decision", "")
        redirect = URL(params["redirect_uri"])
        state = params.get("state")
        if decision == "approve":
            code = secrets.token_urlsafe(24)
            self._nation(slug).codes[code] = _AuthCode(
                slug=slug,
                client_id=params["client_id"],
                redirect_uri=params["redirect_uri"],
                code_challenge=params.get("code_challenge") or None,
                expires_at=self._now() + AUTH_CODE_LIFETIME,
            )
            query = {"code": code}
        elif decision == "deny":
            query = {
                "error": "access_denied",
                "error_description": (
                    "The resource owner or authorization server denied the request."
                ),
            }
        else:
            return _plain_error_page(400, "Missing or unknown decision.")
        if state is not None:
            query["state"] = state
        location = str(redirect.extend_query(query))
        return web.Response(status=302, headers={"Location": location})

    def _authorize_problem(self, params: dict[str, str]) -> str | None:
        if params.get("response_type") != "code":
            return "The authorization server does not support this response type."
        if params.get("client_id") != self.client_id:
            return "Client authentication failed due to unknown client."
        redirect_uri = params.get("redirect_uri", "")
        try:
            parsed = URL(redirect_uri)
        except ValueError:
            parsed = URL()
        if not redirect_uri or not parsed.is_absolute() or parsed.scheme not in ("http", "https"):
            return "The redirect uri included is not valid."
        if self.registered_redirect_uri and redirect_uri != self.registered_redirect_uri:
            return "The redirect uri included is not valid."
        if params.get("code_challenge") and params.get("code_challenge_method") != "S256":
            return "The code challenge method must be S256."
        return None

    def _consent_page(
        self, request: web.Request, slug: str, params: dict[str, str]
    ) -> web.Response:
        keep = (
            "response_type", "client_id", "redirect_uri", "state", "scope",
            "code_challenge", "code_challenge_method",
        )  # fmt: skip
        hidden = "\n".join(
            f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
            for name in keep
            if name in params
        )
        app = html.escape(self.app_name)
        nation = html.escape(slug)
        body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Authorize {app} | {nation}</title></head>
<body>
<h1>Authorize {app} to access {nation}?</h1>
<p>{app} will be able to read and change data in the nation {nation} with your permissions.</p>
<form method="post" action="{html.escape(request.path)}">
{hidden}
<button type="submit" name="decision" value="approve" id="approve">Authorize</button>
<button type="submit" name="decision" value="deny" id="deny">Deny</button>
</form>
</body></html>
"""
        return web.Response(text=body, content_type="text/html")

    # ------------------------------------------------------------------ OAuth: token

    async def _token_handler(self, request: web.Request) -> web.StreamResponse:
        slug = request.match_info["slug"]
        self._nation(slug)
        body = await request.read()
        self._pending_tokens += 1
        self.peak_pending_tokens = max(self.peak_pending_tokens, self._pending_tokens)
        self._pending_changed.set()
        try:
            await self._token_gate.wait()
            if self.token_delay > 0:
                await self._pause(self.token_delay)
        finally:
            self._pending_tokens -= 1
            self._pending_changed.set()

        params = _parse_body_params(request.headers.get("Content-Type", ""), body)
        lose_answer = False
        if self._token_failures:
            kind = self._token_failures.pop(0)
            if kind != "lost":
                return await self._injected_token_failure(request, kind, params or {})
            lose_answer = True
        if params is None:
            return self._token_error("invalid_request", {})
        try:
            self._authenticate_client(request, params)
            grant_type = params.get("grant_type", "")
            if grant_type == "authorization_code":
                pair = self._grant_authorization_code(slug, params)
            elif grant_type == "refresh_token":
                pair = self._grant_refresh_token(slug, params)
            elif not grant_type:
                raise _TokenError("invalid_request")
            else:
                raise _TokenError("unsupported_grant_type")
        except _TokenError as exc:
            return self._token_error(exc.error, params)
        if lose_answer:
            return _drop_connection(request)  # granted and rotated, but never answered
        if self._token_answers:
            pair = {**pair, **self._token_answers.pop(0)}
        return web.json_response(pair, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate_client(self, request: web.Request, params: dict[str, str]) -> None:
        client_id = params.get("client_id")
        client_secret = params.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if self.accept_basic_auth and auth[:6].lower() == "basic ":
            with contextlib.suppress(ValueError):
                decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
                client_id, _, client_secret = decoded.partition(":")
                # The code grant compares the code's client_id with the request's.
                params.setdefault("client_id", client_id)
        if client_id != self.client_id or client_secret is None:
            raise _TokenError("invalid_client")
        if not secrets.compare_digest(client_secret.encode(), self.client_secret.encode()):
            raise _TokenError("invalid_client")

    def _token_error(self, error: str, params: dict[str, str]) -> web.Response:
        # NB reportedly echoes the request parameters (secrets included) in error bodies; the
        # fake does too so the gateway's "never log token-endpoint bodies" rule gets exercised.
        echoed = json.dumps(params, sort_keys=True)
        description = f"{_GRANT_DESCRIPTIONS[error]} Request parameters: {echoed}"
        return web.json_response(
            {"error": error, "error_description": description},
            status=_TOKEN_ERROR_STATUS.get(error, 400),
            headers={"Cache-Control": "no-store"},
        )

    async def _injected_token_failure(
        self, request: web.Request, kind: str, params: dict[str, str]
    ) -> web.StreamResponse:
        if kind in ("invalid_grant", "invalid_client"):
            return self._token_error(kind, params)
        if kind == "server_error":
            return web.Response(
                status=502, text=_cloudflare_page(502, "Bad gateway"), content_type="text/html"
            )
        if kind == "rate_limited":
            return web.Response(
                status=429,
                text=_cloudflare_page(429, "Too many requests"),
                content_type="text/html",
                headers={"Retry-After": str(self.rate_window)},
            )
        if kind == "malformed":
            # Claims JSON but is cut off mid-object, the nastiest case for a parser.
            return web.Response(
                status=200,
                body=b'{"access_token":"nbfake-at-trunc',
                content_type="application/json",
            )
        if kind == "close":
            return _drop_connection(request)
        assert kind == "hang"
        # A hung token call counts as pending, so tests can wait until it is in place.
        self._pending_tokens += 1
        self._pending_changed.set()
        try:
            return await self._never_answer(request)
        finally:
            self._pending_tokens -= 1
            self._pending_changed.set()

    # ------------------------------------------------------------------ API

    async def _api_handler(self, request: web.Request) -> web.StreamResponse:
        slug = request.match_info["slug"]
        tail = request.match_info["tail"].rstrip("/")
        nation = self._nation(slug)
        v2 = tail.startswith("v2/") or tail == "v2"
        ctype = V2_TYPE if v2 else V1_TYPE
        if self.api_hang:
            return await self._never_answer(request)
        if self.api_delay > 0:
            await self._pause(self.api_delay)
        if self.api_fail_401_times > 0:
            self.api_fail_401_times -= 1
            expired = self.api_fail_401_code == "token_expired"
            message = MSG_EXPIRED if expired else MSG_UNAUTHORIZED
            return _api_error(401, self.api_fail_401_code, message, ctype)

        token = _bearer_token(request)
        problem = self._access_error(slug, token, v2=v2)
        if problem is not None:
            message = {
                "unauthorized": MSG_UNAUTHORIZED,
                "token_expired": MSG_EXPIRED,
                "token_upgrade_required": MSG_UPGRADE,
            }[problem]
            return _api_error(401, problem, message, ctype)

        allowed, limit_headers = self._rate_limit(token)
        if not allowed:
            return web.json_response(
                {"message": MSG_RATE_LIMITED}, status=429, headers=limit_headers, content_type=ctype
            )

        for methods, pattern, route_handler in self._api_routes:
            match = pattern.fullmatch(tail)
            if match is not None and request.method in methods:
                call = _ApiCall(request=request, nation=nation, match=match, headers=limit_headers)
                response = await route_handler(call)
                break
        else:
            response = _api_error(404, "not_found", MSG_NOT_FOUND, ctype)
        if not response.prepared:
            response.headers.update(limit_headers)
        return response

    def _link(self, call: _ApiCall, path: str, params: Iterable[tuple[str, str]] = ()) -> str:
        query = _query_string(params)
        relative = f"{path}?{query}" if query else path
        if self.absolute_links or call.force_absolute:
            return f"{self._public_base(call.request)}/{call.nation.slug}{relative}"
        return relative

    # --- v2 signups

    def _signup_resource(self, call: _ApiCall, person: dict[str, Any]) -> dict[str, Any]:
        pid = str(person["id"])
        related = self._link(call, "/api/v2/petition_signatures", [("filter[signup_id]", pid)])
        return {
            "id": pid,
            "type": "signups",
            "attributes": {k: v for k, v in person.items() if k != "id"},
            "relationships": {
                "petition_signatures": {"links": {"related": related}},
                "signup_tags": {"meta": {"included": False}},
            },
        }

    async def _v2_list(self, call: _ApiCall) -> web.StreamResponse:
        query = call.request.query
        try:
            number = int(query.get("page[number]", "1"))
            size = int(query.get("page[size]", str(V2_DEFAULT_PAGE_SIZE)))
        except ValueError:
            return _api_error(
                400, "bad_request", "page[number] and page[size] must be integers", V2_TYPE
            )
        if number < 1:
            return _api_error(400, "bad_request", "page[number] must be at least 1", V2_TYPE)
        if not 1 <= size <= MAX_PAGE_SIZE:
            return _api_error(
                400, "bad_request", f"page[size] must be between 1 and {MAX_PAGE_SIZE}", V2_TYPE
            )
        people = sorted(call.nation.people.values(), key=lambda p: int(p["id"]))
        filter_params: list[tuple[str, str]] = []
        for key, value in query.items():
            if not key.startswith("filter["):
                continue
            matched = _FILTER_RE.fullmatch(key)
            if matched is None or matched.group(1) not in _FILTERABLE:
                attribute = matched.group(1) if matched else key
                return _api_error(
                    400,
                    "bad_request",
                    f"Tried to filter on attribute :{attribute}, but could not find an "
                    "attribute with that name.",
                    V2_TYPE,
                )
            if matched.group(2) not in (None, "eq"):
                return _api_error(
                    400,
                    "bad_request",
                    f"The fake only supports eq, not {matched.group(2)}",
                    V2_TYPE,
                )
            # Graphiti's eq on strings is case-insensitive; a comma means OR.
            wanted = {v.strip().lower() for v in value.split(",")}
            attr = matched.group(1)
            people = [p for p in people if str(p.get(attr, "")).lower() in wanted]
            filter_params.append((key, value))
        start = (number - 1) * size
        page = people[start : start + size]

        def page_link(n: int) -> str:
            pages = [("page[number]", str(n)), ("page[size]", str(size))]
            return self._link(call, "/api/v2/signups", [*filter_params, *pages])

        links = {"self": page_link(number)}
        if number > 1:
            links["prev"] = page_link(number - 1)
        if page:  # NB: next is present whenever data is; the end is an empty page
            links["next"] = page_link(number + 1)
        doc = {
            "data": [self._signup_resource(call, p) for p in page],
            "links": links,
            "meta": {},
        }
        return web.json_response(doc, content_type=V2_TYPE)

    async def _v2_show(self, call: _ApiCall) -> web.StreamResponse:
        person = _find_person(call.nation, call.match.group("id"))
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V2_TYPE)
        return web.json_response(
            {"data": self._signup_resource(call, person), "meta": {}}, content_type=V2_TYPE
        )

    async def _v2_me(self, call: _ApiCall) -> web.StreamResponse:
        person = call.nation.people.get(ME_ID)
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V2_TYPE)
        return web.json_response(
            {"data": self._signup_resource(call, person), "meta": {}}, content_type=V2_TYPE
        )

    async def _v2_create(self, call: _ApiCall) -> web.StreamResponse:
        attributes = await _v2_attributes(call.request)
        if isinstance(attributes, web.Response):
            return attributes
        invalid = _v2_validate(call.nation, attributes, current_id=None, creating=True)
        if invalid is not None:
            return invalid
        person = _add_person(call.nation, attributes)
        return web.json_response(
            {"data": self._signup_resource(call, person), "meta": {}},
            status=201,
            content_type=V2_TYPE,
        )

    async def _v2_update(self, call: _ApiCall) -> web.StreamResponse:
        person = _find_person(call.nation, call.match.group("id"))
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V2_TYPE)
        attributes = await _v2_attributes(call.request)
        if isinstance(attributes, web.Response):
            return attributes
        invalid = _v2_validate(call.nation, attributes, current_id=person["id"], creating=False)
        if invalid is not None:
            return invalid
        person.update(attributes)
        return web.json_response(
            {"data": self._signup_resource(call, person), "meta": {}}, content_type=V2_TYPE
        )

    async def _v2_delete(self, call: _ApiCall) -> web.StreamResponse:
        person = _find_person(call.nation, call.match.group("id"))
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V2_TYPE)
        del call.nation.people[person["id"]]
        return web.json_response({"meta": {}}, content_type=V2_TYPE)  # NB: 200, not 204

    async def _v2_petition_signatures(self, call: _ApiCall) -> web.StreamResponse:
        # Exists only so relationship links resolve; the fake has no petitions.
        params = [(k, v) for k, v in call.request.query.items() if k.startswith("filter[")]
        self_link = self._link(call, "/api/v2/petition_signatures", params)
        return web.json_response(
            {"data": [], "links": {"self": self_link}, "meta": {}}, content_type=V2_TYPE
        )

    # --- v1 people

    async def _v1_list(self, call: _ApiCall) -> web.StreamResponse:
        query = call.request.query
        try:
            limit = int(query.get("limit", str(V1_DEFAULT_LIMIT)))
        except ValueError:
            return _api_error(400, "bad_request", "limit must be an integer", V1_TYPE)
        limit = max(1, min(limit, MAX_PAGE_SIZE))  # NB caps limit at 100
        offset = 0
        if "__token" in query or "__nonce" in query:
            cursor = (query.get("__nonce", ""), query.get("__token", ""))
            found = call.nation.v1_cursors.get(cursor)
            if found is None:
                return _api_error(400, "bad_request", "Invalid pagination token", V1_TYPE)
            offset = found
        people = sorted(call.nation.people.values(), key=lambda p: int(p["id"]))
        page = people[offset : offset + limit]

        def cursor_link(target: int) -> str:
            nonce, token = secrets.token_urlsafe(8), secrets.token_urlsafe(16)
            call.nation.v1_cursors[(nonce, token)] = target
            params = [("__nonce", nonce), ("__token", token), ("limit", str(limit))]
            return self._link(call, "/api/v1/people", params)

        next_link = cursor_link(offset + limit) if offset + limit < len(people) else None
        prev_link = cursor_link(max(0, offset - limit)) if offset > 0 else None
        return web.json_response(
            {"results": [dict(p) for p in page], "next": next_link, "prev": prev_link}
        )

    async def _v1_show(self, call: _ApiCall) -> web.StreamResponse:
        person = _find_person(call.nation, call.match.group("id"))
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V1_TYPE)
        return web.json_response({"person": dict(person)})

    async def _v1_me(self, call: _ApiCall) -> web.StreamResponse:
        person = call.nation.people.get(ME_ID)
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V1_TYPE)
        return web.json_response({"person": dict(person)})

    async def _v1_create(self, call: _ApiCall) -> web.StreamResponse:
        fields = await _v1_person_fields(call.request)
        if isinstance(fields, web.Response):
            return fields
        person = _add_person(call.nation, fields)
        return web.json_response({"person": dict(person)}, status=201)

    async def _v1_update(self, call: _ApiCall) -> web.StreamResponse:
        person = _find_person(call.nation, call.match.group("id"))
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V1_TYPE)
        fields = await _v1_person_fields(call.request)
        if isinstance(fields, web.Response):
            return fields
        person.update(fields)
        return web.json_response({"person": dict(person)})

    async def _v1_delete(self, call: _ApiCall) -> web.StreamResponse:
        person = _find_person(call.nation, call.match.group("id"))
        if person is None:
            return _api_error(404, "not_found", MSG_NOT_FOUND, V1_TYPE)
        del call.nation.people[person["id"]]
        return web.Response(status=204)

    # --- test helpers

    async def _test_echo(self, call: _ApiCall) -> web.StreamResponse:
        request = call.request
        body = await request.read()
        doc = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query_string": request.query_string,
            "headers": dict(request.headers.items()),
            "body_b64": base64.b64encode(body).decode("ascii"),
        }
        return web.json_response(doc, headers={"ETag": '"echo"', "X-Custom-Upstream": "yes"})

    async def _test_bytes(self, call: _ApiCall) -> web.StreamResponse:
        query = call.request.query
        try:
            total = int(query.get("n", "0"))
            chunk = int(query.get("chunk", "65536"))
        except ValueError:
            return _api_error(400, "bad_request", "n and chunk must be integers", V1_TYPE)
        if total < 0 or not 1 <= chunk <= 16 * 1024 * 1024:
            return _api_error(400, "bad_request", "need n >= 0 and 1 <= chunk <= 16 MiB", V1_TYPE)
        response = web.StreamResponse(headers=call.headers)
        response.content_type = "application/octet-stream"
        if query.get("framing") != "chunked":  # chunked: no Content-Length, as many APIs do
            response.content_length = total
        await response.prepare(call.request)
        # Byte at offset p is p % 256, so a receiver can verify order and integrity; one
        # pattern buffer of chunk+256 bytes is sliced for every write, never N bytes.
        pattern = bytes(range(256)) * (chunk // 256 + 2)
        sent = 0
        while sent < total:
            size = min(chunk, total - sent)
            start = sent % 256
            await response.write(pattern[start : start + size])
            sent += size
        await response.write_eof()
        return response

    async def _test_status(self, call: _ApiCall) -> web.StreamResponse:
        code = int(call.match.group("code"))
        if not 200 <= code <= 599:
            return _api_error(400, "bad_request", "status must be 200..599", V1_TYPE)
        if code in (204, 304):
            return web.Response(status=code)
        if code in (301, 302, 303, 307, 308):
            return web.Response(
                status=code,
                text="redirecting",
                headers={"Location": "https://example.invalid/elsewhere"},
            )
        if code == 503:
            return web.Response(
                status=503,
                text=_cloudflare_page(503, "Service unavailable"),
                content_type="text/html",
            )
        return web.json_response(
            {"code": f"status_{code}", "message": f"fake status {code}"}, status=code
        )

    async def _test_absolute_links(self, call: _ApiCall) -> web.StreamResponse:
        call.force_absolute = True
        person = call.nation.people.get(ME_ID) or next(iter(call.nation.people.values()), None)
        pages = [("page[number]", "1"), ("page[size]", "1")]
        doc: dict[str, Any] = {
            "data": [self._signup_resource(call, person)] if person else [],
            "links": {
                "self": self._link(call, "/api/v2/signups", pages),
                "next": self._link(
                    call, "/api/v2/signups", [("page[number]", "2"), ("page[size]", "1")]
                ),
            },
            "meta": {},
        }
        return web.json_response(doc, content_type=V2_TYPE)

    async def _test_canned(self, call: _ApiCall) -> web.StreamResponse:
        canned = self.canned
        nation = f"{self._public_base(call.request)}/{call.nation.slug}"
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value.replace("{nation}", nation)) for name, value in canned.headers
        )
        body = canned.body.replace(b"{nation}", nation.encode()) if canned.body else b""
        if canned.status in (204, 304):
            return web.Response(status=canned.status, headers=headers)
        return web.Response(status=canned.status, headers=headers, body=body)

    # ------------------------------------------------------------------ control endpoints

    async def _state_handler(self, request: web.Request) -> web.StreamResponse:
        token_counts: dict[str, dict[str, int]] = {}
        for record in self.token_requests:
            grant = record.params().get("grant_type") or "unknown"
            per_slug = token_counts.setdefault(record.slug, {})
            per_slug[grant] = per_slug.get(grant, 0) + 1
        api_counts: dict[str, int] = {}
        for record in self.api_requests:
            api_counts[record.slug] = api_counts.get(record.slug, 0) + 1
        return web.json_response(
            {
                "requests_total": len(self.requests),
                "token_requests": token_counts,
                "token_requests_total": len(self.token_requests),
                "api_requests": api_counts,
                "api_requests_total": len(self.api_requests),
                "pending_token_requests": self._pending_tokens,
                "rate_limit": self.rate_limit,
                "rate_window": self.rate_window,
                "rate_limited_total": self.rate_limited_count,
                "queued_token_failures": list(self._token_failures),
                "nations": sorted(self._nations),
            }
        )

    async def _control_handler(self, request: web.Request) -> web.StreamResponse:
        try:
            command = json.loads(await request.read())
        except ValueError:
            return _control_error("body must be JSON")
        if not isinstance(command, dict):
            return _control_error("body must be a JSON object")
        try:
            result = self._control(command)
        except (ValueError, TypeError, KeyError) as exc:
            return _control_error(str(exc))
        return web.json_response({"ok": True, **result})

    def _control(self, command: dict[str, Any]) -> dict[str, Any]:
        """Apply one control command (the same operations as the Python methods)."""
        action = command.get("action")
        slug = command.get("slug")
        if slug is not None and not isinstance(slug, str):
            raise TypeError("slug must be a string")
        if action == "expire_access_tokens":
            self.expire_access_tokens(slug)
        elif action == "revoke":
            self.revoke(_required(slug, "slug"))
        elif action == "fail_token":
            times = command.get("times", 1)
            if not isinstance(times, int) or isinstance(times, bool):
                raise TypeError("times must be an integer")
            self.fail_token(str(command.get("kind")), times)
        elif action == "reset":
            self.reset_switches()
        elif action == "mangle_token_answers":
            fields, times = command.get("fields"), command.get("times", 1)
            if not isinstance(fields, dict):
                raise TypeError("fields must be an object")
            if not isinstance(times, int) or isinstance(times, bool):
                raise TypeError("times must be an integer")
            self.mangle_token_answers(fields, times)
        elif action == "hold_tokens":
            self.hold_tokens()
        elif action == "release_tokens":
            self.release_tokens()
        elif action == "clear_recordings":
            self.clear_recordings()
        elif action == "issue_tokens":
            return {"tokens": self.issue_tokens(_required(slug, "slug"))}
        elif action == "add_legacy_token":
            token = command.get("token")
            if not isinstance(token, str) or not token:
                raise TypeError("token must be a non-empty string")
            self.add_legacy_token(_required(slug, "slug"), token)
        elif action == "canned":
            status = command.get("status", 200)
            if not isinstance(status, int) or isinstance(status, bool):
                raise TypeError("status must be an integer")
            pairs = command.get("headers", [])
            if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                for p in pairs
            ):
                raise TypeError("headers must be a list of [name, value] strings")
            if "body_b64" in command:
                body = base64.b64decode(str(command["body_b64"]), validate=True)
            else:
                text = command.get("body", "")
                if not isinstance(text, str):
                    raise TypeError("body must be a string (or give body_b64)")
                body = text.encode()
            self.set_canned(status=status, headers=[(n, v) for n, v in pairs], body=body)
        elif action == "set":
            updates = {k: v for k, v in command.items() if k != "action"}
            for name, value in updates.items():
                _check_settable(name, value)
            for name, value in updates.items():
                setattr(self, name, value)
            return {"set": updates}
        else:
            raise ValueError(f"unknown action {action!r}")
        return {}


_ApiHandler = Callable[[_ApiCall], Awaitable[web.StreamResponse]]
_ANY_METHOD: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _m(*methods: str) -> frozenset[str]:
    return frozenset(methods)


def _check_slug(slug: str) -> str:
    if not SLUG_RE.fullmatch(slug):
        raise ValueError(f"invalid nation slug {slug!r}: use [a-z0-9-]+")
    return slug


def _required(value: str | None, name: str) -> str:
    if not value:
        raise ValueError(f"{name} is required")
    return value


def _check_settable(name: str, value: Any) -> None:
    expected = _SETTABLE.get(name)
    if expected is None:
        raise ValueError(f"{name!r} cannot be set; settable: {sorted(_SETTABLE)}")
    # bool is an int subclass in Python; JSON true must not become a rate limit of 1.
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise TypeError(f"{name} must be {expected.__name__}")


def _control_error(message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=400)


def _api_error(status: int, code: str, message: str, content_type: str) -> web.Response:
    return web.json_response(
        {"code": code, "message": message}, status=status, content_type=content_type
    )


def _bearer_token(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    # NB still honours the legacy ?access_token= query parameter.
    return request.query.get("access_token", "")


def _drop_connection(request: web.Request) -> web.Response:
    """Close the socket without writing anything; the returned response is never sent."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


def _seed_people(slug: str) -> dict[int, dict[str, Any]]:
    people: dict[int, dict[str, Any]] = {}
    count = len(_FIRST_NAMES)
    for index in range(SEED_PEOPLE):
        first = _FIRST_NAMES[index % count]
        # Shifting the surname once per lap over the first names keeps every pair distinct.
        last = _LAST_NAMES[(index + index // count) % len(_LAST_NAMES)]
        pid = index + 1
        people[pid] = {
            "id": pid,
            "first_name": first,
            "last_name": last,
            "email": f"{first}.{last}.{pid}@{slug}.example".lower(),
        }
    return people


def _find_person(nation: _Nation, raw_id: str) -> dict[str, Any] | None:
    if not raw_id.isdigit():
        return None
    return nation.people.get(int(raw_id))


def _add_person(nation: _Nation, fields: dict[str, Any]) -> dict[str, Any]:
    pid = nation.next_person_id
    nation.next_person_id += 1
    person: dict[str, Any] = {"id": pid, "first_name": None, "last_name": None, "email": None}
    person.update(fields)
    person["id"] = pid
    nation.people[pid] = person
    return person


async def _v2_attributes(request: web.Request) -> dict[str, Any] | web.Response:
    """The attributes of a JSON:API write body, or the 400 answer for a malformed one."""
    try:
        doc = json.loads(await request.read())
    except ValueError:
        return _api_error(400, "bad_request", "The request body is not valid JSON", V2_TYPE)
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict) or data.get("type") != "signups":
        return _api_error(400, "bad_request", 'Expected {"data":{"type":"signups",...}}', V2_TYPE)
    attributes = data.get("attributes", {})
    if not isinstance(attributes, dict):
        return _api_error(400, "bad_request", "data.attributes must be an object", V2_TYPE)
    attributes.pop("id", None)
    return attributes


def _v2_validate(
    nation: _Nation, attributes: dict[str, Any], *, current_id: int | None, creating: bool
) -> web.Response | None:
    """The 422 JSON:API errors document for invalid attributes, or None."""
    if creating or "email" in attributes:
        email = attributes.get("email")
        if not isinstance(email, str) or not email.strip():
            return _validation_error("email", "can't be blank", "blank")
        taken = any(
            str(p.get("email") or "").lower() == email.lower() and p["id"] != current_id
            for p in nation.people.values()
        )
        if taken:
            return _validation_error("email", "has already been taken", "taken")
    return None


def _validation_error(attribute: str, message: str, code: str) -> web.Response:
    error = {
        "code": "unprocessable_entity",
        "status": "422",
        "title": "Validation Error",
        "detail": f"{attribute} {message}",
        "source": {"pointer": f"/data/attributes/{attribute}"},
        "meta": {"attribute": attribute, "message": message, "code": code},
    }
    return web.json_response({"errors": [error]}, status=422, content_type=V2_TYPE)


async def _v1_person_fields(request: web.Request) -> dict[str, Any] | web.Response:
    """The fields of a v1 ``{"person": {...}}`` body, or the 400 answer for a bad one."""
    try:
        doc = json.loads(await request.read())
    except ValueError:
        return _api_error(400, "bad_request", "The request body is not valid JSON", V1_TYPE)
    person = doc.get("person") if isinstance(doc, dict) else None
    if not isinstance(person, dict):
        return _api_error(400, "bad_request", 'Expected {"person":{...}}', V1_TYPE)
    email = person.get("email")
    if email is not None and (not isinstance(email, str) or "@" not in email):
        return web.json_response(
            {
                "code": "validation_failed",
                "message": "Validation Failed.",
                "validation_errors": ["email is invalid"],
            },
            status=400,
        )
    person.pop("id", None)
    return person


# ---------------------------------------------------------------------- standalone entry point


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeNationBuilder(
        client_id=args.client_id,
        client_secret=args.client_secret,
        auto_approve=args.auto_approve,
        absolute_links=args.absolute_links,
    )
    url = await fake.start(args.host, args.port)
    # Machine-readable first line: the demo and browser tests parse the URL from it.
    sys.stdout.write(f"fake NationBuilder listening on {url}\n")
    sys.stdout.flush()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows has no add_signal_handler
            loop.add_signal_handler(signum, stopped.set)
    try:
        await stopped.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone: ``python -m nbgateway.fakenb --port 8099 [--auto-approve]``."""
    parser = argparse.ArgumentParser(
        prog="python -m nbgateway.fakenb", description="Run a fake NationBuilder server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--auto-approve", action="store_true", help="skip the consent page")
    parser.add_argument("--absolute-links", action="store_true", help="emit absolute API links")
    parser.add_argument("--client-id", default="fake-client-id")
    parser.add_argument("--client-secret", default="fake-client-secret")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
