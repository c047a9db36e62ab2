//! `evmesh-bench`: runs scenarios against a real node over loopback and prints a
//! table (and, with `--json`, a JSON file) of the figures.
//!
//! The node runs in this process on its own runtime and threads, over a temporary
//! directory; the load runs on another runtime. Both share the machine's cores, as a
//! node and its clients on one machine do.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use evmesh_store::sqlite::{Config, SqliteStore};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Benchmarks an evmesh node over loopback")]
struct Args {
    /// Tiny sizes: proves the harness works in seconds, measures nothing.
    #[arg(long)]
    quick: bool,
    /// Events per publish-throughput run.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_value = "publish,latency")]
    scenarios: Vec<String>,
    /// Keep the node's log in this directory instead of a temporary one.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to write every figure as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A node on its own runtime, over a temporary directory.
struct Node {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    fn start(data: Option<PathBuf>) -> anyhow::Result<Self> {
        let (dir, data) = match data {
            Some(data) => (None, data),
            None => {
                let dir = tempfile::tempdir()?;
                let data = dir.path().to_owned();
                (Some(dir), data)
            }
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let store = SqliteStore::open(Config::new(&data)).await?;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let _ = ready_tx.send(listener.local_addr()?);
                // Unregistered types pass unvalidated: the scenarios that measure
                // validation register their schema first.
                let config = evmesh_node::NodeConfig {
                    allow_unregistered: true,
                    ..evmesh_node::NodeConfig::default()
                };
                evmesh_node::serve(store, config, listener, async move {
                    let _ = stopped.await;
                })
                .await?;
                Ok(())
            })
        });
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("the node did not start")?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        })
    }

    async fn client(&self) -> anyhow::Result<MeshClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(MeshClient::new(channel))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the node thread panicked"),
            None => Ok(()),
        }
    }
}

