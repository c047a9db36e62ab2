//! The single writer: owns the write connection and commits everything that queued
//! up while the previous commit ran, in one transaction (group commit).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use evmesh_proto::v1::Event;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::dispatch::GroupRow;
use super::{Log, seq_param, unix_ms};
use crate::{Appended, Pattern, Result, StoreError, StoredEvent};

/// Rows per multi-row INSERT. A few fixed sizes keep the prepared statements cached;
/// the largest keeps a commit's round trips to the connection's thread few.
const CHUNKS: [usize; 4] = [512, 64, 8, 1];

/// The prepared INSERTs, one pair per chunk size.
struct Inserts {
    /// Rows with the sequences the writer assigns; stops at a known id, keeping the
    /// rows before it.
    fresh: Vec<(usize, String)>,
    /// Rows whose ids may be known: skips those and returns what it inserted.
    checked: Vec<(usize, String)>,
}

impl Inserts {
    fn new() -> Self {
        let rows = |sql: fn(usize) -> String| CHUNKS.iter().map(|&n| (n, sql(n))).collect();
        Self {
            fresh: rows(fresh_insert_sql),
            checked: rows(checked_insert_sql),
        }
    }
}

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
        reply: oneshot::Sender<Result<()>>,
    },
    /// Commit what came before, then stop.
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// A group's state changes since its last checkpoint.
#[derive(Default)]
pub(crate) struct Checkpoint {
    pub group: String,
    pub floor: u64,
    /// Forget every settled sequence above the floor first (a seek).
    pub reset: bool,
    pub settled: Vec<u64>,
    pub unredrive: Vec<u64>,
    pub dead: Vec<DeadRow>,
    pub reply: Option<oneshot::Sender<Result<()>>>,
}

pub(crate) struct DeadRow {
    pub sequence: u64,
    pub attempts: u32,
    pub reason: String,
    pub dead_at: SystemTime,
}

/// What to tell the sender of an op once the transaction is committed.
enum Outcome {
    Appended(oneshot::Sender<Result<Vec<Appended>>>, Vec<Appended>),
    Done(Option<oneshot::Sender<Result<()>>>),
    Sequences(oneshot::Sender<Result<Vec<u64>>>, Vec<u64>),
    Count(oneshot::Sender<Result<u64>>, u64),
    Stop(oneshot::Sender<()>),
}

