"""Account operations shared by the CLI, `/connect/api` and the admin pages.

List, refresh now, remove, import a legacy token, and the two halves of connecting a
nation (start: authorize URL with state + PKCE; finish: validate the state, exchange the
code, store the tokens). One implementation, so every admin path behaves the same.
"""

from __future__ import annotations

import dataclasses
import logging

from nbgateway.clock import iso_utc
from nbgateway.errors import (
    AccountChanged,
    AccountNotFound,
    AuthorizationFailed,
    OAuthError,
    PairNotStored,
    ReauthorizationRequired,
    StateError,
)
from nbgateway.log import one_line
from nbgateway.models import AccountInfo, AccountStatus, Event, EventKind, is_valid_slug
from nbgateway.oauth import NationBuilderOAuth
from nbgateway.redact import Secret
from nbgateway.store import GenerationConflict, TokenStore
from nbgateway.tokens import TokenManager

log = logging.getLogger("nbgateway.accounts")

# NationBuilder's authorization codes live 10 minutes; a state outliving that is useless.
STATE_TTL = 600.0


def account_json(info: AccountInfo) -> dict[str, object]:
    """An account as JSON for `accounts list --json` and `/connect/api` (never a token)."""
    return {
        "slug": info.slug,
        "status": info.status.value,
        "access_token_expires_at": iso_utc(info.expires_at),
        "last_refresh_at": iso_utc(info.last_refresh_at),
        "last_error": info.last_error,
        "scope": info.scope,
        "generation": info.generation,
        "connected_at": iso_utc(info.created_at),
    }


def check_slug(slug: str) -> str:
    """Return `slug` if it is a valid nation slug, else raise ValueError with a plain message."""
    if not is_valid_slug(slug):
        raise ValueError(
            "a nation slug is the part before .nationbuilder.com: lowercase letters, digits "
            "and hyphens, at most 63 characters, starting with a letter or digit (for example "
            "'acme' or 'my-nation')"
        )
    return slug


def _import_refusal(existing: AccountInfo) -> str:
    """Why `accounts import` leaves the stored row of `existing` as it is."""
    slug = existing.slug
    remove = f"remove it first (`nbgateway accounts remove {slug}`)"
    if existing.status is AccountStatus.UNREADABLE:
        return (
            f"{slug!r} is stored but cannot be read ({existing.last_error}); nothing was "
            f"changed: check NBGW_ENCRYPTION_KEY, or {remove}"
        )
    if not existing.expires_at:
        return (
            f"{slug!r} holds a refresh token that has not been exchanged yet (an earlier import "
            "or refresh did not complete) and may still work; nothing was changed: retry the "
            f"exchange with `nbgateway accounts refresh {slug}`, or {remove}"
        )
    return f"{slug!r} is already connected with a working token; to replace it, {remove}"


def _checked(info: AccountInfo, problems: dict[str, str]) -> AccountInfo:
    """`info`, marked UNREADABLE with the problem when its row is among `problems`."""
    problem = problems.get(info.slug)
    if problem is None or info.status is AccountStatus.UNREADABLE:
        return info
    return dataclasses.replace(
        info,
        status=AccountStatus.UNREADABLE,
        last_error=f"the stored credentials cannot be read: {problem}",
    )


