-- The event log. global_position is assigned by the one writer that holds the store's
-- transaction-scoped advisory lock, and that lock is held until commit: positions are gap-free
-- and become visible in order, so a reader that has seen position N has seen every position
-- below it (a sequence-assigned position would let a later number commit first).
CREATE TABLE events (
    global_position BIGINT PRIMARY KEY,
    stream_id       TEXT        NOT NULL,
    stream_version  BIGINT      NOT NULL,
    event_id        UUID        NOT NULL UNIQUE,
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL,
    workspace_id    UUID,
    channel_id      UUID,
    actor_id        UUID        NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    correlation_id  UUID        NOT NULL,
    causation_id    UUID        NOT NULL,
    data            JSONB       NOT NULL,
    CONSTRAINT events_stream_version_unique UNIQUE (stream_id, stream_version)
);

-- Values that must be unique across streams (a channel name within its workspace), each owned
-- by the stream that claimed it; claimed and released atomically with that stream's appends.
CREATE TABLE unique_claims (
    claim        TEXT PRIMARY KEY,
    owner_stream TEXT NOT NULL
);

-- The first successful reply to each idempotency key (already scoped to user and endpoint).
CREATE TABLE idempotency_keys (
    key            TEXT PRIMARY KEY,
    request_hash   TEXT        NOT NULL,
    reply          JSONB       NOT NULL,
    position       BIGINT      NOT NULL,
    stream_version BIGINT      NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
