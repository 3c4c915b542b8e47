-- The transactional outbox. A service inserts a row in the same transaction as its business
-- change; the relay publishes pending rows in id order and marks them published.
CREATE TABLE outbox.events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text NOT NULL,
    -- The Kafka key: the aggregate's id, so one aggregate's events share a partition.
    message_key  text NOT NULL,
    event_type   text NOT NULL,
    event_id     uuid NOT NULL,
    -- keel_schemas::Event as JSON; the relay encodes it to Avro with the registry's schema id.
    payload      jsonb NOT NULL,
    -- W3C trace context of the writer (traceparent, tracestate), sent on as Kafka headers.
    headers      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz,
    -- A row that can never be published (its payload does not parse) is set aside, not retried.
    failed_at    timestamptz,
    error        text
);

CREATE INDEX events_pending ON outbox.events (id) WHERE published_at IS NULL AND failed_at IS NULL;
CREATE INDEX events_published_at ON outbox.events (published_at) WHERE published_at IS NOT NULL;

-- Wake the relay when rows arrive. One notification per statement; PostgreSQL folds identical
-- notifications of one transaction into one.
CREATE FUNCTION outbox.notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keel_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify_relay AFTER INSERT ON outbox.events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay();
