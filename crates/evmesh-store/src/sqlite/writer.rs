//! The single writer: a thread that owns the write connection and commits
//! everything that queued up while the previous commit ran, in one transaction
//! (group commit). Its commits go to the WAL without waiting for the disk;
//! [`super::sync`] makes them durable and answers their senders while the writer
//! runs the next group.
//!
//! The writer drives SQLite directly (rusqlite) rather than through sqlx: each
//! event is one step of a cached prepared statement on the writer's own thread,
//! with no hop to sqlx's connection thread and no owned copy of its bindings
//! made for the hop.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use evmesh_proto::v1::Event;
use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use super::{Log, seq_param, sync, unix_ms};
use crate::dispatch::{Checkpoint, GroupRow, ParkedChange};
use crate::{Appended, Pattern, Result, StoreError, StoredEvent};

pub(crate) enum WriteOp {
    Append {
        events: Vec<Event>,
        /// Each event encoded, by the sender: off the writer's serial path.
        envelopes: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<Vec<Appended>>>,
    },
    CreateGroup {
        row: GroupRow,
        reply: oneshot::Sender<Result<()>>,
    },
    UpdatePatterns {
        group: String,
        patterns: Vec<Pattern>,
    },
    /// Removes a group, its sets and its dead letters; answers how many dead
    /// letters went.
    DeleteGroup {
        group: String,
        reply: oneshot::Sender<Result<u64>>,
    },
    Checkpoint(Checkpoint),
    Redrive {
        group: String,
        sequences: Vec<u64>,
        reply: oneshot::Sender<Result<Vec<u64>>>,
    },
    Purge {
        group: String,
        sequences: Vec<u64>,
        reply: oneshot::Sender<Result<u64>>,
    },
    PutSchema {
        record: crate::SchemaRecord,
        /// The type's versions the registry decided against.
        known: Vec<semver::Version>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Deletes events up to `upto` (retention); groups that had not settled them
    /// move on past them.
    Trim {
        upto: u64,
        reply: oneshot::Sender<Result<Trim>>,
    },
    /// Commit what came before, then stop.
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// What to tell the sender of an op once the transaction is durable.
pub(crate) enum Outcome {
    Appended(oneshot::Sender<Result<Vec<Appended>>>, Vec<Appended>),
    Done(Option<oneshot::Sender<Result<()>>>),
    Sequences(oneshot::Sender<Result<Vec<u64>>>, Vec<u64>),
    Count(oneshot::Sender<Result<u64>>, u64),
    Trimmed(oneshot::Sender<Result<Trim>>, Trim),
    Stop(oneshot::Sender<()>),
}

/// What a [`WriteOp::Trim`] deleted.
#[derive(Debug, Default)]
pub(crate) struct Trim {
    pub deleted: u64,
    /// Groups whose floor was below `upto`, with how many events they selected
    /// and had not settled there.
    pub groups: Vec<(String, u64)>,
}

impl Outcome {
    pub(crate) fn fail(self, message: &str) {
        let err = || StoreError::CommitFailed(message.to_owned());
        match self {
            Outcome::Appended(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Done(Some(reply)) => drop(reply.send(Err(err()))),
            Outcome::Done(None) => {}
            Outcome::Sequences(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Count(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Trimmed(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Stop(reply) => drop(reply.send(())),
        }
    }

    pub(crate) fn succeed(self) {
        match self {
            Outcome::Appended(reply, acks) => drop(reply.send(Ok(acks))),
            Outcome::Done(Some(reply)) => drop(reply.send(Ok(()))),
            Outcome::Done(None) => {}
            Outcome::Sequences(reply, seqs) => drop(reply.send(Ok(seqs))),
            Outcome::Count(reply, n) => drop(reply.send(Ok(n))),
            Outcome::Trimmed(reply, trim) => drop(reply.send(Ok(trim))),
            Outcome::Stop(reply) => drop(reply.send(())),
        }
    }
}

/// Opens a read-write connection to the log at `path` (created and migrated), with
/// the settings every connection that writes or checkpoints needs.
fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // Commits do not wait for the disk: the sync thread makes each one durable
    // before its acks go out (see `sync`). Checkpoints still sync as they must.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Starts the writer thread over the log at `path` (created and migrated), with its
/// sync and checkpoint threads. The receiver resolves once the writer has stopped:
/// after a [`WriteOp::Stop`], or once every sender of `rx` is gone.
pub(crate) fn start(
    path: &Path,
    rx: mpsc::Receiver<WriteOp>,
    log: Weak<Log>,
    max_batch_events: usize,
) -> Result<oneshot::Receiver<()>> {
    let conn = connect(path)?;
    // The checkpoint thread copies the WAL into the database, off the commit path,
    // and the writer restarts the WAL itself (see `Writer::run`): no automatic
    // checkpoint inside a commit.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
    // A page cache that holds a whole group commit (4096 events of a few hundred
    // bytes, and the index pages they touch), so that a commit does not spill dirty
    // pages to the WAL before it ends, nor read back what it evicted.
    conn.pragma_update(None, "cache_size", -16384)?;
    conn.pragma_update(None, "temp_store", "memory")?;

    let failure = sync::Failure::default();
    let unsynced = Arc::new(sync::Unsynced::default());
    let (committed_tx, committed_rx) = mpsc::channel(sync::QUEUE);
    let syncer = {
        let (log, failure, unsynced) = (log.clone(), failure.clone(), unsynced.clone());
        let wal = sync::wal_path(path);
        std::thread::Builder::new()
            .name("evmesh-wal-sync".into())
            .spawn(move || sync::run(wal, committed_rx, log, failure, unsynced))?
    };
    let (nudge, nudged) = std::sync::mpsc::sync_channel(1);
    let checkpoints = Arc::new(sync::Checkpoints::default());
    let checkpointer = {
        let (checkpoints, conn) = (checkpoints.clone(), connect(path)?);
        std::thread::Builder::new()
            .name("evmesh-checkpoint".into())
            .spawn(move || checkpoints.run(conn, nudged))?
    };
    let (stopped_tx, stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name("evmesh-writer".into())
        .spawn(move || {
            let writer = Writer {
                committed: committed_tx,
                unsynced,
                nudge,
                checkpoints,
                max_batch_events,
                page_size: usize::try_from(page_size).unwrap_or(4096),
            };
            let mut conn = conn;
            writer.run(&mut conn, rx, &failure);
            // Everything committed is synced and answered before the connection
            // closes.
            if syncer.join().is_err() || checkpointer.join().is_err() {
                tracing::error!("a WAL thread panicked");
            }
            // The readers' connections close last, and a read-only connection
            // leaves the WAL as it is: empty it now, so that the next start has
            // nothing to recover.
            sync::truncate(&conn);
            drop(conn);
            let _ = stopped_tx.send(());
        })?;
    Ok(stopped)
}

/// The writer thread's ends of its sync and checkpoint threads, and its settings.
struct Writer {
    committed: mpsc::Sender<sync::Committed>,
    unsynced: Arc<sync::Unsynced>,
    nudge: std::sync::mpsc::SyncSender<()>,
    checkpoints: Arc<sync::Checkpoints>,
    max_batch_events: usize,
    page_size: usize,
}

impl Writer {
    fn run(self, conn: &mut Connection, mut rx: mpsc::Receiver<WriteOp>, failure: &sync::Failure) {
        let mut ops = Vec::new();
        // Roughly what the WAL has grown by since the checkpoint thread was last
        // nudged, and since the WAL last started over.
        let (mut wal_bytes, mut since_restart) = (0, 0);
        let mut stopping = false;
        while !stopping {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut size = first.weight();
            ops.push(first);
            self.take(&mut rx, &mut ops, &mut size);
            if size < self.max_batch_events / 16 {
                // A few events are not worth their own commit (each writes whole
                // pages of the table and its indexes), and nothing is acked before
                // the sync under way ends: wait for it, and take what arrives
                // meanwhile into this commit.
                self.unsynced.wait();
                self.take(&mut rx, &mut ops, &mut size);
            }
            stopping = ops.iter().any(|op| matches!(op, WriteOp::Stop { .. }));
            if let Some(message) = failure.get() {
                ops.drain(..)
                    .map(WriteOp::unrun)
                    .for_each(|o| o.fail(message));
                continue;
            }
            // Each commit writes at least a page of the table and of each index.
            let bytes = 3 * self.page_size + ops.iter().map(WriteOp::bytes).sum::<usize>();
            wal_bytes += bytes;
            since_restart += bytes;
            let Some(committed) = commit(conn, ops.drain(..)) else {
                continue;
            };
            if wal_bytes >= sync::CHECKPOINT_BYTES {
                // Full means a nudge is already waiting: that checkpoint will do.
                let _ = self.nudge.try_send(());
                wal_bytes = 0;
            }
            self.unsynced.add();
            if let Err(mpsc::error::SendError(c)) = self.committed.blocking_send(committed) {
                self.unsynced.settle(1);
                let message = failure.get_or_init(|| "the log's sync thread stopped".into());
                c.outcomes.into_iter().for_each(|o| o.fail(message));
            }
            // The checkpoint thread counts the WAL's frames; the estimate holds should
            // it fall behind.
            let frames = self.checkpoints.frames() * self.page_size;
            if frames.max(since_restart) >= sync::RESTART_BYTES {
                // While this group syncs: copy the little the checkpoint thread has
                // not, and let the next transaction start the WAL over.
                if self.checkpoints.restart(conn) {
                    since_restart = 0;
                }
            }
        }
    }

    /// Adds what is queued to `ops`, up to a full group.
    fn take(&self, rx: &mut mpsc::Receiver<WriteOp>, ops: &mut Vec<WriteOp>, size: &mut usize) {
        while *size < self.max_batch_events {
            match rx.try_recv() {
                Ok(op) => {
                    *size += op.weight();
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
    }
}

impl WriteOp {
    /// What the op counts for against a group's `max_batch_events`.
    fn weight(&self) -> usize {
        match self {
            WriteOp::Append { events, .. } => events.len(),
            WriteOp::Checkpoint(c) => {
                1 + c.changes.settled.len() + c.changes.dead.len() + c.changes.parked.len()
            }
            _ => 1,
        }
    }

    /// About what the op adds to the WAL: its rows and their index entries, in pages
    /// that B-tree splits leave about two thirds full.
    fn bytes(&self) -> usize {
        let rows = match self {
            WriteOp::Append { envelopes, .. } => envelopes.iter().map(|e| e.len() + 128).sum(),
            op => op.weight() * 64,
        };
        rows * 3 / 2
    }

    /// What the sender waits for, for an op that did not run.
    fn unrun(self) -> Outcome {
        match self {
            WriteOp::Append { reply, .. } => Outcome::Appended(reply, Vec::new()),
            WriteOp::CreateGroup { reply, .. } | WriteOp::PutSchema { reply, .. } => {
                Outcome::Done(Some(reply))
            }
            WriteOp::Checkpoint(c) => Outcome::Done(c.reply),
            WriteOp::UpdatePatterns { .. } => Outcome::Done(None),
            WriteOp::Redrive { reply, .. } => Outcome::Sequences(reply, Vec::new()),
            WriteOp::Purge { reply, .. } | WriteOp::DeleteGroup { reply, .. } => {
                Outcome::Count(reply, 0)
            }
            WriteOp::Trim { reply, .. } => Outcome::Trimmed(reply, Trim::default()),
            WriteOp::Stop { reply } => Outcome::Stop(reply),
        }
    }
}

/// Runs `ops` in one transaction. Committed, it is handed back to be synced before
/// anyone hears of it; failed, every sender learns so now.
fn commit(
    conn: &mut Connection,
    mut ops: impl Iterator<Item = WriteOp>,
) -> Option<sync::Committed> {
    let mut outcomes = Vec::new();
    let mut fresh = Vec::new();
    let result: Result<()> = (|| {
        let tx = conn.transaction()?;
        let now = unix_ms(SystemTime::now());
        for op in ops.by_ref() {
            outcomes.push(apply(&tx, op, now, &mut fresh)?);
        }
        tx.commit()?;
        Ok(())
    })();
    match result {
        Ok(()) => Some(sync::Committed { outcomes, fresh }),
        Err(e) => {
            // Nothing of this batch is in the log: every sender learns so, those
            // whose ops did not get to run too.
            let message = e.to_string();
            tracing::error!(error = %message, "commit failed");
            outcomes
                .into_iter()
                .chain(ops.map(WriteOp::unrun))
                .for_each(|o| o.fail(&message));
            None
        }
    }
}

fn apply(
    tx: &Transaction<'_>,
    op: WriteOp,
    now: i64,
    fresh: &mut Vec<Arc<StoredEvent>>,
) -> Result<Outcome> {
    Ok(match op {
        WriteOp::Append {
            events,
            envelopes,
            reply,
        } => {
            let acks = append(tx, events, &envelopes, now, fresh)?;
            Outcome::Appended(reply, acks)
        }
        WriteOp::CreateGroup { row, reply } => {
            tx.prepare_cached(
                "INSERT INTO groups (name, patterns, ack_timeout_ms, max_deliveries, ack_floor, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                row.name,
                GroupRow::patterns_text(&row.patterns),
                i64::try_from(row.ack_timeout.as_millis()).unwrap_or(i64::MAX),
                i64::from(row.max_deliveries),
                seq_param(row.ack_floor),
                now,
            ])?;
            Outcome::Done(Some(reply))
        }
        WriteOp::UpdatePatterns { group, patterns } => {
            tx.prepare_cached("UPDATE groups SET patterns = ?1 WHERE name = ?2")?
                .execute(params![GroupRow::patterns_text(&patterns), group])?;
            Outcome::Done(None)
        }
        WriteOp::Checkpoint(c) => {
            checkpoint(tx, &c)?;
            Outcome::Done(c.reply)
        }
        WriteOp::Redrive {
            group,
            sequences,
            reply,
        } => {
            let moved = take_dead_letters(tx, &group, &sequences)?;
            let mut insert = tx
                .prepare_cached("INSERT OR IGNORE INTO group_redrive (grp, seq) VALUES (?1, ?2)")?;
            for &seq in &moved {
                insert.execute(params![group, seq_param(seq)])?;
            }
            Outcome::Sequences(reply, moved)
        }
        WriteOp::Purge {
            group,
            sequences,
            reply,
        } => {
            let purged = take_dead_letters(tx, &group, &sequences)?;
            Outcome::Count(reply, purged.len() as u64)
        }
        WriteOp::DeleteGroup { group, reply } => {
            let dead = tx
                .prepare_cached("DELETE FROM dead_letters WHERE grp = ?1")?
                .execute(params![group])?;
            for sql in [
                "DELETE FROM group_settled WHERE grp = ?1",
                "DELETE FROM group_redrive WHERE grp = ?1",
                "DELETE FROM group_delayed WHERE grp = ?1",
                "DELETE FROM groups WHERE name = ?1",
            ] {
                tx.prepare_cached(sql)?.execute(params![group])?;
            }
            Outcome::Count(reply, dead as u64)
        }
        WriteOp::PutSchema {
            record,
            known,
            reply,
        } => {
            let mut stored = Vec::new();
            {
                let mut versions =
                    tx.prepare_cached("SELECT version FROM schemas WHERE event_type = ?1")?;
                let mut rows = versions.query(params![record.event_type])?;
                while let Some(row) = rows.next()? {
                    let version: String = row.get(0)?;
                    stored.push(version);
                }
            }
            if !same_versions(&stored, &known) {
                // Not a failure of the batch: only this op is refused.
                let _ = reply.send(Err(StoreError::Stale(format!(
                    "the versions of {} changed while this registration was decided",
                    record.event_type
                ))));
                return Ok(Outcome::Done(None));
            }
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO schemas (event_type, version, message_name, descriptor_set, registered_at)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    record.event_type,
                    record.version.to_string(),
                    record.message_name,
                    record.descriptor_set,
                    unix_ms(record.registered_at),
                ])?;
            if inserted == 0 {
                // Not a failure of the batch: only this op is refused.
                let _ = reply.send(Err(StoreError::AlreadyExists(format!(
                    "schema {} {}",
                    record.event_type, record.version
                ))));
                Outcome::Done(None)
            } else {
                Outcome::Done(Some(reply))
            }
        }
        WriteOp::Trim { upto, reply } => Outcome::Trimmed(reply, trim(tx, upto)?),
        WriteOp::Stop { reply } => Outcome::Stop(reply),
    })
}

/// Deletes the events up to `upto`. Each group whose floor is below moves it to
/// `upto`, counting the events its patterns select that it had not settled (or had
/// parked, or redriven) there; its dead letters stay, their events gone.
fn trim(tx: &Transaction<'_>, upto: u64) -> Result<Trim> {
    let first: Option<i64> = tx
        .prepare_cached("SELECT min(seq) FROM events")?
        .query_row([], |row| row.get(0))?;
    let Some(first) = first.and_then(|f| u64::try_from(f).ok()) else {
        return Ok(Trim::default());
    };
    if first > upto {
        return Ok(Trim::default());
    }
    let mut behind = Vec::new();
    {
        let mut rows =
            tx.prepare_cached("SELECT name, patterns, ack_floor FROM groups WHERE ack_floor < ?1")?;
        let mut rows = rows.query(params![seq_param(upto)])?;
        while let Some(row) = rows.next()? {
            let (name, patterns, floor): (String, String, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            behind.push((name, patterns, u64::try_from(floor).unwrap_or(0)));
        }
    }
    let mut trim = Trim::default();
    let mut events: Option<Vec<(u64, String, String)>> = None;
    for (group, patterns, floor) in behind {
        let patterns: Vec<Pattern> = patterns
            .lines()
            .filter_map(|p| Pattern::parse(p).ok())
            .collect();
        let events = match &mut events {
            Some(events) => events,
            None => events.insert(trimmed_types(tx, first, upto)?),
        };
        let in_range = |sql: &str| -> Result<std::collections::HashSet<u64>> {
            let mut stmt = tx.prepare_cached(sql)?;
            let seqs =
                stmt.query_map(params![group, seq_param(upto)], |row| row.get::<_, i64>(0))?;
            let mut set = std::collections::HashSet::new();
            for seq in seqs {
                set.extend(u64::try_from(seq?).ok());
            }
            Ok(set)
        };
        let settled = in_range("SELECT seq FROM group_settled WHERE grp = ?1 AND seq <= ?2")?;
        let parked = in_range("SELECT seq FROM group_delayed WHERE grp = ?1 AND seq <= ?2")?;
        let redriven = in_range("SELECT seq FROM group_redrive WHERE grp = ?1 AND seq <= ?2")?;
        // Parked and redriven events count as settled for the floor; they are not.
        let skipped = events
            .iter()
            .filter(|(seq, ty, version)| {
                *seq > floor
                    && !settled.contains(seq)
                    && patterns.iter().any(|p| p.matches(ty, version))
            })
            .count()
            + parked.union(&redriven).count();
        tx.prepare_cached("UPDATE groups SET ack_floor = ?1 WHERE name = ?2")?
            .execute(params![seq_param(upto), group])?;
        for sql in [
            "DELETE FROM group_settled WHERE grp = ?1 AND seq <= ?2",
            "DELETE FROM group_delayed WHERE grp = ?1 AND seq <= ?2",
            "DELETE FROM group_redrive WHERE grp = ?1 AND seq <= ?2",
        ] {
            tx.prepare_cached(sql)?
                .execute(params![group, seq_param(upto)])?;
        }
        trim.groups.push((group, skipped as u64));
    }
    trim.deleted = tx
        .prepare_cached("DELETE FROM events WHERE seq <= ?1")?
        .execute(params![seq_param(upto)])? as u64;
    Ok(trim)
}

/// The sequence, type and schema version of each event from `first` to `upto`; an
/// event that does not decode selects nothing.
fn trimmed_types(
    tx: &Transaction<'_>,
    first: u64,
    upto: u64,
) -> Result<Vec<(u64, String, String)>> {
    let mut stmt =
        tx.prepare_cached("SELECT seq, envelope FROM events WHERE seq >= ?1 AND seq <= ?2")?;
    let mut rows = stmt.query(params![seq_param(first), seq_param(upto)])?;
    let mut events = Vec::new();
    while let Some(row) = rows.next()? {
        let seq = u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0);
        let envelope: Vec<u8> = row.get(1)?;
        if let Ok(event) = <Event as prost::Message>::decode(envelope.as_slice()) {
            events.push((seq, event.r#type, event.schema_version));
        }
    }
    Ok(events)
}

/// Whether the stored version strings are exactly `known`, in any order.
fn same_versions(stored: &[String], known: &[semver::Version]) -> bool {
    let mut known: Vec<String> = known.iter().map(ToString::to_string).collect();
    let mut stored = stored.to_vec();
    known.sort();
    stored.sort();
    known == stored
}

/// Appends each event whose id is not in the log yet; the others are acked with
/// the sequence they already have (from the log, or from earlier in this same
/// transaction).
fn append(
    tx: &Transaction<'_>,
    events: Vec<Event>,
    envelopes: &[Vec<u8>],
    now: i64,
    fresh: &mut Vec<Arc<StoredEvent>>,
) -> Result<Vec<Appended>> {
    // OR FAIL: a known id stops the statement before it writes anything, so no
    // statement journal is kept to undo it. The sequence is the next rowid.
    let mut insert = tx.prepare_cached(
        "INSERT OR FAIL INTO events (id, correlation_id, appended_at, envelope) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut acks = Vec::with_capacity(events.len());
    for (event, envelope) in events.iter().zip(envelopes) {
        let ack = match insert.execute(params![event.id, event.correlation_id, now, envelope]) {
            Ok(_) => Appended {
                sequence: u64::try_from(tx.last_insert_rowid()).unwrap_or(0),
                duplicate: false,
            },
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation
                    && e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                let known: i64 = tx
                    .prepare_cached("SELECT seq FROM events WHERE id = ?1")?
                    .query_row([&event.id], |row| row.get(0))?;
                Appended {
                    sequence: u64::try_from(known).unwrap_or(0),
                    duplicate: true,
                }
            }
            Err(e) => return Err(e.into()),
        };
        acks.push(ack);
    }
    drop(insert);
    for (event, ack) in events.into_iter().zip(&acks) {
        if !ack.duplicate {
            fresh.push(Arc::new(StoredEvent {
                sequence: ack.sequence,
                event,
            }));
        }
    }
    Ok(acks)
}

/// `group_delayed.due_at` of an event that waits for its aggregate, not a time.
pub(crate) const WAITS_FOR_AGGREGATE: i64 = -1;

fn checkpoint(tx: &Transaction<'_>, c: &Checkpoint) -> Result<()> {
    if c.changes.reset {
        tx.prepare_cached("DELETE FROM group_settled WHERE grp = ?1")?
            .execute([&c.group])?;
        tx.prepare_cached("DELETE FROM group_delayed WHERE grp = ?1")?
            .execute([&c.group])?;
    }
    for (seq, parked) in &c.changes.parked {
        match parked {
            ParkedChange::Set { due, attempts, .. } => tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO group_delayed (grp, seq, due_at, attempts) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    c.group,
                    seq_param(*seq),
                    due.map_or(WAITS_FOR_AGGREGATE, unix_ms),
                    i64::from(*attempts)
                ])?,
            ParkedChange::Cleared => tx
                .prepare_cached("DELETE FROM group_delayed WHERE grp = ?1 AND seq = ?2")?
                .execute(params![c.group, seq_param(*seq)])?,
        };
    }
    // Retention may have moved the floor past the dispatcher's: only a seek
    // (a reset) moves it back.
    tx.prepare_cached(
        "UPDATE groups SET ack_floor = CASE WHEN ?3 THEN ?1 ELSE max(ack_floor, ?1) END WHERE name = ?2",
    )?
    .execute(params![seq_param(c.floor), c.group, c.changes.reset])?;
    let mut settle =
        tx.prepare_cached("INSERT OR IGNORE INTO group_settled (grp, seq) VALUES (?1, ?2)")?;
    for &seq in c.changes.settled.iter().filter(|&&s| s > c.floor) {
        settle.execute(params![c.group, seq_param(seq)])?;
    }
    tx.prepare_cached(
        "DELETE FROM group_settled WHERE grp = ?1 AND seq <= (SELECT ack_floor FROM groups WHERE name = ?1)",
    )?
    .execute(params![c.group])?;
    let mut unredrive =
        tx.prepare_cached("DELETE FROM group_redrive WHERE grp = ?1 AND seq = ?2")?;
    for &seq in &c.changes.unredrive {
        unredrive.execute(params![c.group, seq_param(seq)])?;
    }
    let mut dead = tx.prepare_cached(
        "INSERT OR REPLACE INTO dead_letters (grp, seq, attempts, reason, dead_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for d in &c.changes.dead {
        dead.execute(params![
            c.group,
            seq_param(d.sequence),
            i64::from(d.attempts),
            d.reason,
            unix_ms(d.dead_at),
        ])?;
    }
    Ok(())
}

/// Deletes a group's dead letters (all when `sequences` is empty) and returns the
/// sequences that were there.
fn take_dead_letters(tx: &Transaction<'_>, group: &str, sequences: &[u64]) -> Result<Vec<u64>> {
    let mut taken = Vec::new();
    if sequences.is_empty() {
        let mut all = tx.prepare_cached("DELETE FROM dead_letters WHERE grp = ?1 RETURNING seq")?;
        let seqs = all.query_map([group], |row| row.get::<_, i64>(0))?;
        for seq in seqs {
            taken.extend(u64::try_from(seq?).ok());
        }
    } else {
        let mut one = tx
            .prepare_cached("DELETE FROM dead_letters WHERE grp = ?1 AND seq = ?2 RETURNING seq")?;
        for &seq in sequences {
            let found: Option<i64> = one
                .query_row(params![group, seq_param(seq)], |row| row.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            taken.extend(found.and_then(|s| u64::try_from(s).ok()));
        }
    }
    taken.sort_unstable();
    Ok(taken)
}
