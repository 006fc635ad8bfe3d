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

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DagsterDbtTranslatorSettings, DbtCliResource, DbtProject, dbt_assets
from dagster_dbt.errors import DagsterDbtCliRuntimeError

from .automation import automation_for
from .dbt_project import PARSE_STATE, keep_parse_state, parse_state_path, prune_run_folders, run_target_path
from .preflight import explain_dbt_failure, redact
from .resources import ReplicaResource, WarehouseResource, quoted, run_preflight, sql_literal
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


def layer_of(props: Mapping[str, Any]) -> str:
    """staging / intermediate / marts / reporting / snapshots, from the dbt folder."""
    if props["resource_type"] == "snapshot":
        return "snapshots"
    fqn = props.get("fqn", [])
    return fqn[1] if len(fqn) > 2 else "models"


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


# -- one dbt command ------------------------------------------------------------------------
def _dbt(context: dg.AssetExecutionContext, dbt: DbtCliResource, project: DbtProject, args: list[str],
         replica: ReplicaResource, warehouse: WarehouseResource) -> Iterator:
    """One dbt command in its own run folder, after the preflight (nothing is created when a
    setting is wrong); fails the step when dbt succeeded without building an asset it selected."""
    run_preflight(replica, warehouse)
    target = run_target_path(project, context)
    invocation = dbt.cli(args, context=context, target_path=target)
    built: set[dg.AssetKey] = set()
    events = _stream(invocation, context, warehouse)
    if context.assets_def.partitions_def is not None:
        events = _partition_row_counts(events, invocation, context, warehouse)
    try:
        for event in _explain_replica_failure(events, invocation, context, replica):
            if isinstance(event, dg.Output):
                built.add(context.asset_key_for_output(event.output_name))
            elif isinstance(event, dg.AssetMaterialization):
                built.add(event.asset_key)
            yield event
    finally:
        stop_dbt(invocation.process, context.log)
        keep_command_state(project, target, context.log)
    missing = sorted(set(context.selected_asset_keys) - built, key=lambda key: key.to_user_string())
    if missing:
        message = unbuilt_message(missing, target)
        context.log.error(message)
        raise dg.Failure(description=message)
    try:
        prune_run_folders(target.parent)
    except OSError as exc:  # housekeeping: never fails a run that succeeded
        context.log.warning(f"could not remove old dbt run folders under {target.parent}: {exc}")


def keep_command_state(project: DbtProject, target: Path, log) -> None:
    """The parse state this command wrote (dbt writes it once parsing is done, whatever the
    build's outcome) becomes its profile's (dbt_project.py): the next command starts from it
    instead of parsing the whole project again. A state dbt cannot read costs one full parse."""
    kept, written = parse_state_path(project), target / PARSE_STATE
    if not written.exists():
        return
    try:
        keep_parse_state(kept, written)
    except OSError as exc:  # housekeeping: the next command parses in full, nothing else
        log.warning(f"could not keep dbt's parse state {written} as {kept}: {exc}")


def stop_dbt(process: subprocess.Popen, log, grace_seconds: float = 10) -> None:
    """No dbt outlives its step. On termination dagster-dbt sends dbt SIGINT and waits 25 s
    (DAGSTER_DBT_TERMINATION_TIMEOUT_SECONDS); a dbt whose statement waits on a lock does not
    answer it and would go on, writing the warehouse after its run was canceled. SIGTERM, then
    SIGKILL: each model's swap is one transaction, so a killed dbt leaves the last good state."""
    if process.poll() is not None:
        return
    log.warning(f"dbt (pid {process.pid}) still running after its step ended: stopping it")
    process.terminate()
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_seconds)


def unbuilt_message(missing: list[dg.AssetKey], target: Path) -> str:
    """Why a dbt command that succeeded is still a failed step: assets it was asked for were
    not built. dagster-dbt only logs that an op "did not yield expected outputs", and the run
    would be successful with stale tables (seen when dbt's partial parsing dropped a snapshot)."""
    try:
        ran = json.loads((target / "manifest.json").read_text())
        in_manifest = {(layer_of(node), node["name"]) for node in ran.get("nodes", {}).values()
                       if node.get("resource_type") in ("model", "snapshot")}
    except (OSError, ValueError):
        in_manifest = None
    names = ", ".join(key.to_user_string() for key in missing)
    if in_manifest is None:
        why = "dbt wrote no manifest.json"
    elif absent := [key for key in missing if tuple(key.path) not in in_manifest]:
        why = f"{', '.join(k.to_user_string() for k in absent)} not in the manifest dbt parsed for this command"
    else:
        why = "dbt did not select or run them"
    return f"dbt finished without building {names}: {why}. dbt's files: {target}"