/// The schema of every bench payload: `message bench.v1.Payload { bytes data = 1; }`.
fn payload_schema() -> Vec<u8> {
    use prost::Message;
    use prost_types::field_descriptor_proto::{Label, Type};
    let file = prost_types::FileDescriptorProto {
        name: Some("bench/v1/payload.proto".into()),
        package: Some("bench.v1".into()),
        syntax: Some("proto3".into()),
        message_type: vec![prost_types::DescriptorProto {
            name: Some("Payload".into()),
            field: vec![prost_types::FieldDescriptorProto {
                name: Some("data".into()),
                number: Some(1),
                label: Some(Label::Optional as i32),
                r#type: Some(Type::Bytes as i32),
                json_name: Some("data".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    prost_types::FileDescriptorSet { file: vec![file] }.encode_to_vec()
}

/// Registers the bench payload schema for `ty`.
async fn register(node: &Node, ty: &str) -> anyhow::Result<()> {
    let channel = Channel::from_shared(format!("http://{}", node.addr))?
        .connect()
        .await?;
    let mut registry = pb::schema_registry_client::SchemaRegistryClient::new(channel);
    registry
        .register_schema(pb::RegisterSchemaRequest {
            r#type: ty.to_owned(),
            version: String::new(),
            message_name: "bench.v1.Payload".into(),
            descriptor_set: payload_schema(),
        })
        .await?;
    Ok(())
}

/// An event whose payload is a `bench.v1.Payload` of `payload` bytes in all.
fn event(ty: &str, payload: usize, headers: Vec<(String, String)>) -> pb::Event {
    // Field 1, length-delimited: tag, a varint length, the bytes.
    let data = payload.saturating_sub(3).max(1);
    let mut value = vec![0x0a];
    let mut len = data;
    while len >= 0x80 {
        value.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    value.push(len as u8);
    value.resize(value.len() + data, 0xab);
    pb::Event {
        r#type: ty.to_owned(),
        source: "bench".into(),
        headers: headers.into_iter().collect(),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/bench.v1.Payload".into(),
            value,
        }),
        ..Default::default()
    }
}

/// One streaming publisher with at most `window` unacked events; returns how many
/// were acked.
async fn stream_publisher(
    mut client: MeshClient<Channel>,
    ty: &'static str,
    n: u64,
    payload: usize,
    window: usize,
) -> anyhow::Result<u64> {
    let (tx, rx) = mpsc::channel(window);
    let credits = Arc::new(Semaphore::new(window));
    let sender = {
        let credits = credits.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                let Ok(permit) = credits.acquire().await else {
                    return;
                };
                permit.forget();
                let request = pb::PublishRequest {
                    event: Some(event(ty, payload, vec![])),
                };
                if tx.send(request).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut responses = client.publish(ReceiverStream::new(rx)).await?.into_inner();
    let mut acked = 0;
    while acked < n {
        let Some(r) = responses.message().await? else {
            break;
        };
        match r.result {
            Some(pb::publish_response::Result::Ack(_)) => acked += 1,
            other => bail!("publish failed: {other:?}"),
        }
        credits.add_permits(1);
    }
    sender.await?;
    Ok(acked)
}

struct Row {
    scenario: String,
    figures: Vec<(String, f64, String)>,
}

async fn publish_throughput(
    node: &Node,
    streams: u64,
    events: u64,
    payload: usize,
    validated: bool,
) -> anyhow::Result<Row> {
    // Registered types are validated; the unregistered one is stored as given.
    let ty = if validated {
        "bench.order.placed"
    } else {
        "bench.order.unvalidated"
    };
    let per = events / streams;
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..streams {
        let client = node.client().await?;
        tasks.push(tokio::spawn(stream_publisher(
            client, ty, per, payload, 4096,
        )));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = acked as f64 / secs;
    Ok(Row {
        scenario: format!(
            "durable publish, {streams} stream(s){}",
            if validated { "" } else { ", no validation" }
        ),
        figures: vec![
            ("events/s".into(), rate, format!("{rate:.0}")),
            (
                "MB/s".into(),
                rate * payload as f64 / 1e6,
                format!("{:.1}", rate * payload as f64 / 1e6),
            ),
            ("events".into(), acked as f64, acked.to_string()),
        ],
    })
}

/// Open loop: event k is due at start + k/rate whether or not the node keeps up, and
/// its latency counts from when it was due, so a slow node cannot hide its delay.
async fn delivery_latency(
    node: &Node,
    rate: u64,
    seconds: u64,
    payload: usize,
) -> anyhow::Result<Row> {
    let mut sub_client = node.client().await?;
    let (sub_tx, sub_rx) = mpsc::channel(16);
    sub_tx
        .send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                patterns: vec!["bench.latency.>".into()],
                auto_ack: true,
                max_in_flight: 10_000,
                ..Default::default()
            })),
        })
        .await?;
    let mut deliveries = sub_client
        .subscribe(ReceiverStream::new(sub_rx))
        .await?
        .into_inner();
    deliveries.message().await?; // subscribed
    let total = rate * seconds;
    let base = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        while (latencies.len() as u64) < total {
            let Ok(Some(m)) = deliveries.message().await else {
                break;
            };
            let Some(pb::subscribe_response::Response::Delivery(d)) = m.response else {
                continue;
            };
            let now = base.elapsed();
            let due: u64 = d
                .event
                .as_ref()
                .and_then(|e| e.headers.get("due-ns"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            latencies.push(now.as_nanos() as u64 - due.min(now.as_nanos() as u64));
        }
        drop(sub_tx);
        latencies
    });
    let mut client = node.client().await?;
    let (tx, rx) = mpsc::channel(65_536);
    let mut acks = client.publish(ReceiverStream::new(rx)).await?.into_inner();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let drain = tokio::spawn(async move {
        let mut ack_latencies = Vec::new();
        let mut k = 0u32;
        while let Ok(Some(_)) = acks.message().await {
            let due = interval * k;
            k += 1;
            ack_latencies.push(base.elapsed().saturating_sub(due).as_nanos() as u64);
        }
        ack_latencies
    });
    for k in 0..total {
        let due = interval * u32::try_from(k).unwrap_or(u32::MAX);
        tokio::time::sleep_until((base + due).into()).await;
        let e = event(
            "bench.latency.tick",
            payload,
            vec![("due-ns".into(), due.as_nanos().to_string())],
        );
        tx.send(pb::PublishRequest { event: Some(e) }).await?;
    }
    let mut latencies = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .context("deliveries did not all arrive")??;
    drop(tx);
    let mut ack_latencies = drain.await?;
    ack_latencies.sort_unstable();
    let ack_p50 = ack_latencies
        .get(ack_latencies.len() / 2)
        .copied()
        .unwrap_or(0) as f64
        / 1e6;
    let ack_p99 = ack_latencies
        .get(ack_latencies.len() * 99 / 100)
        .copied()
        .unwrap_or(0) as f64
        / 1e6;
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).copied().unwrap_or(0) as f64 / 1e6
    };
    let (p50, p99, p999) = (pct(0.50), pct(0.99), pct(0.999));
    Ok(Row {
        scenario: format!("publish-to-delivery at {rate}/s"),
        figures: vec![
            ("p50 ms".into(), p50, format!("{p50:.2}")),
            ("p99 ms".into(), p99, format!("{p99:.2}")),
            ("p99.9 ms".into(), p999, format!("{p999:.2}")),
            (
                "delivered".into(),
                latencies.len() as f64,
                latencies.len().to_string(),
            ),
            ("ack p50 ms".into(), ack_p50, format!("{ack_p50:.2}")),
            ("ack p99 ms".into(), ack_p99, format!("{ack_p99:.2}")),
        ],
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (events, seconds) = if args.quick {
        (2_000, 1)
    } else {
        (args.events, args.seconds)
    };
    let node = Node::start(args.data.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        let run = |name: &str| args.scenarios.iter().any(|s| s == name);
        register(&node, "bench.order.placed").await?;
        register(&node, "bench.latency.tick").await?;
        let publish_runs = [(1, true), (4, true), (16, true), (1, false)];
        for (streams, validated) in publish_runs.into_iter().filter(|_| run("publish")) {
            let row = publish_throughput(&node, streams, events, args.payload, validated).await?;
            eprintln!("done: {}", row.scenario);
            rows.push(row);
        }
        for rate in [1_000, 5_000, 10_000]
            .into_iter()
            .filter(|_| run("latency"))
        {
            let rate = if args.quick { rate / 10 } else { rate };
            let row = delivery_latency(&node, rate, seconds, args.payload).await?;
            eprintln!("done: {}", row.scenario);
            rows.push(row);
        }
        anyhow::Ok(rows)
    })?;
    drop(runtime);
    node.stop()?;

    println!("{:<36} figures", "scenario");
    for row in &rows {
        let figures: Vec<String> = row
            .figures
            .iter()
            .map(|(k, _, v)| format!("{k}={v}"))
            .collect();
        println!("{:<36} {}", row.scenario, figures.join("  "));
    }
    if let Some(path) = args.json {
        let all: Vec<_> = rows
            .iter()
            .map(|r| {
                let figures: serde_json::Map<String, serde_json::Value> = r
                    .figures
                    .iter()
                    .map(|(k, v, _)| (k.clone(), json!(v)))
                    .collect();
                json!({ "scenario": r.scenario, "figures": figures })
            })
            .collect();
        std::fs::write(&path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
