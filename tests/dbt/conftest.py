"""The dbt project built on both local engines against the session's primary + replica.

One session fixture plays the whole story once, DuckDB and PostgreSQL in step (each step
runs on both engines at once, then the next simulator batch), and records what every test
then checks: builds, checksums of the operational tables around each build, the federated
objects on PostgreSQL, what a window run changed, and the incremental marts before and after
a full refresh.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import psycopg
import pytest
from psycopg import sql

from .dbt_cli import DbtResult, DbtRunner, dbt_env

ENGINES = ("duckdb", "pg")
TARGETS = {"duckdb": "local", "pg": "pg"}
# incremental model -> the columns that order its rows (its key)
INCREMENTAL_MARTS = {"fct_lesson_events": "event_id",
                     "fct_daily_learning_activity": "company_id, course_id, activity_date"}
# Bookkeeping columns that say how a row was loaded, not what it is.
LOAD_COLUMNS = {"loaded_by"}
# Extra rounds of churn after build_3: (simulator seed, fraction of late events). One: dbt's
# own watermark path; random churn through the orchestrator is tests/platform/churn.py's.
CHURN_ROUNDS = ((303, 0.5),)
CHURN_EVENTS = 700
TEST_WAREHOUSE_DB = "dbt_test_warehouse"


class Warehouse:
    """Read-only access to one engine's warehouse, for assertions."""

    def __init__(self, engine: str, env: dict[str, str], pg_env):
        self.engine, self.env, self.pg_env = engine, env, pg_env

    def query(self, statement: str, params: tuple = ()) -> tuple[list[str], list[tuple]]:
        if self.engine == "duckdb":
            con = duckdb.connect(self.env["DUCKDB_PATH"], read_only=True)
            try:
                cur = con.execute(statement.replace("%s", "?"), list(params))
                return [d[0] for d in cur.description], cur.fetchall()
            finally:
                con.close()
        with self.pg_env.cluster.primary.connect(self.env["WAREHOUSE_PG_DB"]) as conn:
            cur = conn.execute(statement, params)
            return [d.name for d in cur.description], cur.fetchall()

    def table(self, name: str, key: str, exclude: set[str] = frozenset()) -> list[tuple]:
        columns, rows = self.query(f"select * from marts.{name} order by {key}")
        keep = [i for i, c in enumerate(columns) if c not in exclude]
        return [tuple(row[i] for i in keep) for row in rows]

    def attached_catalogs(self) -> list[str]:
        return [r[0] for r in self.query("select database_name from duckdb_databases()")[1]]


def pg_federation_objects(pg_env, dbname: str) -> dict[str, object]:
    """Identity (oids) of every federated object in a PostgreSQL warehouse: if a build
    re-created any of them, its oid changes."""
    with pg_env.cluster.primary.connect(dbname) as conn:
        return {
            "server": conn.execute(
                "select oid, srvoptions from pg_foreign_server where srvname = 'replica'").fetchall(),
            "user_mappings": conn.execute(
                "select umid, srvname, usename from pg_user_mappings").fetchall(),
            "schemas": conn.execute(
                "select oid, nspname from pg_namespace where nspname like 'federated%%'"
                " order by nspname").fetchall(),
            "foreign_tables": conn.execute(
                "select c.oid, n.nspname, c.relname from pg_class c"
                " join pg_namespace n on n.oid = c.relnamespace"
                " where c.relkind = 'f' order by n.nspname, c.relname").fetchall(),
        }


