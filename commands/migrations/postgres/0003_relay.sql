-- Where each relay stands: the highest global position whose events Kafka acknowledged.
CREATE TABLE relay_checkpoints (
    relay    TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
