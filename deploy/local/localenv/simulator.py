"""One batch of realistic operational changes, applied on the primary.

What the application does between two platform refreshes: learners produce new lesson
events (a few arrive late, days after they happened), a few recent events are corrected in
place or removed (a client's retry, a support fix: events have no `updated_at`), learners
finish courses and get certificates, users and companies are edited, a few users leave
(soft delete), and a company changes plan. Rows with an `updated_at` get it bumped; the
platform does not rely on it (docs/change-detection.md).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import psycopg

from .generator import PLAN_PRICE_PER_SEAT, PLANS


def _now(conn: psycopg.Connection) -> datetime:
    # The database clock, in UTC, so rows written here order correctly with generated ones.
    return conn.execute("select (now() at time zone 'utc')::timestamp").fetchone()[0]


def simulate(conn: psycopg.Connection, *, new_events: int = 2000, seed: int | None = None,
             late_fraction: float = 0.05, edit_fraction: float = 0.01,
             delete_fraction: float = 0.005) -> dict[str, int]:
    """Apply one batch in a single transaction; returns what changed, per kind."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    with conn.transaction():
        now = _now(conn)
        # -- new lesson events, from active enrollments ----------------------------------------
        enrollments = conn.execute(
            """
            select e.user_id, e.course_id, array_agg(l.lesson_id order by l.position)
            from app.enrollments e
            join app.users u on u.user_id = e.user_id and u.deleted_at is null
            join app.lessons l on l.course_id = e.course_id
            where e.status in ('enrolled', 'in_progress')
            group by e.enrollment_id, e.user_id, e.course_id
            order by e.enrollment_id
            limit 5000
            """
        ).fetchall()
        late = 0
        if enrollments and new_events:
            with conn.cursor() as cur, cur.copy(
                "COPY app.lesson_events (user_id, lesson_id, event_type, seconds_spent,"
                " occurred_at, created_at) FROM STDIN"
            ) as copy:
                for _ in range(new_events):
                    user_id, _course, lessons = rng.choice(enrollments)
                    kind = rng.choices(["started", "progress", "completed"], [3, 5, 2])[0]
                    seconds = 0 if kind == "started" else rng.randint(15, 1800)
                    if rng.random() < late_fraction:
                        occurred = now - timedelta(days=rng.uniform(1, 5))
                        late += 1
                    else:
                        occurred = now - timedelta(seconds=rng.uniform(0, 600))
                    copy.write_row((user_id, rng.choice(lessons), kind, seconds, occurred, now))
        counts["lesson_events_inserted"] = new_events if enrollments else 0
        counts["lesson_events_late"] = late

        # -- recent events corrected in place, and a few removed (last week, before this batch) --
        recent = "select event_id from app.lesson_events where occurred_at >= %(since)s and created_at < %(now)s" \
                 " order by md5(event_id::text || %(salt)s) limit %(n)s"
        since = now - timedelta(days=7)
        cur = conn.execute(
            f"update app.lesson_events set seconds_spent = seconds_spent + 7 where event_id in ({recent})",
            {"since": since, "now": now, "salt": str(rng.random()), "n": round(new_events * edit_fraction)},
        )
        counts["lesson_events_edited"] = cur.rowcount
        cur = conn.execute(
            f"delete from app.lesson_events where event_id in ({recent})",
            {"since": since, "now": now, "salt": str(rng.random()), "n": round(new_events * delete_fraction)},
        )
        counts["lesson_events_deleted"] = cur.rowcount

        # -- enrollments progress: some start, some complete (with a certificate) -----------------
        cur = conn.execute(
            """
            update app.enrollments set status = 'in_progress', updated_at = %(now)s
            where enrollment_id in (
                select enrollment_id from app.enrollments where status = 'enrolled'
                order by md5(enrollment_id::text || %(salt)s) limit 20)
            """,
            {"now": now, "salt": str(rng.random())},
        )
        counts["enrollments_started"] = cur.rowcount
        completed = conn.execute(
            """
            update app.enrollments set status = 'completed', completed_at = %(now)s, updated_at = %(now)s
            where enrollment_id in (
                select enrollment_id from app.enrollments where status = 'in_progress'
                order by md5(enrollment_id::text || %(salt)s) limit 25)
            returning enrollment_id, user_id, course_id
            """,
            {"now": now, "salt": str(rng.random())},
        ).fetchall()
        counts["enrollments_completed"] = len(completed)
        if completed:
            with conn.cursor() as c:
                c.executemany(
                    "insert into app.certificates (enrollment_id, user_id, course_id, issued_at, created_at)"
                    " values (%s, %s, %s, %s, %s)",
                    [(e, u, co, now, now) for e, u, co in completed],
                )
        counts["certificates_issued"] = len(completed)

        # -- users edited and a few soft-deleted ----------------------------------------------
        cur = conn.execute(
            """
            update app.users set full_name = full_name || ' Jr', updated_at = %(now)s
            where user_id in (select user_id from app.users where deleted_at is null
                              order by md5(user_id::text || %(salt)s) limit 15)
            """,
            {"now": now, "salt": str(rng.random())},
        )
        counts["users_updated"] = cur.rowcount
        cur = conn.execute(
            """
            update app.users set deleted_at = %(now)s, updated_at = %(now)s
            where user_id in (select user_id from app.users where deleted_at is null
                              order by md5(user_id::text || %(salt)s) limit 3)
            """,
            {"now": now, "salt": str(rng.random())},
        )
        counts["users_soft_deleted"] = cur.rowcount

        # -- companies edited (seats) ----------------------------------------------------------
        cur = conn.execute(
            """
            update app.companies set seats = seats + 5, updated_at = %(now)s
            where company_id in (select company_id from app.companies
                                 order by md5(company_id::text || %(salt)s) limit 2)
            """,
            {"now": now, "salt": str(rng.random())},
        )
        counts["companies_updated"] = cur.rowcount

        # -- one company changes plan: end the active period, start a new one ------------------
        row = conn.execute(
            """
            select subscription_id, company_id, plan, seats from app.subscriptions
            where status = 'active' order by md5(subscription_id::text || %s) limit 1
            """,
            (str(rng.random()),),
        ).fetchone()
        changed = 0
        if row:
            sub_id, company_id, plan, seats = row
            new_plan = rng.choice([p for p in PLANS if p != plan])
            conn.execute(
                "update app.subscriptions set status = 'ended', ended_at = %(now)s, updated_at = %(now)s"
                " where subscription_id = %(id)s",
                {"now": now, "id": sub_id},
            )
            conn.execute(
                "insert into app.subscriptions (company_id, plan, seats, monthly_amount, currency,"
                " status, started_at, created_at, updated_at)"
                " values (%s, %s, %s, %s, 'USD', 'active', %s, %s, %s)",
                (company_id, new_plan, seats, seats * PLAN_PRICE_PER_SEAT[new_plan], now, now, now),
            )
            conn.execute(
                "update app.companies set plan = %s, updated_at = %s where company_id = %s",
                (new_plan, now, company_id),
            )
            changed = 1
        counts["subscriptions_changed"] = changed
    return counts
