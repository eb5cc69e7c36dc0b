"""The plumbing every admin page shares: sessions from cookies, flash messages, rendering,
CSRF-checked forms, redirects, error pages, and the security headers of every `/connect`
response.

One `AdminCore` per `/connect` sub-application; the page modules (`login`, `nations`,
`nation`, `clients`) hold a reference to it and add their handlers. No JavaScript; Jinja2
templates with autoescaping; a strict Content-Security-Policy on every response.

Logging out revokes the session in the store (`keys.SESSION_REVOCATIONS`, a hash of the
session id), so every process sharing the database refuses that cookie from then on. When
the store cannot be written the revocation is kept in this process's memory only (with a
warning); when it cannot be read, `session_of` answers 503 (`store_unavailable`) rather
than accept a session it cannot check. A gateway error or a store failure in a page is
answered with an HTML error page (the admin API keeps its JSON), with the same security
headers. None of this runs on the proxy path.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestPayloadError

from nbgateway import keys
from nbgateway.admin.session import Session, Signer
from nbgateway.admin.views import NationLink, form_action_sources, moment, path_part
from nbgateway.browsers import own_hosts
from nbgateway.clients import is_valid_name
from nbgateway.config import Settings
from nbgateway.errors import (
    GatewayError,
    InvalidRequest,
    RequestTooLarge,
    StoreError,
    store_failure,
)
from nbgateway.middleware import error_response, router_error
from nbgateway.models import AccountInfo, AccountStatus, is_valid_slug
from nbgateway.redact import same_secret

log = logging.getLogger("nbgateway.admin")

SESSION_COOKIE = "nbgw_session"
FLASH_COOKIE = "nbgw_flash"
SESSION_TTL = 12 * 3600
FLASH_TTL = 120
# The needs-reauth banner names at most this many nations (the table lists them all).
BANNER_SHOWN = 10


class AdminCore:
    """What the page handlers share; one instance per `/connect` sub-application."""

    def __init__(self, settings: Settings) -> None:
        public = urlsplit(settings.public_url)
        prefix = public.path.rstrip("/")
        self.base = f"{prefix}/connect"  # as the browser sees it (behind a path prefix too)
        self.public_origin = _origin(public.scheme, public.netloc.lower())
        self.public_url = f"{public.scheme}://{public.netloc}"
        self.own_hosts = own_hosts(settings.public_url, settings.allowed_hosts)
        self.secure = settings.secure_cookies
        self.signer = Signer(settings.admin_token.reveal())
        self.csp = (
            "default-src 'none'; style-src 'self'; img-src 'self'; "
            f"form-action {form_action_sources(settings.nation_url)}; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        self.css = resources.files("nbgateway").joinpath("static/admin.css").read_bytes()
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("nbgateway", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    @staticmethod
    def now(request: web.Request) -> float:
        return request.config_dict[keys.CLOCK].now()

    async def session_of(
        self, request: web.Request, *, check_revoked: bool = True
    ) -> Session | None:
        """The request's valid, not logged-out session, or None.

        TokenStoreUnavailable (503) when the store cannot say whether it was logged out.
        `check_revoked=False` (logging out) skips that question: ending a session that has
        already ended is harmless, and it must work while the store is down.
        """
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            return None
        now = self.now(request)
        session = self.signer.read_session(value, now)
        if session is None or not check_revoked:
            return session
        try:
            revoked = await request.config_dict[keys.SESSION_REVOCATIONS].revoked(session, now)
        except StoreError as exc:
            log.error(
                "admin session not checked: the store cannot be read", extra={"error": str(exc)}
            )
            raise store_failure(exc) from None
        return None if revoked else session

    async def binding_of(self, request: web.Request) -> str:
        """admin_api.BINDING: the session a started authorization belongs to ("" if none)."""
        session = await self.session_of(request)
        return session.binding if session is not None else ""

    def cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        # SameSite=Lax, not Strict: NationBuilder's redirect back to /connect/callback is a
        # cross-site navigation, and under Strict the browser would not send the session
        # cookie with it, so the callback could not match the authorization to the session
        # that started it. Lax still withholds the cookie from cross-site POSTs; every POST
        # also needs the CSRF token.
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.base,
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )

    def forget_cookie(self, response: web.StreamResponse, name: str) -> None:
        response.del_cookie(name, path=self.base, secure=self.secure, httponly=True, samesite="Lax")

    def flash(self, request: web.Request, response: web.StreamResponse, **message: Any) -> None:
        """Attach a one-time message to a redirect (never a secret: it is a signed cookie)."""
        message["exp"] = self.now(request) + FLASH_TTL
        self.cookie(response, FLASH_COOKIE, self.signer.flash_cookie(message), FLASH_TTL)

    @staticmethod
    def redirect(location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location})

    def to_login(self) -> web.Response:
        return self.redirect(f"{self.base}/login")

    def nation_url(self, slug: str) -> str:
        return f"{self.base}/nations/{path_part(slug)}"

    def flash_text(self, request: web.Request, message: dict[str, Any]) -> tuple[str, str]:
        """(level, text) of a flash message."""
        kind, slug = str(message.get("kind", "")), str(message.get("slug", ""))
        now = self.now(request)
        if kind == "connected":
            return "ok", f"Connected {slug}."
        if kind == "reauthorized":
            return "ok", f"Re-authorized {slug}."
        if kind == "refreshed":
            expiry = moment(float(message.get("expires_at", now)), now, expiry=True)
            return "ok", (
                f"Refreshed {slug}. Its new access token expires {expiry.relative} "
                f"({expiry.exact})."
            )
        if kind == "reauth":
            return "error", (
                f"{slug} needs re-authorization: NationBuilder no longer accepts its refresh "
                "token. Use its Re-authorize button."
            )
        if kind == "backoff":
            # TokenManager.retry_after_backoff (in the background loop) keeps this promise.
            return "error", (
                f"Refreshing {slug} failed; the gateway retries in {message.get('retry', 0)} s. "
                f"{message.get('detail', '')}"
            ).strip()
        if kind == "failed":
            return "error", f"Refreshing {slug} failed: {message.get('detail', '')}"
        if kind == "missing":
            # The slug came from the address: only a well-formed one is repeated, so a link
            # cannot put its own words into the page.
            if not is_valid_slug(slug):
                return "error", "There is no account at that address."
            return "error", f"There is no account named {slug}."
        if kind == "disconnected":
            return "ok", f"Disconnected {slug}. Its tokens were deleted."
        if kind == "client_removed":
            return "ok", f"Removed the client key {message.get('name', '')}. It no longer works."
        if kind == "client_missing":
            name = str(message.get("name", ""))
            if not is_valid_name(name):  # from the address, like a missing account's slug
                return "error", "There is no client key at that address."
            return "error", f"There is no client key named {name}."
        if kind == "logged_out":
            return "ok", "You are logged out."
        return "ok", ""

    async def render(
        self,
        request: web.Request,
        template: str,
        *,
        session: Session | None,
        status: int = 200,
        headers: dict[str, str] | None = None,
        accounts: list[AccountInfo] | None = None,
        **context: Any,
    ) -> web.Response:
        """Render a page: the needs-reauth banner and any flash message come with it."""
        banner: list[NationLink] = []
        if session is not None:
            if accounts is None:
                accounts = await request.config_dict[keys.ACCOUNTS].list_accounts()
            banner = [
                NationLink(a.slug, path_part(a.slug))
                for a in accounts
                if a.status is AccountStatus.NEEDS_REAUTH
            ]
        flash = None
        raw_flash = request.cookies.get(FLASH_COOKIE)
        if raw_flash:
            message = self.signer.read_flash(raw_flash, self.now(request))
            if message is not None:
                flash = self.flash_text(request, message)
        response = self._page(
            template,
            status,
            headers,
            csrf=session.csrf if session is not None else "",
            banner=banner,
            flash=flash,
            **context,
        )
        if raw_flash:
            self.forget_cookie(response, FLASH_COOKIE)
        return response

    def _page(
        self,
        template: str,
        status: int,
        headers: dict[str, str] | None,
        *,
        csrf: str = "",
        banner: list[NationLink] | None = None,
        flash: tuple[str, str] | None = None,
        **context: Any,
    ) -> web.Response:
        """`template` rendered with what base.html needs; no I/O."""
        banner = banner or []
        body = self.env.get_template(template).render(
            base=self.base,
            csrf=csrf,
            banner=banner[:BANNER_SHOWN],
            banner_more=max(0, len(banner) - BANNER_SHOWN),
            banner_count=len(banner),
            flash=flash,
            **context,
        )
        return web.Response(text=body, status=status, content_type="text/html", headers=headers)

    def error_page(self, request: web.Request, err: GatewayError) -> web.Response:
        """`err` for a browser: a page saying what failed (no store read, no navigation: it
        must render while the database is down); the admin API's JSON for /connect/api/."""
        if request.path.startswith("/connect/api/"):
            return error_response(err)
        return self._page(
            "error.html",
            err.status,
            {"X-NBGW-Error": err.code, **err.headers},
            title=err.title,
            detail=err.detail,
            retry=err.headers.get("Retry-After"),
        )

    def cross_site(self, request: web.Request) -> str | None:
        """Why a browser's request must not count as the admin's own (its message), or None.

        Another site's page: its Sec-Fetch-Site is neither same-origin nor none (typed or
        bookmarked); or, from a browser that sends no Sec-Fetch-Site (every browser, to a
        plain-http address that is not loopback), an Origin that is neither this request's
        Host nor NBGW_PUBLIC_URL's, or `Origin: null`: a page in a sandboxed frame, while
        the pages' own forms send their real Origin (Referrer-Policy: same-origin). With
        Sec-Fetch-Site same-origin, `Origin: null` is an older page's form (its no-referrer
        policy, still cached). A browser's request to a Host that is not one of the
        gateway's names (`OwnHosts`) may come from a page whose domain was rebound to the
        gateway's address, which makes it same-origin. Clients that send neither header
        (curl, scripts) are not browsers used by another site."""
        headers = request.headers
        site = headers.get("Sec-Fetch-Site")
        origin = headers.get("Origin")
        if site is None and origin is None:
            return None
        if site is not None:
            if site.strip().lower() not in ("same-origin", "none"):
                return _ANOTHER_SITE
        elif origin is not None:
            if origin.strip().lower() == "null":
                return _ANOTHER_SITE
            parts = urlsplit(origin.strip().lower())
            sent = _origin(parts.scheme, parts.netloc)
            if sent == self.public_origin:
                return None
            # The Host the browser used (a proxy in front may speak plain HTTP to the
            # gateway, so the scheme is the Origin's own).
            if sent != _origin(parts.scheme, headers.get("Host", "").lower()):
                return _ANOTHER_SITE
        host = headers.get("Host", "")
        if host in self.own_hosts:
            return None
        return (
            f"This page was opened at {host[:100]!r}, which is not an address of the gateway "
            f"(NBGW_PUBLIC_URL's host, an IP address, localhost, a name without a dot, or one "
            f"in NBGW_ALLOWED_HOSTS). Open {self.public_url}{self.base}/login and log in there."
        )

    async def checked_form(
        self, request: web.Request, *, check_revoked: bool = True
    ) -> tuple[Session, dict[str, str]] | web.Response:
        """A POST form's session and fields, or the response refusing it (login, 403)."""
        session = await self.session_of(request, check_revoked=check_revoked)
        if session is None:
            return self.to_login()
        fields = await read_form(request)
        if not same_secret(fields.get("csrf", ""), session.csrf):
            log.warning(
                "admin form refused: missing or wrong CSRF token", extra={"path": request.path}
            )
            return await self.render(request, "forbidden.html", session=session, status=403)
        return session, fields

    async def stylesheet(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.css, content_type="text/css")


