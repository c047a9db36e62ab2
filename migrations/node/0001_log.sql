-- The embedded log of an evmesh node: events, durable consumer groups, dead letters.

-- Every acked event, in log order. The envelope is the protobuf-encoded evmesh.v1.Event;
-- the columns beside it are what the node looks events up by.
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY,
    id             TEXT    NOT NULL UNIQUE,
    correlation_id TEXT    NOT NULL,
    appended_at    INTEGER NOT NULL, -- unix milliseconds; never decreases with seq
    envelope       BLOB    NOT NULL
);
CREATE INDEX events_by_correlation ON events (correlation_id, seq);

-- A durable group: everything up to ack_floor is settled (acked or dead-lettered);
-- group_settled lists what is settled above it.
CREATE TABLE groups (
    name           TEXT    PRIMARY KEY,
    patterns       TEXT    NOT NULL, -- one pattern per line
    ack_timeout_ms INTEGER NOT NULL,
    max_deliveries INTEGER NOT NULL,
    ack_floor      INTEGER NOT NULL,
    created_at     INTEGER NOT NULL
);

CREATE TABLE group_settled (
    grp TEXT    NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;

-- Dead letters put back for delivery; they stay here until settled again.
CREATE TABLE group_redrive (
    grp TEXT    NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;

CREATE TABLE dead_letters (
    grp      TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason   TEXT    NOT NULL,
    dead_at  INTEGER NOT NULL, -- unix milliseconds
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;
