-- One row per client company: plan and revenue, seats in use, enrollments and completions,
-- and learning in the last 30 days. For account managers and customer success.
with companies as (

    select * from {{ ref('dim_companies') }}

),

enrollments as (

    select
        company_id,
        count(*) as enrollments,
        sum(case when is_completed then 1 else 0 end) as completed_enrollments,
        sum(case when has_certificate then 1 else 0 end) as certificates
    from {{ ref('fct_enrollments') }}
    group by company_id

),

recent_activity as (

    select
        company_id,
        sum(learning_seconds) as learning_seconds_30d,
        sum(sessions) as sessions_30d
    from {{ ref('fct_daily_learning_activity') }}
    where {{ within_last_days('activity_date') }}
    group by company_id

),

recent_learners as (

    {{ active_learners_last_days('company_id') }}

)

select
    companies.company_id,
    companies.company_name,
    companies.region,
    companies.current_plan,
    companies.current_mrr,
    companies.seats,
    companies.active_users,
    companies.seat_utilisation,
    coalesce(enrollments.enrollments, 0) as enrollments,
    coalesce(enrollments.completed_enrollments, 0) as completed_enrollments,
    case
        when enrollments.enrollments > 0
            then cast(enrollments.completed_enrollments as numeric(12, 4)) / enrollments.enrollments
    end as completion_rate,
    coalesce(enrollments.certificates, 0) as certificates,
    coalesce(recent_learners.active_learners_30d, 0) as active_learners_30d,
    coalesce(recent_activity.sessions_30d, 0) as sessions_30d,
    cast(coalesce(recent_activity.learning_seconds_30d, 0) as numeric(18, 2)) / 3600 as learning_hours_30d
from companies
left join enrollments
    on enrollments.company_id = companies.company_id
left join recent_activity
    on recent_activity.company_id = companies.company_id
left join recent_learners
    on recent_learners.company_id = companies.company_id
