"""Every exception nbgateway raises on purpose, in one tree.

    NBGatewayError
    ├── ConfigError              a setting is missing or malformed (names the variable)
    ├── StoreError               the database cannot be used as asked
    │   ├── StoreUnavailable     it cannot be reached or written right now
    │   ├── DecryptError         a ciphertext does not open with any configured key
    │   ├── CorruptRecordError   a stored row is not what the schema promises
    │   ├── AccountNotFound      no account with that slug
    │   └── StateError           an authorization state is unknown, used or expired
    ├── OAuthError               the token endpoint said no, or could not be reached
    │                            (carries a RefreshOutcome; never a token-endpoint body)
    ├── AuthorizationFailed      a /connect flow did not end with stored tokens (says why)
    ├── TokenUnavailable         no usable access token can be had right now
    │   ├── ReauthorizationRequired   the refresh token is dead; an admin must reconnect
    │   └── RefreshBackoff            refreshing failed recently; retry after a delay
    └── GatewayError             an HTTP error the gateway answers itself (JSON:API body)
        ├── UnknownAccount, NoAccountSelected, AccountNeedsReauthorization,
        ├── TokenRefreshFailed, UpstreamUnreachable, UpstreamTimeout,
        ├── TokenStoreError, TokenStoreUnavailable,
        ├── ClientKeyRequired, ClientKeyInvalid, ClientForbidden,
        ├── UpstreamInvalidResponse,
        ├── ClientNotAllowed, RequestTooLarge, InvalidRequest, AdminUnauthorized,
        ├── TooManyAttempts (wrong admin tokens), TooManyConnections (per client address),
        ├── MethodNotAllowed (TRACE, CONNECT), NotImplementedByGateway (transfer codings),
        ├── ExpectationFailed (an Expect header other than 100-continue)
        └── RateLimited          the nation's rate budget would not free up in time

Messages never contain secret values. `GatewayError` carries its HTTP status and code as
data; `middleware.error_response` is the one place that renders it, `token_error` the
one place that turns "no token for this account" into what a client is told, and
`store_failure` the one that does so for a failed store.
"""

from __future__ import annotations

import math

from nbgateway.models import RefreshOutcome
from nbgateway.redact import Secret


class NBGatewayError(Exception):
    """Base of every deliberate nbgateway error."""


class ConfigError(NBGatewayError):
    """One or more settings are missing or malformed; `problems` holds one message each."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StoreError(NBGatewayError):
    """The token store cannot do what was asked."""


class DecryptError(StoreError):
    """A ciphertext did not decrypt: wrong key, or it was moved or altered."""


class CorruptRecordError(StoreError):
    """A stored row does not have the shape the schema promises."""


class AccountNotFound(StoreError):
    """No account with that slug."""

    def __init__(self, slug: str) -> None:
        super().__init__(f"no account named {slug!r}")
        self.slug = slug


class StateError(StoreError):
    """An authorization `state` is unknown, already used, expired or bound elsewhere."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or written right now (down, disk full, read-only)."""


class RefreshLockBusy(StoreUnavailable):
    """Another process has held the account's refresh lock for longer than a refresh can
    take (it may be frozen, or hold a pair it cannot store yet): the database itself works."""


class PairNotStored(StoreUnavailable):
    """A refresh worked at NationBuilder, but the database refused the new pair: the
    process that made the call holds it in memory and keeps trying to store it."""


