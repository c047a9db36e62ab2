//! The embedded backend: one SQLite file in WAL mode.
//!
//! One writer thread owns the only write connection (rusqlite) and commits whatever
//! has queued up while the previous commit was running (group commit); a sync
//! thread makes each commit durable before anyone hears of it. Readers use a small
//! pool of read-only connections. Recently appended events are also kept in memory,
//! so live subscribers are fed without touching the database. Each durable group
//! (and each ephemeral subscription) is one dispatcher task that owns all of its
//! state; group state reaches the database in periodic checkpoints through the
//! writer.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evmesh_proto::v1::Event;
use prost::Message;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use crate::{
    AppendTicket, DeadLetter, GroupInfo, Result, SchemaRecord, StartPosition, Store, StoreError,
    StoredEvent, Subscription, SubscriptionSpec,
};

mod dispatch;
mod error;
mod migrations;
mod retention;
mod sync;
mod writer;

use crate::dispatch::{Command, GroupRegistry, GroupRow, ParkedRow};
use writer::WriteOp;

/// The file name of the log inside the data directory.
pub const DB_FILE: &str = "evmesh.db";

/// How the embedded store is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding `evmesh.db`; created when missing.
    pub data_dir: PathBuf,
    /// Most events committed in one transaction.
    pub max_batch_events: usize,
    /// Recently appended events kept in memory for live subscribers, at most this
    /// many and at most `recent_bytes` of them (encoded): large events make it hold
    /// fewer, never more memory.
    pub recent_events: usize,
    pub recent_bytes: usize,
    /// Read-only connections for catch-up reads and queries.
    pub readers: u32,
    /// Run SQLite's `quick_check` over the whole log at open, and refuse a damaged
    /// one, when the log is at most `integrity_check_max_bytes`. It reads every page
    /// (about 0.7 s a GB here), so a larger log starts without it.
    pub integrity_check: bool,
    pub integrity_check_max_bytes: u64,
    /// A durable group with no member and nothing timed for this long gives up its
    /// task (its state is in the log); the next call on it starts one again.
    pub idle_group_exit: Duration,
    /// How much of the log to keep; changed later with [`Store::set_retention`].
    pub retention: crate::Retention,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_batch_events: 4096,
            recent_events: 8192,
            recent_bytes: 64 * 1024 * 1024,
            readers: 4,
            integrity_check: true,
            integrity_check_max_bytes: 1 << 30,
            idle_group_exit: Duration::from_secs(5),
            retention: crate::Retention::default(),
        }
    }
}

/// The embedded SQLite store. Cloning shares it.
#[derive(Clone)]
pub struct SqliteStore {
    log: Arc<Log>,
    /// `evmesh.db`.
    path: Arc<Path>,
    groups: GroupRegistry<Log>,
    /// Resolves once the writer thread has stopped.
    writer_stopped: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    /// The retention limits its task keeps the log within.
    retention: Arc<watch::Sender<crate::Retention>>,
}

/// What every task of the store shares: the writer, readers, the head of the log
/// and the recent events.
pub(crate) struct Log {
    pool: SqlitePool,
    writer: mpsc::Sender<WriteOp>,
    head: watch::Sender<u64>,
    recent: RwLock<Recent>,
    recent_capacity: usize,
    recent_max_bytes: usize,
    idle_group_exit: Duration,
    shutdown: watch::Sender<bool>,
    /// Its syncs and what retention deleted, for the metrics.
    work: crate::WorkTally,
    /// The first sequence retention has not deleted: nothing below is read, from
    /// memory either.
    first: std::sync::atomic::AtomicU64,
}

