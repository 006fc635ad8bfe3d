"""A PostgreSQL primary and a hot-standby streaming replica, from the system's binaries.

Used by `make up` (under .local/) and by the test fixtures (in a temp folder, on free
ports). PostgreSQL refuses to run as root, so when we are root every server binary runs
as the `postgres` OS user on folders it owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

SUPERUSER = "postgres"


class ClusterError(RuntimeError):
    """The local PostgreSQL servers could not be started or reached."""


def find_pg_bin() -> Path:
    """The newest PostgreSQL server binaries on this machine (PG_BIN overrides)."""
    if os.environ.get("PG_BIN"):
        path = Path(os.environ["PG_BIN"])
        if not (path / "initdb").exists():
            raise ClusterError(f"PG_BIN={path} has no initdb")
        return path
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not candidates:
        found = shutil.which("initdb")
        if found:
            return Path(found).parent
        raise ClusterError(
            "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and PATH);"
            " install PostgreSQL 15+ server packages or set PG_BIN"
        )
    return Path(candidates[-1]).parent


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_user_ids() -> tuple[int, int]:
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def _own(path: Path) -> None:
    """As root, hand a folder to the postgres user and make its ancestors traversable."""
    if not _as_root():
        return
    uid, gid = _pg_user_ids()
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
    # The postgres user must be able to reach the folder (search permission only): a clone
    # in a `mktemp -d` folder is 0700 root-owned.
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


@dataclass(frozen=True)
class Server:
    name: str
    data_dir: Path
    port: int
    socket_dir: Path

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    def running_port(self) -> int | None:
        """The port the server's postmaster listens on (4th line of postmaster.pid), if any."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection:
        """A superuser connection over the Unix socket (local administration only)."""
        return psycopg.connect(self.admin_conninfo(dbname), autocommit=autocommit)


