"""Every statement dbt issues on the `prod` target is valid on Redshift.

dbt runs on `prod` (dbt-redshift) in a child process with the connection replaced by a
recording fake (redshift_recorder.py): a first build on an empty warehouse, a full refresh
and an incremental build of a warehouse that exists (its relations and columns are the
pg scenario's: what this project builds), and a window run of the daily-partitioned facts.
Each statement dbt sent (hooks, swaps, drops, merges, tests, introspection) is checked
against PostgreSQL constructs that Redshift does not support. Compiled SQL alone misses the
statements materializations and dispatched macros issue at run time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import PROD_DUMMY_ENV, Extras, Scenario
from .dbt_cli import PROJECT_DIR, dbt_env
from .redshift_recorder import strip_comments

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = ("staging", "marts", "reporting", "snapshots")
# the daily facts' partition window, as the orchestrator passes it (dbt's event-time bounds)
WINDOW = ("--event-time-start", "2026-11-01", "--event-time-end", "2026-11-03")
BUILD = ("build", "--exclude-resource-type", "unit_test")  # what the orchestrator runs on prod

# (phase, dbt arguments, warehouse exists, federated schema in svv_external_schemas, env)
PHASES = (
    ("first", BUILD, False, "missing", {}),
    ("full_refresh", (*BUILD, "--full-refresh"), True, "different", {}),
    ("incremental", BUILD, True, "matching", {}),
    ("window", (*BUILD, "--select", "tag:daily_partitioned", *WINDOW), True, "matching", {}),
)


def _calls(*functions: str) -> str:
    return r"\b(?:" + "|".join(functions) + r")\s*\("


# PostgreSQL that Redshift rejects, or runs on the leader node only, and so fails on
# anything that reads a table. From AWS's "Unsupported PostgreSQL functions" and
# "Unsupported PostgreSQL features" (Amazon Redshift Database Developer Guide), and what
# PostgreSQL-only macros use (DO blocks, ON CONFLICT, LATERAL, FILTER, DISTINCT ON).
# Matched case-insensitively on each statement with comments removed and string literals
# emptied (a word inside data is not a construct).
UNSUPPORTED = {
    "advisory lock": r"\bpg_(?:try_)?advisory_\w+",
    "DO block": r"^\s*do\b",
    "to_regclass / ::regclass": _calls("to_regclass")
    + r"|::\s*reg(?:class|type|proc|procedure|oper|operator|namespace|role)\b",
    "generate_series (leader node only)": _calls("generate_series"),
    "generate_subscripts": _calls("generate_subscripts"),
    "ON CONFLICT": r"\bon\s+conflict\b",
    "LATERAL": r"\blateral\b",
    "FILTER (WHERE ...)": r"\bfilter\s*\(\s*where\b",
    "DISTINCT ON": r"\bdistinct\s+on\s*\(",
    "jsonb / json functions": r"\bjsonb\b|" + _calls(
        "to_json", "to_jsonb", r"json_(?:agg|build_\w+|object\w*|populate_\w+|to_record\w*|each\w*|array_elements\w*)"),
    "array_agg": _calls("array_agg"),
    "string_agg": _calls("string_agg"),
    "unsupported aggregate": _calls(
        "every", "xmlagg", "xml_agg", "corr", "covar_pop", "covar_samp",
        r"regr_(?:avgx|avgy|count|intercept|r2|slope|sxx|sxy|syy)"),
    "array constructor / array function": r"\barray\s*\[|" + _calls(
        "unnest", "string_to_array", r"array_(?:append|cat|dims|fill|length|lower|ndims|position|positions|prepend"
        r"|remove|replace|to_string|upper)"),
    "unsupported date/time function": _calls(
        "clock_timestamp", "justify_days", "justify_hours", "justify_interval", "pg_sleep", "transaction_timestamp"),
    "IS DISTINCT FROM": r"\bis\s+(?:not\s+)?distinct\s+from\b",
    "unsupported math function": _calls("div", "setseed", "width_bucket"),
    "unsupported string function": _calls(
        "bit_length", "overlay", "convert_from", "convert_to", "encode", "format", "quote_nullable",
        "regexp_matches", "regexp_split_to_array", "regexp_split_to_table"),
    "object size / location function": _calls(
        r"pg_(?:relation_size|total_relation_size|table_size|indexes_size|database_size|relation_filenode"
        r"|relation_filepath)"),
    "sequence": _calls("nextval", "currval", "setval", "lastval") + r"|\bcreate\s+sequence\b",
    "range type": r"\b(?:int4|int8|num|ts|tstz|date)range\b",
    "text search": _calls("to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery") + "|@@",
    "XML function": _calls(r"xml(?:element|forest|parse|serialize|concat|pi|root)", "xpath"),
    "index": r"\bcreate\s+(?:unique\s+)?index\b",
    "tablespace": r"\btablespace\b",
    "table inheritance": r"\binherits\s*\(",
    "table partitioning": r"\bpartition\s+by\s+(?:range|list|hash)\s*\(",
    "trigger": r"\bcreate\s+(?:or\s+replace\s+)?(?:constraint\s+)?trigger\b",
    "SQL/MED (foreign data wrapper)": r"\bforeign\s+(?:table|data\s+wrapper)\b|\buser\s+mapping\b"
    r"|\bimport\s+foreign\s+schema\b|\bcreate\s+server\b",
    "extension": r"\bcreate\s+extension\b",
    "VALUES list as a table": r"\b(?:from|join)\s*\(\s*values\b",
    "savepoint": r"\bsavepoint\b",
}
_PATTERNS = {name: re.compile(p, re.IGNORECASE | re.MULTILINE) for name, p in UNSUPPORTED.items()}
_LITERAL = re.compile(r"'(?:[^']|'')*'")


def unsupported_constructs(sql: str) -> list[str]:
    text = _LITERAL.sub("''", strip_comments(sql))
    return [name for name, pattern in _PATTERNS.items() if pattern.search(text)]


@dataclass
class Recorded:
    phases: dict[str, dict]
    statements: list[dict[str, str]]
    output: str

    def of(self, phase: str, node: str | None = None) -> list[str]:
        """Statements of a phase (of one node), comments removed, whitespace collapsed, lower case."""
        return [" ".join(strip_comments(s["sql"]).split()).lower() for s in self.statements
                if s["phase"] == phase and (node is None or s["node"] == node)]


def _catalog(scenario: Scenario) -> dict:
    """What the pg scenario built: the relations of the project's schemas and their columns."""
    wh = scenario.warehouses["pg"]
    _, relations = wh.query(
        "select table_schema, table_name, case table_type when 'VIEW' then 'view' else 'table' end"
        " from information_schema.tables where table_schema = any(%s) order by 1, 2", (list(SCHEMAS),))
    _, columns = wh.query(
        "select table_name, column_name, data_type from information_schema.columns"
        " where table_schema = any(%s) order by table_schema, table_name, ordinal_position", (list(SCHEMAS),))
    by_relation: dict[str, list[list[str]]] = {}
    for table, column, data_type in columns:
        by_relation.setdefault(table, []).append([column, data_type])
    return {"relations": [list(r) for r in relations], "columns": by_relation}


