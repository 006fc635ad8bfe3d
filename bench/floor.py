"""The raw floor: the SQL dbt compiled for a build, executed on DuckDB with nothing around it.

The statements come from a `dbt build`'s artifacts (run_results.json: the compiled code of
every node it ran; manifest.json: materializations, relations, dependencies). They run in
dependency order on one DuckDB database, after the same federation step dbt's on-run-start
does (LOAD postgres_scanner, ATTACH the replica read-only), with as many statements at a time
as dbt runs threads (the profile's DBT_THREADS, default 4): each as soon as the nodes it
depends on are done, each thread on a cursor of its own, as dbt-duckdb does. Each model is
created the simplest way its materialization allows (CREATE VIEW / CREATE TABLE AS, no
temporary relation and swap); a snapshot's first build is its rows plus the SCD2 columns; a
data test is counted, as dbt does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import duckdb

REPLICA_CATALOG = "replica"


def dbt_threads() -> int:
    """The thread count the profiles give dbt (profiles.yml: DBT_THREADS, default 4)."""
    raw = os.environ.get("DBT_THREADS") or "4"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"DBT_THREADS={raw!r} is not a whole number >= 1")
    return int(raw)


def replica_dsn(values: dict[str, str]) -> str:
    parts = {"host": "REPLICA_HOST", "port": "REPLICA_PORT", "dbname": "REPLICA_DB",
             "user": "REPLICA_USER", "password": "REPLICA_PASSWORD"}
    quoted = {k: values[v].replace("\\", "\\\\").replace("'", "\\'") for k, v in parts.items()}
    return " ".join(f"{k}='{v}'" for k, v in quoted.items())


def plan(target_dir: Path) -> list[dict[str, Any]]:
    """The executed nodes of a dbt invocation, in dependency order, with their SQL and the
    executed nodes each one waits for (through nodes that run nowhere, e.g. ephemeral models)."""
    manifest = json.loads((target_dir / "manifest.json").read_text())
    results = json.loads((target_dir / "run_results.json").read_text())["results"]
    compiled = {r["unique_id"]: r.get("compiled_code") for r in results if r.get("compiled_code")}
    nodes = manifest["nodes"]
    # Ordered over the whole graph: an ephemeral model runs nowhere but still orders its
    # dependents after its own parents.
    graph = {uid: [d for d in n.get("depends_on", {}).get("nodes", []) if d in nodes]
             for uid, n in nodes.items()}
    steps = []
    # executed ancestors of every node, nearest first met: what an executed node waits for
    waits_for: dict[str, set[str]] = {}
    for uid in TopologicalSorter(graph).static_order():
        waits_for[uid] = set()
        for parent in graph[uid]:
            waits_for[uid] |= {parent} if parent in compiled else waits_for[parent]
        if uid not in compiled:
            continue
        node = nodes[uid]
        steps.append({
            "after": sorted(waits_for[uid]),
            "unique_id": uid,
            "name": node["name"],
            "resource_type": node["resource_type"],
            "materialized": node.get("config", {}).get("materialized"),
            "schema": node.get("schema"),
            "relation": node.get("relation_name"),
            "config": node.get("config", {}),
            "sql": compiled[uid],
        })
    return steps


def statement(step: dict[str, Any]) -> str:
    code, rel, kind = step["sql"], step["relation"], step["resource_type"]
    if kind == "test":
        return f"select count(*) from (\n{code}\n) as dbt_internal_test"
    if kind == "snapshot":
        key, updated = step["config"]["unique_key"], step["config"]["updated_at"]
        return (
            f"create table {rel} as select *,"
            f" md5(cast({key} as varchar) || '|' || cast({updated} as varchar)) as dbt_scd_id,"
            f" {updated} as dbt_updated_at, {updated} as dbt_valid_from,"
            f" cast(null as timestamp) as dbt_valid_to from (\n{code}\n) as snapshot_query"
        )
    if step["materialized"] == "view":
        return f"create view {rel} as (\n{code}\n)"
    return f"create table {rel} as (\n{code}\n)"


def run(steps: list[dict[str, Any]], duckdb_path: Path, values: dict[str, str],
        threads: int | None = None) -> dict[str, Any]:
    """Execute the plan on a new DuckDB file, `threads` statements at a time (default: dbt's
    thread count), each once the steps it depends on are done; per-node seconds and failing
    test rows. The first failing statement stops the run (the others in flight finish)."""
    threads = threads or dbt_threads()
    timings: dict[str, float] = {}
    failures: dict[str, int] = {}
    local = threading.local()
    cursors: list[duckdb.DuckDBPyConnection] = []
    lock = threading.Lock()
    con = duckdb.connect(str(duckdb_path))

    def cursor() -> duckdb.DuckDBPyConnection:
        if not hasattr(local, "cursor"):
            local.cursor = con.cursor()  # same database, ATTACH included
            with lock:
                cursors.append(local.cursor)
        return local.cursor

    def execute(step: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        result = cursor().execute(statement(step))
        if step["resource_type"] == "test":
            count = result.fetchone()[0]
            if count:
                with lock:
                    failures[step["unique_id"]] = count
        with lock:
            timings[step["unique_id"]] = time.perf_counter() - t0

    try:
        started = time.perf_counter()
        con.execute("load postgres_scanner")
        dsn = replica_dsn(values).replace("'", "''")
        con.execute(f"attach '{dsn}' as {REPLICA_CATALOG} (type postgres, read_only)")
        timings["federation (attach)"] = time.perf_counter() - started
        for schema in sorted({s["schema"] for s in steps if s["resource_type"] != "test"}):
            con.execute(f'create schema if not exists "{schema}"')
        by_id = {s["unique_id"]: s for s in steps}
        order = TopologicalSorter({s["unique_id"]: s.get("after", []) for s in steps})
        order.prepare()
        running: dict[Future, str] = {}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="floor") as pool:
            while order.is_active():
                for uid in order.get_ready():
                    running[pool.submit(execute, by_id[uid])] = uid
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a failed statement stops here, with its error
                    order.done(running.pop(future))
    finally:
        for c in cursors:
            c.close()
        con.close()
    return {"node_seconds": timings, "test_failures": failures, "threads": threads,
            "models_s": sum(t for uid, t in timings.items() if not uid.startswith("test.")),
            "tests_s": sum(t for uid, t in timings.items() if uid.startswith("test."))}