def _explain_replica_failure(events: Iterator, invocation, context: dg.AssetExecutionContext,
                             replica: ReplicaResource) -> Iterator:
    """A dbt failure while the replica is unreachable becomes one Failure naming the replica
    (host:port, REPLICA_URL) and the sources the failing models read, not a dbt traceback."""
    try:
        yield from events
    except DagsterDbtCliRuntimeError as exc:
        try:
            run_results = invocation.get_artifact("run_results.json")
        except Exception:  # dbt died before writing it
            run_results = None
        selected = [
            uid for uid, node in invocation.manifest.get("nodes", {}).items()
            if node.get("resource_type") in ("model", "snapshot")
            and dg.AssetKey([layer_of(node), node["name"]]) in context.selected_asset_keys
        ]
        settings = PlatformSettings(env=replica.env, values=replica.values())
        message = explain_dbt_failure(settings, invocation.manifest, run_results, selected)
        if message is None:
            raise
        context.log.error(message)
        raise dg.Failure(description=message, metadata={"dbt_error": redact(str(exc))[:2000]}) from None


def _stream(invocation, context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> Iterator:
    """dbt events as Dagster events, with row counts and column metadata.

    On PostgreSQL and Redshift dagster-dbt's fetchers query the warehouse while dbt runs. A
    DuckDB file has one writer, so there the metadata is read after dbt has exited.
    """
    if warehouse.engine != "duckdb":
        yield from invocation.stream().fetch_row_counts().fetch_column_metadata()
        return
    # dbt exits non-zero when a test fails: what it did build and test is still yielded first.
    events, error = [], None
    try:
        for event in invocation.stream():
            events.append(event)
    except DagsterDbtCliRuntimeError as exc:
        error = exc
    relations = {
        dg.AssetKey([layer_of(node), node["name"]]): (node["schema"], node.get("alias") or node["name"])
        for node in invocation.manifest["nodes"].values()
        if node["resource_type"] in ("model", "snapshot") and node.get("config", {}).get("materialized") != "ephemeral"
    }
    keys = [context.asset_key_for_output(e.output_name) if isinstance(e, dg.Output)
            else e.asset_key if isinstance(e, dg.AssetMaterialization) else None for e in events]
    metadata = warehouse.duckdb_table_metadata({k: relations[k] for k in keys if k in relations})
    for event, key in zip(events, keys, strict=True):
        if isinstance(event, dg.Output | dg.AssetMaterialization) and key in metadata:
            event = event.with_metadata({**event.metadata, **metadata[key]})
        yield event
    if error is not None:
        raise error


def _partition_row_counts(events: Iterator, invocation, context: dg.AssetExecutionContext,
                          warehouse: WarehouseResource) -> Iterator:
    """Each day's own `dagster/row_count` on a daily fact's materializations. One output covers
    the run's whole range and counts the whole table; the partition-scoped metadata added here
    (one grouped count over the range, by the model's meta `partition_day_column`) takes
    precedence for each day."""
    if not has_partitions(context):
        yield from events
        return
    nodes = {dg.AssetKey([layer_of(n), n["name"]]): n for n in invocation.manifest["nodes"].values()
             if n["resource_type"] == "model"}
    window = context.partition_time_window
    days = context.partition_keys
    for event in events:
        key = context.asset_key_for_output(event.output_name) if isinstance(event, dg.Output) else None
        node = nodes.get(key)
        column = (((node or {}).get("config") or {}).get("meta") or {}).get("partition_day_column")
        if node is not None and column:
            table = quoted(node["schema"], node.get("alias") or node["name"])
            try:
                rows = warehouse.fetch(
                    f"select cast({quoted(column)} as date), count(*) from {table}"
                    f" where {quoted(column)} >= {sql_literal(window.start.strftime('%Y-%m-%d'))}"
                    f" and {quoted(column)} < {sql_literal(window.end.strftime('%Y-%m-%d'))} group by 1")
            except Exception as exc:  # noqa: BLE001 - metadata: never fails a build that succeeded
                context.log.warning(f"per-day row counts of {key.to_user_string()} not recorded: {exc}")
                yield event
                continue
            counts = {str(day)[:10]: int(n) for day, n in rows}
            for day in days:
                context.add_asset_metadata({"dagster/row_count": dg.MetadataValue.int(counts.get(day, 0))},
                                           asset_key=key, partition_key=day)
        yield event


def has_partitions(context: dg.AssetExecutionContext) -> bool:
    """A run of one partition (tag dagster/partition: the UI, a job backfill's run per day)
    or of a range (the range tags: single-run backfills, the changes sensor)."""
    return context.has_partition_key or context.has_partition_key_range


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


def build_dbt_assets(project: DbtProject, settings: PlatformSettings,
                     lag_checks: dg.AssetSelection | None = None) -> list[dg.AssetsDefinition]:
    manifest = attach_source_tests(json.loads(project.manifest_path.read_text()))
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
        yield from _dbt(context, dbt, project, args, replica, warehouse)

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
        yield from _dbt(context, dbt, project, build_args("build", window, indirect_selection=None,
                                                           full_refresh=full_refresh), replica, warehouse)

    return [dbt_models, dbt_daily_facts]
