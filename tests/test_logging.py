"""Logs: JSON and text lines, request ids end to end, refresh outcomes, and no secrets.

Each test routes the `nbgateway` and `aiohttp` loggers into a StringIO through
`nbgateway.log.configure_logging` with the gateway's own redactor (the one the running
gateway feeds with its settings' secrets and every token it decrypts or receives), then
drives real requests through the gateway and the fake NationBuilder.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, CLIENT_SECRET, ConnectAccount, Gateway

from nbgateway.clock import FakeClock
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.log import (
    ACCESS_LOGGER,
    LogHandler,
    RedactingFormatter,
    access_handler,
    configure_logging,
    request_id_var,
)
from nbgateway.middleware import new_request_id
from nbgateway.redact import REDACTED, Redactor

LOGGERS = ("nbgateway", "aiohttp", None)  # None: the root logger (other libraries)
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")

LogCapture = Callable[..., io.StringIO]


@pytest.fixture
def capture_logs() -> Iterator[LogCapture]:
    """Install the gateway's log handler on a StringIO; restore the loggers afterwards."""
    saved = {
        name: (
            list(logging.getLogger(name).handlers),
            logging.getLogger(name).level,
            logging.getLogger(name).propagate,
        )
        for name in LOGGERS
    }
    access = logging.getLogger("aiohttp.access")
    access_disabled = access.disabled
    showwarning = warnings.showwarning
    installed: list[logging.Handler] = []

    def install(redactor: Redactor, fmt: str = "json", access_log: bool = True) -> io.StringIO:
        stream = io.StringIO()
        installed.append(
            configure_logging(
                redactor, fmt=fmt, level="DEBUG", stream=stream, access_log=access_log
            )
        )
        return stream

    yield install
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in installed:
            logger.removeHandler(handler)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    access.disabled = access_disabled
    logging.getLogger("nbgateway.access").setLevel(logging.NOTSET)
    warnings.showwarning = showwarning


AcmeLogs = Callable[..., Awaitable[io.StringIO]]


