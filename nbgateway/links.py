"""Rewriting pagination and relationship links in NationBuilder JSON bodies.

A tool that follows `links.next` must stay on the gateway (and on the same account): v2
`links.*`, `data[*].links`/`relationships.*.links` and `included[*]` alike, and v1's
top-level `next`/`prev`. The mapping itself is a function given by the proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LinkMapper = Callable[[str], str | None]


def _rewrite_links_obj(links: Any, mapper: LinkMapper) -> bool:
    changed = False
    if isinstance(links, dict):
        for key, value in links.items():
            if isinstance(value, str):
                new = mapper(value)
                if new is not None and new != value:
                    links[key] = new
                    changed = True
            elif isinstance(value, dict) and isinstance(value.get("href"), str):
                new = mapper(value["href"])
                if new is not None and new != value["href"]:
                    value["href"] = new
                    changed = True
    return changed


def _rewrite_resource(resource: Any, mapper: LinkMapper) -> bool:
    if not isinstance(resource, dict):
        return False
    changed = _rewrite_links_obj(resource.get("links"), mapper)
    relationships = resource.get("relationships")
    if isinstance(relationships, dict):
        for rel in relationships.values():
            if isinstance(rel, dict):
                changed |= _rewrite_links_obj(rel.get("links"), mapper)
    return changed


def rewrite_links(doc: Any, mapper: LinkMapper) -> bool:
    """Rewrite the link members of a JSON:API (v2) or v1 document in place. True if changed."""
    if not isinstance(doc, dict):
        return False
    changed = _rewrite_links_obj(doc.get("links"), mapper)
    for member in ("data", "included"):
        value = doc.get(member)
        items = value if isinstance(value, list) else [value]
        for item in items:
            changed |= _rewrite_resource(item, mapper)
    for member in ("next", "prev"):  # v1 token pagination
        value = doc.get(member)
        if isinstance(value, str):
            new = mapper(value)
            if new is not None and new != value:
                doc[member] = new
                changed = True
    return changed
