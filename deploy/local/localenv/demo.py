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
and every company is exported in one run; the dashboards are provisioned and warmed in Superset
(one run of the `dashboards` asset) when it is configured, else recorded as refreshed (what the
dashboard_refresh sensor does).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TextIO

import dagster as dg

from platform_assets.beta import chosen_beta
from platform_assets.dbt_assets import FULL_REFRESH_TAG
from platform_assets.resources import quoted

PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"
# The runs' event logs are in the instance (make ui); the console gets warnings and errors.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# `make demo` sends the runs' console output to its log file: all of it.
VERBOSE = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}
# demo-*.log files kept under the local folder's logs/
KEEP_LOGS = 10
OBSERVE_JOB = "observe_federated_sources"


class DemoStopped(SystemExit):
    """A run of the demo failed: what ran before it stays materialized."""


def evaluate_automation(defs: dg.Definitions, instance: dg.DagsterInstance, cursor=None):
    with chosen_beta("include_sources"):
        return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)


class Runner:
    """Executes runs of the platform's jobs in this process, recorded in the instance."""

    def __init__(self, platform, instance: dg.DagsterInstance, progress=print, starting=None,
                 run_config: dict | None = None):
        """`progress` gets a line per finished step; `starting` (optional) the label of a step
        as it starts."""
        self.platform, self.instance, self.progress = platform, instance, progress
        self.starting = starting or (lambda _label: None)
        self.run_config = run_config or QUIET
        self.defs = platform.defs
        self.graph = self.defs.resolve_asset_graph()
        self.global_job = self.defs.resolve_implicit_global_asset_job_def()
        self.daily_keys = set(platform.dbt_daily_facts.keys)
        self.source_keys = {t.key for t in platform.federated_tables}
        self.export_keys = set(platform.exports.asset.keys)
        self.all_keys = {k for k in self.graph.get_all_asset_keys() if self.graph.get(k).is_materializable}
        # materializable when a BI server is configured (platform_assets/exposures.py)
        self.dashboard_keys = {d.key for d in platform.dashboards} & self.all_keys
        self.materialized: set[dg.AssetKey] = set()
        self.failed_checks: list = []
        # what a user should look at: failed or warned checks, assets a run did not build
        self.attention: list[str] = []
        self.source_checks = {k for k in platform.dbt_models.check_keys if k.asset_key in self.source_keys}
        self.deps = {spec.key: {d.asset_key for d in spec.deps} for spec in self.defs.resolve_all_asset_specs()}
        self.check_keys = {k for a in [*self.defs.assets, *self.defs.asset_checks]
                           if isinstance(a, dg.AssetsDefinition) for k in a.check_keys}

    def run(self, label: str, job: dg.JobDefinition, tags: dict | None = None,
            planned: set[dg.AssetKey] = frozenset()) -> None:
        """One run in this process; `planned`: the assets it should materialize."""
        t0 = time.monotonic()
        self.starting(label)
        result = job.execute_in_process(
            instance=self.instance, tags=tags or {}, raise_on_error=False, run_config=self.run_config,
        )
        keys = {e.asset_key for e in result.get_asset_materialization_events()}
        observed = len(result.get_asset_observation_events())
        self.materialized.update(keys)
        failed_checks = [c for c in result.get_asset_check_evaluations() if not c.passed]
        self.failed_checks.extend(failed_checks)
        status = "ok" if result.success else "FAILED"
        # an observation records only the sources whose data version changed (sources.py)
        detail = f"{observed} sources changed" if job.name == OBSERVE_JOB else f"{len(keys)} materialized"
        self.progress(f"  {label:<44} {status:<6} {detail:<24} {time.monotonic() - t0:6.1f}s  run {result.run_id[:8]}")
        for check in failed_checks:
            line = (f"check {check.asset_key.to_user_string()}:{check.check_name} failed ({check.severity.value})"
                    f"{': ' + check.description if check.description else ''}")
            self.attention.append(line)
            self.progress(f"  WARNING {line}")
        if unbuilt := planned - keys:
            self.attention.append(f"not built by run {result.run_id[:8]} ({label}): "
                                  + ", ".join(sorted(k.to_user_string() for k in unbuilt)))
        if not result.success:
            errors = [(e.step_failure_data.error.message.strip().splitlines() or [""])[0]
                      for e in result.get_step_failure_events() if e.step_failure_data.error]
            self.attention.append(f"run {result.run_id} ({label}) failed" + (f": {errors[0]}" if errors else ""))
            raise DemoStopped(f"demo stopped: run {result.run_id} ({label}) failed; see `make ui` for its logs")

    def observe(self) -> None:
        self.run("observe federated sources", self.defs.resolve_job_def(OBSERVE_JOB))

    def requested(self, requested: set[dg.AssetKey]) -> None:
        """What an automation evaluation requested (the unpartitioned models), in one run."""
        keys = requested - self.daily_keys - self.export_keys
        if keys:
            groups = ", ".join(sorted({k.path[0] for k in keys}))
            self.subset(f"automation requested ({len(keys)}): {groups}", keys)

    def changed_days(self, start: date | None = None) -> list[tuple[str, str]]:
        """What the daily_facts_changes sensor requests: ranges of days (from `start`, when
        given) whose contents differ."""
        from platform_assets.changes import uncovered_message

        facts = self.platform.daily_facts
        t0 = time.monotonic()
        label = "compare the days with the replica" if start is None else f"compare days from {start} with replica"
        self.starting(label)
        with dg.build_resources({"replica": self.defs.resources["replica"],
                                 "warehouse": self.defs.resources["warehouse"]}) as resources:
            days = facts.differing(resources.replica, resources.warehouse, start)
        ranges, uncovered = facts.requests(days)
        self.progress(f"  {label:<44} {'ok':<6} "
                      f"{f'{len(days)} days differ' if days else 'no day differs':<24} {time.monotonic() - t0:6.1f}s")
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
        """A run of these assets with their checks, and the dbt tests of the sources they read:
        dagster-dbt runs those with the models, so they are part of the run's selection."""
        sources = {d for k in keys for d in self.deps.get(k, ())} & self.source_keys
        checks = {c for c in self.check_keys if c.asset_key in keys} | {
            c for c in self.source_checks if c.asset_key in sources}
        self.run(label, self.global_job.get_subset(asset_selection=keys, asset_check_selection=checks), tags=tags,
                 planned=keys)

    def exports(self, keys: list[str], label: str = "customer exports") -> None:
        """Export these companies (partition keys, in partition order) in one run."""
        from platform_assets.exports import EXPORTS_JOB, range_tags

        if keys:
            self.run(f"{label} ({len(keys)} companies)", self.defs.resolve_job_def(EXPORTS_JOB),
                     tags=range_tags(keys), planned=self.export_keys)

    def sync_companies(self) -> tuple[list[str], list[str]]:
        """What the company_partitions sensor does: partitions = the warehouse's companies."""
        from platform_assets.exports import sync_partitions, warehouse_company_ids

        with dg.build_resources({"warehouse": self.defs.resources["warehouse"]}) as resources:
            wanted = warehouse_company_ids(resources.warehouse, self.platform.exports.relations)
        add, delete = sync_partitions(self.instance, wanted)
        self.progress(f"  company partitions: {len(wanted)} companies, {len(add)} added, {len(delete)} removed")
        return add, delete

    def record_dashboards(self) -> None:
        """What the dashboard_refresh sensor does: dashboards whose marts were all rebuilt
        (when they are external: materializable ones are run by automation or run_all)."""
        from platform_assets.exposures import dashboard_refreshes

        if self.dashboard_keys:
            return

        events = dashboard_refreshes(self.instance, self.platform.dashboards)
        for event in events:
            self.instance.report_runless_asset_event(event)
        if events:
            self.progress(f"  dashboards refreshed: {', '.join(e.asset_key.path[-1] for e in events)}")

    def never_materialized(self) -> set[dg.AssetKey]:
        return {k for k in self.all_keys if self.instance.get_latest_materialization_event(k) is None}


