"""Typed application keys for the services handlers share across modules.

Handlers read `request.app[KEY]` (or `request.config_dict[KEY]` in sub-apps); the services
themselves receive their collaborators through constructors and never read these keys.
Keys private to one module stay there: `app.PROXY`, `admin_api.CALLBACK_RENDERER` and
`admin_api.BINDING` (hooks the admin pages fill), `middleware.ACCESS_INFO` and
`proxy.BODY_REFUSED` (per-request).
"""

from __future__ import annotations

from aiohttp import web

from nbgateway.accounts import AccountService
from nbgateway.activity import RequestActivity
from nbgateway.admin.session import LoginThrottle, SessionRevocations
from nbgateway.clients import ClientRegistry
from nbgateway.clock import Clock
from nbgateway.config import Settings
from nbgateway.ratelimit import RateLimiter
from nbgateway.redact import Redactor
from nbgateway.store import TokenStore
from nbgateway.tokens import TokenManager

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
REDACTOR = web.AppKey("redactor", Redactor)
STORE = web.AppKey("store", TokenStore)
TOKENS = web.AppKey("tokens", TokenManager)
ACCOUNTS = web.AppKey("accounts", AccountService)
CLIENTS = web.AppKey("clients", ClientRegistry)
# Proxied requests per account in the last hour (read by the admin pages).
ACTIVITY = web.AppKey("activity", RequestActivity)
# Wrong admin tokens per client address (in the store): the login form and /connect/api
# share it.
ADMIN_THROTTLE = web.AppKey("admin_throttle", LoginThrottle)
# Logged-out admin sessions (in the store), checked by every admin page.
SESSION_REVOCATIONS = web.AppKey("session_revocations", SessionRevocations)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)  # snapshot() for admin pages
