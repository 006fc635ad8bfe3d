{#- Generic data-quality tests on the federated sources (written here: the project installs
    no packages). Each returns the offending rows, so a failure reports how many there are.
    Their severity is set where they are used (models/staging/_app__sources.yml), with why. -#}

{#- `column_name` is negative (a duration, an amount). -#}
{% test not_negative(model, column_name) %}
    select *
    from {{ model }}
    where {{ column_name }} < 0
{% endtest %}


{#- `column_name` lies more than `tolerance_minutes` ahead of now (UTC): a clock that is
    wrong, since nothing can have happened yet. -#}
{% test not_in_future(model, column_name, tolerance_minutes=60) %}
    select *
    from {{ model }}
    where {{ column_name }} > {{ dbt.dateadd('minute', tolerance_minutes | int, utc_now()) }}
{% endtest %}


{#- Rows of `model` whose `column_name` (a time) is after the soft deletion of the user they
    belong to: `to` is the users relation, `field` its key, `deleted_at` its deletion time,
    `user_key` the column of `model` pointing at it. -#}
{% test not_after_soft_delete(model, column_name, to, field='user_id', user_key='user_id', deleted_at='deleted_at') %}
    {#- On DuckDB, over two tables of the replica, it runs on the replica, as dbt's tests do
        there (macros/tests/on_replica.sql). -#}
    {%- set catalog = var('duckdb_replica_catalog') -%}
    {%- set on_the_replica = target.type == 'duckdb' and model is not string and to is not string
            and model.database == catalog and to.database == catalog -%}
    {%- set sql -%}
    select child.*
    from {{ model.include(database=false) if on_the_replica else model }} as child
    inner join {{ to.include(database=false) if on_the_replica else to }} as parent
        on parent.{{ field }} = child.{{ user_key }}
    where parent.{{ deleted_at }} is not null
        and child.{{ column_name }} > parent.{{ deleted_at }}
    {%- endset -%}
    {%- if on_the_replica -%}
    select * from postgres_query('{{ catalog }}', '{{ sql | trim | replace("'", "''") }}')
    {%- else -%}
    {{ sql }}
    {%- endif -%}
{% endtest %}
