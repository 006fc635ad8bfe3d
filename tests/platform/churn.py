"""The churn harness of tests/platform/test_churn_*.py: the marts equal a full refresh after
any churn, on DuckDB and on PostgreSQL.

Hypothesis generates sequences of changes on the primary — inserts of any lateness up to the
whole data span, backdated `created_at`, in-place edits of every column the marts read (of
events, users, companies, teams, memberships, courses, lessons, enrollments, certificates
and subscriptions; an edit always sets another value than the row's, and moves an event only
within the span the daily partitions cover), new courses, lessons, teams, enrollments,
memberships, certificates and plan periods, hard deletes (events, enrollments, teams,
memberships, certificates, plan periods, whole companies), soft deletes and their undoing,
users, teams and plan periods moving company, lessons and enrollments moving course, updates
without an `updated_at` bump — then runs the automation path
(localenv.demo.automation_cycle: observe, automation ticks and the changed days of the daily
facts until nothing more is requested, what the sensors and `make demo` do), and compares
every mart and reporting relation with a `dbt run --full-refresh` of the same replica into a
second warehouse: EXCEPT ALL both ways (as multisets in Python, since the two PostgreSQL
warehouses are two databases), bookkeeping columns excluded by name.
Each example merges the differing days into ranges with production's gap, or only adjacent
ones (GAPS): at gap 0 a missed day is not hidden by a range that covers it for another day's
sake.

Each engine has its own copy of the source schema on the primary (REPLICA_SCHEMA), so the
churn never reaches other tests. `make test` runs CHURN_EXAMPLES=8 examples per engine,
derandomized; `make churn` runs 100. One test file per engine, so that pytest-xdist can run
the two engines side by side. test_churn_ops.py checks the generator: every change it
makes reaches the source.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from localenv.demo import Runner, automation_cycle, evaluate_automation, run_all
from localenv.environment import APP_DB, OWNER_ROLE, READONLY_ROLE, WAREHOUSE_ROLE
from psycopg import sql

from platform_assets.changes import DEFAULT_MAX_GAP_DAYS
from platform_assets.fingerprints import M

from ..conftest import TEST_DAYS
from .conftest import REPO_ROOT, platform_under_test

EXAMPLES = int(os.environ.get("CHURN_EXAMPLES", "8"))
BOOKKEEPING = {"loaded_by"}
TABLES = ["companies", "users", "teams", "team_memberships", "courses", "lessons", "enrollments",
          "lesson_events", "quiz_attempts", "certificates", "subscriptions"]
# CHANGE_RANGE_MAX_GAP_DAYS of the examples: none, and production's default
GAPS = (0, DEFAULT_MAX_GAP_DAYS)
BIG = 10**9  # "pick the k-th row" numbers, taken modulo the table's size

# -- the churn -----------------------------------------------------------------------------
# Every kind of change at least once, whatever the random examples draw.
EVERY_KIND = [
    ("insert_events", 3, TEST_DAYS * 24 - 1, 48, 11), ("edit_event", 5, "occurred_at", 7),
    ("edit_event", 6, "user_id", 3), ("edit_event", 8, "lesson_id", 4), ("edit_event", 9, "seconds_spent", 9),
    ("edit_event", 10, "event_type", 1), ("edit_event", 12, "created_at", 2), ("delete_events", 13, 3),
    ("soft_delete_user", 14, False), ("move_user", 15, 16, False), ("move_lesson", 17, 18),
    ("edit_course", 19, "category"), ("edit_enrollment", 20, "dropped", False), ("delete_enrollment", 21),
    ("edit_company", 22, "name", False), ("edit_subscription", 23, "seats", False), ("delete_company", 24),
    ("hostile_company", 2**63 - 1, "O'Brien; drop table x; --", 200, 25),
    ("edit_user", 26, "email", False), ("edit_user", 27, "role", True), ("edit_company", 28, "plan", False),
    ("edit_team", 29, 30, "company", False), ("membership", 31, 32, "join", 500), ("membership", 33, 0, "leave", 0),
    ("membership", 34, 0, "joined_at", 900), ("certificate", 35, "issue", 30), ("certificate", 36, "revoke", 0),
    ("certificate", 37, "issued_at", 300), ("insert_enrollment", 38, 39, 700), ("edit_enrollment", 40, "enrolled_at",
    False), ("edit_subscription", 41, "status", False), ("edit_subscription", 42, "started_at", True),
    ("new_period", 43, "business"), ("edit_lesson", 44, "lesson_type"), ("edit_course", 45, "published_at"),
    ("restore_user", 0, False), ("shift_time", "enrollments", "completed_at", 46, 30),
    ("shift_time", "companies", "created_at", 47, 5), ("delete_row", "teams", 48), ("delete_row", "subscriptions", 49),
    ("insert_course", 50, True), ("insert_lesson", 51, 2), ("insert_team", 52), ("move_enrollment", 53, 54),
    ("move_subscription", 55, 56), ("collide_user", 57),
]
# Timestamps the marts read that no other kind of change moves: (table, column)
SHIFTED = [("companies", "created_at"), ("users", "created_at"), ("courses", "created_at"), ("courses", "updated_at"),
           ("enrollments", "completed_at"), ("enrollments", "created_at"), ("subscriptions", "ended_at")]
KEYS = {"companies": "company_id", "users": "user_id", "courses": "course_id", "enrollments": "enrollment_id",
        "subscriptions": "subscription_id", "teams": "team_id", "team_memberships": "membership_id",
        "certificates": "certificate_id"}
pick = st.integers(0, BIG)
OPS = st.one_of(
    # n events, hours late (up to the whole span), created_at backdated by hours (0: now)
    st.tuples(st.just("insert_events"), st.integers(1, 4), st.integers(0, TEST_DAYS * 24), st.integers(0, 72), pick),
    st.tuples(st.just("edit_event"), pick,
              st.sampled_from(["user_id", "lesson_id", "event_type", "seconds_spent", "occurred_at", "created_at"]),
              pick),
    st.tuples(st.just("delete_events"), pick, st.integers(1, 3)),
    st.tuples(st.just("soft_delete_user"), pick, st.booleans()),
    st.tuples(st.just("move_user"), pick, pick, st.booleans()),
    st.tuples(st.just("move_lesson"), pick, pick),
    st.tuples(st.just("edit_course"), pick, st.sampled_from(["category", "difficulty", "title", "published_at"])),
    st.tuples(st.just("edit_lesson"), pick, st.sampled_from(["lesson_type", "duration_seconds", "title"])),
    # a status (completed_at follows it) or enrolled_at moved back by up to the whole span
    st.tuples(st.just("edit_enrollment"), pick,
              st.sampled_from(["enrolled", "in_progress", "completed", "dropped", "enrolled_at"]), st.booleans()),
    st.tuples(st.just("insert_enrollment"), pick, pick, st.integers(0, TEST_DAYS * 24)),
    st.tuples(st.just("delete_enrollment"), pick),
    st.tuples(st.just("edit_user"), pick, st.sampled_from(["email", "full_name", "role"]), st.booleans()),
    st.tuples(st.just("edit_company"), pick, st.sampled_from(["name", "seats", "region", "plan"]), st.booleans()),
    st.tuples(st.just("edit_team"), pick, pick, st.sampled_from(["name", "company"]), st.booleans()),
    # a user joins a team (joined_at hours ago), leaves one, or a joined_at moves back
    st.tuples(st.just("membership"), pick, pick, st.sampled_from(["join", "leave", "joined_at"]),
              st.integers(0, TEST_DAYS * 24)),
    # a certificate issued (hours ago), revoked (hard delete), or its issued_at moved back
    st.tuples(st.just("certificate"), pick, st.sampled_from(["issue", "revoke", "issued_at"]),
              st.integers(0, TEST_DAYS * 24)),
    st.tuples(st.just("edit_subscription"), pick,
              st.sampled_from(["seats", "plan", "currency", "status", "ended_at", "started_at"]), st.booleans()),
    # a plan change as the application makes it: the current period ends, a new one starts
    st.tuples(st.just("new_period"), pick, st.sampled_from(["starter", "team", "business", "enterprise"])),
    st.tuples(st.just("restore_user"), pick, st.booleans()),
    st.builds(lambda tc, k, h: ("shift_time", *tc, k, h), st.sampled_from(SHIFTED), pick, st.integers(0, 24 * 40)),
    st.tuples(st.just("delete_row"), st.sampled_from(["teams", "subscriptions"]), pick),
    st.tuples(st.just("insert_course"), pick, st.booleans()),
    st.tuples(st.just("insert_lesson"), pick, st.integers(0, 2)),
    st.tuples(st.just("insert_team"), pick),
    st.tuples(st.just("move_enrollment"), pick, pick),
    st.tuples(st.just("move_subscription"), pick, pick),
    st.tuples(st.just("collide_user"), pick),
    st.tuples(st.just("delete_company"), pick),
    # a new company and user with hostile keys and names, and their first events (any lateness)
    st.tuples(st.just("hostile_company"), st.sampled_from([2**63 - 1, 2**62 + 7, 10**18 + 3, 2**31]),
              st.sampled_from(["O'Brien; drop table x; --", "\u00e9\u6f22\u5b57 \"quoted\"", "a\tb\\c", " "]),
              st.integers(0, TEST_DAYS * 24), pick),
)


def _nth(conn, schema: str, table: str, key: str, k: int, where: str = "true"):
    count = conn.execute(sql.SQL("select count(*) from {} where " + where).format(sql.Identifier(schema, table))
                         ).fetchone()[0]
    if not count:
        return None
    return conn.execute(sql.SQL("select {k} from {t} where " + where + " order by {k} offset %s limit 1").format(
        k=sql.Identifier(key), t=sql.Identifier(schema, table)), (k % count,)).fetchone()[0]


def _delete_or_move_back(conn, schema: str, table: str, k: int, column: str, delete: bool, hours: int) -> None:
    """The k-th row of `table` hard-deleted, or its `column` moved back by hours + 1."""
    row = _nth(conn, schema, table, KEYS[table], k)
    if row is not None:
        change = "delete from {t}" if delete else "update {t} set {c} = {c} - make_interval(hours => %(h)s + 1)"
        conn.execute(sql.SQL(change + " where {key} = %(row)s").format(
            t=sql.Identifier(schema, table), c=sql.Identifier(column), key=sql.Identifier(KEYS[table])),
            {"h": hours, "row": row})


def apply(conn: psycopg.Connection, schema: str, op: tuple) -> None:
    """One change, as the application (or a careless script) would make it."""
    t = lambda name: sql.Identifier(schema, name)  # noqa: E731
    now = conn.execute("select (now() at time zone 'utc')::timestamp").fetchone()[0]
    kind = op[0]
    if kind == "insert_events":
        _, n, hours_late, backdate, k = op
        for i in range(n):
            user = _nth(conn, schema, "users", "user_id", k + i)
            lesson = _nth(conn, schema, "lessons", "lesson_id", k * 7 + i)
            if user is None or lesson is None:
                return
            conn.execute(sql.SQL("insert into {} (user_id, lesson_id, event_type, seconds_spent, occurred_at,"
                                 " created_at) values (%s, %s, %s, %s, %s::timestamp - make_interval(hours => %s),"
                                 " %s::timestamp - make_interval(hours => %s))").format(t("lesson_events")),
                         (user, lesson, ["started", "progress", "completed"][(k + i) % 3], (k + i) % 1800,
                          now, hours_late, now, backdate))
    elif kind == "edit_event":
        _, k, column, v = op
        event = _nth(conn, schema, "lesson_events", "event_id", k)
        if event is None:
            return
        user, lesson, event_type, seconds = conn.execute(sql.SQL(
            "select user_id, lesson_id, event_type, seconds_spent from {} where event_id = %s").format(
            t("lesson_events")), (event,)).fetchone()
        # always another value than the row's: an edit to the same value would test nothing
        value = {
            "user_id": lambda: _nth(conn, schema, "users", "user_id", v, f"user_id <> {int(user)}"),
            "lesson_id": lambda: _nth(conn, schema, "lessons", "lesson_id", v, f"lesson_id <> {int(lesson)}"),
            "event_type": lambda: [e for e in ("started", "progress", "completed") if e != event_type][v % 2],
            "seconds_spent": lambda: (seconds + 1 + v % 4999) % 5000,
        }
        if column in value:
            conn.execute(sql.SQL("update {} set {} = %s where event_id = %s").format(
                t("lesson_events"), sql.Identifier(column)), (value[column](), event))
        else:
            # moved by up to the whole span either way (no updated_at on events), within the
            # span: a day before FACT_PARTITIONS_START is documented to need a full refresh
            hours = (v % (2 * TEST_DAYS * 24)) - TEST_DAYS * 24 or 1
            conn.execute(sql.SQL("update {} set {c} = greatest(least({c} + make_interval(hours => %s), %s::timestamp),"
                                 " %s::timestamp - make_interval(days => %s)) where event_id = %s").format(
                t("lesson_events"), c=sql.Identifier(column)), (hours, now, now, TEST_DAYS, event))
    elif kind == "delete_events":
        _, k, n = op
        for i in range(n):
            event = _nth(conn, schema, "lesson_events", "event_id", k + i * 104729)
            if event is not None:
                conn.execute(sql.SQL("delete from {} where event_id = %s").format(t("lesson_events")), (event,))
    elif kind == "soft_delete_user":
        _, k, bump = op
        user = _nth(conn, schema, "users", "user_id", k, "deleted_at is null")
        if user is not None:
            conn.execute(sql.SQL("update {} set deleted_at = %s" + (", updated_at = %s" if bump else "")
                                 + " where user_id = %s").format(t("users")),
                         (now, now, user) if bump else (now, user))
    elif kind == "move_user":
        _, k, c, bump = op
        user = _nth(conn, schema, "users", "user_id", k)
        company = user and _nth(conn, schema, "companies", "company_id", c, f'company_id <> (select company_id'
                                f' from "{schema}".users where user_id = {int(user)})')
        if user is not None and company is not None:
            conn.execute(sql.SQL("update {} set company_id = %s" + (", updated_at = %s" if bump else "")
                                 + " where user_id = %s").format(t("users")),
                         (company, now, user) if bump else (company, user))
    elif kind == "move_lesson":
        _, k, c = op
        lesson = _nth(conn, schema, "lessons", "lesson_id", k)
        course = _nth(conn, schema, "courses", "course_id", c)
        if lesson is not None and course is not None:
            conn.execute(sql.SQL("update {} set course_id = %s, position = (select coalesce(max(position), 0) + 1"
                                 " from {} where course_id = %s) where lesson_id = %s").format(
                t("lessons"), t("lessons")), (course, course, lesson))
    elif kind == "edit_course":
        _, k, column = op
        course = _nth(conn, schema, "courses", "course_id", k)
        if course is not None:
            value = {"category": "category || ' (renamed)'",
                     "difficulty": "case difficulty when 'beginner' then 'intermediate' when 'intermediate'"
                                   " then 'advanced' else 'beginner' end",
                     "title": "title || ' ''re-titled'' \u00e9'", "published_at": "published_at - interval '3 days'"
                     }[column]
            conn.execute(sql.SQL("update {} set {} = " + value + " where course_id = %s").format(
                t("courses"), sql.Identifier(column)), (course,))
    elif kind == "edit_lesson":
        _, k, column = op
        lesson = _nth(conn, schema, "lessons", "lesson_id", k)
        if lesson is not None:
            value = {"lesson_type": "case lesson_type when 'video' then 'lab' when 'lab' then 'quiz' else 'video' end",
                     "duration_seconds": "duration_seconds + 37", "title": "title || ' (edited)'"}[column]
            conn.execute(sql.SQL("update {} set {} = " + value + " where lesson_id = %s").format(
                t("lessons"), sql.Identifier(column)), (lesson,))
    elif kind == "edit_enrollment":
        _, k, status, bump = op
        enrollment = _nth(conn, schema, "enrollments", "enrollment_id", k)
        if enrollment is None:
            return
        if status == "enrolled_at":  # moved back, so never after its completion
            change = sql.SQL("enrolled_at = enrolled_at - make_interval(hours => %s)")
            params = [1 + k % (TEST_DAYS * 24)]
        else:
            statuses = ["enrolled", "in_progress", "completed", "dropped"]
            current = conn.execute(sql.SQL("select status from {} where enrollment_id = %s").format(
                t("enrollments")), (enrollment,)).fetchone()[0]
            if status == current:
                status = statuses[(statuses.index(status) + 1) % len(statuses)]
            change = sql.SQL("status = %s, completed_at = case when %s = 'completed'"
                             " then coalesce(completed_at, %s) end")
            params = [status, status, now]
        conn.execute(sql.SQL("update {} set {}" + (", updated_at = %s" if bump else "") + " where enrollment_id = %s")
                     .format(t("enrollments"), change), [*params, *([now] if bump else []), enrollment])
    elif kind == "insert_enrollment":
        _, k, c, hours = op
        user = _nth(conn, schema, "users", "user_id", k, "deleted_at is null")
        course = _nth(conn, schema, "courses", "course_id", c)
        if user is not None and course is not None:
            conn.execute(sql.SQL("insert into {} (user_id, course_id, status, enrolled_at, created_at, updated_at)"
                                 " values (%s, %s, 'enrolled', %s::timestamp - make_interval(hours => %s), %s, %s)"
                                 " on conflict do nothing").format(t("enrollments")),
                         (user, course, now, hours, now, now))
    elif kind == "delete_enrollment":
        _, k = op
        enrollment = _nth(conn, schema, "enrollments", "enrollment_id", k)
        if enrollment is not None:
            conn.execute(sql.SQL("delete from {} where enrollment_id = %s").format(t("certificates")), (enrollment,))
            conn.execute(sql.SQL("delete from {} where enrollment_id = %s").format(t("enrollments")), (enrollment,))
    elif kind == "edit_company":
        _, k, column, bump = op
        company = _nth(conn, schema, "companies", "company_id", k)
        if company is not None:
            value = {"name": "name || ' & Co'", "seats": "seats + 1",
                     "region": "case region when 'eu-west' then 'us-east' else 'eu-west' end",
                     "plan": "case plan when 'starter' then 'team' when 'team' then 'business'"
                             " when 'business' then 'enterprise' else 'starter' end"}[column]
            conn.execute(sql.SQL("update {} set {} = " + value + (", updated_at = %s" if bump else "")
                                 + " where company_id = %s").format(t("companies"), sql.Identifier(column)),
                         (now, company) if bump else (company,))
    elif kind == "edit_user":
        _, k, column, bump = op
        user = _nth(conn, schema, "users", "user_id", k)
        if user is not None:
            value = {"email": "'e' || substr(md5(email), 1, 8) || '.' || user_id || '@example.test'",
                     "full_name": "full_name || ' Jr.'",
                     "role": "case role when 'learner' then 'manager' when 'manager' then 'admin' else 'learner' end"
                     }[column]
            conn.execute(sql.SQL("update {} set {} = " + value + (", updated_at = %s" if bump else "")
                                 + " where user_id = %s").format(t("users"), sql.Identifier(column)),
                         (now, user) if bump else (user,))
    elif kind == "edit_team":
        _, k, c, what, bump = op
        team = _nth(conn, schema, "teams", "team_id", k)
        company = team and _nth(conn, schema, "companies", "company_id", c, f'company_id <> (select company_id'
                                f' from "{schema}".teams where team_id = {int(team)})')
        if team is not None and company is not None:
            change = "name = name || ' (renamed)'" if what == "name" else "company_id = %s"
            conn.execute(sql.SQL("update {} set " + change + (", updated_at = %s" if bump else "")
                                 + " where team_id = %s").format(t("teams")),
                         [*([company] if what == "company" else []), *([now] if bump else []), team])
    elif kind == "membership":
        _, k, c, action, hours = op
        if action == "join":
            user = _nth(conn, schema, "users", "user_id", k)
            team = _nth(conn, schema, "teams", "team_id", c)
            if user is not None and team is not None:
                conn.execute(sql.SQL("insert into {} (team_id, user_id, joined_at, created_at, updated_at) values"
                                     " (%s, %s, %s::timestamp - make_interval(hours => %s), %s, %s)"
                                     " on conflict do nothing").format(t("team_memberships")),
                             (team, user, now, hours, now, now))
            return
        _delete_or_move_back(conn, schema, "team_memberships", k, "joined_at", action == "leave", hours)
    elif kind == "certificate":
        _, k, action, hours = op
        if action == "issue":
            enrollment = _nth(conn, schema, "enrollments", "enrollment_id", k,
                              f'enrollment_id not in (select enrollment_id from "{schema}".certificates)')
            if enrollment is not None:
                conn.execute(sql.SQL("insert into {} (enrollment_id, user_id, course_id, issued_at, created_at)"
                                     " select enrollment_id, user_id, course_id,"
                                     " %s::timestamp - make_interval(hours => %s), %s from {} where enrollment_id = %s"
                                     ).format(t("certificates"), t("enrollments")), (now, hours, now, enrollment))
            return
        _delete_or_move_back(conn, schema, "certificates", k, "issued_at", action == "revoke", hours)
    elif kind == "edit_subscription":
        _, k, column, bump = op
        sub = _nth(conn, schema, "subscriptions", "subscription_id", k)
        if sub is not None:
            change = {
                "seats": "seats = seats + 3, monthly_amount = monthly_amount + 10",
                "plan": "plan = case plan when 'starter' then 'team' when 'team' then 'business'"
                        " when 'business' then 'enterprise' else 'starter' end",
                "currency": "currency = case currency when 'USD' then 'EUR' else 'USD' end",
                # canceled with no ended_at: the period ends at its last update (int_subscription_periods)
                "status": "status = case status when 'active' then 'canceled' else 'active' end",
                "ended_at": "status = 'ended', ended_at = greatest(started_at, %(now)s - interval '2 days')",
                "started_at": "started_at = started_at - interval '40 days'",
            }[column]
            conn.execute(sql.SQL("update {} set " + change + (", updated_at = %(now)s" if bump else "")
                                 + " where subscription_id = %(s)s").format(t("subscriptions")),
                         {"now": now, "s": sub})
    elif kind == "new_period":
        _, c, plan = op
        company = _nth(conn, schema, "companies", "company_id", c)
        if company is None:
            return
        conn.execute(sql.SQL("update {} set status = 'ended', ended_at = %(now)s, updated_at = %(now)s"
                             " where company_id = %(c)s and status = 'active'").format(t("subscriptions")),
                     {"now": now, "c": company})
        conn.execute(sql.SQL("insert into {} (company_id, plan, seats, monthly_amount, currency, status, started_at,"
                             " created_at, updated_at) select company_id, %(p)s, seats, seats * 12.5, 'USD', 'active',"
                             " %(now)s, %(now)s, %(now)s from {} where company_id = %(c)s").format(
            t("subscriptions"), t("companies")), {"p": plan, "now": now, "c": company})
        conn.execute(sql.SQL("update {} set plan = %(p)s, updated_at = %(now)s where company_id = %(c)s").format(
            t("companies")), {"p": plan, "now": now, "c": company})
    elif kind == "delete_company":
        _, k = op
        company = _nth(conn, schema, "companies", "company_id", k)
        if company is None:
            return
        users = sql.SQL("(select user_id from {} where company_id = %(c)s)").format(t("users"))
        for table in ("lesson_events", "quiz_attempts", "certificates", "team_memberships", "enrollments"):
            conn.execute(sql.SQL("delete from {} where user_id in {}").format(t(table), users), {"c": company})
        # a user moved to another company may still be a member of this company's teams
        teams = sql.SQL("(select team_id from {} where company_id = %(c)s)").format(t("teams"))
        conn.execute(sql.SQL("delete from {} where team_id in {}").format(t("team_memberships"), teams),
                     {"c": company})
        for table in ("users", "teams", "subscriptions", "companies"):
            conn.execute(sql.SQL("delete from {} where company_id = %(c)s").format(t(table)), {"c": company})
    elif kind == "hostile_company":
        _, company, name, hours_late, k = op
        user = company - 1
        if conn.execute(sql.SQL("select 1 from {} where company_id = %s").format(t("companies")), (company,)
                        ).fetchone():
            return
        conn.execute(sql.SQL("insert into {} (company_id, name, plan, seats, region, created_at, updated_at)"
                             " values (%s, %s, 'team', 5, 'eu', %s, %s)").format(t("companies")),
                     (company, name, now, now))
        conn.execute(sql.SQL("insert into {} (user_id, company_id, email, full_name, role, created_at, updated_at)"
                             " values (%s, %s, %s, %s, 'learner', %s, %s)").format(t("users")),
                     (user, company, f"{user}@hostile.example", name, now, now))
        lesson = _nth(conn, schema, "lessons", "lesson_id", k)
        conn.execute(sql.SQL("insert into {} (user_id, lesson_id, event_type, seconds_spent, occurred_at,"
                             " created_at) values (%s, %s, 'started', 0, %s::timestamp - make_interval(hours => %s),"
                             " %s)").format(t("lesson_events")), (user, lesson, now, hours_late, now))
    elif kind == "restore_user":  # a soft delete undone
        _, k, bump = op
        user = _nth(conn, schema, "users", "user_id", k, "deleted_at is not null")
        if user is not None:
            conn.execute(sql.SQL("update {} set deleted_at = null" + (", updated_at = %s" if bump else "")
                                 + " where user_id = %s").format(t("users")), (now, user) if bump else (user,))
    elif kind == "shift_time":  # moved back, never before the moment it follows
        _, table, column, k, hours = op
        floor = {"completed_at": "enrolled_at", "ended_at": "started_at"}.get(column)
        row = _nth(conn, schema, table, KEYS[table], k,
                   f'{column} is not null' + (f' and {column} > {floor}' if floor else ''))
        if row is not None:
            moved = f"{column} - make_interval(hours => %s)"
            conn.execute(sql.SQL("update {} set {} = " + (f"greatest({floor}, {moved})" if floor else moved)
                                 + " where {} = %s").format(t(table), sql.Identifier(column),
                                                            sql.Identifier(KEYS[table])), (hours + 1, row))
    elif kind == "delete_row":  # a team (its memberships first) or one plan period, hard-deleted
        _, table, k = op
        row = _nth(conn, schema, table, KEYS[table], k)
        if row is not None:
            if table == "teams":
                conn.execute(sql.SQL("delete from {} where team_id = %s").format(t("team_memberships")), (row,))
            conn.execute(sql.SQL("delete from {} where {} = %s").format(t(table), sql.Identifier(KEYS[table])),
                         (row,))
    elif kind == "insert_course":
        _, k, with_lesson = op
        course = conn.execute(sql.SQL("insert into {} (title, category, difficulty, published_at, created_at,"
                                      " updated_at) values (%s, 'new-category', 'beginner', %s, %s, %s)"
                                      " returning course_id").format(t("courses")),
                              (f"New course {k}", now, now, now)).fetchone()[0]
        if with_lesson:
            conn.execute(sql.SQL("insert into {} (course_id, position, title, lesson_type, duration_seconds,"
                                 " created_at, updated_at) values (%s, 1, 'Intro', 'video', 300, %s, %s)").format(
                t("lessons")), (course, now, now))
    elif kind == "insert_lesson":
        _, c, kind_of = op
        course = _nth(conn, schema, "courses", "course_id", c)
        if course is not None:
            conn.execute(sql.SQL("insert into {} (course_id, position, title, lesson_type, duration_seconds,"
                                 " created_at, updated_at) select %s, coalesce(max(position), 0) + 1, 'Added', %s,"
                                 " 420, %s, %s from {} where course_id = %s").format(t("lessons"), t("lessons")),
                         (course, ["video", "lab", "quiz"][kind_of], now, now, course))
    elif kind == "insert_team":
        _, c = op
        company = _nth(conn, schema, "companies", "company_id", c)
        if company is not None:
            conn.execute(sql.SQL("insert into {} (company_id, name, created_at, updated_at) values (%s, 'New team',"
                                 " %s, %s)").format(t("teams")), (company, now, now))
    elif kind == "move_enrollment":  # to a course the user is not enrolled in yet
        _, k, c = op
        enrollment = _nth(conn, schema, "enrollments", "enrollment_id", k)
        if enrollment is None:
            return
        course = _nth(conn, schema, "courses", "course_id", c, f'course_id not in (select course_id from "{schema}"'
                      f'.enrollments where user_id = (select user_id from "{schema}".enrollments'
                      f' where enrollment_id = {int(enrollment)}))')
        if course is not None:
            conn.execute(sql.SQL("update {} set course_id = %s where enrollment_id = %s").format(t("enrollments")),
                         (course, enrollment))
    elif kind == "move_subscription":  # a period attributed to another company
        _, k, c = op
        sub = _nth(conn, schema, "subscriptions", "subscription_id", k)
        company = sub and _nth(conn, schema, "companies", "company_id", c, f'company_id <> (select company_id'
                               f' from "{schema}".subscriptions where subscription_id = {int(sub)})')
        if sub is not None and company is not None:
            conn.execute(sql.SQL("update {} set company_id = %s where subscription_id = %s").format(
                t("subscriptions")), (company, sub))
    elif kind == "collide_user":
        # a user with events moves to a twin of their company whose id is M (the fingerprint's
        # modulus) apart: the days of their events must still see the move
        _, k = op
        user = _nth(conn, schema, "users", "user_id", k, f'user_id in (select user_id from "{schema}".lesson_events)')
        if user is None:
            return
        company = conn.execute(sql.SQL("select company_id from {} where user_id = %s").format(t("users")),
                               (user,)).fetchone()[0]
        twin = company + M if company + M < 2**63 else company - M
        conn.execute(sql.SQL("insert into {c} (company_id, name, plan, seats, region, created_at, updated_at)"
                             " select %s, name || ' (twin)', plan, seats, region, created_at, updated_at from {c}"
                             " where company_id = %s on conflict do nothing").format(c=t("companies")), (twin, company))
        conn.execute(sql.SQL("update {} set company_id = %s where user_id = %s").format(t("users")), (twin, user))
    else:  # pragma: no cover
        raise AssertionError(kind)


# -- the environment -----------------------------------------------------------------------
def copy_schema(pg_env, schema: str) -> None:
    """The test data, copied into `schema` with the same keys, readable by the replica role."""
    constraints = (Path(REPO_ROOT) / "deploy/local/localenv/constraints.sql").read_text()
    with pg_env.cluster.primary.connect(APP_DB) as conn:
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("create schema {} authorization {}").format(sql.Identifier(schema),
                                                                           sql.Identifier(OWNER_ROLE)))
        conn.execute(sql.SQL("set role {}").format(sql.Identifier(OWNER_ROLE)))
        for table in TABLES:
            conn.execute(sql.SQL("create table {} (like {} including all)").format(
                sql.Identifier(schema, table), sql.Identifier("app", table)))
            conn.execute(sql.SQL("insert into {} select * from {}").format(
                sql.Identifier(schema, table), sql.Identifier("app", table)))
            key = conn.execute("select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid"
                               " and a.attnum = any(i.indkey) where i.indrelid = %s::regclass and i.indisprimary",
                               (f"{schema}.{table}",)).fetchone()[0]
            conn.execute(sql.SQL("select setval(pg_get_serial_sequence({}, {}), coalesce(max({}), 0) + 1, false)"
                                 " from {}").format(sql.Literal(f"{schema}.{table}"), sql.Literal(key),
                                                    sql.Identifier(key), sql.Identifier(schema, table)))
        foreign_keys = [line.replace("app.", f"{schema}.") for line in constraints.splitlines()
                        if "FOREIGN KEY" in line]
        conn.execute("\n".join(foreign_keys))
        conn.execute(sql.SQL("grant usage on schema {s} to {r}; grant select on all tables in schema {s} to {r}")
                     .format(s=sql.Identifier(schema), r=sql.Identifier(READONLY_ROLE)))
    pg_env.wait_for_replay()


def drop_churn_objects(pg_env, schema: str, databases: list[str]) -> None:
    with pg_env.cluster.primary.connect() as conn:
        for db in databases:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(db)))
    with pg_env.cluster.primary.connect(APP_DB) as conn:
        conn.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(schema)))


def create_warehouse_db(pg_env, name: str) -> None:
    with pg_env.cluster.primary.connect() as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("create database {} owner {}").format(sql.Identifier(name),
                                                                   sql.Identifier(WAREHOUSE_ROLE)))
    with pg_env.cluster.primary.connect(name) as conn:
        conn.execute("create extension if not exists postgres_fdw")
        conn.execute(sql.SQL("grant usage on foreign data wrapper postgres_fdw to {}").format(
            sql.Identifier(WAREHOUSE_ROLE)))


class Churn:
    def __init__(self, put, pg_env, schema: str, reference: dict[str, str]):
        self.put, self.pg_env, self.schema, self.reference = put, pg_env, schema, reference
        # Per example, the differing days are merged into ranges as production does (gap 7) or
        # only when adjacent (gap 0), where a day whose change the fingerprint missed is not
        # rebuilt merely because it lies between two days that differ.
        self.runners = {gap: Runner(replace(put.platform, daily_facts=replace(put.platform.daily_facts,
                                                                              max_gap_days=gap)),
                                    put.instance, progress=lambda _m: None) for gap in GAPS}
        self.cursor = evaluate_automation(put.defs, put.instance).cursor
        manifest = put.platform.manifest
        self.relations = sorted(
            (n["schema"], n.get("alias") or n["name"]) for n in manifest["nodes"].values()
            if n["resource_type"] == "model" and n["schema"] in ("marts", "reporting")
        )

    def cycle(self, runner: Runner) -> None:
        self.cursor = automation_cycle(runner, self.put.instance, self.cursor)

    @contextmanager
    def full_refresh(self) -> Iterator[None]:
        """A `dbt run --full-refresh` into the reference warehouse while the block runs (it
        reads only the replica and writes only its own warehouse), finished and checked at
        the block's end."""
        target = self.put.platform.settings.dbt_target
        env = {**self.put.environ, **self.reference}
        with subprocess.Popen(
            [str(Path(sys.executable).parent / "dbt"), "run", "--full-refresh", "--target", target,
             "--profiles-dir", ".", "--target-path", self.reference["_TARGET_PATH"], "--quiet"],
            cwd=REPO_ROOT / "dbt", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ) as proc:
            try:
                yield
            except BaseException:
                proc.kill()  # the example failed already: no comparison to wait for
                raise
            finally:
                try:
                    output, _ = proc.communicate(timeout=600)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise
        assert proc.returncode == 0, output[-6000:]

    def rows(self, environ: dict[str, str]) -> dict[tuple[str, str], tuple[list[str], Counter]]:
        out = {}
        if self.put.platform.settings.engine == "duckdb":
            import duckdb

            con = duckdb.connect(environ["DUCKDB_PATH"], read_only=True)
            try:
                for schema, name in self.relations:
                    cur = con.execute(f'select * from "{schema}"."{name}"')
                    out[(schema, name)] = self._multiset(cur.description, cur.fetchall())
            finally:
                con.close()
        else:
            with psycopg.connect(host=environ["WAREHOUSE_PG_HOST"], port=environ["WAREHOUSE_PG_PORT"],
                                 dbname=environ["WAREHOUSE_PG_DB"], user=environ["WAREHOUSE_PG_USER"],
                                 password=environ["WAREHOUSE_PG_PASSWORD"]) as conn:
                for schema, name in self.relations:
                    cur = conn.execute(sql.SQL("select * from {}").format(sql.Identifier(schema, name)))
                    out[(schema, name)] = self._multiset(cur.description, cur.fetchall())
        return out

    @staticmethod
    def _multiset(description, rows) -> tuple[list[str], Counter]:
        names = [d[0] for d in description]
        keep = [i for i, n in enumerate(names) if n not in BOOKKEEPING]
        # floats to 9 significant digits: an average summed in another order may differ in its last bits
        norm = lambda v: float(f"{v:.9g}") if isinstance(v, float) else v  # noqa: E731
        return [names[i] for i in keep], Counter(tuple(norm(r[i]) for i in keep) for r in rows)

    def differences(self) -> list[str]:
        mine, theirs = self.rows(self.put.environ), self.rows({**self.put.environ, **self.reference})
        problems = []
        for relation in self.relations:
            (columns, a), (_, b) = mine[relation], theirs[relation]
            only_incremental, only_full = a - b, b - a
            if only_incremental or only_full:
                problems.append(
                    f"{'.'.join(relation)}: {sum(only_incremental.values())} rows only in the incremental result, "
                    f"{sum(only_full.values())} only in the full refresh; columns {columns}; e.g. "
                    f"{list(only_incremental)[:2]} vs {list(only_full)[:2]}")
        return problems