@dataclass
class Scenario:
    runners: dict[str, DbtRunner]
    warehouses: dict[str, Warehouse]
    steps: dict[str, dict[str, DbtResult]] = field(default_factory=dict)
    checksums: dict[str, tuple[dict, dict]] = field(default_factory=dict)
    pg_objects: dict[str, dict] = field(default_factory=dict)
    window: dict[str, str] = field(default_factory=dict)
    window_check: dict[str, dict] = field(default_factory=dict)
    activity_window: dict[str, dict] = field(default_factory=dict)
    incremental: dict[str, dict[str, list[tuple]]] = field(default_factory=dict)
    full_refresh: dict[str, dict[str, list[tuple]]] = field(default_factory=dict)
    full_refresh_loaded_by: dict[str, set[str]] = field(default_factory=dict)
    simulated: list[dict] = field(default_factory=list)
    pg_manifest: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def simulate(pg_env, **kwargs) -> dict[str, int]:
    """One simulator batch, then wait until the replica has replayed all of it.

    pg_env.simulate waits for pg_current_wal_lsn(), the WAL *write* position; with the
    primary's synchronous_commit = off the batch's commit record can still be in the WAL
    buffers at that point, so the wait can end before the replica has the batch. Waiting
    for the *insert* position closes that gap.
    """
    # dbt's own incremental modes (watermark, window) see new rows, not edits or deletes of
    # events: those reach the facts through the orchestrator's per-day fingerprints, tested
    # in tests/platform/test_churn.py. This scenario tests dbt's modes on inserts and lateness.
    kwargs = {"edit_fraction": 0.0, "delete_fraction": 0.0, **kwargs}
    counts = pg_env.simulate(**kwargs)
    with pg_env.cluster.primary.connect() as conn:
        target = conn.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
    deadline = time.monotonic() + 60
    with pg_env.cluster.replica.connect() as conn:
        while not conn.execute(
            "select pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
        ).fetchone()[0]:
            assert time.monotonic() < deadline, f"replica did not replay {target}"
            time.sleep(0.05)
    return counts


def _create_pg_warehouse(pg_env) -> None:
    """A warehouse database of our own (like `make up` makes `warehouse`), so that other
    test modules using the session's warehouse are not affected by these builds."""
    with pg_env.cluster.primary.connect() as conn:
        conn.execute(sql.SQL("drop database if exists {}").format(sql.Identifier(TEST_WAREHOUSE_DB)))
        conn.execute(sql.SQL("create database {} owner warehouse").format(sql.Identifier(TEST_WAREHOUSE_DB)))
    with pg_env.cluster.primary.connect(TEST_WAREHOUSE_DB) as conn:
        conn.execute("create extension if not exists postgres_fdw")
        conn.execute("grant usage on foreign data wrapper postgres_fdw to warehouse")


_BUILT: dict[str, Scenario] = {}


@pytest.fixture(scope="session")
def dbt_scenario(pg_env, tmp_path_factory) -> Scenario:
    return shared_scenario(pg_env, tmp_path_factory)


def shared_scenario(pg_env, tmp_path_factory) -> Scenario:
    """The scenario, built once per session whichever test package asks for it first
    (tests/reliability reuses its warehouses)."""
    if "scenario" not in _BUILT:
        _BUILT["scenario"] = _build_scenario(pg_env, tmp_path_factory)
    return _BUILT["scenario"]


