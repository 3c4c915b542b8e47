-- The event as its writer wrote it: the Avro body under the writer build's contract, and that
-- contract's fingerprint (CRC-64-AVRO of its canonical form; the schema itself in
-- outbox.schemas). The relay sends the body framed with the registry id of that schema, so a
-- relay of another build publishes every field the writer set. payload stays, as JSON for people
-- and SQL; the relay reads it only for rows written before this release (body NULL).
CREATE TABLE outbox.schemas (
    fingerprint bigint PRIMARY KEY,
    record      text NOT NULL,
    schema      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox.events ADD COLUMN schema_fingerprint bigint, ADD COLUMN body bytea;
