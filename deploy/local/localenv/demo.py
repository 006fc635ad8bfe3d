"""`make demo`: materialize every asset of the platform once on the local instance, then
print what was built. Runs are recorded in the local Dagster instance (DAGSTER_HOME), so
`make ui` shows them afterwards.

A second `make demo` does what the automation sensors would: observe the sources, evaluate
the automation conditions (cursor kept in DAGSTER_HOME) and run only what they request, and
run the days of the daily facts whose contents differ from the replica's (what the
daily_facts_changes sensor requests).

First run order: observe the federated sources; build every model that does not read the daily
facts (staging views, dimensions, snapshots...); build the daily facts over the whole data
range as one run (one dbt invocation); build what reads the facts; then the consumers: the
`companies` partitions are synced with the warehouse (what the company_partitions sensor does)
and every company is exported in one run; the dashboards are recorded as refreshed (what the
dashboard_refresh sensor does).
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from platform_assets.dbt_assets import FULL_REFRESH_TAG

PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"
# The runs' event logs are in the instance (make ui); the console gets warnings and errors.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


class Runner:
    """Executes runs of the platform's jobs in this process, recorded in the instance."""

    def __init__(self, platform, instance: dg.DagsterInstance, progress=print):
        self.platform, self.instance, self.progress = platform, instance, progress
        self.defs = platform.defs
        self.graph = self.defs.resolve_asset_graph()
        self.global_job = self.defs.resolve_implicit_global_asset_job_def()
        self.daily_keys = set(platform.dbt_daily_facts.keys)
        self.source_keys = {t.key for t in platform.federated_tables}
        self.export_keys = set(platform.exports.asset.keys)
        self.all_keys = {k for k in self.graph.get_all_asset_keys() if self.graph.get(k).is_materializable}
        self.materialized: set[dg.AssetKey] = set()
        self.failed_checks: list = []

    def run(self, label: str, job: dg.JobDefinition, tags: dict | None = None) -> None:
        t0 = time.monotonic()
        result = job.execute_in_process(
            instance=self.instance, tags=tags or {}, raise_on_error=False, run_config=QUIET,
        )
        keys = {e.asset_key for e in result.get_asset_materialization_events()}
        observed = len(result.get_asset_observation_events())
        self.materialized.update(keys)
        failed_checks = [c for c in result.get_asset_check_evaluations() if not c.passed]
        self.failed_checks.extend(failed_checks)
        status = "ok" if result.success else "FAILED"
        detail = f"{len(keys)} materialized" + (f", {observed} observed" if observed else "")
        self.progress(f"  {label:<34} {status:<6} {detail:<22} {time.monotonic() - t0:6.1f}s  run {result.run_id[:8]}")
        for check in failed_checks:
            self.progress(f"  WARNING check {check.asset_key.to_user_string()}:{check.check_name} failed"
                          f" ({check.severity.value}){': ' + check.description if check.description else ''}")
        if not result.success:
            raise SystemExit(f"demo stopped: run {result.run_id} ({label}) failed; see `make ui` for its logs")

    def observe(self) -> None:
        self.run("observe federated sources", self.defs.resolve_job_def("observe_federated_sources"))

    def requested(self, requested: set[dg.AssetKey]) -> None:
        """What an automation evaluation requested (the unpartitioned models), in one run."""
        keys = requested - self.daily_keys - self.export_keys
        if keys:
            self.subset("requested models", keys)

    def changed_days(self) -> list[tuple[str, str]]:
        """What the daily_facts_changes sensor requests: ranges of days whose contents differ."""
        from platform_assets.changes import uncovered_message

        facts = self.platform.daily_facts
        with dg.build_resources({"replica": self.defs.resources["replica"],
                                 "warehouse": self.defs.resources["warehouse"]}) as resources:
            days = facts.differing(resources.replica, resources.warehouse)
        ranges, uncovered = facts.requests(days)
        if uncovered:
            self.progress("  WARNING " + uncovered_message(uncovered, self.platform.settings.partitions_start))
        return ranges

    def unmatched_days(self) -> bool:
        """A matches_replica check failed since the last comparison (and forget it)."""
        from platform_assets.changes import MATCHES_REPLICA_CHECK

        failed = [c for c in self.failed_checks if c.check_name == MATCHES_REPLICA_CHECK]
        self.failed_checks = [c for c in self.failed_checks if c.check_name != MATCHES_REPLICA_CHECK]
        return bool(failed)

    def daily_ranges(self, ranges: list[tuple[str, str]], keys: set[dg.AssetKey] | None = None) -> None:
        """Run the daily facts (of `keys`, when given) over each range."""
        facts = self.daily_keys if keys is None else self.daily_keys & keys
        for first, last in ranges:
            self.subset(f"daily facts {first}..{last} (changed)", facts,
                        tags={PARTITION_RANGE_START: first, PARTITION_RANGE_END: last})

    def subset(self, label: str, keys: set[dg.AssetKey], tags: dict | None = None) -> None:
        self.run(label, self.global_job.get_subset(asset_selection=keys), tags=tags)

    def exports(self, keys: list[str], label: str = "customer exports") -> None:
        """Export these companies (partition keys, in partition order) in one run."""
        from platform_assets.exports import EXPORTS_JOB, range_tags

        if keys:
            self.run(f"{label} ({len(keys)} companies)", self.defs.resolve_job_def(EXPORTS_JOB),
                     tags=range_tags(keys))

    def sync_companies(self) -> tuple[list[str], list[str]]:
        """What the company_partitions sensor does: partitions = the warehouse's companies."""
        from platform_assets.exports import sync_partitions, warehouse_company_ids

        with dg.build_resources({"warehouse": self.defs.resources["warehouse"]}) as resources:
            wanted = warehouse_company_ids(resources.warehouse, self.platform.exports.relations)
        add, delete = sync_partitions(self.instance, wanted)
        self.progress(f"  company partitions: {len(wanted)} companies, {len(add)} added, {len(delete)} removed")
        return add, delete

    def record_dashboards(self) -> None:
        """What the dashboard_refresh sensor does: dashboards whose marts were all rebuilt."""
        from platform_assets.exposures import dashboard_refreshes

        events = dashboard_refreshes(self.instance, self.platform.dashboards)
        for event in events:
            self.instance.report_runless_asset_event(event)
        if events:
            self.progress(f"  dashboards refreshed: {', '.join(e.asset_key.path[-1] for e in events)}")

    def never_materialized(self) -> set[dg.AssetKey]:
        return {k for k in self.all_keys if self.instance.get_latest_materialization_event(k) is None}


