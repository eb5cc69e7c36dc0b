"""Client allow-lists: is a peer address inside a set of networks?

`AllowList` answers one question for the proxy (NBGW_ALLOWED_CLIENTS), the admin pages
and API (NBGW_ADMIN_ALLOWED_CLIENTS), /metrics (NBGW_METRICS_ALLOWED_CLIENTS) and the
connection guard (the union of the three). IPv4-mapped IPv6 peers are judged by their
IPv4 address; anything that is not an address is refused. Decisions are remembered per
address, in bounded memory.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Peer addresses whose decision is remembered (then the memory starts over).
_CACHE_SIZE = 4096


def peer_address(peer: str | None) -> IPAddress | None:
    """The peer as an address (IPv4-mapped IPv6 unwrapped, zone dropped), None if not one."""
    if not peer:
        return None
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AllowList:
    """A fixed set of networks and a bounded memory of past decisions."""

    def __init__(self, *networks: Iterable[IPNetwork]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            dict.fromkeys(n for ns in networks for n in ns)
        )
        self._decisions: dict[str, bool] = {}

    def allows(self, peer: str | None) -> bool:
        key = peer or ""
        decision = self._decisions.get(key)
        if decision is None:
            address = peer_address(peer)
            decision = address is not None and any(address in net for net in self.networks)
            if len(self._decisions) >= _CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision
