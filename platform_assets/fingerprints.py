"""Per-day fingerprints of the lesson events: what the daily facts should hold (on the
replica) against what they hold (in the warehouse).

A day's fingerprint is three exact integers: its row count, and the sums of x and of x²,
where x is a row's hash: every column `fct_lesson_events` copies from the source (the user's
current company and the lesson's current course included, models/marts/_marts.yml), each
taken modulo the prime M = 2³¹-1, multiplied by its own constant and summed modulo M. An
integer enters by two parts, v mod M and (v div M) mod M, each with its own constant, so
that non-negative ids M apart (a user moving from company 1 to company 2³¹), or any
multiple of M below M², are told apart; seconds are offset by 2³¹ first, so that no two of
them fall on either side of zero M apart. Timestamps enter as epoch microseconds, by their
residue alone (a second part would evaluate the conversion twice in the replica's query):
times a multiple of 2147.483647 s apart look the same, which no ordinary edit produces.
`event_type` enters by its allowed value, null as a constant (the same as the value
1,234,567). Plain 64-bit integer arithmetic that never overflows, so PostgreSQL (the replica
and the pg warehouse), DuckDB and Redshift compute the same numbers for the same rows, and a
sum does not depend on how the rows are stored. x² makes it sensitive to which row holds
which value (a value swapped between two rows changes it), not only to column totals.

A late insert of any age, an edit of any of those columns (with or without an `updated_at`
bump), a hard delete, a user moving company or a lesson moving course changes the
fingerprint of exactly the days whose rows they touch, but for the odds of a 31-bit hash:
for any value some others, without structure, give the same term (company 100 and
4,037,066,907), so a change goes unseen with a probability of about one in M per row. It is
not cryptographic: a change built to cancel out could go unseen (docs/change-detection.md).

Md5 of each row's text was the first design: 2.5x the replica's time of the hash with one
part per value, at 8M events. Nothing is trusted but the two sides' contents: a day is
refreshed while its fingerprints differ, whatever ran, failed or was counted as done in
between. Each side is one aggregate query, run where the data is (the replica computes its
own side).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime

from psycopg import sql

M = 2_147_483_647
NULL_VALUE = 1_234_567
# fct_lesson_events' source columns and the two it takes from users and lessons, each with
# its multiplier (distinct primes below 2**30, so no product overflows 64 bits).
COLUMNS = (
    ("event_id", 1_000_003), ("user_id", 999_983), ("lesson_id", 998_244_353), ("event_type", 97),
    ("seconds_spent", 1_000_033), ("occurred_at", 1_000_037), ("created_at", 1_000_039),
    ("company_id", 1_000_081), ("course_id", 1_000_099),
)
TIMESTAMP_COLUMNS = {"occurred_at", "created_at"}
# the multipliers of the integers' high parts (v div M)
HIGH_PART = {"event_id": 1_000_117, "user_id": 1_000_121, "lesson_id": 1_000_133, "seconds_spent": 1_000_151,
             "company_id": 1_000_159, "course_id": 1_000_171}
EVENT_TYPES = ("started", "progress", "completed")


@dataclass(frozen=True)
class Fingerprint:
    rows: int
    sum_x: int
    sum_x2: int
    # warehouse only: fct_daily_learning_activity's totals for the day agree with the fact's
    daily_consistent: bool = True

    @property
    def contents(self) -> tuple[int, int, int]:
        return self.rows, self.sum_x, self.sum_x2


def _as_integer(column: str, dialect: str) -> str:
    if column in TIMESTAMP_COLUMNS:
        return {
            # exact: a double holds epoch seconds to well under half a microsecond
            "postgres": f"cast(round(date_part('epoch', {column}) * 1000000) as bigint)",
            "duckdb": f"epoch_us({column})",
            "redshift": f"datediff(microsecond, cast('1970-01-01' as timestamp), {column})",
        }[dialect]
    if column == "event_type":
        cases = " ".join(f"when '{v}' then {i}" for i, v in enumerate(EVENT_TYPES, start=1))
        return f"case {column} {cases} else 1000 + length({column}) end"
    if column == "seconds_spent":  # an integer: never negative once offset
        return f"(cast({column} as bigint) + cast(2147483648 as bigint))"
    return f"cast({column} as bigint)"


def _term(column: str, k: int, dialect: str) -> str:
    value = _as_integer(column, dialect)
    if column not in HIGH_PART:
        return f"coalesce({value} % {M}, {NULL_VALUE}) * {k} % {M}"
    div = "//" if dialect == "duckdb" else "/"  # truncating integer division on every engine
    return (f"coalesce(({value} % {M}) * {k} + (({value} {div} {M}) % {M}) * {HIGH_PART[column]},"
            f" {NULL_VALUE * k % M}) % {M}")


def row_hash(dialect: str) -> str:
    """x for one row (column names as in fct_lesson_events), in (-M, M)."""
    return "((" + " + ".join(_term(c, k, dialect) for c, k in COLUMNS) + f") % {M})"


def _sums(x: str, dialect: str) -> str:
    square = f"cast({x} * {x} as decimal(38, 0))" if dialect == "redshift" else f"{x} * {x}"
    return f"sum({x}) as sum_x, sum({square}) as sum_x2"


def _window(column: str, start: date | None, end: date | None) -> str:
    parts = []
    if start is not None:
        parts.append(f"{column} >= cast('{start.isoformat()}' as timestamp)")
    if end is not None:
        parts.append(f"{column} < cast('{end.isoformat()}' as timestamp)")
    return " and ".join(parts)


def _received(column: str, received_before: datetime | None) -> str:
    if received_before is None:
        return ""
    return f"{column} < cast('{received_before.strftime('%Y-%m-%d %H:%M:%S.%f')}' as timestamp)"


def _where(*conditions: str) -> str:
    present = [c for c in conditions if c]
    return (" where " + " and ".join(present)) if present else ""


def _same(a: str, b: str) -> str:
    """Null-safe equality (Redshift has no `is not distinct from`)."""
    return f"({a} = {b} or ({a} is null and {b} is null))"


def replica_query(schema: str, start: date | None = None, end: date | None = None,
                  received_before: datetime | None = None) -> sql.Composed:
    """(day, rows, sum x, sum x²) per day of the replica's events, in [start, end) when given,
    of the events received (created_at) before `received_before` when given."""
    return sql.SQL(
        "select day::text, count(*), " + _sums("x", "postgres") + " from ("
        " select cast(occurred_at as date) as day, " + row_hash("postgres") + " as x from ("
        "  select e.event_id, e.user_id, e.lesson_id, e.event_type, e.seconds_spent, e.occurred_at,"
        "   e.created_at, u.company_id, l.course_id"
        "  from {events} e left join {users} u on u.user_id = e.user_id"
        "  left join {lessons} l on l.lesson_id = e.lesson_id{where}) as events) as hashed"
        " group by day"
    ).format(
        events=sql.Identifier(schema, "lesson_events"),
        users=sql.Identifier(schema, "users"),
        lessons=sql.Identifier(schema, "lessons"),
        where=sql.SQL(_where(_window("e.occurred_at", start, end), _received("e.created_at", received_before))),
    )


def warehouse_query(dialect: str, fact: str, daily: str | None, start: date | None = None,
                    end: date | None = None, received_before: datetime | None = None) -> str:
    """(day, rows, sum x, sum x², daily_consistent) per day of fct_lesson_events (`fact`,
    `daily`: quoted relation names). daily_consistent: fct_daily_learning_activity's events,
    seconds and company/course attribution for the day add up to the fact's (a run that
    failed between the two models leaves them apart, and the day is refreshed again). With
    `received_before`, the fingerprint counts only the events received before it (the
    consistency with the daily activity is over all of them). Without `daily`, every day
    counts as consistent."""
    big = "decimal(38, 0)"
    received = _received("created_at", received_before) or "1 = 1"
    x = f"case when {received} then x end"
    consistent = " and ".join(_same(f"fact.{c}", f"daily.{c}") for c in ("n", "seconds", "companies", "courses"))
    if daily is None:  # no activity table: an empty one, every day consistent
        consistent = "1 = 1"
        daily_rows = (f"select cast(null as date) as day, cast(null as {big}) as n, cast(null as {big}) as seconds,"
                      f" cast(null as {big}) as companies, cast(null as {big}) as courses from {fact} where 1 = 0")
    else:
        daily_rows = f"""select activity_date as day, sum(cast(events as {big})) as n,
           sum(cast(learning_seconds as {big})) as seconds,
           sum(cast(coalesce(company_id, 0) as {big}) * events) as companies,
           sum(cast(coalesce(course_id, 0) as {big}) * events) as courses
    from {daily}{_where(_window("activity_date", start, end))}
    group by activity_date"""
    return f"""
