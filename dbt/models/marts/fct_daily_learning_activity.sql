{#-
  Per UTC day, so built per day: sessions are cut at midnight, and a day reads only that
  day's events. Tag daily_partitioned: in Dagster it shares the daily partitions (and the
  runs) of fct_lesson_events, which it reads.
    window     (a partition run, or vars window_start/window_end): the window's days, whole,
               are deleted (pre-hook, same transaction) and recomputed from
               fct_lesson_events; nothing outside them is touched. Appended; a changed
               column list fails the run (rebuild it with --full-refresh).
    otherwise  every day recomputed (a plain `dbt build`: the table emptied and refilled in
               one transaction; a full refresh or first build: a new table), including those
               a watermark run of fct_lesson_events added late events to.
  The window is read at run time (macros/incremental.sql), so the config does not depend on it.
-#}
{{ config(
    materialized='incremental',
    incremental_strategy='append',
    on_schema_change='fail',
    tags=['daily_partitioned'],
    pre_hook="{{ delete_event_window('activity_date', days=true, all_otherwise=true) }}",
    **table_layout(dist='even', sort=['activity_date'])
) }}
-- Learning activity per company, course and day, with sessions (a session that touches two
-- courses counts once for each).
with events as (

    select * from {{ ref('int_lesson_events_sessionised') }}

),

per_session as (

    -- one row per learner session and course on a day
    select
        company_id,
        course_id,
        event_date,
        user_id,
        session_number,
        count(*) as events,
        sum(case when event_type = 'started' then 1 else 0 end) as lessons_started,
        sum(case when event_type = 'completed' then 1 else 0 end) as lessons_completed,
        sum(seconds_spent) as learning_seconds
    from events
    group by company_id, course_id, event_date, user_id, session_number

)

select
    company_id,
    course_id,
    event_date as activity_date,
    count(distinct user_id) as active_learners,
    count(*) as sessions,
    sum(events) as events,
    sum(lessons_started) as lessons_started,
    sum(lessons_completed) as lessons_completed,
    sum(learning_seconds) as learning_seconds
from per_session
group by company_id, course_id, event_date
