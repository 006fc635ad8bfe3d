select
    cast(certificate_id as bigint) as certificate_id,
    cast(enrollment_id as bigint) as enrollment_id,
    cast(user_id as bigint) as user_id,
    cast(course_id as bigint) as course_id,
    issued_at,
    created_at
from {{ source('app', 'certificates') }}
