//! evmesh storage: the [`Store`] trait that every backend implements, and the
//! embedded SQLite backend ([`sqlite::SqliteStore`]).
//!
//! A store owns the log, durable consumer groups (dispatch, acks, redelivery,
//! per-aggregate order), and dead letters. The gRPC layer only translates: all
//! delivery semantics live behind the trait, so that a backend such as NATS
//! JetStream, whose consumers do dispatch themselves, can stand in its place.
//!
//! What it is not: input validation of envelopes (the node does that) or schemas.
//! This crate has no feature flags.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use evmesh_proto::v1::Event;
use tokio::sync::mpsc;

mod dispatch;
pub mod jetstream;
pub mod sqlite;
mod subject;

pub use subject::{MAX_TYPE_LEN, Pattern, SubjectError, validate_event_type};

/// An event in the log at its sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub sequence: u64,
    pub event: Event,
}

/// The outcome of appending one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub sequence: u64,
    /// The id was already in the log; nothing was stored and `sequence` is the
    /// original one.
    pub duplicate: bool,
}

/// Where a new group, an ephemeral subscription or a seek starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    Earliest,
    #[default]
    Latest,
    /// The event with this sequence, or the first one after it.
    Sequence(u64),
    /// The first event appended at or after this time.
    Time(SystemTime),
}

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// At least one.
    pub patterns: Vec<Pattern>,
    /// Durable group; `None` for an ephemeral subscription.
    pub group: Option<String>,
    pub start: StartPosition,
    pub max_in_flight: u32,
    pub ack_timeout: Duration,
    /// Deliveries before dead-lettering; 0 never dead-letters.
    pub max_deliveries: u32,
    pub auto_ack: bool,
}

impl SubscriptionSpec {
    pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;
    pub const MAX_MAX_IN_FLIGHT: u32 = 10_000;
    pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

    /// A spec with the defaults: ephemeral, from latest.
    pub fn new(patterns: Vec<Pattern>) -> Self {
        Self {
            patterns,
            group: None,
            start: StartPosition::Latest,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
            ack_timeout: Self::DEFAULT_ACK_TIMEOUT,
            max_deliveries: Self::DEFAULT_MAX_DELIVERIES,
            auto_ack: false,
        }
    }
}

/// One delivery of an event to a subscription member.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: Arc<StoredEvent>,
    /// 1 on the first delivery.
    pub attempt: u32,
}

/// A node of the mesh, as it announces itself to the others.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    /// Unique in the mesh (`evmesh serve --node-name`).
    pub name: String,
    /// Where clients reach it (`--advertise`).
    pub address: String,
    pub started_at: SystemTime,
    /// When it announced this.
    pub seen_at: SystemTime,
    /// The durable groups the node owns or has members of, by name.
    pub groups: Vec<NodeGroup>,
    /// This run of the node, as its storage names it (on JetStream, the inbox of
    /// its relay); empty where the storage has no other nodes.
    #[serde(default)]
    pub instance: String,
}

/// A durable group as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeGroup {
    pub name: String,
    /// Members joined through the node.
    pub members: u32,
    /// The node owns the group: its dispatcher runs there.
    pub owner: bool,
}

/// How long a node's announcement stands: a node not heard of for this long is
/// gone from the list.
pub const NODE_TTL: Duration = Duration::from_secs(10);

/// A durable group as seen from outside.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub patterns: Vec<String>,
    pub ack_floor: u64,
    /// Events the group's patterns (and version requirements) select that are not
    /// settled yet, redriven dead letters included, whether or not a member is
    /// connected. A group far behind counts at most 262,144 not yet examined events
    /// per request and takes those as lag: the figure is exact once it is caught up.
    pub lag: u64,
    /// Delivered and not yet acked (or waiting out a nack's delay).
    pub pending: u64,
    pub dead_letters: u64,
    pub members: u32,
    pub ack_timeout: Duration,
    pub max_deliveries: u32,
    pub head_sequence: u64,
    /// What the group did on this node since it started: deliveries, acks…
    #[serde(default)]
    pub counts: GroupCounts,
    /// How long the oldest delivery not yet acked has been out; zero when none is.
    #[serde(default)]
    pub oldest_unacked: Duration,
}

/// The log as a whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogStats {
    /// The first sequence the log still holds (0 when empty).
    pub first_sequence: u64,
    pub head_sequence: u64,
    /// Bytes it takes on disk (on JetStream, the events stream's).
    pub bytes: u64,
    /// The log's own work since the node started, where the backend does it itself
    /// (the embedded log; JetStream syncs and expires inside the server).
    pub work: Option<LogWork>,
}

