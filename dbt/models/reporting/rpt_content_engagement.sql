-- One row per course: its shape, enrollments and completions, certificates, and how much
-- it is used (learners, sessions, minutes per session) over the last 30 days. For the
-- content team.
with courses as (

    select * from {{ ref('dim_courses') }}

),

enrollments as (

    select
        course_id,
        count(*) as enrollments,
        sum(case when is_completed then 1 else 0 end) as completed_enrollments,
        sum(case when is_dropped then 1 else 0 end) as dropped_enrollments,
        sum(case when has_certificate then 1 else 0 end) as certificates,
        avg(cast(days_to_complete as numeric(12, 2))) as avg_days_to_complete
    from {{ ref('fct_enrollments') }}
    group by course_id

),

recent_activity as (

    select
        course_id,
        sum(sessions) as sessions_30d,
        sum(events) as events_30d,
        sum(lessons_completed) as lessons_completed_30d,
        sum(learning_seconds) as learning_seconds_30d
    from {{ ref('fct_daily_learning_activity') }}
    where {{ within_last_days('activity_date') }}
    group by course_id

),

recent_learners as (

    {{ active_learners_last_days('course_id') }}

)

select
    courses.course_id,
    courses.course_title,
    courses.course_category,
    courses.course_difficulty,
    courses.lesson_count,
    courses.total_duration_seconds,
    coalesce(enrollments.enrollments, 0) as enrollments,
    coalesce(enrollments.completed_enrollments, 0) as completed_enrollments,
    coalesce(enrollments.dropped_enrollments, 0) as dropped_enrollments,
    case
        when enrollments.enrollments > 0
            then cast(enrollments.completed_enrollments as numeric(12, 4)) / enrollments.enrollments
    end as completion_rate,
    coalesce(enrollments.certificates, 0) as certificates,
    enrollments.avg_days_to_complete,
    coalesce(recent_learners.active_learners_30d, 0) as active_learners_30d,
    coalesce(recent_activity.sessions_30d, 0) as sessions_30d,
    coalesce(recent_activity.events_30d, 0) as events_30d,
    coalesce(recent_activity.lessons_completed_30d, 0) as lessons_completed_30d,
    case
        when recent_activity.sessions_30d > 0
            then cast(recent_activity.learning_seconds_30d as numeric(18, 2)) / 60 / recent_activity.sessions_30d
    end as avg_minutes_per_session_30d
from courses
left join enrollments
    on enrollments.course_id = courses.course_id
left join recent_activity
    on recent_activity.course_id = courses.course_id
left join recent_learners
    on recent_learners.course_id = courses.course_id
