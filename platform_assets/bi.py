"""The BI copy of the local warehouse as an asset: `bi/warehouse_copy` (local target only).

Superset never opens the DuckDB file dbt writes (one writer, and no reader while it writes);
it reads a copy of the relations its dashboards use, published by rename after the reporting
models refresh (bi/warehouse_copy.py). The copy is an asset downstream of those relations,
in the `warehouse` pool (so it never reads the file while dbt writes it), and automation
republishes it after each upstream refresh. On `pg` and `prod` Superset reads the warehouse
itself (dbt's zero-downtime swap), so there is no copy there.
"""

import sys
from pathlib import Path

import dagster as dg

from .dbt_assets import WAREHOUSE_POOL
from .resources import WarehouseResource
from .settings import REPO_ROOT, PlatformSettings

COPY_KEY = dg.AssetKey(["bi", "warehouse_copy"])


def copy_path(duckdb_path: str) -> Path:
    """Beside the warehouse file: `.local/bi/warehouse_bi.duckdb` for make demo / make bi."""
    return Path(duckdb_path).resolve().parent / "bi" / "warehouse_bi.duckdb"


def bi_package():
    """The repository's `bi` package (dashboards as code, Superset's API). It is not installed:
    a process started elsewhere than the repository root (a README command in another folder,
    a run worker) finds it beside platform_assets; the image copies it there too."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    import bi.dashboards
    import bi.superset_api

    return bi


def bi_definitions(settings: PlatformSettings, own_sensor: bool = True) -> dg.Definitions:
    """The copy asset (local only); `own_sensor` False when the dashboards' automation sensor
    evaluates it too (so the dashboards refresh in the copy's run, after it)."""
    if settings.env != "local":
        return dg.Definitions()
    dashboards = bi_package().dashboards

    relations = dashboards.relations()

    @dg.asset(
        key=COPY_KEY,
        deps=[dg.AssetKey([schema, name]) for schema, name in relations],
        group_name="bi",
        kinds={"duckdb", "superset"},
        pool=WAREHOUSE_POOL,
        automation_condition=dg.AutomationCondition.eager(),
        description="A read-only copy of the relations the Superset dashboards read, published by "
        "rename after they refresh: Superset never opens the file dbt writes.",
    )
    def warehouse_copy(warehouse: WarehouseResource) -> dg.MaterializeResult:
        from bi.warehouse_copy import publish_copy

        source = Path(warehouse.duckdb_path)
        dest = copy_path(str(source))
        mtime = str(source.stat().st_mtime_ns)
        rows = publish_copy(source, dest, relations)
        dest.with_suffix(".source-mtime").write_text(mtime)  # `make bi` then sees it is current
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(dest)),
            "rows": dg.MetadataValue.json(rows),
            "dagster/row_count": sum(rows.values()),
        })

    sensor = dg.AutomationConditionSensorDefinition(
        "bi_copy_automation", target=[COPY_KEY], default_status=dg.DefaultSensorStatus.RUNNING,
        description="Republishes the BI copy after the reporting models it holds refresh.",
    )
    return dg.Definitions(assets=[warehouse_copy], sensors=[sensor] if own_sensor else [])
