"""One nation's page of `/connect` (`/connect/nations/{slug}`): its facts, its actions
(refresh now, re-authorize, disconnect with confirmation), its recent events and its audit
trail (the proxied writes, newest first, from the store).
"""

from __future__ import annotations

from aiohttp import web

from nbgateway import keys
from nbgateway.admin.core import AdminCore
from nbgateway.admin.views import (
    audit_views,
    event_views,
    moment,
    nation_row,
    path_part,
    plain_error,
    reauthorized_at,
)
from nbgateway.errors import (
    AccountNotFound,
    NBGatewayError,
    ReauthorizationRequired,
    RefreshBackoff,
)

EVENTS_SHOWN = 20
AUDIT_SHOWN = 50


class NationPages:
    def __init__(self, core: AdminCore) -> None:
        self.core = core

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/nations/{slug}", self.nation_page)
        router.add_post("/accounts/{slug}/refresh", self.refresh)
        router.add_get("/accounts/{slug}/disconnect", self.disconnect_page)
        router.add_post("/accounts/{slug}/disconnect", self.disconnect)

    def _missing(self, request: web.Request, slug: str) -> web.Response:
        response = self.core.redirect(self.core.base)
        self.core.flash(request, response, kind="missing", slug=slug)
        return response

    async def nation_page(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        session = await core.session_of(request)
        if session is None:
            return core.to_login()
        slug = request.match_info["slug"]
        service = request.config_dict[keys.ACCOUNTS]
        infos = await service.list_accounts()
        info = next((i for i in infos if i.slug == slug), None)
        if info is None:
            return self._missing(request, slug)
        now = core.now(request)
        scrub = request.config_dict[keys.REDACTOR].scrub
        reading = request.config_dict[keys.RATE_LIMITER].snapshot().get(slug)
        row = nation_row(
            info,
            now,
            request.config_dict[keys.SETTINGS].refresh_margin,
            scrub,
            request.config_dict[keys.ACTIVITY].last_hour().get(slug, 0),
            reading,
        )
        events = await service.events(slug, EVENTS_SHOWN)
        again = reauthorized_at(info, events)
        audit = await request.config_dict[keys.STORE].audit(nation=slug, limit=AUDIT_SHOWN)
        return await core.render(
            request,
            "nation.html",
            session=session,
            accounts=infos,
            a=row,
            reauthorized=moment(again, now) if again is not None else None,
            events=event_views(events, now, scrub),
            audit=audit_views(audit, now),
        )

    async def refresh(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        checked = await core.checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        slug = request.match_info["slug"]
        scrub = request.config_dict[keys.REDACTOR].scrub
        response = core.redirect(core.nation_url(slug))
        try:
            info = await request.config_dict[keys.ACCOUNTS].refresh(slug)
        except AccountNotFound:
            return self._missing(request, slug)
        except ReauthorizationRequired:
            core.flash(request, response, kind="reauth", slug=slug)
        except RefreshBackoff as exc:
            retry = exc.retry_seconds
            detail = scrub(plain_error(str(exc)))
            core.flash(request, response, kind="backoff", slug=slug, retry=retry, detail=detail)
        except NBGatewayError as exc:
            core.flash(request, response, kind="failed", slug=slug, detail=scrub(str(exc)))
        else:
            core.flash(
                request, response, kind="refreshed", slug=slug, expires_at=info.expires_at or 0
            )
        return response

    async def disconnect_page(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        session = await core.session_of(request)
        if session is None:
            return core.to_login()
        slug = request.match_info["slug"]
        accounts = await request.config_dict[keys.ACCOUNTS].list_accounts()
        if all(a.slug != slug for a in accounts):
            return self._missing(request, slug)
        return await core.render(
            request,
            "disconnect.html",
            session=session,
            accounts=accounts,
            slug=slug,
            path=path_part(slug),
        )

    async def disconnect(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        checked = await core.checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        slug = request.match_info["slug"]
        removed = await request.config_dict[keys.ACCOUNTS].remove(slug)
        response = core.redirect(core.base)
        core.flash(request, response, kind="disconnected" if removed else "missing", slug=slug)
        return response
