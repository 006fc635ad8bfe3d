"""Change detection for the daily facts, and the reconciliation that acts on it.
The `daily_facts_changes` sensor compares each day's fingerprint on the replica with the
warehouse's (fingerprints.py) and requests the days that differ, as partition ranges of the
daily facts (one run per range; ranges a few unchanged days apart are merged). What it
compares is the warehouse's contents, not a record of what ran: a run that failed, was
killed or read the replica just before a change leaves its days different, and they are
requested again; nothing is ever counted as handled that the warehouse does not hold. The
demo's refresh (localenv/demo.py) runs the same comparison.

The check `matches_replica` of fct_lesson_events runs with every run of the daily facts, over
the run's days: a day that still differs after the run that rebuilt it fails the check
(ERROR), naming the days. Rows received on the replica after the run started are left out
on both sides (they are the next run's), so a live day receiving events does not fail it.
"""


import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg

from .fingerprints import (
    Fingerprint,
    as_fingerprints,
    day_ranges,
    differing_days,
    replica_query,
    warehouse_query,
)
from .resources import ReplicaResource, WarehouseBusy, WarehouseResource, quoted

CHANGES_SENSOR = "daily_facts_changes"
MATCHES_REPLICA_CHECK = "matches_replica"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
REASON_TAG = "platform/reason"
# Rebuilding a few unchanged days costs less than the fixed cost of one more run.
DEFAULT_MAX_GAP_DAYS = 7
DEFAULT_RECENT_DAYS = 14
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@dataclass(frozen=True)
class DailyFacts:
    """Where the daily facts are and how their partitions are cut."""

    replica_schema: str
    fact: tuple[str, str]  # (schema, name) of fct_lesson_events in the warehouse
    daily: tuple[str, str]  # (schema, name) of fct_daily_learning_activity
    fact_key: dg.AssetKey
    keys: frozenset[dg.AssetKey]
    partitions_def: dg.TimeWindowPartitionsDefinition
    max_gap_days: int = DEFAULT_MAX_GAP_DAYS
    # what an ordinary tick of the sensor compares (the hourly full scan compares every day)
    recent_days: int = DEFAULT_RECENT_DAYS

    # -- the two sides ---------------------------------------------------------------------
    def replica_fingerprints(self, replica: ReplicaResource, start: date | None = None,
                             end: date | None = None, received_before: datetime | None = None
                             ) -> dict[str, Fingerprint]:
        with replica.connect() as conn:
            query = replica_query(self.replica_schema, start, end, received_before)
            return as_fingerprints(conn.execute(query).fetchall())

    def warehouse_fingerprints(self, warehouse: WarehouseResource, start: date | None = None,
                               end: date | None = None, received_before: datetime | None = None,
                               with_daily: bool = True) -> dict[str, Fingerprint]:
        """The fact's fingerprints; with `with_daily`, also whether fct_daily_learning_activity
        agrees with it (when that table exists: a build of the events alone has none)."""
        daily = quoted(*self.daily) if with_daily and self._exists(warehouse, *self.daily) else None
        query = warehouse_query(warehouse.engine, quoted(*self.fact), daily, start, end, received_before)
        return as_fingerprints(warehouse.fetch(query))

    @staticmethod
    def _exists(warehouse: WarehouseResource, schema: str, name: str) -> bool:
        rows = warehouse.fetch("select count(*) from information_schema.tables where table_schema = '"
                               + schema.replace("'", "''") + "' and table_name = '" + name.replace("'", "''") + "'")
        return bool(rows and rows[0][0])

    def differing(self, replica: ReplicaResource, warehouse: WarehouseResource,
                  start: date | None = None) -> list[str]:
        """Every day (from `start`, when given) whose contents differ between the replica and
        the warehouse. The two sides run at the same time: they are different engines."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            on_replica = pool.submit(self.replica_fingerprints, replica, start)
            in_warehouse = self.warehouse_fingerprints(warehouse, start)
            return differing_days(on_replica.result(), in_warehouse)

    def recent_start(self) -> date:
        """The first of the last `recent_days` days (today included): what an ordinary tick compares."""
        return datetime.now(UTC).date() - timedelta(days=self.recent_days - 1)

    # -- what to run -------------------------------------------------------------------------
    def requests(self, days: list[str], now: datetime | None = None) -> tuple[list[tuple[str, str]], list[str]]:
        """(partition ranges to run, days that no partition covers)."""
        keys = set(self.partitions_def.get_partition_keys(current_time=now))
        covered = [d for d in days if d in keys]
        return day_ranges(covered, self.max_gap_days), [d for d in days if d not in keys]


def uncovered_message(days: list[str], partitions_start: str) -> str:
    shown = ", ".join(days[:10]) + (f" and {len(days) - 10} more" if len(days) > 10 else "")
    return (f"{len(days)} day(s) differ from the replica outside the daily partitions ({shown}): events "
            f"before FACT_PARTITIONS_START={partitions_start} (or after the last partition) reach the facts "
            "only by a full refresh (README: full refresh through Dagster)")


def in_progress_daily_run(instance: dg.DagsterInstance, keys: frozenset[dg.AssetKey]) -> dg.DagsterRun | None:
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS), limit=50):
        if run.asset_selection and set(run.asset_selection) & keys:
            return run
    return None


def changes_sensor(facts: DailyFacts, job, run_tags: Mapping[str, str], max_lag_seconds: float,
                   partitions_start: str, full_scan_minutes: float = 60) -> dg.SensorDefinition:
    """Every tick compares the last `facts.recent_days` days (where late events, edits and
    deletes nearly all land); every `full_scan_minutes`, all days (docs/change-detection.md: cost)."""
    @dg.sensor(
        name=CHANGES_SENSOR,
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests the days of the daily facts whose contents differ from the replica's "
                    "(per-day fingerprints, platform_assets/changes.py).",
    )
    def daily_facts_changes(context: dg.SensorEvaluationContext, replica: ReplicaResource,
                            warehouse: WarehouseResource):
        running = in_progress_daily_run(context.instance, facts.keys)
        if running is not None:
            return dg.SkipReason(f"run {running.run_id} of the daily facts is in progress")
        lag = replica.replay_lag_seconds()
        if lag > max_lag_seconds:
            return dg.SkipReason(f"replica replay lag {lag:.1f}s exceeds MAX_REPLICA_LAG_SECONDS="
                                 f"{max_lag_seconds:g}: the daily facts are held")
        state = json.loads(context.cursor) if context.cursor else {"ticks": 0, "full_scan_at": 0.0}
        now = time.time()
        full = now - state["full_scan_at"] >= full_scan_minutes * 60
        start = None if full else facts.recent_start()
        try:
            days = facts.differing(replica, warehouse, start)
        except WarehouseBusy as exc:
            return dg.SkipReason(str(exc))
        if full:
            state["full_scan_at"] = now
        state["ticks"] += 1
        context.update_cursor(json.dumps(state))
        ranges, uncovered = facts.requests(days)
        if uncovered:
            context.log.warning(uncovered_message(uncovered, partitions_start))
        scope = "all days" if full else f"the last {facts.recent_days} days"
        if not ranges:
            return dg.SkipReason(f"{scope} of the daily facts match the replica")
        context.log.info(f"{len(days)} day(s) differ from the replica ({scope} compared): {', '.join(days[:20])}")
        return [
            dg.RunRequest(
                # a new key per evaluation: the same days may have to be run again
                run_key=f"changes-{state['ticks']}-{first}-{last}",
                tags={**run_tags, RANGE_START_TAG: first, RANGE_END_TAG: last,
                      REASON_TAG: "days differ from the replica"},
            )
            for first, last in ranges
        ]

    return daily_facts_changes


def matches_replica_check(facts: DailyFacts) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=facts.fact_key,
        name=MATCHES_REPLICA_CHECK,
        description="Every day the run rebuilt has the replica's rows (per-day fingerprints of the "
                    "contents, platform_assets/fingerprints.py); fails with ERROR naming the days.",
        blocking=False,
    )
    def matches_replica(context: dg.AssetCheckExecutionContext, replica: ReplicaResource,
                        warehouse: WarehouseResource) -> dg.AssetCheckResult:
        tags = context.run.tags
        first, last = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
        if first is None and context.run.tags.get("dagster/partition"):
            first = last = tags["dagster/partition"]
        start = date.fromisoformat(first) if first else None
        end = date.fromisoformat(last) + timedelta(days=1) if last else None
        # rows received after the run started are the next run's, on both sides
        run_record = context.instance.get_run_record_by_id(context.run.run_id)
        started = run_record.start_time if run_record and run_record.start_time else time.time()
        received_before = datetime.fromtimestamp(started, UTC).replace(tzinfo=None)
        days = differing_days(facts.replica_fingerprints(replica, start, end, received_before),
                              facts.warehouse_fingerprints(warehouse, start, end, received_before,
                                                           with_daily=False))
        scope = f"{first}..{last}" if first else "every day"
        metadata: dict[str, Any] = {"days_compared": dg.MetadataValue.text(scope),
                                    "days_differing": dg.MetadataValue.int(len(days))}
        if days:
            metadata["differing_days"] = dg.MetadataValue.text(", ".join(days))
            context.log.error(f"fct_lesson_events differs from the replica on {len(days)} day(s) it was "
                              f"rebuilt for: {', '.join(days)}")
        return dg.AssetCheckResult(
            passed=not days,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(f"differs from the replica on {', '.join(days)}" if days
                         else f"matches the replica ({scope})"),
            metadata=metadata,
        )

    return matches_replica
