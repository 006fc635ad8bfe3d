"""One real BI stack for the session: the dbt project built on DuckDB against the session's
replica, two companies' exports written by the platform's writer, the BI copy published,
a real Superset (gunicorn from .venv-superset, SQLite metadata in a temp folder) with the
dashboards imported, and the real portal (`python -m bi serve`), both on free ports.
tests/bi/test_portal.py does not use it: it serves exports only, from its own portal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from bi import dashboards
from bi.dashboards import Provisioned
from bi.local import SUPERSET_VENV, PortalServer, SupersetServer, ensure_portal_account, provision
from bi.portal import write_accounts
from bi.superset_api import SupersetClient
from bi.warehouse_copy import publish_copy
from platform_assets.export_writers import ExportTarget, duckdb_exporter

from ..conftest import free_port
from ..dbt.dbt_cli import DbtRunner, dbt_env


@dataclass
class BiStack:
    folder: Path
    warehouse: Path  # the file dbt writes
    copy: Path  # the BI copy Superset reads
    dbt: DbtRunner
    superset: SupersetServer
    portal: PortalServer
    client: SupersetClient
    provisioned: Provisioned
    accounts: dict[str, str]  # user -> password
    companies: list[int]  # the two companies with accounts, A first

    def publish(self) -> dict[str, int]:
        return publish_copy(self.warehouse, self.copy, dashboards.relations())

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        """A read of the warehouse dbt built (the marts themselves, not the BI copy)."""
        con = duckdb.connect(str(self.warehouse), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def user(self, company_id: int) -> tuple[str, str]:
        name = f"company-{company_id}"
        return name, self.accounts[name]


@pytest.fixture(scope="session")
def bi_stack(pg_env, tmp_path_factory) -> Iterator[BiStack]:
    if not (SUPERSET_VENV / "bin" / "gunicorn").exists():
        pytest.fail(f"{SUPERSET_VENV} is missing: `make venv` installs Superset from "
                    "bi/superset/requirements-superset.txt")
    folder = tmp_path_factory.mktemp("bi")
    warehouse = folder / "warehouse.duckdb"
    runner = DbtRunner("local", dbt_env(pg_env.environ(), DUCKDB_PATH=str(warehouse)), folder / "dbt")
    (folder / "dbt").mkdir()
    runner("build", "--exclude-resource-type", "test", "unit_test")

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        # two companies with enrollments and activity: A and B
        companies = [r[0] for r in con.execute(
            "select company_id from reporting.rpt_company_training_overview where enrollments > 0 "
            "and learning_hours_30d > 0 order by company_id limit 2").fetchall()]
    finally:
        con.close()
    assert len(companies) == 2, companies
    exports = folder / "exports"
    relations = {"fct_enrollments": ("marts", "fct_enrollments"), "dim_companies": ("marts", "dim_companies"),
                 "dim_courses": ("marts", "dim_courses")}
    with duckdb_exporter([f"ATTACH '{warehouse}' AS wh (READ_ONLY)"], relations,
                         ExportTarget(root=str(exports))) as export:
        for cid in companies:
            export(cid, datetime.now(UTC))

    home = folder / "superset"
    home.mkdir()
    portal_port = free_port()
    portal_origin = f"http://127.0.0.1:{portal_port}"
    superset = SupersetServer(home, free_port(), portal_origins=(portal_origin,), threads=16)
    copy = home / "warehouse_bi.duckdb"
    publish_copy(warehouse, copy, dashboards.relations())
    started = time.monotonic()
    superset.start(timeout=240)
    print(f"\nsuperset initialised and serving in {time.monotonic() - started:.1f}s")
    portal = PortalServer(folder / "portal", portal_port, superset, str(exports))
    try:
        client, provisioned = provision(superset, copy, [portal_origin])
        assert ensure_portal_account(superset, client)  # as `python -m bi up` does
        accounts = write_accounts(portal.home, companies)
        portal.start()
        yield BiStack(folder=folder, warehouse=warehouse, copy=copy, dbt=runner, superset=superset, portal=portal,
                      client=client, provisioned=provisioned, accounts=accounts, companies=companies)
    finally:
        portal.stop()
        superset.stop()
        (home / "superset.db").unlink(missing_ok=True)