def run_all(platform, instance: dg.DagsterInstance, progress=print, full_refresh: bool = False,
            consumers: bool = True, runner: Runner | None = None) -> dict:
    """Materialize every asset once (platform: platform_assets.assembly.Platform); with
    `full_refresh`, every dbt model rebuilt in full (run tag platform/full_refresh); without
    `consumers`, the dbt assets only (no exports, no dashboards). `runner`: the Runner to use
    (default: one that reports to `progress`)."""
    started = time.monotonic()
    refresh_tags = {FULL_REFRESH_TAG: "true"} if full_refresh else {}
    r = runner or Runner(platform, instance, progress)
    after_daily = (dg.AssetSelection.assets(*r.daily_keys).downstream().resolve(r.graph) & r.all_keys) - r.daily_keys
    consumer_keys = r.export_keys | r.dashboard_keys
    before_daily = r.all_keys - after_daily - r.daily_keys - r.source_keys - consumer_keys
    after_daily -= consumer_keys
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
    r.subset(f"daily facts {start}..{last} + readers", r.daily_keys | after_daily,
             tags={PARTITION_RANGE_START: start, PARTITION_RANGE_END: last, **refresh_tags})
    if not consumers:
        return {"materialized": r.materialized, "expected": r.all_keys, "seconds": time.monotonic() - started}
    # The consumers: every company's export in one run, and the dashboards over the marts.
    r.sync_companies()
    r.exports(instance.get_dynamic_partitions(platform.exports.asset.partitions_def.name))
    if r.dashboard_keys:
        r.subset("dashboards: provision and warm", r.dashboard_keys)
    r.record_dashboards()
    return {"materialized": r.materialized, "expected": r.all_keys, "seconds": time.monotonic() - started}