impl Outcome {
    fn fail(self, message: &str) {
        let err = || StoreError::CommitFailed(message.to_owned());
        match self {
            Outcome::Appended(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Done(Some(reply)) => drop(reply.send(Err(err()))),
            Outcome::Done(None) => {}
            Outcome::Sequences(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Count(reply, _) => drop(reply.send(Err(err()))),
            Outcome::Stop(reply) => drop(reply.send(())),
        }
    }

    fn succeed(self) {
        match self {
            Outcome::Appended(reply, acks) => drop(reply.send(Ok(acks))),
            Outcome::Done(Some(reply)) => drop(reply.send(Ok(()))),
            Outcome::Done(None) => {}
            Outcome::Sequences(reply, seqs) => drop(reply.send(Ok(seqs))),
            Outcome::Count(reply, n) => drop(reply.send(Ok(n))),
            Outcome::Stop(reply) => drop(reply.send(())),
        }
    }
}

fn weight(op: &WriteOp) -> usize {
    match op {
        WriteOp::Append { events, .. } => events.len(),
        WriteOp::Checkpoint(c) => 1 + c.settled.len() + c.dead.len(),
        _ => 1,
    }
}

/// Runs the writer over `conn`, whose log ends at `head`.
pub(crate) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<WriteOp>,
    log: Weak<Log>,
    max_batch_events: usize,
    head: u64,
) {
    let inserts = Inserts::new();
    // The writer is the log's only writer: it numbers the events itself.
    let mut next_seq = head + 1;
    let mut ops = Vec::new();
    let mut stopping = false;
    while !stopping {
        let Some(first) = rx.recv().await else { break };
        let mut size = weight(&first);
        ops.push(first);
        while size < max_batch_events {
            match rx.try_recv() {
                Ok(op) => {
                    size += weight(&op);
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
        stopping = ops.iter().any(|op| matches!(op, WriteOp::Stop { .. }));
        commit(&mut conn, ops.drain(..), &inserts, &log, &mut next_seq).await;
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the write connection");
    }
}

async fn commit(
    conn: &mut SqliteConnection,
    ops: impl Iterator<Item = WriteOp>,
    inserts: &Inserts,
    log: &Weak<Log>,
    next_seq: &mut u64,
) {
    let mut outcomes = Vec::new();
    let mut fresh = Vec::new();
    let first_seq = *next_seq;
    let result: Result<()> = async {
        let mut tx = conn.begin().await?;
        let now = unix_ms(SystemTime::now());
        let mut batch = Batch {
            now,
            inserts,
            fresh: &mut fresh,
            next_seq,
        };
        for op in ops {
            outcomes.push(apply(&mut tx, op, &mut batch).await?);
        }
        tx.commit().await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            if let Some(log) = log.upgrade() {
                log.push_recent(fresh);
            }
            outcomes.into_iter().for_each(Outcome::succeed);
        }
        Err(e) => {
            // Nothing of this batch is durable: every sender learns so; the ops that
            // did not get to run are dropped with their senders, which reads as
            // shutting down.
            *next_seq = first_seq;
            let message = e.to_string();
            tracing::error!(error = %message, "commit failed");
            outcomes.into_iter().for_each(|o| o.fail(&message));
        }
    }
}

fn fresh_insert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT OR FAIL INTO events (seq, id, correlation_id, appended_at, envelope) VALUES {values}"
    )
}

fn checked_insert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO events (id, correlation_id, appended_at, envelope) VALUES {values} \
         ON CONFLICT (id) DO NOTHING RETURNING seq, id"
    )
}

/// The largest chunk of at most `left` rows, and its statement (there is always
/// one while `left` ≥ 1: every list ends with 1).
fn largest_chunk(inserts: &[(usize, String)], left: usize) -> Option<(usize, &str)> {
    inserts
        .iter()
        .find(|(n, _)| *n <= left)
        .map(|(n, sql)| (*n, sql.as_str()))
}

/// What the ops of one transaction share.
struct Batch<'a> {
    now: i64,
    inserts: &'a Inserts,
    /// The events appended, for the recent ring once committed.
    fresh: &'a mut Vec<Arc<StoredEvent>>,
    /// The sequence the next appended event gets.
    next_seq: &'a mut u64,
}

