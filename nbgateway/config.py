"""Settings: declared once, read from the environment and an optional TOML file.

`SETTINGS` is the single declaration (name, default, meaning, what is expected). The TOML
file may hold the same keys lower-cased without the `NBGW_` prefix; environment variables
win. `validate_settings` checks everything at once and returns every problem, one message
each naming the variable (missing, malformed or unworkable values, unknown `NBGW_*`
variables and TOML keys); `load_settings` raises them together as one `ConfigError`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, urlsplit

from nbgateway.errors import ConfigError
from nbgateway.models import is_valid_slug
from nbgateway.redact import Secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# More serving processes than this is a typo, not a deployment (each holds its own pools).
MAX_WORKERS = 64

DEFAULT_ALLOWED_CLIENTS = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"

# NationBuilder access tokens live 24 h and every refresh rotates the refresh token. A margin
# close to that life would refresh on (nearly) every request; an hour is twelve times the
# default and already rides out an hour-long token-endpoint outage before a token expires.
MAX_REFRESH_MARGIN = 3600
# Waiting longer than an hour for one read from NationBuilder means the connection is hung;
# the store's lock wait is derived from this value, so it must stay a sane number too.
MAX_UPSTREAM_TIMEOUT = 3600.0
# Upper bounds of the other durations (each refused above with its reason).
MAX_CLIENT_TIMEOUT = 3600.0  # NBGW_HEADER_TIMEOUT, NBGW_BODY_TIMEOUT, NBGW_RATE_QUEUE_TIMEOUT
MAX_TOKEN_TIMEOUT = 600.0
MAX_AUDIT_RETENTION_DAYS = 36500.0

T = TypeVar("T")


@dataclass(frozen=True)
class Setting:
    """One configuration variable, as users see it."""

    env: str
    default: str | None  # None: required (when the command needs it)
    help: str
    expects: str

    @property
    def key(self) -> str:
        """The TOML key for this setting."""
        return self.env.removeprefix("NBGW_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "NBGW_LISTEN",
        "127.0.0.1:8080",
        "host:port to bind",
        "host:port such as 0.0.0.0:8080 or [::1]:8080 (no scheme), port 1-65535",
    ),
    Setting(
        "NBGW_PUBLIC_URL",
        "",
        "external base URL; redirect_uri is {PUBLIC_URL}/connect/callback "
        "(default http://{NBGW_LISTEN})",
        "an http:// or https:// URL with a host, optionally a path prefix, no query",
    ),
    Setting(
        "NBGW_DATABASE",
        "./nbgateway.db",
        "a SQLite file path, or a postgresql://user[:password]@host[:port]/dbname URL for "
        "several replicas sharing one database",
        "a file path or a postgresql:// URL",
    ),
    Setting(
        "NBGW_ENCRYPTION_KEY",
        None,
        "comma-separated keys from `nbgateway keygen`; the first encrypts, all decrypt",
        "one or more keys printed by `nbgateway keygen`, comma-separated",
    ),
    Setting(
        "NBGW_CLIENT_ID",
        None,
        "the NationBuilder app's OAuth client id",
        "a client id (no spaces)",
    ),
    Setting(
        "NBGW_CLIENT_SECRET",
        None,
        "the NationBuilder app's OAuth client secret",
        "a secret (no spaces)",
    ),
    Setting(
        "NBGW_ADMIN_TOKEN",
        None,
        "admin secret: /connect login and Bearer for /connect/api",
        "a secret of at least 16 characters, no spaces",
    ),
    Setting(
        "NBGW_NATION_URL",
        "https://{slug}.nationbuilder.com",
        "template for a nation's base URL (API, authorize, token)",
        "an http(s) URL containing {slug}",
    ),
    Setting(
        "NBGW_DEFAULT_ACCOUNT",
        "",
        "account for requests that name none; else the only connected one",
        "a nation slug (lowercase letters, digits, hyphens; at most 63 characters, no hyphen "
        "first)",
    ),
    Setting(
        "NBGW_REFRESH_MARGIN",
        "300",
        "seconds before expiry at which a token is refreshed (at most half its lifetime)",
        f"a whole number of seconds from 0 to {MAX_REFRESH_MARGIN}",
    ),
    Setting(
        "NBGW_ALLOWED_CLIENTS",
        DEFAULT_ALLOWED_CLIENTS,
        "CIDRs allowed to use the proxy (default: loopback and private ranges)",
        "comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32 (an address alone is /32 or /128)",
    ),
    Setting(
        "NBGW_ADMIN_ALLOWED_CLIENTS",
        "",
        "CIDRs allowed to use the admin pages and /connect/api (default: NBGW_ALLOWED_CLIENTS)",
        "comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32 (an address alone is /32 or /128)",
    ),
    Setting(
        "NBGW_METRICS_ALLOWED_CLIENTS",
        "",
        "CIDRs allowed to read /metrics (default: NBGW_ALLOWED_CLIENTS)",
        "comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32 (an address alone is /32 or /128)",
    ),
    Setting(
        "NBGW_ALLOWED_HOSTS",
        "",
        "names tools and browsers may call the gateway by (its Host header), besides its own: "
        "NBGW_PUBLIC_URL's host, IP addresses, localhost and names without a dot. A page "
        "whose domain is pointed at the gateway's address (DNS rebinding) uses another",
        "comma-separated host names (*.example.org for every name below a domain), or * "
        "for any name",
    ),
    Setting(
        "NBGW_HEADER_TIMEOUT",
        "10",
        "seconds a client may take to send a complete request head (from connecting, or from "
        "the first byte of a later request on the connection) before the connection is closed",
        f"a number of seconds > 0 and at most {MAX_CLIENT_TIMEOUT:.0f}",
    ),
    Setting(
        "NBGW_BODY_TIMEOUT",
        "30",
        "seconds a request body may stall (no byte arriving while the gateway waits for one) "
        "before the connection is closed",
        f"a number of seconds > 0 and at most {MAX_CLIENT_TIMEOUT:.0f}",
    ),
    Setting(
        "NBGW_MAX_CONNECTIONS_PER_CLIENT",
        "100",
        "open connections allowed from one client address; more are answered 429 and closed",
        "a whole number >= 1",
    ),
    Setting(
        "NBGW_UPSTREAM_TIMEOUT",
        "60",
        "seconds to wait for NationBuilder (connect and each read) before 504",
        f"a number of seconds > 0 and at most {MAX_UPSTREAM_TIMEOUT:.0f}",
    ),
    Setting(
        "NBGW_TOKEN_TIMEOUT",
        "15",
        "seconds to wait for NationBuilder's token endpoint before counting a refresh as timed out",
        f"a number of seconds > 0 and at most {MAX_TOKEN_TIMEOUT:.0f}",
    ),
    Setting(
        "NBGW_MAX_REQUEST_BODY",
        "10485760",
        "largest request body accepted (413 beyond it)",
        "a whole number of bytes > 0",
    ),
    Setting(
        "NBGW_RETRY_BUFFER",
        "1048576",
        "request bodies up to this size are buffered so they can be replayed after an upstream "
        "401; larger ones stream and are not retried",
        "a whole number of bytes >= 0",
    ),
    Setting(
        "NBGW_CLIENT_AUTH",
        "off",
        "client keys: off (allow-list only), optional (a presented key is checked and "
        "recorded, requests without one pass), required (every proxied request needs a key)",
        "off, optional or required (any case)",
    ),
    Setting(
        "NBGW_AUDIT_RETENTION_DAYS",
        "90",
        "days the audit trail of proxied writes is kept",
        f"a number of days > 0 and at most {MAX_AUDIT_RETENTION_DAYS:.0f}",
    ),
    Setting(
        "NBGW_RATE_QUEUE_TIMEOUT",
        "30",
        "longest a request waits for its nation's rate budget before the gateway answers 429 "
        "itself; 0 turns pacing off",
        f"a number of seconds >= 0 and at most {MAX_CLIENT_TIMEOUT:.0f}",
    ),
    Setting(
        "NBGW_RATE_DEFAULT_LIMIT",
        "",
        "budget assumed for nations whose responses carry no RateLimit headers, as "
        "REQUESTS/SECONDS (for example 250/10); empty: no pacing for them",
        "REQUESTS/SECONDS with whole numbers > 0, or empty",
    ),
    Setting(
        "NBGW_WORKERS",
        "1",
        "serving processes on the one listen address (`serve --workers`); one /metrics view "
        "over all of them",
        f"a whole number from 1 to {MAX_WORKERS}",
    ),
    Setting("NBGW_LOG_FORMAT", "text", "log format", "text or json (any case)"),
    Setting(
        "NBGW_LOG_LEVEL",
        "INFO",
        "log level of `serve` (the other commands print their outcome and log only warnings "
        "and errors, or everything at DEBUG)",
        "DEBUG, INFO, WARNING or ERROR (any case)",
    ),
    Setting(
        "NBGW_ACCESS_LOG",
        "on",
        "one INFO line per request (request id, account, method, status, duration); off "
        "saves about a tenth of the gateway's CPU per proxied request",
        "on or off (also true/false, yes/no, 1/0)",
    ),
    Setting(
        "NBGW_ALERT_WEBHOOK",
        "",
        "URL that receives a JSON POST when an account needs re-authorization",
        "an http(s) URL",
    ),
)

SETTINGS_BY_ENV = {s.env: s for s in SETTINGS}

REQUIRED_FOR_SERVE = frozenset(
    {"NBGW_ENCRYPTION_KEY", "NBGW_CLIENT_ID", "NBGW_CLIENT_SECRET", "NBGW_ADMIN_TOKEN"}
)
REQUIRED_FOR_STORE = frozenset({"NBGW_ENCRYPTION_KEY"})
REQUIRED_FOR_OAUTH = frozenset({"NBGW_ENCRYPTION_KEY", "NBGW_CLIENT_ID", "NBGW_CLIENT_SECRET"})


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Build with `load_settings` (or directly in tests)."""

    encryption_keys: tuple[Secret, ...]
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    admin_token: Secret = field(default_factory=lambda: Secret(""))
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    # A Path for SQLite, or the postgresql:// URL as given.
    database: Path | str = Path("./nbgateway.db")
    nation_url: str = "https://{slug}.nationbuilder.com"
    default_account: str = ""
    refresh_margin: float = 300.0
    allowed_clients: tuple[IPNetwork, ...] = ()
    admin_allowed_clients: tuple[IPNetwork, ...] = ()  # () = same as allowed_clients
    metrics_allowed_clients: tuple[IPNetwork, ...] = ()  # () = same as allowed_clients
    allowed_hosts: tuple[str, ...] = ()  # besides the gateway's own names; ("*",) = any
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections_per_client: int = 100
    upstream_timeout: float = 60.0
    token_timeout: float = 15.0
    max_request_body: int = 10 * 1024 * 1024
    retry_buffer: int = 1024 * 1024
    client_auth: str = "off"
    audit_retention_days: float = 90.0
    rate_queue_timeout: float = 30.0
    rate_default_limit: tuple[int, float] | None = None
    workers: int = 1
    log_format: str = "text"
    log_level: str = "INFO"
    access_log: bool = True
    alert_webhook: str = ""

    def __post_init__(self) -> None:
        if not self.public_url:
            host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
            object.__setattr__(self, "public_url", f"http://{host}:{self.port}")
        if not self.allowed_clients:
            object.__setattr__(
                self,
                "allowed_clients",
                _parse_cidrs("NBGW_ALLOWED_CLIENTS", DEFAULT_ALLOWED_CLIENTS),
            )
        for name in ("admin_allowed_clients", "metrics_allowed_clients"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.allowed_clients)

    def nation_base(self, slug: str) -> str:
        """The base URL of a nation (no trailing slash)."""
        return self.nation_url.replace("{slug}", slug).rstrip("/")

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url.rstrip('/')}/connect/callback"

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    def secrets(self) -> list[Secret]:
        """Every secret held in the settings (for the log redactor)."""
        held = [*self.encryption_keys, self.client_secret, self.admin_token]
        if self.alert_webhook:
            held.append(Secret(self.alert_webhook))  # chat webhook URLs are credentials
        if isinstance(self.database, str):
            password = urlsplit(self.database).password
            if password:
                held.append(Secret(password))
        return held