@pytest.fixture
def acme_logs(
    gateway: Gateway, connect_account: ConnectAccount, capture_logs: LogCapture
) -> AcmeLogs:
    """Capture the gateway's logs (`fmt`, `access_log` as for configure_logging), then connect
    acme: how most tests here begin. Returns the captured stream."""

    async def start(fmt: str = "json", access_log: bool = True) -> io.StringIO:
        stream = capture_logs(gateway.redactor, fmt, access_log=access_log)
        await connect_account(gateway, "acme")
        return stream

    return start


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line of the stream, parsed; fails on a line that is not a JSON object."""
    docs = []
    for number, line in enumerate(stream.getvalue().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line!r}")
        assert isinstance(doc, dict), line
        docs.append(doc)
    return docs


def access_lines(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["logger"] == "nbgateway.access"]


def refresh_lines(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["logger"] == "nbgateway.tokens" and "outcome" in d]


class TestJsonLines:
    async def test_every_line_is_a_json_object(
        self, gateway: Gateway, acme_logs: AcmeLogs, fake_nb: FakeNationBuilder
    ) -> None:
        """With fmt=json, successes, gateway errors, upstream errors and refreshes log JSON."""
        stream = await acme_logs("json")
        for path, status in (
            ("/api/v2/signups?page[size]=1", 200),
            ("/n/nosuch/api/v2/signups", 404),
            ("/n/Not_A_Slug/api/v2/signups", 400),
            ("/n/acme/api/v2/signups/999999", 404),
            ("/n/acme/api/_test/status/503", 503),
        ):
            resp = await gateway.client.get(path)
            assert resp.status == status, path
        fake_nb.expire_access_tokens("acme")
        assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200

        docs = json_lines(stream)
        assert len(access_lines(docs)) == 6
        for doc in docs:
            assert {"ts", "level", "logger", "message"} <= set(doc), doc

    async def test_access_line_carries_the_request_fields(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """An access line has request_id, account, method, status and duration_ms."""
        stream = await acme_logs("json")
        resp = await gateway.client.get(
            "/n/acme/api/v2/signups?page[size]=1", headers={"X-Request-ID": "tool-run-42.a"}
        )
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "tool-run-42.a"

        [line] = access_lines(json_lines(stream))
        assert line["request_id"] == "tool-run-42.a"
        assert line["account"] == "acme"
        assert line["method"] == "GET"
        assert line["status"] == 200
        assert isinstance(line["duration_ms"], int | float)
        assert line["duration_ms"] >= 0

    async def test_request_id_is_generated_when_the_client_sends_none(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """Without X-Request-ID the gateway makes one, returns it and logs the same id."""
        stream = await acme_logs("json")
        first = await gateway.client.get("/n/acme/api/v2/signups/me")
        second = await gateway.client.get("/n/acme/api/v2/signups/me")
        ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
        assert all(GENERATED_ID.fullmatch(i) for i in ids)
        assert ids[0] != ids[1]
        assert [line["request_id"] for line in access_lines(json_lines(stream))] == ids

    async def test_malformed_request_id_is_replaced(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """A request id with spaces or odd characters is not echoed; a fresh one is used."""
        stream = await acme_logs("json")
        resp = await gateway.client.get(
            "/n/acme/api/v2/signups/me", headers={"X-Request-ID": 'x" level="critical'}
        )
        returned = resp.headers["X-Request-ID"]
        assert GENERATED_ID.fullmatch(returned)
        [line] = access_lines(json_lines(stream))
        assert line["request_id"] == returned

    async def test_gateway_errors_are_logged_with_their_request_id(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """A request the gateway refuses is logged with its status and the returned id."""
        stream = await acme_logs("json")
        resp = await gateway.client.get(
            "/n/nosuch/api/v2/signups", headers={"X-Request-ID": "lookup-1"}
        )
        assert resp.status == 404
        assert resp.headers["X-NBGW-Error"] == "unknown_account"
        assert resp.headers["X-Request-ID"] == "lookup-1"
        [line] = access_lines(json_lines(stream))
        assert (line["request_id"], line["status"], line["method"]) == ("lookup-1", 404, "GET")

    async def test_streamed_responses_carry_the_request_id(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """A streamed (non-JSON) response also returns the X-Request-ID it was logged with."""
        stream = await acme_logs("json")
        resp = await gateway.client.get(
            "/n/acme/api/_test/bytes?n=1000", headers={"X-Request-ID": "bytes-1"}
        )
        assert resp.status == 200
        assert len(await resp.read()) == 1000
        [line] = access_lines(json_lines(stream))
        assert line["request_id"] == "bytes-1"
        assert resp.headers.get("X-Request-ID") == "bytes-1"


class TestAccessLogSwitch:
    async def test_access_log_off_keeps_every_other_line(
        self, gateway: Gateway, acme_logs: AcmeLogs, fake_nb: FakeNationBuilder
    ) -> None:
        """NBGW_ACCESS_LOG=off drops the per-request lines but not the refresh events."""
        stream = await acme_logs("json", access_log=False)
        fake_nb.expire_access_tokens("acme")
        resp = await gateway.client.get("/n/acme/api/v2/signups/me")
        assert resp.status == 200
        docs = json_lines(stream)
        assert access_lines(docs) == []
        assert [e["outcome"] for e in refresh_lines(docs)] == ["success"]


class TestRefreshEvents:
    async def test_successful_refresh_is_logged_with_the_triggering_request(
        self, gateway: Gateway, acme_logs: AcmeLogs, fake_nb: FakeNationBuilder
    ) -> None:
        """An upstream 401 -> refresh is logged as outcome=success with the request's id."""
        stream = await acme_logs("json")
        fake_nb.expire_access_tokens("acme")
        resp = await gateway.client.get(
            "/n/acme/api/v2/signups/me", headers={"X-Request-ID": "retry-1"}
        )
        assert resp.status == 200
        [event] = refresh_lines(json_lines(stream))
        assert (event["account"], event["outcome"]) == ("acme", "success")
        assert event["request_id"] == "retry-1"

    async def test_transient_failure_is_logged_with_its_outcome(
        self, gateway: Gateway, acme_logs: AcmeLogs, fake_nb: FakeNationBuilder, clock: FakeClock
    ) -> None:
        """A refresh that meets a 5xx logs a warning with outcome=server_error and the delay."""
        stream = await acme_logs("json")
        assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
        fake_nb.fail_token("server_error")
        clock.advance(86400 - 100)  # inside the refresh margin, still valid
        assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
        [event] = refresh_lines(json_lines(stream))
        assert event["level"] == "warning"
        assert (event["account"], event["outcome"]) == ("acme", "server_error")
        assert event["retry_in"] > 0

    async def test_needs_reauth_is_logged_once(
        self, gateway: Gateway, acme_logs: AcmeLogs, fake_nb: FakeNationBuilder
    ) -> None:
        """invalid_grant logs outcome=needs_reauth once, however many requests follow."""
        stream = await acme_logs("json")
        fake_nb.revoke("acme")
        for _ in range(3):
            resp = await gateway.client.get("/n/acme/api/v2/signups/me")
            assert resp.headers["X-NBGW-Error"] == "account_needs_reauthorization"
        [event] = refresh_lines(json_lines(stream))
        assert event["level"] == "warning"
        assert (event["account"], event["outcome"]) == ("acme", "needs_reauth")