def _build_scenario(pg_env, tmp_path_factory) -> Scenario:
    started = time.monotonic()
    base = tmp_path_factory.mktemp("dbt")
    _create_pg_warehouse(pg_env)
    envs = {
        "duckdb": dbt_env(pg_env.environ(), DUCKDB_PATH=str(base / "duckdb" / "warehouse.duckdb")),
        "pg": dbt_env(pg_env.environ(), WAREHOUSE_PG_DB=TEST_WAREHOUSE_DB),
    }
    runners = {}
    for engine in ENGINES:
        work = base / engine
        work.mkdir(exist_ok=True)
        runners[engine] = DbtRunner(TARGETS[engine], envs[engine], work)
    scenario = Scenario(
        runners=runners,
        warehouses={e: Warehouse(e, envs[e], pg_env) for e in ENGINES},
    )

    def on_both(step: str, *args: str, target_dir: str = "target",
                engine_args: dict[str, tuple[str, ...]] | None = None,
                engine_env: dict[str, dict[str, str]] | None = None) -> None:
        """Run one dbt command on both engines at once (plus, per engine, `engine_args` and
        `engine_env`); record results and checksums."""
        before = pg_env.checksums()
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                e: pool.submit(runners[e], *args, *(engine_args or {}).get(e, ()), check=False,
                               target_dir=target_dir, extra_env=(engine_env or {}).get(e))
                for e in ENGINES
            }
            scenario.steps[step] = {e: f.result() for e, f in futures.items()}
        scenario.seconds[step] = time.monotonic() - t0
        scenario.checksums[step] = (before, pg_env.checksums())
        for engine, result in scenario.steps[step].items():
            assert result.ok, f"[{engine}] {result.describe()}"

    # 1. First build on empty warehouses: everything full.
    on_both("build_1", "build")
    scenario.pg_objects["after_build_1"] = pg_federation_objects(pg_env, TEST_WAREHOUSE_DB)

    # 2. Round one of application changes, then an incremental build (watermark mode).
    scenario.simulated.append(simulate(pg_env, new_events=1500, seed=101))
    on_both("build_2", "build")
    scenario.pg_objects["after_build_2"] = pg_federation_objects(pg_env, TEST_WAREHOUSE_DB)
    # Every model compiled on pg in its incremental form (ephemeral ones included).
    scenario.pg_manifest = runners["pg"].manifest()

    # 3. Round two (many late events), then a window run over past days first (as a
    #    backfill would), then an incremental build.
    scenario.simulated.append(simulate(pg_env, new_events=1500, seed=202, late_fraction=0.3))
    today = datetime.utcnow().date()
    scenario.window = {
        "window_start": (today - timedelta(days=6)).isoformat(),
        "window_end": (today - timedelta(days=2)).isoformat(),
    }
    before_window = {e: _fact_rows(scenario.warehouses[e]) for e in ENGINES}
    before_activity = {e: _activity_rows(scenario.warehouses[e]) for e in ENGINES}
    # The two ways of giving the window: on pg as --vars (a data engineer's backfill from the
    # dbt CLI), on DuckDB as dbt's event-time bounds (as the orchestrator's daily runs pass it).
    # Both daily-partitioned facts, as a partition run of the daily set builds them.
    on_both("window", "run", "--select", "fct_lesson_events", "fct_daily_learning_activity",
            target_dir="target-window",
            engine_args={"pg": ("--vars", json.dumps(scenario.window)),
                         "duckdb": ("--event-time-start", scenario.window["window_start"],
                                    "--event-time-end", scenario.window["window_end"])})
    with pg_env.replica() as conn:
        in_window = replica_event_ids(conn, scenario.window["window_start"], scenario.window["window_end"])
    for engine in ENGINES:
        scenario.window_check[engine] = {
            "before": before_window[engine],
            "after": _fact_rows(scenario.warehouses[engine]),
            "replica_ids": in_window,
        }
        scenario.activity_window[engine] = {"before": before_activity[engine],
                                            "after": _activity_rows(scenario.warehouses[engine])}
    # The daily activity without a window: a table rebuilt in full from the fact as it now is.
    on_both("activity_rebuilt", "run", "--select", "fct_daily_learning_activity")
    for engine in ENGINES:
        scenario.activity_window[engine]["rebuilt"] = _activity_rows(scenario.warehouses[engine])
    # The incremental facts with their tests and unit tests.
    on_both("build_3", "build", "--select", "config.materialized:incremental")

    # 4. Churn: another round of application changes (another seed, more late events),
    #    followed by the incremental run dbt makes without a window. Cheap:
    #    `run` of the incremental models only (their tests ran in build_3).
    for number, (seed, late) in enumerate(CHURN_ROUNDS, start=4):
        scenario.simulated.append(simulate(pg_env, new_events=CHURN_EVENTS, seed=seed, late_fraction=late))
        on_both(f"churn_{number}", "run", "--select", "config.materialized:incremental")

    # 5. The incremental marts as incremental runs left them, then after a full refresh.
    for engine in ENGINES:
        wh = scenario.warehouses[engine]
        scenario.incremental[engine] = {
            t: wh.table(t, key, LOAD_COLUMNS) for t, key in INCREMENTAL_MARTS.items()
        }
    # The documented full refresh (dbt/README.md): everything, not only the incremental
    # models, so the warehouses end current and whole, as tests/reliability expects (readers
    # during a refresh compare states before and after); `build`, so its tests and unit
    # tests run under --full-refresh too.
    on_both("full_refresh", "build", "--full-refresh")
    for engine in ENGINES:
        wh = scenario.warehouses[engine]
        scenario.full_refresh[engine] = {
            t: wh.table(t, key, LOAD_COLUMNS) for t, key in INCREMENTAL_MARTS.items()
        }
        scenario.full_refresh_loaded_by[engine] = {
            r[0] for r in wh.query("select distinct loaded_by from marts.fct_lesson_events")[1]}
    scenario.seconds["total"] = time.monotonic() - started
    return scenario


