//! The evmesh mesh node: the tonic services (`evmesh.v1.Mesh`, `grpc.health.v1`,
//! server reflection v1 and v1alpha) over any [`evmesh_store::Store`].
//!
//! This crate validates envelopes and translates between the wire and the store;
//! delivery semantics live in the store. It is the only crate that knows tonic's
//! server types. It has no feature flags.
#![forbid(unsafe_code)]

use std::future::Future;

use std::sync::Arc;

use evmesh_proto::v1::mesh_server::MeshServer;
use evmesh_proto::v1::schema_registry_server::SchemaRegistryServer;
use evmesh_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod auth;
mod backup;
mod catalog;
mod console;
mod convert;
pub mod envelope;
mod fairness;
mod follow;
mod gateway;
mod http;
mod listener;
mod mesh;
mod metrics;
mod nodes;
mod reflection;
mod registry;
pub mod tls;
mod trace;
mod transport;
mod validate;

pub use envelope::Limits;

/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Validates `bytes` as a payload of `schema`'s message, as a publish would:
    /// the violations' messages when it is refused.
    pub fn payload(schema: &evmesh_schema::Schema, bytes: &[u8]) -> Result<(), String> {
        crate::validate::payload_of(schema, bytes).map_err(|r| r.message())
    }
}
/// Entry points for the benches in `benches/`; not an API.
#[doc(hidden)]
pub mod benching {
    /// What the publish path does for the metrics on one batch of `events`, all
    /// stored; with `on` false, what a node without metrics does (nothing).
    pub fn metrics_of_a_batch(on: bool, events: Vec<evmesh_proto::v1::Event>) -> impl FnMut() {
        crate::mesh::metrics_of_a_batch(on, events)
    }
}
pub use listener::ConnectionLimits;
pub use registry::RegistryLimits;

/// How a node is set up, beyond its store and listener.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub limits: Limits,
    pub registry: RegistryLimits,
    pub connections: ConnectionLimits,
    /// Store events of types with no registered schema unvalidated, instead of
    /// rejecting them. Types with a schema are always validated.
    pub allow_unregistered: bool,
    /// An `append {type}` span per accepted event, joined to the publisher's trace
    /// through its `traceparent` header. Worth it when spans are exported.
    pub trace_events: bool,
    /// How long a stopping node waits for clients to close their connections.
    pub shutdown_grace: std::time::Duration,
    /// The node's name in the mesh; `None`: the host's name and the port it
    /// listens on.
    pub node_name: Option<String>,
    /// Where clients reach the node, as `ListNodes` tells them; `None`: the
    /// address it listens on (the host's name when that is unspecified).
    pub advertise: Option<String>,
    /// The limits the node takes again while it runs; set from the limits above
    /// at start.
    pub live: Arc<LiveLimits>,
    /// TLS on the gRPC listener ([`tls::server_config`]); `None`: plaintext.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Principals and their permissions ([`auth::Auth`]); `None`: every caller
    /// may do everything.
    pub auth: Option<Arc<auth::Auth>>,
}

/// The limits a running node takes again without a restart (SIGHUP): each read
/// where it applies, as it is now.
#[derive(Debug, Default)]
pub struct LiveLimits {
    max_connections: std::sync::atomic::AtomicUsize,
    max_schema_versions: std::sync::atomic::AtomicUsize,
}

