{#- Custom schema names are used as they are (staging, marts, reporting, snapshots), not
    prefixed with the target schema: every environment has its own warehouse, so the
    schema names are the same everywhere and the orchestrator can rely on them. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
  {%- if custom_schema_name is none -%}
    {{ target.schema }}
  {%- else -%}
    {{ custom_schema_name | trim }}
  {%- endif -%}
{%- endmacro %}
