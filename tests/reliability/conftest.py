"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest

from ..dbt.conftest import Scenario, shared_scenario


@pytest.fixture(scope="session")
def dbt_scenario(pg_env, tmp_path_factory) -> Scenario:
    """The tests/dbt scenario's warehouses (DuckDB and PostgreSQL, fully built, incremental
    = full checked), reused rather than building new ones; built once per session."""
    return shared_scenario(pg_env, tmp_path_factory)


_SYNCED: dict[str, dict] = {}


def catch_up(scenario: Scenario, pg_env, engine: str) -> None:
    """Bring the scenario's warehouse up to date with the replica before a test that compares
    the warehouse with itself (before and after a refresh or a killed run): other tests of
    the session (simulator batches, the pipeline's) may have changed the replica since the
    scenario's last build. One incremental `dbt run` (incremental = full refresh is what
    tests/dbt proves), only when the replica changed since the warehouse last caught up."""
    synced = _SYNCED.get(engine) or list(scenario.checksums.values())[-1][1]
    now = pg_env.checksums()
    if now != synced:
        result = scenario.runners[engine]("run", check=False)
        assert result.ok, result.describe()
    _SYNCED[engine] = now