impl LiveLimits {
    pub fn max_connections(&self) -> usize {
        self.max_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_max_connections(&self, n: usize) {
        self.max_connections
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn max_schema_versions(&self) -> usize {
        self.max_schema_versions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_max_schema_versions(&self, n: usize) {
        self.max_schema_versions
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            registry: RegistryLimits::default(),
            connections: ConnectionLimits::default(),
            allow_unregistered: false,
            trace_events: false,
            shutdown_grace: std::time::Duration::from_secs(10),
            node_name: None,
            advertise: None,
            live: Arc::default(),
            tls: None,
            auth: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the built-in descriptor sets do not decode: {0}")]
    Descriptors(#[from] prost::DecodeError),
    #[error("the built-in services do not describe themselves: {0}")]
    Services(#[from] prost_reflect::DescriptorError),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("stopping the store: {0}")]
    Store(#[from] evmesh_store::StoreError),
    #[error("the listening socket: {0}")]
    Listener(#[from] std::io::Error),
}

/// Answers gRPC calls that reached a TLS listener in plaintext with a status that
/// says so; without it, a client with an `http://` URL sees a connection reset.
async fn refuse_plaintext(
    conns: impl tokio_stream::Stream<Item = std::io::Result<listener::Conn<tokio::net::TcpStream>>>
    + Send
    + 'static,
    mut down: watch::Receiver<bool>,
) {
    let refusal = axum::Router::new().fallback(|| async {
        tonic::Status::unavailable(
            "this node serves gRPC over TLS only: connect with an https:// URL (and --ca FILE when a private CA signed its certificate)",
        )
        .into_http::<axum::body::Body>()
    });
    let served = tonic::transport::Server::builder()
        .add_routes(tonic::service::Routes::from(refusal))
        .serve_with_incoming_shutdown(conns, async move {
            let _ = down.wait_for(|&d| d).await;
        })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "answering plaintext clients on the TLS listener stopped");
    }
}

/// Reports the node SERVING while its store can take publishes and NOT_SERVING
/// while it cannot (the JetStream backend's connection lost), for the whole server
/// (`""`) and each service.
async fn set_health<S: Store>(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic::server::NamedService;
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for service in [
        "",
        MeshServer::<mesh::MeshService<S>>::NAME,
        SchemaRegistryServer::<registry::RegistryService<S>>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Serves the node on `listener` until `shutdown` resolves. Then it stops accepting,
/// ends subscriptions, answers the publishes in flight, and stops the store.
pub async fn serve<S: Store>(
    store: S,
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    serve_with_http(store, config, listener, None, shutdown).await
}

/// As [`serve`], with `/metrics`, `/healthz` and `/readyz` on `http` too.
pub async fn serve_with_http<S: Store>(
    store: S,
    config: NodeConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    config
        .live
        .set_max_connections(config.connections.max_connections);
    config
        .live
        .set_max_schema_versions(config.registry.max_versions);
    // Kept only where something can read them.
    let metrics = Arc::new(metrics::Metrics::new(http.is_some()));
    let open_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    metrics.count_connections(open_connections.clone());
    let (down_tx, down_rx) = watch::channel(false);
    // Room for the largest event an envelope check accepts, so that every stored
    // event fits a delivery too.
    let decode_limit =
        (config.limits.max_payload_bytes + config.limits.max_envelope_overhead() + 64 * 1024)
            .max(4 * 1024 * 1024);
    // A registration's reply carries the normalised schema, at most what was sent.
    let registry_limit =
        decode_limit.max(config.registry.schema.max_bytes.saturating_add(64 * 1024));
    let catalogs = Arc::new(catalog::Catalogs::new(&[
        evmesh_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])?);
    let schemas = registry::load(&store, &catalogs).await?;
    tracing::info!(schemas, "schemas loaded");
    let identity = Arc::new(nodes::Identity::new(&config, listener.local_addr()?));
    nodes::announce(store.clone(), identity.clone(), down_rx.clone());
    // Other nodes register in a shared store: follow them.
    let changes = store.schema_changes();
    let read_through = follow::ReadThrough::new(changes.is_some());
    if let Some(changes) = changes {
        follow::follow(
            store.clone(),
            catalogs.clone(),
            read_through.clone(),
            changes,
        );
    }
    let mesh = MeshServer::new(mesh::MeshService::new(
        store.clone(),
        &config,
        catalogs.clone(),
        down_rx.clone(),
        read_through,
        identity,
        metrics.clone(),
    ))
    .max_decoding_message_size(decode_limit)
    .max_encoding_message_size(decode_limit);
    let registry = SchemaRegistryServer::new(
        registry::RegistryService::new(
            store.clone(),
            catalogs.clone(),
            config.registry.clone(),
            config.live.clone(),
        )
        .with_metrics(metrics.clone()),
    )
    .max_decoding_message_size(registry_limit)
    .max_encoding_message_size(registry_limit);

    let (health, health_service) = tonic_health::server::health_reporter();
    let mut serving = store.serving();
    let up = *serving.borrow_and_update();
    set_health::<S>(&health, up).await;
    tokio::spawn(async move {
        while serving.changed().await.is_ok() {
            let up = *serving.borrow_and_update();
            set_health::<S>(&health, up).await;
        }
    });
    // The console's JSON API calls the same services through the same layers.
    let console = match &http {
        Some(_) => {
            let routes = tonic::service::Routes::new(mesh.clone()).add_service(registry.clone());
            let grpc = tower::ServiceBuilder::new()
                .layer(tower::util::MapResponseLayer::new(transport::response))
                .layer(transport::CatchPanicLayer)
                .layer(auth::AuthLayer(config.auth.clone()))
                .service(routes);
            Some(Arc::new(gateway::Gateway::new(
                gateway::Grpc::new(grpc),
                catalogs.clone(),
            )?))
        }
        None => None,
    };
    let reflection_v1 = reflection::v1::server(catalogs.clone());
    let reflection_v1alpha = reflection::v1alpha::server(catalogs);

    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        down_tx.send_replace(true);
    });
    let mut down_server = down_rx.clone();
    let limits = config.connections.clone();
    if let Some(http) = http {
        tracing::info!(addr = %http.local_addr()?, "serving http");
        tokio::spawn(http::serve(
            http,
            store.clone(),
            metrics,
            down_rx.clone(),
            console,
        ));
    }
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(tower::util::MapResponseLayer::new(transport::response))
        .layer(transport::CatchPanicLayer)
        .layer(auth::AuthLayer(config.auth.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(mesh)
        .add_service(registry);
    let stopped = async move {
        let _ = down_server.wait_for(|&d| d).await;
    };
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match config.tls.clone() {
        None => {
            let incoming = listener::incoming(
                listener,
                limits.clone(),
                config.live.clone(),
                open_connections,
            );
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        Some(tls) => {
            let (incoming, plaintext) = listener::incoming_tls(
                listener,
                limits.clone(),
                config.live.clone(),
                open_connections,
                tls,
            );
            tokio::spawn(refuse_plaintext(plaintext, down_rx.clone()));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    // The node ends its own streams at once on shutdown; a client that still holds a
    // connection open after the grace period is cut off.
    let mut down = down_rx.clone();
    let grace = async move {
        let _ = down.wait_for(|&d| d).await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    tokio::select! {
        served = server => served?,
        () = grace => tracing::warn!(grace = ?config.shutdown_grace, "closing connections still open after the grace period"),
    }
    store.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
