-- Idempotency keys expire after a retention (default 24 hours); the cleanup deletes by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
