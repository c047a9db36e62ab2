//! The shared harness of evmesh's end-to-end tests: a real node on an ephemeral
//! loopback port over a temporary data directory, a client, subscription and
//! publish helpers, and `eventually`.
//!
//! Every test talks real gRPC to a real node; the backend is a parameter so that one
//! conformance suite runs against each.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use evmesh_store::sqlite::{Config, SqliteStore};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub use evmesh_proto::v1;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The storage backends the conformance suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
}

/// A node serving on 127.0.0.1 on an ephemeral port. Dropping it stops the node
/// abruptly; [`TestNode::stop`] stops it gracefully.
pub struct TestNode {
    pub addr: SocketAddr,
    pub backend: Backend,
    config: evmesh_node::NodeConfig,
    data: PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestNode {
    /// A node over a fresh temporary directory that takes events of types with no
    /// registered schema, as the storage tests publish opaque payloads.
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Self::lenient()).await
    }

    /// A node with `config` over a fresh temporary directory.
    pub async fn start_with(backend: Backend, config: evmesh_node::NodeConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut node = Self::start_in_with(backend, dir.path(), config).await;
        node._dir = Some(dir);
        node
    }

    fn lenient() -> evmesh_node::NodeConfig {
        evmesh_node::NodeConfig {
            allow_unregistered: true,
            ..evmesh_node::NodeConfig::default()
        }
    }

    /// A lenient node over `data`, which outlives it.
    pub async fn start_in(backend: Backend, data: &Path) -> Self {
        Self::start_in_with(backend, data, Self::lenient()).await
    }

    /// A node with `config` over `data`, which outlives it.
    pub async fn start_in_with(
        backend: Backend,
        data: &Path,
        config: evmesh_node::NodeConfig,
    ) -> Self {
        let store = match backend {
            Backend::Sqlite => SqliteStore::open(Config::new(data))
                .await
                .expect("open store"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let config_copy = config.clone();
        let task = tokio::spawn(async move {
            evmesh_node::serve(store, config, listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("node failed");
        });
        Self {
            addr,
            backend,
            config: config_copy,
            data: data.to_owned(),
            _dir: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub async fn client(&self) -> MeshClient<Channel> {
        MeshClient::connect(self.url()).await.expect("connect")
    }

    /// Stops gracefully and waits until the node has exited.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("node stops in time")
                .expect("node task");
        }
        self._dir.take()
    }

    /// Stops gracefully and starts again over the same data.
    pub async fn restart(self) -> Self {
        let backend = self.backend;
        let config = self.config.clone();
        let data = self.data.clone();
        let dir = self.stop().await;
        let mut node = Self::start_in_with(backend, &data, config).await;
        node._dir = dir;
        node
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A valid event of `ty` with a small opaque payload.
pub fn event(ty: &str) -> pb::Event {
    pb::Event {
        r#type: ty.to_owned(),
        source: "test".into(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/test.v1.Payload".into(),
            value: b"payload".to_vec(),
        }),
        ..Default::default()
    }
}

/// The same, with an id.
pub fn event_with_id(ty: &str, id: &str) -> pb::Event {
    pb::Event {
        id: id.to_owned(),
        ..event(ty)
    }
}

/// Publishes one event with the unary call and returns its ack.
pub async fn publish(client: &mut MeshClient<Channel>, event: pb::Event) -> pb::PublishAck {
    let response = client
        .publish_event(pb::PublishRequest { event: Some(event) })
        .await
        .expect("publish")
        .into_inner();
    match response.result {
        Some(pb::publish_response::Result::Ack(ack)) => ack,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Publishes events over one stream, all in flight at once, and returns the
/// responses in order.
pub async fn publish_stream(
    client: &mut MeshClient<Channel>,
    events: Vec<pb::Event>,
) -> Vec<pb::PublishResponse> {
    let n = events.len();
    let requests = tokio_stream::iter(
        events
            .into_iter()
            .map(|e| pb::PublishRequest { event: Some(e) }),
    );
    let mut stream = client
        .publish(requests)
        .await
        .expect("publish stream")
        .into_inner();
    let mut responses = Vec::with_capacity(n);
    while let Some(r) = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("publish responses in time")
        .expect("publish stream ok")
    {
        responses.push(r);
    }
    assert_eq!(responses.len(), n, "one response per event");
    responses
}

/// The ack of a publish response, or a panic naming the rejection.
pub fn ack_of(r: &pb::PublishResponse) -> &pb::PublishAck {
    match &r.result {
        Some(pb::publish_response::Result::Ack(a)) => a,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// A subscribe open with the given patterns, from earliest.
pub fn open(patterns: &[&str]) -> pb::SubscribeOpen {
    pb::SubscribeOpen {
        patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Earliest(())),
        }),
        ..Default::default()
    }
}

/// One open subscribe stream.
pub struct Sub {
    pub subscribed: pb::Subscribed,
    tx: mpsc::Sender<pb::SubscribeRequest>,
    stream: tonic::Streaming<pb::SubscribeResponse>,
}

impl Sub {
    pub async fn open(
        client: &mut MeshClient<Channel>,
        open: pb::SubscribeOpen,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(open)),
        })
        .await
        .expect("send open");
        let mut stream = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = stream.message().await?.expect("a first response");
        let Some(pb::subscribe_response::Response::Subscribed(subscribed)) = first.response else {
            panic!("expected subscribed first, got {first:?}");
        };
        Ok(Self {
            subscribed,
            tx,
            stream,
        })
    }

    /// The next delivery, waiting at most `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<pb::Delivery> {
        match tokio::time::timeout(wait, self.stream.message()).await {
            Err(_) => None,
            Ok(Ok(Some(pb::SubscribeResponse {
                response: Some(pb::subscribe_response::Response::Delivery(d)),
            }))) => Some(d),
            Ok(other) => panic!("subscription ended: {other:?}"),
        }
    }

    /// The next delivery; panics when none comes in time.
    pub async fn next(&mut self) -> pb::Delivery {
        self.try_next(PATIENCE).await.expect("a delivery in time")
    }

    /// `n` deliveries, acking each.
    pub async fn take_acked(&mut self, n: usize) -> Vec<pb::Delivery> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let d = self.next().await;
            self.ack(&[d.sequence]).await;
            out.push(d);
        }
        out
    }

    pub async fn ack(&self, sequences: &[u64]) {
        self.send(pb::subscribe_request::Request::Ack(pb::Ack {
            sequences: sequences.to_vec(),
        }))
        .await;
    }

    pub async fn nack(&self, sequences: &[u64], delay: Duration, reason: &str) {
        self.send(pb::subscribe_request::Request::Nack(pb::Nack {
            sequences: sequences.to_vec(),
            delay: Some(prost_types::Duration::try_from(delay).expect("duration")),
            reason: reason.to_owned(),
        }))
        .await;
    }

    async fn send(&self, request: pb::subscribe_request::Request) {
        self.tx
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .expect("subscription open");
    }
}

