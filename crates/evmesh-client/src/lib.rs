//! evmesh for Rust services: publish and handle typed events with no boilerplate.
//!
//! - [`Event`] is implemented by `evmesh-build` for every message marked with
//!   `option (evmesh.v1.event_type) = "..."`; a service never writes an event type or
//!   a schema version by hand.
//! - [`Mesh::connect`] reaches a node of a mesh, or the first of several that
//!   answers, and moves to the next when its connection breaks; [`Mesh::publish`]
//!   streams with many events in flight and returns each one's ack.
//! - [`Mesh::consumer`] builds a consumer: a group, typed handlers, and the service's
//!   own SQLite database, where one transaction holds the inbox mark, the handler's
//!   writes and the events it publishes (the outbox), committed before the ack. A
//!   relay publishes the outbox. Every effect happens once, whatever crashes.
//!
//! Feature flags: `failpoints` (off) makes the process abort at the crash point
//! named by `EVMESH_CLIENT_CRASH_AT`, for evmesh's own crash tests; never enable it
//! in a service.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use evmesh_proto::v1::schema_registry_client::SchemaRegistryClient;

mod consumer;
mod credentials;
mod migrations;
mod nodes;
mod outbox;
mod publisher;
pub mod telemetry;

pub use consumer::{Consumer, ConsumerBuilder, Context, HandlerError, Incoming, Tx};
pub use credentials::{Authorize, Credentials, Transport};
/// The wire types (envelopes, acks), for what the typed API does not cover.
pub use evmesh_proto::v1 as pb;
pub use nodes::urls as node_urls;
pub use outbox::Relay;
pub use publisher::Publisher;

/// A payload message that is an event type's schema. Implemented by `evmesh-build`.
pub trait Event: prost::Message + Default + Send + Sync + 'static {
    /// The event type, e.g. `shop.order.placed`.
    const TYPE: &'static str;
    /// The fully qualified payload message, e.g. `shop.v1.OrderPlaced`.
    const MESSAGE: &'static str;
    /// The encoded descriptor set the message was compiled from, imports included.
    fn descriptor_set() -> &'static [u8];
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{code:?}: {message}")]
    Rejected {
        code: tonic::Code,
        message: String,
        violations: Vec<pb::Violation>,
    },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the connection to the node was lost: {0}")]
    Disconnected(String),
    #[error("schema of {event_type}: {message}")]
    Schema {
        event_type: &'static str,
        message: String,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the connection broke or the node could not serve the call (rather
    /// than the call being wrong or refused): another node, or the same one later,
    /// may serve it.
    pub fn worth_another_node(&self) -> bool {
        match self {
            Error::Disconnected(_) | Error::Connect { .. } => true,
            Error::Status(status) => nodes::worth_another_node(status.code()),
            Error::Rejected { code, .. } => *code == tonic::Code::Unavailable,
            Error::InvalidArgument(_) | Error::Schema { .. } | Error::Database(_) => false,
        }
    }
}

/// A connection to a mesh node, which moves to another node of the mesh when it
/// breaks. Cloning shares it.
#[derive(Clone)]
pub struct Mesh {
    nodes: Arc<nodes::Nodes>,
    failover_for: Duration,
    publisher: Publisher,
    /// Event type → the schema version this service's messages were resolved to.
    versions: Arc<RwLock<HashMap<&'static str, String>>>,
}

/// How [`Mesh::connect_with`] connects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// How long the publisher keeps sending an unacknowledged event again, to one
    /// node after another, before its caller gets the error (30 s).
    pub failover_for: Duration,
    /// TLS trust, a client certificate and a token ([`Credentials`]).
    pub credentials: Credentials,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            failover_for: Duration::from_secs(30),
            credentials: Credentials::default(),
        }
    }
}

impl ConnectOptions {
    pub fn failover_for(mut self, failover_for: Duration) -> Self {
        self.failover_for = failover_for;
        self
    }

    /// Connects with these credentials: a token, a CA for `https://` nodes, a
    /// client certificate.
    ///
    /// ```no_run
    /// # async fn f() -> evmesh_client::Result<()> {
    /// use evmesh_client::{ConnectOptions, Credentials, Mesh};
    /// let credentials = Credentials::default()
    ///     .ca_file("ca.pem".as_ref())?
    ///     .token("evm_…")?;
    /// let mesh = Mesh::connect_with(
    ///     "https://mesh.internal:50051",
    ///     ConnectOptions::default().credentials(credentials),
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }
}

/// Where an event sits in a workflow. Empty fields are filled: a new id, and for a
/// new workflow a correlation id.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub id: String,
    pub aggregate_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub source: String,
    pub headers: HashMap<String, String>,
}

