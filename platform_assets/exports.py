"""Customer exports: each client company's training report, as Parquet and CSV, in an object
store, one Dagster partition per company.

- Partitions: the dynamic partitions `companies` (keys are company ids, never names), kept
  equal to the companies of the warehouse (marts.dim_companies) by the `company_partitions`
  sensor, which also exports a company as soon as it appears. A nightly schedule re-exports
  every company in one run (single-run backfill policy: a run over many companies is one
  process and one warehouse connection, one COPY per file).
- Writing is done by the engine, never through Python memory: locally DuckDB reads the
  warehouse (the DuckDB file, or the PostgreSQL warehouse attached READ_ONLY through DuckDB's
  postgres extension) and `COPY ... TO` writes the files (to S3 through DuckDB's httpfs);
  on Redshift, `UNLOAD` writes straight to S3.
- Isolation: the only thing that varies between companies is an integer (validated from the
  partition key) in the WHERE clause and in the path `<root>/company_id=<id>/`; a company's
  name is data inside the files, never part of a path or of SQL text.
- Atomic replacement: a local file is written under a temporary name in the same folder and
  renamed over the old one (os.replace); on S3 an object appears only once its (multipart)
  upload completes, and replaces the previous one whole.
- As of: every row carries `data_as_of` (when the marts it comes from were last built, from
  the Dagster instance); the Parquet file has it as key/value metadata too, and so does the
  asset's materialization.
"""


import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from .settings import ConfigurationError, PlatformSettings

EXPORTS_GROUP = "exports"
EXPORT_KEY = dg.AssetKey(["exports", "company_training_report"])
COMPANIES = dg.DynamicPartitionsDefinition(name="companies")
REPORT_NAME = "training_report"
EXPORTS_JOB = "customer_exports"
DATA_AS_OF = "data_as_of"
# The marts the report reads (dbt model names); their asset keys are marts/<name>.
INPUT_MODELS = ("fct_enrollments", "dim_companies", "dim_courses")
# A company id as a partition key: a positive integer, nothing else.
_COMPANY_ID = re.compile(r"[1-9][0-9]{0,17}")
# DuckDB catalog name of the attached warehouse.
_WH = "wh"

PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"


def company_id_of(partition_key: str) -> int:
    """The company id a partition key stands for; anything but a plain positive integer fails."""
    if not isinstance(partition_key, str) or not _COMPANY_ID.fullmatch(partition_key):
        raise ValueError(f"not a company id partition key: {partition_key!r}")
    return int(partition_key)


def company_prefix(root: str, company_id: int) -> str:
    if not isinstance(company_id, int) or isinstance(company_id, bool) or company_id <= 0:
        raise ValueError(f"not a company id: {company_id!r}")
    return f"{root.rstrip('/')}/company_id={company_id}"


def _lit(value: str) -> str:
    """A SQL string literal (standard quoting: DuckDB, PostgreSQL, Redshift)."""
    return "'" + value.replace("'", "''") + "'"