def _fail(env: str, expected: str) -> ConfigError:
    """A ConfigError naming the variable; an empty `expected` means the value is missing."""
    setting = SETTINGS_BY_ENV.get(env)
    if setting is None:  # a command-line value (`migrate --to`): no setting's description
        return ConfigError(f"{env} is invalid: {expected or 'empty'}")
    if not expected:
        return ConfigError(f"{env} is required: expected {setting.expects}")
    return ConfigError(f"{env} is invalid: {expected}; expected {setting.expects}")


def _closest(name: str, known: Collection[str]) -> str:
    """' (did you mean X?)' for the known name closest to a likely typo (case aside: a
    TOML key written `LISTEN`, a variable `nbgw_listen`), else ''."""
    by_case = {k.lower(): k for k in known}
    found = by_case.get(name.lower())
    if found is None:
        matches = difflib.get_close_matches(name.lower(), list(by_case), n=1, cutoff=0.6)
        found = by_case[matches[0]] if matches else None
    return f" (did you mean {found}?)" if found else ""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per `NBGW_*` variable that is not a setting (a likely typo)."""
    return [
        f"{name} is not a known setting{_closest(name, SETTINGS_BY_ENV)}; "
        "`nbgateway --help` lists them"
        for name in sorted(environ)
        if name.startswith("NBGW_") and name not in SETTINGS_BY_ENV
    ]


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a DNS name, or None when it is one."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host.removesuffix(".")
    if (
        not name
        or len(name) > 253
        or re.fullmatch(r"[0-9.]+", name)  # looks like IPv4 but is not one
        or not all(_HOST_LABEL.fullmatch(label) for label in name.split("."))
    ):
        return f"{host!r} is not a host name or IP address"
    return None


def _parse_listen(env: str, raw: str) -> tuple[str, int]:
    """host:port (IPv6 in brackets) -> (host, port)."""
    if "://" in raw or "/" in raw:
        raise _fail(
            env,
            f"{raw!r} is a URL, not host:port: drop the scheme and path (the public address "
            "goes in NBGW_PUBLIC_URL)",
        )
    bracketed = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", raw)
    if bracketed:
        host, port_s = bracketed.groups()
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise _fail(env, f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_s = raw.rpartition(":")
        if not sep or not host:
            raise _fail(env, f"{raw!r} is not host:port")
        if ":" in host:
            raise _fail(env, f"{raw!r}: an IPv6 address needs brackets, such as [::1]:8080")
        problem = _host_problem(host)
        if problem:
            raise _fail(env, problem)
    if not _DIGITS.fullmatch(port_s):
        raise _fail(env, f"port {port_s!r} is not a number")
    port = int(port_s)
    if port == 0:
        raise _fail(env, "port 0 would bind a random port, so no redirect URI could match it")
    if port > 65535:
        raise _fail(env, f"port {port} is out of range")
    return host, port


# ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses.
_DIGITS = re.compile(r"[0-9]+")


def _parse_cidrs(env: str, raw: str) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise _fail(env, f"{part!r} is not a CIDR") from None
        given = ipaddress.ip_interface(part)
        if int(given.ip) & int(net.hostmask):
            # 10.0.0.1/8 is most likely a typo for one of two very different lists.
            raise _fail(
                env,
                f"{part!r} has host bits set: write {net} for the whole network, or "
                f"{given.ip}/{net.max_prefixlen} for that one address",
            )
        nets.append(net)
    if not nets:
        raise _fail(env, "no CIDR given")
    return tuple(nets)


def _parse_hosts(env: str, raw: str) -> tuple[str, ...]:
    """Host names, lower case without a final dot; `*.domain` for the names below it; `*`."""
    names: list[str] = []
    for part in raw.split(","):
        if not part.strip():
            continue
        if part.strip() == "*":
            return ("*",)
        name = part.strip().lower().rstrip(".")
        plain = name.removeprefix("*.")
        if ":" in plain or "/" in plain:
            raise _fail(env, f"{part.strip()!r} is a host name with a port or path; give the name")
        problem = _host_problem(plain)
        if problem or "*" in plain:
            raise _fail(env, f"{part.strip()!r} is not a host name")
        names.append(name)
    return tuple(names)


def _parse_optional_cidrs(env: str, raw: str) -> tuple[IPNetwork, ...]:
    """A CIDR list that may be left empty (then `Settings` fills in NBGW_ALLOWED_CLIENTS)."""
    return _parse_cidrs(env, raw) if raw else ()


def _parse_number(
    env: str,
    raw: str,
    kind: Callable[[str], float],
    minimum: float,
    *,
    exclusive: bool = False,
    maximum: float | None = None,
    why: str = "",
) -> float:
    """A finite number >= minimum (> minimum when `exclusive`), <= maximum when given.

    `why` says why the maximum exists; it goes into the message of a value above it.
    """
    try:
        if not raw.isascii():  # float() and int() also read "٣٠" as 30
            raise ValueError(raw)
        value = kind(raw)
    except ValueError:
        noun = "a number" if kind is float else "a whole number"
        raise _fail(env, f"{raw!r} is not {noun}") from None
    if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
        raise _fail(env, f"{raw!r} is out of range")
    if maximum is not None and value > maximum:
        reason = f": {why}" if why else ""
        raise _fail(env, f"{raw!r} is above the maximum of {maximum:g}{reason}")
    return value


_HUNG_CLIENT = "a client that sends nothing for longer than an hour is a hung one"


def _parse_rate(env: str, raw: str) -> tuple[int, float] | None:
    """REQUESTS/SECONDS as (requests, seconds); empty means none."""
    if not raw:
        return None
    count, sep, seconds = raw.partition("/")
    if not sep or not _DIGITS.fullmatch(count.strip()) or not _DIGITS.fullmatch(seconds.strip()):
        raise _fail(env, f"{raw!r} is not REQUESTS/SECONDS")
    if int(count) <= 0 or int(seconds) <= 0:
        raise _fail(env, f"{raw!r} is out of range")
    return int(count), float(seconds)


def _split_url(env: str, raw: str, *, shown: str) -> SplitResult:
    """Split an http(s) URL with a valid host and port; `shown` is how the value is quoted."""
    parts = _urlsplit(env, raw, shown)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _fail(env, f"{shown} is not an http(s) URL with a host")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise _fail(env, f"{shown} has an invalid port") from None
    problem = _host_problem(host or "")
    if problem:
        raise _fail(env, f"{shown}: {problem}")
    if port == 0:
        raise _fail(env, f"{shown} has port 0")
    return parts


def _urlsplit(env: str, raw: str, shown: str) -> SplitResult:
    """urlsplit, its ValueError (an unclosed "[", say) a ConfigError naming `env`."""
    try:
        return urlsplit(raw)
    except ValueError as exc:
        raise _fail(env, f"{shown} is not a well-formed URL ({exc})") from None


# A base URL's path: RFC 3986 path characters but ";" (a cookie's Path attribute would end
# there, and servers split path parameters on it), or a %XX escape.
_URL_PATH = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,=:@/-]|%[0-9A-Fa-f]{2})*")


def _parse_url(env: str, raw: str) -> str:
    """An http(s) base URL: scheme, host, optional port and path; no query or fragment.
    Returned with scheme and host in lower case (as they compare), without a final "/"."""
    if "@" in _urlsplit(env, raw, "the URL").netloc:
        # Not echoed: what precedes the @ may be a password.
        raise _fail(env, "the URL contains a user name or password")
    parts = _split_url(env, raw.replace("{slug}", "slug"), shown=repr(raw))
    if parts.query or parts.fragment or raw.endswith("?") or "#" in raw:
        raise _fail(env, f"{raw!r} has a query or fragment; give a base URL")
    if not _URL_PATH.fullmatch(parts.path):
        raise _fail(
            env,
            f"{raw!r} has a path with characters a URL path cannot hold as they are "
            "(spaces, quotes, <>, ; or a lone %); percent-encode them",
        )
    written = urlsplit(raw)  # {slug} kept where it was
    return f"{parts.scheme}://{written.netloc.lower()}{written.path}".rstrip("/")


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(database: str | Path) -> bool:
    """True when NBGW_DATABASE names a PostgreSQL database rather than a SQLite file."""
    return isinstance(database, str) and database.startswith(POSTGRES_SCHEMES)


def same_database(a: Path | str, b: Path | str) -> bool:
    """True when two NBGW_DATABASE values name the same database."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return a == b