def _callback_text(text: str, limit: int) -> str:
    """Text from the callback's query (anyone can send one) made safe to show and log:
    printable, on one line, at most `limit` characters."""
    flat = one_line("".join(c if c.isprintable() else " " for c in text))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class AccountService:
    """Admin operations on accounts; every admin surface calls these."""

    def __init__(
        self,
        store: TokenStore,
        tokens: TokenManager,
        oauth: NationBuilderOAuth,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._oauth = oauth

    async def list_accounts(self) -> list[AccountInfo]:
        """Every account; one whose stored tokens do not decrypt is shown as UNREADABLE with
        the problem as its error (the store's listing decrypts nothing, so check here: two
        queries, whatever the number of accounts)."""
        infos = await self._store.list_accounts()
        problems = await self._store.unreadable_accounts()
        return [_checked(info, problems) for info in infos]

    async def get(self, slug: str) -> AccountInfo:
        info = await self._find(slug)
        if info is None:
            raise AccountNotFound(slug)
        return info

    async def _find(self, slug: str) -> AccountInfo | None:
        """The account `slug` as `list_accounts` shows it, or None when none is stored."""
        for info in await self._store.list_accounts():
            if info.slug == slug:
                return _checked(info, await self._store.unreadable_accounts(slug))
        return None

    async def events(self, slug: str | None = None, limit: int = 20) -> list[Event]:
        return await self._store.events(slug, limit)

    async def refresh(self, slug: str) -> AccountInfo:
        """Refresh now. Raises AccountNotFound, ReauthorizationRequired, RefreshBackoff, or
        PairNotStored when NationBuilder issued a pair the database refused (the stored row,
        which the caller would be shown, is the old one)."""
        await self._tokens.refresh_now(slug)
        if slug in self._tokens.unpersisted:
            raise PairNotStored(
                f"NationBuilder issued a new token pair for {slug!r}, but the database "
                "refused to store it: the gateway holds it in memory, serves with it and "
                "keeps trying to store it. Fix the database; do not restart the gateway "
                "until its log says 'stored the held token pair' (runbook: A token pair "
                "held only in memory)"
            )
        return await self.get(slug)

    async def remove(self, slug: str) -> bool:
        removed = await self._store.remove_account(slug)
        await self._tokens.account_changed(slug)  # also drops the account's gauges
        if removed:
            log.info("account removed", extra={"account": slug})
        return removed

    async def import_legacy(self, slug: str, legacy_token: Secret) -> AccountInfo:
        """NationBuilder's migration: the legacy access token serves as the refresh token.

        Only a new slug or one that needs re-authorization (its refresh token is dead) takes
        an import; any other stored row is left untouched (AuthorizationFailed "invalid"):
        a working pair, a refresh token not exchanged yet (an earlier import or refresh that
        did not complete; it may still work) or a row the configured key cannot read.
        The token is stored first, then exchanged at once. NationBuilder refusing it
        (ReauthorizationRequired) raises AuthorizationFailed "exchange" and removes the
        new row (a re-authorization row stays, still needing re-authorization); a
        transient failure (RefreshBackoff) keeps it, so the background refresher retries.
        Another import or a /connect of the same nation at the same moment keeps what it
        stored: this one raises AuthorizationFailed "invalid" saying so.
        """
        check_slug(slug)
        existing = await self._find(slug)
        if existing is not None and existing.status is not AccountStatus.NEEDS_REAUTH:
            raise AuthorizationFailed("invalid", _import_refusal(existing), slug)
        try:
            # Only over what was just looked at: another import or a /connect finishing
            # meanwhile keeps what it stored.
            imported = await self._store.import_refresh_token(
                slug, legacy_token, replaces=None if existing is None else existing.generation
            )
        except GenerationConflict:
            raise AuthorizationFailed(
                "invalid",
                f"{slug!r} changed while importing (another import or a /connect stored it "
                "meanwhile); nothing was changed: see `nbgateway accounts list`",
                slug,
            ) from None
        await self._tokens.account_changed(slug)
        try:
            if existing is None:
                await self._tokens.first_exchange(slug)
            else:
                await self._tokens.refresh_now(slug)
        except AccountChanged as exc:
            if exc.taken_over:
                raise AuthorizationFailed(
                    "invalid",
                    f"the exchange of {slug!r}'s token outlasted its lease and a gateway "
                    "process took it over; it carries on there: see `nbgateway accounts list`",
                    slug,
                ) from None
            raise AuthorizationFailed(
                "invalid",
                f"{slug!r} was connected or imported elsewhere (or removed) while this import "
                "ran; what was stored there stays, and this import's token was not kept (if "
                "it had been sent, NationBuilder may count it as used): see `nbgateway "
                "accounts list`",
                slug,
            ) from None
        except ReauthorizationRequired:
            refused = (
                f"NationBuilder refused the legacy token for {slug!r} (invalid_grant): it is "
                "unknown, revoked or already exchanged"
            )
            if existing is not None:
                raise AuthorizationFailed(
                    "exchange", f"{refused}; the account still needs re-authorization", slug
                ) from None
            # Nothing was there before: leave nothing behind (the row as the refusal left
            # it, one generation on; a row stored meanwhile by someone else stays).
            removed = await self._store.remove_account(slug, generation=imported + 1)
            await self._tokens.account_changed(slug)
            left = "nothing was stored" if removed else "the account stored meanwhile stays"
            raise AuthorizationFailed("exchange", f"{refused}; {left}", slug) from None
        return await self.get(slug)

    async def start_connect(self, slug: str, binding: str = "") -> str:
        """Begin the authorization-code flow for `slug`; returns the URL to send the admin to."""
        check_slug(slug)
        request = self._oauth.authorize(slug)
        await self._store.create_state(
            request.state, slug, request.code_verifier, binding, STATE_TTL
        )
        return request.url

    async def finish_connect(
        self,
        *,
        state: str,
        code: str | None,
        error: str | None,
        error_description: str | None = None,
        binding: str = "",
    ) -> str:
        """Complete the flow from the callback's query. Returns the connected slug.

        Raises AuthorizationFailed (reason denied, refused, incomplete, state or exchange);
        nothing is stored then.
        """
        if not state:
            raise AuthorizationFailed("state", "the callback carried no state")
        try:
            pending = await self._store.consume_state(state, binding)
        except StateError as exc:
            raise AuthorizationFailed("state", str(exc)) from None
        slug = pending.slug
        if error:
            if error == "access_denied":
                raise AuthorizationFailed(
                    "denied", "authorization was declined on NationBuilder", slug
                )
            said = _callback_text(error, 64)
            detail = _callback_text(error_description or "", 300)
            raise AuthorizationFailed(
                "refused",
                f"NationBuilder answered with the error {said!r}"
                + (f" ({detail})" if detail else ""),
                slug,
            )
        if not code:
            raise AuthorizationFailed(
                "incomplete", "NationBuilder's answer carried neither a code nor an error", slug
            )
        try:
            tokens = await self._oauth.exchange_code(slug, code, pending.code_verifier)
        except OAuthError as exc:
            raise AuthorizationFailed(
                "exchange",
                f"exchanging the authorization code failed: {exc}",
                slug,
                outcome=exc.outcome,
            ) from None
        await self._store.save_tokens(slug, tokens, EventKind.CONNECTED)
        await self._tokens.account_changed(slug)
        log.info("account connected", extra={"account": slug})
        return slug
