-- An event's data as the text it was appended as (`json`), not parsed into `jsonb`: every read
-- of the log (the relay, a replay, a resumed stream) turned jsonb back into text, which was most
-- of PostgreSQL's work in reading a page; `json` is read as a copy. Nothing queries inside the
-- data but the memberships index, whose expression works on `json` alike (and is rebuilt here).
-- Events stored before keep jsonb's layout of their text (a space after each `,` and `:`).
ALTER TABLE events ALTER COLUMN data TYPE json USING data::json;
