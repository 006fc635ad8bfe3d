"""Customer exports and dashboards, without the session's servers: a small DuckDB warehouse in
the test's folder holds many companies with adversarial names (quotes, slashes, unicode,
`../`), so nothing here changes the shared replica that other tests count and checksum.

- isolation: each company's files hold exactly its rows and sit under its own prefix;
- the partition sensor adds and removes companies and exports new ones in one run;
- S3 through moto's threaded server (DuckDB httpfs), and the Redshift UNLOAD text (sqlglot);
- the dashboards' refresh records follow their stalest mart.
"""

import datetime as dt
import os
import random
import re
from pathlib import Path

import boto3
import dagster as dg
import duckdb
import pytest
import sqlglot
from sqlglot import exp
from sqlglot.tokens import TokenType

from platform_assets.export_writers import (
    DATA_AS_OF,
    REPORT_NAME,
    ExportTarget,
    company_id_of,
    company_prefix,
    duckdb_exporter,
    relations_from_manifest,
    unload_statements,
)
from platform_assets.exports import COMPANIES, EXPORTS_JOB, build_exports, partition_changes, range_tags
from platform_assets.exposures import Dashboard, dashboard_refreshes
from platform_assets.resources import WarehouseResource
from platform_assets.settings import (
    DEFAULT_EXPORT_URIS,
    ENVIRONMENTS,
    EXPORT_METHODS,
    REQUIRED_VARIABLES,
    ConfigurationError,
    load_settings,
)

ADVERSARIAL_NAMES = [
    "O'Brien & Sons",
    'The "Quoted" Company',
    "../../../etc/passwd",
    "..",
    "a/b\\c/../d",
    "company_id=1",
    "Ünïcødé 株式会社 🚀",
    "Robert'); DROP TABLE marts.fct_enrollments; --",
    "line\nbreak, comma; semicolon",
    "%2e%2e%2fencoded",
    "",
    "/absolute/path",
    "C:\\Windows\\System32",
    "   spaces   ",
    "tab\tseparated",
    "null",
]
N_COMPANIES = 48
AS_OF = dt.datetime(2026, 3, 1, 6, 30, tzinfo=dt.UTC)
MANIFEST = {"nodes": {
    f"model.reporting.{name}": {"resource_type": "model", "name": name, "schema": "marts", "alias": name}
    for name in ("fct_enrollments", "dim_companies", "dim_courses")
}}


def _company_ids() -> list[int]:
    # Not contiguous, and some large: a key is an id, not a position.
    return [7 * i + 3 for i in range(N_COMPANIES - 2)] + [10**12 + 1, 2**53, 2**63 - 1]  # the largest bigint


def build_warehouse(path: Path, company_ids: list[int], seed: int = 1) -> dict[int, set[int]]:
    """The three marts the report reads, with random enrollments; returns company -> enrollment ids."""
    rng = random.Random(seed)
    con = duckdb.connect(str(path))
    try:
        con.execute("create schema if not exists marts")
        con.execute("create or replace table marts.dim_companies (company_id bigint, company_name varchar)")
        con.execute("create or replace table marts.dim_courses (course_id bigint, course_title varchar, "
                    "course_category varchar)")
        con.execute("""create or replace table marts.fct_enrollments (
            enrollment_id bigint, user_id bigint, company_id bigint, course_id bigint, enrollment_status varchar,
            enrolled_at timestamp, completed_at timestamp, days_to_complete integer, certificate_id bigint,
            certificate_issued_at timestamp)""")
        con.executemany("insert into marts.dim_companies values (?, ?)",
                        [(cid, ADVERSARIAL_NAMES[i % len(ADVERSARIAL_NAMES)]) for i, cid in enumerate(company_ids)])
        con.executemany("insert into marts.dim_courses values (?, ?, ?)",
                        [(c, f"Course '{c}' / \"{c}\"", "aws") for c in range(1, 6)])
        rows, expected, eid = [], {cid: set() for cid in company_ids}, 1
        for cid in company_ids:
            for _ in range(rng.randrange(0, 25)):  # some companies have no enrollment at all
                rows.append(f"({eid}, {rng.randrange(1, 10_000)}, {cid}, {rng.randrange(1, 6)})")
                expected[cid].add(eid)
                eid += 1
        # integers only: one statement (row-by-row inserts are slow in DuckDB)
        con.execute(
            "insert into marts.fct_enrollments select v.*, 'completed', timestamp '2026-01-01', "
            f"timestamp '2026-01-05', 4, null, null from (values {', '.join(rows)}) as v"
        )
    finally:
        con.close()
    return expected


