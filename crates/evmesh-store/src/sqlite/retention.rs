//! Retention of the embedded log: a task that deletes the oldest events through
//! the writer, a small batch at a time, so that publishes never wait long behind a
//! delete. Freed pages are reused by later appends: once retention holds, the file
//! stops growing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::dispatch::ask;
use super::writer::WriteOp;
use super::{Log, seq_param, unix_ms};
use crate::dispatch::GroupRegistry;
use crate::{Result, Retention};

/// The most events one transaction deletes.
pub(crate) const BATCH: u64 = 250;
/// The pause between batches while the log is over a limit.
const PAUSE: Duration = Duration::from_millis(2);
/// How often the limits are checked when the log is within them.
const EVERY: Duration = Duration::from_secs(1);
/// How long the task waits with no limit set (a reload wakes it).
const UNLIMITED: Duration = Duration::from_secs(3600);

/// Runs until the store shuts down, keeping the log within the latest limits.
pub(crate) async fn run(
    log: Arc<Log>,
    groups: GroupRegistry<Log>,
    mut limits: watch::Receiver<Retention>,
) {
    let mut shutdown = log.watch_shutdown();
    let mut skipping = HashSet::new();
    loop {
        let retention = *limits.borrow_and_update();
        let wait = if retention.limits() {
            match round(&log, &groups, retention, &mut skipping).await {
                Ok(true) => PAUSE,
                Ok(false) => EVERY,
                Err(_) if *shutdown.borrow() => break,
                Err(e) => {
                    tracing::warn!(error = %e, "retention could not delete; trying again");
                    EVERY
                }
            }
        } else {
            UNLIMITED
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = limits.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(wait) => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
}

/// Deletes one batch when the log is over a limit. Returns whether it deleted a
/// whole batch (more may be due at once).
async fn round(
    log: &Log,
    groups: &GroupRegistry<Log>,
    retention: Retention,
    skipping: &mut HashSet<String>,
) -> Result<bool> {
    let Some(upto) = cut(log, retention).await? else {
        skipping.clear();
        return Ok(false);
    };
    let trim = ask(log, |reply| WriteOp::Trim { upto, reply }).await?;
    log.trimmed(upto);
    log.work.deleted(trim.deleted);
    let mut still = HashSet::new();
    for (group, skipped) in trim.groups {
        if skipped > 0 {
            // Once while a group keeps falling behind, not at every batch.
            if !skipping.contains(&group) {
                tracing::warn!(group = %group, skipped, upto, "retention deleted events this group had not settled; it moves on past them");
            }
            still.insert(group.clone());
        }
        groups.trimmed(&group, upto, skipped).await;
    }
    *skipping = still;
    tracing::debug!(deleted = trim.deleted, upto, "retention");
    Ok(trim.deleted >= BATCH)
}

/// The last sequence the next batch deletes, when the log is over a limit: never
/// more than [`BATCH`] events, never the newest.
async fn cut(log: &Log, retention: Retention) -> Result<Option<u64>> {
    let (head, first) = (log.head(), log.first());
    if first >= head {
        return Ok(None);
    }
    let last = (first + BATCH - 1).min(head - 1);
    let mut upto = 0;
    if let Some(max) = retention.max_events {
        upto = upto.max(head.saturating_sub(max));
    }
    if let Some(age) = retention.max_age {
        let cutoff = unix_ms(
            SystemTime::now()
                .checked_sub(age)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let old: Option<i64> = sqlx::query_scalar(
            "SELECT max(seq) FROM events WHERE seq >= ? AND seq <= ? AND appended_at < ?",
        )
        .bind(seq_param(first))
        .bind(seq_param(last))
        .bind(cutoff)
        .fetch_one(&log.pool)
        .await?;
        upto = upto.max(old.and_then(|s| u64::try_from(s).ok()).unwrap_or(0));
    }
    if let Some(max) = retention.max_bytes
        && used_bytes(log).await? > max
    {
        upto = last;
    }
    Ok((upto >= first).then(|| upto.min(last)))
}

/// The bytes of the database's pages in use: its size without its free pages.
pub(crate) async fn used_bytes(log: &Log) -> Result<u64> {
    let used: i64 = sqlx::query_scalar(
        "SELECT (p.page_count - f.freelist_count) * s.page_size
         FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s",
    )
    .fetch_one(&log.pool)
    .await?;
    Ok(u64::try_from(used).unwrap_or(0))
}
