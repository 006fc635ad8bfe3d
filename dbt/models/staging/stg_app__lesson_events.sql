-- occurred_at and created_at pass through untouched (no cast, no expression), so a range
-- filter on them reaches the replica's indexes through every engine's federation.
select
    cast(event_id as bigint) as event_id,
    cast(user_id as bigint) as user_id,
    cast(lesson_id as bigint) as lesson_id,
    event_type,
    cast(seconds_spent as integer) as seconds_spent,
    occurred_at,
    created_at
from {{ source('app', 'lesson_events') }}
