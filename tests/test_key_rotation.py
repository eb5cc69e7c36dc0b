"""Rotating NBGW_ENCRYPTION_KEY under several processes, as docs/security.md describes it.

Gateways on one database, each with the key list of its step of a rolling rotation, serve
one account while the others refresh it: every answer is the upstream's, nothing is lost.
Skipping the first step (a process still on the old key alone while another seals with the
new one) is shown to fail the way the page warns. Real gateways on sockets, the fake
NationBuilder, one shared test clock.
"""

from __future__ import annotations

import pytest
from conftest import ConnectAccount, Gateway, GatewayFactory, SettingsFactory

from nbgateway.clock import FakeClock
from nbgateway.crypto import Cipher, generate_key
from nbgateway.redact import Secret

SLUG = "acme"
ME = f"/n/{SLUG}/api/v2/signups/me"
LIFETIME = 86400.0  # the fake's access-token lifetime


async def status(gw: Gateway) -> tuple[int, str | None]:
    resp = await gw.client.get(ME)
    await resp.read()
    return resp.status, resp.headers.get("X-NBGW-Error")


def keys(*values: str) -> tuple[Secret, ...]:
    return tuple(Secret(v) for v in values)


@pytest.fixture
def new_key() -> str:
    return generate_key()


async def test_a_rolling_rotation_in_three_steps_answers_throughout(
    gateway_factory: GatewayFactory,
    settings_factory: SettingsFactory,
    connect_account: ConnectAccount,
    clock: FakeClock,
    encryption_key: str,
    new_key: str,
) -> None:
    """Step 1 `old,new` everywhere, step 2 `new,old`, step 3 `rotate-key` then `new` alone:
    at each step a process of the step before reads what one of the step after sealed."""
    old = encryption_key
    first = await gateway_factory(settings_factory(encryption_keys=keys(old)))
    await connect_account(first, SLUG)
    assert await status(first) == (200, None)

    # Step 1: the new key is listed second; nothing is sealed with it yet.
    step1 = await gateway_factory(settings_factory(encryption_keys=keys(old, new_key)))
    assert await status(step1) == (200, None)
    assert await status(first) == (200, None)

    # Step 2: a process with the new key first refreshes (seals with it) ...
    step2 = await gateway_factory(settings_factory(encryption_keys=keys(new_key, old)))
    clock.advance(LIFETIME)
    assert await status(step2) == (200, None)
    new_id = Cipher(keys(new_key)).primary_key_id
    assert new_id in await key_ids(step2)
    # ... and a process still on step 1 opens what it sealed.
    assert await status(step1) == (200, None)

    # Step 3: re-encrypt what is left under the old key, then the new key alone.
    assert (await step2.store.rotate_keys()).skipped == []
    assert await key_ids(step2) == {new_id}
    step3 = await gateway_factory(settings_factory(encryption_keys=keys(new_key)))
    clock.advance(LIFETIME)
    assert await status(step3) == (200, None)
    assert await status(step2) == (200, None)
    assert await key_ids(step3) == {new_id}


async def test_skipping_the_first_step_fails_the_process_left_on_the_old_key(
    gateway_factory: GatewayFactory,
    settings_factory: SettingsFactory,
    connect_account: ConnectAccount,
    clock: FakeClock,
    encryption_key: str,
    new_key: str,
) -> None:
    """What the page warns of: with `new,old` on one process while another still runs with
    the old key alone, the old one cannot open a pair the new one stored (500
    token_store_error), and nothing is lost: the new process keeps serving, and a process
    started with both keys serves again."""
    old = encryption_key
    stale = await gateway_factory(settings_factory(encryption_keys=keys(old)))
    await connect_account(stale, SLUG)
    fresh = await gateway_factory(settings_factory(encryption_keys=keys(new_key, old)))
    clock.advance(LIFETIME)
    assert await status(fresh) == (200, None)
    assert await status(stale) == (500, "token_store_error")
    assert await status(fresh) == (200, None)
    restarted = await gateway_factory(settings_factory(encryption_keys=keys(old, new_key)))
    assert await status(restarted) == (200, None)


async def key_ids(gw: Gateway) -> set[str]:
    """The ids of the keys that sealed the stored account's tokens."""
    cipher = Cipher(keys(generate_key()))  # key_id_of reads the blob's header only
    return {
        cipher.key_id_of(value)
        for row in (await gw.store.dump()).accounts
        for value in row.values()
        if isinstance(value, bytes)
    }
