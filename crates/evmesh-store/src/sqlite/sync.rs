//! Durability, pipelined: the writer commits with `synchronous = NORMAL` (its
//! commits write WAL frames but do not wait for the disk) and hands each committed
//! transaction here. This thread makes the WAL durable with one `fdatasync` for
//! everything committed since its last one, and only then tells the senders and
//! moves the log's head. While it waits on the disk, the writer is already running
//! the next group's statements.
//!
//! This is what `synchronous = FULL` does, one step later: a FULL commit is the
//! same frames followed by a sync of the WAL. Checkpoints keep NORMAL's own syncs
//! (the WAL before its pages are copied, the database file before the WAL is
//! reused), so nothing this thread acknowledged can be lost to a later reset.
//!
//! Checkpoints run on a thread of their own too, nudged by the writer every few
//! MiB of WAL, so that no commit waits for a copy; every 64 MiB the writer
//! restarts the WAL itself.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::Log;
use super::writer::Outcome;
use crate::StoredEvent;

/// The WAL the checkpoint thread lets grow before it copies it into the database:
/// a checkpoint then takes as long as with SQLite's default of 1000 4 KiB pages.
pub(crate) const CHECKPOINT_BYTES: usize = 4 << 20;

/// The WAL the writer lets grow before it starts it over.
pub(crate) const RESTART_BYTES: usize = 64 << 20;

/// Committed transactions that may wait for one sync. Past this, the writer waits
/// for the disk before it commits more.
pub(crate) const QUEUE: usize = 16;

/// A transaction committed to the WAL, not yet known to be on disk.
pub(crate) struct Committed {
    pub outcomes: Vec<Outcome>,
    /// Its appended events, in sequence order.
    pub fresh: Vec<Arc<StoredEvent>>,
}

/// How many committed transactions await their sync. The writer waits until there
/// are none before it commits a group that is not full: events that trickle in then
/// share one commit per sync, instead of each writing its own WAL pages.
#[derive(Default)]
pub(crate) struct Unsynced {
    count: Mutex<usize>,
    settled: Condvar,
}

impl Unsynced {
    pub(crate) fn add(&self) {
        *self.lock() += 1;
    }

    pub(crate) fn settle(&self, n: usize) {
        let mut count = self.lock();
        *count = count.saturating_sub(n);
        if *count == 0 {
            self.settled.notify_all();
        }
    }

