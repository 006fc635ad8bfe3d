-- Keys, uniqueness and the indexes a replica reader needs. Run once, after the bulk load.

ALTER TABLE app.users            ADD CONSTRAINT users_company_fk      FOREIGN KEY (company_id) REFERENCES app.companies;
ALTER TABLE app.users            ADD CONSTRAINT users_email_key       UNIQUE (email);
ALTER TABLE app.teams            ADD CONSTRAINT teams_company_fk      FOREIGN KEY (company_id) REFERENCES app.companies;
ALTER TABLE app.team_memberships ADD CONSTRAINT memberships_team_fk   FOREIGN KEY (team_id) REFERENCES app.teams;
ALTER TABLE app.team_memberships ADD CONSTRAINT memberships_user_fk   FOREIGN KEY (user_id) REFERENCES app.users;
ALTER TABLE app.team_memberships ADD CONSTRAINT memberships_team_user_key UNIQUE (team_id, user_id);
ALTER TABLE app.lessons          ADD CONSTRAINT lessons_course_fk     FOREIGN KEY (course_id) REFERENCES app.courses;
ALTER TABLE app.lessons          ADD CONSTRAINT lessons_course_position_key UNIQUE (course_id, position);
ALTER TABLE app.enrollments      ADD CONSTRAINT enrollments_user_fk   FOREIGN KEY (user_id) REFERENCES app.users;
ALTER TABLE app.enrollments      ADD CONSTRAINT enrollments_course_fk FOREIGN KEY (course_id) REFERENCES app.courses;
ALTER TABLE app.enrollments      ADD CONSTRAINT enrollments_user_course_key UNIQUE (user_id, course_id);
ALTER TABLE app.lesson_events    ADD CONSTRAINT lesson_events_user_fk   FOREIGN KEY (user_id) REFERENCES app.users;
ALTER TABLE app.lesson_events    ADD CONSTRAINT lesson_events_lesson_fk FOREIGN KEY (lesson_id) REFERENCES app.lessons;
ALTER TABLE app.quiz_attempts    ADD CONSTRAINT quiz_attempts_user_fk   FOREIGN KEY (user_id) REFERENCES app.users;
ALTER TABLE app.quiz_attempts    ADD CONSTRAINT quiz_attempts_lesson_fk FOREIGN KEY (lesson_id) REFERENCES app.lessons;
ALTER TABLE app.certificates     ADD CONSTRAINT certificates_enrollment_fk FOREIGN KEY (enrollment_id) REFERENCES app.enrollments;
ALTER TABLE app.certificates     ADD CONSTRAINT certificates_user_fk   FOREIGN KEY (user_id) REFERENCES app.users;
ALTER TABLE app.certificates     ADD CONSTRAINT certificates_course_fk FOREIGN KEY (course_id) REFERENCES app.courses;
ALTER TABLE app.certificates     ADD CONSTRAINT certificates_enrollment_key UNIQUE (enrollment_id);
ALTER TABLE app.subscriptions    ADD CONSTRAINT subscriptions_company_fk FOREIGN KEY (company_id) REFERENCES app.companies;

-- Watermark indexes: the federated source observation asks max(updated_at) / max(occurred_at)
-- and incremental models read ranges of them; without these every question is a full scan.
CREATE INDEX companies_updated_at_idx     ON app.companies (updated_at);
CREATE INDEX users_updated_at_idx         ON app.users (updated_at);
CREATE INDEX users_company_idx            ON app.users (company_id);
CREATE INDEX teams_updated_at_idx         ON app.teams (updated_at);
CREATE INDEX memberships_updated_at_idx   ON app.team_memberships (updated_at);
CREATE INDEX courses_updated_at_idx       ON app.courses (updated_at);
CREATE INDEX lessons_updated_at_idx       ON app.lessons (updated_at);
CREATE INDEX enrollments_updated_at_idx   ON app.enrollments (updated_at);
CREATE INDEX enrollments_course_idx       ON app.enrollments (course_id);
CREATE INDEX lesson_events_occurred_at_idx ON app.lesson_events (occurred_at);
CREATE INDEX lesson_events_created_at_idx ON app.lesson_events (created_at);
CREATE INDEX quiz_attempts_attempted_at_idx ON app.quiz_attempts (attempted_at);
CREATE INDEX quiz_attempts_created_at_idx ON app.quiz_attempts (created_at);
CREATE INDEX certificates_created_at_idx  ON app.certificates (created_at);
CREATE INDEX subscriptions_updated_at_idx ON app.subscriptions (updated_at);
CREATE INDEX subscriptions_company_idx    ON app.subscriptions (company_id);
