-- Plan periods with an effective end: a period that is no longer active but carries no
-- ended_at (canceled in the app without an end date) ends at its last update.
-- Reused by dim_companies (current plan) and fct_subscription_mrr (plan periods in force
-- at each month's close).
with periods as (

    select
        subscription_id,
        company_id,
        plan,
        seats,
        monthly_amount,
        currency,
        subscription_status,
        started_at,
        case
            when ended_at is not null then ended_at
            when subscription_status <> 'active' then updated_at
        end as ended_at
    from {{ ref('stg_app__subscriptions') }}

)

select
    periods.*,
    ended_at is null as is_current
from periods
