"""A dbt process killed with SIGKILL in the middle of a table build leaves no mart partial or
missing (every mart and reporting view has the state of the last good run), and the next
run succeeds. On both engines, on the tests/dbt scenario's warehouses.

Through Dagster (a live `dagster dev` on the local instance config): a materialization whose
process group is killed with SIGKILL is failed and gives its `warehouse` slot back within the
bound the README documents, and the next materialization completes; a terminated run leaves
no dbt process behind.

"In the middle" is made certain rather than hoped for: the test holds a lock that the
build's `create table ... __dbt_tmp as select` has to wait for (on PostgreSQL a lock on the
mart the model reads; on DuckDB a lock on the replica's table that the model reads through
the federation, taken on the primary and replayed on the standby), sees the statement
waiting, kills dbt, then releases the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import psutil
import psycopg
import pytest
from dagster_graphql import DagsterGraphQLClient

from platform_assets.run_health import RUN_HEALTH_INTERVAL_SECONDS

from ..dbt.dbt_cli import DBT, PROJECT_DIR
from .conftest import catch_up
from .live_dagster import LiveDagster, instance_config, live_dagster
from .warehouse_readers import duckdb_states, relation_states, warehouse_url


def _wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def _start_dbt(runner, *args: str) -> subprocess.Popen:
    cmd = [
        str(DBT), *args,
        "--project-dir", str(PROJECT_DIR), "--profiles-dir", str(PROJECT_DIR),
        "--target", runner.target,
        "--target-path", str(runner.work_dir / "target"),
        "--log-path", str(runner.work_dir / "logs"),
    ]
    return subprocess.Popen(cmd, env={**runner.env, "PYTHONUNBUFFERED": "1"}, cwd=runner.work_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill(proc: subprocess.Popen) -> int:
    os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30)


def _waiting_statements(conn, pattern: str) -> list[tuple[int, str]]:
    return conn.execute(
        "select pid, wait_event_type from pg_stat_activity"
        " where query ilike %s and wait_event_type = 'Lock' and pid <> pg_backend_pid()",
        (pattern,),
    ).fetchall()


def test_kill_9_mid_table_build_on_pg(dbt_scenario, pg_env):
    catch_up(dbt_scenario, pg_env, "pg")
    runner = dbt_scenario.runners["pg"]
    db = runner.env["WAREHOUSE_PG_DB"]
    url = warehouse_url(runner.env)
    with psycopg.connect(url, autocommit=True) as conn:
        before = relation_states(conn)
    model = "fct_daily_learning_activity"  # a table, built from marts.fct_lesson_events

    with pg_env.cluster.primary.connect(db) as blocker, pg_env.cluster.primary.connect(db) as watch:
        blocker.execute("begin")
        blocker.execute("lock table marts.fct_lesson_events in access exclusive mode")
        proc = _start_dbt(runner, "run", "--select", model)
        try:
            waited = _wait_for(
                lambda: _waiting_statements(watch, f"%create%table%{model}__dbt_tmp%"),
                timeout=240, what=f"dbt's create table {model}__dbt_tmp",
            )
            (backend, _), = _waiting_statements(watch, f"%create%table%{model}__dbt_tmp%")
            returncode = _kill(proc)
        finally:
            if proc.poll() is None:
                _kill(proc)
            blocker.execute("rollback")
        # The orphaned backend finishes its statement, finds its client gone and rolls back.
        orphan_seconds = _wait_for(
            lambda: not watch.execute("select 1 from pg_stat_activity where pid = %s", (backend,)).fetchone(),
            timeout=120, what="the killed run's backend to end",
        )
        leftovers = watch.execute(
            "select relname from pg_class where relname like '%%\\_\\_dbt\\_%%'").fetchall()

    with psycopg.connect(url, autocommit=True) as conn:
        after_kill = relation_states(conn)
    retry = runner("run", "--select", model, check=False)
    with psycopg.connect(url, autocommit=True) as conn:
        after_retry = relation_states(conn)

    differing = sorted(r for r in before if after_kill.get(r) != before[r])
    print(f"\nkilled run [pg]: dbt killed (exit {returncode}) {waited:.1f}s after start, its "
          f"`create table {model}__dbt_tmp` waiting; orphaned backend gone {orphan_seconds:.1f}s later; "
          f"{len(before)} marts/views compared, {len(differing)} differ, {len(leftovers)} leftovers; "
          f"retry {'ok' if retry.ok else 'FAILED'} in {retry.seconds:.1f}s")
    assert returncode == -signal.SIGKILL
    assert not differing, differing
    assert not leftovers, leftovers
    assert retry.ok, retry.describe()
    assert retry.statuses()[f"model.reporting.{model}"] == "success"
    assert after_retry == before


def _replica_lock_replayed(pg_env) -> bool:
    with pg_env.cluster.replica.connect("saas") as conn:
        return bool(conn.execute(
            "select 1 from pg_locks l join pg_class c on c.oid = l.relation"
            " where c.relname = 'lesson_events' and l.mode = 'AccessExclusiveLock' and l.granted"
        ).fetchone())


def _federated_read_waiting(pg_env) -> bool:
    with pg_env.cluster.replica.connect("saas") as conn:
        return bool(conn.execute(
            "select 1 from pg_stat_activity where usename = 'federation_ro'"
            " and wait_event_type = 'Lock' and query ilike '%%lesson_events%%'"
        ).fetchone())


def test_kill_9_mid_table_build_on_duckdb(dbt_scenario, pg_env):
    catch_up(dbt_scenario, pg_env, "duckdb")
    runner = dbt_scenario.runners["duckdb"]
    path = runner.env["DUCKDB_PATH"]
    before = duckdb_states(path)
    model = "fct_lesson_events"  # full refresh: create table ... __dbt_tmp as select from the replica

    with pg_env.cluster.primary.connect("saas") as blocker:
        blocker.execute("begin")
        # An AccessExclusiveLock is WAL-logged and held on the standby too: federated reads of
        # the table wait. Nothing is written to the operational data.
        blocker.execute("lock table app.lesson_events in access exclusive mode")
        blocker.execute("select pg_switch_wal()")  # ship the lock record now
        proc = None
        try:
            _wait_for(lambda: _replica_lock_replayed(pg_env), timeout=60, what="the lock on the replica")
            proc = _start_dbt(runner, "run", "--full-refresh", "--select", model)
            waited = _wait_for(lambda: _federated_read_waiting(pg_env), timeout=240,
                               what="dbt's read of the replica")
            # The single-writer limit: while dbt holds the file, no other process opens it,
            # not even read-only.
            with pytest.raises(duckdb.IOException, match="lock"):
                duckdb.connect(path, read_only=True)
            returncode = _kill(proc)
        finally:
            if proc is not None and proc.poll() is None:
                _kill(proc)
            blocker.execute("rollback")

    # Recovery: the file opens (the write-ahead log of the killed process is replayed or
    # discarded), every mart and view as the last good run left it.
    after_kill = duckdb_states(path)
    retry = runner("run", "--full-refresh", "--select", model, check=False)
    after_retry = duckdb_states(path)
    differing = sorted(r for r in before if after_kill.get(r) != before[r])
    print(f"\nkilled run [duckdb]: dbt killed (exit {returncode}) {waited:.1f}s after start, reading the "
          f"replica for `create table {model}__dbt_tmp`; a read-only open meanwhile: lock error; file reopened, "
          f"{len(before)} marts/views compared, {len(differing)} differ; retry "
          f"{'ok' if retry.ok else 'FAILED'} in {retry.seconds:.1f}s")
    assert returncode == -signal.SIGKILL
    assert not differing, differing
    assert set(after_kill) == set(before), "no relation missing, none left over"
    assert retry.ok, retry.describe()
    assert after_retry == before


# -- through Dagster -------------------------------------------------------------------------
# Two staging views over the replica: their dbt tests read app.courses (no mart is needed for
# dbt's default, eager, test selection to pass, as it would for a mart).
SELECTION = ("staging/stg_app__courses", "staging/stg_app__lessons")
# Short intervals for a fast test; the README's bound is computed from the same three numbers.
MONITORING = {"poll_interval_seconds": 2, "free_slots_after_run_end_seconds": 2}
# What the daemon adds to the configured intervals: a sensor tick is evaluated in the code
# server, and the monitoring daemon's loop, on a loaded machine.
DAEMON_ALLOWANCE_SECONDS = 60


def documented_bound(monitoring: dict) -> float:
    """README, Troubleshooting: the run_health sensor's interval, then the slot is freed
    `free_slots_after_run_end_seconds` after the failure, at the next monitoring poll."""
    return (RUN_HEALTH_INTERVAL_SECONDS + monitoring["free_slots_after_run_end_seconds"]
            + monitoring["poll_interval_seconds"])


@pytest.fixture(scope="module")
def live(pg_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("live-dagster")
    # dagster-dbt waits DAGSTER_DBT_TERMINATION_TIMEOUT_SECONDS (25) for dbt to answer SIGINT; a
    # dbt blocked on a lock never does, and what follows (stop_dbt) is what these tests check.
    with live_dagster(pg_env, folder, instance_config(**MONITORING),
                      overrides={"DAGSTER_DBT_TERMINATION_TIMEOUT_SECONDS": "5"}) as live:
        first = live.cli("asset", "materialize", "-m", "platform_assets.definitions", "--select", ",".join(SELECTION))
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-4000:]
        yield live



@contextmanager
def replica_reads_of_courses_blocked(pg_env) -> Iterator[None]:
    """Federated reads of app.courses wait while this is open (the lock is taken on the
    primary and replayed on the standby; nothing is written), so a build of marts/dim_courses
    is certain to be in the middle of its dbt command."""
    with pg_env.cluster.primary.connect("saas") as blocker:
        blocker.execute("begin")
        blocker.execute("lock table app.courses in access exclusive mode")
        blocker.execute("select pg_switch_wal()")
        try:
            _wait_for(lambda: _replica_holds_lock(pg_env, "courses"), timeout=60, what="the lock on the replica")
            yield
        finally:
            blocker.execute("rollback")


def _replica_holds_lock(pg_env, table: str) -> bool:
    with pg_env.cluster.replica.connect("saas") as conn:
        return bool(conn.execute(
            "select 1 from pg_locks l join pg_class c on c.oid = l.relation"
            " where c.relname = %s and l.mode = 'AccessExclusiveLock' and l.granted", (table,)
        ).fetchone())


def _courses_read_waiting(pg_env) -> bool:
    with pg_env.cluster.replica.connect("saas") as conn:
        return bool(conn.execute(
            "select 1 from pg_stat_activity where usename = 'federation_ro'"
            " and wait_event_type = 'Lock' and query ilike '%%courses%%'"
        ).fetchone())


def _dbt_processes(run_id: str) -> list[psutil.Process]:
    """The live dbt processes of a run: dagster-dbt hands each its own target folder, named
    after the run (dbt_command.run_target_path), in DBT_TARGET_PATH."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if not any(Path(part).name == "dbt" for part in (proc.info["cmdline"] or [])[:2]):
                continue
            if f"-{run_id[:7]}-" in proc.environ().get("DBT_TARGET_PATH", "") \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _status(live: LiveDagster, run_id: str) -> dg.DagsterRunStatus | None:
    with live.instance() as instance:
        run = instance.get_run_by_id(run_id)
        return run.status if run else None


