"""Readers of a PostgreSQL warehouse, as the BI tool reads it: every mart and reporting view,
queried in a loop on connections of their own while something else (a full refresh, a
killed run) happens, each read recorded as (row count, content hash) to be judged against
the states before and after.

A read is
- an error when the query fails (a relation missing, a lock or a deadlock error, ...);
- empty when it returns no rows while the relation had rows before and after;
- partial when its count or its content hash is neither the state before nor the state
  after (half-written, or a mix of old and new).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

SCHEMAS = {"marts": "BASE TABLE", "reporting": "VIEW"}
# Bookkeeping columns that say how a row was loaded, not what it is (a full refresh rewrites
# them): left out of the content hash.
LOAD_COLUMNS = {"loaded_by"}


def warehouse_url(env: dict[str, str]) -> str:
    """The warehouse role's connection string (what the BI tool would use) from a dbt env."""
    return psycopg.conninfo.make_conninfo(
        host=env["WAREHOUSE_PG_HOST"], port=env["WAREHOUSE_PG_PORT"], dbname=env["WAREHOUSE_PG_DB"],
        user=env["WAREHOUSE_PG_USER"], password=env["WAREHOUSE_PG_PASSWORD"],
    )


def relation_columns(conn: psycopg.Connection) -> dict[str, list[str]]:
    """schema.name -> columns, for every mart (table) and reporting view."""
    rows = conn.execute(
        "select c.table_schema, c.table_name, c.column_name"
        " from information_schema.columns c join information_schema.tables t"
        "   on t.table_schema = c.table_schema and t.table_name = c.table_name"
        " where (c.table_schema, t.table_type) in (('marts', 'BASE TABLE'), ('reporting', 'VIEW'))"
        "   and c.table_name not like '%%__dbt_%%'"
        " order by c.table_schema, c.table_name, c.ordinal_position"
    ).fetchall()
    columns: dict[str, list[str]] = {}
    for schema, table, column in rows:
        if column not in LOAD_COLUMNS:
            columns.setdefault(f"{schema}.{table}", []).append(column)
    return columns


def state_query(relation: str, columns: list[str]) -> sql.Composed:
    """Row count and an order-independent hash of the rows' content."""
    schema, name = relation.split(".")
    row = sql.SQL(", ").join(sql.Identifier("t", c) for c in columns)
    return sql.SQL("select count(*), coalesce(sum(hashtext(row({})::text)), 0) from {} t").format(
        row, sql.Identifier(schema, name)
    )


def relation_states(conn: psycopg.Connection, columns: dict[str, list[str]] | None = None
                    ) -> dict[str, tuple[int, int]]:
    columns = columns or relation_columns(conn)
    return {rel: tuple(conn.execute(state_query(rel, cols)).fetchone()) for rel, cols in columns.items()}


@dataclass
class Read:
    relation: str
    count: int | None
    digest: int | None
    seconds: float
    error: str | None = None


@dataclass
class ReaderLoop:
    """Reader threads, each with its own connection, cycling over its share of relations."""

    url: str
    columns: dict[str, list[str]]
    threads: int = 2
    reads: list[Read] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ReaderLoop:
        relations = sorted(self.columns)
        for i in range(self.threads):
            share = relations[i::self.threads]
            worker = threading.Thread(target=self._loop, args=(share,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=120)

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True)
        # never hang forever on a lock: a read that waits this long counts as an error
        conn.execute("set statement_timeout = '60s'")
        return conn

    def _loop(self, relations: list[str]) -> None:
        conn = self._connect()
        queries = {rel: state_query(rel, self.columns[rel]) for rel in relations}
        try:
            while not self._stop.is_set():
                for rel in relations:
                    t0 = time.monotonic()
                    try:
                        count, digest = conn.execute(queries[rel]).fetchone()
                        read = Read(rel, count, digest, time.monotonic() - t0)
                    except psycopg.Error as exc:
                        read = Read(rel, None, None, time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
                        if conn.closed or conn.broken:
                            conn = self._connect()
                    with self._lock:
                        self.reads.append(read)
        finally:
            conn.close()

    def judge(self, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict:
        """Figures of the reads against the states before and after."""
        errors = [r for r in self.reads if r.error]
        empty = [r for r in self.reads if not r.error and r.count == 0 and before[r.relation][0] > 0]
        partial = [
            r for r in self.reads
            if not r.error and r.count != 0
            and (r.count, r.digest) not in (before[r.relation], after.get(r.relation))
        ]
        per_relation: dict[str, int] = {}
        for r in self.reads:
            per_relation[r.relation] = per_relation.get(r.relation, 0) + 1
        return {
            "reads": len(self.reads),
            "errors": len(errors),
            "empty": len(empty),
            "partial": len(partial),
            "relations": len(per_relation),
            "min_reads_per_relation": min(per_relation.values()) if per_relation else 0,
            "max_read_seconds": round(max((r.seconds for r in self.reads), default=0.0), 3),
            "examples": [f"{r.relation}: {r.error or (r.count, r.digest)}" for r in (errors + empty + partial)[:5]],
        }


def duckdb_states(path: str) -> dict[str, tuple[int, int]]:
    """The same figures for a DuckDB warehouse file, over a read-only connection."""
    import duckdb

    con = duckdb.connect(path, read_only=True)
    try:
        rows = con.execute(
            "select c.table_schema, c.table_name, c.column_name"
            " from information_schema.columns c join information_schema.tables t"
            "   on t.table_schema = c.table_schema and t.table_name = c.table_name"
            " where (c.table_schema = 'marts' and t.table_type = 'BASE TABLE')"
            "    or (c.table_schema = 'reporting' and t.table_type = 'VIEW')"
            " order by c.table_schema, c.table_name, c.ordinal_position"
        ).fetchall()
        columns: dict[str, list[str]] = {}
        for schema, table, column in rows:
            if column not in LOAD_COLUMNS and "__dbt_" not in table:
                columns.setdefault(f"{schema}.{table}", []).append(column)
        states = {}
        for rel, cols in columns.items():
            schema, name = rel.split(".")
            row = ", ".join(f'"{c}"' for c in cols)
            count, digest = con.execute(
                f'select count(*), coalesce(sum(hash({row})), 0) from "{schema}"."{name}"').fetchone()
            states[rel] = (int(count), int(digest))
        return states
    finally:
        con.close()
