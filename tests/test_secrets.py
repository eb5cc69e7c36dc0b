"""The secrets canary: recognisable secrets never leave the gateway in logs, bodies or metrics.

Plants a client secret, an admin token, the encryption key and the fake NationBuilder's
tokens (every one starts with `nbfake-`), runs every flow that handles them (connect,
proxying, refresh by expiry and by upstream 401, token-endpoint errors that echo secrets,
needs-reauth, the admin API) with all logging captured, then searches every output.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import CLIENT_ID, Gateway, SettingsFactory, gateway_client
from prometheus_client import CollectorRegistry
from yarl import URL

from nbgateway.app import create_app
from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.log import RedactingFormatter, configure_logging
from nbgateway.models import AccountStatus, EventKind, TokenSet
from nbgateway.redact import REDACTED, Redactor, Secret

CANARY_CLIENT_SECRET = "canary-client-secret-XYZ123"
CANARY_ADMIN_TOKEN = "canary-admin-token-XYZ1234567"
API = "/connect/api/accounts"


# ---------------------------------------------------------------------- fixtures


@dataclass
class IssuedTokens:
    """Every token value the fake handed out, seen at its token endpoint or issue_tokens()."""

    values: set[str] = field(default_factory=set)

    def add_response(self, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(doc, dict):
            for name in ("access_token", "refresh_token"):
                if isinstance(doc.get(name), str):
                    self.values.add(doc[name])


@pytest.fixture
def issued() -> IssuedTokens:
    return IssuedTokens()


@pytest.fixture
async def fake_nb(clock: FakeClock, aiohttp_server: Any, issued: IssuedTokens) -> FakeNationBuilder:
    """The conftest fake, but its app's client secret is the canary, and issued tokens are kept."""
    fake = FakeNationBuilder(
        client_id=CLIENT_ID, client_secret=CANARY_CLIENT_SECRET, clock=clock.now
    )

    async def keep_token_responses(request: web.Request, response: web.StreamResponse) -> None:
        if request.match_info.route.name == "token" and isinstance(response, web.Response):
            body = response.body
            if isinstance(body, bytes):
                issued.add_response(body)

    fake.app.on_response_prepare.append(keep_token_responses)
    server: TestServer = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


LoggingInstaller = Callable[[Redactor, str], io.StringIO]


@pytest.fixture
def capture_logs() -> Iterator[LoggingInstaller]:
    """configure_logging() into a buffer; the process-wide logging state is restored after."""
    loggers = [logging.getLogger(name) for name in ("nbgateway", "aiohttp")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    access = logging.getLogger("aiohttp.access")
    access_disabled = access.disabled
    handlers: list[logging.Handler] = []

    def install(redactor: Redactor, fmt: str) -> io.StringIO:
        buf = io.StringIO()
        handlers.append(configure_logging(redactor, fmt=fmt, level="DEBUG", stream=buf))
        return buf

    yield install
    for lg, old_handlers, level, propagate in saved:
        for handler in handlers:
            lg.removeHandler(handler)
        lg.handlers[:] = old_handlers
        lg.setLevel(level)
        lg.propagate = propagate
    access.disabled = access_disabled


@dataclass
class Recorder:
    """Every response the gateway gave in a test: status, headers and body text."""

    gateway: Gateway
    seen: list[tuple[str, int, str]] = field(default_factory=list)

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, str, Any]:
        resp = await self.gateway.client.request(method, path, allow_redirects=False, **kwargs)
        text = await resp.text()
        headers = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        self.seen.append((f"{method} {path}", resp.status, f"{headers}\n\n{text}"))
        return resp.status, text, resp


GatewayStarter = Callable[[Redactor], Awaitable[Gateway]]


@pytest.fixture
def start_gateway(
    aiohttp_client: Any, settings_factory: SettingsFactory, clock: FakeClock
) -> GatewayStarter:
    """Start a gateway with the canary client secret and admin token, logging through the
    redactor it is given."""

    async def start(redactor: Redactor) -> Gateway:
        settings = settings_factory(
            client_secret=Secret(CANARY_CLIENT_SECRET), admin_token=Secret(CANARY_ADMIN_TOKEN)
        )
        registry = CollectorRegistry()
        app = create_app(
            settings, clock=clock, registry=registry, redactor=redactor, background=False
        )
        client = await gateway_client(aiohttp_client, app)
        return Gateway(
            client=client, app=app, registry=registry, redactor=redactor, settings=settings
        )

    return start


