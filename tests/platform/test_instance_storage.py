"""The local instance's SQLite storage (dagster.yaml -> platform_assets.instance_storage).

Real instances on real files: the repository's dagster.yaml in a temp DAGSTER_HOME, runs
executed by Dagster, and a second process on the same home while the first one keeps its
connections open (as the webserver, the daemon and run workers do).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest

import platform_assets.instance_storage as storage_module
from platform_assets.instance_storage import (
    MAX_CACHED_RUN_ENGINES,
    LocalSqliteEventLogStorage,
    LocalSqliteRunStorage,
    StorageSettingError,
)
from platform_assets.settings import REPO_ROOT


@dg.asset
def counted() -> int:
    return 1


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with mock.patch.dict(os.environ, {"DAGSTER_HOME": str(home)}):
        yield home


def other_process(home: Path, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "DAGSTER_HOME": str(home)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_local_instance_uses_it_in_the_default_layout(home):
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.event_log_storage, LocalSqliteEventLogStorage)
        assert isinstance(instance.run_storage, LocalSqliteRunStorage)
        result = dg.materialize([counted], instance=instance)
        assert result.success
        run_id = result.run_id
        with instance.event_log_storage.index_connection() as conn:
            assert conn.exec_driver_sql("pragma synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("pragma journal_mode").scalar() == "wal"
    # Where `storage: sqlite` keeps them: an existing local instance keeps its history.
    assert (home / "history" / "runs.db").exists()
    assert (home / "history" / "runs" / "index.db").exists()
    assert (home / "history" / "runs" / f"{run_id}.db").exists()


def test_a_second_process_reads_and_writes_while_the_first_keeps_its_connections(home):
    with dg.DagsterInstance.get() as instance:
        first = dg.materialize([counted], instance=instance).run_id
        out = other_process(home, """
            import dagster as dg
            with dg.DagsterInstance.get() as instance:
                runs = instance.get_runs()
                print(len(runs), runs[0].run_id, runs[0].status.value)
                event = instance.get_latest_materialization_event(dg.AssetKey("counted"))
                print(event.run_id)
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key="written_elsewhere", metadata={"n": 7}))
        """).split()
        assert out == ["1", first, "SUCCESS", first]
        # The first process sees the other's write, and goes on writing.
        seen = instance.get_latest_materialization_event(dg.AssetKey("written_elsewhere"))
        assert seen.asset_materialization.metadata["n"].value == 7
        second = dg.materialize([counted], instance=instance).run_id
        assert instance.get_latest_materialization_event(dg.AssetKey("counted")).run_id == second
        assert len(instance.get_runs()) == 2


def test_wipe_leaves_no_connection_on_a_removed_file(home):
    with dg.DagsterInstance.get() as instance:
        run_id = dg.materialize([counted], instance=instance).run_id
        assert instance.all_logs(run_id)
        instance.wipe()
        assert not (home / "history" / "runs" / f"{run_id}.db").exists()
        # A connection kept on the removed file would still return the wiped run's events.
        assert instance.all_logs(run_id) == []
        assert instance.get_latest_materialization_event(dg.AssetKey("counted")) is None
        again = dg.materialize([counted], instance=instance).run_id
        assert instance.get_latest_materialization_event(dg.AssetKey("counted")).run_id == again


def test_engines_kept_are_bounded(home):
    storage = LocalSqliteEventLogStorage(str(home / "events"))
    try:
        for i in range(MAX_CACHED_RUN_ENGINES + 10):
            with storage.run_connection(f"run-{i}") as conn:
                conn.exec_driver_sql("select 1")
        kept = list(storage._engines)
        assert len(kept) == MAX_CACHED_RUN_ENGINES + 1
        assert "index" in kept and f"run-{MAX_CACHED_RUN_ENGINES + 9}" in kept and "run-0" not in kept
        # An evicted database is opened again when used.
        with storage.run_connection("run-0") as conn:
            assert conn.exec_driver_sql("select 1").scalar() == 1
    finally:
        storage.dispose()


def test_without_dagster_home_or_base_dir_the_error_names_them(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    for cls in (LocalSqliteEventLogStorage, LocalSqliteRunStorage):
        with pytest.raises(StorageSettingError, match="DAGSTER_HOME.*base_dir"):
            cls.from_config_value(None, {})


DAYS = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_date="2026-03-01")


@dg.asset(partitions_def=DAYS, backfill_policy=dg.BackfillPolicy.single_run(),
          check_specs=[dg.AssetCheckSpec("positive", asset="daily_counted"),
                       dg.AssetCheckSpec("not_empty", asset="daily_counted")])
def daily_counted(context):
    yield dg.MaterializeResult(metadata={"days": len(context.partition_keys)})
    yield dg.AssetCheckResult(check_name="positive", passed=True)
    yield dg.AssetCheckResult(check_name="not_empty", passed=True)


def test_planned_checks_of_a_partition_range_are_the_rows_dagster_writes(home, tmp_path):
    """The planned checks of a single-run backfill are stored once per partition (the event
    serialised once here, once per row in Dagster's storage): the same rows as Dagster's own
    SQLite storage writes for the same run."""
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable
    from dagster._core.storage.sqlalchemy_compat import db_select
    from dagster._serdes import deserialize_value

    plain_home = tmp_path / "plain"
    plain_home.mkdir()
    (plain_home / "dagster.yaml").write_text(f"storage:\n  sqlite:\n    base_dir: {plain_home}\n")
    tags = {"dagster/asset_partition_range_start": "2026-01-01",
            "dagster/asset_partition_range_end": "2026-02-28"}
    rows = {}
    for name, instance in (("local", dg.DagsterInstance.get()),
                           ("plain", dg.DagsterInstance.from_config(str(plain_home)))):
        with instance:
            if name == "local":
                assert isinstance(instance.event_log_storage, LocalSqliteEventLogStorage)
            with mock.patch.object(storage_module, "serialize_value",
                                   wraps=storage_module.serialize_value) as serialized:
                result = dg.materialize([daily_counted], instance=instance, tags=tags)
            assert result.success
            # here: once per planned check, not once per partition
            assert serialized.call_count == (2 if name == "local" else 0)
            table = AssetCheckExecutionsTable
            with instance.event_log_storage.index_connection() as conn:
                found = conn.execute(db_select([
                    table.c.asset_key, table.c.check_name, table.c.partition, table.c.run_id,
                    table.c.execution_status, table.c.evaluation_event])).fetchall()
            rows[name] = sorted(
                (r.check_name, r.partition or "", r.execution_status,
                 type(deserialize_value(r.evaluation_event).dagster_event.event_specific_data).__name__)
                for r in found
            )
            assert {r.run_id for r in found} == {result.run_id}
    print(f"\n{len(rows['local'])} check rows; e.g. {rows['local'][:2]}")
    planned = [r for r in rows["local"] if r[3] == "AssetCheckEvaluationPlanned"]
    assert len(planned) == 2 * 59  # two checks, 59 days
    assert rows["local"] == rows["plain"]


def test_table_checks_use_the_kept_engine_and_remember_only_tables_found(home):
    """Dagster's SQLite event log builds a new engine for each `has_table`, asked before nearly
    every asset event; here none is built while runs store their events, and the answers are
    Dagster's own."""
    from dagster._core.storage.event_log.sqlite import sqlite_event_log

    plain = sqlite_event_log.SqliteEventLogStorage(str(home / "history" / "runs"))
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        tags = {"dagster/asset_partition_range_start": "2026-01-01",
                "dagster/asset_partition_range_end": "2026-01-31"}
        with mock.patch.object(sqlite_event_log, "create_engine", wraps=sqlite_event_log.create_engine) as built:
            assert dg.materialize([daily_counted], instance=instance, tags=tags).success
            assert dg.materialize([counted], instance=instance).success
        assert built.call_count == 0
        assert {"asset_event_tags", "asset_check_executions"} <= storage._tables_found
        for table in ("asset_event_tags", "asset_check_executions", "dynamic_partitions", "no_such_table"):
            assert storage.has_table(table) == plain.has_table(table), table
        assert "no_such_table" not in storage._tables_found
        # What the runs stored is there: 31 partitions materialized, their check rows.
        assert len(instance.get_materialized_partitions(dg.AssetKey("daily_counted"))) == 31
        instance.wipe()
        assert not storage._tables_found
    plain.dispose()