struct Recent {
    /// Sequence of `events[0]`; head + 1 when empty.
    first: u64,
    events: VecDeque<Arc<StoredEvent>>,
    /// Encoded bytes of `events`.
    bytes: usize,
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn decode(sequence: i64, envelope: &[u8]) -> Result<StoredEvent> {
    let sequence = u64::try_from(sequence).unwrap_or(0);
    let event =
        Event::decode(envelope).map_err(|source| StoreError::Corrupt { sequence, source })?;
    Ok(StoredEvent { sequence, event })
}

fn rows_to_events(rows: Vec<sqlx::sqlite::SqliteRow>) -> Result<Vec<StoredEvent>> {
    rows.iter()
        .map(|row| decode(row.get::<i64, _>(0), row.get::<&[u8], _>(1)))
        .collect()
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

impl Log {
    pub(crate) fn head(&self) -> u64 {
        *self.head.borrow()
    }

    pub(crate) fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    pub(crate) fn watch_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) async fn write(&self, op: WriteOp) -> Result<()> {
        self.writer
            .send(op)
            .await
            .map_err(|_| StoreError::ShuttingDown)
    }

    /// Called once a commit is durable, in sequence order.
    fn push_recent(&self, appended: Vec<Arc<StoredEvent>>) {
        let Some(last) = appended.last().map(|e| e.sequence) else {
            return;
        };
        {
            let mut recent = self.recent.write().unwrap_or_else(|e| e.into_inner());
            for event in appended {
                recent.bytes += event.event.encoded_len();
                recent.events.push_back(event);
            }
            while recent.events.len() > self.recent_capacity || recent.bytes > self.recent_max_bytes
            {
                let Some(oldest) = recent.events.pop_front() else {
                    break;
                };
                recent.bytes = recent.bytes.saturating_sub(oldest.event.encoded_len());
                recent.first += 1;
            }
        }
        self.head.send_replace(last);
    }

    /// Up to `max` events from `from` on, from memory when recent enough.
    pub(crate) async fn read_from(&self, from: u64, max: usize) -> Result<Vec<Arc<StoredEvent>>> {
        let from = from.max(self.first());
        {
            let recent = self.recent.read().unwrap_or_else(|e| e.into_inner());
            if from >= recent.first {
                let skip = usize::try_from(from - recent.first).unwrap_or(usize::MAX);
                return Ok(recent.events.iter().skip(skip).take(max).cloned().collect());
            }
        }
        // Only up to the head: rows past it are committed but not yet durable.
        let rows = sqlx::query(
            "SELECT seq, envelope FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?",
        )
        .bind(seq_param(from))
        .bind(seq_param(self.head()))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows_to_events(rows)?.into_iter().map(Arc::new).collect())
    }