/// A snapshot file written by [`Store::snapshot`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub path: std::path::PathBuf,
    pub bytes: u64,
    /// The last sequence it holds.
    pub head_sequence: u64,
}

/// What the embedded log did since it started: its syncs to disk and the events
/// retention deleted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogWork {
    /// Syncs by duration: the count in each of [`SYNC_BUCKETS`], then those longer.
    pub sync_buckets: Vec<u64>,
    pub sync_seconds: f64,
    pub sync_failures: u64,
    pub retention_deleted: u64,
}

/// Upper bounds, in seconds, of the buckets syncs are counted in.
pub const SYNC_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// [`LogWork`] as the log's threads count it.
#[derive(Debug, Default)]
pub(crate) struct WorkTally {
    sync_buckets: [std::sync::atomic::AtomicU64; SYNC_BUCKETS.len() + 1],
    sync_micros: std::sync::atomic::AtomicU64,
    sync_failures: std::sync::atomic::AtomicU64,
    retention_deleted: std::sync::atomic::AtomicU64,
}

impl WorkTally {
    pub(crate) fn synced(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let seconds = took.as_secs_f64();
        let bucket = SYNC_BUCKETS
            .iter()
            .position(|&upper| seconds <= upper)
            .unwrap_or(SYNC_BUCKETS.len());
        self.sync_buckets[bucket].fetch_add(1, Relaxed);
        self.sync_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub(crate) fn sync_failed(&self) {
        GroupTally::add(&self.sync_failures, 1);
    }

    pub(crate) fn deleted(&self, events: u64) {
        GroupTally::add(&self.retention_deleted, events);
    }

    pub(crate) fn read(&self) -> LogWork {
        use std::sync::atomic::Ordering::Relaxed;
        LogWork {
            sync_buckets: self.sync_buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sync_seconds: self.sync_micros.load(Relaxed) as f64 / 1e6,
            sync_failures: self.sync_failures.load(Relaxed),
            retention_deleted: self.retention_deleted.load(Relaxed),
        }
    }
}

/// How much of the log is kept: events older than `max_age`, beyond the newest
/// `max_events`, or beyond `max_bytes` of storage are deleted, oldest first. The
/// newest event is always kept (the embedded log continues its sequences from it
/// after a restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_events: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Whether any limit is set.
    pub fn limits(&self) -> bool {
        self.max_age.is_some() || self.max_events.is_some() || self.max_bytes.is_some()
    }
}

/// A durable group's deliveries, redeliveries (attempt 2 and later, counted in
/// the deliveries too), acks, nacks and dead letters on this node since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupCounts {
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub dead_lettered: u64,
    /// Events the group had not settled that retention deleted before it got to
    /// them.
    #[serde(default)]
    pub skipped: u64,
}

/// The counts as a group's dispatchers move them; kept by the store per group, so
/// that they outlive a dispatcher that retires.
#[derive(Debug, Default)]
pub(crate) struct GroupTally {
    pub delivered: std::sync::atomic::AtomicU64,
    pub redelivered: std::sync::atomic::AtomicU64,
    pub acked: std::sync::atomic::AtomicU64,
    pub nacked: std::sync::atomic::AtomicU64,
    pub dead_lettered: std::sync::atomic::AtomicU64,
    pub skipped: std::sync::atomic::AtomicU64,
}

impl GroupTally {
    pub(crate) fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn counts(&self) -> GroupCounts {
        let read = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        GroupCounts {
            delivered: read(&self.delivered),
            redelivered: read(&self.redelivered),
            acked: read(&self.acked),
            nacked: read(&self.nacked),
            dead_lettered: read(&self.dead_lettered),
            skipped: read(&self.skipped),
        }
    }
}

/// An event that exhausted its deliveries in one group.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub sequence: u64,
    /// `None` once retention deleted the event from the log.
    pub event: Option<Event>,
    pub attempts: u32,
    pub reason: String,
    pub dead_at: SystemTime,
}

