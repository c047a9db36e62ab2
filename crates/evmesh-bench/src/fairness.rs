//! The fairness run: a well-behaved principal publishing at a steady rate, on a
//! quiet node, then while another principal floods the node with publishes and
//! with publish and subscribe streams it opens and drops at once: once with the
//! flooder capped in the auth file (max_publish_streams, max_subscriptions,
//! publish_rate), once without caps. The well-behaved publisher's p99 is the
//! figure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::load::{event, open_loop_publish_as, quantile_ms};
use crate::node::{Node, connect_as};
use crate::report::Row;

const CALM: &str = "evm_bench-calm-token";
const FLOOD: &str = "evm_bench-flood-token";
/// What the capped flooder may publish per second.
const FLOOD_RATE: u32 = 2_000;
/// Tasks of the flooder: publishers, and openers-and-droppers of streams.
const FLOOD_PUBLISHERS: usize = 8;
const FLOOD_CHURNERS: usize = 4;

fn auth_file(capped: bool) -> String {
    let caps = if capped {
        format!("max_subscriptions = 4\nmax_publish_streams = 4\npublish_rate = {FLOOD_RATE}\n")
    } else {
        String::new()
    };
    format!(
        "[[principal]]\nname = \"calm\"\n{}\npublish = [\"bench.calm.>\"]\nsubscribe = [\"bench.>\"]\n\n\
         [[principal]]\nname = \"flood\"\n{}\npublish = [\"bench.flood.>\"]\nsubscribe = [\"bench.>\"]\n{caps}",
        evmesh_node::auth::token_line(CALM),
        evmesh_node::auth::token_line(FLOOD),
    )
}

/// What one run saw.
struct Run {
    p99_ms: f64,
    flood_acked: u64,
    flood_refused: u64,
    seconds: f64,
}

pub async fn fairness(rate: u64, seconds: u64, payload: usize) -> anyhow::Result<Row> {
    let quiet = run(rate, seconds, payload, None).await?;
    let capped = run(rate, seconds, payload, Some(true)).await?;
    let free = run(rate, seconds, payload, Some(false)).await?;
    Ok(Row::new(format!("fairness, a publisher at {rate}/s"))
        .figure("p99 ms quiet", quiet.p99_ms, 2)
        .figure("p99 ms flood capped", capped.p99_ms, 2)
        .figure("p99 ms flood uncapped", free.p99_ms, 2)
        .figure(
            "flood acked/s capped",
            capped.flood_acked as f64 / capped.seconds,
            0,
        )
        .figure(
            "flood acked/s uncapped",
            free.flood_acked as f64 / free.seconds,
            0,
        )
        .figure("flood streams refused", capped.flood_refused as f64, 0))
}

async fn run(rate: u64, seconds: u64, payload: usize, flood: Option<bool>) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let auth_path = dir.path().join("auth.toml");
    std::fs::write(&auth_path, auth_file(flood.unwrap_or(true)))?;
    let auth = evmesh_node::auth::Auth::load(&auth_path)?;
    let node = Node::start_with_auth(auth)?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    if flood.is_some() {
        for _ in 0..FLOOD_PUBLISHERS {
            let (stop, acked, refused, addr) =
                (stop.clone(), acked.clone(), refused.clone(), node.addr);
            flooders.push(tokio::spawn(async move {
                flood_publishes(addr, payload, &stop, &acked, &refused).await
            }));
        }
        for _ in 0..FLOOD_CHURNERS {
            let (stop, refused, addr) = (stop.clone(), refused.clone(), node.addr);
            flooders.push(tokio::spawn(
                async move { churn(addr, &stop, &refused).await },
            ));
        }
    }
    let began = Instant::now();
    let mut latencies = open_loop_publish_as(
        node.addr,
        Some(CALM),
        "bench.calm.tick",
        rate,
        rate * seconds,
        payload,
        began,
    )
    .await?;
    let elapsed = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await??;
    }
    drop(node);
    latencies.sort_unstable();
    anyhow::ensure!(
        latencies.len() as u64 == rate * seconds,
        "the well-behaved publisher got {} of {} acks",
        latencies.len(),
        rate * seconds
    );
    Ok(Run {
        p99_ms: quantile_ms(&latencies, 0.99),
        flood_acked: acked.load(Ordering::Relaxed),
        flood_refused: refused.load(Ordering::Relaxed),
        seconds: elapsed,
    })
}

/// Publishes as fast as the node takes them, on streams it opens again whenever
/// one is refused or ends, each held for a while and dropped.
async fn flood_publishes(
    addr: SocketAddr,
    payload: usize,
    stop: &AtomicBool,
    acked: &AtomicU64,
    refused: &AtomicU64,
) -> anyhow::Result<()> {
    let mut client = MeshClient::new(connect_as(addr, Some(FLOOD)).await?);
    while !stop.load(Ordering::Relaxed) {
        let (tx, rx) = mpsc::channel(1024);
        let mut acks = match client.publish(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                refused.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                continue;
            }
        };
        let sender = tokio::spawn(async move {
            for _ in 0..2_000 {
                let e = event("bench.flood.burst", payload, Vec::new());
                if tx
                    .send(pb::PublishRequest { event: Some(e) })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        while let Ok(Some(_)) = acks.message().await {
            acked.fetch_add(1, Ordering::Relaxed);
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        sender.abort();
    }
    Ok(())
}

/// Opens subscribe and publish streams and drops them at once, as fast as it can.
async fn churn(addr: SocketAddr, stop: &AtomicBool, refused: &AtomicU64) -> anyhow::Result<()> {
    let mut client = MeshClient::new(connect_as(addr, Some(FLOOD)).await?);
    while !stop.load(Ordering::Relaxed) {
        let (tx, rx) = mpsc::channel(1);
        let open = pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                patterns: vec!["bench.flood.>".into()],
                ..Default::default()
            })),
        };
        let _ = tx.send(open).await;
        match client.subscribe(ReceiverStream::new(rx)).await {
            Ok(mut s) => {
                if s.get_mut().message().await.is_err() {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (_tx, rx) = mpsc::channel::<pb::PublishRequest>(1);
        if client.publish(ReceiverStream::new(rx)).await.is_err() {
            refused.fetch_add(1, Ordering::Relaxed);
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}
