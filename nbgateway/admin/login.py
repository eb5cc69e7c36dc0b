"""The login and logout pages of `/connect`: the admin token in, a signed session cookie out.

Token checks count against the client address in the shared throttle (`keys.ADMIN_THROTTLE`,
in the store, also used by the `/connect/api` Bearer check; a right token takes its count
back, and a check over the limit is not made); an empty form and a form
posted from another site's page are refused without counting (they guess nothing, and
would let any page lock the admin out); while the store cannot be read the form answers
503 and checks no token (fail closed). Logging out revokes the session in
the store (`keys.SESSION_REVOCATIONS`); the cookie is cleared whether or not that write
succeeds.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable

from aiohttp import web

from nbgateway import admin_api, keys
from nbgateway.admin.core import SESSION_COOKIE, SESSION_TTL, AdminCore, read_form
from nbgateway.admin.session import Verdict
from nbgateway.admin.views import span
from nbgateway.errors import StoreError

log = logging.getLogger("nbgateway.admin")


class LoginPages:
    def __init__(self, core: AdminCore) -> None:
        self.core = core

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/login", self.login_page)
        router.add_post("/login", self.login)
        router.add_post("/logout", self.logout)

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        if await core.session_of(request) is not None:
            return core.redirect(core.base)
        return await core.render(request, "login.html", session=None, error=None)

    async def login(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        now = core.now(request)
        client = request.remote or "unknown"
        throttle = request.config_dict[keys.ADMIN_THROTTLE]
        refused = await self._throttled(request, client, throttle.retry_after(client, now))
        if refused is not None:
            return refused
        foreign = core.cross_site(request)
        if foreign is not None:
            # Another site's page posting the form from the admin's browser (an allowed
            # address) guesses nothing, but would lock the admin out: not counted.
            log.warning("admin login refused: posted from another site", extra={"peer": client})
            return await core.render(request, "login.html", session=None, status=403, error=foreign)
        token = (await read_form(request)).get("token")
        if not isinstance(token, str) or not token.strip():
            # Nothing was guessed (an empty field, or no field): not counted.
            return await core.render(
                request,
                "login.html",
                session=None,
                status=400,
                error="Enter the admin token (NBGW_ADMIN_TOKEN).",
            )
        # Counted before the token is checked: racing guesses count each other.
        verdict: Verdict | None = None

        async def check() -> int | None:
            nonlocal verdict
            verdict = await throttle.check(
                client, now, lambda: admin_api.admin_token_matches(request, token.strip())
            )
            return verdict.wait

        refused = await self._throttled(request, client, check())
        if refused is not None:
            return refused
        assert verdict is not None
        if not verdict.right:
            log.warning("admin login failed: wrong token", extra={"peer": client})
            return await core.render(
                request,
                "login.html",
                session=None,
                status=401,
                error="That is not the admin token (NBGW_ADMIN_TOKEN). Check it and try again.",
            )
        session = core.signer.session(secrets.token_urlsafe(18), int(now) + SESSION_TTL)
        response = core.redirect(core.base)
        core.cookie(response, SESSION_COOKIE, core.signer.session_cookie(session), SESSION_TTL)
        log.info("admin logged in", extra={"peer": client})
        return response

    async def _throttled(
        self, request: web.Request, client: str, check: Awaitable[int | None]
    ) -> web.StreamResponse | None:
        """The page to answer when the throttle `check` refuses (or the store cannot say:
        fail closed), else None."""
        try:
            wait = await check
        except StoreError as exc:
            log.error(
                "admin login refused: the throttle cannot be read from the store",
                extra={"peer": client, "error": str(exc)},
            )
            return await self._store_down(request)
        return None if wait is None else await self._locked_out(request, wait)

    async def _store_down(self, request: web.Request) -> web.StreamResponse:
        return await self.core.render(
            request,
            "login.html",
            session=None,
            status=503,
            headers={"Retry-After": "5"},
            error="The gateway cannot use its database right now, so it cannot check "
            "logins. Try again in a few seconds.",
        )

    async def _locked_out(self, request: web.Request, wait: int) -> web.StreamResponse:
        return await self.core.render(
            request,
            "login.html",
            session=None,
            status=429,
            headers={"Retry-After": str(wait)},
            error=f"Too many wrong admin tokens from your address. Try again in {span(wait)}.",
        )

    async def logout(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        checked = await core.checked_form(request, check_revoked=False)
        if isinstance(checked, web.Response):
            return checked
        session, _ = checked
        await request.config_dict[keys.SESSION_REVOCATIONS].revoke(session, core.now(request))
        response = core.to_login()
        core.forget_cookie(response, SESSION_COOKIE)
        core.flash(request, response, kind="logged_out")
        return response
