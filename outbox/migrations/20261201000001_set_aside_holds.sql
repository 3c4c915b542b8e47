-- A row set aside (it could not be published: its topic is missing, the relay may not write to
-- it, it is too large, its schema was refused) holds back the later rows of its topic and key, so
-- that an aggregate's events are first delivered in order whatever failed. It holds until it is
-- retried (`keel outbox retry`: failed_at cleared) or discarded (`keel outbox discard`).
ALTER TABLE outbox.events ADD COLUMN discarded_at timestamptz;
CREATE INDEX events_holding ON outbox.events (topic, message_key, id)
    WHERE failed_at IS NOT NULL AND discarded_at IS NULL;
