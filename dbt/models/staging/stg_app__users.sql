-- Soft deletes, the one rule for the whole project: the row stays (events and enrollments
-- of a deleted user still happened and keep their keys), `is_deleted` says the user is
-- gone, and a deleted user's personal data (e-mail, name) goes no further than here.
select
    cast(user_id as bigint) as user_id,
    cast(company_id as bigint) as company_id,
    case when deleted_at is null then email end as email,
    case when deleted_at is null then full_name end as full_name,
    role as user_role,
    deleted_at is not null as is_deleted,
    created_at,
    updated_at,
    deleted_at
from {{ source('app', 'users') }}
