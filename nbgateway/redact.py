"""Keeping secrets out of text.

`Secret` carries a token, client secret, admin token or key through the program; its
`str`/`repr` never reveal the value, so an f-string or a log call that receives one prints
`**redacted**`. `Redactor` is the belt to that braces: it remembers every secret value the
process has seen (configuration, decrypted tokens, token responses) and scrubs them, and
anything shaped like a bearer token or an OAuth token field, out of arbitrary text before
it reaches a log line or an error body.
"""

from __future__ import annotations

import hmac
import operator
import re
import threading
from collections import deque
from collections.abc import Iterable

REDACTED = "**redacted**"


def same_secret(given: str, expected: str) -> bool:
    """Whether a presented value (a header, a cookie, a form field) is `expected`, in
    constant time. A raw byte that is not UTF-8 (aiohttp hands it on as a lone surrogate)
    is just another mismatch, not an error."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


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
    # A gateway client key, wherever it appears.
    re.compile(r"(nbgw_)[A-Za-z0-9_-]{16,}"),
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


# A word that may be a token: what scrubbing by value looks up (see Redactor.scrub).
_WORD = re.compile(r"[A-Za-z0-9_.~+/-]{8,}")
# The same without "/": a token between slashes (a path segment) is a word of its own too.
_SEGMENT = re.compile(r"[A-Za-z0-9_.~+-]{8,}")
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.~+/-")
# Substrings that must be present for a shape pattern to be worth running.
_SHAPE_HINTS = (
    ("bearer",),
    (
        "access_token",
        "refresh_token",
        "client_secret",
        "code_verifier",
        "admin_token",
        "id_token",
        "password",
    ),
    ("code=", "state="),
    ("nbgw_",),
)


def _may_hold_a_shape(lower: str) -> bool:
    """False when no hint of `_SHAPE_HINTS` occurs in `lower`: a few substring tests (each
    hint contains one of them), cheaper than testing every hint or one regex search."""
    return (
        "_token" in lower
        or "bearer" in lower
        or "secret" in lower
        or "password" in lower
        or "verifier" in lower
        or "code=" in lower
        or "state=" in lower
        or "nbgw_" in lower
    )


_rstrip_dots = operator.methodcaller("rstrip", ".")
# Values remembered per slot (an account's token field): the current one and a few before.
SLOT_HISTORY = 3


class Redactor:
    """Scrubs known secret values and secret-shaped substrings out of text. Thread-safe.

    Static secrets (configuration) are matched by one small regex. Token values, which
    arrive per account and field (a "slot") and rotate daily, are kept a few per slot and
    looked up word by word in a set, so scrubbing costs the same however many accounts
    and rotations the process has seen.
    """

    def __init__(self, values: Iterable[str | Secret] = ()) -> None:
        self._static: set[str] = set()
        self._slots: dict[str, deque[str]] = {}
        # Every slot's remembered values, and in how many slots each is: changed in place
        # (one value at a time, so adding costs the same however many accounts there
        # are); scrubbing only tests membership, which is safe while another thread adds.
        self._words: set[str] = set()
        self._word_slots: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        # Bumped whenever the set of scrubbed values changes: what a cache of scrubbed text
        # (the access log's) checks before reusing an earlier result.
        self.generation = 0
        for value in values:
            self.add(value)

    def add(self, value: str | Secret | None, slot: str | None = None) -> None:
        """Remember a value so that it is scrubbed from now on.

        With a `slot` (e.g. "acme/access_token") only the last few values of that slot are
        kept; without one the value is kept for the life of the process.
        """
        if value is None:
            return
        raw = value.reveal() if isinstance(value, Secret) else value
        if len(raw) < _MIN_SECRET_LEN:
            return
        word = raw.rstrip("=")  # url-safe base64 padding is not part of a scanned word
        with self._lock:
            if slot is None or not set(word) <= _WORD_CHARS or len(word) < _MIN_SECRET_LEN:
                if raw not in self._static:
                    self._static.add(raw)
                    self._pattern = None
                    self.generation += 1
                return
            history = self._slots.setdefault(slot, deque(maxlen=SLOT_HISTORY))
            if word in history:
                return
            if len(history) == SLOT_HISTORY:
                self._forget_word(history[0])  # about to fall out of the slot's history
            history.append(word)
            self._word_slots[word] = self._word_slots.get(word, 0) + 1
            self._words.add(word)
            self.generation += 1

    def _forget_word(self, word: str) -> None:
        left = self._word_slots[word] - 1
        if left:
            self._word_slots[word] = left
        else:
            del self._word_slots[word]
            self._words.discard(word)

    def _value_pattern(self) -> re.Pattern[str] | None:
        pattern = self._pattern
        if pattern is not None or not self._static:
            return pattern  # the common case needs no lock: add() replaces it whole
        with self._lock:
            if self._pattern is None and self._static:
                # Longest first, so a secret that contains another is removed whole.
                alternatives = sorted(self._static, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in alternatives))
            return self._pattern

    def _replace_word(self, match: re.Match[str]) -> str:
        word = match.group(0)
        words = self._words
        if word in words or word.rstrip(".") in words:
            return REDACTED + ("." if word.endswith(".") and word not in words else "")
        return word

    def scrub(self, text: str) -> str:
        """Return `text` with every known secret and secret-shaped value replaced."""
        pattern = self._value_pattern()
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        words = self._words
        # findall and the set tests run in C; the per-word callback only when a known token
        # is present (possibly followed by full stops).
        if words:
            found = _WORD.findall(text)
            slashed = "/" in text
            if slashed:
                found += _SEGMENT.findall(text)
            if not words.isdisjoint(found) or not words.isdisjoint(map(_rstrip_dots, found)):
                text = _WORD.sub(self._replace_word, text)
                if slashed:
                    text = _SEGMENT.sub(self._replace_word, text)
        lower = text.lower()
        if _may_hold_a_shape(lower):
            for shape, hints in zip(_PATTERNS, _SHAPE_HINTS, strict=True):
                if any(hint in lower for hint in hints):
                    text = shape.sub(lambda m: m.group(1) + REDACTED, text)
        return text
