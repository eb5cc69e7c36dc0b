"""The `/connect` admin pages (HTML): log in, see accounts, connect, re-authorize, refresh,
disconnect.

The human face of `AccountService`: every action calls the same methods as the CLI and
`/connect/api`, and the OAuth callback itself stays in `admin_api` (this module only renders
its result, through `admin_api.CALLBACK_RENDERER`). No JavaScript; Jinja2 templates with
autoescaping; a strict Content-Security-Policy on every response.

Sessions, CSRF tokens and login throttling live in `admin_session`. Logging out revokes
the session in this process's memory; the signed cookie itself stays valid elsewhere (other
processes, a restart) until it expires (12 h) or NBGW_ADMIN_TOKEN changes. None of this
runs on the proxy path.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from nbgateway import admin_api, keys
from nbgateway.admin_session import Session, Signer
from nbgateway.clock import utc_datetime
from nbgateway.config import Settings
from nbgateway.errors import (
    AccountNotFound,
    AuthorizationFailed,
    NBGatewayError,
    ReauthorizationRequired,
    RefreshBackoff,
)
from nbgateway.models import AccountInfo, AccountStatus, Event, EventKind

log = logging.getLogger("nbgateway.admin")

SESSION_COOKIE = "nbgw_session"
FLASH_COOKIE = "nbgw_flash"
SESSION_TTL = 12 * 3600
FLASH_TTL = 120
# "Refreshing soon": the access token expires within the refresh margin plus this.
SOON_LEAD = 300.0
EVENTS_SHOWN = 5

_EVENT_WORDS = {
    EventKind.CONNECTED: "connected",
    EventKind.REFRESHED: "token refreshed",
    EventKind.REFRESH_FAILED: "refresh failed",
    EventKind.NEEDS_REAUTH: "needs re-authorization",
    EventKind.REMOVED: "disconnected",
    EventKind.IMPORTED: "legacy token imported",
}

# Known failure texts (from oauth.py and tokens.py) and what they mean for an admin.
_PLAIN_ERRORS = (
    ("invalid_grant", "NationBuilder no longer accepts the stored refresh token."),
    ("invalid_client", "NationBuilder rejected the app's client id or secret."),
    ("unauthorized_client", "NationBuilder rejected the app's client id or secret."),
    ("could not be reached", "NationBuilder could not be reached."),
    ("did not answer in time", "NationBuilder did not answer in time."),
    ("HTTP 5", "NationBuilder answered with a server error."),
    ("HTTP 429", "NationBuilder asked the gateway to slow down."),
    ("no refresh token is stored", "No refresh token is stored for this nation."),
)


# -- small pure helpers ---------------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration in words, to the nearest unit: "5 minutes", "24 hours", "3 days"."""
    if not math.isfinite(seconds):
        return "an unknown time"
    s = abs(seconds)
    if s < 60:
        return "less than a minute"
    n, unit = round(s / 60), "minute"
    if n >= 60:
        n, unit = round(s / 3600), "hour"
        if n >= 48:
            n, unit = round(s / 86400), "day"
    return f"{n} {unit}{'' if n == 1 else 's'}"


@dataclass(frozen=True, slots=True)
class Moment:
    """A point in time as shown: relative words, the exact UTC time, and ISO for <time>."""

    relative: str
    exact: str
    iso: str


def moment(ts: float, now: float, *, expiry: bool = False) -> Moment:
    when = utc_datetime(ts)
    if when is None:  # a stored date no calendar can show (written before lifetimes were clamped)
        return Moment("at an unknown time", "unknown time", "")
    delta = ts - now
    if expiry:
        relative = f"in {span(delta)}" if delta > 0 else f"expired {span(delta)} ago"
    else:
        relative = "just now" if abs(delta) < 60 else f"{span(delta)} ago"
    return Moment(
        relative, when.strftime("%Y-%m-%d %H:%M:%S UTC"), when.strftime("%Y-%m-%dT%H:%M:%SZ")
    )


def plain_error(text: str) -> str:
    """A stored failure message in an admin's words (the raw text is shown beside it)."""
    for needle, words in _PLAIN_ERRORS:
        if needle in text:
            return words
    return text


def form_action_sources(nation_url: str) -> str:
    """CSP form-action: 'self' plus the nation origin(s) the connect form redirects to.

    Chrome applies form-action to redirects after a form submission, and the connect form
    answers with a redirect to the nation's authorize page.
    """
    parts = urlsplit(nation_url)
    host = parts.netloc
    if "{slug}" in host:
        first, dot, rest = host.partition(".")
        # CSP allows a wildcard only as the whole leftmost label.
        source = f"{parts.scheme}://*.{rest}" if "{slug}" in first and dot else f"{parts.scheme}:"
    else:
        source = f"{parts.scheme}://{host}"
    return f"'self' {source}"