class TestTextLines:
    async def test_text_access_line_carries_the_request_fields(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """With fmt=text an access line names the request id, account, method and status."""
        stream = await acme_logs("text")
        resp = await gateway.client.get(
            "/n/acme/api/v2/signups/me", headers={"X-Request-ID": "text-1"}
        )
        assert resp.status == 200
        [line] = [x for x in stream.getvalue().splitlines() if "nbgateway.access" in x]
        for field in ("request_id=text-1", "account=acme", "method=GET", "status=200"):
            assert field in line, line
        assert re.search(r"duration_ms=[0-9.]+", line), line
        with pytest.raises(ValueError):
            json.loads(line)

    async def test_text_refresh_line_carries_the_outcome(
        self, gateway: Gateway, acme_logs: AcmeLogs, fake_nb: FakeNationBuilder
    ) -> None:
        """A refresh in text format reads `... [request_id=... account=acme outcome=success]`."""
        stream = await acme_logs("text")
        fake_nb.expire_access_tokens("acme")
        await gateway.client.get("/n/acme/api/v2/signups/me", headers={"X-Request-ID": "t-2"})
        [line] = [x for x in stream.getvalue().splitlines() if "nbgateway.tokens" in x]
        for field in ("request_id=t-2", "account=acme", "outcome=success"):
            assert field in line, line


class TestSecretsStayOutOfLogs:
    @pytest.mark.parametrize("fmt", ["json", "text"])
    async def test_planted_secrets_never_appear(
        self,
        fmt: str,
        gateway: Gateway,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        admin_headers: dict[str, str],
        capture_logs: LogCapture,
    ) -> None:
        """Admin token, client secret and every token stay out of logs, whatever the flow."""
        stream = capture_logs(gateway.redactor, fmt)
        planted = {ADMIN_TOKEN, CLIENT_SECRET, "client-planted-secret-5e1f"}
        for slug in ("acme", "zeta"):
            issued = await connect_account(gateway, slug)
            planted |= {issued["access_token"], issued["refresh_token"]}

        # Proxy traffic, with the client trying to smuggle its own credentials.
        await gateway.client.get(
            "/n/acme/api/v2/signups?access_token=client-planted-secret-5e1f",
            headers={"Authorization": "Bearer client-planted-secret-5e1f"},
        )
        # A 401 -> refresh -> retry (the token endpoint returns a new pair).
        fake_nb.expire_access_tokens("acme")
        await gateway.client.get("/n/acme/api/v2/signups/me")
        # The admin API, authenticated with the admin token; a refresh through it.
        assert (await gateway.client.get("/connect/api/accounts", headers=admin_headers)).ok
        await gateway.client.post("/connect/api/accounts/acme/refresh", headers=admin_headers)
        # A wrong admin token (logged as a refused request, never echoed).
        await gateway.client.get(
            "/connect/api/accounts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}-nope"}
        )
        # invalid_grant: the fake echoes the whole request (refresh token, client secret)
        # in its error body.
        fake_nb.fail_token("invalid_grant")
        fake_nb.expire_access_tokens("zeta")
        await gateway.client.get("/n/zeta/api/v2/signups/me")
        # Every token value the gateway holds or sent now.
        for record in fake_nb.token_requests:
            planted |= {v for k, v in record.params().items() if k in ("refresh_token",)}
        for slug in ("acme", "zeta"):
            account = await gateway.store.get_account(slug)
            assert account is not None
            for secret in (account.access_token, account.refresh_token):
                if secret is not None:
                    planted.add(secret.reveal())
        # And a secret handed to a logger by mistake is scrubbed too.
        acme = await gateway.store.get_account("acme")
        assert acme is not None and acme.access_token is not None
        logging.getLogger("nbgateway.test").warning(
            "oops %s", acme.access_token.reveal(), extra={"account": "acme"}
        )

        text = stream.getvalue()
        assert text.count("\n") >= 8
        leaked = sorted(s for s in planted if s in text)
        assert not leaked, f"secrets in the log: {leaked}"
        assert f"oops {REDACTED}" in text


