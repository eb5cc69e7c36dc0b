"""Command line: parse arguments, configure logging, call one async function, exit.

Exit codes: 0 success, 1 the operation failed (message on stderr), 2 bad usage or
configuration. No business logic lives here: commands call `AccountService`, the store
and `create_app`, the same code the server runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from nbgateway import __version__
from nbgateway.accounts import AccountService, account_json, check_slug
from nbgateway.clients import audit_json, check_client, client_json
from nbgateway.clock import SystemClock
from nbgateway.config import (
    MAX_WORKERS,
    REQUIRED_FOR_OAUTH,
    REQUIRED_FOR_SERVE,
    REQUIRED_FOR_STORE,
    SETTINGS,
    Settings,
    load_settings,
    parse_database,
    same_database,
    settled_environment,
)
from nbgateway.crypto import generate_key
from nbgateway.errors import (
    AccountNotFound,
    AuthorizationFailed,
    ConfigError,
    NBGatewayError,
    PairNotStored,
    ReauthorizationRequired,
    RefreshBackoff,
)
from nbgateway.log import configure_logging
from nbgateway.metrics import Metrics
from nbgateway.preflight import run_preflight, wait_for_database
from nbgateway.redact import Redactor, Secret
from nbgateway.server import bind, host_port, rejoin, run, run_until_stopped
from nbgateway.services import open_services, stop_grace, store_for
from nbgateway.store import copy_store, holds_no_database
from nbgateway.tokens import TokenManager
from nbgateway.workers import EXIT_NOT_STARTED, MULTIPROC_ENV, Workers

log = logging.getLogger("nbgateway.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
# Seconds `accounts refresh` keeps trying to store a pair the database refused (its only
# holder is about to exit).
HELD_PAIR_WAIT = 60.0


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (a usage error, exit 2,
    otherwise)."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not from {low} to {high}")
        return number

    return parse


# The longest audit listing one command prints.
AUDIT_LIMIT_MAX = 100_000


def _slug(text: str) -> str:
    """An argparse type: a nation slug (a usage error, exit 2, otherwise)."""
    try:
        return check_slug(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _settings_epilog() -> str:
    lines = [
        "settings (environment; a --config TOML file may hold the same keys lower-cased "
        "without NBGW_; the environment wins):"
    ]
    for s in SETTINGS:
        default = (
            "required"
            if s.default is None
            else (f"default {s.default}" if s.default else "optional")
        )
        lines.append(f"  {s.env:<24} {s.help} ({default})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbgateway",
        description="Transparent OAuth token gateway for the NationBuilder API.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nbgateway {__version__}")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file with settings (env wins)"
    )
    # --config is accepted before or after the command (`nbgateway serve --config FILE`);
    # SUPPRESS keeps a subcommand without it from resetting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML file with settings (env wins)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until stopped.",
        parents=[common],
    )
    serve_parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serving processes on the one listen address (default NBGW_WORKERS, 1)",
    )
    # Set by the --workers parent for its workers: the inherited listening socket and the
    # read end of the pipe that tells a worker its parent is gone. Not for people.
    serve_parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    serve_parser.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    demo = sub.add_parser(
        "demo",
        help="run the gateway against the built-in fake NationBuilder (no credentials needed)",
        description="Start a fake NationBuilder and the gateway, connect a demo nation "
        "through the real OAuth flow, and print commands to try, among them the control call "
        "that stops the fake approving by itself (to see the consent and Deny pages).",
    )
    demo.add_argument(
        "--port",
        type=_whole_number(0, 65535),
        default=8080,
        help="gateway port (default 8080; 0 takes any free port)",
    )
    demo.add_argument(
        "--self-test",
        action="store_true",
        help="run the printed demo requests, report, and exit instead of serving",
    )
    sub.add_parser(
        "keygen",
        help="print a fresh encryption key",
        description="Print a new key for NBGW_ENCRYPTION_KEY.",
    )
    sub.add_parser(
        "check",
        parents=[common],
        help="validate every setting serve needs, the key and the database",
        description="Validate settings, the encryption key and the database as serve needs "
        "them: required and malformed settings, unknown NBGW_* variables and config keys, "
        "whether NBGW_LISTEN can be listened on (in use right now is only a note), "
        "the database directory (writable), the file, its schema and every stored row. "
        "Prints one line per problem, all of them; exits 2 for configuration problems, 1 "
        "for database problems, 0 when serve can start.",
    )
    accounts = sub.add_parser(
        "accounts",
        parents=[common],
        help="list and manage connected nations",
        description="List, refresh, remove or import the nations whose tokens the gateway holds.",
    )
    acc = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    listing = acc.add_parser(
        "list",
        parents=[common],
        help="slug, status, token expiry, last refresh, last error",
        description="List every account: slug, status, access-token expiry, last refresh and "
        "last error. Never prints a token.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for name, text in (
        ("refresh", "refresh the account's access token now"),
        ("remove", "delete the account's tokens"),
        (
            "import",
            "store a legacy access token read from stdin as the refresh token and exchange it "
            "(NationBuilder's legacy-token migration)",
        ),
    ):
        p = acc.add_parser(name, help=text, description=text, parents=[common])
        p.add_argument("slug", type=_slug, metavar="SLUG", help="the nation slug (e.g. my-nation)")
    sub.add_parser(
        "rotate-key",
        parents=[common],
        help="re-encrypt every row with the first key of NBGW_ENCRYPTION_KEY",
        description="Re-encrypt every stored token with the first key of NBGW_ENCRYPTION_KEY. "
        "With one gateway process: put the new key first (new,old), restart the gateway "
        "with it, run this, then drop the old key; a process still on the old key alone "
        "cannot open what this writes (500 token_store_error until it is restarted). With "
        "several processes or replicas, follow docs/security.md (Rotation) instead: old,new "
        "everywhere first, then new,old everywhere, then this.",
    )
    clients = sub.add_parser(
        "clients",
        parents=[common],
        help="register and remove the tools that may use the gateway (client keys)",
        description="Client keys identify each tool, limit it to nations and to reading, "
        "and name it in the audit trail (see NBGW_CLIENT_AUTH).",
    )
    cl = clients.add_subparsers(dest="clients_command", required=True, metavar="ACTION")
    add = cl.add_parser(
        "add",
        parents=[common],
        help="register a tool and print its key once",
        description="Register a tool and print its key (nbgw_...) once; only a hash is stored.",
    )
    add.add_argument("name", metavar="NAME", help="the tool's name (letters, digits, .-_)")
    add.add_argument(
        "--nation",
        type=_slug,
        action="append",
        default=[],
        metavar="SLUG",
        help="a nation the key may use (repeat for several; none means every nation)",
    )
    add.add_argument("--read-only", action="store_true", help="allow GET, HEAD and OPTIONS only")
    client_list = cl.add_parser(
        "list",
        parents=[common],
        help="name, nations, read-only, created, last used",
        description=(
            "List the registered tools. Never prints a key: the KEY column is a hint "
            "(nbgw_ and the first characters of its public lookup id) to tell keys apart. "
            "With --json, as GET /connect/api/clients: `nations` is always a list of slugs, "
            "empty for a key that may use every nation."
        ),
    )
    client_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    client_remove = cl.add_parser(
        "remove",
        parents=[common],
        help="remove a tool; its key stops working in every process",
        description="Remove a tool; its key is refused from the next request on, in every "
        "running gateway process.",
    )
    client_remove.add_argument("name", metavar="NAME")
    audit = sub.add_parser(
        "audit",
        parents=[common],
        help="the write requests proxied: time, client, nation, method, path, status",
        description="Show the audit trail of proxied writes (POST, PUT, PATCH, DELETE and any "
        "other method but GET, HEAD and OPTIONS), newest first. The query string is never "
        "recorded.",
    )
    audit.add_argument("--nation", type=_slug, metavar="SLUG", help="only this nation")
    audit.add_argument("--client", metavar="NAME", help="only this client (or anonymous)")
    audit.add_argument(
        "--limit",
        type=_whole_number(1, AUDIT_LIMIT_MAX),
        default=50,
        metavar="N",
        help=f"at most N (50; up to {AUDIT_LIMIT_MAX:,})",
    )
    audit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    migrate = sub.add_parser(
        "migrate",
        parents=[common],
        help="copy every account, event, pending authorization, client key and audit entry "
        "to another database",
        description="Copy everything the configured database (NBGW_DATABASE) holds to TARGET, "
        "rows still encrypted, in one transaction. TARGET is a SQLite file path or a "
        "postgresql:// URL and must not hold accounts, client keys, events or audit entries "
        "yet. The source is left as it is. "
        "Not copied: logged-out admin sessions and login-throttle counts (short-lived), and "
        "the last generations of removed accounts (they matter only to refreshes running "
        "while the gateways do; stop them first).",
    )
    migrate.add_argument(
        "--to", required=True, metavar="TARGET", help="a SQLite file path or a postgresql:// URL"
    )
    return parser


def _load(args: argparse.Namespace, environ: dict[str, str], required: frozenset[str]) -> Settings:
    return load_settings(environ, args.config, required=required)


def _creates_data(args: argparse.Namespace) -> bool:
    """Whether a command stores something of its own (so may start a new database)."""
    if args.command == "accounts":
        return bool(args.accounts_command == "import")
    if args.command == "clients":
        return bool(args.clients_command == "add")
    return False


def _missing_database(args: argparse.Namespace, settings: Settings) -> str | None:
    """Why a command that only reads or changes what is stored cannot run: its SQLite file
    does not exist. Opening it would create an empty database (in the wrong directory, as
    a rule, or under the wrong NBGW_DATABASE) and answer "no accounts" or "copied 0"."""
    database = settings.database
    if not isinstance(database, Path) or _creates_data(args) or not holds_no_database(database):
        return None
    there = "an empty file" if database.exists() else "no database"
    return (
        f"{there} at {database.absolute()} (NBGW_DATABASE): nothing is stored there, "
        "and this command does not create one; point NBGW_DATABASE (or the config file's "
        "database) at the file `nbgateway serve` uses"
    )


def _ts(value: str | None) -> str:
    return value or "-"


async def _accounts(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    legacy: Secret | None = None
    if args.accounts_command == "import":
        # Read before the database is opened (and, for SQLite, created): nothing to import
        # leaves nothing behind.
        try:
            line = sys.stdin.readline() if sys.stdin is not None else ""
        except (OSError, UnicodeDecodeError):
            line = "\ufffd"  # unreadable: refused below as not a token
        token = line.strip()
        if not token:
            print("no token on stdin: pipe the legacy access token in", file=sys.stderr)
            return EXIT_USAGE
        if not (token.isascii() and token.isprintable()) or " " in token:
            print(
                "the line on stdin is not a token (tokens are printable ASCII without "
                "spaces): pipe the legacy access token in",
                file=sys.stderr,
            )
            return EXIT_USAGE
        legacy = Secret(token)
        redactor.add(legacy)
    clock = SystemClock()
    metrics = Metrics()
    async with open_services(settings, clock=clock, metrics=metrics, redactor=redactor) as svc:
        command = args.accounts_command
        if command == "list":
            rows = [account_json(info) for info in await svc.accounts.list_accounts()]
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no accounts; connect one at /connect or with `nbgateway accounts import`")
            else:
                print(
                    f"{'SLUG':<24} {'STATUS':<13} {'EXPIRES (UTC)':<26} "
                    f"{'LAST REFRESH':<26} LAST ERROR"
                )
                for r in rows:
                    print(
                        f"{r['slug']!s:<24} {r['status']!s:<13} "
                        f"{_ts(r['access_token_expires_at'])!s:<26} "  # type: ignore[arg-type]
                        f"{_ts(r['last_refresh_at'])!s:<26} {r['last_error'] or ''}"  # type: ignore[arg-type]
                    )
            return EXIT_OK
        slug = args.slug
        try:
            if command == "refresh":
                info = await svc.accounts.refresh(slug)
                print(
                    f"refreshed {slug}; access token valid until "
                    f"{account_json(info)['access_token_expires_at']}"
                )
            elif command == "remove":
                if not await svc.accounts.remove(slug):
                    print(f"no account named {slug!r}", file=sys.stderr)
                    return EXIT_FAILED
                print(f"removed {slug}")
            elif command == "import":
                assert legacy is not None
                return await _import(svc.accounts, settings, slug, legacy)
        except AccountNotFound:
            print(f"no account named {slug!r}", file=sys.stderr)
            return EXIT_FAILED
        except ReauthorizationRequired:
            print(
                f"{slug} needs to be re-authorized by an admin at {settings.public_url}/connect",
                file=sys.stderr,
            )
            return EXIT_FAILED
        except RefreshBackoff as exc:
            print(f"refresh failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except PairNotStored:
            return await _store_held_pair(svc.tokens, settings, slug)
    return EXIT_OK


async def _store_held_pair(tokens: TokenManager, settings: Settings, slug: str) -> int:
    """`accounts refresh` got a pair the database refused: this process is the only holder
    and is about to exit, so keep trying to store it (HELD_PAIR_WAIT s), then say plainly
    whether it was stored or lost."""
    print(
        f"NationBuilder issued a new token pair for {slug}, but the database refused to "
        f"store it; trying again for up to {HELD_PAIR_WAIT:g} s (Ctrl-C gives up)...",
        file=sys.stderr,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HELD_PAIR_WAIT
    while True:
        await tokens.persist_pending(force=True)
        if slug not in tokens.unpersisted:
            print(f"refreshed {slug}; the new pair is stored")
            return EXIT_OK
        if loop.time() >= deadline:
            break
        await asyncio.sleep(2.0)
    print(
        f"the new token pair for {slug} could not be stored and is lost with this command "
        f"(NationBuilder has already spent the old refresh token): once the database can be "
        f"written, re-authorize {slug} at {settings.public_url}/connect",
        file=sys.stderr,
    )
    return EXIT_FAILED


async def _import(accounts: AccountService, settings: Settings, slug: str, token: Secret) -> int:
    """`accounts import`: exchange a legacy token; say plainly what became of it."""
    connect = f"{settings.public_url}/connect"
    try:
        info = await accounts.import_legacy(slug, token)
    except AuthorizationFailed as exc:
        hint = (
            f"; check the token, or connect the nation at {connect}"
            if exc.reason == "exchange"
            else ""
        )
        print(f"not imported: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILED
    except RefreshBackoff as exc:
        print(
            f"imported {slug}, but exchanging the token failed for now ({exc}); the token is "
            "stored and a running gateway retries in the background (or run `nbgateway "
            f"accounts refresh {slug}`); `nbgateway accounts list` shows the outcome",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(
        f"imported {slug}; access token valid until {account_json(info)['access_token_expires_at']}"
    )
    return EXIT_OK


@contextlib.contextmanager
def _sigterm_exits(wanted: bool) -> Iterator[None]:
    """While in effect, SIGTERM exits as its default action would (status 128 + 15); only
    from the main thread (where Python handles signals), and only when `wanted`."""
    if not wanted or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_worker(args: argparse.Namespace) -> bool:
    """Whether this process is a `serve --workers` worker, started by its parent."""
    return args.command == "serve" and args.listen_fd is not None


async def _preflight(args: argparse.Namespace, env: dict[str, str], redactor: Redactor) -> int:
    """`check`, and the start of `serve`: print every problem found; return the exit code.
    `serve` first waits a while for a database it cannot reach (`wait_for_database`); a
    `--workers` worker does not (its parent waited before starting it, and restarts it with
    a backoff when it exits), so it never outlives a parent killed meanwhile."""
    # A worker is handed its listening socket: it does not try the address.
    report = await run_preflight(env, args.config, redactor, listen=not _is_worker(args))
    if args.command == "serve" and not _is_worker(args):
        report = await wait_for_database(
            report,
            lambda: run_preflight(env, args.config, redactor),
            lambda line: print(line, file=sys.stderr),
            clock=SystemClock(),
        )
    if args.command == "check":
        for note in report.notes:
            print(note)
    if _is_worker(args):
        # A worker: its problems are log lines in NBGW_LOG_FORMAT (see `main`), each with
        # its time and pid; its parent logs the exit and starts it again.
        for line in report.problem_lines():
            log.error("worker not starting: %s", line, extra={"pid": os.getpid()})
        return EXIT_OK if report.ok else EXIT_NOT_STARTED
    for line in report.problem_lines():
        print(line, file=sys.stderr)
    if report.ok:
        return EXIT_OK
    count = len(report.config_problems) + len(report.database_problems)
    summary = f"{count} problem(s) found" if args.command == "check" else "not starting"
    print(f"{summary}; fix them and run `nbgateway check` again", file=sys.stderr)
    return EXIT_USAGE if report.config_problems else EXIT_FAILED


async def _rotate(settings: Settings, redactor: Redactor) -> int:
    async with store_for(settings, SystemClock(), redactor) as store:
        report = await store.rotate_keys()
    print(f"re-encrypted {report.changed} account(s) with the first key")
    for problem in report.skipped:
        print(f"skipped (unreadable, left as it is): {problem}", file=sys.stderr)
    return EXIT_FAILED if report.skipped else EXIT_OK


async def _clients(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    if args.command == "clients" and args.clients_command == "add":
        try:  # before the database is opened (and, for SQLite, created)
            check_client(args.name, tuple(args.nation))
        except ValueError as exc:
            print(f"invalid: {exc}", file=sys.stderr)
            return EXIT_USAGE
    async with open_services(
        settings, clock=SystemClock(), metrics=Metrics(), redactor=redactor
    ) as svc:
        registry = svc.clients
        if args.command == "audit":
            entries = await svc.store.audit(
                nation=args.nation, client=args.client, limit=args.limit
            )
            rows = [audit_json(e) for e in entries]
            if args.json:
                print(json.dumps(rows, indent=2))
                return EXIT_OK
            print(
                f"{'TIME (UTC)':<26} {'CLIENT':<20} {'NATION':<20} {'METHOD':<7} STATUS "
                f"{'REQUEST ID':<32} PATH"
            )
            for r in rows:
                print(
                    f"{_ts(r['at'])!s:<26} {r['client']!s:<20} {r['nation']!s:<20} "  # type: ignore[arg-type]
                    f"{r['method']!s:<7} {r['status']!s:<6} {r['request_id'] or '-'!s:<32} "
                    f"{r['path']}"
                )
            return EXIT_OK
        command = args.clients_command
        if command == "add":
            try:
                info, key = await registry.add(args.name, tuple(args.nation), args.read_only)
            except ValueError as exc:
                print(f"invalid: {exc}", file=sys.stderr)
                return EXIT_USAGE
            scope = ", ".join(info.nations) or "every nation"
            mode = "read-only" if info.read_only else "read and write"
            print(f"added client {info.name!r} ({scope}; {mode}). Its key, shown only now:")
            print(key.reveal())
            return EXIT_OK
        if command == "remove":
            if not await registry.remove(args.name):
                print(f"no client named {args.name!r}", file=sys.stderr)
                return EXIT_FAILED
            print(f"removed client {args.name!r}")
            return EXIT_OK
        rows = [client_json(info) for info in await registry.list()]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no clients; add one with `nbgateway clients add NAME`")
        else:
            print(
                f"{'NAME':<24} {'NATIONS':<30} {'ACCESS':<11} {'CREATED (UTC)':<26} "
                f"{'LAST USED (UTC)':<26} KEY"
            )
            for r in rows:
                nations = ",".join(r["nations"]) or "all"  # type: ignore[arg-type]
                access = "read-only" if r["read_only"] else "read-write"
                print(
                    f"{r['name']!s:<24} {nations:<30} {access:<11} "
                    f"{_ts(r['created_at'])!s:<26} "  # type: ignore[arg-type]
                    f"{_ts(r['last_used_at'])!s:<26} {r['key_hint']}"  # type: ignore[arg-type]
                )
    return EXIT_OK


def _migration_target(settings: Settings, target: str) -> Path | str:
    """`migrate --to`'s database; ConfigError when it is no database or the source itself."""
    database = parse_database(target, "--to")
    if same_database(settings.database, database):
        raise ConfigError("--to names the configured database itself")
    return database


