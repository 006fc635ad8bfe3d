"""Where the portal finds a company's export: the exporter's local folder, or S3.

A request names a company (the session's integer) and one of two file names; the store maps
them to one file or object, never to anything built from the request's text. EXPORT_URI and
the EXPORT_S3_* settings are parsed by the exporter's own code (ExportTarget), so the portal
reads where the platform writes. On S3 a company's report is `company_id=<id>/training_report.
<ext>` when DuckDB wrote it and `training_report_000.<ext>` when Redshift's UNLOAD did
(production); the newer object is served, streamed from S3 in chunks, and only if it is still
the object whose as-of time was read (ETag). Credentials are boto3's default chain: the task
role in production, or the AWS_* variables the portal is given.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError

from platform_assets.export_writers import DATA_AS_OF, REPORT_NAME, ExportTarget, company_prefix
from platform_assets.federation import HTTPFS_EXTENSION, ensure_duckdb_extension
from platform_assets.settings import ConfigurationError, PlatformSettings

EXPORT_FILES = {f"{REPORT_NAME}.parquet": "application/vnd.apache.parquet",
                f"{REPORT_NAME}.csv": "text/csv; charset=utf-8"}
_COMPANY_FOLDER = re.compile(r"company_id=([1-9][0-9]{0,18})")
# How much of a CSV export is read for its first row's as-of time.
CSV_HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024
log = logging.getLogger(__name__)
# what reading S3 may raise: botocore's own, and urllib3's that a body read lets through (TLS)
S3_ERRORS = (BotoCoreError, ClientError, HTTPError)


class ExportChanged(RuntimeError):
    """The object was replaced between reading its as-of time and sending it."""


@dataclass(frozen=True)
class ExportFile:
    """One company's file as it will be sent: a local path, or an S3 object at one ETag."""

    name: str
    as_of: str | None
    path: Path | None = None
    key: str | None = None
    etag: str | None = None
    size: int | None = None


def _iso_utc(value: str) -> str | None:
    try:
        moment = datetime.fromisoformat(value)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    except (ValueError, OverflowError):
        return None


def _csv_first_row_as_of(text: io.TextIOBase, whole: bool) -> str | None:
    """`data_as_of` of the first row; a first row that may have been cut (`whole` False and
    no row after it in the text read) says nothing."""
    reader = csv.reader(text)
    header = next(reader, [])
    first = next(reader, None)  # an export with no rows says nothing
    if first is None or DATA_AS_OF not in header or len(first) != len(header):
        return None
    if not whole and next(reader, None) is None:
        return None
    return first[header.index(DATA_AS_OF)]


def _parquet_as_of(location: str, secret_sql: str | None = None) -> str | None:
    """The Parquet file's key/value `data_as_of` (DuckDB's exports), else its first row's
    `data_as_of` column (UNLOAD cannot write key/value metadata)."""
    if any(c in location for c in "*?[{"):  # DuckDB would read the location as a pattern
        log.warning(f"no as-of time from {location}: it holds a glob character")
        return None
    # a connection per read: the request threads cannot share one, and the task role's
    # credentials in the secret rotate
    con = duckdb.connect()
    try:
        if secret_sql:  # S3: the extension was installed when the store started
            con.execute(f"LOAD {HTTPFS_EXTENSION}")
            con.execute("SET http_timeout = 10")  # seconds; DuckDB's default is 30, retried 3 times
            con.execute("SET http_retries = 1")
            con.execute(secret_sql)
        row = con.execute("select value from parquet_kv_metadata(?) where key = ?", [location, DATA_AS_OF]).fetchone()
        if row and row[0] is not None:
            return row[0].decode("utf-8")
        names = [r[0] for r in con.execute("select name from parquet_schema(?)", [location]).fetchall()]
        if DATA_AS_OF not in names:
            return None
        row = con.execute(f'select "{DATA_AS_OF}" from read_parquet(?) limit 1', [location]).fetchone()
    finally:
        con.close()
    return str(row[0]) if row and row[0] is not None else None


