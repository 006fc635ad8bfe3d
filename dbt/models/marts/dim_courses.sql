-- Courses with their lessons rolled up.
with courses as (

    select * from {{ ref('stg_app__courses') }}

),

lessons as (

    select
        course_id,
        count(*) as lesson_count,
        sum(case when lesson_type = 'video' then 1 else 0 end) as video_lessons,
        sum(case when lesson_type = 'lab' then 1 else 0 end) as lab_lessons,
        sum(case when lesson_type = 'quiz' then 1 else 0 end) as quiz_lessons,
        sum(duration_seconds) as total_duration_seconds
    from {{ ref('stg_app__lessons') }}
    group by course_id

)

select
    courses.course_id,
    courses.course_title,
    courses.course_category,
    courses.course_difficulty,
    coalesce(lessons.lesson_count, 0) as lesson_count,
    coalesce(lessons.video_lessons, 0) as video_lessons,
    coalesce(lessons.lab_lessons, 0) as lab_lessons,
    coalesce(lessons.quiz_lessons, 0) as quiz_lessons,
    coalesce(lessons.total_duration_seconds, 0) as total_duration_seconds,
    courses.published_at,
    courses.created_at,
    courses.updated_at
from courses
left join lessons
    on lessons.course_id = courses.course_id