async fn apply(tx: &mut SqliteConnection, op: WriteOp, batch: &mut Batch<'_>) -> Result<Outcome> {
    let now = batch.now;
    Ok(match op {
        WriteOp::Append {
            events,
            envelopes,
            reply,
        } => {
            let acks = append(tx, events, &envelopes, batch).await?;
            Outcome::Appended(reply, acks)
        }
        WriteOp::CreateGroup { row, reply } => {
            sqlx::query(
                "INSERT INTO groups (name, patterns, ack_timeout_ms, max_deliveries, ack_floor, created_at)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&row.name)
            .bind(GroupRow::patterns_sql(&row.patterns))
            .bind(i64::try_from(row.ack_timeout.as_millis()).unwrap_or(i64::MAX))
            .bind(i64::from(row.max_deliveries))
            .bind(seq_param(row.ack_floor))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            Outcome::Done(Some(reply))
        }
        WriteOp::UpdatePatterns { group, patterns } => {
            sqlx::query("UPDATE groups SET patterns = ? WHERE name = ?")
                .bind(GroupRow::patterns_sql(&patterns))
                .bind(&group)
                .execute(&mut *tx)
                .await?;
            Outcome::Done(None)
        }
        WriteOp::Checkpoint(c) => {
            checkpoint(tx, &c).await?;
            Outcome::Done(c.reply)
        }
        WriteOp::Redrive {
            group,
            sequences,
            reply,
        } => {
            let moved = take_dead_letters(tx, &group, &sequences).await?;
            for &seq in &moved {
                sqlx::query("INSERT OR IGNORE INTO group_redrive (grp, seq) VALUES (?, ?)")
                    .bind(&group)
                    .bind(seq_param(seq))
                    .execute(&mut *tx)
                    .await?;
            }
            Outcome::Sequences(reply, moved)
        }
        WriteOp::Purge {
            group,
            sequences,
            reply,
        } => {
            let purged = take_dead_letters(tx, &group, &sequences).await?;
            Outcome::Count(reply, purged.len() as u64)
        }
        WriteOp::PutSchema { record, reply } => {
            let inserted = sqlx::query(
                "INSERT INTO schemas (event_type, version, message_name, descriptor_set, registered_at)
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(&record.event_type)
            .bind(record.version.to_string())
            .bind(&record.message_name)
            .bind(&record.descriptor_set)
            .bind(unix_ms(record.registered_at))
            .execute(&mut *tx)
            .await?
            .rows_affected();
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
        WriteOp::Stop { reply } => Outcome::Stop(reply),
    })
}

async fn append(
    tx: &mut SqliteConnection,
    events: Vec<Event>,
    envelopes: &[Vec<u8>],
    batch: &mut Batch<'_>,
) -> Result<Vec<Appended>> {
    let mut acks: Vec<Appended> = Vec::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let Some((rows, sql)) = largest_chunk(&batch.inserts.fresh, events.len() - start) else {
            break;
        };
        let range = start..start + rows;
        // Fast path: ids are new (the node makes most of them), so the rows take the
        // next sequences as they come. Text is bound as &str, which sqlx borrows
        // (a &String it would copy).
        let mut query = sqlx::query(sql);
        for (offset, i) in range.clone().enumerate() {
            query = query
                .bind(seq_param(*batch.next_seq + offset as u64))
                .bind(events[i].id.as_str())
                .bind(events[i].correlation_id.as_str())
                .bind(batch.now)
                .bind(&envelopes[i][..]);
        }
        let fresh = match query.execute(&mut *tx).await {
            Ok(_) => rows,
            // A known id: OR FAIL keeps the rows before it (no statement journal is
            // needed to undo them); the rest of the chunk goes the slow way.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
                    .fetch_one(&mut *tx)
                    .await?;
                let kept = (u64::try_from(last).unwrap_or(0) + 1).saturating_sub(*batch.next_seq);
                usize::try_from(kept).unwrap_or(0).min(rows)
            }
            Err(e) => return Err(e.into()),
        };
        acks.extend((0..fresh as u64).map(|offset| Appended {
            sequence: *batch.next_seq + offset,
            duplicate: false,
        }));
        *batch.next_seq += fresh as u64;
        let rest = start + fresh..start + rows;
        if !rest.is_empty() {
            acks.extend(append_checked(tx, &events[rest.clone()], &envelopes[rest], batch).await?);
        }
        start += rows;
    }
    for (event, ack) in events.into_iter().zip(&acks) {
        if !ack.duplicate {
            batch.fresh.push(Arc::new(StoredEvent {
                sequence: ack.sequence,
                event,
            }));
        }
    }
    Ok(acks)
}

/// Inserts the events whose ids are not in the log yet; the others are acked with
/// the sequence they already have.
async fn append_checked(
    tx: &mut SqliteConnection,
    events: &[Event],
    envelopes: &[Vec<u8>],
    batch: &mut Batch<'_>,
) -> Result<Vec<Appended>> {
    let mut acks = Vec::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let Some((rows, sql)) = largest_chunk(&batch.inserts.checked, events.len() - start) else {
            break;
        };
        let chunk = start..start + rows;
        let mut query = sqlx::query(sql);
        for i in chunk.clone() {
            query = query
                .bind(events[i].id.as_str())
                .bind(events[i].correlation_id.as_str())
                .bind(batch.now)
                .bind(&envelopes[i][..]);
        }
        let returned = query.fetch_all(&mut *tx).await?;
        let mut inserted: HashMap<&str, i64> = returned
            .iter()
            .map(|row| (row.get::<&str, _>(1), row.get::<i64, _>(0)))
            .collect();
        for event in &events[chunk] {
            acks.push(match inserted.remove(event.id.as_str()) {
                Some(seq) => {
                    let sequence = u64::try_from(seq).unwrap_or(0);
                    *batch.next_seq = (*batch.next_seq).max(sequence + 1);
                    Appended {
                        sequence,
                        duplicate: false,
                    }
                }
                None => {
                    // Already in the log, or earlier in this same transaction.
                    let seq: i64 = sqlx::query_scalar("SELECT seq FROM events WHERE id = ?")
                        .bind(event.id.as_str())
                        .fetch_one(&mut *tx)
                        .await?;
                    Appended {
                        sequence: u64::try_from(seq).unwrap_or(0),
                        duplicate: true,
                    }
                }
            });
        }
        start += rows;
    }
    Ok(acks)
}

