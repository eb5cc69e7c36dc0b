"""Typed application keys: every service an aiohttp handler may look up, in one place.

Handlers read `request.app[KEY]` (or `request.config_dict[KEY]` in sub-apps); the services
themselves receive their collaborators through constructors and never read these keys.
"""

from __future__ import annotations

from aiohttp import web

from nbgateway.accounts import AccountService
from nbgateway.clock import Clock
from nbgateway.config import Settings
from nbgateway.redact import Redactor
from nbgateway.store import SQLiteStore
from nbgateway.tokens import TokenManager

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
REDACTOR = web.AppKey("redactor", Redactor)
STORE = web.AppKey("store", SQLiteStore)
TOKENS = web.AppKey("tokens", TokenManager)
ACCOUNTS = web.AppKey("accounts", AccountService)
