select
    cast(subscription_id as bigint) as subscription_id,
    cast(company_id as bigint) as company_id,
    plan,
    cast(seats as integer) as seats,
    cast(monthly_amount as numeric(12, 2)) as monthly_amount,
    currency,
    status as subscription_status,
    started_at,
    ended_at,
    ended_at is null as is_current,
    created_at,
    updated_at
from {{ source('app', 'subscriptions') }}
