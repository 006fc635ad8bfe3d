{#-
  Federation: make the replica's operational tables readable as one schema of the
  warehouse, on whichever engine dbt runs. Called once per dbt invocation from
  `on-run-start`. Each implementation is idempotent and convergent: it looks at what
  exists, changes only what differs from the wanted state, and logs what it did (or that
  everything was up to date). Nothing here ever writes to the replica: every engine reads
  it through the read-only role (REPLICA_USER, or the secret behind REPLICA_SECRET_ARN).

  Where the sources resolve (see models/staging/_app__sources.yml):
    duckdb    catalog `replica` (ATTACH ... READ_ONLY), schema REPLICA_SCHEMA
    postgres  schema `federated` of the warehouse database (postgres_fdw foreign tables)
    redshift  schema `federated` of the warehouse database (external schema FROM POSTGRES)
-#}
{% macro federate_replica() %}
  {{ return(adapter.dispatch('federate_replica')()) }}
{% endmacro %}


{% macro default__federate_replica() %}
  {{ exceptions.raise_compiler_error(
      "federate_replica has no implementation for adapter '" ~ adapter.type() ~ "'"
      ~ " (implemented: duckdb, postgres, redshift)") }}
{% endmacro %}


{#- Run one statement inside the (auto-begun) transaction that the federation macro
    commits at its end; returns the result table. (run_query does not begin one.) -#}
{% macro _federation_query(sql) %}
  {% call statement('federation', fetch_result=true, auto_begin=true) %}{{ sql }}{% endcall %}
  {{ return(load_result('federation').table) }}
{% endmacro %}


{#- A single-quoted SQL string literal. -#}
{% macro sql_literal(value) -%}
  '{{ value | string | replace("'", "''") }}'
{%- endmacro %}


{% macro _log_federation(engine, actions) %}
  {% if actions %}
    {% do log("federation (" ~ engine ~ "): " ~ (actions | join("; ")), info=true) %}
  {% else %}
    {% do log("federation (" ~ engine ~ "): up to date, nothing changed", info=true) %}
  {% endif %}
{% endmacro %}


{#- ---------------------------------------------------------------------------------------
  DuckDB: ATTACH the replica READ_ONLY through the postgres extension. The extension is
  installed from its wheel beforehand (platform_assets/federation.py), so LOAD needs no
  network. An ATTACH lives as long as the DuckDB instance (one dbt invocation; the
  profile's keep_open holds it), so there is nothing persistent to converge.
--------------------------------------------------------------------------------------- -#}
{% macro duckdb__federate_replica() %}
  {% if not execute %}{{ return('') }}{% endif %}
  {% set alias = var('duckdb_replica_catalog') %}
  {% set found = _federation_query(
      "select count(*) from duckdb_databases() where database_name = " ~ sql_literal(alias)
  ).columns[0].values()[0] %}
  {% set actions = [] %}
  {% if found == 0 %}
    {% do _federation_query("load postgres_scanner") %}
    {#- The password is not in this (logged) statement: it comes from the DuckDB secret
        `federation_replica` that profiles.yml defines (created unlogged by dbt-duckdb). -#}
    {% do _federation_query(
        "attach " ~ sql_literal(replica_libpq_dsn()) ~ " as " ~ adapter.quote(alias)
        ~ " (type postgres, read_only, secret " ~ duckdb_replica_secret() ~ ")") %}
    {% do actions.append("attached the replica read-only as catalog " ~ alias) %}
  {% endif %}
  {% do adapter.commit() %}
  {% do _log_federation("duckdb", actions) %}
  {{ return('') }}
{% endmacro %}


{#- Name of the DuckDB secret (profiles.yml, target local) holding the read-only role's
    password. -#}
{% macro duckdb_replica_secret() %}{{ return('federation_replica') }}{% endmacro %}


{#- libpq key/value connection string for the read-only role (values quoted for libpq),
    without the password: that comes from the DuckDB secret, so it never appears in logged
    SQL, in dbt's logs or in a DuckDB connection error (which quotes this string). -#}
{% macro replica_libpq_dsn() %}
  {% set parts = [] %}
  {% for key, name in [('host', 'REPLICA_HOST'), ('port', 'REPLICA_PORT'), ('dbname', 'REPLICA_DB'),
                       ('user', 'REPLICA_USER')] %}
    {% set value = env_var(name) | replace("\\", "\\\\") | replace("'", "\\'") %}
    {% do parts.append(key ~ "='" ~ value ~ "'") %}
  {% endfor %}
  {{ return(parts | join(' ')) }}
{% endmacro %}


{#- ---------------------------------------------------------------------------------------
  PostgreSQL warehouse: postgres_fdw (the extension and USAGE on it are set up by the
  environment, `make up`; postgres_fdw is not a trusted extension). Converges, in one
  transaction under an advisory lock (two dbt processes may start at once):
    - server `replica` (host, port, dbname, fetch_size, use_remote_estimate, updatable=false)
    - the current role's user mapping (the read-only role's user and password). Its DDL
      necessarily carries the password; dbt scrubs the value of every DBT_ENV_SECRET_*
      variable from its logs, and the platform sets DBT_ENV_SECRET_REPLICA_PASSWORD for dbt
      (platform_assets/settings.py; `make up` writes it to platform.env for the CLI), so the logged
      statement shows ***** instead.
    - schema `federated`: exactly the replica schema's tables, as foreign tables. Which
      tables and columns the replica has is read through one helper foreign table over
      its information_schema.columns (schema `federated_catalog`); missing tables are
      imported, changed ones re-imported, vanished ones dropped. An unchanged replica
      means no DDL at all.
--------------------------------------------------------------------------------------- -#}
{% macro postgres__federate_replica() %}
  {% if not execute %}{{ return('') }}{% endif %}
  {% set server = var('pg_federation_server') %}
  {% set schema = var('federated_schema') %}
  {% set catalog_schema = schema ~ '_catalog' %}
  {% set remote_schema = env_var('REPLICA_SCHEMA') %}
  {% set wanted_server = {
      'host': env_var('REPLICA_HOST'),
      'port': env_var('REPLICA_PORT'),
      'dbname': env_var('REPLICA_DB'),
      'fetch_size': var('pg_fetch_size') | string,
      'use_remote_estimate': 'true',
      'updatable': 'false',
  } %}
  {% set wanted_mapping = {'user': env_var('REPLICA_USER'), 'password': env_var('REPLICA_PASSWORD')} %}
  {% set q = adapter.quote %}
  {% set actions = [] %}

  {% do _federation_query("select pg_advisory_xact_lock(hashtext('reporting.federate_replica'))") %}

  {#- the foreign server -#}
  {% set rows = _federation_query(
      "select split_part(o, '=', 1), substr(o, strpos(o, '=') + 1)"
      ~ " from pg_foreign_server s left join lateral unnest(s.srvoptions) o on true"
      ~ " where s.srvname = " ~ sql_literal(server)).rows %}
  {% if rows | length == 0 %}
    {% set opts = [] %}
    {% for k, v in wanted_server.items() %}{% do opts.append(k ~ ' ' ~ sql_literal(v)) %}{% endfor %}
    {% do _federation_query("create server " ~ q(server) ~ " foreign data wrapper postgres_fdw options ("
                    ~ opts | join(', ') ~ ")") %}
    {% do actions.append("created server " ~ server) %}
  {% else %}
    {% set changes = _option_changes(rows, wanted_server) %}
    {% if changes %}
      {% do _federation_query("alter server " ~ q(server) ~ " options (" ~ changes | join(', ') ~ ")") %}
      {% do actions.append("updated server " ~ server ~ " options") %}
    {% endif %}
  {% endif %}

  {#- the user mapping of the role dbt runs as -#}
  {% set rows = _federation_query(
      "select split_part(o, '=', 1), substr(o, strpos(o, '=') + 1)"
      ~ " from pg_user_mappings m left join lateral unnest(m.umoptions) o on true"
      ~ " where m.srvname = " ~ sql_literal(server) ~ " and m.usename = current_user").rows %}
  {% if rows | length == 0 %}
    {% do _federation_query("create user mapping for current_user server " ~ q(server) ~ " options (user "
                    ~ sql_literal(wanted_mapping['user']) ~ ", password "
                    ~ sql_literal(wanted_mapping['password']) ~ ")") %}
    {% do actions.append("created user mapping") %}
  {% else %}
    {% set changes = _option_changes(rows, wanted_mapping) %}
    {% if changes %}
      {% do _federation_query("alter user mapping for current_user server " ~ q(server)
                      ~ " options (" ~ changes | join(', ') ~ ")") %}
      {% do actions.append("updated user mapping") %}
    {% endif %}
  {% endif %}

  {#- the schemas and the catalog helper -#}
  {% for name in [schema, catalog_schema] %}
    {% if _federation_query("select count(*) from pg_namespace where nspname = " ~ sql_literal(name)).columns[0].values()[0] == 0 %}
      {% do _federation_query("create schema " ~ q(name)) %}
      {% do actions.append("created schema " ~ name) %}
    {% endif %}
  {% endfor %}
  {% if _federation_query("select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                  ~ " where n.nspname = " ~ sql_literal(catalog_schema)
                  ~ " and c.relname = 'replica_columns'").columns[0].values()[0] == 0 %}
    {% do _federation_query("create foreign table " ~ q(catalog_schema) ~ ".replica_columns ("
                    ~ "table_schema text, table_name text, column_name text,"
                    ~ " ordinal_position integer, data_type text) server " ~ q(server)
                    ~ " options (schema_name 'information_schema', table_name 'columns')") %}
    {% do actions.append("created " ~ catalog_schema ~ ".replica_columns") %}
  {% endif %}

  {#- the foreign tables: compare table -> column signature on both sides -#}
  {% set signature = "string_agg(column_name || ' ' || data_type, ', ' order by ordinal_position)" %}
  {% set remote = {} %}
  {% for row in _federation_query("select table_name, " ~ signature ~ " from " ~ q(catalog_schema)
                          ~ ".replica_columns where table_schema = " ~ sql_literal(remote_schema)
                          ~ " group by table_name").rows %}
    {% do remote.update({row[0]: row[1]}) %}
  {% endfor %}
  {% if not remote %}
    {{ exceptions.raise_compiler_error(
        "federation (postgres): the replica shows no tables in schema '" ~ remote_schema
        ~ "' to role " ~ wanted_mapping['user'] ~ " (REPLICA_SCHEMA / grants?)") }}
  {% endif %}
  {% set local = {} %}
  {% for row in _federation_query("select table_name, " ~ signature ~ " from information_schema.columns"
                          ~ " where table_schema = " ~ sql_literal(schema) ~ " group by table_name").rows %}
    {% do local.update({row[0]: row[1]}) %}
  {% endfor %}
  {% set to_import = [] %}
  {% for table, columns in local.items() %}
    {% if remote.get(table) != columns %}
      {#- cascade: views built on the old definition are rebuilt by the dbt run that follows -#}
      {% do _federation_query("drop foreign table " ~ q(schema) ~ "." ~ q(table) ~ " cascade") %}
      {% do actions.append("dropped " ~ ("changed" if table in remote else "vanished") ~ " table " ~ table) %}
    {% endif %}
  {% endfor %}
  {% for table, columns in remote.items() %}
    {% if local.get(table) != columns %}{% do to_import.append(table) %}{% endif %}
  {% endfor %}
  {% if to_import %}
    {% set names = [] %}
    {% for t in to_import | sort %}{% do names.append(q(t)) %}{% endfor %}
    {% do _federation_query("import foreign schema " ~ q(remote_schema) ~ " limit to (" ~ names | join(', ')
                    ~ ") from server " ~ q(server) ~ " into " ~ q(schema)) %}
    {% do actions.append("imported " ~ to_import | length ~ " tables (" ~ to_import | sort | join(', ') ~ ")") %}
  {% endif %}

  {% do adapter.commit() %}
  {% do _log_federation("postgres", actions) %}
  {{ return('') }}
{% endmacro %}


{#- ADD/SET/DROP clauses turning existing (key, value) rows into the wanted options. -#}
{% macro _option_changes(rows, wanted) %}
  {% set current = {} %}
  {% for row in rows %}{% if row[0] %}{% do current.update({row[0]: row[1]}) %}{% endif %}{% endfor %}
  {% set changes = [] %}
  {% for k, v in wanted.items() %}
    {% if k not in current %}
      {% do changes.append("add " ~ k ~ " " ~ sql_literal(v)) %}
    {% elif current[k] != v %}
      {% do changes.append("set " ~ k ~ " " ~ sql_literal(v)) %}
    {% endif %}
  {% endfor %}
  {% for k in current %}
    {% if k not in wanted %}{% do changes.append("drop " ~ k) %}{% endif %}
  {% endfor %}
  {{ return(changes) }}
{% endmacro %}


{#- ---------------------------------------------------------------------------------------
  Redshift: an external schema FROM POSTGRES pointing at the replica instance endpoint,
  authenticated by the secret (read-only role) through the IAM role. External schemas
  cannot be altered, so one whose settings differ is dropped and created again; one that
  matches is left alone. Views over it are late-binding (bind: false, dbt_project.yml).
--------------------------------------------------------------------------------------- -#}
{% macro redshift__federate_replica() %}
  {% if not execute %}{{ return('') }}{% endif %}
  {% set schema = var('federated_schema') %}
  {% set wanted = {
      'database': env_var('REPLICA_DB'),
      'schema': env_var('REPLICA_SCHEMA'),
      'uri': env_var('REPLICA_ENDPOINT'),
      'port': env_var('REPLICA_PORT') | int,
      'iam_role': env_var('REDSHIFT_FEDERATION_IAM_ROLE_ARN'),
      'secret_arn': env_var('REPLICA_SECRET_ARN'),
  } %}
  {% set actions = [] %}
  {% set rows = _federation_query(
      "select eskind, databasename, esoptions from svv_external_schemas where schemaname = "
      ~ sql_literal(schema)).rows %}
  {% set matches = false %}
  {% if rows | length > 0 %}
    {% set row = rows[0] %}
    {% set options = row[2] | string %}
    {% set matches = (row[0] | int == 3) and (row[1] == wanted['database'])
        and (('"' ~ wanted['schema'] ~ '"') in options)
        and (('"' ~ wanted['uri'] ~ '"') in options)
        and ((wanted['port'] | string) in options)
        and (('"' ~ wanted['iam_role'] ~ '"') in options)
        and (('"' ~ wanted['secret_arn'] ~ '"') in options) %}
    {% if not matches %}
      {% do _federation_query("drop schema " ~ adapter.quote(schema)) %}
      {% do actions.append("dropped external schema " ~ schema ~ " (settings changed)") %}
    {% endif %}
  {% endif %}
  {% if not matches %}
    {% do _federation_query(redshift_external_schema_ddl(schema, wanted)) %}
    {% do actions.append("created external schema " ~ schema ~ " from postgres " ~ wanted['uri']) %}
  {% endif %}
  {% do adapter.commit() %}
  {% do _log_federation("redshift", actions) %}
  {{ return('') }}
{% endmacro %}


{% macro redshift_external_schema_ddl(schema, wanted) -%}
create external schema if not exists {{ adapter.quote(schema) }}
from postgres
database {{ sql_literal(wanted['database']) }} schema {{ sql_literal(wanted['schema']) }}
uri {{ sql_literal(wanted['uri']) }} port {{ wanted['port'] }}
iam_role {{ sql_literal(wanted['iam_role']) }}
secret_arn {{ sql_literal(wanted['secret_arn']) }}
{%- endmacro %}
