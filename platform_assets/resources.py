"""The platform's resources, one per thing it talks to: the replica, the warehouse, dbt.

Each is a ConfigurableResource whose values come from environment variables (`EnvVar`),
resolved when a run starts; the variable names per environment are the maps below. The
preflight (preflight.py) runs on the resources' values at the start of every run that uses
them, so a bad setting fails with one message naming it before anything is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import psycopg
from dagster_aws.redshift import RedshiftClientResource

from .preflight import CONNECT_TIMEOUT_SECONDS, PreflightError, describe, endpoint_of, preflight
from .settings import ENGINES, PlatformSettings

# resource field -> environment variable, per warehouse engine / for the replica
WAREHOUSE_VARIABLES = {
    "duckdb": {"duckdb_path": "DUCKDB_PATH"},
    "postgres": {"host": "WAREHOUSE_PG_HOST", "port": "WAREHOUSE_PG_PORT", "database": "WAREHOUSE_PG_DB",
                 "user": "WAREHOUSE_PG_USER", "password": "WAREHOUSE_PG_PASSWORD"},
    "redshift": {"host": "REDSHIFT_HOST", "port": "REDSHIFT_PORT", "database": "REDSHIFT_DB",
                 "user": "REDSHIFT_USER", "password": "REDSHIFT_PASSWORD"},
}
# Locally dbt reaches the replica through its parts (profiles.yml), which the preflight checks
# too; in prod Redshift reaches it through the external schema's secret.
REPLICA_VARIABLES = {
    "local": {"url": "REPLICA_URL", "host": "REPLICA_HOST", "port": "REPLICA_PORT", "dbname": "REPLICA_DB",
              "user": "REPLICA_USER", "password": "REPLICA_PASSWORD"},
    "pg": {"url": "REPLICA_URL", "host": "REPLICA_HOST", "port": "REPLICA_PORT", "dbname": "REPLICA_DB",
           "user": "REPLICA_USER", "password": "REPLICA_PASSWORD"},
    "prod": {"url": "REPLICA_URL"},
}


LAG_QUERY = """
select case when not pg_is_in_recovery() then 0
            when pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0
            else coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0)
       end::float8 as lag_seconds,
       pg_is_in_recovery() as in_recovery
