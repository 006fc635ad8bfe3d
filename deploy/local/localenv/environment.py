"""The whole local environment: servers, roles, databases, demo data, platform.env.

`up()` is idempotent: it only does what is missing, so a second `make up` is a no-op
that re-writes nothing but the env file (with the same values).
"""

from __future__ import annotations

import secrets
import shlex
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

from . import generator
from .cluster import LocalCluster
from .settings import LocalSettings

APP_DB = "saas"
WAREHOUSE_DB = "warehouse"
OWNER_ROLE = "app_owner"
READONLY_ROLE = "federation_ro"
WAREHOUSE_ROLE = "warehouse"
PASSWORD_KEYS = {
    OWNER_ROLE: "PRIMARY_PASSWORD",
    READONLY_ROLE: "REPLICA_PASSWORD",
    WAREHOUSE_ROLE: "WAREHOUSE_PG_PASSWORD",
}


def read_env_file(path: Path) -> dict[str, str]:
    from platform_assets.settings import env_file_values

    return env_file_values(path)


@dataclass
class LocalEnvironment:
    settings: LocalSettings

    def __post_init__(self) -> None:
        self.cluster = LocalCluster(
            self.settings.pg_dir, self.settings.primary_port, self.settings.replica_port
        )

    # -- passwords are generated once and kept in platform.env -----------------------------
    def _passwords(self) -> dict[str, str]:
        existing = read_env_file(self.settings.env_file)
        return {
            role: existing.get(key) or secrets.token_hex(16) for role, key in PASSWORD_KEYS.items()
        }

    def env_values(self, passwords: dict[str, str]) -> dict[str, str]:
        """Everything the platform needs to reach the local environment."""
        host = "127.0.0.1"
        p, r = self.settings.primary_port, self.settings.replica_port
        owner, ro, wh = passwords[OWNER_ROLE], passwords[READONLY_ROLE], passwords[WAREHOUSE_ROLE]
        return {
            "PRIMARY_URL": f"postgresql://{OWNER_ROLE}:{owner}@{host}:{p}/{APP_DB}",
            "REPLICA_URL": f"postgresql://{READONLY_ROLE}:{ro}@{host}:{r}/{APP_DB}",
            "WAREHOUSE_PG_URL": f"postgresql://{WAREHOUSE_ROLE}:{wh}@{host}:{p}/{WAREHOUSE_DB}",
            "PRIMARY_PASSWORD": owner,
            "PRIMARY_PORT": str(p),
            "REPLICA_HOST": host,
            "REPLICA_PORT": str(r),
            "REPLICA_DB": APP_DB,
            "REPLICA_USER": READONLY_ROLE,
            "REPLICA_PASSWORD": ro,
            "REPLICA_SCHEMA": "app",
            "WAREHOUSE_PG_HOST": host,
            "WAREHOUSE_PG_PORT": str(p),
            "WAREHOUSE_PG_DB": WAREHOUSE_DB,
            "WAREHOUSE_PG_USER": WAREHOUSE_ROLE,
            "WAREHOUSE_PG_PASSWORD": wh,
            "DUCKDB_PATH": str(self.settings.local_dir / "warehouse.duckdb"),
            "LOCAL_DIR": str(self.settings.local_dir),
            # dbt replaces these values by ***** in its logs (the pg target's user mapping DDL
            # carries the replica password); platform_assets/settings.py sets them from the
            # passwords too, this is for dbt run from the shell (`make dbt-build`).
            "DBT_ENV_SECRET_REPLICA_PASSWORD": ro,
            "DBT_ENV_SECRET_WAREHOUSE_PG_PASSWORD": wh,
        }

    def write_env_file(self, values: dict[str, str]) -> None:
        path = self.settings.env_file
        # what other tools added (`make bi`: the Superset the dashboards assets use) stays
        kept = {k: v for k, v in read_env_file(path).items() if k not in values}
        lines = [
            "# Written by `make up` (deploy/local). Shell-sourceable; contains local passwords.",
            *(f"{key}={value}" for key, value in values.items()),
            *(f"{key}={shlex.quote(value)}" for key, value in kept.items()),
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)

    # -- roles and databases --------------------------------------------------------------
    def _ensure_roles(self, passwords: dict[str, str]) -> list[str]:
        done = []
        with self.cluster.primary.connect() as conn:
            for role in (OWNER_ROLE, READONLY_ROLE, WAREHOUSE_ROLE):
                exists = conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                        sql.SQL(verb), sql.Identifier(role), sql.Literal(passwords[role])
                    )
                )
                if not exists:
                    done.append(f"created role {role}")
            conn.execute(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(READONLY_ROLE)
                )
            )
            for db, owner in ((APP_DB, OWNER_ROLE), (WAREHOUSE_DB, WAREHOUSE_ROLE)):
                if not conn.execute("select 1 from pg_database where datname = %s", (db,)).fetchone():
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(db), sql.Identifier(owner)
                        )
                    )
                    done.append(f"created database {db}")
            # Nobody but their owners connects to the warehouse or the maintenance database;
            # the read-only role may connect to the operational database only.
            for db in ("postgres", WAREHOUSE_DB, APP_DB):
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(APP_DB), sql.Identifier(READONLY_ROLE)
                )
            )
        with self.cluster.primary.connect(WAREHOUSE_DB) as conn:
            # postgres_fdw is not a trusted extension: the superuser installs it once and lets
            # the warehouse role use it (the dbt federation macro does the rest).
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
            conn.execute(
                sql.SQL("GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO {}").format(
                    sql.Identifier(WAREHOUSE_ROLE)
                )
            )
        return done

    def _schema_exists(self) -> bool:
        with self.cluster.primary.connect(APP_DB) as conn:
            return bool(conn.execute("select 1 from pg_namespace where nspname = 'app'").fetchone())

    def _has_data(self) -> bool:
        with self.cluster.primary.connect(APP_DB) as conn:
            return bool(conn.execute("select exists (select 1 from app.lesson_events)").fetchone()[0])

    def _create_schema_and_load(self, progress) -> dict[str, int]:
        s = self.settings
        with self.cluster.primary.connect(APP_DB, autocommit=False) as conn:
            # One transaction: a failed load leaves no half-created schema behind.
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE)))
            if not self._schema_exists():
                conn.execute(resources.files(__package__).joinpath("schema.sql").read_text())
            progress(f"loading demo data: {s.events:,} lesson events, seed {s.seed}, "
                     f"{s.days} days ending {s.end:%Y-%m-%d %H:%M}")
            counts = generator.load(conn, events=s.events, seed=s.seed, end=s.end, days=s.days,
                                    progress=progress)
            t0 = time.monotonic()
            conn.execute(resources.files(__package__).joinpath("constraints.sql").read_text())
            for table in generator.TABLES:
                pk = table_primary_key(conn, table)
                conn.execute(
                    sql.SQL("SELECT setval(pg_get_serial_sequence({}, {}), "
                            "coalesce((SELECT max({}) FROM {}), 0) + 1, false)").format(
                        sql.Literal(f"app.{table}"), sql.Literal(pk), sql.Identifier(pk),
                        sql.Identifier("app", table))
                )
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA app TO {r}; GRANT SELECT ON ALL TABLES IN SCHEMA app TO {r}")
                .format(r=sql.Identifier(READONLY_ROLE))
            )
            conn.execute(
                sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO {}")
                .format(sql.Identifier(READONLY_ROLE))
            )
            conn.commit()
            if time.monotonic() - t0 >= generator.SLOW_SECONDS:
                progress(f"  keys and indexes in {time.monotonic() - t0:.1f}s")
            conn.execute("RESET ROLE")
            conn.commit()
        with self.cluster.primary.connect(APP_DB) as conn:
            conn.execute("ANALYZE")
        return counts

    def up(self, progress=print) -> dict:
        started = time.monotonic()
        done = self.cluster.up()
        passwords = self._passwords()
        done += self._ensure_roles(passwords)
        loaded = None
        if not self._schema_exists() or not self._has_data():
            if self._schema_exists():
                raise RuntimeError(
                    "schema app exists on the primary but holds no lesson events: "
                    "run `make clean` and `make up` to start over"
                )
            loaded = self._create_schema_and_load(progress)
            done.append("loaded demo data")
        values = self.env_values(passwords)
        self.write_env_file(values)
        waited = self.cluster.wait_for_replay(timeout=600)
        return {"done": done, "loaded": loaded, "replay_wait_s": round(waited, 2),
                "seconds": round(time.monotonic() - started, 1), "env": values}

    def replica_counts(self) -> dict[str, int]:
        """Row counts read from the replica through the read-only role."""
        values = read_env_file(self.settings.env_file)
        with psycopg.connect(values["REPLICA_URL"]) as conn:
            return {
                t: conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier("app", t))).fetchone()[0]
                for t in generator.TABLES
            }


def table_checksums(conn: psycopg.Connection, tables=generator.TABLES) -> dict[str, str]:
    """md5 over every row of each operational table, in primary-key order.

    Used to prove determinism (same seed, same checksums) and that the platform never
    changes the operational data.
    """
    result = {}
    for table in tables:
        pk = table_primary_key(conn, table)
        result[table] = conn.execute(
            sql.SQL("select md5(coalesce(string_agg(md5(t::text), '' order by t.{}), ''))"
                    " from {} t").format(sql.Identifier(pk), sql.Identifier("app", table))
        ).fetchone()[0]
    return result


def table_primary_key(conn: psycopg.Connection, table: str) -> str:
    return conn.execute(
        "select a.attname from pg_index i join pg_attribute a"
        " on a.attrelid = i.indrelid and a.attnum = i.indkey[0]"
        " where i.indrelid = %s::regclass and i.indisprimary", (f"app.{table}",)
    ).fetchone()[0]
