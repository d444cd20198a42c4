-- The embedded event store: the same tables as PostgreSQL's (see migrations/postgres). SQLite
-- admits one writer at a time, and the writer assigns positions inside its transaction, so
-- positions are gap-free and commit in order here too. UUIDs and timestamps are text.
CREATE TABLE events (
    global_position INTEGER PRIMARY KEY,
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL,
    event_id        TEXT    NOT NULL UNIQUE,
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    workspace_id    TEXT,
    channel_id      TEXT,
    actor_id        TEXT    NOT NULL,
    occurred_at     TEXT    NOT NULL,
    correlation_id  TEXT    NOT NULL,
    causation_id    TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TABLE unique_claims (
    claim        TEXT PRIMARY KEY,
    owner_stream TEXT NOT NULL
);

CREATE TABLE idempotency_keys (
    key            TEXT PRIMARY KEY,
    request_hash   TEXT    NOT NULL,
    reply          TEXT    NOT NULL,
    position       INTEGER NOT NULL,
    stream_version INTEGER NOT NULL,
    created_at     TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP
);
