{#-
  One row per lesson event, with the user's company and the lesson's course. Incremental (delete+insert on event_id), three modes
  (macros/incremental.sql):
    window     event-time bounds (or vars window_start/window_end): exactly the events with
               occurred_at in the window, in one statement; the window's rows are deleted
               first (pre-hook, same transaction), then rows by event_id (an event moved
               into the window leaves its old day).
    watermark  incremental run without a window: events received (created_at) since the
               latest one loaded by a full or watermark run, minus the lookback. Rows loaded
               by window runs do not move the watermark: a backfill of old days that picks
               up recently received events must not make the next run skip others. New
               rows only: edits, deletes and moves reach the table by windows (what the
               orchestrator runs) or a full refresh.
    full       first build or --full-refresh: everything.
  Tag daily_partitioned: Dagster's daily-partitioned asset set (platform_assets/dbt_assets.py).
  Which days a run rebuilds is decided outside: the orchestrator compares each day's
  fingerprint on the replica with this table's (platform_assets/fingerprints.py) and runs the
  days that differ, so late rows of any age, edits, hard deletes and moves reach them.
  Attributes from other tables are the current values (the user's company, the lesson's
  course; _marts.yml says why), and they are part of the fingerprint: a user who moves
  company changes the days of their events. Descriptive attributes (lesson type, course
  category, plan) stay in the dimensions and are joined at read time.
-#}
{%- set window = event_window() -%}
{%- if window -%}
  {%- set loaded_by = 'window' -%}
{%- elif is_incremental() -%}
  {%- set loaded_by = 'watermark' -%}
{%- else -%}
  {%- set loaded_by = 'full_refresh' -%}
{%- endif -%}
{{ config(
    materialized='incremental',
    incremental_strategy='delete+insert',
    tags=['daily_partitioned'],
    unique_key='event_id',
    on_schema_change='fail',
    pre_hook="{{ delete_event_window('occurred_at') }}",
    **table_layout(
        dist='user_id',
        sort=['occurred_at'],
        indexes=[
            {'columns': ['event_id'], 'unique': true},
            {'columns': ['occurred_at']},
            {'columns': ['created_at']},
        ],
    )
) }}

with events as (

    select
        event_id,
        user_id,
        lesson_id,
        event_type,
        seconds_spent,
        occurred_at,
        created_at
    from {{ ref('stg_app__lesson_events') }}
    {%- if window %}
    where {{ in_event_window('occurred_at', window) }}
    {%- elif is_incremental() %}
    where created_at >= {{ incremental_watermark('created_at', "loaded_by <> 'window'") }}
    {%- endif %}

),

users as (

    select user_id, company_id
    from {{ ref('stg_app__users') }}

),

lessons as (

    select lesson_id, course_id
    from {{ ref('stg_app__lessons') }}

)

select
    events.event_id,
    events.occurred_at,
    cast(events.occurred_at as date) as event_date,
    events.created_at,
    events.user_id,
    users.company_id,
    lessons.course_id,
    events.lesson_id,
    events.event_type,
    events.seconds_spent,
    events.created_at >= {{ dbt.dateadd('hour', 24, 'events.occurred_at') }} as is_late_arrival,
    cast('{{ loaded_by }}' as varchar(16)) as loaded_by
from events
left join users
    on users.user_id = events.user_id
left join lessons
    on lessons.lesson_id = events.lesson_id
