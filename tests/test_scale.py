"""Per-account refresh coordination at scale: no lock across accounts (issue: scale out).

Many nations expiring together refresh concurrently, and a nation whose token endpoint
hangs holds up nobody else: not another nation's refresh, not a connect, not the admin
list, on either store backend. Concurrency is asserted on what the fake NationBuilder saw
(overlapping token calls, completion order), never on wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import ConnectAccount, Gateway, GatewayFactory
from yarl import URL

from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder

NATIONS = 100
LIFETIME = 86400.0


async def fetch(client: TestClient[Any, Any], slug: str) -> int:
    resp = await client.get(f"/n/{slug}/api/v2/signups/me")
    await resp.read()
    return resp.status


class TestManyNations:
    async def test_expiring_together_refresh_concurrently(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        any_database: Path | str,
    ) -> None:
        """100 nations whose tokens expire at once, token endpoint answering in 0.2 s: one
        request each, all answered 200, one token call per nation, and the calls overlap
        (serialised refreshes would never have more than one pending at a time)."""
        gateway = await gateway_factory(database=any_database)
        slugs = [f"nation-{n:03d}" for n in range(NATIONS)]
        for slug in slugs:
            await connect_account(gateway, slug)
        clock.advance(LIFETIME + 1)
        fake_nb.token_delay = 0.2
        fake_nb.clear_recordings()

        fake_nb.peak_pending_tokens = 0
        statuses = await asyncio.gather(*(fetch(gateway.client, s) for s in slugs))
        peak = fake_nb.peak_pending_tokens

        assert statuses == [200] * NATIONS
        refreshed = sorted(r.params()["refresh_token"] for r in fake_nb.token_requests)
        assert len(refreshed) == NATIONS == len(set(refreshed))
        # Refreshes run one at a time behind a global lock would never overlap at all.
        assert peak >= NATIONS // 10, f"only {peak} token calls overlapped"


class TestHungNation:
    async def test_one_hung_token_endpoint_blocks_no_other_nation(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        clock: FakeClock,
        admin_headers: dict[str, str],
        any_database: Path | str,
    ) -> None:
        """While nation A's token call hangs (until NBGW_TOKEN_TIMEOUT), nation B's refresh,
        connecting nation C and the admin list all complete; A then gets 503."""
        gateway: Gateway = await gateway_factory(database=any_database, token_timeout=5.0)
        await connect_account(gateway, "alpha")
        await connect_account(gateway, "bravo")
        clock.advance(LIFETIME + 1)
        fake_nb.clear_recordings()

        fake_nb.fail_token("hang")  # the next token call, alpha's, never answers
        hung = asyncio.create_task(fetch(gateway.client, "alpha"))
        await fake_nb.wait_for_pending_tokens(1)  # alpha's call reached the fake and hangs

        assert await fetch(gateway.client, "bravo") == 200

        fake_nb.auto_approve = True
        started = await gateway.client.post(
            "/connect/api/accounts", json={"nation": "charlie"}, headers=admin_headers
        )
        assert started.status == 201
        authorize_url = (await started.json())["authorize_url"]
        async with gateway.client.session.get(authorize_url, allow_redirects=False) as page:
            assert page.status == 302
            callback = URL(page.headers["Location"])
        done = await gateway.client.get(callback.path_qs)
        assert done.status == 200

        listing = await gateway.client.get("/connect/api/accounts", headers=admin_headers)
        assert listing.status == 200
        slugs = {a["slug"] for a in (await listing.json())["accounts"]}
        assert slugs == {"alpha", "bravo", "charlie"}

        assert not hung.done(), "alpha's request should still be waiting for its hung call"
        assert await hung == 503
        assert gateway.metric("nbgw_token_refresh_total", account="alpha", outcome="timeout") == 1.0
