"""`nbgateway migrate --to TARGET`: every row copied still encrypted; the target serves at once.

The command runs in process (`cli.main` in a worker thread, since it runs its own event
loop) against databases that real gateways use before and after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ADMIN_TOKEN, CLIENT_ID, CLIENT_SECRET, ConnectAccount, GatewayFactory

from nbgateway import keys
from nbgateway.cli import main
from nbgateway.config import Settings
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.models import EventKind


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures process-wide logging; put it back for later tests."""
    logger = logging.getLogger("nbgateway")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def cli_environ(settings: Settings) -> dict[str, str]:
    return {
        "NBGW_DATABASE": str(settings.database),
        "NBGW_ENCRYPTION_KEY": ",".join(k.reveal() for k in settings.encryption_keys),
        "NBGW_CLIENT_ID": CLIENT_ID,
        "NBGW_CLIENT_SECRET": CLIENT_SECRET,
        "NBGW_ADMIN_TOKEN": ADMIN_TOKEN,
    }


async def migrate(
    settings: Settings, target: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["migrate", "--to", target], cli_environ(settings))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestMigrate:
    async def test_sqlite_to_postgresql_and_back(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        pg_url: str,
    ) -> None:
        """SQLite -> PostgreSQL -> a new SQLite file: the last copy serves without a refresh,
        with the same generation and events as the first."""
        source = await gateway_factory()
        issued = await connect_account(source, "acme")
        before = await source.accounts.get("acme")
        assert (await migrate(source.settings, pg_url, capsys))[0] == 0
        on_pg = await gateway_factory(database=pg_url)
        back = tmp_path / "back.db"
        code, _out, err = await migrate(on_pg.settings, str(back), capsys)
        assert code == 0, err
        fake_nb.clear_recordings()
        final = await gateway_factory(database=back)
        resp = await final.client.get("/n/acme/api/v2/signups/me")
        assert resp.status == 200
        assert fake_nb.token_requests == []
        [call] = fake_nb.api_requests
        assert call.headers["Authorization"] == f"Bearer {issued['access_token']}"
        after = await final.accounts.get("acme")
        assert after.generation == before.generation
        assert await final.accounts.events("acme") == await source.accounts.events("acme")

    async def test_copy_and_serve_from_the_target_without_a_refresh(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        fake_nb: FakeNationBuilder,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        any_database: Path | str,
    ) -> None:
        """Accounts, events, pending authorizations and client keys arrive in the target (a
        SQLite file or a PostgreSQL database); a gateway on the target serves with the
        copied access token, making no token call, and the copied key still works."""
        source = await gateway_factory()
        issued = await connect_account(source, "acme")
        await connect_account(source, "bravo")
        await source.accounts.start_connect("charlie")
        _info, key = await source.app[keys.CLIENTS].add("sync")
        events_before = await source.accounts.events(limit=100)

        # The SQLite variant's file would be the source's own: copy next to it instead.
        target = tmp_path / "copy.db" if isinstance(any_database, Path) else any_database
        code, out, err = await migrate(source.settings, str(target), capsys)
        assert code == 0, err
        assert (
            "copied 2 account(s), 2 event(s), 1 pending authorization(s), 1 client key(s) and 0 "
            "audit record(s)"
        ) in out

        fake_nb.clear_recordings()
        copy = await gateway_factory(database=target, client_auth="required")
        resp = await copy.client.get(
            "/n/acme/api/v2/signups/me", headers={"X-NBGW-Key": key.reveal()}
        )
        assert resp.status == 200
        assert fake_nb.token_requests == []
        [call] = fake_nb.api_requests
        assert call.headers["Authorization"] == f"Bearer {issued['access_token']}"
        assert await copy.accounts.events(limit=100) == events_before
        assert [e.kind for e in await copy.accounts.events("acme")] == [EventKind.CONNECTED]

    async def test_target_with_accounts_is_refused(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        settings: Settings,
    ) -> None:
        """A second migrate into the same target copies nothing and exits non-zero."""
        source = await gateway_factory()
        await connect_account(source, "acme")
        target = str(tmp_path / "copy.db")
        assert (await migrate(source.settings, target, capsys))[0] == 0
        code, _out, err = await migrate(source.settings, target, capsys)
        assert code == 1
        assert "already holds accounts" in err

    async def test_configured_database_as_target_is_refused(
        self, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--to naming NBGW_DATABASE itself is a usage error."""
        code, _out, err = await migrate(settings, str(settings.database), capsys)
        assert code == 2
        assert "configured database itself" in err

    async def test_unreadable_source_row_copies_nothing(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A row that does not decrypt stops the copy before the target is even created."""
        import sqlite3

        source = await gateway_factory()
        await connect_account(source, "acme")
        with sqlite3.connect(source.settings.database) as conn:
            conn.execute("UPDATE accounts SET refresh_token = X'00' WHERE slug = 'acme'")
        target = tmp_path / "copy.db"
        code, _out, err = await migrate(source.settings, str(target), capsys)
        assert code == 1
        assert "1 stored row(s)" in err and "nothing was copied" in err
        assert not target.exists()