_ANOTHER_SITE = (
    "This login was sent from another site's page. Open the gateway's own login page and "
    "log in there."
)


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port spelled out, for comparing
    origins (`https://h` and `https://h:443` are one)."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return (scheme, netloc, None)
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return (scheme, parts.hostname or "", port)


def _content_encoded(request: web.Request) -> bool:
    """Whether the body says it is compressed. The server hands bodies on as sent
    (`server.REQUEST_HANDLER_OPTIONS`); an admin body is read only when it is plain."""
    return request.headers.get("Content-Encoding", "").strip().lower() not in ("", "identity")


async def read_form(request: web.Request) -> dict[str, str]:
    """The text fields of a POSTed form; InvalidRequest (400, the HTML error page) for a
    body that cannot be read as one (compressed, a truncated multipart body, a bad encoding,
    an unknown charset or transfer encoding: aiohttp raises ValueError, LookupError,
    RuntimeError)."""
    usage = (
        "the form could not be read; send it from the page (or as "
        "application/x-www-form-urlencoded in UTF-8, uncompressed)"
    )
    if _content_encoded(request):
        raise InvalidRequest(usage)
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except (ValueError, LookupError, RuntimeError, HttpProcessingError, RequestPayloadError):
        raise InvalidRequest(usage) from None
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _too_large(request: web.Request) -> RequestTooLarge:
    """aiohttp's own 413 (plain text) as the gateway's error: a page, or the API's JSON."""
    return RequestTooLarge.over(request.client_max_size)


