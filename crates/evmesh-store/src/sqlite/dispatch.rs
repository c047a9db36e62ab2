//! The SQLite log as group tasks see it ([`GroupLog`]): events by sequence from the
//! read pool, the head watch, and a group's state in its tables, written through the
//! single writer.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::{oneshot, watch};

use super::Log;
use super::writer::WriteOp;
use crate::dispatch::{Checkpoint, GroupCatalog, GroupLog, GroupRow, Restored};
use crate::{Pattern, Result, StartPosition, StoreError, StoredEvent};

/// A group's configuration from its row in `groups`.
pub(crate) fn group_row(row: &sqlx::sqlite::SqliteRow) -> Result<GroupRow> {
    let name: String = row.get(0);
    let patterns = row
        .get::<&str, _>(1)
        .lines()
        .map(Pattern::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            StoreError::InvalidArgument(format!("stored pattern of group {name:?} {e}"))
        })?;
    Ok(GroupRow {
        name,
        patterns,
        ack_timeout: Duration::from_millis(u64::try_from(row.get::<i64, _>(2)).unwrap_or(0)),
        max_deliveries: u32::try_from(row.get::<i64, _>(3)).unwrap_or(0),
        ack_floor: u64::try_from(row.get::<i64, _>(4)).unwrap_or(0),
    })
}

/// Queues an op that answers on `reply` and waits for the answer.
pub(super) async fn ask<T>(
    log: &Log,
    op: impl FnOnce(oneshot::Sender<Result<T>>) -> WriteOp,
) -> Result<T> {
    let (reply, done) = oneshot::channel();
    log.write(op(reply)).await?;
    done.await.map_err(|_| StoreError::ShuttingDown)?
}

impl GroupLog for Log {
    const COUNTS_TRIMS: bool = true;

    fn head(&self) -> u64 {
        Log::head(self)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        Log::watch_head(self)
    }

    fn watch_shutdown(&self) -> watch::Receiver<bool> {
        Log::watch_shutdown(self)
    }

    fn idle_group_exit(&self) -> Duration {
        self.idle_group_exit
    }

    async fn read_one(&self, seq: u64) -> Result<Option<Arc<StoredEvent>>> {
        Log::read_one(self, seq).await
    }

    async fn read_from(&self, seq: u64, n: usize) -> Result<Vec<Arc<StoredEvent>>> {
        Log::read_from(self, seq, n).await
    }

    async fn restore(&self, group: &str) -> Result<Restored> {
        let (settled, redrive) = self.group_sets(group).await?;
        Ok(Restored {
            settled,
            redrive,
            dead_count: self.dead_letter_count(group).await?,
            parked: self.group_delayed(group).await?,
        })
    }

    async fn checkpoint(&self, checkpoint: Checkpoint) -> Result<()> {
        self.write(WriteOp::Checkpoint(checkpoint)).await
    }

    async fn update_patterns(&self, group: &str, patterns: &[Pattern]) -> Result<()> {
        let op = WriteOp::UpdatePatterns {
            group: group.to_owned(),
            patterns: patterns.to_vec(),
        };
        // Best effort: the next checkpoint's writer is the same queue.
        self.writer
            .try_send(op)
            .map_err(|_| StoreError::ShuttingDown)
    }

    async fn redrive(&self, group: &str, sequences: Vec<u64>) -> Result<Vec<u64>> {
        ask(self, |reply| WriteOp::Redrive {
            group: group.to_owned(),
            sequences,
            reply,
        })
        .await
    }

    async fn purge(&self, group: &str, sequences: Vec<u64>) -> Result<u64> {
        ask(self, |reply| WriteOp::Purge {
            group: group.to_owned(),
            sequences,
            reply,
        })
        .await
    }

    async fn delete_group(&self, group: &str) -> Result<u64> {
        ask(self, |reply| WriteOp::DeleteGroup {
            group: group.to_owned(),
            reply,
        })
        .await
    }
}

impl GroupCatalog for Log {
    async fn group_row(&self, name: &str) -> Result<Option<GroupRow>> {
        Log::group_row(self, name).await
    }

    async fn create_group(&self, row: GroupRow) -> Result<GroupRow> {
        // The registry holds its map while it creates: no other creation of this
        // name runs meanwhile.
        ask(self, |reply| WriteOp::CreateGroup {
            row: row.clone(),
            reply,
        })
        .await?;
        Ok(row)
    }

    async fn floor_for(&self, position: StartPosition) -> Result<u64> {
        Log::floor_for(self, position).await
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}
