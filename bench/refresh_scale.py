"""Refresh at scale: N nations whose tokens expire at once, on SQLite and on PostgreSQL.

`make bench` runs it after bench/run.py (or `.venv/bin/python bench/refresh_scale.py`).
Loopback only; stops by itself. For each backend and each N (100 and 1,000 by default):

  - N accounts are seeded with expired access tokens;
  - the real `nbgateway serve` runs against bench/run.py's upstream, whose token endpoint
    answers after 0.2 s;
  - one request per nation is sent at once: reported are the time until all are answered,
    the median and p99 wait, and the token calls the upstream saw (expected: N).

Then the proxy throughput with a valid token on each backend, side by side (the hot path
never touches the database, so the two should not differ).

PostgreSQL: `--postgres-url URL` uses an existing, empty database; otherwise a temporary
server is started from Debian's PostgreSQL binaries (as the tests do), or the PostgreSQL
rows are skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import run as base

TOKEN_DELAY = 0.2


async def seed(database: str, key: str, slugs: list[str], expires_in: float) -> None:
    """Store a token pair per slug (expired when `expires_in` < 0), as /connect would."""
    from nbgateway.clock import SystemClock
    from nbgateway.config import parse_database
    from nbgateway.crypto import Cipher
    from nbgateway.models import EventKind, TokenSet
    from nbgateway.redact import Secret
    from nbgateway.store import make_store

    clock = SystemClock()
    async with make_store(
        parse_database(database),
        Cipher([Secret(key)]),
        clock,
    ) as store:
        for slug in slugs:
            await store.save_tokens(
                slug,
                TokenSet(
                    access_token=Secret(f"seeded-access-{secrets.token_hex(16)}"),
                    refresh_token=Secret(f"seeded-refresh-{secrets.token_hex(16)}"),
                    expires_at=clock.now() + expires_in,
                    scope="default",
                ),
                EventKind.CONNECTED,
            )


async def one_each(url: str, slugs: list[str]) -> tuple[float, list[float], dict[str, int]]:
    """One request per nation, all at once: (time until all answered, waits, statuses)."""
    connector = aiohttp.TCPConnector(limit=len(slugs) + 10)
    timeout = aiohttp.ClientTimeout(total=300)
    waits: list[float] = []
    statuses: dict[str, int] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = asyncio.Event()

        async def one(slug: str) -> None:
            await start.wait()
            began = time.perf_counter()
            try:
                async with session.get(f"{url}/n/{slug}{base.API_PATH}") as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            waits.append(time.perf_counter() - began)
            statuses[status] = statuses.get(status, 0) + 1

        tasks = [asyncio.create_task(one(s)) for s in slugs]
        await asyncio.sleep(0)
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        total = time.perf_counter() - began
    return total, sorted(waits), statuses


@contextlib.contextmanager
def temporary_postgres(tmp: Path) -> Iterator[object | None]:
    """A throwaway PostgreSQL server (the test suite's harness), or None with a reason."""
    try:
        import pgserver  # tests/pgserver.py
    except ImportError as exc:
        print(f"PostgreSQL: skipped ({exc})")
        yield None
        return
    try:
        server = pgserver.PostgresServer.start(tmp / "pg")
    except Exception as exc:  # the harness says why (no binaries, cannot start)
        print(f"PostgreSQL: skipped ({exc})")
        yield None
        return
    try:
        yield server
    finally:
        server.stop()


def fresh_database(server: object, name: str) -> str:
    url: str = server.create_database(name)  # type: ignore[attr-defined]
    return url


def scale_run(bench: base.Bench, upstream: base.Child, backend: str, database: str, n: int) -> str:
    key = bench.env["NBGW_ENCRYPTION_KEY"]
    slugs = [f"nation-{i:04d}" for i in range(n)]
    asyncio.run(seed(database, key, slugs, expires_in=-60))
    bench.env["NBGW_DATABASE"] = database
    before = base.token_calls(upstream)
    gateway = bench.spawn_gateway(f"gateway-{backend}-{n}", upstream, "off")
    try:
        total, waits, statuses = asyncio.run(one_each(gateway.url, slugs))
    finally:
        gateway.stop()
    calls = base.token_calls(upstream) - before
    median = statistics.median(waits)
    p99 = base._percentile(waits, 0.99)
    ok = statuses == {"200": n} and calls == n
    return (
        f"  {backend:<10} N={n:<5} all answered in {total:6.2f} s   median wait {median:5.2f} s"
        f"   p99 {p99:5.2f} s   token calls {calls:<5} statuses {statuses}"
        f"   {'ok' if ok else 'UNEXPECTED'}"
    )


def throughput(bench: base.Bench, upstream: base.Child, backend: str, database: str) -> str:
    asyncio.run(seed(database, bench.env["NBGW_ENCRYPTION_KEY"], [base.SLUG], 86400))
    bench.env["NBGW_DATABASE"] = database
    bench.env["NBGW_DEFAULT_ACCOUNT"] = base.SLUG
    gateway = bench.spawn_gateway(f"gateway-{backend}-rps", upstream, "on")
    try:
        result = bench.run_load(gateway, upstream)
    finally:
        gateway.stop()
        bench.env.pop("NBGW_DEFAULT_ACCOUNT", None)
    return base.fmt_load_row(f"{backend} store", result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/refresh_scale.py", description=__doc__)
    parser.add_argument("--nations", type=int, action="append", help="N (repeatable)")
    parser.add_argument("--postgres-url", help="an existing, empty PostgreSQL database")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args(argv)
    sizes = args.nations or [100, 1000]
    base.raise_fd_limit()
    print(
        f"refresh at scale on {base.machine_line()}; token endpoint answers after {TOKEN_DELAY} s"
    )
    with tempfile.TemporaryDirectory(prefix="nbgw-scale-") as tmpdir:
        tmp = Path(tmpdir)
        bench = base.Bench(args, tmp)
        key = subprocess.run(
            [*base.gateway_command(), "keygen"], capture_output=True, text=True, check=True
        ).stdout.strip()
        bench.env = {
            "NBGW_ENCRYPTION_KEY": key,
            "NBGW_CLIENT_ID": base.CLIENT_ID,
            "NBGW_CLIENT_SECRET": base.CLIENT_SECRET,
            "NBGW_ADMIN_TOKEN": base.ADMIN_TOKEN,
            "NBGW_TOKEN_TIMEOUT": "30",
            # Every request comes from this one address: lift the per-address cap above N.
            "NBGW_MAX_CONNECTIONS_PER_CLIENT": str(max(sizes) * 2 + 100),
        }
        try:
            upstream = bench.spawn_role("upstream", "--token-delay", str(TOKEN_DELAY))
            with contextlib.ExitStack() as stack:
                server = None
                if args.postgres_url is None:
                    server = stack.enter_context(temporary_postgres(tmp))
                rows: list[str] = []
                rps: list[str] = []
                backends: list[tuple[str, object]] = [("sqlite", None)]
                if args.postgres_url or server is not None:
                    backends.append(("postgresql", server))
                for backend, pg in backends:
                    for n in sizes:
                        if backend == "sqlite":
                            database = str(tmp / f"scale-{n}.db")
                        elif args.postgres_url:
                            database = args.postgres_url
                        else:
                            database = fresh_database(pg, f"scale_{n}")
                        rows.append(scale_run(bench, upstream, backend, database, n))
                        print(rows[-1], flush=True)
                        if args.postgres_url:
                            break  # one empty database given: one run
                    database = (
                        str(tmp / "rps.db")
                        if backend == "sqlite"
                        else (args.postgres_url or fresh_database(pg, "rps"))
                    )
                    if backend == "postgresql" and args.postgres_url:
                        continue  # the given database already holds the scale accounts
                    rps.append(throughput(bench, upstream, backend, database))
                print("\nproxy throughput with a valid token (access log on):")
                print(base.load_header())
                for line in rps:
                    print(line)
        except (base.BenchError, subprocess.SubprocessError, OSError) as exc:
            print(f"\nFAILED TO RUN: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
