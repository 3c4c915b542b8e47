-- The relay reports set-aside rows as a metric every few seconds; keep that count off a full scan.
CREATE INDEX events_failed ON outbox.events (id) WHERE failed_at IS NOT NULL;
