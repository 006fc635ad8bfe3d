"""The environment switch and the small pure functions that build dbt command lines."""

from __future__ import annotations

import os
from datetime import datetime

import pytest

from platform_assets.dbt_assets import build_args, dbt_process_environment, layer_of, window_env, window_vars
from platform_assets.settings import (
    DBT_TARGETS,
    ENGINES,
    ENVIRONMENTS,
    EVENT_BATCH_SIZE,
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
    with pytest.raises(ConfigurationError, match="DBT_WARM_START"):
        _ = load_settings({"DBT_WARM_START": "maybe", "PLATFORM_ENV_FILE": "/nonexistent"}).dbt_warm_start
    for raw, expected in (("", True), ("1", True), ("0", False), ("false", False)):
        assert load_settings({"DBT_WARM_START": raw, "PLATFORM_ENV_FILE": "/nonexistent"}).dbt_warm_start is expected


def test_warm_start_off_runs_the_environment_dbt():
    from platform_assets import dbt_warm
    from platform_assets.dbt_resource import dbt_executable

    assert dbt_executable(warm_start=False) == dbt_warm.real_dbt()
    assert dbt_executable(warm_start=True) == dbt_warm.client_path()


def test_window_vars_and_args():
    vars_ = window_vars(datetime(2026, 1, 1), datetime(2026, 1, 4))
    assert vars_ == {"window_start": "2026-01-01 00:00:00", "window_end": "2026-01-04 00:00:00"}
    assert build_args("build") == ["build", "--exclude-resource-type", "unit_test"]
    assert build_args("run") == ["run"]
    assert build_args("build", vars_) == [
        "build", "--exclude-resource-type", "unit_test",
        "--vars", '{"window_end": "2026-01-04 00:00:00", "window_start": "2026-01-01 00:00:00"}',
    ]
    # what the daily facts' runs pass instead: the same window, in the dbt process's environment
    assert window_env(datetime(2026, 1, 1), datetime(2026, 1, 4)) == {
        "PLATFORM_WINDOW_START": "2026-01-01 00:00:00", "PLATFORM_WINDOW_END": "2026-01-04 00:00:00"}


def test_dbt_process_environment_is_restored(monkeypatch):
    monkeypatch.setenv("PLATFORM_WINDOW_END", "before")
    monkeypatch.delenv("PLATFORM_WINDOW_START", raising=False)
    with dbt_process_environment({"PLATFORM_WINDOW_START": "a", "PLATFORM_WINDOW_END": "b"}):
        assert (os.environ["PLATFORM_WINDOW_START"], os.environ["PLATFORM_WINDOW_END"]) == ("a", "b")
    assert "PLATFORM_WINDOW_START" not in os.environ
    assert os.environ["PLATFORM_WINDOW_END"] == "before"


def test_layer_of():
    assert layer_of({"resource_type": "model", "fqn": ["reporting", "marts", "fct_x"]}) == "marts"
    assert layer_of({"resource_type": "snapshot", "fqn": ["reporting", "snapshots", "users_snapshot"]}) == "snapshots"


def test_the_run_process_has_dagsters_event_batches_on_unless_set(tmp_path, monkeypatch):
    """A partition range's materializations reach the event log as one batch (instance_storage)."""
    settings = load_settings({"PLATFORM_ENV_FILE": str(tmp_path / "none.env")})
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    settings.export_for_subprocesses()
    assert os.environ["DAGSTER_EVENT_BATCH_SIZE"] == str(EVENT_BATCH_SIZE)
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "0")  # a deployment's own value wins (0: off)
    settings.export_for_subprocesses()
    assert os.environ["DAGSTER_EVENT_BATCH_SIZE"] == "0"


def test_passwords_reach_dbt_as_secret_variables_too():
    """dbt scrubs the values of DBT_ENV_SECRET_* variables from its logs (federation DDL)."""
    environ = {"PLATFORM_ENV": "pg", "PLATFORM_ENV_FILE": "/nonexistent", "REPLICA_PASSWORD": "r-secret",
               "WAREHOUSE_PG_PASSWORD": "w-secret", "REPLICA_URL": "postgresql://u:r-secret@h:1/db"}
    secret_env = load_settings(environ).dbt_secret_env()
    assert secret_env == {"DBT_ENV_SECRET_REPLICA_PASSWORD": "r-secret",
                          "DBT_ENV_SECRET_WAREHOUSE_PG_PASSWORD": "w-secret"}


