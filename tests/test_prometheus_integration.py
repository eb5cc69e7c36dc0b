"""The shipped Prometheus files against real Prometheus: promtool checks, and a live stack.

The live stack is the fake NationBuilder and a real `python -m nbgateway serve`, both as
subprocesses on loopback ports, with traffic that exercises refreshes, 401 retries, a
needs-reauth and 404s; then Prometheus scrapes the gateway every second with the alert
rules loaded, and every PromQL expression of the Grafana dashboard and of the rules is
evaluated against it. Uses Debian's `prometheus` and `promtool` (`make system-deps`).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from procs import (
    FakeNB,
    Processes,
    clean_os_environ,
    free_port,
    gateway_env,
    http_request,
    run_command,
    scrape,
    seed_account,
    start_fake,
    start_gateway,
    wait_ready,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "grafana" / "dashboards" / "nbgateway.json"

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="prometheus/promtool not installed "
        "(Debian package `prometheus`; `make system-deps` installs it)",
    ),
]

ADMIN_TOKEN = "integration-admin-token-0123456789"
ACCOUNTS = ("alpha", "beta")  # beta is revoked and ends up needing re-authorization

# Grafana's built-in variables, replaced as Grafana would for a 5-minute dashboard range.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "5m",
    "${account}": ".*",
    "$account": ".*",
}
METRIC_NAME = re.compile(r"\b(nbgw_[a-z0-9_]+|process_[a-z_]+|python_info|up)\b")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|count|sum)$")

# Metrics the traffic below produces (after it, each has at least one series).
PRODUCED = {
    "nbgw_token_refresh_total",
    "nbgw_token_refresh_duration_seconds",
    "nbgw_token_refresh_in_flight",
    "nbgw_token_refresh_coalesced_total",
    "nbgw_access_token_expiry_timestamp_seconds",
    "nbgw_account_last_refresh_success_timestamp_seconds",
    "nbgw_account_needs_reauth",
    "nbgw_proxy_requests_total",
    "nbgw_proxy_request_duration_seconds",
    "nbgw_upstream_request_duration_seconds",
    "nbgw_upstream_401_retries_total",
    "nbgw_proxy_in_flight_requests",
    "nbgw_rate_limit_wait_seconds",
    "nbgw_rate_limit_remaining",
    "nbgw_rate_limit_limit",
    "nbgw_upstream_429_total",
    "nbgw_client_requests_total",  # every request is counted, as "anonymous" without a key
    "nbgw_build_info",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
    "python_info",
    "up",
}

DEADLINE_TRAFFIC = 20.0  # seconds for the concurrent requests of the traffic to settle
DEADLINE_SCRAPES = 20.0  # seconds for Prometheus to collect enough samples


# -- small helpers ---------------------------------------------------------------------------


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append(
                        (f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"])
                    )
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            found.append((f"variable {variable['name']!r}", unwrap_grafana_query(query)))
    return found


def unwrap_grafana_query(query: str) -> str:
    """The PromQL inside Grafana's query_result(...) / label_values(...) helpers."""
    query = query.strip()
    if m := re.fullmatch(r"query_result\((.*)\)", query, re.S):
        return m.group(1)
    if m := re.fullmatch(r"label_values\((.*),\s*\w+\)", query, re.S):
        return m.group(1)
    if m := re.fullmatch(r"label_values\((\w+)\)", query):
        return f'{{__name__=~".+", {m.group(1)}!=""}}'
    return query


def substitute(expr: str) -> str:
    for name, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    return {
        HISTOGRAM_SUFFIX.sub("", name) if name.endswith(("_bucket", "_count", "_sum")) else name
        for name in METRIC_NAME.findall(expr)
    }


# -- promtool --------------------------------------------------------------------------------


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return run_command([PROMTOOL, *args], cwd=ROOT)


