select
    cast(membership_id as bigint) as membership_id,
    cast(team_id as bigint) as team_id,
    cast(user_id as bigint) as user_id,
    joined_at,
    created_at,
    updated_at
from {{ source('app', 'team_memberships') }}
