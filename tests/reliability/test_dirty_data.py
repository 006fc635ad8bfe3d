"""Dirty source data (DuckDB target, the session's replica): the platform reads `app_dirty`, a
copy of the operational schema with known bad rows (dirty_data.py), and the first build runs
through a real Dagster instance and real dbt in the order of `localenv.demo.run_all`, going on
past failed runs.

- No crash: a run may fail only because dbt failed (tests, or models left unbuilt below them)
  or a blocking check failed; any other error fails the test.
- Each injected kind fails its check with exactly the number of rows injected, at the declared
  severity (error = blocking check, warn = warning); every other source check passes.
- Inside the dbt build, models below a failed single-parent error test are skipped; dbt does
  not skip below a failed multi-parent test (`relationships`), nor below a warning.
- Across runs, what is below the skipped view is not built either (the daily fact and the
  marts over it fail on the missing view rather than load rows the tests rejected).
  Known gap: once the view exists from an earlier clean build, the daily fact's own runs do
  not execute the source tests, and automation does not hold it on their failure (an
  `any_checks_match(check_failed())` guard over dbt's source checks did not see them in a
  full evaluation with dagster 1.13.27); its own error tests (not_null/unique on the fact)
  still fail that run.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import dagster as dg
from dagster_dbt.errors import DagsterDbtCliRuntimeError
from localenv import demo

from ..platform.conftest import platform_under_test
from .dirty_data import DIRTY_SCHEMA, create_dirty_schema, drop_dirty_schema
from .faults import QUIET

FAILED_ROW_COUNT = "dagster_dbt/failed_row_count"

# kind -> (source table, column, dbt generic test) of the test that must catch it
CAUGHT_BY = {
    "duplicate_event_id": ("lesson_events", "event_id", "unique"),
    "null_event_id": ("lesson_events", "event_id", "not_null"),
    "orphan_event_user": ("lesson_events", "user_id", "relationships"),
    "future_event": ("lesson_events", "occurred_at", "not_in_future"),
    "negative_duration": ("lesson_events", "seconds_spent", "not_negative"),
    "event_after_soft_delete": ("lesson_events", "occurred_at", "not_after_soft_delete"),
    "orphan_enrollment_course": ("enrollments", "course_id", "relationships"),
}

# Dagster errors a failed run may carry: dbt exited non-zero, a blocking check failed.
EXPECTED_ERRORS = {DagsterDbtCliRuntimeError.__name__, "DagsterAssetCheckFailedError"}


class _Run:
    def __init__(self, label: str, planned: set[dg.AssetKey], result: dg.ExecuteInProcessResult):
        self.label, self.planned, self.result = label, planned, result
        self.materialized = {e.asset_key for e in result.get_asset_materialization_events()}
        self.errors = [
            (e.step_key, e.step_failure_data.error.cls_name if e.step_failure_data.error else None,
             (e.step_failure_data.error.message if e.step_failure_data.error else "")[:300])
            for e in result.get_step_failure_events()
        ]


def _tolerant_runner(runs: list[_Run]):
    """demo.Runner that records every run and goes on past a failed one (run_all stops)."""

    class TolerantRunner(demo.Runner):
        def run(self, label: str, job: dg.JobDefinition, tags: dict | None = None, planned=frozenset()) -> None:
            result = job.execute_in_process(
                instance=self.instance, tags=tags or {}, raise_on_error=False, run_config=QUIET,
            )
            planned = set(job.asset_layer.selected_asset_keys) if job.asset_layer else set()
            run = _Run(label, planned, result)
            runs.append(run)
            self.materialized.update(run.materialized)

    return TolerantRunner


def _dbt_results(put, run_id: str) -> dict[str, tuple[str, str]]:
    """unique_id -> (status, message) from the run_results.json of the run's dbt invocations."""
    base = Path(put.platform.project.project_dir) / put.platform.project.target_path / "runs"
    out = {}
    for path in base.glob(f"*-{run_id[:7]}-*/run_results.json"):
        for r in json.loads(path.read_text())["results"]:
            out[r["unique_id"]] = (r["status"], (r.get("message") or "")[:200])
    return out


def _test_node(manifest: dict, table: str, column: str, test: str) -> dict:
    """The generic test `test` declared on column `column` of source `app.table`."""
    (node,) = [
        n for n in manifest["nodes"].values()
        if n["resource_type"] == "test" and (n.get("test_metadata") or {}).get("name") == test
        and n.get("column_name") == column and n["name"].startswith(f"source_{test}_app_{table}_{column}")
    ]
    return node


def _latest_check(put, key: dg.AssetCheckKey) -> dg.AssetCheckEvaluation | None:
    record = put.instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    data = record.event.dagster_event.event_specific_data if record and record.event else None
    return data if isinstance(data, dg.AssetCheckEvaluation) else None


def test_dirty_source_data(pg_env, tmp_path):
    with pg_env.cluster.primary.connect("saas") as admin:
        injected = create_dirty_schema(admin, pg_env.values["REPLICA_USER"])
    pg_env.wait_for_replay()
    try:
        with platform_under_test(pg_env, tmp_path, "local", overrides={"REPLICA_SCHEMA": DIRTY_SCHEMA}) as put:
            _check_dirty_data(pg_env, put, injected)
    finally:
        with pg_env.cluster.primary.connect("saas") as admin:
            drop_dirty_schema(admin)
        pg_env.wait_for_replay()


