//! Effectively-once consumers. Deliveries are handled in batches, in one SQLite
//! transaction of the service's own database; each event in its own savepoint:
//!
//! 1. the inbox mark (consumer, event id): a duplicate delivery finds it and is
//!    acked without running the handler again;
//! 2. the handler's writes, through [`Context::tx`];
//! 3. the events the handler publishes, through [`Context::publish`], written to the
//!    outbox with correlation id carried and causation id = the handled event.
//!
//! The transaction commits, then the batch is acked; a failed handler's savepoint
//! is rolled back and its event nacked with a backoff delay. A crash anywhere leads
//! to redelivery (absorbed by the inbox) or to a re-relay (absorbed by the node's
//! idempotent publish).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use futures_util::FutureExt;
use prost::Message;
use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{SqlitePool, Transaction};
use tokio::sync::{Mutex, MutexGuard, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::outbox::Relay;
use crate::{Error, Event, Mesh, Meta, Result, new_id};

/// What a handler may fail with; its text becomes the nack reason.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler =
    Arc<dyn Fn(Context, &[u8]) -> BoxFuture<std::result::Result<(), HandlerError>> + Send + Sync>;

/// The event being handled, without its payload.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub sequence: u64,
    pub attempt: u32,
    pub id: String,
    pub event_type: String,
    pub schema_version: String,
    pub aggregate_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub source: String,
    pub headers: HashMap<String, String>,
}

struct Shared {
    tx: Mutex<Option<Transaction<'static, Sqlite>>>,
    outbox: std::sync::Mutex<Vec<pb::Event>>,
}

/// What a handler works with: the event's envelope, the transaction its writes go
/// into, and an outbox for the events it publishes. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    shared: Arc<Shared>,
    incoming: Arc<Incoming>,
    mesh: Mesh,
    /// The consumer group: the source of the events the handler publishes.
    group: Arc<str>,
}

/// The handler's transaction; derefs to the connection.
pub struct Tx<'a>(MutexGuard<'a, Option<Transaction<'static, Sqlite>>>);

impl std::ops::Deref for Tx<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.0
            .as_deref()
            .unwrap_or_else(|| unreachable!("the transaction lives until the batch commits"))
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("the transaction lives until the batch commits"))
    }
}

impl Context {
    /// The event being handled.
    pub fn event(&self) -> &Incoming {
        &self.incoming
    }

    /// The transaction that commits together with the inbox mark and the outbox.
    /// Hold it only while writing: `sqlx::query(..).execute(&mut *ctx.tx().await)`.
    pub async fn tx(&self) -> Tx<'_> {
        Tx(self.shared.tx.lock().await)
    }

    /// Publishes `event` as a consequence of the one being handled: written to the
    /// outbox in this transaction, with this workflow's correlation id and the
    /// handled event as its cause. Returns the new event's id.
    pub fn publish<E: Event>(&self, event: &E, aggregate_id: &str) -> String {
        // A child of the process span; the relay sends the event later.
        let span = crate::telemetry::publish_span(E::TYPE);
        let envelope = self.mesh.envelope(
            event,
            Meta {
                id: new_id().to_string(),
                aggregate_id: aggregate_id.to_owned(),
                correlation_id: self.incoming.correlation_id.clone(),
                causation_id: self.incoming.id.clone(),
                source: self.group.to_string(),
                ..Meta::default()
            },
            &span,
        );
        let id = envelope.id.clone();
        self.shared
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(envelope);
        id
    }
}

/// Builds a consumer; see [`Mesh::consumer`].
pub struct ConsumerBuilder {
    mesh: Mesh,
    group: String,
    db: Option<SqlitePool>,
    handlers: HashMap<&'static str, Handler>,
    max_in_flight: u32,
    batch: usize,
    max_deliveries: u32,
    ack_timeout: Duration,
    retry_base: Duration,
    retry_max: Duration,
    inbox_retention: Duration,
}

/// A running consumer and its outbox relay.
pub struct Consumer {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
    relay: Arc<Relay>,
}