def _ident(*parts: str) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def relations_from_manifest(manifest: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """(schema, relation) of each input mart, as dbt built it for this target."""
    found = {}
    for node in manifest["nodes"].values():
        if node["resource_type"] == "model" and node["name"] in INPUT_MODELS:
            found[node["name"]] = (node["schema"], node.get("alias") or node["name"])
    missing = set(INPUT_MODELS) - set(found)
    if missing:
        raise ConfigurationError(f"the dbt manifest lacks the export's input models: {sorted(missing)}")
    return found


def _as_of_sql(as_of: datetime) -> str:
    return f"cast({_lit(as_of.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f'))} as timestamp)"


def report_query(relations: Mapping[str, str], company_id: int, as_of: datetime) -> str:
    """One company's training report: one row per enrollment (relations: name -> qualified name)."""
    company_id = company_id_of(str(company_id))
    return f"""select
    e.company_id,
    c.company_name,
    e.enrollment_id,
    e.user_id,
    e.course_id,
    co.course_title,
    co.course_category,
    e.enrollment_status,
    e.enrolled_at,
    e.completed_at,
    e.days_to_complete,
    e.certificate_id,
    e.certificate_issued_at,
    {_as_of_sql(as_of)} as {DATA_AS_OF}
from {relations["fct_enrollments"]} as e
left join {relations["dim_companies"]} as c
    on c.company_id = e.company_id
left join {relations["dim_courses"]} as co
    on co.course_id = e.course_id
where e.company_id = {company_id}
order by e.enrollment_id"""


# -- where the files go -------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportTarget:
    """The root of the exports (a local folder or s3://bucket/prefix) and how to reach S3."""

    root: str
    s3_region: str = "us-east-1"
    s3_endpoint: str | None = None  # host:port of an S3-compatible endpoint (moto in tests)
    s3_url_style: str = "vhost"
    s3_use_ssl: bool = True
    s3_key_id: str | None = None
    s3_secret: str | None = None
    s3_session_token: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @classmethod
    def from_settings(cls, settings: PlatformSettings) -> "ExportTarget":
        use_ssl = (settings.optional("EXPORT_S3_USE_SSL", "true") or "true").lower()
        if use_ssl not in ("true", "false"):
            raise ConfigurationError(f"EXPORT_S3_USE_SSL={use_ssl!r} is not true or false")
        url_style = settings.optional("EXPORT_S3_URL_STYLE", "vhost")
        if url_style not in ("vhost", "path"):
            raise ConfigurationError(f"EXPORT_S3_URL_STYLE={url_style!r} is not vhost or path")
        return cls(
            root=settings.export_uri,
            s3_region=settings.optional("AWS_REGION") or settings.optional("AWS_DEFAULT_REGION") or "us-east-1",
            s3_endpoint=settings.optional("EXPORT_S3_ENDPOINT"),
            s3_url_style=url_style,
            s3_use_ssl=use_ssl == "true",
            s3_key_id=settings.optional("AWS_ACCESS_KEY_ID"),
            s3_secret=settings.optional("AWS_SECRET_ACCESS_KEY"),
            s3_session_token=settings.optional("AWS_SESSION_TOKEN"),
        )

    def duckdb_secret_sql(self) -> str:
        """A temporary (in-memory) DuckDB secret for the S3 writes."""
        parts = [f"TYPE s3, REGION {_lit(self.s3_region)}", f"URL_STYLE {_lit(self.s3_url_style)}",
                 f"USE_SSL {'true' if self.s3_use_ssl else 'false'}"]
        if self.s3_endpoint:
            parts.append(f"ENDPOINT {_lit(self.s3_endpoint)}")
        if self.s3_key_id and self.s3_secret:
            parts += [f"KEY_ID {_lit(self.s3_key_id)}", f"SECRET {_lit(self.s3_secret)}"]
        if self.s3_session_token:
            parts.append(f"SESSION_TOKEN {_lit(self.s3_session_token)}")
        return f"CREATE OR REPLACE TEMPORARY SECRET export_s3 ({', '.join(parts)})"


@dataclass(frozen=True)
class CompanyExport:
    company_id: int
    rows: int
    files: tuple[str, ...]


# -- DuckDB: COPY ... TO ------------------------------------------------------------------------
def _libpq_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def warehouse_attach_sql(settings: PlatformSettings) -> list[str]:
    """How DuckDB reaches the warehouse, read-only, as catalog `wh`."""
    if settings.engine == "duckdb":
        return [f"ATTACH {_lit(settings.get('DUCKDB_PATH'))} AS {_WH} (READ_ONLY)"]
    if settings.engine == "postgres":
        dsn = " ".join(
            f"{k}={_libpq_value(settings.get(v))}"
            for k, v in (("host", "WAREHOUSE_PG_HOST"), ("port", "WAREHOUSE_PG_PORT"), ("dbname", "WAREHOUSE_PG_DB"),
                         ("user", "WAREHOUSE_PG_USER"), ("password", "WAREHOUSE_PG_PASSWORD"))
        )
        return ["LOAD postgres_scanner", f"ATTACH {_lit(dsn)} AS {_WH} (TYPE postgres, READ_ONLY)"]
    raise ConfigurationError(f"no DuckDB route to the {settings.engine} warehouse (exports use UNLOAD there)")


@contextmanager
def duckdb_exporter(attach_sql: Sequence[str], relations: Mapping[str, tuple[str, str]], target: ExportTarget):
    """An in-memory DuckDB with the warehouse attached read-only; yields export(company_id, as_of)."""
    import duckdb

    from .federation import HTTPFS_EXTENSION, ensure_duckdb_extension, ensure_duckdb_postgres_extension

    if any("TYPE postgres" in s for s in attach_sql):
        ensure_duckdb_postgres_extension()
    if target.is_s3:
        ensure_duckdb_extension(HTTPFS_EXTENSION)
    con = duckdb.connect()
    try:
        for statement in attach_sql:
            con.execute(statement)
        if target.is_s3:
            con.execute(f"LOAD {HTTPFS_EXTENSION}")
            con.execute(target.duckdb_secret_sql())
        qualified = {name: _ident(_WH, schema, rel) for name, (schema, rel) in relations.items()}

        def export(company_id: int, as_of: datetime) -> CompanyExport:
            return _copy_company(con, qualified, target, company_id, as_of)

        yield export
    finally:
        con.close()


def _copy_company(con, relations: Mapping[str, str], target: ExportTarget, company_id: int,
                  as_of: datetime) -> CompanyExport:
    prefix = company_prefix(target.root, company_id)
    if not target.is_s3:
        root = os.path.realpath(target.root)
        if os.path.commonpath([root, os.path.realpath(prefix)]) != root:
            raise ValueError(f"export path {prefix!r} is outside {target.root!r}")
        os.makedirs(prefix, exist_ok=True)
    as_of_text = as_of.astimezone(UTC).isoformat()
    # The report is computed once into a DuckDB temp table (engine memory, spilling to disk if
    # need be), so the Parquet and the CSV file hold the same rows from one read of the warehouse.
    con.execute(f"CREATE OR REPLACE TEMP TABLE company_report AS {report_query(relations, company_id, as_of)}")
    try:
        formats = {
            "parquet": "FORMAT parquet, COMPRESSION zstd, KV_METADATA {"
                       f"{DATA_AS_OF}: {_lit(as_of_text)}, company_id: {_lit(str(company_id))}}}",
            "csv": "FORMAT csv, HEADER true",
        }
        files, rows = [], 0
        for ext, options in formats.items():
            final = f"{prefix}/{REPORT_NAME}.{ext}"
            if target.is_s3:
                # An S3 object becomes visible only when its upload completes, whole.
                rows = con.execute(f"COPY company_report TO {_lit(final)} ({options})").fetchone()[0]
            else:
                temporary = f"{prefix}/.{REPORT_NAME}.{ext}.{uuid.uuid4().hex}.tmp"
                try:
                    rows = con.execute(f"COPY company_report TO {_lit(temporary)} ({options})").fetchone()[0]
                    os.replace(temporary, final)
                finally:
                    if os.path.exists(temporary):
                        os.remove(temporary)
            files.append(final)
        return CompanyExport(company_id=company_id, rows=int(rows), files=tuple(files))
    finally:
        con.execute("DROP TABLE IF EXISTS company_report")


# -- Redshift: UNLOAD ---------------------------------------------------------------------------
def unload_statements(relations: Mapping[str, tuple[str, str]], company_id: int, as_of: datetime, root: str,
                      iam_role_arn: str) -> list[str]:
    """The UNLOAD statements that write one company's report to S3 (Parquet, then CSV).

    PARALLEL OFF writes one object per format (up to MAXFILESIZE), named <prefix>000.parquet
    and <prefix>000.csv; ALLOWOVERWRITE replaces the previous objects in place (never
    CLEANPATH, which would delete them before the new ones exist). UNLOAD cannot write
    Parquet key/value metadata: the as-of time is the data_as_of column there.
    """
    if not root.startswith("s3://"):
        raise ConfigurationError(f"EXPORT_URI={root!r}: UNLOAD writes to s3:// only")
    qualified = {name: _ident(schema, rel) for name, (schema, rel) in relations.items()}
    query = report_query(qualified, company_id, as_of)
    to = f"{company_prefix(root, company_id)}/{REPORT_NAME}_"
    common = f"IAM_ROLE {_lit(iam_role_arn)} PARALLEL OFF MAXFILESIZE 6 GB ALLOWOVERWRITE"
    return [
        f"UNLOAD ({_lit(query)}) TO {_lit(to)} {common} FORMAT AS PARQUET",
        f"UNLOAD ({_lit(query)}) TO {_lit(to)} {common} FORMAT AS CSV HEADER EXTENSION 'csv'",
    ]


@contextmanager
def redshift_exporter(settings: PlatformSettings, relations: Mapping[str, tuple[str, str]], root: str):
    import redshift_connector

    conn = redshift_connector.connect(
        host=settings.get("REDSHIFT_HOST"), port=int(settings.get("REDSHIFT_PORT")),
        database=settings.get("REDSHIFT_DB"), user=settings.get("REDSHIFT_USER"),
        password=settings.get("REDSHIFT_PASSWORD"), ssl=True,
    )
    conn.autocommit = True
    role = settings.get("EXPORT_UNLOAD_IAM_ROLE_ARN")
    try:
        def export(company_id: int, as_of: datetime) -> CompanyExport:
            cursor = conn.cursor()
            rows = 0
            for statement in unload_statements(relations, company_id, as_of, root, role):
                cursor.execute(statement)
                cursor.execute("select pg_last_unload_count()")
                rows = int(cursor.fetchone()[0])
            prefix = f"{company_prefix(root, company_id)}/{REPORT_NAME}_000"
            return CompanyExport(company_id, rows, (f"{prefix}.parquet", f"{prefix}.csv"))

        yield export
    finally:
        conn.close()


@contextmanager
def exporter_for(settings: PlatformSettings, relations: Mapping[str, tuple[str, str]]):
    if settings.export_method == "redshift_unload":
        with redshift_exporter(settings, relations, settings.export_uri) as export:
            yield export
    else:
        with duckdb_exporter(warehouse_attach_sql(settings), relations, ExportTarget.from_settings(settings)) as export:
            yield export


# -- which companies exist ----------------------------------------------------------------------
def warehouse_company_ids(settings: PlatformSettings, relations: Mapping[str, tuple[str, str]]) -> list[str]:
    """The company ids of marts.dim_companies, as partition keys, in id order."""
    schema, rel = relations["dim_companies"]
    if settings.export_method == "redshift_unload":
        import redshift_connector

        conn = redshift_connector.connect(
            host=settings.get("REDSHIFT_HOST"), port=int(settings.get("REDSHIFT_PORT")),
            database=settings.get("REDSHIFT_DB"), user=settings.get("REDSHIFT_USER"),
            password=settings.get("REDSHIFT_PASSWORD"), ssl=True,
        )
        try:
            cursor = conn.cursor()
            cursor.execute(f"select company_id from {_ident(schema, rel)} order by company_id")
            ids = [row[0] for row in cursor.fetchall()]
        finally:
            conn.close()
    else:
        import duckdb

        if settings.engine == "postgres":
            from .federation import ensure_duckdb_postgres_extension

            ensure_duckdb_postgres_extension()
        con = duckdb.connect()
        try:
            for statement in warehouse_attach_sql(settings):
                con.execute(statement)
            ids = [r[0] for r in con.execute(
                f"select company_id from {_ident(_WH, schema, rel)} order by company_id").fetchall()]
        finally:
            con.close()
    return [str(int(i)) for i in ids if i is not None and int(i) > 0]


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

    @dg.asset(
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
    )
    def company_training_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        ids = [company_id_of(k) for k in context.partition_keys]
        as_of, as_of_source = data_as_of(context.instance, input_keys)
        results: list[CompanyExport] = []
        with exporter_for(settings, relations) as export:
            for company_id in ids:
                results.append(export(company_id, as_of))
        context.log.info(f"exported {len(results)} companies, {sum(r.rows for r in results)} rows, "
                         f"data as of {as_of.isoformat()}")
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
    def company_partitions(context: dg.SensorEvaluationContext):
        try:
            wanted = warehouse_company_ids(settings, relations)
        except Exception as exc:  # the warehouse not built yet, or busy (a DuckDB file being written)
            return dg.SkipReason(f"cannot read the companies from the warehouse: {type(exc).__name__}: {exc}")
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

    return Exports(asset=company_training_report, job=job, sensor=company_partitions,
                   schedule=customer_exports_nightly, relations=relations)