def parse_database(raw: str, env: str = "NBGW_DATABASE") -> Path | str:
    """A SQLite file path, or a checked postgresql:// URL (ConfigError naming `env` otherwise)."""
    raw = raw.strip()
    if not raw:
        raise _fail(env, "empty")
    if "://" in raw and not raw.startswith(POSTGRES_SCHEMES):
        # Not echoed: a URL may carry a password.
        raise _fail(env, "the value is a URL, but only postgresql:// URLs name a database")
    if not raw.startswith(POSTGRES_SCHEMES):
        if "\x00" in raw:
            raise _fail(env, "the path contains a NUL character")
        try:
            is_dir = raw.endswith(("/", "\\")) or Path(raw).is_dir()
        except OSError as exc:  # a name longer than the filesystem allows, say
            raise _fail(env, f"{raw[:80]!r}… cannot be a path: {exc.strerror or exc}") from None
        if is_dir:
            raise _fail(env, f"{raw!r} is a directory; name the database file inside it")
        return Path(raw)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise _fail(env, "the postgresql:// URL is malformed") from None
    if not parts.hostname and "host=" not in parts.query:
        raise _fail(env, "the postgresql:// URL names no host")
    if not parts.path.strip("/"):
        raise _fail(env, "the postgresql:// URL names no database (…/dbname)")
    for name, value in parse_qsl(parts.query):
        if name in _TLS_FILE_OPTIONS and value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise _fail(env, f"{name}={value} names no file")
            if not os.access(path, os.R_OK):
                raise _fail(env, f"{name}={value} cannot be read by this user")
    return raw


