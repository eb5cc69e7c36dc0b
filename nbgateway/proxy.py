"""The transparent proxy: `/api/...`, `/n/{slug}/api/...` and `X-NB-Nation`.

Per request: check the client's address, refuse what the gateway will not forward
(transfer codings other than chunked, a duplicated X-NB-Nation; TRACE and CONNECT are
refused for every path by `middleware.request_context`), pick and
validate the account, refuse anything that could leave the nation's `/api/` (before any
upstream connection), attach a valid bearer token, send only the client's own headers (no
Accept, Accept-Encoding, Content-Type or User-Agent of aiohttp's), stream the body up and
the response down, retry once after an upstream 401 when the body can be replayed, and map
upstream failures to gateway errors. The proxy knows tokens only through `TokenManager`;
it knows nothing of SQL.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from nbgateway.allowlist import AllowList
from nbgateway.config import Settings
from nbgateway.errors import (
    AccountNotFound,
    ClientNotAllowed,
    GatewayError,
    InvalidRequest,
    NoAccountSelected,
    NotImplementedByGateway,
    RequestTooLarge,
    StoreError,
    TokenUnavailable,
    UnknownAccount,
    UpstreamTimeout,
    UpstreamUnreachable,
    token_error,
)
from nbgateway.links import rewrite_links
from nbgateway.metrics import NO_ACCOUNT, Metrics
from nbgateway.middleware import ACCESS_INFO, REQUEST_ID_HEADER, error_response, request_id_of
from nbgateway.models import is_valid_slug
from nbgateway.tokens import IssuedToken, TokenManager

log = logging.getLogger("nbgateway.proxy")

NATION_HEADER = "X-NB-Nation"
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
_DROP_UPSTREAM = HOP_BY_HOP | {"host", "authorization", "content-length", NATION_HEADER.lower()}
_DROP_DOWNSTREAM = HOP_BY_HOP | {"content-length"}
_JSON_TYPES = ("application/json", "application/vnd.api+json")
# JSON bodies larger than this are passed through without link rewriting.
_REWRITE_LIMIT = 16 * 1024 * 1024
_CHUNK = 64 * 1024
# Headers aiohttp's client would add on its own; upstream gets only what the client sent.
_NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "Content-Type", "User-Agent"})
# Set on a request whose streamed body went over NBGW_MAX_REQUEST_BODY.
BODY_TOO_LARGE = web.RequestKey("nbgw_body_too_large", bool)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the account, the raw path below /api/ and the query."""

    slug: str
    raw_tail: str  # percent-encoding kept exactly as the client sent it
    query: str
    by_prefix: bool


def _check_tail(raw_tail: str) -> None:
    """Refuse paths that could leave /api/ once NationBuilder decodes them."""
    for segment in raw_tail.split("/"):
        decoded = unquote(segment)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\\" in segment:
            raise InvalidRequest("the request path must stay below /api/")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            raise InvalidRequest("the request path contains control characters")


def _filter_query(query: str) -> str:
    """Drop every access_token parameter (any case or encoding), keeping all other bytes."""
    if not query:
        return query
    kept = [
        part
        for part in query.split("&")
        if unquote(part.split("=", 1)[0]).strip().lower() != "access_token"
    ]
    return "&".join(kept)


