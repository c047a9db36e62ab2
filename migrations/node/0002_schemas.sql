-- The schema registry: every registered version of every event type's payload schema.
CREATE TABLE schemas (
    event_type     TEXT    NOT NULL,
    version        TEXT    NOT NULL, -- semver
    message_name   TEXT    NOT NULL,
    descriptor_set BLOB    NOT NULL, -- normalised, encoded FileDescriptorSet
    registered_at  INTEGER NOT NULL, -- unix milliseconds
    PRIMARY KEY (event_type, version)
) WITHOUT ROWID;
