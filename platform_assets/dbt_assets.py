"""dbt models, snapshots and tests as Dagster assets and checks.

Three asset sets, split by selector (STYLE.md):
- the unpartitioned models (staging views, dimensions, tables, reporting views);
- the daily-partitioned incremental facts: a run (one day or a whole backfill range, single
  run) hands its partition window to dbt (PLATFORM_WINDOW_START/_END in the environment of
  the dbt process: the same window as the `window_start`/`window_end` vars, without
  throwing dbt's parse state away), so any range is one dbt invocation and one statement
  per model;
- the snapshots (SCD2 history).
All three write the warehouse, so they share the `warehouse` pool (one at a time locally:
a DuckDB file has a single writer).
"""


import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)
from dagster_dbt.errors import DagsterDbtCliRuntimeError

from .automation import automation_for
from .dbt_project import (
    keep_partial_parse,
    parse_state_candidates,
    prune_run_folders,
    run_target_path,
    seed_partial_parse,
)
from .preflight import current_settings, explain_dbt_failure, preflight, redact
from .settings import ConfigurationError, PlatformSettings

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
    # customer exports (platform_assets/exports.py): the engine does the work, the run waits
    "exports": {"ecs/cpu": "512", "ecs/memory": "2048"},
}


def layer_of(props: Mapping[str, Any]) -> str:
    """staging / intermediate / marts / reporting / snapshots, from the dbt folder."""
    if props["resource_type"] == "snapshot":
        return "snapshots"
    fqn = props.get("fqn", [])
    return fqn[1] if len(fqn) > 2 else "models"


def window_vars(start: datetime, end: datetime) -> dict[str, str]:
    """dbt vars for a partition window (end exclusive), as `dbt ... --vars` takes them."""
    return {"window_start": start.strftime("%Y-%m-%d %H:%M:%S"), "window_end": end.strftime("%Y-%m-%d %H:%M:%S")}


def window_env(start: datetime, end: datetime) -> dict[str, str]:
    """The same window as environment variables of the dbt process (macros/incremental.sql).

    dbt discards its whole parse state when --vars differ from the last invocation's, so a
    window in --vars meant a full parse of the project on every partition run (seconds);
    a changed environment variable re-parses only the models that read it."""
    vars_ = window_vars(start, end)
    return {"PLATFORM_WINDOW_START": vars_["window_start"], "PLATFORM_WINDOW_END": vars_["window_end"]}


_ENVIRON_LOCK = threading.RLock()  # re-entrant: a block may start runs that start dbt