async def store_pair(gw: Gateway, pair: dict[str, Any], clock: FakeClock) -> None:
    """Store the fake's `pair` for acme, valid for a day, as a completed /connect would."""
    await gw.store.save_tokens(
        "acme",
        TokenSet(
            access_token=Secret(pair["access_token"]),
            refresh_token=Secret(pair["refresh_token"]),
            expires_at=clock.now() + 86400,
            scope="default",
        ),
        EventKind.CONNECTED,
    )


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = values.get("action", "")
        elif tag == "input" and values.get("type") == "hidden":
            self.fields[values["name"]] = values.get("value", "")


async def connect_through_oauth(
    rec: Recorder, fake_nb: FakeNationBuilder, decision: str = "approve", slug: str = "acme"
) -> tuple[int, str]:
    """The admin API's connect flow, consent on the fake, then the callback on the gateway."""
    admin = {"Authorization": f"Bearer {CANARY_ADMIN_TOKEN}"}
    status, text, _ = await rec.call("POST", API, json={"nation": slug}, headers=admin)
    assert status == 201, text
    authorize_url = json.loads(text)["authorize_url"]
    async with aiohttp.ClientSession() as browser:
        async with browser.get(authorize_url) as page:
            form = _Form()
            form.feed(await page.text())
        async with browser.post(
            f"{fake_nb.base_url}{form.action}",
            data={**form.fields, "decision": decision},
            allow_redirects=False,
        ) as answer:
            location = URL(answer.headers["Location"])
    status, text, _ = await rec.call("GET", location.raw_path_qs)
    return status, text


def planted_values(
    encryption_key: str, fake_nb: FakeNationBuilder, issued: IssuedTokens
) -> dict[str, str]:
    """name -> value of every secret that must not appear anywhere."""
    values = {
        "client secret": CANARY_CLIENT_SECRET,
        "admin token": CANARY_ADMIN_TOKEN,
        "encryption key": encryption_key,
    }
    seen = set(issued.values)
    for record in fake_nb.token_requests:
        params = record.params()
        for name in ("refresh_token", "code", "code_verifier"):
            if params.get(name):
                seen.add(params[name])
    for record in fake_nb.api_requests:
        auth = record.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            seen.add(auth.removeprefix("Bearer "))
    for index, value in enumerate(sorted(seen)):
        values[f"token #{index} ({value[:10]}...)"] = value
    return values


def leaks(text: str, planted: dict[str, str]) -> list[str]:
    found = [name for name, value in planted.items() if value in text]
    # Any issued token value at all, whether or not this test collected it.
    found += re.findall(r"nbfake-(?:at|rt)-[A-Za-z0-9_\-]{8,}", text)
    return found