async def _migrate(settings: Settings, redactor: Redactor, database: Path | str) -> int:
    target_settings = replace(settings, database=database)
    for secret in target_settings.secrets():  # a password in the target URL
        redactor.add(secret)
    clock = SystemClock()
    destination = store_for(target_settings, clock, redactor)
    async with store_for(settings, clock, redactor) as source:
        counts = await copy_store(source, destination)
    print(
        f"copied {counts['accounts']} account(s), {counts['events']} event(s), "
        f"{counts['auth_states']} pending authorization(s), {counts['clients']} client key(s) "
        f"and {counts['audit']} audit record(s) from {source.description} to "
        f"{destination.description}"
    )
    return EXIT_OK


async def serve(
    settings: Settings,
    redactor: Redactor,
    *,
    listen_fd: int | None = None,
    parent_fd: int | None = None,
    metrics_dir: Path | None = None,
) -> None:
    """Run the gateway until SIGINT or SIGTERM (as one worker when given the fds)."""
    from nbgateway.app import create_app

    app = create_app(settings, redactor=redactor, metrics_dir=metrics_dir)
    sock = None if listen_fd is None else socket.socket(fileno=listen_fd)
    await run_until_stopped(app, settings.host, settings.port, sock=sock, parent_fd=parent_fd)


