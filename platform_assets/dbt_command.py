"""One dbt command of a Dagster step, and what the platform adds around dagster-dbt's.

The preflight first (nothing is created when a setting is wrong); the command in a run folder
of its own, starting from its profile's parse state and leaving its own for the next; row
counts and column metadata (after dbt on DuckDB, whose file has one writer), and each day's
row count on the daily facts; a replica that is down explained as such; no dbt outliving its
step; and a failed step when dbt succeeded without building an asset the step selected.
"""

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource, DbtProject
from dagster_dbt.errors import DagsterDbtCliRuntimeError

from .dbt_project import keep_command_state, start_dbt
from .preflight import explain_dbt_failure, redact
from .resources import ReplicaResource, WarehouseResource, quoted, run_preflight, sql_literal
from .settings import PlatformSettings

# dagster-dbt gives every dbt command a run folder and never removes it (about 3 MB each).
KEPT_RUN_FOLDERS = 50
RUN_FOLDER_MIN_AGE_S = 3600


def layer_of(props: Mapping[str, Any]) -> str:
    """staging / intermediate / marts / reporting / snapshots, from the dbt folder."""
    if props["resource_type"] == "snapshot":
        return "snapshots"
    fqn = props.get("fqn", [])
    return fqn[1] if len(fqn) > 2 else "models"


def run_dbt(context: dg.AssetExecutionContext, dbt: DbtCliResource, project: DbtProject, args: list[str],
            replica: ReplicaResource, warehouse: WarehouseResource) -> Iterator:
    """One dbt command in its own run folder, after the preflight (nothing is created when a
    setting is wrong); fails the step when dbt succeeded without building an asset it selected."""
    run_preflight(replica, warehouse)
    target = run_target_path(project, context)
    invocation = start_dbt(dbt, project, args, target, context)
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
        selected = [node["unique_id"] for key, node in nodes_by_key(invocation.manifest).items()
                    if key in context.selected_asset_keys]
        settings = PlatformSettings(env=replica.env, values=replica.values())
        message = explain_dbt_failure(settings, invocation.manifest, run_results, selected)
        if message is None:
            raise
        context.log.error(message)
        raise dg.Failure(description=message, metadata={"dbt_error": redact(str(exc))[:2000]}) from None


def nodes_by_key(manifest: Mapping[str, Any]) -> dict[dg.AssetKey, dict[str, Any]]:
    """The manifest's models and snapshots by asset key."""
    return {dg.AssetKey([layer_of(node), node["name"]]): node for node in manifest.get("nodes", {}).values()
            if node.get("resource_type") in ("model", "snapshot")}


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
    relations = {key: (node["schema"], node.get("alias") or node["name"])
                 for key, node in nodes_by_key(invocation.manifest).items()
                 if node.get("config", {}).get("materialized") != "ephemeral"}
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
    nodes = nodes_by_key(invocation.manifest)
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


def run_target_path(project: DbtProject, context) -> Path:
    """A fresh folder for one dbt command, under the environment's own `runs/`."""
    name = f"{context.op_execution_context.op.name}-{context.run.run_id[:7]}-{uuid.uuid4().hex[:7]}"
    return Path(project.project_dir) / project.target_path / "runs" / name


def prune_run_folders(runs_dir: Path, keep: int = KEPT_RUN_FOLDERS,
                      min_age_s: float = RUN_FOLDER_MIN_AGE_S) -> list[Path]:
    """Remove the run folders beyond the `keep` most recent, except those used in the last
    `min_age_s` seconds (another process's dbt command may still be writing there)."""
    now = time.time()
    folders = []
    for folder in runs_dir.iterdir() if runs_dir.is_dir() else ():
        try:
            if folder.is_dir():
                log = folder / "dbt.log"
                used = max(folder.stat().st_mtime, log.stat().st_mtime if log.exists() else 0)
                folders.append((used, folder))
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    removed = []
    for used, folder in sorted(folders, reverse=True)[keep:]:
        if now - used >= min_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
