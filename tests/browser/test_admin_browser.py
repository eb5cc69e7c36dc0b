"""The /connect admin pages in a real Chromium, against real gateway and fake processes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import FakeNB, Processes, gateway_env, http_request, start_fake, start_gateway

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

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is missing (install Debian's chromium: make system-deps)",
    ),
]


@dataclass
class Servers:
    gateway: str
    fake: FakeNB
    processes: Processes


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """The fake NationBuilder (consent page on) and `nbgateway serve`, as subprocesses."""
    processes = Processes(tmp_path)
    try:
        fake = start_fake(processes)
        env = gateway_env(tmp_path / "gateway.db", ADMIN_TOKEN, fake.url)
        gateway_url = start_gateway(processes, env, public=True)
        yield Servers(gateway_url, fake, processes)
    finally:
        processes.stop_all()


def proxied_status(servers: Servers, path: str) -> int:
    return http_request("GET", f"{servers.gateway}{path}")[0]


def test_admin_pages_in_chromium(servers: Servers, tmp_path: Path) -> None:
    """Log in, connect (approve and deny), see needs-reauth, re-authorize, refresh, disconnect."""
    with servers.processes.explained():  # the gateway's and the fake's logs explain failures
        admin_flow(servers, tmp_path)


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
            expect(page).to_have_url(
                re.compile(re.escape(f"{servers.fake.url}/acme/oauth/authorize?"))
            )
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
            servers.fake.control(action="revoke", slug="acme")
            servers.fake.control(action="expire_access_tokens")
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