def automation_cycle(r: Runner, instance: dg.DagsterInstance, cursor, keys: set[dg.AssetKey] | None = None,
                     max_ticks: int = 5, recent: bool = False):
    """Observe, then until nothing more is requested: evaluate the automation conditions and
    run what they request, and run the days of the daily facts that differ from the replica.
    `keys`: only these assets (the benchmark's dbt assets). `recent`: compare only the recent
    days, as an ordinary tick of the daily_facts_changes sensor does (its hourly scan and the
    demo compare every day). Returns the automation cursor."""
    r.observe()
    for tick in range(max_ticks):
        result = evaluate_automation(r.defs, instance, cursor)
        cursor = result.cursor
        requested = {x.key for x in result.results if x.true_subset.size > 0 and isinstance(x.key, dg.AssetKey)}
        if keys is not None:
            requested &= keys
        if requested:
            r.requested(requested)
        # After the models (a fact's relationship tests read the dimensions). Every day is
        # compared on the first tick; later, only if a run's matches_replica check found a day
        # its run did not fix (the check compares each run's days itself).
        compare = (keys is None or bool(keys & r.daily_keys)) and (tick == 0 or r.unmatched_days())
        ranges = r.changed_days(r.platform.daily_facts.recent_start() if recent else None) if compare else []
        r.daily_ranges(ranges, keys)
        if not requested and not ranges:
            break
    return cursor


def refresh(platform, instance: dg.DagsterInstance, cursor, progress=print, runner: Runner | None = None) -> dict:
    """What the automation sensors would do now (automation_cycle), then the consumers.
    Returns the summary and the automation cursor to keep."""
    started = time.monotonic()
    r = runner or Runner(platform, instance, progress)
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


