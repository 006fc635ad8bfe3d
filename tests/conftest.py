"""Session fixtures shared by every test: a throwaway PostgreSQL primary with a real
streaming replica, on free ports in a temp folder, loaded with a small deterministic
dataset, torn down at the end."""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from localenv.environment import LocalEnvironment, table_checksums
from localenv.settings import LocalSettings
from localenv.simulator import simulate
from xdist.scheduler import LoadScopeScheduling

TEST_EVENTS = 20_000
TEST_SEED = 7
TEST_DAYS = 30


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup). Each worker has
# its own primary + replica (the session fixture below), so a test that stops or pauses the
# replica only affects its own worker. Tests are distributed a file at a time, and files that
# share an expensive session fixture travel together, so nothing is built twice.
SHARED_FIXTURE_GROUPS = {
    # the dbt scenario's warehouses (tests/dbt/conftest.py: shared_scenario)
    "tests/dbt/": "dbt-scenario",
    "tests/reliability/test_zero_downtime.py": "dbt-scenario",
    "tests/reliability/test_killed_run.py": "dbt-scenario",
    # one Dagster webserver (tests/platform/conftest.py: platform_webserver)
    "tests/platform/test_graph.py": "webserver",
    "tests/platform/test_ui_browser.py": "webserver",
    # one Superset + portal (tests/bi/conftest.py: bi_stack); test_portal.py has its own
    # exports-only portal and joins the group only because it lives there
    "tests/bi/": "bi-stack",
}


# The longest units first (measured on 2 cores: 4–6 minutes each, the benchmark 1), so the short
# files fill the gaps at the end. xdist's own order (most tests first) put the single-test
# churn files last, where one worker ran both while the other idled.
LONGEST_FIRST = (
    "bi-stack",
    "tests/platform/test_churn_duckdb.py",
    "tests/platform/test_churn_postgres.py",
    "dbt-scenario",
    "tests/platform/test_pipeline.py",
    "tests/platform/test_readme_commands.py",
    "tests/bench/test_bench.py",
)


def scheduling_group(nodeid: str) -> str:
    """The unit a worker is given: the test's file, or the group of files it shares with."""
    path = nodeid.split("::", 1)[0]
    return next((g for prefix, g in SHARED_FIXTURE_GROUPS.items() if path.startswith(prefix)), path)


class SharedFixtureScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with `scheduling_group` as the scope.

    Not `xdist_group` marks: pytest-xdist 3.8 turns them into groups by appending the group to
    each test's node id, which pytest 9.2's structured node ids ignore (pytest-xdist issue
    1386), so every test was scheduled on its own and both workers built the dbt scenario,
    the pipeline and the webserver.
    """

    def _split_scope(self, nodeid: str) -> str:
        return scheduling_group(nodeid)


def schedule_rank(nodeid: str) -> int:
    group = scheduling_group(nodeid)
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)


# Scratch data (PostgreSQL clusters, Dagster's SQLite instances, DuckDB files, dbt's run
# folders) goes to a RAM-backed tmpfs when the machine has one with room: every one of those
# databases syncs its commits to disk, which on a shared disk is a large part of many steps.
# A container's default /dev/shm (64 MB) is too small and is skipped; a TMPDIR or --basetemp
# given by the caller wins.
MEMORY_TMP = Path("/dev/shm")
MEMORY_TMP_MIN_FREE = 4 * 2**30


def memory_tmpdir(root: Path = MEMORY_TMP, min_free: int = MEMORY_TMP_MIN_FREE) -> Path | None:
    """A folder for the suite's scratch data on `root` if it is a tmpfs with `min_free` bytes free."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        if not any(m.split()[1:3] == [str(root), "tmpfs"] for m in mounts if len(m.split()) > 2):
            return None
        stats = os.statvfs(root)
        if stats.f_bavail * stats.f_frsize < min_free:
            return None
        folder = root / f"reporting-platform-tests-{os.getuid()}"
        folder.mkdir(mode=0o755, exist_ok=True)
        folder.chmod(0o755)  # the postgres OS user reaches its cluster folders below it
        return folder
    except OSError:
        return None


