"""dbt models, snapshots and tests as Dagster assets and checks.

Three asset sets, split by selector (STYLE.md):
- the unpartitioned models (staging views, dimensions, tables, reporting views);
- the daily-partitioned incremental facts: a run (one day or a whole backfill range, single
  run) hands its partition window to dbt as `window_start`/`window_end` vars, so any range is
  one dbt invocation and one statement per model;
- the snapshots (SCD2 history).
All three write the warehouse, so they share the `warehouse` pool (one at a time locally:
a DuckDB file has a single writer).
"""


import json
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from .automation import automation_for
from .settings import PlatformSettings

DAILY_SELECT = "tag:daily_partitioned"
SNAPSHOT_SELECT = "resource_type:snapshot"
WAREHOUSE_POOL = "warehouse"

# Default freshness of a mart when its dbt meta does not say (hours).
DEFAULT_FRESHNESS = {"warn_after_hours": 12, "fail_after_hours": 24}

# ECS sizing of the runs that execute each set. EcsRunLauncher reads *run* tags: these are
# put on the jobs, the automation sensors' runs and the schedules' run requests (op tags
# below only label the steps). Change a set's size here.
SIZING = {
    "unpartitioned": {"ecs/cpu": "1024", "ecs/memory": "4096"},
    "daily": {"ecs/cpu": "2048", "ecs/memory": "8192"},
    "snapshots": {"ecs/cpu": "512", "ecs/memory": "2048"},
}


def layer_of(props: Mapping[str, Any]) -> str:
    """staging / intermediate / marts / reporting / snapshots, from the dbt folder."""
    if props["resource_type"] == "snapshot":
        return "snapshots"
    fqn = props.get("fqn", [])
    return fqn[1] if len(fqn) > 2 else "models"


def window_vars(start: datetime, end: datetime) -> dict[str, str]:
    """dbt vars for a partition window (end exclusive)."""
    return {"window_start": start.strftime("%Y-%m-%d %H:%M:%S"), "window_end": end.strftime("%Y-%m-%d %H:%M:%S")}


def build_args(command: str, vars_: Mapping[str, str] | None = None) -> list[str]:
    """The dbt command line for a set (selection is added by dagster-dbt from the context).

    dbt unit tests check code, not data: they run in CI (tests/dbt), not on every refresh.
    """
    args = [command]
    if command == "build":
        args += ["--exclude-resource-type", "unit_test"]
    if vars_:
        args += ["--vars", json.dumps(dict(vars_), sort_keys=True)]
    return args


class PlatformTranslator(DagsterDbtTranslator):
    """Keys, groups, owners, kinds, automation and freshness, from dbt yml `meta`."""

    def __init__(self, engine: str, source_tests_as_checks: bool = True):
        super().__init__(
            settings=DagsterDbtTranslatorSettings(
                enable_asset_checks=True,
                # Source tests belong to exactly one asset set (the unpartitioned one).
                enable_source_tests_as_checks=source_tests_as_checks,
                enable_code_references=True,
                enable_dbt_views_as_virtual_assets=True,
            )
        )
        self.engine = engine

    def get_asset_key(self, props: Mapping[str, Any]) -> dg.AssetKey:
        if props["resource_type"] == "source":
            return super().get_asset_key(props)  # meta.dagster.asset_key: ["federated", table]
        return dg.AssetKey([layer_of(props), props["name"]])

    def get_group_name(self, props: Mapping[str, Any]) -> str | None:
        if props["resource_type"] == "source":
            return "federated"
        return layer_of(props)

    def get_owners(self, props: Mapping[str, Any]) -> list[str] | None:
        owner = (props.get("meta") or {}).get("owner") or props.get("config", {}).get("meta", {}).get("owner")
        return [owner] if owner else super().get_owners(props)

    def get_tags(self, props: Mapping[str, Any]) -> Mapping[str, str]:
        tags = dict(super().get_tags(props))
        if props["resource_type"] != "source":
            tags["layer"] = layer_of(props)
            tags["materialization"] = props.get("config", {}).get("materialized", "")
        return tags

    def get_automation_condition(self, props: Mapping[str, Any]) -> dg.AutomationCondition | None:
        if props["resource_type"] == "source":
            return None
        return automation_for(props)

    def get_asset_spec(self, manifest, unique_id, project) -> dg.AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        props = self.get_resource_props(manifest, unique_id)
        spec = spec.merge_attributes(kinds={self.engine})
        if props["resource_type"] == "model" and layer_of(props) == "marts":
            spec = spec.replace_attributes(freshness_policy=freshness_policy_for(props))
        return spec


def freshness_meta(props: Mapping[str, Any]) -> dict[str, float]:
    meta = {**(props.get("meta") or {}), **(props.get("config", {}).get("meta") or {})}
    return {**DEFAULT_FRESHNESS, **(meta.get("freshness") or {})}


