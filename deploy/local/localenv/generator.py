"""Deterministic demo data for the operational schema, generated in DuckDB, loaded with COPY.

Every random draw is a hash of (row number, purpose, seed), so the data depends only on the
seed, the scale and the period, never on thread scheduling: same inputs, same checksums.
Scale is set by the number of lesson events; everything else is derived from it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import psycopg

# Load order respects foreign keys (they are added after the load anyway).
TABLES = (
    "companies", "users", "teams", "team_memberships", "courses", "lessons",
    "enrollments", "lesson_events", "quiz_attempts", "certificates", "subscriptions",
)

REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-southeast", "sa-east"]
PLANS = ["starter", "team", "business", "enterprise"]
PLAN_PRICE_PER_SEAT = {"starter": 12, "team": 20, "business": 32, "enterprise": 45}
CATEGORIES = ["aws", "azure", "gcp", "kubernetes", "devops", "security", "data", "ai"]
N_COURSES = 64


@dataclass(frozen=True)
class Scale:
    events: int
    users: int
    companies: int
    courses: int
    enrollments_per_user: int = 3

    @classmethod
    def for_events(cls, events: int) -> Scale:
        users = max(60, events // 100)
        return cls(events=events, users=users, companies=max(6, users // 40), courses=N_COURSES)


def _us(ts: datetime) -> int:
    return int((ts - datetime(1970, 1, 1)).total_seconds() * 1_000_000)


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def build(con: duckdb.DuckDBPyConnection, *, events: int, seed: int, end: datetime, days: int) -> Scale:
    """Create one DuckDB table per operational table in `con`."""
    scale = Scale.for_events(events)
    start = end - timedelta(days=days)
    end_us, start_us = _us(end), _us(start)
    day_us = 86_400_000_000
    # r(k, purpose): uniform in [0, 1), a pure function of row, purpose and seed.
    con.execute(
        f"CREATE OR REPLACE MACRO r(k, purpose) AS "
        f"(hash(k, purpose, {int(seed)}) >> 11)::DOUBLE / 9007199254740992.0"
    )
    # ts(micros): a timestamp rounded to the millisecond.
    con.execute("CREATE OR REPLACE MACRO ts(us) AS make_timestamp((us::BIGINT // 1000) * 1000)")
    prices = ", ".join(f"'{p}': {v}" for p, v in PLAN_PRICE_PER_SEAT.items())
    plans = _sql_list(PLANS)
    regions = _sql_list(REGIONS)
    categories = _sql_list(CATEGORIES)
    nc, nu = scale.companies, scale.users

    con.execute(f"""
    CREATE OR REPLACE TABLE companies AS
    SELECT i AS company_id,
           'Company ' || i || ' ' || ({_sql_list(['Labs', 'Systems', 'Cloud', 'Partners', 'Group', 'Tech'])})[1 + (r(i, 'c.name') * 6)::INT % 6] AS name,
           {plans}[1 + least(3, (r(i, 'c.plan') * r(i, 'c.plan2') * 5)::INT)] AS plan,
           0 AS seats,
           {regions}[1 + (r(i, 'c.region') * {len(REGIONS)})::INT % {len(REGIONS)}] AS region,
           ts({start_us} - 400 * {day_us}::BIGINT + r(i, 'c.created') * 380 * {day_us}::BIGINT) AS created_at
    FROM range(1, {nc} + 1) t(i)
    """)
    # Users: big companies first (skewed), a few already soft-deleted.
    con.execute(f"""
    CREATE OR REPLACE TABLE users AS
    WITH base AS (
        SELECT i AS user_id,
               1 + least({nc} - 1, (pow(r(i, 'u.company'), 2) * {nc})::BIGINT) AS company_id,
               r(i, 'u.created') AS rc
        FROM range(1, {nu} + 1) t(i)
    )
    SELECT b.user_id, b.company_id,
           'user' || b.user_id || '@company' || b.company_id || '.example' AS email,
           ({_sql_list(['Ada', 'Linus', 'Grace', 'Alan', 'Barbara', 'Ken', 'Margaret', 'Dennis', 'Frances', 'Edsger'])})[1 + (r(b.user_id, 'u.first') * 10)::INT % 10]
             || ' ' || ({_sql_list(['Rossi', 'Smith', 'Müller', 'Dubois', 'Tanaka', 'Silva', 'Kowalski', 'Nguyen'])})[1 + (r(b.user_id, 'u.last') * 8)::INT % 8] AS full_name,
           CASE WHEN r(b.user_id, 'u.role') < 0.9 THEN 'learner'
                WHEN r(b.user_id, 'u.role') < 0.98 THEN 'manager' ELSE 'admin' END AS role,
           ts(greatest(epoch_us(c.created_at), {start_us} - 200 * {day_us}::BIGINT)
              + b.rc * ({end_us} - 10 * {day_us}::BIGINT - greatest(epoch_us(c.created_at), {start_us} - 200 * {day_us}::BIGINT))) AS created_at
    FROM base b JOIN companies c USING (company_id)
    """)
    con.execute(f"""
    ALTER TABLE users ADD COLUMN deleted_at TIMESTAMP;
    ALTER TABLE users ADD COLUMN updated_at TIMESTAMP;
    UPDATE users SET
        deleted_at = CASE WHEN r(user_id, 'u.deleted') < 0.03
                          THEN ts(epoch_us(created_at) + r(user_id, 'u.deleted_at') * ({end_us} - epoch_us(created_at))) END,
        updated_at = created_at;
    UPDATE users SET updated_at = coalesce(deleted_at, updated_at);
    UPDATE companies SET seats = greatest(5, (SELECT count(*) FROM users u WHERE u.company_id = companies.company_id) + (r(company_id, 'c.seats') * 20)::INT);
    ALTER TABLE companies ADD COLUMN updated_at TIMESTAMP;
    UPDATE companies SET updated_at = created_at;
    """)
    con.execute(f"""
    CREATE OR REPLACE TABLE teams AS
    WITH per_company AS (
        SELECT company_id, greatest(1, count(*) // 15)::INT AS n FROM users GROUP BY company_id
    ), numbered AS (
        SELECT p.company_id, k, row_number() OVER (ORDER BY p.company_id, k) AS team_id
        FROM per_company p, range(0, p.n) t(k)
    )
    SELECT n.team_id, n.company_id,
           ({_sql_list(['Platform', 'Data', 'Security', 'Frontend', 'Backend', 'SRE', 'Analytics', 'Support'])})[1 + k % 8] || ' ' || (k // 8 + 1) AS name,
           c.created_at + INTERVAL 1 DAY AS created_at, c.created_at + INTERVAL 1 DAY AS updated_at
    FROM numbered n JOIN companies c USING (company_id)
    """)
    con.execute("""
    CREATE OR REPLACE TABLE team_memberships AS
    WITH teams_of AS (
        SELECT company_id, min(team_id) AS first_team, count(*) AS n FROM teams GROUP BY company_id
    )
    SELECT row_number() OVER (ORDER BY u.user_id) AS membership_id,
           t.first_team + (r(u.user_id, 'm.team') * t.n)::BIGINT % t.n AS team_id,
           u.user_id, u.created_at + INTERVAL 2 HOUR AS joined_at,
           u.created_at + INTERVAL 2 HOUR AS created_at, u.created_at + INTERVAL 2 HOUR AS updated_at
    FROM users u JOIN teams_of t USING (company_id)
    WHERE r(u.user_id, 'm.member') < 0.7
    """)
    con.execute(f"""
    CREATE OR REPLACE TABLE courses AS
    SELECT i AS course_id,
           upper(cat) || ' ' || ({_sql_list(['Fundamentals', 'Deep Dive', 'Hands-on Labs', 'Certification Prep', 'Security Essentials', 'Architecture'])})[1 + (i // {len(CATEGORIES)}) % 6] AS title,
           cat AS category,
           ({_sql_list(['beginner', 'intermediate', 'advanced'])})[1 + (r(i, 'co.diff') * 3)::INT % 3] AS difficulty,
           ts({start_us} - 500 * {day_us}::BIGINT + r(i, 'co.pub') * 480 * {day_us}::BIGINT) AS published_at
    FROM (SELECT i, {categories}[1 + i % {len(CATEGORIES)}] AS cat FROM range(1, {scale.courses} + 1) t(i))
    """)
    con.execute("""
    ALTER TABLE courses ADD COLUMN created_at TIMESTAMP;
    ALTER TABLE courses ADD COLUMN updated_at TIMESTAMP;
    UPDATE courses SET created_at = published_at - INTERVAL 20 DAY, updated_at = published_at;
    CREATE OR REPLACE TABLE course_shape AS
    SELECT course_id, 6 + (r(course_id, 'co.lessons') * 15)::INT AS n_lessons FROM courses;
    ALTER TABLE course_shape ADD COLUMN first_lesson BIGINT;
    UPDATE course_shape SET first_lesson = s.first_lesson FROM (
        SELECT course_id, 1 + coalesce(sum(n_lessons) OVER (ORDER BY course_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS first_lesson
        FROM course_shape) s WHERE s.course_id = course_shape.course_id;
    CREATE OR REPLACE TABLE lessons AS
    SELECT s.first_lesson + p - 1 AS lesson_id, s.course_id, p AS position,
           'Lesson ' || p || ' of ' || c.title AS title,
           CASE WHEN p % 5 = 0 THEN 'quiz' WHEN p % 3 = 0 THEN 'lab' ELSE 'video' END AS lesson_type,
           CASE WHEN p % 5 = 0 THEN 600 WHEN p % 3 = 0 THEN 2700 ELSE 300 + (r(s.first_lesson + p, 'l.dur') * 900)::INT END AS duration_seconds,
           c.created_at, c.updated_at
    FROM course_shape s JOIN courses c USING (course_id), range(1, s.n_lessons + 1) t(p)
    """)
    # Enrollments: each user in up to three distinct courses; statuses change over time.
    con.execute(f"""
    CREATE OR REPLACE TABLE enrollments AS
    WITH base AS (
        SELECT u.user_id, j, u.created_at AS user_created, u.deleted_at,
               1 + ((r(u.user_id, 'e.course') * {scale.courses})::INT + j * 7) % {scale.courses} AS course_id
        FROM users u, range(0, {scale.enrollments_per_user}) t(j)
        WHERE j = 0 OR r(u.user_id * 10 + j, 'e.more') < 0.75
    ), timed AS (
        SELECT row_number() OVER (ORDER BY user_id, j) AS enrollment_id, user_id, course_id,
               greatest(epoch_us(user_created), {start_us}) AS lo, deleted_at
        FROM base
    ), placed AS (
        SELECT *, ts(lo + r(enrollment_id, 'e.at') * 0.8 * ({end_us} - lo)) AS enrolled_at,
               r(enrollment_id, 'e.status') AS rs
        FROM timed
    )
    SELECT enrollment_id, user_id, course_id,
           CASE WHEN rs < 0.35 THEN 'completed' WHEN rs < 0.45 THEN 'dropped'
                WHEN rs < 0.85 THEN 'in_progress' ELSE 'enrolled' END AS status,
           enrolled_at,
           CASE WHEN rs < 0.35 THEN ts(epoch_us(enrolled_at) + (0.2 + 0.8 * r(enrollment_id, 'e.done')) * ({end_us} - epoch_us(enrolled_at))) END AS completed_at,
           enrolled_at AS created_at,
           CASE WHEN rs < 0.35 THEN ts(epoch_us(enrolled_at) + (0.2 + 0.8 * r(enrollment_id, 'e.done')) * ({end_us} - epoch_us(enrolled_at)))
                WHEN rs < 0.85 THEN ts(epoch_us(enrolled_at) + 0.1 * r(enrollment_id, 'e.upd') * ({end_us} - epoch_us(enrolled_at)))
                ELSE enrolled_at END AS updated_at
    FROM placed
    """)
    con.execute(f"""
    CREATE OR REPLACE TABLE enrollment_pick AS
    -- Activity happens between enrolment and the end of the period, or the user's soft
    -- deletion: a deleted user produces no events afterwards (the dbt test
    -- not_after_soft_delete watches for it), and one deleted before enrolling none at all.
    WITH bounded AS (
        SELECT e.enrollment_id, e.user_id, e.course_id, epoch_us(e.enrolled_at) AS lo,
               least({end_us}, coalesce(epoch_us(u.deleted_at), {end_us})) AS hi,
               s.first_lesson, s.n_lessons
        FROM enrollments e JOIN course_shape s USING (course_id) JOIN users u USING (user_id)
    )
    SELECT row_number() OVER (ORDER BY enrollment_id) - 1 AS idx, enrollment_id, user_id,
           course_id, lo, hi, first_lesson, n_lessons
    FROM bounded WHERE hi > lo
    """)
    n_enrollments = con.execute("SELECT count(*) FROM enrollment_pick").fetchone()[0]
    # Lesson events: activity is skewed towards a minority of enrollments (pow), spread from
    # enrollment to the end of the period; ~3% arrive late (occurred days before received).
    con.execute(f"""
    CREATE OR REPLACE TABLE lesson_events AS
    WITH picks AS (
        SELECT i AS event_id,
               least({n_enrollments} - 1, (pow(r(i, 'ev.enr'), 1.7) * {n_enrollments})::BIGINT) AS idx
        FROM range(1, {events} + 1) t(i)
    ), placed AS (
        SELECT p.event_id, e.user_id,
               e.first_lesson + (r(p.event_id, 'ev.lesson') * e.n_lessons)::BIGINT % e.n_lessons AS lesson_id,
               r(p.event_id, 'ev.type') AS rt,
               e.lo + r(p.event_id, 'ev.at') * (e.hi - e.lo) AS received_us,
               r(p.event_id, 'ev.late') AS rl
        FROM picks p JOIN enrollment_pick e USING (idx)
    )
    SELECT event_id, user_id, lesson_id,
           CASE WHEN rt < 0.3 THEN 'started' WHEN rt < 0.8 THEN 'progress' ELSE 'completed' END AS event_type,
           CASE WHEN rt < 0.3 THEN 0 ELSE 15 + (r(event_id, 'ev.secs') * r(event_id, 'ev.secs2') * 1800)::INT END AS seconds_spent,
           ts(received_us - CASE WHEN rl < 0.03 THEN (1 + 4 * r(event_id, 'ev.lateness')) * {day_us}::BIGINT
                                 ELSE r(event_id, 'ev.delay') * 120 * 1000000 END) AS occurred_at,
           ts(received_us) AS created_at
    FROM placed
    """)
    con.execute(f"""
    CREATE OR REPLACE TABLE quiz_attempts AS
    WITH picks AS (
        SELECT i AS attempt_id,
               least({n_enrollments} - 1, (pow(r(i, 'q.enr'), 1.7) * {n_enrollments})::BIGINT) AS idx
        FROM range(1, greatest(10, {events} // 20) + 1) t(i)
    )
    SELECT p.attempt_id, e.user_id,
           e.first_lesson + 5 * (1 + (r(p.attempt_id, 'q.quiz') * (e.n_lessons // 5))::BIGINT % (e.n_lessons // 5)) - 1 AS lesson_id,
           round(100 * pow(r(p.attempt_id, 'q.score'), 0.6), 2)::DECIMAL(5, 2) AS score,
           ts(e.lo + r(p.attempt_id, 'q.at') * (e.hi - e.lo)) AS attempted_at
    FROM picks p JOIN enrollment_pick e USING (idx)
    """)
    con.execute("""
    ALTER TABLE quiz_attempts ADD COLUMN passed BOOLEAN;
    ALTER TABLE quiz_attempts ADD COLUMN created_at TIMESTAMP;
    UPDATE quiz_attempts SET passed = score >= 70, created_at = attempted_at;
    CREATE OR REPLACE TABLE certificates AS
    SELECT row_number() OVER (ORDER BY enrollment_id) AS certificate_id, enrollment_id, user_id,
           course_id, completed_at + INTERVAL 5 MINUTE AS issued_at, completed_at + INTERVAL 5 MINUTE AS created_at
    FROM enrollments WHERE status = 'completed'
    """)
    # Subscriptions: one period per plan; about half the companies changed plan once.
    con.execute(f"""
    CREATE OR REPLACE TABLE subscriptions AS
    WITH periods AS (
        SELECT c.company_id, c.plan, c.seats, c.created_at,
               r(c.company_id, 's.changed') < 0.5 AS changed,
               ts(greatest(epoch_us(c.created_at), {start_us} - 60 * {day_us}::BIGINT)
                  + r(c.company_id, 's.change_at') * ({end_us} - greatest(epoch_us(c.created_at), {start_us} - 60 * {day_us}::BIGINT))) AS change_at
        FROM companies c
    ), rows AS (
        SELECT company_id, {plans}[greatest(1, list_position({plans}, plan) - 1)] AS plan,
               greatest(5, seats - 10) AS seats, 'ended' AS status, created_at AS started_at,
               change_at AS ended_at, 0 AS k
        FROM periods WHERE changed
        UNION ALL
        SELECT company_id, plan, seats, 'active', CASE WHEN changed THEN change_at ELSE created_at END,
               NULL, 1
        FROM periods
    )
    SELECT row_number() OVER (ORDER BY company_id, k) AS subscription_id, company_id, plan, seats,
           (seats * map_extract(MAP {{{prices}}}, plan)[1])::DECIMAL(12, 2) AS monthly_amount,
           'USD' AS currency, status, started_at, ended_at,
           started_at AS created_at, coalesce(ended_at, started_at) AS updated_at
    FROM rows
    """)
    return scale


def table_columns(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        "select column_name from information_schema.columns"
        " where table_schema = 'app' and table_name = %s order by ordinal_position",
        (table,),
    ).fetchall()
    return [r[0] for r in rows]


# Progress lines only for the steps that take this long (a large EVENTS): a first `make demo`
# stays short, a benchmark's load still shows where it is.
SLOW_SECONDS = 5.0


def load(conn: psycopg.Connection, *, events: int, seed: int, end: datetime, days: int,
         progress=print) -> dict[str, int]:
    """Generate the dataset and COPY it into the (empty) app schema. Returns row counts."""
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="platform-gen-") as tmp:
        con = duckdb.connect()
        t0 = time.monotonic()
        build(con, events=events, seed=seed, end=end, days=days)
        if time.monotonic() - t0 >= SLOW_SECONDS:
            progress(f"  generated in {time.monotonic() - t0:.1f}s")
        for table in TABLES:
            t1 = time.monotonic()
            columns = table_columns(conn, table)
            path = Path(tmp) / f"{table}.csv"
            cols = ", ".join(columns)
            con.execute(f"COPY (SELECT {cols} FROM {table}) TO '{path}' (FORMAT csv, HEADER false)")
            with conn.cursor() as cur:
                with cur.copy(f"COPY app.{table} ({cols}) FROM STDIN (FORMAT csv)") as copy:
                    with open(path, "rb") as fh:
                        while chunk := fh.read(1 << 20):
                            copy.write(chunk)
                counts[table] = cur.rowcount
            path.unlink()
            if time.monotonic() - t1 >= SLOW_SECONDS:
                progress(f"  {table:<18} {counts[table]:>10,} rows  {time.monotonic() - t1:.1f}s")
        con.close()
    return counts
