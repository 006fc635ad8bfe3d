{#- Generic test: no two rows share the same values in `combination_of_columns` (a
    compound key). Written here because the project installs no packages. -#}
{% test unique_combination_of_columns(model, combination_of_columns) %}
    {%- set columns = combination_of_columns | join(', ') %}
    select {{ columns }}, count(*) as duplicates
    from {{ model }}
    group by {{ columns }}
    having count(*) > 1
{% endtest %}
