-- Users, including soft-deleted ones (flagged, personal data already removed in staging),
-- so that every fact row still finds its user.
with users as (

    select * from {{ ref('stg_app__users') }}

),

memberships as (

    select
        memberships.user_id,
        memberships.team_id,
        teams.team_name,
        count(*) over (partition by memberships.user_id) as team_count,
        row_number() over (
            partition by memberships.user_id
            order by memberships.joined_at, memberships.membership_id
        ) as membership_order
    from {{ ref('stg_app__team_memberships') }} as memberships
    inner join {{ ref('stg_app__teams') }} as teams
        on teams.team_id = memberships.team_id

)

select
    users.user_id,
    users.company_id,
    users.email,
    users.full_name,
    users.user_role,
    users.is_deleted,
    memberships.team_id as first_team_id,
    memberships.team_name as first_team_name,
    coalesce(memberships.team_count, 0) as team_count,
    users.created_at,
    users.updated_at,
    users.deleted_at
from users
left join memberships
    on memberships.user_id = users.user_id
    and memberships.membership_order = 1