async def read_json(request: web.Request, usage: str) -> Any:
    """The request's JSON body; InvalidRequest saying `usage` when it is compressed, not
    JSON (or nested too deep to parse), or not in a charset that decodes."""
    if _content_encoded(request):
        raise InvalidRequest(f"{usage}, uncompressed")
    try:
        return await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except (ValueError, LookupError, RecursionError, RequestPayloadError):
        # RecursionError: nested deeper than Python's parser goes ([[[[...]]]]).
        raise InvalidRequest(usage) from None


_ADMIN_SERVED = "there is no admin page at this address; the admin pages start at /connect"


def security_headers(core: AdminCore) -> Middleware:
    """A middleware adding the admin pages' security headers to every /connect response,
    error pages included (gateway errors and store failures become `core.error_page`).

    `Cache-Control: no-store` keeps pages (the one showing a new client key above all) out
    of every cache, including the browser's back-forward history.
    """
    headers = {
        "Content-Security-Policy": core.csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        # No Referer ever leaves the gateway (the callback URL carries the code and state);
        # within it, forms send their real Origin, which the login checks (`cross_site`).
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }

    @web.middleware
    async def add_security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            routed = router_error(request, exc, _ADMIN_SERVED)
            if routed is None:
                for name, value in headers.items():
                    exc.headers.setdefault(name, value)
                raise
            response = core.error_page(request, routed)  # a mistyped admin URL: a page
        except GatewayError as err:
            response = core.error_page(request, err)
        except StoreError as exc:
            log.error(
                "admin request failed: the store could not be used",
                extra={"path": request.path, "error": str(exc)},
            )
            response = core.error_page(request, store_failure(exc))
        if not response.prepared:
            for name, value in headers.items():
                response.headers.setdefault(name, value)
        return response

    return add_security_headers
