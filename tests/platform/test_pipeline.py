"""End to end, on DuckDB and on PostgreSQL: observe the federated sources, materialize every
asset, every dbt check passes; simulator changes give new data versions only to the
sources that changed, automation requests exactly the stored assets downstream of them
(nothing when nothing changed), and the days of the daily facts that differ from the
replica are the ones the batch touched; a failed freshness policy requests its mart."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pytest
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.freshness import FreshnessDaemon
from localenv.demo import Runner, run_all

from platform_assets.bi import COPY_KEY as BI_COPY_KEY
from platform_assets.sources import latest_data_version

from .conftest import REPO_ROOT, platform_under_test

# What the simulator touches, and what it leaves alone (localenv/simulator.py).
CHANGED_BY_SIMULATOR = {"lesson_events", "enrollments", "certificates", "users", "companies", "subscriptions"}
UNTOUCHED_BY_SIMULATOR = {"teams", "team_memberships", "courses", "lessons", "quiz_attempts"}


@pytest.fixture(scope="module", params=["local", "pg"])
def built(request, pg_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"platform-{request.param}")
    with platform_under_test(pg_env, folder, request.param) as put:
        summary = run_all(put.platform, put.instance, progress=lambda _m: None)
        put.summary = summary
        yield put


def _observe(put) -> dict[str, str]:
    """Observe every source; the data version of each (its latest recorded observation: an
    unchanged source is not recorded again)."""
    result = put.defs.resolve_job_def("observe_federated_sources").execute_in_process(instance=put.instance)
    assert result.success
    return {t.table: latest_data_version(put.instance, t.key) for t in put.platform.federated_tables}


def _requested(result: dg.EvaluateAutomationConditionsResult) -> set[dg.AssetKey]:
    return {r.key for r in result.results if r.true_subset.size > 0 and isinstance(r.key, dg.AssetKey)}


def _stored_downstream(put, source_names: set[str]) -> set[dg.AssetKey]:
    """Materializable, non-virtual assets downstream of the given federated tables."""
    graph = put.defs.resolve_asset_graph()
    keys = [t.key for t in put.platform.federated_tables if t.table in source_names]
    downstream = dg.AssetSelection.assets(*keys).downstream().resolve(graph) - set(keys)
    return {
        k for k in downstream
        if graph.get(k).is_materializable and not graph.get(k).is_virtual
        and put.defs.resolve_assets_def(k).get_asset_spec(k).automation_condition is not None
    }


def test_everything_materialized_and_every_check_passes(built):
    missing = built.summary["expected"] - built.summary["materialized"]
    assert not missing, f"not materialized: {missing}"
    graph = built.defs.resolve_asset_graph()
    check_keys = list(graph.asset_check_keys)
    assert check_keys, "the dbt tests should be asset checks"
    records = built.instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
    dbt_checks = [k for k in check_keys if k.name != "replica_lag"]
    not_passed = {
        k.to_user_string(): (r.status.value if r else "never ran")
        for k in dbt_checks
        for r in [records.get(k)]
        if r is None or r.status.value != "SUCCEEDED"
        or not r.event.dagster_event.event_specific_data.passed
    }
    assert not not_passed, not_passed


def _warehouse_rows(put, sql: str) -> list[tuple]:
    if put.platform.settings.engine == "duckdb":
        import duckdb

        con = duckdb.connect(put.environ["DUCKDB_PATH"], read_only=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    import psycopg

    with psycopg.connect(put.environ["WAREHOUSE_PG_URL"]) as conn:
        return conn.execute(sql).fetchall()


def test_dbt_commands_after_the_first_parse_partially(built):
    """run_all's dbt commands start from their connection profile's parse state: after the
    first command of this environment, none parses the whole project again."""
    from pathlib import Path

    runs = Path(built.platform.project.project_dir) / built.platform.project.target_path / "runs"
    ids = [r.dagster_run.run_id[:7] for r in built.instance.get_run_records()]
    logs = sorted((log for run_id in ids for log in runs.glob(f"*-{run_id}-*/dbt.log")),
                  key=lambda p: p.stat().st_mtime)
    assert len(logs) >= 2, logs
    for log in logs[1:]:
        text = log.read_text()
        assert "Partial parsing enabled" in text and "Unable to do partial parsing" not in text, (
            log, text[-3000:])


def test_each_partition_counts_its_own_day(built):
    """dagster/row_count of a daily fact's partition is that day's rows, not the table's."""
    for name, column in (("fct_lesson_events", "event_date"), ("fct_daily_learning_activity", "activity_date")):
        key = dg.AssetKey(["marts", name])
        per_day = dict(_warehouse_rows(built, f"select cast({column} as varchar), count(*) from marts.{name}"
                                              f" group by 1"))
        total = sum(per_day.values())
        busiest = max(per_day, key=per_day.get)
        days = [busiest, min(per_day), built.platform.dbt_daily_facts.partitions_def.get_partition_keys()[0]]
        for day in days:
            (record,) = built.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[day]), limit=1).records
            counted = record.asset_materialization.metadata["dagster/row_count"].value
            assert counted == per_day.get(day, 0), (name, day, counted, per_day.get(day, 0))
        assert per_day[busiest] < total
    # One partition's run (tag dagster/partition, as the UI or a job backfill's runs per day
    # make): its window is that day, and its row count is the day's.
    day = min(per_day)
    run = built.defs.resolve_job_def("daily_facts").execute_in_process(
        instance=built.instance, partition_key=day)
    assert run.success
    (record,) = built.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["marts", "fct_daily_learning_activity"]),
                              asset_partitions=[day]), limit=1).records
    assert record.run_id == run.run_id
    assert record.asset_materialization.metadata["dagster/row_count"].value == per_day[day]


