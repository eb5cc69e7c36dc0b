"""Unit tests of `nbgateway.links`: which members of a NationBuilder JSON document are links
(v2 JSON:API and v1), that nothing else is touched (not even a byte), and `rewrite_body`'s
decoding of compressed bodies."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from typing import Any

import pytest

from nbgateway.links import rewrite_body, rewrite_links


def to_gateway(link: str) -> str | None:
    """The proxy's shape of mapper: root-relative API links move under /n/acme."""
    if link.startswith("/api/"):
        return f"/n/acme{link}"
    return None


def rewritten(doc: Any) -> tuple[bool, Any]:
    """Rewrite the document's JSON text: (whether anything changed, the document afterwards)."""
    text = json.dumps(doc)
    out = rewrite_links(text, to_gateway)
    return out is not None, json.loads(text if out is None else out)


def resource(pid: str) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "signups",
        "attributes": {"email": f"p{pid}@acme.example", "website": "/api/v2/not-a-link"},
        "links": {"self": f"/api/v2/signups/{pid}"},
        "relationships": {
            "petition_signatures": {
                "links": {
                    "related": f"/api/v2/petition_signatures?filter[signup_id]={pid}",
                    "self": f"/api/v2/signups/{pid}/relationships/petition_signatures",
                }
            },
            "signup_tags": {"meta": {"included": False}},
        },
    }


class TestV2Documents:
    def test_top_level_links(self) -> None:
        """Every string in the top-level links object is mapped."""
        doc: dict[str, Any] = {
            "data": [],
            "links": {
                "self": "/api/v2/signups?page[number]=2",
                "next": "/api/v2/signups?page[number]=3",
                "prev": "/api/v2/signups?page[number]=1",
                "first": "/api/v2/signups?page[number]=1",
            },
        }
        changed, out = rewritten(doc)
        assert changed is True
        assert out["links"] == {name: f"/n/acme{value}" for name, value in doc["links"].items()}

    def test_data_list_resource_and_relationship_links(self) -> None:
        """Resource links and relationships.*.links of every item in a data list are mapped."""
        doc = {"data": [resource("1"), resource("2")]}
        changed, out = rewritten(doc)
        assert changed is True
        for item, pid in zip(out["data"], ("1", "2"), strict=True):
            assert item["links"]["self"] == f"/n/acme/api/v2/signups/{pid}"
            rel = item["relationships"]["petition_signatures"]["links"]
            assert rel["related"] == f"/n/acme/api/v2/petition_signatures?filter[signup_id]={pid}"
            assert rel["self"] == f"/n/acme/api/v2/signups/{pid}/relationships/petition_signatures"
            assert item["relationships"]["signup_tags"] == {"meta": {"included": False}}

    def test_single_data_object(self) -> None:
        """A single resource as `data` (show endpoints) is handled like a list item."""
        changed, out = rewritten({"data": resource("7"), "meta": {}})
        assert changed is True
        assert out["data"]["links"]["self"] == "/n/acme/api/v2/signups/7"
        related = out["data"]["relationships"]["petition_signatures"]["links"]["related"]
        assert related.startswith("/n/acme/api/v2/petition_signatures?")

    def test_included_resources(self) -> None:
        """Links of sideloaded `included` resources are mapped too."""
        doc = {"data": [], "included": [resource("3")]}
        changed, out = rewritten(doc)
        assert changed is True
        assert out["included"][0]["links"]["self"] == "/n/acme/api/v2/signups/3"
        rel = out["included"][0]["relationships"]["petition_signatures"]["links"]
        assert rel["related"].startswith("/n/acme/api/")

    def test_link_objects_with_href(self) -> None:
        """A JSON:API link object {"href": ..., "meta": ...} has its href mapped, meta kept."""
        doc = {
            "data": [],
            "links": {"next": {"href": "/api/v2/signups?page[number]=2", "meta": {"count": 5}}},
        }
        changed, out = rewritten(doc)
        assert changed is True
        assert out["links"]["next"] == {
            "href": "/n/acme/api/v2/signups?page[number]=2",
            "meta": {"count": 5},
        }

    def test_null_and_non_string_links_are_left(self) -> None:
        """Null links, hrefs that are not strings and non-dict links members are ignored."""
        doc = {
            "data": [{"id": "1", "links": None, "relationships": {"x": None, "y": {"links": 3}}}],
            "links": {"prev": None, "next": {"href": None}, "count": 2},
            "included": None,
        }
        changed, out = rewritten(doc)
        assert changed is False
        assert out == doc

    def test_unmapped_links_stay(self) -> None:
        """Links the mapper declines (None) are left exactly as they were."""
        doc = {"data": [], "links": {"next": "https://elsewhere.example/api/v2/x"}}
        changed, out = rewritten(doc)
        assert changed is False
        assert out == doc

    def test_identity_mapping_reports_no_change(self) -> None:
        """A mapper that returns the same string changes nothing and says so (None)."""
        doc = {"data": [resource("1")], "links": {"self": "/api/v2/signups"}}
        assert rewrite_links(json.dumps(doc), lambda link: link) is None

    def test_only_the_link_strings_change(self) -> None:
        """The text around the links is kept character for character: spacing, escapes,
        number spellings, key order and duplicates."""
        text = (
            '{ "meta" : {"n": 1.50, "big": 1e400, "k": 1, "k": 2, "s": "\\u00e9\\/"},\n'
            '  "links" : { "next" : "\\/api\\/v2\\/x" , "prev":null } }'
        )
        assert rewrite_links(text, to_gateway) == text.replace(
            '"\\/api\\/v2\\/x"', '"/n/acme/api/v2/x"'
        )


