"""The pre-flight check: everything `serve` needs, verified before it starts.

`nbgateway check` prints this report and `serve` refuses to start on the same problems with
the same messages. It collects every problem instead of stopping at the first: each setting
(through `config.validate_settings`), then the database: for SQLite, its directory exists
and is writable (SQLite creates the -wal and -shm files next to it) and the file is
readable and writable; for both SQLite and PostgreSQL, it opens with the configured keys at
a schema version this nbgateway understands, and every stored row decrypts. NBGW_LISTEN is
tried too: an address this host cannot listen on (not one of its addresses, a port it may
not take) is a problem; one in use right now (a gateway already running there) is a note.

`wait_for_database` is `serve`'s patience at start: while the only problem is a database
that cannot be reached right now (PostgreSQL starting or down, SQLite locked by another
process), it checks again with growing pauses for up to START_WAIT seconds, so a gateway
started next to its database, or during a short outage, does not depend on a restart policy.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nbgateway.clock import Clock, SystemClock
from nbgateway.config import REQUIRED_FOR_SERVE, Settings, validate_settings
from nbgateway.errors import NBGatewayError, StoreUnavailable
from nbgateway.redact import Redactor
from nbgateway.services import store_for
from nbgateway.store import holds_no_database

# How long `serve` waits at start for a database it cannot reach, and the longest pause
# between two tries (the first is 1 s, then each doubles).
START_WAIT = 60.0
START_RETRY_MAX = 5.0
# Seconds the check's SQLite statements wait for another process's lock.
CHECK_BUSY_TIMEOUT = 1.0


@dataclass
class Report:
    """What the check found: problems by kind, and lines saying what is fine."""

    settings: Settings
    config_problems: list[str] = field(default_factory=list)
    database_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The database problem is one that may pass by itself (it cannot be reached right now).
    database_unavailable: bool = False

    @property
    def ok(self) -> bool:
        return not self.config_problems and not self.database_problems

    @property
    def worth_waiting(self) -> bool:
        """The only problem is a database that cannot be reached right now."""
        return not self.config_problems and self.database_unavailable

    def problem_lines(self) -> list[str]:
        """One line per problem, as `check` and `serve` print them."""
        return [f"configuration error: {p}" for p in self.config_problems] + [
            f"problem: {p}" for p in self.database_problems
        ]


def _directory_problems(database: Path) -> list[str]:
    """Why SQLite could not create or use files in the database's directory."""
    directory = database.parent
    if not directory.exists():
        return [f"directory {directory} for NBGW_DATABASE does not exist"]
    if not directory.is_dir():
        return [f"{directory} for NBGW_DATABASE is not a directory"]
    try:
        # Really create a file: permission bits alone do not tell (read-only mounts, root).
        with tempfile.TemporaryFile(dir=directory, prefix=".nbgateway-check-"):
            pass
    except OSError as exc:
        return [
            f"directory {directory} for NBGW_DATABASE is not writable "
            f"({exc.strerror or exc}); SQLite creates {database.name}-wal and "
            f"{database.name}-shm next to the database"
        ]
    return []


def _file_problems(database: Path) -> list[str]:
    if not database.is_file():
        return [f"NBGW_DATABASE {database} exists but is not a regular file"]
    try:
        with database.open("r+b"):
            pass
    except OSError as exc:
        return [f"database {database} cannot be opened for writing ({exc.strerror or exc})"]
    if not os.access(database, os.R_OK | os.W_OK):
        return [f"database {database} is not readable and writable by this user"]
    return []


