"""The dbt project on both local engines (DuckDB, PostgreSQL) against a real primary +
streaming replica: builds pass (data tests, unit tests, reconciliation), federation is
read-only and idempotent, window runs touch only their window, and incremental = full
refresh after five rounds of new and late events (edits and deletes: tests/platform/test_churn.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import CHURN_EVENTS, CHURN_ROUNDS, ENGINES, INCREMENTAL_MARTS, Scenario


def test_builds_pass_with_every_kind_of_test(dbt_scenario: Scenario):
    for step in ("build_1", "build_2", "build_3", "full_refresh"):
        for engine in ENGINES:
            result = dbt_scenario.steps[step][engine]
            statuses = result.statuses()
            failed = {
                k: v for k, v in statuses.items()
                if v not in ("success", "pass")
                and not (k.startswith("exposure.") and v == "no-op")  # exposures run nothing
            }
            assert not failed, f"[{engine}] {step}: {failed}"
            kinds = {uid.split(".")[0] for uid in statuses}
            expected = {"model", "test", "unit_test", "operation"}
            if step != "build_3":  # build_3 selects only the incremental facts
                expected.add("snapshot")
            assert expected <= kinds, kinds
            unit_tests = [u for u in statuses if u.startswith("unit_test.")]
            # all four; build_3 has the three of the incremental facts
            assert len(unit_tests) == (3 if step == "build_3" else 4), unit_tests


WINDOW_UNIT_TEST = "unit_test.reporting.fct_lesson_events.fct_lesson_events_window_takes_exactly_the_window"


@pytest.mark.parametrize("engine", ENGINES)
def test_documented_full_refresh_rebuilds_both_daily_facts(dbt_scenario: Scenario, engine: str):
    """`dbt build --full-refresh` (dbt/README.md) exits 0, runs every unit test (the window's
    too: it states its own mode) and rebuilds both daily-partitioned facts, the incremental
    one in full."""
    result = dbt_scenario.steps["full_refresh"][engine]
    assert result.args == ["build", "--full-refresh"]
    assert result.returncode == 0, result.describe()
    daily = {
        uid for uid, node in dbt_scenario.pg_manifest["nodes"].items()
        if node["resource_type"] == "model" and "daily_partitioned" in node["tags"]
    }
    assert daily == {"model.reporting.fct_lesson_events", "model.reporting.fct_daily_learning_activity"}
    statuses = result.statuses()
    assert {uid: statuses.get(uid) for uid in daily} == dict.fromkeys(daily, "success")
    assert statuses[WINDOW_UNIT_TEST] == "pass"
    assert dbt_scenario.full_refresh_loaded_by[engine] == {"full_refresh"}


def test_a_window_with_full_refresh_is_still_refused(dbt_scenario: Scenario):
    """Unit tests aside, a window and --full-refresh together still fail before anything is
    built (macros/incremental.sql, event_window). The window step's target folder and
    window, so dbt reuses its parse."""
    window = dbt_scenario.window
    result = dbt_scenario.runners["duckdb"](
        "run", "--select", "fct_lesson_events", "--full-refresh", "--event-time-start", window["window_start"],
        "--event-time-end", window["window_end"], check=False, target_dir="target-window")
    assert not result.ok and "contradict each other" in result.output, result.describe()
    assert result.statuses().get("model.reporting.fct_lesson_events") in (None, "error")


# Source tests that DuckDB sends to the replica whole (macros/tests/on_replica.sql).
ON_REPLICA_TESTS = ("source_not_null_", "source_unique_", "source_relationships_", "source_not_after_soft_delete_")


def test_source_tests_on_duckdb_run_on_the_replica(dbt_scenario: Scenario):
    """On DuckDB a not_null / unique / relationships / not_after_soft_delete test over tables
    of the replica only is run there (postgres_query); every other test, and every test on
    pg, is dbt's SQL as it is. That they still fail with the right counts is
    tests/reliability/test_dirty_data.py's."""
    for engine in ENGINES:
        compiled = {
            r["unique_id"].split(".")[2]: r.get("compiled_code") or ""
            for r in dbt_scenario.steps["build_1"][engine].results if r["unique_id"].startswith("test.")
        }
        sent = {name for name, sql in compiled.items() if "postgres_query(" in sql}
        kinds = {name for name in compiled if name.startswith(ON_REPLICA_TESTS)}
        assert len(kinds) > 40, sorted(kinds)  # the sources' key and reference tests
        expected = kinds if engine == "duckdb" else set()
        assert sent == expected, (engine, sorted(sent ^ expected))


