"""The `/connect` sub-application's machine side: `/connect/api/*` and `/connect/callback`.

`/connect/api/accounts`, `/connect/api/clients` and `/connect/api/audit` speak JSON and
require `Authorization: Bearer NBGW_ADMIN_TOKEN` (compared in constant time); wrong tokens
count against the client address in the same throttle as the login form
(`keys.ADMIN_THROTTLE`, kept in the store so every process counts together), and a
throttled address gets 429; while the store cannot be read the API answers 503
`store_unavailable` and checks no token. `/connect/callback` is
NationBuilder's redirect target: it finishes the authorization started by the API or the
admin pages. They call `AccountService` and `ClientRegistry`, the same code the CLI uses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from nbgateway import keys
from nbgateway.accounts import account_json, check_slug
from nbgateway.admin.core import read_json
from nbgateway.browsers import own_hosts, sent_by_page
from nbgateway.clients import audit_json, client_json
from nbgateway.errors import (
    AdminUnauthorized,
    AuthorizationFailed,
    ClientNotAllowed,
    InvalidRequest,
    NotFound,
    StoreError,
    TokenUnavailable,
    TooManyAttempts,
    UnknownAccount,
    store_failure,
    token_error,
)
from nbgateway.redact import same_secret
from nbgateway.store import ClientExists

T = TypeVar("T")

log = logging.getLogger("nbgateway.admin")

CallbackRenderer = Callable[
    [web.Request, str | None, Exception | None], Awaitable[web.StreamResponse]
]
CALLBACK_RENDERER: web.AppKey[CallbackRenderer] = web.AppKey("callback_renderer")
BINDING: web.AppKey[Callable[[web.Request], Awaitable[str]]] = web.AppKey("binding_of")


def admin_token_matches(request: web.Request, candidate: str) -> bool:
    expected = request.config_dict[keys.SETTINGS].admin_token.reveal()
    return bool(expected) and same_secret(candidate, expected)


async def require_bearer(request: web.Request) -> None:
    """The admin token as Bearer, or 401; an address that sent too many wrong ones gets 429.

    503 when the store cannot say how many wrong tokens the address sent (fail closed).
    A request a web page sent is refused (403) before anything is counted: the API is for
    scripts, and a page (one that rebinds its domain to the gateway's address can send
    any header) would otherwise lock the admin's address out.
    """
    settings = request.config_dict[keys.SETTINGS]
    own_hosts(settings.public_url, settings.allowed_hosts).check(request.headers)
    sent_by = sent_by_page(request.headers)
    if sent_by is not None:
        raise ClientNotAllowed(
            f"a web page in a browser sent this request ({sent_by}); the admin API is for "
            "scripts and the command line, the admin pages are at /connect"
        )
    throttle = request.config_dict[keys.ADMIN_THROTTLE]
    now = request.config_dict[keys.CLOCK].now()
    client = request.remote or "unknown"
    _refuse_while_locked(await _throttle_said(client, throttle.retry_after(client, now)))
    header = request.headers.get("Authorization", "")
    unauthorized = AdminUnauthorized(
        "send Authorization: Bearer <NBGW_ADMIN_TOKEN>",
        headers={"WWW-Authenticate": 'Bearer realm="nbgateway-admin"'},
    )
    if not header:
        raise unauthorized  # a request without credentials guesses nothing
    scheme, _, value = header.partition(" ")
    # Counted before the token is compared: racing guesses count each other.
    verdict = await _throttle_said(
        client,
        throttle.check(
            client,
            now,
            lambda: scheme.lower() == "bearer" and admin_token_matches(request, value.strip()),
        ),
    )
    _refuse_while_locked(verdict.wait)
    if not verdict.right:
        log.warning("admin API refused: wrong admin token", extra={"peer": client})
        raise unauthorized


async def _throttle_said(client: str, answer: Awaitable[T]) -> T:
    """The throttle's `answer`; 503 when it cannot be read from the store (fail closed)."""
    try:
        return await answer
    except StoreError as exc:
        log.error(
            "admin API refused: the throttle cannot be read from the store",
            extra={"peer": client, "error": str(exc)},
        )
        raise store_failure(exc) from None


