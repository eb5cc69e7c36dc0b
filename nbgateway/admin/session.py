"""Admin sessions for the `/connect` pages: signed cookies, CSRF tokens, login throttling.

Sessions are stateless: `sid.expiry.HMAC` under a key derived from NBGW_ADMIN_TOKEN, so
changing the token logs everyone out. The CSRF token and the OAuth `binding` are HMACs of
the session id. `LoginThrottle` counts wrong admin tokens per client address in memory.
Nothing here knows about HTTP routes or templates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

# At most LOGIN_FAILURES wrong tokens per client address within LOGIN_WINDOW seconds.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
# Addresses remembered at most (a flood of addresses must not grow memory without bound).
THROTTLE_MAX_CLIENTS = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in admin browser session."""

    sid: str
    expires_at: int
    csrf: str
    binding: str


class Signer:
    """HMAC-SHA256 under a key derived from the admin token, one label per purpose."""

    def __init__(self, admin_token: str) -> None:
        self._key = hmac.new(
            admin_token.encode(), b"nbgateway admin pages v1", hashlib.sha256
        ).digest()

    def sign(self, purpose: str, data: str) -> str:
        return hmac.new(self._key, f"{purpose}:{data}".encode(), hashlib.sha256).hexdigest()

    def valid(self, purpose: str, data: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(purpose, data).encode(), signature.encode())

    def session(self, sid: str, expires_at: int) -> Session:
        return Session(sid, expires_at, self.sign("csrf", sid), self.sign("binding", sid)[:32])

    def session_cookie(self, session: Session) -> str:
        data = f"{session.sid}.{session.expires_at}"
        return f"{data}.{self.sign('session', data)}"

    def read_session(self, value: str, now: float) -> Session | None:
        sid, _, rest = value.partition(".")
        expiry, _, signature = rest.partition(".")
        if not sid or not expiry.isdigit() or not signature:
            return None
        if not self.valid("session", f"{sid}.{expiry}", signature) or int(expiry) <= now:
            return None
        return self.session(sid, int(expiry))

    def flash_cookie(self, message: dict[str, Any]) -> str:
        data = _b64(json.dumps(message, separators=(",", ":")).encode())
        return f"{data}.{self.sign('flash', data)}"

    def read_flash(self, value: str, now: float) -> dict[str, Any] | None:
        data, _, signature = value.partition(".")
        if not data or not self.valid("flash", data, signature):
            return None
        try:
            message = json.loads(_unb64(data))
        except ValueError:
            return None
        if not isinstance(message, dict) or float(message.get("exp", 0)) <= now:
            return None
        return message


class LoginThrottle:
    """Wrong-token attempts per client address within a sliding window (in memory)."""

    def __init__(self, limit: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until `client` may try again, or None when it may try now."""
        failures = self._recent(client, now)
        if len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[0] + self.window - now))

    def failed(self, client: str, now: float) -> None:
        if client not in self._failures and len(self._failures) >= THROTTLE_MAX_CLIENTS:
            for known in list(self._failures):
                if not self._recent(known, now):
                    del self._failures[known]
            if len(self._failures) >= THROTTLE_MAX_CLIENTS:
                self._failures.pop(next(iter(self._failures)))
        failures = self._recent(client, now)
        failures.append(now)
        self._failures[client] = failures

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
