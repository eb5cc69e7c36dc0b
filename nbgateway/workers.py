"""The `serve --workers N` parent: start the worker processes, watch them, stop them.

The parent binds one socket per worker, all on the listen address in one SO_REUSEPORT
group (`server.bind`: a port in use fails here, before any worker starts; each socket
listens once its worker serves, so no connection waits on a worker still starting),
and starts N workers with `python -m nbgateway serve` plus two hidden options naming
inherited file descriptors: the worker's listening socket, and the read end of a pipe
whose write end only the parent holds, so a worker sees end of file and stops when the
parent exits in any way (SIGKILL included). The parent keeps the socket of a worker that
served for `STEADY_AFTER` seconds open when it dies: the connections the kernel queued
for it wait for its replacement, which inherits the same socket, instead of being reset.
A worker that dies sooner, or that never served (its pre-flight found a problem, such as
the database down or a newer schema: `EXIT_NOT_STARTED`), is crash looping: its socket is
closed, so new connections go to the workers that serve instead of waiting on a socket
nobody reads, and the next attempt gets a fresh socket (`server.rejoin`) that takes
connections only once its worker serves. One more socket of the group, bound but never
listening (the anchor `server.bind` makes first), stays open for the parent's life, so the
address stays this gateway's while no worker's socket listens.

A worker that exits is logged and started again; a crash-looping one waits before the
restart, twice as long each time up to `MAX_BACKOFF`, so a crash loop does not spin. The
parent never gives up: the settings were checked before any worker started, so what a
worker meets later (the database away, a file briefly missing) may pass.

SIGTERM, SIGINT or SIGHUP (logged: nothing is reloaded) to the parent: SIGTERM to every
worker, the listening sockets closed (new connections are refused while open requests
finish), SIGKILL to those still running after
`grace` seconds, and return once all are reaped. PROMETHEUS_MULTIPROC_DIR is a fresh
directory for this run (removed at the end, or by the next run when the parent was
killed); `mark_process_dead` is called for each worker
that exits so its live gauges leave /metrics, and its counter and histogram files are
folded into the directory's archive files (`metrics.fold_dead_worker`): its counts stay in
the totals, and the number of files a scrape reads does not grow with restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from nbgateway.clock import Clock
from nbgateway.metrics import fold_dead_worker
from nbgateway.server import HANGUP_STOPS, SocketGroup

log = logging.getLogger("nbgateway.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker's exit status when its pre-flight found a problem: it never served. (The
# settings were checked by the parent, so this is something passing, such as the
# database; the worker is started again with a backoff.)
EXIT_NOT_STARTED = 3
# A worker that ran this long before dying is restarted at once (not a crash loop).
STEADY_AFTER = 10.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
POLL_INTERVAL = 0.1  # seconds between two looks at the workers

# The metrics directory of a run: this prefix, the parent's pid, "-", a random part.
METRICS_PREFIX = "nbgateway-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories parents that died without cleaning up (SIGKILL) left
    in the temporary directory: those whose parent pid no longer runs, or is this
    process's own (called before this run makes its directory)."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        pid = path.name[len(METRICS_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            if int(pid) == os.getpid():  # this process's pid in an earlier life (PID 1
                raise ProcessLookupError  # of a container restarted after a SIGKILL)
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed a stale metrics directory", extra={"path": str(path)})
        except OSError:
            continue  # it runs (as another user): not ours to remove


# (listening socket fd, parent pipe fd) -> the worker's argv.
WorkerCommand = Callable[[int, int], list[str]]


@dataclass
class _Slot:
    """One worker position: its current process, when it started, its restart backoff."""

    number: int
    sock: socket.socket | None  # None while the slot waits out a crash loop's backoff
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float = 0.0


class Workers:
    """Runs one worker per socket until a signal (see the module docstring)."""

    def __init__(
        self,
        command: WorkerCommand,
        env: Mapping[str, str],
        group: SocketGroup,
        *,
        rejoin: Callable[[socket.AddressFamily, tuple[str, int]], socket.socket],
        clock: Clock,
        grace: float,
    ) -> None:
        self._command = command
        self._clock = clock  # restart backoff; the watch loop's own pace is real time
        # The group's address, for the fresh sockets of slots out of a crash loop.
        self._family = group.anchor.family
        self._address: tuple[str, int] = group.anchor.getsockname()[:2]
        self._rejoin = rejoin
        # Keeps the address the group's while no worker's socket listens (see SocketGroup).
        self._anchor = group.anchor
        self._env = dict(env)
        self._grace = grace
        self._slots = [_Slot(n, sock) for n, sock in enumerate(group.sockets, start=1)]
        self._stopping = threading.Event()
        self._metrics_dir: Path | None = None
        self._pipe_read = -1
        self._pipe_write = -1
        self._hangup = False
        self._unfolded: list[int] = []  # exited workers whose files are still to fold

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT/SIGHUP; then 0."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        _remove_stale_metrics_dirs()
        self._metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-"))
        self._pipe_read, self._pipe_write = os.pipe()
        code = 0
        try:
            log.info(
                "starting workers",
                extra={"workers": len(self._slots), "parent_pid": os.getpid()},
            )
            for slot in self._slots:
                self._start(slot)
            code = self._watch()
        finally:
            self._stop_all()  # closes the listening sockets too
            os.close(self._pipe_write)
            os.close(self._pipe_read)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._hangup = signum == signal.SIGHUP
        self._stopping.set()

    def _start(self, slot: _Slot) -> None:
        assert self._metrics_dir is not None
        if slot.sock is None:
            try:
                slot.sock = self._rejoin(self._family, self._address)
            except OSError as exc:
                slot.backoff = min(MAX_BACKOFF, slot.backoff * 2 or FIRST_BACKOFF)
                slot.restart_at = self._clock.monotonic() + slot.backoff
                log.error(
                    "cannot open a listening socket for the worker; trying again",
                    extra={"worker": slot.number, "error": str(exc), "retry_in": slot.backoff},
                )
                return
        if not self._metrics_dir.is_dir():
            # Removed under the running gateway (a clean-up of the temporary directory): a
            # worker cannot start without it. The counts it held are gone with it.
            self._metrics_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            log.error(
                "the metrics directory was removed while the gateway ran; made it again "
                "(/metrics counts start again from here: restart the gateway for whole figures)",
                extra={"path": str(self._metrics_dir)},
            )
        # NBGW_WORKERS: how many the parent runs (what nbgw_workers_configured reports),
        # --workers on the command line included.
        env = {
            **self._env,
            MULTIPROC_ENV: str(self._metrics_dir),
            "NBGW_WORKERS": str(len(self._slots)),
        }
        fds = (slot.sock.fileno(), self._pipe_read)
        # The command is this program with fixed arguments, not user input.
        slot.process = subprocess.Popen(self._command(*fds), env=env, pass_fds=fds)  # noqa: S603
        slot.started = self._clock.monotonic()
        log.info("worker started", extra={"worker": slot.number, "pid": slot.process.pid})

    def _watch(self) -> int:
        while not self._stopping.wait(POLL_INTERVAL):
            if self._unfolded:
                self._fold()
            now = self._clock.monotonic()
            for slot in self._slots:
                if slot.process is None:
                    if now >= slot.restart_at:
                        self._start(slot)
                    continue
                returncode = slot.process.poll()
                if returncode is None:
                    continue
                pid = slot.process.pid
                self._reaped(slot.process)
                slot.process = None
                ran = now - slot.started
                # One that never served (its pre-flight found a problem, however long that
                # took) or died soon after its start is crash looping.
                slot.backoff = (
                    0.0
                    if ran >= STEADY_AFTER and returncode != EXIT_NOT_STARTED
                    else min(MAX_BACKOFF, slot.backoff * 2 or FIRST_BACKOFF)
                )
                slot.restart_at = now + slot.backoff
                if slot.backoff and slot.sock is not None:
                    # A crash loop: nobody reads this socket until a replacement serves.
                    slot.sock.close()
                    slot.sock = None
                log.error(
                    "worker exited; restarting",
                    extra={
                        "worker": slot.number,
                        "pid": pid,
                        "exit_code": returncode,
                        "ran_seconds": round(ran, 1),
                        "restart_in_seconds": slot.backoff,
                        "taking_connections": slot.sock is not None,
                    },
                )
        if self._hangup:
            log.warning(HANGUP_STOPS)
        return 0

    def _reaped(self, process: subprocess.Popen[bytes]) -> None:
        assert self._metrics_dir is not None
        mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        self._unfolded.append(process.pid)
        self._fold()

    def _fold(self) -> None:
        """Fold the exited workers' metrics files, never waiting: while a scrape holds the
        directory they are tried again on the next round of `_watch`."""
        assert self._metrics_dir is not None
        running = {
            s.process.pid
            for s in self._slots
            if s.process is not None and s.process.returncode is None  # not reaped
        }
        for pid in list(self._unfolded):
            if pid in running:
                # The pid came back as a new worker, which carries on in the same files.
                self._unfolded.remove(pid)
                continue
            try:
                if not fold_dead_worker(self._metrics_dir, pid, wait=0.0):
                    return  # a scrape holds the directory: next round
            except Exception as exc:  # a damaged file: left as it is, counted all the same
                log.warning(
                    "could not fold an exited worker's metrics files",
                    extra={"pid": pid, "error": f"{type(exc).__name__}: {exc}"},
                )
            self._unfolded.remove(pid)

    def _stop_all(self) -> None:
        running = [s.process for s in self._slots if s.process is not None]
        log.info("stopping workers", extra={"workers": len(running)})
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        # The workers close their copies as they stop; with ours closed too, the address
        # stops listening, so a new connection is refused at once (a load balancer tries
        # elsewhere) instead of waiting in a queue nobody serves any more.
        for slot in self._slots:
            if slot.sock is not None:
                slot.sock.close()
        self._anchor.close()
        deadline = time.monotonic() + self._grace
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing", extra={"pid": process.pid})
                process.kill()
                process.wait()
            # The directory goes with the parent: its gauges leave, nothing is folded.
            mark_process_dead(process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        for slot in self._slots:
            slot.process = None