# A time with a fraction that rounds to six decimals and to milliseconds without ties.
CREATED = 1796160124.361747


def record_line(
    formatter: RedactingFormatter, fields: dict[str, Any], request_id: str | None
) -> str:
    """The access line as the LogRecord path renders it (what `logger.info` would write)."""
    record = logging.getLogger(ACCESS_LOGGER).makeRecord(
        ACCESS_LOGGER,
        logging.INFO,
        __file__,
        1,
        "%s %s %s",
        (fields["method"], fields["path"], fields["status"]),
        None,
        extra=fields,
    )
    record.created = CREATED
    record.msecs = int((CREATED - int(CREATED)) * 1000) + 0.0
    token = request_id_var.set(request_id)
    try:
        return formatter.format(record)
    finally:
        request_id_var.reset(token)


KNOWN_TOKEN = "known-token-value-6f1d2a9e"
STATIC_SECRET = "static-secret-value-42x"

ACCESS_FIELDS = [
    pytest.param(
        {"account": "acme", "status": 200},
        "0123456789abcdef0123456789abcdef",
        id="plain",
    ),
    pytest.param({"status": 404}, "tool-run-42.a", id="no-account"),
    pytest.param({"account": "acme", "status": 502, "upstream_ms": 12.5}, None, id="no-id"),
    pytest.param(
        {"account": "acme", "status": 200, "note": ["x", 1], "flag": True, "gone": None},
        "r-1",
        id="other-types",
    ),
]
ACCESS_REQUESTS = [
    pytest.param("GET", "/api/v2/signups/me", "127.0.0.1", id="get"),
    pytest.param("POST", f"/api/v2/x/{STATIC_SECRET}/y", "::1", id="static-secret-in-path"),
    pytest.param("GET", f"/n/acme/api/x {KNOWN_TOKEN}", "10.0.0.1", id="token-in-path"),
    pytest.param("GET", '/api/access_token=abc12345/é"q', None, id="shape-quote-no-peer"),
    pytest.param("PUT", "/api/a\nb", "127.0.0.1", id="newline-in-path"),
    pytest.param(
        "GET", f"/api/{'p' * 300}/{KNOWN_TOKEN}/{STATIC_SECRET}", "::1", id="long-path-secrets"
    ),
]


