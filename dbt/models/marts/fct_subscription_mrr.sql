-- Monthly recurring revenue per company and month: the plan periods in force at the
-- month's close (for the current month: now), from the company's first period to the
-- current month, with the movement against the previous month.
with periods as (

    select * from {{ ref('int_subscription_periods') }}

),

months as (

    select distinct month_start
    from {{ ref('dim_date') }}

),

company_months as (

    select
        first_period.company_id,
        months.month_start,
        case
            when {{ dbt.dateadd('month', 1, 'months.month_start') }} < {{ utc_now() }}
                then cast({{ dbt.dateadd('month', 1, 'months.month_start') }} as timestamp)
            else {{ utc_now() }}
        end as measured_at
    from (
        select company_id, min(started_at) as first_started_at
        from periods
        group by company_id
    ) as first_period
    inner join months
        on months.month_start >= cast({{ dbt.date_trunc('month', 'first_period.first_started_at') }} as date)
        and months.month_start <= cast({{ dbt.date_trunc('month', utc_now()) }} as date)

),

in_force as (

    select
        company_months.company_id,
        company_months.month_start,
        coalesce(sum(periods.monthly_amount), 0) as mrr,
        count(periods.subscription_id) as subscriptions_in_force,
        -- one plan period is in force at a time
        max(periods.plan) as plan,
        max(periods.seats) as seats
    from company_months
    left join periods
        on periods.company_id = company_months.company_id
        and periods.started_at <= company_months.measured_at
        and (periods.ended_at is null or periods.ended_at > company_months.measured_at)
    group by company_months.company_id, company_months.month_start

),

with_previous as (

    select
        in_force.*,
        lag(mrr) over (partition by company_id order by month_start) as previous_mrr
    from in_force

)

select
    company_id,
    month_start,
    plan,
    seats,
    mrr,
    coalesce(previous_mrr, 0) as previous_mrr,
    mrr - coalesce(previous_mrr, 0) as mrr_change,
    case
        when coalesce(previous_mrr, 0) = 0 and mrr > 0 and previous_mrr is null then 'new'
        when coalesce(previous_mrr, 0) = 0 and mrr > 0 then 'reactivation'
        when previous_mrr > 0 and mrr = 0 then 'churn'
        when mrr > previous_mrr then 'expansion'
        when mrr < previous_mrr then 'contraction'
        when mrr > 0 then 'flat'
        else 'inactive'
    end as mrr_movement,
    case when previous_mrr is null and mrr > 0 then mrr else 0 end as new_mrr,
    case when previous_mrr = 0 and mrr > 0 then mrr else 0 end as reactivation_mrr,
    case when previous_mrr > 0 and mrr > previous_mrr then mrr - previous_mrr else 0 end as expansion_mrr,
    case when mrr > 0 and mrr < previous_mrr then previous_mrr - mrr else 0 end as contraction_mrr,
    case when previous_mrr > 0 and mrr = 0 then previous_mrr else 0 end as churned_mrr,
    subscriptions_in_force
from with_previous
