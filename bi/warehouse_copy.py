"""The BI copy of the local DuckDB warehouse: what Superset reads on the `local` target.

A DuckDB file has one writer, and while dbt writes it no other process can open it, not even
read-only. So Superset never opens the file dbt writes: after each refresh the relations the
dashboards read are copied (views materialized as tables) into a new file, which is then
renamed over the previous copy. A reader opens the old copy or the new one, never a partial
one, and a refresh never waits for a dashboard (nor a dashboard for a refresh).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import duckdb

META_SCHEMA = "bi_meta"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def publish_copy(source: Path, dest: Path, relations: Iterable[tuple[str, str]],
                 as_of: datetime | None = None) -> dict[str, int]:
    """Copy `schema.relation`s of the warehouse file `source` into `dest`, atomically.

    The source is attached read-only under its file stem, the catalog name dbt-duckdb gave
    it, so that its views (which name that catalog) resolve. Returns the rows per relation.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".bi-copy-{os.getpid()}-{datetime.now(UTC):%H%M%S%f}.duckdb"
    catalog = _ident(source.stem)
    rows: dict[str, int] = {}
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute(f"attach '{source}' as {catalog} (read_only)")
            for schema, name in sorted(set(relations)):
                _ident(schema), _ident(name)
                con.execute(f"create schema if not exists {schema}")
                con.execute(f"create table {schema}.{name} as select * from {catalog}.{schema}.{name}")
                rows[f"{schema}.{name}"] = con.execute(f"select count(*) from {schema}.{name}").fetchone()[0]
            con.execute(f"create schema {META_SCHEMA}")
            con.execute(f"create table {META_SCHEMA}.published (published_at timestamp, data_as_of timestamp)")
            now = datetime.now(UTC).replace(tzinfo=None)
            con.execute(f"insert into {META_SCHEMA}.published values (?, ?)",
                        [now, (as_of.astimezone(UTC).replace(tzinfo=None) if as_of else None)])
            con.execute(f"detach {catalog}")
            con.execute("checkpoint")
        finally:
            con.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o600)  # every company's rows: for Superset, run by the same user
        os.replace(tmp, dest)  # readers see the old copy or the new one
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return rows
