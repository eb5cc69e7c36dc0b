"""A throw-away PostgreSQL server for the tests, started from Debian's `postgresql` package.

`PgServer` runs `initdb` once into a temporary directory, then `pg_ctl` on a free loopback
port (trust authentication for 127.0.0.1 only, no Unix socket, durability switched off for
speed). Nothing relies on a server already running. PostgreSQL refuses to run as root, so
as root every server command runs as the `postgres` user (`runuser`) on a directory that
user owns. Tests stop and start a server with `stop()` / `start()` (same port, same data).

`find_bin_dir()` is None when no PostgreSQL binaries are installed; the fixtures then skip
with that reason (`make system-deps` installs them).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SKIP_REASON = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found; "
    "`make system-deps` installs Debian's postgresql package"
)
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
SUPERUSER = "postgres"

_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "16MB",
}


def find_bin_dir() -> Path | None:
    """The directory of the newest installed initdb/pg_ctl, or None."""

    def version(path: str) -> int:
        try:
            return int(Path(path).parents[1].name)
        except ValueError:
            return 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    return None


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SUPERUSER, "--", *argv]
    return argv


class PgServer:
    """One PostgreSQL cluster in its own temporary directory (see the module docstring)."""

    def __init__(self, bin_dir: Path, *, template: PgServer | None = None) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="nbgw-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        from procs import free_port  # procs imports conftest, which imports this module

        self.port = free_port()
        self.running = False
        self._databases = 0
        if os.geteuid() == 0:
            shutil.chown(self.root, SUPERUSER, SUPERUSER)
        if template is not None:
            # Copying an initialised (stopped or running, fsync off) cluster beats initdb.
            self._run(["cp", "-a", str(template.data), str(self.data)])
            (self.data / "postmaster.pid").unlink(missing_ok=True)
        else:
            self._run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            )
            (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
            if os.geteuid() == 0:
                shutil.chown(self.data / "pg_hba.conf", SUPERUSER, SUPERUSER)

    def _run(self, argv: list[str], timeout: float = 60) -> None:
        done = subprocess.run(
            _as_server_user(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                f"{self.log_text()}"
            )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql; its unaligned output."""
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(database),
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (named, or numbered); its URL."""
        self._databases += 1
        name = name or f"nbgw_test_{self._databases}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[-1]
        if self.running:
            self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def start(self) -> None:
        options = " ".join(f"-c {k}='{v}'" for k, v in _SETTINGS.items())
        options += f" -c port={self.port}"
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-o",
                options,
                "start",
            ],
            timeout=START_TIMEOUT + 10,
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnects every client; `immediate`: like a crash)."""
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])
        self.running = False

    def destroy(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresServer:
    """A started throw-away server for scripts outside pytest (bench/refresh_scale.py).

    `start(path)` raises RuntimeError saying why when there are no binaries. The cluster
    lives in its own directory under the system temp dir (which the `postgres` user can
    reach when running as root), not under `path`; `stop()` stops and removes it.
    """

    def __init__(self, server: PgServer) -> None:
        self.server = server

    @classmethod
    def start(cls, path: Path | None = None) -> PostgresServer:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(SKIP_REASON)
        server = PgServer(bin_dir)
        try:
            server.start()
        except BaseException:
            server.destroy()
            raise
        return cls(server)

    def url(self, database: str = "postgres") -> str:
        return self.server.url(database)

    def create_database(self, name: str | None = None) -> str:
        return self.server.create_database(name)

    def stop(self) -> None:
        self.server.destroy()