# The URL options naming files the TLS connection reads (asyncpg's libpq-style names).
_TLS_FILE_OPTIONS = frozenset({"sslrootcert", "sslcert", "sslkey", "sslcrl"})


def _parse_optional_url(env: str, raw: str) -> str:
    return _parse_url(env, raw) if raw else ""


def _parse_nation_url(env: str, raw: str) -> str:
    url = _parse_url(env, raw)
    if "{slug}" not in url:
        raise _fail(env, "it does not contain {slug}")
    return url


def _parse_webhook(env: str, raw: str) -> str:
    if raw:
        # Not echoed: webhook URLs often carry a secret.
        _split_url(env, raw, shown="the URL")
    return raw


def _parse_keys(env: str, raw: str) -> tuple[Secret, ...]:
    keys = tuple(Secret(k.strip()) for k in raw.split(",") if k.strip())
    if raw:
        if not keys:
            raise _fail(env, "no key given")
        # crypto sits above config in the layering (it raises ConfigError): import late.
        from nbgateway.crypto import validate_key

        for index, key in enumerate(keys):
            if not validate_key(key):
                raise _fail(env, f"key #{index + 1} is not a 32-byte url-safe base64 key")
    return keys


def _parse_word(env: str, raw: str, *, secret: bool = False, min_length: int = 0) -> str:
    """One token of printable characters without spaces (a secret is never echoed)."""
    if any(ch.isspace() or not ch.isprintable() for ch in raw):
        shown = "it" if secret else repr(raw)
        raise _fail(env, f"{shown} contains spaces or control characters")
    if raw and len(raw) < min_length:
        raise _fail(env, f"too short ({len(raw)} characters)")
    return raw


