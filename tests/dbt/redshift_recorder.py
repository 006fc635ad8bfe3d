"""dbt on the `prod` target (dbt-redshift) with a recording fake in place of Redshift.

Run dbt's own entry point (`dbtRunner`) in this child process, once per phase, with
`RedshiftConnectionManager.open` replaced by a function handing back a fake handle: its
cursors record every statement dbt sends, in the order sent, with the node whose connection
sent it, and answer dbt's introspection from a catalog the test gives (which relations
exist, their columns). Statements issued at run time (swaps, drops, hooks) never reach
`target/compiled`: this is the only way to see them without a Redshift cluster.

Usage: python -m tests.dbt.redshift_recorder SPEC.json RESULT.json. SPEC (written by
test_redshift_statements.py): `database`, `catalog` ({relations, columns}), `watermark`,
`loaded_days`, `common_args` (dbt arguments of every phase) and `phases` (name, args,
warehouse_exists, external_schema, env). RESULT: each phase's outcome and node statuses,
and `statements` ({phase, node, sql}, in the order sent). No public dbt test utility offers
this, so the patch lives here, in the tests only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Any

# Quoted strings (kept) or comments (removed), as dbt-redshift strips them itself.
_COMMENT = re.compile(r"('(?:[^']|'')*'|\"[^\"]*\")|(/\*.*?\*/|--[^\r\n]*)", re.DOTALL)
_TEMP_SUFFIX = re.compile(r"__dbt_(?:tmp|backup)\d*$")
_TEXT, _TIMESTAMP = 25, 1114  # type oids, for result descriptions


def _text(*names: str) -> list[tuple[str, int]]:
    return [(name, _TEXT) for name in names]


def strip_comments(sql: str) -> str:
    return _COMMENT.sub(lambda m: m.group(1) or " ", sql)


class FakeWarehouse:
    """What the fake Redshift answers in one phase.

    `relations`: [schema, name, type] that exist when the phase starts; `columns`:
    {relation name: [[column, data type], ...]} (temporary and backup copies of a relation
    have its columns); `external_schema`: the federated schema in svv_external_schemas:
    "missing", "matching" (the settings the environment asks for) or "different".
    """

    def __init__(self, database: str, relations: list[list[str]], columns: dict[str, list[list[str]]],
                 external_schema: str, watermark: str, loaded_days: list[str]):
        self.database = database
        self.relations = relations
        self.columns = columns
        self.external_schema = external_schema
        self.watermark = datetime.fromisoformat(watermark)
        self.loaded_days = [date.fromisoformat(d) for d in loaded_days]

    def answer(self, sql: str) -> tuple[list[tuple[str, int]], list[tuple]] | None:
        """Columns (name, type oid) and rows for a statement that returns a result set, else
        None."""
        text = " ".join(strip_comments(sql).split()).lower()
        schemas = sorted({r[0] for r in self.relations})
        if text.startswith("select distinct nspname from pg_namespace"):
            return _text("nspname"), [(s,) for s in schemas]
        if m := re.match(r"select count\(\*\) from pg_namespace where nspname = '([^']*)'", text):
            return _text("count"), [(int(m.group(1) in schemas),)]
        if "from information_schema.tables" in text:
            schema = re.search(r"table_schema ilike '([^']*)'", text).group(1)
            return _text("database", "name", "schema", "type"), [
                (self.database, name, s, kind) for s, name, kind in self.relations if s == schema]
        if 'from information_schema."columns"' in text:
            name = _TEMP_SUFFIX.sub("", re.search(r"table_name = '([^']*)'", text).group(1))
            return (_text("column_name", "data_type", "character_maximum_length", "numeric_precision",
                          "numeric_scale"),
                    [(c, t, None, None, None) for c, t in self.columns.get(name, [])])
        if "from svv_external_schemas" in text:
            return _text("eskind", "databasename", "esoptions"), self._external_schema_rows()
        if " as failures," in text and " as should_warn," in text:  # a data test: it passes
            return _text("failures", "should_warn", "should_error"), [(0, False, False)]
        if "cast('1900-01-01' as timestamp)" in text and "max(" in text:  # incremental_watermark
            return _text("watermark"), [(self.watermark,)]
        if m := re.match(r"select datediff\( day, cast\('([^']*)' as date\), cast\('([^']*)' as date\) \)$", text):
            # dbt.date_spine's number of days (dim_date)
            return _text("days"), [((date.fromisoformat(m.group(2)) - date.fromisoformat(m.group(1))).days,)]
        if text.endswith("where false limit 0"):
            # dbt asks for a query's column types: the snapshots' time columns are timestamps
            return [(n, _TIMESTAMP) for n in ("dbt_snapshot_time", "dbt_updated_at") if f" as {n}" in text], []
        if text.startswith(("select", "with", "show")):
            return [], []  # anything else dbt reads: nothing there (empty catalog tables)
        return None

    def _external_schema_rows(self) -> list[tuple]:
        if self.external_schema == "missing":
            return []
        uri = os.environ["REPLICA_ENDPOINT"]
        if self.external_schema == "different":
            uri = "old-" + uri
        options = json.dumps({
            "SCHEMA": os.environ["REPLICA_SCHEMA"], "URI": uri, "PORT": os.environ["REPLICA_PORT"],
            "IAM_ROLE": os.environ["REDSHIFT_FEDERATION_IAM_ROLE_ARN"],
            "SECRET_ARN": os.environ["REPLICA_SECRET_ARN"],
        })
        return [(3, os.environ["REPLICA_DB"], options)]


class Recording:
    def __init__(self) -> None:
        self.statements: list[dict[str, str]] = []
        self.phase = ""
        self.warehouse: FakeWarehouse | None = None
        self._lock = threading.Lock()

    def add(self, node: str, sql: str) -> None:
        with self._lock:
            self.statements.append({"phase": self.phase, "node": node, "sql": sql})


class FakeCursor:
    """The part of redshift_connector's Cursor that dbt-redshift uses."""

    def __init__(self, handle: FakeHandle):
        self._handle = handle
        self.description: list[tuple] | None = None
        self.rowcount = -1
        self._rows: list[tuple] = []

    def execute(self, sql: str, bindings: Any = None) -> FakeCursor:
        recording = self._handle.recording
        recording.add(self._handle.connection.name or "", sql)
        result = recording.warehouse.answer(sql)
        if result is None:
            self.description, self._rows, self.rowcount = None, [], 0
        else:
            columns, rows = result
            self.description = [(name, oid, None, None, None, None, None) for name, oid in columns]
            self._rows, self.rowcount = list(rows), len(rows)
        return self

    def fetchall(self) -> list[tuple]:
        return self._rows

    def fetchmany(self, size: int) -> list[tuple]:
        return self._rows[:size]


