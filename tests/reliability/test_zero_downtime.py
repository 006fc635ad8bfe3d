"""Zero downtime on the `pg` target: while `dbt run --full-refresh` rebuilds every model,
readers on connections of their own query every mart and every reporting view in a loop;
not one read fails, comes back empty or returns a partial result (each read equals the
state before or after the refresh; the data does not change in between).

dbt-postgres swaps a rebuilt relation in by rename and drops the old one with
`drop ... cascade`, which took the reporting views over the marts down until dbt rebuilt
them (hundreds of failed reads per refresh); dbt/macros/zero_downtime_swap.sql re-points
those views in the drop's transaction instead.
"""

from __future__ import annotations

import time

import psycopg

from .conftest import catch_up
from .warehouse_readers import ReaderLoop, relation_columns, relation_states, warehouse_url


def test_readers_see_no_gap_during_a_full_refresh_on_pg(dbt_scenario, pg_env):
    catch_up(dbt_scenario, pg_env, "pg")
    runner = dbt_scenario.runners["pg"]
    url = warehouse_url(runner.env)
    with psycopg.connect(url, autocommit=True) as conn:
        columns = relation_columns(conn)
        before = relation_states(conn, columns)
    assert {r.split(".")[0] for r in columns} == {"marts", "reporting"}
    assert all(count > 0 for count, _ in before.values()), before

    readers = ReaderLoop(url, columns, threads=4).start()
    time.sleep(0.5)  # readers are going before the refresh starts
    try:
        result = runner("run", "--full-refresh", check=False)
        time.sleep(0.5)  # ... and after it ended
    finally:
        readers.stop()
    assert result.ok, result.describe()
    statuses = result.statuses()
    rebuilt = [u for u, s in statuses.items() if u.startswith("model.") and s == "success"]

    with psycopg.connect(url, autocommit=True) as conn:
        after = relation_states(conn, columns)
        leftovers = conn.execute(
            "select relname from pg_class where relname like '%%\\_\\_dbt\\_%%'").fetchall()
    figures = readers.judge(before, after)
    print(f"\nzero downtime [pg]: full refresh of {len(rebuilt)} models in {result.seconds:.1f}s; "
          f"{figures['reads']} reads of {figures['relations']} relations "
          f"(at least {figures['min_reads_per_relation']} each, slowest {figures['max_read_seconds']}s): "
          f"{figures['errors']} errors, {figures['empty']} empty, {figures['partial']} partial")
    # The data did not change in between: every relation has the same rows after.
    assert {r: s[0] for r, s in after.items()} == {r: s[0] for r, s in before.items()}
    assert figures["errors"] == 0, figures["examples"]
    assert figures["empty"] == 0, figures["examples"]
    assert figures["partial"] == 0, figures["examples"]
    assert figures["min_reads_per_relation"] > 0
    assert not leftovers, leftovers