def run_all(platform, instance: dg.DagsterInstance, progress=print, full_refresh: bool = False,
            consumers: bool = True) -> dict:
    """Materialize every asset once (platform: platform_assets.assembly.Platform); with
    `full_refresh`, every dbt model rebuilt in full (run tag platform/full_refresh); without
    `consumers`, the dbt assets only (no exports, no dashboards)."""
    started = time.monotonic()
    refresh_tags = {FULL_REFRESH_TAG: "true"} if full_refresh else {}
    r = Runner(platform, instance, progress)
    after_daily = (dg.AssetSelection.assets(*r.daily_keys).downstream().resolve(r.graph) & r.all_keys) - r.daily_keys
    before_daily = r.all_keys - after_daily - r.daily_keys - r.source_keys - r.export_keys
    after_daily -= r.export_keys
    r.observe()
    # Every partition from the first one (days without events are empty, and cost nothing:
    # the whole range is one statement), so no partition is left missing.
    partition_keys = platform.dbt_daily_facts.partitions_def.get_partition_keys()
    start, last = partition_keys[0], partition_keys[-1]
    # Two runs: what does not read the daily facts, then the facts and what reads them (Dagster
    # orders the steps). Separate runs, so that a failed test among the dimensions does not stop
    # the facts (a failed step stops the steps after it in its run). A relationship test from a
    # fact to a dimension runs with the fact (the unpartitioned set's indirect selection is
    # cautious, platform_assets/dbt_assets.py).
    r.subset("staging, dimensions, snapshots", before_daily, tags=refresh_tags)
    r.subset(f"daily facts {start}..{last} and what reads them", r.daily_keys | after_daily,
             tags={PARTITION_RANGE_START: start, PARTITION_RANGE_END: last, **refresh_tags})
    if not consumers:
        return {"materialized": r.materialized, "expected": r.all_keys, "seconds": time.monotonic() - started}
    # The consumers: every company's export in one run, and the dashboards over the marts.
    r.sync_companies()
    r.exports(instance.get_dynamic_partitions(platform.exports.asset.partitions_def.name))
    r.record_dashboards()
    return {"materialized": r.materialized, "expected": r.all_keys, "seconds": time.monotonic() - started}