class FakeHandle:
    """Stands for a redshift_connector.Connection; `connection` is dbt's (its name says which
    node is running)."""

    def __init__(self, connection: Any, recording: Recording):
        self.connection, self.recording = connection, recording

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from dbt.adapters.redshift.connections import RedshiftConnectionManager
    from dbt.cli.main import dbtRunner

    recording = Recording()

    def fake_open(cls, connection):
        if connection.state == "open":
            return connection
        connection.handle = FakeHandle(connection, recording)
        connection.state = "open"
        return connection

    RedshiftConnectionManager.open = classmethod(fake_open)

    result: dict[str, Any] = {"phases": {}}
    catalog = spec["catalog"]
    for phase in spec["phases"]:
        recording.phase = phase["name"]
        recording.warehouse = FakeWarehouse(
            database=spec["database"],
            relations=catalog["relations"] if phase["warehouse_exists"] else [],
            columns=catalog["columns"],
            external_schema=phase["external_schema"],
            watermark=spec["watermark"],
            loaded_days=spec["loaded_days"],
        )
        saved = {k: os.environ.get(k) for k in phase.get("env", {})}
        os.environ.update(phase.get("env", {}))
        try:
            outcome = dbtRunner().invoke([*phase["args"], *spec["common_args"]])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        statuses = {}
        if outcome.result is not None and hasattr(outcome.result, "results"):
            statuses = {r.node.unique_id: str(r.status) for r in outcome.result.results}
        result["phases"][phase["name"]] = {
            "success": bool(outcome.success),
            "exception": repr(outcome.exception) if outcome.exception else None,
            "statuses": statuses,
        }
    result["statements"] = recording.statements
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