def warehouse_row_counts(platform) -> dict[str, int]:
    """count(*) of every mart and reporting relation, read from the warehouse now."""
    relations = sorted(
        (n["schema"], n.get("alias") or n["name"], f"{n['fqn'][1]}.{n['name']}")
        for n in platform.manifest["nodes"].values()
        if n["resource_type"] == "model" and len(n.get("fqn", [])) > 2 and n["fqn"][1] in ("marts", "reporting")
        and n.get("config", {}).get("materialized") != "ephemeral"
    )
    query = " union all ".join(f"select {i}, count(*) from {quoted(schema, name)}"
                               for i, (schema, name, _) in enumerate(relations))
    with dg.build_resources({"warehouse": platform.defs.resources["warehouse"]}) as resources:
        rows = dict(resources.warehouse.fetch(query))
    return {label: int(rows[i]) for i, (_, _, label) in enumerate(relations)}


def consumers_lines(platform, instance: dg.DagsterInstance) -> list[str]:
    """Where the customer exports are, and the dashboards."""
    exports = platform.exports
    companies = instance.get_dynamic_partitions(exports.asset.partitions_def.name)
    key = next(iter(exports.asset.keys))
    done = instance.get_materialized_partitions(key)
    root = platform.settings.export_uri
    line = (f"customer exports: {len(done & set(companies))} of {len(companies)} companies (Parquet + CSV) "
            f"in {root}/company_id=<id>/training_report.*")
    event = instance.get_latest_materialization_event(key)
    meta = event.asset_materialization.metadata if event and event.asset_materialization else {}
    if "data_as_of" in meta:
        line += f", data as of {datetime.fromtimestamp(meta['data_as_of'].value, UTC).isoformat(timespec='seconds')}"
    refreshed = [d.key.path[-1] for d in platform.dashboards if instance.get_latest_materialization_event(d.key)]
    waiting = [d.key.path[-1] for d in platform.dashboards if d.key.path[-1] not in refreshed]
    dashboards = f"dashboards (dbt exposures): {', '.join(refreshed) or 'none'} refreshed"
    if waiting:
        dashboards += f"; {', '.join(waiting)} waiting for their marts"
    return [line, dashboards]


class Console:
    """The demo's lines on the terminal. While it runs, everything else that writes to stdout
    or stderr (dbt, Dagster's console logger, libraries) goes to the log file instead."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.term: TextIO = sys.stdout
        self.log: TextIO | None = None
        self.open_step = False

    @contextmanager
    def capturing(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        saved = os.dup(1), os.dup(2)
        self.term = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed below
        try:
            yield self
        except KeyboardInterrupt:
            self.line(f"\ninterrupted; dbt's and Dagster's logs so far: {self.log_path}")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            self.term.close()
            self.log.close()
            self.term, self.log = sys.stdout, None

    def starting(self, label: str) -> None:
        """On a terminal, the step's label while it runs (its outcome line replaces it)."""
        if self.term.isatty():
            self.term.write(f"  {label} ...")
            self.term.flush()
            self.open_step = True

    def line(self, text: str = "") -> None:
        if self.open_step:
            self.term.write("\r\x1b[K")
            self.open_step = False
        self.term.write(text + "\n")
        self.term.flush()
        if self.log:
            self.log.write(f"[demo] {text}\n")


def wall_clock_start() -> float:
    """time.monotonic() when `make demo` started (DEMO_STARTED, epoch seconds, set by the Make
    target so that the summary's time includes `make up`), or now."""
    try:
        since = max(0.0, time.time() - float(os.environ.get("DEMO_STARTED", "")))
    except ValueError:
        since = 0.0
    return time.monotonic() - since


def prune_logs(folder: Path, keep: int = KEEP_LOGS) -> None:
    for old in sorted(folder.glob("demo-*.log"))[:-keep]:
        old.unlink(missing_ok=True)