def automation_cycle(r: Runner, instance: dg.DagsterInstance, cursor, keys: set[dg.AssetKey] | None = None,
                     max_ticks: int = 5):
    """Observe, then until nothing more is requested: evaluate the automation conditions and
    run what they request, and run the days of the daily facts that differ from the replica.
    `keys`: only these assets (the benchmark's dbt assets). Returns the automation cursor."""
    r.observe()
    for tick in range(max_ticks):
        result = dg.evaluate_automation_conditions(defs=r.defs, instance=instance, cursor=cursor)
        cursor = result.cursor
        requested = {x.key for x in result.results if x.true_subset.size > 0 and isinstance(x.key, dg.AssetKey)}
        if keys is not None:
            requested &= keys
        if requested:
            r.progress(f"  automation requests: {', '.join(sorted(k.to_user_string() for k in requested))}")
            r.requested(requested)
        # After the models (a fact's relationship tests read the dimensions). Every day is
        # compared on the first tick; later, only if a run's matches_replica check found a day
        # its run did not fix (the check compares each run's days itself).
        compare = (keys is None or bool(keys & r.daily_keys)) and (tick == 0 or r.unmatched_days())
        ranges = r.changed_days() if compare else []
        r.daily_ranges(ranges, keys)
        if not requested and not ranges:
            break
    return cursor


def refresh(platform, instance: dg.DagsterInstance, cursor, progress=print) -> dict:
    """What the automation sensors would do now (automation_cycle), then the consumers.
    Returns the summary and the automation cursor to keep."""
    started = time.monotonic()
    r = Runner(platform, instance, progress)
    cursor = automation_cycle(r, instance, cursor)
    # New companies get their export at once (the company_partitions sensor); a changed mart
    # reaches every export on the nightly schedule, which the demo does right away.
    added, _ = r.sync_companies()
    export_inputs = {dep.asset_key for dep in platform.exports.asset.specs_by_key[next(iter(r.export_keys))].deps}
    if r.materialized & export_inputs:
        r.exports(instance.get_dynamic_partitions(platform.exports.asset.partitions_def.name),
                  "customer exports (inputs changed)")
    else:
        r.exports(added, "customer exports (new companies)")
    r.record_dashboards()
    return {"materialized": r.materialized, "expected": r.all_keys, "seconds": time.monotonic() - started,
            "cursor": cursor}


def mart_row_counts(instance: dg.DagsterInstance, keys) -> dict[str, int | None]:
    counts = {}
    for key in sorted(keys, key=lambda k: k.to_user_string()):
        if key.path[0] not in ("marts", "reporting"):
            continue
        event = instance.get_latest_materialization_event(key)
        meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
        value = meta.get("dagster/row_count")
        counts[key.to_user_string()] = value.value if value is not None else None
    return counts