class LocalCluster:
    """A primary and its streaming replica under one folder."""

    def __init__(self, base_dir: Path, primary_port: int, replica_port: int):
        self.base_dir = Path(base_dir).resolve()
        self.bin = find_pg_bin()
        socket_dir = self.base_dir / "run"
        self.primary = Server("primary", self.base_dir / "primary", primary_port, socket_dir)
        self.replica = Server("replica", self.base_dir / "replica", replica_port, socket_dir)

    # -- running binaries -------------------------------------------------------------
    def _run(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / binary), *args]
        if _as_root():
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{binary} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    # -- lifecycle ----------------------------------------------------------------------
    def is_initialized(self, server: Server) -> bool:
        return (server.data_dir / "PG_VERSION").exists()

    def is_running(self, server: Server) -> bool:
        if not self.is_initialized(server):
            return False
        return self._run("pg_ctl", "status", "-D", str(server.data_dir), check=False).returncode == 0

    def init_primary(self) -> None:
        """initdb, replication-ready configuration and authentication."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.primary.socket_dir.mkdir(parents=True, exist_ok=True)
        _own(self.base_dir)
        self._run(
            "initdb", "-D", str(self.primary.data_dir), "-U", SUPERUSER,
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
        )
        conf = self.primary.data_dir / "postgresql.conf"
        self._append(conf, self._server_conf(self.primary) + [
            "wal_level = replica",
            "max_wal_senders = 10",
            "wal_keep_size = '2GB'",
            "max_wal_size = '4GB'",
            "checkpoint_timeout = '15min'",
            "shared_buffers = '256MB'",
            "maintenance_work_mem = '512MB'",
            "work_mem = '32MB'",
            "synchronous_commit = off",
        ])
        hba = self.primary.data_dir / "pg_hba.conf"
        # Local socket: the superuser administers without a password. TCP: passwords only,
        # except streaming replication from this machine.
        hba_text = (
            "local   all          all                    trust\n"
            "host    replication  all    127.0.0.1/32    trust\n"
            "host    all          all    127.0.0.1/32    scram-sha-256\n"
        )
        self._write(hba, hba_text)

    def _server_conf(self, server: Server) -> list[str]:
        return [
            "# --- reporting platform local environment ---",
            "listen_addresses = '127.0.0.1'",
            f"port = {server.port}",
            f"unix_socket_directories = '{server.socket_dir}'",
            "max_connections = 100",
            "hot_standby = on",
            # Long federated reads on the replica must not be cancelled by the primary's
            # vacuum: the standby reports its oldest snapshot back instead.
            "hot_standby_feedback = on",
            "max_standby_streaming_delay = '5min'",
            "logging_collector = off",
            "log_min_messages = warning",
        ]

    def _append(self, path: Path, lines: list[str]) -> None:
        text = path.read_text() + "\n" + "\n".join(lines) + "\n"
        self._write(path, text)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if _as_root():
            uid, gid = _pg_user_ids()
            os.chown(path, uid, gid)

    def create_replica(self) -> None:
        """A hot standby made with pg_basebackup (-R writes the streaming configuration)."""
        if self.replica.data_dir.exists():
            shutil.rmtree(self.replica.data_dir)
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", SUPERUSER,
            "-D", str(self.replica.data_dir), "-R", "-X", "stream", "-c", "fast",
        )
        self._append(self.replica.data_dir / "postgresql.conf", self._server_conf(self.replica))

    def start(self, server: Server) -> None:
        if self.is_running(server):
            return
        # A stale pid file (after a machine restart) would stop pg_ctl; postgres itself
        # checks whether that pid is alive, so only remove it when the server is down.
        self._run(
            "pg_ctl", "start", "-D", str(server.data_dir), "-l", str(server.log_file),
            "-w", "-t", "120",
        )

    def stop(self, server: Server, mode: str = "fast") -> None:
        if self.is_running(server):
            self._run("pg_ctl", "stop", "-D", str(server.data_dir), "-m", mode, "-w", "-t", "120")

    def up(self) -> list[str]:
        """Initialise what is missing and start both servers. Returns what was done."""
        done: list[str] = []
        self.check_ports()
        if not self.is_initialized(self.primary):
            self.init_primary()
            done.append("initialised primary")
        if not self.is_running(self.primary):
            self.start(self.primary)
            done.append(f"started primary on 127.0.0.1:{self.primary.port}")
        if not self.is_initialized(self.replica):
            self.create_replica()
            done.append("created replica with pg_basebackup")
        if not self.is_running(self.replica):
            self.start(self.replica)
            done.append(f"started replica on 127.0.0.1:{self.replica.port}")
        self.wait_ready(self.replica)
        return done

    def check_ports(self) -> None:
        """A server already running on another port than the one asked for is an error now,
        not a minute of waiting for it on the wrong port."""
        for server, variable in ((self.primary, "PRIMARY_PORT"), (self.replica, "REPLICA_PORT")):
            port = server.running_port() if self.is_running(server) else None
            if port is not None and port != server.port:
                raise ClusterError(
                    f"the {server.name} under {self.base_dir} runs on 127.0.0.1:{port}, not on {variable}="
                    f"{server.port}: unset {variable} (the ports `make up` chose are in platform.env) "
                    f"or stop the servers first (`make down`)")

    def down(self) -> list[str]:
        done = []
        for server in (self.replica, self.primary):
            if self.is_running(server):
                self.stop(server)
                done.append(f"stopped {server.name}")
        return done

    def wait_ready(self, server: Server, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with server.connect() as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.2)
        raise ClusterError(f"{server.name} on port {server.port} not ready after {timeout}s: {last}")

    # -- replication ----------------------------------------------------------------------
    def primary_lsn(self) -> str:
        # The insert position: with synchronous_commit = off a commit returns before its WAL
        # is written, so pg_current_wal_lsn() could still be behind what was just committed.
        with self.primary.connect() as conn:
            return conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]

    def wait_for_replay(self, timeout: float = 120) -> float:
        """Wait until the replica has replayed the primary's current WAL position.

        Returns the seconds waited. Raises ClusterError on timeout.
        """
        target = self.primary_lsn()
        started = time.monotonic()
        with self.replica.connect() as conn:
            while True:
                caught_up = conn.execute(
                    "select pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()[0]
                if caught_up:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise ClusterError(
                        f"replica did not replay {target} within {timeout}s"
                    )
                time.sleep(0.05)

    def pause_replay(self) -> None:
        """Stop applying WAL on the replica (it keeps receiving it): replay lag grows."""
        with self.replica.connect() as conn:
            conn.execute("select pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        with self.replica.connect() as conn:
            conn.execute("select pg_wal_replay_resume()")

    def replay_lag_seconds(self) -> float:
        """Seconds since the last replayed transaction while WAL is waiting; 0 when caught up."""
        with self.replica.connect() as conn:
            return float(conn.execute(
                "select case when pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0"
                " else coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0) end::float8"
            ).fetchone()[0])

    def restart(self, server: Server) -> float:
        """Start a stopped server and wait until it accepts connections; returns the seconds taken."""
        started = time.monotonic()
        self.start(server)
        self.wait_ready(server)
        return time.monotonic() - started

    def status(self) -> dict:
        """Both servers' state and the replica's replay lag in bytes and seconds."""
        result: dict = {}
        for server in (self.primary, self.replica):
            running = self.is_running(server)
            result[server.name] = {
                "port": server.port,
                "running_port": server.running_port() if running else None,
                "data_dir": str(server.data_dir),
                "initialized": self.is_initialized(server),
                "running": running,
            }
        if result["primary"]["running"] and result["replica"]["running"]:
            self.check_ports()
            target = self.primary_lsn()
            with self.replica.connect() as conn:
                row = conn.execute(
                    """
                    select pg_is_in_recovery(),
                           pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())::bigint,
                           case when pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
                                then 0
                                else extract(epoch from now() - pg_last_xact_replay_timestamp())
                           end::float8
                    """,
                    (target,),
                ).fetchone()
            result["replica"].update(
                in_recovery=row[0], replay_lag_bytes=max(int(row[1]), 0),
                replay_lag_seconds=round(float(row[2] or 0), 3),
            )
        return result
