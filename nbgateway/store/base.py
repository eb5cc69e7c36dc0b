"""The store interface and what both backends share: protocols, row <-> model, sealing.

`TokenStore` is everything the token manager, the account service and the CLI need from
storage; `AccountLock` is one account held under the cross-process refresh coordination
(`TokenStore.refresh_lock`). Both backends (`sqlite.py`, `postgres.py`) implement them
with the same columns and the same `Cipher` associated data, so rows move between them
unchanged (`dump` / `load`, used by `nbgateway migrate`). Both name a refresh's holder
with `owner_id` and judge a holder they find with `holder_runs` (this host's process
table, the only thing here that looks outside the process); nothing here does database
or network I/O.

Refresh coordination, as every backend must provide it:

- `refresh_lock(slug)` gives exclusive use of one account's refresh across every process
  sharing the database, and never blocks another account. It waits (without polling the
  lock itself) while another live holder has it; a holder that died is replaced: at once
  when it was a process of the same host that no longer runs, after the lease deadline
  when that cannot be known (a holder on another host). PostgreSQL drops a dead session's
  lock, but a session also ends while its process runs on (a database restart, a dropped
  connection), so the marker left in the row is judged the same way. A holder that is
  alive but could not write the result of its token call (disk full, the database gone
  away) keeps the account: the rotated pair may exist only in its memory (TokenManager
  stores it once it can), so it is not replaced while it runs. SQLite keeps the lease in
  the row; PostgreSQL relies on the "refresh in flight" marker left in the row, since
  leaving the block (or losing the session) releases its lock. Within one store, one task
  at a time holds an account's lock (the others wait their turn, as sessions queue for
  PostgreSQL's lock). Exclusivity is promised until the block's result is written (or an
  admin's write replaces the row): the holder does nothing under the lock after that, and
  SQLite, whose result write clears the lease with it, may then grant another process
  the lock before the block ends.
- `AccountLock.begin_refresh()` durably records a "refresh in flight" marker before the
  token call; `save_tokens`, `save_refresh_token`, `record_failure` and
  `mark_needs_reauth` clear it with the result. A holder that finds a marker left by a
  dead predecessor sees it as `interrupted_at` (and `AccountInfo.refresh_started_at`
  shows it to the start-up recovery and the admin pages). `record_failure(...,
  unanswered=True)` (a timeout, a dropped connection: NationBuilder may have rotated)
  keeps the call's start time in the row, and the next holder, in any process, sees it
  as `unanswered_at`. (SQLite's lease lives in the row: a lock taken over such a start
  holds it until its release puts it back, so a process that dies holding that lock, or
  whose release fails, loses it, and a later needs-reauth reason lacks "it probably
  rotated it"; PostgreSQL's lock leaves the row as it is. A live holder never looks stuck
  with a result for a start that was not its own.)
- `begin_refresh`, `save_tokens`, `save_refresh_token`, `record_failure` and
  `mark_needs_reauth` are a compare-and-set on the generation the account had when the
  lock was taken: if another writer (a re-connect by an admin, an import, a removal)
  changed it meanwhile, they raise `GenerationConflict` and store nothing (and a refresh
  stopped at `begin_refresh` sends no token of a row it does not hold). On SQLite,
  `begin_refresh`, `record_failure` and `mark_needs_reauth` raise `LeaseLost`, a
  GenerationConflict, when the lease lapsed and another process took it over: a stalled
  holder's late failure says nothing of the new holder's refresh and leaves its lease be
  (as on PostgreSQL, where the lost lock's writes fail with its session); its late
  `save_tokens` still lands, the rotated pair being the only one NationBuilder honours.
  A row stored after a removal starts above the removed row's generation, so nothing
  meant for the removed row lands on it.
- `import_refresh_token` is one too: it stores a new row only where none is (`replaces`
  None), or replaces the row of generation `replaces`; it returns the row's generation.
  `remove_account(..., generation=g)` removes the row only while it is that generation.
- No transaction stays open during the token call on SQLite; on PostgreSQL only the lock's
  own connection is held.

Admin sessions and the wrong-admin-token throttle keep two small, short-lived tables here
so that every process sharing the database sees the same state: logged-out sessions (only
a hash of the session id, until the session would have expired) and wrong-token attempts
per client address (pruned by age on every write and capped at LOGIN_FAILURES_KEPT rows).
The policy (how many attempts, which window) is the caller's (`admin/session.py`); these
rows are not part of `dump` / `load`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from nbgateway.clock import Clock
from nbgateway.crypto import Cipher
from nbgateway.errors import CorruptRecordError, DecryptError, StoreError
from nbgateway.models import (
    Account,
    AccountInfo,
    AccountStatus,
    AuditEntry,
    ClientInfo,
    ClientRecord,
    Event,
    EventKind,
    TokenSet,
    is_valid_slug,
)
from nbgateway.redact import Secret


class Row(Protocol):
    """A stored row read by column name (sqlite3.Row, asyncpg.Record, a dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


SecretListener = Callable[[Secret, str], None]

# Columns every backend stores, in this order (also the layout `dump`/`load` exchange).
ACCOUNT_FIELDS: tuple[str, ...] = (
    "slug",
    "access_token",
    "refresh_token",
    "expires_at",
    "scope",
    "status",
    "generation",
    "last_refresh_at",
    "last_error",
    "created_at",
    "updated_at",
    "refresh_owner",
    "refresh_deadline",
    "refresh_started_at",
)
INFO_FIELDS: tuple[str, ...] = tuple(
    f for f in ACCOUNT_FIELDS if f not in ("access_token", "refresh_token")
)
EVENT_FIELDS: tuple[str, ...] = ("id", "slug", "kind", "at", "detail")
STATE_FIELDS: tuple[str, ...] = (
    "state_hash",
    "slug",
    "verifier",
    "binding",
    "created_at",
    "expires_at",
)
CLIENT_FIELDS: tuple[str, ...] = (
    "name",
    "key_id",
    "salt",
    "key_hash",
    "nations",
    "read_only",
    "created_at",
    "last_used_at",
)
AUDIT_FIELDS: tuple[str, ...] = (
    "id",
    "at",
    "client",
    "nation",
    "method",
    "path",
    "status",
    "request_id",
)
LAST_ERROR_MAX = 300
# Longest path kept in an audit entry (the query string is never kept).
AUDIT_PATH_MAX = 500
# Events kept per account: enough history for the admin page and debugging, bounded even
# through a long outage (a failure is recorded at most once per backoff period).
EVENTS_KEPT = 1000
# `load` (migrate) copies into a database without any of these, named so in its refusal:
# copied ids and names would collide with them.
LOAD_REFUSED_WHEN_HOLDING: tuple[tuple[str, str], ...] = (
    ("accounts", "accounts"),
    ("clients", "client keys"),
    ("events", "events (of accounts removed since)"),
    ("audit", "audit entries"),
)
# Pending authorizations kept at once (oldest dropped first) and their longest life.
STATES_KEPT = 500
# Wrong admin-token attempts kept at once, over every client address (oldest dropped
# first): a flood from many addresses cannot grow the table without bound.
LOGIN_FAILURES_KEPT = 50_000


class ClientExists(StoreError):
    """A client with that name is already registered."""


class GenerationConflict(StoreError):
    """The account changed (another writer) since the refresh lock read it; nothing stored."""


class LeaseLost(GenerationConflict):
    """The refresh lock was lost and another process holds (or held) the account's refresh
    since; nothing stored. On SQLite the lease lives in the row: a holder that stalled past
    its deadline finds it taken over. (On PostgreSQL the lock is its session's, whose writes
    fail with it.)"""


def _pid_namespace() -> str:
    """This process's PID namespace ("-" where it cannot be known): a pid means the same
    process only to another process of the same host and namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None when that
    cannot be read: with the pid, it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22 of proc(5); the first two come before ")"
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def owner_id() -> str:
    """Who holds a refresh lease or marker: host, PID namespace, pid with its start time,
    and a random part (the same pid in another process or another store is another owner)."""
    pid = os.getpid()
    start = _process_start(pid)
    process = f"{pid}.{start}" if start is not None else str(pid)
    return f"{socket.gethostname()}/{_pid_namespace()}/{process}/{uuid.uuid4().hex[:8]}"


def holder_runs(holder: str) -> bool | None:
    """Whether the lease holder's process still runs: known only for a process of this
    host and PID namespace (None for anything else: another host or namespace). A holder
    that recorded its start time and whose pid now belongs to a process started at
    another time is gone (its pid was reused)."""
    parts = holder.split("/")
    if len(parts) < 4 or parts[1] == "-":
        return None
    host, namespace = parts[0], parts[1]
    pid, _, start = parts[2].partition(".")
    if host != socket.gethostname() or namespace != _pid_namespace() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    if start:
        now_start = _process_start(int(pid))
        if now_start is not None and now_start != start:
            return False
    return True


# Seconds a SQLite statement waits for another process's lock by default.
SQLITE_BUSY_TIMEOUT = 10.0
# How often a waiter re-checks a refresh held elsewhere even if nothing was committed.
LEASE_RECHECK = 1.0
# SET clauses: the whole "refresh in flight" marker (SQLite: with the lease) cleared, or
# only its holder (the call's start stays for the next holder to see).
CLEAR_MARKER = "refresh_owner = NULL, refresh_deadline = NULL, refresh_started_at = NULL"
CLEAR_OWNER = "refresh_owner = NULL, refresh_deadline = NULL"


def failure_changes(*, needs_reauth: bool, unanswered: bool) -> tuple[EventKind, str]:
    """A refresh failure's event, and what it sets in the row besides the error: needing
    re-authorization moves the generation on (a later token is another one); a call left
    unanswered keeps its start time (NationBuilder may have rotated)."""
    if needs_reauth:
        status = AccountStatus.NEEDS_REAUTH.value
        return (
            EventKind.NEEDS_REAUTH,
            f"status = '{status}', generation = generation + 1, {CLEAR_MARKER}",
        )
    return EventKind.REFRESH_FAILED, CLEAR_OWNER if unanswered else CLEAR_MARKER


# Seconds a lease lasts beyond the bounded token call it covers (`lease_seconds`).
LEASE_SLACK = 5.0


def lease_seconds(token_timeout: float) -> float:
    """How long a refresh lease (or a kept marker, from its holder's last lock) lasts:
    longer than the bounded token call it covers, twice NBGW_TOKEN_TIMEOUT."""
    return 2 * token_timeout + LEASE_SLACK


def state_hash(state: str) -> str:
    """Only a hash of `state` is stored: a copy of the database cannot complete a flow."""
    return hashlib.sha256(state.encode()).hexdigest()


def session_hash(sid: str) -> str:
    """Only a hash of a logged-out session id is stored: the id is a bearer secret of the
    cookie, and the hash is enough to refuse that cookie."""
    return hashlib.sha256(b"nbgateway session:" + sid.encode()).hexdigest()


def _status(value: Any, slug: str) -> AccountStatus:
    try:
        status = AccountStatus(value)
    except ValueError:
        status = AccountStatus.UNREADABLE
    if status is AccountStatus.UNREADABLE:  # shown only, never stored
        raise CorruptRecordError(f"account {slug!r} has an unknown status {value!r}")
    return status


def _number(value: Any, owner: str, name: str, of: str = "account") -> float | None:
    """A numeric column of `of` `owner` (an account's slug, a client key's name ...)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CorruptRecordError(f"{name} of {of} {owner!r} is not a number")
    return float(value)


def _text(value: Any, owner: object, name: str, of: str = "account") -> Any:
    """A text column of `of` `owner`: what SQLite hands back for a cell that is not UTF-8
    (its bytes) is refused, naming the column."""
    if value is not None and not isinstance(value, str):
        raise CorruptRecordError(f"{name} of {of} {owner!r} is not text")
    return value


def _whole(value: Any, owner: str, name: str) -> int:
    """A whole-number column (SQLite takes 1.5 or "1" in an INTEGER column)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise CorruptRecordError(f"{name} of account {owner!r} is not a whole number ({value!r})")
    return value


def _required_number(value: Any, owner: str, name: str, of: str) -> float:
    number = _number(value, owner, name, of)
    if number is None:
        raise CorruptRecordError(f"{name} of {of} {owner!r} is missing")
    return number


def _blob(value: Any, owner: str, name: str, of: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CorruptRecordError(f"{name} of {of} {owner!r} is not binary data")
    return bytes(value)


log = logging.getLogger("nbgateway.store")
_Row = TypeVar("_Row")


def readable_rows(rows: Iterable[Row], parse: Callable[[Row], _Row], table: str) -> list[_Row]:
    """`parse` of each row; a row that is corrupt (CorruptRecordError) is left out, and
    left stored, with an error logged: one bad row must neither hide the others nor stop
    the gateway. `TokenStore.verify` (and so `nbgateway check`) names it."""
    parsed: list[_Row] = []
    for row in rows:
        try:
            parsed.append(parse(row))
        except CorruptRecordError as exc:
            log.error(f"a stored {table} row cannot be read; left out", extra={"error": str(exc)})
    return parsed


def corrupt_rows(rows: Iterable[Row], parse: Callable[[Row], object]) -> list[str]:
    """The problem of each row `parse` refuses (for `TokenStore.verify`)."""
    problems: list[str] = []
    for row in rows:
        try:
            parse(row)
        except CorruptRecordError as exc:
            problems.append(str(exc))
    return problems


def unreadable_states(rows: Iterable[Row], cipher: Cipher) -> list[str]:
    """The problem of each pending authorization (slug, verifier) whose PKCE verifier does
    not decrypt (for `TokenStore.verify`, which passes the unexpired ones: an expired one
    is refused anyway): that connect cannot be completed."""
    problems: list[str] = []
    for row in rows:
        slug, verifier = row["slug"], row["verifier"]
        try:
            if not isinstance(slug, str) or not isinstance(verifier, bytes | bytearray):
                raise DecryptError(f"a pending authorization's row is damaged ({slug!r})")
            cipher.decrypt(bytes(verifier), slug=slug, field="code_verifier")
        except DecryptError as exc:
            problems.append(f"pending authorization: {exc}; start that connect again")
    return problems


def info_from_row(row: Row) -> AccountInfo:
    """An account's public part from a stored row (nothing decrypted)."""
    slug = row["slug"]
    if not isinstance(slug, str):
        raise CorruptRecordError(f"an account row's slug is not text ({slug!r})")
    created = _number(row["created_at"], slug, "created_at")
    updated = _number(row["updated_at"], slug, "updated_at")
    return AccountInfo(
        slug=slug,
        status=_status(row["status"], slug),
        expires_at=_number(row["expires_at"], slug, "expires_at"),
        scope=_text(row["scope"], slug, "scope") or "",
        generation=_whole(row["generation"], slug, "generation"),
        last_refresh_at=_number(row["last_refresh_at"], slug, "last_refresh_at"),
        last_error=_text(row["last_error"], slug, "last_error"),
        created_at=created or 0.0,
        updated_at=updated or 0.0,
        refresh_started_at=(
            _number(row["refresh_started_at"], slug, "refresh_started_at")
            if row["refresh_owner"] is not None
            else None
        ),
    )


def client_from_row(row: Row) -> ClientRecord:
    """A client key from its row; CorruptRecordError naming the column that is not what
    the schema promises (SQLite does not enforce column types)."""
    name = row["name"]
    if not isinstance(name, str) or not name:
        raise CorruptRecordError(f"a client key row has no name (key id {row['key_id']!r})")
    of = "client key"
    nations = tuple(n for n in (_text(row["nations"], name, "nations", of) or "").split(",") if n)
    for slug in nations:
        if not is_valid_slug(slug):
            raise CorruptRecordError(f"client key {name!r}: nations holds {slug!r}, no nation slug")
    key_id = _text(row["key_id"], name, "key_id", of) or ""
    info = ClientInfo(
        name=name,
        nations=nations,
        read_only=bool(row["read_only"]),
        created_at=_required_number(row["created_at"], name, "created_at", of),
        last_used_at=_number(row["last_used_at"], name, "last_used_at", of),
        key_hint=f"nbgw_{key_id[:4]}…",
    )
    salt = _blob(row["salt"], name, "salt", of)
    digest = _blob(row["key_hash"], name, "key_hash", of)
    return ClientRecord(info, key_id, salt, digest)


def client_row(record: ClientRecord) -> dict[str, Any]:
    info = record.info
    return {
        "name": info.name,
        "key_id": record.key_id,
        "salt": record.salt,
        "key_hash": record.key_hash,
        "nations": ",".join(info.nations),
        "read_only": 1 if info.read_only else 0,
        "created_at": info.created_at,
        "last_used_at": info.last_used_at,
    }


def audit_from_row(row: Row) -> AuditEntry:
    """An audit entry from its row; CorruptRecordError when a column is not what the schema
    promises."""
    entry = row["id"]
    of = "audit entry"
    status = row["status"]
    if isinstance(status, bool) or not isinstance(status, int):
        raise CorruptRecordError(f"status of {of} {entry!r} is not a number")
    return AuditEntry(
        at=_required_number(row["at"], entry, "at", of),
        client=_text(row["client"], entry, "client", of),
        nation=_text(row["nation"], entry, "nation", of),
        method=_text(row["method"], entry, "method", of),
        path=_text(row["path"], entry, "path", of),
        status=status,
        request_id=_text(row["request_id"], entry, "request_id", of),
    )


# What reading a damaged account row raises: a ciphertext that does not open, a column
# that is not what it should be (text where a number belongs, a number out of range).
ROW_ERRORS: tuple[type[Exception], ...] = (
    CorruptRecordError,
    DecryptError,
    TypeError,
    ValueError,
    OverflowError,
)


def _slug_of(row: Row) -> str:
    raw = row["slug"]
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def listed_info_from_row(row: Row) -> AccountInfo:
    """`info_from_row` for listings: a row whose own columns are corrupt is listed as
    UNREADABLE with the problem as its error, so one bad row does not hide the others."""
    try:
        return info_from_row(row)
    except ROW_ERRORS as exc:
        return AccountInfo(
            slug=_slug_of(row),
            status=AccountStatus.UNREADABLE,
            expires_at=None,
            scope="",
            generation=0,
            last_refresh_at=None,
            last_error=f"the stored account cannot be read: {exc}"[:LAST_ERROR_MAX],
            created_at=0.0,
            updated_at=0.0,
            refresh_started_at=None,
        )


def event_from_row(row: Row) -> Event:
    """An account event from its row; CorruptRecordError when a column is not what the
    schema promises."""
    entry, of = row["id"], "event"
    try:
        kind = EventKind(row["kind"])
    except ValueError:
        raise CorruptRecordError(f"event {entry!r} has an unknown kind {row['kind']!r}") from None
    return Event(
        int(entry),
        _text(row["slug"], entry, "slug", of),
        kind,
        _required_number(row["at"], entry, "at", of),
        _text(row["detail"], entry, "detail", of),
    )


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """A consumed authorization state: which nation it was for and its PKCE verifier."""

    slug: str
    code_verifier: Secret
    created_at: float


@dataclass(frozen=True, slots=True)
class RotationReport:
    """What `rotate_keys` did: rows re-encrypted, and rows skipped because they are unreadable."""

    changed: int
    skipped: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StoreDump:
    """Every stored row as it is (ciphertexts untouched), for copying between databases.

    Logged-out sessions and wrong admin-token attempts are not copied: they last minutes to
    hours, and a copy starts with none (a session logged out just before `migrate --to`
    works again on the target until it expires, unless NBGW_ADMIN_TOKEN changes). Nor are
    the last generations of removed accounts: they matter only to a refresh or import
    running across a remove, and none runs during a copy.
    """

    accounts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    auth_states: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


class Sealer:
    """Seals and opens the encrypted columns (tokens, PKCE verifiers) with `Cipher`.

    Every opened or sealed secret is reported to `on_secret` (the log redactor).
    """

    def __init__(self, cipher: Cipher, on_secret: SecretListener | None = None) -> None:
        self.cipher = cipher
        self._on_secret = on_secret

    def seal(self, secret: Secret, slug: str, field: str) -> bytes:
        if self._on_secret is not None:
            self._on_secret(secret, f"{slug}/{field}")
        try:
            return self.cipher.encrypt(secret.reveal(), slug=slug, field=field)
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no text to store
            raise StoreError(
                f"the {field} of account {slug!r} is not text that can be stored"
            ) from None

    def token_columns(self, slug: str, tokens: TokenSet) -> tuple[bytes, bytes, float, str, str]:
        """A pair's access_token, refresh_token, expires_at, scope and status columns: the
        tokens sealed, and a scope either database stores as it is (no NUL, no lone
        surrogate; StoreError, on both, for one that is not)."""
        access = self.seal(tokens.access_token, slug, "access_token")
        refresh = self.seal(tokens.refresh_token, slug, "refresh_token")
        scope = tokens.scope
        if "\x00" in scope or (not scope.isascii() and _unencodable(scope)):
            raise StoreError(f"the scope of account {slug!r} is not text that can be stored")
        return access, refresh, tokens.expires_at, scope, AccountStatus.ACTIVE.value

    def open(self, blob: Any, slug: str, field: str) -> Secret | None:
        if blob is None:
            return None
        if isinstance(blob, memoryview):
            blob = bytes(blob)
        if not isinstance(blob, bytes):
            raise CorruptRecordError(f"{field} of account {slug!r} is not a ciphertext")
        secret = self.cipher.decrypt(blob, slug=slug, field=field)
        if self._on_secret is not None:
            self._on_secret(secret, f"{slug}/{field}")
        return secret

    def account(self, row: Row) -> Account:
        """The account with its tokens decrypted (DecryptError/CorruptRecordError on a bad row)."""
        try:
            info = info_from_row(row)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CorruptRecordError(
                f"the stored account {_slug_of(row)!r} cannot be read: {exc}"
            ) from None
        fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(AccountInfo)}
        return Account(
            **fields,
            access_token=self.open(row["access_token"], info.slug, "access_token"),
            refresh_token=self.open(row["refresh_token"], info.slug, "refresh_token"),
        )

    def resealed(self, row: Row) -> dict[str, bytes]:
        """The token columns of an account row to store again under the first key.

        Every column is opened, whichever key sealed it, so a damaged one raises
        (DecryptError/CorruptRecordError) rather than passing unseen because it needs no
        re-encryption; only those sealed by another key are sealed again.
        """
        slug = row["slug"]
        updates: dict[str, bytes] = {}
        for name in ("access_token", "refresh_token"):
            secret = self.open(row[name], slug, name)
            if secret is not None and self.cipher.needs_rotation(bytes(row[name])):
                updates[name] = self.seal(secret, slug, name)
        return updates

    def check_row(self, row: Row) -> None:
        """Raise unless every encrypted column of an account row opens."""
        self.account(row)

    def unreadable(self, rows: Iterable[Row]) -> dict[str, str]:
        """{slug: problem} for each account row that does not parse or decrypt."""
        problems: dict[str, str] = {}
        for row in rows:
            try:
                self.check_row(row)
            except ROW_ERRORS as exc:
                problems[_slug_of(row)] = str(exc) or type(exc).__name__
        return problems

    def unknown_key_ids(self, blobs: Sequence[Any]) -> list[str]:
        """Key ids of well-formed ciphertexts that no configured key matches."""
        known = set(self.cipher.key_ids)
        found: set[str] = set()
        for blob in blobs:
            if isinstance(blob, memoryview):
                blob = bytes(blob)
            if isinstance(blob, bytes) and len(blob) >= 33 and blob[:1] == b"\x01":
                found.add(blob[1:5].hex())
        return sorted(found - known)


class AccountLock(Protocol):
    """One account under the cross-process refresh coordination (see the module docstring)."""

    slug: str
    # When a holder that died left a "refresh in flight" marker behind: its start time.
    interrupted_at: float | None
    # When the last token call, by any process, got no usable answer and the refresh token
    # sent then is still the stored one (`record_failure(..., unanswered=True)`): when
    # that call was sent.
    unanswered_at: float | None

    async def read(self) -> Account: ...
    async def begin_refresh(self) -> None: ...
    async def save_tokens(self, tokens: TokenSet) -> Account: ...
    async def save_refresh_token(self, refresh_token: Secret, message: str) -> Account: ...
    async def record_failure(self, message: str, *, unanswered: bool = False) -> None: ...
    async def mark_needs_reauth(self, message: str) -> None: ...
    def keep(self) -> None:
        """Leave the "refresh in flight" marker (and, on SQLite, the lease) in the row on
        exit: this process holds a pair NationBuilder issued that could not be stored, so
        the refresh token stored is spent. Every other process waits while this one runs
        (a holder of this host that still runs, its marker set, is waited for; one
        elsewhere until the deadline); this process's next lock on the account keeps the
        marker until its result is stored."""
        ...


# How often `unsure_hint` moves: the pace of reloads while a backend cannot tell changes.
UNSURE_HINT_INTERVAL = 0.2


def unsure_hint(clock: Clock) -> int:
    """The `change_hint` of a backend that cannot tell whether anything changed: a value no
    real hint takes (negative) that moves every UNSURE_HINT_INTERVAL seconds."""
    return -1 - int(clock.monotonic() / UNSURE_HINT_INTERVAL)


class TokenStore(Protocol):
    """What the token manager, the account service and the CLI need from storage.

    An async context manager: `async with store:` opens (migrating, checking the key) and
    closes it.
    """

    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @property
    def description(self) -> str:
        """Where the data lives, for messages (a path, or a URL without its password)."""
        ...

    # Opened with migrate=False: the older schema version found (left as it is; 0 for an
    # empty database, where nothing is created), else None.
    pending_version: int | None
    # Seconds a refresh lease lasts, and a kept marker from its holder's last lock on the
    # account (`lease_seconds`): a holder elsewhere is waited for this long, then replaced.
    lease: float

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def get_account(self, slug: str) -> Account | None: ...
    async def list_accounts(self) -> list[AccountInfo]: ...
    async def change_counter(self) -> int: ...
    def change_hint(self) -> int:
        """A number that moves whenever another connection may have committed, cheap
        enough to read on every request: it never waits (no lock, no network round trip).
        Where the backend cannot tell right now, `unsure_hint` (it moves every
        UNSURE_HINT_INTERVAL s, so whoever follows it reloads at that pace)."""
        ...

    def refresh_lock(self, slug: str) -> AbstractAsyncContextManager[AccountLock]: ...
    async def save_tokens(self, slug: str, tokens: TokenSet, kind: EventKind) -> Account: ...
    async def import_refresh_token(
        self, slug: str, refresh_token: Secret, *, replaces: int | None = None
    ) -> int: ...
    async def remove_account(self, slug: str, *, generation: int | None = None) -> bool: ...
    async def events(self, slug: str | None = None, limit: int = 20) -> list[Event]: ...
    async def create_state(
        self, state: str, slug: str, verifier: Secret, binding: str, ttl: float
    ) -> None: ...
    async def consume_state(self, state: str, binding: str) -> PendingAuthorization: ...
    async def rotate_keys(self) -> RotationReport: ...
    async def unreadable_accounts(self, slug: str | None = None) -> dict[str, str]: ...
    async def verify(self) -> list[str]: ...
    async def ping(self) -> None: ...
    async def check_writable(self) -> None: ...
    async def dump(self) -> StoreDump: ...
    async def load(self, dump: StoreDump) -> None: ...
    # client keys and the audit trail
    async def add_client(self, record: ClientRecord) -> None: ...
    async def list_clients(self) -> list[ClientRecord]: ...
    async def remove_client(self, name: str) -> bool: ...
    async def touch_clients(self, used: Mapping[str, float]) -> None: ...
    async def record_audit(self, entries: Sequence[AuditEntry], keep_after: float) -> None: ...
    async def audit(
        self, *, nation: str | None = None, client: str | None = None, limit: int = 100
    ) -> list[AuditEntry]: ...
    # logged-out admin sessions and wrong admin-token attempts (not part of dump/load)
    async def revoke_session(self, sid: str, expires_at: float, now: float) -> None: ...
    async def session_revoked(self, sid: str, now: float) -> bool: ...
    async def record_login_failure(self, client: str, at: float, keep_after: float) -> None: ...
    async def login_failures(self, client: str, since: float) -> list[float]: ...
    async def forget_login_failure(self, client: str, at: float) -> None: ...