class OAuthError(NBGatewayError):
    """A token-endpoint call failed; `outcome` classifies it for retries and metrics.

    `rotated_refresh_token` is set when the answer was refused but still carried a new
    refresh token: NationBuilder rotated, so that token is the account's only way forward.
    `retry_after` is the wait, in seconds, the endpoint's Retry-After asked for, if any.
    """

    def __init__(
        self,
        outcome: RefreshOutcome,
        message: str,
        *,
        status: int | None = None,
        rotated_refresh_token: Secret | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.status = status
        self.rotated_refresh_token = rotated_refresh_token
        self.retry_after = retry_after


class AuthorizationFailed(NBGatewayError):
    """Connecting a nation failed; `reason` is denied (the Deny button), refused
    (NationBuilder answered another OAuth error), incomplete (neither code nor error),
    state, exchange (the code exchange failed; `outcome` says how) or invalid (an import
    refused)."""

    def __init__(
        self,
        reason: str,
        message: str,
        slug: str | None = None,
        *,
        outcome: RefreshOutcome | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.slug = slug
        self.outcome = outcome


class TokenUnavailable(NBGatewayError):
    """No valid access token for the account at the moment."""

    def __init__(self, slug: str, message: str) -> None:
        super().__init__(message)
        self.slug = slug


class AccountChanged(TokenUnavailable):
    """A refresh's result was not kept: an admin re-connected, imported or removed the
    account while it ran, and what they stored stays; or (`taken_over`, SQLite) the refresh
    outlasted its lease while the process stalled, and another process took it over."""

    def __init__(self, slug: str, message: str, *, taken_over: bool = False) -> None:
        super().__init__(slug, message)
        self.taken_over = taken_over


class ReauthorizationRequired(TokenUnavailable):
    """The account needs an admin to authorize it again at /connect."""


class RefreshBackoff(TokenUnavailable):
    """The last refresh failed transiently; the next attempt waits `retry_after` seconds."""

    def __init__(self, slug: str, message: str, retry_after: float) -> None:
        super().__init__(slug, message)
        self.retry_after = retry_after

    @property
    def retry_seconds(self) -> int:
        """Whole seconds to wait (rounded up, at least 1): the Retry-After value."""
        return max(1, math.ceil(self.retry_after))


class GatewayError(NBGatewayError):
    """An error response made by the gateway itself."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal gateway error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class UnknownAccount(GatewayError):
    status, code, title = 404, "unknown_account", "Unknown account"


class NoAccountSelected(GatewayError):
    status, code, title = 400, "no_account_selected", "No account selected"


class AccountNeedsReauthorization(GatewayError):
    status, code, title = 401, "account_needs_reauthorization", "Account needs re-authorization"


class TokenRefreshFailed(GatewayError):
    status, code, title = 503, "token_refresh_failed", "Token refresh failed"


class UpstreamUnreachable(GatewayError):
    status, code, title = 502, "upstream_unreachable", "NationBuilder unreachable"


class UpstreamInvalidResponse(GatewayError):
    status, code, title = 502, "upstream_invalid_response", "NationBuilder sent an invalid response"


class UpstreamTimeout(GatewayError):
    status, code, title = 504, "upstream_timeout", "NationBuilder timed out"


class ClientNotAllowed(GatewayError):
    status, code, title = 403, "client_not_allowed", "Client not allowed"


class RequestTooLarge(GatewayError):
    status, code, title = 413, "request_too_large", "Request too large"

    @classmethod
    def over(cls, limit: int) -> RequestTooLarge:
        """A body larger than NBGW_MAX_REQUEST_BODY (`limit` bytes), on any route."""
        return cls(f"the request body exceeds NBGW_MAX_REQUEST_BODY ({limit} bytes)")


class InvalidRequest(GatewayError):
    status, code, title = 400, "invalid_request", "Invalid request"


class RateLimited(GatewayError):
    status, code, title = 429, "rate_limited", "Rate limited"


class AdminUnauthorized(GatewayError):
    status, code, title = 401, "admin_unauthorized", "Admin authorization required"


class TooManyAttempts(GatewayError):
    status, code, title = 429, "too_many_attempts", "Too many wrong admin tokens"


class TooManyConnections(GatewayError):
    status, code, title = 429, "too_many_connections", "Too many connections"


class MethodNotAllowed(GatewayError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class NotImplementedByGateway(GatewayError):
    status, code, title = 501, "not_implemented", "Not implemented"


class ExpectationFailed(GatewayError):
    status, code, title = 417, "expectation_failed", "Expectation failed"


class TokenStoreError(GatewayError):
    status, code, title = 500, "token_store_error", "Stored credentials unreadable"


class TokenStoreUnavailable(GatewayError):
    status, code, title = 503, "store_unavailable", "Token store unavailable"


class ClientKeyRequired(GatewayError):
    status, code, title = 401, "client_key_required", "Client key required"


class ClientKeyInvalid(GatewayError):
    status, code, title = 401, "client_key_invalid", "Client key not recognised"


class ClientForbidden(GatewayError):
    status, code, title = 403, "client_forbidden", "Not allowed for this client key"


class NotFound(GatewayError):
    status, code, title = 404, "not_found", "Not found"


def token_error(slug: str, exc: NBGatewayError, connect_url: str) -> GatewayError:
    """The gateway error a client sees when no token can be had for `slug`."""
    if isinstance(exc, ReauthorizationRequired):
        return AccountNeedsReauthorization(
            f"the account {slug!r} needs an admin to re-authorize it at {connect_url}"
        )
    if isinstance(exc, RefreshBackoff):
        retry = exc.retry_seconds
        return TokenRefreshFailed(
            f"the access token of {slug!r} could not be refreshed; retry in {retry} s",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, AccountChanged) and exc.taken_over:
        return TokenRefreshFailed(
            f"the refresh of {slug!r} took longer than its lease and another gateway process "
            "took it over: retry",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, AccountChanged):
        return TokenRefreshFailed(
            f"the account {slug!r} was connected again, imported or removed while its token "
            "was being refreshed; what was stored then stays: retry",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, StoreError):
        return store_failure(exc, slug)
    return TokenRefreshFailed(f"no access token for {slug!r} is available")


def store_failure(exc: StoreError, slug: str | None = None) -> GatewayError:
    """The gateway error a client or admin sees when the store failed (`slug`: the account
    asked about, if any): 503 with Retry-After while the database cannot be used, 404 for a
    missing account, else 500 naming the check that finds the damage."""
    about = f" for {slug!r}" if slug else ""
    if isinstance(exc, RefreshLockBusy):
        return TokenRefreshFailed(
            f"another gateway process has been refreshing the token{about} for too long; "
            "retry shortly",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, PairNotStored):
        return TokenStoreUnavailable(str(exc), headers={"Retry-After": "30"})
    if isinstance(exc, StoreUnavailable):
        return TokenStoreUnavailable(
            f"the gateway cannot use its database{about} right now; retry shortly",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, AccountNotFound):
        return UnknownAccount(f"no account named {slug or exc.slug!r} is connected")
    what = f"the stored credentials of {slug!r}" if slug else "stored data"
    return TokenStoreError(f"{what} cannot be read; see `nbgateway check`")
