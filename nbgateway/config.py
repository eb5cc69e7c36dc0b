"""Settings: declared once, read from the environment and an optional TOML file.

`SETTINGS` is the single declaration (name, default, meaning, parser). The TOML file may hold
the same keys lower-cased without the `NBGW_` prefix; environment variables win. Any missing
or malformed value raises `ConfigError` naming the variable and what is expected.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nbgateway.errors import ConfigError
from nbgateway.models import is_valid_slug
from nbgateway.redact import Secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ALLOWED_CLIENTS = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


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
    Setting("NBGW_LISTEN", "127.0.0.1:8080", "host:port to bind", "host:port"),
    Setting(
        "NBGW_PUBLIC_URL",
        "",
        "external base URL; redirect_uri is {PUBLIC_URL}/connect/callback "
        "(default http://{NBGW_LISTEN})",
        "an http:// or https:// URL",
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
    Setting("NBGW_CLIENT_ID", None, "the NationBuilder app's OAuth client id", "a client id"),
    Setting("NBGW_CLIENT_SECRET", None, "the NationBuilder app's OAuth client secret", "a secret"),
    Setting(
        "NBGW_ADMIN_TOKEN",
        None,
        "admin secret: /connect login and Bearer for /connect/api",
        "a secret of at least 16 characters",
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
        "a nation slug (lowercase letters, digits, hyphens)",
    ),
    Setting(
        "NBGW_REFRESH_MARGIN",
        "300",
        "seconds before expiry at which a token is refreshed",
        "a whole number of seconds >= 0",
    ),
    Setting(
        "NBGW_ALLOWED_CLIENTS",
        DEFAULT_ALLOWED_CLIENTS,
        "CIDRs allowed to use the proxy (default: loopback and private ranges)",
        "comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32",
    ),
    Setting(
        "NBGW_ADMIN_ALLOWED_CLIENTS",
        "",
        "CIDRs allowed to use the admin pages and /connect/api (default: NBGW_ALLOWED_CLIENTS)",
        "comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32",
    ),
    Setting(
        "NBGW_METRICS_ALLOWED_CLIENTS",
        "",
        "CIDRs allowed to read /metrics (default: NBGW_ALLOWED_CLIENTS)",
        "comma-separated CIDRs such as 10.0.0.0/8,127.0.0.1/32",
    ),
    Setting(
        "NBGW_HEADER_TIMEOUT",
        "10",
        "seconds a client may take to send a complete request head (from connecting, or from "
        "the first byte of a later request on the connection) before the connection is closed",
        "a number of seconds > 0",
    ),
    Setting(
        "NBGW_BODY_TIMEOUT",
        "30",
        "seconds a request body may stall (no byte arriving while the gateway waits for one) "
        "before the connection is closed",
        "a number of seconds > 0",
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
        "a number of seconds > 0",
    ),
    Setting(
        "NBGW_TOKEN_TIMEOUT",
        "15",
        "seconds to wait for NationBuilder's token endpoint before counting a refresh as timed out",
        "a number of seconds > 0",
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
        "off, optional or required",
    ),
    Setting(
        "NBGW_AUDIT_RETENTION_DAYS",
        "90",
        "days the audit trail of proxied writes is kept",
        "a number of days > 0",
    ),
    Setting(
        "NBGW_RATE_QUEUE_TIMEOUT",
        "30",
        "longest a request waits for its nation's rate budget before the gateway answers 429 "
        "itself; 0 turns pacing off",
        "a number of seconds >= 0",
    ),
    Setting(
        "NBGW_RATE_DEFAULT_LIMIT",
        "",
        "budget assumed for nations whose responses carry no RateLimit headers, as "
        "REQUESTS/SECONDS (for example 250/10); empty: no pacing for them",
        "REQUESTS/SECONDS with whole numbers > 0, or empty",
    ),
    Setting("NBGW_LOG_FORMAT", "text", "log format", "text or json"),
    Setting("NBGW_LOG_LEVEL", "INFO", "log level", "DEBUG, INFO, WARNING or ERROR"),
    Setting(
        "NBGW_ACCESS_LOG",
        "on",
        "one INFO line per request (request id, account, method, status, duration); off "
        "saves about a quarter of the gateway's CPU per proxied request",
        "on or off",
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
    expects = setting.expects if setting else expected
    if not expected:
        return ConfigError(f"{env} is required: expected {expects}")
    return ConfigError(f"{env} is invalid: {expected}; expected {expects}")


def _parse_cidrs(env: str, raw: str) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise _fail(env, f"{part!r} is not a CIDR") from None
    if not nets:
        raise _fail(env, "no CIDR given")
    return tuple(nets)


def _optional_cidrs(env: str, get: Callable[[str], str]) -> tuple[IPNetwork, ...]:
    """A CIDR list that may be left empty (then `Settings` fills in NBGW_ALLOWED_CLIENTS)."""
    raw = get(env)
    return _parse_cidrs(env, raw) if raw else ()


def _parse_number(
    env: str, raw: str, kind: Callable[[str], float], minimum: float, *, exclusive: bool = False
) -> float:
    """A finite number >= minimum (> minimum when `exclusive`)."""
    try:
        value = kind(raw)
    except ValueError:
        raise _fail(env, f"{raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
        raise _fail(env, f"{raw!r} is out of range")
    return value


def _parse_rate(env: str, raw: str) -> tuple[int, float] | None:
    """REQUESTS/SECONDS as (requests, seconds); empty means none."""
    if not raw:
        return None
    count, sep, seconds = raw.partition("/")
    if not sep or not count.strip().isdigit() or not seconds.strip().isdigit():
        raise _fail(env, f"{raw!r} is not REQUESTS/SECONDS")
    if int(count) <= 0 or int(seconds) <= 0:
        raise _fail(env, f"{raw!r} is out of range")
    return int(count), float(seconds)


def _parse_url(env: str, raw: str) -> str:
    parts = urlsplit(raw.replace("{slug}", "slug"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _fail(env, f"{raw!r} is not an http(s) URL")
    return raw.rstrip("/")


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
    """A SQLite path, or a checked postgresql:// URL (ConfigError naming `env` otherwise)."""
    raw = raw.strip()
    if not raw:
        raise _fail(env, "empty")
    if not raw.startswith(POSTGRES_SCHEMES):
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
    return raw


