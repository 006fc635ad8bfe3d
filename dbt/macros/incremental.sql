{#-
  The incremental contract of the facts (see models/marts/_marts.yml):

  - window mode: dbt's event-time bounds `--event-time-start` and `--event-time-end` (or the
    vars `window_start` and `window_end`; ISO dates or timestamps, UTC, end exclusive) given
    together: the run (re)processes exactly the rows whose event time is in the window, in
    one statement, and touches nothing outside it. The orchestrator's daily partitions (and
    backfills of any length) pass the event-time bounds: dbt keeps its parse state across
    them, where a change of --vars makes it parse the whole project again. The window is
    read at run time only, never in a model's config, so a reused parse state stays right.
  - watermark mode: no window, incremental run: rows received since the last watermark,
    minus a small lookback (transactions commit out of order; re-reading the lookback is
    harmless because the strategy replaces rows by unique key).
  - full refresh (or first build without a window): everything.
-#}

{#- The window from the vars (or, without them, from dbt's event-time bounds) as
    {'start': 'YYYY-MM-DD HH:MM:SS', 'end': ...}, or none. -#}
{% macro event_window() %}
  {% set raw_start = var('window_start', none) %}
  {% set raw_end = var('window_end', none) %}
  {% set given_as = 'vars window_start and window_end' %}
  {% if raw_start is none and raw_end is none %}
    {% set raw_start = invocation_args_dict.get('event_time_start') %}
    {% set raw_end = invocation_args_dict.get('event_time_end') %}
    {% set given_as = '--event-time-start and --event-time-end' %}
  {% endif %}
  {% if raw_start is none and raw_end is none %}
    {{ return(none) }}
  {% endif %}
  {% if raw_start is none or raw_end is none %}
    {{ exceptions.raise_compiler_error(
        "give both " ~ given_as ~ " (end exclusive), or neither; got start="
        ~ raw_start ~ ", end=" ~ raw_end) }}
  {% endif %}
  {% set start = _parse_window_bound('window_start', raw_start) %}
  {% set end = _parse_window_bound('window_end', raw_end) %}
  {% if start >= end %}
    {{ exceptions.raise_compiler_error(
        "window_start (" ~ start ~ ") must be before window_end (" ~ end ~ ")") }}
  {% endif %}
  {#- A unit test states its mode itself (an is_incremental override and window vars): the
      invocation's --full-refresh is not a refresh of it, so `dbt build --full-refresh`
      still runs the window's unit test. -#}
  {% if flags.FULL_REFRESH and model.resource_type != 'unit_test' %}
    {{ exceptions.raise_compiler_error(
        "a window (" ~ given_as ~ ") and --full-refresh contradict each other: a full"
        ~ " refresh rebuilds everything; run it without the window") }}
  {% endif %}
  {{ return({'start': start.isoformat(' '), 'end': end.isoformat(' ')}) }}
{% endmacro %}


{#- An ISO date/timestamp (string, or the date/datetime YAML made of it) as a naive UTC
    datetime. -#}
{% macro _parse_window_bound(name, raw) %}
  {% set dt = modules.datetime %}
  {% set text = raw | string | trim %}
  {% set iso = '^[0-9]{4}-[0-9]{2}-[0-9]{2}([ T][0-9]{2}:[0-9]{2}(:[0-9]{2}([.][0-9]{1,6})?)?)?(Z|[+-][0-9]{2}:[0-9]{2})?$' %}
  {% if not modules.re.match(iso, text) %}
    {{ exceptions.raise_compiler_error(
        name ~ "=" ~ text ~ " is not an ISO date or timestamp (e.g. 2026-11-01 or 2026-11-01T06:00:00)") }}
  {% endif %}
  {% if text.endswith('Z') %}{% set text = text[:-1] ~ '+00:00' %}{% endif %}
  {% set parsed = dt.datetime.fromisoformat(text) %}
  {% if parsed.tzinfo is not none %}
    {% set parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=none) %}
  {% endif %}
  {{ return(parsed) }}
{% endmacro %}


{#- SQL predicate: `column` inside the window. -#}
{% macro in_event_window(column, window) -%}
  {{ column }} >= cast('{{ window.start }}' as timestamp)
  and {{ column }} < cast('{{ window.end }}' as timestamp)
{%- endmacro %}


{#- The watermark of an incremental run, as an SQL expression: the latest `column` already
    in {{ this }} (rows matching `where`), minus `var('watermark_lookback_minutes')`.
    At run time it is read once and inlined as a literal, so that every engine pushes the
    filter down to the replica (an index range scan there) instead of fetching the table
    to compare it with a subquery. In dbt unit tests (`this` is a fixture) it stays a
    subquery, so the tests exercise the same logic. An empty table gives 1900-01-01. -#}
{% macro incremental_watermark(column, where=none) %}
  {% set lookback = var('watermark_lookback_minutes') | int %}
  {% set query -%}
    select coalesce({{ dbt.dateadd('minute', -1 * lookback, 'max(' ~ column ~ ')') }},
                    cast('1900-01-01' as timestamp))
    from {{ this }}
    {%- if where %} where {{ where }}{% endif %}
  {%- endset %}
  {% if not execute or model.resource_type == 'unit_test' %}
    {{ return('(' ~ query ~ ')') }}
  {% endif %}
  {% set value = run_query(query).columns[0].values()[0] %}
  {{ return("cast('" ~ value ~ "' as timestamp)") }}
{% endmacro %}


{#- The window widened to whole UTC days (start down to its midnight, end up to the next
    one), for models built per day: a day is recomputed whole or not at all. The daily
    partitions' windows are whole days already; a data engineer's --vars need not be. -#}
{% macro whole_days(window) %}
  {% if not window %}
    {{ return(none) }}
  {% endif %}
  {% set dt = modules.datetime %}
  {% set start = dt.datetime.fromisoformat(window.start) %}
  {% set end = dt.datetime.fromisoformat(window.end) %}
  {% set first_day = start.replace(hour=0, minute=0, second=0, microsecond=0) %}
  {% set end_day = end.replace(hour=0, minute=0, second=0, microsecond=0) %}
  {% if end_day < end %}
    {% set end_day = end_day + dt.timedelta(days=1) %}
  {% endif %}
  {{ return({'start': first_day.isoformat(' '), 'end': end_day.isoformat(' ')}) }}
{% endmacro %}


{#- Pre-hook of a windowed incremental run: empty the window first, so that the run
    replaces it exactly (rows deleted on the replica disappear too); nothing outside the
    window is touched. `days`: the window widened to whole days (whole_days). `all_otherwise`:
    an incremental run without a window empties the whole table (it recomputes everything,
    in the same transaction). Renders to nothing on a first build or a full refresh. -#}
{% macro delete_event_window(column, days=false, all_otherwise=false) %}
  {% set window = whole_days(event_window()) if days else event_window() %}
  {% if window and is_incremental() %}
    delete from {{ this }} where {{ in_event_window(column, window) }}
  {% elif all_otherwise and is_incremental() %}
    delete from {{ this }}
  {% endif %}
{% endmacro %}
