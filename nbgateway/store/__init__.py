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
from nbgateway.errors import StoreError
from nbgateway.store.base import (
    EVENTS_KEPT,
    LEASE_SLACK,
    SQLITE_BUSY_TIMEOUT,
    AccountLock,
    ClientExists,
    GenerationConflict,
    LeaseLost,
    PendingAuthorization,
    RotationReport,
    SecretListener,
    StoreDump,
    TokenStore,
    lease_seconds,
)
from nbgateway.store.sqlite import SCHEMA_VERSION, SQLiteStore, holds_no_database

__all__ = [
    "EVENTS_KEPT",
    "LEASE_SLACK",
    "SCHEMA_VERSION",
    "AccountLock",
    "ClientExists",
    "GenerationConflict",
    "LeaseLost",
    "PendingAuthorization",
    "RotationReport",
    "SQLiteStore",
    "StoreDump",
    "TokenStore",
    "copy_store",
    "holds_no_database",
    "is_postgres_url",
    "lease_seconds",
    "make_store",
]


async def copy_store(source: TokenStore, target: TokenStore) -> dict[str, int]:
    """Copy every row of the open `source` into `target`, which must hold no accounts yet
    (ciphertexts as they are); `target` is opened here, and only once every source row has
    been read (so a refused copy does not even create a target SQLite file).

    Refuses (StoreError, nothing written) when a source row does not decrypt with the
    configured keys or does not parse, or when the target already holds accounts.
    Returns the row counts.
    """
    problems = await source.verify()
    if problems:
        raise StoreError(
            f"{len(problems)} stored row(s) in {source.description} cannot be read with the "
            f"configured keys; nothing was copied (first: {problems[0]})"
        )
    dump = await source.dump()
    async with target:
        await target.load(dump)
    return dump.counts()


def make_store(
    database: str | Path,
    cipher: Cipher,
    clock: Clock,
    *,
    token_timeout: float = 15.0,
    on_secret: SecretListener | None = None,
    busy_timeout: float | None = None,
    migrate: bool = True,
) -> TokenStore:
    """The store for `database` (not yet opened: use `async with`). `busy_timeout`: how
    long a SQLite statement waits for another process's lock (its default if None).
    `migrate=False`: an older schema is left as it is (`pending_version` says which), and
    an empty database stays empty (`pending_version` 0)."""
    if is_postgres_url(database):
        from nbgateway.store.postgres import PostgresStore

        return PostgresStore(
            str(database),
            cipher,
            clock,
            token_timeout=token_timeout,
            on_secret=on_secret,
            migrate=migrate,
        )
    return SQLiteStore(
        Path(database),
        cipher,
        clock,
        busy_timeout=SQLITE_BUSY_TIMEOUT if busy_timeout is None else busy_timeout,
        token_timeout=token_timeout,
        on_secret=on_secret,
        migrate=migrate,
    )