def test_builds_never_change_the_operational_data(dbt_scenario: Scenario):
    for step, (before, after) in dbt_scenario.checksums.items():
        assert before == after, f"operational tables changed during {step}"


def test_federation_is_idempotent_on_postgres(dbt_scenario: Scenario):
    first = dbt_scenario.pg_objects["after_build_1"]
    assert len(first["foreign_tables"]) == 12  # 11 replica tables + the catalog helper
    assert first["server"] and first["user_mappings"]
    # The second build re-created nothing: every federated object keeps its identity.
    assert dbt_scenario.pg_objects["after_build_2"] == first
    assert "federation (postgres): created server replica" in dbt_scenario.steps["build_1"]["pg"].output
    for step in ("build_2", "window", "build_3", "full_refresh"):
        assert "federation (postgres): up to date" in dbt_scenario.steps[step]["pg"].output, step


def test_federation_on_duckdb_attaches_read_only_per_run(dbt_scenario: Scenario):
    for step in dbt_scenario.steps:
        assert "attached the replica read-only" in dbt_scenario.steps[step]["duckdb"].output
    # Nothing of the federation persists in the warehouse file.
    assert "replica" not in dbt_scenario.warehouses["duckdb"].attached_catalogs()


# Another process reading the DuckDB file: it holds the file's lock until it exits.
_READER = "import sys, time, duckdb; c = duckdb.connect(sys.argv[1], read_only=True); print('reading', flush=True); " \
          "time.sleep(600)"


