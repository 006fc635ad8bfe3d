"""What decides that an asset refreshes: declarative automation by materialization type,
freshness, the observation cadence of the federated sources, and the failure alert.

- Views are virtual assets (they store nothing): rebuilt when missing or when their SQL
  changed, never because data changed — a view always reads the current data.
- Tables, incrementals and snapshots refresh when data upstream changed. Their conditions
  resolve *through* the views to the nearest stored ancestors (the federated sources or
  other tables), so a new observation of a source reaches the marts without rebuilding
  the staging views in between.
- Marts also refresh when their freshness policy fails (once per PASS→FAIL transition).
- Nothing that stores data refreshes from a lagging replica: while the latest `replica_lag`
  check of a federated source it reads (through the views) failed, the condition's labelled
  part "replica lag within MAX_REPLICA_LAG_SECONDS" is false and the refresh is held; the
  upstream change is remembered (since last handled), so it runs once the lag recovers.
- A change is pending until the asset is *materialized* again, not merely requested: a
  run that fails leaves it pending (retried when an input changes again or the freshness
  policy fails, not every tick), and the sources' data versions change with any row
  change (sources.py), so an edit without an `updated_at` bump is a change too.
- The daily-partitioned facts have no condition here: the `daily_facts_changes` sensor
  (changes.py) requests exactly the days whose contents differ from the replica's, late
  ones of any age included.
"""


import json
import os
import urllib.request
from collections.abc import Mapping
from typing import Any

import dagster as dg

AUTOMATION_SENSOR = "platform_automation"
REPLICA_LAG_GUARD_LABEL = "replica lag within MAX_REPLICA_LAG_SECONDS"


def replica_lag_guard(lag_checks: dg.AssetSelection) -> dg.AutomationCondition:
    """True unless the latest replica_lag check of a federated source upstream failed.

    Sources are reached through the virtual (view) assets in between. A check that never ran
    does not hold anything (a fresh deployment still builds). Unlike
    `all_deps_blocking_checks_passed()` it looks at the lag checks only: the dbt source tests
    (blocking when their severity is error) run inside the dbt build, which a hold on them
    would never let run again.
    """
    lag_failed = dg.AutomationCondition.any_checks_match(dg.AutomationCondition.check_failed()).allow(lag_checks)
    return (~dg.AutomationCondition.any_deps_match(lag_failed).resolve_through_virtual()).with_label(
        REPLICA_LAG_GUARD_LABEL
    )


def _upstream_data_changed() -> dg.AutomationCondition:
    """Like `eager()`, but a change stays pending until the asset is materialized (eager
    forgets it once a run is requested, even if that run fails), and a failed asset waits
    for its inputs to change again instead of being retried every tick."""
    missing_or_code_changed = (
        dg.AutomationCondition.newly_missing() | dg.AutomationCondition.code_version_changed()
    ).with_label("missing_or_code_changed")
    pending = (missing_or_code_changed | dg.AutomationCondition.any_deps_updated()).since(
        (dg.AutomationCondition.newly_updated() | dg.AutomationCondition.initial_evaluation())
        .with_label("materialized")
    ).with_label("changed since last materialized")
    return (
        pending
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
        & (~dg.AutomationCondition.execution_failed() | dg.AutomationCondition.any_deps_updated())
        .with_label("not failed, or inputs changed since")
    ).resolve_through_virtual()


def _view_condition() -> dg.AutomationCondition:
    return (
        dg.AutomationCondition.in_latest_time_window()
        & (dg.AutomationCondition.newly_missing() | dg.AutomationCondition.code_version_changed())
        .since_last_handled()
        .with_label("missing_or_code_changed")
        & ~dg.AutomationCondition.in_progress()
    ).with_label("view: missing or code changed")