def _parse_slug(env: str, raw: str) -> str:
    if raw and not is_valid_slug(raw):
        raise _fail(env, f"{raw!r} is not a valid slug")
    return raw


def _parse_choice(env: str, raw: str, choices: Collection[str]) -> str:
    if raw not in choices:
        raise _fail(env, f"{raw!r} is not one of {', '.join(sorted(choices))}")
    return raw


_ON = ("on", "true", "1", "yes")
_OFF = ("off", "false", "0", "no")


def _parse_switch(env: str, raw: str) -> bool:
    value = raw.lower()
    if value not in _ON + _OFF:
        raise _fail(env, f"{raw!r} is not on or off")
    return value in _ON


def _read_toml(path: Path) -> tuple[dict[str, str], list[str]]:
    """The settings a TOML file holds (by variable name) and one message per problem in it."""
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError:
        return {}, [f"config file {path} does not exist"]
    except OSError as exc:
        return {}, [f"config file {path} cannot be read: {exc.strerror or exc}"]
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"config file {path} is not valid TOML: {exc}"]
    except UnicodeDecodeError as exc:
        return {}, [
            f"config file {path} is not valid TOML: it is not UTF-8 text"
            f" (byte {exc.start} cannot be decoded)"
        ]
    known = {s.key: s for s in SETTINGS}
    values: dict[str, str] = {}
    problems: list[str] = []
    for key, value in data.items():
        if key not in known:
            if key.upper() in SETTINGS_BY_ENV:
                hint = f" (write it as {SETTINGS_BY_ENV[key.upper()].key!r} in the file)"
            else:
                hint = _closest(key, known)
            problems.append(f"config file {path}: unknown setting {key!r}{hint}")
            continue
        setting = known[key]
        if isinstance(value, list) and "comma-separated" in setting.expects:
            if not all(isinstance(v, str) for v in value):
                problems.append(f"config file {path}: {key} must be a list of strings")
                continue
            values[setting.env] = ",".join(value)
            continue
        if isinstance(value, bool) and setting.expects.startswith("on or off"):
            values[setting.env] = "on" if value else "off"  # access_log = false
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            problems.append(f"config file {path}: {key} must be a string or number")
            continue
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # 1e3 is 1000, as written, not '1000.0'
        values[setting.env] = str(value)
    return values, problems


