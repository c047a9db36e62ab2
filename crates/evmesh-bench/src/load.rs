//! The load: events, closed-loop streaming publishers, open-loop publishers and
//! subscribers that time each delivery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use evmesh_proto::v1 as pb;
use evmesh_proto::v1::mesh_client::MeshClient;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::node::connect;

/// Unacked events one streaming publisher keeps in flight, here and for JetStream.
pub const WINDOW: usize = 4096;

/// An event whose payload is a `bench.v1.Payload` of `payload` bytes in all.
pub fn event(ty: &str, payload: usize, headers: Vec<(String, String)>) -> pb::Event {
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

/// `streams` streaming publishers of `n` events in all, each with at most [`WINDOW`]
/// unacked; returns how many were acked and how long it took.
pub async fn publish_streams(
    addr: SocketAddr,
    ty: &'static str,
    streams: u64,
    n: u64,
    payload: usize,
) -> anyhow::Result<(u64, Duration)> {
    let mut clients = Vec::new();
    for _ in 0..streams {
        clients.push(MeshClient::new(connect(addr).await?));
    }
    let start = Instant::now();
    let per = n / streams;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(stream_publisher(client, ty, per, payload)))
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    Ok((acked, start.elapsed()))
}

/// One streaming publisher with at most [`WINDOW`] unacked events; returns how many
/// were acked.
async fn stream_publisher(
    mut client: MeshClient<Channel>,
    ty: &'static str,
    n: u64,
    payload: usize,
) -> anyhow::Result<u64> {
    let (tx, rx) = mpsc::channel(WINDOW);
    let credits = Arc::new(Semaphore::new(WINDOW));
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

/// A subscription, open once the node has answered: the sender of its requests (the
/// subscription ends when it is dropped) and the stream of its responses.
pub async fn subscribe(
    addr: SocketAddr,
    open: pb::SubscribeOpen,
) -> anyhow::Result<(
    mpsc::Sender<pb::SubscribeRequest>,
    tonic::Streaming<pb::SubscribeResponse>,
)> {
    let mut client = MeshClient::new(connect(addr).await?);
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(open)),
    })
    .await?;
    let mut stream = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?; // subscribed
    Ok((tx, stream))
}

/// An ephemeral auto-ack subscriber of `pattern` that records, for `total`
/// deliveries, how long after its due time (header `due-ns`, from `base`) each came.
pub async fn latency_subscriber(
    addr: SocketAddr,
    pattern: &str,
    total: u64,
    base: Instant,
) -> anyhow::Result<tokio::task::JoinHandle<Vec<u64>>> {
    latency_member(addr, "", pattern, total, base).await
}

/// As [`latency_subscriber`], a member of the durable group `group` (ephemeral
/// when empty).
pub async fn latency_member(
    addr: SocketAddr,
    group: &str,
    pattern: &str,
    total: u64,
    base: Instant,
) -> anyhow::Result<tokio::task::JoinHandle<Vec<u64>>> {
    let (tx, mut stream) = subscribe(
        addr,
        pb::SubscribeOpen {
            patterns: vec![pattern.to_owned()],
            group: group.to_owned(),
            auto_ack: true,
            max_in_flight: 10_000,
            ..Default::default()
        },
    )
    .await?;
    Ok(tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total as usize);
        while (latencies.len() as u64) < total {
            let Ok(Some(m)) = stream.message().await else {
                break;
            };
            let Some(pb::subscribe_response::Response::Delivery(d)) = m.response else {
                continue;
            };
            let now = base.elapsed().as_nanos() as u64;
            let due: u64 = d
                .event
                .as_ref()
                .and_then(|e| e.headers.get("due-ns"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            latencies.push(now.saturating_sub(due));
        }
        drop(tx);
        latencies
    }))
}

/// Open loop: event k of `ty` is due at base + k/rate whatever the node does, and
/// latency counts from when it was due, so a node that falls behind cannot hide it.
/// Returns each event's due-to-ack latency.
pub async fn open_loop_publish(
    addr: SocketAddr,
    ty: &str,
    rate: u64,
    total: u64,
    payload: usize,
    base: Instant,
) -> anyhow::Result<Vec<u64>> {
    open_loop_publish_as(addr, None, ty, rate, total, payload, base).await
}

/// [`open_loop_publish`] with a token on the stream.
pub async fn open_loop_publish_as(
    addr: SocketAddr,
    token: Option<&str>,
    ty: &str,
    rate: u64,
    total: u64,
    payload: usize,
    base: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut client = MeshClient::new(crate::node::connect_as(addr, token).await?);
    let (tx, rx) = mpsc::channel(65_536);
    let mut acks = client.publish(ReceiverStream::new(rx)).await?.into_inner();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let acked = tokio::spawn(async move {
        let mut latencies = Vec::new();
        let mut k = 0u32;
        while let Ok(Some(_)) = acks.message().await {
            latencies.push(base.elapsed().saturating_sub(interval * k).as_nanos() as u64);
            k += 1;
        }
        latencies
    });
    // Paced by a thread of its own: the OS sleeps to within tens of microseconds,
    // where tokio's timer wakes on whole milliseconds and would send in bursts.
    let ty = ty.to_owned();
    tokio::task::spawn_blocking(move || {
        for k in 0..total {
            let due = interval * u32::try_from(k).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_sub(base.elapsed()) {
                std::thread::sleep(wait);
            }
            let e = event(
                &ty,
                payload,
                vec![("due-ns".into(), due.as_nanos().to_string())],
            );
            if tx
                .blocking_send(pb::PublishRequest { event: Some(e) })
                .is_err()
            {
                break;
            }
        }
    })
    .await?;
    Ok(acked.await?)
}

/// The `p` quantile of sorted nanoseconds, in milliseconds.
pub fn quantile_ms(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(i).copied().unwrap_or(0) as f64 / 1e6
}
