"""Tests for settings loading (nbgateway.config): environment, TOML file, defaults, errors."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from nbgateway.cli import main
from nbgateway.config import (
    REQUIRED_FOR_SERVE,
    REQUIRED_FOR_STORE,
    SETTINGS,
    SETTINGS_BY_ENV,
    Setting,
    Settings,
    load_settings,
    parse_database,
)
from nbgateway.crypto import generate_key
from nbgateway.errors import ConfigError

KEY = generate_key()
OLD_KEY = generate_key()
CLIENT_SECRET = "client-secret-CANARY-4f1d9c"
ADMIN_TOKEN = "admin-token-CANARY-8e2b7a0c"

# Everything `serve` requires, with recognisable secret values.
BASE = {
    "NBGW_ENCRYPTION_KEY": KEY,
    "NBGW_CLIENT_ID": "client-id-1",
    "NBGW_CLIENT_SECRET": CLIENT_SECRET,
    "NBGW_ADMIN_TOKEN": ADMIN_TOKEN,
}
SECRET_VALUES = (KEY, OLD_KEY, CLIENT_SECRET, ADMIN_TOKEN)

# For every declared setting: a valid non-default value and a check that it was applied.
NON_DEFAULT: dict[str, tuple[str, Callable[[Settings], bool]]] = {
    "NBGW_LISTEN": ("0.0.0.0:9090", lambda s: (s.host, s.port) == ("0.0.0.0", 9090)),
    "NBGW_PUBLIC_URL": (
        "https://gw.example.org/",
        lambda s: s.redirect_uri == "https://gw.example.org/connect/callback",
    ),
    "NBGW_DATABASE": (
        "/var/lib/nbgw/tokens.db",
        lambda s: s.database == Path("/var/lib/nbgw/tokens.db"),
    ),
    "NBGW_ENCRYPTION_KEY": (
        f"{KEY},{OLD_KEY}",
        lambda s: [k.reveal() for k in s.encryption_keys] == [KEY, OLD_KEY],
    ),
    "NBGW_CLIENT_ID": ("another-client", lambda s: s.client_id == "another-client"),
    "NBGW_CLIENT_SECRET": (
        "another-secret-value",
        lambda s: s.client_secret.reveal() == "another-secret-value",
    ),
    "NBGW_ADMIN_TOKEN": (
        "another-admin-token-0123456789",
        lambda s: s.admin_token.reveal() == "another-admin-token-0123456789",
    ),
    "NBGW_NATION_URL": (
        "http://127.0.0.1:9999/{slug}",
        lambda s: s.nation_base("acme") == "http://127.0.0.1:9999/acme",
    ),
    "NBGW_DEFAULT_ACCOUNT": ("acme-2", lambda s: s.default_account == "acme-2"),
    "NBGW_REFRESH_MARGIN": ("120", lambda s: s.refresh_margin == 120),
    "NBGW_ALLOWED_CLIENTS": (
        "10.1.0.0/16, 192.0.2.7",
        lambda s: (
            s.allowed_clients
            == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("192.0.2.7/32"))
        ),
    ),
    "NBGW_ADMIN_ALLOWED_CLIENTS": (
        "192.168.1.0/24",
        lambda s: s.admin_allowed_clients == (ipaddress.ip_network("192.168.1.0/24"),),
    ),
    "NBGW_METRICS_ALLOWED_CLIENTS": (
        "10.2.0.0/16,::1",
        lambda s: (
            s.metrics_allowed_clients
            == (ipaddress.ip_network("10.2.0.0/16"), ipaddress.ip_network("::1/128"))
        ),
    ),
    "NBGW_ALLOWED_HOSTS": (
        "gw.corp.example, *.svc.cluster.local.",
        lambda s: s.allowed_hosts == ("gw.corp.example", "*.svc.cluster.local"),
    ),
    "NBGW_HEADER_TIMEOUT": ("2.5", lambda s: s.header_timeout == 2.5),
    "NBGW_BODY_TIMEOUT": ("7", lambda s: s.body_timeout == 7.0),
    "NBGW_MAX_CONNECTIONS_PER_CLIENT": ("3", lambda s: s.max_connections_per_client == 3),
    "NBGW_UPSTREAM_TIMEOUT": ("2.5", lambda s: s.upstream_timeout == 2.5),
    "NBGW_TOKEN_TIMEOUT": ("4.5", lambda s: s.token_timeout == 4.5),
    "NBGW_CLIENT_AUTH": ("Required", lambda s: s.client_auth == "required"),
    "NBGW_AUDIT_RETENTION_DAYS": ("7", lambda s: s.audit_retention_days == 7.0),
    "NBGW_MAX_REQUEST_BODY": ("2048", lambda s: s.max_request_body == 2048),
    "NBGW_RETRY_BUFFER": ("0", lambda s: s.retry_buffer == 0),
    "NBGW_RATE_QUEUE_TIMEOUT": ("0", lambda s: s.rate_queue_timeout == 0),
    "NBGW_RATE_DEFAULT_LIMIT": ("250/10", lambda s: s.rate_default_limit == (250, 10.0)),
    "NBGW_WORKERS": ("4", lambda s: s.workers == 4),
    "NBGW_LOG_FORMAT": ("JSON", lambda s: s.log_format == "json"),
    "NBGW_LOG_LEVEL": ("debug", lambda s: s.log_level == "DEBUG"),
    "NBGW_ACCESS_LOG": ("off", lambda s: s.access_log is False),
    "NBGW_ALERT_WEBHOOK": (
        "https://hooks.example.org/nbgw",
        lambda s: s.alert_webhook == "https://hooks.example.org/nbgw",
    ),
}

MALFORMED = [
    ("NBGW_LISTEN", "8080"),
    ("NBGW_LISTEN", "localhost"),
    ("NBGW_LISTEN", ":8080"),
    ("NBGW_LISTEN", "localhost:http"),
    ("NBGW_LISTEN", "localhost:70000"),
    ("NBGW_PUBLIC_URL", "gateway.example.org"),
    ("NBGW_ALLOWED_CLIENTS", "not-a-cidr"),
    ("NBGW_ALLOWED_CLIENTS", "10.0.0.0/33"),
    ("NBGW_ALLOWED_CLIENTS", "127.0.0.1/32,10.0.0.0/8,bogus"),
    ("NBGW_ADMIN_ALLOWED_CLIENTS", "nonsense"),
    ("NBGW_METRICS_ALLOWED_CLIENTS", "10.0.0.0/33"),
    ("NBGW_HEADER_TIMEOUT", "0"),
    ("NBGW_BODY_TIMEOUT", "-1"),
    ("NBGW_BODY_TIMEOUT", "slow"),
    ("NBGW_MAX_CONNECTIONS_PER_CLIENT", "0"),
    ("NBGW_MAX_CONNECTIONS_PER_CLIENT", "1.5"),
    ("NBGW_REFRESH_MARGIN", "soon"),
    ("NBGW_REFRESH_MARGIN", "-5"),
    ("NBGW_UPSTREAM_TIMEOUT", "fast"),
    ("NBGW_UPSTREAM_TIMEOUT", "0"),
    ("NBGW_UPSTREAM_TIMEOUT", "-1"),
    ("NBGW_TOKEN_TIMEOUT", "slow"),
    ("NBGW_TOKEN_TIMEOUT", "0"),
    ("NBGW_CLIENT_AUTH", "sometimes"),
    ("NBGW_AUDIT_RETENTION_DAYS", "0"),
    ("NBGW_AUDIT_RETENTION_DAYS", "forever"),
    ("NBGW_MAX_REQUEST_BODY", "big"),
    ("NBGW_MAX_REQUEST_BODY", "0"),
    ("NBGW_RETRY_BUFFER", "-1"),
    ("NBGW_RATE_QUEUE_TIMEOUT", "-1"),
    ("NBGW_RATE_QUEUE_TIMEOUT", "long"),
    ("NBGW_RATE_DEFAULT_LIMIT", "250"),
    ("NBGW_RATE_DEFAULT_LIMIT", "0/10"),
    ("NBGW_RATE_DEFAULT_LIMIT", "250/ten"),
    ("NBGW_WORKERS", "0"),
    ("NBGW_WORKERS", "two"),
    ("NBGW_WORKERS", "65"),
    ("NBGW_NATION_URL", "https://acme.nationbuilder.com"),
    ("NBGW_NATION_URL", "ftp://{slug}.nationbuilder.com"),
    ("NBGW_NATION_URL", "{slug}.nationbuilder.com"),
    ("NBGW_LOG_FORMAT", "xml"),
    ("NBGW_LOG_LEVEL", "LOUD"),
    ("NBGW_ACCESS_LOG", "sometimes"),
    ("NBGW_DEFAULT_ACCOUNT", "Not_A_Slug"),
    ("NBGW_ALERT_WEBHOOK", "hooks.example.org/x"),
    ("NBGW_ENCRYPTION_KEY", "not-a-key"),
    ("NBGW_ENCRYPTION_KEY", "c2hvcnQ="),  # valid base64, but 5 bytes
    ("NBGW_ENCRYPTION_KEY", f"{KEY},also-not-a-key"),
    ("NBGW_ADMIN_TOKEN", "too-short"),
]


# Values every setting must refuse, with a message naming the variable (never a traceback).
# Each setting in config.SETTINGS needs an entry: test_bad_values_are_refused fails for a
# setting without one. To add yours, list values that are malformed and values that parse
# but cannot work, e.g.
#     "NBGW_SOMETHING_TIMEOUT": ["soon", "0", "-1", "nan", "1e9"],
BAD_VALUES: dict[str, list[str]] = {
    "NBGW_LISTEN": [
        "http://0.0.0.0:8080",
        "0.0.0.0:8080/path",
        "8080",
        "localhost",
        ":8080",
        "localhost:http",
        "localhost:70000",
        "0.0.0.0:0",
        "::1:8080",
        "[127.0.0.1]:8080",
        "not a host:8080",
        "999.1.1.1:8080",
        "127.0.0.1:\u00b2",  # a digit to str.isdigit(), not to int()
        "127.0.0.1:\u0668\u0660",
    ],
    "NBGW_PUBLIC_URL": [
        "gateway.example.org",
        "ftp://gw.example.org",
        "https://",
        "https://gw example.org",
        "https://gw.example.org:99999",
        "https://gw.example.org:0",
        "https://gw.example.org/?x=1",
        "https://gw.example.org/#top",
        "https://user:SECRETCANARY@gw.example.org",
        "https://gw.example.org/a;b",
        'https://gw.example.org/a"b',
        "https://gw.example.org/<nbgw>",
        "https://gw.example.org/100%",
        "http://[::1",
        "http://[::1/nbgw",
    ],
    "NBGW_DATABASE": [
        ".",
        "/",
        "data/",
        "bad\x00path",
        "mysql://user:SECRETCANARY@db.example.org/nbgw",
        "postgresql://db.example.org",
        "postgresql://db.example.org:99999/nbgw",
        "postgresql://gw:SECRETCANARY@db.example.org/nbgw?sslmode=verify-full&sslrootcert=/no/ca.pem",
        "postgresql://db.example.org/nbgw?sslcert=/no/client.crt&sslkey=/no/client.key",
        "/tmp/" + "n" * 300 + ".db",  # a name longer than the filesystem allows
    ],
    "NBGW_ENCRYPTION_KEY": ["not-a-key", "c2hvcnQ=", f"{KEY},also-not-a-key", ","],
    "NBGW_CLIENT_ID": ["two words", "id\x01x"],
    "NBGW_CLIENT_SECRET": ["secret with spaces", "secret\x01x"],
    "NBGW_ADMIN_TOKEN": ["too-short", "an admin token with spaces"],
    "NBGW_NATION_URL": [
        "https://acme.nationbuilder.com",
        "ftp://{slug}.nationbuilder.com",
        "{slug}.nationbuilder.com",
        "https://{slug}.nationbuilder.com:0",
        "https://{slug}.nation builder.com",
        "https://{slug}.nationbuilder.com/?x=1",
        "https://example.org/{slug};v=1",
        "http://[::1/{slug}",
    ],
    "NBGW_DEFAULT_ACCOUNT": ["Not_A_Slug", "acme nation", "-acme"],
    "NBGW_REFRESH_MARGIN": ["soon", "-5", "90000", "3601", "1.5", "nan"],
    "NBGW_ALLOWED_CLIENTS": [
        "not-a-cidr",
        "10.0.0.0/33",
        "127.0.0.1/32,bogus",
        ",",
        "10.0.0.1/8",
        "fe80::1/64",
    ],
    "NBGW_ADMIN_ALLOWED_CLIENTS": ["not-a-cidr", "10.0.0.0/33", ",", "192.168.1.5/24"],
    "NBGW_METRICS_ALLOWED_CLIENTS": ["not-a-cidr", "10.0.0.0/33", ",", "127.0.0.1/8"],
    "NBGW_ALLOWED_HOSTS": [
        "gw.example.org:8080",
        "https://gw.example.org",
        "gw..example",
        "*.",
        "a*b.example",
        "gw example.org",
    ],
    "NBGW_HEADER_TIMEOUT": ["soon", "0", "-1", "nan", "inf", "1e308", "3601"],
    "NBGW_BODY_TIMEOUT": ["soon", "0", "-1", "nan", "inf", "1e308", "3601"],
    "NBGW_MAX_CONNECTIONS_PER_CLIENT": ["many", "0", "-1", "1.5"],
    "NBGW_UPSTREAM_TIMEOUT": ["fast", "0", "-1", "nan", "inf", "1e9"],
    "NBGW_TOKEN_TIMEOUT": ["slow", "0", "-1", "nan", "inf", "1e308", "601", "\u0663\u0660"],
    "NBGW_MAX_REQUEST_BODY": ["big", "0", "-1", "1.5", "10MB"],
    "NBGW_RETRY_BUFFER": ["-1", "lots", "1.5"],
    "NBGW_WORKERS": ["0", "-1", "two", "1.5", "65", "1e9"],
    "NBGW_CLIENT_AUTH": ["on", "yes", "mandatory"],
    "NBGW_AUDIT_RETENTION_DAYS": ["forever", "0", "-1", "nan", "inf", "1e308", "36501"],
    "NBGW_RATE_QUEUE_TIMEOUT": ["soon", "-1", "nan", "inf", "1e308", "3601"],
    "NBGW_RATE_DEFAULT_LIMIT": [
        "250",
        "250/",
        "/10",
        "0/10",
        "250/0",
        "many/10",
        "-5/10",
        "\u00b2/10",
        "10/\u00b2",
    ],
    "NBGW_LOG_FORMAT": ["xml", "JSONL"],
    "NBGW_LOG_LEVEL": ["LOUD", "TRACE", "10"],
    "NBGW_ACCESS_LOG": ["sometimes", "2"],
    "NBGW_ALERT_WEBHOOK": [
        "hooks.example.org/x",
        "ftp://hooks.example.org/x",
        "https://",
        "https://hooks.example.org:99999/x",
        "https://[fe80::1/hook",
    ],
}
# Settings whose refused value must not be echoed (it may be, or contain, a secret).
NOT_ECHOED = {"NBGW_ENCRYPTION_KEY", "NBGW_CLIENT_SECRET", "NBGW_ADMIN_TOKEN", "NBGW_ALERT_WEBHOOK"}


def bad_values(env: str) -> list[str]:
    """The table's bad values for `env`; fails loudly when the setting has no entry."""
    if env not in BAD_VALUES:
        pytest.fail(
            f"{env} has no entry in BAD_VALUES (tests/test_config.py): add the values it "
            "must refuse, so a wrong value is known to give a message and no traceback"
        )
    return BAD_VALUES[env]


