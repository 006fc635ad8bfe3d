"""The asset graph: validates, matches the reviewed snapshot, every dbt node exactly once,
and the webserver's GraphQL API serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from .conftest import REPO_ROOT, platform_under_test

SNAPSHOT = Path(__file__).with_name("asset_graph.snapshot.json")
DAGSTER = Path(sys.executable).parent / "dagster"


@pytest.fixture(scope="module")
def local_platform(pg_env, tmp_path_factory):
    with platform_under_test(pg_env, tmp_path_factory.mktemp("graph"), "local") as put:
        yield put


def graph_as_dict(defs: dg.Definitions) -> dict[str, list[str]]:
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
        for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    }


def test_definitions_validate(local_platform):
    proc = subprocess.run(
        [str(DAGSTER), "definitions", "validate", "-m", "platform_assets.definitions"],
        env=local_platform.environ, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # `validate` prints only pass/fail, and the CLI's plain `asset list` leaves external assets
    # (the dashboards) out; selected by key, the CLI prints those the code location defines
    # and drops unknown keys.
    expected = {d.key.to_user_string() for d in local_platform.platform.dashboards}
    expected.add("exports/company_training_report")
    assert len(local_platform.platform.dashboards) >= 3
    listed = subprocess.run(
        [str(DAGSTER), "asset", "list", "-m", "platform_assets.definitions",
         "--select", ",".join(sorted(expected | {"dashboards/no_such_dashboard"}))],
        env=local_platform.environ, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-3000:]
    assert set(listed.stdout.split()) == expected, listed.stdout[-3000:]


def test_graph_matches_snapshot(local_platform):
    """A change to the graph shows up in review: regenerate with UPDATE_SNAPSHOTS=1."""
    current = graph_as_dict(local_platform.defs)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_every_dbt_node_and_source_appears_exactly_once(local_platform):
    manifest = local_platform.platform.manifest
    graph = local_platform.defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    by_unique_id: dict[str, list[dg.AssetKey]] = {}
    for key in keys:
        spec_meta = graph.get(key).metadata
        uid = spec_meta.get("dagster_dbt/unique_id")
        if uid is not None:
            by_unique_id.setdefault(uid, []).append(key)
    all_nodes = [n for n in manifest["nodes"].values() if n["resource_type"] in ("model", "snapshot")]
    # Ephemeral models are inlined into their consumers: dagster-dbt makes no asset of them
    # and wires their parents straight to the consumers.
    nodes = [n for n in all_nodes if n["config"].get("materialized") != "ephemeral"]
    for node in all_nodes:
        expected = 0 if node["config"].get("materialized") == "ephemeral" else 1
        assert len(by_unique_id.get(node["unique_id"], [])) == expected, node["unique_id"]
    source_keys = {t.key for t in local_platform.platform.federated_tables}
    assert len(source_keys) == len(manifest["sources"]) == len(local_platform.platform.federated_tables)
    assert source_keys <= keys
    # plus the consumers: one asset per dashboard exposure, the customer export, the BI copy
    exposures = [e for e in manifest["exposures"].values() if e["type"] == "dashboard"]
    dashboards = {k for k in keys if k.path[0] == "dashboards"}
    assert dashboards == {dg.AssetKey(["dashboards", e["name"]]) for e in exposures}
    assert len(keys) == len(nodes) + len(source_keys) + len(dashboards) + 2


def _exposure_deps(manifest) -> dict[str, list[str]]:
    """dashboards/<exposure> -> its depends_on as asset keys (<dbt folder>/<model>), from the manifest."""
    return {
        f"dashboards/{e['name']}": sorted(
            "/".join([manifest["nodes"][uid]["fqn"][1], manifest["nodes"][uid]["name"]])
            for uid in e["depends_on"]["nodes"]
        )
        for e in manifest["exposures"].values() if e["type"] == "dashboard"
    }


def test_dashboards_follow_their_exposures(local_platform):
    manifest = local_platform.platform.manifest
    graph = local_platform.defs.resolve_asset_graph()
    assert set(_exposure_deps(manifest)) >= {
        "dashboards/customer_training_dashboard", "dashboards/revenue_mrr_dashboard",
        "dashboards/content_engagement_dashboard"}
    for key_string, deps in _exposure_deps(manifest).items():
        key = dg.AssetKey.from_user_string(key_string)
        node = graph.get(key)
        exposure = manifest["exposures"][f"exposure.reporting.{key.path[-1]}"]
        assert sorted(p.to_user_string() for p in node.parent_keys) == deps
        assert node.group_name == "dashboards" and "superset" in node.kinds
        assert node.owners == [exposure["owner"]["email"]]
        assert exposure["url"] and exposure["maturity"]
        # No looser than any mart it reads, looking through the views in between.
        marts, queue = set(), list(node.parent_keys)
        while queue:
            parent = graph.get(queue.pop())
            if parent.is_virtual:
                queue.extend(parent.parent_keys)
            elif parent.key.path[0] == "marts":
                marts.add(parent.key)
        assert marts, key_string
        policy = node.freshness_policy
        for mart in marts:
            upstream = graph.get(mart).freshness_policy
            assert policy.fail_window.to_timedelta() <= upstream.fail_window.to_timedelta(), (key_string, mart)
            assert policy.warn_window.to_timedelta() <= upstream.warn_window.to_timedelta(), (key_string, mart)
        assert any(policy.fail_window == graph.get(m).freshness_policy.fail_window for m in marts)


def test_export_asset_is_partitioned_by_company(local_platform):
    graph = local_platform.defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey(["exports", "company_training_report"]))
    assert node.group_name == "exports"
    assert node.partitions_def.name == "companies"
    assert {p.to_user_string() for p in node.parent_keys} == {
        "marts/fct_enrollments", "marts/dim_companies", "marts/dim_courses"}
    assert local_platform.defs.resolve_sensor_def("company_partitions").default_status.value == "RUNNING"


def test_daily_facts_are_the_changes_sensors_not_automations(local_platform):
    """The job's partitions come from the assets it selects; the daily facts carry no
    automation condition (the daily_facts_changes sensor requests their days), run in that job
    with their sizing, and the fact carries the reconciliation check."""
    defs = local_platform.defs
    platform = local_platform.platform
    job = defs.resolve_job_def("daily_facts")
    assert job.partitions_def == platform.dbt_daily_facts.partitions_def
    for key in platform.dbt_daily_facts.keys:
        assert platform.dbt_daily_facts.specs_by_key[key].automation_condition is None, key
    sensor = defs.resolve_sensor_def("daily_facts_changes")
    assert sensor.job_name == "daily_facts"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    check = dg.AssetCheckKey(platform.daily_facts.fact_key, "matches_replica")
    assert check in defs.resolve_asset_graph().asset_check_keys
    # no nightly sweep of late events: the sensor sees a changed day of any age
    assert {schedule.name for schedule in defs.schedules} == {"observe_federated_sources_schedule",
                                                              "customer_exports_nightly"}


def test_webserver_graphql_lists_every_asset_with_its_dependencies(platform_webserver, local_platform):
    body = platform_webserver.graphql("{ assetNodes { assetKey { path } dependencyKeys { path } } }")
    assert body and body.get("data"), body
    served = {
        "/".join(n["assetKey"]["path"]): sorted("/".join(d["path"]) for d in n["dependencyKeys"])
        for n in body["data"]["assetNodes"]
    }
    assert served == graph_as_dict(local_platform.defs)
    # The dashboards are served with the marts (and views over them) they read.
    for key_string, deps in _exposure_deps(local_platform.platform.manifest).items():
        assert served[key_string] == deps, key_string
    assert "marts/fct_daily_learning_activity" in served["dashboards/customer_training_dashboard"]
    assert "marts/fct_subscription_mrr" in served["dashboards/revenue_mrr_dashboard"]
