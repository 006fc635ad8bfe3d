-- One row per calendar day in [var('date_spine_start'), var('date_spine_end')).
-- dbt.date_spine is portable (no generate_series, which Redshift only has on the leader node).
with days as (

    {{ dbt.date_spine(
        'day',
        "cast('" ~ var('date_spine_start') ~ "' as date)",
        "cast('" ~ var('date_spine_end') ~ "' as date)"
    ) }}

)

select
    cast(date_day as date) as date_day,
    cast(extract(year from date_day) as integer) as year_number,
    cast(extract(quarter from date_day) as integer) as quarter_number,
    cast(extract(month from date_day) as integer) as month_number,
    cast(extract(day from date_day) as integer) as day_of_month,
    -- 0 = Sunday ... 6 = Saturday on every engine
    cast(extract(dow from date_day) as integer) as day_of_week,
    extract(dow from date_day) in (0, 6) as is_weekend,
    cast({{ dbt.date_trunc('week', 'date_day') }} as date) as week_start,
    cast({{ dbt.date_trunc('month', 'date_day') }} as date) as month_start,
    cast({{ dbt.date_trunc('quarter', 'date_day') }} as date) as quarter_start,
    cast({{ dbt.date_trunc('year', 'date_day') }} as date) as year_start
from days
