"""Client keys: modes, presentations, scopes, removal across processes, hashing, the audit
trail, metrics, and the CLI/admin API surfaces. Real gateway, real fake NationBuilder.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import ConnectAccount, Gateway, GatewayFactory
from yarl import URL

from nbgateway import keys
from nbgateway.clients import ClientAuth, ClientRegistry, hash_key
from nbgateway.clock import FakeClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.errors import ClientKeyInvalid, StoreUnavailable
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.log import configure_logging
from nbgateway.metrics import Metrics
from nbgateway.redact import REDACTED, Redactor, Secret
from nbgateway.store import SQLiteStore, TokenStore, make_store
from nbgateway.store.base import UNSURE_HINT_INTERVAL
from nbgateway.store.pgconn import LISTENER_NAME

SIGNUP = {"data": {"type": "signups", "attributes": {"email": "audit@example.org"}}}


def registry(gw: Gateway) -> ClientRegistry:
    return gw.app[keys.CLIENTS]


async def add_key(
    gw: Gateway, name: str, nations: tuple[str, ...] = (), read_only: bool = False
) -> str:
    _info, key = await registry(gw).add(name, nations, read_only)
    return key.reveal()


async def get(gw: Gateway, path: str | URL, **kwargs: Any) -> tuple[int, str | None]:
    resp = await gw.client.get(path, **kwargs)
    await resp.read()
    return resp.status, resp.headers.get("X-NBGW-Error")


async def eventually(probe: Any, expected: int, within: float = 10.0) -> bool:
    """Whether `probe()` returns `expected` within `within` seconds (checked every 0.1 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await probe() == expected:
            return True
        await asyncio.sleep(0.1)
    return False


async def touch(gw: Gateway) -> None:
    """A commit to the clients table by another connection (a last-use write)."""
    [record] = await gw.store.list_clients()
    await gw.store.touch_clients({record.key_id: gw.app[keys.CLOCK].now() + 1})


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, connect_account: ConnectAccount) -> Gateway:
    gateway = await gateway_factory(client_auth="required")
    await connect_account(gateway, "acme")
    await connect_account(gateway, "bravo")
    return gateway