def _read_toml(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {s.key: s for s in SETTINGS}
    values: dict[str, str] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"config file {path}: {key} must be a string or number")
        values[known[key].env] = str(value)
    return values


def load_settings(
    environ: Mapping[str, str],
    config_file: Path | None = None,
    *,
    required: Collection[str] = REQUIRED_FOR_SERVE,
) -> Settings:
    """Read, validate and return the settings. Environment wins over the TOML file."""
    raw: dict[str, str] = {}
    if config_file is not None:
        raw.update(_read_toml(config_file))
    for setting in SETTINGS:
        # An empty variable (as an env file with `NBGW_X=` leaves) does not hide the file.
        if environ.get(setting.env, "").strip():
            raw[setting.env] = environ[setting.env]

    def get(env: str) -> str:
        value = raw.get(env, "").strip()
        if value:
            return value
        default = SETTINGS_BY_ENV[env].default
        if default is None and env in required:
            raise _fail(env, "")
        return default or ""

    listen = get("NBGW_LISTEN")
    host, sep, port_s = listen.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise _fail("NBGW_LISTEN", f"{listen!r} is not host:port")
    host = host.strip("[]")

    keys_raw = get("NBGW_ENCRYPTION_KEY")
    keys = tuple(Secret(k.strip()) for k in keys_raw.split(",") if k.strip())
    if keys_raw:
        # crypto sits above config in the layering (it raises ConfigError): import late.
        from nbgateway.crypto import validate_key

        for index, key in enumerate(keys):
            if not validate_key(key):
                raise _fail(
                    "NBGW_ENCRYPTION_KEY",
                    f"key #{index + 1} is not a 32-byte url-safe base64 key",
                )

    admin = get("NBGW_ADMIN_TOKEN")
    if admin and len(admin) < 16:
        raise _fail("NBGW_ADMIN_TOKEN", "too short")

    nation_url = _parse_url("NBGW_NATION_URL", get("NBGW_NATION_URL"))
    if "{slug}" not in nation_url:
        raise _fail("NBGW_NATION_URL", "it does not contain {slug}")

    public_url = get("NBGW_PUBLIC_URL")
    if public_url:
        public_url = _parse_url("NBGW_PUBLIC_URL", public_url)

    default_account = get("NBGW_DEFAULT_ACCOUNT")
    if default_account and not is_valid_slug(default_account):
        raise _fail("NBGW_DEFAULT_ACCOUNT", f"{default_account!r} is not a valid slug")

    client_auth = get("NBGW_CLIENT_AUTH").lower()
    if client_auth not in ("off", "optional", "required"):
        raise _fail("NBGW_CLIENT_AUTH", f"{client_auth!r} is not a mode")

    log_format = get("NBGW_LOG_FORMAT").lower()
    if log_format not in ("text", "json"):
        raise _fail("NBGW_LOG_FORMAT", f"{log_format!r} is not a known format")
    log_level = get("NBGW_LOG_LEVEL").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise _fail("NBGW_LOG_LEVEL", f"{log_level!r} is not a level")

    access_log = get("NBGW_ACCESS_LOG").lower()
    if access_log not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise _fail("NBGW_ACCESS_LOG", f"{access_log!r} is not on or off")

    webhook = get("NBGW_ALERT_WEBHOOK")
    if webhook:
        parts = urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            # Not echoed: webhook URLs often carry a secret.
            raise _fail("NBGW_ALERT_WEBHOOK", "not an http(s) URL")

    return Settings(
        encryption_keys=keys,
        client_id=get("NBGW_CLIENT_ID"),
        client_secret=Secret(get("NBGW_CLIENT_SECRET")),
        admin_token=Secret(admin),
        host=host,
        port=int(port_s),
        public_url=public_url,
        database=parse_database(get("NBGW_DATABASE")),
        nation_url=nation_url,
        default_account=default_account,
        refresh_margin=_parse_number("NBGW_REFRESH_MARGIN", get("NBGW_REFRESH_MARGIN"), int, 0),
        allowed_clients=_parse_cidrs("NBGW_ALLOWED_CLIENTS", get("NBGW_ALLOWED_CLIENTS")),
        admin_allowed_clients=_optional_cidrs("NBGW_ADMIN_ALLOWED_CLIENTS", get),
        metrics_allowed_clients=_optional_cidrs("NBGW_METRICS_ALLOWED_CLIENTS", get),
        header_timeout=_parse_number(
            "NBGW_HEADER_TIMEOUT", get("NBGW_HEADER_TIMEOUT"), float, 0, exclusive=True
        ),
        body_timeout=_parse_number(
            "NBGW_BODY_TIMEOUT", get("NBGW_BODY_TIMEOUT"), float, 0, exclusive=True
        ),
        max_connections_per_client=int(
            _parse_number(
                "NBGW_MAX_CONNECTIONS_PER_CLIENT", get("NBGW_MAX_CONNECTIONS_PER_CLIENT"), int, 1
            )
        ),
        upstream_timeout=_parse_number(
            "NBGW_UPSTREAM_TIMEOUT", get("NBGW_UPSTREAM_TIMEOUT"), float, 0, exclusive=True
        ),
        token_timeout=_parse_number(
            "NBGW_TOKEN_TIMEOUT", get("NBGW_TOKEN_TIMEOUT"), float, 0, exclusive=True
        ),
        max_request_body=int(
            _parse_number("NBGW_MAX_REQUEST_BODY", get("NBGW_MAX_REQUEST_BODY"), int, 1)
        ),
        retry_buffer=int(_parse_number("NBGW_RETRY_BUFFER", get("NBGW_RETRY_BUFFER"), int, 0)),
        client_auth=client_auth,
        audit_retention_days=_parse_number(
            "NBGW_AUDIT_RETENTION_DAYS",
            get("NBGW_AUDIT_RETENTION_DAYS"),
            float,
            0,
            exclusive=True,
        ),
        rate_queue_timeout=_parse_number(
            "NBGW_RATE_QUEUE_TIMEOUT", get("NBGW_RATE_QUEUE_TIMEOUT"), float, 0
        ),
        rate_default_limit=_parse_rate("NBGW_RATE_DEFAULT_LIMIT", get("NBGW_RATE_DEFAULT_LIMIT")),
        log_format=log_format,
        log_level=log_level,
        access_log=access_log in ("on", "true", "1", "yes"),
        alert_webhook=webhook,
    )