def assert_clear_problem(env: str, value: str, problems: Sequence[str]) -> None:
    """One message for the bad value: it names the variable, says what is expected, and
    does not echo a secret."""
    assert len(problems) == 1, problems
    [problem] = problems
    assert problem.startswith(f"{env} is invalid: "), problem
    assert SETTINGS_BY_ENV[env].expects in problem
    assert "Traceback" not in problem
    if (env in NOT_ECHOED and len(value) > 3) or "SECRETCANARY" in value:
        assert value not in problem
        assert "SECRETCANARY" not in problem
    assert_no_secrets(problem)


def write_toml(tmp_path: Path, values: dict[str, object]) -> Path:
    """Write a TOML file from plain values (strings are JSON-quoted, valid TOML strings)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp_path / "nbgateway.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(environ: dict[str, str], toml: Path | None = None) -> ConfigError:
    """The ConfigError that loading raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ, toml)
    return info.value


def assert_no_secrets(message: str) -> None:
    for secret in SECRET_VALUES:
        assert secret not in message


class TestEnvironment:
    def test_every_declared_setting_has_a_case_here(self) -> None:
        """Each entry in SETTINGS is covered by the parsing table below (no setting is skipped)."""
        assert set(NON_DEFAULT) == {s.env for s in SETTINGS}

    @pytest.mark.parametrize("env", sorted(NON_DEFAULT))
    def test_each_setting_is_read_from_the_environment(self, env: str) -> None:
        """A non-default value in the environment ends up in Settings."""
        value, applied = NON_DEFAULT[env]
        settings = load_settings({**BASE, env: value})
        assert applied(settings)

    def test_only_nbgw_variables_are_read(self) -> None:
        """Unrelated environment variables are ignored rather than rejected."""
        settings = load_settings({**BASE, "HOME": "/root", "NBGWX_LISTEN": "x"})
        assert settings.port == 8080

    def test_unknown_nbgw_variable_is_named_as_a_likely_typo(self) -> None:
        """An NBGW_* variable that is not a setting is refused, naming the closest setting."""
        error = load_error({**BASE, "NBGW_LISTN": "0.0.0.0:9000"})
        assert error.problems == (
            "NBGW_LISTN is not a known setting (did you mean NBGW_LISTEN?); "
            "`nbgateway --help` lists them",
        )

    def test_unknown_variable_without_a_close_setting(self) -> None:
        """A variable resembling no setting is refused without a suggestion."""
        [problem] = load_error({**BASE, "NBGW_ZZZZZZZZ": "1"}).problems
        assert problem.startswith("NBGW_ZZZZZZZZ is not a known setting;")

    def test_ipv6_listen_address_is_split_into_host_and_port(self) -> None:
        """A bracketed IPv6 NBGW_LISTEN yields the bare host and the port."""
        settings = load_settings({**BASE, "NBGW_LISTEN": "[::1]:8081"})
        assert (settings.host, settings.port) == ("::1", 8081)

    def test_ipv6_listen_gives_a_valid_default_public_url(self) -> None:
        """The default public URL of an IPv6 listen address keeps the brackets."""
        settings = load_settings({**BASE, "NBGW_LISTEN": "[::1]:8080"})
        assert settings.public_url == "http://[::1]:8080"

    def test_public_url_defaults_to_the_listen_address(self) -> None:
        """Without NBGW_PUBLIC_URL, the redirect URI is built on http://{NBGW_LISTEN}."""
        settings = load_settings({**BASE, "NBGW_LISTEN": "0.0.0.0:9000"})
        assert settings.public_url == "http://0.0.0.0:9000"
        assert settings.redirect_uri == "http://0.0.0.0:9000/connect/callback"

    def test_url_scheme_and_host_compare_in_lower_case(self) -> None:
        """`HTTPS://GW.Example.org/NBGW` is https (the admin cookies are Secure) on host
        gw.example.org; the path keeps its case, and {slug} stays a placeholder."""
        settings = load_settings(
            {
                **BASE,
                "NBGW_PUBLIC_URL": "HTTPS://GW.Example.org/NBGW/",
                "NBGW_NATION_URL": "HTTP://{slug}.Nations.Example:8081/X",
            }
        )
        assert settings.public_url == "https://gw.example.org/NBGW"
        assert settings.secure_cookies
        assert settings.redirect_uri == "https://gw.example.org/NBGW/connect/callback"
        assert settings.nation_base("acme") == "http://acme.nations.example:8081/X"

    def test_empty_variable_means_default(self) -> None:
        """An empty optional variable (as an env file leaves it) gives the default."""
        settings = load_settings({**BASE, "NBGW_REFRESH_MARGIN": "", "NBGW_LOG_FORMAT": " "})
        assert settings.refresh_margin == 300
        assert settings.log_format == "text"


