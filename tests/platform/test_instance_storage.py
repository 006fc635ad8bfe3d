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


def range_tags(first: str, last: str) -> dict[str, str]:
    """A single-run backfill of the partitions first..last."""
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


def local_and_plain_instances(tmp_path: Path) -> list[tuple[str, dg.DagsterInstance]]:
    """The local instance (DAGSTER_HOME, the repository's dagster.yaml) and one on Dagster's
    own SQLite storage, to compare what each stores."""
    plain_home = tmp_path / "plain"
    plain_home.mkdir()
    (plain_home / "dagster.yaml").write_text(f"storage:\n  sqlite:\n    base_dir: {plain_home}\n")
    return [("local", dg.DagsterInstance.get()), ("plain", dg.DagsterInstance.from_config(str(plain_home)))]


@pytest.mark.parametrize("batch_size", ["0", "1000"])
def test_planned_checks_of_a_partition_range_are_the_rows_dagster_writes(home, tmp_path, monkeypatch, batch_size):
    """The planned checks of a single-run backfill are stored once per partition (the event
    serialised once here, once per row in Dagster's storage): the same rows as Dagster's own
    SQLite storage writes for the same run, with Dagster's event batches (the platform's
    setting) and without."""
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", batch_size)
    from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable
    from dagster._core.storage.sqlalchemy_compat import db_select
    from dagster._serdes import deserialize_value

    tags = range_tags("2026-01-01", "2026-02-28")
    rows = {}
    for name, instance in local_and_plain_instances(tmp_path):
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
        tags = range_tags("2026-01-01", "2026-01-31")
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


def test_a_partition_ranges_materializations_are_stored_as_one_batch_with_dagsters_rows(home, tmp_path,
                                                                                        monkeypatch):
    """With DAGSTER_EVENT_BATCH_SIZE (set by the platform's settings) Dagster hands the event
    log each asset's materializations of a range as one batch: stored in one transaction per
    database, and what is stored is what Dagster's own SQLite storage stores event by event."""
    from dagster._core.storage.event_log.schema import AssetEventTagsTable, AssetKeyTable
    from dagster._core.storage.sqlalchemy_compat import db_select

    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "1000")
    tags = range_tags("2026-01-01", "2026-01-20")
    stored = {}
    for name, instance in local_and_plain_instances(tmp_path):
        with instance:
            storage = instance.event_log_storage
            with mock.patch.object(type(storage), "store_event_batch", autospec=True,
                                   side_effect=type(storage).store_event_batch) as batches:
                result = dg.materialize([daily_counted], instance=instance, tags=tags)
            assert result.success
            sizes = sorted(len(call.args[1]) for call in batches.call_args_list
                           if call.args[1][0].dagster_event_type == dg.DagsterEventType.ASSET_MATERIALIZATION)
            assert sizes == [20], sizes  # one batch: the asset's 20 partitions
            if name == "local":
                batch = [e for e in instance.all_logs(result.run_id)
                         if e.dagster_event_type == dg.DagsterEventType.ASSET_MATERIALIZATION]
            key = dg.AssetKey("daily_counted")
            records = instance.fetch_materializations(key, limit=100).records
            latest = instance.get_latest_materialization_event(key)
            entry = instance.get_asset_records([key])[0].asset_entry
            with storage.index_connection() as conn:
                tag_rows = conn.execute(db_select([AssetEventTagsTable.c.key, AssetEventTagsTable.c.value])).fetchall()
                key_rows = conn.execute(db_select([AssetKeyTable.c.asset_key])).fetchall()
            stored[name] = {
                "partitions": sorted(instance.get_materialized_partitions(key)),
                "records": sorted((r.partition_key, r.run_id == result.run_id) for r in records),
                "latest_partition": latest.dagster_event.partition,
                "run_events": sorted(e.dagster_event_type.value for e in instance.all_logs(result.run_id)
                                     if e.is_dagster_event),
                # a data version is derived from the run id (the default code version)
                "tags": sorted((k, "<run>" if v == result.run_id or k == "dagster/data_version" else v)
                               for k, v in tag_rows),
                "asset_keys": sorted(r[0] for r in key_rows),
                "status": instance.get_status_by_partition(key, ["2026-01-05", "2026-01-25"], DAYS),
                "entry": (entry.last_run_id == result.run_id,
                          entry.last_materialization_record.event_log_entry.dagster_event.partition,
                          instance.get_latest_planned_materialization_info(key).run_id == result.run_id),
            }
    assert stored["local"]["partitions"] == [f"2026-01-{d:02d}" for d in range(1, 21)]
    assert stored["local"] == stored["plain"]
    # The batch is one transaction on the run's database and one on the index.
    storage = LocalSqliteEventLogStorage(str(tmp_path / "events"))
    try:
        with mock.patch.object(storage, "_connect", wraps=storage._connect) as connects:
            storage.store_event_batch(batch)
        assert connects.call_count == 2 and len(batch) == 20
        assert len(storage.get_materialized_partitions(dg.AssetKey("daily_counted"))) == 20
    finally:
        storage.dispose()
