"""Metric label values stay bounded even under concurrent requests for unknown accounts."""

from __future__ import annotations

import asyncio

from conftest import Gateway

from nbgateway.fakenb import FakeNationBuilder


async def test_concurrent_requests_for_unknown_slugs_add_no_account_series(
    gateway: Gateway, fake_nb: FakeNationBuilder
) -> None:
    """Requests that coalesce on a slug that is not an account never label a metric with it."""
    slugs = [f"ghost-{i}" for i in range(20)]
    responses = await asyncio.gather(
        *(gateway.client.get(f"/n/{slug}/api/v2/signups/me") for slug in slugs for _ in range(5))
    )
    assert {r.status for r in responses} == {404}
    exposition = await (await gateway.client.get("/metrics")).text()
    assert "ghost-" not in exposition
    assert fake_nb.requests == []
