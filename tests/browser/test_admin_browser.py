"""The /connect admin pages in a real Chromium, against real gateway and fake processes."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from procs import (
    FakeNB,
    Processes,
    gateway_env,
    http_request,
    open_store,
    start_fake,
    start_gateway,
    token_set,
)

from nbgateway.models import EventKind

CHROMIUM = "/usr/bin/chromium"
# The elements reaching past the viewport's right edge (outside any scrolling box).
WIDER_THAN_VIEW = """
[...document.querySelectorAll("body *")]
  .filter(e => e.getBoundingClientRect().right > window.innerWidth
    && !e.closest(".table-wrap"))
  .slice(0, 5)
  .map(e => e.tagName + "." + e.className + " " + Math.round(e.getBoundingClientRect().right))
"""
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
    env: dict[str, str]


def screenshot_dir(tmp_path: Path) -> Path:
    """Where screenshots go: $ADMIN_SCREENSHOTS when set (docs/screenshots is made that
    way: ADMIN_SCREENSHOTS=docs/screenshots), else the test's temporary directory."""
    shots = Path(os.environ.get("ADMIN_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    return shots


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """The fake NationBuilder (consent page on) and `nbgateway serve`, as subprocesses."""
    processes = Processes(tmp_path)
    try:
        fake = start_fake(processes)
        env = gateway_env(tmp_path / "gateway.db", ADMIN_TOKEN, fake.url)
        gateway_url = start_gateway(processes, env, public=True)
        yield Servers(gateway_url, fake, processes, env)
    finally:
        processes.stop_all()


def proxied_status(servers: Servers, path: str) -> int:
    return http_request("GET", f"{servers.gateway}{path}")[0]


def test_admin_pages_in_chromium(servers: Servers, tmp_path: Path) -> None:
    """Log in, connect (approve and deny), see needs-reauth, re-authorize, refresh, disconnect."""
    with servers.processes.explained():  # the gateway's and the fake's logs explain failures
        admin_flow(servers, tmp_path)


async def seed_nations(servers: Servers, count: int) -> list[str]:
    """`count` connected nations in the gateway's database (tokens issued by the fake):
    nation-17 and nation-42 need re-authorization, nation-33's last refresh failed."""
    slugs = [f"nation-{n:02d}" for n in range(1, count + 1)]
    async with open_store(servers.env) as store:
        await store.ping()
        for slug in slugs:
            await store.save_tokens(
                slug, token_set(servers.fake.issue_tokens(slug)), EventKind.CONNECTED
            )
        for slug in ("nation-17", "nation-42"):
            async with store.refresh_lock(slug) as locked:
                await locked.mark_needs_reauth(
                    "the token endpoint answered HTTP 400 (invalid_grant)"
                )
        async with store.refresh_lock("nation-33") as locked:
            await locked.record_failure("the token endpoint answered HTTP 502")
    return slugs


def login(page: Any, gateway: str) -> None:
    page.goto(f"{gateway}/connect/login")
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Log in").click()


def test_fifty_nations_and_client_keys_in_chromium(servers: Servers, tmp_path: Path) -> None:
    """With 50 nations: needs-reauth first, then the failing one; search narrows the table;
    a nation's page has its actions, events and audit trail; a client key is shown once
    (not after reload or back) and can be removed."""
    slugs = asyncio.run(seed_nations(servers, 50))
    # A write through the gateway, for nation-05's audit trail and rate-limit reading.
    servers.fake.control(action="set", rate_limit=100)
    status = http_request(
        "POST", f"{servers.gateway}/n/nation-05/api/v2/signups", body={"data": {}}
    )[0]
    assert status < 500
    assert http_request("GET", f"{servers.gateway}/n/nation-05/api/v2/signups/me")[0] == 200
    with servers.processes.explained():
        many_nations_flow(servers, tmp_path, slugs)


def many_nations_flow(servers: Servers, tmp_path: Path, slugs: list[str]) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    shots = screenshot_dir(tmp_path)
    gw = servers.gateway
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            page = context.new_page()
            login(page, gw)
            rows = page.locator("table.nations tbody tr")
            expect(rows).to_have_count(50)
            order = [row.get_attribute("id") for row in rows.all()]
            assert order[:3] == ["nation-nation-17", "nation-nation-42", "nation-nation-33"]
            first = ["nation-17", "nation-42", "nation-33"]
            assert order[3:] == [f"nation-{s}" for s in slugs if s not in first]
            expect(rows.nth(0).locator(".badge")).to_have_text("needs re-authorization")
            expect(rows.nth(2).locator(".badge")).to_have_text("refresh failing")
            expect(page.get_by_role("heading", name="50 nations")).to_be_visible()
            expect(page.get_by_role("alert")).to_contain_text("2 nations need re-authorization")
            page.screenshot(path=str(shots / "nations-50.png"), full_page=True)

            # Search (a plain GET form).
            page.get_by_label("Search nations").fill("nation-4")
            page.get_by_role("button", name="Search").click()
            expect(page).to_have_url(f"{gw}/connect?q=nation-4")
            expect(rows).to_have_count(10)  # nation-40 ... nation-49
            expect(rows.nth(0)).to_have_attribute("id", "nation-nation-42")
            page.get_by_label("Search nations").fill("no-such")
            page.get_by_role("button", name="Search").click()
            expect(page.get_by_text("No nation matches “no-such”.")).to_be_visible()
            page.get_by_role("link", name="Show all").click()
            expect(rows).to_have_count(50)

            # A nation's page: actions, events, audit trail.
            page.get_by_role("link", name="nation-05", exact=True).click()
            expect(page).to_have_url(f"{gw}/connect/nations/nation-05")
            expect(page.get_by_role("heading", name="nation-05")).to_be_visible()
            for button in ("Refresh now", "Re-authorize"):
                expect(page.get_by_role("button", name=button, exact=True)).to_be_visible()
            expect(page.get_by_role("link", name="Disconnect…")).to_be_visible()
            expect(page.locator("table.events")).to_contain_text("connected")
            audit = page.locator("table.audit tbody tr")
            expect(audit).to_have_count(1, timeout=10_000)  # written within about a second
            expect(audit.first).to_contain_text("POST /api/v2/signups")
            expect(page.locator("dl.facts")).to_contain_text(re.compile(r"\d+ of 100 left"))
            page.screenshot(path=str(shots / "nation-page.png"), full_page=True)
            page.goto(f"{gw}/connect/nations/nation-42")
            expect(
                page.locator("#nation-nation-42").get_by_role(
                    "button", name="Re-authorize nation-42"
                )
            ).to_be_visible()

            # Client keys: create, shown once.
            page.get_by_role("link", name="Client keys").click()
            expect(page.get_by_text("No client key exists yet.")).to_be_visible()
            page.get_by_label("Name", exact=True).fill("print-server")
            page.get_by_label("Nations", exact=True).fill("nation-05, nation-06")
            page.get_by_label("Read-only").check()
            page.get_by_role("button", name="Create key").click()
            key_field = page.get_by_label("Key", exact=True)
            key = key_field.input_value()
            assert re.fullmatch(r"nbgw_[A-Za-z0-9_-]{43}", key), key
            expect(page.get_by_text("it is shown only this once")).to_be_visible()
            assert all(key not in c["value"] for c in context.cookies())
            assert key not in page.url
            table = page.locator("table.clients tbody tr")
            expect(table).to_have_count(1)
            expect(table.first).to_contain_text("nation-05, nation-06")
            expect(table.first).to_contain_text("read-only")
            page.screenshot(path=str(shots / "clients.png"), full_page=True)
            # The key opens its nation, read-only.
            assert (
                http_request(
                    "GET", f"{gw}/n/nation-05/api/v2/signups/me", headers={"X-NBGW-Key": key}
                )[0]
                == 200
            )

            # Reload re-posts the form: refused (the name exists), no key on the page.
            shown = page.locator(f'input[value="{key}"]')
            page.reload()
            expect(page.get_by_text("already exists")).to_be_visible()
            expect(shown).to_have_count(0)
            expect(page.locator("body")).not_to_contain_text(key)
            # Away and back: the browser keeps no copy (Cache-Control: no-store).
            page.goto(f"{gw}/connect")
            try:
                page.go_back()
            except PlaywrightError as exc:  # Chromium refuses to show an uncached POST answer
                assert "ERR_CACHE_MISS" in str(exc), exc
            expect(shown).to_have_count(0)
            expect(page.locator("body")).not_to_contain_text(key)
            page.goto(f"{gw}/connect/clients")
            expect(shown).to_have_count(0)
            expect(page.locator("body")).not_to_contain_text(key)

            # Remove, with confirmation.
            page.get_by_role("link", name="Remove…").click()
            expect(
                page.get_by_role("heading", name="Remove the client key print-server?")
            ).to_be_visible()
            page.get_by_role("button", name="Remove print-server").click()
            expect(page).to_have_url(f"{gw}/connect/clients")
            expect(
                page.get_by_text("Removed the client key print-server. It no longer works.")
            ).to_be_visible()
            expect(page.get_by_text("No client key exists yet.")).to_be_visible()
            context.close()
        finally:
            browser.close()


def admin_flow(servers: Servers, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = screenshot_dir(tmp_path)
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
            nation_page = f"{servers.gateway}/connect/nations/acme"
            expect(page).to_have_url(nation_page)
            expect(page.get_by_text("Connected acme.")).to_be_visible()
            card = page.locator("#nation-acme")
            expect(card.locator(".badge")).to_have_text("active")
            page.get_by_role("navigation").get_by_role("link", name="Nations").click()
            expect(page.locator("table.nations tbody tr")).to_have_count(1)
            expect(card.locator(".badge")).to_have_text("active")
            shot("nations-1")

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
            card.get_by_role("link", name="acme").click()
            expect(page).to_have_url(nation_page)
            reauthorize = card.get_by_role("button", name="Re-authorize acme")
            expect(reauthorize).to_be_visible()
            shot("needs-reauth")
            for width in (390, 320):  # phones: nothing scrolls sideways, Log out is in view
                page.set_viewport_size({"width": width, "height": 800})
                for name, url in (
                    ("nation", nation_page),
                    ("nations", f"{servers.gateway}/connect"),
                ):
                    page.goto(url)
                    shot(
                        "phone-needs-reauth"
                        if (width, name) == (390, "nation")
                        else f"phone-{width}-{name}"
                    )
                    wide = page.evaluate("document.documentElement.scrollWidth")
                    beyond = page.evaluate(WIDER_THAN_VIEW)
                    assert wide <= width, f"{url} is {wide} px wide at {width} px: {beyond}"
                    box = page.get_by_role("button", name="Log out").bounding_box()
                    assert box is not None and box["x"] + box["width"] <= width, (url, width)
            page.set_viewport_size({"width": 1024, "height": 760})
            page.goto(nation_page)

            # Re-authorize through the consent page: active again.
            reauthorize.click()
            page.locator("#approve").click()
            expect(page).to_have_url(nation_page)
            expect(page.get_by_text("Re-authorized acme.")).to_be_visible()
            expect(card.get_by_text("Re-authorized", exact=True)).to_be_visible()
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


LONGEST_SLUG = "a" + "b" * 61 + "c"  # 63 characters, the most a slug may have


async def seed_long_slug(servers: Servers) -> None:
    """One nation with the longest slug, needing re-authorization (the widest pages)."""
    async with open_store(servers.env) as store:
        await store.save_tokens(
            LONGEST_SLUG, token_set(servers.fake.issue_tokens(LONGEST_SLUG)), EventKind.CONNECTED
        )
        async with store.refresh_lock(LONGEST_SLUG) as locked:
            await locked.mark_needs_reauth("the token endpoint answered HTTP 400 (invalid_grant)")


def test_the_longest_slug_fits_a_phone(servers: Servers, tmp_path: Path) -> None:
    """At 390 and 320 px, the nations list, the nation's page and its disconnect page of a
    63-character slug needing re-authorization do not scroll sideways (the tables scroll in
    their own boxes), and Log out stays in view."""
    from playwright.sync_api import sync_playwright

    asyncio.run(seed_long_slug(servers))
    gw = servers.gateway
    shots = screenshot_dir(tmp_path)
    with servers.processes.explained(), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 390, "height": 800}).new_page()
            login(page, gw)
            for width in (390, 320):
                page.set_viewport_size({"width": width, "height": 800})
                for name, url in (
                    ("nations", f"{gw}/connect"),
                    ("nation", f"{gw}/connect/nations/{LONGEST_SLUG}"),
                    ("disconnect", f"{gw}/connect/accounts/{LONGEST_SLUG}/disconnect"),
                ):
                    page.goto(url)
                    page.screenshot(
                        path=str(shots / f"long-slug-{width}-{name}.png"), full_page=True
                    )
                    wide = page.evaluate("document.documentElement.scrollWidth")
                    beyond = page.evaluate(WIDER_THAN_VIEW)
                    assert wide <= width, f"{name} is {wide} px wide at {width} px: {beyond}"
                    box = page.get_by_role("button", name="Log out").bounding_box()
                    assert box is not None and box["x"] + box["width"] <= width, (name, width)
        finally:
            browser.close()


# A page upstream might answer with (an HTML error page of something in front of
# NationBuilder): its script tries to use the admin pages on the gateway's origin.
HOSTILE_PAGE = """<!doctype html><title>upstream</title><body><script>
document.title = "script ran";
fetch("/connect/nations/victim").then(r => r.text()).then(page => {
  const csrf = page.match(/name="csrf" value="([^"]+)"/);
  return fetch("/connect/accounts/victim/disconnect", {method: "POST",
    headers: {"Content-Type": "application/x-www-form-urlencoded"},
    body: "csrf=" + encodeURIComponent(csrf ? csrf[1] : "")});
});
</script></body>"""


def test_a_proxied_html_answer_cannot_use_the_admin_pages(servers: Servers) -> None:
    """An HTML answer passed through the proxy, opened by a logged-in admin, runs no script
    (it is sandboxed: Content-Security-Policy: sandbox), so it cannot read a /connect page
    and post its form from the gateway's origin."""
    from playwright.sync_api import sync_playwright

    async def seed() -> None:
        async with open_store(servers.env) as store:
            await store.save_tokens(
                "victim", token_set(servers.fake.issue_tokens("victim")), EventKind.CONNECTED
            )

    asyncio.run(seed())
    servers.fake.control(
        action="canned",
        status=200,
        headers=[["Content-Type", "text/html; charset=utf-8"]],
        body=HOSTILE_PAGE,
    )
    gw = servers.gateway
    with servers.processes.explained(), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context().new_page()
            login(page, gw)
            page.goto(f"{gw}/n/victim/api/_test/canned")
            page.wait_for_timeout(1500)  # what the script would have needed for both fetches
            assert page.title() == "upstream"  # the page itself is shown, its script not run
        finally:
            browser.close()

    async def still_there() -> bool:
        async with open_store(servers.env) as store:
            return any(a.slug == "victim" for a in await store.list_accounts())

    assert asyncio.run(still_there())
