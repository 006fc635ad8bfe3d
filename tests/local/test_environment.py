"""The local operational source: replication, read-only access, determinism, simulator,
idempotent up, and down/up keeping the data."""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import psycopg
import pytest
from localenv import generator
from localenv.environment import APP_DB, table_checksums
from localenv.settings import LocalSettings, SettingError
from psycopg import errors, sql

from ..platform.conftest import REPO_ROOT


def test_write_on_primary_appears_on_replica(pg_env):
    with pg_env.cluster.primary.connect() as conn:
        conn.execute("create table if not exists replication_probe (id int, note text)")
        conn.execute("insert into replication_probe values (1, 'hello replica')")
    pg_env.wait_for_replay()
    with pg_env.cluster.replica.connect() as conn:
        rows = conn.execute("select note from replication_probe where id = 1").fetchall()
    assert rows == [("hello replica",)]


def test_replica_rejects_writes(pg_env):
    with pg_env.cluster.replica.connect(APP_DB) as conn:
        assert conn.execute("select pg_is_in_recovery()").fetchone()[0] is True
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("insert into app.courses (title, category, difficulty, published_at,"
                         " created_at, updated_at) values ('x', 'aws', 'beginner', now(), now(), now())")


def test_read_only_role_cannot_write_on_primary(pg_env):
    ro_on_primary = pg_env.values["REPLICA_URL"].replace(
        f":{pg_env.settings.replica_port}/", f":{pg_env.settings.primary_port}/"
    )
    statements = [
        "insert into app.companies (name, plan, seats, region, created_at, updated_at)"
        " values ('evil', 'team', 1, 'eu-west', now(), now())",
        "update app.users set full_name = 'x'",
        "delete from app.lesson_events",
        "create table app.evil (id int)",
        "create table public.evil (id int)",
        "create temporary table evil (id int)",
    ]
    for statement in statements:
        with psycopg.connect(ro_on_primary, autocommit=True) as conn:
            # Even after turning its read-only default off, the role has no privilege to write.
            conn.execute("set default_transaction_read_only = off")
            with pytest.raises((errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction)):
                conn.execute(statement)
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(ro_on_primary.replace(f"/{APP_DB}", "/warehouse"))


def _duckdb_checksums(seed: int, end, days: int) -> dict[str, str]:
    con = duckdb.connect()
    generator.build(con, events=3_000, seed=seed, end=end, days=days)
    return {
        t: con.execute(f"select md5(string_agg(md5(t::varchar), '' order by t)) from {t} t").fetchone()[0]
        for t in generator.TABLES
    }


def test_generator_is_deterministic(pg_env):
    s = pg_env.settings
    # Same seed: the data loaded into a second database equals the fixture's initial data.
    with pg_env.cluster.primary.connect() as conn:
        conn.execute("drop database if exists determinism_check")
        conn.execute("create database determinism_check owner app_owner")
    try:
        with pg_env.cluster.primary.connect("determinism_check", autocommit=False) as conn:
            conn.execute("set role app_owner")
            from importlib import resources
            conn.execute(resources.files("localenv").joinpath("schema.sql").read_text())
            generator.load(conn, events=s.events, seed=s.seed, end=s.end, days=s.days,
                           progress=lambda _m: None)
            conn.commit()
            reloaded = table_checksums(conn)
    finally:
        with pg_env.cluster.primary.connect() as conn:
            conn.execute("drop database if exists determinism_check")
    assert reloaded == pg_env.initial_checksums
    # A different seed gives different data (so the checksums can tell).
    a = _duckdb_checksums(1, s.end, s.days)
    assert a == _duckdb_checksums(1, s.end, s.days)
    b = _duckdb_checksums(2, s.end, s.days)
    assert {t for t in a if a[t] != b[t]} >= {"users", "enrollments", "lesson_events"}


def _watermarks(conn) -> dict[str, object]:
    out = {}
    for table in ("users", "companies", "enrollments", "subscriptions"):
        out[table] = conn.execute(
            sql.SQL("select max(updated_at) from {}").format(sql.Identifier("app", table))
        ).fetchone()[0]
    out["lesson_events"] = conn.execute("select count(*) from app.lesson_events").fetchone()[0]
    out["certificates"] = conn.execute("select count(*) from app.certificates").fetchone()[0]
    out["events_received"] = conn.execute("select max(created_at) from app.lesson_events").fetchone()[0]
    return out


def test_simulator_changes_reach_replica(pg_env):
    with pg_env.replica() as conn:
        before = _watermarks(conn)
    counts = pg_env.simulate(new_events=500, seed=1)
    with pg_env.replica() as conn:
        after = _watermarks(conn)
        late = conn.execute(
            "select count(*) from app.lesson_events where created_at - occurred_at > interval '1 day'"
            " and created_at > %s", (before["events_received"],)
        ).fetchone()[0]
    assert counts["lesson_events_inserted"] == 500
    # new events in, and a few of the last week's removed (edits keep the count)
    assert counts["lesson_events_edited"] > 0 and counts["lesson_events_deleted"] > 0
    assert after["lesson_events"] == before["lesson_events"] + 500 - counts["lesson_events_deleted"]
    assert after["certificates"] == before["certificates"] + counts["certificates_issued"]
    for table in ("users", "companies", "enrollments", "subscriptions"):
        assert after[table] > before[table], table
    assert late == counts["lesson_events_late"] > 0