    /// Returns once every committed transaction is answered.
    pub(crate) fn wait(&self) {
        let mut count = self.lock();
        while *count > 0 {
            count = self.settled.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Set once the WAL could not be synced: nothing is acknowledged after that, and
/// the writer refuses everything with this message.
pub(crate) type Failure = Arc<OnceLock<String>>;

/// Runs until the writer drops its sender: syncs the WAL at `wal`, then completes
/// what was committed before the sync, in commit order.
pub(crate) fn run(
    wal: PathBuf,
    mut committed: mpsc::Receiver<Committed>,
    log: Weak<Log>,
    failure: Failure,
    unsynced: Arc<Unsynced>,
) {
    let mut file = WalFile {
        path: wal,
        open: None,
    };
    let mut ready = Vec::new();
    while let Some(first) = committed.blocking_recv() {
        ready.push(first);
        while let Ok(more) = committed.try_recv() {
            ready.push(more);
        }
        let n = ready.len();
        if let Some(message) = failure.get() {
            fail(ready.drain(..), message);
            unsynced.settle(n);
            continue;
        }
        let started = std::time::Instant::now();
        let synced = file.sync();
        let took = started.elapsed();
        match synced {
            Ok(()) => {
                let log = log.upgrade();
                if let Some(log) = &log {
                    log.work.synced(took);
                }
                for c in ready.drain(..) {
                    if let Some(log) = &log {
                        log.push_recent(c.fresh);
                    }
                    c.outcomes.into_iter().for_each(Outcome::succeed);
                }
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the dirty pages:
                // what was committed can no longer be vouched for, nor anything
                // after it. Restarting recovers the log from what is on disk.
                let message = format!(
                    "the log's write-ahead file {} could not be synced to disk ({e}); \
                     nothing more is acknowledged until the node restarts",
                    file.path.display()
                );
                tracing::error!(error = %message, "sync failed");
                if let Some(log) = log.upgrade() {
                    log.work.sync_failed();
                }
                let message = failure.get_or_init(|| message);
                fail(ready.drain(..), message);
            }
        }
        unsynced.settle(n);
    }
}

/// Where SQLite keeps the write-ahead log of the database at `path`.
pub(crate) fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// The WAL's checkpoints: one at a time (SQLite refuses a second one at once rather
/// than wait), and the frames the last one counted.
#[derive(Default)]
pub(crate) struct Checkpoints {
    running: Mutex<()>,
    frames: AtomicUsize,
}

impl Checkpoints {
    pub(crate) fn frames(&self) -> usize {
        self.frames.load(Ordering::Relaxed)
    }

    /// Runs until the writer drops its sender: on each nudge, copies what the WAL
    /// holds into the database (PASSIVE: beside the writer, never blocking it). With
    /// `synchronous = NORMAL` the checkpoint syncs the WAL before copying and the
    /// database before the WAL may be reused.
    pub(crate) fn run(&self, conn: Connection, nudges: std::sync::mpsc::Receiver<()>) {
        while nudges.recv().is_ok() {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let done = checkpoint(&conn, "PASSIVE");
            drop(running);
            match done {
                Ok((_, frames)) => self.frames.store(frames, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint failed; the WAL grows until the next")
                }
            }
        }
    }

    /// Checkpoints everything and waits for readers to leave the WAL, so that the
    /// next write transaction starts it over: the WAL starts over only when a
    /// transaction begins with all of it copied, which a checkpoint beside a busy
    /// writer rarely sees. Run by the writer, between its transactions.
    /// Returns whether it did.
    pub(crate) fn restart(&self, conn: &Connection) -> bool {
        // Waits for a checkpoint under way, which leaves little to copy.
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let done = complete(
            conn,
            "RESTART",
            "the WAL could not start over; it grows until the next try",
        );
        if done {
            self.frames.store(0, Ordering::Relaxed);
        }
        done
    }
}

/// Copies the whole WAL into the database and empties it: at shutdown, once
/// everything is synced.
pub(crate) fn truncate(conn: &Connection) {
    complete(conn, "TRUNCATE", "the WAL was left as it is");
}

/// Runs a checkpoint in a `mode` that copies everything; says why not, when it
/// could not, and returns whether it did.
fn complete(conn: &Connection, mode: &str, otherwise: &str) -> bool {
    let why = match checkpoint(conn, mode) {
        Ok((false, _)) => return true,
        Ok((true, _)) => "a reader holds it".to_owned(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(error = %why, "{otherwise}");
    false
}

/// Runs a checkpoint in `mode`: whether it could not finish, and the WAL's frames.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(bool, usize)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        let frames: i64 = row.get(1)?;
        Ok((
            row.get::<_, i64>(0)? != 0,
            usize::try_from(frames).unwrap_or(0),
        ))
    })
}

fn fail(committed: impl Iterator<Item = Committed>, message: &str) {
    for c in committed {
        c.outcomes.into_iter().for_each(|o| o.fail(message));
    }
}

/// The WAL, opened beside SQLite's own handle: an fdatasync through any descriptor
/// of the file flushes all of its written pages.
struct WalFile {
    path: PathBuf,
    open: Option<File>,
}

impl WalFile {
    fn sync(&mut self) -> std::io::Result<()> {
        // SQLite removes the WAL only when its last connection closes (after a
        // checkpoint that syncs the database); if that ever happened, the file at the
        // path is a new one and the old descriptor would sync nothing useful.
        let current = std::fs::metadata(&self.path)?;
        let stale = match &self.open {
            Some(f) => {
                let held = f.metadata()?;
                (held.dev(), held.ino()) != (current.dev(), current.ino())
            }
            None => true,
        };
        if stale {
            self.open = Some(File::options().write(true).open(&self.path)?);
        }
        match &self.open {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}