    /// The first sequence retention has not deleted.
    pub(crate) fn first(&self) -> u64 {
        self.first.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Retention deleted everything up to `upto`.
    pub(crate) fn trimmed(&self, upto: u64) {
        self.first
            .fetch_max(upto + 1, std::sync::atomic::Ordering::AcqRel);
    }

    pub(crate) async fn read_one(&self, seq: u64) -> Result<Option<Arc<StoredEvent>>> {
        let events = self.read_from(seq, 1).await?;
        Ok(events.into_iter().next().filter(|e| e.sequence == seq))
    }

    /// The sequence of the last event before `position`: a group starting there has
    /// settled everything up to it.
    pub(crate) async fn floor_for(&self, position: StartPosition) -> Result<u64> {
        let head = self.head();
        Ok(match position {
            StartPosition::Earliest => self.first() - 1,
            StartPosition::Latest => head,
            StartPosition::Sequence(seq) => seq.saturating_sub(1).min(head),
            StartPosition::Time(t) => self.first_appended_at_or_after(unix_ms(t)).await? - 1,
        })
    }

    /// Binary search over appended_at, which never decreases with seq: no index needed.
    async fn first_appended_at_or_after(&self, ms: i64) -> Result<u64> {
        let (mut lo, mut hi) = (self.first(), self.head() + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at: Option<i64> =
                sqlx::query_scalar("SELECT appended_at FROM events WHERE seq = ?")
                    .bind(seq_param(mid))
                    .fetch_optional(&self.pool)
                    .await?;
            match at {
                Some(at) if at < ms => lo = mid + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    pub(crate) async fn dead_letter_count(&self, group: &str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters WHERE grp = ?")
            .bind(group)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(crate) async fn group_sets(&self, group: &str) -> Result<(Vec<u64>, Vec<u64>)> {
        let settled: Vec<i64> =
            sqlx::query_scalar("SELECT seq FROM group_settled WHERE grp = ? ORDER BY seq")
                .bind(group)
                .fetch_all(&self.pool)
                .await?;
        let redrive: Vec<i64> =
            sqlx::query_scalar("SELECT seq FROM group_redrive WHERE grp = ? ORDER BY seq")
                .bind(group)
                .fetch_all(&self.pool)
                .await?;
        let to_u64 = |v: Vec<i64>| {
            v.into_iter()
                .filter_map(|s| u64::try_from(s).ok())
                .collect()
        };
        Ok((to_u64(settled), to_u64(redrive)))
    }

    /// A group's parked events, with the aggregate each holds.
    pub(crate) async fn group_delayed(&self, group: &str) -> Result<Vec<ParkedRow>> {
        let rows = sqlx::query(
            "SELECT d.seq, d.due_at, d.attempts, e.envelope FROM group_delayed d
             JOIN events e ON e.seq = d.seq WHERE d.grp = ? ORDER BY d.seq",
        )
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let event = decode(row.get(0), row.get::<&[u8], _>(3))?;
                Ok(ParkedRow {
                    sequence: event.sequence,
                    due: Some(row.get::<i64, _>(1))
                        .filter(|&ms| ms != writer::WAITS_FOR_AGGREGATE)
                        .map(from_unix_ms),
                    attempts: u32::try_from(row.get::<i64, _>(2)).unwrap_or(0),
                    aggregate_id: event.event.aggregate_id,
                })
            })
            .collect()
    }

    pub(crate) async fn group_row(&self, name: &str) -> Result<Option<GroupRow>> {
        let row = sqlx::query(
            "SELECT name, patterns, ack_timeout_ms, max_deliveries, ack_floor FROM groups WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| dispatch::group_row(&row)).transpose()
    }
}

/// A zero-length `evmesh.db` beside other files is a log that lost its content (a
/// truncation, a bad copy), not a new one: SQLite would silently start it empty.
/// Alone in its directory it is taken as new, and the log says so.
fn refuse_an_emptied_log(dir: &std::path::Path, path: &std::path::Path) -> Result<()> {
    if !std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Ok(());
    }
    let others: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name != DB_FILE)
        .collect();
    if others.is_empty() {
        tracing::warn!(path = %path.display(), "evmesh.db is empty (0 bytes) and alone in its directory: starting a new log");
        return Ok(());
    }
    Err(StoreError::FailedPrecondition(format!(
        "{} is empty (0 bytes) but its directory also holds {}: the log looks truncated, not new; restore it from a backup, or move the directory aside to start a new log",
        path.display(),
        others.join(", ")
    )))
}

/// SQLite's `quick_check`: every page of every table and index is read and checked
/// (not that indexes match their tables, which `integrity_check` adds at many times
/// the cost).
async fn quick_check(conn: &mut sqlx::SqliteConnection, path: &std::path::Path) -> Result<()> {
    let started = std::time::Instant::now();
    let found: Vec<String> = match sqlx::query_scalar("PRAGMA quick_check(8)")
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        Err(e) => vec![e.to_string()],
    };
    if found.len() == 1 && found[0] == "ok" {
        tracing::info!(elapsed = ?started.elapsed(), "integrity check passed");
        return Ok(());
    }
    Err(StoreError::FailedPrecondition(format!(
        "{} failed its integrity check ({}): restore it from a backup; --skip-integrity-check starts the node anyway, and reads that reach the damage end with DATA_LOSS",
        path.display(),
        found
            .iter()
            .flat_map(|row| row.lines())
            .filter(|line| !line.starts_with("***"))
            .take(4)
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// What [`check_snapshot`] found in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub events: u64,
    pub head_sequence: u64,
    pub groups: u64,
    pub schemas: u64,
}

/// Checks that `path` is a whole evmesh log: SQLite's `integrity_check` passes
/// and it holds the log's tables. Opens it read-only; changes nothing.
pub async fn check_snapshot(path: &Path) -> Result<SnapshotSummary> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true);
    let mut conn = options.connect().await.map_err(|e| {
        StoreError::FailedPrecondition(format!("{} is not an SQLite database: {e}", path.display()))
    })?;
    let found: Vec<String> = match sqlx::query_scalar("PRAGMA integrity_check(8)")
        .fetch_all(&mut conn)
        .await
    {
        Ok(rows) => rows,
        Err(e) => vec![e.to_string()],
    };
    if !(found.len() == 1 && found[0] == "ok") {
        return Err(StoreError::FailedPrecondition(format!(
            "{} failed its integrity check: {}",
            path.display(),
            found.join("; ")
        )));
    }
    let not_ours = |e: sqlx::Error| {
        StoreError::FailedPrecondition(format!("{} is not an evmesh log ({e})", path.display()))
    };
    let mut counts = [0u64; 4];
    for (n, sql) in counts.iter_mut().zip([
        "SELECT COUNT(*) FROM events",
        "SELECT COALESCE(MAX(seq), 0) FROM events",
        "SELECT COUNT(*) FROM groups",
        "SELECT COUNT(*) FROM schemas",
    ]) {
        let found: i64 = sqlx::query_scalar(sql)
            .fetch_one(&mut conn)
            .await
            .map_err(not_ours)?;
        *n = u64::try_from(found).unwrap_or(0);
    }
    let [events, head_sequence, groups, schemas] = counts;
    let summary = SnapshotSummary {
        events,
        head_sequence,
        groups,
        schemas,
    };
    conn.close().await?;
    Ok(summary)
}

impl SqliteStore {
    /// Opens (creating when missing) the log in `config.data_dir`, applies the
    /// migrations and starts the writer.
    pub async fn open(config: Config) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)?;
        let path = config.data_dir.join(DB_FILE);
        refuse_an_emptied_log(&config.data_dir, &path)?;
        let options = connect_options(&path);
        let mut conn = options.clone().create_if_missing(true).connect().await?;
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        if config.integrity_check && size <= config.integrity_check_max_bytes {
            quick_check(&mut conn, &path).await?;
        } else if config.integrity_check {
            tracing::info!(
                bytes = size,
                max = config.integrity_check_max_bytes,
                "the log is too large to check at every start; reads that reach a damaged page end with DATA_LOSS"
            );
        }
        migrations::migrator().await?.run(&mut conn).await?;
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM events")
            .fetch_one(&mut conn)
            .await?;
        let head = u64::try_from(head).unwrap_or(0);
        let first: i64 = sqlx::query_scalar("SELECT COALESCE(MIN(seq), 1) FROM events")
            .fetch_one(&mut conn)
            .await?;
        let first = u64::try_from(first).unwrap_or(1);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.readers.max(1))
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        let (writer_tx, writer_rx) = mpsc::channel(1024);
        let log = Arc::new(Log {
            pool,
            writer: writer_tx,
            head: watch::Sender::new(head),
            recent: RwLock::new(Recent {
                first: head + 1,
                events: VecDeque::with_capacity(config.recent_events),
                bytes: 0,
            }),
            recent_capacity: config.recent_events,
            recent_max_bytes: config.recent_bytes,
            idle_group_exit: config.idle_group_exit,
            shutdown: watch::Sender::new(false),
            work: crate::WorkTally::default(),
            first: std::sync::atomic::AtomicU64::new(first),
        });
        // The writer opens its own connections (the pool keeps the WAL open
        // meanwhile); the one that migrated is done.
        let writer_stopped = writer::start(
            &path,
            writer_rx,
            Arc::downgrade(&log),
            config.max_batch_events,
        )?;
        conn.close().await?;
        tracing::info!(path = %path.display(), head, "log opened");
        let groups = GroupRegistry::new(log.clone());
        let retention = watch::Sender::new(config.retention);
        tokio::spawn(retention::run(
            log.clone(),
            groups.clone(),
            retention.subscribe(),
        ));
        Ok(Self {
            groups,
            path: Arc::from(path.as_path()),
            log,
            writer_stopped: Arc::new(Mutex::new(Some(writer_stopped))),
            retention: Arc::new(retention),
        })
    }

    /// The last sequence in the log.
    /// Encoded bytes of the recent events held in memory, at most
    /// [`Config::recent_bytes`].
    pub fn recent_bytes(&self) -> usize {
        self.log
            .recent
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
    }

    pub fn head(&self) -> u64 {
        self.log.head()
    }

    /// Live durable dispatchers: groups with members, or used in the last
    /// [`Config::idle_group_exit`].
    pub async fn live_groups(&self) -> usize {
        self.groups.live().await
    }
}

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL for the migrations; the writer commits with NORMAL and syncs the
        // WAL itself before any ack goes out.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .statement_cache_capacity(64)
        // For a new log: a commit writes fewer, larger WAL frames. (An existing
        // log keeps the page size it was made with.)
        .page_size(16_384)
        // Statement journals (a multi-row INSERT may need to undo itself) stay in
        // memory instead of spilling to a temporary file.
        .pragma("temp_store", "memory")
        .disable_statement_logging()
}