/// Retries `check` until it returns `Some`, for at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The group's current info.
pub async fn group_info(client: &mut MeshClient<Channel>, name: &str) -> pb::GroupInfo {
    client
        .list_groups(pb::ListGroupsRequest {})
        .await
        .expect("list groups")
        .into_inner()
        .groups
        .into_iter()
        .find(|g| g.name == name)
        .unwrap_or_else(|| panic!("no group {name}"))
}

/// Finds a tool on PATH, or fails the test loudly: tests never skip.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: run the test command from the README, which installs it")
        })
}

/// Compiles .proto sources (name, text) with protox into an encoded
/// FileDescriptorSet, imports included.
pub fn descriptor_set(files: &[(&str, &str)]) -> Vec<u8> {
    use prost::Message;
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, source) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, source).expect("write proto");
    }
    let names: Vec<&str> = files.iter().map(|f| f.0).collect();
    protox::compile(&names, [dir.path()])
        .unwrap_or_else(|e| panic!("{e}"))
        .encode_to_vec()
}

/// `shop/v1/order.proto` with `message OrderPlaced { <body> }` in package shop.v1.
pub fn order_schema(body: &str) -> Vec<u8> {
    descriptor_set(&[(
        "shop/v1/order.proto",
        &format!("syntax = \"proto3\";\npackage shop.v1;\nmessage OrderPlaced {{ {body} }}\n"),
    )])
}

/// A registry client on the node.
pub async fn registry(
    node: &TestNode,
) -> pb::schema_registry_client::SchemaRegistryClient<Channel> {
    pb::schema_registry_client::SchemaRegistryClient::connect(node.url())
        .await
        .expect("connect")
}

/// Registers `descriptor_set` for `ty` with payload `message`, at `version` (or
/// assigned when empty).
pub async fn register(
    node: &TestNode,
    ty: &str,
    version: &str,
    message: &str,
    descriptor_set: Vec<u8>,
) -> Result<pb::RegisterSchemaResponse, tonic::Status> {
    registry(node)
        .await
        .register_schema(pb::RegisterSchemaRequest {
            r#type: ty.into(),
            version: version.into(),
            message_name: message.into(),
            descriptor_set,
        })
        .await
        .map(tonic::Response::into_inner)
}