def test_every_company_is_exported_with_the_marts_rows(built):
    """run_all synced the `companies` partitions and exported them all in one run."""
    from pathlib import Path

    import duckdb

    from platform_assets.export_writers import DATA_AS_OF, REPORT_NAME
    from platform_assets.exports import COMPANIES, EXPORT_KEY

    companies = sorted(r[0] for r in _warehouse_rows(built, "select company_id from marts.dim_companies"))
    per_company = dict(_warehouse_rows(
        built, "select company_id, count(*) from marts.fct_enrollments group by company_id"))
    assert len(companies) >= 5 and sum(per_company.values()) > 0
    keys = built.instance.get_dynamic_partitions(COMPANIES.name)
    assert sorted(int(k) for k in keys) == companies
    assert built.instance.get_materialized_partitions(EXPORT_KEY) == set(keys)
    event = built.instance.get_latest_materialization_event(EXPORT_KEY)
    meta = event.asset_materialization.metadata
    as_of = dt.datetime.fromtimestamp(meta[DATA_AS_OF].value, dt.UTC).replace(tzinfo=None)
    assert meta["rows_by_company"].value == {str(c): per_company.get(c, 0) for c in companies}

    root = Path(built.platform.settings.export_uri)
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == sorted(f"company_id={c}/{REPORT_NAME}.{ext}" for c in companies for ext in ("csv", "parquet"))
    con = duckdb.connect()
    try:
        for company in companies:
            for ext in ("parquet", "csv"):
                path = str(root / f"company_id={company}" / f"{REPORT_NAME}.{ext}")
                n, ids, stamps = con.execute(
                    f"select count(*), list(distinct cast(company_id as bigint)), "
                    f"list(distinct cast({DATA_AS_OF} as timestamp)) from '{path}'").fetchone()
                assert n == per_company.get(company, 0), (company, ext)
                assert ids in ([company], [], None), (company, ext)
                assert all(abs((s - as_of).total_seconds()) < 1 for s in stamps or []), (company, ext)
    finally:
        con.close()

    # The dashboards were recorded as refreshed, from exactly the marts they read.
    for dashboard in built.platform.dashboards:
        record = built.instance.get_latest_materialization_event(dashboard.key)
        assert record is not None, dashboard.key
        inputs = record.asset_materialization.metadata["inputs_built_at"].value
        assert sorted(inputs) == sorted(k.to_user_string() for k in dashboard.marts)


