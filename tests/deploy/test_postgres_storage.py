"""The platform runs on an instance whose storage is PostgreSQL (dagster-postgres), as in prod.

The instance's storage is deploy/dagster.yaml's own `storage:` block (every connection value
from the DAGSTER_PG_* variables) pointed at a database of its own on the session's
PostgreSQL primary, reached over TCP with a password like RDS. Only `sslmode` differs: the
local server has no TLS. The platform's definitions (PLATFORM_ENV=local: DuckDB warehouse,
the session's replica as the federated source) run in process on that instance: the
observation job, and a dbt materialization of marts/dim_date (no upstream, so it builds on
an empty DuckDB; dagster-dbt runs its tests as asset checks). A second, independent
instance object built from the same config then reads back the runs, their events, the
materialization, observations, asset records and check results; and the storage tables are
in that database, not in the application's.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dagster as dg
import psycopg
import pytest
import yaml
from dagster import DagsterRunStatus, RunsFilter
from psycopg import sql

from platform_assets.assembly import Platform, build_platform
from platform_assets.settings import load_settings

from ..platform.conftest import platform_environ

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
STORAGE_DB = "dagster_storage"
STORAGE_ROLE = STORAGE_DB  # the role owning it has the same name
DIM_DATE = dg.AssetKey(["marts", "dim_date"])
# dagster-postgres' run, event log and schedule storages share one database.
STORAGE_TABLES = {
    "alembic_version", "runs", "run_tags", "event_logs", "asset_keys", "secondary_indexes",
    "jobs", "job_ticks", "instance_info", "daemon_heartbeats", "kvs",
}


def instance_yaml() -> dict:
    """deploy/dagster.yaml's storage block as it is, but TLS off (the local primary has none)."""
    storage = yaml.safe_load(DAGSTER_YAML.read_text())["storage"]
    storage["postgres"]["postgres_db"]["params"] = {"sslmode": "disable"}
    return {"storage": storage, "telemetry": {"enabled": False}}


@dataclass
class Persisted:
    """What the writing instance did; the reader must see the same."""

    platform: Platform
    home: Path
    environ: dict[str, str]
    observe_run_id: str
    observed_versions: dict[dg.AssetKey, str]
    dbt_run_id: str
    dim_date_storage_id: int


@contextmanager
def own_database(pg_env, name: str) -> Iterator[dict[str, str]]:
    """A login role and a database it owns on the primary (the DAGSTER_PG_* values to reach
    it over TCP with its password); both dropped at the end."""
    password = secrets.token_hex(16)

    def drop(admin):
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))

    with pg_env.cluster.primary.connect() as admin:
        drop(admin)
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
    try:
        yield {
            "DAGSTER_PG_USERNAME": name,
            "DAGSTER_PG_PASSWORD": password,
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(pg_env.settings.primary_port),
            "DAGSTER_PG_DB": name,
        }
    finally:
        with pg_env.cluster.primary.connect() as admin:
            drop(admin)


@pytest.fixture(scope="module")
def storage_database(pg_env) -> Iterator[dict[str, str]]:
    with own_database(pg_env, STORAGE_DB) as env:
        yield env


@pytest.fixture(scope="module")
def persisted(pg_env, storage_database, tmp_path_factory) -> Iterator[Persisted]:
    folder = tmp_path_factory.mktemp("pg-storage")
    home = folder / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml()))
    environ = {
        **platform_environ(pg_env, folder, "local"),
        **storage_database,
        # dagster-dbt runs a subset (dim_date alone) with dbt's default *eager* indirect
        # selection, which also runs the relationships test that fct_daily_learning_activity
        # declares towards dim_date; on a fresh warehouse that table does not exist and the
        # run fails. `cautious` keeps to tests whose parents are all selected. (Reported as a
        # platform issue; this test is about the storage.)
        "DBT_INDIRECT_SELECTION": "cautious",
    }
    with mock.patch.dict(os.environ, environ):
        platform = build_platform(load_settings())
        writer = dg.DagsterInstance.from_config(str(home))
        try:
            observe = platform.defs.resolve_job_def("observe_federated_sources").execute_in_process(
                instance=writer
            )
            assert observe.success
            observed = {
                e.asset_key: e.event_specific_data.asset_observation.data_version
                for e in observe.get_asset_observation_events()
            }
            dbt_run = platform.defs.resolve_job_def("unpartitioned_models").execute_in_process(
                instance=writer, asset_selection=[DIM_DATE]
            )
            assert dbt_run.success
            assert [e.asset_key for e in dbt_run.get_asset_materialization_events()] == [DIM_DATE]
            record = writer.fetch_materializations(DIM_DATE, limit=1).records[0]
            assert record.run_id == dbt_run.run_id
        finally:
            writer.dispose()
        yield Persisted(
            platform=platform, home=home, environ=dict(os.environ),
            observe_run_id=observe.run_id, observed_versions=observed,
            dbt_run_id=dbt_run.run_id, dim_date_storage_id=record.storage_id,
        )


