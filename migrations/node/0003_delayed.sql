-- Events a member nacked with a delay. They count as settled for the group's ack
-- floor, so that a long delay holds back only its own aggregate, and are delivered
-- again when due; a row stays until the event is settled for good.
CREATE TABLE group_delayed (
    grp      TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    due_at   INTEGER NOT NULL, -- unix milliseconds; -1: waits for its aggregate to free
    attempts INTEGER NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;