impl Store for SqliteStore {
    async fn enqueue(&self, events: Vec<Event>) -> Result<AppendTicket> {
        let (reply, ticket) = AppendTicket::new();
        if events.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
        } else {
            let envelopes = events.iter().map(Message::encode_to_vec).collect();
            self.log
                .write(WriteOp::Append {
                    events,
                    envelopes,
                    reply,
                })
                .await?;
        }
        Ok(ticket)
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription> {
        self.groups.subscribe(spec).await
    }

    async fn chain(
        &self,
        correlation_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        let rows = sqlx::query(
            "SELECT seq, envelope FROM events WHERE correlation_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
        )
        .bind(correlation_id)
        .bind(seq_param(after))
        .bind(seq_param(self.log.head()))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.log.pool)
        .await?;
        rows_to_events(rows)
    }

    async fn snapshot(&self) -> Result<crate::Snapshot> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // The groups running here checkpoint their latest positions first.
        for (group, _) in self.groups.local().await {
            match self.groups.ask(&group, Command::Flush).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = dir.join(format!(".evmesh-backup-{}-{stamp}.db", std::process::id()));
        let taken = async {
            let target = path.to_str().ok_or_else(|| {
                StoreError::InvalidArgument(format!("{} is not UTF-8", path.display()))
            })?;
            // One read transaction over the whole database: consistent, and the
            // writer never waits for it.
            sqlx::query("VACUUM INTO ?")
                .bind(target)
                .execute(&self.log.pool)
                .await?;
            let summary = check_snapshot(&path).await?;
            Ok(crate::Snapshot {
                bytes: std::fs::metadata(&path)?.len(),
                head_sequence: summary.head_sequence,
                path: path.clone(),
            })
        }
        .await;
        if taken.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        taken
    }

    async fn set_retention(&self, retention: crate::Retention) -> Result<()> {
        self.retention.send_replace(retention);
        Ok(())
    }

    async fn log_stats(&self) -> Result<crate::LogStats> {
        let first: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM events")
            .fetch_one(&self.log.pool)
            .await?;
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(crate::LogStats {
            first_sequence: first.and_then(|f| u64::try_from(f).ok()).unwrap_or(0),
            head_sequence: self.log.head(),
            bytes: size(&self.path) + size(Path::new(&wal)),
            work: Some(self.log.work.read()),
        })
    }

    async fn local_groups(&self) -> Vec<crate::NodeGroup> {
        self.groups
            .local()
            .await
            .into_iter()
            .map(|(name, members)| crate::NodeGroup {
                name,
                members,
                owner: true,
            })
            .collect()
    }

    async fn groups(&self, after: &str, limit: usize) -> Result<Vec<GroupInfo>> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM groups WHERE name > ? ORDER BY name LIMIT ?")
                .bind(after)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.log.pool)
                .await?;
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            infos.push(self.groups.ask(&name, Command::Info).await?);
        }
        Ok(infos)
    }

    async fn seek(&self, group: &str, position: StartPosition) -> Result<GroupInfo> {
        let floor = self.log.floor_for(position).await?;
        self.groups.seek(group, floor).await
    }

    async fn dead_letters(&self, group: &str, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        // Flush the group's latest state first, so that what is listed is current.
        self.groups.ask(group, Command::Flush).await?;
        let rows = sqlx::query(
            "SELECT d.seq, e.envelope, d.attempts, d.reason, d.dead_at
             FROM dead_letters d LEFT JOIN events e ON e.seq = d.seq
             WHERE d.grp = ? AND d.seq > ? ORDER BY d.seq LIMIT ?",
        )
        .bind(group)
        .bind(seq_param(after))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.log.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let sequence: i64 = row.get(0);
                let event = row
                    .get::<Option<&[u8]>, _>(1)
                    .map(|envelope| decode(sequence, envelope))
                    .transpose()?;
                Ok(DeadLetter {
                    sequence: u64::try_from(sequence).unwrap_or(0),
                    event: event.map(|e| e.event),
                    attempts: u32::try_from(row.get::<i64, _>(2)).unwrap_or(0),
                    reason: row.get(3),
                    dead_at: from_unix_ms(row.get(4)),
                })
            })
            .collect()
    }

    async fn redrive(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.groups.redrive(group, sequences).await
    }

    async fn purge(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.groups.purge(group, sequences).await
    }

    async fn delete_group(&self, group: &str) -> Result<u64> {
        self.groups.ask(group, Command::Delete).await
    }

    async fn put_schema(&self, record: SchemaRecord, known: &[semver::Version]) -> Result<()> {
        let (reply, done) = oneshot::channel();
        let known = known.to_vec();
        self.log
            .write(WriteOp::PutSchema {
                record,
                known,
                reply,
            })
            .await?;
        done.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn schemas(&self) -> Result<Vec<SchemaRecord>> {
        let rows = sqlx::query(
            "SELECT event_type, version, message_name, descriptor_set, registered_at FROM schemas",
        )
        .fetch_all(&self.log.pool)
        .await?;
        rows.iter().map(schema_record).collect()
    }

    async fn schemas_of(&self, event_type: &str) -> Result<Vec<SchemaRecord>> {
        let rows = sqlx::query(
            "SELECT event_type, version, message_name, descriptor_set, registered_at FROM schemas WHERE event_type = ?1",
        )
        .bind(event_type)
        .fetch_all(&self.log.pool)
        .await?;
        rows.iter().map(schema_record).collect()
    }

    async fn shutdown(&self) -> Result<()> {
        self.log.shutdown.send_replace(true);
        self.groups.stop().await;
        let (reply, done) = oneshot::channel();
        // The writer stops after this op; everything queued before it is committed.
        if self.log.writer.send(WriteOp::Stop { reply }).await.is_ok() {
            let _ = done.await;
        }
        if let Some(stopped) = self.writer_stopped.lock().await.take() {
            let _ = stopped.await;
        }
        self.log.pool.close().await;
        Ok(())
    }
}

fn schema_record(row: &sqlx::sqlite::SqliteRow) -> Result<SchemaRecord> {
    let version: &str = row.get(1);
    Ok(SchemaRecord {
        event_type: row.get(0),
        version: semver::Version::parse(version).map_err(|e| {
            StoreError::InvalidArgument(format!("stored schema version {version:?}: {e}"))
        })?,
        message_name: row.get(2),
        descriptor_set: row.get(3),
        registered_at: from_unix_ms(row.get(4)),
    })
}
