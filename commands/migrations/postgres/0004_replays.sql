-- The replays running or interrupted, one per read model: a lease its owner renews while it
-- runs (so a second replay of the same model is refused), with its progress for GET /projections.
CREATE TABLE replays (
    model        TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    done         BIGINT NOT NULL,
    total        BIGINT NOT NULL,
    renewed_ms   BIGINT NOT NULL
);
