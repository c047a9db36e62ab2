//! The NATS JetStream backend: the cluster's objects (the events and dead-letter
//! streams, the schemas and groups buckets), checked or created at connect; the
//! event log, with ids unique for as long as an event is retained; chains by
//! correlation id; schema records; group records that the shared group task and
//! [`crate::dispatch::Core`] run over; and [`JetStreamStore`], the `Store`.
//! `../shared/JETSTREAM.md` holds the design; ARCHITECTURE.md says where this
//! departs from it.

mod groups;
mod mesh;
mod store;
mod subject;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;
use evmesh_proto::v1::Event;
use prost::Message;
use tokio::sync::watch;

use crate::{Appended, Result, SchemaRecord, StoreError, StoredEvent};

pub use groups::{GROUPS_BUCKET, JetStreamGroups};
pub use mesh::OWNERS_BUCKET;
pub use store::JetStreamStore;
use subject::{EVENTS_PREFIX, PARTITIONS, chain_filter, event_subject};

/// The stream of events.
pub const EVENTS_STREAM: &str = "EVMESH_EVENTS";
/// The stream of dead-letter records.
pub const DLQ_STREAM: &str = "EVMESH_DLQ";
/// The bucket of schema records.
pub const SCHEMAS_BUCKET: &str = "EVMESH_SCHEMAS";
/// The bucket where nodes announce themselves; an entry lapses after
/// [`crate::NODE_TTL`].
pub const NODES_BUCKET: &str = "EVMESH_NODES";
/// The oldest server with what the backend needs (consumer reset, pinned clients,
/// batch direct get, multi-filter consumers).
pub const MIN_SERVER: semver::Version = semver::Version::new(2, 14, 0);
/// How long a publish waits for JetStream's answer before its outcome is unknown.
const PUBLISH_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Where nodes tell each other how far the events stream reaches: each announces
/// the last sequence it stored (core NATS, a few bytes, at most about once a
/// millisecond), so that the others' groups read on without asking the stream.
const HEAD_SUBJECT: &str = "evmesh.head";

/// How often a node asks the stream for its last sequence anyway: what an
/// announcement lost (a node that died between its ack and its announcement)
/// costs at most this.
const HEAD_POLL: Duration = Duration::from_secs(1);

/// Events this node stored lately, kept to be read back without a round trip:
/// at most this many, and this many bytes.
const RECENT_EVENTS: usize = 8192;
const RECENT_BYTES: usize = 16 * 1024 * 1024;

/// How to reach and use the cluster.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`.
    pub servers: Vec<String>,
    /// Replicas of what the node creates.
    pub replicas: usize,
    pub credentials: Credentials,
    /// A CA certificate (PEM) to verify the servers' TLS certificates with.
    pub tls_ca: Option<PathBuf>,
    /// JetStream's duplicate window on the events stream. The node sends no
    /// `Nats-Msg-Id` (an id is unique by its subject for the whole retention, see
    /// [`JetStreamLog::append`]), so the window holds none of its events; a repeat
    /// after it is a duplicate all the same.
    pub duplicate_window: Duration,
    /// How long a publish whose outcome is unknown (a timeout, a leader election, a
    /// lost connection) is sent again before the caller is told it is unavailable.
    pub publish_retry_for: Duration,
    /// Publishes the node keeps in flight to JetStream at once.
    pub publish_window: usize,
    /// How much of the log to keep: the events stream's limits. Every node applies
    /// its own at start: the nodes of a mesh should agree.
    pub retention: crate::Retention,
}

impl JetStreamConfig {
    pub fn new(servers: Vec<String>) -> Self {
        Self {
            servers,
            replicas: 1,
            credentials: Credentials::None,
            tls_ca: None,
            duplicate_window: Duration::from_secs(120),
            publish_retry_for: Duration::from_secs(10),
            publish_window: 4096,
            retention: crate::Retention::default(),
        }
    }
}

/// NATS credentials, as async-nats takes them.
#[derive(Debug, Clone)]
pub enum Credentials {
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// A `.creds` file (a user JWT and its NKey seed).
    CredsFile(PathBuf),
}

