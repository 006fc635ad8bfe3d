"""How a company's export is written, by the engine and never through Python memory:
locally DuckDB reads the warehouse (the DuckDB file, or the PostgreSQL warehouse attached
READ_ONLY) and `COPY ... TO` writes Parquet and CSV (to S3 through DuckDB's httpfs); on
Redshift, `UNLOAD` writes straight to S3. The only thing that varies between companies is
an integer (validated from the partition key) in the WHERE clause and in the path.
"""

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .resources import WarehouseResource, quoted, sql_literal
from .settings import ConfigurationError, PlatformSettings

REPORT_NAME = "training_report"
DATA_AS_OF = "data_as_of"
# The marts the report reads (dbt model names); their asset keys are marts/<name>.
INPUT_MODELS = ("fct_enrollments", "dim_companies", "dim_courses")
# A company id as a partition key: a positive integer that fits the source's bigint, nothing else.
_COMPANY_ID = re.compile(r"[1-9][0-9]{0,18}")
MAX_COMPANY_ID = 2**63 - 1
# DuckDB catalog name of the attached warehouse.
WH = "wh"


def company_id_of(partition_key: str) -> int:
    """The company id a partition key stands for; anything but a plain positive integer fails."""
    if (not isinstance(partition_key, str) or not _COMPANY_ID.fullmatch(partition_key)
            or int(partition_key) > MAX_COMPANY_ID):
        raise ValueError(f"not a company id partition key: {partition_key!r}")
    return int(partition_key)


def company_prefix(root: str, company_id: int) -> str:
    if not isinstance(company_id, int) or isinstance(company_id, bool) or company_id <= 0:
        raise ValueError(f"not a company id: {company_id!r}")
    return f"{root.rstrip('/')}/company_id={company_id}"


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
    return f"cast({sql_literal(as_of.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f'))} as timestamp)"


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
    s3_secret: str | None = field(default=None, repr=False)
    s3_session_token: str | None = field(default=None, repr=False)

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
        parts = [f"TYPE s3, REGION {sql_literal(self.s3_region)}", f"URL_STYLE {sql_literal(self.s3_url_style)}",
                 f"USE_SSL {'true' if self.s3_use_ssl else 'false'}"]
        if self.s3_endpoint:
            parts.append(f"ENDPOINT {sql_literal(self.s3_endpoint)}")
        if self.s3_key_id and self.s3_secret:
            parts += [f"KEY_ID {sql_literal(self.s3_key_id)}", f"SECRET {sql_literal(self.s3_secret)}"]
        if self.s3_session_token:
            parts.append(f"SESSION_TOKEN {sql_literal(self.s3_session_token)}")
        return f"CREATE OR REPLACE TEMPORARY SECRET export_s3 ({', '.join(parts)})"


@dataclass(frozen=True)
class CompanyExport:
    company_id: int
    rows: int
    files: tuple[str, ...]


# -- DuckDB: COPY ... TO ------------------------------------------------------------------------
@contextmanager
def duckdb_exporter(attach_sql: Sequence[str], relations: Mapping[str, tuple[str, str]], target: ExportTarget):
    """An in-memory DuckDB with the warehouse attached read-only; yields export(company_id, as_of)."""
    import duckdb

    from .federation import HTTPFS_EXTENSION, POSTGRES_EXTENSION, ensure_duckdb_extension

    if any("TYPE postgres" in s for s in attach_sql):
        ensure_duckdb_extension(POSTGRES_EXTENSION)
    if target.is_s3:
        ensure_duckdb_extension(HTTPFS_EXTENSION)
    con = duckdb.connect()
    try:
        for statement in attach_sql:
            con.execute(statement)
        if target.is_s3:
            con.execute(f"LOAD {HTTPFS_EXTENSION}")
            con.execute(target.duckdb_secret_sql())
        qualified = {name: quoted(WH, schema, rel) for name, (schema, rel) in relations.items()}

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
                       f"{DATA_AS_OF}: {sql_literal(as_of_text)}, company_id: {sql_literal(str(company_id))}}}",
            "csv": "FORMAT csv, HEADER true",
        }
        files, rows = [], 0
        for ext, options in formats.items():
            final = f"{prefix}/{REPORT_NAME}.{ext}"
            if target.is_s3:
                # An S3 object becomes visible only when its upload completes, whole.
                rows = con.execute(f"COPY company_report TO {sql_literal(final)} ({options})").fetchone()[0]
            else:
                temporary = f"{prefix}/.{REPORT_NAME}.{ext}.{uuid.uuid4().hex}.tmp"
                try:
                    rows = con.execute(f"COPY company_report TO {sql_literal(temporary)} ({options})").fetchone()[0]
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
    qualified = {name: quoted(schema, rel) for name, (schema, rel) in relations.items()}
    query = report_query(qualified, company_id, as_of)
    to = f"{company_prefix(root, company_id)}/{REPORT_NAME}_"
    common = f"IAM_ROLE {sql_literal(iam_role_arn)} PARALLEL OFF MAXFILESIZE 6 GB ALLOWOVERWRITE"
    return [
        f"UNLOAD ({sql_literal(query)}) TO {sql_literal(to)} {common} FORMAT AS PARQUET",
        f"UNLOAD ({sql_literal(query)}) TO {sql_literal(to)} {common} FORMAT AS CSV HEADER EXTENSION 'csv'",
    ]


@contextmanager
def redshift_exporter(warehouse: WarehouseResource, relations: Mapping[str, tuple[str, str]], root: str, role: str):
    client = warehouse.redshift().get_client()

    def export(company_id: int, as_of: datetime) -> CompanyExport:
        rows = 0
        for statement in unload_statements(relations, company_id, as_of, root, role):
            results = client.execute_queries([statement, "select pg_last_unload_count()"], fetch_results=True)
            rows = int(results[-1][0][0])
        prefix = f"{company_prefix(root, company_id)}/{REPORT_NAME}_000"
        return CompanyExport(company_id, rows, (f"{prefix}.parquet", f"{prefix}.csv"))

    yield export


@contextmanager
def exporter_for(settings: PlatformSettings, warehouse: WarehouseResource, relations: Mapping[str, tuple[str, str]]):
    if settings.export_method == "redshift_unload":
        role = settings.get("EXPORT_UNLOAD_IAM_ROLE_ARN")
        with redshift_exporter(warehouse, relations, settings.export_uri, role) as export:
            yield export
    else:
        target = ExportTarget.from_settings(settings)
        with duckdb_exporter(warehouse.duckdb_attach_sql(WH), relations, target) as export:
            yield export
