"""Helpers shared by the fault tests (replica loss, lag guard, bad configuration, security):
small asset selections run in process on a real Dagster instance, and what they left."""

from __future__ import annotations

import dagster as dg
import duckdb

from platform_assets.dbt_assets import INDIRECT_SELECTION_TAG

# A single staging -> mart chain: two views over the replica and one table.
SMALL_CHAIN = ("staging/stg_app__courses", "staging/stg_app__lessons", "marts/dim_courses")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def keys(names=SMALL_CHAIN) -> set[dg.AssetKey]:
    return {dg.AssetKey.from_user_string(n) for n in names}


def run_assets(put, names=SMALL_CHAIN) -> dg.ExecuteInProcessResult:
    """Materialize the named assets (and their checks) in one run, recorded in the instance.

    Cautious indirect selection: a relationship test from a fact that is not built here to
    the selected dimension is left out (as the demo's first build does).
    """
    job = put.defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=keys(names))
    return job.execute_in_process(instance=put.instance, raise_on_error=False, run_config=QUIET,
                                  tags={INDIRECT_SELECTION_TAG: "cautious"})


def observe(put) -> dg.ExecuteInProcessResult:
    return put.defs.resolve_job_def("observe_federated_sources").execute_in_process(
        instance=put.instance, raise_on_error=False, run_config=QUIET
    )


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """What a failed step reports: the Failure's description, else the error message."""
    messages = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        description = data.user_failure_data.description if data.user_failure_data else None
        messages.append(description or data.error.message)
    return messages


def duckdb_table(path: str, relation: str) -> tuple[int, str] | None:
    """(row count, md5 over every row in order) of a table of the DuckDB file; None if absent."""
    con = duckdb.connect(path, read_only=True)
    try:
        schema, name = relation.split(".")
        exists = con.execute(
            "select count(*) from information_schema.tables where table_schema = ? and table_name = ?",
            [schema, name],
        ).fetchone()[0]
        if not exists:
            return None
        return con.execute(
            f"select count(*), md5(coalesce(string_agg(md5(t::varchar), '' order by t::varchar), ''))"
            f" from {relation} t"
        ).fetchone()
    finally:
        con.close()
