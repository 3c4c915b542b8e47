-- One row per dead-lettered record `keel dlq redrive` republished, written after the broker
-- acknowledged the copy: interrupted before that, the record is redriven again next time (a
-- duplicate the groups' dedupe absorbs), never skipped.
CREATE TABLE consumers.dead_letter_redrives (
    dlq_topic       text NOT NULL,
    dlq_offset      bigint NOT NULL,
    target_topic    text NOT NULL,
    target_partition integer NOT NULL,
    target_offset   bigint NOT NULL,
    redriven_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_offset, redriven_at)
);