# ---------------------------------------------------------------------- the canary


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_no_secret_reaches_logs_bodies_metrics_or_the_store(
    fmt: str,
    start_gateway: GatewayStarter,
    clock: FakeClock,
    fake_nb: FakeNationBuilder,
    encryption_key: str,
    issued: IssuedTokens,
    capture_logs: LoggingInstaller,
) -> None:
    """Every flow that handles a secret runs; no planted value shows up in any output."""
    redactor = Redactor()
    logs = capture_logs(redactor, fmt)
    gw = await start_gateway(redactor)
    rec = Recorder(gw)
    admin = {"Authorization": f"Bearer {CANARY_ADMIN_TOKEN}"}

    # Connect through the real authorization-code flow; a declined and a forged one too.
    assert (await connect_through_oauth(rec, fake_nb))[0] == 200
    assert (await connect_through_oauth(rec, fake_nb, decision="deny"))[0] == 400
    await rec.call("GET", "/connect/callback", params={"code": "stolen", "state": "forged"})

    # Proxied requests, one carrying the client's own credentials that must be dropped.
    current = await gw.store.get_account("acme")
    assert current is not None and current.access_token is not None
    assert (await rec.call("GET", "/api/v2/signups?page[size]=2"))[0] == 200
    status, _, _ = await rec.call(
        "GET",
        f"/n/acme/api/v2/signups/me?access_token={current.access_token.reveal()}",
        headers={"Authorization": f"Bearer {CANARY_ADMIN_TOKEN}"},
    )
    assert status == 200
    created = {"data": {"type": "signups", "attributes": {"email": "canary@example.org"}}}
    assert (await rec.call("POST", "/n/acme/api/v2/signups", json=created))[0] == 201

    # Refresh because the token is due, then because NationBuilder answers 401.
    clock.advance(86400 - 100)
    assert (await rec.call("GET", "/api/v2/signups/me"))[0] == 200
    fake_nb.expire_access_tokens("acme")
    assert (await rec.call("GET", "/api/v2/signups/me"))[0] == 200

    # The admin API: listing, refresh, a wrong token.
    assert (await rec.call("GET", API, headers=admin))[0] == 200
    assert (await rec.call("POST", f"{API}/acme/refresh", headers=admin))[0] == 200
    wrong = {"Authorization": f"Bearer {CANARY_ADMIN_TOKEN}-nope"}
    assert (await rec.call("GET", API, headers=wrong))[0] == 401

    # Token-endpoint errors that echo client_secret and refresh_token back.
    fake_nb.fail_token("invalid_client")
    assert (await rec.call("POST", f"{API}/acme/refresh", headers=admin))[0] == 503
    fake_nb.fail_token("malformed")
    assert (await rec.call("POST", f"{API}/acme/refresh", headers=admin))[0] == 503
    fake_nb.fail_token("invalid_grant")
    assert (await rec.call("POST", f"{API}/acme/refresh", headers=admin))[0] == 401
    assert (await gw.accounts.get("acme")).status is AccountStatus.NEEDS_REAUTH
    assert (await rec.call("GET", "/n/acme/api/v2/signups/me"))[0] == 401

    # A code exchange rejected with the request (code, verifier, secret) echoed back.
    fake_nb.fail_token("invalid_grant")
    assert (await connect_through_oauth(rec, fake_nb))[0] == 400
    # A second account, then a transient outage on the proxy path.
    assert (await connect_through_oauth(rec, fake_nb, slug="beta"))[0] == 200
    clock.advance(86400)
    fake_nb.fail_token("server_error")
    assert (await rec.call("GET", "/n/beta/api/v2/signups/me"))[0] == 503

    for path in ("/metrics", "/healthz", "/readyz"):
        await rec.call("GET", path)
    listing = (await rec.call("GET", API, headers=admin))[1]

    planted = planted_values(encryption_key, fake_nb, issued)
    assert len(planted) > 10  # secrets, several token generations, codes and verifiers
    assert any(v.startswith("nbfake-rt-") for v in planted.values())

    log_text = logs.getvalue()
    assert "GET /api/v2/signups/me" in log_text  # the access log was captured
    assert leaks(log_text, planted) == []
    for what, status, body in rec.seen:
        assert leaks(body, planted) == [], f"{what} answered {status} with a secret"
    assert leaks(listing, planted) == []
    for event in await gw.store.events(None, limit=1000):
        assert leaks(event.detail, planted) == [], event
    for info in await gw.accounts.list_accounts():
        assert leaks(info.last_error or "", planted) == [], info
    beta = await gw.accounts.get("beta")
    assert beta.last_error  # the outage was recorded, in words without secrets

    if fmt == "json":
        docs = [json.loads(line) for line in log_text.splitlines() if line.strip()]
        access = [d for d in docs if d["logger"] == "nbgateway.access"]
        assert access and all(d.get("request_id") for d in access)
        _, _, resp = await rec.call("GET", "/healthz", headers={"X-Request-ID": "canary-req-1"})
        assert resp.headers["X-Request-ID"] == "canary-req-1"
        tail = [json.loads(line) for line in logs.getvalue().splitlines()[len(docs) :]]
        assert any(d.get("request_id") == "canary-req-1" for d in tail)
    else:
        access_lines = [line for line in log_text.splitlines() if "nbgateway.access" in line]
        assert access_lines and all("request_id=" in line for line in access_lines)


# ---------------------------------------------------------------------- the redactor's memory


