"""The client keys page of `/connect` (`/connect/clients`): create a key (name, nations,
read-only), list the keys, remove one after a confirmation.

A new key is shown once, in the answer to the creating POST itself: never in a redirect URL,
never in a cookie (the flash cookie carries only names), and the page is sent with
`Cache-Control: no-store` like every admin page, so neither reload nor back shows it again
(a reload re-submits the form, which the existing name refuses). The store keeps only its
salted hash (`nbgateway.clients`).
"""

from __future__ import annotations

import logging

from aiohttp import web

from nbgateway import keys
from nbgateway.admin.core import AdminCore
from nbgateway.admin.session import Session
from nbgateway.admin.views import ClientView, client_view, parse_nations
from nbgateway.store import ClientExists

log = logging.getLogger("nbgateway.admin")


class ClientPages:
    def __init__(self, core: AdminCore) -> None:
        self.core = core

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/clients", self.clients_get)
        router.add_post("/clients", self.create)
        router.add_get("/clients/{name}/remove", self.remove_page)
        router.add_post("/clients/{name}/remove", self.remove)

    async def clients_page(
        self,
        request: web.Request,
        session: Session,
        *,
        status: int = 200,
        form_error: str | None = None,
        form: dict[str, str] | None = None,
        created: ClientView | None = None,
        key: str | None = None,
    ) -> web.Response:
        core = self.core
        now = core.now(request)
        infos = await request.config_dict[keys.CLIENTS].list()
        return await core.render(
            request,
            "clients.html",
            session=session,
            status=status,
            clients=[client_view(info, now) for info in infos],
            form_error=form_error,
            form={"name": "", "nations": "", "read_only": "", **(form or {})},
            created=created,
            key=key,
        )

    async def clients_get(self, request: web.Request) -> web.StreamResponse:
        session = await self.core.session_of(request)
        if session is None:
            return self.core.to_login()
        return await self.clients_page(request, session)

    async def create(self, request: web.Request) -> web.StreamResponse:
        checked = await self.core.checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        session, fields = checked
        name = fields.get("name", "").strip()
        read_only = fields.get("read_only") == "on"
        form = {"name": name, "nations": fields.get("nations", ""), "read_only": str(read_only)}
        try:
            info, secret = await request.config_dict[keys.CLIENTS].add(
                name, parse_nations(fields.get("nations", "")), read_only
            )
        except (ValueError, ClientExists) as exc:
            message = str(exc)
            return await self.clients_page(
                request,
                session,
                status=400,
                form_error=f"{message[:1].upper()}{message[1:]}.",
                form=form,
            )
        log.info("client key created from the admin pages", extra={"client": info.name})
        return await self.clients_page(
            request,
            session,
            created=client_view(info, self.core.now(request)),
            key=secret.reveal(),
        )

    async def remove_page(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        session = await core.session_of(request)
        if session is None:
            return core.to_login()
        name = request.match_info["name"]
        infos = await request.config_dict[keys.CLIENTS].list()
        info = next((i for i in infos if i.name == name), None)
        if info is None:
            response = core.redirect(f"{core.base}/clients")
            core.flash(request, response, kind="client_missing", name=name)
            return response
        return await core.render(
            request,
            "client_remove.html",
            session=session,
            client=client_view(info, core.now(request)),
        )

    async def remove(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        checked = await core.checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        name = request.match_info["name"]
        removed = await request.config_dict[keys.CLIENTS].remove(name)
        response = core.redirect(f"{core.base}/clients")
        core.flash(
            request, response, kind="client_removed" if removed else "client_missing", name=name
        )
        return response
