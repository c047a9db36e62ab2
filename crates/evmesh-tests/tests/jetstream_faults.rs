//! A node on JetStream when the servers fail: NATS lost and back while the node
//! runs; a 3-server cluster (`sync_interval: always`, replicas 3) whose stream
//! leader is killed with SIGKILL during a streamed publish, and whose groups
//! bucket's leader is killed during consumption. Every server is a real
//! nats-server, stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evmesh_store::jetstream::{EVENTS_STREAM, GROUPS_BUCKET, JetStreamConfig, JetStreamLog};
use evmesh_tests::v1 as pb;
use evmesh_tests::*;
use tonic_health::pb::health_check_response::ServingStatus;

fn event(i: usize, aggregates: usize) -> pb::Event {
    pb::Event {
        id: format!("e-{i}"),
        aggregate_id: format!("a-{}", i % aggregates),
        ..evmesh_tests::event("shop.order.placed")
    }
}

async fn health(node: &TestNode) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(node.url())
        .ok()?
        .connect()
        .await
        .ok()?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "evmesh.v1.Mesh".into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Every event the stream holds, read with the backend's own log.
async fn stored(config: &JetStreamConfig) -> Vec<(u64, String)> {
    // A cluster that has just lost a server may take a while to answer (its meta
    // leader elected again), and one attempt may wait out its request timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let log = loop {
        match JetStreamLog::connect(config).await {
            Ok(log) => break log,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cluster did not answer: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut events = Vec::new();
    let mut from = 1;
    loop {
        let batch = log.read_from(from, 1000).await.expect("read the stream");
        let Some(last) = batch.last() else {
            return events;
        };
        from = last.sequence + 1;
        events.extend(batch.iter().map(|e| (e.sequence, e.event.id.clone())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_lost_while_running_fails_publishes_and_recovers() {
    let mut server = NatsServer::start().await;
    let mut config = JetStreamConfig::new(vec![server.url()]);
    config.publish_retry_for = Duration::from_secs(2);
    let node = TestNode::on_jetstream(config.clone()).await;
    let mut client = node.client().await;
    let before = publish(&mut client, event(0, 1)).await;
    assert_eq!(health(&node).await, Some(ServingStatus::Serving));

    server.kill();
    // Publishes fail with UNAVAILABLE, never a false ack; health says so.
    let refused = eventually("a refused publish", || {
        let mut client = client.clone();
        async move {
            client
                .publish_event(pb::PublishRequest {
                    event: Some(event(1, 1)),
                })
                .await
                .err()
        }
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    eventually("health NOT_SERVING", || async {
        (health(&node).await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;

    // NATS returns: the node recovers by itself.
    server.restart().await;
    eventually("health SERVING again", || async {
        (health(&node).await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let after = eventually("a publish after NATS returned", || {
        let mut client = client.clone();
        async move {
            let response = client
                .publish_event(pb::PublishRequest {
                    event: Some(event(2, 1)),
                })
                .await
                .ok()?;
            match response.into_inner().result {
                Some(pb::publish_response::Result::Ack(ack)) => Some(ack),
                _ => None,
            }
        }
    })
    .await;
    assert!(after.sequence > before.sequence);
    let held = stored(&config).await;
    assert!(held.contains(&(before.sequence, "e-0".into())), "{held:?}");
    assert!(held.contains(&(after.sequence, "e-2".into())), "{held:?}");
    drop(node);
}

/// The cluster and a node over it, everything it creates with three replicas.
async fn cluster_and_node() -> (NatsCluster, JetStreamConfig, TestNode) {
    let cluster = NatsCluster::start(3, Sync::Always).await;
    let mut config = JetStreamConfig::new(cluster.urls());
    config.replicas = 3;
    let node = TestNode::on_jetstream(config.clone()).await;
    (cluster, config, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_during_a_streamed_publish_loses_and_doubles_nothing() {
    const EVENTS: usize = 4_000;
    let (mut cluster, config, node) = cluster_and_node().await;
    let leader = cluster.leader_of(EVENTS_STREAM).await;
    let mut client = node.client().await;

    // One stream, paced so that the kill lands in the middle of it.
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let publishing = tokio::spawn(async move {
        for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(40) {
            for &i in chunk {
                tx.send(pb::PublishRequest {
                    event: Some(event(i, 16)),
                })
                .await
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut responses = client
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("publish stream")
        .into_inner();
    let started = Instant::now();
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut refused: Vec<String> = Vec::new();
    let mut killed = false;
    let mut restarted = false;
    while let Some(response) = tokio::time::timeout(Duration::from_secs(60), responses.message())
        .await
        .expect("publish responses keep coming")
        .expect("the publish stream stays up")
    {
        match response.result {
            Some(pb::publish_response::Result::Ack(ack)) => {
                assert!(
                    acked.insert(ack.event_id.clone(), ack.sequence).is_none(),
                    "{} acked twice",
                    ack.event_id
                );
            }
            Some(pb::publish_response::Result::Rejection(rejection)) => {
                assert_eq!(
                    rejection.code,
                    tonic::Code::Unavailable as i32,
                    "{rejection:?}"
                );
                refused.push(rejection.event_id);
            }
            None => panic!("an empty publish response"),
        }
        if !killed && acked.len() >= EVENTS / 4 {
            cluster.servers[leader].kill();
            killed = true;
        }
        if killed && !restarted && started.elapsed() > Duration::from_secs(3) {
            cluster.servers[leader].restart().await;
            restarted = true;
        }
    }
    publishing.await.unwrap();
    assert!(killed, "the leader was killed mid-stream");
    if !restarted {
        cluster.servers[leader].restart().await;
    }
    // What was refused is published again with the same id, as a client would.
    for id in refused {
        let i: usize = id.trim_start_matches("e-").parse().unwrap();
        let ack = eventually("a republished event acked", || {
            let mut client = client.clone();
            async move {
                match client
                    .publish_event(pb::PublishRequest {
                        event: Some(event(i, 16)),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .result
                {
                    Some(pb::publish_response::Result::Ack(ack)) => Some(ack),
                    _ => None,
                }
            }
        })
        .await;
        assert!(acked.insert(id, ack.sequence).is_none());
    }
    assert_eq!(acked.len(), EVENTS, "every event acked in the end");

    // Read through the servers that stayed up: the restarted one may still be
    // recovering its store, and a client that lands on it waits.
    let mut reading = config.clone();
    reading.servers = (0..cluster.servers.len())
        .filter(|i| *i != leader)
        .map(|i| cluster.servers[i].url())
        .collect();
    let held = stored(&reading).await;
    let mut ids = HashSet::new();
    for (_, id) in &held {
        assert!(ids.insert(id.clone()), "{id} stored twice");
    }
    let at: HashMap<u64, String> = held.into_iter().collect();
    for (id, sequence) in &acked {
        assert_eq!(
            at.get(sequence),
            Some(id),
            "{id} was acked at sequence {sequence}"
        );
    }
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_leader_killed_during_consumption_keeps_order_and_loses_nothing() {
    const EVENTS: usize = 1_500;
    const AGGREGATES: usize = 12;
    let (mut cluster, _config, node) = cluster_and_node().await;
    let mut client = node.client().await;
    let mut by_aggregate: HashMap<String, Vec<u64>> = HashMap::new();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(500) {
        let events = chunk.iter().map(|&i| event(i, AGGREGATES)).collect();
        for (r, &i) in publish_stream(&mut client, events).await.iter().zip(chunk) {
            by_aggregate
                .entry(format!("a-{}", i % AGGREGATES))
                .or_default()
                .push(ack_of(r).sequence);
        }
    }
    let aggregate_of: HashMap<u64, String> = by_aggregate
        .iter()
        .flat_map(|(a, seqs)| seqs.iter().map(move |s| (*s, a.clone())))
        .collect();
    let by_aggregate = Arc::new(by_aggregate);
    let aggregate_of = Arc::new(aggregate_of);
    let acked = Arc::new(Mutex::new(HashSet::<u64>::new()));
    let broken = Arc::new(Mutex::new(Vec::<String>::new()));

    let mut members = Vec::new();
    for _ in 0..2 {
        let mut sub = Sub::open(
            &mut client,
            pb::SubscribeOpen {
                group: "fulfilment".into(),
                max_in_flight: 8,
                ack_timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..open(&["shop.order.placed"])
            },
        )
        .await
        .expect("subscribe");
        let (by_aggregate, aggregate_of, acked, broken) = (
            by_aggregate.clone(),
            aggregate_of.clone(),
            acked.clone(),
            broken.clone(),
        );
        members.push(tokio::spawn(async move {
            while acked.lock().unwrap().len() < EVENTS {
                let Some(d) = sub.try_next(Duration::from_millis(200)).await else {
                    continue;
                };
                let aggregate = &aggregate_of[&d.sequence];
                {
                    let mut acked = acked.lock().unwrap();
                    // Every earlier event of its aggregate was acked first.
                    for earlier in by_aggregate[aggregate]
                        .iter()
                        .take_while(|&&s| s < d.sequence)
                    {
                        if !acked.contains(earlier) {
                            broken.lock().unwrap().push(format!(
                                "{} delivered before {earlier} of {aggregate} was acked",
                                d.sequence
                            ));
                        }
                    }
                    acked.insert(d.sequence);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                sub.ack(&[d.sequence]).await;
            }
        }));
    }

    let groups_stream = format!("KV_{GROUPS_BUCKET}");
    eventually("a quarter consumed", || async {
        (acked.lock().unwrap().len() >= EVENTS / 4).then_some(())
    })
    .await;
    let leader = cluster.leader_of(&groups_stream).await;
    cluster.servers[leader].kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.servers[leader].restart().await;

    let deadline = Instant::now() + Duration::from_secs(90);
    while acked.lock().unwrap().len() < EVENTS {
        assert!(
            Instant::now() < deadline,
            "{} of {EVENTS} events acked",
            acked.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for member in members {
        member.await.unwrap();
    }
    let broken = broken.lock().unwrap();
    assert!(broken.is_empty(), "per-aggregate order broken: {broken:?}");
    drop(node);
}
