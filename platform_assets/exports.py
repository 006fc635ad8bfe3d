"""Customer exports: each client company's training report, as Parquet and CSV, in an object
store, one Dagster partition per company (the writing itself: export_writers.py).

- Partitions: the dynamic partitions `companies` (keys are company ids, never names), kept
  equal to the companies of the warehouse (marts.dim_companies) by the `company_partitions`
  sensor, which also exports a company as soon as it appears. A nightly schedule re-exports
  every company in one run (single-run backfill policy: one process, one COPY per file).
- Atomic replacement: a local file is written under a temporary name and renamed over the
  old one; on S3 an object appears only once its upload completes.
- As of: every row carries `data_as_of` (when the marts it comes from were last built, from
  the Dagster instance); the Parquet file has it as key/value metadata too, and so does the
  asset's materialization.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from .beta import chosen_beta
from .export_writers import (
    DATA_AS_OF,
    INPUT_MODELS,
    WH,
    CompanyExport,
    company_id_of,
    exporter_for,
    relations_from_manifest,
)
from .preflight import redact
from .resources import WarehouseResource, quoted
from .settings import PlatformSettings

EXPORTS_GROUP = "exports"
EXPORT_KEY = dg.AssetKey(["exports", "company_training_report"])
COMPANIES = dg.DynamicPartitionsDefinition(name="companies")
EXPORTS_JOB = "customer_exports"
PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"


def warehouse_company_ids(warehouse: WarehouseResource, relations: Mapping[str, tuple[str, str]]) -> list[str]:
    """The company ids of marts.dim_companies, as partition keys, in id order."""
    schema, rel = relations["dim_companies"]
    if warehouse.engine == "redshift":
        rows = warehouse.redshift().get_client().execute_query(
            f"select company_id from {quoted(schema, rel)} order by company_id", fetch_results=True) or []
    else:
        import duckdb

        if warehouse.engine == "postgres":
            from .federation import POSTGRES_EXTENSION, ensure_duckdb_extension

            ensure_duckdb_extension(POSTGRES_EXTENSION)
        con = duckdb.connect()
        try:
            for statement in warehouse.duckdb_attach_sql(WH):
                con.execute(statement)
            rows = con.execute(f"select company_id from {quoted(WH, schema, rel)} order by company_id").fetchall()
        finally:
            con.close()
    return [str(int(r[0])) for r in rows if r[0] is not None and int(r[0]) > 0]


def partition_changes(current: Iterable[str], wanted: Iterable[str]) -> tuple[list[str], list[str]]:
    """(to add, to delete), each in a stable order (numeric)."""
    current_set, wanted_set = set(current), set(wanted)
    order = lambda keys: sorted(keys, key=lambda k: (len(k), k))  # noqa: E731 - numeric order of digit strings
    return order(wanted_set - current_set), order(current_set - wanted_set)


def range_tags(keys: Sequence[str]) -> dict[str, str]:
    return {PARTITION_RANGE_START: keys[0], PARTITION_RANGE_END: keys[-1]}


def sync_partitions(instance: dg.DagsterInstance, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
    """Make the `companies` partitions equal `wanted` (what the sensor does, for the demo)."""
    add, delete = partition_changes(instance.get_dynamic_partitions(COMPANIES.name), wanted)
    if add:
        instance.add_dynamic_partitions(COMPANIES.name, add)
    for key in delete:
        instance.delete_dynamic_partition(COMPANIES.name, key)
    return add, delete


# -- the asset, its job, sensor and schedule ----------------------------------------------------
def data_as_of(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey]) -> tuple[datetime, str]:
    """When the inputs were last built (the oldest of them), and where that came from."""
    stamps = []
    for key in keys:
        event = instance.get_latest_materialization_event(key)
        if event is None:
            return datetime.now(UTC), "export time (an input has no recorded materialization)"
        stamps.append(event.timestamp)
    return datetime.fromtimestamp(min(stamps), UTC), "oldest input materialization"


@dataclass(frozen=True)
class Exports:
    asset: dg.AssetsDefinition
    job: Any  # the unresolved asset job (define_asset_job)
    sensor: dg.SensorDefinition
    schedule: dg.ScheduleDefinition
    relations: dict[str, tuple[str, str]]


def build_exports(settings: PlatformSettings, manifest: Mapping[str, Any], pool: str,
                  run_tags: Mapping[str, str] | None = None) -> Exports:
    relations = relations_from_manifest(manifest)
    input_keys = [dg.AssetKey(["marts", name]) for name in INPUT_MODELS]
    run_tags = dict(run_tags or {})

    def company_training_report(context: dg.AssetExecutionContext,
                                warehouse: WarehouseResource) -> dg.MaterializeResult:
        as_of, as_of_source = data_as_of(context.instance, input_keys)
        results: list[CompanyExport] = []
        failed: dict[str, str] = {}
        with exporter_for(settings, warehouse, relations) as export:
            # One company's failure never stops the others' exports.
            for key in context.partition_keys:
                try:
                    results.append(export(company_id_of(key), as_of))
                except Exception as exc:  # noqa: BLE001 - reported below, with the company
                    # DuckDB's postgres extension quotes the connection string, password included.
                    failed[key] = redact(f"{type(exc).__name__}: {exc}")[:500]
                    context.log.error(f"export of company {key} failed: {failed[key]}")
        context.log.info(f"exported {len(results)} companies, {sum(r.rows for r in results)} rows, "
                         f"data as of {as_of.isoformat()}")
        if failed:
            for r in results:  # the companies written are materialized all the same
                context.log_event(dg.AssetMaterialization(
                    asset_key=EXPORT_KEY, partition=str(r.company_id),
                    metadata={DATA_AS_OF: dg.MetadataValue.timestamp(as_of), "dagster/row_count": r.rows,
                              "files": dg.MetadataValue.json(list(r.files))}))
            shown = list(failed.items())[:10]
            more = len(failed) - len(shown)
            raise dg.Failure(description=f"{len(failed)} of {len(context.partition_keys)} company exports failed "
                             f"(the other {len(results)} were written): "
                             + "; ".join(f"company {k}: {v}" for k, v in shown)
                             + (f"; and {more} more (see the run's log)" if more else ""))
        metadata: dict[str, Any] = {
            DATA_AS_OF: dg.MetadataValue.timestamp(as_of),
            "data_as_of_source": as_of_source,
            "export_uri": settings.export_uri,
            "companies": len(results),
            "rows_by_company": dg.MetadataValue.json({str(r.company_id): r.rows for r in results}),
        }
        if len(results) == 1:
            metadata["dagster/row_count"] = results[0].rows
            metadata["files"] = dg.MetadataValue.json(list(results[0].files))
        return dg.MaterializeResult(metadata=metadata)

    with chosen_beta("backfill_policy"):
        report = dg.asset(
            key=EXPORT_KEY,
            group_name=EXPORTS_GROUP,
            partitions_def=COMPANIES,
            backfill_policy=dg.BackfillPolicy.single_run(),
            deps=input_keys,
            kinds={settings.engine, "parquet", "csv"},
            owners=["analytics@example.com"],
            tags={"layer": "exports"},
            pool=pool,
            op_tags=run_tags,
            description="Each client company's training report (one row per enrollment), as Parquet "
            "and CSV under <EXPORT_URI>/company_id=<id>/; replaced atomically on every run.",
        )(company_training_report)

    job = dg.define_asset_job(
        EXPORTS_JOB,
        selection=dg.AssetSelection.assets(EXPORT_KEY),
        tags=run_tags,
        description="Customer exports; a run over several companies is one process (single-run backfill).",
    )

    @dg.sensor(
        name="company_partitions",
        job=job,
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keeps the `companies` partitions equal to the warehouse's companies "
        "(marts.dim_companies) and exports new companies at once.",
    )
    def company_partitions(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
        try:
            wanted = warehouse_company_ids(warehouse, relations)
        except Exception as exc:  # the warehouse not built yet, or busy (a DuckDB file being written)
            return dg.SkipReason(redact(f"cannot read the companies from the warehouse: {type(exc).__name__}: {exc}"))
        add, delete = partition_changes(context.instance.get_dynamic_partitions(COMPANIES.name), wanted)
        if not add and not delete:
            return dg.SkipReason(f"{len(wanted)} companies, partitions in sync")
        requests = []
        if add:
            requests.append(COMPANIES.build_add_request(add))
        if delete:
            requests.append(COMPANIES.build_delete_request(delete))
        # Added partitions go after the existing ones: one run covers exactly the new companies.
        runs = [dg.RunRequest(run_key=f"new-companies-{add[0]}-{add[-1]}-{len(add)}",
                              tags={**run_tags, **range_tags(add)})] if add else []
        return dg.SensorResult(dynamic_partitions_requests=requests, run_requests=runs)

    @dg.schedule(
        name="customer_exports_nightly",
        job=job,
        cron_schedule="0 5 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-exports every company in one run (after the night's refreshes).",
    )
    def customer_exports_nightly(context: dg.ScheduleEvaluationContext):
        keys = context.instance.get_dynamic_partitions(COMPANIES.name)
        if not keys:
            return dg.SkipReason("no company partitions yet (see the company_partitions sensor)")
        return dg.RunRequest(run_key=f"nightly-exports-{context.scheduled_execution_time:%Y-%m-%d}",
                             tags={**run_tags, **range_tags(keys)})

    return Exports(asset=report, job=job, sensor=company_partitions,
                   schedule=customer_exports_nightly, relations=relations)