/// The cluster's event log and schema records.
#[derive(Clone)]
pub struct JetStreamLog {
    client: async_nats::Client,
    js: jetstream::Context,
    schemas: kv::Store,
    nodes: kv::Store,
    publish_retry_for: Duration,
    /// The last sequence this node knows of, by its own publishes or others'.
    head: Arc<watch::Sender<u64>>,
    /// The last sequence this node stored, which it announces.
    stored: Arc<watch::Sender<u64>>,
    recent: Arc<std::sync::Mutex<Recent>>,
    _head_tasks: Arc<[AbortOnDrop; 2]>,
    connected: watch::Receiver<bool>,
}

/// The events this node stored lately, by sequence (others' events fall between).
#[derive(Default)]
struct Recent {
    /// Each event with its encoded size, counted once.
    events: std::collections::BTreeMap<u64, (usize, Arc<StoredEvent>)>,
    bytes: usize,
}

impl Recent {
    fn insert(&mut self, event: StoredEvent) {
        let size = event.event.encoded_len();
        self.bytes += size;
        self.events.insert(event.sequence, (size, Arc::new(event)));
        while self.events.len() > RECENT_EVENTS || self.bytes > RECENT_BYTES {
            let Some((_, (size, _))) = self.events.pop_first() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(size);
        }
    }

    /// The events at `from`, `from + 1`, … while this node stored them, at most
    /// `limit`: empty when it did not store the one at `from`.
    fn run_from(&self, from: u64, limit: usize) -> Vec<Arc<StoredEvent>> {
        let mut run = Vec::new();
        for (sequence, (_, event)) in self.events.range(from..) {
            if run.len() == limit || *sequence != from + run.len() as u64 {
                break;
            }
            run.push(event.clone());
        }
        run
    }
}