def churn_fixture(engine: str):
    @pytest.fixture(scope="module")
    def churn(pg_env, tmp_path_factory):
        folder = tmp_path_factory.mktemp(f"churn-{engine}")
        schema = f"churn_{engine}"
        databases = [f"wh_{schema}", f"ref_{schema}"] if engine == "pg" else []
        try:
            copy_schema(pg_env, schema)
            overrides = {"REPLICA_SCHEMA": schema}
            reference = {"DUCKDB_PATH": str(folder / "full-refresh.duckdb"),
                         "_TARGET_PATH": str(folder / "dbt-reference")}
            if engine == "pg":
                for db in databases:
                    create_warehouse_db(pg_env, db)
                overrides["WAREHOUSE_PG_DB"] = f"wh_{schema}"
                overrides["WAREHOUSE_PG_URL"] = pg_env.values["WAREHOUSE_PG_URL"].rsplit("/", 1)[0] + f"/wh_{schema}"
                reference["WAREHOUSE_PG_DB"] = f"ref_{schema}"
            with platform_under_test(pg_env, folder, engine, overrides, in_memory=True) as put:
                summary = run_all(put.platform, put.instance, progress=lambda _m: None, consumers=False)
                consumers = set(put.platform.exports.asset.keys) | {d.key for d in put.platform.dashboards}
                assert summary["materialized"] >= summary["expected"] - consumers
                yield Churn(put, pg_env, schema, reference)
        finally:
            # the worker's cluster serves other tests after this module
            drop_churn_objects(pg_env, schema, databases)

    return churn