@dataclass(frozen=True)
class Validation:
    """The outcome of `validate_settings`.

    `settings` holds every accepted value, with the default in place of a refused one, so a
    caller (`nbgateway check`) can go on checking what does not depend on the refused ones.
    """

    settings: Settings
    problems: tuple[str, ...]
    refused: frozenset[str]  # variables whose value was missing or refused


def _raw_values(
    environ: Mapping[str, str], config_file: Path | None
) -> tuple[dict[str, str], list[str]]:
    """Each setting's text by variable name, the environment over the TOML file, and one
    message per problem with the file."""
    raw: dict[str, str] = {}
    problems: list[str] = []
    if config_file is not None:
        file_values, problems = _read_toml(config_file)
        raw.update(file_values)
    for setting in SETTINGS:
        # An empty variable (as an env file with `NBGW_X=` leaves) does not hide the file.
        if environ.get(setting.env, "").strip():
            raw[setting.env] = environ[setting.env]
    return raw, problems


def settled_environment(environ: Mapping[str, str], config_file: Path | None) -> dict[str, str]:
    """`environ` with the TOML file's settings written in as their variables: the same
    settings without the file. `serve --workers` hands this to its workers, so each one (a
    replacement started hours later too) runs the configuration the parent checked, not
    whatever the file holds by then."""
    raw, _ = _raw_values(environ, config_file)
    return {**environ, **raw}