class TestV1Documents:
    def test_next_and_prev_are_mapped_with_tokens_intact(self) -> None:
        """v1 top-level next/prev are mapped; the __nonce/__token query is kept byte for byte."""
        query = "__nonce=a-B_c&__token=Zm9v%2Bbar%3D&limit=5"
        doc = {
            "results": [{"id": 1, "email": "x@acme.example"}],
            "next": f"/api/v1/people?{query}",
            "prev": f"/api/v1/people?{query}&p=1",
        }
        changed, out = rewritten(doc)
        assert changed is True
        assert out["next"] == f"/n/acme/api/v1/people?{query}"
        assert out["prev"] == f"/n/acme/api/v1/people?{query}&p=1"
        assert out["results"] == doc["results"]

    def test_last_page_has_null_next(self) -> None:
        """A null v1 next (last page) is left null."""
        doc: dict[str, Any] = {
            "results": [],
            "next": None,
            "prev": "/api/v1/people?__nonce=n&__token=t",
        }
        changed, out = rewritten(doc)
        assert changed is True
        assert out["next"] is None
        assert out["prev"] == "/n/acme/api/v1/people?__nonce=n&__token=t"


class TestText:
    @pytest.mark.parametrize(
        "text",
        [
            '{"links":{"next":"/api/x"}',
            '{"links":{"next":"/api/x"}} {}',
            '{"links":{"next":"/api/x"},"a":tru}',
            '{"links":{"next":"/api/x"} "a":1}',
            '{"links":{"next":"/api/x"},"a":"\x01"}',
            '{"links":{"next":"/api/x"},"a":' + "[" * 5000 + "]" * 4999 + "}",
            '{"links":{"next":"/api/x"},"a":' + "[" * 5000 + "}" * 5000 + "}",
            "",
        ],
        ids=[
            "truncated",
            "trailing",
            "bad-literal",
            "missing-comma",
            "control",
            "deep-open",
            "deep-mismatch",
            "empty",
        ],
    )
    def test_malformed_text_is_not_rewritten(self, text: str) -> None:
        """Text that is not exactly one well-formed JSON object gives None (pass verbatim)."""
        assert rewrite_links(text, to_gateway) is None

    def test_deep_nesting_beside_links(self) -> None:
        """A value nested 50,000 deep is skipped; the links next to it are rewritten."""
        tree = "[" * 50_000 + '"/api/v2/in-tree"' + "]" * 50_000
        text = '{"meta":{"tree":' + tree + '},"links":{"next":"/api/v2/x"}}'
        assert rewrite_links(text, to_gateway) == text.replace('"/api/v2/x"', '"/n/acme/api/v2/x"')

    def test_byte_order_mark_is_kept(self) -> None:
        """A leading UTF-8 byte order mark is allowed and kept."""
        text = '\ufeff{"next":"/api/v1/people?__token=a"}'
        assert rewrite_links(text, to_gateway) == '\ufeff{"next":"/n/acme/api/v1/people?__token=a"}'

    def test_mapped_link_with_a_lone_surrogate_is_escaped(self) -> None:
        """A link holding a lone surrogate is written back escaped, so the result encodes."""
        out = rewrite_links('{"next":"/api/v1/x?q=\\ud800\u00e9"}', to_gateway)
        assert out is not None
        assert out == '{"next":"/n/acme/api/v1/x?q=\\ud800\\u00e9"}'
        assert out.encode("utf-8").decode("utf-8") == out