"""


def _values(resource: dg.ConfigurableResource, variables: Mapping[str, str]) -> dict[str, str]:
    return {name: str(getattr(resource, field)) for field, name in variables.items()
            if getattr(resource, field) not in (None, "")}


class WarehouseBusy(RuntimeError):
    """The DuckDB warehouse file is held by a writer (a run) at the moment."""


class ReplicaResource(dg.ConfigurableResource):
    """Read-only connection to the replica (the federation role), for observation and checks."""

    env: str
    url: str
    host: str | None = None
    port: str | None = None
    dbname: str | None = None
    user: str | None = None
    password: str | None = None

    def values(self) -> dict[str, str]:
        return _values(self, REPLICA_VARIABLES[self.env])

    def connect(self) -> psycopg.Connection:
        try:
            endpoint = endpoint_of("REPLICA_URL", self.url)
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        except PreflightError as exc:
            raise dg.Failure(str(exc)) from None
        except psycopg.Error as exc:
            # One message naming the setting, the user and host:port; never the password.
            raise dg.Failure(describe(exc, endpoint), metadata={"replica": str(endpoint)}) from None
        conn.read_only = True
        return conn

    def replay_lag_seconds(self) -> float:
        with self.connect() as conn:
            return float(conn.execute(LAG_QUERY).fetchone()[0])


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse dbt builds: a DuckDB file, a PostgreSQL database or Redshift. What the
    platform reads from it in Python (table metadata, the customer exports) goes through here."""

    env: str
    duckdb_path: str | None = None
    host: str | None = None
    port: str | None = None
    database: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def engine(self) -> str:
        return ENGINES[self.env]

    def values(self) -> dict[str, str]:
        return _values(self, WAREHOUSE_VARIABLES[self.engine])

    def duckdb_attach_sql(self, catalog: str) -> list[str]:
        """How an in-memory DuckDB reaches the warehouse read-only, as `catalog` (not Redshift)."""
        if self.engine == "duckdb":
            return [f"ATTACH {sql_literal(self.duckdb_path)} AS {catalog} (READ_ONLY)"]
        if self.engine == "postgres":
            dsn = " ".join(f"{k}={_libpq_value(str(getattr(self, f)))}" for k, f in (
                ("host", "host"), ("port", "port"), ("dbname", "database"), ("user", "user"), ("password", "password")))
            return ["LOAD postgres_scanner", f"ATTACH {sql_literal(dsn)} AS {catalog} (TYPE postgres, READ_ONLY)"]
        raise PreflightError(f"no DuckDB route to the {self.engine} warehouse (exports use UNLOAD there)")

    def fetch(self, query: str) -> list[tuple]:
        """The rows of one read-only query, in the warehouse's own SQL. A DuckDB file held by a
        writer raises WarehouseBusy (the caller tries again later; the writer is never blocked)."""
        if self.engine == "duckdb":
            import duckdb

            try:
                con = duckdb.connect(self.duckdb_path, read_only=True)
            except duckdb.IOException as exc:
                raise WarehouseBusy(f"the warehouse file {self.duckdb_path} is in use by a writer: {exc}") from None
            try:
                return con.execute(query).fetchall()
            finally:
                con.close()
        if self.engine == "postgres":
            try:
                with psycopg.connect(host=self.host, port=int(self.port), dbname=self.database, user=self.user,
                                     password=self.password, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
                    conn.read_only = True
                    return conn.execute(query).fetchall()
            except psycopg.OperationalError as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise dg.Failure(f"WAREHOUSE_PG_HOST/WAREHOUSE_PG_PORT: cannot read the warehouse at "
                                 f"{self.host}:{self.port} as {self.user}: {first_line}") from None
        return list(self.redshift().get_client().execute_query(query, fetch_results=True) or [])

    def redshift(self) -> RedshiftClientResource:
        return RedshiftClientResource(host=self.host, port=int(self.port), user=self.user, password=self.password,
                                      database=self.database, autocommit=True)

    def duckdb_table_metadata(self, relations: Mapping[Any, tuple[str, str]]) -> dict[Any, dict[str, Any]]:
        """Column schema and row count of each (schema, name) that is a table of the DuckDB file,
        over one read-only connection closed at once (the file has a single writer)."""
        import duckdb

        found: dict[Any, dict[str, Any]] = {}
        con = duckdb.connect(self.duckdb_path, read_only=True)
        try:
            for key, (schema, name) in relations.items():
                cols = con.execute("select column_name, data_type from information_schema.columns"
                                   " where table_schema = ? and table_name = ? order by ordinal_position",
                                   [schema, name]).fetchall()
                if not cols:
                    continue
                meta: dict[str, Any] = {
                    "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c, t) for c, t in cols])}
                kind = con.execute("select table_type from information_schema.tables"
                                   " where table_schema = ? and table_name = ?", [schema, name]).fetchone()
                # Views read the replica, which this connection does not attach: count tables only.
                if kind and kind[0] == "BASE TABLE":
                    count = con.execute(f'select count(*) from "{schema}"."{name}"').fetchone()[0]
                    meta["dagster/row_count"] = dg.MetadataValue.int(int(count))
                found[key] = meta
        finally:
            con.close()
        return found


def run_preflight(replica: ReplicaResource, warehouse: WarehouseResource | None = None) -> None:
    """The preflight (preflight.py) on the values these resources were given for this run;
    a bad setting fails the step with one message naming it."""
    values = {**replica.values(), **(warehouse.values() if warehouse else {})}
    try:
        preflight(PlatformSettings(env=replica.env, values=values), warehouse=warehouse is not None, complete=False)
    except PreflightError as exc:
        raise dg.Failure(description=f"preflight: {exc}", allow_retries=False) from None


def replica_resource(env: str) -> ReplicaResource:
    return ReplicaResource(env=env, **{f: dg.EnvVar(v) for f, v in REPLICA_VARIABLES[env].items()})


def warehouse_resource(env: str) -> WarehouseResource:
    return WarehouseResource(env=env, **{f: dg.EnvVar(v) for f, v in WAREHOUSE_VARIABLES[ENGINES[env]].items()})


def sql_literal(value: str) -> str:
    """A SQL string literal (standard quoting: DuckDB, PostgreSQL, Redshift)."""
    return "'" + value.replace("'", "''") + "'"


def quoted(*parts: str) -> str:
    """A SQL identifier: its dotted parts each in double quotes, a quote inside doubled."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def _libpq_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
