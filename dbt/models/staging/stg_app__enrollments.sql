select
    cast(enrollment_id as bigint) as enrollment_id,
    cast(user_id as bigint) as user_id,
    cast(course_id as bigint) as course_id,
    status as enrollment_status,
    enrolled_at,
    completed_at,
    created_at,
    updated_at
from {{ source('app', 'enrollments') }}
