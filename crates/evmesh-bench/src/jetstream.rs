//! The peer: NATS JetStream, driven directly with async-nats, on the same servers
//! and settings as a node on the JetStream backend: one server or a cluster of
//! three, `sync_interval` as asked, a stream of as many replicas. Async publishes
//! with acks, [`WINDOW`] in flight per connection, as evmesh's publishers keep; and
//! publish-to-delivery latency through an ordered consumer, open loop, timed as the
//! evmesh latency scenario times it.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use evmesh_testkit::{NatsCluster, Sync};
use tokio::sync::{Semaphore, mpsc};

use crate::load::WINDOW;

/// What each published message is like.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Every message on one subject, no headers: JetStream at its fastest.
    Plain,
    /// One subject, with a `Nats-Msg-Id` each: JetStream's duplicate check within
    /// its window, and no more.
    MsgId,
    /// As the JetStream backend publishes an event: a subject of its own
    /// (`….<correlation>.<partition>.<type>.<id>`) and an expected last subject
    /// sequence of 0 (idempotency for the whole retention). The server's side of
    /// evmesh's guarantees, without the node.
    AsEvmesh,
}

/// Where the nats-servers of a run are, and how they store.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nats {
    pub sync: Sync,
    /// Replicas of every stream: 1 runs one server, 3 a cluster of three.
    pub replicas: usize,
}

impl Nats {
    /// Starts the servers: one, or a cluster of three.
    pub async fn start(self) -> NatsCluster {
        NatsCluster::start(if self.replicas > 1 { 3 } else { 1 }, self.sync).await
    }

    pub fn label(self) -> String {
        format!(
            "R{}, sync {}",
            self.replicas,
            match self.sync {
                Sync::Always => "always",
                Sync::Default => "default",
            }
        )
    }
}

/// JetStream driven directly over `cluster`.
pub struct Direct<'a> {
    pub cluster: &'a NatsCluster,
    pub nats: Nats,
}

