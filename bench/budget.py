"""nbgateway benchmark: sharing one nation's rate budget among tools (pacing on and off).

`make bench` runs it after run.py (or `.venv/bin/python bench/budget.py`). Loopback only,
about 100 s, one process: the fake NationBuilder enforcing NationBuilder v2's budget (250
requests per access token per 10 s, windows aligned to multiples of 10 s), the real
gateway (`create_app` on a real port) and N tools, each a closed loop of GET requests that
sends its next request as soon as the previous one is answered (a 429 does not slow it).

Each run starts on a window boundary and lasts exactly `--duration` seconds (whole windows),
so the budget it could use is known: limit x windows. Printed per run:

  served             requests the tools got a 200 for
  upstream 429s      requests NationBuilder (the fake) refused
  client 429s        429s the tools saw (the gateway's rate_limited or NationBuilder's)
  budget used        requests NationBuilder accepted / (limit x windows)   (target >= 95%)
  wait p50 / p99     latency of the served requests, as the tools saw it (mostly the wait)

Runs: pacing on (NBGW_RATE_QUEUE_TIMEOUT=30), pacing off (0, today's behaviour), and
pacing on with two gateways sharing one database (half the tools on each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from nbgateway import keys
from nbgateway.app import create_app
from nbgateway.config import Settings
from nbgateway.crypto import generate_key
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import EventKind, TokenSet
from nbgateway.redact import Secret

HOST = "127.0.0.1"
SLUG = "bench"
PATH = "/api/v2/signups/me"
TARGET_SHARE = 0.95


@dataclass
class RunResult:
    name: str
    tools: int
    gateways: int
    duration: float
    served: int
    upstream_429: int
    client_429: int
    other: int
    accepted: int
    budget: int
    share: float
    wait_p50: float
    wait_p99: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def _start_gateway(settings: Settings) -> tuple[web.Application, web.AppRunner, str]:
    app = create_app(settings, background=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, settings.port).start()
    return app, runner, f"http://{HOST}:{settings.port}"


async def one_run(
    name: str,
    *,
    tools: int,
    gateways: int,
    duration: float,
    queue_timeout: float,
    limit: int,
    window: int,
) -> RunResult:
    fake = FakeNationBuilder(rate_limit=limit, rate_window=window)
    fake_url = await fake.start(HOST, 0)
    runners: list[web.AppRunner] = []
    try:
        with tempfile.TemporaryDirectory(prefix="nbgw-budget-") as tmp:
            key = generate_key()
            urls = []
            for _ in range(gateways):
                settings = Settings(
                    encryption_keys=(Secret(key),),
                    client_id=fake.client_id,
                    client_secret=Secret(fake.client_secret),
                    admin_token=Secret(secrets.token_urlsafe(24)),
                    port=_free_port(),
                    database=Path(tmp) / "gateway.db",
                    nation_url=f"{fake_url}/{{slug}}",
                    default_account=SLUG,
                    access_log=False,
                    rate_queue_timeout=queue_timeout,
                )
                app, runner, url = await _start_gateway(settings)
                runners.append(runner)
                urls.append(url)
                if len(urls) == 1:
                    issued = fake.issue_tokens(SLUG)
                    tokens = TokenSet(
                        access_token=Secret(issued["access_token"]),
                        refresh_token=Secret(issued["refresh_token"]),
                        expires_at=time.time() + float(issued["expires_in"]),
                        scope=issued["scope"],
                    )
                    await app[keys.STORE].save_tokens(SLUG, tokens, EventKind.CONNECTED)
                await app[keys.TOKENS].sync(force=True)

            # Start on a window boundary so the run covers whole windows.
            start = (math.floor(time.time() / window) + 1) * window
            await asyncio.sleep(start - time.time())
            fake.clear_recordings()
            end = start + duration
            served: list[float] = []
            counts = {"429": 0, "other": 0}

            async def tool(base: str) -> None:
                timeout = aiohttp.ClientTimeout(total=queue_timeout + 30)
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    while time.time() < end:
                        sent = time.perf_counter()
                        async with session.get(base + PATH) as resp:
                            await resp.read()
                        if time.time() > end:
                            break  # answered after the run: not counted
                        if resp.status == 200:
                            served.append(time.perf_counter() - sent)
                        elif resp.status == 429:
                            counts["429"] += 1
                        else:
                            counts["other"] += 1

            await asyncio.gather(*(tool(urls[i % gateways]) for i in range(tools)))
            in_run = [r for r in fake.api_requests if start <= r.at < end]
            upstream_429 = fake.rate_limited_count
            accepted = len(in_run) - upstream_429
            windows = round(duration / window)
            budget = limit * windows
            return RunResult(
                name=name,
                tools=tools,
                gateways=gateways,
                duration=duration,
                served=len(served),
                upstream_429=upstream_429,
                client_429=counts["429"],
                other=counts["other"],
                accepted=accepted,
                budget=budget,
                share=accepted / budget,
                wait_p50=_quantile(served, 0.5),
                wait_p99=_quantile(served, 0.99),
            )
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await fake.stop()


def report(results: list[RunResult]) -> str:
    lines = [
        f"{'run':<28} {'served':>7} {'up 429':>7} {'cl 429':>7} {'budget used':>12} "
        f"{'p50 s':>7} {'p99 s':>7}",
    ]
    for r in results:
        lines.append(
            f"{r.name:<28} {r.served:>7} {r.upstream_429:>7} {r.client_429:>7} "
            f"{r.share:>11.1%} {r.wait_p50:>7.3f} {r.wait_p99:>7.3f}"
        )
    paced = [r for r in results if r.name.startswith("pacing on")]
    for r in paced:
        verdict = "PASS" if r.share >= TARGET_SHARE and r.client_429 == 0 else "MISS"
        lines.append(f"{verdict}  {r.name}: budget used {r.share:.1%} (target >= 95%)")
    return "\n".join(lines)


async def run_all(args: argparse.Namespace) -> list[RunResult]:
    common = {
        "tools": args.tools,
        "duration": args.duration,
        "limit": args.limit,
        "window": args.window,
    }
    results = [
        await one_run("pacing on, 1 gateway", gateways=1, queue_timeout=30, **common),
        await one_run("pacing off, 1 gateway", gateways=1, queue_timeout=0, **common),
    ]
    if not args.no_replicas:
        results.append(
            await one_run("pacing on, 2 gateways", gateways=2, queue_timeout=30, **common)
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/budget.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tools", type=int, default=10, help="concurrent tools (default 10)")
    parser.add_argument(
        "--duration", type=float, default=30, help="seconds per run (whole windows)"
    )
    parser.add_argument("--limit", type=int, default=250, help="requests per window")
    parser.add_argument("--window", type=int, default=10, help="window length in seconds")
    parser.add_argument("--no-replicas", action="store_true", help="skip the two-gateway run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    results = asyncio.run(run_all(args))
    print(report(results))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
