"""Shared fixtures: a fake clock, the fake NationBuilder on a real socket, settings with a
fresh key and a temporary database, and a running gateway wired to both.

Every gateway here is the real `create_app` on a real port; tests drive time with
`clock.advance()` and call `gateway.tokens.sync()` / `refresh_due()` themselves (the
background task is off unless a test asks for it).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pgserver import SKIP_REASON, PgServer, find_bin_dir
from prometheus_client import CollectorRegistry

from nbgateway import keys
from nbgateway.accounts import AccountService
from nbgateway.app import create_app
from nbgateway.clock import FakeClock
from nbgateway.config import Settings
from nbgateway.crypto import generate_key
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import EventKind, TokenSet
from nbgateway.redact import Redactor, Secret
from nbgateway.server import REQUEST_HANDLER_OPTIONS
from nbgateway.store import TokenStore
from nbgateway.tokens import TokenManager

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
CLIENT_ID = "fake-client-id"
CLIENT_SECRET = "fake-client-secret"
PUBLIC_URL = "http://gateway.test"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NBGW_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("NBGW_"):
            monkeypatch.delenv(name)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake_nb(clock: FakeClock, aiohttp_server: Any) -> FakeNationBuilder:
    """The fake NationBuilder on 127.0.0.1, sharing the test's clock."""
    fake = FakeNationBuilder(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock.now)
    server: TestServer = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def encryption_key() -> str:
    return generate_key()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def settings_factory(
    tmp_path: Path, fake_nb: FakeNationBuilder, encryption_key: str
) -> SettingsFactory:
    """Settings pointing at the fake, a temporary database and a fresh key."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "encryption_keys": (Secret(encryption_key),),
            "client_id": CLIENT_ID,
            "client_secret": Secret(CLIENT_SECRET),
            "admin_token": Secret(ADMIN_TOKEN),
            "database": tmp_path / "gateway.db",
            "nation_url": f"{fake_nb.base_url}/{{slug}}",
            "public_url": PUBLIC_URL,
            "upstream_timeout": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(settings_factory: SettingsFactory) -> Settings:
    return settings_factory()


@dataclass
class Gateway:
    """A running gateway and handles on its insides for assertions."""

    client: TestClient[web.Request, web.Application]
    app: web.Application
    registry: CollectorRegistry
    redactor: Redactor
    settings: Settings

    @property
    def tokens(self) -> TokenManager:
        return self.app[keys.TOKENS]

    @property
    def store(self) -> TokenStore:
        return self.app[keys.STORE]

    @property
    def accounts(self) -> AccountService:
        return self.app[keys.ACCOUNTS]

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value, 0.0 when the series does not exist yet."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


GatewayFactory = Callable[..., Awaitable[Gateway]]


async def gateway_client(aiohttp_client: Any, app: web.Application) -> TestClient[Any, Any]:
    """A test client for a gateway `app`, served with the request-handler options `serve`
    uses (`server.REQUEST_HANDLER_OPTIONS`)."""
    server = TestServer(app)
    await server.start_server(**REQUEST_HANDLER_OPTIONS)
    client: TestClient[Any, Any] = await aiohttp_client(server)
    return client


@pytest.fixture
async def gateway_factory(
    aiohttp_client: Any, clock: FakeClock, settings_factory: SettingsFactory
) -> GatewayFactory:
    """Start a gateway (real socket) with the test clock; keyword args override settings."""

    async def make(
        settings: Settings | None = None, *, background: bool = False, **overrides: Any
    ) -> Gateway:
        s = settings if settings is not None else settings_factory(**overrides)
        registry = CollectorRegistry()
        redactor = Redactor()
        app = create_app(
            s, clock=clock, registry=registry, redactor=redactor, background=background
        )
        client = await gateway_client(aiohttp_client, app)
        return Gateway(client=client, app=app, registry=registry, redactor=redactor, settings=s)

    return make


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


ConnectAccount = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def connect_account(fake_nb: FakeNationBuilder, clock: FakeClock) -> ConnectAccount:
    """Store a fresh token pair from the fake for `slug` (as a completed /connect would)."""

    async def connect(gw: Gateway, slug: str = "acme") -> dict[str, Any]:
        issued = fake_nb.issue_tokens(slug)
        tokens = TokenSet(
            access_token=Secret(issued["access_token"]),
            refresh_token=Secret(issued["refresh_token"]),
            expires_at=clock.now() + float(issued["expires_in"]),
            scope=issued["scope"],
        )
        await gw.store.save_tokens(slug, tokens, EventKind.CONNECTED)
        await gw.tokens.sync(force=True)
        return issued

    return connect


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# -- PostgreSQL (a server started by the tests themselves; see tests/pgserver.py) ----------


@pytest.fixture(scope="session")
def pg_template() -> Iterator[PgServer]:
    """An initialised, never started cluster that servers are copied from."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    template = PgServer(bin_dir)
    yield template
    template.destroy()


@pytest.fixture(scope="session")
def pg_server(pg_template: PgServer) -> Iterator[PgServer]:
    """One PostgreSQL server for the session (tests that stop a server use `pg_own_server`)."""
    server = PgServer(pg_template.bin_dir, template=pg_template)
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    if not pg_server.running:
        pg_server.start()  # a failed test may have left it stopped
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def pg_own_server(pg_template: PgServer) -> Iterator[PgServer]:
    """A PostgreSQL server of this test's own, free to stop and start."""
    server = PgServer(pg_template.bin_dir, template=pg_template)
    server.start()
    yield server
    server.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """NBGW_DATABASE on each backend in turn: a fresh SQLite file, then a fresh PostgreSQL
    database (skipped with the harness's reason when PostgreSQL is not installed)."""
    if request.param == "sqlite":
        return tmp_path / "gateway.db"
    url: str = request.getfixturevalue("pg_url")
    return url
