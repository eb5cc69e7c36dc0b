"""Every Prometheus collector of the gateway, registered on an injected registry.

Names and labels follow the contract. Label values are bounded: the account is a slug
that exists (or "none"), the method one of a fixed set, the code an HTTP status; paths and
ids never become labels.

With `serve --workers N` each worker is started with PROMETHEUS_MULTIPROC_DIR set
(prometheus_client picks its value class from that variable when it is first imported), so
every value lives in a per-process file of that directory. `Metrics(multiprocess_dir=...)`
then serves /metrics from a registry holding a `MultiProcessCollector` over the directory:
counters and histograms are summed over the workers (those that exited included), and each
gauge is merged as its `multiprocess_mode` says (single-process mode ignores the mode):

- in-flight gauges: `livesum` (what the running workers are doing now);
- per-account expiry and last-success timestamps: `livemax` (they only move forward, and
  every worker follows the same store, so the largest is the newest); last-failure
  timestamp: `livemax` (the latest failure a running worker saw);
- needs-reauth: `livemax` (1 while any running worker has seen the account refused; each
  worker re-reads the store within a second of a change, so a reconnect clears it);
- rate-limit remaining: `livemin` (the lowest any running worker was last told: the
  cautious reading of one shared budget); rate-limit limit: `livemax`;
- build info: `livemax` (1).

(The `mostrecent` modes are not used: they forbid `inc()` in every mode.)

The process_* series describe the whole gateway, parent and workers (`GatewayProcesses`);
python_info the worker that answered the scrape.

A worker that exits leaves its counter and histogram files behind (its counts stay in the
totals); the parent folds them into one archive file per type (`fold_dead_worker`), so a
worker restarted a thousand times costs a scrape no more than one that never died. A fold
and a scrape exclude each other (a lock file in the directory), so no scrape sees a count
twice or not at all.
"""

from __future__ import annotations

import fcntl
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from nbgateway import __version__
from nbgateway.models import RefreshOutcome

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NO_ACCOUNT = "none"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Rate waits run from none to a whole window (10 s) and up to NBGW_RATE_QUEUE_TIMEOUT.
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)


# In a multiprocess directory: held shared by a scrape, exclusively by a fold.
_FOLD_LOCK = ".fold.lock"
# The value files summed over the workers, dead ones included (gauges are live* modes:
# prometheus_client's mark_process_dead removes a dead worker's gauge files).
_SUMMED_TYPES = ("counter", "histogram")


