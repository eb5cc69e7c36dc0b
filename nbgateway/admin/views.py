"""What the admin pages show, computed from plain values: no HTTP, no templates.

Times in words (`moment`), stored failure texts in an admin's words (`plain_error`), a
nation's status and its place in the nations table (`nation_row`: needs re-authorization
first, then failing refreshes, then tokens about to expire, then the rest), and the rows of
the event, audit and client tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

from nbgateway.clock import utc_datetime
from nbgateway.errors import AuthorizationFailed
from nbgateway.models import (
    AccountInfo,
    AccountStatus,
    AuditEntry,
    ClientInfo,
    Event,
    EventKind,
    RefreshOutcome,
)

# "Refreshing soon": the access token expires within the refresh margin plus this.
SOON_LEAD = 300.0

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


class RateReading(Protocol):
    """The last NationBuilder rate-limit reading for a nation (the limiter's `BudgetView`)."""

    @property
    def limit(self) -> int | None: ...
    @property
    def remaining(self) -> int | None: ...
    @property
    def reset_at(self) -> float | None: ...


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
    """Accept "Acme", "acme.nationbuilder.com" or any URL on it (a control-panel page
    pasted from the browser) for the slug "acme"."""
    value = raw.strip().lower()
    for prefix in ("https://", "http://"):
        value = value.removeprefix(prefix)
    if value.endswith(".nationbuilder.com") or ".nationbuilder.com/" in value:
        value = value.split("/", 1)[0]  # the host: what follows is a page of the nation
    return value.rstrip("/").removesuffix(".nationbuilder.com")


# -- what the templates show ----------------------------------------------------------------


def path_part(value: str) -> str:
    """`value` quoted for use as one URL path segment."""
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class NationLink:
    slug: str
    path: str


@dataclass(frozen=True, slots=True)
class Status:
    words: str
    css: str  # ok, soon, fail or reauth
    rank: int  # the nations table shows low ranks first


def status_of(info: AccountInfo, now: float, margin: float) -> Status:
    if info.status is AccountStatus.NEEDS_REAUTH:
        return Status("needs re-authorization", "reauth", 0)
    if info.status is AccountStatus.UNREADABLE:
        return Status("stored credentials unreadable", "reauth", 0)
    if info.last_error:
        return Status("refresh failing", "fail", 1)
    if info.expires_at is None or info.expires_at - now <= margin + SOON_LEAD:
        return Status("refreshing soon", "soon", 2)
    return Status("active", "ok", 3)


def rate_words(reading: RateReading | None, now: float) -> str:
    """ "41 of 100 left, resets in 5 minutes", or "not known"."""
    if reading is None or reading.remaining is None:
        return "not known"
    text = f"{reading.remaining} left"
    if reading.limit is not None:
        text = f"{reading.remaining} of {reading.limit} left"
    if reading.reset_at is not None and reading.reset_at > now:
        text += f", resets in {span(reading.reset_at - now)}"
    return text


@dataclass(frozen=True, slots=True)
class NationRow:
    """One nation as the nations table and its own page show it."""

    slug: str
    path: str
    status: Status
    needs_reauth: bool
    expiry: Moment | None
    last_refresh: Moment | None
    connected: Moment
    error: str | None
    error_detail: str | None
    requests_last_hour: int
    rate: str


def nation_row(
    info: AccountInfo,
    now: float,
    margin: float,
    scrub: Callable[[str], str],
    requests_last_hour: int = 0,
    rate: RateReading | None = None,
) -> NationRow:
    error = scrub(info.last_error) if info.last_error else None
    plain = plain_error(error) if error else None
    return NationRow(
        slug=info.slug,
        path=path_part(info.slug),
        status=status_of(info, now, margin),
        needs_reauth=info.status is AccountStatus.NEEDS_REAUTH,
        expiry=moment(info.expires_at, now, expiry=True) if info.expires_at else None,
        last_refresh=moment(info.last_refresh_at, now) if info.last_refresh_at else None,
        connected=moment(info.created_at, now),
        error=plain,
        error_detail=error if error != plain else None,
        requests_last_hour=requests_last_hour,
        rate=rate_words(rate, now),
    )


def ordered(rows: list[NationRow]) -> list[NationRow]:
    """Needs re-authorization first, then failing refreshes, then the rest; by slug within."""
    return sorted(rows, key=lambda r: (r.status.rank, r.slug))


def matching(infos: list[AccountInfo], query: str) -> list[AccountInfo]:
    """The accounts whose slug contains `query` (case-insensitive; all for an empty query)."""
    needle = query.strip().lower()
    return [i for i in infos if needle in i.slug.lower()] if needle else list(infos)


@dataclass(frozen=True, slots=True)
class EventView:
    what: str
    when: Moment
    detail: str


def event_views(events: list[Event], now: float, scrub: Callable[[str], str]) -> list[EventView]:
    return [
        EventView(_EVENT_WORDS.get(e.kind, str(e.kind)), moment(e.at, now), scrub(e.detail))
        for e in events
    ]


def reauthorized_at(info: AccountInfo, events: list[Event]) -> float | None:
    """When the nation was last re-authorized: its newest "connected" event, if that was
    not its first: older events precede it, or it came after the first connection (the
    store keeps `created_at` as the first connection; its older events may be pruned).
    Not by time alone: a re-authorization can follow the first connection within a second.
    Events from before `created_at` (a second back) belong to an earlier connection that
    was disconnected, and do not count."""
    events = [e for e in events if e.at >= info.created_at - 1]
    for index, event in enumerate(events):  # newest first
        if event.kind is EventKind.CONNECTED:
            earlier = index + 1 < len(events)
            return event.at if earlier or event.at > info.created_at + 1 else None
    return None


@dataclass(frozen=True, slots=True)
class AuditView:
    when: Moment
    client: str
    method: str
    path: str
    status: int
    request_id: str


def audit_views(entries: list[AuditEntry], now: float) -> list[AuditView]:
    return [
        AuditView(moment(e.at, now), e.client, e.method, e.path, e.status, e.request_id)
        for e in entries
    ]


@dataclass(frozen=True, slots=True)
class ClientView:
    name: str
    path: str
    nations: str
    access: str
    created: Moment
    last_used: Moment | None
    key_hint: str


def client_view(info: ClientInfo, now: float) -> ClientView:
    return ClientView(
        name=info.name,
        path=path_part(info.name),
        nations=", ".join(info.nations) if info.nations else "all nations",
        access="read-only" if info.read_only else "read and write",
        created=moment(info.created_at, now),
        last_used=moment(info.last_used_at, now) if info.last_used_at else None,
        key_hint=info.key_hint,
    )


def parse_nations(text: str) -> tuple[str, ...]:
    """The nations field of the client form: slugs separated by commas or spaces."""
    return tuple(n for n in (normalize_nation(p) for p in text.replace(",", " ").split()) if n)


def callback_explanation(error: Exception, message: str) -> tuple[str, str]:
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
            "stored from this answer; if the link was opened before (a reload, say), the "
            "nation may be connected already: see the accounts page, or start again there.",
        )
    if reason == "refused":
        return (
            "NationBuilder refused the authorization",
            f"{message}. invalid_scope, unauthorized_client or invalid_request point at the "
            "app's settings on NationBuilder (its client id, redirect URI or scopes) or at "
            "NBGW_CLIENT_ID and NBGW_PUBLIC_URL; server_error and temporarily_unavailable "
            "usually pass: try again. Nothing was stored.",
        )
    if reason == "incomplete":
        return (
            "NationBuilder's answer is incomplete",
            f"{message}, so there is nothing to exchange for tokens. Start again from the "
            "accounts page. Nothing was stored.",
        )
    if reason == "exchange":
        outcome = error.outcome if isinstance(error, AuthorizationFailed) else None
        if outcome is RefreshOutcome.INVALID_GRANT:
            advice = (
                "NationBuilder refused the authorization code: it was used already, has "
                "expired, or belongs to another request. Start again from the accounts page."
            )
        elif outcome is RefreshOutcome.INVALID_CLIENT:
            advice = (
                "NationBuilder refused the gateway's app credentials: check NBGW_CLIENT_ID "
                "and NBGW_CLIENT_SECRET against the app's settings on NationBuilder, then "
                "start again."
            )
        else:
            advice = "This is often temporary: start again from the accounts page."
        return (
            "NationBuilder did not hand over the tokens",
            f"The authorization was granted, but {message}. {advice} Nothing was stored.",
        )
    return ("Connecting failed", f"{message}. Nothing was stored.")