@dataclass
class Extras:
    """The remaining dbt invocations, run side by side once the scenario is done."""

    docs_generate: DbtResult
    prod_parse: DbtResult
    prod_manifest: dict
    prod_target_dir: Path
    seconds: float


PROD_DUMMY_ENV = {
    "REDSHIFT_HOST": "warehouse.example.invalid",
    "REDSHIFT_PORT": "5439",
    "REDSHIFT_DB": "warehouse",
    "REDSHIFT_USER": "dbt",
    "REDSHIFT_PASSWORD": "dummy",
    "REDSHIFT_FEDERATION_IAM_ROLE_ARN": "arn:aws:iam::123456789012:role/redshift-federation",
    "REPLICA_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:replica-ro",
    "REPLICA_ENDPOINT": "replica.example.invalid",
    "REPLICA_PORT": "5432",
    "REPLICA_DB": "saas",
    "REPLICA_SCHEMA": "app",
}


@pytest.fixture(scope="session")
def dbt_extras(dbt_scenario: Scenario, tmp_path_factory) -> Extras:
    started = time.monotonic()
    base = tmp_path_factory.mktemp("dbt_extras")
    duck = dbt_scenario.runners["duckdb"]
    (base / "prod").mkdir()
    # Offline: only PATH/HOME and dummy values, nothing that could reach a real service.
    prod_env = dbt_env(
        {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
        **PROD_DUMMY_ENV,
    )
    prod = DbtRunner("prod", prod_env, base / "prod")
    with ThreadPoolExecutor(max_workers=2) as pool:
        docs = pool.submit(duck, "docs", "generate", check=False)
        parsed = pool.submit(prod, "parse", check=False)
        extras = Extras(
            docs_generate=docs.result(), prod_parse=parsed.result(), prod_manifest={},
            prod_target_dir=prod.work_dir / "target", seconds=0.0,
        )
    if extras.prod_parse.ok:
        extras.prod_manifest = prod.manifest()
    extras.seconds = time.monotonic() - started
    return extras


def _activity_rows(wh: Warehouse) -> dict:
    """fct_daily_learning_activity by (company_id, course_id, activity_date)."""
    columns, rows = wh.query("select * from marts.fct_daily_learning_activity")
    key = [columns.index(c) for c in ("company_id", "course_id", "activity_date")]
    return {"columns": columns, "rows": {tuple(row[i] for i in key): row for row in rows}}


def _fact_rows(wh: Warehouse) -> dict:
    columns, rows = wh.query("select * from marts.fct_lesson_events")
    key = columns.index("event_id")
    return {"columns": columns, "rows": {row[key]: row for row in rows}}


def replica_event_ids(conn: psycopg.Connection, start: str, end: str) -> set[int]:
    return {
        r[0] for r in conn.execute(
            "select event_id from app.lesson_events where occurred_at >= %s and occurred_at < %s",
            (start, end),
        ).fetchall()
    }