def test_up_is_idempotent(pg_env):
    before = pg_env.checksums()
    result = pg_env.local.up(progress=lambda _m: None)
    assert result["done"] == []
    assert result["loaded"] is None
    assert result["env"] == pg_env.values
    assert pg_env.checksums() == before


def _localenv(pg_env, *args: str, **environ: str) -> subprocess.CompletedProcess:
    """`python -m localenv ...` (what `make status` runs) in a shell that has none of the port
    variables: only LOCAL_DIR, as the Makefile exports it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PRIMARY_PORT", "REPLICA_PORT")}
    env.update(LOCAL_DIR=str(pg_env.settings.local_dir), **environ)
    return subprocess.run([sys.executable, "-m", "localenv", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_status_reads_the_ports_up_chose(pg_env):
    s = pg_env.settings
    assert (s.primary_port, s.replica_port) != (54320, 54321)  # free ports, not the defaults
    status = _localenv(pg_env, "status")
    assert status.returncode == 0, status.stderr
    assert f"primary  running      127.0.0.1:{s.primary_port} " in status.stdout
    assert f"replica  running      127.0.0.1:{s.replica_port} " in status.stdout
    assert "replica replay lag:" in status.stdout
    # `make up` again in such a shell finds the running servers: nothing to do, no wait.
    up = _localenv(pg_env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "already up: nothing to do" in up.stdout
    # A port variable set against the running servers is an error naming it, not a minute's wait.
    wrong = _localenv(pg_env, "status", REPLICA_PORT=str(s.primary_port + 7))
    assert wrong.returncode == 1
    assert f"runs on 127.0.0.1:{s.replica_port}, not on REPLICA_PORT={s.primary_port + 7}" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_remembered_ports_of_an_older_env_file(tmp_path, monkeypatch):
    # Files written before PRIMARY_PORT was recorded name the primary's port as the pg warehouse's.
    (tmp_path / "platform.env").write_text("REPLICA_PORT=6001\nWAREHOUSE_PG_PORT=6000\n")
    monkeypatch.setenv("LOCAL_DIR", str(tmp_path))
    monkeypatch.delenv("PRIMARY_PORT", raising=False)
    monkeypatch.delenv("REPLICA_PORT", raising=False)
    settings = LocalSettings.from_env()
    assert (settings.primary_port, settings.replica_port) == (6000, 6001)
    monkeypatch.setenv("REPLICA_PORT", "6002")  # a variable set wins
    assert LocalSettings.from_env().replica_port == 6002
    (tmp_path / "platform.env").write_text("REPLICA_PORT=abc\n")
    with pytest.raises(SettingError, match="REPLICA_PORT='abc' in .*platform.env is not a port number"):
        LocalSettings.from_env()


def test_status_of_missing_servers_is_a_report(tmp_path):
    fresh = subprocess.run([sys.executable, "-m", "localenv", "status"], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "LOCAL_DIR": str(tmp_path)})
    assert fresh.returncode == 0, fresh.stderr
    assert "primary  not created" in fresh.stdout


def test_down_then_up_keeps_data(pg_env):
    before = pg_env.checksums()
    stopped = pg_env.cluster.down()
    assert stopped == ["stopped replica", "stopped primary"]
    assert not pg_env.cluster.is_running(pg_env.cluster.primary)
    # Stopped servers are a state `make status` reports, with the ports `make up` chose.
    status = _localenv(pg_env, "status")
    assert status.returncode == 0, status.stderr
    assert f"primary  stopped      127.0.0.1:{pg_env.settings.primary_port} " in status.stdout
    result = pg_env.local.up(progress=lambda _m: None)
    assert result["loaded"] is None
    assert pg_env.checksums() == before


def test_make_up_keeps_what_make_bi_added_and_bi_down_removes_it(tmp_path, monkeypatch):
    from dotenv import set_key
    from localenv.environment import LocalEnvironment

    from bi.__main__ import SUPERSET_KEYS, down
    from platform_assets.settings import env_file_values

    monkeypatch.setenv("LOCAL_DIR", str(tmp_path))
    env_file = tmp_path / "platform.env"
    environment = LocalEnvironment(LocalSettings.from_env())
    environment.write_env_file({"REPLICA_PORT": "6001"})
    added = {"SUPERSET_URL": "http://127.0.0.1:8088", "SUPERSET_DATABASE_URI": f"duckdb:///{tmp_path}/a b#c.duckdb",
             "PORTAL_ORIGINS": "http://127.0.0.1:8090,http://localhost:8090"}
    for key, value in added.items():
        set_key(env_file, key, value)
    environment.write_env_file({"REPLICA_PORT": "6002"})  # make up again: its values win, the rest stays
    assert env_file_values(env_file) == {"REPLICA_PORT": "6002", **added}
    sourced = subprocess.run(["bash", "-c", f'set -a; . "{env_file}"; echo "$SUPERSET_DATABASE_URI"'],
                             capture_output=True, text=True, check=True)
    assert sourced.stdout.strip() == added["SUPERSET_DATABASE_URI"]  # still shell-sourceable
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"

    down({"LOCAL_DIR": str(tmp_path), "PORTAL_HOME": str(tmp_path / "portal"), "EXPORT_URI": str(tmp_path)})
    assert set(env_file_values(env_file)) & set(SUPERSET_KEYS) == set()
    assert env_file_values(env_file)["REPLICA_PORT"] == "6002"
