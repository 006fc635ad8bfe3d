"""The environment switch and the small pure functions that build dbt command lines."""

from __future__ import annotations

from datetime import datetime

import pytest

from platform_assets.dbt_assets import build_args, layer_of, window_vars
from platform_assets.settings import (
    DBT_TARGETS,
    ENGINES,
    ENVIRONMENTS,
    READS_LOCAL_ENV_FILE,
    REQUIRED_VARIABLES,
    ConfigurationError,
    load_settings,
)


def test_unknown_environment_names_the_valid_ones():
    with pytest.raises(ConfigurationError, match=r"PLATFORM_ENV='staging'.*local, pg, prod"):
        load_settings({"PLATFORM_ENV": "staging"})


def test_every_environment_appears_in_every_map():
    for mapping in (DBT_TARGETS, ENGINES, REQUIRED_VARIABLES, READS_LOCAL_ENV_FILE):
        assert set(mapping) == set(ENVIRONMENTS)


def test_missing_variable_is_named(tmp_path):
    settings = load_settings({"PLATFORM_ENV": "pg", "PLATFORM_ENV_FILE": str(tmp_path / "none.env")})
    with pytest.raises(ConfigurationError, match="WAREHOUSE_PG_HOST is not set; PLATFORM_ENV=pg"):
        settings.get("WAREHOUSE_PG_HOST")
    with pytest.raises(ConfigurationError, match="REPLICA_URL, WAREHOUSE_PG_HOST"):
        settings.check()


def test_local_env_file_is_read_and_the_process_environment_wins(tmp_path):
    env_file = tmp_path / "platform.env"
    env_file.write_text("# comment\nREPLICA_URL=postgresql://from-file\nDUCKDB_PATH=/file.duckdb\n")
    settings = load_settings({"PLATFORM_ENV_FILE": str(env_file), "DUCKDB_PATH": "/env.duckdb"})
    assert settings.env == "local" and settings.dbt_target == "local" and settings.engine == "duckdb"
    assert settings.get("REPLICA_URL") == "postgresql://from-file"
    assert settings.get("DUCKDB_PATH") == "/env.duckdb"
    prod = load_settings({"PLATFORM_ENV": "prod", "PLATFORM_ENV_FILE": str(env_file)})
    assert prod.optional("REPLICA_URL") is None  # prod never reads the local file


def test_malformed_knobs_are_named():
    with pytest.raises(ConfigurationError, match="FACT_PARTITIONS_START"):
        settings = load_settings({"FACT_PARTITIONS_START": "last year", "PLATFORM_ENV_FILE": "/nonexistent"})
        _ = settings.partitions_start
    with pytest.raises(ConfigurationError, match="MAX_REPLICA_LAG_SECONDS"):
        settings = load_settings({"MAX_REPLICA_LAG_SECONDS": "soon", "PLATFORM_ENV_FILE": "/nonexistent"})
        _ = settings.max_replica_lag_seconds


def test_window_vars_and_args():
    vars_ = window_vars(datetime(2026, 1, 1), datetime(2026, 1, 4))
    assert vars_ == {"window_start": "2026-01-01 00:00:00", "window_end": "2026-01-04 00:00:00"}
    assert build_args("build") == ["build", "--exclude-resource-type", "unit_test"]
    assert build_args("run") == ["run"]
    assert build_args("build", vars_) == [
        "build", "--exclude-resource-type", "unit_test",
        "--vars", '{"window_end": "2026-01-04 00:00:00", "window_start": "2026-01-01 00:00:00"}',
    ]


def test_layer_of():
    assert layer_of({"resource_type": "model", "fqn": ["reporting", "marts", "fct_x"]}) == "marts"
    assert layer_of({"resource_type": "snapshot", "fqn": ["reporting", "snapshots", "users_snapshot"]}) == "snapshots"
