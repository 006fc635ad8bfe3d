-- A learning session: a learner's consecutive events on one UTC day with no gap longer than
-- var('session_gap_minutes'). Sessions are cut at midnight so that every day (and so every
-- daily partition of the facts) can be computed on its own.
-- Reads the warehouse copy of the events (fct_lesson_events), not the replica. With a window
-- (a daily partition run of fct_daily_learning_activity, macros/incremental.sql), only the
-- window's days, whole.
{%- set days = whole_days(event_window()) %}
with events as (

    select
        event_id,
        user_id,
        company_id,
        course_id,
        lesson_id,
        event_type,
        seconds_spent,
        occurred_at,
        event_date
    from {{ ref('fct_lesson_events') }}
    {%- if days %}
    where {{ in_event_window('occurred_at', days) }}
    {%- endif %}

),

with_previous as (

    select
        events.*,
        lag(occurred_at) over (
            partition by user_id, event_date
            order by occurred_at, event_id
        ) as previous_occurred_at
    from events

),

flagged as (

    select
        with_previous.*,
        case
            when previous_occurred_at is null then 1
            when previous_occurred_at
                < {{ dbt.dateadd('minute', -1 * (var('session_gap_minutes') | int), 'occurred_at') }}
                then 1
            else 0
        end as is_session_start
    from with_previous

)

select
    event_id,
    user_id,
    company_id,
    course_id,
    lesson_id,
    event_type,
    seconds_spent,
    occurred_at,
    event_date,
    is_session_start,
    sum(is_session_start) over (
        partition by user_id, event_date
        order by occurred_at, event_id
        rows between unbounded preceding and current row
    ) as session_number
from flagged
