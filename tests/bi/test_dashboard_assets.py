"""The dashboards as materializable assets, against the session's real Superset: with a BI
server configured, automation requests a dashboard once the marts it reads changed, and its
run provisions it, drops its datasets' cached results and warms every chart, recording the
dashboard's URL, chart count and the data's as-of time. A Superset that does not answer fails
the run with one line naming SUPERSET_URL."""

from __future__ import annotations

from datetime import date, timedelta

import dagster as dg
import pytest
from localenv.demo import evaluate_automation

from bi import dashboards
from bi.local import SERVICE_USER, load_or_create_secrets
from platform_assets.bi import COPY_KEY
from platform_assets.exposures import DATA_AS_OF, superset_resource
from platform_assets.settings import ConfigurationError, PlatformSettings

from ..conftest import free_port
from ..platform.conftest import platform_under_test


def superset_settings(stack, url: str | None = None) -> dict[str, str]:
    return {"DUCKDB_PATH": str(stack.warehouse), "SUPERSET_URL": url or stack.superset.url,
            # a few daily partitions, each recorded as built below
            "FACT_PARTITIONS_START": (date.today() - timedelta(days=3)).isoformat(),
            "SUPERSET_SERVICE_USER": SERVICE_USER,
            "SUPERSET_SERVICE_PASSWORD": load_or_create_secrets(stack.superset.home)["SUPERSET_SERVICE_PASSWORD"],
            # the database the session's Superset already reads: provisioning keeps it
            "SUPERSET_DATABASE_URI": f"duckdb:///{stack.copy}",
            "PORTAL_ORIGINS": ",".join(stack.superset.portal_origins)}


def requested_keys(put, cursor=None):
    result = evaluate_automation(put.defs, put.instance, cursor)
    return {r.key for r in result.results if r.true_subset.size > 0 and isinstance(r.key, dg.AssetKey)}, result.cursor


def run(put, keys: set[dg.AssetKey]) -> dg.ExecuteInProcessResult:
    job = put.defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=keys)
    return job.execute_in_process(instance=put.instance, raise_on_error=False)


def test_a_dashboard_is_provisioned_and_warmed_after_the_marts_it_reads_refresh(bi_stack, pg_env, tmp_path):
    with platform_under_test(pg_env, tmp_path, "local", superset_settings(bi_stack)) as put:
        graph = put.defs.resolve_asset_graph()
        keys = {d.key for d in put.platform.dashboards}
        by_key = {d.key: d for d in put.platform.dashboards}
        for key in keys:
            node = graph.get(key)
            assert node.is_materializable and node.automation_condition is not None, key
            assert COPY_KEY in node.parent_keys, key  # locally they read the BI copy
        # one sensor for the copy and the dashboards: one run, the copy first
        sensor = put.defs.resolve_sensor_def("platform_automation_dashboards")
        assert sensor.asset_selection.resolve(graph) == keys | {COPY_KEY}
        assert "bi_copy_automation" not in {s.name for s in put.defs.sensors}

        # automation's first evaluation requests nothing (make demo's first run builds all);
        # then a refresh of the marts, the views and the copy (built outside this instance)
        _, cursor = requested_keys(put)
        upstream = {k for d in put.platform.dashboards for k in (*d.marts, *d.deps)} | {COPY_KEY}
        for key in sorted(upstream, key=lambda k: k.path):
            partitions = graph.get(key).partitions_def
            for partition in partitions.get_partition_keys() if partitions else [None]:
                put.instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))
        requested, cursor = requested_keys(put, cursor)
        assert keys <= requested, requested

        result = run(put, keys)
        assert result.success
        events = {e.asset_key: e.materialization for e in result.get_asset_materialization_events()}
        assert set(events) == keys
        assert set(bi_stack.provisioned.embedded) == {d.exposure for d in dashboards.DASHBOARDS if d.embedded}
        for key, event in events.items():
            definition = dashboards.by_exposure()[key.path[-1]]
            meta = event.metadata
            dashboard_id = bi_stack.provisioned.dashboards[definition.exposure]
            assert meta["url"].value == f"{bi_stack.superset.url}/superset/dashboard/{dashboard_id}/"
            assert meta["charts"].value == len(definition.charts)
            assert meta["rows_warmed"].value > 0, key
            stalest = min(put.instance.get_latest_materialization_event(k).timestamp for k in by_key[key].marts)
            assert meta[DATA_AS_OF].value == stalest
            # the customer dashboard's embedding uuid (the portal's SUPERSET_EMBEDDED_UUID), kept as provisioned
            embedded = bi_stack.provisioned.embedded.get(definition.exposure)
            assert (meta["embedded_uuid"].value if "embedded_uuid" in meta else None) == embedded, key
            # the service account opens the dashboard at that URL
            assert bi_stack.client.session().get(meta["url"].value, timeout=60).status_code == 200
        # cached chart results were dropped: each dataset was touched by this run
        for dataset_id in set(bi_stack.provisioned.datasets.values()):
            found = bi_stack.client.call("GET", f"/api/v1/dataset/{dataset_id}")["result"]
            assert result.run_id in (found.get("description") or ""), found.get("description")

        # nothing changed since: nothing requested; one mart rebuilt: its dashboards only
        requested, cursor = requested_keys(put, cursor)
        assert not requested & keys, requested
        revenue = next(d for d in put.platform.dashboards if d.name == "revenue_mrr_dashboard")
        only_revenue = [k for k in revenue.marts
                        if not any(k in d.marts for d in put.platform.dashboards if d is not revenue)]
        assert only_revenue, revenue.marts
        put.instance.report_runless_asset_event(dg.AssetMaterialization(only_revenue[0]))
        requested, cursor = requested_keys(put, cursor)
        assert requested & keys == {revenue.key}, requested


def test_a_superset_that_does_not_answer_fails_the_run_naming_it(bi_stack, pg_env, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    with platform_under_test(pg_env, tmp_path, "local", superset_settings(bi_stack, nobody)) as put:
        keys = {d.key for d in put.platform.dashboards}
        result = run(put, keys)
        assert not result.success
        message = result.get_step_failure_events()[0].step_failure_data.error.message
        assert "SUPERSET_URL" in message and nobody in message, message
        assert load_or_create_secrets(bi_stack.superset.home)["SUPERSET_SERVICE_PASSWORD"] not in message


def test_a_half_configured_superset_is_an_error_naming_what_is_missing():
    assert superset_resource(PlatformSettings(env="local", values={})) is None
    with pytest.raises(ConfigurationError, match="SUPERSET_SERVICE_USER"):
        superset_resource(PlatformSettings(env="local", values={"SUPERSET_URL": "http://127.0.0.1:1"}))
    full = {"SUPERSET_URL": "http://127.0.0.1:1", "SUPERSET_SERVICE_USER": "u", "SUPERSET_SERVICE_PASSWORD": "p",
            "SUPERSET_DATABASE_URI": "duckdb:////tmp/copy.duckdb", "PORTAL_ORIGINS": "http://a:1 http://b:2"}
    # without origins Superset would let any site frame the customer dashboard
    with pytest.raises(ConfigurationError, match="PORTAL_ORIGINS"):
        superset_resource(PlatformSettings(env="local", values={**full, "PORTAL_ORIGINS": ""}))
    assert superset_resource(PlatformSettings(env="local", values=full)) is not None
    # the local BI copy does not serve the pg target, which reads the same platform.env
    assert superset_resource(PlatformSettings(env="pg", values=full)) is None
    pg = superset_resource(PlatformSettings(env="pg", values={**full, "SUPERSET_DATABASE_URI": "postgresql://h/wh"}))
    assert pg is not None
