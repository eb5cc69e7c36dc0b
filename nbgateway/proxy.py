"""The transparent proxy: `/api/...`, `/n/{slug}/api/...` and `X-NB-Nation`.

Per request: check the client's address, refuse what the gateway will not forward
(transfer codings other than chunked, a duplicated X-NB-Nation; TRACE and CONNECT are
refused for every path by `middleware.request_context`), pick and
validate the account, refuse anything that could leave the nation's `/api/` (before any
upstream connection), attach a valid bearer token, send only the client's own headers (no
Accept, Accept-Encoding, Content-Type or User-Agent of aiohttp's), stream the body up and
the response down, retry once after an upstream 401 when the body can be replayed, and map
upstream failures to gateway errors. Every upstream send takes a slot from the
`RateLimiter` first and reports its answer back; an upstream 429 is replayed once (after
the limiter's hold) when the body can be replayed. The proxy knows tokens only through
`TokenManager`; it knows nothing of SQL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple
from urllib.parse import unquote, unquote_plus

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from nbgateway.allowlist import AllowList
from nbgateway.browsers import own_hosts, sent_by_page
from nbgateway.clients import (
    KEY_PREFIX,
    READ_METHODS,
    ClientAuth,
    ClientRegistry,
    looks_like_key,
    without_keys,
    without_keys_in_query,
)
from nbgateway.clock import Clock
from nbgateway.config import Settings
from nbgateway.errors import (
    AccountNotFound,
    ClientKeyInvalid,
    ClientNotAllowed,
    ExpectationFailed,
    GatewayError,
    InvalidRequest,
    NoAccountSelected,
    NotImplementedByGateway,
    RequestTooLarge,
    StoreError,
    StoreUnavailable,
    TokenUnavailable,
    UnknownAccount,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
    store_failure,
    token_error,
)
from nbgateway.links import LinkMapper, inflate, rewrite_body, rewrite_json
from nbgateway.metrics import NO_ACCOUNT, Metrics
from nbgateway.middleware import (
    ACCESS_INFO,
    NO_CONTINUE,
    REQUEST_ID_HEADER,
    cancelled_status,
    connection_gone,
    request_id_of,
)
from nbgateway.models import ClientInfo, is_valid_slug
from nbgateway.ratelimit import RateLimiter
from nbgateway.redact import REDACTED
from nbgateway.tokens import IssuedToken, TokenManager

log = logging.getLogger("nbgateway.proxy")
# Set by the Expect handler for an Expect value other than 100-continue: the handler
# answers 417 (after the checks every request gets, before any token is looked up).
UNMET_EXPECTATION: web.RequestKey[bool] = web.RequestKey("nbgw_unmet_expectation", bool)

NATION_HEADER = "X-NB-Nation"
CLIENT_KEY_HEADER = "X-NBGW-Key"
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Never forwarded upstream: ours to set, or the client's credentials.
_DROP_UPSTREAM = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    # Answered by the gateway itself (100 Continue, or a refusal); forwarded, it would make
    # aiohttp's client wait for an upstream 100 with no timeout before sending the body.
    "expect",
    NATION_HEADER.lower(),
    CLIENT_KEY_HEADER.lower(),
}
# Never passed to the client: hop-by-hop, ours to set (X-NBGW-Error marks the gateway's
# own errors), or NationBuilder's say over the gateway's origin, which is also the origin
# of the /connect pages: cookies, clearing the browser's data for it (the admin's
# session), a redirect off it, letting other sites read its answers (CORS), and where a
# browser should reach it or report its errors.
_DROP_DOWNSTREAM = HOP_BY_HOP | {
    "content-length",
    "set-cookie",
    "set-cookie2",
    "x-nbgw-error",
    "clear-site-data",
    "refresh",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-headers",
    "access-control-allow-methods",
    "access-control-allow-private-network",
    "access-control-expose-headers",
    "access-control-max-age",
    "alt-svc",
    "strict-transport-security",
    "nel",
    "report-to",
    "reporting-endpoints",
}
# Added to every proxied answer. It shares the admin pages' origin: a browser that opens
# one (an HTML error page of a CDN in front of NationBuilder, say) must not run its scripts
# with that origin's rights (reading a /connect page's CSRF token and posting a form).
# Upstream's own policy, if any, still applies beside this one.
_SANDBOX = "sandbox"
# Response headers holding a URL that is mapped like the links in a body.
_LINK_HEADERS = frozenset({"location", "content-location"})
# The Link header (RFC 8288) holds its URLs in angle brackets: `<url>; rel="next", ...`.
_LINK_VALUE_URL = re.compile(r"<([^>]*)>")
# Query parameters are separated by "&", and by ";" for servers that still split on it.
_QUERY_SEPARATOR = re.compile(r"([&;])")
_BRACKETS = re.compile(r"[\[\]]")
# The content codings the gateway reads to map the links in a JSON answer; a tool's
# Accept-Encoding is cut down to these, for a br or zstd page would pass through with
# NationBuilder's links unmapped (the next page of /n/{slug}/api another nation's).
_DECODABLE = frozenset({"identity", "gzip", "deflate"})
_Q_ZERO = re.compile(r";\s*q\s*=\s*0(?:\.0*)?\s*$", re.IGNORECASE)
_JSON_TYPES = ("application/json", "application/vnd.api+json")
# JSON bodies larger than this are passed through without link rewriting.
_REWRITE_LIMIT = 16 * 1024 * 1024
# Bodies up to this size (on the wire and inflated) are rewritten on the event loop; larger
# ones in the rewrite thread, so one big page does not stall every other client. One thread:
# Python runs one thread at a time, and every extra one would take the loop's turns.
_INLINE_REWRITE = 64 * 1024
# A Host header usable in a link: a DNS name (or bracketed IPv6 literal) and a port.
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
# An absolute http(s) URL: its authority (userinfo, host, port) and where it ends.
_ABSOLUTE_URL = re.compile(r"(?i)https?://([^/?#]*)")
# A nation URL template whose host is `{slug}.` + a domain (the real one): the domain.
_SLUG_HOST_TEMPLATE = re.compile(r"(?i)https?://\{slug\}\.([^/:?#@]+)(?::443|:80)?/?")
_CHUNK = 64 * 1024
# How much of a 401 body is read for NationBuilder's error code (its bodies are ~100 bytes).
_PEEK_401 = 4096
_EXPIRED_CODE = b'"token_expired"'
# Headers aiohttp's client would add on its own; upstream gets only what the client sent.
_NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "Content-Type", "User-Agent"})
# Set on a request whose streamed body failed on the client's side (over
# NBGW_MAX_REQUEST_BODY, or its chunked framing broke): the error the client gets.
BODY_REFUSED = web.RequestKey("nbgw_body_refused", GatewayError)
# The registered client key's name, once identified (the rate queue's fairness unit).
CLIENT_NAME = web.RequestKey("nbgw_client_name", str)
# The status of a streamed answer whose head has gone out (what a cut-off body still had).
STREAMED_STATUS = web.RequestKey("nbgw_streamed_status", int)


class Route(NamedTuple):
    """Where a request goes: the account, the raw path below /api/ and the query."""

    slug: str
    raw_tail: str  # percent-encoding kept exactly as the client sent it
    query: str
    by_prefix: bool


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# What `_check_tail` looks at closer in a path without percent-encoding: a control
# character, a backslash, or a "." or ".." segment.
_SUSPECT_PLAIN = re.compile(r"[\x00-\x1f\x7f\\]|(?:^|/)\.\.?(?:/|$)")
# Accounts whose nation base URL is remembered (then the memory starts over).
_NATION_BASES_KEPT = 4096
# A store outage fails every request that needs it: one error line per kind this often,
# with how many were not written since, instead of one per request.
STORE_ERROR_LOG_EVERY = 10.0


def _malformed_body() -> InvalidRequest:
    return InvalidRequest(
        "the request body's chunked framing is malformed; the body was not forwarded whole"
    )


def _check_tail(raw_tail: str) -> None:
    """Refuse paths that could leave /api/ once NationBuilder decodes them."""
    encoded = "%" in raw_tail
    if not encoded and not _SUSPECT_PLAIN.search(raw_tail):
        return  # the common case: one regex search, no segment by segment look
    for segment in raw_tail.split("/"):
        decoded = unquote(segment) if encoded else segment
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\\" in segment:
            raise InvalidRequest("the request path must stay below /api/")
        if _CONTROL_CHARS.search(decoded):
            raise InvalidRequest("the request path contains control characters")


def presented_key(request: web.Request) -> str | None:
    """The client key a request presents (X-NBGW-Key, Bearer nbgw_..., ?access_token=nbgw_...).

    Any other bearer token or access_token (an old NationBuilder token) is no client key.
    """
    found = {value.strip() for value in request.headers.getall(CLIENT_KEY_HEADER, ())}
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and looks_like_key(auth[7:].strip()):
        found.add(auth[7:].strip())
    query = request.raw_path.partition("?")[2]
    if "nbgw" in query:  # "nbgw_" or, percent-encoded, "nbgw%5F"
        for part in _QUERY_SEPARATOR.split(query)[0::2]:
            name, _, value = part.partition("=")
            if _is_token_param(name) and looks_like_key(unquote(value)):
                found.add(unquote(value))
    if len(found) > 1:
        raise InvalidRequest("several different client keys were presented")
    return next(iter(found), None)


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _header_text(value: str) -> str:
    """A header value the writer can send whole. Bytes that are not UTF-8 (a raw Latin-1
    `é`) arrive as surrogate escapes, which aiohttp's writer silently leaves out: each goes
    on as the Latin-1 character it is, written in UTF-8; the rest of the value is kept as
    it came. Called for non-ASCII values only."""
    return _ESCAPED_BYTE.sub(lambda m: chr(ord(m.group()) - 0xDC00), value)


def _listed(connection: str | None) -> frozenset[str]:
    """The header names a Connection header lists (hop-by-hop for this connection)."""
    if not connection:
        return frozenset()
    return frozenset(h.strip().lower() for h in connection.split(","))


def _map_link_header(value: str, mapper: LinkMapper) -> str:
    """A Link header with each `<url>` mapped (or kept, when the mapper leaves it)."""
    return _LINK_VALUE_URL.sub(lambda m: f"<{mapper(m.group(1).strip()) or m.group(1)}>", value)


@functools.lru_cache(maxsize=64)  # a tool sends the same value every time
def _decodable_codings(accept_encoding: str) -> str:
    """An Accept-Encoding with only the codings of _DECODABLE left ("identity" if none)."""
    kept = [
        part.strip()
        for part in accept_encoding.split(",")
        if part.split(";", 1)[0].strip().lower() in _DECODABLE
    ]
    if not any(_Q_ZERO.search(part) is None for part in kept):
        return "identity"  # none left that the tool takes: the one coding every client reads
    return ", ".join(kept)


def _coding_of(upstream: aiohttp.ClientResponse) -> str:
    """An answer's content coding, lower case; x-gzip is gzip (RFC 9110, 8.4.1.3)."""
    coding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
    return "gzip" if coding == "x-gzip" else coding


