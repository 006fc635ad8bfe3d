select
    cast(company_id as bigint) as company_id,
    name as company_name,
    plan as current_plan,
    cast(seats as integer) as seats,
    region,
    created_at,
    updated_at
from {{ source('app', 'companies') }}