class TestDefaults:
    @pytest.fixture
    def settings(self) -> Settings:
        return load_settings(BASE)

    def test_listen(self, settings: Settings) -> None:
        """NBGW_LISTEN defaults to 127.0.0.1:8080."""
        assert (settings.host, settings.port) == ("127.0.0.1", 8080)

    def test_public_url(self, settings: Settings) -> None:
        """NBGW_PUBLIC_URL defaults to http://{NBGW_LISTEN}."""
        assert settings.public_url == "http://127.0.0.1:8080"

    def test_database(self, settings: Settings) -> None:
        """NBGW_DATABASE defaults to ./nbgateway.db."""
        assert settings.database == Path("./nbgateway.db")

    def test_nation_url(self, settings: Settings) -> None:
        """NBGW_NATION_URL defaults to https://{slug}.nationbuilder.com."""
        assert settings.nation_url == "https://{slug}.nationbuilder.com"
        assert settings.nation_base("acme") == "https://acme.nationbuilder.com"

    def test_refresh_margin(self, settings: Settings) -> None:
        """NBGW_REFRESH_MARGIN defaults to 300 seconds."""
        assert settings.refresh_margin == 300

    def test_upstream_timeout(self, settings: Settings) -> None:
        """NBGW_UPSTREAM_TIMEOUT defaults to 60 seconds."""
        assert settings.upstream_timeout == 60

    def test_max_request_body(self, settings: Settings) -> None:
        """NBGW_MAX_REQUEST_BODY defaults to 10485760 bytes."""
        assert settings.max_request_body == 10485760

    def test_log_format(self, settings: Settings) -> None:
        """NBGW_LOG_FORMAT defaults to text."""
        assert settings.log_format == "text"

    def test_default_account(self, settings: Settings) -> None:
        """NBGW_DEFAULT_ACCOUNT has no default."""
        assert settings.default_account == ""

    @pytest.mark.parametrize(
        "address",
        [
            "127.0.0.1",
            "127.5.6.7",
            "::1",
            "10.2.3.4",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.10",
            "fd00::1",
        ],
    )
    def test_allowed_clients_include_loopback_and_private(
        self, settings: Settings, address: str
    ) -> None:
        """By default loopback and private ranges may use the proxy."""
        ip = ipaddress.ip_address(address)
        assert any(ip in net for net in settings.allowed_clients if net.version == ip.version)

    @pytest.mark.parametrize("address", ["8.8.8.8", "172.32.0.1", "192.169.0.1", "2001:db8::1"])
    def test_allowed_clients_exclude_public_addresses(
        self, settings: Settings, address: str
    ) -> None:
        """By default public addresses may not use the proxy."""
        ip = ipaddress.ip_address(address)
        assert not any(ip in net for net in settings.allowed_clients if net.version == ip.version)


