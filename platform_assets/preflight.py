"""Preflight: fail fast on bad configuration, with ONE message naming the setting.

Called at the start of every dbt run and every observation (never when the code location
loads, so the UI still loads while the replica is down) and by `make demo`. It checks, in
this order, and stops at the first problem:

1. every variable the environment needs is set (`PlatformSettings.check`);
2. the replica answers to the read-only role through REPLICA_URL (what observations use);
3. locally, the same through the parts dbt's federation uses (REPLICA_HOST, REPLICA_PORT,
   REPLICA_DB, REPLICA_USER, REPLICA_PASSWORD) when they name a different endpoint or
   password than the URL;
4. the warehouse: the folder of DUCKDB_PATH exists (local), or the warehouse database
   answers (pg: WAREHOUSE_PG_*, prod: REDSHIFT_*).

Nothing is created on the way: no DuckDB file, no schema, no table. Messages never contain
a password: they name the setting, the user and host:port, and the reason, e.g.
`REPLICA_URL: password authentication failed for user federation_ro at 127.0.0.1:54321`.

`explain_dbt_failure` is the other half: when dbt fails and the replica is unreachable, it
turns the dbt error into one message naming the replica and the sources the failing models
read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .settings import ConfigurationError, PlatformSettings

CONNECT_TIMEOUT_SECONDS = 5


class PreflightError(ConfigurationError):
    """A setting is missing, malformed or points at something that does not answer."""


@dataclass(frozen=True)
class Endpoint:
    """Where a connection goes, without its password (safe to print)."""

    setting: str  # the setting to blame, e.g. REPLICA_URL
    host: str
    port: str
    user: str
    dbname: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def redact(message: str) -> str:
    """Remove passwords from anything a driver or DSN may echo."""
    message = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", message, flags=re.IGNORECASE)
    return re.sub(r"://([^:/@\s]+):[^@\s]+@", r"://\1:***@", message)


def endpoint_of(setting: str, conninfo: str) -> Endpoint:
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        raise PreflightError(f"{setting}: not a valid PostgreSQL connection URL") from None
    return Endpoint(setting, str(parts.get("host", "?")), str(parts.get("port", "5432")),
                    str(parts.get("user", "?")), str(parts.get("dbname", "?")))


def reason(exc: BaseException, endpoint: Endpoint) -> str:
    """The short reason of a connection failure, in words that name the user and database."""
    text = redact(str(exc))
    if "password authentication failed" in text:
        return f"password authentication failed for user {endpoint.user}"
    if "Connection refused" in text:
        return "connection refused (is the server running and listening there?)"
    if "timeout expired" in text or "timed out" in text:
        return f"no answer within {CONNECT_TIMEOUT_SECONDS}s (host unreachable or firewalled?)"
    match = re.search(r"FATAL:\s+(.*)", text)
    if match:
        return match.group(1).strip().replace('"', "")
    if "could not translate host name" in text:
        return f"unknown host {endpoint.host}"
    return text.splitlines()[0].removeprefix("connection failed: ")


def describe(exc: BaseException, endpoint: Endpoint) -> str:
    return f"{endpoint.setting}: {reason(exc, endpoint)} at {endpoint}"


def probe(conninfo: str, endpoint: Endpoint, **kwargs: Any) -> None:
    """Connect, run one trivial query, disconnect; PreflightError naming the setting if not."""
    try:
        with psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_SECONDS, autocommit=True, **kwargs) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        raise PreflightError(describe(exc, endpoint)) from None


def replica_problem(settings: PlatformSettings) -> str | None:
    """None when the replica answers through REPLICA_URL, else the message naming it."""
    try:
        url = settings.get("REPLICA_URL")
        probe(url, endpoint_of("REPLICA_URL", url))
    except ConfigurationError as exc:
        return str(exc)
    return None


def _check_replica(settings: PlatformSettings) -> None:
    url = settings.get("REPLICA_URL")
    via_url = endpoint_of("REPLICA_URL", url)
    probe(url, via_url)
    if settings.env == "prod":
        return  # Redshift reaches the replica through REPLICA_ENDPOINT and the secret
    parts = {
        "host": settings.get("REPLICA_HOST"), "port": settings.get("REPLICA_PORT"),
        "dbname": settings.get("REPLICA_DB"), "user": settings.get("REPLICA_USER"),
        "password": settings.get("REPLICA_PASSWORD"),
    }
    url_parts = conninfo_to_dict(url)
    if all(str(url_parts.get(k, "")) == v for k, v in parts.items()):
        return  # the same connection as the URL: already proven
    same_password = str(url_parts.get("password", "")) == parts["password"]
    blame = "REPLICA_HOST/REPLICA_PORT" if same_password else "REPLICA_PASSWORD"
    endpoint = Endpoint(blame, parts["host"], parts["port"], parts["user"], parts["dbname"])
    probe("", endpoint, **parts)


def _check_warehouse(settings: PlatformSettings) -> None:
    if settings.engine == "duckdb":
        path = Path(settings.get("DUCKDB_PATH"))
        if not path.parent.is_dir():
            raise PreflightError(f"DUCKDB_PATH: folder {path.parent} does not exist (the warehouse file goes there)")
        if not os.access(path.parent, os.W_OK):
            raise PreflightError(f"DUCKDB_PATH: folder {path.parent} is not writable")
        return
    prefix = "WAREHOUSE_PG" if settings.engine == "postgres" else "REDSHIFT"
    parts = {
        "host": settings.get(f"{prefix}_HOST"), "port": settings.get(f"{prefix}_PORT"),
        "dbname": settings.get(f"{prefix}_DB"), "user": settings.get(f"{prefix}_USER"),
        "password": settings.get(f"{prefix}_PASSWORD"),
    }
    extra = {"sslmode": "require"} if settings.engine == "redshift" else {}
    endpoint = Endpoint(f"{prefix}_PASSWORD", parts["host"], parts["port"], parts["user"], parts["dbname"])
    try:
        with psycopg.connect("", connect_timeout=CONNECT_TIMEOUT_SECONDS, autocommit=True, **parts, **extra) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        text = str(exc)
        setting = f"{prefix}_PASSWORD" if "password authentication failed" in text else f"{prefix}_HOST/{prefix}_PORT"
        if "does not exist" in text:
            setting = f"{prefix}_DB" if "database" in text else f"{prefix}_USER"
        raise PreflightError(describe(exc, Endpoint(setting, endpoint.host, endpoint.port, endpoint.user,
                                                    endpoint.dbname))) from None


def preflight(settings: PlatformSettings, warehouse: bool = True, complete: bool = True) -> None:
    """Raise PreflightError (one message naming the setting) at the first problem found.
    `complete`: first check that every variable of the environment is set (in a run, Dagster
    has already refused an unset variable of a resource)."""
    if complete:
        settings.check()
    _check_replica(settings)
    if warehouse:
        _check_warehouse(settings)


# -- dbt failed: was it the replica? ---------------------------------------------------------
def source_tables_read(manifest: Mapping[str, Any], unique_ids: Iterable[str]) -> list[str]:
    """The dbt sources ('app.courses', ...) the given nodes read, directly or through other nodes."""
    nodes = {**manifest.get("nodes", {}), **manifest.get("sources", {})}
    seen: set[str] = set()
    frontier = list(unique_ids)
    found: set[str] = set()
    while frontier:
        uid = frontier.pop()
        if uid in seen or uid not in nodes:
            continue
        seen.add(uid)
        node = nodes[uid]
        if node.get("resource_type") == "source":
            found.add(uid)
            continue
        frontier.extend((node.get("depends_on") or {}).get("nodes", []))
    return sorted(found)


def source_labels(manifest: Mapping[str, Any], source_ids: Iterable[str]) -> list[str]:
    labels = []
    for uid in source_ids:
        source = manifest["sources"][uid]
        key = (source.get("meta") or {}).get("dagster", {}).get("asset_key") or [source["source_name"], source["name"]]
        table = source.get("identifier") or source["name"]
        labels.append(f"{'/'.join(key)} ({source.get('schema', '?')}.{table} on the replica)")
    return labels


def nodes_with_status(run_results: Mapping[str, Any] | None, statuses: tuple[str, ...]) -> list[str]:
    if not run_results:
        return []
    return sorted(r["unique_id"] for r in run_results.get("results", []) if r.get("status") in statuses)


def explain_dbt_failure(settings: PlatformSettings, manifest: Mapping[str, Any],
                        run_results: Mapping[str, Any] | None, selected_ids: Iterable[str]) -> str | None:
    """The message for a dbt failure caused by an unreachable replica, or None if it answers.

    Names the replica (host:port and the setting), the dbt nodes that failed, the selected
    models left unbuilt, and the federated sources they read.
    """
    problem = replica_problem(settings)
    if problem is None:
        return None
    nodes = manifest.get("nodes", {})
    failed = nodes_with_status(run_results, ("error", "fail"))
    done = set(nodes_with_status(run_results, ("success", "pass", "warn")))
    unbuilt = [u for u in sorted(selected_ids) if u not in done and u not in failed]
    if not failed:
        failed, unbuilt = unbuilt, []
    sources = source_labels(manifest, source_tables_read(manifest, [*failed, *unbuilt]))

    def names(ids: list[str]) -> str:
        return ", ".join(nodes[u]["name"] for u in ids if u in nodes)

    return (
        f"the replica is unreachable: {problem}. "
        f"dbt failed on {names(failed) or 'its on-run-start federation'}"
        + (f"; not built: {names(unbuilt)}" if unbuilt else "")
        + f"; they read {', '.join(sources) or 'the federated sources'}. "
        "Tables keep their last good data; retry once the replica answers."
    )