/// Ends a task when the last handle on it goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl JetStreamLog {
    /// Connects, checks the server (version, JetStream on) and creates what is
    /// missing, or checks what exists: a stream whose configuration conflicts with
    /// what evmesh needs is refused, named, rather than changed.
    pub async fn connect(config: &JetStreamConfig) -> Result<Self> {
        // The connection's state, as the client reports it; the node's health
        // follows it.
        let (connection, connected) = watch::channel(true);
        let connection = Arc::new(connection);
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .name("evmesh")
            .event_callback(move |event| {
                let connection = connection.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connection restored");
                            connection.send_replace(true);
                        }
                        async_nats::Event::Disconnected | async_nats::Event::Closed => {
                            tracing::warn!("NATS connection lost; reconnecting");
                            connection.send_replace(false);
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            });
        options = match &config.credentials {
            Credentials::None => options,
            Credentials::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Credentials::Token(token) => options.token(token.clone()),
            Credentials::CredsFile(path) => options.credentials_file(path).await.map_err(|e| {
                StoreError::InvalidArgument(format!(
                    "NATS credentials file {}: {e}",
                    path.display()
                ))
            })?,
        };
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let servers: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| StoreError::InvalidArgument(format!("NATS server URL {s:?}: {e}")))
            })
            .collect::<Result<_>>()?;
        let client = options.connect(servers).await.map_err(|e| {
            unavailable(
                &format!("cannot reach NATS at {}", config.servers.join(",")),
                e,
            )
        })?;
        let version = client.server_info().version;
        match semver::Version::parse(&version) {
            Ok(v) if v >= MIN_SERVER => {}
            _ => {
                return Err(StoreError::FailedPrecondition(format!(
                    "nats-server {version} is too old: evmesh needs {MIN_SERVER} or newer"
                )));
            }
        }
        // async-nats holds one permit per publish awaiting its ack; the publisher
        // keeps `publish_window` of them, and the rest (KV, announcements) must
        // never wait behind it.
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(config.publish_window * 2)
            .build(client.clone());
        js.query_account().await.map_err(|e| {
            use jetstream::context::AccountErrorKind;
            match e.kind() {
                AccountErrorKind::JetStream(_) | AccountErrorKind::JetStreamUnavailable => {
                    StoreError::FailedPrecondition(format!(
                        "JetStream is not enabled on this NATS account or server ({e}): run nats-server with --jetstream"
                    ))
                }
                // A cluster electing its leaders answers late: not a refusal.
                AccountErrorKind::TimedOut | AccountErrorKind::Other => unavailable(
                    "JetStream did not answer the account check; is the cluster electing its leaders?",
                    e,
                ),
            }
        })?;
        ensure_stream(&js, events_stream(config)).await?;
        ensure_stream(&js, dlq_stream(config)).await?;
        let schemas = bucket(&js, SCHEMAS_BUCKET, config.replicas).await?;
        let nodes = nodes_bucket(&js, config.replicas).await?;
        let last = last_sequence(&js).await?;
        let head = Arc::new(watch::Sender::new(last));
        let stored = Arc::new(watch::Sender::new(0));
        let follow = tokio::spawn(follow_head(client.clone(), js.clone(), head.clone()));
        let announce = tokio::spawn(announce_head(client.clone(), stored.subscribe()));
        Ok(Self {
            client,
            js,
            schemas,
            nodes,
            publish_retry_for: config.publish_retry_for,
            head,
            stored,
            recent: Arc::default(),
            _head_tasks: Arc::new([AbortOnDrop(follow), AbortOnDrop(announce)]),
            connected,
        })
    }

    /// Appends events one after another, each once for as long as the stream
    /// retains it: an id seen before is a duplicate with its original sequence,
    /// also after JetStream's duplicate window (each event has a subject of its own
    /// ending in its id, and is published only if that subject is empty). A publish
    /// whose outcome is unknown is sent again, with the same id, until it is
    /// answered. The store's publisher pipelines instead (see `store.rs`).
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>> {
        self.check_sizes(&events)?;
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let deadline = Instant::now() + self.publish_retry_for;
            let appended = self.publish_until_answered(&event, deadline).await?;
            self.stored(&appended, event);
            acks.push(appended);
        }
        Ok(acks)
    }

    /// How long a publish whose outcome is unknown is sent again.
    pub(crate) fn publish_retry_for(&self) -> Duration {
        self.publish_retry_for
    }

    /// True while the client is connected to the cluster; changes as the
    /// connection goes and comes back.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Refuses a batch holding an event larger than the server takes, before any
    /// of it is sent: a batch is stored whole or refused whole.
    pub(crate) fn check_sizes(&self, events: &[Event]) -> Result<()> {
        let max = self.client.server_info().max_payload;
        match events.iter().find(|e| e.encoded_len() + 1024 > max) {
            Some(event) => Err(StoreError::InvalidArgument(format!(
                "event {:?} is larger than the NATS server's max_payload ({max} bytes)",
                event.id
            ))),
            None => Ok(()),
        }
    }

    /// Sends one publish; its outcome is awaited apart, so that many can be in
    /// flight. A failure to send is an unknown outcome too.
    pub(crate) async fn send(&self, event: &Event) -> Pending {
        // No `Nats-Msg-Id`: the subject ends in the id and must be empty, which
        // makes a repeat a duplicate for the whole retention, so JetStream's own
        // duplicate window would add nothing but its cost (a map of every id of
        // the last two minutes, about 15% of the server's publish rate here).
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(event.encode_to_vec()))
            .expected_last_subject_sequence(0);
        // The answer is awaited from when the publish was sent, not from when the
        // pipeline gets to it (async-nats starts its timeout at the first poll).
        let answer_by = tokio::time::Instant::now() + PUBLISH_ANSWER_WAIT;
        match self.js.send_publish(event_subject(event), publish).await {
            Ok(ack) => Box::pin(async move {
                let answer =
                    tokio::time::timeout_at(answer_by, std::future::IntoFuture::into_future(ack))
                        .await
                        .unwrap_or_else(|_| {
                            Err(jetstream::context::PublishError::new(
                                PublishErrorKind::TimedOut,
                            ))
                        });
                outcome(answer)
            }),
            Err(e) => Box::pin(std::future::ready(Outcome::Unknown(e.to_string()))),
        }
    }

    /// Publishes one event, sending it again while its outcome is unknown, until
    /// `deadline`; then UNAVAILABLE.
    pub(crate) async fn publish_until_answered(
        &self,
        event: &Event,
        deadline: Instant,
    ) -> Result<Appended> {
        let mut backoff = Duration::from_millis(10);
        loop {
            let unknown = match self.send(event).await.await {
                Outcome::Stored(appended) => return Ok(appended),
                Outcome::Unknown(why) => why,
            };
            if Instant::now() + backoff > deadline {
                return Err(StoreError::Unavailable(format!(
                    "JetStream did not answer the publish of event {:?} ({unknown}); it may have been stored: publish it again with the same id",
                    event.id
                )));
            }
            tracing::debug!(event_id = %event.id, error = %unknown, "publish outcome unknown; sending again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// The events of one correlation id above sequence `after`, in log order, at
    /// most `limit`: one batch direct get on the chain's subjects.
    pub async fn chain(
        &self,
        correlation_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        self.direct_batch(
            &chain_filter(correlation_id),
            Start::Sequence(after + 1),
            limit,
        )
        .await
    }

    /// Up to `limit` events from sequence `from` on, in log order.
    pub async fn read_from(&self, from: u64, limit: usize) -> Result<Vec<Arc<StoredEvent>>> {
        let from = from.max(1);
        let run = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .run_from(from, limit);
        if !run.is_empty() {
            return Ok(run);
        }
        let events = self
            .direct_batch(&format!("{EVENTS_PREFIX}.>"), Start::Sequence(from), limit)
            .await?;
        Ok(events.into_iter().map(Arc::new).collect())
    }

    /// The event at `sequence`, `None` when the stream does not hold it.
    pub async fn read_one(&self, sequence: u64) -> Result<Option<Arc<StoredEvent>>> {
        let found = self.read_from(sequence, 1).await?;
        Ok(found.into_iter().find(|e| e.sequence == sequence))
    }

    pub(crate) fn context(&self) -> jetstream::Context {
        self.js.clone()
    }

    pub(crate) fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// The sequence of the first event stored at or after `time`, `None` when there
    /// is none.
    pub async fn first_at_or_after(&self, time: SystemTime) -> Result<Option<u64>> {
        let stamp = time::OffsetDateTime::from(time)
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| StoreError::InvalidArgument(format!("start time: {e}")))?;
        let first = self
            .direct_batch(&format!("{EVENTS_PREFIX}.>"), Start::Time(stamp), 1)
            .await?;
        Ok(first.first().map(|e| e.sequence))
    }

    /// The last sequence in the stream, as this node last heard of it.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Changes whenever the head moves: on this node's publishes, and soon after
    /// another node's.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// This node stored `event` (or found it stored before): the head moves, the
    /// other nodes hear of it, and a new event is kept to be read back. Called in
    /// the order the events were sent.
    pub(crate) fn stored(&self, appended: &Appended, event: Event) {
        if !appended.duplicate {
            self.recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(StoredEvent {
                    sequence: appended.sequence,
                    event,
                });
        }
        advance(&self.stored, appended.sequence);
        advance(&self.head, appended.sequence);
    }

    /// One batch direct get: up to `limit` messages on `filter` from sequence `from`
    /// on. The server answers with each message, then a status (204 at the end of
    /// the batch, 404 when nothing is there).
    async fn direct_batch(
        &self,
        filter: &str,
        from: Start,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        use futures_util::StreamExt as _;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable("reading the log", e))?;
        let mut request = serde_json::json!({
            "next_by_subj": filter,
            "batch": limit,
        });
        match from {
            Start::Sequence(seq) => request["seq"] = seq.into(),
            Start::Time(stamp) => request["start_time"] = stamp.into(),
        }
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{EVENTS_STREAM}"),
                inbox,
                Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| unavailable("reading the log", e))?;
        let mut events = Vec::new();
        while events.len() < limit {
            let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
                .await
                .map_err(|_| StoreError::Unavailable("JetStream did not answer a read".into()))?
                .ok_or_else(|| StoreError::Unavailable("a read of the log was cut off".into()))?;
            if reply
                .status
                .is_some_and(|s| s != async_nats::StatusCode::OK)
            {
                break;
            }
            let sequence = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Sequence"))
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .ok_or_else(|| {
                    StoreError::Backend("a direct get reply without Nats-Sequence".into())
                })?;
            let event = Event::decode(reply.payload.as_ref())
                .map_err(|source| StoreError::Corrupt { sequence, source })?;
            events.push(StoredEvent { sequence, event });
        }
        Ok(events)
    }

    /// Stores a new version of a type if the type's versions are still exactly
    /// `known`. A type's versions are listed by its head key (`head.<type>`); each
    /// version's record is a key of its own (`version.<type>.<version>`), written
    /// create-only before the head is updated with compare-and-set on the revision
    /// read: of two registrations of one type at once, on any nodes, one updates
    /// the head and the other is [`StoreError::Stale`], decides again against the
    /// winner's version, and tries again. A version record no head lists (the
    /// registration that wrote it lost, or stopped before the head) is never read;
    /// its version stays taken for other content.
    pub async fn put_schema(&self, record: SchemaRecord, known: &[semver::Version]) -> Result<()> {
        let head_key = head_key(&record.event_type);
        let head = self
            .schemas
            .entry(&head_key)
            .await
            .map_err(|e| unavailable("reading a schema head", e))?
            .filter(|e| e.operation == kv::Operation::Put);
        let listed = match &head {
            Some(entry) => parse_head(&entry.value)?,
            None => Vec::new(),
        };
        let stale = || {
            StoreError::Stale(format!(
                "another registration of {} came first",
                record.event_type
            ))
        };
        if !same_versions(&listed, known) {
            return Err(stale());
        }
        let key = version_key(&record.event_type, &record.version);
        let value = Bytes::from(schema_message(&record).encode_to_vec());
        match self.schemas.create(&key, value).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Ours from an earlier try, or the same content from elsewhere:
                // the head decides. Other content: the version is taken.
                let theirs = self.schema_at(&key).await?;
                if theirs.as_ref().is_none_or(|t| {
                    t.message_name != record.message_name
                        || t.descriptor_set != record.descriptor_set
                }) {
                    return Err(StoreError::AlreadyExists(format!(
                        "version {} of {}",
                        record.version, record.event_type
                    )));
                }
            }
            Err(e) => return Err(unavailable("storing a schema", e)),
        }
        let mut versions = listed;
        versions.push(record.version.clone());
        let text: Vec<String> = versions.iter().map(ToString::to_string).collect();
        let value = Bytes::from(text.join("\n"));
        let updated = match &head {
            Some(entry) => self
                .schemas
                .update(&head_key, value, entry.revision)
                .await
                .map(drop)
                .map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
            None => self
                .schemas
                .create(&head_key, value)
                .await
                .map(drop)
                .map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
        };
        match updated {
            Ok(()) => Ok(()),
            Err((true, _)) => Err(stale()),
            Err((false, e)) => Err(unavailable("storing a schema head", e)),
        }
    }

    /// Keeps the events stream within `retention` from now on.
    pub async fn set_retention(&self, retention: crate::Retention) -> Result<()> {
        let mut stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| unavailable("reading the events stream", e))?;
        let existing = stream
            .info()
            .await
            .map_err(|e| unavailable("reading the events stream", e))?
            .config
            .clone();
        let wanted = limited(existing.clone(), retention);
        if !same_limits(&existing, &wanted) {
            self.js
                .update_stream(&wanted)
                .await
                .map_err(|e| unavailable("changing the events stream's limits", e))?;
            tracing::info!(stream = EVENTS_STREAM, ?retention, "stream limits changed");
        }
        Ok(())
    }

    /// Every stored schema version: those the types' heads list.
    pub async fn schemas(&self) -> Result<Vec<SchemaRecord>> {
        let mut records = Vec::new();
        for key in keys(&self.schemas, "head.>", "listing schemas").await? {
            if let Some(event_type) = key.strip_prefix("head.") {
                records.extend(self.schemas_of(event_type).await?);
            }
        }
        Ok(records)
    }

    /// Announces this node (see [`crate::Store::announce_node`]): its record under a
    /// key of its name, which lapses with the bucket's max age.
    pub async fn announce_node(&self, record: &crate::NodeRecord) -> Result<()> {
        let value = serde_json::to_vec(record)
            .map_err(|e| StoreError::Backend(format!("encoding a node record: {e}").into()))?;
        self.nodes
            .put(node_key(&record.name), value.into())
            .await
            .map_err(|e| unavailable("announcing the node", e))?;
        Ok(())
    }

    /// The nodes whose announcements stand.
    pub async fn nodes(&self) -> Result<Vec<crate::NodeRecord>> {
        let mut nodes = Vec::new();
        for key in keys(&self.nodes, ">", "listing nodes").await? {
            let Some(value) = self
                .nodes
                .get(&key)
                .await
                .map_err(|e| unavailable("reading a node record", e))?
            else {
                continue;
            };
            match serde_json::from_slice(&value) {
                Ok(record) => nodes.push(record),
                Err(e) => tracing::warn!(key, error = %e, "a node record that does not decode"),
            }
        }
        Ok(nodes)
    }

    /// The types whose versions change, as any node registers one: a watch of the
    /// head keys. Each time a watch opens, the first time too, the feed says `None`
    /// (read everything again: what changed before it opened), and when it breaks
    /// (a server restart can end it, nats.rs #1596) it watches anew. Ends when the
    /// receiver goes.
    pub fn schema_changes(&self) -> tokio::sync::mpsc::Receiver<Option<String>> {
        use futures_util::StreamExt as _;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let schemas = self.schemas.clone();
        tokio::spawn(async move {
            loop {
                match schemas.watch("head.>").await {
                    Ok(mut changes) => {
                        if tx.send(None).await.is_err() {
                            return;
                        }
                        while let Some(change) = changes.next().await {
                            let Ok(entry) = change else {
                                break;
                            };
                            let Some(event_type) = entry.key.strip_prefix("head.") else {
                                continue;
                            };
                            if tx.send(Some(event_type.to_owned())).await.is_err() {
                                return;
                            }
                        }
                        tracing::debug!("the schema watch ended; watching again");
                    }
                    Err(e) => tracing::debug!(error = %e, "watching schema heads"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        rx
    }

    /// The stored versions of one type.
    pub async fn schemas_of(&self, event_type: &str) -> Result<Vec<SchemaRecord>> {
        let Some(head) = self
            .schemas
            .get(head_key(event_type))
            .await
            .map_err(|e| unavailable("reading a schema head", e))?
        else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        for version in parse_head(&head)? {
            match self.schema_at(&version_key(event_type, &version)).await? {
                Some(record) => records.push(record),
                None => {
                    tracing::error!(event_type, %version, "a schema head lists a version with no record")
                }
            }
        }
        Ok(records)
    }

    async fn schema_at(&self, key: &str) -> Result<Option<SchemaRecord>> {
        let Some(bytes) = self
            .schemas
            .get(key)
            .await
            .map_err(|e| unavailable("reading a schema", e))?
        else {
            return Ok(None);
        };
        let schema = evmesh_proto::v1::Schema::decode(bytes.as_ref()).map_err(|e| {
            StoreError::Backend(format!("schema record {key:?} does not decode: {e}").into())
        })?;
        let version = semver::Version::parse(&schema.version).map_err(|e| {
            StoreError::Backend(
                format!(
                    "schema record {key:?} has version {:?}: {e}",
                    schema.version
                )
                .into(),
            )
        })?;
        Ok(Some(SchemaRecord {
            event_type: schema.r#type,
            version,
            message_name: schema.message_name,
            descriptor_set: schema.descriptor_set,
            registered_at: schema
                .registered_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }))
    }
}

fn schema_message(record: &SchemaRecord) -> evmesh_proto::v1::Schema {
    evmesh_proto::v1::Schema {
        r#type: record.event_type.clone(),
        version: record.version.to_string(),
        message_name: record.message_name.clone(),
        descriptor_set: record.descriptor_set.clone(),
        registered_at: Some(record.registered_at.into()),
    }
}

/// The versions a type's head lists, one a line.
fn parse_head(value: &[u8]) -> Result<Vec<semver::Version>> {
    let text = std::str::from_utf8(value)
        .map_err(|e| StoreError::Backend(format!("a schema head is not text: {e}").into()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            semver::Version::parse(l)
                .map_err(|e| StoreError::Backend(format!("a schema head lists {l:?}: {e}").into()))
        })
        .collect()
}

/// Whether `listed` holds exactly the versions `known` does, in any order.
fn same_versions(listed: &[semver::Version], known: &[semver::Version]) -> bool {
    let mut listed = listed.to_vec();
    let mut known = known.to_vec();
    listed.sort();
    known.sort();
    listed == known
}

/// Where a batch direct get starts.
enum Start {
    Sequence(u64),
    /// RFC 3339.
    Time(String),
}

/// The keys of a bucket under `filter` (`>` for all), from the subjects its
/// stream holds: one request (paged by the server), where async-nats's `keys()`
/// runs a consumer and was seen to end before a key written just before. A key
/// deleted or purged is listed too (its marker holds the subject): a caller reads
/// each key and skips those with no value.
pub(crate) async fn keys(bucket: &kv::Store, filter: &str, what: &str) -> Result<Vec<String>> {
    use futures_util::TryStreamExt as _;
    let subjects: Vec<(String, usize)> = bucket
        .stream
        .info_with_subjects(format!("{}{filter}", bucket.prefix))
        .await
        .map_err(|e| unavailable(what, e))?
        .try_collect()
        .await
        .map_err(|e| unavailable(what, e))?;
    Ok(subjects
        .into_iter()
        .filter_map(|(subject, _)| {
            subject
                .strip_prefix(bucket.prefix.as_str())
                .map(str::to_owned)
        })
        .collect())
}

/// A KV bucket of one version a key, created when missing.
pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(bucket) = js.get_key_value(name).await {
        return Ok(bucket);
    }
    js.create_key_value(kv::Config {
        bucket: name.into(),
        history: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| unavailable(&format!("creating the {name} bucket"), e))
}

async fn last_sequence(js: &jetstream::Context) -> Result<u64> {
    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| unavailable("reading the events stream", e))?;
    Ok(events.cached_info().state.last_sequence)
}

/// Moves `head` forward to `sequence`; never back.
fn advance(head: &watch::Sender<u64>, sequence: u64) {
    head.send_if_modified(|h| {
        let moved = sequence > *h;
        if moved {
            *h = sequence;
        }
        moved
    });
}

/// Follows the head of the events stream: the other nodes' announcements of what
/// they stored, and once a [`HEAD_POLL`] the stream's own last sequence.
async fn follow_head(
    client: async_nats::Client,
    js: jetstream::Context,
    head: Arc<watch::Sender<u64>>,
) {
    use futures_util::StreamExt as _;
    let Ok(mut announced) = client.subscribe(HEAD_SUBJECT).await else {
        tracing::error!("cannot follow the events stream's head");
        return;
    };
    let mut poll = tokio::time::interval(HEAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = announced.next() => match message {
                Some(message) => {
                    if let Some(sequence) = std::str::from_utf8(&message.payload)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        advance(&head, sequence);
                    }
                }
                None => return,
            },
            _ = poll.tick() => match last_sequence(&js).await {
                Ok(last) => advance(&head, last),
                Err(e) => tracing::debug!(error = %e, "reading the events stream's head"),
            },
        }
    }
}

/// Announces the last sequence this node stored, as it moves: at once, then at
/// most once a millisecond under load.
async fn announce_head(client: async_nats::Client, mut stored: watch::Receiver<u64>) {
    while stored.changed().await.is_ok() {
        let sequence = *stored.borrow_and_update();
        if let Err(e) = client
            .publish(HEAD_SUBJECT, Bytes::from(sequence.to_string()))
            .await
        {
            tracing::debug!(error = %e, "announcing the head");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A node's key: its name in base64url (a KV key holds no `:`).
fn node_key(name: &str) -> String {
    use base64::Engine as _;
    format!(
        "node.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
    )
}

/// The nodes' bucket, whose entries lapse after [`crate::NODE_TTL`].
async fn nodes_bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store> {
    lapsing_bucket(js, NODES_BUCKET, crate::NODE_TTL, replicas).await
}

/// A KV bucket in memory whose entries lapse `max_age` after their last write,
/// created when missing.
pub(crate) async fn lapsing_bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(bucket) = js.get_key_value(name).await {
        return Ok(bucket);
    }
    js.create_key_value(kv::Config {
        bucket: name.into(),
        history: 1,
        max_age,
        num_replicas: replicas,
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .map_err(|e| unavailable(&format!("creating the {name} bucket"), e))
}

/// The key listing a type's versions.
fn head_key(event_type: &str) -> String {
    format!("head.{event_type}")
}

/// A schema version's key: the type's tokens, then the version in base64url (a
/// KV key holds no `+`).
fn version_key(event_type: &str, version: &semver::Version) -> String {
    use base64::Engine as _;
    format!(
        "version.{event_type}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(version.to_string())
    )
}

/// A publish in flight.
pub(crate) type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// What became of one publish.
pub(crate) enum Outcome {
    /// Stored now, or found stored before (a duplicate, with its original sequence).
    Stored(Appended),
    /// Not answered, or answered in a way that does not say: send it again.
    Unknown(String),
}

fn outcome(
    answer: std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Outcome {
    match answer {
        Ok(ack) => Outcome::Stored(Appended {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        }),
        Err(e) => match (e.kind(), original_sequence(&e)) {
            (PublishErrorKind::WrongLastSequence, Some(sequence)) => Outcome::Stored(Appended {
                sequence,
                duplicate: true,
            }),
            // Unknown outcomes, and the same id racing in from elsewhere (refused
            // without the original sequence): ask again.
            _ => Outcome::Unknown(e.to_string()),
        },
    }
}

/// The original sequence in a refusal for a subject that already has a message:
/// `wrong last sequence: N`.
fn original_sequence(e: &jetstream::context::PublishError) -> Option<u64> {
    let source = std::error::Error::source(e)?.to_string();
    let (_, rest) = source.split_once("wrong last sequence: ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|&n| n > 0)
}

fn events_stream(config: &JetStreamConfig) -> stream::Config {
    stream::Config {
        name: EVENTS_STREAM.into(),
        subjects: vec![format!("{EVENTS_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        duplicate_window: config.duplicate_window,
        metadata: [("evmesh.partitions".to_owned(), PARTITIONS.to_string())].into(),
        ..limited(stream::Config::default(), config.retention)
    }
}

/// `config` with the stream limits that `retention` maps to (none when unset).
fn limited(mut config: stream::Config, retention: crate::Retention) -> stream::Config {
    config.max_age = retention.max_age.unwrap_or_default();
    config.max_messages = retention
        .max_events
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    config.max_bytes = retention
        .max_bytes
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    config
}

fn same_limits(a: &stream::Config, b: &stream::Config) -> bool {
    a.max_age == b.max_age && a.max_messages == b.max_messages && a.max_bytes == b.max_bytes
}

fn dlq_stream(config: &JetStreamConfig) -> stream::Config {
    stream::Config {
        name: DLQ_STREAM.into(),
        subjects: vec!["evmesh.dlq.>".into()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates the stream, or checks that the one there is what evmesh needs.
async fn ensure_stream(js: &jetstream::Context, wanted: stream::Config) -> Result<()> {
    let name = wanted.name.clone();
    let existing = match js.get_stream(&name).await {
        Ok(mut existing) => existing
            .info()
            .await
            .map_err(|e| unavailable(&format!("reading stream {name}"), e))?
            .config
            .clone(),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(wanted)
                .await
                .map_err(|e| unavailable(&format!("creating stream {name}"), e))?;
            return Ok(());
        }
        Err(e) => return Err(unavailable(&format!("reading stream {name}"), e)),
    };
    let conflicts: Vec<String> = [
        (existing.subjects != wanted.subjects).then(|| {
            format!(
                "subjects {:?}, not {:?}",
                existing.subjects, wanted.subjects
            )
        }),
        (existing.storage != wanted.storage).then(|| "memory storage, not file".to_owned()),
        (existing.retention != wanted.retention)
            .then(|| format!("retention {:?}, not limits", existing.retention)),
        (wanted.deny_delete && !existing.deny_delete).then(|| "deletes allowed".to_owned()),
        (wanted.allow_direct && !existing.allow_direct)
            .then(|| "direct get not allowed".to_owned()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if conflicts.is_empty() {
        if !same_limits(&existing, &wanted) {
            let limits = stream::Config {
                max_age: wanted.max_age,
                max_messages: wanted.max_messages,
                max_bytes: wanted.max_bytes,
                ..existing
            };
            js.update_stream(&limits)
                .await
                .map_err(|e| unavailable(&format!("changing the limits of stream {name}"), e))?;
            tracing::info!(stream = %name, max_age = ?limits.max_age, max_messages = limits.max_messages, max_bytes = limits.max_bytes, "stream limits changed");
        }
        Ok(())
    } else {
        Err(StoreError::FailedPrecondition(format!(
            "stream {name} exists with a configuration evmesh cannot use: {}; remove it or point evmesh at another account",
            conflicts.join("; ")
        )))
    }
}
