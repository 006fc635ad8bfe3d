"""Security: the federation role cannot write anywhere, through either engine; and no password
from the environment reaches Dagster's event logs and storage, dbt's logs and target folders,
or run tags/config, after a real observation and dbt run on each engine. (That the role
cannot write on the primary by itself is tests/local/test_environment.py.)"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import duckdb
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

from platform_assets.federation import POSTGRES_EXTENSION, ensure_duckdb_extension
from platform_assets.settings import DBT_PROJECT_DIR

from ..platform.conftest import platform_under_test
from .faults import failure_messages, observe, run_assets

WRITES = [
    "insert into {db}.app.courses (title, category, difficulty, published_at, created_at, updated_at)"
    " values ('evil', 'aws', 'beginner', now(), now(), now())",
    "update {db}.app.courses set title = 'evil'",
    "delete from {db}.app.lesson_events",
    "create table {db}.app.evil (id int)",
    "create table {db}.public.evil (id int)",
    "drop table {db}.app.certificates",
]


def _duckdb_with_federation_secret(pg_env) -> duckdb.DuckDBPyConnection:
    """What dbt's local target does: the role's password as a DuckDB secret (profiles.yml)."""
    ensure_duckdb_extension(POSTGRES_EXTENSION)
    v = pg_env.values
    con = duckdb.connect()
    con.execute("load postgres_scanner")
    options = {"host": v["REPLICA_HOST"], "port": v["REPLICA_PORT"], "database": v["REPLICA_DB"],
               "user": v["REPLICA_USER"], "password": v["REPLICA_PASSWORD"]}
    quoted = ", ".join(f"{k} '{value.replace(chr(39), chr(39) * 2)}'" for k, value in options.items())
    con.execute(f"create secret federation_replica (type postgres, {quoted})")
    return con


def _attempt_writes(con, db: str) -> dict[str, str]:
    refused = {}
    for statement in WRITES:
        with pytest.raises(duckdb.Error) as failed:
            con.execute(statement.format(db=db))
        refused[statement.split(" (")[0].format(db=db)] = str(failed.value).splitlines()[0][:90]
    return refused


def test_federation_role_cannot_write_through_duckdb(pg_env):
    v = pg_env.values
    con = _duckdb_with_federation_secret(pg_env)
    before = pg_env.checksums()
    dsn = f"host={v['REPLICA_HOST']} port={v['REPLICA_PORT']} dbname={v['REPLICA_DB']} user={v['REPLICA_USER']}"
    primary_dsn = dsn.replace(f"port={v['REPLICA_PORT']}", f"port={pg_env.settings.primary_port}")
    # As the platform attaches it, then with READ_ONLY left out, on the replica and on the primary.
    con.execute(f"attach '{dsn}' as replica (type postgres, read_only, secret federation_replica)")
    con.execute(f"attach '{dsn}' as replica_rw (type postgres, secret federation_replica)")
    con.execute(f"attach '{primary_dsn}' as primary_rw (type postgres, secret federation_replica)")
    assert con.execute("select count(*) from replica.app.courses").fetchone()[0] > 0  # it does read
    refused = {db: _attempt_writes(con, db) for db in ("replica", "replica_rw", "primary_rw")}
    con.close()
    print()
    for db, reasons in refused.items():
        print(f"  duckdb {db}: {len(reasons)} writes refused, e.g. {next(iter(reasons.values()))}")
    assert all(len(r) == len(WRITES) for r in refused.values())
    assert pg_env.checksums() == before


# -- a real materialization on each engine, then search everything it left ----------------------
@pytest.fixture(scope="module")
def materialized(pg_env, tmp_path_factory):
    """An observation and a small dbt run on DuckDB and on PostgreSQL, one Dagster home each.

    The pg warehouse's user mapping (whose DDL carries the replica password) is dropped first,
    so the federation macro creates it again inside this dbt run.
    """
    started = time.time()
    with psycopg.connect(pg_env.values["WAREHOUSE_PG_URL"], autocommit=True) as conn:
        if conn.execute("select 1 from pg_foreign_server where srvname = 'replica'").fetchone():
            conn.execute("drop user mapping if exists for current_user server replica")
    homes, timings = [], {}
    # DuckDB runs of this session (the replica-loss test's, the pipeline's) are searched too;
    # only without one does this fixture run its own.
    basetemp = tmp_path_factory.getbasetemp()
    duckdb_homes = [h for h in basetemp.glob("*/dagster") if (h.parent / "warehouse.duckdb").exists()]
    engines = ["pg"] if duckdb_homes else ["local", "pg"]
    for env in engines:
        folder = tmp_path_factory.mktemp(f"security-{env}")
        with platform_under_test(pg_env, folder, env) as put:
            t0 = time.monotonic()
            observed = observe(put)
            built = run_assets(put)
            timings[env] = time.monotonic() - t0
            assert observed.success and built.success, failure_messages(observed) + failure_messages(built)
            runs = put.instance.get_runs()
            records = [r for run in runs for r in put.instance.all_logs(run.run_id)]
            homes.append({"home": put.dagster_home, "runs": runs, "records": records})
    with psycopg.connect(pg_env.values["WAREHOUSE_PG_URL"]) as conn:
        mapped = conn.execute("select count(*) from pg_user_mappings where srvname = 'replica'"
                              " and usename = current_user").fetchone()[0]
    assert mapped == 1, "the federation macro must have created the user mapping again"
    return {"started": started, "homes": homes, "timings": timings, "duckdb_homes_reused": len(duckdb_homes)}


def _secrets(pg_env) -> dict[str, str]:
    """Every *PASSWORD value and the password part of every *_URL of the environment."""
    found = {k: v for k, v in pg_env.values.items() if k.endswith("PASSWORD") and v}
    for key, url in pg_env.values.items():
        if key.endswith("_URL"):
            password = conninfo_to_dict(url).get("password")
            if password:
                found[f"{key} (password)"] = password
    return found


def _files(root: Path, since: float | None = None):
    """Files under root, skipping what another worker removes meanwhile (run folders, the
    preparation's temporary folder, parse states replaced by a rename)."""
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            try:
                status = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(status.st_mode) and (since is None or status.st_mtime >= since):
                yield path


def test_no_password_in_logs_storage_or_run_metadata(pg_env, materialized, tmp_path_factory):
    secrets = _secrets(pg_env)
    assert {"REPLICA_PASSWORD", "PRIMARY_PASSWORD", "WAREHOUSE_PG_PASSWORD"} <= set(secrets)
    needles = {name: value.encode() for name, value in secrets.items()}
    # This test's Dagster homes, and every other Dagster home of the session (the pipeline's,
    # the fault tests'); dbt's log folder and every dbt target folder written this session.
    session_started = pg_env.settings.local_dir.stat().st_mtime - 60
    roots = {h["home"] for h in materialized["homes"]}
    roots |= {p for p in tmp_path_factory.getbasetemp().glob("*/dagster") if p.is_dir()}
    files = [f for root in roots for f in _files(root)]
    files += list(_files(DBT_PROJECT_DIR / "logs", since=session_started))
    files += list(_files(DBT_PROJECT_DIR / "target", since=session_started))
    leaks, scanned = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed meanwhile (another run's temporary file)
        scanned += len(data)
        leaks += [f"{name} in {path}" for name, needle in needles.items() if needle in data]
    # Run tags and config, and every event record, through the instance's API too.
    structured = 0
    for home in materialized["homes"]:
        for run in home["runs"]:
            text = json.dumps({"tags": run.tags, "config": run.run_config}, default=str)
            leaks += [f"{name} in tags/config of run {run.run_id}" for name, v in secrets.items() if v in text]
            structured += 1
        for record in home["records"]:
            text = str(record)
            leaks += [f"{name} in event {record.dagster_event_type}" for name, v in secrets.items() if v in text]
            structured += 1
    print(f"\n  searched {len(secrets)} secrets in {len(files)} files ({scanned / 1e6:.1f} MB: {len(roots)} Dagster"
          f" homes, dbt logs and target folders) and {structured} runs/event records; materializations took "
          + ", ".join(f"{env} {s:.1f}s" for env, s in materialized["timings"].items())
          + f" (DuckDB runs of {materialized['duckdb_homes_reused']} other tests searched instead of a new one)")
    assert not leaks, "\n".join(sorted(set(leaks))[:20])


def test_federation_role_cannot_write_through_postgres_fdw(pg_env, materialized):
    """The pg warehouse's foreign tables refuse writes; so does the replica with `updatable`
    turned on, and a foreign server on the primary with the same credentials."""
    v = pg_env.values
    refused = {}
    with psycopg.connect(v["WAREHOUSE_PG_URL"]) as conn:  # one transaction, rolled back at the end
        statements = {
            "as federated": "insert into federated.courses (title, category, difficulty, published_at, created_at,"
                            " updated_at) values ('evil', 'aws', 'beginner', now(), now(), now())",
            "delete": "delete from federated.lesson_events",
        }
        for name, statement in statements.items():
            with pytest.raises(psycopg.Error) as failed, conn.transaction():
                conn.execute(statement)
            refused[name] = str(failed.value).splitlines()[0]
        conn.execute("alter server replica options (set updatable 'true')")
        with pytest.raises(errors.ReadOnlySqlTransaction) as failed, conn.transaction():
            conn.execute(statements["as federated"])
        refused["updatable on the replica"] = str(failed.value).splitlines()[0]
        conn.execute(sql.SQL("create server primary_probe foreign data wrapper postgres_fdw options"
                             " (host {}, port {}, dbname {}, updatable 'true')").format(
            sql.Literal(v["REPLICA_HOST"]), sql.Literal(str(pg_env.settings.primary_port)),
            sql.Literal(v["REPLICA_DB"])))
        conn.execute(sql.SQL("create user mapping for current_user server primary_probe options (user {}, password {})")
                     .format(sql.Literal(v["REPLICA_USER"]), sql.Literal(v["REPLICA_PASSWORD"])))
        conn.execute("create schema primary_probe")
        conn.execute("import foreign schema app limit to (courses) from server primary_probe into primary_probe")
        with pytest.raises((errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction)) as failed, conn.transaction():
            conn.execute(statements["as federated"].replace("federated.", "primary_probe."))
        refused["updatable on the primary"] = str(failed.value).splitlines()[0]
        conn.rollback()
    print()
    for name, reason in refused.items():
        print(f"  postgres_fdw {name}: refused ({reason[:100]})")
    assert len(refused) == 4