def test_automation_follows_changed_sources(built, pg_env):
    first = dg.evaluate_automation_conditions(defs=built.defs, instance=built.instance)
    # Re-observing unchanged sources gives the same data versions and requests nothing.
    versions = _observe(built)
    quiet = dg.evaluate_automation_conditions(defs=built.defs, instance=built.instance, cursor=first.cursor)
    for r in quiet.results:
        if r.key in _requested(quiet):
            print(r.pprint())
    assert _requested(quiet) == set()
    before = built.instance.get_run_records(limit=1)[0].dagster_run.run_id
    assert _observe(built) == versions
    # ...and records no observation (Dagster would show the marts "Unsynced" after each one)
    rerun = built.instance.get_run_records(limit=1)[0].dagster_run.run_id
    assert rerun != before
    assert not built.instance.get_records_for_run(rerun, of_type=dg.DagsterEventType.ASSET_OBSERVATION).records

    pg_env.simulate(new_events=300, seed=11)
    after = _observe(built)
    changed = {name for name in after if after[name] != versions[name]}
    assert changed == CHANGED_BY_SIMULATOR
    assert not changed & UNTOUCHED_BY_SIMULATOR

    result = dg.evaluate_automation_conditions(defs=built.defs, instance=built.instance, cursor=quiet.cursor)
    expected = _stored_downstream(built, changed)
    assert expected, "something must sit downstream of the changed sources"
    # The daily facts are not automation's: the changes sensor requests the days that differ.
    daily = set(built.platform.dbt_daily_facts.keys)
    assert len(daily) == 2, "fct_lesson_events and fct_daily_learning_activity, built per day"
    assert not expected & daily
    # The BI copy reads the marts through virtual views and the daily facts: it is not
    # requested with the marts but after the days' runs, below.
    assert _requested(result) == expected - {BI_COPY_KEY}

    # The simulator's new events (now), late ones (1-5 days ago) and its edits and deletes of
    # the last week's events are the days that differ.
    facts = built.platform.daily_facts
    with dg.build_resources({"replica": built.defs.resources["replica"],
                             "warehouse": built.defs.resources["warehouse"]}) as res:
        days = facts.differing(res.replica, res.warehouse)
        today = dt.datetime.now(dt.UTC).date()
        assert days and all((today - dt.date.fromisoformat(d)).days <= 8 for d in days), days
        ranges, uncovered = facts.requests(days)
        assert uncovered == [] and ranges[0][0] == days[0] and ranges[-1][1] == days[-1]
        for first, last in ranges:
            run = built.defs.resolve_job_def("daily_facts").execute_in_process(
                instance=built.instance,
                tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
            )
            assert run.success
            assert {e.asset_key for e in run.get_asset_materialization_events()} == daily
            checks = [c for c in run.get_asset_check_evaluations() if c.check_name == "matches_replica"]
            assert [c.passed for c in checks] == [True]
        assert facts.differing(res.replica, res.warehouse) == []
    # Locally the BI copy holds fct_daily_learning_activity for the dashboards: automation
    # republishes it on the tick after the days' runs (there is no copy on pg).
    next_tick = dg.evaluate_automation_conditions(defs=built.defs, instance=built.instance, cursor=result.cursor)
    assert (BI_COPY_KEY in _requested(next_tick)) == (built.platform.settings.env == "local")


# Dagster's freshness daemon and automation conditions: no engine in it, so DuckDB only.
@pytest.mark.parametrize("built", ["local"], indirect=True)
def test_freshness_failure_requests_the_mart(built):
    graph = built.defs.resolve_asset_graph()
    marts = sorted(
        (k for k in graph.get_all_asset_keys() if k.path[0] == "marts" and graph.get(k).freshness_policy),
        key=lambda k: k.to_user_string(),
    )
    assert marts, "every mart carries a freshness policy"
    mart = next(k for k in marts if graph.get(k).partitions_def is None)
    policy = graph.get(mart).freshness_policy
    target = ModuleTarget(
        module_name="platform_assets.definitions", attribute="defs",
        working_directory=str(REPO_ROOT), location_name="platform_assets",
    )
    baseline = dg.evaluate_automation_conditions(defs=built.defs, instance=built.instance)
    later = dt.datetime.now(dt.UTC) + policy.fail_window.to_timedelta() + dt.timedelta(minutes=5)
    with create_test_daemon_workspace_context(target, built.instance) as workspace:
        with freeze_time(later):
            list(FreshnessDaemon().run_iteration(workspace))
            state = built.instance.get_freshness_state_records([mart])[mart]
            result = dg.evaluate_automation_conditions(
                defs=built.defs, instance=built.instance, cursor=baseline.cursor, evaluation_time=later
            )
    assert state.freshness_state.value == "FAIL"
    assert mart in _requested(result)