def _is_api_path(path: str) -> bool:
    return path == "/api" or path.startswith(("/api/", "/api?", "/api#"))


def _is_token_param(raw_name: str) -> bool:
    """Whether a query parameter's raw name is access_token as NationBuilder's Rails (Rack)
    reads it: any case, percent- or plus-encoded, padded, or within brackets (Rack reads the
    first run without a bracket after any leading ones: `access_token[]`, `access_token[x]`,
    `[access_token]` and `]access_token` are all access_token)."""
    name = _BRACKETS.split(unquote_plus(raw_name).lstrip("[]"), maxsplit=1)[0]
    return name.strip().lower() == "access_token"


def _filter_query(query: str) -> str:
    """Drop every access_token parameter (any case or encoding, after "&" or ";"), keeping
    all other bytes and separators."""
    if not query or "access_token" not in unquote(query).lower():
        return query
    pieces = _QUERY_SEPARATOR.split(query)  # part, separator, part, ...
    kept: list[str] = []
    for i in range(0, len(pieces), 2):
        part = pieces[i]
        if _is_token_param(part.split("=", 1)[0]):
            continue
        if kept:
            kept.append(pieces[i - 1])  # the separator that came before this part
        kept.append(part)
    return "".join(kept)


def _without_token(link: str) -> str:
    """`link` (a path with its query) without access_token parameters."""
    before, hash_sign, fragment = link.partition("#")
    path, sep, query = before.partition("?")
    if not sep:
        return link
    kept = _filter_query(query)
    return f"{path}{'?' if kept else ''}{kept}{hash_sign}{fragment}"