def _refuse_while_locked(wait: int | None) -> None:
    if wait is not None:
        raise TooManyAttempts(
            f"too many wrong admin tokens from this address; try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _slug(request: web.Request) -> str:
    try:
        return check_slug(request.match_info["slug"])
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


async def list_accounts(request: web.Request) -> web.Response:
    await require_bearer(request)
    accounts = await request.config_dict[keys.ACCOUNTS].list_accounts()
    return _json({"accounts": [account_json(a) for a in accounts]})


async def start_connect(request: web.Request) -> web.Response:
    await require_bearer(request)
    body = await read_json(request, 'send a JSON body like {"nation": "my-nation"}')
    nation = body.get("nation") if isinstance(body, dict) else None
    if not isinstance(nation, str):
        raise InvalidRequest('send a JSON body like {"nation": "my-nation"}')
    try:
        url = await request.config_dict[keys.ACCOUNTS].start_connect(nation.strip())
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return _json({"authorize_url": url}, status=201)


async def refresh_account(request: web.Request) -> web.Response:
    await require_bearer(request)
    slug = _slug(request)
    try:
        info = await request.config_dict[keys.ACCOUNTS].refresh(slug)
    except (TokenUnavailable, StoreError) as exc:
        connect_url = f"{request.config_dict[keys.SETTINGS].public_url}/connect"
        raise token_error(slug, exc, connect_url) from None
    return _json(account_json(info))


async def remove_account(request: web.Request) -> web.Response:
    await require_bearer(request)
    slug = _slug(request)
    if not await request.config_dict[keys.ACCOUNTS].remove(slug):
        raise UnknownAccount(f"no account named {slug!r}")
    return _json({"removed": slug})


async def list_clients(request: web.Request) -> web.Response:
    await require_bearer(request)
    infos = await request.config_dict[keys.CLIENTS].list()
    return _json({"clients": [client_json(info) for info in infos]})


async def add_client(request: web.Request) -> web.Response:
    """POST {"name": ..., "nations": [...], "read_only": bool} -> the client and its key (once)."""
    await require_bearer(request)
    usage = 'send a JSON body like {"name": "sync-job", "nations": ["acme"], "read_only": true}'
    body = await read_json(request, usage)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise InvalidRequest(usage)
    nations = body.get("nations", [])
    read_only = body.get("read_only", False)
    if not isinstance(nations, list) or not all(isinstance(n, str) for n in nations):
        raise InvalidRequest(usage)
    if not isinstance(read_only, bool):
        raise InvalidRequest(usage)
    try:
        info, key = await request.config_dict[keys.CLIENTS].add(
            body["name"].strip(), tuple(n.strip() for n in nations), read_only
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    except ClientExists as exc:
        raise InvalidRequest(str(exc)) from None
    return _json({"client": client_json(info), "key": key.reveal()}, status=201)


async def remove_client(request: web.Request) -> web.Response:
    await require_bearer(request)
    name = request.match_info["name"]
    if not await request.config_dict[keys.CLIENTS].remove(name):
        raise NotFound(f"no client named {name!r}")
    return _json({"removed": name})


async def audit_trail(request: web.Request) -> web.Response:
    """GET ?nation=&client=&limit= : the newest proxied writes."""
    await require_bearer(request)
    query = request.query
    try:
        limit = min(1000, max(1, int(query.get("limit", "100"))))
    except ValueError:
        raise InvalidRequest("limit must be a whole number") from None
    entries = await request.config_dict[keys.STORE].audit(
        nation=query.get("nation") or None, client=query.get("client") or None, limit=limit
    )
    return _json({"audit": [audit_json(e) for e in entries]})


async def callback(request: web.Request) -> web.StreamResponse:
    """NationBuilder redirects here with ?code&state or ?error&state."""
    query = request.query
    binding_of = request.config_dict.get(BINDING)
    binding = await binding_of(request) if binding_of is not None else ""
    renderer = request.config_dict.get(CALLBACK_RENDERER, plain_callback_page)
    try:
        slug = await request.config_dict[keys.ACCOUNTS].finish_connect(
            state=query.get("state", ""),
            code=query.get("code"),
            error=query.get("error"),
            error_description=query.get("error_description"),
            binding=binding,
        )
    except AuthorizationFailed as exc:
        # A trace for the operator (a misconfigured app, a forged or stale link); the
        # query string itself (the code, the state) is never logged.
        log.warning(
            "authorization callback refused",
            extra={"account": exc.slug, "reason": exc.reason, "error": str(exc)},
        )
        return await renderer(request, exc.slug, exc)
    return await renderer(request, slug, None)


async def plain_callback_page(
    request: web.Request, slug: str | None, error: Exception | None
) -> web.StreamResponse:
    """A minimal text answer, used when no HTML admin pages are mounted."""
    if error is None:
        return web.Response(text=f"Connected {slug}. You can close this window.\n")
    return web.Response(status=400, text=f"Authorization failed: {error}\n")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/accounts", list_accounts)
    app.router.add_post("/api/accounts", start_connect)
    app.router.add_post("/api/accounts/{slug}/refresh", refresh_account)
    app.router.add_delete("/api/accounts/{slug}", remove_account)
    app.router.add_get("/api/clients", list_clients)
    app.router.add_post("/api/clients", add_client)
    app.router.add_delete("/api/clients/{name}", remove_client)
    app.router.add_get("/api/audit", audit_trail)
    # Not HEAD as well (aiohttp's default): a HEAD would use up the state and exchange the
    # code, and the GET that follows would be refused.
    app.router.add_get("/callback", callback, allow_head=False)
