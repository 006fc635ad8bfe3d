"""Federated source tables as observable assets, derived from the dbt manifest.

Each dbt source table is one asset (key from its `meta.dagster.asset_key`). Observing asks
the replica one question for all selected tables: row count, a hash of the contents (the sum
of the first 60 bits of each row's md5, order-independent) and the latest watermark (the
source's `loaded_at_field`, else `updated_at`; shown, not trusted). The data version is a
hash of count and contents, so it changes with any row inserted, deleted or edited (with or
without an `updated_at` bump), and only the assets downstream of a changed table go stale.
An observation is recorded only when a table's data version changed, or whether the replica
lags changed: Dagster's staleness looks through the staging views (virtual assets) at the
*time* of a source's latest observation, so recording unchanged ones would mark the marts
"Unsynced" after every observation. The same op reports the replica_lag check (checks.py) of
every selected source each time. An event-grain table read only by the daily facts (source
meta `platform.change_detection: per_day`) is observed by count and watermark: what the
facts rebuild is decided per day by changes.py, which sees its edits and deletes. The
replica's replay lag is recorded with each observation, with whether it exceeds
MAX_REPLICA_LAG_SECONDS (then the automation holds the marts; see automation.py).
"""


import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from psycopg import sql

from .beta import chosen_beta
from .checks import replica_lag_results, replica_lag_specs
from .resources import LAG_QUERY, ReplicaResource

FEDERATED_GROUP = "federated"


@dataclass(frozen=True)
class FederatedTable:
    key: dg.AssetKey
    schema: str  # schema of the table on the replica
    table: str
    watermark: str | None
    description: str
    # False for an event-grain table whose readers compare it per day (fingerprints.py): its
    # observation is count and watermark, not a hash of every row (27 s of 31 at 8M events)
    content_hash: bool = True


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
                content_hash=((source.get("meta") or {}).get("platform") or {}).get("change_detection") != "per_day",
            )
        )
    return tables


ROW_HASH = "cast(('x' || substring(md5(r::text), 1, 15))::bit(60)::bigint as numeric)"


def observe_query(tables: list[FederatedTable]) -> sql.Composed:
    """One statement: (table, row count, latest watermark as text, contents hash as text,
    replay lag) per table."""
    parts = []
    for t in tables:
        wm = (
            sql.SQL("max({})::text").format(sql.Identifier(t.watermark))
            if t.watermark
            else sql.SQL("null::text")
        )
        parts.append(
            sql.SQL("select {name} as t, count(*) as n, {wm} as wm, {h} as h from {rel} r").format(
                name=sql.Literal(t.table), wm=wm, rel=sql.Identifier(t.schema, t.table),
                h=sql.SQL(f"coalesce(sum({ROW_HASH}), 0)::text" if t.content_hash else "'per_day'"),
            )
        )
    return sql.SQL("with lag as ({lag}) select x.t, x.n, x.wm, x.h, lag.lag_seconds"
                   " from ({u}) x cross join lag").format(
        lag=sql.SQL(LAG_QUERY), u=sql.SQL(" union all ").join(parts)
    )


def latest_observed(instance: dg.DagsterInstance, key: dg.AssetKey) -> tuple[str | None, bool | None]:
    """(data version, replica_lag_exceeded) of the source's latest recorded observation."""
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=key), limit=1).records
    observation = records[0].asset_observation if records else None
    if observation is None:
        return None, None
    lagged = observation.metadata.get("replica_lag_exceeded")
    return observation.data_version, (bool(lagged.value) if lagged is not None else None)


def latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The data version of the source's latest recorded observation, if any."""
    return latest_observed(instance, key)[0]


def data_version(row_count: int, contents: str) -> str:
    return hashlib.sha256(f"{row_count}|{contents}".encode()).hexdigest()[:20]


def build_federated_sources(
    manifest: Mapping[str, Any], replica_schema: str, max_lag_seconds: float
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
            # an unchanged table is not observed again (module docstring)
            skippable=True,
        )
        for t in tables
    ]

    def federated_sources(context: dg.AssetExecutionContext, replica: ReplicaResource):
        selected = [by_key[k] for k in sorted(context.selected_asset_keys, key=lambda k: k.to_user_string())]
        if not selected:  # the checks alone (the UI's "Execute" on a check)
            yield from replica_lag_results(context.selected_asset_check_keys, replica.replay_lag_seconds(),
                                           max_lag_seconds)
            return
        with replica.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(observe_query(selected)).fetchall()}
        lag = float(next(iter(rows.values()))[3])
        lagging = lag > max_lag_seconds
        if lagging:
            context.log.warning(
                f"replica replay lag {lag:.1f}s exceeds MAX_REPLICA_LAG_SECONDS={max_lag_seconds:g}: these "
                "observations come from a lagging replica; check replica_lag fails and automation holds "
                "the tables downstream until the lag recovers"
            )
        for t in selected:
            count, watermark, contents, _lag = rows[t.table]
            metadata = {
                "dagster/row_count": dg.MetadataValue.int(int(count)),
                "latest_watermark": dg.MetadataValue.text(watermark or "n/a"),
                "replica_lag_seconds": dg.MetadataValue.float(round(lag, 3)),
                "max_replica_lag_seconds": dg.MetadataValue.float(max_lag_seconds),
                "replica_lag_exceeded": dg.MetadataValue.bool(lagging),
            }
            version = data_version(count, contents if t.content_hash else watermark)
            # recorded when the version, or whether the replica lags, differs from the last record
            if (version, lagging) == latest_observed(context.instance, t.key):
                continue
            yield dg.ObserveResult(asset_key=t.key, data_version=dg.DataVersion(version), metadata=metadata)
        yield from replica_lag_results(context.selected_asset_check_keys, lag, max_lag_seconds)

    with chosen_beta("multi_observable_source_asset"):
        asset = dg.multi_observable_source_asset(
            name="federated_sources",
            specs=specs,
            can_subset=True,
            check_specs=replica_lag_specs([t.key for t in tables], max_lag_seconds),
            description="Observes the replica's tables (one query per observation, no dbt) and reports"
                        " their replica_lag checks.",
        )(federated_sources)
    return asset, tables