def pytest_configure(config):
    # In the controller, before xdist starts the workers, which inherit TMPDIR.
    if os.environ.get("TMPDIR") or config.option.basetemp:
        return
    if folder := memory_tmpdir():
        os.environ["TMPDIR"] = str(folder)
        tempfile.tempdir = None  # gettempdir() may have cached the disk's /tmp already


@pytest.hookimpl(tryfirst=True)  # before --stepwise and the like pick from the items
def pytest_collection_modifyitems(config, items):
    # A stable sort: within a unit, and among the short ones, the files keep their order.
    items.sort(key=lambda item: schedule_rank(item.nodeid))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        # units in collection order (LONGEST_FIRST), not xdist's count of tests per unit
        config.option.loadscopereorder = False
        return SharedFixtureScheduling(config, log)
    return None


# Ports handed to servers that bind them only later (PostgreSQL after initdb, the webserver
# after loading the code): below the kernel's ephemeral range, from which outgoing connections
# and bind(0) (Dagster's gRPC servers) draw meanwhile, split between the xdist workers, and
# never the same one twice in a process.
def _ports_below_ephemeral() -> range:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 12000))


_handed_out: set[int] = set()
_random = random.Random()  # not the global one, which hypothesis reseeds


def free_port() -> int:
    """A port free now that neither the other worker nor an ephemeral socket is handed."""
    ports = _ports_below_ephemeral()
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) % workers if worker.isdigit() else 0
    size = len(ports) // workers
    mine = ports[index * size:(index + 1) * size]
    for _ in range(500):
        port = _random.choice(mine)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {mine.start}-{mine.stop - 1} after 500 tries")


@dataclass
class PgEnv:
    """The running test environment and the helpers tests use against it."""

    local: LocalEnvironment
    values: dict[str, str]
    initial_checksums: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self):
        return self.local.cluster

    @property
    def settings(self) -> LocalSettings:
        return self.local.settings

    def primary(self) -> psycopg.Connection:
        """The application owner on the primary (what the app writes with)."""
        return psycopg.connect(self.values["PRIMARY_URL"], autocommit=True)

    def replica(self) -> psycopg.Connection:
        """The read-only federation role on the replica (what the platform reads with)."""
        return psycopg.connect(self.values["REPLICA_URL"], autocommit=True)

    def simulate(self, **kwargs) -> dict[str, int]:
        """One simulator batch on the primary, then wait until the replica has it."""
        with self.primary() as conn:
            counts = simulate(conn, **kwargs)
        self.wait_for_replay()
        return counts

    def wait_for_replay(self, timeout: float = 120) -> float:
        return self.cluster.wait_for_replay(timeout=timeout)

    def checksums(self) -> dict[str, str]:
        with self.replica() as conn:
            return table_checksums(conn)

    def environ(self) -> dict[str, str]:
        """os.environ plus the platform settings, for subprocesses (dbt, dagster)."""
        return {**os.environ, **self.values}


@pytest.fixture(scope="session")
def pg_env() -> Iterator[PgEnv]:
    base = Path(tempfile.mkdtemp(prefix="platform-test-"))
    base.chmod(0o755)
    end = datetime.utcnow().replace(minute=0, second=0, microsecond=0)
    settings = LocalSettings(
        local_dir=base, primary_port=free_port(), replica_port=free_port(),
        events=TEST_EVENTS, days=TEST_DAYS, seed=TEST_SEED, end=end,
    )
    local = LocalEnvironment(settings)
    try:
        result = local.up(progress=lambda _msg: None)
        env = PgEnv(local=local, values=result["env"])
        env.initial_checksums = env.checksums()
        yield env
    finally:
        local.cluster.down()
        shutil.rmtree(base, ignore_errors=True)


def reset_moto(endpoint: str) -> None:
    # moto's documented reset endpoint: its backends are per process, not per server.
    request = urllib.request.Request(f"http://{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, response.status


@pytest.fixture
def moto_server() -> Iterator[str]:
    """moto's threaded server on a free port, holding nothing: two servers in one xdist worker
    share moto's state, so without the reset a test sees the buckets and objects of the last."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    try:
        reset_moto(endpoint)
        yield endpoint
    finally:
        try:
            reset_moto(endpoint)
        finally:
            server.stop()
