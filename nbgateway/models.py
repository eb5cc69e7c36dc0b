"""Plain values shared by every layer: accounts, token sets, statuses, outcomes, events.

Nothing here does I/O. Token values travel only as `Secret`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from nbgateway.redact import Secret

# A nation slug: lowercase letters, digits and hyphens, at most 63 characters (a DNS
# label), starting with a letter or digit. (A trailing hyphen is kept valid: an account
# stored under such a slug must stay addressable, if only to be removed.)
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})$")


def is_valid_slug(value: str) -> bool:
    """True for a syntactically valid nation slug."""
    return SLUG_RE.fullmatch(value) is not None


class AccountStatus(StrEnum):
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    # Never stored: how a listing shows a row whose stored values cannot be read.
    UNREADABLE = "unreadable"


class RefreshOutcome(StrEnum):
    """How a call to the token endpoint ended (the `outcome` metric label)."""

    SUCCESS = "success"
    INVALID_GRANT = "invalid_grant"
    INVALID_CLIENT = "invalid_client"
    NETWORK_ERROR = "network_error"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        """The stored refresh token is dead: only a human re-authorizing helps."""
        return self is RefreshOutcome.INVALID_GRANT


class EventKind(StrEnum):
    CONNECTED = "connected"
    REFRESHED = "refreshed"
    REFRESH_FAILED = "refresh_failed"
    NEEDS_REAUTH = "needs_reauth"
    REMOVED = "removed"
    IMPORTED = "imported"


@dataclass(frozen=True, slots=True)
class TokenSet:
    """What a successful token call yields, with expiry already made absolute."""

    access_token: Secret
    refresh_token: Secret
    expires_at: float
    scope: str


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """An account as shown to admins: everything but the tokens."""

    slug: str
    status: AccountStatus
    expires_at: float | None
    scope: str
    generation: int
    last_refresh_at: float | None
    last_error: str | None
    created_at: float
    updated_at: float
    # Set while a refresh is in flight, or left behind by a process that stopped during one.
    refresh_started_at: float | None


@dataclass(frozen=True, slots=True)
class Account(AccountInfo):
    """An account with its decrypted tokens (`Secret`s; None when not stored)."""

    access_token: Secret | None
    refresh_token: Secret | None


@dataclass(frozen=True, slots=True)
class Event:
    """One line of an account's append-only history."""

    id: int
    slug: str
    kind: EventKind
    at: float
    detail: str


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """A registered tool (client key) as shown to admins: never the key itself.

    `nations` empty means every nation. `key_hint` is the key's public prefix.
    """

    name: str
    nations: tuple[str, ...]
    read_only: bool
    created_at: float
    last_used_at: float | None
    key_hint: str


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """A stored client key: its public lookup id, salt and salted hash (never the key)."""

    info: ClientInfo
    key_id: str
    salt: bytes
    key_hash: bytes


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One proxied write: who, which nation, what, and what NationBuilder answered."""

    at: float
    client: str
    nation: str
    method: str
    path: str
    status: int
    request_id: str