class TestRequired:
    @pytest.mark.parametrize("env", sorted(REQUIRED_FOR_SERVE))
    def test_missing_required_value_names_variable_and_expectation(self, env: str) -> None:
        """A missing required variable raises ConfigError naming it and what it should hold."""
        environ = {k: v for k, v in BASE.items() if k != env}
        message = str(load_error(environ))
        assert env in message
        assert SETTINGS_BY_ENV[env].expects in message

    @pytest.mark.parametrize("env", sorted(REQUIRED_FOR_SERVE))
    def test_empty_required_value_counts_as_missing(self, env: str) -> None:
        """An empty required variable is reported like a missing one."""
        assert env in str(load_error({**BASE, env: ""}))

    def test_only_the_named_requirements_apply(self) -> None:
        """With required=REQUIRED_FOR_STORE, OAuth credentials may be absent."""
        settings = load_settings({"NBGW_ENCRYPTION_KEY": KEY}, required=REQUIRED_FOR_STORE)
        assert settings.client_id == ""
        assert not settings.client_secret

    def test_every_missing_required_value_is_reported_at_once(self) -> None:
        """An empty environment names each variable `serve` requires, one message each."""
        problems = load_error({}).problems
        assert len(problems) == len(REQUIRED_FOR_SERVE)
        for env in REQUIRED_FOR_SERVE:
            assert sum(p.startswith(f"{env} is required") for p in problems) == 1

    def test_nothing_required(self) -> None:
        """With required=() an empty environment loads the defaults and no key."""
        settings = load_settings({}, required=())
        assert settings.encryption_keys == ()


