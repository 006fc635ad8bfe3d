"""The environment switch and the small pure functions that build dbt command lines."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from platform_assets.dbt_assets import build_args
from platform_assets.dbt_command import layer_of
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
    for name, raw, kind, minimum in [("CHANGE_RECENT_DAYS", "two weeks", int, 1), ("CHANGE_RECENT_DAYS", "0", int, 1),
                                     ("CHANGE_RANGE_MAX_GAP_DAYS", "1.5", int, 0),
                                     ("CHANGE_RANGE_MAX_GAP_DAYS", "-1", int, 0),
                                     ("CHANGE_FULL_SCAN_MINUTES", "-5", float, 0.1)]:
        settings = load_settings({name: raw, "PLATFORM_ENV_FILE": "/nonexistent"})
        with pytest.raises(ConfigurationError, match=re.escape(f"{name}={raw!r}")):
            settings.number(name, 1, kind, minimum)
    assert load_settings({"CHANGE_RANGE_MAX_GAP_DAYS": "0", "PLATFORM_ENV_FILE": "/nonexistent"}).number(
        "CHANGE_RANGE_MAX_GAP_DAYS", 7, minimum=0) == 0


def test_window_and_selection_args():
    assert build_args("build") == ["build", "--exclude-resource-type", "unit_test"]
    assert build_args("run") == ["run"]
    # the daily facts' partition window, as dbt's event-time bounds (end exclusive)
    assert build_args("build", (datetime(2026, 1, 1), datetime(2026, 1, 4))) == [
        "build", "--exclude-resource-type", "unit_test",
        "--event-time-start", "2026-01-01T00:00:00", "--event-time-end", "2026-01-04T00:00:00",
    ]
    assert build_args("build", indirect_selection="cautious")[-2:] == ["--indirect-selection", "cautious"]


def test_layer_of():
    assert layer_of({"resource_type": "model", "fqn": ["reporting", "marts", "fct_x"]}) == "marts"
    assert layer_of({"resource_type": "snapshot", "fqn": ["reporting", "snapshots", "users_snapshot"]}) == "snapshots"


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


def test_the_manifest_is_stale_after_any_project_file_changes(tmp_path):
    """The local environments parse again when a project file was added, edited or removed
    after the manifest was written (a removed file shows in its folder's modification time),
    when the parse state the dbt commands start from is gone, or when another dbt-core wrote
    the manifest (an upgrade)."""
    import time
    from importlib.metadata import version

    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import manifest_is_stale, prepared_state_path

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.sql").write_text("select 1 as a")
    project = DbtProject(project_dir=tmp_path, target_path="target/pg")
    assert manifest_is_stale(project)  # no manifest yet

    def parsed_now(dbt_version: str = version("dbt-core")):
        project.manifest_path.parent.mkdir(parents=True, exist_ok=True)
        project.manifest_path.write_text(json.dumps({"metadata": {"dbt_version": dbt_version}, "nodes": {}}))
        prepared_state_path(project).write_bytes(b"state")
        later = time.time() + 5
        os.utime(project.manifest_path, (later, later))
        return later

    parsed_now()
    assert not manifest_is_stale(project)
    prepared_state_path(project).unlink()
    assert manifest_is_stale(project)
    parsed_now("1.8.0")
    assert manifest_is_stale(project)
    for change in (lambda: (tmp_path / "models" / "b.sql").write_text("select 2 as b"),
                   lambda: (tmp_path / "models" / "a.sql").write_text("select 3 as a"),
                   lambda: (tmp_path / "models" / "b.sql").unlink()):
        later = parsed_now()
        change()
        for path in (tmp_path / "models", *(tmp_path / "models").iterdir()):
            os.utime(path, (later + 1, later + 1))  # the change happens after the parse
        assert manifest_is_stale(project)


def test_old_run_folders_are_pruned_but_never_recent_ones(tmp_path):
    """dagster-dbt leaves one folder per dbt command: beyond the most recent few, folders
    are removed, except any used within the minimum age (another process's dbt may still be
    writing there: its dbt.log is fresh even when the folder itself is old)."""
    import time

    from platform_assets.dbt_command import prune_run_folders

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




def test_parse_states_are_per_connection_profile(tmp_path, monkeypatch):
    """Each connection profile (the values of the variables profiles.yml reads) has its own
    parse state: another warehouse path is another state, a replaced state is atomic, and
    only the most recently used states are kept."""
    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import KEPT_PARSE_STATES, keep_parse_state, parse_state_path

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    project = DbtProject(project_dir=tmp_path, target_path="target/local")
    monkeypatch.setenv("DUCKDB_PATH", "/a/warehouse.duckdb")
    first = parse_state_path(project)
    monkeypatch.setenv("DBT_ENV_SECRET_UNRELATED", "x")  # not read by profiles.yml
    monkeypatch.setenv("REPLICA_PASSWORD", "rotated")  # a credential: no parse changes with it
    assert parse_state_path(project) == first
    monkeypatch.setenv("DUCKDB_PATH", "/b/warehouse.duckdb")
    second = parse_state_path(project)
    assert second != first and second.parent == first.parent

    written = tmp_path / "written.msgpack"
    for i in range(KEPT_PARSE_STATES + 3):
        written.write_bytes(f"state {i}".encode())
        target = first.with_name(f"profile-{i:02d}.msgpack")
        keep_parse_state(target, written)
        os.utime(target, (1_000_000 + i, 1_000_000 + i))
    kept = sorted(p.name for p in first.parent.iterdir())
    assert kept == [f"profile-{i:02d}.msgpack" for i in range(3, KEPT_PARSE_STATES + 3)]
    assert (first.parent / f"profile-{KEPT_PARSE_STATES + 2:02d}.msgpack").read_bytes() == \
        f"state {KEPT_PARSE_STATES + 2}".encode()


def tiny_dbt_project(folder):
    """A one-model dbt project on DuckDB (DUCKDB_PATH) in `folder`."""
    from dagster_dbt import DbtProject

    (folder / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    (folder / "profiles.yml").write_text(
        "tiny:\n  target: local\n  outputs:\n    local:\n      type: duckdb\n"
        "      path: \"{{ env_var('DUCKDB_PATH') }}\"\n")
    (folder / "models").mkdir()
    (folder / "models" / "a.sql").write_text("select 1 as a")
    return DbtProject(project_dir=folder, target_path="target/local", target="local")


def test_a_profile_keeps_its_own_parse_state_whatever_other_profiles_leave(tmp_path, monkeypatch):
    """Two things another profile leaves must not make this profile's next command parse in
    full ("profile has changed"):
    - the environment's prepared state, when another profile prepared last;
    - a `target/partial_parse.msgpack` a plain `dbt` in the project wrote (dagster-dbt copies it
      into a command's folder where none is)."""
    from platform_assets.dbt_project import (
        dbt_resource,
        keep_command_state,
        parse_state_path,
        prepare,
        prepared_state_path,
        start_dbt,
    )

    project = tiny_dbt_project(tmp_path)

    def parse_events(name: str) -> list[str]:
        """The events of a dbt command started and ended as run_dbt does."""
        folder = tmp_path / name
        invocation = start_dbt(dbt_resource(project), project, ["parse"], folder)
        names = [event.raw_event["info"]["name"] for event in invocation.stream_raw_events()]
        invocation.wait()
        keep_command_state(project, folder, logging.getLogger(__name__))
        return names

    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "b.duckdb"))
    prepare(project)
    b_state = parse_state_path(project).read_bytes()
    assert prepared_state_path(project).read_bytes() == b_state
    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "a.duckdb"))
    prepare(project)  # profile A prepared last: the environment's state is A's
    a_state = prepared_state_path(project).read_bytes()
    assert a_state != b_state and parse_state_path(project).read_bytes() == a_state

    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "b.duckdb"))
    events = parse_events("after-another-profile-prepared")
    assert "UnableToPartialParse" not in events and "ParsedFileLoadFailed" not in events, events
    assert parse_state_path(project).read_bytes() == b_state

    (tmp_path / "target" / "partial_parse.msgpack").write_bytes(a_state)
    events = parse_events("beside-a-plain-dbt-state")
    assert "UnableToPartialParse" not in events and "ParsedFileLoadFailed" not in events, events
    assert parse_state_path(project).read_bytes() == b_state  # nothing changed: dbt wrote none


