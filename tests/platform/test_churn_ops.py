"""The churn generator itself (tests/platform/churn.py): every kind of change it makes reaches
the source. A change that silently matches nothing (a filter no row meets, a constraint
swallowed by `on conflict`) would leave the churn property untested for that kind."""

from __future__ import annotations

from psycopg import sql

from .churn import EVERY_KIND, TABLES, apply, copy_schema, drop_churn_objects


def _contents(conn, schema: str) -> dict[str, str]:
    return {table: conn.execute(sql.SQL("select md5(coalesce(string_agg(r::text, ',' order by r::text), ''))"
                                        " from {} r").format(sql.Identifier(schema, table))).fetchone()[0]
            for table in TABLES}


def test_every_kind_of_change_reaches_the_source(pg_env):
    schema = "churn_ops"
    copy_schema(pg_env, schema)
    try:
        unchanged = []
        with pg_env.primary() as conn:
            for op in EVERY_KIND:
                before = _contents(conn, schema)
                with conn.transaction():
                    apply(conn, schema, op)
                if _contents(conn, schema) == before:
                    unchanged.append(op)
        assert not unchanged, f"these changed nothing: {unchanged}"
    finally:
        drop_churn_objects(pg_env, schema, [])
