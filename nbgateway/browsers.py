"""What a request's headers say about a browser that sent it: whether a web page sent it
(`sent_by_page`), and whether the host it was sent to is one of the gateway's own names
(`OwnHosts`, against DNS rebinding). No HTTP handling: the proxy, the admin API,
/metrics and the login page decide what to refuse.

A page on any site can make the browser of someone on an allowed address send requests to
the gateway; with its own domain resolved to the gateway's address (DNS rebinding) it can
even read the answers, as its own origin's. Tools (curl, scripts, legacy programs) send
neither `Sec-Fetch-Site` nor `Origin`. Browsers send `Sec-Fetch-Site` to secure addresses
(https, localhost) only, and `Origin` with each request a page makes other than a
same-origin GET or a navigation: so a page's GET to a plain-http address looks like a
tool's, and only its Host (the page's own domain) tells it apart.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from nbgateway.errors import ClientNotAllowed


def sent_by_page(headers: Mapping[str, str]) -> str | None:
    """The header showing that a web page in a browser sent this request, as
    `Sec-Fetch-Site: cross-site` (say); None for a tool, and for an address the user typed
    or bookmarked (`Sec-Fetch-Site: none`)."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None:
        site = site.strip().lower()
        return None if site == "none" else f"Sec-Fetch-Site: {site[:40]}"
    if "Origin" in headers:
        return "Origin"
    return None


def host_name(host: str) -> str:
    """The name in a Host header (no port, no brackets, lower case, no final dot)."""
    try:
        name = urlsplit(f"//{host.strip()}").hostname or ""
    except ValueError:
        return ""
    return name.rstrip(".")


class OwnHosts:
    """The names a browser or a tool may use for the gateway: NBGW_PUBLIC_URL's host, any
    IP address, `localhost` (and names below it), single-label names (a LAN host name, a
    container's service name), and NBGW_ALLOWED_HOSTS (`*.domain` for the names below a
    domain, `*` for any). A name with a dot that is none of these may be another site's
    domain pointed at the gateway's address. Decisions are remembered (bounded)."""

    _REMEMBERED = 1024

    def __init__(self, public_url: str, allowed: tuple[str, ...] = ()) -> None:
        self.public = host_name(urlsplit(public_url).netloc)
        self.any = "*" in allowed
        self._names = frozenset(n for n in allowed if not n.startswith("*."))
        self._suffixes = tuple(n[1:] for n in allowed if n.startswith("*."))  # ".domain"
        self._seen: dict[str, bool] = {}

    def check(self, headers: Mapping[str, str]) -> None:
        """ClientNotAllowed (403) for a request whose Host is none of these names; a
        request without a Host (HTTP/1.0, which no browser sends) passes."""
        host = headers.get("Host")
        if host is not None and host not in self:
            raise ClientNotAllowed(_foreign_host_message(host))

    def __contains__(self, host: str) -> bool:
        known = self._seen.get(host)
        if known is None:
            known = self._judge(host)
            if len(self._seen) >= self._REMEMBERED:
                self._seen.clear()
            self._seen[host] = known
        return known

    def _judge(self, host: str) -> bool:
        if self.any:
            return True
        name = host_name(host)
        if not name:
            return False
        if name == self.public or "." not in name or name.endswith(".localhost"):
            return True
        if name in self._names or name.endswith(self._suffixes):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


@functools.lru_cache(maxsize=8)
def own_hosts(public_url: str, allowed: tuple[str, ...]) -> OwnHosts:
    """The `OwnHosts` of these settings: one per configuration, shared by its users."""
    return OwnHosts(public_url, allowed)


def _foreign_host_message(host: str) -> str:
    """What a request sent to a Host that is none of the gateway's names is told."""
    name = host_name(host) or host
    return (
        f"the request was sent to the host {host[:100]!r}, which is not one of the "
        "gateway's names (NBGW_PUBLIC_URL's host, an IP address, localhost, a name without "
        "a dot, or one in NBGW_ALLOWED_HOSTS); a web page can send requests through a "
        "domain of its own pointed at the gateway's address. If tools call the gateway by "
        f"this name, add {name[:100]!r} to NBGW_ALLOWED_HOSTS"
    )