class TestMalformed:
    @pytest.mark.parametrize(("env", "value"), MALFORMED)
    def test_malformed_value_names_the_variable(self, env: str, value: str) -> None:
        """A malformed value raises ConfigError whose message names the variable."""
        message = str(load_error({**BASE, env: value}))
        assert env in message
        assert_no_secrets(message)

    @pytest.mark.parametrize(
        ("env", "value"),
        [
            ("NBGW_LISTEN", "8080"),
            ("NBGW_ALLOWED_CLIENTS", "not-a-cidr"),
            ("NBGW_REFRESH_MARGIN", "soon"),
            ("NBGW_NATION_URL", "https://acme.nationbuilder.com"),
            ("NBGW_ENCRYPTION_KEY", "not-a-key"),
        ],
    )
    def test_malformed_value_is_not_reported_as_missing(self, env: str, value: str) -> None:
        """A value that is present but malformed is not called 'required'."""
        message = str(load_error({**BASE, env: value}))
        assert "required" not in message

    def test_several_wrong_values_are_all_reported(self) -> None:
        """Five wrong settings give five messages, in the order of SETTINGS, one each."""
        wrong = {
            "NBGW_LISTEN": "http://0.0.0.0:8080",
            "NBGW_REFRESH_MARGIN": "90000",
            "NBGW_LOG_LEVEL": "LOUD",
            "NBGW_ALLOWED_CLIENTS": "bogus",
            "NBGW_TYPO": "1",
        }
        problems = load_error({**BASE, **wrong}).problems
        assert [p.split(" ")[0] for p in problems] == [
            "NBGW_TYPO",
            "NBGW_LISTEN",
            "NBGW_REFRESH_MARGIN",
            "NBGW_ALLOWED_CLIENTS",
            "NBGW_LOG_LEVEL",
        ]

    def test_listen_url_says_to_drop_the_scheme(self) -> None:
        """NBGW_LISTEN given as a URL (which once crashed serve) is refused with the fix."""
        [problem] = load_error({**BASE, "NBGW_LISTEN": "http://0.0.0.0:8080"}).problems
        assert "drop the scheme" in problem
        assert "NBGW_PUBLIC_URL" in problem

    def test_refresh_margin_beyond_the_bound_says_why(self) -> None:
        """A margin above an hour is refused, and the message cites the 24 h token life."""
        [problem] = load_error({**BASE, "NBGW_REFRESH_MARGIN": "90000"}).problems
        assert "NBGW_REFRESH_MARGIN" in problem
        assert "3600" in problem
        assert "24 h" in problem
        assert load_settings({**BASE, "NBGW_REFRESH_MARGIN": "3600"}).refresh_margin == 3600

    def test_a_cidr_with_host_bits_offers_both_readings(self) -> None:
        """10.0.0.1/8 is refused (a /8 or one address?), naming both; an address alone is
        that one address."""
        [problem] = load_error({**BASE, "NBGW_ALLOWED_CLIENTS": "10.0.0.1/8"}).problems
        assert "host bits" in problem
        assert "10.0.0.0/8" in problem and "10.0.0.1/32" in problem
        settings = load_settings(
            {**BASE, "NBGW_ALLOWED_CLIENTS": "10.0.0.1,10.2.0.0/16,fe80::%eth0/64"}
        )
        got = [str(n) for n in settings.allowed_clients]
        assert got == ["10.0.0.1/32", "10.2.0.0/16", "fe80::%eth0/64"]  # a scope is no host bit

    @pytest.mark.parametrize("value", ["nan", "inf"])
    def test_timeout_must_be_a_finite_number(self, value: str) -> None:
        """NBGW_UPSTREAM_TIMEOUT rejects nan and infinity."""
        assert "NBGW_UPSTREAM_TIMEOUT" in str(load_error({**BASE, "NBGW_UPSTREAM_TIMEOUT": value}))

    def test_bad_key_is_not_echoed(self) -> None:
        """A malformed encryption key never appears in the error, nor do the good keys."""
        planted = "SECRETCANARY-not-really-a-key-0123456789"
        message = str(load_error({**BASE, "NBGW_ENCRYPTION_KEY": f"{KEY},{planted}"}))
        assert "NBGW_ENCRYPTION_KEY" in message
        assert planted not in message
        assert_no_secrets(message)

    def test_short_admin_token_is_not_echoed(self) -> None:
        """A too-short admin token is rejected without repeating it."""
        planted = "CANARY-adm1n"
        message = str(load_error({**BASE, "NBGW_ADMIN_TOKEN": planted}))
        assert "NBGW_ADMIN_TOKEN" in message
        assert planted not in message