class TestDirectAccessLine:
    @pytest.mark.parametrize("fmt", ["text", "json"])
    @pytest.mark.parametrize(("info", "request_id"), ACCESS_FIELDS)
    @pytest.mark.parametrize(("method", "path", "peer"), ACCESS_REQUESTS)
    def test_direct_line_is_the_record_line(
        self,
        fmt: str,
        info: dict[str, Any],
        request_id: str | None,
        method: str,
        path: str,
        peer: str | None,
    ) -> None:
        """The access line written without a LogRecord is the line the record would give,
        byte for byte, in both formats, secrets in the path scrubbed alike."""
        redactor = Redactor([STATIC_SECRET])
        redactor.add(KNOWN_TOKEN, slot="acme/access_token")
        handler = LogHandler(
            io.StringIO(), RedactingFormatter(redactor, json_lines=fmt == "json"), redactor
        )
        assert isinstance(handler.formatter, RedactingFormatter)
        fields = {"method": method, "path": path, "peer": peer, "duration_ms": 1.25, **info}
        direct = handler.access_log.render(fields, request_id, CREATED)
        assert direct == record_line(handler.formatter, fields, request_id)
        assert STATIC_SECRET not in direct and KNOWN_TOKEN not in direct
        # Again, from the remembered scrubbed values: the same line.
        assert handler.access_log.render(fields, request_id, CREATED) == direct
        # The duration given apart (as the middleware does) is the last field; the rest of
        # the line, remembered from the first, holds each line's own figure.
        static = {k: v for k, v in fields.items() if k != "duration_ms"}
        for duration in (2.5, 0.07, 12345.68):
            line = handler.access_log.render(static, request_id, CREATED, duration_ms=duration)
            expected = record_line(
                handler.formatter, {**static, "duration_ms": duration}, request_id
            )
            assert line == expected

    @pytest.mark.parametrize("fmt", ["text", "json"])
    def test_equal_values_of_different_types_give_their_own_lines(self, fmt: str) -> None:
        """1, 1.0 and True are equal (and hash alike) but are written differently: each
        line is still the record's, whichever came first."""
        redactor = Redactor()
        handler = LogHandler(
            io.StringIO(), RedactingFormatter(redactor, json_lines=fmt == "json"), redactor
        )
        assert isinstance(handler.formatter, RedactingFormatter)
        for flag in (1, True, 1.0, 1, True):
            fields = {"method": "GET", "path": "/api/x", "peer": "::1", "status": 200, "n": flag}
            line = handler.access_log.render(fields, None, CREATED, duration_ms=1.5)
            assert line == record_line(handler.formatter, {**fields, "duration_ms": 1.5}, None)

    @pytest.mark.parametrize("fmt", ["text", "json"])
    def test_a_generated_request_id_gives_the_record_line_unscrubbed(self, fmt: str) -> None:
        """An id the gateway generated (random hex) is written as it is, and the line is
        still the one the record would give."""
        redactor = Redactor([STATIC_SECRET])
        handler = LogHandler(
            io.StringIO(), RedactingFormatter(redactor, json_lines=fmt == "json"), redactor
        )
        assert isinstance(handler.formatter, RedactingFormatter)
        fields = {"method": "GET", "path": "/api/x", "peer": "::1", "status": 200}
        request_id = new_request_id()
        direct = handler.access_log.render(fields, request_id, CREATED, id_is_ours=True)
        assert request_id in direct
        assert direct == record_line(handler.formatter, fields, request_id)

    @pytest.mark.parametrize("fmt", ["text", "json"])
    def test_a_request_id_carrying_a_secret_is_scrubbed(self, fmt: str) -> None:
        """A client that sends a known token as its X-Request-ID does not get it logged."""
        redactor = Redactor()
        redactor.add(KNOWN_TOKEN, slot="acme/access_token")
        handler = LogHandler(
            io.StringIO(), RedactingFormatter(redactor, json_lines=fmt == "json"), redactor
        )
        assert isinstance(handler.formatter, RedactingFormatter)
        fields = {
            "method": "GET",
            "path": "/api/x",
            "peer": "::1",
            "duration_ms": 1.0,
            "status": 200,
        }
        direct = handler.access_log.render(fields, KNOWN_TOKEN, CREATED)
        assert KNOWN_TOKEN not in direct
        assert KNOWN_TOKEN not in record_line(handler.formatter, fields, KNOWN_TOKEN)

    def test_a_secret_learnt_later_is_scrubbed_from_remembered_values(self) -> None:
        """Scrubbed values (peer, path ...) are remembered, but not past a new secret."""
        redactor = Redactor()
        handler = LogHandler(io.StringIO(), RedactingFormatter(redactor, json_lines=True), redactor)
        fields = {
            "method": "GET",
            "path": "/api/x/path-token-7654321",
            "peer": "peer-value-1234567",
            "status": 200,
        }
        line = handler.access_log.render(fields, None, CREATED)
        assert "peer-value-1234567" in line and "path-token-7654321" in line
        redactor.add("peer-value-1234567")
        redactor.add("path-token-7654321", slot="acme/access_token")
        line = handler.access_log.render(fields, None, CREATED)
        assert "peer-value-1234567" not in line and "path-token-7654321" not in line

    async def test_lines_keep_their_order_with_other_records(
        self, capture_logs: LogCapture
    ) -> None:
        """Access lines written in one loop turn come out in order with every other record,
        and all of them by the next turn."""
        stream = capture_logs(Redactor(), "json")
        access = logging.getLogger(ACCESS_LOGGER)
        handler = access_handler(access)
        assert handler is not None
        for n in range(3):
            handler.access(
                {"method": "GET", "path": f"/api/{n}", "peer": None, "status": 200}, None
            )
            logging.getLogger("nbgateway.test").warning("after %d", n)
        handler.access({"method": "GET", "path": "/api/3", "peer": None, "status": 200}, None)
        await asyncio.sleep(0)
        messages = [d["message"] for d in json_lines(stream)]
        assert messages == [
            "GET /api/0 200",
            "after 0",
            "GET /api/1 200",
            "after 1",
            "GET /api/2 200",
            "after 2",
            "GET /api/3 200",
        ]

    async def test_another_destination_gets_the_record_as_before(
        self, gateway: Gateway, acme_logs: AcmeLogs
    ) -> None:
        """With a further handler on the access logger, requests are logged as LogRecords
        that reach it, and the gateway's own stream still gets the same line."""
        stream = await acme_logs("json")
        access = logging.getLogger(ACCESS_LOGGER)
        assert isinstance(access_handler(access), LogHandler)
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        keep = Keep()
        access.addHandler(keep)
        try:
            assert access_handler(access) is None
            resp = await gateway.client.get(
                "/n/acme/api/v2/signups/me", headers={"X-Request-ID": "both-1"}
            )
            assert resp.status == 200
        finally:
            access.removeHandler(keep)
        [record] = records
        assert record.getMessage() == "GET /n/acme/api/v2/signups/me 200"
        [line] = access_lines(json_lines(stream))
        assert (line["request_id"], line["account"], line["status"]) == ("both-1", "acme", 200)