def _reader(path: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _READER, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "reading"
    return proc


def _stop_when_dbt_connects(reader: subprocess.Popen, log: Path, offset: int, after_s: float) -> threading.Thread:
    """Stop the reader `after_s` seconds after dbt logs its thread count (a new line in its
    dbt.log past `offset`): dbt opens the warehouse right after that line."""
    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with open(log, errors="replace") as f:
                f.seek(offset)
                if "Concurrency:" in f.read():
                    time.sleep(after_s)
                    break
            time.sleep(0.05)
        reader.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_duckdb_run_waits_for_a_reader_of_the_file(dbt_scenario: Scenario):
    """A reader of the warehouse file (the export sensor, a notebook) delays a dbt run by a
    few seconds instead of failing it: the local profile's connect attempts (profiles.yml)."""
    duck = dbt_scenario.runners["duckdb"]
    path, log = duck.env["DUCKDB_PATH"], duck.work_dir / "logs" / "dbt.log"
    reader = _reader(path)
    try:
        once = duck("run", "--select", "dim_date", check=False, extra_env={"DUCKDB_CONNECT_ATTEMPTS": "1"})
    finally:
        reader.kill()
        reader.wait()
    assert not once.ok and "Could not set lock" in once.output, once.describe()
    # The default attempts (again after 1, 2 and 4 s): the reader lets go 2 s after dbt
    # starts to connect, so dbt's first attempt meets the lock and a later one gets it.
    reader = _reader(path)
    watcher = _stop_when_dbt_connects(reader, log, log.stat().st_size, after_s=2.0)
    try:
        waited = duck("run", "--select", "dim_date", check=False)
    finally:
        watcher.join(timeout=310)
        reader.kill()
        reader.wait()
    assert waited.ok, waited.describe()
    assert waited.statuses() == {"model.reporting.dim_date": "success"} | {
        k: v for k, v in waited.statuses().items() if k.startswith("operation.")}


@pytest.mark.parametrize("engine", ENGINES)
def test_window_run_replaces_exactly_the_window(dbt_scenario: Scenario, engine: str):
    check = dbt_scenario.window_check[engine]
    columns = check["after"]["columns"]
    occurred, loaded_by = columns.index("occurred_at"), columns.index("loaded_by")
    start, end = dbt_scenario.window["window_start"], dbt_scenario.window["window_end"]
    before, after = check["before"]["rows"], check["after"]["rows"]

    def inside(row) -> bool:
        return start <= row[occurred].isoformat(" ") < end

    # Outside the window: not one row added, removed or changed.
    assert {k: r for k, r in before.items() if not inside(r)} == {
        k: r for k, r in after.items() if not inside(r)
    }
    # Inside: exactly the replica's events of the window, all (re)loaded by this run,
    # including the late events of the last round that no run had loaded yet.
    in_window = {k: r for k, r in after.items() if inside(r)}
    assert set(in_window) == check["replica_ids"]
    assert {r[loaded_by] for r in in_window.values()} == {"window"}
    assert set(in_window) - set(before), "the window should have picked up late events"


@pytest.mark.parametrize("engine", ENGINES)
def test_window_run_recomputes_the_windows_days_of_the_daily_activity(dbt_scenario: Scenario, engine: str):
    """fct_daily_learning_activity in a window run (a daily partition): the window's days
    exactly as a full rebuild computes them from the same fct_lesson_events, every other day
    untouched."""
    check = dbt_scenario.activity_window[engine]
    start, end = dbt_scenario.window["window_start"], dbt_scenario.window["window_end"]

    def split(rows: dict) -> tuple[dict, dict]:
        inside = {k: r for k, r in rows.items() if start <= k[2].isoformat() < end}
        return inside, {k: r for k, r in rows.items() if k not in inside}

    before_in, before_out = split(check["before"]["rows"])
    after_in, after_out = split(check["after"]["rows"])
    rebuilt_in, _ = split(check["rebuilt"]["rows"])
    assert after_out == before_out, "a day outside the window changed"
    assert after_in == rebuilt_in, "the window's days differ from a full rebuild"
    assert after_in != before_in, "the window's late events should have changed its days"
    print(f"\ndaily activity [{engine}]: {len(after_in)} rows of the window's days recomputed, "
          f"{len(after_out)} outside it untouched")


def test_every_incremental_model_is_compared(dbt_scenario: Scenario):
    """incremental = full refresh covers every incremental model the project has."""
    incremental = {
        node["name"] for node in dbt_scenario.pg_manifest["nodes"].values()
        if node["resource_type"] == "model" and node["config"].get("materialized") == "incremental"
    }
    assert incremental == set(INCREMENTAL_MARTS)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mart", sorted(INCREMENTAL_MARTS))
def test_incremental_equals_full_refresh(dbt_scenario: Scenario, engine: str, mart: str):
    incremental = dbt_scenario.incremental[engine][mart]
    full = dbt_scenario.full_refresh[engine][mart]
    assert len(incremental) > 0
    assert len(incremental) == len(full)
    mismatched = [(a, b) for a, b in zip(incremental, full, strict=True) if a != b]
    assert not mismatched, f"{len(mismatched)} rows differ, e.g. {mismatched[:3]}"
    print(f"\nincremental = full [{engine}] {mart}: {len(full)} rows equal after "
          f"{len(dbt_scenario.simulated)} rounds of changes and {_incremental_runs(dbt_scenario)} incremental runs")


def _incremental_runs(scenario: Scenario) -> int:
    """Incremental runs without a window (the window run comes on top)."""
    return sum(1 for step in scenario.steps if step in ("build_2", "build_3") or step.startswith("churn_"))


def test_simulated_changes_reached_the_marts(dbt_scenario: Scenario):
    """Guard against a vacuous equality: the rounds really changed what was compared."""
    first, churn = dbt_scenario.simulated[:2], dbt_scenario.simulated[2:]
    assert all(r["lesson_events_inserted"] == 1500 for r in first)
    assert len(churn) == len(CHURN_ROUNDS)
    assert all(r["lesson_events_inserted"] == CHURN_EVENTS for r in churn)
    # every churn round brings late events, status changes and certificates
    assert all(r["lesson_events_late"] > 0 and r["enrollments_completed"] > 0 for r in churn)
    assert sum(r["lesson_events_late"] for r in dbt_scenario.simulated) > 0
    assert sum(r["enrollments_completed"] for r in dbt_scenario.simulated) > 0
    for engine in ENGINES:
        runs = dbt_scenario.steps
        assert runs["build_2"][engine].statuses()["model.reporting.fct_lesson_events"] == "success"
        for step in (s for s in runs if s.startswith("churn_")):
            statuses = runs[step][engine].statuses()
            for mart in INCREMENTAL_MARTS:
                assert statuses[f"model.reporting.{mart}"] == "success", (engine, step, statuses)


def test_docs_generate_on_local(dbt_scenario: Scenario, dbt_extras):
    assert dbt_extras.docs_generate.ok, dbt_extras.docs_generate.describe()
    catalog = (dbt_scenario.runners["duckdb"].work_dir / "target" / "catalog.json").read_text()
    assert '"source.reporting.app.lesson_events"' in catalog
    assert '"model.reporting.fct_lesson_events"' in catalog


def test_report_timings(dbt_scenario: Scenario, dbt_extras, capsys):
    """Not a check: prints where the module's time goes (pytest -s)."""
    with capsys.disabled():
        steps = ", ".join(f"{k} {v:.0f}s" for k, v in dbt_scenario.seconds.items())
        print(f"\ndbt scenario: {steps}; extras {dbt_extras.seconds:.0f}s")