def test_connection_errors_name_the_setting_never_the_password():
    import psycopg

    from platform_assets.preflight import PreflightError, describe, endpoint_of, redact

    url = "postgresql://federation_ro:s3cr3t@127.0.0.1:5999/saas"
    endpoint = endpoint_of("REPLICA_URL", url)
    assert str(endpoint) == "127.0.0.1:5999" and endpoint.user == "federation_ro"
    auth = psycopg.OperationalError('connection to server at "127.0.0.1", port 5999 failed: '
                                    'FATAL:  password authentication failed for user "federation_ro"')
    assert describe(auth, endpoint) == (
        "REPLICA_URL: password authentication failed for user federation_ro at 127.0.0.1:5999")
    refused = psycopg.OperationalError(f"connection failed: {url} password=s3cr3t Connection refused")
    assert "s3cr3t" not in describe(refused, endpoint) and "connection refused" in describe(refused, endpoint)
    assert redact(f"at {url} and host=h password='s3cr3t' user=u") == (
        "at postgresql://federation_ro:***@127.0.0.1:5999/saas and host=h password=*** user=u")
    with pytest.raises(PreflightError, match="REPLICA_URL: not a valid PostgreSQL connection URL"):
        endpoint_of("REPLICA_URL", "postgresql://[broken")


def test_a_failure_names_the_sources_the_failing_models_read():
    from platform_assets.preflight import source_labels, source_tables_read

    manifest = {
        "sources": {"source.r.app.courses": {
            "resource_type": "source", "source_name": "app", "name": "courses", "schema": "app",
            "meta": {"dagster": {"asset_key": ["federated", "courses"]}}}},
        "nodes": {
            "model.r.stg": {"resource_type": "model", "name": "stg", "depends_on": {"nodes": ["source.r.app.courses"]}},
            "model.r.int": {"resource_type": "model", "name": "int", "depends_on": {"nodes": ["model.r.stg"]}},
            "model.r.dim": {"resource_type": "model", "name": "dim", "depends_on": {"nodes": ["model.r.int"]}},
        },
    }
    found = source_tables_read(manifest, ["model.r.dim"])
    assert found == ["source.r.app.courses"]
    assert source_labels(manifest, found) == ["federated/courses (app.courses on the replica)"]


def test_a_manifest_parsed_for_another_warehouse_database_is_stale(tmp_path):
    """Another WAREHOUSE_PG_DB (or DuckDB file name) than the manifest was parsed with means
    a re-parse: dagster-dbt's metadata queries name the manifest's database."""
    import json

    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import (
        _prepared_version_path,
        manifest_is_stale,
        project_version,
        warehouse_database,
    )

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    project = DbtProject(project_dir=tmp_path, target_path="target/pg")
    assert manifest_is_stale(project, "warehouse")  # no manifest yet
    project.manifest_path.parent.mkdir(parents=True)
    project.manifest_path.write_text(json.dumps({"nodes": {
        "model.tiny.a": {"resource_type": "model", "database": "warehouse"},
        "test.tiny.t": {"resource_type": "test", "database": "elsewhere"},
    }}))
    # its preparation records the version of the project's files it was parsed from
    _prepared_version_path(project).write_text(project_version(project))
    assert not manifest_is_stale(project, "warehouse")
    assert not manifest_is_stale(project, None)
    assert manifest_is_stale(project, "bench_warehouse")
    # An added, an edited or a removed file (a removed model is in no newer file's mtime).
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.sql").write_text("select 1 as a")
    assert manifest_is_stale(project, "warehouse")
    _prepared_version_path(project).write_text(project_version(project))
    assert not manifest_is_stale(project, "warehouse")
    (tmp_path / "models" / "a.sql").unlink()
    assert manifest_is_stale(project, "warehouse")
    pg = load_settings({"PLATFORM_ENV": "pg", "WAREHOUSE_PG_DB": "bench_warehouse",
                        "PLATFORM_ENV_FILE": "/nonexistent"})
    local = load_settings({"PLATFORM_ENV": "local", "DUCKDB_PATH": "/x/warehouse.duckdb",
                           "PLATFORM_ENV_FILE": "/nonexistent"})
    assert (warehouse_database(pg), warehouse_database(local)) == ("bench_warehouse", "warehouse")


