-- An event's data as the text it was appended as (`json`), not parsed into `jsonb`: every read
-- of the log (the relay, a replay, a resumed stream) turned jsonb back into text, which was much
-- of PostgreSQL's work in reading a page; `json` is read as a copy. Nothing queries inside the
-- data but the memberships index, whose expression works on `json` alike (and is rebuilt here).
-- Events stored before keep jsonb's layout of their text (a space after each `,` and `:`).
-- On a populated store this rewrites the table and its indexes under an exclusive lock: appends
-- wait for it, so run `quikapp migrate` in a maintenance window (README, "Store migrations").
ALTER TABLE events ALTER COLUMN data TYPE json USING data::json;
-- The rewrite leaves the planner without statistics for the table and the index expression.
ANALYZE events;
