"""Tests for the fake NationBuilder server (nbgateway.fakenb)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nbgateway.fakenb import FakeNationBuilder

CLIENT_ID = "fake-client-id"
CLIENT_SECRET = "fake-client-secret"
REDIRECT = "https://gw.example/callback"

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]


class FakeClock:
    """A settable clock so expiry and rate windows are tested without sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeNationBuilder:
    return FakeNationBuilder(clock=clock)


@pytest.fixture
async def client(fake: FakeNationBuilder, aiohttp_client: AiohttpClient) -> Client:
    test_client = await aiohttp_client(fake.app)
    fake.base_url = str(test_client.server.make_url("")).rstrip("/")
    return test_client


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_params(**extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "state": "st-1",
    }
    params.update(extra)
    return params


async def get_code(client: Client, slug: str = "acme", **extra: str) -> str:
    form = {**authorize_params(**extra), "decision": "approve"}
    resp = await client.post(f"/{slug}/oauth/authorize", data=form, allow_redirects=False)
    assert resp.status == 302, await resp.text()
    query = parse_qs(urlsplit(resp.headers["Location"]).query)
    return query["code"][0]


async def token_call(
    client: Client, slug: str, params: dict[str, str], *, as_json: bool = False
) -> tuple[int, Any]:
    body = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **params}
    if as_json:
        resp = await client.post(f"/{slug}/oauth/token", json=body)
    else:
        resp = await client.post(f"/{slug}/oauth/token", data=body)
    text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


async def exchange(client: Client, slug: str = "acme", **extra: str) -> dict[str, Any]:
    code = await get_code(client, slug)
    status, body = await token_call(
        client,
        slug,
        {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, **extra},
    )
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def refresh(client: Client, refresh_token: str, slug: str = "acme") -> tuple[int, Any]:
    return await token_call(
        client, slug, {"grant_type": "refresh_token", "refresh_token": refresh_token}
    )


async def api_get(client: Client, path: str, token: str | None) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.get(path, headers=headers)


# ---------------------------------------------------------------------- authorize


async def test_authorize_page_renders_and_escapes(client: Client) -> None:
    """The consent page names app and nation, has approve/deny buttons and escapes input."""
    params = authorize_params(state='"><script>alert(1)</script>')
    resp = await client.get("/acme/oauth/authorize", params=params)
    text = await resp.text()
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "Authorize NB Gateway to access acme?" in text
    assert 'id="approve"' in text and 'value="approve"' in text
    assert 'id="deny"' in text and 'value="deny"' in text
    assert "<script>" not in text
    assert "&quot;&gt;&lt;script&gt;" in text


@pytest.mark.parametrize(
    "override", [{"response_type": "token"}, {"client_id": "someone-else"}, {"redirect_uri": ""}]
)
async def test_authorize_rejects_bad_parameters(client: Client, override: dict[str, str]) -> None:
    """Bad response_type/client_id/redirect_uri get a 400 HTML page and no redirect."""
    params = authorize_params(**override)
    resp = await client.get("/acme/oauth/authorize", params=params, allow_redirects=False)
    assert resp.status == 400
    assert resp.content_type == "text/html"
    assert "Location" not in resp.headers


async def test_approve_redirects_with_code_and_state(client: Client) -> None:
    """Approving redirects to redirect_uri with a code and the original state."""
    form = {**authorize_params(), "decision": "approve"}
    resp = await client.post("/acme/oauth/authorize", data=form, allow_redirects=False)
    assert resp.status == 302
    location = urlsplit(resp.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["st-1"]
    assert len(query["code"][0]) > 20


async def test_deny_redirects_with_access_denied(client: Client) -> None:
    """Denying redirects with error=access_denied, a description and the state."""
    form = {**authorize_params(), "decision": "deny"}
    resp = await client.post("/acme/oauth/authorize", data=form, allow_redirects=False)
    assert resp.status == 302
    query = parse_qs(urlsplit(resp.headers["Location"]).query)
    assert query["error"] == ["access_denied"]
    assert query["error_description"]
    assert query["state"] == ["st-1"]
    assert "code" not in query


async def test_auto_approve_skips_consent(client: Client, fake: FakeNationBuilder) -> None:
    """With auto_approve the GET redirects at once with a code."""
    fake.auto_approve = True
    resp = await client.get(
        "/acme/oauth/authorize", params=authorize_params(), allow_redirects=False
    )
    assert resp.status == 302
    assert "code" in parse_qs(urlsplit(resp.headers["Location"]).query)


# ---------------------------------------------------------------------- token endpoint


async def test_code_exchange_form_encoded(client: Client, clock: FakeClock) -> None:
    """A form-encoded code exchange returns the documented token response."""
    body = await exchange(client)
    assert body["access_token"].startswith("nbfake-at-")
    assert body["refresh_token"].startswith("nbfake-rt-")
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 86400
    assert body["scope"] == "default"
    assert body["created_at"] == int(clock.now)


async def test_code_exchange_json_body(client: Client) -> None:
    """A JSON code exchange works the same as a form-encoded one."""
    code = await get_code(client)
    status, body = await token_call(
        client,
        "acme",
        {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT},
        as_json=True,
    )
    assert status == 200
    assert body["access_token"].startswith("nbfake-at-")


async def test_code_is_single_use(client: Client) -> None:
    """A code works once; the second exchange is invalid_grant."""
    code = await get_code(client)
    params = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    assert (await token_call(client, "acme", params))[0] == 200
    status, body = await token_call(client, "acme", params)
    assert status == 400
    assert body["error"] == "invalid_grant"


async def test_code_expires_after_ten_minutes(client: Client, clock: FakeClock) -> None:
    """A code older than 600 s by the injected clock is invalid_grant."""
    code = await get_code(client)
    clock.advance(601)
    params = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    status, body = await token_call(client, "acme", params)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_redirect_uri_mismatch_is_invalid_grant(client: Client) -> None:
    """Exchanging with a different redirect_uri than authorized is invalid_grant."""
    code = await get_code(client)
    params = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT + "x"}
    status, body = await token_call(client, "acme", params)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_pkce_verifier_checked(client: Client) -> None:
    """With a code_challenge, a wrong verifier fails and the right one succeeds."""
    verifier = "v" * 50
    extra = {"code_challenge": s256(verifier), "code_challenge_method": "S256"}
    code = await get_code(client, **extra)
    base = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    status, body = await token_call(client, "acme", {**base, "code_verifier": "w" * 50})
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await token_call(client, "acme", base)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await token_call(client, "acme", {**base, "code_verifier": verifier})
    assert status == 200


