"""The web app in a uvicorn subprocess, and a Postgres and a Redis of a test's own, for tests that stop, restart or starve them.

The shared services on 5432/6379 serve every test run on the machine; a fault test must never touch
them. `PrivatePostgres` runs initdb and pg_ctl on a free port in a temporary folder (as the
`postgres` system user when the tests run as root, since Postgres refuses to run as root);
`PrivateRedis` runs redis-server on a free port. Both can be stopped and
started again on the same port, so clients configured with their URL see a real outage and a real
recovery.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: PREFLOOP_TEST_PG_BIN, the PATH, or Debian's newest version."""
    configured = os.environ.get("PREFLOOP_TEST_PG_BIN")
    if configured:
        return Path(configured)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class PrivatePostgres:
    """A throwaway Postgres cluster: `start()`, `stop()`, `restart()`, `url(database)`."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = free_port()
        # Under /tmp rather than pytest's tmp_path: the postgres user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="prefloop-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        if result.returncode != 0 or not _wait_for_port(self.port, 30):
            raise RuntimeError(f"private Postgres did not start: {result.stderr}\n{self.log_text()}")

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every session and shuts down cleanly; `immediate` is a crash (recovery on start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A redis-server of our own: `start()`, `stop()`, `url(db)`. Persistent as in production
    (append-only file in its folder), so queued messages outlive a restart."""

    def __init__(self, executable: str):
        self.executable = executable
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="prefloop-redis-"))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115 - redis-server writes to it while it runs
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if not _wait_for_port(self.port, 15):
            raise RuntimeError(f"private Redis did not start: {(self.root / 'redis.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class AppServer:
    """The web app under uvicorn in a subprocess."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process = process
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_app_server(
    env: dict[str, str], log_path: Path, timeout: float = 60, uvicorn_args: tuple[str, ...] = ()
) -> AppServer:
    """Start the web app (uvicorn, one process, a free port on 127.0.0.1) with these environment
    variables (PREFLOOP_* settings) and wait until it answers; raises with its log if it does not."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.web.main:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *uvicorn_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )  # fmt: skip
    server = AppServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{server.url}/login", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the web app did not start:\n{server.log()[-3000:]}")
        time.sleep(0.2)


class SmallDisk:
    """A real, small filesystem (tmpfs) mounted on a temporary folder, which `fill()` brings close to
    full, so writes fail with ENOSPC as on a full data disk. Needs root (CAP_SYS_ADMIN) to mount."""

    def __init__(self, size_mb: int):
        self.size_mb = size_mb
        self.path = Path(tempfile.mkdtemp(prefix="prefloop-disk-"))
        self.mounted = False

    def mount(self) -> None:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise OSError(f"mount -t tmpfs failed: {result.stderr.strip()}")
        self.mounted = True

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave_bytes: int) -> None:
        """Take all free space but `leave_bytes` with a filler file."""
        take = self.free_bytes() - leave_bytes
        if take > 0:
            with open(self.path / ".filler", "ab") as filler:
                os.posix_fallocate(filler.fileno(), filler.tell(), take)

    def unfill(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / ".filler").unlink()

    def destroy(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)
