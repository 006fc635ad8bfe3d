"""Federated source tables as observable assets, derived from the dbt manifest.

Each dbt source table is one asset (key from its `meta.dagster.asset_key`). Observing
asks the replica one question for all selected tables: row count and the latest
watermark (the source's `loaded_at_field`, else `updated_at` when the table has one). The
data version is a hash of those, so it changes exactly when a table gained, lost or
changed rows, and only the assets downstream of a changed table go stale. The replica's
replay lag is recorded with every observation, with whether it exceeds
MAX_REPLICA_LAG_SECONDS (then the automation holds the marts; see automation.py).
"""


import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from psycopg import sql

from .resources import LAG_QUERY, ReplicaResource

FEDERATED_GROUP = "federated"


@dataclass(frozen=True)
class FederatedTable:
    key: dg.AssetKey
    schema: str  # schema of the table on the replica
    table: str
    watermark: str | None
    description: str


def federated_tables(manifest: Mapping[str, Any], replica_schema: str) -> list[FederatedTable]:
    """One entry per dbt source table, in a stable order."""
    tables = []
    for source in sorted(manifest["sources"].values(), key=lambda s: s["unique_id"]):
        meta_key = (source.get("meta") or {}).get("dagster", {}).get("asset_key")
        key = dg.AssetKey(meta_key) if meta_key else dg.AssetKey([source["source_name"], source["name"]])
        columns = {c.lower() for c in source.get("columns", {})}
        watermark = source.get("loaded_at_field") or ("updated_at" if "updated_at" in columns else None)
        tables.append(
            FederatedTable(
                key=key,
                schema=replica_schema,
                table=source.get("identifier") or source["name"],
                watermark=watermark,
                description=source.get("description") or f"Replica table {source['name']}",
            )
        )
    return tables


def observe_query(tables: list[FederatedTable]) -> sql.Composed:
    """One statement: (table, row count, latest watermark as text, replay lag) per table."""
    parts = []
    for t in tables:
        wm = (
            sql.SQL("max({})::text").format(sql.Identifier(t.watermark))
            if t.watermark
            else sql.SQL("null::text")
        )
        parts.append(
            sql.SQL("select {name} as t, count(*) as n, {wm} as wm from {rel}").format(
                name=sql.Literal(t.table), wm=wm, rel=sql.Identifier(t.schema, t.table)
            )
        )
    return sql.SQL("with lag as ({lag}) select x.t, x.n, x.wm, lag.lag_seconds from ({u}) x cross join lag").format(
        lag=sql.SQL(LAG_QUERY), u=sql.SQL(" union all ").join(parts)
    )


def data_version(row_count: int, watermark: str | None) -> str:
    return hashlib.sha256(f"{row_count}|{watermark}".encode()).hexdigest()[:20]


def build_federated_sources(
    manifest: Mapping[str, Any], replica_schema: str, max_lag_seconds: float | None = None
) -> tuple[dg.AssetsDefinition, list[FederatedTable]]:
    tables = federated_tables(manifest, replica_schema)
    by_key = {t.key: t for t in tables}

    specs = [
        dg.AssetSpec(
            key=t.key,
            description=t.description,
            group_name=FEDERATED_GROUP,
            kinds={"postgres"},
            metadata={"replica_table": f"{t.schema}.{t.table}", "watermark_column": t.watermark or "none"},
            tags={"layer": "federated"},
        )
        for t in tables
    ]

    @dg.multi_observable_source_asset(
        name="federated_sources",
        specs=specs,
        can_subset=True,
        description="Observes the replica's tables: one query per observation, no dbt.",
    )
    def federated_sources(context: dg.AssetExecutionContext, replica: ReplicaResource):
        selected = [by_key[k] for k in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string())]
        with replica.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(observe_query(selected)).fetchall()}
        lag = float(next(iter(rows.values()))[2]) if rows else 0.0
        lagging = max_lag_seconds is not None and lag > max_lag_seconds
        if lagging:
            context.log.warning(
                f"replica replay lag {lag:.1f}s exceeds MAX_REPLICA_LAG_SECONDS={max_lag_seconds:g}: these "
                "observations come from a lagging replica; check replica_lag fails and automation holds "
                "the tables downstream until the lag recovers"
            )
        for t in selected:
            count, watermark, _lag = rows[t.table]
            metadata = {
                "dagster/row_count": dg.MetadataValue.int(int(count)),
                "latest_watermark": dg.MetadataValue.text(watermark or "n/a"),
                "replica_lag_seconds": dg.MetadataValue.float(round(lag, 3)),
            }
            if max_lag_seconds is not None:
                metadata["max_replica_lag_seconds"] = dg.MetadataValue.float(max_lag_seconds)
                metadata["replica_lag_exceeded"] = dg.MetadataValue.bool(lagging)
            yield dg.ObserveResult(
                asset_key=t.key,
                data_version=dg.DataVersion(data_version(count, watermark)),
                metadata=metadata,
            )

    return federated_sources, tables
