{{ config(**table_layout(dist='even', sort=['activity_date'])) }}
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