class TestRewriteBody:
    NEEDLES = (b"/api",)

    def test_identity_body(self) -> None:
        """A plain body is decoded as UTF-8, rewritten and encoded again (other bytes kept)."""
        raw = '{"x":"é","links":{"next":"/api/v2/x"}}'.encode()
        out = rewrite_body(raw, "identity", to_gateway, self.NEEDLES, 1 << 20)
        assert out == raw.replace(b'"/api/v2/x"', b'"/n/acme/api/v2/x"')

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    def test_compressed_body_is_inflated(self, encoding: str) -> None:
        """gzip and zlib (deflate) bodies are inflated; the result is identity-encoded."""
        plain = b'{"links":{"next":"/api/v2/x"}}'
        raw = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
        out = rewrite_body(raw, encoding, to_gateway, self.NEEDLES, 1 << 20)
        assert out == b'{"links":{"next":"/n/acme/api/v2/x"}}'

    @pytest.mark.parametrize(
        "raw",
        [
            gzip.compress(b'{"links":{"next":"/api/v2/x"}}')[:-6],
            gzip.compress(b'{"links":{"next":"/api/v2/x"}}') + b"junk",
            gzip.compress(b'{"links":{"next":"/api/v2/x"},"pad":"' + b" " * 5000 + b'"}'),
            b"not gzip at all",
        ],
        ids=["truncated", "trailing-junk", "over-limit", "not-gzip"],
    )
    def test_unusable_compressed_body_is_left(self, raw: bytes) -> None:
        """A truncated, over-long (past the limit) or broken gzip body is passed as sent."""
        assert rewrite_body(raw, "gzip", to_gateway, self.NEEDLES, 4096) is None

    def test_without_a_needle_nothing_is_parsed(self) -> None:
        """When no needle occurs in the body, it is not parsed (and left)."""

        def refuse(link: str) -> str | None:
            raise AssertionError("parsed")

        raw = b'{"links":{"next":"/elsewhere"}}'
        assert rewrite_body(raw, "identity", refuse, (b"/api",), 1 << 20) is None

    def test_not_utf8_is_left(self) -> None:
        """A body that is not UTF-8 is passed as sent."""
        raw = '{"links":{"next":"/api/v2/x"}}'.encode("utf-16")
        assert rewrite_body(raw, "identity", to_gateway, (b"/",), 1 << 20) is None


