"""dbt models, snapshots and tests as Dagster assets and checks.

Two asset sets, split by selector (STYLE.md): the unpartitioned models with the snapshots
(staging views, dimensions, tables, reporting views, SCD2 history), and the
daily-partitioned incremental facts, whose run (one day or a whole backfill range, single
run) hands its partition window to dbt as dbt's event-time bounds (`--event-time-start`,
`--event-time-end`, read by macros/incremental.sql): any range is one dbt command and one
statement per model, and the bounds leave dbt's parse state valid. Both sets write the
warehouse, so they share the `warehouse` pool (one at a time locally: a DuckDB file has a
single writer).
"""

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DagsterDbtTranslatorSettings, DbtCliResource, DbtProject, dbt_assets

from .automation import automation_for
from .dbt_command import has_partitions, layer_of, run_dbt
from .resources import ReplicaResource, WarehouseResource
from .settings import PlatformSettings

DAILY_SELECT = "tag:daily_partitioned"
WAREHOUSE_POOL = "warehouse"
# A run tag: dbt's indirect selection for the unpartitioned set's tests (default cautious).
INDIRECT_SELECTION_TAG = "platform/dbt_indirect_selection"
# The unpartitioned set runs only the tests whose parents it all builds: a relationship test
# from a daily fact to a dimension runs with the fact (dbt's eager default would run it with
# the dimension, before the fact's days have caught up with a delete, and fail the run).
UNPARTITIONED_INDIRECT_SELECTION = "cautious"
# A run tag: "true" rebuilds the selected models in full (`dbt build --full-refresh`); on the
# daily facts the partition window is then not passed (a full refresh rebuilds every day).
FULL_REFRESH_TAG = "platform/full_refresh"

# Default freshness of a mart when its dbt meta does not say (hours).
DEFAULT_FRESHNESS = {"warn_after_hours": 12, "fail_after_hours": 24}

# ECS sizing of the runs that execute each set. EcsRunLauncher reads *run* tags: these are
# put on the jobs, the automation sensors' runs and the schedules' run requests (op tags
# below only label the steps). Change a set's size here.
SIZING = {
    "unpartitioned": {"ecs/cpu": "1024", "ecs/memory": "4096"},
    "daily": {"ecs/cpu": "2048", "ecs/memory": "8192"},
    # customer exports (platform_assets/exports.py): the engine does the work, the run waits
    "exports": {"ecs/cpu": "512", "ecs/memory": "2048"},
}


def build_args(command: str, window: tuple[datetime, datetime] | None = None,
               indirect_selection: str | None = None, full_refresh: bool = False) -> list[str]:
    """The dbt command line for a set (selection is added by dagster-dbt from the context).

    dbt unit tests check code, not data: they run in CI (tests/dbt), not on every refresh.
    """
    args = [command]
    if command == "build":
        args += ["--exclude-resource-type", "unit_test"]
    if window:
        args += ["--event-time-start", window[0].strftime("%Y-%m-%dT%H:%M:%S"),
                 "--event-time-end", window[1].strftime("%Y-%m-%dT%H:%M:%S")]
    if indirect_selection:
        args += ["--indirect-selection", indirect_selection]
    if full_refresh:
        args += ["--full-refresh"]
    return args


def full_refresh_requested(context: dg.AssetExecutionContext) -> bool:
    value = context.run.tags.get(FULL_REFRESH_TAG)
    if value not in (None, "true", "false"):
        raise dg.Failure(f"run tag {FULL_REFRESH_TAG}={value!r}: use true or false")
    return value == "true"


class PlatformTranslator(DagsterDbtTranslator):
    """Keys, groups, owners, kinds, automation and freshness, from dbt yml `meta`."""

    def __init__(self, engine: str, source_tests_as_checks: bool = True,
                 lag_checks: dg.AssetSelection | None = None, automated: bool = True):
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
        # the replica_lag checks of the federated sources: automation holds refreshes on them
        self.lag_checks = lag_checks
        # False for the daily facts: the daily_facts_changes sensor decides (changes.py)
        self.automated = automated

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
        if props["resource_type"] == "source" or not self.automated:
            return None
        return automation_for(props, self.lag_checks)

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