@contextmanager
def dbt_process_environment(extra: Mapping[str, str] | None) -> Iterator[None]:
    """os.environ plus `extra` for a block: around dagster-dbt starting a dbt process (it hands
    the process a copy of os.environ), or around runs whose dbt processes all need it. The
    previous values are back at the end of the block."""
    if not extra:
        yield
        return
    with _ENVIRON_LOCK:
        saved = {name: os.environ.get(name) for name in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


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

    def __init__(self, engine: str, source_tests_as_checks: bool = True,
                 lag_checks: dg.AssetSelection | None = None):
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


# -- metadata after a run ---------------------------------------------------------------------
def _dbt(dbt: DbtCliResource, project: DbtProject, args: list[str], context: dg.AssetExecutionContext,
         settings: PlatformSettings, env: Mapping[str, str] | None = None):
    """One dbt invocation in a run folder seeded with a warm parse state (dbt_project.py),
    with `env` added to the dbt process's environment."""
    now = _preflight(context, settings)  # before anything is created, even the run folder
    target = run_target_path(project, context.op_execution_context.op.name, context.run.run_id)
    # The only environment a set adds is the daily facts' window: such a run keeps its own
    # parse state (see partial_parse_cache), first seeded from the profile's plain one.
    cache, candidates = parse_state_candidates(project, now, windowed=bool(env))
    seeded = seed_partial_parse(target, *candidates)
    with dbt_process_environment(env):
        invocation = dbt.cli(args, context=context, target_path=target)
    built: set[dg.AssetKey] = set()
    for event in _explain_replica_failure(_stream(invocation, context, settings), invocation, context, settings):
        if isinstance(event, dg.Output):
            built.add(context.asset_key_for_output(event.output_name))
        elif isinstance(event, dg.AssetMaterialization):
            built.add(event.asset_key)
        yield event
    missing = sorted(set(context.selected_asset_keys) - built, key=lambda key: key.to_user_string())
    if missing:
        # The state this command started from is suspect: the next one must not start from it
        # (nor from what this one saved).
        for state in {cache, seeded} - {None}:
            state.unlink(missing_ok=True)
        message = unbuilt_message(missing, target)
        context.log.error(message)
        raise dg.Failure(description=message)
    keep_partial_parse(target, cache)
    try:
        prune_run_folders(target.parent)
    except OSError as exc:  # housekeeping: never fails a run that succeeded
        context.log.warning(f"could not remove old dbt run folders under {target.parent}: {exc}")


def unbuilt_message(missing: list[dg.AssetKey], target: Path) -> str:
    """Why a dbt command that succeeded is still a failed step: assets it was asked for were
    not built. dagster-dbt only logs that an op "did not yield expected outputs", and the run
    would be successful with stale tables. Seen here when dbt-core's partial parsing dropped
    a snapshot from the manifest it ran (see dbt_project.parse_state_candidates)."""
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
        why = (f"{', '.join(k.to_user_string() for k in absent)} not in the manifest dbt parsed for this "
               "command (the parse state it started from was incomplete; it is discarded, so the "
               "next run does not start from it)")
    else:
        why = "dbt did not select or run them"
    return f"dbt finished without building {names}: {why}. dbt's files: {target}"


def _preflight(context: dg.AssetExecutionContext, settings: PlatformSettings) -> PlatformSettings:
    """Bad configuration fails here, before dbt starts: one message naming the setting, and
    nothing created (no DuckDB file, no schema). See preflight.py. Returns the settings as
    the dbt process will see them."""
    try:
        now = current_settings(settings)
        preflight(now)
    except ConfigurationError as exc:
        raise dg.Failure(description=f"preflight: {exc}", allow_retries=False) from None
    return now


def _explain_replica_failure(events: Iterator, invocation, context: dg.AssetExecutionContext,
                             settings: PlatformSettings) -> Iterator:
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
        message = explain_dbt_failure(current_settings(settings), invocation.manifest, run_results, selected)
        if message is None:
            raise
        context.log.error(message)
        raise dg.Failure(description=message, metadata={"dbt_error": redact(str(exc))[:2000]}) from None


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
    # dbt exits non-zero when a test fails: the events of what it did build and test (the
    # materializations, the check results with their failed row counts) are still yielded,
    # then the error is raised.
    events, error = [], None
    try:
        for event in invocation.stream():
            events.append(event)
    except DagsterDbtCliRuntimeError as exc:
        error = exc
    yield from _with_duckdb_metadata(events, context, invocation.manifest, settings.get("DUCKDB_PATH"))
    if error is not None:
        raise error


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
    # The other sets' translators leave the source tests to the unpartitioned set.
    secondary = PlatformTranslator(engine=settings.engine, source_tests_as_checks=False, lag_checks=lag_checks)
    daily = dg.DailyPartitionsDefinition(start_date=settings.partitions_start, end_offset=1)

    @dbt_assets(
        manifest=manifest,
        project=project,
        name="dbt_models",
        exclude=f"{DAILY_SELECT} {SNAPSHOT_SELECT}",
        dagster_dbt_translator=translator,
        pool=WAREHOUSE_POOL,
        op_tags=SIZING["unpartitioned"],
    )
    def dbt_models(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        yield from _dbt(dbt, project, build_args("build"), context, settings)

    @dbt_assets(
        manifest=manifest,
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
            env = window_env(window.start, window.end)
            context.log.info(f"dbt window [{window.start}, {window.end}) for {context.partition_key_range}: "
                             + ", ".join(f"{k}={v}" for k, v in env.items()))
        else:
            # A run of the checks alone (no asset selected) has no partition: tests only.
            env = None
        yield from _dbt(dbt, project, build_args("build"), context, settings, env=env)

    @dbt_assets(
        manifest=manifest,
        project=project,
        name="dbt_snapshots",
        select=SNAPSHOT_SELECT,
        dagster_dbt_translator=secondary,
        pool=WAREHOUSE_POOL,
        op_tags=SIZING["snapshots"],
    )
    def dbt_snapshots(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        yield from _dbt(dbt, project, build_args("build"), context, settings)

    return [dbt_models, dbt_daily_facts, dbt_snapshots]