/// Aborts the process here when the `failpoints` feature is on and
/// `EVMESH_CLIENT_CRASH_AT` names this point: a crash with nothing cleaned up.
#[inline]
pub(crate) fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("EVMESH_CLIENT_CRASH_AT").is_ok_and(|at| at == name) {
        eprintln!("evmesh-client: crashing at {name}");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// A new event id: a UUIDv7.
pub(crate) fn new_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

impl Mesh {
    /// Connects to the node at `servers` (e.g. `http://127.0.0.1:50051`), or to the
    /// first that answers of several, comma-separated
    /// (`http://a:50051,http://b:50051`); a URL without a scheme is `http://`.
    /// When the connection breaks, calls move to the next node of the list (round
    /// the list): the publisher sends what was not acknowledged again with the same
    /// ids, and consumers join their groups again.
    ///
    /// ```no_run
    /// # async fn f() -> evmesh_client::Result<()> {
    /// let mesh = evmesh_client::Mesh::connect("http://127.0.0.1:50051").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(servers: &str) -> Result<Self> {
        Self::connect_with(servers, ConnectOptions::default()).await
    }

    /// [`Mesh::connect`] with options.
    pub async fn connect_with(servers: &str, options: ConnectOptions) -> Result<Self> {
        let nodes = Arc::new(nodes::Nodes::connect(servers, options.credentials).await?);
        Ok(Self {
            publisher: Publisher::start(nodes.clone(), options.failover_for),
            nodes,
            failover_for: options.failover_for,
            versions: Arc::default(),
        })
    }

    /// The connection in use now.
    pub(crate) fn current(&self) -> nodes::Current {
        self.nodes.current()
    }

    /// Moves off the connection of generation `broken` (see [`Mesh::current`]).
    pub(crate) async fn fail_over(&self, broken: u64) -> Result<()> {
        self.nodes.fail_over(broken).await
    }

    /// Runs an idempotent call on the node in use, and again on the next node while
    /// it fails with a broken connection or an unavailable node, for at most
    /// `failover_for`.
    async fn on_any_node<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Transport) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = nodes::Backoff::new();
        loop {
            let node = self.current();
            match call(node.channel).await {
                Ok(value) => return Ok(value),
                Err(status)
                    if nodes::worth_another_node(status.code())
                        && backoff.wait(self.failover_for).await =>
                {
                    if let Err(e) = self.fail_over(node.generation).await {
                        tracing::warn!(error = %e, "no node to move to yet");
                    }
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    fn request<E: Event>(version: &str) -> pb::RegisterSchemaRequest {
        pb::RegisterSchemaRequest {
            r#type: E::TYPE.to_owned(),
            version: version.to_owned(),
            message_name: E::MESSAGE.to_owned(),
            descriptor_set: E::descriptor_set().to_vec(),
        }
    }

    /// Registers `E`'s schema (the registry assigns the version) and uses that
    /// version from now on. Idempotent for unchanged content.
    pub async fn register<E: Event>(&self) -> Result<String> {
        let response = self
            .on_any_node(|channel| async move {
                SchemaRegistryClient::new(channel)
                    .register_schema(Self::request::<E>(""))
                    .await
            })
            .await?
            .into_inner();
        let version = response.schema.map(|s| s.version).unwrap_or_default();
        self.remember::<E>(&version);
        Ok(version)
    }

    /// Finds the registered version whose content is exactly `E`'s schema and uses
    /// it from now on; an error when this content is not registered.
    pub async fn resolve<E: Event>(&self) -> Result<String> {
        let check = self
            .on_any_node(|channel| async move {
                SchemaRegistryClient::new(channel)
                    .check_schema(Self::request::<E>(""))
                    .await
            })
            .await?
            .into_inner();
        if !check.already_registered {
            return Err(Error::Schema {
                event_type: E::TYPE,
                message: format!(
                    "this content of {} is not registered (it would be {}); register it first",
                    E::MESSAGE,
                    check.version
                ),
            });
        }
        self.remember::<E>(&check.version);
        Ok(check.version)
    }

    fn remember<E: Event>(&self, version: &str) {
        self.versions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(E::TYPE, version.to_owned());
    }

    /// The envelope of `event`: its type, the resolved schema version (empty: the
    /// node takes the latest), the payload, and `meta` with the blanks filled. `span`
    /// is the event's publish span: its context goes into the headers, and a new
    /// workflow's correlation id is its trace id.
    pub(crate) fn envelope<E: Event>(
        &self,
        event: &E,
        meta: Meta,
        span: &tracing::Span,
    ) -> pb::Event {
        let version = self
            .versions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(E::TYPE)
            .cloned()
            .unwrap_or_default();
        let id = if meta.id.is_empty() {
            new_id().to_string()
        } else {
            meta.id
        };
        let correlation_id = if meta.correlation_id.is_empty() {
            // Without tracing set up, still 128 bits in trace-id form.
            telemetry::trace_id(span).unwrap_or_else(|| new_id().simple().to_string())
        } else {
            meta.correlation_id
        };
        span.record("messaging.message.id", id.as_str());
        span.record("messaging.message.conversation_id", correlation_id.as_str());
        let mut headers = meta.headers;
        telemetry::inject(span, &mut headers);
        pb::Event {
            id,
            r#type: E::TYPE.to_owned(),
            schema_version: version,
            occurred_at: Some(std::time::SystemTime::now().into()),
            source: meta.source,
            aggregate_id: meta.aggregate_id,
            correlation_id,
            causation_id: meta.causation_id,
            headers,
            payload: Some(prost_types::Any {
                type_url: format!("type.googleapis.com/{}", E::MESSAGE),
                value: event.encode_to_vec(),
            }),
        }
    }

    /// Publishes one event and waits for its durable ack, in a `publish {type}`
    /// span. Many calls may be in flight at once; they share one stream.
    pub async fn publish<E: Event>(&self, event: &E, meta: Meta) -> Result<pb::PublishAck> {
        use tracing::Instrument;
        let span = telemetry::publish_span(E::TYPE);
        let envelope = self.envelope(event, meta, &span);
        self.publisher.publish(envelope).instrument(span).await
    }

    /// The shared streaming publisher, for envelopes built elsewhere.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// A consumer in durable group `group`.
    pub fn consumer(&self, group: &str) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone(), group)
    }
}