def _serve(
    args: argparse.Namespace, settings: Settings, env: dict[str, str], redactor: Redactor
) -> int:
    """`serve`: one process, the parent of `--workers N` processes, or one of those workers."""
    if _is_worker(args):
        metrics_dir = env.get(MULTIPROC_ENV)
        run(
            serve(
                settings,
                redactor,
                listen_fd=args.listen_fd,
                parent_fd=args.parent_fd,
                metrics_dir=Path(metrics_dir) if metrics_dir else None,
            )
        )
        return EXIT_OK
    if settings.workers == 1:
        run(serve(settings, redactor))
        return EXIT_OK

    def command(listen_fd: int, parent_fd: int) -> list[str]:
        # No --config: the file's settings are in the environment (below), as checked now.
        return [
            sys.executable,
            "-m",
            "nbgateway",
            "serve",
            f"--listen-fd={listen_fd}",
            f"--parent-fd={parent_fd}",
        ]

    group = bind(settings.host, settings.port, settings.workers)
    # Each worker logs "nbgateway listening" once it serves (its socket listens then).
    log.info(
        "address taken for the workers",
        extra={"listen": host_port(settings.host, settings.port)},
    )
    worker_env = settled_environment(env, args.config)
    return Workers(
        command,
        worker_env,
        group,
        rejoin=rejoin,
        clock=SystemClock(),
        grace=stop_grace(settings),  # a longer NBGW_TOKEN_TIMEOUT waits longer
    ).run()


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    redactor = Redactor()
    try:
        if args.command == "keygen":
            print(generate_key())
            return EXIT_OK
        if args.command == "demo":
            from nbgateway.demo import run_demo

            configure_logging(redactor, fmt=env.get("NBGW_LOG_FORMAT", "text"), level="WARNING")
            return asyncio.run(
                run_demo(port=args.port, check_only=args.self_test, redactor=redactor)
            )
        if _is_worker(args):
            # Before its settings are read: whatever it reports is a line of the log.
            configure_logging(redactor, fmt=env.get("NBGW_LOG_FORMAT", "text").strip().lower())
        if args.command in ("check", "serve"):
            # One pre-flight for both: serve refuses what check reports, in the same words.
            # SIGTERM stops serve's wait for the database even as PID 1 in a container,
            # where the default action does not apply; the server installs its own later.
            with _sigterm_exits(args.command == "serve"):
                code = asyncio.run(_preflight(args, env, redactor))
            if code != EXIT_OK or args.command == "check":
                return code
        required = REQUIRED_FOR_SERVE if args.command == "serve" else REQUIRED_FOR_STORE
        if args.command == "accounts" and args.accounts_command in ("refresh", "import"):
            required = REQUIRED_FOR_OAUTH
        settings = _load(args, env, required)
        if args.command == "serve" and args.workers is not None:
            if not 1 <= args.workers <= MAX_WORKERS:
                print(
                    f"configuration error: --workers must be from 1 to {MAX_WORKERS}",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            settings = replace(settings, workers=args.workers)
        # A one-shot command prints its own outcome; the server's INFO lines (an account
        # seen needing re-authorization, ...) would only be noise on its stderr.
        level = settings.log_level
        if args.command != "serve" and level == "INFO":
            level = "WARNING"
        configure_logging(
            redactor, fmt=settings.log_format, level=level, access_log=settings.access_log
        )
        # check and rotate-key do not open the services, which would add these too.
        for secret in settings.secrets():
            redactor.add(secret)
        if args.command == "serve":
            return _serve(args, settings, env, redactor)
        target = _migration_target(settings, args.to) if args.command == "migrate" else None
        missing = _missing_database(args, settings)
        if missing is not None:
            print(f"error: {missing}", file=sys.stderr)
            return EXIT_FAILED
        if args.command == "rotate-key":
            return asyncio.run(_rotate(settings, redactor))
        if target is not None:
            return asyncio.run(_migrate(settings, redactor, target))
        if args.command in ("clients", "audit"):
            return asyncio.run(_clients(args, settings, redactor))
        return asyncio.run(_accounts(args, settings, redactor))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except NBGatewayError as exc:
        if _is_worker(args):
            log.error("worker stopped: %s", redactor.scrub(str(exc)), extra={"pid": os.getpid()})
        else:
            print(f"error: {redactor.scrub(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`nbgateway audit | head`): no traceback, and none at exit
        # when Python flushes stdout (the Python documentation's recipe for SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if args.command in ("serve", "demo"):
            return EXIT_OK  # Ctrl-C is how a foreground server is stopped
        # Nothing half-written is kept (every write is a transaction; rotate-key and
        # migrate are one each), but the command did not do its job: a script must not
        # go on as if it had.
        action = getattr(args, f"{args.command}_command", None)
        name = f"{args.command} {action}" if action else args.command
        if args.command == "accounts" and action in ("refresh", "import"):
            # The token call, once sent, is finished and its answer stored (the services
            # wait for it): the account may well be done.
            print(
                f"interrupted: {name} stopped before it reported; a token call already sent "
                "to NationBuilder was finished and its answer stored; see `nbgateway "
                "accounts list` before running it again",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        print(
            f"interrupted: {name} did not finish; what it had not committed was "
            "rolled back; run it again",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
