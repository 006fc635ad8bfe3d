{#- Engine differences the models need, each behind one dispatched macro. -#}

{#- The current time in UTC as a `timestamp` (without time zone), the type every
    operational timestamp has. -#}
{% macro utc_now() %}
  {{ return(adapter.dispatch('utc_now')()) }}
{% endmacro %}

{% macro default__utc_now() -%}
  cast(current_timestamp at time zone 'UTC' as timestamp)
{%- endmacro %}

{% macro redshift__utc_now() -%}
  getdate()
{%- endmacro %}


{#- Physical layout of a big table, as model config: dist/sort keys on Redshift, indexes
    on PostgreSQL, none on DuckDB (columnar, zone maps). Used as
    `{{ config(**table_layout(dist='user_id', sort=['occurred_at'], indexes=[...])) }}`;
    never returns an empty dict (an empty config() call is an error). -#}
{% macro table_layout(dist=none, sort=none, indexes=none) %}
  {{ return(adapter.dispatch('table_layout')(dist, sort, indexes)) }}
{% endmacro %}

{% macro default__table_layout(dist, sort, indexes) %}
  {{ return({'indexes': []}) }}
{% endmacro %}

{% macro postgres__table_layout(dist, sort, indexes) %}
  {{ return({'indexes': indexes or []}) }}
{% endmacro %}

{% macro redshift__table_layout(dist, sort, indexes) %}
  {% set layout = {'indexes': []} %}
  {% if dist %}{% do layout.update({'dist': dist}) %}{% endif %}
  {% if sort %}{% do layout.update({'sort': sort}) %}{% endif %}
  {{ return(layout) }}
{% endmacro %}