def _read(con: duckdb.DuckDBPyConnection, path: str) -> list[tuple]:
    reader = "read_parquet" if path.endswith(".parquet") else "read_csv"
    options = "" if path.endswith(".parquet") else ", header = true, all_varchar = true"
    return con.execute(
        f"select cast(company_id as bigint), company_name, cast(enrollment_id as bigint), "
        f"cast({DATA_AS_OF} as timestamp) from {reader}(?{options})", [path]
    ).fetchall()


def _check_company_files(files: dict[str, str], company_id: int, name: str, enrollments: set[int],
                         as_of: dt.datetime | None = AS_OF) -> None:
    """The company's rows and only them; `as_of`: the data_as_of they carry (None: not checked)."""
    con = duckdb.connect()
    try:
        for path in files.values():
            rows = _read(con, path)
            assert {r[0] for r in rows} <= {company_id}, path
            assert sorted(r[2] for r in rows) == sorted(enrollments), path
            # CSV has no NULL apart from the empty string: an empty name reads back as NULL.
            wanted = None if (name == "" and path.endswith(".csv")) else name
            assert {r[1] for r in rows} <= {wanted}, path
            assert as_of is None or {r[3] for r in rows} <= {as_of.replace(tzinfo=None)}, path
        kv = dict(con.execute("select key::varchar, value::varchar from parquet_kv_metadata(?)",
                              [files["parquet"]]).fetchall())
        assert kv["company_id"] == str(company_id)
        assert as_of is None or kv[DATA_AS_OF] == as_of.isoformat()
    finally:
        con.close()


@pytest.fixture
def warehouse(tmp_path):
    ids = _company_ids()
    path = tmp_path / "warehouse.duckdb"
    return path, ids, build_warehouse(path, ids)


def _attach(path: Path) -> list[str]:
    return [f"ATTACH '{path}' AS wh (READ_ONLY)"]


