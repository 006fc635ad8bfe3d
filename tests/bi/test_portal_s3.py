"""The portal's export API over S3, as production keeps the exports (Redshift UNLOAD), against
moto's S3 server: the platform's own exporter writes through DuckDB's httpfs, an UNLOAD-named
object (`training_report_000.*`, no Parquet key/value metadata) replaces one company's, and
the real portal (`python -m bi serve`) serves each company its newest object byte-for-byte
with its as-of time, refuses the rest, and answers 503 while S3 does not."""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import boto3
import duckdb
import pytest
import requests
from moto.server import ThreadedMotoServer

from bi.export_store import (
    CSV_HEAD_BYTES,
    ExportChanged,
    LocalExports,
    _csv_first_row_as_of,
    export_store,
    open_export,
)
from bi.portal import write_accounts
from platform_assets.export_writers import ExportTarget, duckdb_exporter, relations_from_manifest

from ..conftest import free_port, reset_moto
from ..platform.test_exports import AS_OF, MANIFEST, _company_ids, build_warehouse
from .test_portal import _raw_get, start_portal, wait_for_portal

BUCKET = "customer-exports"
ROOT = f"s3://{BUCKET}/exports/v1"
LATER = "2026-03-02T07:45:00+00:00"  # the as-of time of the UNLOAD-named objects
NEWER = "2026-03-03T08:00:00+00:00"  # of the exports written while the portal reads


def _unload_like(source: str, dest: str, fmt: str) -> None:
    """A company's report as UNLOAD writes it: the same columns, this time's as-of in the
    data_as_of column, no key/value metadata."""
    con = duckdb.connect()
    try:
        con.execute(f"COPY (select * replace (cast('{LATER[:19].replace('T', ' ')}' as timestamp) as data_as_of)"
                    f" from read_parquet(?)) TO '{dest}' (FORMAT {fmt}{', HEADER true' if fmt == 'csv' else ''})",
                    [source])
    finally:
        con.close()