def test_sigkilled_materialization_is_failed_and_frees_the_warehouse(live: LiveDagster, pg_env):
    with live.instance() as instance:
        before = {r.dagster_run.run_id for r in instance.get_run_records()}
    with replica_reads_of_courses_blocked(pg_env):
        cli = live.cli("asset", "materialize", "-m", "platform_assets.definitions", "--select", ",".join(SELECTION))
        try:
            _wait_for(lambda: _courses_read_waiting(pg_env), timeout=240, what="dbt's read of app.courses")
            with live.instance() as instance:
                (run_id,) = {r.dagster_run.run_id for r in instance.get_run_records()} - before
            assert _status(live, run_id) == dg.DagsterRunStatus.STARTED
            assert [s["runId"] for s in live.claimed_slots("warehouse")] == [run_id]
            dbt = _dbt_processes(run_id)
            assert dbt, "dbt runs in the run's process group"
        finally:
            os.killpg(cli.pid, signal.SIGKILL)  # the CLI (which runs the step) and dbt
            cli.wait(timeout=30)
    # SIGKILLed with its group; on a busy machine its exit may take a moment
    _wait_for(lambda: not _dbt_processes(run_id), timeout=30, what=f"run {run_id}'s dbt gone")

    bound = documented_bound(MONITORING)
    waited = _wait_for(
        lambda: _status(live, run_id) == dg.DagsterRunStatus.FAILURE
        and run_id not in {s["runId"] for s in live.claimed_slots("warehouse")},
        timeout=bound + DAEMON_ALLOWANCE_SECONDS,
        what=f"run {run_id} FAILURE with its warehouse slot freed (bound {bound}s)",
    )

    again = live.cli("asset", "materialize", "-m", "platform_assets.definitions", "--select", ",".join(SELECTION))
    out, _ = again.communicate(timeout=600)
    print(f"\nkilled run through Dagster: FAILURE and slot freed {waited:.1f}s after SIGKILL "
          f"(bound {bound}s + daemon allowance); the next materialization exited {again.returncode}")
    assert again.returncode == 0, out[-4000:]
    assert not live.claimed_slots("warehouse")