impl ConsumerBuilder {
    pub(crate) fn new(mesh: Mesh, group: &str) -> Self {
        Self {
            mesh,
            group: group.to_owned(),
            db: None,
            handlers: HashMap::new(),
            max_in_flight: 512,
            batch: 256,
            max_deliveries: 5,
            ack_timeout: Duration::from_secs(30),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// The service's own database: inbox, outbox and the handlers' writes.
    pub fn database(mut self, pool: SqlitePool) -> Self {
        self.db = Some(pool);
        self
    }

    /// Handles events of `E`'s type.
    ///
    /// ```no_run
    /// # use evmesh_client::{Context, Event, Mesh};
    /// # async fn f<OrderPlaced: Event, PaymentSucceeded: Event + Default>(mesh: Mesh, pool: sqlx::SqlitePool) -> evmesh_client::Result<()> {
    /// let consumer = mesh
    ///     .consumer("payment")
    ///     .database(pool)
    ///     .on(|ctx: Context, order: OrderPlaced| async move {
    ///         sqlx::query("INSERT INTO charges (event_id) VALUES (?)")
    ///             .bind(&ctx.event().id)
    ///             .execute(&mut *ctx.tx().await)
    ///             .await?;
    ///         ctx.publish(&PaymentSucceeded::default(), &ctx.event().aggregate_id);
    ///         Ok(())
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on<E, F, Fut>(mut self, handler: F) -> Self
    where
        E: Event,
        F: Fn(Context, E) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.handlers.insert(
            E::TYPE,
            Arc::new(move |ctx: Context, bytes: &[u8]| {
                let decoded = E::decode(bytes);
                let handler = handler.clone();
                async move {
                    let event = decoded
                        .map_err(|e| format!("payload does not decode as {}: {e}", E::MESSAGE))?;
                    handler(ctx, event).await
                }
                .boxed()
            }),
        );
        self
    }

    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Deliveries handled in one transaction at most.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Deliveries before an event goes to the group's dead letters (set when the
    /// group is created).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// A failed handler's event comes back after `base`, doubling up to `max`.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.retry_base = base;
        self.retry_max = max;
        self
    }