def normalize_nation(raw: str) -> str:
    """Accept "Acme", "acme.nationbuilder.com" or its URL for the slug "acme"."""
    value = raw.strip().lower()
    for prefix in ("https://", "http://"):
        value = value.removeprefix(prefix)
    return value.rstrip("/").removesuffix(".nationbuilder.com")


# -- what the templates show ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventView:
    what: str
    when: Moment
    detail: str


@dataclass(frozen=True, slots=True)
class NationLink:
    slug: str
    path: str  # the slug quoted for use in a URL path


@dataclass(frozen=True, slots=True)
class AccountView:
    slug: str
    path: str  # the slug quoted for use in a URL path
    status: str  # in words
    css: str  # ok, soon or reauth
    needs_reauth: bool
    expiry: Moment | None
    last_refresh: Moment | None
    connected: Moment
    error: str | None
    error_detail: str | None
    events: list[EventView]


def account_view(
    info: AccountInfo, events: list[Event], now: float, margin: float, scrub: Callable[[str], str]
) -> AccountView:
    if info.status is AccountStatus.NEEDS_REAUTH:
        status, css = "needs re-authorization", "reauth"
    elif info.status is AccountStatus.UNREADABLE:
        status, css = "stored credentials unreadable", "reauth"
    elif info.expires_at is None or info.expires_at - now <= margin + SOON_LEAD:
        status, css = "refreshing soon", "soon"
    else:
        status, css = "active", "ok"
    error = scrub(info.last_error) if info.last_error else None
    plain = plain_error(error) if error else None
    return AccountView(
        slug=info.slug,
        path=quote(info.slug, safe=""),
        status=status,
        css=css,
        needs_reauth=info.status is AccountStatus.NEEDS_REAUTH,
        expiry=moment(info.expires_at, now, expiry=True) if info.expires_at else None,
        last_refresh=moment(info.last_refresh_at, now) if info.last_refresh_at else None,
        connected=moment(info.created_at, now),
        error=plain,
        error_detail=error if error != plain else None,
        events=[
            EventView(_EVENT_WORDS.get(e.kind, str(e.kind)), moment(e.at, now), scrub(e.detail))
            for e in events
        ],
    )


def _callback_explanation(error: Exception, message: str) -> tuple[str, str]:
    """(title, explanation) for a failed authorization, in plain words."""
    reason = error.reason if isinstance(error, AuthorizationFailed) else ""
    if reason == "denied":
        return (
            "Authorization was declined",
            "NationBuilder reports that access was not granted: the Deny button was pressed "
            "on its consent page, or the NationBuilder user may not authorize apps. "
            "Nothing was stored.",
        )
    if reason == "state":
        return (
            "This authorization link cannot be used",
            f"The gateway refused the answer from NationBuilder: {message}. A link works "
            "once, for 10 minutes, in the browser session that started it. Nothing was "
            "stored; start again from the accounts page.",
        )
    if reason == "exchange":
        return (
            "NationBuilder did not hand over the tokens",
            f"The authorization was granted, but {message}. This is often temporary. "
            "Nothing was stored.",
        )
    return ("Connecting failed", f"{message}. Nothing was stored.")


# -- the pages ------------------------------------------------------------------------------


