"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temporary folder, a free loopback port, stopped
and removed at the end. Debian's binaries (/usr/lib/postgresql/<version>/bin); as root the server runs as the
`postgres` user (PostgreSQL refuses root). Never touches a system cluster."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder with initdb and pg_ctl, or None."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                     if Path(p).parent.name.isdigit() else 0)
    for folder in reversed(folders):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def why_not() -> str | None:
    """None when a cluster can be started here, else the reason (for pytest.skip)."""
    if pg_bin() is None:
        return "PostgreSQL is not installed (scripts/setup.sh test installs Debian's postgresql where apt is available)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run PostgreSQL as"
    return None


class Cluster:
    """initdb + pg_ctl start on a free port; `dsn`; `stop()`, `start()` (the same data), `close()` removes it all."""

    def __init__(self, durable: bool = False):
        """`durable`: PostgreSQL's default fsync and synchronous_commit (benchmarks); else both off (tests: faster)."""
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="e2p-pg-"))
        self.data = self.root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-sync"])
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                       "max_connections = 200\n")
            if not durable:
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                   "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def relation_files(self, dsn: str, table: str) -> list[Path]:
        """The files of a table (heap, its TOAST, their free-space maps), for byte-level checks."""
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            rels = [table]
            toast = conn.execute("SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = %s::regclass AND "
                                 "reltoastrelid <> 0", (table,)).fetchone()
            rels += [toast[0]] if toast else []
            paths = [conn.execute("SELECT pg_relation_filepath(%s)", (r,)).fetchone()[0] for r in rels]
        out = []
        for p in paths:
            out += [Path(f) for f in glob.glob(str(self.data / p) + "*")]
        return out

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate, timeout: float = 30.0, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False
