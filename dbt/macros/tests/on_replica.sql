{#- ---------------------------------------------------------------------------------------
  DuckDB: data tests on the federated sources run on the replica.

  A test of a source table read through DuckDB's postgres scanner moved the table's column to
  the warehouse and tested it there: the scanner pushes comparisons down to PostgreSQL, but
  not `is null`, and no aggregate or join. At 8M events each such test on lesson_events
  copied a whole column (or two) of the table over the wire, 1.5-5 s alone and 5-17 s inside
  a build on 2 cores: the tests on lesson_events were nearly half of a full refresh's SQL
  time (docs/benchmarks.md). When every relation a test reads is a table of the ATTACHed replica,
  the test's own SQL (dbt's, unchanged) now runs on the replica through `postgres_query`, as
  the read-only role, and only the offending rows come back, so failures and their counts
  are those of the test as written.

  Anything else keeps dbt's test: the warehouse's own models, a test with a `where` config
  (its model is then a subquery in DuckDB's SQL), the pg target (postgres_fdw sends such
  filters, joins and aggregates to the replica itself) and Redshift.
--------------------------------------------------------------------------------------- -#}

{#- How each test below decides (written out in each: a generic test's macros are resolved
    from what the test itself calls, so an implementation found by dispatch cannot call a
    helper macro of this project):
      on the replica   when `model` (and `to`) is a Relation in the catalog named
                       var('duckdb_replica_catalog'): dbt's SQL for the relation's schema.table,
                       inside postgres_query(catalog, '<that SQL>');
      in the warehouse otherwise: dbt's SQL as it is. -#}

{% macro duckdb__test_not_null(model, column_name) %}
  {%- set catalog = var('duckdb_replica_catalog') -%}
  {%- if model is string or model.database != catalog -%}
    {{ return(dbt.default__test_not_null(model, column_name)) }}
  {%- endif -%}
  {%- set sql = dbt.default__test_not_null(model.include(database=false), column_name) | trim -%}
  {{ return("select * from postgres_query('" ~ catalog ~ "', '" ~ (sql | replace("'", "''")) ~ "')") }}
{% endmacro %}


{% macro duckdb__test_unique(model, column_name) %}
  {%- set catalog = var('duckdb_replica_catalog') -%}
  {%- if model is string or model.database != catalog -%}
    {{ return(dbt.default__test_unique(model, column_name)) }}
  {%- endif -%}
  {%- set sql = dbt.default__test_unique(model.include(database=false), column_name) | trim -%}
  {{ return("select * from postgres_query('" ~ catalog ~ "', '" ~ (sql | replace("'", "''")) ~ "')") }}
{% endmacro %}


{% macro duckdb__test_relationships(model, column_name, to, field) %}
  {%- set catalog = var('duckdb_replica_catalog') -%}
  {%- if model is string or model.database != catalog or to is string or to.database != catalog -%}
    {{ return(dbt.default__test_relationships(model, column_name, to, field)) }}
  {%- endif -%}
  {%- set sql = dbt.default__test_relationships(
        model.include(database=false), column_name, to.include(database=false), field) | trim -%}
  {{ return("select * from postgres_query('" ~ catalog ~ "', '" ~ (sql | replace("'", "''")) ~ "')") }}
{% endmacro %}