def test_the_preparation_asks_no_registry_and_parses_only_when_stale(tmp_path, monkeypatch):
    """dagster-dbt's own preparer (prepare_if_dev) runs a plain `dbt --version`, which asks PyPI
    for the latest releases, and parses in every run worker of `dagster dev`. The platform's
    preparation runs dbt through platform-dbt (its `--version` asks nothing) and parses only
    when a project file changed since the manifest, under `dagster dev` too."""
    from platform_assets.dbt_project import manifest_database, manifest_for, manifest_is_stale
    from platform_assets.settings import PlatformSettings

    folder = tmp_path / "project"
    folder.mkdir()
    project = tiny_dbt_project(folder)
    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "a.duckdb"))
    monkeypatch.setenv("DAGSTER_IS_DEV_CLI", "1")
    # any HTTP(S) request goes to this proxy, which records it and hangs up
    requests_seen = tmp_path / "proxy.log"
    proxy = subprocess.Popen([sys.executable, "-c", RECORDING_PROXY, str(requests_seen)], stdout=subprocess.PIPE,
                             text=True)
    try:
        port = proxy.stdout.readline().strip()
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)

        local = PlatformSettings(env="local", values={"DUCKDB_PATH": str(tmp_path / "a.duckdb")})
        manifest_for(project, local)
        parsed = project.manifest_path.stat().st_mtime_ns
        assert "model.tiny.a" in json.loads(project.manifest_path.read_text())["nodes"]
        manifest_for(project, local)  # nothing changed: no parse
        assert project.manifest_path.stat().st_mtime_ns == parsed
        # a file saved while dbt parsed (after the parse began) leaves the manifest stale
        saved = parsed / 1e9 + 0.5
        os.utime(folder / "models" / "a.sql", (saved, saved))
        assert manifest_is_stale(project)
        manifest_for(project, local)
        assert project.manifest_path.stat().st_mtime_ns > parsed and not manifest_is_stale(project)
        (folder / "models" / "b.sql").write_text("select 2 as b")
        assert "model.tiny.b" in manifest_for(project, local)["nodes"]
        # another warehouse (dbt-duckdb's database: the file's name): its relations, parsed again
        assert manifest_database(json.loads(project.manifest_path.read_text())) == "a"
        other = PlatformSettings(env="local", values={"DUCKDB_PATH": str(tmp_path / "b.duckdb")})
        monkeypatch.setenv("DUCKDB_PATH", other.values["DUCKDB_PATH"])
        assert manifest_database(manifest_for(project, other)) == "b"
        parsed = project.manifest_path.stat().st_mtime_ns
        assert manifest_database(manifest_for(project, other)) == "b"
        assert project.manifest_path.stat().st_mtime_ns == parsed
        # a file of the same name elsewhere (each test's own folder): the same database, no parse
        elsewhere = PlatformSettings(env="local", values={"DUCKDB_PATH": str(tmp_path / "elsewhere" / "b.duckdb")})
        manifest_for(project, elsewhere)
        assert project.manifest_path.stat().st_mtime_ns == parsed
        # rewritten in place (a `dbt parse` by hand, any profile): no longer the one its mark names
        os.utime(project.manifest_path, (parsed / 1e9 + 5, parsed / 1e9 + 5))
        assert manifest_is_stale(project, "b.duckdb") and not manifest_is_stale(project)
        assert not requests_seen.exists()
        # the control: a plain `dbt --version` does ask, through the proxy
        plain = subprocess.run([str(Path(sys.executable).parent / "dbt"), "--version"], capture_output=True,
                               text=True, timeout=120)
        assert plain.returncode == 0, plain.stderr
        assert requests_seen.exists()
    finally:
        proxy.kill()
        proxy.wait()


