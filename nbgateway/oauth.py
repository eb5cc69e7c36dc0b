"""NationBuilder's OAuth2 endpoints: authorize URL (state + PKCE S256), code exchange, refresh.

Requests are built with Authlib's RFC 6749/7636 helpers and sent through the injected
aiohttp session; expiry is computed from the injected clock. Every failure becomes an
`OAuthError` with a `RefreshOutcome`. Token-endpoint bodies may echo secrets, so no body is
ever logged or put into a message: only the HTTP status and the OAuth `error` code.

The token call's bound (NBGW_TOKEN_TIMEOUT) counts the time this process ran, not the time a
frozen process (SIGSTOP, a paused VM or container, heavy swapping) stood still: an answer
that reached the socket while the process was frozen is read when it resumes, not thrown
away by a timer that fired at the same moment. NationBuilder has rotated by then, so that
answer is the account's only way forward (`bounded`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from nbgateway.clock import Clock
from nbgateway.config import Settings
from nbgateway.errors import OAuthError
from nbgateway.models import RefreshOutcome, TokenSet
from nbgateway.ratelimit import parse_retry_after
from nbgateway.redact import Secret

_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")
# An access token the proxy can send as `Authorization: Bearer ...`: visible ASCII only
# (RFC 6749's VSCHAR without the space), of a length every server takes in one header.
ACCESS_TOKEN_MAX = 4096
_SENDABLE_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{ACCESS_TOKEN_MAX}}}")
# A scope is space-separated printable ASCII (RFC 6749, 3.3); anything else in one (a NUL, a
# lone surrogate from a JSON escape) could not be stored on every backend, and would cost the
# pair it came with: it separates words, as a space does.
_NOT_SCOPE = re.compile(r"[^\x20-\x7e]")
# NationBuilder's access tokens live 24 h; used when a response omits expires_in.
DEFAULT_LIFETIME = 86400.0
# Lifetimes outside this range are clamped: a token endpoint answering 1e20 or -5 must not
# make every stored date unrenderable or every request a refresh.
MIN_LIFETIME = 60.0
MAX_LIFETIME = 30 * 86400.0
# `bounded` looks at the time every STALL_TICK seconds; a look that comes more than
# STALL_SLACK late means the process stood still, and that stretch is not counted.
STALL_TICK = 0.25
STALL_SLACK = 0.5
# No timeout of aiohttp's own on the token call: `bounded` is its bound.
_UNBOUNDED = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None, sock_read=None)

T = TypeVar("T")


async def bounded(call: Awaitable[T], limit: float) -> T:
    """`call`'s result, or TimeoutError once it has run `limit` seconds of this process's
    time (the call is then cancelled). A stretch in which the event loop did not run (the
    process frozen) is not counted, and the round after it always runs, so what arrived
    meanwhile is read however late the freeze came. Real time is capped all the same at
    twice `limit` (below the refresh lease), checked outside those rounds: a loop that is
    only busy, every look late, cannot stretch the call past the lease."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(call)
    left = limit
    cap = loop.time() + 2 * limit
    after_freeze = False
    try:
        while True:
            step = STALL_SLACK if after_freeze else min(left, STALL_TICK)
            before = loop.time()
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                return task.result()
            now = loop.time()
            if now - before > step + STALL_SLACK and not after_freeze:
                left -= step  # frozen meanwhile: one more round to read what came
                after_freeze = True
                continue
            after_freeze = False
            left -= now - before
            if left <= 0 or now >= cap:
                raise TimeoutError
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def clamp_lifetime(raw: Any) -> float:
    """`expires_in` as a sane number of seconds (default when missing or not a number)."""
    try:
        lifetime = float(raw)
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_LIFETIME
    if math.isnan(lifetime):
        return DEFAULT_LIFETIME
    return min(MAX_LIFETIME, max(MIN_LIFETIME, lifetime))


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A started authorization: where to send the admin, and what to remember for the callback."""

    url: str
    state: str
    code_verifier: Secret


class NationBuilderOAuth:
    """OAuth client for every nation of one NationBuilder app."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        clock: Clock,
        *,
        timeout: float | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._clock = clock
        # The token endpoint has its own bound (NBGW_TOKEN_TIMEOUT), shorter than the API's:
        # a refresh holds its account's lease and the requests waiting on it.
        self._limit = timeout if timeout is not None else settings.token_timeout

    def token_url(self, slug: str) -> str:
        return f"{self._settings.nation_base(slug)}/oauth/token"

    def authorize(self, slug: str) -> AuthorizationRequest:
        """Build the authorize URL with a fresh state and PKCE S256 challenge."""
        state = generate_token(43)
        verifier = generate_token(64)
        url = prepare_grant_uri(
            f"{self._settings.nation_base(slug)}/oauth/authorize",
            client_id=self._settings.client_id,
            response_type="code",
            redirect_uri=self._settings.redirect_uri,
            state=state,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        return AuthorizationRequest(url=url, state=state, code_verifier=Secret(verifier))

    async def exchange_code(self, slug: str, code: str, code_verifier: Secret) -> TokenSet:
        """Trade an authorization code (plus the PKCE verifier) for a token pair."""
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=self._settings.redirect_uri,
            client_id=self._settings.client_id,
            client_secret=self._settings.client_secret.reveal(),
            code_verifier=code_verifier.reveal(),
        )
        return await self._token_call(slug, body, previous_refresh=None)

    async def refresh(self, slug: str, refresh_token: Secret) -> TokenSet:
        """Use a refresh token (single-use at NationBuilder) for a new pair."""
        body = prepare_token_request(
            "refresh_token",
            refresh_token=refresh_token.reveal(),
            client_id=self._settings.client_id,
            client_secret=self._settings.client_secret.reveal(),
        )
        return await self._token_call(slug, body, previous_refresh=refresh_token)

    async def _token_call(self, slug: str, body: str, previous_refresh: Secret | None) -> TokenSet:
        started = self._clock.now()
        try:
            status, raw, wait = await bounded(self._post(slug, body), self._limit)
        except TimeoutError:
            raise OAuthError(
                RefreshOutcome.TIMEOUT, "the token endpoint did not answer in time"
            ) from None
        except aiohttp.ClientError as exc:
            # The exception text names host and port only, never the request body.
            raise OAuthError(
                RefreshOutcome.NETWORK_ERROR,
                f"the token endpoint could not be reached ({type(exc).__name__})",
            ) from None
        return self._parse(status, raw, started, previous_refresh, wait)

    async def _post(self, slug: str, body: str) -> tuple[int, bytes, float | None]:
        """The token request, answered: status, body and any Retry-After (in seconds)."""
        async with self._session.post(
            self.token_url(slug),
            data=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
            timeout=_UNBOUNDED,
            allow_redirects=False,
        ) as resp:
            raw = await resp.read()
            return (
                resp.status,
                raw,
                parse_retry_after(resp.headers.get("Retry-After"), self._clock.now()),
            )

    def _parse(
        self,
        status: int,
        raw: bytes,
        started: float,
        previous_refresh: Secret | None,
        retry_after: float | None = None,
    ) -> TokenSet:
        payload: Any
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            payload = None
        # A wait the endpoint asked for, on a refusal only (a 2xx has nothing to wait for).
        wait = retry_after if status >= 400 else None
        asked = "" if wait is None else f"; it asked to wait {math.ceil(wait)} s"
        if status >= 500 or payload is None or not isinstance(payload, dict):
            kind = "an HTML page" if raw.lstrip()[:1] == b"<" else "no usable JSON"
            raise OAuthError(
                RefreshOutcome.SERVER_ERROR,
                f"the token endpoint answered HTTP {status} with {kind}{asked}",
                status=status,
                retry_after=wait,
            )
        if status >= 400:
            code = payload.get("error")
            code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else "unknown"
            if code == "invalid_grant":
                outcome = RefreshOutcome.INVALID_GRANT
            elif code in ("invalid_client", "unauthorized_client"):
                outcome = RefreshOutcome.INVALID_CLIENT
            else:
                # Anything else (429 from the CDN, invalid_request, ...) is worth retrying.
                outcome = RefreshOutcome.SERVER_ERROR
            raise OAuthError(
                outcome,
                f"the token endpoint answered HTTP {status} ({code}){asked}",
                status=status,
                retry_after=wait,
            )
        access = payload.get("access_token")
        issued = payload.get("refresh_token")
        # A new refresh token in the answer means NationBuilder rotated (the old one is spent),
        # whatever else is wrong with the answer: it is handed back with any refusal below.
        rotated = Secret(issued) if isinstance(issued, str) and issued else None
        refresh = (
            rotated.reveal()
            if rotated
            else (previous_refresh.reveal() if previous_refresh else None)
        )
        token_type = str(payload.get("token_type", "bearer"))
        if not isinstance(access, str) or not access or not refresh:
            raise OAuthError(
                RefreshOutcome.SERVER_ERROR,
                f"the token endpoint answered HTTP {status} without a usable token pair",
                status=status,
                rotated_refresh_token=rotated,
            )
        if not _SENDABLE_TOKEN.fullmatch(access):
            raise OAuthError(
                RefreshOutcome.SERVER_ERROR,
                "the token endpoint issued an access token that cannot be sent in an "
                f"Authorization header ({len(access)} characters; spaces or control characters "
                f"are not allowed, nor more than {ACCESS_TOKEN_MAX})",
                status=status,
                rotated_refresh_token=rotated,
            )
        if token_type.lower() != "bearer":
            raise OAuthError(
                RefreshOutcome.SERVER_ERROR,
                "the token endpoint issued a token that is not a bearer token",
                status=status,
                rotated_refresh_token=rotated,
            )
        lifetime = clamp_lifetime(payload.get("expires_in", DEFAULT_LIFETIME))
        scope = payload.get("scope")
        return TokenSet(
            access_token=Secret(access),
            refresh_token=Secret(refresh),
            # Measured from when the request was sent: never later than the server's view.
            expires_at=started + lifetime,
            scope=" ".join(_NOT_SCOPE.sub(" ", scope).split()) if isinstance(scope, str) else "",
        )