def test_preparing_the_manifest_from_the_command_line_names_a_bad_setting(tmp_path, monkeypatch, capsys):
    """`python -m platform_assets.dbt_project` (what the benchmark runs side by side for each
    environment before loading any) refuses an unknown environment, naming it."""
    from platform_assets.dbt_project import main

    monkeypatch.setenv("PLATFORM_ENV", "staging")
    monkeypatch.setenv("PLATFORM_ENV_FILE", str(tmp_path / "none.env"))
    assert main() == 2
    assert "PLATFORM_ENV='staging' is not a known environment" in capsys.readouterr().err


def test_parse_states_are_kept_per_profile_and_pruned(tmp_path):
    """dbt throws its parse state away when the target's connection details differ: each
    profile (DUCKDB_PATH; the pg host, port, database, user) has its own kept state, a new
    one starts from the state the manifest's preparation saved, and only the most recently
    used few are kept."""
    import os
    import time

    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import (
        PARTIAL_PARSE,
        keep_partial_parse,
        partial_parse_cache,
        prepared_parse_state,
        seed_partial_parse,
    )

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    project = DbtProject(project_dir=tmp_path, target_path="target/local")

    def local(path: str):
        return load_settings({"PLATFORM_ENV": "local", "DUCKDB_PATH": path, "PLATFORM_ENV_FILE": "/nonexistent"})

    def pg(db: str):
        return load_settings({"PLATFORM_ENV": "pg", "WAREHOUSE_PG_DB": db, "WAREHOUSE_PG_HOST": "h",
                              "WAREHOUSE_PG_PORT": "5432", "PLATFORM_ENV_FILE": "/nonexistent"})

    demo, bench = partial_parse_cache(project, local("/a/warehouse.duckdb")), partial_parse_cache(
        project, local("/b/warehouse.duckdb"))
    assert demo != bench and demo == partial_parse_cache(project, local("/a/warehouse.duckdb"))
    assert partial_parse_cache(project, pg("warehouse")) != partial_parse_cache(project, pg("bench_warehouse"))

    # Nothing kept for a profile yet: the preparation's state (target/<env>/), if any.
    prepared = tmp_path / "target" / "local" / PARTIAL_PARSE
    assert prepared == prepared_parse_state(project)
    prepared.parent.mkdir(parents=True)
    prepared.write_bytes(b"prepared")
    run = tmp_path / "run1"
    seed_partial_parse(run, demo, prepared_parse_state(project))
    assert (run / PARTIAL_PARSE).read_bytes() == b"prepared"
    # What the run saved is given back to its profile's slot, and seeds the next run.
    (run / PARTIAL_PARSE).write_bytes(b"demo state")
    keep_partial_parse(run, demo)
    seed_partial_parse(tmp_path / "run2", demo, prepared_parse_state(project))
    assert (tmp_path / "run2" / PARTIAL_PARSE).read_bytes() == b"demo state"
    # which state seeded the run is returned (a run that then misses an asset discards it)
    assert seed_partial_parse(tmp_path / "run3", bench, prepared_parse_state(project)) == prepared_parse_state(project)
    assert (tmp_path / "run3" / PARTIAL_PARSE).read_bytes() == b"prepared"
    assert seed_partial_parse(tmp_path / "run3b", bench) is None
    assert not (tmp_path / "run3b").exists()
    # The daily facts' runs (a window in their environment) keep a slot of their own; the
    # first one starts from the profile's plain slot, and gives back to its own.
    daily = partial_parse_cache(project, local("/a/warehouse.duckdb"), windowed=True)
    assert daily not in (demo, bench) and daily == partial_parse_cache(project, local("/a/warehouse.duckdb"), True)
    seed_partial_parse(tmp_path / "run4", daily, demo, prepared_parse_state(project))
    assert (tmp_path / "run4" / PARTIAL_PARSE).read_bytes() == b"demo state"
    (tmp_path / "run4" / PARTIAL_PARSE).write_bytes(b"daily state")
    keep_partial_parse(tmp_path / "run4", daily)
    assert seed_partial_parse(tmp_path / "run5", daily, demo, prepared_parse_state(project)) == daily
    assert (tmp_path / "run5" / PARTIAL_PARSE).read_bytes() == b"daily state"
    assert demo.read_bytes() == b"demo state"
    daily.unlink()

    # Only `keep` states stay: the least recently used go.
    os.utime(demo, (time.time() - 1000, time.time() - 1000))
    for i in range(5):
        slot = partial_parse_cache(project, local(f"/t{i}/warehouse.duckdb"))
        keep_partial_parse(run, slot, keep=3)
        os.utime(slot, (time.time() - 100 + i, time.time() - 100 + i))  # used in this order
    kept = set(demo.parent.glob("*.msgpack"))
    assert kept == {partial_parse_cache(project, local(f"/t{i}/warehouse.duckdb")) for i in (2, 3, 4)}
    assert not any(p.name.endswith(".tmp") for p in demo.parent.iterdir())