def _freshness_failed() -> dg.AutomationCondition:
    return (
        dg.AutomationCondition.freshness_failed().newly_true()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("freshness failed")


def automation_for(
    props: Mapping[str, Any], lag_checks: dg.AssetSelection | None = None
) -> dg.AutomationCondition | None:
    """The automation condition of a dbt model or snapshot, by materialization type.

    With `lag_checks` (the replica_lag checks of the federated sources), everything that
    stores data is also held while the replica it reads lags (see `replica_lag_guard`).
    """
    materialized = props.get("config", {}).get("materialized")
    if materialized == "ephemeral":
        return None  # inlined into its consumers; nothing to build
    if materialized == "view" and props["resource_type"] != "snapshot":
        return _view_condition()
    if props["resource_type"] == "snapshot":
        condition, label = _upstream_data_changed(), "snapshot: upstream data changed"
    elif props.get("fqn", [None, None])[1] == "marts":
        condition, label = _upstream_data_changed() | _freshness_failed(), "mart: upstream data changed or stale"
    else:
        condition, label = _upstream_data_changed(), f"{materialized}: upstream data changed"
    if lag_checks is None:
        return condition.with_label(label)
    return (condition.with_label(label) & replica_lag_guard(lag_checks)).with_label(
        f"{label}, replica not lagging"
    )


def dashboard_automation() -> dg.AutomationCondition:
    """A dashboard is provisioned and warmed again once the data it reads changed."""
    return _upstream_data_changed().with_label("dashboard: upstream data changed")


def automation_sensors(
    asset_sets: Mapping[str, tuple[dg.AssetsDefinition, Mapping[str, str]]],
) -> list[dg.AutomationConditionSensorDefinition]:
    """One RUNNING automation sensor per asset set, its runs tagged with the set's sizing.

    The implicit default sensor starts STOPPED. Run tags are the only tags a launcher sees
    (op and asset tags do not become run tags), so each set's `ecs/cpu`/`ecs/memory` ride
    on the runs its own sensor requests.
    """
    return [
        dg.AutomationConditionSensorDefinition(
            f"{AUTOMATION_SENSOR}_{name}",
            target=dg.AssetSelection.assets(assets_def),
            run_tags=dict(run_tags),
            default_status=dg.DefaultSensorStatus.RUNNING,
            minimum_interval_seconds=30,
            description=f"Declarative automation of the {name} assets (platform_assets/automation.py).",
        )
        for name, (assets_def, run_tags) in asset_sets.items()
    ]


def observe_schedule(job, cron: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="observe_federated_sources_schedule",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Observes the replica's tables (one query, no dbt); new data versions drive automation.",
    )


def _post_webhook(url: str, payload: dict[str, Any], log) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            log.info(f"failure alert posted to webhook ({response.status})")
    except OSError as exc:  # an alert channel being down must not hide the failure itself
        log.warning(f"failure alert webhook unreachable: {exc}")


@dg.run_failure_sensor(
    name="run_failure_alert",
    default_status=dg.DefaultSensorStatus.RUNNING,
    monitor_all_code_locations=False,
    description="Logs which assets a failed run did not materialize; posts to ALERT_WEBHOOK_URL when set.",
)
def run_failure_alert(context: dg.RunFailureSensorContext):
    run = context.dagster_run
    planned = {k.to_user_string() for k in (run.asset_selection or set())}
    failed_steps = [e.step_key for e in context.get_step_failure_events()]
    materialized = {
        r.asset_key.to_user_string()
        for r in context.instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
        if r.asset_key
    }
    failed_assets = sorted(planned - materialized)
    payload = {
        "run_id": run.run_id,
        "job": run.job_name,
        "failed_assets": failed_assets,
        "failed_steps": failed_steps,
        "error": context.failure_event.message,
    }
    context.log.error(f"run {run.run_id} failed; assets not materialized: {', '.join(failed_assets) or 'n/a'}")
    url = os.environ.get("ALERT_WEBHOOK_URL")
    if url:
        _post_webhook(url, payload, context.log)