impl Direct<'_> {
    async fn context(&self) -> anyhow::Result<jetstream::Context> {
        let client = async_nats::connect(self.cluster.urls()).await?;
        // A full window of every connection waits behind one another's fsyncs with
        // `sync_interval: always`: longer than async-nats's 5 s default.
        Ok(jetstream::context::ContextBuilder::new()
            .max_ack_inflight(WINDOW)
            .timeout(Duration::from_secs(60))
            .build(client))
    }

    async fn stream(&self, name: &str, subjects: &str) -> anyhow::Result<jetstream::Context> {
        let admin = self.context().await?;
        let _ = admin.delete_stream(name).await;
        admin
            .create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.nats.replicas,
                ..Default::default()
            })
            .await
            .context("creating the JetStream stream")?;
        Ok(admin)
    }

    /// `streams` connections publishing `warm` messages of `payload` bytes in all to
    /// a fresh stream, untimed, then `n` more to the same stream; returns how many
    /// of those were acked and how long they took. The timed run finds the stream
    /// as a node's timed run finds its own: holding the warm-up's messages.
    pub async fn publish(
        &self,
        streams: u64,
        warm: u64,
        n: u64,
        payload: usize,
        shape: Shape,
    ) -> anyhow::Result<(u64, Duration)> {
        let name = format!("BENCH{streams}");
        let admin = self.stream(&name, &format!("bench{streams}.>")).await?;
        let mut contexts = Vec::new();
        for _ in 0..streams {
            contexts.push(self.context().await?);
        }
        let subject = format!("bench{streams}.order.placed");
        let run = |n: u64| {
            let per = n / streams;
            let tasks: Vec<_> = contexts
                .iter()
                .map(|js| tokio::spawn(publisher(js.clone(), subject.clone(), per, payload, shape)))
                .collect();
            async move {
                let mut acked = 0;
                for t in tasks {
                    acked += t.await??;
                }
                anyhow::Ok(acked)
            }
        };
        run(warm).await?;
        let start = Instant::now();
        let acked = run(n).await?;
        let elapsed = start.elapsed();
        admin.delete_stream(&name).await?;
        Ok((acked, elapsed))
    }

    /// Open loop at `rate` for `total` messages: each is due at base + k/rate and is
    /// timed from then until an ordered consumer receives it. Returns the delivery
    /// and the ack latencies, in nanoseconds.
    pub async fn latency(
        &self,
        rate: u64,
        total: u64,
        payload: usize,
    ) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
        use futures_util::StreamExt as _;
        let admin = self.stream("BENCHLAT", "benchlat.>").await?;
        let stream = admin.get_stream("BENCHLAT").await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let base = Instant::now();
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total as usize);
            while (latencies.len() as u64) < total {
                let Some(Ok(m)) = messages.next().await else {
                    break;
                };
                let now = base.elapsed().as_nanos() as u64;
                let due: u64 = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("due-ns"))
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(0);
                latencies.push(now.saturating_sub(due));
            }
            latencies
        });
        let js = self.context().await?;
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let (acks_tx, mut acks_rx) =
            mpsc::channel::<(u64, jetstream::context::PublishAckFuture)>(WINDOW);
        let acked = tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Some((due, ack)) = acks_rx.recv().await {
                ack.await.context("JetStream publish ack")?;
                latencies.push((base.elapsed().as_nanos() as u64).saturating_sub(due));
            }
            anyhow::Ok(latencies)
        });
        let body = vec![0xab_u8; payload];
        for k in 0..total {
            let due = interval * k as u32;
            tokio::time::sleep_until((base + due).into()).await;
            let due_ns = due.as_nanos() as u64;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("due-ns", due_ns.to_string().as_str());
            let ack = js
                .publish_with_headers("benchlat.tick", headers, body.clone().into())
                .await
                .context("JetStream publish")?;
            if acks_tx.send((due_ns, ack)).await.is_err() {
                break;
            }
        }
        drop(acks_tx);
        let acks = acked.await??;
        let deliveries = tokio::time::timeout(Duration::from_secs(60), receiver)
            .await
            .context("deliveries did not all arrive")??;
        admin.delete_stream("BENCHLAT").await?;
        Ok((deliveries, acks))
    }
}

/// One connection's publishes: the sender keeps at most [`WINDOW`] unacked, the
/// receiver awaits the acks in order.
async fn publisher(
    js: jetstream::Context,
    subject: String,
    n: u64,
    payload: usize,
    shape: Shape,
) -> anyhow::Result<u64> {
    let body = vec![0xab_u8; payload];
    let credits = std::sync::Arc::new(Semaphore::new(WINDOW));
    let (tx, mut rx) = mpsc::channel::<jetstream::context::PublishAckFuture>(WINDOW);
    let acks = {
        let credits = credits.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            while let Some(ack) = rx.recv().await {
                if let Err(e) = ack.await {
                    // The sender waits for credit: end it too.
                    credits.close();
                    return Err(e).context("JetStream publish ack");
                }
                acked += 1;
                credits.add_permits(1);
            }
            anyhow::Ok(acked)
        })
    };
    for _ in 0..n {
        let Ok(permit) = credits.acquire().await else {
            break;
        };
        permit.forget();
        let ack = match shape {
            Shape::Plain => js.publish(subject.clone(), body.clone().into()).await,
            Shape::MsgId => {
                let id = uuid::Uuid::now_v7().simple().to_string();
                let publish = jetstream::message::PublishMessage::build()
                    .payload(body.clone().into())
                    .message_id(&id);
                js.send_publish(subject.clone(), publish).await
            }
            Shape::AsEvmesh => {
                let id = uuid::Uuid::now_v7().simple().to_string();
                let publish = jetstream::message::PublishMessage::build()
                    .payload(body.clone().into())
                    .expected_last_subject_sequence(0);
                // One workflow per event, as the bench's evmesh publishes.
                let subject = format!("{subject}.{id}.{}.order.placed.{id}", &id[..1]);
                js.send_publish(subject, publish).await
            }
        }
        .context("JetStream publish")?;
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    drop(tx);
    acks.await?
}