def churn_property():
    """The property, for the `churn` fixture of the module that uses it."""
    # max_examples random ones after the two explicit ones: CHURN_EXAMPLES in all
    @settings(max_examples=max(EXAMPLES - 2, 1), derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(ops=st.lists(OPS, min_size=1, max_size=6), gap=st.sampled_from(GAPS))
    @example(ops=EVERY_KIND, gap=0)
    # alone, so that no other change makes the days of the user's events differ
    @example(ops=[("collide_user", 3)], gap=0)
    def test_marts_equal_a_full_refresh_after_any_churn(churn, ops, gap):
        started = time.monotonic()
        with churn.pg_env.primary() as conn, conn.transaction():
            for op in ops:
                apply(conn, churn.schema, op)
        churn.pg_env.wait_for_replay()
        checks = []
        runner = churn.runners[gap]
        runner.progress = lambda m: checks.append(m) if "matches_replica" in m else None
        with churn.full_refresh():
            churn.cycle(runner)
            # every run of the daily facts matched the replica on the days it rebuilt
            assert not checks, (ops, gap, checks)
            # the automation path leaves nothing to do, and no day differs from the replica
            assert runner.changed_days() == []
        problems = churn.differences()
        assert not problems, f"after {ops} (gap {gap}):\n" + "\n".join(problems)
        print(f"churn example ({len(ops)} changes, gap {gap}) equal to a full refresh in "
              f"{time.monotonic() - started:.1f}s")

    return test_marts_equal_a_full_refresh_after_any_churn