async fn checkpoint(tx: &mut SqliteConnection, c: &Checkpoint) -> Result<()> {
    if c.reset {
        sqlx::query("DELETE FROM group_settled WHERE grp = ?")
            .bind(&c.group)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE groups SET ack_floor = ? WHERE name = ?")
        .bind(seq_param(c.floor))
        .bind(&c.group)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM group_settled WHERE grp = ? AND seq <= ?")
        .bind(&c.group)
        .bind(seq_param(c.floor))
        .execute(&mut *tx)
        .await?;
    for &seq in c.settled.iter().filter(|&&s| s > c.floor) {
        sqlx::query("INSERT OR IGNORE INTO group_settled (grp, seq) VALUES (?, ?)")
            .bind(&c.group)
            .bind(seq_param(seq))
            .execute(&mut *tx)
            .await?;
    }
    for &seq in &c.unredrive {
        sqlx::query("DELETE FROM group_redrive WHERE grp = ? AND seq = ?")
            .bind(&c.group)
            .bind(seq_param(seq))
            .execute(&mut *tx)
            .await?;
    }
    for dead in &c.dead {
        sqlx::query(
            "INSERT OR REPLACE INTO dead_letters (grp, seq, attempts, reason, dead_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&c.group)
        .bind(seq_param(dead.sequence))
        .bind(i64::from(dead.attempts))
        .bind(&dead.reason)
        .bind(unix_ms(dead.dead_at))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Deletes a group's dead letters (all when `sequences` is empty) and returns the
/// sequences that were there.
async fn take_dead_letters(
    tx: &mut SqliteConnection,
    group: &str,
    sequences: &[u64],
) -> Result<Vec<u64>> {
    let mut taken = Vec::new();
    if sequences.is_empty() {
        let seqs: Vec<i64> =
            sqlx::query_scalar("DELETE FROM dead_letters WHERE grp = ? RETURNING seq")
                .bind(group)
                .fetch_all(&mut *tx)
                .await?;
        taken.extend(seqs.into_iter().filter_map(|s| u64::try_from(s).ok()));
    } else {
        for &seq in sequences {
            let found: Option<i64> = sqlx::query_scalar(
                "DELETE FROM dead_letters WHERE grp = ? AND seq = ? RETURNING seq",
            )
            .bind(group)
            .bind(seq_param(seq))
            .fetch_optional(&mut *tx)
            .await?;
            taken.extend(found.and_then(|s| u64::try_from(s).ok()));
        }
    }
    taken.sort_unstable();
    Ok(taken)
}
