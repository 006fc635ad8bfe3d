-- Recurring revenue by month and plan: MRR, ARR, paying companies and the MRR movements
-- (new, reactivation, expansion, contraction, churn). For finance.
select
    month_start,
    coalesce(plan, 'none') as plan,
    count(distinct case when mrr > 0 then company_id end) as paying_companies,
    sum(mrr) as mrr,
    sum(mrr) * 12 as arr,
    sum(new_mrr) as new_mrr,
    sum(reactivation_mrr) as reactivation_mrr,
    sum(expansion_mrr) as expansion_mrr,
    sum(contraction_mrr) as contraction_mrr,
    sum(churned_mrr) as churned_mrr,
    sum(mrr_change) as net_new_mrr
from {{ ref('fct_subscription_mrr') }}
group by month_start, coalesce(plan, 'none')
