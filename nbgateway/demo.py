"""`nbgateway demo`: the gateway against the built-in fake NationBuilder, zero configuration.

Starts the fake on a free loopback port, the gateway on the requested port with a fresh
key and a temporary database, connects the nation `demo` through the real authorization-
code flow (the fake approves automatically), and prints commands to try, among them the
control call that stops the automatic approval so the consent and Deny pages can be seen.
`--self-test` runs those commands itself and exits (used by the tests).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from nbgateway import keys
from nbgateway.app import create_app
from nbgateway.config import Settings
from nbgateway.crypto import generate_key
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.redact import Redactor, Secret
from nbgateway.server import ListenError, run_until_stopped

DEMO_NATION = "demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def demo_settings(database: Path, port: int, nation_url: str, fake: FakeNationBuilder) -> Settings:
    return Settings(
        encryption_keys=(Secret(generate_key()),),
        client_id=fake.client_id,
        client_secret=Secret(fake.client_secret),
        admin_token=Secret(secrets.token_urlsafe(24)),
        host="127.0.0.1",
        port=port,
        database=database,
        nation_url=nation_url,
        default_account=DEMO_NATION,
    )


async def connect_demo_nation(app: web.Application, session: aiohttp.ClientSession) -> str:
    """Run the authorization-code flow end to end, as a browser would."""
    url = await app[keys.ACCOUNTS].start_connect(DEMO_NATION)
    async with session.get(url, allow_redirects=True) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"connecting the demo nation failed: {resp.status} {text}")
    return DEMO_NATION


# The fake's control calls that stop and resume approving authorizations by itself.
APPROVE_OFF = '{"action":"set","auto_approve":false}'
APPROVE_ON = '{"action":"set","auto_approve":true}'


def port_busy_hint(port: int) -> str:
    """What to run instead when `port` is taken: a command this shell can find."""
    other = port + 1 if port < 65535 else 8081
    if shutil.which("nbgateway"):
        return f"try `nbgateway demo --port {other}`"
    # Installed in a virtualenv that is not on PATH (as `make demo` does).
    return (
        f"try `make demo PORT={other}` in the source tree, or "
        f"`{sys.executable} -m nbgateway demo --port {other}`"
    )


def instructions(gateway: str, fake: str, admin_token: str) -> str:
    return f"""
nbgateway demo is running.
  gateway:               {gateway}
  fake NationBuilder:    {fake}   (nation "{DEMO_NATION}", connected via OAuth)
  admin pages:           {gateway}/connect   (admin token: {admin_token})

Try, in another terminal:
  # 1. a plain, unauthenticated request; the gateway adds the bearer token
  curl -sg '{gateway}/api/v2/signups?page[size]=3'
  # 2. the same account, named in the path (links in the answer stay on the gateway)
  curl -sg '{gateway}/n/{DEMO_NATION}/api/v2/signups?page[size]=2'
  # 3. make NationBuilder expire the access token, then ask again: the gateway gets a 401,
  #    refreshes once and retries, and the tool never notices
  curl -s -X POST {fake}/_fake/control -d '{{"action":"expire_access_tokens"}}'
  curl -sg '{gateway}/api/v2/signups?page[size]=1'
  # 4. what happened, as Prometheus sees it
  curl -s {gateway}/metrics | grep -E '^nbgw_(token_refresh_total|upstream_401|proxy_requests)'
  # 5. the nation's rate budget: shrink it to 5 requests per 10 s, send 12 at once; the
  #    gateway paces them (all answer 200, the last ones after the window resets)
  curl -s -X POST {fake}/_fake/control -d '{{"action":"set","rate_limit":5}}'
  seq 12 | xargs -P12 -I{{}} curl -s -o /dev/null -w '%{{http_code}} %{{time_total}}s\\n' \\
    '{gateway}/api/v2/signups/me'
  curl -s {gateway}/metrics | grep -E '^nbgw_(rate_limit|upstream_429)'
  # 6. account status through the admin API
  curl -s -H 'Authorization: Bearer {admin_token}' {gateway}/connect/api/accounts

See the consent page and its Deny button: the fake approves on its own until told not to:
  curl -s -X POST {fake}/_fake/control -d '{APPROVE_OFF}'
  # then open {gateway}/connect, log in with the admin token, and connect a nation
  # (e.g. "demo2"); the fake now asks. '{APPROVE_ON}' turns it back on.

Stop with Ctrl-C.
"""


async def self_test(gateway: str, fake: str, session: aiohttp.ClientSession) -> list[str]:
    """Run the demo's requests; return a list of failures (empty when all worked)."""
    failures: list[str] = []
    async with session.get(f"{gateway}/api/v2/signups?page[size]=3") as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200 or len(body.get("data", [])) != 3:
            failures.append(f"proxied request answered {resp.status}")
    async with session.post(
        f"{fake}/_fake/control", json={"action": "expire_access_tokens"}
    ) as resp:
        await resp.read()
    async with session.get(f"{gateway}/api/v2/signups?page[size]=1") as resp:
        if resp.status != 200:
            failures.append(f"request after forced expiry answered {resp.status}")
    async with session.get(f"{gateway}/metrics") as resp:
        text = await resp.text()
        if 'nbgw_upstream_401_retries_total{account="demo",outcome="recovered"} 1.0' not in text:
            failures.append("the 401 retry was not recorded in /metrics")
        if 'nbgw_token_refresh_total{account="demo",outcome="success"} 1.0' not in text:
            failures.append("the refresh was not recorded in /metrics")
    return failures


async def run_demo(*, port: int, check_only: bool, redactor: Redactor) -> int:
    # NationBuilder v2's budget, so the gateway's pacing can be watched (step 5).
    fake = FakeNationBuilder(auto_approve=True, rate_limit=250, rate_window=10)
    fake_url = await fake.start("127.0.0.1", _free_port())
    if port == 0:
        port = _free_port()
    with tempfile.TemporaryDirectory(prefix="nbgateway-demo-") as tmp:
        settings = demo_settings(Path(tmp) / "demo.db", port, f"{fake_url}/{{slug}}", fake)
        app = create_app(settings, redactor=redactor)
        gateway = f"http://{settings.host}:{port}"
        result = 0

        async def after_start() -> bool:
            nonlocal result
            async with aiohttp.ClientSession() as session:
                await connect_demo_nation(app, session)
                if check_only:
                    failures = await self_test(gateway, fake_url, session)
                    for failure in failures:
                        print(f"demo self-test: {failure}", file=sys.stderr)
                    print("demo self-test: " + ("ok" if not failures else "FAILED"))
                    result = 1 if failures else 0
                    return False
            print(instructions(gateway, fake_url, settings.admin_token.reveal()), flush=True)
            return True

        try:
            await run_until_stopped(app, settings.host, port, after_start=after_start)
        except ListenError as exc:
            print(f"{exc}; {port_busy_hint(port)}", file=sys.stderr)
            return 1
        finally:
            await fake.stop()
        return result
