select
    cast(team_id as bigint) as team_id,
    cast(company_id as bigint) as company_id,
    name as team_name,
    created_at,
    updated_at
from {{ source('app', 'teams') }}
