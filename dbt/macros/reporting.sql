{#- The reporting models' "last N days" (30 by default, up to now in UTC), one definition. -#}
{% macro within_last_days(date_column, days=30) -%}
  {{ date_column }} >= cast({{ dbt.dateadd('day', -1 * days, utc_now()) }} as date)
{%- endmacro %}


{#- Distinct learners with an event in the last `days` days, per `by` (company_id, course_id). -#}
{% macro active_learners_last_days(by, days=30) -%}
    select {{ by }}, count(distinct user_id) as active_learners_{{ days }}d
    from {{ ref('fct_lesson_events') }}
    where {{ within_last_days('event_date', days) }}
    group by {{ by }}
{%- endmacro %}
