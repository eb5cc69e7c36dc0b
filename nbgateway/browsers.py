"""What a request's headers say about a browser that sent it: whether a web page sent it
(`sent_by_page`), and whether the host it was sent to is one of the gateway's own names
(`is_own_host`, against DNS rebinding). No HTTP handling: the proxy, the admin API and
the login page decide what to refuse.

Tools (curl, scripts, legacy programs) send neither `Sec-Fetch-Site` nor `Origin`; every
current browser sends `Sec-Fetch-Site` with each request, and `Origin` with each request a
page makes other than a same-origin GET. A page on any site can make the browser of
someone on an allowed address send requests to the gateway; with its own domain resolved
to the gateway's address (DNS rebinding) it can even read the answers, as its own origin's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit


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
    """The names a browser may use for the gateway: NBGW_PUBLIC_URL's host, any IP
    address, `localhost` (and names below it), and single-label names (a LAN host name).
    A name with a dot that is none of these may be another site's domain pointed at the
    gateway's address."""

    def __init__(self, public_url: str) -> None:
        self.public = host_name(urlsplit(public_url).netloc)

    def __contains__(self, host: str) -> bool:
        name = host_name(host)
        if not name:
            return False
        if name == self.public or "." not in name or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True