class TestTomlFile:
    def test_keys_are_lower_case_without_prefix(self, tmp_path: Path) -> None:
        """The TOML file holds settings as lower-case keys without NBGW_."""
        toml = write_toml(
            tmp_path,
            {
                "encryption_key": KEY,
                "client_id": "c",
                "client_secret": CLIENT_SECRET,
                "admin_token": ADMIN_TOKEN,
                "listen": "0.0.0.0:9000",
            },
        )
        settings = load_settings({}, toml)
        assert settings.port == 9000
        assert settings.client_secret.reveal() == CLIENT_SECRET

    @pytest.mark.parametrize("env", sorted(NON_DEFAULT))
    def test_each_setting_is_read_from_the_file(self, tmp_path: Path, env: str) -> None:
        """A non-default value in the TOML file ends up in Settings."""
        value, applied = NON_DEFAULT[env]
        toml = write_toml(tmp_path, {SETTINGS_BY_ENV[env].key: value})
        settings = load_settings({k: v for k, v in BASE.items() if k != env}, toml)
        assert applied(settings)

    def test_environment_wins_over_file(self, tmp_path: Path) -> None:
        """A variable set in both places takes the environment's value."""
        toml = write_toml(tmp_path, {"listen": "0.0.0.0:9000", "refresh_margin": 100})
        settings = load_settings({**BASE, "NBGW_LISTEN": "127.0.0.1:7000"}, toml)
        assert settings.port == 7000
        assert settings.refresh_margin == 100

    def test_empty_environment_variable_does_not_hide_file_value(self, tmp_path: Path) -> None:
        """An empty variable (as an env file leaves it) falls back to the file, not the default."""
        toml = write_toml(tmp_path, {"listen": "0.0.0.0:9000"})
        settings = load_settings({**BASE, "NBGW_LISTEN": ""}, toml)
        assert settings.port == 9000

    def test_numbers_and_lists_are_accepted(self, tmp_path: Path) -> None:
        """TOML integers, floats and arrays are read like their string forms."""
        toml = write_toml(
            tmp_path,
            {
                "refresh_margin": 120,
                "upstream_timeout": 2.5,
                "allowed_clients": ["10.0.0.0/8", "127.0.0.1/32"],
            },
        )
        settings = load_settings(BASE, toml)
        assert settings.refresh_margin == 120
        assert settings.upstream_timeout == 2.5
        assert settings.allowed_clients == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("127.0.0.1/32"),
        )

    def test_unknown_key_is_rejected(self, tmp_path: Path) -> None:
        """A key that is not a setting is refused naming the key, the file and the closest key."""
        toml = write_toml(tmp_path, {"listn": "0.0.0.0:9000"})
        assert load_error(BASE, toml).problems == (
            f"config file {toml}: unknown setting 'listn' (did you mean listen?)",
        )

    def test_upper_case_key_is_refused_naming_the_key(self, tmp_path: Path) -> None:
        """TOML keys are lower-case; `LISTEN` is refused with the right spelling."""
        toml = write_toml(tmp_path, {"LISTEN": "0.0.0.0:9000"})
        assert load_error(BASE, toml).problems == (
            f"config file {toml}: unknown setting 'LISTEN' (did you mean listen?)",
        )

    def test_prefixed_upper_case_key_is_rejected(self, tmp_path: Path) -> None:
        """The environment spelling (NBGW_LISTEN) is not a TOML key; the message gives the key."""
        toml = write_toml(tmp_path, {"NBGW_LISTEN": "0.0.0.0:9000"})
        [problem] = load_error(BASE, toml).problems
        assert "'NBGW_LISTEN'" in problem
        assert "write it as 'listen'" in problem

    def test_every_file_problem_is_reported(self, tmp_path: Path) -> None:
        """Two unknown keys and a malformed value in the file give three messages."""
        toml = write_toml(tmp_path, {"listn": "x", "refresh_margn": 10, "upstream_timeout": "soon"})
        problems = load_error(BASE, toml).problems
        assert len(problems) == 3
        assert "'listn'" in problems[0]
        assert "'refresh_margn'" in problems[1]
        assert problems[2].startswith("NBGW_UPSTREAM_TIMEOUT is invalid")

    def test_boolean_value_is_rejected(self, tmp_path: Path) -> None:
        """A TOML boolean raises ConfigError naming the key."""
        toml = write_toml(tmp_path, {"log_format": True})
        assert "log_format" in str(load_error(BASE, toml))

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("access_log", [False]),
            ("workers", [2]),
            ("log_level", ["INFO"]),
            ("allowed_clients", [True]),
            ("allowed_clients", [["10.0.0.0/8"]]),
        ],
    )
    def test_a_list_is_refused_but_for_comma_separated_settings(
        self, tmp_path: Path, key: str, value: object
    ) -> None:
        """A list is a comma-separated setting's other spelling, of strings only; for any
        other setting it is refused naming the key, never taken apart."""
        toml = write_toml(tmp_path, {key: value})
        [problem] = load_error(BASE, toml).problems
        assert problem.startswith(f"config file {toml}: {key} must be"), problem

    def test_a_list_of_cidrs_and_a_whole_float(self, tmp_path: Path) -> None:
        """allowed_clients may be a list of strings; 1e3 for a whole number is 1000."""
        toml = write_toml(
            tmp_path, {"allowed_clients": ["10.0.0.0/8", "127.0.0.1/32"], "refresh_margin": 1e3}
        )
        settings = load_settings(BASE, toml)
        assert [str(n) for n in settings.allowed_clients] == ["10.0.0.0/8", "127.0.0.1/32"]
        assert settings.refresh_margin == 1000
        for written, meant in ((False, False), (True, True)):  # an on/off setting's boolean
            toml = write_toml(tmp_path, {"access_log": written})
            assert load_settings(BASE, toml).access_log is meant

    def test_invalid_toml_names_the_file(self, tmp_path: Path) -> None:
        """A file that is not TOML raises ConfigError naming the file, without its secrets."""
        toml = tmp_path / "broken.toml"
        toml.write_text(f'client_secret = "{CLIENT_SECRET}\nlisten = = 1\n', encoding="utf-8")
        message = str(load_error({}, toml))
        assert str(toml) in message
        assert_no_secrets(message)

    def test_a_file_that_is_not_utf8_is_not_valid_toml(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 (a UTF-16 file, say) are a ConfigError naming the file,
        not a UnicodeDecodeError."""
        toml = tmp_path / "utf16.toml"
        toml.write_bytes('listen = "127.0.0.1:8080"\n'.encode("utf-16"))
        message = str(load_error(BASE, toml))
        assert f"config file {toml} is not valid TOML: it is not UTF-8 text" in message

    def test_a_command_line_database_is_refused_in_one_sentence(self) -> None:
        """`migrate --to mysql://...`: the option named, the reason said once."""
        with pytest.raises(ConfigError) as info:
            parse_database("mysql://u:pw@host/db", "--to")
        assert str(info.value) == (
            "--to is invalid: the value is a URL, but only postgresql:// URLs name a database"
        )

    def test_missing_file_names_the_file(self, tmp_path: Path) -> None:
        """A config file that does not exist raises ConfigError naming it."""
        toml = tmp_path / "absent.toml"
        assert str(toml) in str(load_error(BASE, toml))

    def test_malformed_file_value_names_the_variable(self, tmp_path: Path) -> None:
        """A malformed value read from the file is reported under its variable name."""
        toml = write_toml(tmp_path, {"upstream_timeout": "soon"})
        assert "NBGW_UPSTREAM_TIMEOUT" in str(load_error(BASE, toml))

    def test_missing_required_value_in_file_and_environment(self, tmp_path: Path) -> None:
        """A required value absent from both sources names the variable."""
        toml = write_toml(tmp_path, {"client_id": "c", "client_secret": CLIENT_SECRET})
        environ = {"NBGW_ENCRYPTION_KEY": KEY}
        assert "NBGW_ADMIN_TOKEN" in str(load_error(environ, toml))


class TestBadValues:
    @pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
    def test_bad_values_are_refused(self, setting: Setting) -> None:
        """Every bad value of every setting gives one clear ConfigError naming the variable."""
        for value in bad_values(setting.env):
            with pytest.raises(ConfigError) as info:
                load_settings({**BASE, setting.env: value})
            assert_clear_problem(setting.env, value, info.value.problems)

    @pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
    def test_bad_values_through_check(
        self, setting: Setting, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`nbgateway check` prints the same message for each bad value, exits 2, and
        prints no traceback."""
        environ = {**BASE, "NBGW_DATABASE": str(tmp_path / "gw.db")}
        for value in bad_values(setting.env):
            code = main(["check"], {**environ, setting.env: value})
            captured = capsys.readouterr()
            assert code == 2, (value, captured.err)
            prefix = "configuration error: "
            *lines, summary = captured.err.splitlines()
            assert all(line.startswith(prefix) for line in lines), lines
            assert_clear_problem(setting.env, value, [line[len(prefix) :] for line in lines])
            assert summary.startswith("1 problem(s) found")
            assert "Traceback" not in captured.out + captured.err
