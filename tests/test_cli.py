"""The `nbgateway` command line, called in process: `main(argv, environ)` with captured output.

`main()` runs its own event loop, so these tests are plain functions. Commands that talk to
NationBuilder (`accounts refresh`, `accounts import`) run against the fake started as a
subprocess and seeded through its HTTP control endpoint. One subprocess smoke test per
entry point checks the installed console script and `python -m nbgateway`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN
from procs import (
    FakeNB,
    Processes,
    clean_os_environ,
    corrupt_refresh_token,
    create_database,
    free_port,
    gateway_env,
    open_store,
    raw_query,
    run_command,
    seed_account,
    start_fake,
    wait_until,
)
from store_contract import PostgresBackend, SQLiteBackend

from nbgateway import cli
from nbgateway.cli import main
from nbgateway.clock import FakeClock, SystemClock
from nbgateway.config import REQUIRED_FOR_SERVE, Settings
from nbgateway.crypto import Cipher, generate_key, validate_key
from nbgateway.demo import instructions
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import Account, EventKind
from nbgateway.preflight import START_WAIT, Report, wait_for_database
from nbgateway.redact import Secret
from nbgateway.store import SQLiteStore

CONSOLE_SCRIPT = Path(sys.executable).parent / "nbgateway"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures process-wide logging; put it back so later tests see the default."""
    loggers = [logging.getLogger(name) for name in ("nbgateway", "aiohttp")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    access = logging.getLogger("aiohttp.access")
    access_disabled = access.disabled
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    access.disabled = access_disabled


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A complete environment: temporary database, fresh key, the fake's client credentials."""
    return gateway_env(tmp_path / "gateway.db", "cli-admin-token-0123456789")


@pytest.fixture
def stored_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with its database created, empty (as a first `serve` leaves it)."""
    asyncio.run(create_database(env))
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Result:
    code = main(argv, environ)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def seed(environ: dict[str, str], slug: str, access: str, refresh: str) -> None:
    """Store a token pair for `slug` in the environment's database (as a connect would)."""
    issued = {
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": 86400,
        "scope": "default",
    }
    asyncio.run(seed_account(environ, slug, issued))


def read_account(environ: dict[str, str], slug: str, key: str | None = None) -> Account | None:
    async def go() -> Account | None:
        async with open_store(environ, key) as store:
            return await store.get_account(slug)

    return asyncio.run(go())


def event_kinds(environ: dict[str, str], slug: str) -> list[EventKind]:
    async def go() -> list[EventKind]:
        async with open_store(environ) as store:
            return [e.kind for e in await store.events(slug)]

    return asyncio.run(go())


def db_snapshot(environ: dict[str, str]) -> dict[str, bytes]:
    """The bytes of every file of the database (main file, WAL, shared memory)."""
    path = Path(environ["NBGW_DATABASE"])
    return {p.name: p.read_bytes() for p in sorted(path.parent.glob(path.name + "*"))}


def problem_lines(result: Result) -> list[str]:
    """The problem lines a check or refused serve printed (without the closing count)."""
    return [
        line
        for line in result.err.splitlines()
        if line.startswith(("configuration error: ", "problem: "))
    ]


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that exists but where no file can be created, even by root."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        yield locked
        locked.chmod(0o700)
        return
    # Root ignores permission bits; sysfs is read-only for everyone.
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no unwritable directory available to root here")


def stored_row(database: str, slug: str) -> tuple[Any, ...]:
    """The account's row in a SQLite database, byte for byte."""
    [row] = raw_query(database, "SELECT * FROM accounts WHERE slug = ?", (slug,))
    return tuple(row)


# ---------------------------------------------------------------------- help and keygen

# (argv, a phrase saying what the command is for)
HELP_CASES = [
    ([], "token gateway for the NationBuilder API"),
    (["serve"], "Run the gateway"),
    (["demo"], "fake NationBuilder"),
    (["keygen"], "NBGW_ENCRYPTION_KEY"),
    (["check"], "Validate settings, the encryption key and the database as serve needs"),
    (["accounts"], "the nations whose tokens the gateway holds"),
    (["accounts", "list"], "access-token expiry"),
    (["accounts", "refresh"], "refresh the account's access token now"),
    (["accounts", "remove"], "delete the account's tokens"),
    (["accounts", "import"], "legacy"),
    (["rotate-key"], "Re-encrypt every stored token"),
]


@pytest.mark.parametrize(
    ("argv", "purpose"),
    HELP_CASES,
    ids=lambda v: (" ".join(v) or "nbgateway") if isinstance(v, list) else "help",
)
def test_help_exits_zero_and_states_the_purpose(
    argv: list[str], purpose: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command's --help exits 0 and says what the command does."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"], {})
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert purpose in out


def test_top_level_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    """`nbgateway --help` documents the environment variables."""
    with pytest.raises(SystemExit):
        main(["--help"], {})
    out = capsys.readouterr().out
    for name in ("NBGW_ENCRYPTION_KEY", "NBGW_DATABASE", "NBGW_CLIENT_SECRET", "NBGW_LISTEN"):
        assert name in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command exits 2 with argparse's usage message."""
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"], {})
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--limit", "0"],
        ["audit", "--limit", "-3"],
        ["audit", "--limit", "many"],
        ["audit", "--limit", "100001"],
        ["audit", "--limit", "99999999999999999999"],  # once an OverflowError in SQLite
        ["demo", "--port", "-1"],
        ["demo", "--port", "99999"],  # once an OverflowError from bind()
        ["demo", "--port", "http"],
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`audit --limit` (1 to 100,000) and `demo --port` (0 to 65535): anything else exits 2
    naming the argument, before anything is opened."""
    with pytest.raises(SystemExit) as exc:
        main(argv, {})
    assert exc.value.code == 2
    assert f"argument {argv[1]}" in capsys.readouterr().err


def test_keygen_prints_a_fresh_valid_key(capsys: pytest.CaptureFixture[str]) -> None:
    """keygen prints one valid key per call, different every time, and needs no settings."""
    first = run(["keygen"], {}, capsys)
    second = run(["keygen"], {}, capsys)
    assert first.code == second.code == 0
    assert validate_key(Secret(first.out.strip()))
    assert validate_key(Secret(second.out.strip()))
    assert first.out != second.out
    assert first.out.count("\n") == 1


# ---------------------------------------------------------------------- check


class TestCheck:
    def test_a_sound_setup_names_the_callback_to_register(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check passes and prints the redirect URI NationBuilder's app must have, from
        NBGW_PUBLIC_URL (a mismatch is only ever seen on NationBuilder's own page)."""
        seed(env, "acme", "nbfake-at-callback-1", "nbfake-rt-callback-1")
        env["NBGW_PUBLIC_URL"] = "https://ops.example.org/nbgw"
        result = run(["check"], env, capsys)
        assert result.code == 0, result.err
        assert "configuration: ok" in result.out
        assert (
            "callback: https://ops.example.org/nbgw/connect/callback (the app's redirect URI)"
            in result.out
        )

    @pytest.mark.parametrize("settings", ["complete", "client-id-missing"])
    def test_check_on_an_empty_database_creates_nothing(
        self,
        any_database: Path | str,
        capsys: pytest.CaptureFixture[str],
        settings: str,
    ) -> None:
        """check before the first serve, on either backend, with the settings sound or not
        (exit 2): the database is left as it was (no table, no SQLite file), and a sound
        set-up is told it is set up on first start; serve then sets it up."""
        env = gateway_env(any_database, "cli-admin-token-0123456789")
        if settings == "client-id-missing":
            del env["NBGW_CLIENT_ID"]
        backend = (
            SQLiteBackend(FakeClock(), any_database)
            if isinstance(any_database, Path)
            else PostgresBackend(FakeClock(), None, any_database)  # type: ignore[arg-type]
        )
        result = run(["check"], env, capsys)
        assert asyncio.run(backend.table_names()) == []
        if isinstance(any_database, Path):
            assert not any_database.exists()
        if settings == "complete":
            assert result.code == 0, result.err
            assert "on first start" in result.out  # "does not exist yet" / "is empty"
        else:
            assert result.code == 2
            assert "NBGW_CLIENT_ID" in result.err
        asyncio.run(create_database(env))
        assert "accounts" in asyncio.run(backend.table_names())

    def test_a_database_of_the_previous_release_is_not_migrated_by_check(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check before an upgrade leaves the database as it is: after a migration the
        previous release could no longer open it. It says serve will migrate it."""
        from nbgateway.store import sqlite as sqlite_backend

        path = Path(env["NBGW_DATABASE"])
        previous = sqlite_backend.MIGRATIONS[:-1]
        with sqlite3.connect(path) as conn:
            for migration in previous:
                conn.executescript(migration)
            conn.execute(f"PRAGMA user_version = {len(previous)}")
        result = run(["check"], env, capsys)
        assert result.code == 0, result.err
        assert f"schema version {len(previous)}, older than this release's" in result.out
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(previous)
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"

    def test_missing_key_is_a_configuration_error(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without NBGW_ENCRYPTION_KEY check exits 2 and names the variable."""
        del env["NBGW_ENCRYPTION_KEY"]
        result = run(["check"], env, capsys)
        assert result.code == 2
        assert "NBGW_ENCRYPTION_KEY" in result.err

    def test_malformed_key_is_a_configuration_error(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A key that is not 32 url-safe base64 bytes exits 2 and names the variable."""
        env["NBGW_ENCRYPTION_KEY"] = "not-a-key"
        result = run(["check"], env, capsys)
        assert result.code == 2
        assert "NBGW_ENCRYPTION_KEY" in result.err
        assert "not-a-key" not in result.err

    def test_no_database_yet_is_fine(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Before the first start there is no database; check says so and exits 0."""
        result = run(["check"], env, capsys)
        assert result.code == 0
        assert "does not exist yet" in result.out
        assert not Path(env["NBGW_DATABASE"]).exists()

    def test_a_link_to_a_database_still_to_be_made(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """NBGW_DATABASE a symbolic link whose target does not exist yet: check judges the
        target's directory (missing: a problem, as serve would fail), and the first open
        creates the target readable by its owner only."""
        link = Path(env["NBGW_DATABASE"])
        target = tmp_path / "missing-dir" / "gateway.db"
        link.symlink_to(target)
        result = run(["check"], env, capsys)
        assert result.code == 1, result.out
        assert "missing-dir" in result.err
        target.parent.mkdir()
        result = run(["check"], env, capsys)
        assert result.code == 0, result.err

        async def first_open() -> None:  # as serve's first start does
            cipher = Cipher([Secret(env["NBGW_ENCRYPTION_KEY"])])
            async with SQLiteStore(link, cipher, FakeClock()):
                pass

        asyncio.run(first_open())
        assert stat.S_IMODE(target.stat().st_mode) == 0o600

    def test_a_loop_of_links_is_a_problem_not_a_traceback(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        link = Path(env["NBGW_DATABASE"])
        other = tmp_path / "other.db"
        link.symlink_to(other)
        other.symlink_to(link)
        result = run(["check"], env, capsys)
        assert result.code == 1
        assert "leads back to itself" in result.err
        assert "Traceback" not in result.err

    def test_healthy_database(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With the right key and intact rows check exits 0 and counts the accounts."""
        seed(env, "acme", "nbfake-at-check-1", "nbfake-rt-check-1")
        result = run(["check"], env, capsys)
        assert result.code == 0, result.err
        assert "database: ok (1 account(s)" in result.out

    def test_corrupt_row_names_the_account(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A row that fails authentication makes check exit 1, naming that account only."""
        seed(env, "acme", "nbfake-at-check-2", "nbfake-rt-check-2")
        seed(env, "beta", "nbfake-at-check-3", "nbfake-rt-check-3")
        corrupt_refresh_token(env["NBGW_DATABASE"], "acme")
        result = run(["check"], env, capsys)
        assert result.code == 1
        assert "'acme'" in result.err
        assert "'beta'" not in result.err
        assert "nbfake-" not in result.err + result.out

    def test_wrong_key_is_refused_and_changes_nothing(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Another key exits 1 naming the key ids, and the database bytes stay the same."""
        seed(env, "acme", "nbfake-at-check-4", "nbfake-rt-check-4")
        before = db_snapshot(env)
        stored_id = Cipher([Secret(env["NBGW_ENCRYPTION_KEY"])]).primary_key_id
        env["NBGW_ENCRYPTION_KEY"] = generate_key()

        result = run(["check"], env, capsys)
        assert result.code == 1
        assert "key id" in result.err
        assert stored_id in result.err
        assert "NBGW_ENCRYPTION_KEY" in result.err
        assert db_snapshot(env) == before

    def test_only_the_key_is_not_enough(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With only NBGW_ENCRYPTION_KEY, check names every other setting serve requires."""
        only_key = {k: env[k] for k in ("NBGW_ENCRYPTION_KEY", "NBGW_DATABASE")}
        result = run(["check"], only_key, capsys)
        assert result.code == 2
        assert "configuration: ok" not in result.out
        for name in REQUIRED_FOR_SERVE - {"NBGW_ENCRYPTION_KEY"}:
            assert f"configuration error: {name} is required" in result.err

    @pytest.mark.parametrize("name", sorted(REQUIRED_FOR_SERVE))
    def test_each_missing_required_setting(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str], name: str
    ) -> None:
        """Each setting serve requires, missing, gives one line naming it and exit 2."""
        del env[name]
        result = run(["check"], env, capsys)
        assert result.code == 2
        problems = problem_lines(result)
        assert len(problems) == 1
        assert problems[0].startswith(f"configuration error: {name} is required: expected ")

    def test_every_problem_is_reported_in_one_run(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Five wrong settings and a typo'd variable give six lines in one run, then a count."""
        env.update(
            {
                "NBGW_LISTEN": "http://0.0.0.0:8080",
                "NBGW_PUBLIC_URL": "gateway.example.org",
                "NBGW_REFRESH_MARGIN": "90000",
                "NBGW_UPSTREAM_TIMEOUT": "0",
                "NBGW_LOG_LEVEL": "LOUD",
                "NBGW_ALOWED_CLIENTS": "10.0.0.0/8",
            }
        )
        del env["NBGW_CLIENT_ID"]
        result = run(["check"], env, capsys)
        assert result.code == 2
        named = [line.split(" ")[2] for line in problem_lines(result)]
        assert named == [
            "NBGW_ALOWED_CLIENTS",
            "NBGW_LISTEN",
            "NBGW_PUBLIC_URL",
            "NBGW_CLIENT_ID",
            "NBGW_REFRESH_MARGIN",
            "NBGW_UPSTREAM_TIMEOUT",
            "NBGW_LOG_LEVEL",
        ]
        assert "did you mean NBGW_ALLOWED_CLIENTS?" in result.err
        assert result.err.splitlines()[-1].startswith("7 problem(s) found")

    def test_an_address_this_host_cannot_listen_on(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """NBGW_LISTEN on an address that is not this host's (192.0.2.1, kept for
        documentation) passes the syntax check but is found by trying it: exit 2."""
        env["NBGW_LISTEN"] = "192.0.2.1:18722"
        result = run(["check"], env, capsys)
        assert result.code == 2
        assert problem_lines(result) == [
            "configuration error: NBGW_LISTEN 192.0.2.1:18722 cannot be listened on: "
            "Cannot assign requested address"
        ]

    def test_an_address_in_use_is_a_note(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A port in use right now (a gateway already running there) does not fail check,
        which operators run next to the live service; it is said."""
        with socket.create_server(("127.0.0.1", 0)) as busy:
            port = busy.getsockname()[1]
            env["NBGW_LISTEN"] = f"127.0.0.1:{port}"
            result = run(["check"], env, capsys)
        assert result.code == 0, result.err
        assert f"listen: 127.0.0.1:{port} is in use right now" in result.out + result.err

    def test_typo_in_the_config_file(
        self, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A misspelt TOML key is named with the closest setting, and check exits 2."""
        toml = tmp_path / "gateway.toml"
        toml.write_text("refresh_margn = 60\n", encoding="utf-8")
        result = run(["check", "--config", str(toml)], env, capsys)
        assert result.code == 2
        assert problem_lines(result) == [
            f"configuration error: config file {toml}: unknown setting 'refresh_margn' "
            "(did you mean refresh_margin?)"
        ]

    def test_missing_directory(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A database directory that does not exist is a database problem: exit 1."""
        missing = Path(env["NBGW_DATABASE"]).parent / "absent"
        env["NBGW_DATABASE"] = str(missing / "gateway.db")
        result = run(["check"], env, capsys)
        assert result.code == 1
        assert problem_lines(result) == [
            f"problem: directory {missing} for NBGW_DATABASE does not exist"
        ]

    def test_unwritable_directory(
        self, env: dict[str, str], unwritable_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A directory that exists but cannot take new files is reported: SQLite needs it."""
        env["NBGW_DATABASE"] = str(unwritable_dir / "gateway.db")
        result = run(["check"], env, capsys)
        assert result.code == 1
        [line] = problem_lines(result)
        assert line.startswith(f"problem: directory {unwritable_dir} for NBGW_DATABASE is not ")
        assert "gateway.db-wal" in line

    def test_configuration_and_database_problems_together(
        self, env: dict[str, str], unwritable_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A missing setting and an unwritable directory are both reported; exit 2."""
        env["NBGW_DATABASE"] = str(unwritable_dir / "gateway.db")
        del env["NBGW_ADMIN_TOKEN"]
        result = run(["check"], env, capsys)
        assert result.code == 2
        lines = problem_lines(result)
        assert len(lines) == 2
        assert lines[0].startswith("configuration error: NBGW_ADMIN_TOKEN is required")
        assert lines[1].startswith(f"problem: directory {unwritable_dir}")

    def test_serve_refuses_with_the_same_messages(
        self, env: dict[str, str], unwritable_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """serve prints exactly check's problem lines, does not start, and exits the same."""
        env["NBGW_DATABASE"] = str(unwritable_dir / "gateway.db")
        env["NBGW_LISTEN"] = "http://0.0.0.0:8080"
        env["NBGW_LOG_LEVL"] = "DEBUG"
        checked = run(["check"], env, capsys)
        served = run(["serve"], env, capsys)
        assert served.code == checked.code == 2
        assert problem_lines(served) == problem_lines(checked)
        assert len(problem_lines(served)) == 3
        assert "not starting" in served.err.splitlines()[-1]

    def test_serve_refuses_a_database_with_a_corrupt_row(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A row that does not decrypt stops serve with check's message for that account."""
        seed(env, "acme", "nbfake-at-check-5", "nbfake-rt-check-5")
        corrupt_refresh_token(env["NBGW_DATABASE"], "acme")
        served = run(["serve"], env, capsys)
        assert served.code == 1
        assert problem_lines(served) == problem_lines(run(["check"], env, capsys))
        assert "'acme'" in problem_lines(served)[0]

    def test_a_database_another_process_holds_for_writing_is_a_problem(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """In WAL mode reads go on while another process holds the write lock (a sqlite3
        shell in BEGIN EXCLUSIVE, a long rotate-key), but every write serve would make
        waits and fails: check reports the lock, and is ok again once it is released."""
        seed(env, "acme", "nbfake-at-locked-1", "nbfake-rt-locked-1")
        holder = sqlite3.connect(env["NBGW_DATABASE"], isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked = run(["check"], env, capsys)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert locked.code == 1
        assert "cannot be written: database is locked" in locked.err
        assert run(["check"], env, capsys).code == 0

    def test_a_client_row_restricted_to_no_nation_slug_is_named(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A hand-edited `nations` column that holds no nation slug is a damaged row:
        check names it, and the key is left out (refused) rather than shown as valid."""
        assert run(["clients", "add", "tool1", "--nation", "acme"], env, capsys).code == 0
        assert run(["clients", "add", "tool2"], env, capsys).code == 0
        with sqlite3.connect(env["NBGW_DATABASE"]) as conn:
            conn.execute("UPDATE clients SET nations = 'NOT A SLUG!!' WHERE name = 'tool1'")
        checked = run(["check"], env, capsys)
        assert checked.code == 1
        assert "client key 'tool1': nations holds 'NOT A SLUG!!', no nation slug" in checked.err
        listed = run(["clients", "list", "--json"], env, capsys)
        assert [row["name"] for row in json.loads(listed.out)] == ["tool2"]

    def test_a_damaged_database_file_is_refused_at_once_and_left_as_it_is(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file whose first pages are sound but whose tables are damaged is named as
        damaged (restore a backup): check says so, serve refuses without waiting a minute
        for it to come back, and neither writes to the file."""
        for n in range(60):
            seed(env, f"nation-{n}", f"nbfake-at-damaged-{n:03d}", f"nbfake-rt-damaged-{n:03d}")
        database = Path(env["NBGW_DATABASE"])
        with sqlite3.connect(database) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = 4096
        assert database.stat().st_size >= 6 * page
        with database.open("r+b") as f:
            f.seek(2 * page)
            f.write(bytes(range(256)) * (3 * page // 256))  # pages 3-5: garbage
        before = database.read_bytes()
        checked = run(["check"], env, capsys)
        assert checked.code == 1
        assert "is damaged" in checked.err and "restore it from a backup" in checked.err
        served = run(["serve"], env, capsys)
        assert served.code == 1
        assert "waiting for the database" not in served.err  # refused, not waited out
        assert problem_lines(served) == problem_lines(checked)
        assert database.read_bytes() == before

    @pytest.mark.parametrize("table", ["events", "audit", "clients"])
    def test_a_damaged_table_is_named_by_every_command_that_reads_it(
        self, table: str, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The accounts are sound but one other table's pages are garbage: `check` and
        `migrate` (which read every table) name the file as damaged with the store's
        message, exit 1 without a traceback, and leave it as it was."""
        seed(env, "acme", "nbfake-at-tabledamage-1", "nbfake-rt-tabledamage-1")
        database = Path(env["NBGW_DATABASE"])
        with sqlite3.connect(database) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            roots = dict(conn.execute("SELECT name, rootpage FROM sqlite_master"))
        page = 4096
        with database.open("r+b") as f:
            f.seek((roots[table] - 1) * page)
            f.write(b"\xff" * page)
        before = database.read_bytes()
        for argv in (["check"], ["migrate", "--to", str(database.parent / "copy.db")]):
            result = run(argv, env, capsys)
            assert result.code == 1, argv
            assert "is damaged" in result.err and "restore it from a backup" in result.err
            assert "Traceback" not in result.err
        assert database.read_bytes() == before


# ---------------------------------------------------------------------- accounts (offline)


class TestStartWait:
    """`serve`'s patience at start (preflight.wait_for_database), on a test clock."""

    @staticmethod
    def report(*, unavailable: bool, config: bool = False) -> Report:
        settings = Settings(encryption_keys=(Secret(generate_key()),))
        return Report(
            settings,
            config_problems=["NBGW_ADMIN_TOKEN is required"] if config else [],
            database_problems=["database postgresql://db/nbgw cannot be opened: refused"],
            database_unavailable=unavailable,
        )

    async def wait(self, first: Report, answers: list[Report]) -> tuple[Report, list[float]]:
        clock = FakeClock()
        pauses: list[float] = []
        said: list[str] = []

        async def sleep(seconds: float) -> None:
            pauses.append(seconds)
            clock.advance(seconds)

        async def again() -> Report:
            return answers.pop(0) if answers else first

        last = await wait_for_database(first, again, said.append, clock=clock, sleep=sleep)
        assert len(said) == len(pauses)  # one line per try, naming the problem
        assert all(line.startswith("waiting for the database (") for line in said)
        assert all("cannot be opened: refused" in line for line in said)
        return last, pauses

    async def test_a_database_that_comes_back_is_taken_at_the_next_try(self) -> None:
        down = self.report(unavailable=True)
        up = Report(down.settings)
        last, pauses = await self.wait(down, [down, up])
        assert last.ok
        assert pauses == [1.0, 2.0]

    async def test_it_gives_up_after_a_minute_with_growing_pauses(self) -> None:
        down = self.report(unavailable=True)
        last, pauses = await self.wait(down, [])
        assert not last.ok
        assert pauses[:5] == [1.0, 2.0, 4.0, 5.0, 5.0]
        assert sum(pauses) == pytest.approx(START_WAIT)

    async def test_problems_that_do_not_pass_by_themselves_are_not_waited_for(self) -> None:
        for first in (self.report(unavailable=False), self.report(unavailable=True, config=True)):
            last, pauses = await self.wait(first, [])
            assert last is first
            assert pauses == []


class TestMissingDatabase:
    """A command that reads or changes what is stored refuses a SQLite file that does not
    exist, rather than creating an empty one there and answering "no accounts"."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["accounts", "list"],
            ["accounts", "list", "--json"],
            ["accounts", "refresh", "acme"],
            ["accounts", "remove", "acme"],
            ["clients", "list"],
            ["clients", "remove", "tool"],
            ["audit"],
            ["rotate-key"],
            ["migrate", "--to", "elsewhere.db"],
        ],
        ids=" ".join,
    )
    def test_refused_and_nothing_created(
        self,
        argv: list[str],
        env: dict[str, str],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Exit 1, the absolute path named (a relative NBGW_DATABASE is resolved against
        the directory the command ran in), and no file left behind."""
        monkeypatch.chdir(tmp_path)
        env["NBGW_DATABASE"] = "nbgateway.db"
        result = run(argv, env, capsys)
        assert result.code == 1, result.err
        assert f"no database at {tmp_path / 'nbgateway.db'} (NBGW_DATABASE)" in result.err
        assert "does not create one" in result.err
        assert result.out == ""
        assert sorted(p.name for p in tmp_path.iterdir()) == []

    def test_commands_that_store_something_create_it(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`clients add` (like `accounts import` and `serve`) may start a new database:
        the key it prints is there for the gateway to find."""
        added = run(["clients", "add", "tool"], env, capsys)
        assert added.code == 0, added.err
        assert Path(env["NBGW_DATABASE"]).exists()
        listed = run(["clients", "list", "--json"], env, capsys)
        assert [row["name"] for row in json.loads(listed.out)] == ["tool"]

    @pytest.mark.parametrize("name", ["anonymous", "Anonymous", "ANONYMOUS"])
    def test_no_spelling_of_anonymous_is_a_client_name(
        self, name: str, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`anonymous` stands for requests without a key in the audit trail and metrics; a
        key called `Anonymous` would be told apart from them by case only."""
        added = run(["clients", "add", name], env, capsys)
        assert added.code == 2
        assert "not 'anonymous' in any case" in added.err

    def test_clients_list_json_always_gives_nations_as_a_list(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`nations` is a list for every key, empty for one that may use every nation (it
        was the string "all" then, which broke `jq '.[].nations[]'`); the table says all."""
        assert run(["clients", "add", "any"], env, capsys).code == 0
        assert run(["clients", "add", "one", "--nation", "acme"], env, capsys).code == 0
        listed = json.loads(run(["clients", "list", "--json"], env, capsys).out)
        assert {row["name"]: row["nations"] for row in listed} == {"any": [], "one": ["acme"]}
        table = run(["clients", "list"], env, capsys).out.splitlines()
        assert table[1].split()[:2] == ["any", "all"]
        assert table[2].split()[:2] == ["one", "acme"]

    @pytest.mark.parametrize(
        ("argv", "complaint"),
        [
            (["clients", "add", "bad name!"], "invalid: a client name is"),
            (["accounts", "import", "acme"], "no token on stdin"),
        ],
        ids=["bad-name", "no-token"],
    )
    def test_a_refused_store_command_creates_nothing(
        self,
        argv: list[str],
        complaint: str,
        env: dict[str, str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A command that may create the database checks its input first: refused, it
        leaves no empty database that later commands would take for the real one."""
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        result = run(argv, env, capsys)
        assert result.code == 2, result.err
        assert complaint in result.err
        assert not Path(env["NBGW_DATABASE"]).exists()

    @pytest.mark.parametrize("command", ["keygen", "demo"])
    def test_commands_that_read_no_settings_take_no_config_file(
        self, command: str, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """keygen and demo read no settings: `--config FILE` after them is a usage error,
        not a file silently ignored."""
        with pytest.raises(SystemExit) as exited:
            main([command, "--config", "/nonexistent.toml"], env)
        assert exited.value.code == 2
        assert "unrecognized arguments: --config" in capsys.readouterr().err

    @pytest.mark.parametrize(
        "stdin",
        [
            None,
            io.TextIOWrapper(io.BytesIO(b"\xff\xfe-not-utf8\n"), encoding="utf-8"),
            io.StringIO("nbfake-\udcff-surrogate\n"),
            io.StringIO("two words\n"),
        ],
        ids=["closed", "undecodable", "surrogate", "spaces"],
    )
    def test_import_refuses_a_stdin_that_holds_no_token(
        self,
        stdin: io.TextIOBase | None,
        env: dict[str, str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """stdin closed (`<&-`), not UTF-8, or a line that is no token: usage error 2 with
        a message, no traceback, and no database created."""
        monkeypatch.setattr(sys, "stdin", stdin)
        result = run(["accounts", "import", "acme"], env, capsys)
        assert result.code == 2, result.err
        assert "pipe the legacy access token in" in result.err
        assert not Path(env["NBGW_DATABASE"]).exists()

    def test_a_file_where_a_directory_should_be_is_no_database(
        self, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """NBGW_DATABASE under a path whose parent is a file: the plain refusal, no
        traceback (NotADirectoryError is "not there", as for Path.exists())."""
        (tmp_path / "afile").write_text("")
        env["NBGW_DATABASE"] = str(tmp_path / "afile" / "gateway.db")
        listed = run(["accounts", "list"], env, capsys)
        assert listed.code == 1
        assert f"no database at {tmp_path / 'afile' / 'gateway.db'}" in listed.err
        assert "Traceback" not in listed.err

    def test_an_empty_file_is_no_database(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A 0-byte file (`: > file`, a failed copy) is refused like a missing one by the
        commands that only read or change what is stored; check reports it and writes
        nothing into it."""
        database = Path(env["NBGW_DATABASE"])
        database.touch()
        listed = run(["accounts", "list"], env, capsys)
        assert listed.code == 1
        assert f"an empty file at {database} (NBGW_DATABASE)" in listed.err
        checked = run(["check"], env, capsys)
        assert checked.code == 0, checked.err
        assert f"database: {database} is empty; it is set up on first start" in checked.out
        assert database.stat().st_size == 0


class TestAccountsOffline:
    def test_list_empty(
        self, stored_env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With no accounts, list says how to add one and exits 0."""
        result = run(["accounts", "list"], stored_env, capsys)
        assert result.code == 0
        assert "no accounts" in result.out

    def test_list_empty_json(
        self, stored_env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With no accounts, list --json prints an empty JSON list."""
        result = run(["accounts", "list", "--json"], stored_env, capsys)
        assert result.code == 0
        assert json.loads(result.out) == []

    def test_list_table(self, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
        """The table shows each account's slug and status, never a token."""
        seed(env, "acme", "nbfake-at-list-1", "nbfake-rt-list-1")
        seed(env, "beta", "nbfake-at-list-2", "nbfake-rt-list-2")
        result = run(["accounts", "list"], env, capsys)
        assert result.code == 0
        header, *rows = result.out.splitlines()
        assert "SLUG" in header and "STATUS" in header
        assert [r.split()[:2] for r in rows] == [["acme", "active"], ["beta", "active"]]
        assert "nbfake-" not in result.out

    def test_list_json(self, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints parseable JSON with status and expiry and no token material."""
        seed(env, "acme", "nbfake-at-list-3", "nbfake-rt-list-3")
        result = run(["accounts", "list", "--json"], env, capsys)
        assert result.code == 0
        [row] = json.loads(result.out)
        assert row["slug"] == "acme"
        assert row["status"] == "active"
        assert row["access_token_expires_at"]
        assert row["last_error"] is None
        assert "nbfake-" not in result.out

    def test_remove_existing(self, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
        """remove deletes the account and records the removal."""
        seed(env, "acme", "nbfake-at-rm-1", "nbfake-rt-rm-1")
        result = run(["accounts", "remove", "acme"], env, capsys)
        assert result.code == 0
        assert "removed acme" in result.out
        assert read_account(env, "acme") is None
        assert event_kinds(env, "acme")[0] is EventKind.REMOVED

    def test_remove_missing(
        self, stored_env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Removing an account that does not exist exits 1 with a message."""
        result = run(["accounts", "remove", "ghost"], stored_env, capsys)
        assert result.code == 1
        assert "no account named 'ghost'" in result.err

    def test_refresh_missing(
        self, stored_env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Refreshing an account that does not exist exits 1 with a message."""
        result = run(["accounts", "refresh", "ghost"], stored_env, capsys)
        assert result.code == 1
        assert "no account named 'ghost'" in result.err

    def test_refresh_needs_client_credentials(
        self, env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """refresh without NBGW_CLIENT_SECRET is a configuration error naming it."""
        del env["NBGW_CLIENT_SECRET"]
        result = run(["accounts", "refresh", "acme"], env, capsys)
        assert result.code == 2
        assert "NBGW_CLIENT_SECRET" in result.err

    def test_import_without_token_on_stdin(
        self,
        env: dict[str, str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """import with nothing on stdin exits 2 and stores nothing."""
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        result = run(["accounts", "import", "acme"], env, capsys)
        assert result.code == 2
        assert "stdin" in result.err
        assert read_account(env, "acme") is None

    def test_import_invalid_slug(
        self,
        env: dict[str, str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """import refuses a slug that cannot be a nation, without echoing the token."""
        monkeypatch.setattr(sys, "stdin", io.StringIO("legacy-token-value-123456\n"))
        with pytest.raises(SystemExit) as exc:
            main(["accounts", "import", "Not_A_Slug"], env)
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert "slug" in captured.err
        assert "legacy-token-value" not in captured.err + captured.out
        assert read_account(env, "not_a_slug") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["accounts", "refresh", "Not_A_Slug"],
        ["accounts", "remove", "Not_A_Slug"],
        ["audit", "--nation", "Not_A_Slug"],
        ["clients", "add", "tool", "--nation", "Not_A_Slug"],
    ],
)
def test_an_invalid_slug_is_a_usage_error(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A slug that cannot be a nation is bad usage (exit 2, saying what a slug is), not
    "no account named": nothing is looked up or stored."""
    with pytest.raises(SystemExit) as exc:
        main(argv, env)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'Not_A_Slug'" in err and "lowercase letters" in err
    assert "no account named" not in err
    assert not Path(env["NBGW_DATABASE"]).exists()


# ---------------------------------------------------------------------- rotate-key


def test_rotate_key_re_encrypts_with_the_first_key(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """With "new,old", rotate-key re-encrypts every row; afterwards "new" alone opens all."""
    old = env["NBGW_ENCRYPTION_KEY"]
    seed(env, "acme", "nbfake-at-rot-1", "nbfake-rt-rot-1")
    seed(env, "beta", "nbfake-at-rot-2", "nbfake-rt-rot-2")
    new = generate_key()

    env["NBGW_ENCRYPTION_KEY"] = f"{new},{old}"
    result = run(["rotate-key"], env, capsys)
    assert result.code == 0, result.err
    assert "re-encrypted 2 account(s)" in result.out

    env["NBGW_ENCRYPTION_KEY"] = new
    assert run(["check"], env, capsys).code == 0
    account = read_account(env, "acme", key=new)
    assert account is not None
    assert account.access_token == Secret("nbfake-at-rot-1")
    assert account.refresh_token == Secret("nbfake-rt-rot-1")

    env["NBGW_ENCRYPTION_KEY"] = old
    assert run(["check"], env, capsys).code == 1

    env["NBGW_ENCRYPTION_KEY"] = f"{new},{old}"
    again = run(["rotate-key"], env, capsys)
    assert again.code == 0
    assert "re-encrypted 0 account(s)" in again.out


def test_an_interrupted_rotate_key_says_so_and_exits_130(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during rotate-key (here while it waits for another process's lock) is no
    success: exit 130, a message, and every row still under the old key, so that
    `rotate-key && <drop the old key>` stops."""
    old = env["NBGW_ENCRYPTION_KEY"]
    seed(env, "acme", "nbfake-at-int-1", "nbfake-rt-int-1")
    new = generate_key()
    holder = sqlite3.connect(env["NBGW_DATABASE"], isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbgateway", "rotate-key"],
            env={**os.environ, **env, "NBGW_ENCRYPTION_KEY": f"{new},{old}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)  # started, and waiting for the lock
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: rotate-key did not finish" in err
    assert "re-encrypted" not in out
    env["NBGW_ENCRYPTION_KEY"] = old  # the old key alone still opens every row
    assert run(["check"], env, capsys).code == 0


# ---------------------------------------------------------------------- against a fake NB


@pytest.fixture(scope="module")
def fake_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeNB]:
    """One fake NationBuilder subprocess for this module (tests use distinct nations)."""
    processes = Processes(tmp_path_factory.mktemp("fake"))
    try:
        yield start_fake(processes)
    finally:
        processes.stop_all()


def connected(environ: dict[str, str], fake: FakeNB, slug: str) -> dict[str, Any]:
    """Store a fresh pair from the fake for `slug` (as a connect would); return the pair."""
    issued = fake.issue_tokens(slug)
    seed(environ, slug, issued["access_token"], issued["refresh_token"])
    return issued


@pytest.fixture
def fake_env(env: dict[str, str], fake_process: FakeNB) -> dict[str, str]:
    return {**env, "NBGW_NATION_URL": f"{fake_process.url}/{{slug}}"}


@pytest.mark.slow
class TestAccountsAgainstFake:
    def test_refresh_rotates_the_stored_pair(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """refresh exchanges the refresh token once and stores the new pair."""
        issued = connected(fake_env, fake_process, "cli-refresh")

        result = run(["accounts", "refresh", "cli-refresh"], fake_env, capsys)
        assert result.code == 0, result.err
        assert "refreshed cli-refresh" in result.out
        assert "nbfake-" not in result.out + result.err

        account = read_account(fake_env, "cli-refresh")
        assert account is not None
        assert account.generation == 2
        assert account.access_token is not None and account.refresh_token is not None
        assert account.access_token.reveal() != issued["access_token"]
        assert account.refresh_token.reveal() != issued["refresh_token"]
        assert fake_process.grants("cli-refresh") == 1
        assert event_kinds(fake_env, "cli-refresh")[0] is EventKind.REFRESHED

    def test_ctrl_c_during_refresh_keeps_the_rotated_pair(
        self, fake_env: dict[str, str], fake_process: FakeNB
    ) -> None:
        """Ctrl-C while NationBuilder is answering a refresh: the call it may already
        have acted on is finished and its new pair stored (the old refresh token is spent),
        and the command still exits 130 rather than report success."""
        issued = connected(fake_env, fake_process, "cli-interrupt")
        fake_process.control(action="hold_tokens")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nbgateway", "accounts", "refresh", "cli-interrupt"],
                env={**os.environ, **fake_env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 30
            while fake_process.state()["pending_token_requests"] < 1:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the refresh never reached the token endpoint"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)  # the interrupt is handled while the call is still held
        finally:
            fake_process.control(action="release_tokens")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (out, err)
        assert "interrupted: accounts refresh stopped before it reported" in err
        assert "was finished and its answer stored" in err
        assert "nbfake-" not in out + err
        assert fake_process.grants("cli-interrupt") == 1
        account = read_account(fake_env, "cli-interrupt")
        assert account is not None and account.refresh_token is not None
        assert account.refresh_token.reveal() != issued["refresh_token"]
        assert account.generation == 2

    def test_import_exchanges_the_legacy_token(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """import reads the legacy token from stdin and ends with an active, fresh pair."""
        legacy = "legacy-token-cli-import-0123456789"
        fake_process.control(action="add_legacy_token", slug="cli-import", token=legacy)
        monkeypatch.setattr(sys, "stdin", io.StringIO(legacy + "\n"))

        result = run(["accounts", "import", "cli-import"], fake_env, capsys)
        assert result.code == 0, result.err
        assert "imported cli-import" in result.out
        assert legacy not in result.out + result.err

        account = read_account(fake_env, "cli-import")
        assert account is not None
        assert account.status.value == "active"
        assert account.access_token is not None and account.refresh_token is not None
        assert account.access_token.reveal().startswith("nbfake-at-")
        assert account.refresh_token.reveal() != legacy
        assert event_kinds(fake_env, "cli-import") == [EventKind.REFRESHED, EventKind.IMPORTED]

    def test_import_of_a_rejected_token_leaves_nothing_behind(
        self,
        fake_env: dict[str, str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A legacy token NationBuilder refuses (invalid_grant): exit 1, a message saying
        so, no account stored, and no /connect URL but the configured public one."""
        fake_env["NBGW_PUBLIC_URL"] = "https://gw.example.org/nbgw"
        refused = "legacy-token-nobody-issued-0123456789"
        monkeypatch.setattr(sys, "stdin", io.StringIO(refused + "\n"))

        result = run(["accounts", "import", "cli-refused"], fake_env, capsys)
        assert result.code == 1
        assert "NationBuilder refused the legacy token for 'cli-refused'" in result.err
        assert "nothing was stored" in result.err
        assert "account needs re-authorization" not in result.err  # no such account remains
        assert "https://gw.example.org/nbgw/connect" in result.err
        assert "127.0.0.1" not in result.err
        assert refused not in result.out + result.err
        assert read_account(fake_env, "cli-refused") is None
        assert json.loads(run(["accounts", "list", "--json"], fake_env, capsys).out) == []

    def test_import_during_an_outage_keeps_the_token(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A transient token-endpoint failure keeps the imported token for the background
        refresher, says so, and exits 1; the next refresh then completes the import."""
        legacy = "legacy-token-cli-outage-0123456789"
        fake_process.control(action="add_legacy_token", slug="cli-import-later", token=legacy)
        fake_process.control(action="fail_token", kind="server_error")
        monkeypatch.setattr(sys, "stdin", io.StringIO(legacy + "\n"))

        result = run(["accounts", "import", "cli-import-later"], fake_env, capsys)
        assert result.code == 1
        assert "the token is stored" in result.err
        assert "retries in the background" in result.err
        account = read_account(fake_env, "cli-import-later")
        assert account is not None
        assert account.refresh_token == Secret(legacy)

        again = run(["accounts", "refresh", "cli-import-later"], fake_env, capsys)
        assert again.code == 0, again.err
        account = read_account(fake_env, "cli-import-later")
        assert account is not None
        assert account.status.value == "active"
        assert account.refresh_token is not None
        assert account.refresh_token.reveal().startswith("nbfake-rt-")

    def test_import_over_a_connected_account_is_refused(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Importing for a slug that holds a working pair changes nothing and says why."""
        issued = connected(fake_env, fake_process, "cli-already")
        monkeypatch.setattr(sys, "stdin", io.StringIO("legacy-token-cli-already-0123\n"))

        result = run(["accounts", "import", "cli-already"], fake_env, capsys)
        assert result.code == 1
        assert "already connected" in result.err
        assert "nbgateway accounts remove cli-already" in result.err
        account = read_account(fake_env, "cli-already")
        assert account is not None
        assert account.refresh_token == Secret(issued["refresh_token"])

    def _pending_import(
        self, fake_env: dict[str, str], fake_process: FakeNB, monkeypatch: pytest.MonkeyPatch
    ) -> str:
        """An import whose exchange failed for now: the row holds a working legacy token
        that was never exchanged (no access token, no expiry)."""
        legacy = "legacy-token-cli-pending-0123456789"
        fake_process.control(action="add_legacy_token", slug="cli-pending", token=legacy)
        fake_process.control(action="fail_token", kind="server_error")
        monkeypatch.setattr(sys, "stdin", io.StringIO(legacy + "\n"))
        assert main(["accounts", "import", "cli-pending"], fake_env) == 1
        return legacy

    def test_import_over_an_unexchanged_token_is_refused(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A mistyped token imported over a stored one that was never exchanged leaves it
        as it was (it still works): refused with exit 1, pointing at `accounts refresh`."""
        legacy = self._pending_import(fake_env, fake_process, monkeypatch)
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO("typo-not-a-real-token-0123456\n"))

        result = run(["accounts", "import", "cli-pending"], fake_env, capsys)
        assert result.code == 1
        assert "has not been exchanged yet" in result.err
        assert "nbgateway accounts refresh cli-pending" in result.err
        account = read_account(fake_env, "cli-pending")
        assert account is not None
        assert account.refresh_token == Secret(legacy)

        again = run(["accounts", "refresh", "cli-pending"], fake_env, capsys)
        assert again.code == 0, again.err

    def test_import_over_a_row_the_key_cannot_read_is_refused(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A stored row the key cannot read (damaged, or written with a key that is no
        longer configured) is left exactly as it is: the import is refused, naming the key."""
        self._pending_import(fake_env, fake_process, monkeypatch)
        capsys.readouterr()
        database = fake_env["NBGW_DATABASE"]
        corrupt_refresh_token(database, "cli-pending")
        before = stored_row(database, "cli-pending")
        monkeypatch.setattr(sys, "stdin", io.StringIO("legacy-token-other-0123456789\n"))

        result = run(["accounts", "import", "cli-pending"], fake_env, capsys)
        assert result.code == 1
        assert "is stored but cannot be read" in result.err
        assert "check NBGW_ENCRYPTION_KEY" in result.err
        assert stored_row(database, "cli-pending") == before

    def test_refresh_of_a_revoked_account_points_at_connect(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """When NationBuilder rejects the refresh token, refresh exits 1 naming /connect."""
        issued = connected(fake_env, fake_process, "cli-revoked")
        fake_process.control(action="revoke", slug="cli-revoked")

        result = run(["accounts", "refresh", "cli-revoked"], fake_env, capsys)
        assert result.code == 1
        assert "/connect" in result.err
        assert issued["refresh_token"] not in result.err

        listing = run(["accounts", "list", "--json"], fake_env, capsys)
        [row] = json.loads(listing.out)
        assert row["status"] == "needs_reauth"
        assert row["last_error"]
        assert "nbfake-" not in listing.out

    def test_commands_keep_the_servers_info_lines_off_stderr(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`accounts list` on a store with an account needing re-authorization prints the
        table and nothing else: no "account needs re-authorization" INFO line per command
        (NBGW_LOG_LEVEL=DEBUG still shows everything)."""
        connected(fake_env, fake_process, "cli-quiet")
        fake_process.control(action="revoke", slug="cli-quiet")
        assert run(["accounts", "refresh", "cli-quiet"], fake_env, capsys).code == 1

        listing = run(["accounts", "list"], fake_env, capsys)
        assert listing.code == 0
        assert "needs_reauth" in listing.out
        assert listing.err == ""
        debug = run(["accounts", "list"], {**fake_env, "NBGW_LOG_LEVEL": "DEBUG"}, capsys)
        assert "account needs re-authorization" in debug.err

    def test_refresh_during_an_outage_fails_cleanly(
        self,
        fake_env: dict[str, str],
        fake_process: FakeNB,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A token endpoint outage exits 1 and leaves the stored pair as it was."""
        issued = connected(fake_env, fake_process, "cli-outage")
        fake_process.control(action="fail_token", kind="server_error")

        result = run(["accounts", "refresh", "cli-outage"], fake_env, capsys)
        assert result.code == 1
        assert "refresh failed" in result.err
        assert "<html" not in result.err.lower()
        account = read_account(fake_env, "cli-outage")
        assert account is not None
        assert account.refresh_token == Secret(issued["refresh_token"])
        assert account.status.value == "active"


# ---------------------------------------------------------------------- entry points


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [[str(CONSOLE_SCRIPT)], [sys.executable, "-m", "nbgateway"]],
    ids=["console-script", "python-m"],
)
def test_entry_point_help(command: list[str]) -> None:
    """Both entry points run the CLI: --help exits 0 and describes the gateway."""
    done = run_command([*command, "--help"])
    assert done.returncode == 0, done.stderr
    assert "Transparent OAuth token gateway" in done.stdout


@pytest.mark.slow
def test_entry_point_exit_code_is_propagated(tmp_path: Path) -> None:
    """The console script's exit status is main()'s return value (2 on bad config)."""
    done = run_command([str(CONSOLE_SCRIPT), "check"], cwd=tmp_path)
    assert done.returncode == 2
    assert "NBGW_ENCRYPTION_KEY" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_self_test(tmp_path: Path) -> None:
    """`nbgateway demo --port 0 --self-test` connects, proxies, recovers and exits 0."""
    done = run_command(
        [str(CONSOLE_SCRIPT), "demo", "--port", "0", "--self-test"], cwd=tmp_path, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo self-test: ok" in done.stdout


def test_demo_on_a_busy_port_suggests_a_command_that_exists(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the port taken, demo exits 1 and suggests another port through a command this
    shell can run (the virtualenv's nbgateway is often not on PATH: then `make demo PORT=`)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run(["demo", "--port", str(port)], {}, capsys)
    assert result.code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.err
    commands = re.findall(r"`([^`]+)`", result.err)
    assert commands, result.err
    for command in commands:
        program = command.split()[0]
        assert shutil.which(program) or Path(program).is_file(), command
        assert f"{port + 1}" in command
    if not shutil.which("nbgateway"):
        assert f"make demo PORT={port + 1}" in commands


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_passes_the_port() -> None:
    """`make demo PORT=N` runs the demo on port N."""
    # --no-print-directory: under `make test` this is a sub-make, which would otherwise add
    # "Entering/Leaving directory" lines.
    done = run_command(
        ["make", "--no-print-directory", "-n", "demo", "PORT=8123"],
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith("nbgateway demo --port 8123")


async def test_demo_prints_the_call_that_shows_the_consent_page(aiohttp_server: Any) -> None:
    """The control call the demo prints stops the fake's automatic approval: the authorize
    URL then shows the consent page with its Deny button."""
    fake = FakeNationBuilder(auto_approve=True)
    server = await aiohttp_server(fake.app)
    fake_url = str(server.make_url("")).rstrip("/")
    text = instructions("http://127.0.0.1:8080", fake_url, "admin-token")
    [call] = re.findall(r"curl -s -X POST (\S+) -d '(\{[^']*auto_approve[^']*\})'", text)
    url, body = call
    query = {
        "response_type": "code",
        "client_id": fake.client_id,
        "redirect_uri": "http://127.0.0.1:8080/connect/callback",
        "state": "s",
    }
    async with aiohttp.ClientSession() as session:
        authorize = f"{fake_url}/demo/oauth/authorize"
        async with session.get(authorize, params=query, allow_redirects=False) as resp:
            assert resp.status == 302  # approved on its own
        async with session.post(url, data=body) as resp:
            assert resp.status == 200, await resp.text()
        async with session.get(authorize, params=query, allow_redirects=False) as resp:
            assert resp.status == 200
            assert 'value="deny"' in await resp.text()


def test_the_demo_hints_are_valid_shell_as_printed() -> None:
    """Every hint pastes into bash as printed: the whole block parses (`bash -n`), and the
    burst of hint 5 is one command whose curl prints a newline per answer."""
    text = instructions("http://127.0.0.1:8080", "http://127.0.0.1:8081", "admin-token")
    commands = ("  #", "  curl", "  seq", "    '")
    block = "\n".join(line for line in text.splitlines() if line.startswith(commands))
    done = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    [burst] = [line for line in text.splitlines() if "xargs" in line]
    assert burst.endswith("%{time_total}s\\n' \\"), burst


# ---------------------------------------------------------------------- database locking
#
# The commands open the store directly. These run in a subprocess because the failure mode
# leaves an aiosqlite worker thread behind, which would keep the test process alive.

STORE_SCRIPT = """
import asyncio, os, sys, time
from pathlib import Path
from nbgateway.clock import SystemClock
from nbgateway.crypto import Cipher
from nbgateway.models import EventKind, TokenSet
from nbgateway.redact import Secret
from nbgateway.store import SQLiteStore

async def go(path, key, write):
    store = SQLiteStore(Path(path), Cipher([Secret(key)]), SystemClock(), busy_timeout=0.2)
    async with store:
        if write:
            tokens = TokenSet(Secret("nbfake-at-lock-1"), Secret("nbfake-rt-lock-1"),
                              time.time() + 60, "default")
            await store.save_tokens("acme", tokens, EventKind.CONNECTED)

try:
    asyncio.run(go(sys.argv[1], sys.argv[2], sys.argv[3] == "write"))
    print("ok", flush=True)
except Exception as exc:
    print(f"error {type(exc).__module__}.{type(exc).__name__}: {exc}", flush=True)
if sys.argv[4] == "hard-exit":
    os._exit(0)
"""


def run_store_script(db: Path, key: str, *, write: bool, hard_exit: bool) -> str:
    """Run STORE_SCRIPT; its one line of output, or TIMEOUT if the process did not end."""
    try:
        done = run_command(
            [
                sys.executable,
                "-c",
                STORE_SCRIPT,
                str(db),
                key,
                "write" if write else "open",
                "hard-exit" if hard_exit else "normal-exit",
            ],
            cwd=db.parent,
            timeout=4,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else ""
        return f"TIMEOUT after: {out.strip()}"
    return done.stdout.strip() + done.stderr[-500:]


@pytest.mark.slow
def test_first_write_after_creating_the_database(tmp_path: Path) -> None:
    """A store opened on a new file accepts a write at once."""
    result = run_store_script(tmp_path / "gateway.db", generate_key(), write=True, hard_exit=True)
    assert result == "ok"


@pytest.mark.slow
def test_locked_database_fails_cleanly(tmp_path: Path) -> None:
    """A database another process locks exclusively is StoreUnavailable (a StoreError that
    passes), and the process ends."""
    db, key = tmp_path / "gateway.db", generate_key()
    assert run_store_script(db, key, write=False, hard_exit=False) == "ok"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        result = run_store_script(db, key, write=False, hard_exit=False)
    finally:
        holder.close()
    assert result.startswith("error nbgateway.errors.StoreUnavailable"), result
    assert "locked" in result


@pytest.mark.slow
def test_sigterm_ends_the_wait_for_a_locked_sqlite_database_promptly(tmp_path: Path) -> None:
    """`serve` waiting for a SQLite file another process holds locked: the check's
    statements wait at most a second for the lock (not the gateway's 10 s), so SIGTERM
    ends the wait with 143 before a container manager's stop timeout would kill it."""
    db, key = tmp_path / "gateway.db", generate_key()
    assert run_store_script(db, key, write=False, hard_exit=False) == "ok"
    env = {**clean_os_environ(), **gateway_env(db, ADMIN_TOKEN, key=key)}
    env["NBGW_LISTEN"] = f"127.0.0.1:{free_port()}"
    holder = sqlite3.connect(db, isolation_level=None)
    processes = Processes(tmp_path)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        gateway = processes.start("gateway", [sys.executable, "-m", "nbgateway", "serve"], env)
        wait_until(lambda: "waiting for the database" in gateway.output(), 30, "the wait")
        time.sleep(1.5)  # past the first 1 s pause: inside the next try
        started = time.monotonic()
        gateway.popen.terminate()
        assert gateway.popen.wait(30) == 143
        # Within about one lock wait; the gateway's own 10 s busy timeout would show here.
        assert time.monotonic() - started < 5, gateway.output()
    finally:
        holder.close()
        processes.stop_all()


def test_a_reader_that_stops_early_gets_no_traceback(env: dict[str, str]) -> None:
    """`nbgateway accounts list | head -1`: the listing is longer than the pipe holds, the
    reader closes it after one line; the command stops quietly (exit 1, no traceback),
    also at exit when Python flushes what is left."""

    async def fill() -> None:
        key = env["NBGW_ENCRYPTION_KEY"]
        async with SQLiteStore(
            Path(env["NBGW_DATABASE"]), Cipher([Secret(key)]), SystemClock()
        ) as store:
            for n in range(1500):
                await store.import_refresh_token(f"nation-{n:04d}", Secret(f"nbfake-rt-{n}"))

    asyncio.run(fill())
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbgateway", "accounts", "list"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_the_workers_parent_waits_out_a_longer_token_timeout(
    stored_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `--workers` parent kills workers still running after open requests' 60 s, a
    refresh's NBGW_TOKEN_TIMEOUT + 5 s, the audit's 5 s and the webhook's 3 s: a longer
    token timeout is
    waited out (not cut off like a crash, after NationBuilder may have rotated)."""
    graces: list[float] = []

    class Parent:
        def __init__(self, *args: Any, grace: float, **kwargs: Any) -> None:
            graces.append(grace)
            args[2].close()  # the SocketGroup

        def run(self) -> int:
            return 0

    monkeypatch.setattr(cli, "Workers", Parent)
    for timeout in ("15", "120"):
        environ = {
            **stored_env,
            "NBGW_WORKERS": "2",
            "NBGW_TOKEN_TIMEOUT": timeout,
            "NBGW_LISTEN": f"127.0.0.1:{free_port()}",
        }
        assert run(["serve"], environ, capsys).code == 0
    assert graces == [88.0, 193.0]