    /// Inbox marks older than this are pruned.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Migrates the database, subscribes, and starts handling and relaying.
    pub async fn start(self) -> Result<Consumer> {
        let pool = self
            .db
            .clone()
            .ok_or_else(|| Error::InvalidArgument("a consumer needs a database".into()))?;
        if self.handlers.is_empty() {
            return Err(Error::InvalidArgument(
                "a consumer needs at least one handler".into(),
            ));
        }
        crate::migrations::run(&pool).await?;
        let relay = Arc::new(Relay::start(pool.clone(), self.mesh.publisher().clone()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(consume(self, pool, relay.clone(), stopped));
        Ok(Consumer { stop, task, relay })
    }
}

impl Consumer {
    /// Finishes the batch in hand, then stops handling and relaying.
    pub async fn stop(self) -> Result<()> {
        self.stop.send_replace(true);
        let result = self
            .task
            .await
            .map_err(|e| Error::Disconnected(format!("consumer task: {e}")))?;
        if let Ok(relay) = Arc::try_unwrap(self.relay) {
            relay.stop().await;
        }
        result
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Subscribes and handles until stopped; a broken stream is opened again.
async fn consume(
    b: ConsumerBuilder,
    pool: SqlitePool,
    relay: Arc<Relay>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut last_prune = tokio::time::Instant::now();
    while !*stop.borrow() {
        let node = b.mesh.current();
        match session(&b, &node.channel, &pool, &relay, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(group = %b.group, error = %e, "consumer stream broke; subscribing again");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => {}
                }
                // The group's other members and the events this one held are the
                // mesh's: on another node it joins the same group.
                if e.worth_another_node()
                    && let Err(e) = b.mesh.fail_over(node.generation).await
                {
                    tracing::warn!(group = %b.group, error = %e, "no node to move to yet");
                }
            }
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            prune(&pool, &b.group, b.inbox_retention).await;
            last_prune = tokio::time::Instant::now();
        }
    }
    Ok(())
}

async fn prune(pool: &SqlitePool, consumer: &str, retention: Duration) {
    let cutoff = unix_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    if let Err(e) = sqlx::query("DELETE FROM evmesh_inbox WHERE consumer = ? AND processed_at < ?")
        .bind(consumer)
        .bind(cutoff)
        .execute(pool)
        .await
    {
        tracing::warn!(error = %e, "pruning the inbox");
    }
}

/// One subscribe stream, until it breaks (Err) or the consumer is stopped (Ok).
async fn session(
    b: &ConsumerBuilder,
    channel: &crate::Transport,
    pool: &SqlitePool,
    relay: &Relay,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let (requests, rx) = mpsc::channel(64);
    let mut patterns: Vec<String> = b.handlers.keys().map(|t| (*t).to_owned()).collect();
    patterns.sort();
    let open = pb::SubscribeOpen {
        patterns,
        group: b.group.clone(),
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Earliest(())),
        }),
        max_in_flight: b.max_in_flight,
        ack_timeout: prost_types::Duration::try_from(b.ack_timeout).ok(),
        max_deliveries: b.max_deliveries,
        auto_ack: false,
    };
    let _ = requests.try_send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(open)),
    });
    let mut stream = MeshClient::new(channel.clone())
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut last_prune = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            m = stream.message() => m?,
            _ = stop.changed() => return Ok(()),
        };
        let Some(first) = first else {
            return Err(Error::Disconnected("the subscription ended".into()));
        };
        let mut deliveries = Vec::new();
        if let Some(pb::subscribe_response::Response::Delivery(d)) = first.response {
            deliveries.push(d);
        }
        while deliveries.len() < b.batch {
            match stream.message().now_or_never() {
                Some(Ok(Some(pb::SubscribeResponse {
                    response: Some(pb::subscribe_response::Response::Delivery(d)),
                }))) => deliveries.push(d),
                Some(Ok(Some(_))) => {}
                Some(Ok(None)) | None => break,
                Some(Err(status)) => return Err(status.into()),
            }
        }
        if deliveries.is_empty() {
            continue;
        }
        let feedback = handle_batch(b, pool, deliveries).await?;
        relay.wake();
        for request in feedback {
            requests
                .send(pb::SubscribeRequest {
                    request: Some(request),
                })
                .await
                .map_err(|_| Error::Disconnected("the subscription closed".into()))?;
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            prune(pool, &b.group, b.inbox_retention).await;
            last_prune = tokio::time::Instant::now();
        }
    }
}

fn incoming(d: &pb::Delivery, e: &pb::Event) -> Incoming {
    Incoming {
        sequence: d.sequence,
        attempt: d.attempt,
        id: e.id.clone(),
        event_type: e.r#type.clone(),
        schema_version: e.schema_version.clone(),
        aggregate_id: e.aggregate_id.clone(),
        correlation_id: e.correlation_id.clone(),
        causation_id: e.causation_id.clone(),
        source: e.source.clone(),
        headers: e.headers.clone(),
    }
}

async fn exec(shared: &Shared, sql: &str) -> Result<()> {
    let mut guard = shared.tx.lock().await;
    if let Some(tx) = guard.as_deref_mut() {
        sqlx::query(sql).execute(tx).await?;
    }
    Ok(())
}

/// Handles a batch in one transaction and returns the acks and nacks to send once
/// it is committed. Optimistic: without savepoints first; when a handler fails, the
/// whole transaction is rolled back and the batch runs again with a savepoint per
/// event, so that only the failed event's writes are undone.
async fn handle_batch(
    b: &ConsumerBuilder,
    pool: &SqlitePool,
    deliveries: Vec<pb::Delivery>,
) -> Result<Vec<pb::subscribe_request::Request>> {
    if let Some(feedback) = run_batch(b, pool, &deliveries, false).await? {
        return Ok(feedback);
    }
    run_batch(b, pool, &deliveries, true).await?.ok_or_else(|| {
        Error::InvalidArgument("a batch with savepoints cannot fail as a whole".into())
    })
}

