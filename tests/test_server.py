"""The event loop `serve` runs on: uvloop's when it is installed, asyncio's otherwise."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Processes, gateway_env, http_request, start_gateway

from nbgateway.server import loop_factory, loop_name, run


async def running_loop_name() -> str:
    return loop_name(asyncio.get_running_loop())


def test_uvloop_is_used_when_installed() -> None:
    """With uvloop importable (the `fast` and dev extras), `run` serves on its loop."""
    pytest.importorskip("uvloop")
    assert run(running_loop_name()) == "uvloop"


def test_asyncio_is_used_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop the factory is asyncio's own and `run` works the same."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert loop_factory() is asyncio.new_event_loop
    assert run(running_loop_name()) == "asyncio"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The test's subprocesses; stopped at teardown, their output printed."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
        print(procs.report())  # shown by pytest only when the test failed


@pytest.mark.slow
def test_serve_says_which_loop_it_runs_on(tmp_path: Path, processes: Processes) -> None:
    """`nbgateway serve` names its event loop in the "listening" line and answers on it."""
    expected = "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    else:
        expected = "uvloop"
    env = {
        **gateway_env(tmp_path / "gw.db", "admin-token-0123456789abcdef"),
        "NBGW_LOG_FORMAT": "json",
    }
    url = start_gateway(processes, env)
    assert http_request("GET", f"{url}/healthz", timeout=10)[0] == 200
    [gateway] = processes.started
    lines = [json.loads(line) for line in gateway.output().splitlines() if line.startswith("{")]
    [listening] = [d for d in lines if d["message"] == "nbgateway listening"]
    assert listening["event_loop"] == expected
