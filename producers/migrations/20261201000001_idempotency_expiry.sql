-- Expired idempotency keys are found by age and deleted in slices.
CREATE INDEX idempotency_keys_created_at ON orders.idempotency_keys (created_at);
