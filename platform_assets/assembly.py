"""Assembles the platform's Definitions for one resolved environment.

Tests build one per engine; `platform_assets/definitions.py` builds the one that
`dagster dev`, the CLI and the code server load.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg
from dagster_dbt import DbtProject

from .automation import automation_sensors, dashboard_automation, observe_schedule, run_failure_alert
from .bi import COPY_KEY, bi_definitions
from .changes import DEFAULT_MAX_GAP_DAYS, DEFAULT_RECENT_DAYS, DailyFacts, changes_sensor, matches_replica_check
from .checks import replica_lag_check_keys
from .dbt_assets import SIZING, WAREHOUSE_POOL, PlatformTranslator, build_dbt_assets
from .dbt_project import dbt_resource, manifest_for, project_for
from .exports import Exports, build_exports
from .exposures import (
    Dashboard,
    dashboard_assets,
    dashboard_refresh_sensor,
    dashboard_specs,
    dashboards_from_manifest,
    superset_resource,
)
from .resources import replica_resource, warehouse_resource
from .run_health import run_health_sensors
from .settings import PlatformSettings
from .sources import FederatedTable, build_federated_sources


@dataclass(frozen=True)
class Platform:
    """The assembled definitions and the parts tests and the demo need by name."""

    defs: dg.Definitions
    settings: PlatformSettings
    project: DbtProject
    manifest: dict
    federated_tables: list[FederatedTable]
    federated_sources: dg.AssetsDefinition
    dbt_models: dg.AssetsDefinition
    dbt_daily_facts: dg.AssetsDefinition
    daily_facts: DailyFacts
    dashboards: list[Dashboard]
    exports: Exports


def build_platform(settings: PlatformSettings) -> Platform:
    dbt_project = project_for(settings)
    manifest = manifest_for(dbt_project, settings)
    federated_sources, federated_tables = build_federated_sources(
        manifest, settings.optional("REPLICA_SCHEMA", "app"), settings.max_replica_lag_seconds
    )
    # Automation holds the refreshes downstream of a source whose replica_lag check failed.
    lag_check_keys = replica_lag_check_keys(t.key for t in federated_tables)
    dbt_models, dbt_daily_facts = build_dbt_assets(
        dbt_project, manifest, settings, lag_checks=dg.AssetSelection.checks(*lag_check_keys)
    )
    source_keys = [t.key for t in federated_tables]
    daily_facts = DailyFacts(
        replica_schema=settings.optional("REPLICA_SCHEMA", "app"),
        fact=relation_of(manifest, "fct_lesson_events"),
        daily=relation_of(manifest, "fct_daily_learning_activity"),
        fact_key=next(k for k in dbt_daily_facts.keys if k.path[-1] == "fct_lesson_events"),
        keys=frozenset(dbt_daily_facts.keys),
        partitions_def=dbt_daily_facts.partitions_def,
        max_gap_days=settings.number("CHANGE_RANGE_MAX_GAP_DAYS", DEFAULT_MAX_GAP_DAYS, minimum=0),
        recent_days=settings.number("CHANGE_RECENT_DAYS", DEFAULT_RECENT_DAYS),
    )
    # The dashboards (dbt exposures) and the customer exports: what reads the marts.
    dashboards = dashboards_from_manifest(manifest, PlatformTranslator(engine=settings.engine))
    exports = build_exports(settings, manifest, pool=WAREHOUSE_POOL, run_tags=SIZING["exports"])
    # With a BI server configured the dashboards are provisioned and warmed by their own runs
    # (locally after the BI copy they read); without one they are external assets.
    superset = superset_resource(settings)
    if superset is None:
        dashboard_defs, dashboard_sensors, bi_resources = dashboard_specs(dashboards), [
            dashboard_refresh_sensor(dashboards)], {}
    else:
        copy = [COPY_KEY] if settings.env == "local" else []
        dashboard_def = dashboard_assets(dashboards, dashboard_automation(), upstream=copy)
        dashboard_defs, bi_resources = [dashboard_def], {"superset": superset}
        # One sensor for the copy and the dashboards: requested in one tick, they run in one
        # run, the dashboards after the copy they read (never warming the previous copy).
        dashboard_sensors = [dg.AutomationConditionSensorDefinition(
            "platform_automation_dashboards", target=dg.AssetSelection.assets(dashboard_def, *copy),
            default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=30,
            description="Declarative automation of the dashboards (and locally the BI copy they read).")]

    observe_job = dg.define_asset_job(
        "observe_federated_sources",
        # Observe, and check the replica's lag; not the dbt source tests on these keys (they run dbt).
        selection=dg.AssetSelection.assets(*source_keys).without_checks() | dg.AssetSelection.checks(*lag_check_keys),
        description="Observe every federated source table (one query against the replica).",
    )
    daily_facts_job = dg.define_asset_job(
        "daily_facts",
        # daily partitions: those of the assets; with the reconciliation check of the fact
        selection=dg.AssetSelection.assets(dbt_daily_facts),
        tags=SIZING["daily"],
        description="The daily-partitioned facts; backfills of any range run as one dbt invocation.",
    )
    dbt_job = dg.define_asset_job(
        "unpartitioned_models",
        selection=dg.AssetSelection.assets(dbt_models),
        tags=SIZING["unpartitioned"],
        description="Every unpartitioned dbt model (and its tests).",
    )

    defs = dg.Definitions(
        assets=[federated_sources, dbt_models, dbt_daily_facts, exports.asset, *dashboard_defs],
        asset_checks=[matches_replica_check(daily_facts)],
        jobs=[observe_job, daily_facts_job, dbt_job, exports.job],
        schedules=[
            observe_schedule(observe_job, settings.observe_cron),
            exports.schedule,
        ],
        sensors=[
            *automation_sensors({"unpartitioned": (dbt_models, SIZING["unpartitioned"])}),
            changes_sensor(daily_facts, daily_facts_job, SIZING["daily"], settings.max_replica_lag_seconds,
                           settings.partitions_start,
                           full_scan_minutes=settings.number("CHANGE_FULL_SCAN_MINUTES", 60, float, minimum=0.1)),
            run_failure_alert,
            exports.sensor,
            *dashboard_sensors,
            *run_health_sensors(settings.env),
        ],
        resources={
            "dbt": dbt_resource(dbt_project),
            # EnvVar: values (passwords among them) are never shown in the UI or stored with a run.
            "replica": replica_resource(settings.env),
            "warehouse": warehouse_resource(settings.env),
            **bi_resources,
        },
        # A run is already a process of its own (a launched run worker, an ECS task): steps in
        # subprocesses would each load this code location again, and the warehouse pool runs
        # the dbt steps one after another anyway.
        executor=dg.in_process_executor,
    )

    # Locally, the BI copy of the warehouse that Superset reads (platform_assets/bi.py).
    defs = dg.Definitions.merge(defs, bi_definitions(settings, own_sensor=superset is None))

    return Platform(
        defs=defs, settings=settings, project=dbt_project, manifest=manifest, federated_tables=federated_tables,
        federated_sources=federated_sources, dbt_models=dbt_models,
        dbt_daily_facts=dbt_daily_facts, daily_facts=daily_facts, dashboards=dashboards, exports=exports,
    )


def relation_of(manifest: dict, model: str) -> tuple[str, str]:
    """(schema, name) of a dbt model in the warehouse."""
    node = next(n for n in manifest["nodes"].values() if n["resource_type"] == "model" and n["name"] == model)
    return node["schema"], node.get("alias") or node["name"]