class TestNotLinks:
    @pytest.mark.parametrize(
        "doc",
        [None, "/api/v2/signups", 42, ["/api/v2/signups", {"links": {"next": "/api/v2/x"}}]],
        ids=["null", "string", "number", "list"],
    )
    def test_non_dict_documents(self, doc: Any) -> None:
        """A document that is not a JSON object is returned unchanged with False."""
        changed, out = rewritten(doc)
        assert changed is False
        assert out == doc

    def test_unrelated_strings_are_untouched(self) -> None:
        """API-looking strings outside link members (attributes, meta, errors, ids) stay."""
        doc = {
            "data": [
                {
                    "id": "/api/v2/signups/1",
                    "type": "signups",
                    "attributes": {
                        "website": "/api/v2/signups/1",
                        "links": {"self": "/api/v2/in-attributes"},
                        "next": "/api/v2/in-attributes",
                    },
                    "meta": {"self": "/api/v2/in-meta"},
                    "relationships": {"tags": {"data": {"id": "/api/v2/x", "type": "tags"}}},
                }
            ],
            "meta": {"links": {"next": "/api/v2/in-meta"}, "next": "/api/v2/in-meta"},
            "self": "/api/v2/top-level-not-links",
            "results": [{"next": "/api/v1/people/2"}],
        }
        changed, out = rewritten(doc)
        assert changed is False
        assert out == doc

    def test_only_link_members_change_in_a_mixed_document(self) -> None:
        """In one document, links change while look-alike attribute values do not."""
        doc = {"data": resource("1"), "links": {"self": "/api/v2/signups/1"}}
        changed, out = rewritten(doc)
        assert changed is True
        assert out["data"]["attributes"] == doc["data"]["attributes"]
        assert out["data"]["id"] == "1"
        assert out["links"]["self"] == "/n/acme/api/v2/signups/1"


def reference_rewrite(doc: Any, mapper: Any) -> bool:
    """The link members by their definition, on a parsed document (in place): the oracle
    the text rewriter is compared with."""

    def link_obj(links: Any) -> bool:
        changed = False
        if isinstance(links, dict):
            for key, value in links.items():
                holder, name = (value, "href") if isinstance(value, dict) else (links, key)
                if isinstance(holder.get(name), str):
                    new = mapper(holder[name])
                    if new is not None and new != holder[name]:
                        holder[name], changed = new, True
        return changed

    def resource(item: Any) -> bool:
        if not isinstance(item, dict):
            return False
        changed = link_obj(item.get("links"))
        rels = item.get("relationships")
        for rel in rels.values() if isinstance(rels, dict) else ():
            if isinstance(rel, dict):
                changed |= link_obj(rel.get("links"))
        return changed

    if not isinstance(doc, dict):
        return False
    changed = link_obj(doc.get("links"))
    for member in ("data", "included"):
        value = doc.get(member)
        for item in value if isinstance(value, list) else [value]:
            changed |= resource(item)
    for member in ("next", "prev"):
        value = doc.get(member)
        if isinstance(value, str) and (new := mapper(value)) is not None and new != value:
            doc[member], changed = new, True
    return changed


def test_matches_the_reference_on_generated_documents() -> None:
    """On 3,000 generated documents (fixed seed; nesting, look-alike keys, escapes,
    indentation), the text rewriter changes exactly what the reference does."""
    rnd = random.Random(20261201)
    keys = ["links", "data", "included", "next", "prev", "relationships", "href", "self"]
    keys += ["related", "meta", "attributes", "id"]
    leaves: list[Any] = ["/api/v2/a", "/api/x?q=1&b=é", "/x", None, 1, 2.5, True, "/api"]

    def gen(depth: int) -> Any:
        roll = rnd.random()
        if depth > 4 or roll < 0.3:
            return rnd.choice(leaves)
        if roll < 0.5:
            return [gen(depth + 1) for _ in range(rnd.randint(0, 3))]
        return {rnd.choice(keys): gen(depth + 1) for _ in range(rnd.randint(0, 4))}

    for _ in range(3000):
        doc = {rnd.choice(keys): gen(1) for _ in range(rnd.randint(0, 4))}
        text = json.dumps(doc, indent=rnd.choice([None, 1]), ensure_ascii=rnd.random() < 0.5)
        expected = json.loads(text)
        changed = reference_rewrite(expected, to_gateway)
        out = rewrite_links(text, to_gateway)
        assert (out is not None) == changed, text
        assert json.loads(text if out is None else out) == expected, text