def _fact_rows(put) -> dict[int, tuple[dt.date, str]]:
    """event_id -> (event_date, row hash) of the daily fact, read from the warehouse."""
    if put.platform.settings.engine == "duckdb":
        import duckdb

        con = duckdb.connect(put.environ["DUCKDB_PATH"], read_only=True)
        try:
            rows = con.execute("select event_id, event_date, md5(t::varchar) from marts.fct_lesson_events t").fetchall()
        finally:
            con.close()
    else:
        import psycopg

        with psycopg.connect(put.environ["WAREHOUSE_PG_URL"]) as conn:
            rows = conn.execute("select event_id, event_date, md5(t::text) from marts.fct_lesson_events t").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def _execute_on_warehouse(put, statement: str, params: tuple) -> None:
    if put.platform.settings.engine == "duckdb":
        import duckdb

        con = duckdb.connect(put.environ["DUCKDB_PATH"])
        try:
            con.execute(statement.replace("%s", "?"), list(params))
        finally:
            con.close()
    else:
        import psycopg

        with psycopg.connect(put.environ["WAREHOUSE_PG_URL"], autocommit=True) as conn:
            conn.execute(statement, params)


def test_changes_sensor_and_the_reconciliation_check_see_a_day_the_warehouse_lost(built):
    """Days of the fact lost in the warehouse (writes that never happened, whatever Dagster
    recorded): the check fails with ERROR naming the day its run covers; an ordinary tick of
    the sensor requests exactly the recent day, the hourly full scan the old one too, and once
    their run is done the check passes and the sensor has nothing to request."""
    facts = built.platform.daily_facts
    resources = {"replica": built.defs.resources["replica"], "warehouse": built.defs.resources["warehouse"]}
    sensor = built.defs.resolve_sensor_def("daily_facts_changes")

    def tick(cursor: str | None = None):
        """A tick; without a cursor the full scan is due."""
        with dg.build_sensor_context(instance=built.instance, resources=resources, cursor=cursor) as context:
            return sensor.evaluate_tick(context)

    def ranges(result) -> list[tuple[str, str]]:
        return [(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
                for r in result.run_requests]

    with dg.build_resources(resources) as res:
        for first, last in facts.requests(facts.differing(res.replica, res.warehouse))[0]:  # earlier tests' leftovers
            assert built.defs.resolve_job_def("daily_facts").execute_in_process(
                instance=built.instance, tags={"dagster/asset_partition_range_start": first,
                                               "dagster/asset_partition_range_end": last}).success
        assert facts.differing(res.replica, res.warehouse) == []
        today = dt.datetime.now(dt.UTC).date()
        day = (today - dt.timedelta(days=3)).isoformat()
        old = (today - dt.timedelta(days=facts.recent_days + 6)).isoformat()
        assert old >= built.platform.settings.partitions_start
        for lost in (day, old):  # days with events: losing them changes what the warehouse holds
            assert res.warehouse.fetch(f"select count(*) from marts.fct_lesson_events where event_date = '{lost}'"
                                       )[0][0] > 0, lost
    quiet = tick()
    assert not quiet.run_requests and quiet.skip_message.startswith("all days"), quiet.skip_message
    ordinary = quiet.cursor  # the full scan just done: the next ticks compare the recent days

    for lost in (day, old):
        _execute_on_warehouse(built, "delete from marts.fct_lesson_events where event_date = %s", (lost,))
    tags = {"dagster/asset_partition_range_start": day, "dagster/asset_partition_range_end": day}
    check_key = dg.AssetCheckKey(facts.fact_key, "matches_replica")
    check_only = built.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(), asset_check_selection={check_key})
    # run as `make demo` runs it: the failed check is among what its summary asks to look at
    runner = Runner(built.platform, built.instance, progress=lambda _m: None)
    runner.run("reconciliation", check_only, tags=tags)
    [evaluation] = runner.failed_checks
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert day in evaluation.description and evaluation.metadata["differing_days"].value == day
    assert [a for a in runner.attention if "matches_replica failed (ERROR)" in a and day in a], runner.attention

    assert ranges(tick(ordinary)) == [(day, day)]
    requested = tick()
    assert ranges(requested) == [(old, old), (day, day)]
    run = built.defs.resolve_job_def("daily_facts").execute_in_process(instance=built.instance, tags={
        **requested.run_requests[0].tags, "dagster/asset_partition_range_end": day})
    assert run.success
    assert [c.passed for c in run.get_asset_check_evaluations() if c.check_name == "matches_replica"] == [True]
    assert not tick().run_requests