class LocalExports:
    """Exports in a local folder (the exporter's default locally)."""

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def companies(self) -> list[int]:
        """The companies with an export folder (not a symlink), in numeric order."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if not p.is_symlink() and p.is_dir() and (m := _COMPANY_FOLDER.fullmatch(p.name)))

    def find(self, company_id: int, name: str) -> ExportFile | None:
        folder = self.root / f"company_id={company_id}"
        path = folder / name
        # a symlink must lead neither out of the export folder nor into another company's
        if not path.is_file() or path.resolve().parent != self.root.resolve() / folder.name:
            return None
        try:
            if path.suffix == ".parquet":
                value = _parquet_as_of(str(path))
            else:
                with open(path, newline="", encoding="utf-8") as text:
                    value = _csv_first_row_as_of(text, whole=True)
        except (duckdb.Error, OSError, UnicodeDecodeError, csv.Error) as exc:
            log.warning(f"no as-of time from {path}: {exc}")
            value = None
        return ExportFile(name=name, as_of=_iso_utc(value) if value else None, path=path)


class S3Exports:
    """Exports under s3://bucket/prefix (production's UNLOAD, or DuckDB's httpfs writes)."""

    def __init__(self, target: ExportTarget):
        import boto3
        from botocore.config import Config

        self.target = target
        self.bucket = target.root.removeprefix("s3://").partition("/")[0]
        # where the company folders start, exactly as the exporter names them ("" at the root)
        self.prefix = self._folder(1).removesuffix("company_id=1/")
        endpoint = f"{'https' if target.s3_use_ssl else 'http'}://{target.s3_endpoint}" if target.s3_endpoint else None
        style = "path" if target.s3_url_style == "path" else "auto"
        # the AWS_* settings given (as the exporter takes them), else boto3's default chain
        self.session = boto3.Session(aws_access_key_id=target.s3_key_id, aws_secret_access_key=target.s3_secret,
                                     aws_session_token=target.s3_session_token, region_name=target.s3_region)
        # short timeouts: a stalled S3 must not hold the portal's threads for minutes
        self.client = self.session.client("s3", endpoint_url=endpoint, config=Config(
            s3={"addressing_style": style}, connect_timeout=5, read_timeout=30,
            retries={"mode": "standard", "max_attempts": 3}))
        ensure_duckdb_extension(HTTPFS_EXTENSION)  # at start, never by a request

    def __str__(self) -> str:
        return self.target.root

    def _folder(self, company_id: int) -> str:
        """The key prefix of a company's objects (company_prefix checks the integer)."""
        return company_prefix(self.target.root, company_id).removeprefix(f"s3://{self.bucket}/") + "/"

    def companies(self) -> list[int]:
        found = set()
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
        for page in pages:
            for entry in page.get("CommonPrefixes", []):
                if m := _COMPANY_FOLDER.fullmatch(entry["Prefix"].removeprefix(self.prefix).rstrip("/")):
                    found.add(int(m.group(1)))
        return sorted(found)

    def find(self, company_id: int, name: str) -> ExportFile | None:
        """The newer of `name` and UNLOAD's `<stem>_000.<ext>`, from one listing of the report's
        keys: a key that does not exist is simply not listed (a HEAD of it answers 403 to a role
        without s3:ListBucket). S3 dates objects to the second; on a tie UNLOAD's object, the
        production writer's, is served."""
        stem, ext = name.rsplit(".", 1)
        folder = self._folder(company_id)
        rank = {folder + name: 0, f"{folder}{stem}_000.{ext}": 1}
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=folder + stem)
        objects = [o for o in listed.get("Contents", []) if o["Key"] in rank]
        if not objects:
            return None
        newest = max(objects, key=lambda o: (o["LastModified"], rank[o["Key"]]))
        key, etag, size = newest["Key"], newest["ETag"], int(newest["Size"])
        try:
            value = self._as_of(key, ext, etag, size)
        except (duckdb.Error, OSError, UnicodeDecodeError, csv.Error, *S3_ERRORS) as exc:
            log.warning(f"no as-of time from s3://{self.bucket}/{key}: {exc}")
            value = None
        return ExportFile(name=name, as_of=_iso_utc(value) if value else None, key=key, etag=etag, size=size)

    def _as_of(self, key: str, ext: str, etag: str, size: int) -> str | None:
        if ext == "csv":
            body = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag,
                                          Range=f"bytes=0-{CSV_HEAD_BYTES - 1}")["Body"].read()
            text = io.StringIO(body.decode("utf-8", errors="replace"), newline="")
            return _csv_first_row_as_of(text, whole=size <= CSV_HEAD_BYTES)
        credentials = self.session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials else None
        reader = ExportTarget(
            root=self.target.root, s3_region=self.target.s3_region, s3_endpoint=self.target.s3_endpoint,
            s3_url_style=self.target.s3_url_style, s3_use_ssl=self.target.s3_use_ssl,
            s3_key_id=frozen.access_key if frozen else None, s3_secret=frozen.secret_key if frozen else None,
            s3_session_token=frozen.token if frozen else None)
        return _parquet_as_of(f"s3://{self.bucket}/{key}", reader.duckdb_secret_sql())

    def open(self, found: ExportFile):
        """The object's body, if it is still the one `found` describes; ExportChanged if it was
        replaced or removed meanwhile (its as-of time would not be this body's)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=found.key, IfMatch=found.etag)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("412", "PreconditionFailed", "404", "NoSuchKey"):
                raise ExportChanged(found.key) from None
            raise


def open_export(store: LocalExports | S3Exports, company_id: int, name: str,
                with_body: bool = True) -> tuple[ExportFile, object] | None:
    """The company's file and, on S3 and `with_body`, its open body: described again once if it
    was replaced between its description and its body (ExportChanged the second time). None:
    no export."""
    replaced = 0
    while True:
        found = store.find(company_id, name)
        if found is None:
            return None
        if found.path is not None or not with_body:
            return found, None
        try:
            return found, store.open(found)
        except ExportChanged:
            replaced += 1
            if replaced == 2:
                raise


def export_store(export_uri: str, env: dict[str, str]) -> LocalExports | S3Exports:
    """The store EXPORT_URI names, with the exporter's own reading of the S3 settings."""
    try:
        target = ExportTarget.from_settings(PlatformSettings(env="local", values={**env, "EXPORT_URI": export_uri}))
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None
    return S3Exports(target) if target.is_s3 else LocalExports(Path(target.root))