def main() -> int:
    from dagster_shared.serdes import deserialize_value, serialize_value

    from platform_assets.preflight import preflight
    from platform_assets.settings import ConfigurationError

    started = wall_clock_start()
    # Bad configuration (unknown PLATFORM_ENV, a missing variable, a wrong password, a
    # replica that does not answer) stops here with one line naming the setting, before
    # anything is created.
    try:
        from platform_assets.definitions import platform

        preflight(platform.settings)
    except ConfigurationError as exc:
        print(f"demo not started: {exc}", file=sys.stderr)
        return 2

    instance = dg.DagsterInstance.get()
    log_dir = Path(instance.root_directory).parent / "logs"
    console = Console(log_dir / f"demo-{datetime.now():%Y%m%d-%H%M%S}.log")
    with console.capturing():
        code = _demo(platform, instance, console, started, deserialize_value, serialize_value)
    prune_logs(log_dir)
    return code


def _demo(platform, instance: dg.DagsterInstance, console: Console, started: float,
          deserialize_value, serialize_value) -> int:
    settings = platform.settings
    say = console.line
    cursor_file = Path(instance.root_directory) / "demo-automation-cursor.json"
    runner = Runner(platform, instance, progress=say, starting=console.starting, run_config=VERBOSE)
    stopped = None
    try:
        if "--full-refresh" in sys.argv[1:]:
            say(f"full refresh: every asset once, every dbt model rebuilt in full (run tag {FULL_REFRESH_TAG}=true)")
            summary = run_all(platform, instance, full_refresh=True, runner=runner)
            cursor = evaluate_automation(platform.defs, instance).cursor
        elif runner.never_materialized():
            say(f"first run: every asset once (PLATFORM_ENV={settings.env}, dbt target {settings.dbt_target}, "
                f"Dagster instance {instance.root_directory})")
            summary = run_all(platform, instance, runner=runner)
            # Start the automation cursor now, so the next `make demo` refreshes only what changed.
            cursor = evaluate_automation(platform.defs, instance).cursor
        else:
            say("every asset is materialized already: observing the sources and refreshing what changed "
                "(what the automation sensors do; `make simulate` makes changes)")
            previous = deserialize_value(cursor_file.read_text()) if cursor_file.exists() else None
            summary = refresh(platform, instance, previous, runner=runner)
            cursor = summary["cursor"]
        cursor_file.write_text(serialize_value(cursor))
    except DemoStopped as exc:
        stopped = str(exc)
    except Exception as exc:  # noqa: BLE001 - the traceback goes to the log, the line to the user
        traceback.print_exc()
        stopped = f"demo stopped: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"

    missing = runner.never_materialized()
    attention = list(runner.attention) + ([stopped] if stopped else [])
    if missing:
        attention.append("never materialized: " + ", ".join(sorted(k.to_user_string() for k in missing)))
    say()
    say(f"{'stopped' if stopped else 'done'} in {time.monotonic() - started:.1f}s (wall time): "
        f"{len(runner.all_keys) - len(missing)} of {len(runner.all_keys)} assets materialized, "
        f"{len(runner.materialized)} by this run; "
        + (f"{len(attention)} to look at:" if attention else "nothing needs attention"))
    for line in attention:
        say(f"  ! {line}")
    try:
        counts = warehouse_row_counts(platform)
    except Exception as exc:  # noqa: BLE001 - a warehouse not built yet
        say(f"row counts: the warehouse could not be read ({type(exc).__name__}: {exc})")
    else:
        say("rows in the warehouse (count(*) now):")
        items = [f"{name:<38} {n:>10,}" for name, n in counts.items()]
        for i in range(0, len(items), 2):
            say("  " + "   ".join(items[i:i + 2]))
    for line in consumers_lines(platform, instance):
        say(line)
    say("lineage and runs: make ui -> http://127.0.0.1:3000/asset-groups ; groups "
        "http://127.0.0.1:3000/locations/platform_assets/asset-groups/dashboards and .../exports")
    say(f"dbt's and Dagster's logs of this demo: {console.log_path}")
    return 1 if stopped or missing else 0


if __name__ == "__main__":
    sys.exit(main())