@contextmanager
def _folding_lock(directory: Path, mode: int, wait: float | None = None) -> Iterator[bool]:
    """Hold the directory's lock (`mode`); with `wait`, give up after that many seconds
    (a scrape that never ends: a frozen worker) and yield False."""
    with open(directory / _FOLD_LOCK, "a+b") as lock:
        if wait is None:
            fcntl.flock(lock, mode)
        else:
            until = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(lock, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= until:
                        yield False
                        return
                    time.sleep(0.02)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fold_dead_worker(directory: Path, pid: int, wait: float = 0.0) -> bool:
    """Add the counter and histogram values of worker `pid`, which has exited, to the
    directory's archive file of each type, and remove its files. The sums
    MultiProcessCollector makes are unchanged; the files to read stay few. False when a
    scrape held the directory for `wait` seconds: nothing was changed (try again later)."""
    with _folding_lock(directory, fcntl.LOCK_EX, wait) as held:
        if not held:
            return False
        for kind in _SUMMED_TYPES:
            dead = directory / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            # prometheus_client's own file format, through its (untyped) reader and writer.
            # Read whole first: a damaged file raises here, before the archive is touched.
            values = MmapedDict.read_all_values_from_file(str(dead))  # type: ignore[no-untyped-call]
            archive = MmapedDict(str(directory / f"{kind}_archive.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, _timestamp, _pos in values:
                    kept, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                    archive.write_value(key, kept + value, 0.0)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
            dead.unlink()
    return True


def method_label(method: str) -> str:
    """The request method, or "other" for anything outside the usual set."""
    return method if method in KNOWN_METHODS else "other"


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# ProcessCollector's CPU family (its samples are named process_cpu_seconds_total).
_CPU_SECONDS: Final = "process_cpu_seconds"


class GatewayProcesses(Collector):
    """process_* for a whole `serve --workers` gateway: its parent (`parent`) and every
    worker, each read by prometheus_client's ProcessCollector. CPU seconds, memory and
    descriptors (open, and the limits) are summed; the start time is the parent's. Whichever
    worker answers a scrape reports the same figures, so the dashboards' CPU, memory,
    descriptor and uptime panels show the gateway. The CPU seconds of workers that have
    exited stay in the sum (the parent's reaped children's time, `cutime` + `cstime`), so
    the counter never goes back when a worker dies and rate() sees no reset."""

    _FIRST = "process_start_time_seconds"

    def __init__(self, parent: int, proc: str = "/proc") -> None:
        self._parent = parent
        self._proc = proc

    def _pids(self) -> list[int]:
        try:
            children = Path(self._proc, str(self._parent), "task", str(self._parent), "children")
            return [self._parent, *map(int, children.read_text().split())]
        except (OSError, ValueError):
            return [os.getpid()]  # no /proc children list: this worker alone, as before

    def _reaped_cpu(self) -> float | None:
        """CPU seconds of the parent's exited workers (its children it has waited for)."""
        try:
            stat = Path(self._proc, str(self._parent), "stat").read_bytes()
            # Fields after the command name (which may hold spaces): state is the first,
            # cutime and cstime (in clock ticks) the 14th and 15th.
            fields = stat.rpartition(b")")[2].split()
            return (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS
        except (OSError, IndexError, ValueError):
            return None

    def _merged(self) -> dict[str, Metric]:
        merged: dict[str, Metric] = {}
        for pid in self._pids():
            reader = ProcessCollector(pid=partial(int, pid), proc=self._proc, registry=None)
            for family in reader.collect():
                if not family.samples:
                    continue  # the process ended meanwhile
                sample = family.samples[0]
                seen = merged.get(family.name)
                if seen is None:
                    merged[family.name] = family
                elif family.name != self._FIRST:
                    total = seen.samples[0]._replace(value=seen.samples[0].value + sample.value)
                    seen.samples[0] = total
        return merged

    def collect(self) -> Iterator[Metric]:
        # A worker reaped while its siblings are read would count twice or not at all (a
        # counter going back): read again until no reap fell between the two looks.
        for _ in range(3):
            before = self._reaped_cpu()
            merged = self._merged()
            after = self._reaped_cpu()
            if before == after:
                break
        cpu = merged.get(_CPU_SECONDS)
        if cpu is not None and cpu.samples and after is not None:
            cpu.samples[0] = cpu.samples[0]._replace(value=cpu.samples[0].value + after)
        yield from merged.values()


class Metrics:
    """Owns the collectors. One instance per app; tests pass a fresh registry.

    `registry` holds the collectors; `exposition` is what /metrics serves: the same registry
    in single-process mode, the merged view over every worker with `multiprocess_dir`.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: Path | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir is not None
        self._multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(multiprocess_dir):
                # Values would stay in this process's memory and /metrics would miss them.
                raise ValueError(
                    "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set to "
                    f"{multiprocess_dir} before prometheus_client is imported"
                )
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
            self.exposition.register(GatewayProcesses(os.getppid()))
            PlatformCollector(registry=self.exposition)
        else:
            self.exposition = self.registry
        r = self.registry
        self.refresh_total = Counter(
            "nbgw_token_refresh_total",
            "Calls to the token endpoint to refresh an access token, by outcome.",
            ["account", "outcome"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            "nbgw_token_refresh_duration_seconds",
            "Duration of token-endpoint refresh calls.",
            ["account"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refresh_coalesced = Counter(
            "nbgw_token_refresh_coalesced_total",
            "Requests that awaited a refresh another request had started.",
            ["account"],
            registry=r,
        )
        self.refresh_in_flight = Gauge(
            "nbgw_token_refresh_in_flight",
            "Token-endpoint refresh calls in flight.",
            ["account"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.token_expiry = Gauge(
            "nbgw_access_token_expiry_timestamp_seconds",
            "When the account's current access token expires (epoch seconds).",
            ["account"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.persist_failures = Counter(
            "nbgw_token_persist_failures_total",
            "Attempts to store a rotated token pair that failed (the pair is kept in memory "
            "and served meanwhile).",
            ["account"],
            registry=r,
        )
        self.store_up = Gauge(
            "nbgw_store_up",
            "1 while this process's last check of the database (a read every 5 s, a test "
            "write every minute) succeeded, 0 while the database cannot be used.",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.unpersisted = Gauge(
            "nbgw_token_unpersisted",
            "1 while the account's current token pair exists only in this process's memory "
            "because the store could not be written.",
            ["account"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.last_refresh_success = Gauge(
            "nbgw_account_last_refresh_success_timestamp_seconds",
            "When the account's tokens were last obtained successfully (epoch seconds).",
            ["account"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.last_refresh_failure = Gauge(
            "nbgw_account_last_refresh_failure_timestamp_seconds",
            "When a token-endpoint refresh of the account last failed in this process "
            "(epoch seconds); with the last success, tells whether it is failing now.",
            ["account"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.needs_reauth = Gauge(
            "nbgw_account_needs_reauth",
            "1 when the account needs an admin to re-authorize it at /connect.",
            ["account"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.proxy_requests = Counter(
            "nbgw_proxy_requests_total",
            "Proxied requests by account, method and the status the client got (499: it "
            "closed the connection first; 408: its body stalled).",
            ["account", "method", "code"],
            registry=r,
        )
        self.gateway_errors = Counter(
            "nbgw_gateway_errors_total",
            "Proxied requests the gateway answered with an error of its own (X-NBGW-Error), "
            "by account and error code; the rest of nbgw_proxy_requests_total's 4xx and 5xx "
            "are NationBuilder's.",
            ["account", "error"],
            registry=r,
        )
        self.proxy_duration = Histogram(
            "nbgw_proxy_request_duration_seconds",
            "Total time to answer a proxied request (until the response body is sent).",
            ["account"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "nbgw_upstream_request_duration_seconds",
            "Time from sending a request to NationBuilder until its response headers arrive.",
            ["account"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_401_retries = Counter(
            "nbgw_upstream_401_retries_total",
            "Upstream 401 answers that triggered a refresh and a retry, by outcome.",
            ["account", "outcome"],
            registry=r,
        )
        self.client_requests = Counter(
            "nbgw_client_requests_total",
            "Proxied requests by client key (registered name, or anonymous) and status.",
            ["client", "account", "code"],
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            "nbgw_rate_limit_wait_seconds",
            "Time a request waited for its nation's rate budget before going upstream.",
            ["account"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.rate_limit_remaining = Gauge(
            "nbgw_rate_limit_remaining",
            "The last RateLimit-Remaining NationBuilder announced for the account.",
            ["account"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.rate_limit_limit = Gauge(
            "nbgw_rate_limit_limit",
            "The last RateLimit-Limit NationBuilder announced for the account.",
            ["account"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.upstream_429 = Counter(
            "nbgw_upstream_429_total",
            "429 (too many requests) answers from NationBuilder.",
            ["account"],
            registry=r,
        )
        self.in_flight = Gauge(
            "nbgw_proxy_in_flight_requests",
            "Proxied requests being served right now.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.workers_serving = Gauge(
            "nbgw_workers_serving",
            "Processes of this gateway serving requests (1 each; with --workers, summed "
            "over the live workers: one that cannot start is missing).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.workers_configured = Gauge(
            "nbgw_workers_configured",
            "Processes this gateway was started to run (serve --workers N; 1 for one process).",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.build_info = Gauge(
            "nbgw_build_info",
            "Build information; the value is always 1.",
            ["version", "python"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.webhook_deliveries = Counter(
            "nbgw_alert_webhook_deliveries_total",
            "Alert webhook delivery attempts, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.connections_refused = Counter(
            "nbgw_connections_closed_total",
            "Client connections the gateway closed itself, by reason (not_allowed, "
            "client_limit, header_timeout, body_timeout, malformed_request).",
            ["reason"],
            registry=r,
        )
        # Labelled children cached for the per-request path; keys are bounded like labels.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        self._upstream_children: dict[str, Histogram] = {}
        self._client_children: dict[tuple[str, str, int], Counter] = {}
        self._error_children: dict[tuple[str, str], Counter] = {}
        self._wait_children: dict[str, Histogram] = {}
        self._remaining_children: dict[str, Gauge] = {}
        self._outcomes_made: set[str] = set()
        self._limit_children: dict[str, Gauge] = {}
        # Proxied requests being served. In one process the gauge reads this count when
        # scraped (a plain integer on the hot path, no lock); with values in per-worker
        # files (multiprocess) it is kept in the gauge itself.
        self._serving = 0
        if not self.multiprocess:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            self.in_flight.set_function(lambda: self._serving)

    def expose(self, encoder: Callable[[Collector], bytes], registry: Collector) -> bytes:
        """`encoder(registry)` (the exposition or a part of it); with several workers, never
        while the parent folds a dead worker's files. Blocking: run it off the event loop."""
        if self._multiprocess_dir is None:
            return encoder(registry)
        with _folding_lock(self._multiprocess_dir, fcntl.LOCK_SH):
            return encoder(registry)

    def proxy_started(self) -> None:
        """One proxied request is being served (until its `proxy_ended`)."""
        if self.multiprocess:
            self.in_flight.inc()
        else:
            self._serving += 1

    def proxy_ended(self) -> None:
        """The request of a `proxy_started` is answered (or failed)."""
        if self.multiprocess:
            self.in_flight.dec()
        else:
            self._serving -= 1

    def proxied(self, account: str, method: str, code: int, seconds: float) -> None:
        """Count one answered proxy request (labelled children are reused: hot path)."""
        key = (account, method_label(method), code)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self.proxy_requests.labels(key[0], key[1], str(code))
            self._request_children[key] = counter
        counter.inc()
        histogram = self._duration_children.get(account)
        if histogram is None:
            histogram = self._duration_children[account] = self.proxy_duration.labels(account)
        histogram.observe(seconds)

    def gateway_error(self, account: str, error: str) -> None:
        """Count one proxied request answered with the gateway's own error `error` (its
        code: a fixed set)."""
        key = (account, error)
        counter = self._error_children.get(key)
        if counter is None:
            counter = self._error_children[key] = self.gateway_errors.labels(account, error)
        counter.inc()

    def client_request(self, client: str, account: str, code: int) -> None:
        """Count one proxied request for a client (a registered name or "anonymous")."""
        key = (client, account, code)
        counter = self._client_children.get(key)
        if counter is None:
            counter = self.client_requests.labels(client, account, str(code))
            self._client_children[key] = counter
        counter.inc()

    def forget_client(self, name: str) -> None:
        """Drop a removed client's series (label values stay bounded to registered names).

        Multiprocess files cannot drop a series: with `--workers` a removed client's counts
        stay in /metrics (no longer growing) until the workers restart.
        """
        for key in [k for k in self._client_children if k[0] == name]:
            del self._client_children[key]
            if self.multiprocess:
                continue
            try:
                self.client_requests.remove(*key[:2], str(key[2]))
            except KeyError:
                pass

    def upstream_answered(self, account: str, seconds: float) -> None:
        """Time to an upstream response's headers."""
        histogram = self._upstream_children.get(account)
        if histogram is None:
            histogram = self._upstream_children[account] = self.upstream_duration.labels(account)
        histogram.observe(seconds)

    def rate_waited(self, account: str, seconds: float) -> None:
        """Time one request waited for its nation's rate budget (hot path)."""
        histogram = self._wait_children.get(account)
        if histogram is None:
            histogram = self._wait_children[account] = self.rate_limit_wait.labels(account)
        histogram.observe(seconds)

    def rate_announced(self, account: str, remaining: int | None, limit: int | None) -> None:
        """The RateLimit figures of one upstream answer (hot path)."""
        if remaining is not None:
            gauge = self._remaining_children.get(account)
            if gauge is None:
                gauge = self._remaining_children[account] = self.rate_limit_remaining.labels(
                    account
                )
            gauge.set(remaining)
        if limit is not None:
            gauge = self._limit_children.get(account)
            if gauge is None:
                gauge = self._limit_children[account] = self.rate_limit_limit.labels(account)
            gauge.set(limit)

    def account_known(self, slug: str) -> None:
        """Create the account's refresh series, one per outcome, at 0: `increase()` and
        `rate()` cannot see a series' first sample, so a series born at 1 would hide the
        first success (the refresh-failing alert would not clear) or the first failure."""
        if slug in self._outcomes_made:
            return  # the set holds the accounts seen and not removed since
        self._outcomes_made.add(slug)
        for outcome in RefreshOutcome:
            self.refresh_total.labels(slug, outcome.value)

    def forget_account(self, slug: str) -> None:
        """Drop an account's per-account gauges (after it is removed).

        Multiprocess files cannot drop a series: every per-account gauge of the account then
        reads 0 in every worker (each one's sync notices the removal), the alerts take an
        expiry of 0 for "gone", and the series leave /metrics when the workers restart.
        """
        self._outcomes_made.discard(slug)
        if self.multiprocess:
            for gauge in self._account_gauges():
                gauge.labels(slug).set(0)
        else:
            self._forget_series(slug)
        self._remaining_children.pop(slug, None)
        self._limit_children.pop(slug, None)

    def _account_gauges(self) -> tuple[Gauge, ...]:
        """The gauges describing an account's tokens (one series per account)."""
        return (
            self.token_expiry,
            self.needs_reauth,
            self.last_refresh_success,
            self.last_refresh_failure,
            self.unpersisted,
        )

    def _forget_series(self, slug: str) -> None:
        for gauge in (*self._account_gauges(), self.rate_limit_remaining, self.rate_limit_limit):
            try:
                gauge.remove(slug)
            except KeyError:
                pass