class Proxy:
    """The proxy handler and its policy. One instance per app."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenManager,
        session: aiohttp.ClientSession,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._session = session
        self._metrics = metrics
        self._public = settings.public_url.rstrip("/")
        self._allowed = AllowList(settings.allowed_clients)
        t = settings.upstream_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)

    def _too_large(self) -> RequestTooLarge:
        limit = self._settings.max_request_body
        return RequestTooLarge(f"the request body exceeds NBGW_MAX_REQUEST_BODY ({limit} bytes)")

    # -- routing -----------------------------------------------------------------------

    def _refuse_early(self, request: web.Request) -> None:
        """What is refused before routing: the peer, the body's framing and size."""
        if not self._allowed.allows(request.remote):
            raise ClientNotAllowed("this client address is not in NBGW_ALLOWED_CLIENTS")
        codings = [
            coding.strip().lower()
            for value in request.headers.getall("Transfer-Encoding", ())
            for coding in value.split(",")
            if coding.strip()
        ]
        if any(coding != "chunked" for coding in codings):
            raise NotImplementedByGateway(
                "the gateway accepts no transfer coding but chunked; send the body plain "
                "(Content-Encoding may say how it is compressed)"
            )
        length = request.content_length
        if length is not None and length > self._settings.max_request_body:
            raise self._too_large()

    async def expect_continue(self, request: web.Request) -> web.StreamResponse | None:
        """The route's Expect handler: 100 Continue only for a request the gateway would take.

        Refusals here (413 for a declared body over NBGW_MAX_REQUEST_BODY, 403, 501)
        go out before the client sends its body, and close the connection.
        """
        try:
            self._refuse_early(request)
        except GatewayError as err:
            response = error_response(err)
            response.headers[REQUEST_ID_HEADER] = request_id_of(request)
            response.force_close()
            return response
        expect = request.headers.get("Expect", "")
        if request.version >= (1, 1):
            if expect.lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    def route(self, request: web.Request) -> Route:
        if len(request.headers.getall(NATION_HEADER, ())) > 1:
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
            slug = self._select_account(request)
        else:  # pragma: no cover - the router only sends the two forms above
            raise InvalidRequest("only /api/... and /n/{slug}/api/... are proxied")
        _check_tail(tail)
        return Route(slug=slug, raw_tail=tail, query=_filter_query(query), by_prefix=by_prefix)

    def _select_account(self, request: web.Request) -> str:
        values = request.headers.getall(NATION_HEADER, ())
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
            raise NoAccountSelected(
                "several or no accounts are connected: name one with /n/{slug}/api/..., the "
                f"{NATION_HEADER} header, or NBGW_DEFAULT_ACCOUNT"
            )
        return only

    # -- the handler ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        metrics = self._metrics
        metrics.in_flight.inc()
        started = time.perf_counter()
        account = NO_ACCOUNT
        status = 500
        info = request.get(ACCESS_INFO)
        try:
            self._refuse_early(request)
            route = self.route(request)
            account = route.slug
            if info is not None:
                info["account"] = account
            issued = await self._token(route.slug)
            response = await self._forward(request, route, issued)
            status = response.status
            return response
        except GatewayError as err:
            status = err.status
            if isinstance(err, UnknownAccount):
                account = NO_ACCOUNT  # keeps label values bounded to real accounts
            raise
        finally:
            metrics.in_flight.dec()
            metrics.proxied(account, request.method, status, time.perf_counter() - started)

    async def _token(self, slug: str, stale: IssuedToken | None = None) -> IssuedToken:
        """A token from the manager, with its failures as gateway errors."""
        try:
            if stale is None:
                return await self._tokens.access_token(slug)
            return await self._tokens.force_refresh(slug, stale.generation)
        except (TokenUnavailable, StoreError) as exc:
            if isinstance(exc, StoreError) and not isinstance(exc, AccountNotFound):
                log.error(
                    "stored credentials unreadable", extra={"account": slug, "error": str(exc)}
                )
            raise token_error(slug, exc, f"{self._public}/connect") from None

    def _upstream_headers(self, request: web.Request, token: IssuedToken) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection_listed = {
            h.strip().lower() for h in request.headers.get("Connection", "").split(",") if h
        }
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in _DROP_UPSTREAM or lower in connection_listed:
                continue
            if lower == "x-forwarded-for":
                continue  # re-added below with the peer appended
            headers.add(name, value)
        peer = request.remote or ""
        previous = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers[REQUEST_ID_HEADER] = request_id_of(request)
        headers["Authorization"] = f"Bearer {token.access_token.reveal()}"
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        return headers

    async def _stream_body(self, request: web.Request) -> AsyncIterator[bytes]:
        limit = self._settings.max_request_body
        seen = 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            seen += len(chunk)
            if seen > limit:
                request[BODY_TOO_LARGE] = True
                raise self._too_large()
            yield chunk

    async def _send(
        self,
        request: web.Request,
        route: Route,
        token: IssuedToken,
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        url = f"{self._settings.nation_base(route.slug)}/api/{route.raw_tail}"
        if route.query:
            url = f"{url}?{route.query}"
        started = time.perf_counter()
        try:
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
        except TimeoutError:
            raise UpstreamTimeout(
                f"NationBuilder did not answer within {self._settings.upstream_timeout:g} s"
            ) from None
        except RequestTooLarge:
            raise
        except aiohttp.ClientError as exc:
            if request.get(BODY_TOO_LARGE):
                # aiohttp wraps the error our body generator raised; the client's fault.
                raise self._too_large() from None
            raise UpstreamUnreachable(
                f"NationBuilder could not be reached ({type(exc).__name__})"
            ) from None
        self._metrics.upstream_answered(route.slug, time.perf_counter() - started)
        return response

    async def _forward(
        self, request: web.Request, route: Route, token: IssuedToken
    ) -> web.StreamResponse:
        length = request.content_length
        body: bytes | AsyncIterator[bytes] | None
        if not request.body_exists:
            body, replayable = None, True
        elif length is not None and length <= self._settings.retry_buffer:
            body, replayable = await request.read(), True
        else:
            body, replayable = self._stream_body(request), False

        upstream = await self._send(request, route, token, body)
        if upstream.status == 401:
            upstream = await self._after_401(request, route, token, body, replayable, upstream)
        try:
            return await self._respond(request, route, upstream)
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
    ) -> aiohttp.ClientResponse:
        retries = self._metrics.upstream_401_retries
        if not replayable:
            # The body is gone; still make sure the next request gets a fresh token.
            try:
                await self._tokens.force_refresh(route.slug, token.generation)
            except Exception:  # noqa: S110 - the client gets the upstream 401 either way
                pass
            return upstream
        upstream.release()
        try:
            fresh = await self._token(route.slug, stale=token)
        except GatewayError:
            retries.labels(route.slug, "refresh_failed").inc()
            raise
        retried = await self._send(request, route, fresh, body)
        outcome = "still_unauthorized" if retried.status == 401 else "recovered"
        retries.labels(route.slug, outcome).inc()
        return retried

    # -- the response --------------------------------------------------------------------

    def _rewrite(self, route: Route, raw: bytes) -> bytes | None:
        nation, prefix = self._settings.nation_base(route.slug), f"/n/{route.slug}"
        # Cheap byte checks first; JSON may escape slashes ("\\/"), so that too means "look".
        if (
            nation.encode() not in raw
            and not (route.by_prefix and b"/api/" in raw)
            and b"\\/" not in raw
        ):
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None

        def mapper(link: str) -> str | None:
            if link.startswith(nation + "/api/") or link == nation + "/api":
                return f"{self._public}{prefix}{link[len(nation) :]}"
            if route.by_prefix and (link.startswith("/api/") or link == "/api"):
                return f"{prefix}{link}"
            return None

        if not rewrite_links(doc, mapper):
            return None
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    async def _respond(
        self, request: web.Request, route: Route, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict()
        connection_listed = {
            h.strip().lower() for h in upstream.headers.get("Connection", "").split(",") if h
        }
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower not in _DROP_DOWNSTREAM and lower not in connection_listed:
                headers.add(name, value)

        content_type = upstream.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        encoding = upstream.headers.get("Content-Encoding", "identity").lower()
        length = upstream.content_length
        head = b""
        if (
            content_type in _JSON_TYPES
            and request.method != "HEAD"
            and encoding in ("identity", "gzip", "deflate")
            and (length is None or length <= _REWRITE_LIMIT)
        ):
            head, complete = await self._read_upto(upstream, _REWRITE_LIMIT)
            if complete:
                plain = head
                if encoding != "identity":
                    # Bounded: a small compressed body must not expand without limit.
                    inflater = zlib.decompressobj(wbits=47)  # 47: gzip or zlib header
                    try:
                        plain = inflater.decompress(head, _REWRITE_LIMIT)
                    except zlib.error:
                        plain = b""
                    if inflater.unconsumed_tail:
                        plain = b""  # too large to rewrite: passed through as sent
                rewritten = self._rewrite(route, plain) if plain else None
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
        # Sent before the middleware sees the response, so set here.
        response.headers[REQUEST_ID_HEADER] = request_id_of(request)
        await response.prepare(request)
        try:
            if head:
                await response.write(head)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            # Headers are gone already: all that is left is to cut the connection.
            log.warning("upstream response broke off", extra={"account": route.slug})
            if request.transport is not None:
                request.transport.close()
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