async def test_a_token_logged_by_mistake_is_scrubbed_once_stored(
    start_gateway: GatewayStarter,
    clock: FakeClock,
    fake_nb: FakeNationBuilder,
    capture_logs: LoggingInstaller,
) -> None:
    """The store tells the redactor every token it writes, so a stray log call is scrubbed."""
    redactor = Redactor()
    logs = capture_logs(redactor, "text")
    gw = await start_gateway(redactor)
    pair = fake_nb.issue_tokens("acme")
    stray = logging.getLogger("nbgateway.test")

    stray.info("before %s", pair["access_token"][len("nbfake-at-") :])
    assert pair["access_token"][len("nbfake-at-") :] in logs.getvalue()  # not known yet

    await store_pair(gw, pair, clock)
    stray.info("oops %s", pair["access_token"])
    stray.warning("oops again %r", {"token": pair["refresh_token"]})
    text = logs.getvalue()
    assert pair["access_token"] not in text
    assert pair["refresh_token"] not in text
    assert text.count(REDACTED) >= 2


async def test_a_token_read_from_the_database_is_scrubbed(
    start_gateway: GatewayStarter,
    clock: FakeClock,
    fake_nb: FakeNationBuilder,
    capture_logs: LoggingInstaller,
) -> None:
    """A second process learns a token by decrypting it, and from then on scrubs it."""
    writer = await start_gateway(Redactor())
    pair = fake_nb.issue_tokens("acme")
    await store_pair(writer, pair, clock)

    reader_redactor = Redactor()
    logs = capture_logs(reader_redactor, "json")
    reader = await start_gateway(reader_redactor)
    resp = await reader.client.get("/n/acme/api/v2/signups/me")  # decrypts the stored pair
    assert resp.status == 200
    logging.getLogger("nbgateway.test").info("oops %s", pair["access_token"])
    text = logs.getvalue()
    assert pair["access_token"] not in text
    assert REDACTED in json.loads(text.splitlines()[-1])["message"]


async def test_configured_secrets_are_scrubbed_from_the_first_line(
    start_gateway: GatewayStarter,
    encryption_key: str,
    capture_logs: LoggingInstaller,
) -> None:
    """Client secret, admin token and key are known to the redactor as soon as the app runs."""
    redactor = Redactor()
    logs = capture_logs(redactor, "text")
    await start_gateway(redactor)
    stray = logging.getLogger("nbgateway.test")
    stray.error("config dump: %s %s %s", CANARY_CLIENT_SECRET, CANARY_ADMIN_TOKEN, encryption_key)
    text = logs.getvalue()
    for value in (CANARY_CLIENT_SECRET, CANARY_ADMIN_TOKEN, encryption_key):
        assert value not in text
    assert text.count(REDACTED) >= 3


def test_repr_of_settings_hides_every_secret(
    settings_factory: SettingsFactory, encryption_key: str
) -> None:
    """Printing the settings (as a traceback or a debug line might) shows no secret."""
    settings = settings_factory(
        client_secret=Secret(CANARY_CLIENT_SECRET), admin_token=Secret(CANARY_ADMIN_TOKEN)
    )
    text = repr(settings) + str(settings)
    for value in (CANARY_CLIENT_SECRET, CANARY_ADMIN_TOKEN, encryption_key):
        assert value not in text


# ---------------------------------------------------------------------- shapes of secrets


@pytest.mark.parametrize(
    "fmt",
    ["text", "json"],
)
def test_unknown_secrets_shaped_like_oauth_fields_are_scrubbed(
    fmt: str, capture_logs: LoggingInstaller
) -> None:
    """A token-endpoint body logged by mistake loses its secrets in either log format."""
    logs = capture_logs(Redactor(), fmt)
    stray = logging.getLogger("nbgateway.test")
    body = json.dumps({"refresh_token": "unknown-value-0001", "client_secret": "unknown-value-2"})
    stray.warning("token endpoint said %s", body)
    stray.warning('admin sent password: "unknown-value-0003"')
    stray.warning("form was refresh_token=unknown-value-0004&client_id=x")
    text = logs.getvalue()
    for n in ("0001", "2", "0003", "0004"):
        assert f"unknown-value-{n}" not in text
    if fmt == "json":
        for line in text.splitlines():
            json.loads(line)


def test_formatter_scrubs_exceptions() -> None:
    """A traceback whose message carries a known secret is scrubbed as well."""
    redactor = Redactor([CANARY_CLIENT_SECRET])
    formatter = RedactingFormatter(redactor, json_lines=False)
    try:
        raise RuntimeError(f"bad secret {CANARY_CLIENT_SECRET}")
    except RuntimeError:
        record = logging.getLogger("nbgateway.test").makeRecord(
            "nbgateway.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = formatter.format(record)
    assert "RuntimeError" in text
    assert CANARY_CLIENT_SECRET not in text
