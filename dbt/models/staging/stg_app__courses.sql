select
    cast(course_id as bigint) as course_id,
    title as course_title,
    category as course_category,
    difficulty as course_difficulty,
    published_at,
    created_at,
    updated_at
from {{ source('app', 'courses') }}
