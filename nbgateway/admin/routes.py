"""Mounts the admin pages on the `/connect` sub-application."""

from __future__ import annotations

from aiohttp import web

from nbgateway import admin_api
from nbgateway.admin.clients import ClientPages
from nbgateway.admin.core import AdminCore, security_headers
from nbgateway.admin.login import LoginPages
from nbgateway.admin.nation import NationPages
from nbgateway.admin.nations import NationsPages
from nbgateway.config import Settings


def setup(connect: web.Application, settings: Settings) -> AdminCore:
    """Add the HTML pages to `connect` (before it is added to the main app)."""
    core = AdminCore(settings)
    # Outermost: the allow-list's 403 (the middleware the sub-application was made with)
    # carries the headers too, as every /connect answer does.
    connect.middlewares.insert(0, security_headers(core))
    nations = NationsPages(core)
    connect[admin_api.CALLBACK_RENDERER] = nations.callback_result
    connect[admin_api.BINDING] = core.binding_of
    router = connect.router
    for pages in (nations, LoginPages(core), NationPages(core), ClientPages(core)):
        pages.add_routes(router)
    router.add_get("/static/admin.css", core.stylesheet)
    return core
