"""Keeping secrets out of text.

`Secret` carries a token, client secret, admin token or key through the program; its
`str`/`repr` never reveal the value, so an f-string or a log call that receives one prints
`**redacted**`. `Redactor` is the belt to that braces: it remembers every secret value the
process has seen (configuration, decrypted tokens, token responses) and scrubs them, and
anything shaped like a bearer token or an OAuth token field, out of arbitrary text before
it reaches a log line or an error body.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

REDACTED = "**redacted**"

# Values shorter than this are not scrubbed by value: they would match ordinary words.
_MIN_SECRET_LEN = 8

# Shapes that carry secrets whatever their value: a bearer credential, an OAuth field in a
# form body, query string or JSON document, a PKCE verifier.
_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/=]+"),
    re.compile(
        r"(?i)((?:access_token|refresh_token|client_secret|code_verifier|admin_token|id_token|"
        r"password)[\"']?\s*[=:]\s*[\"']?)[^\"'&\s,;}]+"
    ),
    # An authorization code or state in a callback query string.
    re.compile(r"([?&](?:code|state)=)[^&\s\"']+"),
)


class Secret:
    """A string that does not print itself. Call `reveal()` where the value is really needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED


class Redactor:
    """Scrubs known secret values and secret-shaped substrings out of text. Thread-safe."""

    def __init__(self, values: Iterable[str | Secret] = ()) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        for value in values:
            self.add(value)

    def add(self, value: str | Secret | None) -> None:
        """Remember a value so that it is scrubbed from now on."""
        if value is None:
            return
        raw = value.reveal() if isinstance(value, Secret) else value
        if len(raw) < _MIN_SECRET_LEN:
            return
        with self._lock:
            if raw not in self._values:
                self._values.add(raw)
                self._pattern = None

    def _value_pattern(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._values:
                # Longest first, so a secret that contains another is removed whole.
                alternatives = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in alternatives))
            return self._pattern

    def scrub(self, text: str) -> str:
        """Return `text` with every known secret and secret-shaped value replaced."""
        pattern = self._value_pattern()
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        for shape in _PATTERNS:
            text = shape.sub(lambda m: m.group(1) + REDACTED, text)
        return text
