-- Modes, as Confluent's registry has them: READWRITE (the default), READONLY (refuses every
-- write) and IMPORT (registers a schema with the id and version a migration tool gives, without a
-- compatibility check). The row with subject '' is the global mode.
CREATE TABLE registry.modes (
    subject text PRIMARY KEY,
    mode    text NOT NULL CHECK (mode IN ('READWRITE', 'READONLY', 'IMPORT'))
);
INSERT INTO registry.modes (subject, mode) VALUES ('', 'READWRITE');

-- Which rule computed `normalized` (and so `fingerprint`): 1, the raw JSON with sorted keys; 2,
-- the JSON with names resolved to full names and primitives bare, keys sorted, so that spellings
-- of one schema share an id.
-- Rows of form 1 are rewritten by the registry at start-up (the Avro parser is not in SQL); the
-- default stays 1 so that rows a registry of the first rule writes during a rolling upgrade are
-- rewritten too.
ALTER TABLE registry.schemas ADD COLUMN identity_form smallint NOT NULL DEFAULT 1;