def validate_settings(
    environ: Mapping[str, str],
    config_file: Path | None = None,
    *,
    required: Collection[str] = REQUIRED_FOR_SERVE,
) -> Validation:
    """Read and validate every setting; collect every problem instead of stopping at the first.

    Environment wins over the TOML file. Each value is parsed by the function named next to
    its variable below; a parser raises `_fail(env, why)` and never sees another variable.
    """
    refused: set[str] = set()
    raw, problems = _raw_values(environ, config_file)
    problems.extend(unknown_variables(environ))

    def take(env: str, parse: Callable[[str, str], T]) -> T:
        """The parsed value of `env`; on a problem, record it and use the default."""
        fallback = SETTINGS_BY_ENV[env].default or ""
        value = raw.get(env, "").strip()
        try:
            if not value:
                if SETTINGS_BY_ENV[env].default is None and env in required:
                    raise _fail(env, "")
                value = fallback
            return parse(env, value)
        except ConfigError as exc:
            problems.extend(exc.problems)
            refused.add(env)
            return parse(env, fallback)

    host, port = take("NBGW_LISTEN", _parse_listen)
    settings = Settings(
        host=host,
        port=port,
        public_url=take("NBGW_PUBLIC_URL", _parse_optional_url),
        database=take("NBGW_DATABASE", lambda e, r: parse_database(r, e)),
        encryption_keys=take("NBGW_ENCRYPTION_KEY", _parse_keys),
        client_id=take("NBGW_CLIENT_ID", _parse_word),
        client_secret=Secret(
            take("NBGW_CLIENT_SECRET", lambda e, r: _parse_word(e, r, secret=True))
        ),
        admin_token=Secret(
            take("NBGW_ADMIN_TOKEN", lambda e, r: _parse_word(e, r, secret=True, min_length=16))
        ),
        nation_url=take("NBGW_NATION_URL", _parse_nation_url),
        default_account=take("NBGW_DEFAULT_ACCOUNT", _parse_slug),
        refresh_margin=take(
            "NBGW_REFRESH_MARGIN",
            lambda e, r: _parse_number(
                e,
                r,
                int,
                0,
                maximum=MAX_REFRESH_MARGIN,
                why="NationBuilder access tokens live 24 h and each refresh rotates the "
                "refresh token, so a margin near that life would refresh on nearly every "
                "request",
            ),
        ),
        allowed_clients=take("NBGW_ALLOWED_CLIENTS", _parse_cidrs),
        admin_allowed_clients=take("NBGW_ADMIN_ALLOWED_CLIENTS", _parse_optional_cidrs),
        metrics_allowed_clients=take("NBGW_METRICS_ALLOWED_CLIENTS", _parse_optional_cidrs),
        allowed_hosts=take("NBGW_ALLOWED_HOSTS", _parse_hosts),
        header_timeout=take(
            "NBGW_HEADER_TIMEOUT",
            lambda e, r: _parse_number(
                e, r, float, 0, exclusive=True, maximum=MAX_CLIENT_TIMEOUT, why=_HUNG_CLIENT
            ),
        ),
        body_timeout=take(
            "NBGW_BODY_TIMEOUT",
            lambda e, r: _parse_number(
                e, r, float, 0, exclusive=True, maximum=MAX_CLIENT_TIMEOUT, why=_HUNG_CLIENT
            ),
        ),
        max_connections_per_client=int(
            take("NBGW_MAX_CONNECTIONS_PER_CLIENT", lambda e, r: _parse_number(e, r, int, 1))
        ),
        upstream_timeout=take(
            "NBGW_UPSTREAM_TIMEOUT",
            lambda e, r: _parse_number(
                e,
                r,
                float,
                0,
                exclusive=True,
                maximum=MAX_UPSTREAM_TIMEOUT,
                why="a read that waits longer than an hour is a hung connection",
            ),
        ),
        token_timeout=take(
            "NBGW_TOKEN_TIMEOUT",
            lambda e, r: _parse_number(
                e,
                r,
                float,
                0,
                exclusive=True,
                maximum=MAX_TOKEN_TIMEOUT,
                why="a refresh's lease and the shutdown grace grow with it, and a token "
                "endpoint that takes longer than ten minutes is down",
            ),
        ),
        max_request_body=int(
            take("NBGW_MAX_REQUEST_BODY", lambda e, r: _parse_number(e, r, int, 1))
        ),
        retry_buffer=int(take("NBGW_RETRY_BUFFER", lambda e, r: _parse_number(e, r, int, 0))),
        client_auth=take("NBGW_CLIENT_AUTH", lambda e, r: _parse_choice(e, r.lower(), _AUTH)),
        audit_retention_days=take(
            "NBGW_AUDIT_RETENTION_DAYS",
            lambda e, r: _parse_number(
                e,
                r,
                float,
                0,
                exclusive=True,
                maximum=MAX_AUDIT_RETENTION_DAYS,
                why="a hundred years",
            ),
        ),
        rate_queue_timeout=take(
            "NBGW_RATE_QUEUE_TIMEOUT",
            lambda e, r: _parse_number(
                e,
                r,
                float,
                0,
                maximum=MAX_CLIENT_TIMEOUT,
                why="a request held longer than an hour for its nation's budget is one its "
                "tool gave up on",
            ),
        ),
        rate_default_limit=take("NBGW_RATE_DEFAULT_LIMIT", _parse_rate),
        workers=int(
            take(
                "NBGW_WORKERS",
                lambda e, r: _parse_number(
                    e,
                    r,
                    int,
                    1,
                    maximum=MAX_WORKERS,
                    why="one worker per core is the most that helps",
                ),
            )
        ),
        log_format=take("NBGW_LOG_FORMAT", lambda e, r: _parse_choice(e, r.lower(), _FORMATS)),
        log_level=take("NBGW_LOG_LEVEL", lambda e, r: _parse_choice(e, r.upper(), _LEVELS)),
        access_log=take("NBGW_ACCESS_LOG", _parse_switch),
        alert_webhook=take("NBGW_ALERT_WEBHOOK", _parse_webhook),
    )
    return Validation(settings, tuple(problems), frozenset(refused))


_AUTH = ("off", "optional", "required")
_FORMATS = ("text", "json")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def load_settings(
    environ: Mapping[str, str],
    config_file: Path | None = None,
    *,
    required: Collection[str] = REQUIRED_FOR_SERVE,
) -> Settings:
    """Read, validate and return the settings, or raise one ConfigError listing every problem."""
    result = validate_settings(environ, config_file, required=required)
    if result.problems:
        raise ConfigError(*result.problems)
    return result.settings
