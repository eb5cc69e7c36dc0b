"""The alert webhook: payload, retries, giving up, no secrets, never blocking the caller."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ConnectAccount, GatewayFactory, SettingsFactory, gateway_client
from prometheus_client import CollectorRegistry

from nbgateway import keys
from nbgateway.app import create_app
from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.metrics import Metrics
from nbgateway.notify import EVENT, Notifier, combine
from nbgateway.redact import REDACTED, Redactor

SECRET_PATH = "/hooks/T000-secret-webhook-path"


@dataclass
class Receiver:
    """A local webhook receiver answering with scripted statuses (then 200)."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rec = Receiver()
    app = web.Application()
    app.router.add_post(SECRET_PATH, rec.handle)
    server: TestServer = await aiohttp_server(app)
    rec.url = str(server.make_url(SECRET_PATH))
    return rec


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


NotifierFactory = Callable[..., Notifier]


@pytest.fixture
async def notifier_factory(
    receiver: Receiver, registry: CollectorRegistry, clock: FakeClock
) -> AsyncIterator[NotifierFactory]:
    """Notifiers posting to the receiver with no waits between attempts; closed afterwards."""
    made: list[Notifier] = []

    def make(**overrides: Any) -> Notifier:
        options: dict[str, Any] = {
            "metrics": Metrics(registry),
            "redactor": Redactor(),
            "clock": clock,
            "retry_delays": (0.0, 0.0),
            "shutdown_grace": 0.0,
        }
        options.update(overrides)
        url = options.pop("url", receiver.url)
        notifier = Notifier(url, "https://gateway.example", **options)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        await notifier.close()


