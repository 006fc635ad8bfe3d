-- Client companies with their current plan, recurring revenue and head counts.
with companies as (

    select * from {{ ref('stg_app__companies') }}

),

current_subscription as (

    -- one plan period is current at a time; the latest start wins should two overlap
    select
        company_id,
        subscription_id,
        plan,
        monthly_amount,
        currency,
        started_at,
        row_number() over (partition by company_id order by started_at desc, subscription_id desc) as recency
    from {{ ref('int_subscription_periods') }}
    where is_current

),

users as (

    select
        company_id,
        sum(case when is_deleted then 0 else 1 end) as active_users,
        sum(case when is_deleted then 1 else 0 end) as deleted_users
    from {{ ref('stg_app__users') }}
    group by company_id

),

teams as (

    select company_id, count(*) as team_count
    from {{ ref('stg_app__teams') }}
    group by company_id

)

select
    companies.company_id,
    companies.company_name,
    companies.region,
    companies.current_plan,
    companies.seats,
    current_subscription.subscription_id as current_subscription_id,
    coalesce(current_subscription.monthly_amount, 0) as current_mrr,
    current_subscription.currency,
    current_subscription.started_at as current_plan_started_at,
    coalesce(users.active_users, 0) as active_users,
    coalesce(users.deleted_users, 0) as deleted_users,
    coalesce(teams.team_count, 0) as team_count,
    case
        when companies.seats > 0
            then cast(coalesce(users.active_users, 0) as numeric(12, 4)) / companies.seats
    end as seat_utilisation,
    companies.created_at,
    companies.updated_at
from companies
left join current_subscription
    on current_subscription.company_id = companies.company_id
    and current_subscription.recency = 1
left join users
    on users.company_id = companies.company_id
left join teams
    on teams.company_id = companies.company_id