/// One attempt at a batch; `None` when a handler failed and `savepoints` was off.
async fn run_batch(
    b: &ConsumerBuilder,
    pool: &SqlitePool,
    deliveries: &[pb::Delivery],
    savepoints: bool,
) -> Result<Option<Vec<pb::subscribe_request::Request>>> {
    use pb::subscribe_request::Request as R;
    let savepoint = |sql: &'static str| savepoints.then_some(sql);
    let shared = Arc::new(Shared {
        tx: Mutex::new(Some(pool.begin().await?)),
        outbox: std::sync::Mutex::new(Vec::new()),
    });
    let mut acks = Vec::new();
    let mut nacks: Vec<(Duration, String, u64)> = Vec::new();
    for d in deliveries {
        let Some(event) = d.event.as_ref() else {
            acks.push(d.sequence);
            continue;
        };
        let Some(handler) = b.handlers.get(event.r#type.as_str()) else {
            tracing::warn!(event_type = %event.r#type, event_id = %event.id, "no handler for this type; acked");
            acks.push(d.sequence);
            continue;
        };
        if let Some(sql) = savepoint("SAVEPOINT evmesh_event") {
            exec(&shared, sql).await?;
        }
        let fresh = {
            let mut guard = shared.tx.lock().await;
            match guard.as_deref_mut() {
                Some(tx) => {
                    sqlx::query(
                        "INSERT INTO evmesh_inbox (consumer, event_id, processed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    )
                    .bind(&b.group)
                    .bind(&event.id)
                    .bind(unix_ms())
                    .execute(tx)
                    .await?
                    .rows_affected()
                        == 1
                }
                None => false,
            }
        };
        if !fresh {
            tracing::debug!(event_id = %event.id, "already handled; acked");
            if let Some(sql) = savepoint("RELEASE evmesh_event") {
                exec(&shared, sql).await?;
            }
            acks.push(d.sequence);
            continue;
        }
        let ctx = Context {
            shared: shared.clone(),
            incoming: Arc::new(incoming(d, event)),
            mesh: b.mesh.clone(),
            group: Arc::from(b.group.as_str()),
        };
        let payload = event
            .payload
            .as_ref()
            .map(|p| p.value.as_slice())
            .unwrap_or_default();
        let span = crate::telemetry::process_span(event, &b.group, d.attempt);
        match tracing::Instrument::instrument(handler(ctx, payload), span).await {
            Ok(()) => {
                let published: Vec<pb::Event> =
                    std::mem::take(&mut *shared.outbox.lock().unwrap_or_else(|e| e.into_inner()));
                let mut guard = shared.tx.lock().await;
                if let Some(tx) = guard.as_deref_mut() {
                    for envelope in published {
                        sqlx::query("INSERT INTO evmesh_outbox (event_id, envelope) VALUES (?, ?)")
                            .bind(&envelope.id)
                            .bind(envelope.encode_to_vec())
                            .execute(&mut *tx)
                            .await?;
                    }
                    if let Some(sql) = savepoint("RELEASE evmesh_event") {
                        sqlx::query(sql).execute(&mut *tx).await?;
                    }
                }
                acks.push(d.sequence);
            }
            Err(_) if !savepoints => {
                // Dropping the transaction rolls it back; the caller runs the batch
                // again with savepoints.
                return Ok(None);
            }
            Err(e) => {
                shared
                    .outbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                exec(&shared, "ROLLBACK TO evmesh_event").await?;
                exec(&shared, "RELEASE evmesh_event").await?;
                let exp = d.attempt.saturating_sub(1).min(16);
                let delay = b.retry_base.saturating_mul(1 << exp).min(b.retry_max);
                tracing::warn!(event_id = %event.id, attempt = d.attempt, error = %e, "handler failed; nacked");
                nacks.push((delay, e.to_string(), d.sequence));
            }
        }
    }
    let tx = shared.tx.lock().await.take();
    crate::failpoint("before_commit");
    if let Some(tx) = tx {
        tx.commit().await?;
    }
    crate::failpoint("before_ack");
    let mut feedback = Vec::new();
    if !acks.is_empty() {
        feedback.push(R::Ack(pb::Ack { sequences: acks }));
    }
    for (delay, reason, sequence) in nacks {
        feedback.push(R::Nack(pb::Nack {
            sequences: vec![sequence],
            delay: prost_types::Duration::try_from(delay).ok(),
            reason,
        }));
    }
    Ok(Some(feedback))
}
