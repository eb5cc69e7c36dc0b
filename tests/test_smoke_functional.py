"""The happy path through every layer: connect, proxy, expire, refresh, retry."""

from __future__ import annotations

from conftest import ConnectAccount, Gateway

from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder


async def test_proxied_request_carries_the_stored_token(
    gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder
) -> None:
    """An unauthenticated /api request reaches NationBuilder with the account's bearer token."""
    issued = await connect_account(gateway, "acme")
    resp = await gateway.client.get("/api/v2/signups?page[size]=2")
    assert resp.status == 200
    body = await resp.json(content_type=None)
    assert len(body["data"]) == 2
    seen = fake_nb.api_requests[-1]
    assert seen.headers["Authorization"] == f"Bearer {issued['access_token']}"
    assert (
        gateway.metric("nbgw_proxy_requests_total", account="acme", method="GET", code="200") == 1
    )


async def test_expired_token_is_refreshed_before_use(
    gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder, clock: FakeClock
) -> None:
    """Past expiry minus the margin, the next request refreshes once and uses the new token."""
    issued = await connect_account(gateway, "acme")
    clock.advance(86400 - 100)
    resp = await gateway.client.get("/api/v2/signups/me")
    assert resp.status == 200
    assert len(fake_nb.token_requests) == 1
    assert fake_nb.api_requests[-1].headers["Authorization"] != f"Bearer {issued['access_token']}"
    assert gateway.metric("nbgw_token_refresh_total", account="acme", outcome="success") == 1


async def test_upstream_401_triggers_one_refresh_and_one_retry(
    gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder
) -> None:
    """A token NationBuilder expired early is refreshed and the request retried once."""
    await connect_account(gateway, "acme")
    fake_nb.expire_access_tokens("acme")
    resp = await gateway.client.get("/api/v2/signups/me")
    assert resp.status == 200
    assert len(fake_nb.token_requests) == 1
    assert len(fake_nb.api_requests) == 2
    assert (
        gateway.metric("nbgw_upstream_401_retries_total", account="acme", outcome="recovered") == 1
    )


async def test_readyz_reports_health_without_details(gateway: Gateway) -> None:
    """/readyz is 200 while the store answers, and 503 without paths or key ids when not."""
    assert (await gateway.client.get("/readyz")).status == 200
    await gateway.store.close()
    resp = await gateway.client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "unavailable"
    assert body["detail"] == "the database or the key cannot be used"  # details go to the log
