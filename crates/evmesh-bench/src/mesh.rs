//! Several nodes on one JetStream cluster (each a child process): publish
//! throughput and publish-to-delivery latency through 1, 2 and 3 nodes, and how
//! long a durable group takes to move when the node that owns it is killed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use evmesh_proto::v1 as pb;
use evmesh_store::jetstream::JetStreamConfig;
use evmesh_testkit::NatsCluster;

use crate::jetstream::Nats;
use crate::load::{
    event, latency_member, open_loop_publish, publish_streams, quantile_ms, subscribe,
};
use crate::node::{NodeProcess, connect};
use crate::report::Row;

/// Publishing streams in all, spread over the nodes.
const STREAMS: u64 = 12;

/// `n` nodes over a cluster of the run's own.
struct Mesh {
    nodes: Vec<Option<NodeProcess>>,
    _cluster: NatsCluster,
}

impl Mesh {
    async fn start(nats: Nats, n: usize) -> anyhow::Result<Self> {
        let cluster = nats.start().await;
        let mut config = JetStreamConfig::new(cluster.urls());
        config.replicas = nats.replicas;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(Some(
                NodeProcess::start_on(None, Some(&config), true).await?,
            ));
        }
        Ok(Self {
            nodes,
            _cluster: cluster,
        })
    }

    fn addr(&self, i: usize) -> std::net::SocketAddr {
        self.nodes[i].as_ref().map(|n| n.addr).unwrap_or_else(|| {
            // Only the killed node is gone, and nothing asks for it after.
            std::net::SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }
}

fn nodes_label(n: usize) -> String {
    if n == 1 {
        "1 node".into()
    } else {
        format!("{n} nodes")
    }
}

/// [`STREAMS`] streaming publishers spread over `n` nodes, all at once.
pub async fn publish(nats: Nats, n: usize, events: u64, payload: usize) -> anyhow::Result<Row> {
    let mesh = Mesh::start(nats, n).await?;
    let run = |events: u64| {
        let addrs: Vec<_> = (0..n).map(|i| mesh.addr(i)).collect();
        async move {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (i, addr) in addrs.into_iter().enumerate() {
                // The streams as evenly as they go: 12 over 1, 2 or 3 nodes.
                let streams = STREAMS / n as u64 + u64::from((i as u64) < STREAMS % n as u64);
                let share = events * streams / STREAMS;
                tasks.push(tokio::spawn(publish_streams(
                    addr,
                    "bench.mesh.placed",
                    streams,
                    share,
                    payload,
                )));
            }
            let mut acked = 0;
            for task in tasks {
                acked += task.await??.0;
            }
            anyhow::Ok((acked, start.elapsed()))
        }
    };
    run((events / 10).max(1)).await?;
    let (acked, elapsed) = run(events).await?;
    Ok(Row::throughput(
        format!(
            "mesh: durable publish through {}, {STREAMS} streams",
            nodes_label(n)
        ),
        acked,
        elapsed.as_secs_f64(),
        payload,
    ))
}

/// A member of `group` on `addr` that holds the group for its node until dropped.
async fn hold(
    addr: std::net::SocketAddr,
    group: &str,
    pattern: &str,
) -> anyhow::Result<tokio::sync::mpsc::Sender<pb::SubscribeRequest>> {
    let (tx, _stream) = subscribe(
        addr,
        pb::SubscribeOpen {
            patterns: vec![pattern.to_owned()],
            group: group.to_owned(),
            max_in_flight: 1,
            ..Default::default()
        },
    )
    .await?;
    Ok(tx)
}

/// Publish-to-delivery latency at `rate` through `n` nodes: published on the
/// first, delivered to a member of a durable group on the last, the group owned
/// by the middle node (with 3) or the first (with 2), so that deliveries cross
/// the relay; with 1, all on one node.
pub async fn latency(
    nats: Nats,
    n: usize,
    rate: u64,
    seconds: u64,
    payload: usize,
) -> anyhow::Result<Row> {
    let mesh = Mesh::start(nats, n).await?;
    let owner = if n == 3 { 1 } else { 0 };
    let (group, pattern) = ("bench-mesh-latency", "bench.mesh.>");
    // The first member takes the group for its node, then leaves it to the real one.
    let holder = hold(mesh.addr(owner), group, pattern).await?;
    let total = rate * seconds;
    let base = Instant::now();
    let receiver = latency_member(mesh.addr(n - 1), group, pattern, total, base).await?;
    drop(holder);
    let mut acks =
        open_loop_publish(mesh.addr(0), "bench.mesh.tick", rate, total, payload, base).await?;
    let mut latencies = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .context("deliveries did not all arrive")??;
    acks.sort_unstable();
    latencies.sort_unstable();
    Ok(Row::new(format!(
        "mesh: publish-to-delivery at {rate}/s through {}",
        nodes_label(n)
    ))
    .figure("p50 ms", quantile_ms(&latencies, 0.50), 2)
    .figure("p99 ms", quantile_ms(&latencies, 0.99), 2)
    .figure("delivered", latencies.len() as f64, 0)
    .figure("ack p99 ms", quantile_ms(&acks, 0.99), 2))
}

/// Three nodes; a group owned by the first with members on the other two,
/// events published through the second at `rate`; the owner is killed (SIGKILL):
/// the time until a member gets an event again, the new owner's.
pub async fn group_move(nats: Nats, rate: u64, payload: usize) -> anyhow::Result<Row> {
    let mut mesh = Mesh::start(nats, 3).await?;
    let (group, pattern) = ("bench-mesh-move", "bench.move.>");
    let holder = hold(mesh.addr(0), group, pattern).await?;
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut members = Vec::new();
    for i in [1, 2] {
        let (tx, mut stream) = subscribe(
            mesh.addr(i),
            pb::SubscribeOpen {
                patterns: vec![pattern.to_owned()],
                group: group.to_owned(),
                auto_ack: true,
                max_in_flight: 1_000,
                ..Default::default()
            },
        )
        .await?;
        let arrivals = arrivals.clone();
        members.push((
            tx,
            tokio::spawn(async move {
                while let Ok(Some(_)) = stream.message().await {
                    arrivals
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Instant::now());
                }
            }),
        ));
    }
    drop(holder);
    // Publishing through the second node, on and on, until the group has moved.
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher =
        publish_until(mesh.addr(1), "bench.move.tick", rate, payload, stop.clone()).await?;
    let delivering = |after: Instant| {
        arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&t| t > after)
    };
    // Deliveries flowing, then the owner dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !delivering(base + Duration::from_millis(500)) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing delivered before the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = Instant::now();
    if let Some(owner) = mesh.nodes[0].take() {
        owner.kill_9();
    }
    // What was on its way when it died arrives within a few milliseconds; the
    // next deliveries are the new owner's.
    let after = killed + Duration::from_millis(100);
    let deadline = killed + Duration::from_secs(30);
    let moved = loop {
        if let Some(first) = arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|&&t| t > after)
        {
            break first.duration_since(killed);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the group did not move within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    publisher.await??;
    for (tx, task) in members {
        drop(tx);
        task.abort();
    }
    Ok(
        Row::new("mesh: a group moves after its owner is killed (3 nodes)").figure(
            "moved in s",
            moved.as_secs_f64(),
            2,
        ),
    )
}

/// Publishes `ty` through `addr` at `rate` until `stop` is set, every event acked.
async fn publish_until(
    addr: std::net::SocketAddr,
    ty: &'static str,
    rate: u64,
    payload: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    use tokio_stream::wrappers::ReceiverStream;
    let mut client = pb::mesh_client::MeshClient::new(connect(addr).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(65_536);
    let mut acks = client.publish(ReceiverStream::new(rx)).await?.into_inner();
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let sender = tokio::task::spawn_blocking(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(interval);
            let e = event(ty, payload, vec![]);
            if tx
                .blocking_send(pb::PublishRequest { event: Some(e) })
                .is_err()
            {
                break;
            }
        }
    });
    Ok(tokio::spawn(async move {
        let drain = async {
            while let Some(r) = acks.message().await? {
                if let Some(pb::publish_response::Result::Rejection(r)) = r.result {
                    anyhow::bail!("a publish was rejected: {r:?}");
                }
            }
            anyhow::Ok(())
        };
        let (sent, drained) = tokio::join!(sender, drain);
        sent?;
        drained
    }))
}
