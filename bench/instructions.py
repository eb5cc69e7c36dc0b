"""Instructions per proxied request, gateway against the minimal passthrough (callgrind).

`.venv/bin/python bench/instructions.py` (part of `make bench` when valgrind is installed).
Requests per second on a shared machine move with whatever else runs on it; instruction
counts do not: callgrind counts the instructions the proxy process executes, and the same
code, input and environment give the same count to within a fraction of a percent, whatever
the other core is doing. The count is user space only (system calls, the socket and log
writes themselves, are not in it), and callgrind runs the proxy about 50 times slower, so
only the count is a figure, not the time.

For each target (the passthrough of bench/run.py, the gateway with default settings, the
gateway with NBGW_ACCESS_LOG=off) this starts the cheap upstream stand-in of
bench/run.py [1] and the proxy under
`valgrind --tool=callgrind --instr-atstart=no`, warms it up, switches instrumentation on
with `callgrind_control` only while `--requests` requests run over 16 keep-alive
connections, and prints instructions per request and the ratio to the passthrough.
The gateway/passthrough ratio of instructions is what the req/s ratio tends to when the
proxy, not the load generator, is the bottleneck (a req/s ratio of 0.9 needs about 1.11).
About 2 minutes. Exit status 1 when a step fails, or when valgrind is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from nbgateway.server import loop_factory

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # bench/run.py: the roles and the seeded account

CONNECTIONS = 16
WARMUP = 300


async def load(url: str, total: int) -> None:
    """`total` GETs of `url` over CONNECTIONS keep-alive connections; each must answer 200."""
    sent = 0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal sent
            while sent < total:
                sent += 1
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise bench.BenchError(f"{url} answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))


def wait_answering(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120  # callgrind starts Python slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise bench.BenchError(f"the proxy exited:\n{log.read_text()[-2000:]}")
        try:
            asyncio.run(bench.sanity(f"http://{bench.HOST}:{port}"))
            return
        except Exception:  # not up yet
            time.sleep(0.3)
    raise bench.BenchError(f"the proxy did not answer:\n{log.read_text()[-2000:]}")


def count(target: str, upstream: str, tmp: Path, requests: int) -> float:
    """Instructions per request of one proxy (`pt`, `on` or `off`)."""
    port = bench._free_port()
    out = tmp / f"callgrind.{target}"
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        "-q",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBGW_")}
    if target == "pt":
        argv = [
            *valgrind,
            sys.executable,
            bench.__file__,
            "_passthrough",
            "--port",
            str(port),
            "--upstream",
            upstream,
        ]
    else:
        database = tmp / f"gateway-{target}.db"
        key = subprocess.run(
            [*bench.gateway_command(), "keygen"], capture_output=True, text=True, check=True
        ).stdout.strip()
        asyncio.run(bench.seed_account(database, key, bench.SLUG, expires_in=86_400))
        env.update(
            NBGW_DATABASE=str(database),
            NBGW_ENCRYPTION_KEY=key,
            NBGW_CLIENT_ID=bench.CLIENT_ID,
            NBGW_CLIENT_SECRET=bench.CLIENT_SECRET,
            NBGW_ADMIN_TOKEN=bench.ADMIN_TOKEN,
            NBGW_DEFAULT_ACCOUNT=bench.SLUG,
            NBGW_LISTEN=f"{bench.HOST}:{port}",
            NBGW_NATION_URL=f"{upstream}/{{slug}}",
            NBGW_ACCESS_LOG=target,
        )
        argv = [*valgrind, *bench.gateway_command(), "serve"]
    log = tmp / f"proxy-{target}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_answering(port, proc, log)
        url = f"http://{bench.HOST}:{port}{bench.API_PATH}"
        asyncio.run(load(url, WARMUP))
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        asyncio.run(load(url, requests))
        subprocess.run(
            ["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True
        )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = 0
    for dump in tmp.glob(f"callgrind.{target}*"):
        for line in dump.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    if total == 0:
        raise bench.BenchError(
            f"callgrind wrote no counts for {target}:\n{log.read_text()[-2000:]}"
        )
    return total / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per target")
    parser.add_argument(
        "--keep",
        type=Path,
        help="copy the callgrind files into this directory, for callgrind_annotate --inclusive=yes",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 1
    loop = "uvloop" if loop_factory() is not asyncio.new_event_loop else "asyncio"
    print(f"event loop of both proxies: {loop}; {args.requests} requests counted per target")
    with tempfile.TemporaryDirectory(prefix="nbgw-instr-") as name:
        tmp = Path(name)
        port = bench._free_port()
        upstream = subprocess.Popen(
            [sys.executable, bench.__file__, "_fastupstream", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            figures: dict[str, float] = {}
            labels = {
                "pt": "passthrough",
                "on": "gateway, default settings",
                "off": "gateway, NBGW_ACCESS_LOG=off",
            }
            for target, label in labels.items():
                figures[target] = count(target, f"http://{bench.HOST}:{port}", tmp, args.requests)
                ratio = figures[target] / figures["pt"]
                print(
                    f"{label:30s} {figures[target] / 1000:7.1f}k instructions/request"
                    f"  {ratio:.2f}x",
                    flush=True,
                )
        except (bench.BenchError, subprocess.CalledProcessError) as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 1
        finally:
            upstream.terminate()
            upstream.wait(30)
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                for dump in tmp.glob("callgrind.*"):
                    shutil.copy(dump, args.keep / dump.name)
    print(
        f"gateway/passthrough: {figures['on'] / figures['pt']:.2f}x with default settings "
        f"(target for a 0.9 req/s ratio: <= {1 / 0.9:.2f}x), "
        f"{figures['off'] / figures['pt']:.2f}x with the access log off"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