async def test_invalid_client_is_401_and_echoes_params(client: Client) -> None:
    """A wrong client_secret is 401 invalid_client whose description echoes the secret sent."""
    resp = await client.post(
        "/acme/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "rt-x",
            "client_id": CLIENT_ID,
            "client_secret": "wrong-secret",
        },
    )
    body = await resp.json()
    assert resp.status == 401
    assert body["error"] == "invalid_client"
    assert "wrong-secret" in body["error_description"]
    assert "rt-x" in body["error_description"]


async def test_unsupported_grant_type(client: Client) -> None:
    """An unknown grant_type is 400 unsupported_grant_type."""
    status, body = await token_call(client, "acme", {"grant_type": "password"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")


async def test_refresh_rotates_and_old_token_dies(client: Client) -> None:
    """Refreshing returns a new pair; the used refresh token is then invalid_grant."""
    first = await exchange(client)
    status, second = await refresh(client, first["refresh_token"])
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    status, body = await refresh(client, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await refresh(client, second["refresh_token"]))[0] == 200


async def test_mangled_answer_still_rotates(client: Client, fake: FakeNationBuilder) -> None:
    """mangle_token_answers replaces fields of the next answer after the grant: the used
    refresh token is spent and the answer's new refresh token works; the next answer is
    whole again. Floats outside JSON go out as Infinity/NaN."""
    first = await exchange(client)
    fake.mangle_token_answers({"token_type": "mac", "expires_in": float("inf")})
    resp = await client.post(
        "/acme/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    raw = await resp.text()
    assert resp.status == 200
    assert '"expires_in": Infinity' in raw
    second = json.loads(raw)
    assert second["token_type"] == "mac"
    assert (await refresh(client, first["refresh_token"]))[0] == 400
    status, third = await refresh(client, second["refresh_token"])
    assert status == 200
    assert third["token_type"] == "Bearer"


async def test_refresh_grace_window(
    client: Client, fake: FakeNationBuilder, clock: FakeClock
) -> None:
    """Inside refresh_grace_seconds a reused refresh token returns the same new pair."""
    fake.refresh_grace_seconds = 5
    first = await exchange(client)
    _, second = await refresh(client, first["refresh_token"])
    clock.advance(4)
    status, again = await refresh(client, first["refresh_token"])
    assert status == 200
    assert again == second
    clock.advance(2)
    status, body = await refresh(client, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_revoke_family_on_reuse(client: Client, fake: FakeNationBuilder) -> None:
    """With revoke_family_on_reuse, reusing a dead refresh token kills the current pair too."""
    fake.revoke_family_on_reuse = True
    first = await exchange(client)
    _, second = await refresh(client, first["refresh_token"])
    assert (await refresh(client, first["refresh_token"]))[0] == 400
    status, body = await refresh(client, second["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    resp = await api_get(client, "/acme/api/v2/signups/me", second["access_token"])
    assert resp.status == 401


async def test_reuse_without_family_revocation_keeps_current_pair(client: Client) -> None:
    """By default a reuse attempt leaves the current pair working."""
    first = await exchange(client)
    _, second = await refresh(client, first["refresh_token"])
    assert (await refresh(client, first["refresh_token"]))[0] == 400
    assert (await refresh(client, second["refresh_token"]))[0] == 200


@pytest.mark.parametrize("survives", [True, False])
async def test_old_access_token_after_refresh(
    client: Client, fake: FakeNationBuilder, survives: bool
) -> None:
    """old_access_token_survives_refresh decides whether the previous access token still works."""
    fake.old_access_token_survives_refresh = survives
    first = await exchange(client)
    await refresh(client, first["refresh_token"])
    resp = await api_get(client, "/acme/api/v2/signups/me", first["access_token"])
    assert resp.status == (200 if survives else 401)


async def test_legacy_token_migrates_once(client: Client, fake: FakeNationBuilder) -> None:
    """A legacy token works on v1, is token_upgrade_required on v2, and refreshes exactly once."""
    fake.add_legacy_token("acme", "legacy-abc")
    assert (await api_get(client, "/acme/api/v1/people/me", "legacy-abc")).status == 200
    resp = await api_get(client, "/acme/api/v2/signups/me", "legacy-abc")
    assert resp.status == 401
    assert (await resp.json())["code"] == "token_upgrade_required"
    status, pair = await refresh(client, "legacy-abc")
    assert status == 200
    assert pair["refresh_token"] != "legacy-abc"
    status, body = await refresh(client, "legacy-abc")
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_tokens_are_bound_to_their_nation(client: Client, fake: FakeNationBuilder) -> None:
    """A nation's access and refresh tokens are rejected by another nation."""
    pair = fake.issue_tokens("acme")
    assert (await api_get(client, "/acme/api/v2/signups/me", pair["access_token"])).status == 200
    resp = await api_get(client, "/other/api/v2/signups/me", pair["access_token"])
    assert resp.status == 401
    assert (await resp.json())["code"] == "unauthorized"
    status, body = await refresh(client, pair["refresh_token"], slug="other")
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_revoke_kills_every_token_of_the_nation(
    client: Client, fake: FakeNationBuilder
) -> None:
    """After revoke() the refresh token is invalid_grant and the access token unauthorized."""
    pair = fake.issue_tokens("acme")
    fake.revoke("acme")
    status, body = await refresh(client, pair["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    resp = await api_get(client, "/acme/api/v2/signups/me", pair["access_token"])
    assert (resp.status, (await resp.json())["code"]) == (401, "unauthorized")


# ---------------------------------------------------------------------- API auth


async def test_api_401_bodies(client: Client, fake: FakeNationBuilder, clock: FakeClock) -> None:
    """Missing/unknown tokens are 401 unauthorized; expired ones 401 token_expired."""
    for token in (None, "nbfake-at-unknown"):
        resp = await api_get(client, "/acme/api/v2/signups", token)
        body = await resp.json(content_type=None)
        assert resp.status == 401
        assert body["code"] == "unauthorized"
        assert body["message"].startswith("You are not authorized to access this content.")
        assert resp.content_type == "application/vnd.api+json"
    pair = fake.issue_tokens("acme")
    clock.advance(86400)
    resp = await api_get(client, "/acme/api/v1/people", pair["access_token"])
    assert resp.status == 401
    assert resp.content_type == "application/json"
    assert (await resp.json())["code"] == "token_expired"


async def test_expire_access_tokens_switch(client: Client, fake: FakeNationBuilder) -> None:
    """expire_access_tokens() makes current tokens token_expired; new ones still work."""
    old = fake.issue_tokens("acme")
    other = fake.issue_tokens("beta")
    fake.expire_access_tokens("acme")
    resp = await api_get(client, "/acme/api/v2/signups", old["access_token"])
    assert (await resp.json(content_type=None))["code"] == "token_expired"
    assert (await api_get(client, "/beta/api/v2/signups", other["access_token"])).status == 200
    fresh = fake.issue_tokens("acme")
    assert (await api_get(client, "/acme/api/v2/signups", fresh["access_token"])).status == 200
    fake.expire_access_tokens()
    assert (await api_get(client, "/beta/api/v2/signups", other["access_token"])).status == 401


async def test_access_token_query_parameter(client: Client, fake: FakeNationBuilder) -> None:
    """The legacy ?access_token= query parameter authenticates like the header."""
    pair = fake.issue_tokens("acme")
    resp = await client.get("/acme/api/v1/people", params={"access_token": pair["access_token"]})
    assert resp.status == 200


# ---------------------------------------------------------------------- API v2


async def test_v2_pagination_links(client: Client, fake: FakeNationBuilder) -> None:
    """Pages carry relative self/prev/next links; next stays until an empty page ends the list."""
    token = fake.issue_tokens("acme")["access_token"]
    resp = await api_get(client, "/acme/api/v2/signups", token)
    assert resp.content_type == "application/vnd.api+json"
    doc = await resp.json(content_type=None)
    assert len(doc["data"]) == 20
    assert doc["links"]["self"] == "/api/v2/signups?page[number]=1&page[size]=20"
    assert doc["links"]["next"] == "/api/v2/signups?page[number]=2&page[size]=20"
    assert "prev" not in doc["links"]
    item = doc["data"][0]
    assert item["type"] == "signups"
    assert set(item["attributes"]) >= {"first_name", "last_name", "email"}
    related = item["relationships"]["petition_signatures"]["links"]["related"]
    assert related == f"/api/v2/petition_signatures?filter[signup_id]={item['id']}"

    ids: list[str] = []
    path: str | None = "/api/v2/signups?page[number]=1&page[size]=10"
    pages = 0
    while path is not None:
        doc = await (await api_get(client, "/acme" + path, token)).json(content_type=None)
        pages += 1
        if pages > 1:
            assert "prev" in doc["links"]
        ids.extend(item["id"] for item in doc["data"])
        path = doc["links"].get("next")
        if not doc["data"]:
            assert path is None
    assert pages == 6  # 45 people in pages of 10, then the empty end page
    assert len(ids) == len(set(ids)) == 45


@pytest.mark.parametrize(
    "query", ["page[size]=0", "page[size]=101", "page[number]=0", "page[size]=x"]
)
async def test_v2_bad_page_parameters(client: Client, fake: FakeNationBuilder, query: str) -> None:
    """Out-of-range page parameters are 400 bad_request with a flat body."""
    token = fake.issue_tokens("acme")["access_token"]
    resp = await api_get(client, f"/acme/api/v2/signups?{query}", token)
    assert resp.status == 400
    assert (await resp.json(content_type=None))["code"] == "bad_request"


async def test_v2_page_size_100_and_filter(client: Client, fake: FakeNationBuilder) -> None:
    """page[size]=100 is allowed; filter[email] narrows the list; unknown filters are 400."""
    token = fake.issue_tokens("acme")["access_token"]
    doc = await (await api_get(client, "/acme/api/v2/signups?page[size]=100", token)).json(
        content_type=None
    )
    assert len(doc["data"]) == 45
    email = doc["data"][4]["attributes"]["email"]
    resp = await client.get(
        "/acme/api/v2/signups",
        params={"filter[email]": email.upper()},
        headers={"Authorization": f"Bearer {token}"},
    )
    found = await resp.json(content_type=None)
    assert [d["attributes"]["email"] for d in found["data"]] == [email]
    assert "filter[email]=" in found["links"]["next"]
    resp = await api_get(client, "/acme/api/v2/signups?filter[bogus]=1", token)
    assert resp.status == 400


async def test_v2_show_me_and_404(client: Client, fake: FakeNationBuilder) -> None:
    """Show returns one record, /me the admin, and a missing id 404 not_found."""
    token = fake.issue_tokens("acme")["access_token"]
    doc = await (await api_get(client, "/acme/api/v2/signups/7", token)).json(content_type=None)
    assert doc["data"]["id"] == "7"
    doc = await (await api_get(client, "/acme/api/v2/signups/me", token)).json(content_type=None)
    assert doc["data"]["id"] == "1"
    resp = await api_get(client, "/acme/api/v2/signups/9999", token)
    assert resp.status == 404
    assert await resp.json(content_type=None) == {
        "code": "not_found",
        "message": "Record not found",
    }


async def test_v2_create_update_delete(client: Client, fake: FakeNationBuilder) -> None:
    """POST validates (422 without email) and creates (201); PATCH updates; DELETE is 200 meta."""
    headers = {"Authorization": f"Bearer {fake.issue_tokens('acme')['access_token']}"}
    url = "/acme/api/v2/signups"
    resp = await client.post(
        url, json={"data": {"type": "signups", "attributes": {"first_name": "X"}}}, headers=headers
    )
    assert resp.status == 422
    errors = (await resp.json(content_type=None))["errors"]
    assert errors[0]["source"] == {"pointer": "/data/attributes/email"}
    assert errors[0]["status"] == "422"
    assert errors[0]["meta"]["attribute"] == "email"

    attrs = {"first_name": "New", "last_name": "Person", "email": "new@example.org"}
    resp = await client.post(
        url, json={"data": {"type": "signups", "attributes": attrs}}, headers=headers
    )
    assert resp.status == 201
    created = (await resp.json(content_type=None))["data"]
    assert created["attributes"]["email"] == "new@example.org"
    new_id = created["id"]

    patch = {"data": {"type": "signups", "id": new_id, "attributes": {"last_name": "Changed"}}}
    resp = await client.patch(f"{url}/{new_id}", json=patch, headers=headers)
    assert resp.status == 200
    assert (await resp.json(content_type=None))["data"]["attributes"]["last_name"] == "Changed"

    resp = await client.delete(f"{url}/{new_id}", headers=headers)
    assert resp.status == 200
    assert await resp.json(content_type=None) == {"meta": {}}
    assert (await client.get(f"{url}/{new_id}", headers=headers)).status == 404


# ---------------------------------------------------------------------- API v1


async def test_v1_token_pagination(client: Client, fake: FakeNationBuilder) -> None:
    """v1 pages via relative __nonce/__token next links until next is null."""
    token = fake.issue_tokens("acme")["access_token"]
    resp = await api_get(client, "/acme/api/v1/people?limit=20", token)
    assert resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["prev"] is None
    assert doc["next"].startswith("/api/v1/people?__nonce=")
    assert "__token=" in doc["next"] and doc["next"].endswith("limit=20")
    ids = [p["id"] for p in doc["results"]]
    while doc["next"] is not None:
        doc = await (await api_get(client, "/acme" + doc["next"], token)).json()
        assert doc["prev"] is not None
        ids.extend(p["id"] for p in doc["results"])
    assert ids == list(range(1, 46))
    doc = await (await api_get(client, "/acme/api/v1/people?limit=500", token)).json()
    assert len(doc["results"]) == 45  # capped at 100, which is all of them
    doc = await (await api_get(client, "/acme/api/v1/people?limit=100", token)).json()
    assert doc["next"] is None


async def test_v1_show_create_delete(client: Client, fake: FakeNationBuilder) -> None:
    """v1 show wraps in person, create is 201, delete is 204, missing is 404 not_found."""
    headers = {"Authorization": f"Bearer {fake.issue_tokens('acme')['access_token']}"}
    doc = await (await client.get("/acme/api/v1/people/3", headers=headers)).json()
    assert doc["person"]["id"] == 3
    doc = await (await client.get("/acme/api/v1/people/me", headers=headers)).json()
    assert doc["person"]["id"] == 1
    resp = await client.post(
        "/acme/api/v1/people", json={"person": {"email": "v1@example.org"}}, headers=headers
    )
    assert resp.status == 201
    pid = (await resp.json())["person"]["id"]
    resp = await client.delete(f"/acme/api/v1/people/{pid}", headers=headers)
    assert resp.status == 204
    resp = await client.get(f"/acme/api/v1/people/{pid}", headers=headers)
    assert resp.status == 404
    assert await resp.json() == {"code": "not_found", "message": "Record not found"}


# ---------------------------------------------------------------------- rate limit


async def test_rate_limit_headers_and_429(client: Client, clock: FakeClock) -> None:
    """Responses carry RateLimit-*; past the limit a 429 with Retry-After; a new window resets."""
    fake = FakeNationBuilder(clock=clock, rate_limit=3, rate_window=10)
    test_client = TestClient(TestServer(fake.app))
    await test_client.start_server()
    try:
        token = fake.issue_tokens("acme")["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        remaining = []
        for _ in range(3):
            resp = await test_client.get("/acme/api/v2/signups/me", headers=headers)
            assert resp.status == 200
            assert resp.headers["RateLimit-Limit"] == "3"
            assert resp.headers["RateLimit-Reset"] == str(int(clock.now) + 10)
            remaining.append(resp.headers["RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]
        clock.advance(4)
        resp = await test_client.get("/acme/api/v2/signups/me", headers=headers)
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "6"
        body = await resp.json(content_type=None)
        assert body == {"message": "You have made too many requests. Please try again later."}
        other = fake.issue_tokens("acme")["access_token"]  # the budget is per token
        resp = await test_client.get(
            "/acme/api/v2/signups/me", headers={"Authorization": f"Bearer {other}"}
        )
        assert resp.status == 200
        clock.advance(6)
        assert (await test_client.get("/acme/api/v2/signups/me", headers=headers)).status == 200
    finally:
        await test_client.close()


async def test_rate_limit_is_off_by_default_and_set_by_control(
    client: Client, fake: FakeNationBuilder, clock: FakeClock
) -> None:
    """No limit and no RateLimit headers by default; the control endpoint turns a limit on,
    windows are aligned to multiples of the window, and /_fake/state counts the 429s."""
    token = fake.issue_tokens("acme")["access_token"]
    resp = await api_get(client, "/acme/api/v2/signups/me", token)
    assert resp.status == 200
    assert "RateLimit-Limit" not in resp.headers
    clock.advance(3)  # 3 s into a 10 s window
    ok = await client.post(
        "/_fake/control", json={"action": "set", "rate_limit": 1, "rate_window": 10}
    )
    assert ok.status == 200
    first = await api_get(client, "/acme/api/v2/signups/me", token)
    assert first.headers["RateLimit-Reset"] == str(int(clock.now) - 3 + 10)
    second = await api_get(client, "/acme/api/v2/signups/me", token)
    assert second.status == 429
    assert second.headers["Retry-After"] == "7"
    state = await (await client.get("/_fake/state")).json()
    assert (state["rate_limit"], state["rate_window"], state["rate_limited_total"]) == (1, 10, 1)


# ---------------------------------------------------------------------- injected failures


@pytest.mark.parametrize(("kind", "status"), [("invalid_grant", 400), ("invalid_client", 401)])
async def test_fail_token_json_errors(
    client: Client, fake: FakeNationBuilder, kind: str, status: int
) -> None:
    """Injected invalid_grant/invalid_client answer JSON echoing secret and refresh token."""
    pair = fake.issue_tokens("acme")
    fake.fail_token(kind)
    code, body = await refresh(client, pair["refresh_token"])
    assert (code, body["error"]) == (status, kind)
    assert CLIENT_SECRET in body["error_description"]
    assert pair["refresh_token"] in body["error_description"]
    assert (await refresh(client, pair["refresh_token"]))[0] == 200  # only `times` failures


@pytest.mark.parametrize(
    ("kind", "status"), [("server_error", 502), ("rate_limited", 429), ("malformed", 200)]
)
async def test_fail_token_non_json_answers(
    client: Client, fake: FakeNationBuilder, kind: str, status: int
) -> None:
    """server_error/rate_limited are Cloudflare HTML; malformed is 200 with unparseable JSON."""
    fake.fail_token(kind, times=2)
    for _ in range(2):
        resp = await client.post("/acme/oauth/token", data={"grant_type": "refresh_token"})
        text = await resp.text()
        assert resp.status == status
        with pytest.raises(ValueError):
            json.loads(text)
        if kind != "malformed":
            assert "cf-error-details" in text
    if kind == "rate_limited":
        assert "Retry-After" in resp.headers
    resp = await client.post("/acme/oauth/token", data={"grant_type": "refresh_token"})
    assert resp.status == 401  # the switch is used up: a real (invalid_client) answer


async def test_fail_token_hang(client: Client, fake: FakeNationBuilder) -> None:
    """hang never answers: the client's own timeout fires."""
    fake.fail_token("hang")
    with pytest.raises(TimeoutError):
        await client.post(
            "/acme/oauth/token", data={"x": "y"}, timeout=aiohttp.ClientTimeout(total=0.3)
        )
    assert len(fake.token_requests) == 1


async def test_fail_token_close(client: Client, fake: FakeNationBuilder) -> None:
    """close drops the connection without any response."""
    fake.fail_token("close")
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.post("/acme/oauth/token", data={"grant_type": "refresh_token"})


async def test_fail_token_lost_rotates_and_drops_the_answer(
    client: Client, fake: FakeNationBuilder
) -> None:
    """lost makes the grant, then drops the connection: the refresh token sent is spent
    (strict rotation), though the caller never saw the pair it was rotated into."""
    first = await exchange(client)
    fake.fail_token("lost")
    with pytest.raises(aiohttp.ClientConnectionError):
        await refresh(client, first["refresh_token"])
    status, body = await refresh(client, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert len(fake.token_requests) == 3


async def test_refresh_token_kept_until_the_new_access_token_is_used(
    client: Client, fake: FakeNationBuilder
) -> None:
    """Doorkeeper's previous_refresh_token: the used refresh token keeps working (each use
    mints another pair) until an access token rotated from it is first used; then it is
    revoked, and the newest pair carries on."""
    fake.refresh_token_kept_until_used = True
    first = await exchange(client)
    status, second = await refresh(client, first["refresh_token"])
    assert status == 200
    status, third = await refresh(client, first["refresh_token"])  # second never used
    assert status == 200
    assert third["refresh_token"] != second["refresh_token"]
    resp = await api_get(client, "/acme/api/v2/signups/me", third["access_token"])
    assert resp.status == 200
    status, body = await refresh(client, first["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await refresh(client, third["refresh_token"]))[0] == 200


async def test_refresh_token_is_spent_at_once_by_default(
    client: Client, fake: FakeNationBuilder
) -> None:
    """Without the Doorkeeper option a refresh token is single-use, whether or not the
    pair it was rotated into was ever used."""
    first = await exchange(client)
    assert (await refresh(client, first["refresh_token"]))[0] == 200
    assert (await refresh(client, first["refresh_token"]))[0] == 400


def test_fail_token_rejects_unknown_kind(fake: FakeNationBuilder) -> None:
    """An unknown failure kind is a ValueError, not a silent no-op."""
    with pytest.raises(ValueError, match="unknown"):
        fake.fail_token("explode")


async def test_hold_and_release_tokens(client: Client, fake: FakeNationBuilder) -> None:
    """Held token requests are counted as pending and all answer after release."""
    pairs = [fake.issue_tokens("acme") for _ in range(2)]
    fake.hold_tokens()
    tasks = [asyncio.create_task(refresh(client, p["refresh_token"])) for p in pairs]
    await fake.wait_for_pending_tokens(2, timeout=2)
    assert fake.pending_token_requests == 2
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in tasks)
    fake.release_tokens()
    results = await asyncio.gather(*tasks)
    assert [status for status, _ in results] == [200, 200]
    assert fake.pending_token_requests == 0


async def test_wait_for_pending_tokens_times_out(fake: FakeNationBuilder) -> None:
    """wait_for_pending_tokens raises TimeoutError when too few requests arrive."""
    with pytest.raises(TimeoutError):
        await fake.wait_for_pending_tokens(1, timeout=0.05)


async def test_token_delay(client: Client, fake: FakeNationBuilder) -> None:
    """token_delay postpones token answers by that many seconds."""
    fake.token_delay = 0.2
    started = time.monotonic()
    status, _ = await refresh(client, fake.issue_tokens("acme")["refresh_token"])
    assert status == 200
    assert time.monotonic() - started >= 0.19


async def test_api_switches(client: Client, fake: FakeNationBuilder) -> None:
    """api_fail_401_times forces token_expired N times; api_hang never answers."""
    token = fake.issue_tokens("acme")["access_token"]
    fake.api_fail_401_times = 2
    for _ in range(2):
        resp = await api_get(client, "/acme/api/v2/signups/me", token)
        assert (resp.status, (await resp.json(content_type=None))["code"]) == (401, "token_expired")
    assert (await api_get(client, "/acme/api/v2/signups/me", token)).status == 200
    fake.api_hang = True
    with pytest.raises(TimeoutError):
        await client.get(
            "/acme/api/v2/signups/me",
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    fake.reset_switches()
    assert fake.api_hang is False
    assert (await api_get(client, "/acme/api/v2/signups/me", token)).status == 200


# ---------------------------------------------------------------------- control + recording


async def test_control_endpoint_and_state(client: Client, fake: FakeNationBuilder) -> None:
    """POST /_fake/control steers the fake and GET /_fake/state reports counts."""
    resp = await client.post("/_fake/control", json={"action": "issue_tokens", "slug": "acme"})
    pair = (await resp.json())["tokens"]
    command = {"action": "fail_token", "kind": "invalid_grant"}
    assert (await client.post("/_fake/control", json=command)).status == 200
    status, body = await refresh(client, pair["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")

    resp = await client.post("/_fake/control", json={"action": "set", "api_fail_401_times": 1})
    assert (await resp.json())["ok"] is True
    assert fake.api_fail_401_times == 1
    resp = await client.post("/_fake/control", json={"action": "set", "rate_limit": True})
    assert resp.status == 400
    resp = await client.post("/_fake/control", json={"action": "reset"})
    assert fake.api_fail_401_times == 0

    await client.post("/_fake/control", json={"action": "expire_access_tokens", "slug": "acme"})
    resp = await api_get(client, "/acme/api/v2/signups/me", pair["access_token"])
    assert (await resp.json(content_type=None))["code"] == "token_expired"
    await client.post("/_fake/control", json={"action": "revoke", "slug": "acme"})
    assert (await refresh(client, pair["refresh_token"]))[0] == 400
    resp = await client.post("/_fake/control", json={"action": "nope"})
    assert resp.status == 400

    state = await (await client.get("/_fake/state")).json()
    assert state["token_requests"] == {"acme": {"refresh_token": 2}}
    assert state["api_requests"] == {"acme": 1}
    assert state["api_requests_total"] == 1


async def test_requests_are_recorded(client: Client, fake: FakeNationBuilder) -> None:
    """Every request is recorded with method, path, query, headers, body and slug."""
    pair = fake.issue_tokens("acme")
    await refresh(client, pair["refresh_token"])
    await client.get(
        "/acme/api/v2/signups?page[size]=5", headers={"Authorization": "Bearer t", "X-A": "b"}
    )
    assert [r.path for r in fake.requests] == ["/acme/oauth/token", "/acme/api/v2/signups"]
    token_req = fake.token_requests[0]
    assert token_req.method == "POST"
    assert token_req.slug == "acme"
    assert token_req.params()["refresh_token"] == pair["refresh_token"]
    assert b"grant_type=refresh_token" in token_req.body
    api_req = fake.api_requests[0]
    assert api_req.query["page[size]"] == "5"
    assert api_req.headers["x-a"] == "b"


# ---------------------------------------------------------------------- links + test helpers


async def test_absolute_links_switch(client: Client, fake: FakeNationBuilder) -> None:
    """absolute_links=True makes list and relationship links absolute nation URLs."""
    token = fake.issue_tokens("acme")["access_token"]
    fake.absolute_links = True
    doc = await (await api_get(client, "/acme/api/v2/signups", token)).json(content_type=None)
    nation = fake.nation_url("acme")
    assert doc["links"]["next"] == f"{nation}/api/v2/signups?page[number]=2&page[size]=20"
    related = doc["data"][0]["relationships"]["petition_signatures"]["links"]["related"]
    assert related.startswith(f"{nation}/api/v2/petition_signatures?")
    v1 = await (await api_get(client, "/acme/api/v1/people", token)).json()
    assert v1["next"].startswith(f"{nation}/api/v1/people?__nonce=")


async def test_absolute_links_test_endpoint(client: Client, fake: FakeNationBuilder) -> None:
    """/api/_test/absolute-links is absolute even with the switch off."""
    token = fake.issue_tokens("acme")["access_token"]
    doc = await (await api_get(client, "/acme/api/_test/absolute-links", token)).json(
        content_type=None
    )
    assert doc["links"]["next"].startswith(fake.nation_url("acme") + "/api/v2/signups?")


async def test_bytes_endpoint_streams_exact_length(client: Client, fake: FakeNationBuilder) -> None:
    """/api/_test/bytes streams n bytes (p % 256 pattern) with Content-Length set."""
    fake.rate_limit = 250
    token = fake.issue_tokens("acme")["access_token"]
    n = 200_003
    resp = await api_get(client, f"/acme/api/_test/bytes?n={n}&chunk=4096", token)
    assert resp.headers["Content-Length"] == str(n)
    assert resp.content_type == "application/octet-stream"
    assert "RateLimit-Remaining" in resp.headers
    data = await resp.read()
    assert len(data) == n
    assert data[:300] == bytes(i % 256 for i in range(300))
    assert data[-1] == (n - 1) % 256


async def test_echo_endpoint(client: Client, fake: FakeNationBuilder) -> None:
    """/api/_test/echo reflects the request and adds ETag and X-Custom-Upstream headers."""
    token = fake.issue_tokens("acme")["access_token"]
    resp = await client.put(
        "/acme/api/_test/echo?a=1&b=2",
        data=b"\x00payload",
        headers={"Authorization": f"Bearer {token}", "X-Test": "yes"},
    )
    doc = await resp.json()
    assert resp.headers["ETag"] == '"echo"'
    assert resp.headers["X-Custom-Upstream"] == "yes"
    assert doc["method"] == "PUT"
    assert doc["path"] == "/acme/api/_test/echo"
    assert doc["query_string"] == "a=1&b=2"
    assert doc["headers"]["X-Test"] == "yes"
    assert base64.b64decode(doc["body_b64"]) == b"\x00payload"


@pytest.mark.parametrize("code", [302, 418, 503, 204])
async def test_status_endpoint(client: Client, fake: FakeNationBuilder, code: int) -> None:
    """/api/_test/status/{code} answers that status (Location for redirects, HTML for 503)."""
    token = fake.issue_tokens("acme")["access_token"]
    resp = await client.get(
        f"/acme/api/_test/status/{code}",
        headers={"Authorization": f"Bearer {token}"},
        allow_redirects=False,
    )
    assert resp.status == code
    text = await resp.text()
    if code == 302:
        assert resp.headers["Location"] == "https://example.invalid/elsewhere"
    if code == 503:
        assert "cf-error-details" in text


async def test_canned_endpoint_answers_exactly_what_was_set(
    client: Client, fake: FakeNationBuilder
) -> None:
    """/api/_test/canned answers the set status, headers and body bytes, {nation} filled in."""
    token = fake.issue_tokens("acme")["access_token"]
    body = b'{"n":1e400,"next":"{nation}/api/v2/x"}'
    fake.set_canned(
        status=201,
        headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Location", "{nation}/api/y")],
        body=body,
    )
    resp = await client.post(
        "/acme/api/_test/canned", headers={"Authorization": f"Bearer {token}"}, data=b"x"
    )
    nation = fake.nation_url("acme")
    assert resp.status == 201
    assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert resp.headers["Location"] == f"{nation}/api/y"
    assert await resp.read() == body.replace(b"{nation}", nation.encode())
    assert fake.api_requests[-1].method == "POST"
    fake.reset_switches()
    resp = await client.get("/acme/api/_test/canned", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert await resp.read() == b""


async def test_canned_answer_through_the_control_endpoint(
    client: Client, fake: FakeNationBuilder
) -> None:
    """The control action "canned" takes status, [name, value] headers and body or body_b64."""
    token = fake.issue_tokens("acme")["access_token"]
    raw = b'{"s":"\\ud800"}\xff'
    command = {
        "action": "canned",
        "status": 202,
        "headers": [["Content-Type", "application/json"]],
        "body_b64": base64.b64encode(raw).decode(),
    }
    assert (await client.post("/_fake/control", json=command)).status == 200
    resp = await client.get("/acme/api/_test/canned", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 202
    assert resp.headers["Content-Type"] == "application/json"
    assert await resp.read() == raw
    for bad in ({"headers": [["X"]]}, {"status": "200"}, {"body": 3}, {"status": 99}):
        resp = await client.post("/_fake/control", json={"action": "canned", **bad})
        assert resp.status == 400, bad


# ---------------------------------------------------------------------- lifecycle


@pytest.fixture
async def started(clock: FakeClock) -> AsyncIterator[FakeNationBuilder]:
    fake = FakeNationBuilder(clock=clock, auto_approve=True)
    await fake.start()
    yield fake
    await fake.stop()


async def test_start_serves_on_real_socket(started: FakeNationBuilder) -> None:
    """start() binds a port, sets base_url/nation_url and the full auth-code flow works."""
    assert started.base_url.startswith("http://127.0.0.1:")
    nation = started.nation_url("acme")
    assert nation == f"{started.base_url}/acme"
    async with aiohttp.ClientSession() as session:
        resp = await session.get(
            f"{nation}/oauth/authorize", params=authorize_params(), allow_redirects=False
        )
        code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
        resp = await session.post(
            f"{nation}/oauth/token",
            json={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
        )
        token = (await resp.json())["access_token"]
        resp = await session.get(
            f"{nation}/api/v2/signups/me", headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status == 200


async def test_stop_releases_hung_requests_quickly(clock: FakeClock) -> None:
    """stop() returns promptly even while a token request hangs or is held."""
    fake = FakeNationBuilder(clock=clock)
    url = await fake.start()
    fake.fail_token("hang")
    fake.hold_tokens()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(f"{url}/acme/oauth/token", data={"a": "b"}))
        await fake.wait_for_pending_tokens(1)
        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 1.5
        with pytest.raises(aiohttp.ClientError):
            await task


def test_nation_url_needs_base_url() -> None:
    """nation_url() refuses to guess before start() or an assigned base_url."""
    with pytest.raises(RuntimeError):
        FakeNationBuilder().nation_url("acme")
    with pytest.raises(ValueError):
        FakeNationBuilder().issue_tokens("Bad_Slug")


def test_module_runs_standalone() -> None:
    """python -m nbgateway.fakenb serves until terminated and prints its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbgateway.fakenb", "--port", "0", "--auto-approve"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        url = line.strip().rsplit(" ", 1)[1]
        with urllib.request.urlopen(f"{url}/_fake/state", timeout=5) as resp:
            assert json.load(resp)["requests_total"] == 1  # the state request itself
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        if proc.stdout is not None:
            proc.stdout.close()