/// One registered version of an event type's payload schema, as stored. The
/// registry decides what may be stored; the store only keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaRecord {
    pub event_type: String,
    pub version: semver::Version,
    pub message_name: String,
    /// Normalised, encoded FileDescriptorSet.
    pub descriptor_set: Vec<u8>,
    pub registered_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// What a conditional write was based on has changed meanwhile.
    #[error("{0}")]
    Stale(String),
    #[error("store is shutting down")]
    ShuttingDown,
    /// The storage backend is not answering (a server unreachable, a leader being
    /// elected): the request may be tried again.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The storage backend failed on this request.
    #[error("storage: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The log is damaged where a read reached it: a page, a file.
    #[error("{0}")]
    DataLoss(String),
    #[error("corrupt record at sequence {sequence}: {source}")]
    Corrupt {
        sequence: u64,
        source: prost::DecodeError,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether the log itself is damaged: a record that does not decode, or the
    /// backend finding a damaged page or file.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::DataLoss(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The storage of one mesh node. Cloning is cheap and shares the store.
pub trait Store: Clone + Send + Sync + 'static {
    /// Queues events for appending and returns once they are queued; the ticket
    /// resolves when they are committed. Events queued by one caller get increasing
    /// sequences in the order they were queued, so a publish stream can pipeline
    /// batches without reordering them. An id already in the log (or earlier in
    /// `events`) is a duplicate.
    fn enqueue(&self, events: Vec<Event>) -> impl Future<Output = Result<AppendTicket>> + Send;

    /// Appends events durably, in order, and waits for the commit.
    fn append(&self, events: Vec<Event>) -> impl Future<Output = Result<Vec<Appended>>> + Send {
        async move { self.enqueue(events).await?.wait().await }
    }

    /// Opens a subscription: joins (or creates) a durable group, or starts an
    /// ephemeral one.
    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> impl Future<Output = Result<Subscription>> + Send;

    /// The events of one correlation id above sequence `after`, in log order, at
    /// most `limit`.
    fn chain(
        &self,
        correlation_id: &str,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>>> + Send;

    /// Durable groups named after `after`, in name order, at most `limit`.
    fn groups(
        &self,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<GroupInfo>>> + Send;

    /// Deletes a durable group with its dead letters; refused while it has live
    /// members. Returns how many dead letters went with it.
    fn delete_group(&self, group: &str) -> impl Future<Output = Result<u64>> + Send;

    /// Moves a group to a position; in-flight deliveries are forgotten.
    fn seek(
        &self,
        group: &str,
        position: StartPosition,
    ) -> impl Future<Output = Result<GroupInfo>> + Send;

    /// A group's dead letters with a sequence above `after`, oldest first.
    fn dead_letters(
        &self,
        group: &str,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// Puts dead letters (all when `sequences` is empty) back into the group.
    fn redrive(&self, group: &str, sequences: &[u64]) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes dead letters (all when `sequences` is empty).
    fn purge(&self, group: &str, sequences: &[u64]) -> impl Future<Output = Result<u64>> + Send;

    /// Stores a new version of a type durably, if the type's stored versions are
    /// still exactly `known` (what the registry decided against): registrations of
    /// one type are serialised, also across nodes. [`StoreError::Stale`] when
    /// another registration of the type came first (read its versions again and
    /// decide again); AlreadyExists when that version is taken.
    fn put_schema(
        &self,
        record: SchemaRecord,
        known: &[semver::Version],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Every stored schema version, in no particular order.
    fn schemas(&self) -> impl Future<Output = Result<Vec<SchemaRecord>>> + Send;

    /// The stored versions of one type, in no particular order.
    fn schemas_of(
        &self,
        event_type: &str,
    ) -> impl Future<Output = Result<Vec<SchemaRecord>>> + Send;

    /// The durable groups this node owns or has members of, by name.
    fn local_groups(&self) -> impl Future<Output = Vec<NodeGroup>> + Send;

    /// The log's first and last sequence and its size on disk, for the metrics.
    fn log_stats(&self) -> impl Future<Output = Result<LogStats>> + Send;

    /// Writes a consistent snapshot of the log into a new file beside it (groups'
    /// latest positions first checkpointed), checked, while the store keeps
    /// serving. The caller removes the file. Only the embedded log has one to give.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot>> + Send {
        async {
            Err(StoreError::FailedPrecondition(
                "this node's events are in NATS JetStream: back up its streams and buckets with NATS's own tools (nats stream backup, nats kv)".into(),
            ))
        }
    }

    /// Keeps the log within `retention` from now on (see [`Retention`]).
    fn set_retention(&self, retention: Retention) -> impl Future<Output = Result<()>> + Send;

    /// Tells the other nodes on the same storage that this node is alive, as
    /// `record` says; an announcement not renewed within [`NODE_TTL`] lapses. The
    /// embedded log has no other nodes to tell.
    fn announce_node(&self, record: NodeRecord) -> impl Future<Output = Result<()>> + Send {
        let _ = record;
        async { Ok(()) }
    }

    /// The nodes whose announcements stand, in no particular order.
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRecord>>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Registrations made by other nodes on the same storage, as they happen: the
    /// type whose versions changed, or `None` when some may have been missed (read
    /// every schema again). `None` for a store no other node writes (the embedded
    /// log). Each call starts a feed of its own.
    fn schema_changes(&self) -> Option<tokio::sync::mpsc::Receiver<Option<String>>> {
        None
    }

    /// Finishes what is in flight, persists group state and stops.
    fn shutdown(&self) -> impl Future<Output = Result<()>> + Send;

    /// True while the store can take publishes, changing as its backend goes and
    /// comes back; the node reports it through `grpc.health.v1`. The embedded log
    /// is always there.
    fn serving(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }
}

/// The outcome of queued events, once they are committed.
#[derive(Debug)]
pub struct AppendTicket {
    committed: tokio::sync::oneshot::Receiver<Result<Vec<Appended>>>,
}

impl AppendTicket {
    /// A ticket and the sender that resolves it: for backends.
    pub fn new() -> (tokio::sync::oneshot::Sender<Result<Vec<Appended>>>, Self) {
        let (tx, committed) = tokio::sync::oneshot::channel();
        (tx, Self { committed })
    }

    /// Waits for the commit: one result per queued event, in order.
    pub async fn wait(self) -> Result<Vec<Appended>> {
        self.committed.await.map_err(|_| StoreError::ShuttingDown)?
    }
}

/// What a subscription member sends back to its dispatcher.
#[derive(Debug)]
pub enum Feedback {
    Ack(Vec<u64>),
    Nack {
        sequences: Vec<u64>,
        delay: Duration,
        reason: String,
    },
}

/// The sending half of a subscription: acks and nacks. Cheap to clone.
///
/// The member leaves its group when the [`Subscription`] and every clone of its
/// control are gone: acks a client sent just before it hung up are applied before
/// what it held is redelivered to the others.
#[derive(Debug, Clone)]
pub struct SubscriptionControl {
    member: u64,
    feedback: mpsc::Sender<(u64, Feedback)>,
    _membership: Arc<Membership>,
}

/// Tells the dispatcher that a member left, when the last handle of it drops.
#[derive(Debug)]
pub(crate) struct Membership {
    member: u64,
    leave: mpsc::UnboundedSender<u64>,
}

impl Membership {
    pub(crate) fn new(member: u64, leave: mpsc::UnboundedSender<u64>) -> Arc<Self> {
        Arc::new(Self { member, leave })
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The dispatcher may be gone already; nothing to tell it then.
        let _ = self.leave.send(self.member);
    }
}

impl SubscriptionControl {
    /// Sends an ack or nack; waits while the dispatcher is busy.
    pub async fn send(&self, feedback: Feedback) -> Result<()> {
        self.feedback
            .send((self.member, feedback))
            .await
            .map_err(|_| StoreError::ShuttingDown)
    }
}

/// An open subscription: deliveries in, acks and nacks out. Dropping it (and every
/// clone of its control) leaves the
/// group, and what it held unacked is redelivered to other members.
#[derive(Debug)]
pub struct Subscription {
    pub group: String,
    pub member_id: String,
    /// This subscribe created the group.
    pub created: bool,
    /// The first sequence the group had not settled when this member joined.
    pub start_sequence: u64,
    auto_ack: bool,
    deliveries: mpsc::Receiver<Delivery>,
    control: SubscriptionControl,
    /// Why the store ended this subscription, when it was not a shutdown.
    failure: Arc<std::sync::OnceLock<String>>,
}

impl Subscription {
    /// The next delivery; `None` when the store is shutting down. With auto_ack,
    /// the delivery is acked as it is handed out.
    pub async fn next(&mut self) -> Option<Delivery> {
        let delivery = self.deliveries.recv().await?;
        if self.auto_ack {
            // A closed dispatcher ends the stream on the next recv.
            let _ = self
                .control
                .send(Feedback::Ack(vec![delivery.event.sequence]))
                .await;
        }
        Some(delivery)
    }

    pub fn control(&self) -> SubscriptionControl {
        self.control.clone()
    }

    /// Once [`Subscription::next`] has returned `None`: why, when the store ended
    /// the subscription for a damaged log rather than a shutdown.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}