def print_consumers(platform, instance: dg.DagsterInstance) -> None:
    """Where the customer exports are, and what each dashboard reads."""
    exports = platform.exports
    companies = instance.get_dynamic_partitions(exports.asset.partitions_def.name)
    key = next(iter(exports.asset.keys))
    done = instance.get_materialized_partitions(key)
    root = platform.settings.export_uri
    print(f"\ncustomer exports: {len(done & set(companies))} of {len(companies)} companies exported "
          f"(Parquet + CSV) under {root}/company_id=<id>/")
    if companies:
        first = companies[0]
        print(f"  e.g. {root}/company_id={first}/training_report.parquet  and  .../training_report.csv")
    event = instance.get_latest_materialization_event(key)
    meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
    if "data_as_of" in meta:
        as_of = datetime.fromtimestamp(meta["data_as_of"].value, UTC).isoformat(timespec="seconds")
        print(f"  data as of {as_of} (column data_as_of; Parquet key/value metadata data_as_of)")
    print("\ndashboards (dbt exposures, Metabase; they read the reporting views and marts):")
    for d in platform.dashboards:
        state = "refreshed" if instance.get_latest_materialization_event(d.key) else "inputs not built yet"
        print(f"  {d.key.to_user_string():<45} <- {', '.join(k.to_user_string() for k in d.deps)}  ({state})")


def main() -> int:
    from dagster_shared.serdes import deserialize_value, serialize_value

    from platform_assets.preflight import preflight
    from platform_assets.settings import ConfigurationError

    # Bad configuration (unknown PLATFORM_ENV, a missing variable, a wrong password, a
    # replica that does not answer) stops here with one line naming the setting, before
    # anything is created.
    try:
        from platform_assets.definitions import platform

        preflight(platform.settings)
    except ConfigurationError as exc:
        print(f"demo not started: {exc}", file=sys.stderr)
        return 2

    settings = platform.settings
    instance = dg.DagsterInstance.get()
    cursor_file = Path(instance.root_directory) / "demo-automation-cursor.json"
    runner = Runner(platform, instance)
    if "--full-refresh" in sys.argv[1:]:
        print(f"full refresh: every asset once, every dbt model rebuilt in full (run tag {FULL_REFRESH_TAG}=true)")
        summary = run_all(platform, instance, full_refresh=True)
        cursor = dg.evaluate_automation_conditions(defs=platform.defs, instance=instance).cursor
    elif runner.never_materialized():
        print(f"first run: every asset once (PLATFORM_ENV={settings.env}, dbt target {settings.dbt_target}, "
              f"Dagster instance {instance.root_directory})")
        summary = run_all(platform, instance)
        # Start the automation cursor now, so the next `make demo` refreshes only what changed.
        cursor = dg.evaluate_automation_conditions(defs=platform.defs, instance=instance).cursor
    else:
        print("every asset is materialized already: observing the sources and refreshing what changed "
              "(what the automation sensors do; `make simulate` makes changes)")
        previous = deserialize_value(cursor_file.read_text()) if cursor_file.exists() else None
        summary = refresh(platform, instance, previous)
        cursor = summary["cursor"]
    cursor_file.write_text(serialize_value(cursor))
    missing = runner.never_materialized()
    print(f"\n{len(summary['materialized'])} assets materialized by this run in {summary['seconds']:.1f}s; "
          f"{len(summary['expected']) - len(missing)} of {len(summary['expected'])} assets materialized in all")
    if missing:
        print("never materialized: " + ", ".join(sorted(k.to_user_string() for k in missing)))
    print("\nrow counts of the marts and reporting views:")
    for key, n in mart_row_counts(instance, summary["expected"]).items():
        print(f"  {key:<45} {n if n is not None else '(view)':>12}")
    print_consumers(platform, instance)
    print("\nopen the lineage UI:  make ui   ->  http://127.0.0.1:3000/asset-groups"
          "\n  (Assets > Global asset lineage: federated sources -> staging -> marts -> reporting views"
          " -> dashboards and exports)"
          "\n  groups `dashboards` (one asset per dbt exposure, kind metabase) and `exports`"
          " (exports/company_training_report, one partition per company):"
          "\n  http://127.0.0.1:3000/locations/platform_assets/asset-groups/dashboards  and"
          "  http://127.0.0.1:3000/locations/platform_assets/asset-groups/exports")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