def test_cli_backfill_changes_rows_only_inside_the_range(built, pg_env):
    import subprocess
    import sys
    from pathlib import Path

    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=4), today - dt.timedelta(days=2)
    before = _fact_rows(built)
    # Late events land 1..5 days back, so some fall inside the range and some outside;
    # today's events are outside too.
    pg_env.simulate(new_events=1500, seed=23, late_fraction=0.6)
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run(
        [str(dagster), "asset", "materialize", "-m", "platform_assets.definitions",
         "--select", "marts/fct_lesson_events", "--partition-range", f"{first}...{last}"],
        env=built.environ, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # One dbt invocation for the whole range.
    assert proc.stdout.count("dbt build") + proc.stderr.count("dbt build") <= 2
    after = _fact_rows(built)
    changed_days = {
        (after.get(k) or before.get(k))[0]
        for k in set(before) | set(after)
        if before.get(k) != after.get(k)
    }
    assert changed_days, "the late events inside the range must appear"
    assert all(first <= d <= last for d in changed_days), sorted(changed_days)
    assert len(after) > len(before)


# The step's own check of dbt's results, the same on every engine: DuckDB only.
@pytest.mark.parametrize("built", ["local"], indirect=True)
def test_a_selected_asset_dbt_did_not_build_fails_the_step(built, tmp_path):
    """dbt can succeed without building an asset its step selected: the node was missing from
    the manifest of the project dbt ran (once dbt's partial parsing dropped a YAML snapshot;
    here the project dbt runs lacks it, while Dagster's manifest has it). dagster-dbt alone
    only logs that the op "did not yield expected outputs"; the step fails instead, naming
    the asset and why."""
    import shutil

    from dagster_dbt import DbtProject

    from platform_assets.dbt_assets import build_dbt_assets
    from platform_assets.dbt_project import read_manifest

    platform = built.platform
    copy = tmp_path / "dbt"
    shutil.copytree(platform.project.project_dir, copy, ignore=shutil.ignore_patterns("target", "logs"))
    project = DbtProject(project_dir=copy, profiles_dir=copy, target=platform.project.target,
                         target_path=platform.project.target_path)
    project.manifest_path.parent.mkdir(parents=True)
    # Dagster's graph has it (the one the platform read: the file may be rewritten meanwhile)
    project.manifest_path.write_text(json.dumps(platform.manifest))
    snapshots_yml = copy / "snapshots" / "_snapshots.yml"
    text = snapshots_yml.read_text()
    start, end = text.index("  - name: snp_app__users"), text.index("  - name: snp_app__subscriptions")
    snapshots_yml.write_text(text[:start] + text[end:])  # the project dbt runs has not
    models, _daily = build_dbt_assets(project, read_manifest(project), platform.settings)
    resources = {**built.defs.resources, "dbt": built.defs.resources["dbt"].model_copy(
        update={"project_dir": str(copy), "profiles_dir": str(copy)})}
    defs = dg.Definitions(assets=[models], resources=resources)
    snapshots = {key for key in models.keys if key.path[0] == "snapshots"}
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=snapshots)
    result = job.execute_in_process(instance=built.instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    message = failure.user_failure_data.description if failure.user_failure_data else failure.error.message
    assert "without building snapshots/snp_app__users" in message, message
    assert "not in the manifest dbt parsed" in message, message
    built_keys = {e.asset_key for e in result.get_asset_materialization_events()}
    assert built_keys == {dg.AssetKey(["snapshots", "snp_app__subscriptions"])}
