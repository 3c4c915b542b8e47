-- One row per (group, event) whose effect committed. Inserted in the same transaction as the
-- effect: if the row exists, the effect happened, exactly once.
CREATE TABLE consumers.processed_events (
    group_id     text NOT NULL,
    event_id     uuid NOT NULL,
    topic        text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, event_id)
);