class TestRequestIds:
    def test_generated_ids_are_distinct_hex(self) -> None:
        """Ids drawn from the buffered random source are 32 hex digits and never repeat,
        across several refills of the buffer."""
        from nbgateway.middleware import new_request_id

        ids = [new_request_id() for _ in range(1000)]
        assert all(GENERATED_ID.fullmatch(i) for i in ids)
        assert len(set(ids)) == len(ids)

    def test_a_forked_child_draws_ids_of_its_own(self) -> None:
        """After fork the child does not hand out the ids its parent's buffer still held."""
        import os
        import warnings

        from nbgateway.middleware import new_request_id

        new_request_id()  # the buffer now holds unused bytes
        read, write = os.pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a threaded process; the child only writes.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child process
            os.write(write, new_request_id().encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert GENERATED_ID.fullmatch(child)
        assert child != new_request_id()


def test_other_libraries_warnings_are_redacted_lines_in_the_chosen_format(
    capture_logs: LogCapture,
) -> None:
    """A library logging on its own logger (asyncpg's pool retrying, with a traceback)
    goes through the gateway's handler: one JSON object per line, secrets scrubbed; its
    debug chatter stays out."""
    redactor = Redactor()
    secret = "pg-password-CANARY-77aa"
    redactor.add(secret)
    stream = capture_logs(redactor, fmt="json")
    library = logging.getLogger("asyncpg.pool")
    library.debug("connection details %s", secret)
    try:
        raise ConnectionRefusedError(f"connect to postgresql://u:{secret}@db failed")
    except ConnectionRefusedError:
        library.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["message"].startswith("Failed to restore the pool connection floor")
    assert "ConnectionRefusedError" in lines[0]
    assert secret not in stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_librarys_line_does_not_carry_the_request_id_it_happened_to_run_under(
    capture_logs: LogCapture, fmt: str
) -> None:
    """asyncpg's pool restores its connections in a task started by whichever request
    released one: its lines name no request (searching the logs by id finds only that
    request's lines). The gateway's own lines and aiohttp's, logged in the request's
    context, keep its id."""
    stream = capture_logs(Redactor(), fmt=fmt)
    token = request_id_var.set("req-6d1f")
    try:
        logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection floor")
        logging.getLogger("aiohttpx").warning("a library named alike")
        logging.getLogger("nbgateway.proxy").warning("upstream unreachable")
        logging.getLogger("aiohttp.server").warning("error handling request")
    finally:
        request_id_var.reset(token)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines
    with_id = ["req-6d1f" in line for line in lines]
    assert with_id == [False, False, True, True]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_warning_names_its_exception_in_one_line_an_error_keeps_the_traceback(
    capture_logs: LogCapture, fmt: str
) -> None:
    """asyncpg's pool retrying through a database restart logs a WARNING with exc_info: one
    line naming the exception (scrubbed, its own line breaks flattened); a warning logged
    with exc_info outside an exception adds nothing; an ERROR keeps its traceback."""
    redactor = Redactor()
    secret = "pg-password-CANARY-88bb"
    redactor.add(secret)
    stream = capture_logs(redactor, fmt=fmt)
    library = logging.getLogger("asyncpg.pool")
    try:
        raise ConnectionRefusedError(f"connect to postgresql://u:{secret}@db failed\nDETAIL: x")
    except ConnectionRefusedError:
        library.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
    library.warning("nothing raised here", exc_info=True)
    first, second = stream.getvalue().splitlines()
    assert "Traceback" not in first
    assert "ConnectionRefusedError: connect to postgresql://u:" in first
    assert "failed DETAIL: x" in first
    assert secret not in first
    assert "exception=" not in second and "NoneType" not in second
    if fmt == "json":
        assert json.loads(first)["exception"].startswith("ConnectionRefusedError: ")
        assert "exception" not in json.loads(second)
    else:
        assert "[exception=ConnectionRefusedError: " in first

    stream.seek(0)
    stream.truncate()
    try:
        raise ValueError("unexpected")
    except ValueError:
        logging.getLogger("nbgateway.proxy").error("broke", exc_info=True)
    assert "Traceback (most recent call last)" in stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_python_warnings_become_one_line_in_the_chosen_format(
    capture_logs: LogCapture, fmt: str
) -> None:
    """A library's warnings.warn (prometheus_client's multiprocess notice, say) is one log
    line in NBGW_LOG_FORMAT, naming the category, the message and where it was raised,
    not raw text (with the source line) on stderr."""
    with warnings.catch_warnings():  # puts pytest's and the interpreter's display back after
        warnings.simplefilter("always")
        stream = capture_logs(Redactor(), fmt=fmt)
        warnings.warn("Removal of labels has not\nbeen implemented", UserWarning, stacklevel=1)
    [line] = stream.getvalue().splitlines()
    expected = "UserWarning: Removal of labels has not been implemented (" + __file__ + ":"
    if fmt == "json":
        doc = json.loads(line)
        assert (doc["logger"], doc["level"]) == ("py.warnings", "warning")
        assert doc["message"].startswith(expected)
    else:
        assert " WARNING py.warnings: " + expected in line