def _listen_problems(host: str, port: int, notes: list[str]) -> list[str]:
    """Whether `serve` could listen on host:port: bind it for a moment."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.create_server((host, port), family=family[0][0]):
            pass
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            notes.append(
                f"listen: {host}:{port} is in use right now (a gateway already running "
                "there?); serve needs it free"
            )
            return []
        code = exc.errno
        # A name-lookup failure has a negative code of its own; the rest say it plainly.
        reason = os.strerror(code) if code is not None and code > 0 else (exc.strerror or str(exc))
        return [f"NBGW_LISTEN {host}:{port} cannot be listened on: {reason}"]
    return []


async def _store_problems(settings: Settings, redactor: Redactor, report: Report) -> list[str]:
    """Open the store (key ids, schema version), then decrypt every row."""
    try:
        # A short lock wait: a database locked by another process is reported (and, for
        # serve, waited for) in steps of a second, so SIGTERM and the start-up limit act
        # promptly.
        # Looked at, not migrated: after a migration the release that made the database
        # could no longer open it, so a check before an upgrade must leave it as it is.
        async with store_for(
            settings, SystemClock(), redactor, busy_timeout=CHECK_BUSY_TIMEOUT, migrate=False
        ) as store:
            if store.pending_version == 0:
                report.notes.append(
                    f"database: {store.description} is empty; it is set up on first start "
                    "(nothing was created now)"
                )
                return []
            await store.ping()
            # Reading is not enough: a database another process holds locked, a full disk
            # or a read-only server fails every write serve would make.
            await store.check_writable()
            if store.pending_version is not None:
                report.notes.append(
                    f"database: schema version {store.pending_version}, older than this "
                    "release's; `serve` migrates it when it starts (nothing was changed "
                    "now; the previous release cannot open it afterwards, so back it up "
                    "first); its rows are checked once migrated"
                )
                return []
            problems = await store.verify()
            infos = await store.list_accounts()
    except NBGatewayError as exc:
        report.database_unavailable = isinstance(exc, StoreUnavailable)
        return [redactor.scrub(str(exc))]
    if not problems:
        report.notes.append(f"database: ok ({len(infos)} account(s), every stored token decrypts)")
    return problems


async def run_preflight(
    environ: Mapping[str, str],
    config_file: Path | None,
    redactor: Redactor,
    *,
    required: Collection[str] = REQUIRED_FOR_SERVE,
    listen: bool = True,
) -> Report:
    """Check the settings and the database; return every problem found. `listen`: also
    whether the listen address can be bound (not for a worker, handed its socket)."""
    validation = validate_settings(environ, config_file, required=required)
    settings = validation.settings
    for secret in settings.secrets():
        redactor.add(secret)
    report = Report(settings, config_problems=list(validation.problems))
    if listen and "NBGW_LISTEN" not in validation.refused:
        report.config_problems.extend(_listen_problems(settings.host, settings.port, report.notes))
    if not report.config_problems:
        report.notes.append("configuration: ok")
        # What the NationBuilder app must have registered, character for character.
        report.notes.append(f"callback: {settings.redirect_uri} (the app's redirect URI)")
    if "NBGW_DATABASE" in validation.refused:
        return report
    database = settings.database
    if not isinstance(database, Path):  # a postgresql:// URL: the server is the check
        if "NBGW_ENCRYPTION_KEY" not in validation.refused:
            report.database_problems.extend(await _store_problems(settings, redactor, report))
        return report
    if database.is_symlink():  # the file, or the file to be made, is the link's target
        try:
            database = database.resolve()
        except (RuntimeError, OSError):  # a loop of links
            report.database_problems.append(
                f"database {database} is a symbolic link that leads back to itself"
            )
            return report
    report.database_problems.extend(_directory_problems(database))
    if not database.exists():
        if not report.database_problems:
            report.notes.append(
                f"database: {database} does not exist yet; it is created on first start"
            )
        return report
    report.database_problems.extend(_file_problems(database))
    if holds_no_database(database):  # an empty file: nothing to open, and check writes nothing
        if not report.database_problems:
            report.notes.append(f"database: {database} is empty; it is set up on first start")
        return report
    if report.database_problems or "NBGW_ENCRYPTION_KEY" in validation.refused:
        return report  # opening needs a usable file and the keys
    report.database_problems.extend(await _store_problems(settings, redactor, report))
    return report


async def wait_for_database(
    report: Report,
    again: Callable[[], Awaitable[Report]],
    say: Callable[[str], None],
    *,
    clock: Clock,
    wait: float = START_WAIT,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Report:
    """While `report` says only that the database cannot be reached right now, `say` so
    (one line per problem) and check again (`again`) after 1, 2, 4, 5, 5 ... s, for up to
    `wait` seconds. Returns the last report: ok, another problem, or the same one when
    time ran out."""
    deadline = clock.monotonic() + wait
    pause = 1.0
    while report.worth_waiting:
        left = deadline - clock.monotonic()
        if left <= 0:
            break
        for line in report.problem_lines():
            say(f"waiting for the database ({left:.0f} s left): {line}")
        await sleep(min(pause, left))
        pause = min(pause * 2, START_RETRY_MAX)
        report = await again()
    return report
