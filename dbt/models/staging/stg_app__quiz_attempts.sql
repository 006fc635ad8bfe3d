select
    cast(attempt_id as bigint) as attempt_id,
    cast(user_id as bigint) as user_id,
    cast(lesson_id as bigint) as lesson_id,
    cast(score as numeric(5, 2)) as score,
    passed as is_passed,
    attempted_at,
    created_at
from {{ source('app', 'quiz_attempts') }}
