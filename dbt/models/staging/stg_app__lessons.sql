select
    cast(lesson_id as bigint) as lesson_id,
    cast(course_id as bigint) as course_id,
    cast("position" as integer) as lesson_position,
    title as lesson_title,
    lesson_type,
    cast(duration_seconds as integer) as duration_seconds,
    created_at,
    updated_at
from {{ source('app', 'lessons') }}
