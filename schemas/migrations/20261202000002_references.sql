-- Schema references (Confluent's `references`): the named types a schema takes from other
-- subjects' versions, in the order the registration gave them.
CREATE TABLE registry.schema_references (
    schema_id integer NOT NULL REFERENCES registry.schemas (id),
    position  integer NOT NULL,
    name      text NOT NULL,
    subject   text NOT NULL,
    version   integer NOT NULL,
    PRIMARY KEY (schema_id, position)
);
CREATE INDEX schema_references_target ON registry.schema_references (subject, version);

-- A schema with references made self-contained (each referenced type defined where it is first
-- used): what compatibility checks read. NULL for a schema without references.
ALTER TABLE registry.schemas ADD COLUMN resolved text;