@pytest.fixture
def reader(persisted) -> Iterator[dg.DagsterInstance]:
    """A second instance object from the same dagster.yaml and environment."""
    with mock.patch.dict(os.environ, persisted.environ):
        instance = dg.DagsterInstance.from_config(str(persisted.home))
        try:
            yield instance
        finally:
            instance.dispose()


def test_prod_storage_block_stores_events(pg_env, tmp_path):
    """deploy/dagster.yaml's storage block as it is (only TLS off) must store a run's events.

    With SQLAlchemy 2.1 (constraints.txt) a bare `postgresql://` URL selects the psycopg 3
    driver, on which dagster-postgres' `NOTIFY run_events, :notify_id` after every stored
    event is a syntax error: every run would fail in prod. The block names psycopg2.
    """

    @dg.asset
    def probe() -> int:
        return 1

    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml()))
    with own_database(pg_env, "dagster_storage_prod_block") as env, mock.patch.dict(os.environ, env):
        instance = dg.DagsterInstance.from_config(str(tmp_path))
        try:
            result = dg.materialize([probe], instance=instance, raise_on_error=False)
            assert result.success
            assert instance.get_latest_materialization_event(probe.key).run_id == result.run_id
        finally:
            instance.dispose()


def test_prod_storage_stores_a_partition_ranges_events_as_batches(pg_env, tmp_path, monkeypatch):
    """With DAGSTER_EVENT_BATCH_SIZE as the image sets it, a single-run backfill's planned events and
    materializations reach dagster-postgres as batches (its store_event_batch): every
    partition stored, the asset's latest the range's last."""
    days = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_date="2026-02-01")

    @dg.asset(partitions_def=days, backfill_policy=dg.BackfillPolicy.single_run())
    def ranged(context) -> None:
        return None

    dockerfile = (Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile").read_text()
    batch_size = re.search(r"DAGSTER_EVENT_BATCH_SIZE=(\d+)", dockerfile)
    assert batch_size, "deploy/Dockerfile sets DAGSTER_EVENT_BATCH_SIZE"
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", batch_size[1])
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml()))
    with own_database(pg_env, "dagster_storage_batches") as env, mock.patch.dict(os.environ, env):
        instance = dg.DagsterInstance.from_config(str(tmp_path))
        try:
            with mock.patch.object(type(instance.event_log_storage), "store_event_batch", autospec=True,
                                   side_effect=type(instance.event_log_storage).store_event_batch) as batches:
                result = dg.materialize([ranged], instance=instance, tags={
                    "dagster/asset_partition_range_start": "2026-01-01",
                    "dagster/asset_partition_range_end": "2026-01-31"})
            assert result.success
            assert batches.call_count >= 2  # the planned events, the materializations
            assert len(instance.get_materialized_partitions(ranged.key)) == 31
            latest = instance.get_latest_materialization_event(ranged.key)
            assert latest.run_id == result.run_id and latest.dagster_event.partition == "2026-01-31"
        finally:
            instance.dispose()


def test_the_instance_uses_dagster_postgres(reader):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    assert isinstance(reader.run_storage, PostgresRunStorage)
    assert isinstance(reader.event_log_storage, PostgresEventLogStorage)
    assert isinstance(reader.schedule_storage, PostgresScheduleStorage)