with fact as (
    select day, count(*) as n, sum(case when {received} then 1 else 0 end) as received_n,
           {_sums(x, dialect)},
           sum(cast(seconds_spent as {big})) as seconds,
           sum(cast(coalesce(company_id, 0) as {big})) as companies,
           sum(cast(coalesce(course_id, 0) as {big})) as courses
    from (select cast(occurred_at as date) as day, created_at, seconds_spent, company_id, course_id,
                 {row_hash(dialect)} as x
          from {fact}{_where(_window("occurred_at", start, end))}) as hashed
    group by day
),
daily as (
    {daily_rows}
)
select cast(coalesce(fact.day, daily.day) as varchar) as day, coalesce(fact.received_n, 0),
       coalesce(fact.sum_x, 0), coalesce(fact.sum_x2, 0), case when {consistent} then 1 else 0 end
from fact full outer join daily on daily.day = fact.day
"""


def as_fingerprints(rows: Iterable[tuple]) -> dict[str, Fingerprint]:
    out = {}
    for row in rows:
        day = str(row[0])[:10]
        consistent = bool(int(row[4])) if len(row) > 4 else True
        out[day] = Fingerprint(int(row[1]), int(row[2] or 0), int(row[3] or 0), consistent)
    return out


def differing_days(replica: Mapping[str, Fingerprint], warehouse: Mapping[str, Fingerprint]) -> list[str]:
    """Days whose contents differ, or whose daily activity disagrees with the fact."""
    empty = Fingerprint(0, 0, 0)
    return sorted(
        d for d in set(replica) | set(warehouse)
        if replica.get(d, empty).contents != warehouse.get(d, empty).contents
        or not warehouse.get(d, empty).daily_consistent
    )


def day_ranges(days: Iterable[str], max_gap_days: int) -> list[tuple[str, str]]:
    """Sorted days as inclusive (first, last) ranges, merging ranges at most `max_gap_days`
    unchanged days apart: rebuilding a few unchanged days costs less than another run."""
    ranges: list[list[date]] = []
    for day in sorted({date.fromisoformat(d) for d in days}):
        if ranges and (day - ranges[-1][1]).days - 1 <= max_gap_days:
            ranges[-1][1] = day
        else:
            ranges.append([day, day])
    return [(a.isoformat(), b.isoformat()) for a, b in ranges]
