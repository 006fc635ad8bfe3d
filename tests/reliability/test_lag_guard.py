"""Lag guard: with WAL replay paused on the replica and writes on the primary, the replay lag
passes MAX_REPLICA_LAG_SECONDS (1 s here). The observation records it, the replica_lag check
fails (ERROR), and automation requests no table although upstream data changed, the reason
being the labelled part of the condition; after replay resumes, the next observation and
check pass and the held refreshes are requested."""

from __future__ import annotations

import os
import time
from unittest import mock

import dagster as dg
from localenv.simulator import simulate

from platform_assets.automation import REPLICA_LAG_GUARD_LABEL
from platform_assets.checks import REPLICA_LAG_CHECK, replica_lag_check_keys

from ..platform.conftest import platform_under_test
from .faults import observe

MAX_LAG = 1.0


def _requested(result: dg.EvaluateAutomationConditionsResult) -> set[dg.AssetKey]:
    return {r.key for r in result.results if r.true_subset.size > 0 and isinstance(r.key, dg.AssetKey)}


def _nodes(result):
    yield result
    for child in result.child_results:
        yield from _nodes(child)


def _held_by_lag(result: dg.EvaluateAutomationConditionsResult) -> set[dg.AssetKey]:
    """Assets whose upstream-change part is true and whose lag guard is false."""
    held = set()
    for top in result.results:
        if not isinstance(top.key, dg.AssetKey):
            continue
        nodes = list(_nodes(top))
        guards = [n for n in nodes if n.condition.get_label() == REPLICA_LAG_GUARD_LABEL]
        changed = [n for n in nodes[1:] if (n.condition.get_label() or "").endswith("upstream data changed")
                   or n.condition.get_label() == "mart: upstream data changed or stale"]
        if guards and changed and changed[0].true_subset.size > 0 and guards[0].true_subset.size == 0:
            held.add(top.key)
    return held


def _lag_check_results(result: dg.ExecuteInProcessResult) -> list[dg.AssetCheckEvaluation]:
    return [
        e.event_specific_data for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == REPLICA_LAG_CHECK
    ]


def _until_lag_checks_pass(run_checks) -> list[dg.AssetCheckEvaluation]:
    """Run the replica_lag checks until they all pass.

    Caught up, the lag reading can still show a few seconds for a moment (a trailing WAL
    record without a transaction: receive != replay, and the last replayed transaction is
    older). Every check must have reported: an empty result is not a pass.
    """
    for _ in range(15):
        checks = run_checks()
        if checks and all(c.passed for c in checks):
            return checks
        time.sleep(1)
    raise AssertionError(f"the replica_lag checks never passed: {[c.description for c in checks]}")


def _observe_until_lag_passes(put) -> None:
    """Observe until the observation's replica_lag checks ran and passed."""
    def observed_checks():
        result = observe(put)
        assert result.success
        return _lag_check_results(result)
    _until_lag_checks_pass(observed_checks)


def _checks_alone(put) -> list[dg.AssetCheckEvaluation]:
    """The replica_lag checks run without their assets (the UI's "Execute" on a check): every
    one reports, and no source is observed."""
    lag_checks = set(replica_lag_check_keys(t.key for t in put.platform.federated_tables))
    alone = put.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(), asset_check_selection=lag_checks,
    ).execute_in_process(instance=put.instance, raise_on_error=False)
    assert alone.success and alone.get_asset_observation_events() == []
    checks = _lag_check_results(alone)
    assert {(c.asset_key, c.check_name) for c in checks} == {(k.asset_key, k.name) for k in lag_checks}
    return checks


def test_lagging_replica_holds_refreshes_until_it_recovers(pg_env, tmp_path):
    cluster = pg_env.cluster
    with mock.patch.dict(os.environ, {"MAX_REPLICA_LAG_SECONDS": str(MAX_LAG)}), \
            platform_under_test(pg_env, tmp_path, "local") as put:
        # The previous test on this cluster may have left replay a second behind.
        pg_env.wait_for_replay()
        _observe_until_lag_passes(put)
        # Nothing changed: every check still reports, and (unless the lag reading flipped)
        # no source is recorded again.
        unchanged = observe(put)
        unchanged_checks = _lag_check_results(unchanged)
        assert len(unchanged_checks) == len(put.platform.federated_tables)
        if all(c.passed for c in unchanged_checks):
            assert unchanged.get_asset_observation_events() == []
        _until_lag_checks_pass(lambda: _checks_alone(put))  # alone, too
        first = dg.evaluate_automation_conditions(defs=put.defs, instance=put.instance)
        quiet = dg.evaluate_automation_conditions(defs=put.defs, instance=put.instance, cursor=first.cursor)
        assert _requested(quiet) == set()

        # Change A reaches the replica; then replay stops while change B is written.
        pg_env.simulate(new_events=200, seed=31)
        paused_at = time.monotonic()
        cluster.pause_replay()
        try:
            with pg_env.primary() as conn:
                simulate(conn, new_events=200, seed=32)
            lag = 0.0
            while lag <= MAX_LAG * 1.5:
                assert time.monotonic() - paused_at < 60, f"lag stayed at {lag}s"
                time.sleep(0.2)
                lag = cluster.replay_lag_seconds()
            lagging = observe(put)
            assert lagging.success
            observations = lagging.get_asset_observation_events()
            recorded = {e.asset_key.path[-1]: e.event_specific_data.asset_observation.metadata for e in observations}
            assert recorded and all(m["replica_lag_exceeded"].value is True for m in recorded.values())
            observed_lag = min(m["replica_lag_seconds"].value for m in recorded.values())
            checks = _lag_check_results(lagging)
            assert len(checks) == len(put.platform.federated_tables)
            assert all(not c.passed and c.severity == dg.AssetCheckSeverity.ERROR for c in checks)
            logs = [r.user_message for r in put.instance.all_logs(lagging.run_id)]
            assert any("exceeds MAX_REPLICA_LAG_SECONDS" in m for m in logs)
            assert all(not c.passed and c.metadata["lag_seconds"].value > MAX_LAG for c in _checks_alone(put))

            held = dg.evaluate_automation_conditions(defs=put.defs, instance=put.instance, cursor=quiet.cursor)
            held_keys = _held_by_lag(held)
            waited = time.monotonic() - paused_at
            print(f"\nlag guard: replay paused, lag {lag:.1f}s > {MAX_LAG:g}s after {waited:.1f}s;"
                  f" observation recorded {observed_lag:.1f}s on {len(recorded)} sources, {len(checks)} checks failed;"
                  f" requested {len(_requested(held))}, held by lag {len(held_keys)}")
            assert _requested(held) == set()
            assert any(k.path[0] == "marts" for k in held_keys), "the marts must be held, with the lag as reason"
        finally:
            cluster.resume_replay()
            caught_up = pg_env.wait_for_replay()

        _observe_until_lag_passes(put)
        resumed = dg.evaluate_automation_conditions(defs=put.defs, instance=put.instance, cursor=held.cursor)
        requested = _requested(resumed)
        print(f"lag recovered: replay caught up in {caught_up:.2f}s; {len(requested)} assets requested "
              f"({len(held_keys)} were held)")
        # The daily fact's partition and what is below it follow on later ticks.
        graph = put.defs.resolve_asset_graph()
        daily = set(put.platform.dbt_daily_facts.keys)
        with_daily = dg.AssetSelection.assets(*daily).downstream().resolve(graph)
        marts = {k for k in requested if k.path[0] == "marts"}
        assert marts and marts >= {k for k in held_keys if k.path[0] == "marts"} - with_daily
