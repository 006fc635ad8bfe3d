"""The local operational source: replication, read-only access, determinism, simulator,
idempotent up, and down/up keeping the data."""

from __future__ import annotations

import duckdb
import psycopg
import pytest
from localenv import generator
from localenv.environment import APP_DB, table_checksums
from psycopg import errors, sql


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


def test_down_then_up_keeps_data(pg_env):
    before = pg_env.checksums()
    stopped = pg_env.cluster.down()
    assert stopped == ["stopped replica", "stopped primary"]
    assert not pg_env.cluster.is_running(pg_env.cluster.primary)
    result = pg_env.local.up(progress=lambda _m: None)
    assert result["loaded"] is None
    assert pg_env.checksums() == before