@pytest.fixture(scope="module")
def recorded(dbt_scenario: Scenario, dbt_extras: Extras, tmp_path_factory) -> Recorded:
    work = tmp_path_factory.mktemp("redshift_recording")
    # The same project, profile and settings as the prod parse of dbt_extras: dbt reuses that
    # parse instead of parsing the project again.
    (work / "target").mkdir()
    shutil.copy(dbt_extras.prod_target_dir / "partial_parse.msgpack", work / "target")
    spec = {
        "database": PROD_DUMMY_ENV["REDSHIFT_DB"],
        "catalog": _catalog(dbt_scenario),
        "watermark": "2026-11-30 12:00:00",
        "loaded_days": ["2026-11-01", "2026-11-30"],
        "common_args": [
            "--project-dir", str(PROJECT_DIR), "--profiles-dir", str(PROJECT_DIR), "--target", "prod",
            "--target-path", str(work / "target"), "--log-path", str(work / "logs"),
        ],
        "phases": [
            {"name": name, "args": list(args), "warehouse_exists": exists, "external_schema": external,
             "env": env}
            for name, args, exists, external, env in PHASES
        ],
    }
    (work / "spec.json").write_text(json.dumps(spec))
    # Offline: only PATH/HOME and dummy settings, nothing that could reach a real service.
    env = dbt_env({"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
                  **PROD_DUMMY_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.dbt.redshift_recorder", str(work / "spec.json"), str(work / "result.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    result = json.loads((work / "result.json").read_text())
    return Recorded(phases=result["phases"], statements=result["statements"], output=output)


def test_every_phase_succeeds_on_the_fake(recorded: Recorded):
    for name, *_ in PHASES:
        phase = recorded.phases[name]
        failed = {k: v for k, v in phase["statuses"].items()
                  if v not in ("success", "pass") and not (k.startswith("exposure.") and v == "no-op")}
        assert phase["success"] and phase["statuses"] and not failed, (
            name, phase["exception"], failed, recorded.output[-3000:])


def _issued(statements: list[str], pattern: str, at_least: int = 1) -> None:
    found = [s for s in statements if re.search(pattern, s)]
    assert len(found) >= at_least, f"{len(found)} statements match {pattern!r}, expected {at_least} or more"


def test_the_recording_covers_what_prod_runs(recorded: Recorded):
    """Not vacuous: swaps, backup drops, incremental merges, snapshots, tests, federation."""
    fct, enr = r'"warehouse"\."marts"\."fct_lesson_events"', r'"warehouse"\."marts"\."fct_enrollments"'
    activity = r'"warehouse"\."marts"\."fct_daily_learning_activity"'
    users = r'"warehouse"\."snapshots"\."snp_app__users"'
    first, full = recorded.of("first"), recorded.of("full_refresh")
    incremental, window = recorded.of("incremental"), recorded.of("window")
    assert len(recorded.statements) > 1000, len(recorded.statements)
    # first build: schemas, the external schema, tables built aside, snapshots created
    _issued(first, r'^create schema if not exists "staging"')
    _issued(first, r'^create external schema if not exists "federated" from postgres ')
    _issued(first, r'^create table "warehouse"\."marts"\."\w+__dbt_tmp" .*\bas \(', at_least=5)
    _issued(first, rf"^create table {activity} diststyle even compound sortkey\(activity_date\) as \(")
    _issued(first, rf'^create table {enr[:-1]}__dbt_tmp" diststyle key distkey \(user_id\) '
                   r"compound sortkey\(updated_at\) as \(")
    _issued(first, rf"^create table {users} as \(")
    # full refresh of an existing warehouse: built aside, swapped by rename, backup dropped
    _issued(full, r'^drop schema "federated"$')
    _issued(full, r"^create external schema ")
    _issued(full, r'^alter table "warehouse"\."marts"\."dim_users" rename to "dim_users__dbt_backup"$')
    _issued(full, r'^alter table "warehouse"\."marts"\."dim_users__dbt_tmp" rename to "dim_users"$')
    _issued(full, r'^drop table if exists "warehouse"\."marts"\."\w+__dbt_backup" cascade$', at_least=8)
    _issued(full, rf'^create table {fct[:-1]}__dbt_tmp" diststyle key distkey \(user_id\) compound sortkey')
    _issued(full, r'^drop view if exists "warehouse"\."reporting"\."rpt_\w+__dbt_backup" cascade$', at_least=3)
    _issued(full, r'^create view "warehouse"\."reporting"\."rpt_\w+__dbt_tmp" as \(.*\) with no schema binding',
            at_least=3)
    # incremental: the watermark read, then delete+insert by key; snapshots merged; tables
    # (fct_enrollments among them) built aside and swapped
    _issued(incremental, rf"^delete from {fct} where \(\w+\) in \(")
    _issued(incremental, rf"^insert into {fct} \(")
    _issued(incremental, rf'^alter table {enr[:-1]}__dbt_tmp" rename to "fct_enrollments"$')
    _issued(incremental, r"where created_at >= cast\('2026-11-30 12:00:00' as timestamp\)")
    _issued(incremental, rf"^delete from {activity}$")  # no window: every day recomputed
    _issued(incremental, rf"^update {users} set dbt_valid_to = ")
    _issued(incremental, rf"^insert into {users} \(")
    assert not [s for s in incremental if "external schema" in s]  # the federation is up to date
    # window: the window emptied first, then only its rows
    _issued(window, rf"^delete from {fct} where occurred_at >= cast\('2026-11-01 00:00:00' as timestamp\)")
    _issued(window, rf"^delete from {fct} where \(event_id\) in \(")
    _issued(window, rf"^delete from {activity} where activity_date >= cast\('2026-11-01 00:00:00' as timestamp\)")
    _issued(window, rf"^insert into {activity} \(")
    # the data tests' own SQL
    _issued(incremental, r" as failures, ", at_least=100)


def test_no_statement_uses_what_redshift_does_not_support(recorded: Recorded):
    """Findings are grouped by statement shape (its first line without names), each with
    its first lines and the nodes that issued it."""
    shapes: dict[tuple, dict] = {}
    for s in recorded.statements:
        constructs = unsupported_constructs(s["sql"])
        if not constructs:
            continue
        lines = [line.strip() for line in strip_comments(s["sql"]).strip().splitlines() if line.strip()]
        key = (tuple(constructs), re.sub(r'"[^"]*"|\'[^\']*\'', "...", lines[0]))
        shape = shapes.setdefault(key, {"lines": lines[:4], "nodes": set(), "phases": set(), "count": 0})
        shape["nodes"].add(s["node"].split(".")[-1])
        shape["phases"].add(s["phase"])
        shape["count"] += 1
    report = [
        f"{', '.join(constructs)}: {shape['count']} statements in {', '.join(sorted(shape['phases']))}"
        f" by {', '.join(sorted(shape['nodes']))}; e.g.\n      " + "\n      ".join(shape["lines"])
        for (constructs, _), shape in shapes.items()
    ]
    total = sum(shape["count"] for shape in shapes.values())
    assert not report, f"{total} statements Redshift would reject:\n" + "\n".join(report)


@pytest.mark.parametrize("sql, expected", [
    ("select pg_advisory_xact_lock(hashtext('x'))", ["advisory lock"]),
    ("do $repoint$ begin null; end $repoint$", ["DO block"]),
    ("select 'pg_class'::regclass, to_regclass('a.b')", ["to_regclass / ::regclass"]),
    ("insert into t values (1) on conflict do nothing", ["ON CONFLICT"]),
    ("select string_agg(a, ',') filter (where a > 0) from t", ["FILTER (WHERE ...)", "string_agg"]),
    ("select a from t left join lateral unnest(b) o on true",
     ["LATERAL", "array constructor / array function"]),
    ("-- generate_series(1, 3) in a comment\nselect 'distinct on (a)' as note, a is distinct from b",
     ["IS DISTINCT FROM"]),
    ('create table "x"."y__dbt_tmp" diststyle key distkey (user_id) as (select 1 as a)', []),
])
def test_the_construct_check_matches(sql: str, expected: list[str]):
    assert unsupported_constructs(sql) == expected