def test_old_run_folders_are_pruned_but_never_recent_ones(tmp_path):
    """dagster-dbt leaves one folder per dbt command: beyond the most recent few, folders
    are removed, except any used within the minimum age (another process's dbt may still be
    writing there: its dbt.log is fresh even when the folder itself is old)."""
    import os
    import time

    from platform_assets.dbt_project import prune_run_folders

    assert prune_run_folders(tmp_path / "none") == []
    now = time.time()
    for i in range(6):
        folder = tmp_path / f"dbt_models-{i}"
        folder.mkdir()
        age = 7200 - i * 60 if i < 4 else 60 * (i - 3)  # 0-3 hours old, 4 and 5 a minute or two
        if i != 3:  # a folder whose dbt never started logging has no dbt.log
            (folder / "dbt.log").write_text("log")
            os.utime(folder / "dbt.log", (now - age, now - age))
        os.utime(folder, (now - age, now - age))
    (tmp_path / "stray-file").write_text("not a run folder")
    # Folder 1 is old, but its dbt is still logging.
    os.utime(tmp_path / "dbt_models-1" / "dbt.log", (now, now))
    removed = prune_run_folders(tmp_path, keep=1, min_age_s=3600)
    assert sorted(p.name for p in removed) == ["dbt_models-0", "dbt_models-2", "dbt_models-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dbt_models-1", "dbt_models-4", "dbt_models-5",
                                                          "stray-file"]
    # Nothing old enough: nothing removed, whatever the count.
    assert prune_run_folders(tmp_path, keep=0, min_age_s=10 * 3600) == []


def test_parse_states_of_another_version_of_the_project_are_never_seeded(tmp_path):
    """dbt-core's partial parsing can drop a YAML snapshot when a macro file changes, so a run
    is seeded only with states parsed from the project files as they are now: after an edit
    (or an added or removed file) the kept slots and the preparation's state are passed over,
    and the run parses in full."""
    import os
    import time

    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import (
        _prepared_version_path,
        keep_partial_parse,
        parse_state_candidates,
        prepared_parse_state,
        project_version,
    )

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    (tmp_path / "macros").mkdir()
    macro = tmp_path / "macros" / "m.sql"
    macro.write_text("{% macro m() %}1{% endmacro %}\n")
    project = DbtProject(project_dir=tmp_path, target_path="target/local")
    settings = load_settings({"PLATFORM_ENV": "local", "DUCKDB_PATH": "/a/warehouse.duckdb",
                              "PLATFORM_ENV_FILE": "/nonexistent"})
    version = project_version(project)
    assert version == project_version(project)
    prepared = prepared_parse_state(project)
    prepared.parent.mkdir(parents=True)
    prepared.write_bytes(b"prepared")
    _prepared_version_path(project).write_text(version)

    cache, candidates = parse_state_candidates(project, settings)
    assert candidates == [cache, prepared]
    run = tmp_path / "run1"
    run.mkdir()
    (run / "partial_parse.msgpack").write_bytes(b"kept")
    keep_partial_parse(run, cache)
    daily_cache, daily = parse_state_candidates(project, settings, windowed=True)
    assert daily == [daily_cache, cache, prepared] and daily_cache != cache

    # An edit: neither the kept state nor the preparation's is a candidate any more.
    later = time.time() + 5
    macro.write_text("{% macro m() %}2{% endmacro %}\n")
    os.utime(macro, (later, later))
    assert project_version(project) != version
    edited_cache, edited = parse_state_candidates(project, settings)
    assert edited == [edited_cache] and edited_cache != cache and not edited_cache.exists()
    # An added file, and a removed one, are edits too.
    added = tmp_path / "macros" / "n.sql"
    added.write_text("{% macro n() %}{% endmacro %}\n")
    with_added = project_version(project)
    added.unlink()
    assert len({version, with_added, project_version(project)}) == 3
