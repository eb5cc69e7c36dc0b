"""The gateway's service graph, opened and closed as one unit.

`open_services` builds store, upstream HTTP session, OAuth client, token manager,
account service and client-key registry from the settings, in dependency order, and
closes them in reverse. The server (`app.py`) and the CLI's account and client commands
both use it, so `nbgateway accounts refresh` runs exactly the code the server runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from nbgateway.accounts import AccountService
from nbgateway.clients import ClientAuth, ClientRegistry
from nbgateway.clock import Clock
from nbgateway.config import Settings
from nbgateway.crypto import Cipher
from nbgateway.metrics import Metrics
from nbgateway.notify import NOTIFY_GRACE
from nbgateway.oauth import NationBuilderOAuth
from nbgateway.redact import Redactor
from nbgateway.server import REQUESTS_GRACE
from nbgateway.store import TokenStore, make_store
from nbgateway.tokens import NeedsReauthListener, TokenManager

# Seconds a stop gives a refresh in flight beyond NBGW_TOKEN_TIMEOUT (storing the answer).
CLOSE_GRACE = 5.0


def stop_grace(settings: Settings) -> float:
    """The longest one process takes to stop: open requests (REQUESTS_GRACE), then a
    refresh in flight (NBGW_TOKEN_TIMEOUT + CLOSE_GRACE), the queued audit entries
    (CLOSE_GRACE) and webhook deliveries on their way (NOTIFY_GRACE); 88 s by default. A
    `--workers` parent waits this long before it kills."""
    return REQUESTS_GRACE + settings.token_timeout + 2 * CLOSE_GRACE + NOTIFY_GRACE


@dataclass(frozen=True)
class Services:
    store: TokenStore
    http: aiohttp.ClientSession
    oauth: NationBuilderOAuth
    tokens: TokenManager
    accounts: AccountService
    clients: ClientRegistry


def new_upstream_session() -> aiohttp.ClientSession:
    """The pooled client session used for NationBuilder (API and token endpoint)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=100, ttl_dns_cache=300),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep upstream cookies
        trust_env=False,
    )


def store_for(
    settings: Settings,
    clock: Clock,
    redactor: Redactor | None = None,
    *,
    busy_timeout: float | None = None,
    migrate: bool = True,
) -> TokenStore:
    """The store named by the settings (not yet opened)."""
    return make_store(
        settings.database,
        Cipher(settings.encryption_keys),
        clock,
        token_timeout=settings.token_timeout,
        on_secret=redactor.add if redactor is not None else None,
        busy_timeout=busy_timeout,
        migrate=migrate,
    )


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    clock: Clock,
    metrics: Metrics,
    redactor: Redactor,
    session: aiohttp.ClientSession | None = None,
    on_needs_reauth: NeedsReauthListener | None = None,
) -> AsyncIterator[Services]:
    """Open every service; close them in reverse order on exit."""
    for secret in settings.secrets():
        redactor.add(secret)
    async with store_for(settings, clock, redactor) as store:
        http = session if session is not None else new_upstream_session()
        try:
            oauth = NationBuilderOAuth(http, settings, clock)
            tokens = TokenManager(
                store,
                oauth,
                metrics,
                clock,
                margin=settings.refresh_margin,
                on_needs_reauth=on_needs_reauth,
            )
            await tokens.sync(force=True)
            clients = ClientRegistry(
                store,
                clock,
                metrics,
                mode=ClientAuth(settings.client_auth),
                audit_retention=settings.audit_retention_days * 86400,
                redactor=redactor,
            )
            await clients.sync(force=True)
            try:
                yield Services(
                    store=store,
                    http=http,
                    oauth=oauth,
                    tokens=tokens,
                    accounts=AccountService(store, tokens, oauth),
                    clients=clients,
                )
            finally:
                # Refreshes in flight finish while the session and the store are still open.
                await tokens.close(settings.token_timeout + CLOSE_GRACE)
                await clients.close(CLOSE_GRACE)  # what is still queued
        finally:
            if session is None:
                await http.close()
