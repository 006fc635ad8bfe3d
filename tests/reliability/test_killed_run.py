"""A dbt process killed with SIGKILL in the middle of a table build leaves no mart partial or
missing (every mart and reporting view has the state of the last good run), and the next
run succeeds. On both engines, on the tests/dbt scenario's warehouses.

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

import duckdb
import psycopg
import pytest

from ..dbt.dbt_cli import DBT, PROJECT_DIR
from .conftest import catch_up
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