class AdminPages:
    """Handlers of the HTML pages; one instance per `/connect` sub-application."""

    def __init__(self, settings: Settings) -> None:
        prefix = urlsplit(settings.public_url).path.rstrip("/")
        self.base = f"{prefix}/connect"  # as the browser sees it (behind a path prefix too)
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
        self._revoked: dict[str, int] = {}  # logged-out session ids until they expire

    # -- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _now(request: web.Request) -> float:
        return request.config_dict[keys.CLOCK].now()

    def session_of(self, request: web.Request) -> Session | None:
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            return None
        session = self.signer.read_session(value, self._now(request))
        if session is None or session.sid in self._revoked:
            return None
        return session

    def binding_of(self, request: web.Request) -> str:
        """admin_api.BINDING: the session a started authorization belongs to ("" if none)."""
        session = self.session_of(request)
        return session.binding if session is not None else ""

    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
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

    def _forget_cookie(self, response: web.StreamResponse, name: str) -> None:
        response.del_cookie(name, path=self.base, secure=self.secure, httponly=True, samesite="Lax")

    def _flash(self, request: web.Request, response: web.StreamResponse, **message: Any) -> None:
        message["exp"] = self._now(request) + FLASH_TTL
        self._cookie(response, FLASH_COOKIE, self.signer.flash_cookie(message), FLASH_TTL)

    def _redirect(self, location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location})

    def _to_login(self) -> web.Response:
        return self._redirect(f"{self.base}/login")

    def _flash_text(self, request: web.Request, message: dict[str, Any]) -> tuple[str, str]:
        """(level, text) of a flash message."""
        kind, slug = str(message.get("kind", "")), str(message.get("slug", ""))
        now = self._now(request)
        if kind == "connected":
            return "ok", f"Connected {slug}."
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
            return "error", (
                f"Refreshing {slug} failed; the gateway retries in {message.get('retry', 0)} s. "
                f"{message.get('detail', '')}"
            ).strip()
        if kind == "failed":
            return "error", f"Refreshing {slug} failed: {message.get('detail', '')}"
        if kind == "missing":
            return "error", f"There is no account named {slug}."
        if kind == "disconnected":
            return "ok", f"Disconnected {slug}. Its tokens were deleted."
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
                NationLink(a.slug, quote(a.slug, safe=""))
                for a in accounts
                if a.status is AccountStatus.NEEDS_REAUTH
            ]
        flash = None
        raw_flash = request.cookies.get(FLASH_COOKIE)
        if raw_flash:
            message = self.signer.read_flash(raw_flash, self._now(request))
            if message is not None:
                flash = self._flash_text(request, message)
        body = self.env.get_template(template).render(
            base=self.base,
            csrf=session.csrf if session is not None else "",
            banner=banner,
            flash=flash,
            **context,
        )
        response = web.Response(text=body, status=status, content_type="text/html", headers=headers)
        if raw_flash:
            self._forget_cookie(response, FLASH_COOKIE)
        return response

    async def _checked_form(
        self, request: web.Request
    ) -> tuple[Session, dict[str, str]] | web.Response:
        """A POST form's session and fields, or the response refusing it (login, 403)."""
        session = self.session_of(request)
        if session is None:
            return self._to_login()
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not hmac.compare_digest(fields.get("csrf", "").encode(), session.csrf.encode()):
            log.warning(
                "admin form refused: missing or wrong CSRF token", extra={"path": request.path}
            )
            return await self.render(request, "forbidden.html", session=session, status=403)
        return session, fields

    # -- login and logout ---------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        if self.session_of(request) is not None:
            return self._redirect(self.base)
        return await self.render(request, "login.html", session=None, error=None)

    async def login(self, request: web.Request) -> web.StreamResponse:
        now = self._now(request)
        client = request.remote or "unknown"
        throttle = request.config_dict[keys.ADMIN_THROTTLE]
        wait = throttle.retry_after(client, now)
        if wait is not None:
            return await self.render(
                request,
                "login.html",
                session=None,
                status=429,
                headers={"Retry-After": str(wait)},
                error=f"Too many wrong admin tokens from your address. Try again in {span(wait)}.",
            )
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not admin_api.admin_token_matches(request, token):
            throttle.failed(client, now)
            log.warning("admin login failed: wrong token", extra={"peer": client})
            return await self.render(
                request,
                "login.html",
                session=None,
                status=401,
                error="That is not the admin token (NBGW_ADMIN_TOKEN). Check it and try again.",
            )
        throttle.succeeded(client)
        session = self.signer.session(secrets.token_urlsafe(18), int(now) + SESSION_TTL)
        response = self._redirect(self.base)
        self._cookie(response, SESSION_COOKIE, self.signer.session_cookie(session), SESSION_TTL)
        log.info("admin logged in", extra={"peer": client})
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        session, _ = checked
        now = self._now(request)
        self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        self._revoked[session.sid] = session.expires_at
        response = self._to_login()
        self._forget_cookie(response, SESSION_COOKIE)
        self._flash(request, response, kind="logged_out")
        return response

    # -- accounts -------------------------------------------------------------------------

    async def accounts_page(
        self,
        request: web.Request,
        *,
        status: int = 200,
        form_error: str | None = None,
        form_value: str = "",
    ) -> web.StreamResponse:
        session = self.session_of(request)
        if session is None:
            return self._to_login()
        service = request.config_dict[keys.ACCOUNTS]
        redactor = request.config_dict[keys.REDACTOR]
        margin = request.config_dict[keys.SETTINGS].refresh_margin
        infos = await service.list_accounts()
        now = self._now(request)
        views = [
            account_view(
                info, await service.events(info.slug, EVENTS_SHOWN), now, margin, redactor.scrub
            )
            for info in infos
        ]
        return await self.render(
            request,
            "accounts.html",
            session=session,
            status=status,
            accounts=infos,
            views=views,
            form_error=form_error,
            form_value=form_value,
        )

    async def accounts_get(self, request: web.Request) -> web.StreamResponse:
        return await self.accounts_page(request)

    async def connect(self, request: web.Request) -> web.StreamResponse:
        """Connect or re-authorize a nation: start the flow bound to this session."""
        checked = await self._checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        session, fields = checked
        typed = fields.get("nation", "")
        nation = normalize_nation(typed)
        if not nation:
            return await self.accounts_page(
                request, status=400, form_error="Enter the nation slug.", form_value=typed
            )
        try:
            url = await request.config_dict[keys.ACCOUNTS].start_connect(nation, session.binding)
        except ValueError as exc:
            message = str(exc)
            return await self.accounts_page(
                request,
                status=400,
                form_error=f"{message[:1].upper()}{message[1:]}.",
                form_value=typed,
            )
        return self._redirect(url)

    async def refresh(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        slug = request.match_info["slug"]
        scrub = request.config_dict[keys.REDACTOR].scrub
        response = self._redirect(self.base)
        try:
            info = await request.config_dict[keys.ACCOUNTS].refresh(slug)
        except AccountNotFound:
            self._flash(request, response, kind="missing", slug=slug)
        except ReauthorizationRequired:
            self._flash(request, response, kind="reauth", slug=slug)
        except RefreshBackoff as exc:
            retry = exc.retry_seconds
            detail = scrub(plain_error(str(exc)))
            self._flash(request, response, kind="backoff", slug=slug, retry=retry, detail=detail)
        except NBGatewayError as exc:
            self._flash(request, response, kind="failed", slug=slug, detail=scrub(str(exc)))
        else:
            self._flash(
                request, response, kind="refreshed", slug=slug, expires_at=info.expires_at or 0
            )
        return response

    async def disconnect_page(self, request: web.Request) -> web.StreamResponse:
        session = self.session_of(request)
        if session is None:
            return self._to_login()
        slug = request.match_info["slug"]
        accounts = await request.config_dict[keys.ACCOUNTS].list_accounts()
        if all(a.slug != slug for a in accounts):
            response = self._redirect(self.base)
            self._flash(request, response, kind="missing", slug=slug)
            return response
        return await self.render(
            request,
            "disconnect.html",
            session=session,
            accounts=accounts,
            slug=slug,
            path=quote(slug, safe=""),
        )

    async def disconnect(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked_form(request)
        if isinstance(checked, web.Response):
            return checked
        slug = request.match_info["slug"]
        removed = await request.config_dict[keys.ACCOUNTS].remove(slug)
        response = self._redirect(self.base)
        self._flash(request, response, kind="disconnected" if removed else "missing", slug=slug)
        return response

    # -- the OAuth callback's result ---------------------------------------------------------

    async def callback_result(
        self, request: web.Request, slug: str | None, error: Exception | None
    ) -> web.StreamResponse:
        """admin_api.CALLBACK_RENDERER: where NationBuilder's redirect lands a human."""
        session = self.session_of(request)
        if error is None:
            if session is not None:
                response = self._redirect(self.base)
                self._flash(request, response, kind="connected", slug=slug or "")
                return response
            # Started through /connect/api: there is no admin session in this browser.
            return await self.render(
                request, "callback.html", session=None, ok=True, slug=slug, title="", explanation=""
            )
        message = request.config_dict[keys.REDACTOR].scrub(str(error))
        title, explanation = _callback_explanation(error, message)
        return await self.render(
            request,
            "callback.html",
            session=session,
            status=400,
            ok=False,
            slug=slug,
            title=title,
            explanation=explanation,
        )

    async def stylesheet(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.css, content_type="text/css")


def security_headers(csp: str) -> Middleware:
    """A middleware adding the admin pages' security headers to every /connect response."""
    headers = {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",  # the callback URL carries the code and state
        "Cache-Control": "no-store",
    }

    @web.middleware
    async def add_security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            for name, value in headers.items():
                exc.headers.setdefault(name, value)
            raise
        if not response.prepared:
            for name, value in headers.items():
                response.headers.setdefault(name, value)
        return response

    return add_security_headers


def setup(connect: web.Application, settings: Settings) -> AdminPages:
    """Mount the HTML pages on the `/connect` sub-application (before it is added)."""
    pages = AdminPages(settings)
    connect.middlewares.append(security_headers(pages.csp))
    connect[admin_api.CALLBACK_RENDERER] = pages.callback_result
    connect[admin_api.BINDING] = pages.binding_of
    router = connect.router
    router.add_get("", pages.accounts_get)
    router.add_get("/", pages.accounts_get)
    router.add_get("/login", pages.login_page)
    router.add_post("/login", pages.login)
    router.add_post("/logout", pages.logout)
    router.add_post("/accounts", pages.connect)
    router.add_post("/accounts/{slug}/refresh", pages.refresh)
    router.add_get("/accounts/{slug}/disconnect", pages.disconnect_page)
    router.add_post("/accounts/{slug}/disconnect", pages.disconnect)
    router.add_get("/static/admin.css", pages.stylesheet)
    return pages