def test_each_company_gets_only_its_rows_under_its_own_prefix(tmp_path, warehouse):
    path, ids, expected = warehouse
    root = tmp_path / "exports"
    names = {cid: ADVERSARIAL_NAMES[i % len(ADVERSARIAL_NAMES)] for i, cid in enumerate(ids)}
    with duckdb_exporter(_attach(path), relations_from_manifest(MANIFEST), ExportTarget(root=str(root))) as export:
        results = {cid: export(cid, AS_OF) for cid in ids}
    # Exactly two files per company, under root/company_id=<id>/, nothing else anywhere.
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == sorted(f"company_id={cid}/{REPORT_NAME}.{ext}" for cid in ids for ext in ("csv", "parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "warehouse.duckdb"]
    assert all(p.parent == root for p in root.iterdir())
    for cid in ids:
        assert results[cid].rows == len(expected[cid])
        files = {f.rsplit(".", 1)[1]: f for f in results[cid].files}
        assert all(Path(f).parent == root / f"company_id={cid}" for f in files.values())
        _check_company_files(files, cid, names[cid], expected[cid])
    assert sum(len(v) for v in expected.values()) > 200
    assert any(not v for v in expected.values()), "a company without enrollments gets empty files"


def test_rerun_replaces_the_files_whole(tmp_path, warehouse):
    path, ids, expected = warehouse
    cid = next(c for c in ids if len(expected[c]) > 3)
    root = tmp_path / "exports"
    target = ExportTarget(root=str(root))
    relations = relations_from_manifest(MANIFEST)
    with duckdb_exporter(_attach(path), relations, target) as export:
        first = export(cid, AS_OF)
    inodes = {f: os.stat(f).st_ino for f in first.files}
    gone = min(expected[cid])
    con = duckdb.connect(str(path))
    con.execute("delete from marts.fct_enrollments where enrollment_id = ?", [gone])
    con.close()
    with duckdb_exporter(_attach(path), relations, target) as export:
        second = export(cid, AS_OF)
    assert second.rows == first.rows - 1
    # A new file renamed over the old one (never the old file rewritten in place), no leftovers.
    assert all(os.stat(f).st_ino != inodes[f] for f in second.files)
    assert sorted(p.name for p in (root / f"company_id={cid}").iterdir()) == [
        f"{REPORT_NAME}.csv", f"{REPORT_NAME}.parquet"]
    _check_company_files({f.rsplit(".", 1)[1]: f for f in second.files}, cid,
                         ADVERSARIAL_NAMES[ids.index(cid) % len(ADVERSARIAL_NAMES)], expected[cid] - {gone})


@pytest.mark.parametrize("key", ["../1", "1/../2", "0", "-1", "01", "1 or 1=1", "1;", "1\n", " 1", "١", "1e3",
                                 "company_id=1", "", "99999999999999999999", str(2**63)])
def test_only_plain_company_ids_are_partition_keys(key):
    with pytest.raises(ValueError):
        company_id_of(key)


def test_one_companys_failure_never_blocks_the_others_exports(tmp_path, warehouse):
    """A company whose export cannot be written (here its folder's name is taken by a file)
    fails the run, named; every other company's files are written and its partition
    materialized."""
    path, ids, expected = warehouse
    exports = build_exports(_platform_settings(tmp_path, path), MANIFEST, pool="warehouse")
    resources = {"warehouse": WarehouseResource(env="local", duckdb_path=str(path))}
    defs = dg.Definitions(assets=[exports.asset], jobs=[exports.job], resources=resources)
    broken = ids[len(ids) // 2]
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / f"company_id={broken}").write_text("not a folder")
    with dg.DagsterInstance.ephemeral() as instance:
        keys = [str(c) for c in ids]
        instance.add_dynamic_partitions(COMPANIES.name, keys)
        result = defs.resolve_job_def(EXPORTS_JOB).execute_in_process(
            instance=instance, tags=range_tags(keys), raise_on_error=False)
        assert not result.success
        (failure,) = [e.step_failure_data for e in result.all_events if e.is_step_failure]
        assert f"1 of {len(ids)} company exports failed" in failure.user_failure_data.description
        assert f"company {broken}:" in failure.user_failure_data.description
        assert instance.get_materialized_partitions(exports.asset.key) == set(keys) - {str(broken)}
    for cid in ids:
        if cid != broken:
            folder = tmp_path / "exports" / f"company_id={cid}"
            _check_company_files({ext: str(folder / f"{REPORT_NAME}.{ext}") for ext in ("parquet", "csv")}, cid,
                                 ADVERSARIAL_NAMES[ids.index(cid) % len(ADVERSARIAL_NAMES)], expected[cid], as_of=None)


def test_paths_are_built_from_integers_only():
    assert company_prefix("s3://b/p/", 12) == "s3://b/p/company_id=12"
    for bad in ("12", "../1", 0, -3, True, 1.5):
        with pytest.raises(ValueError):
            company_prefix("/x", bad)


def _platform_settings(tmp_path, warehouse_path, **extra):
    return load_settings({
        "PLATFORM_ENV": "local", "PLATFORM_ENV_FILE": str(tmp_path / "none.env"),
        "DUCKDB_PATH": str(warehouse_path), "EXPORT_URI": str(tmp_path / "exports"), **extra,
    })


def test_partition_sensor_follows_the_companies_and_one_run_exports_them(tmp_path, warehouse):
    path, ids, expected = warehouse
    exports = build_exports(_platform_settings(tmp_path, path), MANIFEST, pool="warehouse")
    resources = {"warehouse": WarehouseResource(env="local", duckdb_path=str(path))}
    defs = dg.Definitions(assets=[exports.asset], jobs=[exports.job], sensors=[exports.sensor], resources=resources)
    with dg.DagsterInstance.ephemeral() as instance:
        result = exports.sensor(dg.build_sensor_context(instance=instance, definitions=defs, resources=resources))
        assert isinstance(result, dg.SensorResult)
        (add,) = result.dynamic_partitions_requests
        assert list(add.partition_keys) == [str(c) for c in ids]
        (run,) = result.run_requests
        assert run.tags | range_tags([str(ids[0]), str(ids[-1])]) == run.tags
        instance.add_dynamic_partitions(COMPANIES.name, list(add.partition_keys))

        # the run the sensor asks for: every company, one run, one process
        job = defs.resolve_job_def(EXPORTS_JOB)
        done = job.execute_in_process(instance=instance, tags=run.tags)
        assert done.success
        (event,) = {e.event_specific_data.materialization.asset_key for e in done.get_asset_materialization_events()}
        materialized = instance.get_materialized_partitions(exports.asset.key)
        assert materialized == {str(c) for c in ids}
        meta = done.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
        assert meta["rows_by_company"].value == {str(c): len(expected[c]) for c in ids}
        assert DATA_AS_OF in meta

        context = dg.build_sensor_context(instance=instance, definitions=defs, resources=resources)
        assert isinstance(exports.sensor(context), dg.SkipReason)

        # one company leaves, one arrives
        con = duckdb.connect(str(path))
        con.execute("delete from marts.dim_companies where company_id = ?", [ids[0]])
        con.execute("insert into marts.dim_companies values (999999, '../../new')")
        con.close()
        result = exports.sensor(dg.build_sensor_context(instance=instance, definitions=defs, resources=resources))
        kinds = {type(r).__name__: list(r.partition_keys) for r in result.dynamic_partitions_requests}
        assert kinds == {"AddDynamicPartitionsRequest": ["999999"], "DeleteDynamicPartitionsRequest": [str(ids[0])]}
        (run,) = result.run_requests
        assert range_tags(["999999"]).items() <= run.tags.items()


def test_partition_changes_order_is_numeric():
    assert partition_changes(["3", "10"], ["10", "2", "100", "9"]) == (["2", "9", "100"], ["3"])


# -- S3 (moto's server) -------------------------------------------------------------------------
@pytest.fixture
def moto_s3(moto_server):
    client = boto3.client("s3", endpoint_url=f"http://{moto_server}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="customer-exports")
    return client, moto_server


def test_s3_export_through_moto(tmp_path, warehouse, moto_s3):
    client, endpoint = moto_s3
    path, ids, expected = warehouse
    settings = _platform_settings(
        tmp_path, path, EXPORT_URI="s3://customer-exports/exports/v1", EXPORT_S3_ENDPOINT=endpoint,
        EXPORT_S3_URL_STYLE="path", EXPORT_S3_USE_SSL="false", AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
    )
    target = ExportTarget.from_settings(settings)
    chosen = ids[:6]
    relations = relations_from_manifest(MANIFEST)
    with duckdb_exporter(_attach(path), relations, target) as export:
        for cid in chosen:
            export(cid, AS_OF)
        export(chosen[0], AS_OF)  # a re-run replaces, never adds
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="customer-exports")["Contents"])
    assert keys == sorted(
        f"exports/v1/company_id={c}/{REPORT_NAME}.{ext}" for c in chosen for ext in ("csv", "parquet"))
    for cid in chosen:
        files = {}
        for ext in ("parquet", "csv"):
            local = tmp_path / f"{cid}.{ext}"
            client.download_file("customer-exports", f"exports/v1/company_id={cid}/{REPORT_NAME}.{ext}", str(local))
            files[ext] = str(local)
        _check_company_files(files, cid, ADVERSARIAL_NAMES[ids.index(cid) % len(ADVERSARIAL_NAMES)], expected[cid])


# -- Redshift UNLOAD (cannot run here: its text is checked) -----------------------------------
def test_redshift_unload_statements_parse_and_stay_in_the_company_prefix():
    relations = relations_from_manifest(MANIFEST)
    role = "arn:aws:iam::123456789012:role/platform-redshift-export"
    statements = unload_statements(relations, 42, AS_OF, "s3://customer-exports/exports", role)
    assert len(statements) == 2
    for statement, fmt in zip(statements, ("PARQUET", "CSV"), strict=True):
        # sqlglot keeps UNLOAD as an opaque command: tokenize what follows the keyword.
        assert statement.startswith("UNLOAD (")
        tokens = [None, *sqlglot.tokenize(statement[len("UNLOAD"):], read="redshift")]
        assert tokens[1].token_type == TokenType.L_PAREN
        assert tokens[2].token_type == TokenType.STRING and tokens[3].token_type == TokenType.R_PAREN
        assert tokens[4].text.upper() == "TO" and tokens[5].token_type == TokenType.STRING
        assert tokens[5].text == "s3://customer-exports/exports/company_id=42/training_report_"
        words = [t.text.upper() for t in tokens[6:]]
        assert "IAM_ROLE" in words and tokens[6 + words.index("IAM_ROLE") + 1].text == role
        assert {"ALLOWOVERWRITE", "PARALLEL", "OFF", fmt} <= set(words) and "CLEANPATH" not in words
        # the quoted query is a valid Redshift SELECT filtered on this company only
        query = sqlglot.parse_one(tokens[2].text, read="redshift")
        assert isinstance(query, exp.Select)
        where = query.args["where"].this
        assert isinstance(where, exp.EQ) and where.expression.this == "42"
        assert {t.name for t in query.find_all(exp.Table)} == {"fct_enrollments", "dim_companies", "dim_courses"}
        assert DATA_AS_OF in query.named_selects
        sqlglot.transpile(tokens[2].text, read="redshift", write="redshift")
    with pytest.raises(ValueError):
        unload_statements(relations, "42 or 1=1", AS_OF, "s3://b/p", role)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        unload_statements(relations, 42, AS_OF, "/local/folder", role)


# -- settings ---------------------------------------------------------------------------------
def test_export_settings(tmp_path):
    for mapping in (EXPORT_METHODS, DEFAULT_EXPORT_URIS):
        assert set(mapping) == set(ENVIRONMENTS)
    assert {"EXPORT_URI", "EXPORT_UNLOAD_IAM_ROLE_ARN"} <= set(REQUIRED_VARIABLES["prod"])
    none = str(tmp_path / "none.env")
    local = load_settings({"PLATFORM_ENV_FILE": none, "LOCAL_DIR": str(tmp_path)})
    assert local.export_uri == f"{tmp_path}/exports" and local.export_method == "duckdb_copy"
    prod = load_settings({"PLATFORM_ENV": "prod"})
    with pytest.raises(ConfigurationError, match="EXPORT_URI is not set; PLATFORM_ENV=prod"):
        _ = prod.export_uri
    with pytest.raises(ConfigurationError, match="EXPORT_URI.*S3 only"):
        _ = load_settings({"PLATFORM_ENV": "prod", "EXPORT_URI": "/data/exports"}).export_uri
    with pytest.raises(ConfigurationError, match="EXPORT_URI"):
        _ = load_settings({"PLATFORM_ENV_FILE": none, "EXPORT_URI": "http://example.com/x"}).export_uri
    with pytest.raises(ConfigurationError, match="EXPORT_S3_USE_SSL"):
        ExportTarget.from_settings(load_settings({"PLATFORM_ENV_FILE": none, "EXPORT_URI": "s3://b/p",
                                                  "EXPORT_S3_USE_SSL": "maybe"}))


# -- dashboards ---------------------------------------------------------------------------------
def test_a_dashboard_is_refreshed_when_its_stalest_mart_is_rebuilt():
    a, b = dg.AssetKey(["marts", "a"]), dg.AssetKey(["marts", "b"])
    dashboard = Dashboard(
        key=dg.AssetKey(["dashboards", "d"]), name="d", url="https://bi.example.com/d", owner=None,
        maturity="high", deps=(a, b), marts=(a, b),
        policy=dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(hours=24)), description="d",
    )
    with dg.DagsterInstance.ephemeral() as instance:
        def build(key):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key))

        def record():
            events = dashboard_refreshes(instance, [dashboard])
            for e in events:
                instance.report_runless_asset_event(e)
            return events

        build(a)
        assert record() == []  # b never built: nothing to show
        build(b)
        (first,) = record()
        assert first.metadata[DATA_AS_OF].value == instance.get_latest_materialization_event(a).timestamp
        assert record() == []
        build(b)  # the newer mart again: the dashboard's data is still as old as a
        assert record() == []
        build(a)
        (second,) = record()
        assert second.metadata[DATA_AS_OF].value == instance.get_latest_materialization_event(b).timestamp
        assert re.fullmatch(r"https://bi\.example\.com/d", second.metadata["url"].value)