class TestPromtool:
    def test_alert_rules_are_valid(self) -> None:
        """`promtool check rules` accepts config/prometheus/alerts.yml."""
        result = run_promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_alert_unit_tests_pass(self) -> None:
        """Every alert fires and stays quiet as config/prometheus/alerts_test.yml expects."""
        result = run_promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_alert_has_a_unit_test(self) -> None:
        """alerts_test.yml exercises every alert defined in alerts.yml."""
        defined = set(
            re.findall(r"^\s*- alert:\s*(\w+)", (PROM_DIR / "alerts.yml").read_text(), re.M)
        )
        tested = set(re.findall(r"alertname:\s*(\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
        assert defined, "no alerts found in alerts.yml"
        assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"

    def test_prometheus_config_is_valid(self, tmp_path: Path) -> None:
        """`promtool check config` accepts prometheus.yml (with alerts.yml beside it)."""
        for name in ("prometheus.yml", "alerts.yml"):
            shutil.copy(PROM_DIR / name, tmp_path / name)
        result = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
        assert result.returncode == 0, result.stdout + result.stderr


# -- the live stack --------------------------------------------------------------------------


@dataclass
class Stack:
    """The running subprocesses, their URLs, and how many requests the traffic sent per path."""

    processes: Processes
    fake: FakeNB | None = None
    gateway_url: str = ""
    prometheus_url: str = ""
    traffic: dict[str, int] = field(default_factory=dict)

    def explained(self) -> AbstractContextManager[None]:
        """On failure, print the tail of every subprocess's output."""
        return self.processes.explained(tail=8000)

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, _, body = http_request("GET", url)
        doc: dict[str, Any] = json.loads(body)
        doc["http_status"] = status
        return doc

    def vector(self, expr: str) -> list[dict[str, Any]]:
        doc = self.query(expr)
        assert doc["status"] == "success", (expr, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result


def drive_traffic(stack: Stack) -> None:
    """Normal requests, a forced refresh, a needs-reauth, 404s, upstream 5xx and 429s."""
    gw, fake = stack.gateway_url, stack.fake
    assert fake is not None
    control = fake.control
    counts: dict[str, int] = {}

    def get(path: str, expect: int) -> None:
        status, headers, body = http_request("GET", gw + path)
        assert status == expect, (path, status, headers.get("X-NBGW-Error"), body[:300])
        counts[path] = counts.get(path, 0) + 1

    for _ in range(3):
        for slug in ACCOUNTS:
            get(f"/n/{slug}/api/v2/signups?page[size]=2", 200)
            get(f"/n/{slug}/api/v1/people/me", 200)
    # NationBuilder expires alpha's token early: 401, refresh, retry -> 200.
    control(action="expire_access_tokens", slug="alpha")
    get("/n/alpha/api/v2/signups/me", 200)
    # Again, with four requests at once and the token endpoint held: one refresh, and the
    # other requests wait for it (coalesced) instead of starting their own.
    control(action="expire_access_tokens", slug="alpha")
    control(action="hold_tokens")
    concurrent = 4
    with ThreadPoolExecutor(concurrent) as pool:
        futures = [
            pool.submit(http_request, "GET", gw + "/n/alpha/api/v2/signups/me")
            for _ in range(concurrent)
        ]
        try:
            wait_until(
                lambda: (
                    (scrape(gw, "nbgw_token_refresh_coalesced_total", account="alpha") or 0.0)
                    >= concurrent - 1
                ),
                DEADLINE_TRAFFIC,
                "the concurrent requests to wait for one refresh",
            )
        finally:
            control(action="release_tokens")
        statuses = [f.result(timeout=DEADLINE_TRAFFIC)[0] for f in futures]
    assert statuses == [200] * concurrent
    counts["/n/alpha/api/v2/signups/me"] += concurrent
    # beta's access is revoked: 401, refresh -> invalid_grant -> needs re-authorization.
    control(action="revoke", slug="beta")
    control(action="expire_access_tokens", slug="beta")
    get("/n/beta/api/v2/signups/me", 401)
    get("/n/beta/api/v2/signups/me", 401)
    # 404s: unknown accounts (the gateway's) and an unknown record (NationBuilder's).
    for slug in ("nosuch", "unknown-nation"):
        get(f"/n/{slug}/api/v2/signups", 404)
    get("/n/alpha/api/v2/signups/999999", 404)
    # Upstream 5xx, passed through.
    get("/n/alpha/api/_test/status/503", 503)
    # The rate budget: NationBuilder's own 429 holds alpha's queue, is replayed once and
    # then passed on; then a budget of 2 in a window of 11 days: two requests pass, and the
    # gateway answers the third itself (rate_limited) without sending it.
    get("/n/alpha/api/_test/status/429", 429)
    control(action="set", rate_limit=2, rate_window=1_000_000)
    get("/n/alpha/api/v2/signups/me", 200)
    get("/n/alpha/api/v2/signups/me", 200)
    get("/n/alpha/api/v2/signups/me", 429)
    control(action="set", rate_limit=0)
    stack.traffic = counts


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Fake NationBuilder, gateway and Prometheus as subprocesses, after the traffic."""
    workdir = tmp_path_factory.mktemp("live")
    stack = Stack(Processes(workdir))
    try:
        with stack.explained():
            stack.fake = fake = start_fake(stack.processes)
            env = {
                **gateway_env(workdir / "gateway.db", ADMIN_TOKEN, fake.url),
                "NBGW_UPSTREAM_TIMEOUT": "10",
                "NBGW_LOG_FORMAT": "json",
            }
            # A fresh token pair from the fake for every account, stored as /connect would.
            issued = {slug: fake.issue_tokens(slug) for slug in ACCOUNTS}
            for slug, pair in issued.items():
                asyncio.run(seed_account(env, slug, pair))
            stack.gateway_url = start_gateway(stack.processes, env)

            drive_traffic(stack)

            config = workdir / "prometheus.yml"
            gateway_address = urllib.parse.urlsplit(stack.gateway_url).netloc
            prom_port = free_port()
            config.write_text(
                "global:\n"
                "  scrape_interval: 1s\n"
                "  evaluation_interval: 1s\n"
                "rule_files:\n"
                f"  - {json.dumps(str(PROM_DIR / 'alerts.yml'))}\n"
                "scrape_configs:\n"
                "  - job_name: nbgateway\n"
                "    scrape_interval: 1s\n"
                "    static_configs:\n"
                f"      - targets: ['{gateway_address}']\n"
            )
            assert PROMETHEUS is not None
            prometheus = stack.processes.start(
                "prometheus",
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                clean_os_environ(),
            )
            stack.prometheus_url = f"http://127.0.0.1:{prom_port}"
            wait_ready(prometheus, f"{stack.prometheus_url}/-/ready")

            def target_up() -> bool:
                _, _, body = http_request(
                    "GET", f"{stack.prometheus_url}/api/v1/targets", timeout=2
                )
                targets = json.loads(body)["data"]["activeTargets"]
                return any(
                    t["labels"].get("job") == "nbgateway" and t["health"] == "up" for t in targets
                )

            wait_until(target_up, DEADLINE_SCRAPES, "the nbgateway target to be up")

            # rate(...[1m]) needs two samples of every series; wait for a few scrapes.
            def enough_samples() -> bool:
                result = stack.vector('count_over_time(up{job="nbgateway"}[1m])')
                return bool(result) and float(result[0]["value"][1]) >= 3

            wait_until(enough_samples, DEADLINE_SCRAPES, "three scrapes of the gateway")

            # And rule evaluations over those samples: every rule's health is known, and the
            # needs-reauth alert has picked up beta (pending: the rule has `for: 1m`).
            def rules_evaluated() -> bool:
                rules = loaded_rules(stack)
                reauth = [r for r in rules if r["name"] == "NBGatewayAccountNeedsReauth"]
                return (
                    bool(rules)
                    and all(r["health"] != "unknown" for r in rules)
                    and bool(reauth)
                    and bool(reauth[0].get("alerts"))
                )

            wait_until(rules_evaluated, DEADLINE_SCRAPES, "the alert rules to be evaluated")
        yield stack
    finally:
        stack.processes.stop_all()


def loaded_rules(stack: Stack) -> list[dict[str, Any]]:
    _, _, body = http_request("GET", f"{stack.prometheus_url}/api/v1/rules")
    groups = json.loads(body)["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def all_expressions(stack: Stack) -> list[tuple[str, str]]:
    exprs = [(where, substitute(expr)) for where, expr in dashboard_expressions()]
    exprs += [(f"alert {rule['name']}", rule["query"]) for rule in loaded_rules(stack)]
    return exprs


class TestLiveStack:
    def test_alert_rules_load_and_evaluate_cleanly(self, live: Stack) -> None:
        """Prometheus loads every alert of alerts.yml and evaluates each without error."""
        with live.explained():
            rules = loaded_rules(live)
            defined = set(
                re.findall(r"^\s*- alert:\s*(\w+)", (PROM_DIR / "alerts.yml").read_text(), re.M)
            )
            assert {r["name"] for r in rules} == defined
            for rule in rules:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

    def test_every_expression_evaluates(self, live: Stack) -> None:
        """Every PromQL expression of the dashboard and the rules runs without error."""
        with live.explained():
            exprs = all_expressions(live)
            assert len(exprs) > 20
            failures = []
            for where, expr in exprs:
                assert "$" not in expr, f"unresolved Grafana variable in {where}: {expr}"
                doc = live.query(expr)
                if doc["status"] != "success" or doc.get("error"):
                    failures.append(
                        f"{where}: {expr}\n  -> {doc.get('errorType')}: {doc.get('error')}"
                    )
                elif doc.get("warnings"):
                    failures.append(f"{where}: {expr}\n  -> warnings: {doc['warnings']}")
            assert not failures, "\n".join(failures)

    def test_expressions_over_produced_metrics_return_data(self, live: Stack) -> None:
        """Each dashboard query whose metrics the traffic produced returns at least one series."""
        with live.explained():
            checked, empty = 0, []
            for where, expr in dashboard_expressions():
                names = metric_names(expr)
                if not names or not names <= PRODUCED:
                    continue
                checked += 1
                doc = live.query(substitute(expr))
                assert doc["status"] == "success", (where, doc)
                result = doc["data"]["result"]
                if doc["data"]["resultType"] in ("vector", "matrix") and not result:
                    empty.append(f"{where}: {expr}")
            assert checked >= 20, f"only {checked} dashboard queries were checked"
            assert not empty, "queries without data:\n" + "\n".join(empty)

    def test_gateway_metrics_reflect_the_traffic(self, live: Stack) -> None:
        """The scraped counters show the refresh, the 401 retries, the reauth and the 404s."""
        with live.explained():

            def value(expr: str) -> dict[str, float]:
                return {
                    ",".join(f"{k}={v}" for k, v in sorted(s["metric"].items())): float(
                        s["value"][1]
                    )
                    for s in live.vector(expr)
                }

            refreshes = value("sum by (account, outcome) (nbgw_token_refresh_total) > 0")
            assert refreshes == {
                "account=alpha,outcome=success": 2.0,
                "account=beta,outcome=invalid_grant": 1.0,
            }
            retries = value("sum by (account, outcome) (nbgw_upstream_401_retries_total)")
            assert retries == {
                "account=alpha,outcome=recovered": 5.0,
                "account=beta,outcome=refresh_failed": 1.0,
            }
            assert value("max by (account) (nbgw_account_needs_reauth)") == {
                "account=alpha": 0.0,
                "account=beta": 1.0,
            }
            expiry = value("max by (account) (nbgw_access_token_expiry_timestamp_seconds) - time()")
            assert set(expiry) == {"account=alpha", "account=beta"}
            assert all(v > 0 for v in expiry.values())
            assert value('sum(nbgw_proxy_requests_total{account="none", code="404"})') == {"": 2.0}
            assert value('sum(nbgw_proxy_requests_total{account="alpha", code="503"})') == {"": 1.0}
            assert value('sum(nbgw_proxy_requests_total{account="alpha", code="429"})') == {"": 2.0}
            # The first 429 and its one replay; the gateway's own 429 sent nothing.
            assert value("sum by (account) (nbgw_upstream_429_total)") == {"account=alpha": 2.0}
            assert value("min by (account) (nbgw_rate_limit_remaining)") == {"account=alpha": 0.0}
            assert value("sum(nbgw_proxy_requests_total)") == {
                "": float(sum(live.traffic.values()))
            }
            assert value("sum(nbgw_proxy_in_flight_requests)") == {"": 0.0}
            coalesced = value("sum by (account) (nbgw_token_refresh_coalesced_total)")
            assert set(coalesced) == {"account=alpha"}
            assert coalesced["account=alpha"] >= 3

    def test_needs_reauth_alert_names_the_revoked_account(self, live: Stack) -> None:
        """The NBGatewayAccountNeedsReauth expression selects exactly the revoked account."""
        with live.explained():
            rule = next(r for r in loaded_rules(live) if r["name"] == "NBGatewayAccountNeedsReauth")
            result = live.vector(rule["query"])
            assert [s["metric"].get("account") for s in result] == ["beta"]
            # The rule engine agrees: the alert is pending (it has `for: 1m`) or firing for beta.
            _, _, body = http_request("GET", f"{live.prometheus_url}/api/v1/alerts")
            alerts = json.loads(body)["data"]["alerts"]
            reauth = [
                a for a in alerts if a["labels"]["alertname"] == "NBGatewayAccountNeedsReauth"
            ]
            assert [a["labels"]["account"] for a in reauth] == ["beta"]
            assert reauth[0]["state"] in ("pending", "firing")