def freshness_policy_for(props: Mapping[str, Any]) -> dg.FreshnessPolicy:
    f = freshness_meta(props)
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=float(f["fail_after_hours"])),
        warn_window=timedelta(hours=float(f["warn_after_hours"])),
    )


# -- metadata after a run ---------------------------------------------------------------------
def _stream(invocation, context: dg.AssetExecutionContext, settings: PlatformSettings):
    """dbt events as Dagster events, with row counts and column metadata.

    On PostgreSQL and Redshift dagster-dbt's fetchers query the warehouse while dbt runs.
    A DuckDB file has one writer: a second connection from this process while dbt holds it
    fails ("Could not set lock"), so there the metadata is read after dbt has exited, over a
    read-only connection that is closed at once.
    """
    if settings.engine != "duckdb":
        yield from invocation.stream().fetch_row_counts().fetch_column_metadata()
        return
    events = list(invocation.stream())
    yield from _with_duckdb_metadata(events, context, invocation.manifest, settings.get("DUCKDB_PATH"))


def _with_duckdb_metadata(events: list, context, manifest: Mapping[str, Any], path: str) -> Iterator:
    import duckdb

    relations: dict[dg.AssetKey, tuple[str, str]] = {
        dg.AssetKey([layer_of(node), node["name"]]): (node["schema"], node.get("alias") or node["name"])
        for node in manifest["nodes"].values()
        if node["resource_type"] in ("model", "snapshot")
        and node.get("config", {}).get("materialized") != "ephemeral"
    }
    con = duckdb.connect(path, read_only=True)
    try:
        for event in events:
            if isinstance(event, dg.Output):
                key = context.asset_key_for_output(event.output_name)
            else:
                key = getattr(event, "asset_key", None)
            if isinstance(event, dg.Output | dg.AssetMaterialization) and key in relations:
                event = event.with_metadata({**event.metadata, **_duckdb_table_metadata(con, *relations[key])})
            yield event
    finally:
        con.close()


def _duckdb_table_metadata(con, schema: str, name: str) -> dict[str, Any]:
    cols = con.execute(
        "select column_name, data_type from information_schema.columns"
        " where table_schema = ? and table_name = ? order by ordinal_position",
        [schema, name],
    ).fetchall()
    if not cols:
        return {}
    meta: dict[str, Any] = {
        "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c, t) for c, t in cols]),
    }
    kind = con.execute(
        "select table_type from information_schema.tables where table_schema = ? and table_name = ?",
        [schema, name],
    ).fetchone()
    # Views read the replica, which this read-only connection does not attach: count tables only.
    if kind and kind[0] == "BASE TABLE":
        count = con.execute(f'select count(*) from "{schema}"."{name}"').fetchone()[0]
        meta["dagster/row_count"] = dg.MetadataValue.int(int(count))
    return meta


def build_dbt_assets(project: DbtProject, settings: PlatformSettings) -> list[dg.AssetsDefinition]:
    translator = PlatformTranslator(engine=settings.engine)
    # The other sets' translators leave the source tests to the unpartitioned set.
    secondary = PlatformTranslator(engine=settings.engine, source_tests_as_checks=False)
    daily = dg.DailyPartitionsDefinition(start_date=settings.partitions_start, end_offset=1)

    @dbt_assets(
        manifest=project.manifest_path,
        project=project,
        name="dbt_models",
        exclude=f"{DAILY_SELECT} {SNAPSHOT_SELECT}",
        dagster_dbt_translator=translator,
        pool=WAREHOUSE_POOL,
        op_tags=SIZING["unpartitioned"],
    )
    def dbt_models(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        yield from _stream(dbt.cli(build_args("build"), context=context), context, settings)

    @dbt_assets(
        manifest=project.manifest_path,
        project=project,
        name="dbt_daily_facts",
        select=DAILY_SELECT,
        partitions_def=daily,
        backfill_policy=dg.BackfillPolicy.single_run(),
        dagster_dbt_translator=secondary,
        pool=WAREHOUSE_POOL,
        op_tags=SIZING["daily"],
    )
    def dbt_daily_facts(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        if context.has_partition_key_range:
            window = context.partition_time_window
            context.log.info(f"dbt window [{window.start}, {window.end}) for {context.partition_key_range}")
            args = build_args("build", window_vars(window.start, window.end))
        else:
            # A run of the checks alone (no asset selected) has no partition: tests only.
            args = build_args("build")
        yield from _stream(dbt.cli(args, context=context), context, settings)

    @dbt_assets(
        manifest=project.manifest_path,
        project=project,
        name="dbt_snapshots",
        select=SNAPSHOT_SELECT,
        dagster_dbt_translator=secondary,
        pool=WAREHOUSE_POOL,
        op_tags=SIZING["snapshots"],
    )
    def dbt_snapshots(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        yield from _stream(dbt.cli(build_args("build"), context=context), context, settings)

    return [dbt_models, dbt_daily_facts, dbt_snapshots]
