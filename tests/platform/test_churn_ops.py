"""The churn generator itself (tests/platform/churn.py): every change it makes reaches the
source. A change that silently matches nothing (a filter no row meets, an edit to the value a
row already holds) would leave the churn property untested for that kind. `updated_at` is
left out of the comparison (a bump alone is not the change a kind is named for), but for
the kind that moves an `updated_at` itself."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from psycopg import sql

from .churn import EVERY_KIND, OPS, TABLES, apply, copy_schema, drop_churn_objects

SCHEMA = "churn_ops"


def _contents(conn, ignored: str) -> dict[str, str]:
    out = {}
    for table in TABLES:
        columns = [sql.Identifier(c) for (c,) in conn.execute(
            "select column_name from information_schema.columns where table_schema = %s and table_name = %s"
            " and column_name <> %s order by ordinal_position", (SCHEMA, table, ignored))]
        row = sql.SQL("row({})::text").format(sql.SQL(", ").join(columns))
        out[table] = conn.execute(sql.SQL("select md5(coalesce(string_agg({r}, ',' order by {r}), '')) from {t}")
                                  .format(r=row, t=sql.Identifier(SCHEMA, table))).fetchone()[0]
    return out


def _changes(conn, op) -> bool:
    ignored = "" if op[0] == "shift_time" and op[2] == "updated_at" else "updated_at"
    before = _contents(conn, ignored)
    with conn.transaction():
        apply(conn, SCHEMA, op)
    return _contents(conn, ignored) != before


def _may_change_nothing(op) -> bool:
    """The kinds whose random draws may legitimately change nothing: an insert of an
    enrollment, membership or hostile company that exists already, an event's time moved
    against the bound it sits on, a restore when no user is deleted. Their entries in
    EVERY_KIND are held to a change like every other kind's."""
    return (op[0] in ("insert_enrollment", "restore_user", "hostile_company")
            or (op[0] == "membership" and op[3] == "join")
            or (op[0] == "edit_event" and op[2] in ("occurred_at", "created_at")))


def test_every_kind_of_change_reaches_the_source(pg_env):
    copy_schema(pg_env, SCHEMA)
    try:
        with pg_env.primary() as conn:
            unchanged = [op for op in EVERY_KIND if not _changes(conn, op)]
            assert not unchanged, f"these changed nothing: {unchanged}"

            @settings(max_examples=60, derandomize=True, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
            @given(op=OPS)
            def every_generated_change(op):
                assert _changes(conn, op) or _may_change_nothing(op), f"{op} changed nothing"

            every_generated_change()
    finally:
        drop_churn_objects(pg_env, SCHEMA, [])