def test_terminated_run_leaves_no_dbt_process(live: LiveDagster, pg_env):
    client = DagsterGraphQLClient("127.0.0.1", port_number=live.port)
    with replica_reads_of_courses_blocked(pg_env):
        run_id = client.submit_job_execution(
            "unpartitioned_models", repository_location_name="platform_assets",
            asset_selection=[dg.AssetKey.from_user_string(name) for name in SELECTION],
        )
        _wait_for(lambda: _courses_read_waiting(pg_env) and _dbt_processes(run_id), timeout=240,
                  what="the launched run's dbt reading app.courses")
        dbt_pids = [p.pid for p in _dbt_processes(run_id)]
        client.terminate_run(run_id)
        # Still blocked: dbt must stop although its query cannot finish.
        _wait_for(lambda: _status(live, run_id) in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE),
                  timeout=live.config["run_monitoring"]["cancel_timeout_seconds"] + 60,
                  what=f"run {run_id} to end after termination")
        survivors = _dbt_processes(run_id)
    print(f"\nterminated run: status {_status(live, run_id).value}, dbt pids {dbt_pids}, survivors {survivors}")
    assert _status(live, run_id) == dg.DagsterRunStatus.CANCELED
    assert not survivors, survivors
    _wait_for(lambda: not live.claimed_slots("warehouse"),
              timeout=documented_bound(MONITORING) + DAEMON_ALLOWANCE_SECONDS,
              what="the terminated run's warehouse slot to be freed")