class Proxy:
    """The proxy handler and its policy. One instance per app."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenManager,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clients: ClientRegistry,
        limiter: RateLimiter,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._limiter = limiter
        self._tokens = tokens
        self._clients = clients
        self._session = session
        self._metrics = metrics
        self._public = settings.public_url.rstrip("/")
        self._allowed = AllowList(settings.allowed_clients)
        self._own_hosts = own_hosts(settings.public_url, settings.allowed_hosts)
        self._nation_bases: dict[str, str] = {}
        self._link_needles: dict[tuple[str, bool], tuple[bytes, ...]] = {}
        # With the real host template (`https://{slug}.nationbuilder.com`), links to the
        # nation's own host in any case or scheme, or to the domain's own www host, are
        # the nation's too (NationBuilder's link base is configured on its side).
        domain = _SLUG_HOST_TEMPLATE.fullmatch(settings.nation_url)
        self._nation_domain = domain.group(1).lower() if domain else None
        t = settings.upstream_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
        self._rewriter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbgw-rewrite")
        # Per kind of store error: when it was last logged, and how many since were not.
        self._store_errors: dict[str, tuple[float, int]] = {}

    def close(self) -> None:
        """Stop the rewrite thread (queued rewrites are dropped; their requests are gone)."""
        self._rewriter.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def client_identity(request: web.Request) -> str:
        """Who is asking, for fairness in the rate queue: the client key's name when the
        request presented one, else the peer address."""
        name = request.get(CLIENT_NAME)
        return f"key:{name}" if name is not None else f"addr:{request.remote or ''}"

    def _nation_base(self, slug: str) -> str:
        """`settings.nation_base(slug)`, remembered per account (bounded like the peers)."""
        base = self._nation_bases.get(slug)
        if base is None:
            if len(self._nation_bases) >= _NATION_BASES_KEPT:
                self._nation_bases.clear()
            base = self._nation_bases[slug] = self._settings.nation_base(slug)
        return base

    def _needles(self, route: Route) -> tuple[bytes, ...]:
        """What a body must hold for a link to be in it (remembered per account and form):
        the nation's URL, an escaped slash (JSON may write "\\/"), and on the /n/{slug}/
        route a root-relative "/api"."""
        key = (route.slug, route.by_prefix)
        needles = self._link_needles.get(key)
        if needles is None:
            if len(self._link_needles) >= _NATION_BASES_KEPT:
                self._link_needles.clear()
            base = self._nation_base(route.slug).rstrip("/")
            nation = (self._nation_domain or base).encode()  # the domain: any host on it
            needles = (nation, b"\\/", b"/api") if route.by_prefix else (nation, b"\\/")
            self._link_needles[key] = needles
        return needles

    def _too_large(self) -> RequestTooLarge:
        limit = self._settings.max_request_body
        return RequestTooLarge.over(limit)

    # -- routing -----------------------------------------------------------------------

    def _refuse_early(self, request: web.Request) -> None:
        """What is refused before routing: the peer, the body's framing and size."""
        if not self._allowed.allows(request.remote):
            raise ClientNotAllowed("this client address is not in NBGW_ALLOWED_CLIENTS")
        headers = request.headers
        self._own_hosts.check(headers)
        if "Sec-Fetch-Site" in headers or "Origin" in headers:
            sent_by = sent_by_page(headers)
            if sent_by is not None:
                # A page on any site could use the nations' tokens through the browser of
                # someone on an allowed address (and, rebinding its domain to the gateway's
                # address, read the answers).
                raise ClientNotAllowed(
                    f"a web page in a browser sent this request ({sent_by}); the gateway "
                    "proxies for tools, not for pages (a link followed in a proxied answer "
                    "shown in the browser counts as one). Call it from the tool, or type "
                    "the address into the browser"
                )
        framing = request.headers.getall("Transfer-Encoding", None)
        if framing is not None and any(
            coding.strip().lower() not in ("chunked", "")
            for value in framing
            for coding in value.split(",")
        ):
            raise NotImplementedByGateway(
                "the gateway accepts no transfer coding but chunked; send the body plain "
                "(Content-Encoding may say how it is compressed)"
            )
        length = request.content_length
        if length is not None and length > self._settings.max_request_body:
            raise self._too_large()

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None:
        """The route's Expect handler: 100 Continue only for a request the gateway would take.

        A request that would be refused (413 for a declared body over NBGW_MAX_REQUEST_BODY,
        403 or 501 as for any request, 400 for a path or nation the route refuses, a client
        key's 401 or 403), or that cannot be decided now (the store is away), gets no 100:
        the client holds its body back, the handler refuses it like any other request
        (counted, audited, logged) and the connection closes after that answer
        (`NO_CONTINUE`). An Expect value other than 100-continue gets no 100 either, and
        the handler answers it 417 (`UNMET_EXPECTATION`), counted, audited and logged too.
        (Whether the nation is connected is known only from the store, with the request.)
        """
        if request.version < (1, 1):
            return None  # HTTP/1.0 has no Expect: the header is ignored, as aiohttp does
        if request.headers.get("Expect", "").strip().lower() != "100-continue":
            # Noted first: the handler answers 417 unless it refuses the request otherwise,
            # whatever the checks below find now.
            request[NO_CONTINUE] = request[UNMET_EXPECTATION] = True
            return None
        try:
            self._refuse_early(request)
            route = self.route(request)
            if self._clients.mode is not ClientAuth.OFF:
                self._clients.authorize(await self._identify(request), route.slug, request.method)
        except (GatewayError, StoreError):
            request[NO_CONTINUE] = True
            return None
        await _send_continue(request)
        return None

    def route(self, request: web.Request) -> Route:
        named = request.headers.getall(NATION_HEADER, ())
        if len(named) > 1:
            # A front proxy may pin the nation with this header; a second one must not win.
            raise InvalidRequest(f"send at most one {NATION_HEADER} header")
        raw = request.raw_path
        # Absolute-form targets ("GET http://elsewhere/ HTTP/1.1") and "//host" are refused.
        if not raw.startswith("/") or raw.startswith("//"):
            raise InvalidRequest("only origin-form request targets are accepted")
        path, _, query = raw.partition("?")
        if path.startswith("/n/"):
            slug, sep, rest = path[3:].partition("/")
            if not is_valid_slug(slug):
                raise InvalidRequest(
                    "the account in /n/{slug}/ must be lowercase letters, digits and hyphens"
                )
            if not sep or not (rest == "api" or rest.startswith("api/")):
                raise InvalidRequest("only /n/{slug}/api/... is proxied")
            tail, by_prefix = rest[4:], True
        elif path == "/api" or path.startswith("/api/"):
            tail, by_prefix = path[5:], False
            slug = self._select_account(named)
        else:  # pragma: no cover - the router only sends the two forms above
            raise InvalidRequest("only /api/... and /n/{slug}/api/... are proxied")
        _check_tail(tail)
        query = _filter_query(query)
        if "nbgw" in query:
            query = without_keys_in_query(query)  # a key in a parameter of the tool's own
        return Route(slug=slug, raw_tail=tail, query=query, by_prefix=by_prefix)

    def _select_account(self, values: Sequence[str]) -> str:
        """The account of a plain /api/ request: X-NB-Nation's (`values`), the default,
        or the only one connected."""
        if values:
            named = values[0].strip()
            if not is_valid_slug(named):
                raise InvalidRequest(
                    f"the {NATION_HEADER} header must be a nation slug: lowercase letters, "
                    "digits and hyphens"
                )
            return named
        if self._settings.default_account:
            return self._settings.default_account
        only = self._tokens.only_account()
        if only is None:
            if self._tokens.account_count() == 0:
                raise NoAccountSelected("no nation is connected yet: connect one at /connect")
            raise NoAccountSelected(
                "several nations are connected: name one with /n/{slug}/api/..., the "
                f"{NATION_HEADER} header, or NBGW_DEFAULT_ACCOUNT"
            )
        return only

    # -- the handler ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        metrics = self._metrics
        metrics.proxy_started()
        started = time.perf_counter()
        account = NO_ACCOUNT
        status = 500
        info = request.get(ACCESS_INFO)
        route: Route | None = None
        client: ClientInfo | None = None
        clients = self._clients
        try:
            self._refuse_early(request)
            route = self.route(request)
            if clients.mode is not ClientAuth.OFF:
                client = await self._identify(request)
                clients.authorize(client, route.slug, request.method)
                if client is not None:
                    request[CLIENT_NAME] = client.name
            account = route.slug
            if info is not None:
                info["account"] = account
            if "Expect" in request.headers and request.get(UNMET_EXPECTATION):
                raise ExpectationFailed(
                    "the gateway knows no Expect value but 100-continue; send the request "
                    "without the Expect header"
                )
            issued = self._tokens.cached_token(route.slug) or await self._token(route.slug)
            response = await self._forward(request, route, issued)
            status = response.status
            return response
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels its handler): counted and logged alike.
            status = request.get(STREAMED_STATUS) or cancelled_status(request, status)
            if info is not None:
                info["status"] = status
            account = self._label(account)
            raise
        except GatewayError as err:
            status = err.status
            account = NO_ACCOUNT if isinstance(err, UnknownAccount) else self._label(account)
            metrics.gateway_error(account, err.code)
            raise
        finally:
            metrics.proxy_ended()
            metrics.proxied(account, request.method, status, time.perf_counter() - started)
            if route is not None:
                metrics.client_request(clients.label(client), account, status)
                if request.method not in READ_METHODS:  # the audit trail: writes only
                    clients.record(
                        client,
                        route.slug,
                        request.method,
                        f"/api/{route.raw_tail}",
                        status,
                        request_id_of(request),
                    )

    async def _identify(self, request: web.Request) -> ClientInfo | None:
        """The tool behind `request` (None: anonymous), or the client-key refusal (no key
        where one is required, an unknown key)."""
        clients = self._clients
        presented = presented_key(request)
        try:
            if presented is not None and not clients.current():
                await clients.catch_up()  # a key removed anywhere is refused at once
            try:
                client = clients.identify(presented)
            except ClientKeyInvalid:
                assert presented is not None  # no key is anonymous or ClientKeyRequired
                client = await clients.identify_after_sync(presented)
        except StoreError as exc:
            # As a gateway error, so the status the tool gets (503) is the one counted and
            # audited (not the 500 a handler that did not answer would count).
            log.error("client keys cannot be checked", extra={"error": str(exc)})
            raise store_failure(exc) from None
        return client

    def _label(self, account: str) -> str:
        """`account` as a metric label: a slug the client named that is not known to be
        stored (unknown, or the store could not be asked) is `none`, so label values stay
        bounded by the real accounts whatever clients send."""
        if account is NO_ACCOUNT or self._tokens.is_account(account):
            return account
        return NO_ACCOUNT

    async def _token(self, slug: str, stale: IssuedToken | None = None) -> IssuedToken:
        """A token from the manager, with its failures as gateway errors."""
        try:
            if stale is None:
                return await self._tokens.access_token(slug)
            return await self._tokens.force_refresh(slug, stale.generation)
        except (TokenUnavailable, StoreError) as exc:
            if isinstance(exc, StoreError) and not isinstance(exc, AccountNotFound):
                what = (
                    "token store unavailable"
                    if isinstance(exc, StoreUnavailable)
                    else "stored credentials unreadable"
                )
                self._log_store_error(what, slug, exc)
            raise token_error(slug, exc, f"{self._public}/connect") from None

    def _log_store_error(self, what: str, slug: str, exc: StoreError) -> None:
        """One line per kind every STORE_ERROR_LOG_EVERY seconds (the access log still has
        each request's 503 or 500), saying how many were left out since the last."""
        now = self._clock.monotonic()
        last, left_out = self._store_errors.get(what, (-STORE_ERROR_LOG_EVERY, 0))
        if now - last < STORE_ERROR_LOG_EVERY:
            self._store_errors[what] = (last, left_out + 1)
            return
        self._store_errors[what] = (now, 0)
        extra: dict[str, object] = {"account": slug, "error": str(exc)}
        if left_out:
            extra["left_out"] = left_out
        log.error(what, extra=extra)

    def _upstream_headers(self, request: web.Request, token: IssuedToken) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection_listed = _listed(request.headers.get("Connection"))
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _DROP_UPSTREAM or lower in connection_listed:
                continue
            if lower == "x-forwarded-for":
                continue  # re-added below with the peer appended
            if KEY_PREFIX in value:
                value = without_keys(value)  # in a cookie, say: the key never goes upstream
            if lower == "accept-encoding":
                value = _decodable_codings(value)  # (remembered: after the key is gone)
            headers.add(name, value if value.isascii() else _header_text(value))
        peer = request.remote or ""
        previous = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers[REQUEST_ID_HEADER] = request_id_of(request)
        headers["Authorization"] = f"Bearer {token.access_token.reveal()}"
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        return headers

    async def _buffered_chunked(self, request: web.Request) -> tuple[bytes, bool]:
        """A chunked body (no length given) read up to NBGW_RETRY_BUFFER bytes: (all of
        it, True), or (what was read, False) when there is more."""
        limit = self._settings.retry_buffer
        parts: list[bytes] = []
        seen = 0
        try:
            while seen <= limit:
                chunk = await request.content.read(min(limit + 1 - seen, _CHUNK))
                if not chunk:
                    return b"".join(parts), True
                parts.append(chunk)
                seen += len(chunk)
                if seen > self._settings.max_request_body:
                    raise self._too_large()
        except (HttpProcessingError, RequestPayloadError):
            raise _malformed_body() from None
        return b"".join(parts), False

    async def _stream_body(self, request: web.Request, head: bytes = b"") -> AsyncIterator[bytes]:
        """The body as it arrives, after `head` (what was read of it already)."""
        limit = self._settings.max_request_body
        seen = len(head)
        if head:
            yield head
        try:
            async for chunk in request.content.iter_chunked(_CHUNK):
                seen += len(chunk)
                if seen > limit:
                    request[BODY_REFUSED] = self._too_large()
                    raise request[BODY_REFUSED]
                yield chunk
        except (HttpProcessingError, RequestPayloadError):
            request[BODY_REFUSED] = _malformed_body()
            raise request[BODY_REFUSED] from None

    async def _send(
        self,
        request: web.Request,
        route: Route,
        token: IssuedToken,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        replay: bool = False,
    ) -> aiohttp.ClientResponse:
        """One upstream request inside a rate slot; its answer goes back to the limiter."""
        slot = self._limiter.try_acquire(route.slug)  # what acquire tries first, too
        if slot is None:
            slot = await self._limiter.acquire(
                route.slug, self.client_identity(request), replay=replay
            )
        started = time.perf_counter()
        try:
            url = f"{self._nation_base(route.slug)}/api/{route.raw_tail}"
            if route.query:
                url = f"{url}?{route.query}"
            response = await self._session.request(
                request.method,
                URL(url, encoded=True),
                headers=self._upstream_headers(request, token),
                data=body,
                skip_auto_headers=_NO_AUTO_HEADERS,
                allow_redirects=False,
                timeout=self._timeout,
                auto_decompress=False,
            )
        except BaseException as exc:
            slot.report(None)  # no answer (failed or cancelled): the slot is not kept
            failure = self._send_failure(request, exc)
            if failure is exc:
                raise
            raise failure from None
        try:
            slot.report(response.status, response.headers)
        except Exception:  # NationBuilder answered: whatever its figures, the tool hears it
            log.exception("the rate budget could not read an answer", extra={"account": route.slug})
        self._metrics.upstream_answered(route.slug, time.perf_counter() - started)
        return response

    def _send_failure(self, request: web.Request, exc: BaseException) -> BaseException:
        """The gateway error a failed upstream send stands for, or `exc` itself (our own
        errors, a cancellation, anything unexpected)."""
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(
                f"NationBuilder did not answer within {self._settings.upstream_timeout:g} s"
            )
        if not isinstance(exc, aiohttp.ClientError):
            return exc
        refused: GatewayError | None = request.get(BODY_REFUSED)
        if refused is not None:
            # aiohttp wraps the error our body generator raised; the client's fault.
            return refused
        if isinstance(exc, aiohttp.ClientResponseError):
            # It answered, but its status line or headers cannot be parsed (a header line
            # over aiohttp's limit, for one). The message quotes upstream bytes.
            return UpstreamInvalidResponse(
                "NationBuilder answered with a response head the gateway cannot read "
                "(a malformed status line or header, a header line over 8190 bytes, or "
                "more than 128 header lines); "
                "nothing of it was forwarded"
            )
        return UpstreamUnreachable(f"NationBuilder could not be reached ({type(exc).__name__})")

    async def _forward(
        self, request: web.Request, route: Route, token: IssuedToken
    ) -> web.StreamResponse:
        length = request.content_length
        body: bytes | AsyncIterator[bytes] | None
        has_body = request.body_exists
        if has_body and request.get(NO_CONTINUE):
            # The Expect handler held its 100 back for a request it could not decide (the
            # store was away); taken after all, the client waits for it to send the body.
            request[NO_CONTINUE] = False
            await _send_continue(request)
        if not has_body:
            body, replayable = None, True
        elif length is not None and length <= self._settings.retry_buffer:
            try:
                body, replayable = await request.read(), True
            except (HttpProcessingError, RequestPayloadError):
                raise _malformed_body() from None
        elif length is None:  # chunked: replayable too when it fits the retry buffer
            head, whole = await self._buffered_chunked(request)
            body, replayable = (head, True) if whole else (self._stream_body(request, head), False)
        else:
            body, replayable = self._stream_body(request), False

        upstream = await self._send(request, route, token, body)
        if upstream.status == 429 and replayable and self._limiter.pacing:
            # NationBuilder did not process it: replay once, after the limiter's hold.
            upstream.release()
            upstream = await self._send(request, route, token, body, replay=True)
        read: tuple[bytes, bool] | None = None
        if upstream.status == 401:
            upstream, token, read = await self._after_401(
                request, route, token, body, replayable, upstream
            )
        try:
            return await self._respond(request, route, upstream, token, read)
        finally:
            upstream.release()

    async def _after_401(
        self,
        request: web.Request,
        route: Route,
        token: IssuedToken,
        body: bytes | AsyncIterator[bytes] | None,
        replayable: bool,
        upstream: aiohttp.ClientResponse,
    ) -> tuple[aiohttp.ClientResponse, IssuedToken, tuple[bytes, bool] | None]:
        """The answer to give after NationBuilder's 401, the token it was made with, and
        what of its body was read here already (`_read_upto`'s pair), if anything."""
        retries = self._metrics.upstream_401_retries
        read: tuple[bytes, bool] | None = None
        # A token NationBuilder refused right after a refresh made it: this 401 is about
        # something else (a permission the user lacks), so no refresh, only a newer token
        # if one exists (see may_cure_401); unless NationBuilder says the token expired.
        slug, generation = route.slug, token.generation
        held = not self._tokens.may_cure_401(slug, generation, replayable=replayable)
        if held:
            try:
                read = await self._read_upto(upstream, _PEEK_401)
            except BaseException:
                upstream.release()
                raise
            if self._says_expired(upstream, read[0]):
                held = not self._tokens.may_cure_401(
                    slug, generation, replayable=replayable, expired=True
                )
        if not replayable:
            # The body is gone; still make sure the next request gets a fresh token.
            if not held:
                try:
                    await self._tokens.force_refresh(slug, generation)
                except Exception:  # noqa: S110 - the client gets the upstream 401 either way
                    pass
            return upstream, token, read
        if held:
            newer = await self._tokens.newer_token(slug, generation)
            if newer is None:
                return upstream, token, read
            upstream.release()
            fresh = newer
        else:
            upstream.release()
            try:
                fresh = await self._token(slug, stale=token)
            except GatewayError:
                retries.labels(slug, "refresh_failed").inc()
                raise
        retried = await self._send(request, route, fresh, body)
        if retried.status == 401:
            self._tokens.refused_fresh(slug, fresh.generation)
            retries.labels(slug, "still_unauthorized").inc()
        else:
            retries.labels(slug, "recovered").inc()
        return retried, fresh, None

    @staticmethod
    def _says_expired(upstream: aiohttp.ClientResponse, head: bytes) -> bool:
        """Whether a 401's body (its first bytes, as sent: perhaps gzip or deflate) carries
        NationBuilder's `token_expired` code."""
        if _coding_of(upstream) in ("gzip", "deflate"):
            head = inflate(head, _PEEK_401) or b""
        return _EXPIRED_CODE in head

    # -- the response --------------------------------------------------------------------

    def _origin(self, request: web.Request) -> str:
        """Where the tool reached the gateway: scheme and Host of this request.

        The scheme is X-Forwarded-Proto's first value when it is http or https (a TLS proxy
        in front says so), else the connection's own. Without a usable Host header the
        links fall back to NBGW_PUBLIC_URL. Both only shape links in this request's own
        answer."""
        host = request.headers.get("Host", "")
        if not _HOST_RE.fullmatch(host):
            return self._public
        proto = request.headers.get("X-Forwarded-Proto", "").split(",", 1)[0].strip().lower()
        scheme = proto if proto in ("http", "https") else request.scheme
        return f"{scheme}://{host}"

    def _link_mapper(self, request: web.Request, route: Route) -> LinkMapper:
        """Map a link into the nation's /api/ back through the route the tool used.

        Absolute links (`{nation_url}/api/...`; with the real host template also the
        nation's host in any case, over http or https, and the domain's own and www hosts)
        become `{origin}{route}/api/...` on the address the tool used; root-relative ones
        (`/api/...`, NationBuilder's usual form) gain `/n/{slug}` on that route and are
        already right on the plain /api/ route (the default account, or the X-NB-Nation
        header the tool sends again). Anything else, including links outside the nation's
        /api/, is left as it is. An access_token in a
        mapped link's query is dropped (the gateway would drop it from the request anyway;
        the tool need not see NationBuilder's token). The mapper is pure, so it may run in
        a worker thread."""
        nation = self._settings.nation_base(route.slug).rstrip("/")
        prefix = f"/n/{route.slug}" if route.by_prefix else ""
        origin = self._origin(request)
        domain = self._nation_domain
        hosts = {f"{route.slug}.{domain}", domain, f"www.{domain}"} if domain is not None else set()

        def mapper(link: str) -> str | None:
            if link.startswith(nation):
                tail = link[len(nation) :]
                if _is_api_path(tail):
                    return f"{origin}{prefix}{_without_token(tail)}"
            elif _is_api_path(link):
                mapped = f"{prefix}{_without_token(link)}"
                return mapped if mapped != link else None
            absolute = _ABSOLUTE_URL.match(link) if hosts else None
            if absolute is not None:
                authority = absolute.group(1).lower().rpartition("@")[2]
                host, _, port = authority.partition(":")
                tail = link[absolute.end() :]
                if host in hosts and port in ("", "80", "443") and _is_api_path(tail):
                    return f"{origin}{prefix}{_without_token(tail)}"
            return None

        return mapper

    async def _rewrite(
        self, request: web.Request, route: Route, raw: bytes, encoding: str
    ) -> bytes | None:
        """The body with its links mapped, or None to pass it on exactly as it came.

        Never an error: whatever goes wrong here, the upstream answer (perhaps to a POST
        that already executed) still reaches the client."""
        needles = self._needles(route)
        if encoding == "identity":
            for needle in needles:
                if needle in raw:
                    break
            else:
                return None  # nothing that could be a link: no mapper, no parse
        try:
            mapper = self._link_mapper(request, route)
            if len(raw) <= _INLINE_REWRITE:
                plain = raw if encoding == "identity" else inflate(raw, _INLINE_REWRITE)
                if plain is not None:
                    return rewrite_json(plain, mapper, needles)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._rewriter, rewrite_body, raw, encoding, mapper, needles, _REWRITE_LIMIT
            )
        except Exception:
            log.exception(
                "link rewriting failed; body passed on as sent", extra={"account": route.slug}
            )
            return None

    async def _respond(
        self,
        request: web.Request,
        route: Route,
        upstream: aiohttp.ClientResponse,
        token: IssuedToken,
        read: tuple[bytes, bool] | None = None,
    ) -> web.StreamResponse:
        """The tool's answer from NationBuilder's, which was made with `token`: hop-by-hop
        headers dropped, links mapped back to the gateway, the token itself wherever
        NationBuilder put it in a header (a Location elsewhere, WWW-Authenticate)
        replaced by REDACTED, and JSON bodies rewritten (`_rewrite`). `read` is the start
        of the body when it was read already (and whether that is all of it)."""
        headers: CIMultiDict[str] = CIMultiDict()
        connection_listed = _listed(upstream.headers.get("Connection"))
        sent = token.access_token.reveal()
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower in _DROP_DOWNSTREAM or lower in connection_listed:
                continue
            if lower in _LINK_HEADERS:
                value = self._link_mapper(request, route)(value.strip()) or value
            elif lower == "link" and "<" in value:
                value = _map_link_header(value, self._link_mapper(request, route))
            if sent in value and sent:
                value = value.replace(sent, REDACTED)
            headers.add(name, value if value.isascii() else _header_text(value))
        if upstream.status == 429:
            # A 429 reaches the tool when its replay was refused too: tell it the wait.
            wait = self._limiter.retry_after(route.slug, headers.get("Retry-After"))
            if wait is not None:
                headers.popall("Retry-After", None)
                headers["Retry-After"] = wait
        headers.add("Content-Security-Policy", _SANDBOX)
        if "X-Content-Type-Options" not in headers:
            headers["X-Content-Type-Options"] = "nosniff"

        content_type = upstream.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        encoding = _coding_of(upstream)
        length = upstream.content_length
        head, complete = read if read is not None else (b"", False)
        json_body = content_type in _JSON_TYPES and request.method != "HEAD"
        has_links = 200 <= upstream.status < 300 and upstream.status != 204  # a page
        if json_body and has_links and encoding not in _DECODABLE:
            # Asked for none but these (`_decodable_codings`): passed on, its links would
            # lead the tool's next request elsewhere, another nation's account included.
            raise UpstreamInvalidResponse(
                "NationBuilder answered in a content coding the gateway did not ask for, "
                "so the links in it could not be mapped"
            )
        if json_body and (length is None or length <= _REWRITE_LIMIT):
            if not complete:
                more, complete = await self._read_upto(upstream, _REWRITE_LIMIT - len(head))
                head += more
            if complete:
                rewritten = await self._rewrite(request, route, head, encoding) if head else None
                if rewritten is not None:
                    headers.popall("Content-Encoding", None)
                    headers.popall("ETag", None)  # the body changed; the tag no longer fits
                    head = rewritten
                return web.Response(
                    status=upstream.status, reason=upstream.reason, body=head, headers=headers
                )

        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        if length is not None:
            response.content_length = length
        elif request.version < (1, 1) and not (
            request.method == "HEAD" or upstream.status in (204, 304)
        ):
            # HTTP/1.0 has no chunked framing: the end of the body is the end of the
            # connection (aiohttp would keep it open, and the client wait for the idle
            # timeout or read the next answer as part of this body).
            response.force_close()
        # Sent before the middleware sees the response, so set here.
        response.headers[REQUEST_ID_HEADER] = request_id_of(request)
        await response.prepare(request)
        request[STREAMED_STATUS] = response.status
        try:
            if head:
                await response.write(head)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            # Headers are gone already: all that is left is to cut the connection. A write
            # to a client that went away fails the same way; that is not NationBuilder's.
            if not connection_gone(request):
                log.warning("upstream response broke off", extra={"account": route.slug})
                request.transport.close()  # type: ignore[union-attr]
            return response
        await response.write_eof()
        return response

    async def _read_upto(self, upstream: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
        """Read the body up to `limit` bytes: (what was read, whether that is all of it)."""
        parts: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                chunk = await upstream.content.read(_CHUNK)
                if not chunk:
                    return b"".join(parts), True
                parts.append(chunk)
                size += len(chunk)
        except TimeoutError:
            raise UpstreamTimeout("NationBuilder stopped sending the response") from None
        except aiohttp.ClientError:
            raise UpstreamUnreachable("NationBuilder broke off the response") from None
        return b"".join(parts), False


async def _send_continue(request: web.Request) -> None:
    """The interim 100 Continue: the client may send its body now."""
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # As aiohttp's own Expect handler does: the interim answer is not the response (a
    # failure after it must still be answered with an error, not a cut connection).
    request.writer.output_size = 0
