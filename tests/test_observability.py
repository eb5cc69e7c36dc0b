"""Metrics, dashboard, alert rules and Grafana provisioning fit together.

- Every metric name the Grafana dashboard or the alert rules use is one the gateway
  exports (read from a running gateway's /metrics after traffic).
- The contract's metrics exist with exactly the contract's labels; build and process
  metrics are exported.
- Hostile traffic (unknown slugs, random paths, odd methods) cannot grow the label space,
  and no request path reaches /metrics.
- The provisioned datasource is the one the dashboard names; every alert links to a
  runbook section that exists.
"""

from __future__ import annotations

import fcntl
import json
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ConnectAccount, Gateway, GatewayFactory
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from test_docs import CONTRACT_METRICS

import nbgateway
from nbgateway.clock import SystemClock
from nbgateway.config import SETTINGS_BY_ENV, Settings
from nbgateway.fakenb import FakeNationBuilder
from nbgateway.metrics import KNOWN_METHODS, Metrics, fold_dead_worker
from nbgateway.models import RefreshOutcome
from nbgateway.server import SocketGroup
from nbgateway.workers import Workers

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "nbgateway.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROVISIONING = ROOT / "grafana" / "provisioning"
COMPOSE = ROOT / "docker-compose.yml"

METRIC_TOKEN = re.compile(r"\b(nbgw_[a-z0-9_]+|process_[a-z_]+|python_info)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
    "python_info",
}


# -- reading the ops files ------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []

    def walk(items: list[dict[str, Any]]) -> None:
        for panel in items:
            found.append(panel)
            walk(panel.get("panels", []))

    walk(board["panels"])
    return found


