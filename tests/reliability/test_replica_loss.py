"""Replica loss: the replica stops while a run reads it. The run fails with one message naming
the replica (host:port, REPLICA_URL) and the sources the failing model reads; the mart keeps
its last good data (same checksum); once the replica is back, a retry succeeds and brings the
change the failed run could not.

To stop the replica *during* the read, deterministically: an ACCESS EXCLUSIVE lock taken on
the primary is replayed by the hot standby, so the mart's read of app.courses on the replica
waits; the test stops the replica as soon as it sees that read waiting.
"""

from __future__ import annotations

import threading
import time

import psycopg

from ..platform.conftest import platform_under_test
from .faults import duckdb_table, failure_messages, run_assets

MART = "marts.dim_courses"


def _replica_has_lock(cluster) -> bool:
    # The lock's WAL record sits in a partly filled page until something flushes it: a
    # synchronous commit on the primary does.
    with cluster.primary.connect() as conn:
        conn.execute("set synchronous_commit = on")
        conn.execute("select txid_current()")
    with cluster.replica.connect("saas") as conn:
        return conn.execute(
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation"
            " join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'app' and c.relname = 'courses' and l.mode = 'AccessExclusiveLock' and l.granted"
        ).fetchone()[0] > 0


def _federation_reads_waiting(cluster) -> int:
    with cluster.replica.connect() as conn:
        return conn.execute(
            "select count(*) from pg_stat_activity where usename = 'federation_ro' and wait_event_type = 'Lock'"
        ).fetchone()[0]


def _wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def test_replica_loss_fails_clearly_keeps_marts_and_retry_succeeds(pg_env, tmp_path):
    cluster = pg_env.cluster
    replica_port = pg_env.settings.replica_port
    with platform_under_test(pg_env, tmp_path, "local") as put:
        path = put.environ["DUCKDB_PATH"]
        first = run_assets(put)
        assert first.success, failure_messages(first)
        good = duckdb_table(path, MART)
        assert good and good[0] > 0

        # A change on the primary that the failed run must not half-apply and the retry must bring.
        with pg_env.primary() as conn:
            course_id, title = conn.execute(
                "select course_id, title from app.courses order by course_id limit 1").fetchone()
            conn.execute("update app.courses set title = title || ' (v2)', updated_at = now() where course_id = %s",
                         (course_id,))
        try:
            pg_env.wait_for_replay()
            locker = psycopg.connect(pg_env.values["PRIMARY_URL"])
            stopped: dict[str, float] = {}
            try:
                locker.execute("lock table app.courses in access exclusive mode")
                lock_seen = _wait_for(lambda: _replica_has_lock(cluster), 30, "the lock to reach the replica")

                def stop_when_read_waits() -> None:
                    try:
                        stopped["waited"] = _wait_for(lambda: _federation_reads_waiting(cluster) > 0, 120,
                                                      "dbt's read of app.courses on the replica")
                        cluster.stop(cluster.replica, mode="fast")
                        stopped["at"] = time.monotonic()
                    finally:
                        locker.rollback()

                controller = threading.Thread(target=stop_when_read_waits, daemon=True)
                started = time.monotonic()
                controller.start()
                failed = run_assets(put)
                ended = time.monotonic()
                controller.join(timeout=150)
            finally:
                locker.close()
                restart = cluster.restart(cluster.replica) if not cluster.is_running(cluster.replica) else 0.0
                catch_up = pg_env.wait_for_replay()

            assert "at" in stopped, "the replica was not stopped during the run"
            assert not failed.success
            messages = failure_messages(failed)
            print(f"\nreplica loss: lock reached the replica in {lock_seen:.2f}s; dbt's read waited after "
                  f"{stopped['waited']:.1f}s; run failed {ended - stopped['at']:.1f}s after the replica stopped "
                  f"(run took {ended - started:.1f}s); replica back in {restart:.1f}s, caught up in {catch_up:.2f}s")
            print("failure message: " + " | ".join(messages))
            assert len(messages) == 1
            message = messages[0]
            assert f"127.0.0.1:{replica_port}" in message and "REPLICA_URL" in message
            assert "federated/courses" in message and "dim_courses" in message
            assert "Traceback" not in message
            assert pg_env.values["REPLICA_PASSWORD"] not in message

            # The mart keeps its last good data.
            kept = duckdb_table(path, MART)
            print(f"{MART}: {good[0]} rows, checksum before {good[1][:12]}, after the failed run {kept[1][:12]}")
            assert kept == good

            retry = run_assets(put)
            assert retry.success, failure_messages(retry)
            fresh = duckdb_table(path, MART)
            print(f"retry succeeded: {fresh[0]} rows, checksum {fresh[1][:12]} (the change arrived)")
            assert fresh[0] == good[0] and fresh[1] != good[1]
        finally:
            with pg_env.primary() as conn:
                conn.execute("update app.courses set title = %s, updated_at = now() where course_id = %s",
                             (title, course_id))
            pg_env.wait_for_replay()