def report_bytes(company_id: int, name: str, as_of: str, ext: str) -> bytes:
    """A one-row report as UNLOAD writes it (as-of in the data_as_of column), as bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"report.{ext}"
        con = duckdb.connect()
        try:
            con.execute(f"COPY (select {int(company_id)} as company_id, '{name}' as company_name,"
                        f" cast('{as_of[:19]}' as timestamp) as data_as_of) TO '{path}'"
                        f" (FORMAT {ext}{', HEADER true' if ext == 'csv' else ''})")
        finally:
            con.close()
        return path.read_bytes()


class Racing:
    """The real store, with a new export of `key` landing on S3 right after each of its first
    `replacements` descriptions: a writer racing the portal."""

    def __init__(self, store, s3, key: str, replacements: int):
        self.store, self.s3, self.key, self.left = store, s3, key, replacements
        self.etags: list[str] = []
        self.last = b""

    def find(self, company_id: int, name: str):
        found = self.store.find(company_id, name)
        if self.left:
            self.left -= 1
            self.last = report_bytes(company_id, f"new {self.left}", NEWER, name.rsplit(".", 1)[1])
            put = self.s3.put_object(Bucket=BUCKET, Key=self.key, Body=self.last)
            self.etags.append(put["ETag"].strip('"'))
        return found

    def open(self, found):
        return self.store.open(found)


def test_exports_on_s3_are_served_to_their_company_only(tmp_path):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    process, running = None, True
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        reset_moto(endpoint)  # the worker's earlier moto servers left their buckets in its state
        s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)
        s3_env = {"EXPORT_URI": ROOT, "EXPORT_S3_ENDPOINT": endpoint, "EXPORT_S3_URL_STYLE": "path",
                  "EXPORT_S3_USE_SSL": "false", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_REGION": "us-east-1"}
        ids = _company_ids()
        a, b = ids[0], ids[-1]  # a small id and the largest bigint
        build_warehouse(tmp_path / "warehouse.duckdb", [a, b])
        target = ExportTarget(root=ROOT, s3_endpoint=endpoint, s3_url_style="path", s3_use_ssl=False,
                              s3_key_id="testing", s3_secret="testing")
        # A: an UNLOAD-named export older than the one DuckDB writes next (the newer one is served)
        for ext in ("csv", "parquet"):
            s3.put_object(Bucket=BUCKET, Key=f"exports/v1/company_id={a}/training_report_000.{ext}",
                          Body=b"an older export")
        time.sleep(1.1)  # S3 dates objects to the second (moto too)
        with duckdb_exporter([f"ATTACH '{tmp_path / 'warehouse.duckdb'}' AS wh (READ_ONLY)"],
                             relations_from_manifest(MANIFEST), target) as export:
            export(a, AS_OF)
            export(b, AS_OF)
        time.sleep(1.1)  # B: the UNLOAD-named objects are the newer ones
        plain = tmp_path / "b.parquet"
        s3.download_file(BUCKET, f"exports/v1/company_id={b}/training_report.parquet", str(plain))
        for ext in ("parquet", "csv"):
            _unload_like(str(plain), str(tmp_path / f"b_000.{ext}"), ext)
            key = f"exports/v1/company_id={b}/training_report_000.{ext}"
            s3.upload_file(str(tmp_path / f"b_000.{ext}"), BUCKET, key)
        # not a company: a stray object and a folder that is no company id
        s3.put_object(Bucket=BUCKET, Key="exports/v1/readme.txt", Body=b"x")
        s3.put_object(Bucket=BUCKET, Key="exports/v1/company_id=0/training_report.csv", Body=b"x")

        store = export_store(ROOT, s3_env)
        assert store.companies() == [a, b]

        home = tmp_path / "portal"
        passwords = write_accounts(home, [a, b])
        url_port = free_port()
        log = tmp_path / "portal.log"
        process = start_portal({**s3_env, "PORTAL_HOME": str(home), "PORTAL_PORT": str(url_port),
                                "PORTAL_SESSION_SECRET": "s" * 48}, log)
        url = f"http://127.0.0.1:{url_port}"
        wait_for_portal(url, process, log)

        def signed_in(company_id: int) -> requests.Session:
            session = requests.Session()
            user = f"company-{company_id}"
            r = session.post(f"{url}/login", data={"username": user, "password": passwords[user]},
                             allow_redirects=False, timeout=30)
            assert r.status_code == 303, r.text
            return session

        def stored(company_id: int, name: str) -> bytes:
            return s3.get_object(Bucket=BUCKET, Key=f"exports/v1/company_id={company_id}/{name}")["Body"].read()

        csv = "training_report.csv"
        assert requests.get(f"{url}/api/exports/{a}/{csv}", timeout=30).status_code == 401
        session = signed_in(a)
        for name in ("training_report.csv", "training_report.parquet"):
            with session.get(f"{url}/api/exports/{a}/{name}", stream=True, timeout=60) as r:
                assert r.status_code == 200, r.text
                assert r.content == stored(a, name)
                assert r.headers["X-Data-As-Of"] == AS_OF.isoformat()
                assert r.headers["Cache-Control"] == "private, no-store"
                assert f'filename="company_{a}_{name}"' in r.headers["content-disposition"]
        head = session.head(f"{url}/api/exports/{a}/{csv}", timeout=30)
        assert head.status_code == 200 and not head.content
        assert int(head.headers["content-length"]) == len(stored(a, csv))
        assert head.headers["X-Data-As-Of"] == AS_OF.isoformat()
        assert session.get(f"{url}/api/exports/{b}/{csv}", timeout=30).status_code == 403
        cookie = session.cookies["portal_session"]
        other = stored(b, "training_report_000.csv")  # what B is served
        for path in (f"/api/exports/{a}/../{b}/{csv}", f"/api/exports/{a}/..%2F{b}%2F{csv}",
                     f"/api/exports/{a}/training_report_000.csv", f"/api/exports/{a}/readme.txt",
                     f"/api/exports/{a}%2F..%2Fcompany_id={b}/{csv}", f"/api/exports/0{a}/{csv}"):
            status, body = _raw_get(url, path, cookie)
            assert status in (400, 403, 404), (path, status)
            assert other not in body, path

        # company B: the newer, UNLOAD-named objects, their as-of time from the rows themselves
        session_b = signed_in(b)
        for name in ("training_report.csv", "training_report.parquet"):
            r = session_b.get(f"{url}/api/exports/{b}/{name}", timeout=60)
            assert r.status_code == 200, r.text
            assert r.content == stored(b, name.replace(".", "_000.")) != stored(b, name)
            assert r.headers["X-Data-As-Of"] == LATER, name

        # An export replaced between its description and its body is described again, once; a
        # second replacement is ExportChanged (the route's 503), never the old as-of on new bytes.
        for ext in ("csv", "parquet"):
            name = f"training_report.{ext}"
            racing = Racing(store, s3, f"exports/v1/company_id={a}/{name}", replacements=1)
            found, body = open_export(racing, a, name)
            assert body.read() == stored(a, name) == racing.last and found.etag == f'"{racing.etags[-1]}"'
            body.close()
            assert found.as_of == NEWER  # the new bytes' own as-of
            with pytest.raises(ExportChanged):
                open_export(Racing(store, s3, f"exports/v1/company_id={a}/{name}", replacements=2), a, name)

        # the CSV as-of by a range read: a row after the first proves it whole; a first row
        # longer than the range says nothing
        big = "company_id,company_name,data_as_of\n" + f"{a},x,{LATER[:19]}\n" * 4000
        s3.put_object(Bucket=BUCKET, Key=f"exports/v1/company_id={a}/{csv}", Body=big.encode())
        assert len(big) > CSV_HEAD_BYTES and store.find(a, csv).as_of == LATER
        giant = ("company_id,company_name,data_as_of\n" + f"{a},{'x' * CSV_HEAD_BYTES},{LATER[:19]}\n"
                 + f"{a},y,{LATER[:19]}\n")  # read whole, it would give LATER
        s3.put_object(Bucket=BUCKET, Key=f"exports/v1/company_id={a}/{csv}", Body=giant.encode())
        assert store.find(a, csv).as_of is None
        assert open_export(store, a, csv, with_body=False)[1] is None  # HEAD: no body opened

        # a tie (the same second): UNLOAD's object, production's writer, is served
        for _ in range(5):
            for key in (f"company_id={b}/training_report.csv", f"company_id={b}/training_report_000.csv"):
                s3.put_object(Bucket=BUCKET, Key=f"exports/v1/{key}", Body=key.encode())
            dates = {o["LastModified"] for o in s3.list_objects_v2(
                Bucket=BUCKET, Prefix=f"exports/v1/company_id={b}/training_report")["Contents"]
                if o["Key"].endswith(".csv")}
            if len(dates) == 1:
                break
        assert len(dates) == 1, "no two puts in the same second in five tries"
        assert store.find(b, csv).key.endswith("training_report_000.csv")

        server.stop()  # S3 unreachable: the portal says so, it does not fail with a traceback
        running = False
        r = session.get(f"{url}/api/exports/{a}/{csv}", timeout=120)
        assert r.status_code == 503 and "try again later" in r.text
        assert "Traceback" not in log.read_text()
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        if running:
            server.stop()


def test_a_csv_first_row_cut_by_the_range_read_gives_no_as_of():
    header = "company_id,name,data_as_of\n"
    row = '1,"a\nb",2026-03-01 06:30:00\n'
    assert _csv_first_row_as_of(io.StringIO(header + row, newline=""), whole=True) == "2026-03-01 06:30:00"
    # the range ended inside the first row: its last field may be cut ("2026-03-01 06")
    assert _csv_first_row_as_of(io.StringIO(header + row[:-7], newline=""), whole=False) is None
    # a second row (even cut) proves the first one whole
    assert _csv_first_row_as_of(io.StringIO(header + row + "2,c", newline=""), whole=False) == "2026-03-01 06:30:00"
    assert _csv_first_row_as_of(io.StringIO(header, newline=""), whole=True) is None


def test_a_local_parquet_export_without_key_value_metadata_gives_its_column(tmp_path):
    """UNLOAD-like Parquet (no key/value metadata) in a local folder: the as-of of its rows."""
    build_warehouse(tmp_path / "warehouse.duckdb", [7])
    exports = tmp_path / "exports"
    with duckdb_exporter([f"ATTACH '{tmp_path / 'warehouse.duckdb'}' AS wh (READ_ONLY)"],
                         relations_from_manifest(MANIFEST), ExportTarget(root=str(exports))) as export:
        export(7, AS_OF)
    written = exports / "company_id=7" / "training_report.parquet"
    assert LocalExports(exports).find(7, "training_report.parquet").as_of == AS_OF.isoformat()
    _unload_like(str(written), str(tmp_path / "plain.parquet"), "parquet")
    (tmp_path / "plain.parquet").replace(written)
    assert LocalExports(exports).find(7, "training_report.parquet").as_of == LATER
