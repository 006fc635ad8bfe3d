"""A dirty copy of the operational schema, for the dirty-data test: `app_dirty` on the
primary (replicated to the replica like everything else), a constraint-free copy of `app`
readable by the federation role, with known bad rows added. The shared `app` schema is
never touched (other tests compare its checksums and counts).

Every bad row is bad in exactly one way, and each kind comes in its own number of rows, so
each check's failure count names the kind it caught.
"""

from __future__ import annotations

from psycopg import sql

DIRTY_SCHEMA = "app_dirty"
TABLES = ("companies", "users", "teams", "team_memberships", "courses", "lessons", "enrollments",
          "lesson_events", "quiz_attempts", "certificates", "subscriptions")

# kind -> how many rows of it are injected (distinct numbers on purpose)
INJECTED = {
    "duplicate_event_id": 1,       # a second row with an existing event_id
    "null_event_id": 2,            # event_id is NULL
    "orphan_event_user": 3,        # user_id not in users
    "future_event": 4,             # occurred_at two days ahead
    "negative_duration": 5,        # seconds_spent < 0
    "event_after_soft_delete": 6,  # occurred after the user's deleted_at
    "orphan_enrollment_course": 7,  # course_id not in courses
}


def create_dirty_schema(admin, readonly_role: str) -> dict[str, int]:
    """As the superuser on the primary's operational database: (re)create the dirty copy and
    inject the bad rows. Returns INJECTED."""
    admin.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(DIRTY_SCHEMA)))
    admin.execute(sql.SQL("create schema {}").format(sql.Identifier(DIRTY_SCHEMA)))
    for table in TABLES:
        admin.execute(sql.SQL("create table {} as select * from {}").format(
            sql.Identifier(DIRTY_SCHEMA, table), sql.Identifier("app", table)))
    events = sql.Identifier(DIRTY_SCHEMA, "lesson_events")
    # Clean rows to copy from: old events (more than a day ago) of users who are not deleted.
    admin.execute(sql.SQL(
        "create temp table clean_events as"
        " select e.* from {} e join {} u on u.user_id = e.user_id"
        " where u.deleted_at is null and e.occurred_at < (now() at time zone 'utc') - interval '1 day'"
        "   and e.seconds_spent > 0"
        " order by e.event_id limit 100"
    ).format(events, sql.Identifier(DIRTY_SCHEMA, "users")))
    next_id = admin.execute(sql.SQL("select max(event_id) + 1000 from {}").format(events)).fetchone()[0]
    columns = "user_id, lesson_id, event_type, seconds_spent, occurred_at, created_at"

    def add(kind: str, select: sql.Composable, offset: int) -> None:
        n = INJECTED[kind]
        admin.execute(sql.SQL("insert into {} (event_id, " + columns + ") ").format(events) + select
                      + sql.SQL(" from clean_events order by event_id offset {} limit {}").format(
                          sql.Literal(offset), sql.Literal(n)))

    def new_id(offset: int) -> sql.Composable:
        return sql.SQL("{} + row_number() over (order by event_id)").format(sql.Literal(next_id + offset))

    add("duplicate_event_id", sql.SQL("select event_id, " + columns), 0)
    add("null_event_id", sql.SQL("select null, " + columns), 10)
    add("orphan_event_user", sql.SQL(
        "select {}, 900000000 + event_id, lesson_id, event_type, seconds_spent, occurred_at, created_at"
    ).format(new_id(100)), 20)
    add("future_event", sql.SQL(
        "select {}, user_id, lesson_id, event_type, seconds_spent,"
        " (now() at time zone 'utc') + interval '2 days', (now() at time zone 'utc')"
    ).format(new_id(200)), 30)
    add("negative_duration", sql.SQL(
        "select {}, user_id, lesson_id, 'progress', -30, occurred_at, created_at"
    ).format(new_id(300)), 40)
    # Events of soft-deleted users, an hour after their deletion (late-synced devices).
    deleted = admin.execute(sql.SQL(
        "select user_id, deleted_at from {} where deleted_at < (now() at time zone 'utc') - interval '2 hours'"
        " order by user_id limit 1"
    ).format(sql.Identifier(DIRTY_SCHEMA, "users"))).fetchone()
    if deleted is None:  # the demo data has none: soft-delete one, in the dirty copy only
        deleted = admin.execute(sql.SQL(
            "update {u} set deleted_at = (now() at time zone 'utc') - interval '3 days',"
            " updated_at = (now() at time zone 'utc') - interval '3 days'"
            " where user_id = (select min(user_id) from {u} where deleted_at is null)"
            " returning user_id, deleted_at"
        ).format(u=sql.Identifier(DIRTY_SCHEMA, "users"))).fetchone()
    user_id, deleted_at = deleted
    add("event_after_soft_delete", sql.SQL(
        "select {}, {}, lesson_id, event_type, seconds_spent, {} + interval '1 hour', {} + interval '1 hour'"
    ).format(new_id(400), sql.Literal(user_id), sql.Literal(deleted_at), sql.Literal(deleted_at)), 50)
    enrollments = sql.Identifier(DIRTY_SCHEMA, "enrollments")
    admin.execute(sql.SQL(
        "insert into {e} (enrollment_id, user_id, course_id, status, enrolled_at, completed_at, created_at, updated_at)"
        " select (select max(enrollment_id) from {e}) + row_number() over (order by enrollment_id),"
        " user_id, 900000000 + course_id, status, enrolled_at, completed_at, created_at, updated_at"
        " from {e} order by enrollment_id limit {n}"
    ).format(e=enrollments, n=sql.Literal(INJECTED["orphan_enrollment_course"])))
    admin.execute("drop table clean_events")
    admin.execute(sql.SQL("grant usage on schema {s} to {r}; grant select on all tables in schema {s} to {r}").format(
        s=sql.Identifier(DIRTY_SCHEMA), r=sql.Identifier(readonly_role)))
    admin.execute("analyze")
    return dict(INJECTED)


def drop_dirty_schema(admin) -> None:
    admin.execute(sql.SQL("drop schema if exists {} cascade").format(sql.Identifier(DIRTY_SCHEMA)))
