"""`bi/warehouse_copy` as a Dagster asset (local target): downstream of exactly the relations
the dashboards read, in the warehouse pool, automated, and materializing it publishes the
copy beside the warehouse file with the same rows."""

from __future__ import annotations

import dagster as dg
import duckdb

from bi import dashboards
from platform_assets.bi import COPY_KEY, copy_path
from platform_assets.dbt_assets import WAREHOUSE_POOL

from ..platform.conftest import platform_under_test


def test_the_copy_is_an_asset_that_publishes_what_the_dashboards_read(bi_stack, pg_env, tmp_path):
    overrides = {"DUCKDB_PATH": str(bi_stack.warehouse)}
    with platform_under_test(pg_env, tmp_path, "local", overrides) as put:
        graph = put.defs.resolve_asset_graph()
        node = graph.get(COPY_KEY)
        assert {k.to_user_string() for k in node.parent_keys} == {
            f"{schema}/{name}" for schema, name in dashboards.relations()}
        assert node.automation_condition is not None
        assert put.defs.resolve_sensor_def("bi_copy_automation") is not None
        copy_def = put.defs.resolve_assets_def(COPY_KEY)
        assert copy_def.get_op_def_for_asset_key(COPY_KEY).pool == WAREHOUSE_POOL

        result = dg.materialize([copy_def], instance=put.instance, selection=[COPY_KEY])
        assert result.success
        meta = result.asset_materializations_for_node(copy_def.node_def.name)[0].metadata

    dest = copy_path(str(bi_stack.warehouse))
    assert dest == bi_stack.warehouse.parent / "bi" / "warehouse_bi.duckdb"
    source = duckdb.connect(str(bi_stack.warehouse), read_only=True)
    copy = duckdb.connect(str(dest), read_only=True)
    try:
        for schema, name in dashboards.relations():
            q = f"select count(*) from {schema}.{name}"
            assert copy.execute(q).fetchone() == source.execute(q).fetchone(), (schema, name)
    finally:
        source.close()
        copy.close()
    assert meta["dagster/row_count"].value == sum(meta["rows"].value.values())
