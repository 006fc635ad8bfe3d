{#-
  Zero downtime on PostgreSQL: a rebuilt relation never takes the views over it down.

  dbt builds a table (or a view, or an incremental model on --full-refresh) as
  `<name>__dbt_tmp`, then in one transaction renames the live relation to
  `<name>__dbt_backup` and the new one to `<name>`, commits, and finally drops the backup
  with `drop ... cascade`. Readers of the relation itself are fine: PostgreSQL re-resolves
  the name after the swap's locks are released, so a query sees the old table or the new
  one, never a missing or half-written one. But a PostgreSQL view is bound to the table's
  oid, not its name: after the rename the reporting views still read the backup, and the
  cascade then drops them, so the BI tool gets "relation does not exist" until dbt reaches
  those views later in the run (measured: hundreds of failed reads per full refresh).

  Here, dropping a `__dbt_backup` first re-points every view that depends on it to the
  relation that replaced it (`create or replace view` with the view's own definition, the
  backup's name replaced by the live name), in the same transaction as the drop: a view
  keeps its oid, grants and dependants, and reads the old data until the commit and the
  new data after it. Every view is locked before any table (then the backup), the order a
  reader takes (view first, then tables), so a reader cannot deadlock with it. One such
  transaction at a time (advisory lock): two threads swapping two marts under one view
  must not redefine it from stale text. The surviving views are re-added to dbt's relation
  cache (which dropped them with the backup, cascade), so dbt later replaces them as
  existing views. Should a view no longer fit the new relation (a column it reads was
  removed or changed type), it is left to the cascade and rebuilt by dbt later in the same
  run: the only case with a short gap, and only for that view.

  Redshift needs none of this: its views over marts are late-binding (bind: false). It
  must not run it either (advisory locks, to_regclass and DO blocks do not exist there),
  and dbt-redshift declares postgres as its parent adapter, so dispatch would reach this
  postgres__ macro on Redshift: redshift__drop_relation below keeps dbt's own drop there.
  DuckDB has a single writer per file (see README, "Readers during a refresh").
-#}
{% macro postgres__drop_relation(relation) -%}
  {%- if relation.identifier.endswith('__dbt_backup') and relation.type in ('table', 'view') %}
    {#- One re-pointing at a time (dbt runs models in parallel threads): a view over two
        marts swapped at once must be redefined from the definition the other thread
        committed, not from one read before it. -#}
    {% call statement('repoint_lock', auto_begin=True) -%}
      select pg_advisory_xact_lock(hashtext('reporting.zero_downtime_swap'))
    {%- endcall %}
    {#- the views over the backup, directly or through other views -#}
    {% call statement('views_over_backup', fetch_result=True, auto_begin=True) -%}
      {{ postgres_views_over_sql(relation) }}
    {%- endcall %}
    {% set views = load_result('views_over_backup').table.rows %}
    {% call statement('repoint_views_off_backup', auto_begin=True) -%}
      {{ postgres_repoint_dependent_views_sql(relation) }}
    {%- endcall %}
    {% call statement('drop_relation', auto_begin=True) -%}
      {{ get_drop_sql(relation) }}
    {%- endcall %}
    {% set survivors = [] %}
    {% for row in views %}
      {% call statement('view_survived', fetch_result=True, auto_begin=True) -%}
        select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = {{ _zd_literal(row[0]) }} and c.relname = {{ _zd_literal(row[1]) }}
      {%- endcall %}
      {% if load_result('view_survived').table.rows[0][0] > 0 %}
        {% do survivors.append(api.Relation.create(
            database=relation.database, schema=row[0], identifier=row[1], type='view')) %}
      {% endif %}
    {% endfor %}
    {% do adapter.commit() %}
    {#- dbt's relation cache dropped the backup with everything over it (cascade); the
        views that survived are still there: tell the cache, so that dbt replaces them as
        existing views when it reaches them, instead of creating them anew. -#}
    {% for view in survivors %}
      {% do adapter.cache_added(view) %}
    {% endfor %}
  {%- else %}
    {% call statement('drop_relation', auto_begin=False) -%}
      {{ get_drop_sql(relation) }}
    {%- endcall %}
  {%- endif %}
{% endmacro %}


{#- dbt's own drop on Redshift (dbt-redshift 1.11 defines no redshift__drop_relation, so
    without this one dispatch would pick postgres__drop_relation above). -#}
{% macro redshift__drop_relation(relation) -%}
  {{ return(dbt.default__drop_relation(relation)) }}
{%- endmacro %}


{#- schema and name of every view that reads `relation`, directly or through other views. -#}
{% macro postgres_views_over_sql(relation) -%}
with recursive over(oid) as (
    select to_regclass({{ _zd_literal(relation.include(database=False).render()) }})
  union
    select r.ev_class
    from over
    join pg_depend d on d.refobjid = over.oid and d.refclassid = 'pg_class'::regclass
      and d.classid = 'pg_rewrite'::regclass
    join pg_rewrite r on r.oid = d.objid
    where r.ev_class <> over.oid
)
select n.nspname, c.relname
from over
join pg_class c on c.oid = over.oid and c.relkind = 'v'
join pg_namespace n on n.oid = c.relnamespace
where over.oid <> to_regclass({{ _zd_literal(relation.include(database=False).render()) }})
order by 1, 2
{%- endmacro %}


{#- A DO block: every view depending on `backup` now reads the relation named like it
    without the `__dbt_backup` suffix (same schema). -#}
{% macro postgres_repoint_dependent_views_sql(backup) -%}
  {%- set live = backup.identifier[:-('__dbt_backup' | length)] -%}
do $repoint$
declare
  dependant record;
  definition text;
  dependants oid[];
begin
  if to_regclass({{ _zd_literal(backup.include(database=False).render()) }}) is null then
    return;
  end if;
  select coalesce(array_agg(oid order by view_schema, view_name), '{}') into dependants
  from (
    select distinct v.oid, n.nspname as view_schema, v.relname as view_name
    from pg_depend d
    join pg_rewrite r on r.oid = d.objid
    join pg_class v on v.oid = r.ev_class
    join pg_namespace n on n.oid = v.relnamespace
    where d.classid = 'pg_rewrite'::regclass
      and d.refclassid = 'pg_class'::regclass
      and d.refobjid = to_regclass({{ _zd_literal(backup.include(database=False).render()) }})
      and v.oid <> d.refobjid
      and v.relkind = 'v'
  ) direct;
  -- Lock order: every view first, before any table. A reader locks a view, then the tables
  -- under it; `create or replace view` would lock the tables first (parsing the new
  -- definition), then the view. Taken in that order, a reader holding the view and queued
  -- behind another thread's rename of a mart (which waits for our share lock on that mart)
  -- closes a cycle: the deadlock detector then aborts the re-pointing, and the cascade drops
  -- the view (seen in CI: 15 failed reads of rpt_company_training_overview).
  -- Not `lock table`: on a view it also locks every relation the view reads, in the same
  -- mode (PostgreSQL 11+), which deadlocks with readers of the other views all the same.
  -- A change of owner to the current owner takes the view's own lock only, and changes nothing.
  for dependant in
    select c.oid, n.nspname as view_schema, c.relname as view_name,
           pg_get_userbyid(c.relowner) as view_owner
    from unnest(dependants) with ordinality as u(oid, position)
    join pg_class c on c.oid = u.oid
    join pg_namespace n on n.oid = c.relnamespace
    order by u.position
  loop
    begin
      execute format('alter view %I.%I owner to %I',
                     dependant.view_schema, dependant.view_name, dependant.view_owner);
    exception when insufficient_privilege then
      -- not ours to lock: not ours to re-point either (the replace below fails the same way)
      null;
    end;
  end loop;
  for dependant in
    select c.oid, n.nspname as view_schema, c.relname as view_name
    from unnest(dependants) with ordinality as u(oid, position)
    join pg_class c on c.oid = u.oid
    join pg_namespace n on n.oid = c.relnamespace
    order by u.position
  loop
    definition := regexp_replace(
      pg_get_viewdef(dependant.oid),
      {# \m and \M: PostgreSQL's word boundaries (the backslash doubled for Jinja's string literal) #}
      {{ _zd_literal('\\m' ~ backup.identifier ~ '\\M') }},
      {{ _zd_literal(live) }},
      'g');
    begin
      execute format('create or replace view %I.%I as %s', dependant.view_schema, dependant.view_name, definition);
      raise notice 'view %.% now reads %', dependant.view_schema, dependant.view_name, {{ _zd_literal(live) }};
    exception when others then
      raise warning 'view %.% no longer fits %: left to be rebuilt (%)',
        dependant.view_schema, dependant.view_name, {{ _zd_literal(live) }}, sqlerrm;
    end;
  end loop;
end
$repoint$
{%- endmacro %}


{#- A single-quoted SQL string literal. -#}
{% macro _zd_literal(value) -%}
  '{{ value | string | replace("'", "''") }}'
{%- endmacro %}
