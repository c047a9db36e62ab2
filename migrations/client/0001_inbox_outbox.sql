-- A service's own evmesh tables, beside its data in its SQLite database.

-- Events a consumer has handled: the dedup mark, written in the same transaction as
-- the handler's effects.
CREATE TABLE evmesh_inbox (
    consumer     TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    processed_at INTEGER NOT NULL, -- unix milliseconds
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
CREATE INDEX evmesh_inbox_by_time ON evmesh_inbox (processed_at);

-- Events published by handlers, waiting for the relay. Ids are fixed here, so a
-- re-send after a crash is a duplicate the node absorbs.
CREATE TABLE evmesh_outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT    NOT NULL UNIQUE,
    envelope BLOB    NOT NULL -- protobuf-encoded evmesh.v1.Event
);
