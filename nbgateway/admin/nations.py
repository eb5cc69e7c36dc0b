"""The nations list of `/connect`: a compact table, status first, with a search that works
without JavaScript (a GET form filtering by slug); connecting a nation; and where
NationBuilder's redirect (the OAuth callback) lands a human.

The table costs two store queries for the accounts (the listing, and the check that each
row decrypts), whatever their number; the requests in the
last hour come from `keys.ACTIVITY` and the rate-limit readings from the optional
the rate limiter's `snapshot()` (`keys.RATE_LIMITER`).
"""

from __future__ import annotations

from aiohttp import web

from nbgateway import keys
from nbgateway.admin.core import AdminCore
from nbgateway.admin.views import (
    callback_explanation,
    matching,
    nation_row,
    normalize_nation,
    ordered,
    reauthorized_at,
)
from nbgateway.errors import AccountNotFound

# Events read to tell a re-authorization from a first connection.
_EVENTS_FOR_REAUTH = 20


class NationsPages:
    def __init__(self, core: AdminCore) -> None:
        self.core = core

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("", self.nations_get)
        router.add_get("/", self.nations_get)
        router.add_post("/accounts", self.connect)

    async def nations_page(
        self,
        request: web.Request,
        *,
        status: int = 200,
        form_error: str | None = None,
        form_value: str = "",
    ) -> web.StreamResponse:
        core = self.core
        session = await core.session_of(request)
        if session is None:
            return core.to_login()
        infos = await request.config_dict[keys.ACCOUNTS].list_accounts()
        query = request.query.get("q", "").strip()[:100]
        shown = matching(infos, query)
        now = core.now(request)
        margin = request.config_dict[keys.SETTINGS].refresh_margin
        scrub = request.config_dict[keys.REDACTOR].scrub
        counts = request.config_dict[keys.ACTIVITY].last_hour()
        readings = request.config_dict[keys.RATE_LIMITER].snapshot()
        rows = ordered(
            [
                nation_row(i, now, margin, scrub, counts.get(i.slug, 0), readings.get(i.slug))
                for i in shown
            ]
        )
        return await core.render(
            request,
            "nations.html",
            session=session,
            status=status,
            accounts=infos,
            rows=rows,
            total=len(infos),
            query=query,
            form_error=form_error,
            form_value=form_value,
        )

    async def nations_get(self, request: web.Request) -> web.StreamResponse:
        return await self.nations_page(request)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        """Connect or re-authorize a nation: start the flow bound to this session."""
        checked = await self.core.checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        session, fields = checked
        typed = fields.get("nation", "")
        nation = normalize_nation(typed)
        if not nation:
            return await self.nations_page(
                request, status=400, form_error="Enter the nation slug.", form_value=typed
            )
        try:
            url = await request.config_dict[keys.ACCOUNTS].start_connect(nation, session.binding)
        except ValueError as exc:
            message = str(exc)
            return await self.nations_page(
                request,
                status=400,
                form_error=f"{message[:1].upper()}{message[1:]}.",
                form_value=typed,
            )
        return self.core.redirect(url)

    async def callback_result(
        self, request: web.Request, slug: str | None, error: Exception | None
    ) -> web.StreamResponse:
        """admin_api.CALLBACK_RENDERER: where NationBuilder's redirect lands a human."""
        core = self.core
        session = await core.session_of(request)
        if error is None:
            if session is not None and slug:
                service = request.config_dict[keys.ACCOUNTS]
                try:
                    info = await service.get(slug)
                except AccountNotFound:  # disconnected meanwhile; its page says so
                    again = None
                else:
                    events = await service.events(slug, _EVENTS_FOR_REAUTH)
                    again = reauthorized_at(info, events)
                kind = "connected" if again is None else "reauthorized"
                response = core.redirect(core.nation_url(slug))
                core.flash(request, response, kind=kind, slug=slug)
                return response
            # Started through /connect/api: there is no admin session in this browser.
            return await core.render(
                request, "callback.html", session=None, ok=True, slug=slug, title="", explanation=""
            )
        message = request.config_dict[keys.REDACTOR].scrub(str(error))
        title, explanation = callback_explanation(error, message)
        return await core.render(
            request,
            "callback.html",
            session=session,
            status=400,
            ok=False,
            slug=slug,
            title=title,
            explanation=explanation,
        )
