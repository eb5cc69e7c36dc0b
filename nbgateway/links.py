"""Rewriting pagination and relationship links in NationBuilder JSON bodies, in place.

A tool that follows `links.next` must stay on the gateway (and on the same account): v2
`links.*`, `data[*].links`/`relationships.*.links` and `included[*]` alike, and v1's
top-level `next`/`prev`. The mapping itself is a function given by the proxy.

The document is never re-serialised: the link strings are found in the original text and
only they are replaced, so numbers Python would round or overflow (`1e400`, 5,000-digit
integers), lone surrogates, duplicate keys, deep nesting and the upstream's whitespace and
escapes all reach the client byte for byte. A body that is not a well-formed JSON object
(or not UTF-8) is not touched at all. `rewrite_body` is pure (no I/O, no shared state), so
the proxy may run it off the event loop.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from json.encoder import encode_basestring, encode_basestring_ascii
from json.scanner import make_scanner
from typing import Any, cast

# The json module's own string scanner (C when available); typeshed does not declare it.
_scanstring = cast(Callable[[str, int, bool], tuple[str, int]], vars(json.decoder)["scanstring"])

LinkMapper = Callable[[str], str | None]

_WS = re.compile(r"[ \t\n\r]*")
# Where a walk goes next, in one match each: the first member of an object (key raw,
# escapes undecoded) or its end; a following member after ',' or the end; the same for
# arrays (group 1 is set at the end).
_MEMBER_HEAD = r'"((?:[^"\\\x00-\x1f]|\\.)*)"[ \t\n\r]*:[ \t\n\r]*'
_OBJECT_FIRST = re.compile(r"\{[ \t\n\r]*(?:" + _MEMBER_HEAD + r"|\})", re.DOTALL)
_OBJECT_NEXT = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*" + _MEMBER_HEAD + r"|\})", re.DOTALL)
_ARRAY_FIRST = re.compile(r"\[[ \t\n\r]*(\])?")
_ARRAY_NEXT = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*|(\]))")
# Inside a skipped value: a whole string, or a bracket (everything else is skipped over).
_SKIP_TOKEN = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"|[\[\]{}"]', re.DOTALL)
_CLOSER = {"[": "]", "{": "}"}


def _ignore(_value: object) -> None:
    return None


# Used only to find where a value ends. Numbers and constants are not converted (so no
# digit limit and no overflow) and objects are not built.
_SCAN_VALUE = make_scanner(
    cast(
        Any,
        json.JSONDecoder(
            parse_float=_ignore,
            parse_int=_ignore,
            parse_constant=_ignore,
            object_pairs_hook=_ignore,
        ),
    )
)


class NotRewritable(ValueError):
    """The text is not a well-formed JSON object; it must be passed on untouched."""


def _skip_deep(s: str, i: int) -> int:
    """End of the array or object at s[i] without recursion (for nesting deeper than the
    C scanner allows). Strings and bracket balance are checked; scalars in between are not
    (they are passed on verbatim either way)."""
    stack: list[str] = []
    pos = i
    while True:
        match = _SKIP_TOKEN.search(s, pos)
        if match is None:
            raise NotRewritable("unterminated value")
        found = match.group()
        pos = match.end()
        if found in _CLOSER:
            stack.append(_CLOSER[found])
        elif found in ("]", "}"):
            if not stack or stack.pop() != found:
                raise NotRewritable("unbalanced brackets")
            if not stack:
                return pos
        elif found == '"':
            raise NotRewritable("unterminated string")


class _Walk:
    """One pass over a document, collecting (start, end, replacement) for link strings."""

    def __init__(self, s: str, mapper: LinkMapper) -> None:
        self.s = s
        self.mapper = mapper
        self.edits: list[tuple[int, int, str]] = []

    # -- primitives

    def ws(self, i: int) -> int:
        match = _WS.match(self.s, i)
        return i if match is None else match.end()

    def skip(self, i: int) -> int:
        """The end of the value starting at s[i] (which is not whitespace)."""
        try:
            _, end = _SCAN_VALUE(self.s, i)
        except StopIteration:
            raise NotRewritable("a value was expected") from None
        except RecursionError:
            if self.s[i : i + 1] not in _CLOSER:
                raise NotRewritable("a value was expected") from None
            return _skip_deep(self.s, i)
        except ValueError as exc:
            raise NotRewritable(str(exc)) from None
        return int(end)

    def string(self, i: int) -> tuple[str, int]:
        try:
            value, end = _scanstring(self.s, i + 1, True)
        except ValueError as exc:
            raise NotRewritable(str(exc)) from None
        return value, end

    def obj(self, i: int, member: Callable[[str, int], int]) -> int:
        """Walk the object at s[i] == '{', calling member(key, value start) -> value end."""
        s = self.s
        head = _OBJECT_FIRST.match(s, i)
        while True:
            if head is None:
                raise NotRewritable("an object member or '}' was expected")
            key = head.group(1)
            if key is None:
                return head.end()
            if "\\" in key:
                key = self.string(head.start(1) - 1)[0]
            head = _OBJECT_NEXT.match(s, member(key, head.end()))

    def array(self, i: int, element: Callable[[int], int]) -> int:
        """Walk the array at s[i] == '[', calling element(value start) -> value end."""
        s = self.s
        head = _ARRAY_FIRST.match(s, i)
        while True:
            if head is None:
                raise NotRewritable("',' or ']' was expected")
            if head.group(1) is not None:
                return head.end()
            head = _ARRAY_NEXT.match(s, element(head.end()))

    # -- the link members

    def link(self, i: int) -> int:
        """A link value: a string is mapped; anything else is skipped."""
        if self.s[i : i + 1] != '"':
            return self.skip(i)
        value, end = self.string(i)
        new = self.mapper(value)
        if new is not None and new != value:
            self.edits.append((i, end, new))
        return end

    def links(self, i: int) -> int:
        """A `links` object: each member is a link string or a {"href": ...} link object."""
        if self.s[i : i + 1] != "{":
            return self.skip(i)
        return self.obj(i, self._links_member)

    def _links_member(self, _key: str, i: int) -> int:
        if self.s[i : i + 1] == "{":
            return self.obj(i, self._link_object_member)
        return self.link(i)

    def _link_object_member(self, key: str, i: int) -> int:
        return self.link(i) if key == "href" else self.skip(i)

    def resources(self, i: int) -> int:
        """`data` or `included`: one resource object or a list of them."""
        char = self.s[i : i + 1]
        if char == "[":
            return self.array(i, self.resource)
        return self.resource(i)

    def resource(self, i: int) -> int:
        if self.s[i : i + 1] != "{":
            return self.skip(i)
        return self.obj(i, self._resource_member)

    def _resource_member(self, key: str, i: int) -> int:
        if key == "links":
            return self.links(i)
        if key == "relationships" and self.s[i : i + 1] == "{":
            return self.obj(i, self._relationship)
        return self.skip(i)

    def _relationship(self, _key: str, i: int) -> int:
        if self.s[i : i + 1] != "{":
            return self.skip(i)
        return self.obj(i, self._relationship_member)

    def _relationship_member(self, key: str, i: int) -> int:
        return self.links(i) if key == "links" else self.skip(i)

    def _top_member(self, key: str, i: int) -> int:
        if key == "links":
            return self.links(i)
        if key in ("data", "included"):
            return self.resources(i)
        if key in ("next", "prev"):  # v1 token pagination
            return self.link(i)
        return self.skip(i)

    def document(self) -> None:
        s = self.s
        start = 1 if s.startswith("\ufeff") else 0  # a UTF-8 byte order mark is kept
        i = self.ws(start)
        if s[i : i + 1] != "{":
            raise NotRewritable("the document is not a JSON object")
        i = self.ws(self.obj(i, self._top_member))
        if i != len(s):
            raise NotRewritable("text follows the JSON document")


def _encode_link(value: str) -> str:
    if value.isascii():
        return encode_basestring(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it as JSON allows
        return encode_basestring_ascii(value)
    return encode_basestring(value)


def rewrite_links(text: str, mapper: LinkMapper) -> str | None:
    """`text` with the link members of a JSON:API (v2) or v1 document mapped, every other
    character kept; None when nothing changed or `text` is not a well-formed JSON object."""
    walk = _Walk(text, mapper)
    try:
        walk.document()
    except NotRewritable:
        return None
    if not walk.edits:
        return None
    parts: list[str] = []
    last = 0
    for start, end, new in walk.edits:
        parts.append(text[last:start])
        parts.append(_encode_link(new))
        last = end
    parts.append(text[last:])
    return "".join(parts)


def inflate(raw: bytes, limit: int) -> bytes | None:
    """A complete gzip or zlib body inflated to at most `limit` bytes; None otherwise."""
    inflater = zlib.decompressobj(wbits=47)  # 47: gzip or zlib header
    try:
        plain = inflater.decompress(raw, limit)
    except zlib.error:
        return None
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        return None  # too large, truncated or followed by more: passed through as sent
    return plain


def rewrite_json(plain: bytes, mapper: LinkMapper, needles: tuple[bytes, ...]) -> bytes | None:
    """The UTF-8 JSON body `plain` with its links mapped, or None to pass it on unchanged.
    It is only parsed when one of `needles` occurs in it (a cheap byte search first)."""
    if not plain or not any(needle in plain for needle in needles):
        return None
    try:
        text = plain.decode("utf-8")
    except UnicodeDecodeError:
        return None
    rewritten = rewrite_links(text, mapper)
    return None if rewritten is None else rewritten.encode("utf-8")


def rewrite_body(
    raw: bytes,
    encoding: str,
    mapper: LinkMapper,
    needles: tuple[bytes, ...],
    limit: int,
) -> bytes | None:
    """The rewritten (identity-encoded) body, or None to pass `raw` on as it came.

    `encoding` is the upstream Content-Encoding (identity, gzip or deflate; compressed
    bodies are inflated to at most `limit` bytes)."""
    plain = raw if encoding == "identity" else inflate(raw, limit)
    return None if plain is None else rewrite_json(plain, mapper, needles)
