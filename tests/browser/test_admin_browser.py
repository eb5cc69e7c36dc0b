"""The /connect admin pages in a real Chromium, against real gateway and fake processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from nbgateway.crypto import generate_key

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN_TOKEN = "browser-admin-token-0123456789"
READY_DEADLINE = 20.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is missing (install Debian's chromium: make system-deps)",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")


def start_process(name: str, argv: list[str], env: dict[str, str], tmp_path: Path) -> Process:
    log_path = tmp_path / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Process(name, proc, log_path, log)


def wait_ready(process: Process, url: str) -> None:
    """Poll `url` until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited early:\n{process.output()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)  # polling a subprocess's readiness, not waiting for time to pass
    raise RuntimeError(f"{process.name} not ready within {READY_DEADLINE} s:\n{process.output()}")


def stop(process: Process) -> None:
    if process.proc.poll() is None:
        process.proc.terminate()
        try:
            process.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait()
    process.log.close()


@dataclass
class Servers:
    gateway: str
    fake: str
    processes: list[Process]

    def print_output(self) -> None:
        for process in self.processes:
            print(f"----- {process.name} output -----\n{process.output()}")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """The fake NationBuilder (consent page on) and `nbgateway serve`, as subprocesses."""
    fake_port, gw_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("NBGW_")}
    processes: list[Process] = []
    try:
        fake = start_process(
            "fakenb",
            [
                sys.executable,
                "-m",
                "nbgateway.fakenb",
                "--host",
                "127.0.0.1",
                "--port",
                str(fake_port),
            ],
            base_env,
            tmp_path,
        )
        processes.append(fake)
        fake_url = f"http://127.0.0.1:{fake_port}"
        wait_ready(fake, f"{fake_url}/_fake/state")
        gateway_url = f"http://127.0.0.1:{gw_port}"
        env = {
            **base_env,
            "NBGW_DATABASE": str(tmp_path / "gateway.db"),
            "NBGW_ENCRYPTION_KEY": generate_key(),
            "NBGW_NATION_URL": f"{fake_url}/{{slug}}",
            "NBGW_CLIENT_ID": "fake-client-id",
            "NBGW_CLIENT_SECRET": "fake-client-secret",
            "NBGW_ADMIN_TOKEN": ADMIN_TOKEN,
            "NBGW_LISTEN": f"127.0.0.1:{gw_port}",
            "NBGW_PUBLIC_URL": gateway_url,
        }
        gateway = start_process(
            "gateway", [sys.executable, "-m", "nbgateway", "serve"], env, tmp_path
        )
        processes.append(gateway)
        wait_ready(gateway, f"{gateway_url}/healthz")
        yield Servers(gateway_url, fake_url, processes)
    finally:
        for process in reversed(processes):
            stop(process)


def fake_control(servers: Servers, command: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{servers.fake}/_fake/control",
        data=json.dumps(command).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def proxied_status(servers: Servers, path: str) -> int:
    try:
        with urllib.request.urlopen(f"{servers.gateway}{path}", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_admin_pages_in_chromium(servers: Servers, tmp_path: Path) -> None:
    """Log in, connect (approve and deny), see needs-reauth, re-authorize, refresh, disconnect."""
    try:
        admin_flow(servers, tmp_path)
    except BaseException:
        servers.print_output()  # the gateway's and the fake's logs explain most failures
        raise


def admin_flow(servers: Servers, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    problems: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1024, "height": 760})
            page = context.new_page()
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None,
            )

            def shot(name: str) -> None:
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

            # Log in.
            page.goto(f"{servers.gateway}/connect")
            expect(page).to_have_url(f"{servers.gateway}/connect/login")
            expect(page.get_by_role("heading", name="Log in")).to_be_visible()
            shot("login")
            page.get_by_label("Admin token").fill(ADMIN_TOKEN)
            page.get_by_role("button", name="Log in").click()
            expect(page).to_have_url(f"{servers.gateway}/connect")
            expect(page.get_by_text("No nation is connected yet.")).to_be_visible()

            # Connect acme: the form redirects to the nation's consent page; approve.
            page.get_by_label("Nation slug").fill("acme")
            page.get_by_role("button", name="Connect nation").click()
            expect(page).to_have_url(re.compile(re.escape(f"{servers.fake}/acme/oauth/authorize?")))
            page.locator("#approve").click()
            expect(page).to_have_url(f"{servers.gateway}/connect")
            expect(page.get_by_text("Connected acme.")).to_be_visible()
            card = page.locator("#nation-acme")
            expect(card.locator(".badge")).to_have_text("active")
            shot("accounts-active")

            # Connect beta and deny: an explanation and a way to try again.
            page.get_by_label("Nation slug").fill("beta")
            page.get_by_role("button", name="Connect nation").click()
            page.locator("#deny").click()
            expect(page.get_by_role("heading", name="Authorization was declined")).to_be_visible()
            expect(page.get_by_role("button", name="Try again: connect beta")).to_be_visible()
            shot("connect-error")

            # NationBuilder revokes acme; the next proxied request discovers it.
            fake_control(servers, {"action": "revoke", "slug": "acme"})
            fake_control(servers, {"action": "expire_access_tokens"})
            assert proxied_status(servers, "/n/acme/api/v2/signups/me") == 401
            page.goto(f"{servers.gateway}/connect")
            banner = page.get_by_role("alert").filter(has_text="needs re-authorization")
            expect(banner).to_contain_text("1 nation needs re-authorization")
            expect(card.locator(".badge")).to_have_text("needs re-authorization")
            reauthorize = card.get_by_role("button", name="Re-authorize acme")
            expect(reauthorize).to_be_visible()
            shot("needs-reauth")
            page.set_viewport_size({"width": 390, "height": 800})  # a phone
            shot("phone-needs-reauth")
            page.set_viewport_size({"width": 1024, "height": 760})

            # Re-authorize through the consent page: active again.
            reauthorize.click()
            page.locator("#approve").click()
            expect(page.get_by_text("Connected acme.")).to_be_visible()
            expect(card.locator(".badge")).to_have_text("active")
            expect(page.get_by_text("nation needs re-authorization")).to_have_count(0)
            assert proxied_status(servers, "/n/acme/api/v2/signups/me") == 200

            # Refresh now.
            card.get_by_role("button", name="Refresh now").click()
            expect(
                page.get_by_text("Refreshed acme. Its new access token expires in")
            ).to_be_visible()
            shot("refreshed")

            # Disconnect, with confirmation.
            card.get_by_role("link", name="Disconnect…").click()
            expect(page.get_by_role("heading", name="Disconnect acme?")).to_be_visible()
            expect(page.get_by_text("This deletes its tokens.")).to_be_visible()
            shot("disconnect-confirm")
            page.get_by_role("button", name="Disconnect acme").click()
            expect(page.get_by_text("Disconnected acme. Its tokens were deleted.")).to_be_visible()
            expect(page.locator("#nation-acme")).to_have_count(0)

            # Log out.
            page.get_by_role("button", name="Log out").click()
            expect(page.get_by_text("You are logged out.")).to_be_visible()
            page.goto(f"{servers.gateway}/connect")
            expect(page).to_have_url(f"{servers.gateway}/connect/login")
            context.close()
        finally:
            browser.close()

    assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