def _check_dirty_data(pg_env, put, injected: dict[str, int]) -> None:
    manifest = put.platform.manifest
    graph = put.defs.resolve_asset_graph()
    specs = {s.key: s for a in (put.platform.dbt_models, put.platform.dbt_daily_facts)
             for s in a.check_specs}

    # -- the first build, in run_all's order, going on past failed runs ------------------------
    runs: list[_Run] = []
    with mock.patch.object(demo, "Runner", _tolerant_runner(runs)):
        demo.run_all(put.platform, put.instance, progress=lambda _m: None)
    dbt_by_run = {run.label: _dbt_results(put, run.result.run_id) for run in runs}

    # No crash: a failed run failed in dbt; dbt's errors are models reading a relation that a
    # failed blocking test left unbuilt earlier (skipped, or itself in error for that reason).
    unbuilt: set[str] = set()
    print("\nfirst build (run_all order, not stopping at a failed run):")
    for run in runs:
        results = dbt_by_run[run.label]
        statuses: dict[str, list[str]] = {}
        for uid, (status, _m) in results.items():
            statuses.setdefault(status, []).append(uid.split(".")[2])
        print(f"  {run.label:<36} {'ok' if run.result.success else 'FAILED':<7}"
              f" {len(run.materialized)}/{len(run.planned)} materialized; dbt: "
              + ", ".join(f"{k} {len(v)}" for k, v in sorted(statuses.items())))
        if not run.result.success:
            assert run.errors and {e[1] for e in run.errors} <= EXPECTED_ERRORS, run.errors
        for uid, (status, message) in results.items():
            if uid.startswith("model.") and status == "error":
                assert "does not exist" in message and any(f" {name} " in message for name in unbuilt), (uid, message)
        unbuilt |= {uid.split(".")[2] for uid, (status, _m) in results.items()
                    if uid.startswith("model.") and status in ("skipped", "error")}

    # -- every injected kind is caught by its check, with its count and severity ---------------
    print(f"\n  {'kind':<26} {'check':<84} {'severity':<8} {'blocking':<8} {'failed rows':>11}")
    caught: dict[str, dg.AssetCheckKey] = {}
    for kind, (table, column, test) in CAUGHT_BY.items():
        node = _test_node(manifest, table, column, test)
        key = dg.AssetCheckKey(dg.AssetKey(["federated", table]), node["name"])
        caught[kind] = key
        declared = (node["config"].get("severity") or "error").upper()
        evaluation = _latest_check(put, key)
        assert evaluation is not None, f"{kind}: check {key.to_user_string()} has no result"
        failed_rows = evaluation.metadata[FAILED_ROW_COUNT].value
        print(f"  {kind:<26} {key.to_user_string():<84} {evaluation.severity.value:<8}"
              f" {specs[key].blocking!s:<8} {failed_rows:>11}")
        assert not evaluation.passed, kind
        assert failed_rows == injected[kind], (kind, failed_rows, injected[kind])
        assert evaluation.severity.value == declared, (kind, evaluation.severity, declared)
        assert specs[key].blocking is (declared == "ERROR"), kind
    # Every other check on the sources passed: each kind is caught by its own check only.
    source_keys = {t.key for t in put.platform.federated_tables}
    other = [k for k in specs if k.asset_key in source_keys and k not in caught.values()]
    not_passed = [k.to_user_string() for k in other if not (_latest_check(put, k) and _latest_check(put, k).passed)]
    assert not not_passed, not_passed

    # -- (1) inside the dbt build: skipped below failed single-parent error tests only ---------
    first = next(run for run in runs if run.label.startswith("staging"))
    results = dbt_by_run[first.label]
    skipped = {k for k in first.planned - first.materialized}
    skipped_models = {uid.split(".")[2] for uid, (status, _m) in results.items()
                      if uid.startswith("model.") and status == "skipped"}
    # What sits below a failed error test with one parent (the source) inside this run's selection.
    single_parent_failed = [caught[k] for k in ("duplicate_event_id", "null_event_id", "negative_duration")]
    below_single = (dg.AssetSelection.assets(*{k.asset_key for k in single_parent_failed}).downstream()
                    .resolve(graph) & first.planned)
    below_multi_or_warn = (dg.AssetSelection.assets(dg.AssetKey(["federated", "enrollments"])).downstream()
                           .resolve(graph) & first.planned)
    print(f"\n  inside the first dbt build: skipped {sorted(k.to_user_string() for k in skipped)}"
          f" (dbt: {sorted(skipped_models)});"
          f" built below the failed relationships test on enrollments:"
          f" {sorted(k.to_user_string() for k in below_multi_or_warn & first.materialized)}")
    assert skipped == below_single and skipped, (skipped, below_single)
    assert {k.path[-1] for k in skipped} == skipped_models
    assert below_multi_or_warn and below_multi_or_warn <= first.materialized
    # Marts over the fact: never built in the first build (the fact could not be built).
    fact = dg.AssetKey(["marts", "fct_lesson_events"])
    assert fact in put.platform.dbt_daily_facts.keys
    later = [run for run in runs if run.planned & (dg.AssetSelection.assets(fact).downstream().resolve(graph))]
    not_built = set().union(*(run.planned - run.materialized for run in later))
    print(f"  not built below the skipped view: {sorted(k.to_user_string() for k in not_built)}")
    assert fact in not_built