class TestModes:
    async def test_required_refuses_a_request_without_a_key_before_upstream(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """required: no key -> 401 client_key_required, and nothing reaches NationBuilder."""
        fake_nb.clear_recordings()
        assert await get(gw, "/n/acme/api/v2/signups/me") == (401, "client_key_required")
        assert fake_nb.api_requests == []

    async def test_unknown_key_is_refused_in_required_and_optional(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """A key of the right shape that is not registered -> 401 client_key_invalid."""
        forged = "nbgw_" + "A" * 43
        for mode in ("required", "optional"):
            gateway = await gateway_factory(client_auth=mode)
            await connect_account(gateway, "acme")
            status = await get(gateway, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": forged})
            assert status == (401, "client_key_invalid"), mode

    async def test_optional_lets_anonymous_requests_pass(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """optional: no key passes (counted as anonymous); a valid key is recorded by name."""
        gateway = await gateway_factory(client_auth="optional")
        await connect_account(gateway, "acme")
        key = await add_key(gateway, "dash")
        assert (await get(gateway, "/n/acme/api/v2/signups/me"))[0] == 200
        assert (await get(gateway, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": key}))[
            0
        ] == 200
        assert (
            gateway.metric(
                "nbgw_client_requests_total", client="anonymous", account="acme", code="200"
            )
            == 1.0
        )
        assert (
            gateway.metric("nbgw_client_requests_total", client="dash", account="acme", code="200")
            == 1.0
        )

    async def test_off_ignores_keys_entirely(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """off (the default): even a forged key is not looked at; the allow-list decides."""
        gateway = await gateway_factory()
        await connect_account(gateway, "acme")
        headers = {"X-NBGW-Key": "nbgw_" + "B" * 43}
        assert (await get(gateway, "/n/acme/api/v2/signups/me", headers=headers))[0] == 200

    async def test_allow_list_applies_in_every_mode(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """A valid key from an address outside NBGW_ALLOWED_CLIENTS is still refused."""
        import ipaddress

        gateway = await gateway_factory(
            client_auth="required", allowed_clients=(ipaddress.ip_network("10.99.0.0/16"),)
        )
        await connect_account(gateway, "acme")
        key = await add_key(gateway, "dash")
        status = await get(gateway, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": key})
        assert status == (403, "client_not_allowed")


class TestPresentation:
    @pytest.mark.parametrize("how", ["bearer", "query", "header", "query-v1"])
    async def test_every_presentation_works_and_the_key_never_goes_upstream(
        self, gw: Gateway, fake_nb: FakeNationBuilder, how: str
    ) -> None:
        """Bearer, ?access_token= (v2 and a v1 path) and X-NBGW-Key all identify the tool; the
        fake sees the NationBuilder token instead and no trace of the key."""
        key = await add_key(gw, "sync")
        path = "/n/acme/api/v1/people/me" if how == "query-v1" else "/n/acme/api/v2/signups/me"
        headers: dict[str, str] = {}
        if how == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif how == "header":
            headers["X-NBGW-Key"] = key
        else:
            path += f"?access_token={key}&limit=1"
        fake_nb.clear_recordings()
        assert await get(gw, path, headers=headers) == (200, None)
        [seen] = fake_nb.api_requests
        assert seen.headers["Authorization"].startswith("Bearer nbfake-at-")
        dump = f"{seen.path}?{seen.query_string} {dict(seen.headers)} {seen.body!r}"
        assert key not in dump
        assert "nbgw_" not in dump
        if how.startswith("query"):
            assert seen.query_string == "limit=1"
        assert (
            gw.metric("nbgw_client_requests_total", client="sync", account="acme", code="200")
            == 1.0
        )

    async def test_a_key_put_anywhere_else_in_the_headers_does_not_go_upstream(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A key the tool also put in a cookie or a header of its own (not a way to present
        it) is replaced by the redaction mark before the request goes on; the rest of those
        headers is kept."""
        key = await add_key(gw, "sync")
        fake_nb.clear_recordings()
        status = await get(
            gw,
            "/n/acme/api/v2/signups/me",
            headers={"X-NBGW-Key": key, "Cookie": f"a=1; gwkey={key}", "X-Tool-Auth": key},
        )
        assert status == (200, None)
        [seen] = fake_nb.api_requests
        assert key not in f"{dict(seen.headers)}"
        assert seen.headers["Cookie"] == f"a=1; gwkey={REDACTED}"
        assert seen.headers["X-Tool-Auth"] == REDACTED

    async def test_a_key_in_another_query_parameter_does_not_go_upstream(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A key a tool also put in a query parameter of its own (its old `api_key=`, say)
        is replaced by the redaction mark before the request goes on (it would sit in
        NationBuilder's and every middlebox's URL logs); the other parameters stay."""
        key = await add_key(gw, "sync")
        fake_nb.clear_recordings()
        status = await get(
            gw, f"/n/acme/api/v2/signups/me?api_key={key}&limit=1&access_token={key}"
        )
        assert status == (200, None)
        [seen] = fake_nb.api_requests
        assert key not in seen.query_string
        assert seen.query_string == f"api_key={REDACTED}&limit=1"

    async def test_a_percent_encoded_key_in_the_query_is_a_key_too(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """An encoder that writes "_" and "-" as %5F and %2D does not get the key past the
        scrub, and a key so encoded in `access_token` identifies the tool."""
        key = await add_key(gw, "sync")
        encoded = key.replace("_", "%5F").replace("-", "%2D")
        assert encoded != key
        fake_nb.clear_recordings()
        path = f"/n/acme/api/v2/signups/me?api_key={encoded}&limit=1&access_token={encoded}"
        status = await get(gw, URL(path, encoded=True))  # sent as written
        assert status == (200, None)
        [seen] = fake_nb.api_requests
        assert seen.query_string == f"api_key={REDACTED}&limit=1"
        assert gw.metric("nbgw_client_requests_total", client="sync", account="acme", code="200")

    async def test_two_different_keys_are_refused(self, gw: Gateway) -> None:
        """A request presenting two different keys is ambiguous: 400 invalid_request."""
        one, two = await add_key(gw, "one"), await add_key(gw, "two")
        status = await get(
            gw,
            "/n/acme/api/v2/signups/me",
            headers={"X-NBGW-Key": one, "Authorization": f"Bearer {two}"},
        )
        assert status == (400, "invalid_request")

    async def test_an_old_nationbuilder_token_is_not_a_key(self, gw: Gateway) -> None:
        """A legacy tool still sending its old NationBuilder token has no client key."""
        status = await get(
            gw, "/n/acme/api/v2/signups/me", headers={"Authorization": "Bearer legacy-token-123"}
        )
        assert status == (401, "client_key_required")


class TestScopes:
    async def test_a_key_limited_to_nations_is_refused_elsewhere(self, gw: Gateway) -> None:
        """403 client_forbidden names the nation and the key's name, never the key."""
        key = await add_key(gw, "acme-only", nations=("acme",))
        headers = {"X-NBGW-Key": key}
        assert (await get(gw, "/n/acme/api/v2/signups/me", headers=headers))[0] == 200
        resp = await gw.client.get("/n/bravo/api/v2/signups/me", headers=headers)
        body = await resp.json()
        assert resp.status == 403
        assert resp.headers["X-NBGW-Error"] == "client_forbidden"
        detail = body["errors"][0]["detail"]
        assert "bravo" in detail and "acme-only" in detail and key not in detail

    async def test_a_read_only_key_may_only_read(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """GET, HEAD and OPTIONS pass; POST, PUT, PATCH and DELETE get 403 before upstream."""
        key = await add_key(gw, "reader", read_only=True)
        headers = {"X-NBGW-Key": key}
        for method in ("GET", "HEAD", "OPTIONS"):
            resp = await gw.client.request(method, "/n/acme/api/v2/signups/me", headers=headers)
            assert resp.headers.get("X-NBGW-Error") != "client_forbidden", method
        fake_nb.clear_recordings()
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            resp = await gw.client.request(
                method, "/n/acme/api/v2/signups/1", headers=headers, json=SIGNUP
            )
            assert (resp.status, resp.headers.get("X-NBGW-Error")) == (403, "client_forbidden")
        assert fake_nb.api_requests == []


class TestRemoval:
    async def test_a_key_removed_in_another_process_is_refused_on_the_next_request(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        any_database: Path | str,
    ) -> None:
        """Two gateways on one database, no background sync: once a removal through one has
        committed (SQLite), or its notice has arrived (PostgreSQL), the other refuses the
        key on its very next request, with no sync loop to wait for."""
        one = await gateway_factory(client_auth="required", database=any_database)
        await connect_account(one, "acme")
        two = await gateway_factory(one.settings)
        start = two.store.change_hint()
        key = await add_key(one, "temp")
        async with asyncio.timeout(10):
            while two.store.change_hint() == start:  # noqa: ASYNC110 - the add's notice first
                await asyncio.sleep(0.01)
        headers = {"X-NBGW-Key": key}
        assert await get(two, "/n/acme/api/v2/signups/me", headers=headers) == (200, None)
        before = two.store.change_hint()
        assert await registry(one).remove("temp")
        async with asyncio.timeout(10):
            while two.store.change_hint() == before:  # noqa: ASYNC110 - the notice (PostgreSQL)
                await asyncio.sleep(0.01)
        assert await get(two, "/n/acme/api/v2/signups/me", headers=headers) == (
            401,
            "client_key_invalid",
        )

    async def test_concurrent_requests_share_one_reload_after_a_change(
        self, gw: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Twenty requests arriving after a commit elsewhere wait for one reload of the keys
        between them; once reloaded, requests go without one."""
        key = await add_key(gw, "tool")
        await get(gw, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": key})
        loads = 0
        list_clients = gw.store.list_clients

        async def counted() -> Any:
            nonlocal loads
            loads += 1
            return await list_clients()

        await touch(gw)
        monkeypatch.setattr(gw.store, "list_clients", counted)
        headers = {"X-NBGW-Key": key}
        results = await asyncio.gather(
            *(get(gw, "/n/acme/api/v2/signups/me", headers=headers) for _ in range(20))
        )
        assert results == [(200, None)] * 20
        assert loads == 1
        assert await get(gw, "/n/acme/api/v2/signups/me", headers=headers) == (200, None)
        assert loads == 1

    async def test_keys_loaded_before_judge_requests_while_the_store_cannot_be_read(
        self, gw: Gateway, monkeypatch: pytest.MonkeyPatch, clock: Any
    ) -> None:
        """A reload that fails leaves the loaded keys in charge (requests are neither
        refused nor held), and is not tried again for a second."""
        key = await add_key(gw, "tool")
        loads = 0

        async def broken() -> Any:
            nonlocal loads
            loads += 1
            raise StoreUnavailable("database is locked")

        await touch(gw)
        monkeypatch.setattr(gw.store, "list_clients", broken)
        headers = {"X-NBGW-Key": key}
        for _ in range(3):
            assert await get(gw, "/n/acme/api/v2/signups/me", headers=headers) == (200, None)
        assert loads == 1
        clock.advance(1.0)
        assert await get(gw, "/n/acme/api/v2/signups/me", headers=headers) == (200, None)
        assert loads == 2

    async def test_a_slow_reload_holds_a_request_half_a_second_at_most(
        self, gw: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reload that hangs (the database is slow) holds the request for CATCH_UP_WAIT
        (half a second), then the loaded keys judge it."""
        key = await add_key(gw, "tool")
        release, started = asyncio.Event(), asyncio.Event()
        list_clients = gw.store.list_clients

        async def hung() -> Any:
            started.set()
            await release.wait()
            return await list_clients()

        await touch(gw)
        monkeypatch.setattr(gw.store, "list_clients", hung)
        headers = {"X-NBGW-Key": key}
        try:
            async with asyncio.timeout(5):
                assert await get(gw, "/n/acme/api/v2/signups/me", headers=headers) == (
                    200,
                    None,
                )
            assert started.is_set()  # the request did ask for a reload, and went on
        finally:
            release.set()
            await registry(gw).sync()  # waits for the released reload to finish


def remove_elsewhere(database: Path, name: str) -> None:
    """`nbgateway clients remove NAME` in another process: committed when this returns."""
    other = sqlite3.connect(database, isolation_level=None)
    try:
        other.execute("DELETE FROM clients WHERE name = ?", (name,))
    finally:
        other.close()


async def accepted(reg: ClientRegistry, key: Secret) -> bool:
    """The proxy's key path (`Proxy.handle`) for one request: is the key taken?"""
    if not reg.current():
        await reg.catch_up()
    try:
        reg.identify(key.reveal())
    except ClientKeyInvalid:
        return False
    return True


def new_registry(store: TokenStore, clock: FakeClock) -> ClientRegistry:
    return ClientRegistry(
        store,
        clock,
        Metrics(),
        mode=ClientAuth.REQUIRED,
        audit_retention=86400.0,
        redactor=Redactor(),
    )


class TestAuditAtShutdown:
    """What is queued when the process stops, while the store refuses writes."""

    @staticmethod
    def refusing(store: TokenStore, times: int) -> list[int]:
        """Make `store.record_audit` fail `times` times, then work; returns the calls."""
        calls: list[int] = []
        real = store.record_audit

        async def record_audit(entries: Any, keep_after: float) -> None:
            calls.append(len(entries))
            if len(calls) <= times:
                raise StoreUnavailable("database gone away")
            await real(entries, keep_after)

        store.record_audit = record_audit  # type: ignore[method-assign]
        return calls

    async def test_entries_are_written_when_the_store_is_back_within_the_grace(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """The store refuses the last flush twice, then takes it: nothing is lost."""
        async with SQLiteStore(tmp_path / "g.db", Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            for n in range(40):
                reg.record(None, "acme", "POST", f"/api/v2/signups/{n}", 201, f"r{n}")
            calls = self.refusing(store, 2)
            await reg.close(grace=5.0)
            assert calls == [40, 40, 40]
            assert len(await store.audit(limit=100)) == 40

    async def test_entries_put_back_are_not_scrubbed_again(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """During an outage the queue is offered every second: each entry's path and
        request id are scrubbed once, not again at every try (10,000 entries would cost the
        event loop 20,000 scrubs a second)."""
        async with SQLiteStore(tmp_path / "g.db", Cipher([Secret(generate_key())]), clock) as store:
            redactor = Redactor()
            reg = ClientRegistry(
                store,
                clock,
                Metrics(),
                mode=ClientAuth.REQUIRED,
                audit_retention=86400.0,
                redactor=redactor,
            )
            scrubbed: list[str] = []
            real = redactor.scrub

            def counting(text: str) -> str:
                scrubbed.append(text)
                return real(text)

            redactor.scrub = counting  # type: ignore[method-assign]
            for n in range(10):
                reg.record(None, "acme", "POST", f"/api/v2/signups/{n}", 201, f"r{n}")
            self.refusing(store, 2)
            await reg.flush()
            await reg.flush()
            reg.record(None, "acme", "POST", "/api/v2/signups/new", 201, "r-new")
            await reg.flush()
            assert len(scrubbed) == 2 * 11
            assert len(await store.audit(limit=100)) == 11

    async def test_entries_the_store_never_takes_are_counted_as_lost(
        self, tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A store down for the whole grace: close returns after it, and an error says how
        many entries are lost (it was one "retrying" warning, then silence)."""
        async with SQLiteStore(tmp_path / "g.db", Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            for n in range(40):
                reg.record(None, "acme", "POST", f"/api/v2/signups/{n}", 201, f"r{n}")
            self.refusing(store, 1000)
            with caplog.at_level(logging.ERROR, logger="nbgateway.clients"):
                await reg.close(grace=0.6)
            [lost] = [r for r in caplog.records if "lost at shutdown" in r.getMessage()]
            assert lost.entries == 40  # type: ignore[attr-defined]

    async def test_a_write_that_hangs_is_cut_off_at_the_grace(
        self, tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A store whose write hangs (PostgreSQL unreachable, up to its command timeout):
        close returns at the grace, and the entries still queued are counted as lost."""
        async with SQLiteStore(tmp_path / "g.db", Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            for n in range(40):
                reg.record(None, "acme", "POST", f"/api/v2/signups/{n}", 201, f"r{n}")

            async def hang(entries: Any, keep_after: float) -> None:
                await asyncio.sleep(30)

            store.record_audit = hang  # type: ignore[method-assign]
            started = asyncio.get_running_loop().time()
            with caplog.at_level(logging.ERROR, logger="nbgateway.clients"):
                await reg.close(grace=0.5)
            assert asyncio.get_running_loop().time() - started < 5
            [lost] = [r for r in caplog.records if "lost at shutdown" in r.getMessage()]
            assert lost.entries == 40  # type: ignore[attr-defined]

    async def test_a_failed_last_use_write_does_not_write_the_entries_twice(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """The audit entries are written, the keys' last-use times are not: the entries are
        not queued again (they were, and written twice), the times are."""
        async with SQLiteStore(tmp_path / "g.db", Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            _, key = await reg.add("tool")
            assert await accepted(reg, key)  # a use, to be written
            reg.record(None, "acme", "POST", "/api/v2/signups", 201, "r1")
            real = store.touch_clients
            failures = [StoreUnavailable("database gone away")]

            async def touch(used: Any) -> None:
                if failures:
                    raise failures.pop()
                await real(used)

            store.touch_clients = touch  # type: ignore[method-assign]
            await reg.flush(force=True)
            await reg.flush(force=True)
            assert [e.request_id for e in await store.audit()] == ["r1"]
            [record] = await store.list_clients()
            assert record.info.last_used_at is not None


class TestRemovalRaces:
    """A removal that has committed is never outrun (SQLite), whatever else is in flight."""

    async def test_a_listing_in_progress_on_the_shared_reader_does_not_hide_a_removal(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """A listing part-way through (more accounts than one fetch) pins the shared
        reader's snapshot; the reload must still see the removal."""
        database = tmp_path / "gateway.db"
        async with SQLiteStore(database, Cipher([Secret(generate_key())]), clock) as store:
            for i in range(70):
                await store.import_refresh_token(f"nation{i:03d}", Secret(f"refresh-{i}"))
            reg = new_registry(store, clock)
            _, key = await reg.add("tool")
            async with store.conn.execute("SELECT slug FROM accounts") as listing:
                await listing.fetchmany(64)
                remove_elsewhere(database, "tool")
                assert not await accepted(reg, key)
            assert not await accepted(reg, key)

    async def test_a_write_waiting_for_another_process_does_not_hold_up_the_reload(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """Another process removes the key, then holds SQLite's write lock (rotate-key,
        migrate, a sqlite3 shell); a write of this process (the audit flush) waits for it.
        The reload of the keys does not queue behind that write: the key is refused."""
        database = tmp_path / "gateway.db"
        async with SQLiteStore(database, Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            _, key = await reg.add("tool")
            assert await accepted(reg, key)
            other = sqlite3.connect(database, isolation_level=None)
            try:
                other.execute("DELETE FROM clients WHERE name = ?", ("tool",))
                other.execute("BEGIN IMMEDIATE")
                reg.record(None, "acme", "POST", "/api/v2/people", 201, "id")
                flush = asyncio.create_task(reg.flush())
                await asyncio.sleep(0.05)  # the flush is waiting for the write lock
                assert not flush.done()
                assert not await accepted(reg, key)
            finally:
                other.execute("ROLLBACK")
                other.close()
            await flush

    async def test_a_request_does_not_settle_for_a_reload_older_than_its_removal(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Key one is removed and a request starts a reload; while the reload's rows are on
        their way, key two is removed. A request with key two that joins that reload waits
        for another one, and is refused."""
        database = tmp_path / "gateway.db"
        async with SQLiteStore(database, Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            _, one = await reg.add("one")
            _, two = await reg.add("two")
            read, go_on = asyncio.Event(), asyncio.Event()
            real = store.list_clients

            async def rows_on_their_way() -> Any:
                records = await real()
                read.set()
                await go_on.wait()
                return records

            monkeypatch.setattr(store, "list_clients", rows_on_their_way)
            remove_elsewhere(database, "one")
            first = asyncio.create_task(accepted(reg, one))
            await read.wait()
            monkeypatch.setattr(store, "list_clients", real)
            remove_elsewhere(database, "two")
            second = asyncio.create_task(accepted(reg, two))
            await asyncio.sleep(0.01)  # the second request is waiting on the first reload
            go_on.set()
            assert await first is False
            assert await second is False

    async def test_the_background_sync_does_not_vouch_for_keys_it_did_not_reload(
        self, pg_url: str, clock: FakeClock
    ) -> None:
        """PostgreSQL with its listener away (and unable to come back): the removal's notice
        is lost, so the notice count stands still. A background sync that sees it standing
        still must not mark the keys current; the next keyed request reloads and refuses
        the removed key."""
        store = make_store(pg_url, Cipher([Secret(generate_key())]), clock)
        async with store:
            reg = new_registry(store, clock)
            _, key = await reg.add("tool")
            database = pg_url.rsplit("/", 1)[-1]
            admin = await asyncpg.connect(pg_url)
            server = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/postgres")
            try:
                await server.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE application_name = '{LISTENER_NAME}'"
                )
                async with asyncio.timeout(10):
                    while store.change_hint() >= 0:  # noqa: ASYNC110 - polled API
                        await asyncio.sleep(0.01)
                assert await accepted(reg, key)  # reloaded for the unsure hint: still there
                await admin.execute("DELETE FROM clients WHERE name = 'tool'")
                clock.advance(3 * UNSURE_HINT_INTERVAL)
                assert not await reg.sync()  # the counter stood still: no reload ...
                assert not await accepted(reg, key)  # ... and no blessing of the old keys
            finally:
                await server.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
                await server.close()
                await admin.close()


class TestAddition:
    async def test_a_key_added_in_another_process_works_on_its_first_request(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount
    ) -> None:
        """Two gateways on one database, no background sync: a key added through one is
        taken by the other at once (it looks at the store for a key it does not know)."""
        one = await gateway_factory(client_auth="required")
        await connect_account(one, "acme")
        two = await gateway_factory(one.settings)
        await registry(two).sync(force=True)
        key = await add_key(one, "fresh")
        headers = {"X-NBGW-Key": key}
        assert await get(two, "/n/acme/api/v2/signups/me", headers=headers) == (200, None)

    async def test_unknown_keys_look_at_the_store_at_most_five_times_a_second(
        self, gw: Gateway, clock: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Requests with random keys share one store look per 0.2 s: a flood of bad keys
        cannot load the database. Each is refused with 401 client_key_invalid."""
        looks = 0
        store_counter = gw.store.change_counter

        async def counted() -> int:
            nonlocal looks
            looks += 1
            return await store_counter()

        await registry(gw).sync()  # the keys are current: only the unknown key looks
        monkeypatch.setattr(gw.store, "change_counter", counted)
        bad = {"X-NBGW-Key": "nbgw_" + "A" * 43}
        results = await asyncio.gather(
            *(get(gw, "/n/acme/api/v2/signups/me", headers=bad) for _ in range(20))
        )
        assert results == [(401, "client_key_invalid")] * 20
        assert looks == 1
        # Within 0.2 s of the last look: these wait for the next one, and share it.
        results = await asyncio.gather(
            *(get(gw, "/n/acme/api/v2/signups/me", headers=bad) for _ in range(20))
        )
        assert results == [(401, "client_key_invalid")] * 20
        assert looks == 2
        clock.advance(0.2)
        assert await get(gw, "/n/acme/api/v2/signups/me", headers=bad) == (
            401,
            "client_key_invalid",
        )
        assert looks == 3

    async def test_a_key_added_before_its_change_notice_arrives_is_found(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unknown key reloads the keys even when the change count has not moved yet
        (a PostgreSQL notice still on its way): the key added elsewhere is taken."""
        database = tmp_path / "gateway.db"
        async with SQLiteStore(database, Cipher([Secret(generate_key())]), clock) as store:
            adder, other = new_registry(store, clock), new_registry(store, clock)
            await other.sync(force=True)
            counter = await store.change_counter()

            async def standing_still() -> int:
                return counter

            monkeypatch.setattr(store, "change_counter", standing_still)
            _, key = await adder.add("fresh")
            client = await other.identify_after_sync(key.reveal())
            assert client.name == "fresh"

    async def test_a_key_added_just_after_a_look_is_found(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A key added elsewhere within 0.2 s of this process's last look for an unknown
        key (its change notice not here yet) is found by the next look, not refused."""
        database = tmp_path / "gateway.db"
        async with SQLiteStore(database, Cipher([Secret(generate_key())]), clock) as store:
            adder, other = new_registry(store, clock), new_registry(store, clock)
            await other.sync(force=True)
            counter = await store.change_counter()

            async def standing_still() -> int:
                return counter

            monkeypatch.setattr(store, "change_counter", standing_still)
            with pytest.raises(ClientKeyInvalid):  # a removed key, say: one look
                await other.identify_after_sync("nbgw_" + "C" * 43)
            _, key = await adder.add("fresh")
            client = await other.identify_after_sync(key.reveal())
            assert client.name == "fresh"

    async def test_an_unknown_key_hears_503_when_the_reload_does_not_finish(
        self, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reload that hangs (the store is stuck) holds an unknown key's request at most
        CATCH_UP_WAIT s; then it is StoreUnavailable (503), not a wait without end."""
        database = tmp_path / "gateway.db"
        async with SQLiteStore(database, Cipher([Secret(generate_key())]), clock) as store:
            reg = new_registry(store, clock)
            await reg.sync(force=True)
            never = asyncio.Event()

            async def stuck() -> list[Any]:
                await never.wait()
                return []

            monkeypatch.setattr(store, "list_clients", stuck)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(reg.identify_after_sync("nbgw_" + "B" * 43), 10)
            never.set()


class TestSecrecy:
    async def test_only_salted_hashes_reach_the_database_file(self, gw: Gateway) -> None:
        """The key's bytes are nowhere in the database files; its salted hash is."""
        key = await add_key(gw, "sync")
        [record] = await gw.store.list_clients()
        assert record.key_hash == hash_key(key, record.salt)
        database = Path(gw.settings.database)
        raw = b"".join(
            p.read_bytes() for p in database.parent.glob(database.name + "*") if p.is_file()
        )
        assert key.encode() not in raw
        assert key[5:].encode() not in raw  # nor the random part alone
        assert record.key_hash in raw

    async def test_keys_are_absent_from_logs_metrics_and_listings(
        self, gw: Gateway, admin_headers: dict[str, str], capture_logs: Any
    ) -> None:
        """Use a key in every presentation, fail with a forged one, list and scrape: the key
        appears in no log line, no /metrics sample and no listing."""
        logs: io.StringIO = capture_logs(gw.redactor, "text")
        key = await add_key(gw, "sync")
        await get(gw, f"/n/acme/api/v2/signups/me?access_token={key}")
        await get(gw, "/n/acme/api/v2/signups/me", headers={"Authorization": f"Bearer {key}"})
        await get(gw, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": key + "x"})
        forged = key[:-4] + "AAAA"
        await get(gw, f"/n/acme/api/v2/signups/me?access_token={forged}")
        metrics = await (await gw.client.get("/metrics")).text()
        listing = await (await gw.client.get("/connect/api/clients", headers=admin_headers)).text()
        text = logs.getvalue()
        assert "/n/acme/api/v2/signups/me" in text  # the access log was captured
        for output in (text, metrics, listing):
            assert key not in output and key[5:20] not in output
            assert forged not in output
        assert 'client="sync"' in metrics


class TestAudit:
    async def test_writes_are_recorded_and_reads_are_not(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """POST/PATCH/DELETE through a key (and a refused write) leave entries with time,
        client, nation, method, path without query, status and request id; GETs leave none."""
        key = await add_key(gw, "sync")
        reader = await add_key(gw, "reader", read_only=True)
        headers = {"X-NBGW-Key": key}
        await get(gw, "/n/acme/api/v2/signups?page[size]=1", headers=headers)
        created = await gw.client.post(
            "/n/acme/api/v2/signups?secret=1",
            json=SIGNUP,
            headers={**headers, "X-Request-ID": "req-1"},
        )
        assert created.status == 201
        person = (await created.json())["data"]["id"]
        patched = await gw.client.patch(
            f"/n/bravo/api/v2/signups/{person}", json=SIGNUP, headers=headers
        )
        deleted = await gw.client.delete(f"/n/acme/api/v2/signups/{person}", headers=headers)
        refused = await gw.client.post(
            "/n/acme/api/v2/signups", json=SIGNUP, headers={"X-NBGW-Key": reader}
        )
        assert refused.status == 403
        await registry(gw).flush()

        entries = await gw.store.audit(limit=10)
        got = [(e.client, e.nation, e.method, e.path, e.status) for e in reversed(entries)]
        assert got == [
            ("sync", "acme", "POST", "/api/v2/signups", 201),
            ("sync", "bravo", "PATCH", f"/api/v2/signups/{person}", patched.status),
            ("sync", "acme", "DELETE", f"/api/v2/signups/{person}", deleted.status),
            ("reader", "acme", "POST", "/api/v2/signups", 403),
        ]
        assert entries[-1].request_id == "req-1"
        assert all(e.at > 0 for e in entries)
        assert [e.nation for e in await gw.store.audit(nation="bravo")] == ["bravo"]
        assert {e.client for e in await gw.store.audit(client="reader")} == {"reader"}

    async def test_a_write_refused_before_its_body_is_audited_and_counted(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """A read-only key's POST with `Expect: 100-continue` (curl and many libraries send
        it for larger bodies) is refused before the body is sent, and, like the same
        request without Expect, audited, counted and logged (the Expect handler answered
        it itself, past the audit and the metrics); the connection closes after it."""
        reader = await add_key(gw, "reader", read_only=True)
        fake_nb.clear_recordings()
        body = json.dumps(SIGNUP).encode()
        connection = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
        stream, writer = connection
        writer.write(
            (
                "POST /n/acme/api/v2/signups HTTP/1.1\r\nHost: x\r\n"
                f"X-NBGW-Key: {reader}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        answer = await asyncio.wait_for(stream.read(), 20)  # read until it closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 403"), answer[:80]
        assert b"100 Continue" not in answer
        assert fake_nb.api_requests == []
        await registry(gw).flush()
        [entry] = await gw.store.audit(limit=10)
        assert (entry.client, entry.method, entry.status) == ("reader", "POST", 403)
        assert (
            gw.metric("nbgw_client_requests_total", client="reader", account="none", code="403")
            == 1
        )

    async def test_a_store_failure_before_the_body_is_the_contracts_503(self, gw: Gateway) -> None:
        """A key this process does not know sends it to the store; with the store failing
        and `Expect: 100-continue`, the answer is 503 store_unavailable as without Expect
        (it was aiohttp's plain-text 500 and a traceback in the log)."""

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("database is locked")

        gw.store.change_counter = down  # type: ignore[method-assign]
        gw.store.list_clients = down  # type: ignore[method-assign]
        stream, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
        writer.write(
            (
                "POST /n/acme/api/v2/signups HTTP/1.1\r\nHost: x\r\n"
                f"X-NBGW-Key: nbgw_{'A' * 43}\r\nContent-Length: 2\r\n"
                "Expect: 100-continue\r\n\r\n"
            ).encode()
        )
        answer = await asyncio.wait_for(stream.read(), 20)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
        assert b"X-NBGW-Error: store_unavailable" in answer

    async def test_a_key_check_the_store_cannot_answer_counts_the_503_it_answers(
        self, gw: Gateway, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A key this process does not know while the store hangs and then fails: the tool
        gets 503 store_unavailable, and that 503 is what the metrics and the audit count
        (they counted 500); the reload that outlived the request leaves no "Task
        exception was never retrieved" traceback behind."""
        released = asyncio.Event()

        async def hung(*args: Any, **kwargs: Any) -> Any:
            await released.wait()
            raise StoreUnavailable("no answer within 15 s")

        gw.store.change_counter = hung  # type: ignore[method-assign]
        gw.store.list_clients = hung  # type: ignore[method-assign]
        resp = await gw.client.post(
            "/n/acme/api/v2/signups", json=SIGNUP, headers={"X-NBGW-Key": f"nbgw_{'B' * 43}"}
        )
        assert resp.status == 503
        assert resp.headers["X-NBGW-Error"] == "store_unavailable"
        assert gw.metric("nbgw_proxy_requests_total", account="none", method="POST", code="503")
        assert not gw.metric("nbgw_proxy_requests_total", account="none", method="POST", code="500")
        released.set()
        for _ in range(5):
            await asyncio.sleep(0.01)
        gc.collect()
        assert "never retrieved" not in caplog.text

    async def test_a_request_the_expect_handler_could_not_decide_gets_its_100_later(
        self, gw: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """The key was added by another process and the reload takes longer than the
        Expect handler waits, so it sends no 100; the handler then finds the key and takes
        the request: it sends the 100 itself before reading the body (a client that waits
        for the 100 got nothing until the body timeout)."""
        reg = registry(gw)
        _info, key = await reg.add("tool", (), False)
        reg._by_key_id = {}  # as if added elsewhere and not yet seen here
        real = gw.store.list_clients

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.7)  # over CATCH_UP_WAIT (0.5 s)
            return await real(*args, **kwargs)

        gw.store.list_clients = slow  # type: ignore[method-assign]
        fake_nb.clear_recordings()
        stream, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
        try:
            writer.write(
                (
                    "POST /n/acme/api/v2/signups HTTP/1.1\r\nHost: x\r\n"
                    f"X-NBGW-Key: {key.reveal()}\r\nContent-Type: application/json\r\n"
                    "Content-Length: 2\r\nExpect: 100-continue\r\n\r\n"
                ).encode()
            )
            interim = await asyncio.wait_for(stream.readuntil(b"\r\n\r\n"), 20)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            writer.write(b"{}")
            final = await asyncio.wait_for(stream.readuntil(b"\r\n\r\n"), 20)
        finally:
            writer.close()
        assert not final.startswith(b"HTTP/1.1 5"), final
        assert len(fake_nb.api_requests) == 1

    async def test_secrets_a_tool_puts_in_path_or_request_id_are_not_kept(
        self, gw: Gateway, connect_account: ConnectAccount
    ) -> None:
        """A client key sent as the request id, or an access token in the path of a write,
        is scrubbed in the audit entry as in the access log (the trail is kept for days and
        shown to every admin); the rest of the path is kept."""
        key = await add_key(gw, "tool")
        token = (await connect_account(gw, "acme"))["access_token"]
        headers = {"X-NBGW-Key": key}
        await gw.client.post(
            "/n/acme/api/v2/signups", json=SIGNUP, headers={**headers, "X-Request-ID": key}
        )
        await gw.client.delete(f"/n/acme/api/v1/tags/{token}", headers=headers)
        await registry(gw).flush()
        entries = await gw.store.audit(limit=10)
        assert len(entries) == 2
        for entry in entries:
            assert key not in entry.request_id and key not in entry.path
            assert token not in entry.path
        deleted, posted = entries
        assert posted.request_id == f"nbgw_{REDACTED}"  # the shape rule keeps the prefix
        assert deleted.path == f"/api/v1/tags/{REDACTED}"

    async def test_any_method_but_a_read_is_recorded(self, gw: Gateway) -> None:
        """A method beyond the usual four (WebDAV's PROPPATCH, a custom PURGE) is a write
        for the audit trail as for read-only keys; HEAD and OPTIONS are reads."""
        key = await add_key(gw, "tool")
        for method in ("PROPPATCH", "PURGE", "HEAD", "OPTIONS"):
            resp = await gw.client.request(
                method, "/n/acme/api/v2/signups", headers={"X-NBGW-Key": key}
            )
            await resp.read()
        await registry(gw).flush()
        assert sorted(e.method for e in await gw.store.audit(limit=10)) == ["PROPPATCH", "PURGE"]

    async def test_retention_drops_old_entries(
        self, gateway_factory: GatewayFactory, connect_account: ConnectAccount, clock: Any
    ) -> None:
        """Entries older than NBGW_AUDIT_RETENTION_DAYS go when new ones are written."""
        gateway = await gateway_factory(audit_retention_days=1.0)
        await connect_account(gateway, "acme")
        await gateway.client.post("/n/acme/api/v2/signups", json=SIGNUP)
        await registry(gateway).flush()
        clock.advance(2 * 86400)
        await connect_account(gateway, "acme")  # fresh token after the jump
        await gateway.client.post("/n/acme/api/v2/signups", json=SIGNUP)
        await registry(gateway).flush()
        [entry] = await gateway.store.audit()
        assert entry.at == clock.now()
        assert entry.client == "anonymous"


class TestAdminApi:
    async def test_create_list_remove_through_the_api(
        self, gw: Gateway, admin_headers: dict[str, str]
    ) -> None:
        """POST shows the key once; GET lists without it; DELETE removes; unknown -> 404."""
        api = "/connect/api/clients"
        created = await gw.client.post(
            api, json={"name": "etl", "nations": ["acme"], "read_only": True}, headers=admin_headers
        )
        assert created.status == 201
        body = await created.json()
        key = body["key"]
        assert key.startswith("nbgw_") and len(key) >= 5 + 43
        assert body["client"]["nations"] == ["acme"] and body["client"]["read_only"] is True
        assert (await get(gw, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": key}))[0] == 200
        dup = await gw.client.post(api, json={"name": "etl"}, headers=admin_headers)
        assert dup.status == 400
        listing = await (await gw.client.get(api, headers=admin_headers)).json()
        assert [c["name"] for c in listing["clients"]] == ["etl"]
        assert key not in str(listing)
        assert (await gw.client.delete(f"{api}/etl", headers=admin_headers)).status == 200
        assert (await gw.client.delete(f"{api}/etl", headers=admin_headers)).status == 404
        assert (await gw.client.get(api)).status == 401


@pytest.fixture
def capture_logs() -> Iterator[Any]:
    """configure_logging() into a buffer; the process-wide logging state is restored after."""
    loggers = [logging.getLogger(name) for name in ("nbgateway", "aiohttp")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    access = logging.getLogger("aiohttp.access")
    access_disabled = access.disabled

    def install(redactor: Redactor, fmt: str) -> io.StringIO:
        buf = io.StringIO()
        configure_logging(redactor, fmt=fmt, level="DEBUG", stream=buf)
        return buf

    yield install
    for lg, old_handlers, level, propagate in saved:
        lg.handlers[:] = old_handlers
        lg.setLevel(level)
        lg.propagate = propagate
    access.disabled = access_disabled


def test_secret_type_is_used_for_keys() -> None:
    """A new key travels as a Secret: printing it by mistake shows nothing."""
    from nbgateway.clients import new_key

    key = new_key()
    assert isinstance(key, Secret)
    assert "nbgw_" not in f"{key}" and "nbgw_" not in repr(key)


async def test_last_use_is_recorded_at_most_once_a_minute(gw: Gateway, clock: Any) -> None:
    """Last-use times reach the store on the first flush, then at most once a minute (each
    write makes every process reload its keys), and are never lost in between."""
    key = await add_key(gw, "sync")
    headers = {"X-NBGW-Key": key}
    await get(gw, "/n/acme/api/v2/signups/me", headers=headers)
    await registry(gw).flush()
    [first] = await registry(gw).list()
    assert first.last_used_at is not None
    assert first.last_used_at == clock.now()
    clock.advance(10)
    await get(gw, "/n/acme/api/v2/signups/me", headers=headers)
    await registry(gw).flush()
    [same] = await registry(gw).list()
    assert same.last_used_at == first.last_used_at
    clock.advance(60)
    await registry(gw).flush()
    [later] = await registry(gw).list()
    assert later.last_used_at == first.last_used_at + 10


async def test_a_re_added_name_does_not_inherit_the_removed_keys_use(
    gw: Gateway, clock: Any
) -> None:
    """Use of a removed key still waiting to be written does not become the last use of a
    new key added under the same name (it was never used)."""
    old = await add_key(gw, "writer")
    assert await get(gw, "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": old}) == (200, None)
    assert await registry(gw).remove("writer")
    clock.advance(5)
    await add_key(gw, "writer")
    clock.advance(60)
    await registry(gw).flush()
    [record] = await registry(gw).list()
    assert record.last_used_at is None
