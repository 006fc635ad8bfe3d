{#-
  One row per enrollment, its current status and certificate, and the user's current
  company. A table (dbt_project.yml: marts are tables), rebuilt whenever a source it reads
  changed: deletes, moves and edits without an updated_at bump all land (_marts.yml).
-#}
{{ config(
    **table_layout(
        dist='user_id',
        sort=['updated_at'],
        indexes=[{'columns': ['enrollment_id'], 'unique': true}],
    )
) }}

with enrollments as (

    select * from {{ ref('stg_app__enrollments') }}

),

certificates as (

    select enrollment_id, certificate_id, issued_at, created_at
    from {{ ref('stg_app__certificates') }}

),

users as (

    select user_id, company_id
    from {{ ref('stg_app__users') }}

)

select
    enrollments.enrollment_id,
    enrollments.user_id,
    users.company_id,
    enrollments.course_id,
    enrollments.enrollment_status,
    enrollments.enrollment_status = 'completed' as is_completed,
    enrollments.enrollment_status = 'dropped' as is_dropped,
    enrollments.enrolled_at,
    cast(enrollments.enrolled_at as date) as enrolled_date,
    enrollments.completed_at,
    case
        when enrollments.completed_at is not null
            then {{ dbt.datediff('enrollments.enrolled_at', 'enrollments.completed_at', 'day') }}
    end as days_to_complete,
    certificates.certificate_id,
    certificates.issued_at as certificate_issued_at,
    certificates.certificate_id is not null as has_certificate,
    enrollments.created_at,
    enrollments.updated_at
from enrollments
left join certificates
    on certificates.enrollment_id = enrollments.enrollment_id
left join users
    on users.user_id = enrollments.user_id