def test_runs_read_back(reader, persisted):
    records = reader.get_run_records(RunsFilter(run_ids=[persisted.observe_run_id, persisted.dbt_run_id]))
    by_id = {r.dagster_run.run_id: r.dagster_run for r in records}
    assert set(by_id) == {persisted.observe_run_id, persisted.dbt_run_id}
    assert all(run.status == DagsterRunStatus.SUCCESS for run in by_id.values())
    assert by_id[persisted.observe_run_id].job_name == "observe_federated_sources"
    dbt_run = by_id[persisted.dbt_run_id]
    assert dbt_run.job_name == "unpartitioned_models"
    assert dbt_run.asset_selection == {DIM_DATE}
    # The run's full event stream: started, the step, the materialization, success.
    types = {e.dagster_event_type for e in reader.all_logs(persisted.dbt_run_id) if e.is_dagster_event}
    assert {dg.DagsterEventType.RUN_START, dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.RUN_SUCCESS} <= types


def test_materialization_reads_back(reader, persisted):
    latest = reader.get_latest_materialization_event(DIM_DATE)
    assert latest is not None
    assert latest.run_id == persisted.dbt_run_id
    (record,) = reader.fetch_materializations(DIM_DATE, limit=10).records
    assert record.storage_id == persisted.dim_date_storage_id
    materialization = record.asset_materialization
    assert materialization.asset_key == DIM_DATE
    # The platform's metadata (DuckDB table schema and row count) persisted with it.
    assert "dagster/row_count" in materialization.metadata
    assert materialization.metadata["dagster/row_count"].value > 0
    assert "dagster/column_schema" in materialization.metadata


def test_observations_read_back(reader, persisted):
    keys = [t.key for t in persisted.platform.federated_tables]
    assert set(persisted.observed_versions) == set(keys)
    for key in keys:
        (record,) = reader.fetch_observations(key, limit=10).records
        assert record.run_id == persisted.observe_run_id
        assert record.asset_observation.data_version == persisted.observed_versions[key]
        latest = reader.get_latest_data_version_record(key, is_source=True)
        assert latest.storage_id == record.storage_id


def test_asset_records_and_keys_read_back(reader, persisted):
    source_keys = {t.key for t in persisted.platform.federated_tables}
    assert {DIM_DATE, *source_keys} <= set(reader.get_asset_keys())
    (dim_date,) = reader.get_asset_records([DIM_DATE])
    assert dim_date.asset_entry.last_materialization.run_id == persisted.dbt_run_id
    assert dim_date.asset_entry.last_run_id == persisted.dbt_run_id
    sources = reader.get_asset_records(list(source_keys))
    assert {r.asset_entry.asset_key for r in sources} == source_keys
    for record in sources:
        assert record.asset_entry.last_materialization is None
        # OSS SQL storages do not keep the last observation on the asset record (Dagster+ does).
        if reader.event_log_storage.asset_records_have_last_observation:
            assert record.asset_entry.last_observation.run_id == persisted.observe_run_id


def test_dbt_tests_of_dim_date_read_back_as_check_results(reader, persisted):
    graph = persisted.platform.defs.resolve_asset_graph()
    checks = [k for k in graph.asset_check_keys if k.asset_key == DIM_DATE]
    assert checks, "dim_date's dbt tests are asset checks"
    latest = reader.event_log_storage.get_latest_asset_check_execution_by_key(checks)
    for key in checks:
        record = latest.get(key)
        assert record is not None, key
        assert record.run_id == persisted.dbt_run_id
        assert record.status.value == "SUCCEEDED"
        assert record.event.dagster_event.event_specific_data.passed


def test_storage_tables_live_in_their_own_database(pg_env, persisted, storage_database):
    with pg_env.cluster.primary.connect(STORAGE_DB) as conn:
        public = conn.execute("select tablename, tableowner from pg_tables where schemaname = 'public'").fetchall()
        tables = {name for name, _owner in public}
        owners = {owner for _name, owner in public}
        runs = conn.execute(
            "select count(*) from runs where run_id = any(%s)",
            [[persisted.observe_run_id, persisted.dbt_run_id]],
        ).fetchone()[0]
        events = conn.execute("select count(*) from event_logs where run_id = %s", [persisted.dbt_run_id]).fetchone()[0]
    missing = STORAGE_TABLES - tables
    assert not missing, f"not in {STORAGE_DB}: {sorted(missing)}"
    assert owners == {STORAGE_ROLE}
    assert runs == 2
    assert events > 0
    # ...and none of them in the application's database.
    app_db = psycopg.conninfo.conninfo_to_dict(pg_env.values["PRIMARY_URL"])["dbname"]
    with pg_env.cluster.primary.connect(app_db) as conn:
        leaked = {row[0] for row in conn.execute("select tablename from pg_tables")} & STORAGE_TABLES
    assert not leaked, leaked