RECORDING_PROXY = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    with open(sys.argv[1], "a") as log:
        log.write("request\\n")
    conn.close()
"""


def test_prod_refuses_a_manifest_parsed_for_another_database(tmp_path):
    """The image's manifest names the database its build parsed for in every relation: on
    another REDSHIFT_DB the catalog's table names and dagster-dbt's row counts would name a
    database that is not there, so the code location refuses to load, naming the build arg."""
    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import manifest_for
    from platform_assets.settings import PlatformSettings

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    project = DbtProject(project_dir=tmp_path, target_path="target/prod")
    project.manifest_path.parent.mkdir(parents=True)
    manifest = {"nodes": {"model.tiny.m": {"resource_type": "model", "database": "parse_only", "schema": "marts"}}}
    project.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match=r"'parse_only' but REDSHIFT_DB is 'analytics'.*"
                                                 r"--build-arg REDSHIFT_DB=analytics"):
        manifest_for(project, PlatformSettings(env="prod", values={"REDSHIFT_DB": "analytics"}))
    # the same database (Redshift folds unquoted names), or none set (the run's preflight says so)
    for values in ({"REDSHIFT_DB": "parse_only"}, {"REDSHIFT_DB": "PARSE_ONLY"}, {}):
        assert manifest_for(project, PlatformSettings(env="prod", values=values)) == manifest


def test_a_manifest_rewritten_in_place_is_read_whole(tmp_path):
    """dbt rewrites manifest.json in place (a `dbt parse` run by hand into the target folder):
    a platform loading meanwhile reads it whole, where a single read meets a half-written file."""
    import threading
    import time

    from dagster_dbt import DbtProject

    from platform_assets.dbt_project import read_manifest

    (tmp_path / "dbt_project.yml").write_text("name: tiny\nversion: '1.0.0'\nprofile: tiny\n")
    project = DbtProject(project_dir=tmp_path, target_path="target/local")
    manifest = {"nodes": {f"model.tiny.m{i}": {"name": f"m{i}", "sql": "x" * 200} for i in range(500)}}
    text = json.dumps(manifest)
    project.manifest_path.parent.mkdir(parents=True)
    project.manifest_path.write_text(text)
    stop = threading.Event()

    def rewrite_in_place():
        while not stop.is_set():
            with open(project.manifest_path, "w") as f:  # truncates, as dbt's write does
                f.write(text[: len(text) // 2])
                f.flush()
                time.sleep(0.05)
                f.write(text[len(text) // 2:])
            time.sleep(0.05)

    writer = threading.Thread(target=rewrite_in_place)
    writer.start()
    try:
        single_reads_failed = 0
        for _ in range(20):
            try:
                json.loads(project.manifest_path.read_text())
            except json.JSONDecodeError:
                single_reads_failed += 1
            time.sleep(0.013)
        assert single_reads_failed > 0  # the hazard is real here
        for _ in range(20):
            assert read_manifest(project) == manifest
    finally:
        stop.set()
        writer.join()


def test_a_manifest_a_stopped_parse_cut_short_is_parsed_again_locally(tmp_path, monkeypatch):
    """A `dbt parse` killed while writing manifest.json leaves it cut short and newer than the
    project, so nothing looks stale: a local load parses the project again; prod's packaged
    manifest fails naming the file instead."""

    from platform_assets.dbt_project import manifest_is_stale, prepare, read_manifest

    project = tiny_dbt_project(tmp_path)
    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "a.duckdb"))
    prepare(project)
    whole = project.manifest_path.read_text()
    project.manifest_path.write_text(whole[: len(whole) // 3])
    assert not manifest_is_stale(project)

    with pytest.raises(ValueError, match="Build the image again"):
        read_manifest(project, attempts=2)
    manifest = read_manifest(project, attempts=2, reparse=True)
    assert "model.tiny.a" in manifest["nodes"]
    assert json.loads(project.manifest_path.read_text()) == manifest

    # A manifest still cut short after the parse (someone's `dbt parse` writing it meanwhile)
    # names the file and the likely writer, not the image that a local load never uses.
    import platform_assets.dbt_project as dbt_project

    def parse_then_cut(project, database=None, publish=True):
        prepare(project, database, publish)
        project.manifest_path.write_text(whole[: len(whole) // 3])

    project.manifest_path.write_text(whole[: len(whole) // 3])
    monkeypatch.setattr(dbt_project, "prepare", parse_then_cut)
    with pytest.raises(ValueError, match="just parsed again") as raised:
        read_manifest(project, attempts=2, reparse=True)
    assert str(project.manifest_path) in str(raised.value) and "image" not in str(raised.value)