def deliveries(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value("nbgw_alert_webhook_deliveries_total", {"outcome": outcome})
    return 0.0 if value is None else value


async def test_payload_is_delivered(
    notifier_factory: NotifierFactory, receiver: Receiver, registry: CollectorRegistry
) -> None:
    """One POST with the event, account, plain reason, /connect URL and time."""
    notifier = notifier_factory()
    await notifier.open()
    notifier.notify("acme", "the token endpoint answered HTTP 400 (invalid_grant)")
    await notifier.drain()
    assert receiver.received == [
        {
            "event": EVENT,
            "account": "acme",
            "reason": "the token endpoint answered HTTP 400 (invalid_grant)",
            "connect_url": "https://gateway.example/connect",
            "at": "2023-11-14T22:13:20+00:00",
        }
    ]
    assert deliveries(registry, "delivered") == 1
    assert deliveries(registry, "retried") == 0


async def test_server_errors_are_retried(
    notifier_factory: NotifierFactory, receiver: Receiver, registry: CollectorRegistry
) -> None:
    """Two 500s then a 200: delivered on the third attempt, two retries counted."""
    receiver.statuses = [500, 500, 200]
    notifier = notifier_factory()
    await notifier.open()
    notifier.notify("acme", "revoked")
    await notifier.drain()
    assert len(receiver.received) == 3
    assert receiver.received[0] == receiver.received[2]
    assert deliveries(registry, "retried") == 2
    assert deliveries(registry, "delivered") == 1
    assert deliveries(registry, "failed") == 0


async def test_gives_up_after_three_attempts(
    notifier_factory: NotifierFactory, receiver: Receiver, registry: CollectorRegistry
) -> None:
    """Three failures in a row: no fourth attempt, counted as failed."""
    receiver.statuses = [503, 503, 503, 503]
    notifier = notifier_factory()
    await notifier.open()
    notifier.notify("acme", "revoked")
    await notifier.drain()
    assert len(receiver.received) == 3
    assert deliveries(registry, "retried") == 2
    assert deliveries(registry, "failed") == 1
    assert deliveries(registry, "delivered") == 0


async def test_client_errors_are_not_retried(
    notifier_factory: NotifierFactory, receiver: Receiver, registry: CollectorRegistry
) -> None:
    """A 404 from the receiver will not change by retrying: one attempt, failed."""
    receiver.statuses = [404]
    notifier = notifier_factory()
    await notifier.open()
    notifier.notify("acme", "revoked")
    await notifier.drain()
    assert len(receiver.received) == 1
    assert deliveries(registry, "failed") == 1


async def test_unreachable_receiver_is_retried_then_given_up(
    notifier_factory: NotifierFactory,
    registry: CollectorRegistry,
    unused_tcp_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Connection failures are retried, then given up, and the URL is never logged."""
    url = f"http://127.0.0.1:{unused_tcp_port}{SECRET_PATH}"
    notifier = notifier_factory(url=url)
    await notifier.open()
    with caplog.at_level(logging.DEBUG, logger="nbgateway.notify"):
        notifier.notify("acme", "revoked")
        await notifier.drain()
    assert deliveries(registry, "retried") == 2
    assert deliveries(registry, "failed") == 1
    logged = " ".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "giving up" in logged
    assert "secret-webhook-path" not in logged


async def test_no_secrets_in_the_payload(
    notifier_factory: NotifierFactory, receiver: Receiver
) -> None:
    """Known secrets and token-shaped text in the reason are redacted before sending."""
    redactor = Redactor(["nbfake-rt-known-refresh-token-value"])
    notifier = notifier_factory(redactor=redactor)
    await notifier.open()
    notifier.notify(
        "acme",
        "rejected nbfake-rt-known-refresh-token-value; body refresh_token=abcdef123456 "
        "Authorization: Bearer eyJhbGciOi.payload.sig",
    )
    await notifier.drain()
    (payload,) = receiver.received
    text = str(payload)
    assert "nbfake-rt-known" not in text
    assert "abcdef123456" not in text
    assert "eyJhbGciOi" not in text
    assert REDACTED in payload["reason"]
    assert redactor.scrub(receiver.url) == REDACTED  # the webhook URL is a secret too


async def test_notify_returns_before_delivery(
    notifier_factory: NotifierFactory, receiver: Receiver, registry: CollectorRegistry
) -> None:
    """notify() only schedules the delivery: it returns while the receiver is still busy."""
    receiver.hold = asyncio.Event()
    notifier = notifier_factory()
    await notifier.open()
    notifier.notify("acme", "revoked")
    assert receiver.received == []  # notify() returned without sending anything
    await asyncio.wait_for(receiver.arrived.wait(), timeout=5)
    assert deliveries(registry, "delivered") == 0
    receiver.hold.set()
    await notifier.drain()
    assert deliveries(registry, "delivered") == 1


async def test_close_cancels_deliveries_in_flight(
    notifier_factory: NotifierFactory, receiver: Receiver, registry: CollectorRegistry
) -> None:
    """Shutting down does not wait forever on a hanging receiver."""
    receiver.hold = asyncio.Event()
    notifier = notifier_factory(shutdown_grace=0.0)
    await notifier.open()
    notifier.notify("acme", "revoked")
    await asyncio.wait_for(receiver.arrived.wait(), timeout=5)
    await notifier.close()
    receiver.hold.set()
    assert deliveries(registry, "delivered") == 0


async def test_without_a_webhook_nothing_is_sent(
    notifier_factory: NotifierFactory, receiver: Receiver
) -> None:
    """With NBGW_ALERT_WEBHOOK unset, notify() does nothing."""
    notifier = notifier_factory(url="")
    await notifier.open()
    assert not notifier.enabled
    notifier.notify("acme", "revoked")
    await notifier.drain()
    assert receiver.received == []


def test_combine_calls_every_listener() -> None:
    """Listeners are combined in order; None entries are skipped."""
    calls: list[tuple[str, str, str]] = []
    both = combine(
        lambda s, r: calls.append(("one", s, r)), None, lambda s, r: calls.append(("two", s, r))
    )
    assert both is not None
    both("acme", "why")
    assert calls == [("one", "acme", "why"), ("two", "acme", "why")]
    assert combine(None, None) is None


async def test_gateway_sends_the_webhook_when_an_account_needs_reauth(
    aiohttp_client: Any,
    settings_factory: SettingsFactory,
    connect_account: ConnectAccount,
    fake_nb: FakeNationBuilder,
    receiver: Receiver,
    clock: FakeClock,
) -> None:
    """A revoked account found on the proxy path alerts the webhook and the given listener."""
    settings = settings_factory(alert_webhook=receiver.url)
    seen: list[tuple[str, str]] = []
    registry = CollectorRegistry()
    app = create_app(
        settings,
        clock=clock,
        registry=registry,
        background=False,
        on_needs_reauth=lambda slug, reason: seen.append((slug, reason)),
    )
    client = await gateway_client(aiohttp_client, app)

    await connect_account(SimpleNamespace(store=app[keys.STORE], tokens=app[keys.TOKENS]), "acme")
    fake_nb.revoke("acme")
    fake_nb.expire_access_tokens("acme")
    resp = await client.get("/n/acme/api/v2/signups/me")
    assert resp.status == 401
    await asyncio.wait_for(receiver.arrived.wait(), timeout=5)
    (payload,) = receiver.received
    assert payload["account"] == "acme"
    assert payload["connect_url"] == "http://gateway.test/connect"
    assert "invalid_grant" in payload["reason"]
    assert [slug for slug, _ in seen] == ["acme"]


async def test_account_already_waiting_at_start_is_not_alerted_again(
    gateway_factory: GatewayFactory,
    connect_account: ConnectAccount,
    settings_factory: SettingsFactory,
    receiver: Receiver,
) -> None:
    """Only the process that marks an account alerts; a restart shows it without a repeat."""
    first = await gateway_factory()
    await connect_account(first, "acme")
    async with first.store.refresh_lock("acme") as locked:
        await locked.mark_needs_reauth("the token endpoint answered HTTP 400 (invalid_grant)")
    second = await gateway_factory(settings_factory(alert_webhook=receiver.url))
    assert second.metric("nbgw_account_needs_reauth", account="acme") == 1
    resp = await second.client.get("/n/acme/api/v2/signups/me")
    assert resp.status == 401
    await asyncio.sleep(0.2)  # give a (wrong) delivery task the chance to run
    assert receiver.received == []
