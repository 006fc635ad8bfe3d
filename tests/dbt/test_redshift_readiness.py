"""Redshift readiness without a Redshift: the project parses offline for the `prod` target
(dummy settings), Redshift-only configuration appears on prod only, and every model,
compiled on the PostgreSQL target (the Redshift-family check), parses with sqlglot's
Redshift dialect, in each incremental mode."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():
    # sqlglot's optional Rust tokenizer announces its own deprecation on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import sqlglot
    from sqlglot.errors import ErrorLevel

from .conftest import Extras, Scenario

BIG_FACTS = {"fct_lesson_events", "fct_enrollments", "fct_daily_learning_activity"}


def _models(manifest: dict) -> dict[str, dict]:
    return {
        n["name"]: n for n in manifest["nodes"].values()
        if n["resource_type"] == "model" and n["package_name"] == "reporting"
    }


def test_prod_parses_offline_with_dummy_settings(dbt_extras: Extras):
    assert dbt_extras.prod_parse.ok, dbt_extras.prod_parse.describe()
    manifest = dbt_extras.prod_manifest
    assert manifest["metadata"]["adapter_type"] == "redshift"
    source = manifest["sources"]["source.reporting.app.lesson_events"]
    assert (source["database"], source["schema"]) == ("warehouse", "federated")


def test_redshift_layout_and_late_binding_on_prod_only(dbt_scenario: Scenario, dbt_extras: Extras):
    prod, pg = _models(dbt_extras.prod_manifest), _models(dbt_scenario.pg_manifest)
    for name in BIG_FACTS:
        assert prod[name]["config"].get("dist"), name
        assert prod[name]["config"].get("sort"), name
        assert not pg[name]["config"].get("dist") and not pg[name]["config"].get("sort"), name
    assert prod["fct_lesson_events"]["config"]["dist"] == "user_id"
    assert prod["fct_lesson_events"]["config"]["sort"] == ["occurred_at"]
    for name, node in prod.items():
        if node["config"]["materialized"] == "view":
            assert node["config"]["bind"] is False, name
            assert pg[name]["config"]["bind"] is True, name


def test_every_source_has_its_dagster_asset_key(dbt_extras: Extras):
    sources = dbt_extras.prod_manifest["sources"].values()
    assert len(sources) == 11
    for source in sources:
        assert source["meta"]["dagster"] == {"asset_key": ["federated", source["name"]]}
    # the event-grain table the daily facts compare per day (platform_assets/fingerprints.py)
    assert {s["name"] for s in sources if s["meta"].get("platform")} == {"lesson_events"}


def _statements(scenario: Scenario) -> dict[str, str]:
    """Every model's SQL as dbt compiled it on pg, in each form it takes: the incremental
    branch (the second build's manifest: every model, ephemeral ones included), the first
    build's (full refresh of the incremental facts) and the window run's."""
    statements = {
        f"incremental:{name}": node["compiled_code"]
        for name, node in _models(scenario.pg_manifest).items()
    }
    for step in ("build_1", "window"):
        for result in scenario.steps[step]["pg"].results:
            if result["unique_id"].startswith("model.") and result.get("compiled_code"):
                statements[f"{step}:{result['unique_id'].split('.')[-1]}"] = result["compiled_code"]
    return statements


def test_every_compiled_model_parses_as_redshift(dbt_scenario: Scenario):
    statements = _statements(dbt_scenario)
    models = _models(dbt_scenario.pg_manifest)
    assert {k.split(":", 1)[1] for k in statements if k.startswith("incremental:")} == set(models)
    assert "window:fct_lesson_events" in statements and "build_1:fct_lesson_events" in statements
    failures = {}
    for key, code in statements.items():
        try:
            parsed = sqlglot.parse(code, read="redshift", error_level=ErrorLevel.RAISE)
            assert parsed and all(p is not None for p in parsed)
        except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, AssertionError) as exc:
            failures[key] = str(exc)[:300]
    assert not failures, failures


@pytest.mark.parametrize("mode", ["incremental", "window", "build_1"])
def test_incremental_modes_compile_as_expected(dbt_scenario: Scenario, mode: str):
    code = _statements(dbt_scenario)[f"{mode}:fct_lesson_events"]
    if mode == "window":
        start = dbt_scenario.window["window_start"]
        assert f"where occurred_at >= cast('{start} 00:00:00' as timestamp)" in code
        assert "where created_at >=" not in code
    elif mode == "incremental":  # incremental without a window: a literal watermark
        assert "where created_at >= cast('" in code
    else:  # first build: no filter at all
        assert "where created_at" not in code and "occurred_at >= cast(" not in code
