"""The per-day fingerprint's row hash (platform_assets/fingerprints.py), attacked directly:
PostgreSQL (the replica) and DuckDB compute the same x for the same rows, whatever the
values (ids up to 2⁶³-1, negative seconds, nulls, microseconds), and a row whose one column
changes gets another x: an integer moved by 1, by M or by a multiple of M below M², or off
by one from it; a time moved by a microsecond or an hour. (A time moved by a multiple of M
microseconds, and the unstructured collisions of a 31-bit hash, are the documented blind
spots: not tried.)"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from platform_assets.fingerprints import COLUMNS, EVENT_TYPES, M, row_hash

BIGINT = st.integers(1, 2**63 - 1)
ROW = st.fixed_dictionaries({
    "event_id": BIGINT, "user_id": BIGINT, "lesson_id": BIGINT,
    "event_type": st.sampled_from([*EVENT_TYPES, "unknown"]),
    "seconds_spent": st.integers(-(2**31), 2**31 - 1),
    # 2000-2040: where a double holds epoch microseconds exactly (PostgreSQL's date_part)
    "occurred_at": st.datetimes(datetime(2000, 1, 1), datetime(2040, 1, 1)),
    "created_at": st.datetimes(datetime(2000, 1, 1), datetime(2040, 1, 1)),
    "company_id": st.none() | BIGINT, "course_id": st.none() | BIGINT,
})
NAMES = [c for c, _ in COLUMNS]
TYPES = {"event_type": "varchar", "seconds_spent": "integer", "occurred_at": "timestamp",
         "created_at": "timestamp"}
DDL = "create temporary table rows_under_test (n integer, " + ", ".join(
    f"{c} {TYPES.get(c, 'bigint')}" for c in NAMES) + ")"
INSERT = f"insert into rows_under_test values (%s{', %s' * len(NAMES)})"
SELECT = "select n, {x} as x from rows_under_test order by n"


def _moved(row: dict, column: str, delta: int) -> dict | None:
    """`row` with `column` moved by `delta` (in its own unit), if that stays in range."""
    value = row[column]
    if value is None or column == "event_type":
        return None
    if column in ("occurred_at", "created_at"):  # microseconds
        try:
            moved = value + timedelta(microseconds=delta)
        except OverflowError:
            return None
        return {**row, column: moved} if datetime(2000, 1, 1) <= moved < datetime(2040, 1, 1) else None
    moved = value + delta
    low, high = (-(2**31), 2**31 - 1) if column == "seconds_spent" else (1, 2**63 - 1)
    return {**row, column: moved} if low <= moved <= high else None


@pytest.fixture(scope="module")
def engines(pg_env):
    pg = pg_env.primary()
    pg.execute(DDL)
    duck = duckdb.connect()
    duck.execute(DDL)
    yield pg, duck
    pg.close()
    duck.close()


def _hashes(engines, rows: list[dict]) -> tuple[list[int], list[int]]:
    pg, duck = engines
    values = [(n, *(r[c] for c in NAMES)) for n, r in enumerate(rows)]
    out = []
    for con, dialect, insert in ((pg, "postgres", INSERT), (duck, "duckdb", INSERT.replace("%s", "?"))):
        con.execute("delete from rows_under_test")
        (con if dialect == "duckdb" else con.cursor()).executemany(insert, values)
        out.append([int(x) for _, x in con.execute(SELECT.format(x=row_hash(dialect))).fetchall()])
    return out[0], out[1]


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(row=ROW, column=st.sampled_from(NAMES), multiple=st.integers(1, 2**31 - 2),
       nudge=st.sampled_from([0, 1, -1]), others=st.lists(ROW, max_size=4))
def test_row_hash_agrees_across_engines_and_sees_every_change(engines, row, column, multiple, nudge, others):
    timestamp = column in ("occurred_at", "created_at")
    changed = [r for r in (
        # M apart (and many M), or off by one from it
        None if timestamp and not nudge else _moved(row, column, multiple * M + nudge),
        None if timestamp and not nudge else _moved(row, column, -multiple * M + nudge),
        None if timestamp else _moved(row, column, M), _moved(row, column, 1),
        _moved(row, column, 3_600_000_000) if timestamp else None,
        {**row, "event_type": next(t for t in [*EVENT_TYPES, "unknown"] if t != row["event_type"])},
        {**row, column: None} if column in ("company_id", "course_id") and row[column] is not None else None,
    ) if r is not None]
    on_pg, on_duckdb = _hashes(engines, [row, *changed, *others])
    assert on_pg == on_duckdb
    assert all(-M < x < M for x in on_pg)
    for variant, x in zip(changed, on_pg[1:], strict=False):
        assert x != on_pg[0], f"{column}: {row[column]} -> {variant[column]} leaves x at {x}"