def dashboard_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and templating query."""
    exprs = [
        (f"panel {p.get('title')!r} {t.get('refId')}", t["expr"])
        for p in panels(board)
        for t in p.get("targets", [])
        if t.get("expr")
    ]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            exprs.append((f"variable {variable['name']!r}", str(query)))
    return exprs


def alert_rules(text: str) -> list[dict[str, str]]:
    """alert, expr and runbook_url of each rule in alerts.yml.

    A small reader for the shapes the file uses (`expr:` inline or as a `|` block), so the
    test needs no YAML library; the rule count is checked against the `- alert:` lines.
    """
    rules: list[dict[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^\s*- alert:\s*(\S+)", line):
            rules.append({"alert": m.group(1)})
        elif (m := re.match(r"^(\s*)expr:\s*(.*)$", line)) and rules:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest.startswith(("|", ">")):
                block = []
                i += 1
                while i < len(lines) and (
                    not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
                ):
                    block.append(re.sub(r"#.*$", "", lines[i]).strip())
                    i += 1
                rules[-1]["expr"] = "\n".join(b for b in block if b)
                continue
            rules[-1]["expr"] = rest
        elif (m := re.match(r"""^\s*runbook_url:\s*["']?([^"'\s]+)""", line)) and rules:
            rules[-1]["runbook_url"] = m.group(1)
        i += 1
    return rules


def used_metric_names(expr: str) -> set[str]:
    return set(METRIC_TOKEN.findall(expr))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# -- a gateway with traffic ----------------------------------------------------------------


async def scrape(gw: Gateway) -> str:
    resp = await gw.client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


def families(text: str) -> dict[str, Any]:
    """Metric families of an exposition, keyed by the exposed name (counters with _total)."""
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        found[name] = family
    return found


@pytest.fixture
async def busy_gateway(
    gateway: Gateway, connect_account: ConnectAccount, fake_nb: FakeNationBuilder
) -> Gateway:
    """A gateway that has proxied requests, refreshed once after a 401, and refused some."""
    await connect_account(gateway, "acme")
    assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
    fake_nb.expire_access_tokens("acme")
    assert (await gateway.client.get("/n/acme/api/v2/signups/me")).status == 200
    assert (await gateway.client.get("/n/nosuch/api/v2/signups")).status == 404
    return gateway


# -- dashboard and alert rules use exported metrics ----------------------------------------


class TestDashboard:
    def test_dashboard_parses_with_an_account_variable(self) -> None:
        """The dashboard is JSON with a multi-value `account` variable that allows All."""
        board = dashboard()
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert "account" in variables
        account = variables["account"]
        assert account.get("multi") and account.get("includeAll")
        assert board.get("uid") and board.get("title")

    def test_every_panel_has_a_query_and_a_description(self) -> None:
        """Every non-row panel queries Prometheus and says what it shows."""
        for panel in panels(dashboard()):
            if panel.get("type") == "row":
                continue
            assert panel.get("targets"), panel.get("title")
            assert panel.get("description"), panel.get("title")

    def test_per_account_selectors_filter_by_the_account_variable(self) -> None:
        """Every selector of a metric with an account label filters on $account."""
        per_account = {
            name for name, (_, labels) in CONTRACT_METRICS.items() if "account" in labels
        }
        per_account |= {
            "nbgw_token_refresh_in_flight",
            "nbgw_account_last_refresh_success_timestamp_seconds",
            "nbgw_upstream_request_duration_seconds",
        }
        for where, expr in dashboard_expressions(dashboard()):
            if where.startswith("variable"):
                continue
            for name, selector in re.findall(r"\b(nbgw_[a-z0-9_]+)(\{[^}]*\})?", expr):
                base = name.removesuffix("_bucket")
                if base in per_account:
                    assert 'account=~"$account"' in selector, f"{where}: {name}{selector}"

    async def test_dashboard_and_rules_use_only_exported_metrics(
        self, busy_gateway: Gateway
    ) -> None:
        """Every metric name in the dashboard and the alert rules is exported by the gateway."""
        exposed = families(await scrape(busy_gateway))
        histograms = {n for n, f in exposed.items() if f.type == "histogram"}
        exprs = [e for _, e in dashboard_expressions(dashboard())]
        rules = alert_rules(ALERTS.read_text())
        exprs += [r["expr"] for r in rules]
        unknown = set()
        used = set()
        for expr in exprs:
            for name in used_metric_names(expr):
                base = name
                for suffix in HISTOGRAM_SUFFIXES:
                    if name.endswith(suffix) and name.removesuffix(suffix) in histograms:
                        base = name.removesuffix(suffix)
                used.add(base)
                if base not in exposed:
                    unknown.add(name)
        assert not unknown, f"metrics not exported by the gateway: {sorted(unknown)}"
        # The dashboard covers the contract's metrics.
        assert set(CONTRACT_METRICS) <= used

    def test_alert_rules_are_read_completely(self) -> None:
        """The rule reader finds an expression and a runbook URL for each `- alert:`."""
        text = ALERTS.read_text()
        rules = alert_rules(text)
        assert len(rules) == len(re.findall(r"^\s*- alert:", text, re.M)) >= 5
        for rule in rules:
            assert rule.get("expr"), rule
            assert rule.get("runbook_url"), rule


# -- what the gateway exports --------------------------------------------------------------


def collectors_by_name(metrics: Metrics) -> dict[str, Counter | Gauge | Histogram]:
    """The Metrics' collectors keyed by exposed name."""
    found: dict[str, Counter | Gauge | Histogram] = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            [described] = value.describe()
            name = described.name + "_total" if described.type == "counter" else described.name
            found[name] = value
    return found


class TestExportedMetrics:
    @pytest.mark.parametrize("name", sorted(CONTRACT_METRICS))
    def test_contract_metric_has_exactly_the_contract_labels(self, name: str) -> None:
        """Each contract metric exists with the contract's type and exactly its labels."""
        kind, labels = CONTRACT_METRICS[name]
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        collector = collectors_by_name(metrics).get(name)
        assert collector is not None, f"{name} is not a collector of Metrics"
        [described] = collector.describe()
        assert described.type == kind
        child = collector.labels(**dict.fromkeys(labels, "x")) if labels else collector
        if kind == "histogram":
            child.observe(0.1)  # type: ignore[union-attr]
        else:
            child.inc()  # type: ignore[union-attr]
        [family] = [f for f in registry.collect() if f.name == described.name]
        label_sets = {frozenset(s.labels) - {"le"} for s in family.samples}
        assert label_sets == {frozenset(labels)}

    async def test_build_info_carries_the_package_version(self, busy_gateway: Gateway) -> None:
        """nbgw_build_info has the installed nbgateway version as a label, value 1."""
        family = families(await scrape(busy_gateway))["nbgw_build_info"]
        [sample] = family.samples
        assert sample.labels["version"] == nbgateway.__version__
        assert sample.value == 1

    async def test_the_exposition_is_made_off_the_event_loop(self, busy_gateway: Gateway) -> None:
        """/metrics is made in a worker thread (a big one must not hold up the proxy), in
        the format the scraper asks for, compressed when it accepts gzip, and `name[]`
        still narrows it."""
        seen: list[threading.Thread] = []

        class Witness:
            def collect(self) -> Iterator[Any]:
                seen.append(threading.current_thread())
                return iter(())

        busy_gateway.registry.register(Witness())
        client = busy_gateway.client
        resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "nbgw_proxy_requests_total" in await resp.text()
        assert seen and threading.main_thread() not in seen
        open_metrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await open_metrics.text()).rstrip().endswith("# EOF")
        narrowed = await (await client.get("/metrics?name[]=nbgw_build_info")).text()
        assert "nbgw_build_info" in narrowed
        assert "nbgw_proxy_requests_total" not in narrowed

    async def test_process_metrics_are_exported(self, busy_gateway: Gateway) -> None:
        """Process and Python metrics the dashboard's Process row uses are exported."""
        exposed = families(await scrape(busy_gateway))
        assert set(exposed) >= PROCESS_METRICS

    async def test_traffic_shows_up_in_the_contract_metrics(self, busy_gateway: Gateway) -> None:
        """After requests, a 401 retry and a 404, the samples say so."""
        gw = busy_gateway
        assert gw.metric("nbgw_proxy_requests_total", account="acme", method="GET", code="200") == 2
        assert gw.metric("nbgw_proxy_requests_total", account="none", method="GET", code="404") == 1
        assert gw.metric("nbgw_token_refresh_total", account="acme", outcome="success") == 1
        assert (
            gw.metric("nbgw_upstream_401_retries_total", account="acme", outcome="recovered") == 1
        )
        assert gw.metric("nbgw_account_needs_reauth", account="acme") == 0
        assert gw.metric("nbgw_access_token_expiry_timestamp_seconds", account="acme") > 0
        assert gw.metric("nbgw_token_refresh_duration_seconds_count", account="acme") == 1
        assert gw.metric("nbgw_proxy_in_flight_requests") == 0

    async def test_the_gateways_own_errors_are_told_from_nationbuilders(
        self, busy_gateway: Gateway, fake_nb: FakeNationBuilder
    ) -> None:
        """nbgw_gateway_errors_total counts what the gateway answered itself (by its error
        code); a 503 NationBuilder sent is in nbgw_proxy_requests_total only."""
        gw = busy_gateway
        fake_nb.set_canned(status=503, headers=[("Content-Type", "text/html")], body=b"down")
        assert (await gw.client.get("/n/acme/api/_test/canned")).status == 503
        assert (await gw.client.get("/n/Not_A_Slug/api/v2/x")).status == 400
        proxied = gw.metric("nbgw_proxy_requests_total", account="acme", method="GET", code="503")
        assert proxied == 1
        errors = "nbgw_gateway_errors_total"
        assert gw.metric(errors, account="none", error="unknown_account") == 1
        assert gw.metric(errors, account="none", error="invalid_request") == 1
        exposed = families(await scrape(gw))["nbgw_gateway_errors_total"]
        assert sum(s.value for s in exposed.samples if s.name.endswith("_total")) == 2

    async def test_refresh_outcomes_start_at_zero_when_an_account_is_connected(
        self, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """Every refresh outcome of a connected account is exported at 0 before its first
        refresh: increase() cannot see a series' first sample, so the first success (which
        clears NBGatewayRefreshFailing) or failure would otherwise be invisible."""
        await connect_account(gateway, "acme")
        for outcome in RefreshOutcome:
            value = gateway.registry.get_sample_value(
                "nbgw_token_refresh_total", {"account": "acme", "outcome": outcome.value}
            )
            assert value == 0, outcome


def write_worker_files(directory: Path, pid: int, requests: float, seconds: float) -> None:
    """The files a worker `pid` leaves: one counter and one histogram (a bucket and sum)."""
    files: Any = MmapedDict  # prometheus_client's writer, untyped
    counter = files(str(directory / f"counter_{pid}.db"))
    key = mmap_key("nbgw_x_total", "nbgw_x_total", ["account"], ["acme"], "x")
    counter.write_value(key, requests, 0.0)
    counter.close()
    histogram = files(str(directory / f"histogram_{pid}.db"))
    name = "nbgw_y_seconds"
    bucket = mmap_key(name, f"{name}_bucket", ["account", "le"], ["acme", "1.0"], "y")
    histogram.write_value(bucket, requests, 0.0)
    inf = mmap_key(name, f"{name}_bucket", ["account", "le"], ["acme", "+Inf"], "y")
    histogram.write_value(inf, requests, 0.0)
    histogram.write_value(mmap_key(name, f"{name}_sum", ["account"], ["acme"], "y"), seconds, 0.0)
    histogram.close()


def merged(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


class TestDeadWorkerFiles:
    def test_folding_keeps_every_sum_and_leaves_one_file_per_type(self, tmp_path: Path) -> None:
        """The parent folds an exited worker's counter and histogram files into an archive:
        what a scrape sums is the same before and after, however many workers exited."""
        write_worker_files(tmp_path, 101, 3, 0.5)
        write_worker_files(tmp_path, 102, 4, 0.25)
        write_worker_files(tmp_path, 103, 5, 1.0)  # still running
        before = merged(tmp_path)
        fold_dead_worker(tmp_path, 101)
        assert merged(tmp_path) == before
        fold_dead_worker(tmp_path, 102)
        fold_dead_worker(tmp_path, 104)  # left no files: nothing to do
        assert merged(tmp_path) == before
        assert before[("nbgw_x_total", (("account", "acme"),))] == 12
        assert before[("nbgw_y_seconds_sum", (("account", "acme"),))] == 1.75
        files = sorted(p.name for p in tmp_path.glob("*.db"))
        assert files == [
            "counter_103.db",
            "counter_archive.db",
            "histogram_103.db",
            "histogram_archive.db",
        ]

    def test_a_scrape_in_progress_defers_the_fold(self, tmp_path: Path) -> None:
        """A fold waits for running scrapes only so long (a frozen worker holds its lock
        for ever): it gives up, changing nothing, and succeeds once the scrape is over."""
        write_worker_files(tmp_path, 201, 2, 0.1)
        before = merged(tmp_path)
        with (tmp_path / ".fold.lock").open("a+b") as scrape:
            fcntl.flock(scrape, fcntl.LOCK_SH)
            assert fold_dead_worker(tmp_path, 201, wait=0.1) is False
            assert (tmp_path / "counter_201.db").exists()
            fcntl.flock(scrape, fcntl.LOCK_UN)
        assert fold_dead_worker(tmp_path, 201, wait=0.1) is True
        assert merged(tmp_path) == before

    def test_a_damaged_file_is_left_and_the_parent_goes_on(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A truncated worker file cannot be folded: the archive is not touched, the
        parent logs it and folds the next worker's files."""
        write_worker_files(tmp_path, 301, 2, 0.1)
        write_worker_files(tmp_path, 302, 3, 0.2)
        damaged = tmp_path / "counter_301.db"
        damaged.write_bytes(damaged.read_bytes()[:72])
        sock = socket.socket()
        try:
            parent = Workers(
                lambda fd, pipe: [],
                {},
                SocketGroup([sock], sock),
                rejoin=lambda f, a: sock,
                clock=SystemClock(),
                grace=1,
            )
            parent._metrics_dir = tmp_path
            parent._unfolded = [301, 302]
            parent._fold()
        finally:
            sock.close()
        assert parent._unfolded == []
        assert "could not fold an exited worker's metrics files" in caplog.text
        assert damaged.exists()
        assert not (tmp_path / "counter_302.db").exists()
        archive = MmapedDict.read_all_values_from_file(str(tmp_path / "counter_archive.db"))  # type: ignore[no-untyped-call]
        assert [value for _key, value, _ts, _pos in archive] == [3.0]

    def test_a_pid_that_came_back_as_a_new_worker_is_not_folded(self, tmp_path: Path) -> None:
        """A fold put off (a scrape held the directory) must not take the files of a new
        worker that got the same pid: that worker carries on in them."""
        write_worker_files(tmp_path, 401, 2, 0.1)
        sock = socket.socket()
        try:
            parent = Workers(
                lambda fd, pipe: [],
                {},
                SocketGroup([sock], sock),
                rejoin=lambda f, a: sock,
                clock=SystemClock(),
                grace=1,
            )
            parent._metrics_dir = tmp_path
            parent._slots[0].process = SimpleNamespace(pid=401, returncode=None)  # type: ignore[assignment]
            parent._unfolded = [401]
            parent._fold()
        finally:
            sock.close()
        assert parent._unfolded == []
        assert (tmp_path / "counter_401.db").exists()
        assert not (tmp_path / "counter_archive.db").exists()


class TestAccountGauges:
    async def test_gauges_follow_a_removal_in_this_process(self, busy_gateway: Gateway) -> None:
        """Removing an account drops its expiry and needs-reauth series."""
        gw = busy_gateway
        assert await gw.accounts.remove("acme")
        text = await scrape(gw)
        assert 'nbgw_access_token_expiry_timestamp_seconds{account="acme"}' not in text
        assert 'nbgw_account_needs_reauth{account="acme"}' not in text

    async def test_gauges_follow_a_removal_in_another_process(
        self,
        gateway_factory: GatewayFactory,
        connect_account: ConnectAccount,
        settings: Settings,
    ) -> None:
        """An account removed by another process sharing the database leaves no series."""
        one = await gateway_factory(settings)
        two = await gateway_factory(settings)
        await connect_account(one, "acme")
        await two.tokens.sync()
        assert two.metric("nbgw_access_token_expiry_timestamp_seconds", account="acme") > 0
        assert await one.accounts.remove("acme")
        assert await two.tokens.sync()
        text = await scrape(two)
        assert 'nbgw_access_token_expiry_timestamp_seconds{account="acme"}' not in text
        assert 'nbgw_account_needs_reauth{account="acme"}' not in text


class TestLabelCardinality:
    async def test_hostile_traffic_adds_no_label_values(
        self, gateway: Gateway, connect_account: ConnectAccount
    ) -> None:
        """50 unknown slugs, random paths and odd methods add only account="none" series."""
        await connect_account(gateway, "acme")
        planted: list[str] = []
        for _ in range(50):
            slug = f"zz{secrets.token_hex(6)}"
            tail = secrets.token_hex(8)
            planted += [slug, tail]
            resp = await gateway.client.get(f"/n/{slug}/api/v2/{tail}?q={tail}")
            assert resp.status == 404
        for _ in range(10):
            tail = secrets.token_hex(8)
            planted.append(tail)
            # Known account, unknown upstream path: NationBuilder's 404.
            await gateway.client.get(f"/n/acme/api/v2/{tail}")
            # Unknown account named by header.
            slug = f"hdr{secrets.token_hex(5)}"
            planted.append(slug)
            await gateway.client.get(f"/api/v2/{tail}", headers={"X-NB-Nation": slug})
            # Invalid slugs and escaping paths are refused before any lookup.
            await gateway.client.get(f"/n/Bad_{tail}/api/v2/signups")
            await gateway.client.get(f"/n/acme/api/%2e%2e/{tail}")
        # Methods outside the usual set (aiohttp's parser refuses made-up ones).
        for method in ("PROPFIND", "TRACE", "MKCOL", "LOCK", "REPORT", "SEARCH"):
            await gateway.client.request(method, "/n/acme/api/v2/signups")

        text = await scrape(gateway)
        [family] = [
            f for f in text_string_to_metric_families(text) if f.name == "nbgw_proxy_requests"
        ]
        series = {
            (s.labels["account"], s.labels["method"], s.labels["code"])
            for s in family.samples
            if s.name == "nbgw_proxy_requests_total"
        }
        assert {account for account, _, _ in series} <= {"acme", "none"}
        methods = {method for _, method, _ in series}
        assert "other" in methods
        assert methods <= KNOWN_METHODS | {"other"}
        assert len(series) <= 8, sorted(series)
        for sample_family in text_string_to_metric_families(text):
            for sample in sample_family.samples:
                assert sample.labels.get("account", "none") in {"acme", "none"}, sample
        leaked = [value for value in planted if value in text]
        assert not leaked, f"request data in /metrics: {leaked[:5]}"

    async def test_no_request_path_appears_in_metrics(self, busy_gateway: Gateway) -> None:
        """No label or sample in /metrics carries a request path."""
        text = await scrape(busy_gateway)
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            assert "/api" not in line and "/n/" not in line and "signups" not in line, line


# -- provisioning and runbook links --------------------------------------------------------


class TestProvisioning:
    def test_dashboard_datasource_is_provisioned(self) -> None:
        """Every datasource uid the dashboard names is a provisioned datasource."""
        provisioned: set[str] = set()
        for path in (PROVISIONING / "datasources").glob("*.y*ml"):
            provisioned |= set(re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", path.read_text(), re.M))
        assert provisioned, "no datasource uid provisioned"
        used: set[str] = set()

        def collect(node: Any) -> None:
            if isinstance(node, dict):
                source = node.get("datasource")
                # Grafana's built-in sources ("-- Grafana --" for annotations) need no
                # provisioning.
                if isinstance(source, dict) and source.get("type") not in ("grafana", "datasource"):
                    used.add(str(source.get("uid")))
                for value in node.values():
                    collect(value)
            elif isinstance(node, list):
                for value in node:
                    collect(value)

        collect(dashboard())
        assert used, "the dashboard names no datasource"
        assert used <= provisioned, f"unprovisioned datasources: {sorted(used - provisioned)}"

    def test_dashboard_provider_reads_the_mounted_directory(self) -> None:
        """The dashboard provider's path is where docker-compose mounts grafana/dashboards."""
        provider = (PROVISIONING / "dashboards" / "nbgateway.yml").read_text()
        [path] = re.findall(r"^\s*path:\s*(\S+)", provider, re.M)
        compose = COMPOSE.read_text()
        assert re.search(rf"\./grafana/dashboards:{re.escape(path)}(:ro)?\b", compose), path
        assert re.search(r"\./grafana/provisioning:/etc/grafana/provisioning\b", compose)

    def test_compose_variables_from_env_are_settings_or_not_ours(self) -> None:
        """`env_file: .env` hands the gateway every variable of .env, and the gateway
        refuses an NBGW_* variable that is not a setting: a variable the compose file
        reads from .env for another service must not start with NBGW_."""
        compose = COMPOSE.read_text()
        assert "env_file: .env" in compose
        read = set(re.findall(r"\$\{([A-Z0-9_]+)", compose))
        assert "POSTGRES_PASSWORD" in read
        assert {n for n in read if n.startswith("NBGW_")} <= set(SETTINGS_BY_ENV)


class TestRunbookLinks:
    def test_every_alert_links_to_an_existing_runbook_section(self) -> None:
        """Each alert's runbook_url points at docs/runbook.md#<anchor of a real heading>."""
        headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", RUNBOOK.read_text(), re.M)
        anchors = {github_anchor(h) for h in headings}
        for rule in alert_rules(ALERTS.read_text()):
            url = rule["runbook_url"]
            page, _, anchor = url.partition("#")
            assert page.endswith("docs/runbook.md"), url
            assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor}"