_SOURCE_CALL = re.compile(r"source\(\s*['\"]([^'\"]+)['\"]\s*,\s*['\"]([^'\"]+)['\"]\s*\)")


def attach_source_tests(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with every generic test on a source attached to that source.

    dbt leaves `attached_node` empty on source tests, and dagster-dbt infers it only when the
    test has a single parent: a source test that also reads another source (`relationships`
    to it, `not_after_soft_delete`) would be no asset check at all, never selected in a
    subset run and invisible in Dagster. The source it is declared on is the `model`
    argument of the test (`source('app', table)`).
    """
    nodes = dict(manifest["nodes"])
    for unique_id, node in manifest["nodes"].items():
        parents = node.get("depends_on", {}).get("nodes", [])
        if node.get("resource_type") != "test" or node.get("attached_node") or len(parents) < 2:
            continue
        match = _SOURCE_CALL.search(str(((node.get("test_metadata") or {}).get("kwargs") or {}).get("model", "")))
        if not match:
            continue
        owner = [p for p in parents if p.startswith("source.") and p.endswith(f".{match[1]}.{match[2]}")]
        if len(owner) == 1:
            nodes[unique_id] = {**node, "attached_node": owner[0]}
    return {**manifest, "nodes": nodes}


def build_dbt_assets(project: DbtProject, manifest: Mapping[str, Any], settings: PlatformSettings,
                     lag_checks: dg.AssetSelection | None = None) -> list[dg.AssetsDefinition]:
    """The two dbt asset sets of `project`, whose parsed `manifest` (manifest_for) is given."""
    manifest = attach_source_tests(manifest)
    translator = PlatformTranslator(engine=settings.engine, lag_checks=lag_checks)
    # The daily set's translator leaves the source tests to the unpartitioned set, and the
    # choice of days to the daily_facts_changes sensor (changes.py).
    secondary = PlatformTranslator(engine=settings.engine, source_tests_as_checks=False, lag_checks=lag_checks,
                                   automated=False)
    daily = dg.DailyPartitionsDefinition(start_date=settings.partitions_start, end_offset=1)

    @dbt_assets(manifest=manifest, project=project, name="dbt_models", exclude=DAILY_SELECT,
                dagster_dbt_translator=translator, pool=WAREHOUSE_POOL, op_tags=SIZING["unpartitioned"])
    def dbt_models(context: dg.AssetExecutionContext, dbt: DbtCliResource, replica: ReplicaResource,
                   warehouse: WarehouseResource):
        args = build_args("build", indirect_selection=context.run.tags.get(INDIRECT_SELECTION_TAG,
                                                                          UNPARTITIONED_INDIRECT_SELECTION),
                          full_refresh=full_refresh_requested(context))
        yield from run_dbt(context, dbt, project, args, replica, warehouse)

    @dbt_assets(manifest=manifest, project=project, name="dbt_daily_facts", select=DAILY_SELECT,
                partitions_def=daily, backfill_policy=dg.BackfillPolicy.single_run(),
                dagster_dbt_translator=secondary, pool=WAREHOUSE_POOL, op_tags=SIZING["daily"])
    def dbt_daily_facts(context: dg.AssetExecutionContext, dbt: DbtCliResource, replica: ReplicaResource,
                        warehouse: WarehouseResource):
        window = None
        full_refresh = full_refresh_requested(context)
        # A run of the checks alone (no asset selected) has no partition: tests only.
        if full_refresh:
            context.log.info("full refresh (run tag): every day rebuilt, whatever the partitions of the run")
        elif has_partitions(context):
            window = (context.partition_time_window.start, context.partition_time_window.end)
            context.log.info(f"dbt window [{window[0]}, {window[1]}) for {context.partition_key_range}")
        yield from run_dbt(context, dbt, project, build_args("build", window, indirect_selection=None,
                                                             full_refresh=full_refresh), replica, warehouse)

    return [dbt_models, dbt_daily_facts]
