"""Persistence of accounts, events and pending authorizations, behind one interface.

`make_store(database, cipher, clock, ...)` picks the backend from the form of
NBGW_DATABASE: a `postgresql://` (or `postgres://`) URL selects PostgreSQL (several
replicas sharing one database), anything else is a SQLite file path (the embedded
default). Nothing outside this package imports a backend module; everything else sees
`TokenStore` (see `base.py` for the interface and the refresh-coordination rules).
"""

from __future__ import annotations

from pathlib import Path

from nbgateway.clock import Clock
from nbgateway.config import is_postgres_url
from nbgateway.crypto import Cipher
from nbgateway.store.base import (
    EVENTS_KEPT,
    AccountLock,
    GenerationConflict,
    PendingAuthorization,
    RotationReport,
    SecretListener,
    StoreDump,
    TokenStore,
    lease_seconds,
)
from nbgateway.store.sqlite import SCHEMA_VERSION, SQLiteStore

__all__ = [
    "EVENTS_KEPT",
    "SCHEMA_VERSION",
    "AccountLock",
    "GenerationConflict",
    "PendingAuthorization",
    "RotationReport",
    "SQLiteStore",
    "StoreDump",
    "TokenStore",
    "is_postgres_url",
    "lease_seconds",
    "make_store",
]


def make_store(
    database: str | Path,
    cipher: Cipher,
    clock: Clock,
    *,
    token_timeout: float = 15.0,
    on_secret: SecretListener | None = None,
) -> TokenStore:
    """The store for `database` (not yet opened: use `async with`)."""
    if is_postgres_url(database):
        from nbgateway.store.postgres import PostgresStore

        return PostgresStore(
            str(database), cipher, clock, token_timeout=token_timeout, on_secret=on_secret
        )
    return SQLiteStore(
        Path(database), cipher, clock, token_timeout=token_timeout, on_secret=on_secret
    )
