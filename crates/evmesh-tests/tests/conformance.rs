//! The conformance suite: what every storage backend must do, over real gRPC to a
//! real node. Each test is a function of the backend; `suite!` instantiates all of
//! them for each backend: the embedded SQLite log, and JetStream (a nats-server of
//! the node's own).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evmesh_tests::v1 as pb;
use evmesh_tests::*;

macro_rules! suite {
    ([$($module:ident => $backend:expr),* $(,)?], $tests:tt) => {
        $(suite!(@one $module, $backend, $tests);)*
    };
    (@one $module:ident, $backend:expr, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($backend).await;
                }
            )*
        }
    };
}

suite!(
    [
        sqlite => evmesh_tests::Backend::Sqlite,
        jetstream => evmesh_tests::Backend::JetStream,
    ],
    [
        round_trip,
        acked_events_survive_restart,
        duplicates_by_id,
        duplicate_inside_a_large_batch,
        rejected_event_keeps_stream_alive,
        node_fills_id_time_and_correlation,
        group_resumes_after_restart,
        competing_members_split_events,
        redelivery_after_nack,
        redelivery_after_ack_timeout,
        redelivery_after_disconnect,
        dead_letter_and_redrive,
        purge_dead_letters,
        per_aggregate_order,
        patterns_select_types,
        version_requirement_filters,
        chain_in_order_with_causation,
        seek_group,
        lag_counts_what_the_group_selects,
        start_positions,
        patterns_of_live_group_are_fixed,
        bounded_in_flight,
        graceful_stop_ends_open_streams,
        one_stream_keeps_its_order,
    ]
);

async fn round_trip(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut open = open(&["shop.order.placed"]);
    open.start = None; // latest
    let mut sub = Sub::open(&mut client, open).await.unwrap();
    let mut sent = event_with_id("shop.order.placed", "o-1");
    sent.headers
        .insert("traceparent".into(), "00-abc-def-01".into());
    sent.aggregate_id = "order-1".into();
    let ack = publish(&mut client, sent.clone()).await;
    assert_eq!(ack.sequence, 1);
    assert!(!ack.duplicate);
    let d = sub.next().await;
    assert_eq!(d.sequence, 1);
    assert_eq!(d.attempt, 1);
    let got = d.event.unwrap();
    assert_eq!(got.id, "o-1");
    assert_eq!(got.headers, sent.headers);
    assert_eq!(got.payload, sent.payload);
    assert_eq!(got.aggregate_id, "order-1");
}

async fn acked_events_survive_restart(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let events: Vec<_> = (0..500)
        .map(|i| event_with_id("shop.order.placed", &format!("e-{i}")))
        .collect();
    let responses = publish_stream(&mut client, events).await;
    let acked: Vec<(String, u64)> = responses
        .iter()
        .map(ack_of)
        .map(|a| (a.event_id.clone(), a.sequence))
        .collect();
    assert_eq!(
        acked.iter().map(|a| a.1).collect::<Vec<_>>(),
        (1..=500).collect::<Vec<_>>()
    );

    let node = node.restart().await;
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, open(&[">"])).await.unwrap();
    for (id, seq) in &acked {
        let d = sub.next().await;
        sub.ack(&[d.sequence]).await;
        assert_eq!((&d.event.unwrap().id, d.sequence), (id, *seq));
    }
    // And the log goes on after the last one.
    let ack = publish(&mut client, event("shop.order.placed")).await;
    assert_eq!(ack.sequence, 501);
}

async fn duplicates_by_id(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let first = publish(&mut client, event_with_id("shop.order.placed", "dup-1")).await;
    let again = publish(&mut client, event_with_id("shop.order.placed", "dup-1")).await;
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(first.sequence, again.sequence);
    // Within one stream, and within one batch.
    let responses = publish_stream(
        &mut client,
        vec![
            event_with_id("shop.order.placed", "dup-2"),
            event_with_id("shop.order.placed", "dup-2"),
            event_with_id("shop.order.placed", "dup-1"),
        ],
    )
    .await;
    let acks: Vec<_> = responses.iter().map(ack_of).collect();
    assert!(!acks[0].duplicate);
    assert!(acks[1].duplicate);
    assert_eq!(acks[0].sequence, acks[1].sequence);
    assert!(acks[2].duplicate);
    assert_eq!(acks[2].sequence, first.sequence);
    // Only two events are in the log.
    let mut sub = Sub::open(&mut client, open(&[">"])).await.unwrap();
    let ids: Vec<_> = sub
        .take_acked(2)
        .await
        .into_iter()
        .map(|d| d.event.unwrap().id)
        .collect();
    assert_eq!(ids, ["dup-1", "dup-2"]);
    assert!(sub.try_next(Duration::from_millis(200)).await.is_none());
}

/// The store numbers fresh events itself and takes a slower path for a batch that
/// holds a known id: the sequences stay dense around the duplicate and after it.
async fn duplicate_inside_a_large_batch(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let first = publish(&mut client, event_with_id("shop.order.placed", "big-0")).await;
    let events: Vec<_> = (1..1500)
        .map(|i| {
            let id = if i == 700 {
                "big-0".to_owned()
            } else {
                format!("big-{i}")
            };
            event_with_id("shop.order.placed", &id)
        })
        .collect();
    let responses = publish_stream(&mut client, events).await;
    let acks: Vec<_> = responses.iter().map(ack_of).collect();
    let mut expected = first.sequence;
    for (i, ack) in (1..).zip(&acks) {
        if i == 700 {
            assert!(ack.duplicate, "{ack:?}");
            assert_eq!(ack.sequence, first.sequence);
        } else {
            expected += 1;
            assert!(!ack.duplicate, "{ack:?}");
            assert_eq!(ack.sequence, expected, "event {i}");
        }
    }
    let next = publish(&mut client, event("shop.order.placed")).await;
    assert_eq!(next.sequence, expected + 1);
    // The log holds each event once, in order, and survives a restart.
    let node = node.restart().await;
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, open(&[">"])).await.unwrap();
    let got = sub.take_acked(1500).await;
    let sequences: Vec<u64> = got.iter().map(|d| d.sequence).collect();
    let dense: Vec<u64> = (first.sequence..=expected + 1).collect();
    assert_eq!(sequences, dense);
}

async fn rejected_event_keeps_stream_alive(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut big = event("shop.order.placed");
    big.payload.as_mut().unwrap().value = vec![0; 1024 * 1024 + 1];
    let responses = publish_stream(
        &mut client,
        vec![
            event("shop.order.placed"),
            event("Shop.Order"),
            big,
            event("shop.order.placed"),
        ],
    )
    .await;
    assert_eq!(ack_of(&responses[0]).sequence, 1);
    let rejection = |r: &pb::PublishResponse| match &r.result {
        Some(pb::publish_response::Result::Rejection(x)) => x.clone(),
        other => panic!("expected a rejection, got {other:?}"),
    };
    let bad_type = rejection(&responses[1]);
    assert_eq!(bad_type.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(bad_type.violations[0].path, "event.type");
    assert!(
        bad_type.message.contains("event.type"),
        "{}",
        bad_type.message
    );
    let too_big = rejection(&responses[2]);
    assert_eq!(too_big.code, tonic::Code::ResourceExhausted as i32);
    assert_eq!(too_big.violations[0].path, "event.payload");
    assert_eq!(ack_of(&responses[3]).sequence, 2);
}

async fn node_fills_id_time_and_correlation(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let ack = publish(&mut client, event("shop.order.placed")).await;
    let id = uuid::Uuid::parse_str(&ack.event_id).expect("a uuid");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(ack.correlation_id, ack.event_id);
    let chain = client
        .get_chain(pb::GetChainRequest {
            correlation_id: ack.event_id.clone(),
            limit: 0,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let stored = chain.events[0].event.clone().unwrap();
    assert!(stored.occurred_at.is_some());
    assert_eq!(stored.correlation_id, ack.event_id);
}

fn grouped(patterns: &[&str], group: &str) -> pb::SubscribeOpen {
    pb::SubscribeOpen {
        group: group.into(),
        ..open(patterns)
    }
}

async fn group_resumes_after_restart(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    for i in 0..10 {
        publish(
            &mut client,
            event_with_id("shop.order.placed", &format!("g-{i}")),
        )
        .await;
    }
    let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "billing"))
        .await
        .unwrap();
    assert!(sub.subscribed.created);
    let first: Vec<_> = sub.take_acked(5).await;
    assert_eq!(
        first.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    eventually("acks settle", || {
        let mut client = client.clone();
        async move { (group_info(&mut client, "billing").await.ack_floor == 5).then_some(()) }
    })
    .await;
    drop(sub);

    let node = node.restart().await;
    let mut client = node.client().await;
    let info = group_info(&mut client, "billing").await;
    assert_eq!(info.ack_floor, 5);
    assert_eq!(info.lag, 5);
    let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "billing"))
        .await
        .unwrap();
    assert!(!sub.subscribed.created);
    let rest: Vec<_> = sub.take_acked(5).await;
    assert_eq!(
        rest.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
    assert!(sub.try_next(Duration::from_millis(200)).await.is_none());
}

async fn competing_members_split_events(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut open_a = grouped(&["work.>"], "workers");
    open_a.max_in_flight = 4;
    let a = Sub::open(&mut client, open_a.clone()).await.unwrap();
    let b = Sub::open(&mut client, open_a).await.unwrap();
    let events: Vec<_> = (0..200)
        .map(|i| event_with_id("work.item", &format!("w-{i}")))
        .collect();
    publish_stream(&mut client, events).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Each member takes events until all 200 are seen, and stays subscribed until
    // both are done, so that nothing it holds is redelivered to the other.
    let run = |mut sub: Sub, seen: Arc<Mutex<Vec<u64>>>| async move {
        let mut mine = 0;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while seen.lock().unwrap().len() < 200 && tokio::time::Instant::now() < deadline {
            if let Some(d) = sub.try_next(Duration::from_millis(50)).await {
                seen.lock().unwrap().push(d.sequence);
                sub.ack(&[d.sequence]).await;
                mine += 1;
            }
        }
        (mine, sub)
    };
    let ((na, _a), (nb, _b)) = tokio::join!(run(a, seen.clone()), run(b, seen.clone()));
    let seen = seen.lock().unwrap().clone();
    let unique: BTreeSet<_> = seen.iter().copied().collect();
    assert_eq!(seen.len(), 200, "each event delivered once");
    assert_eq!(unique, (1..=200).collect());
    assert!(
        na > 20 && nb > 20,
        "both members get a share: {na} and {nb}"
    );
}

async fn redelivery_after_nack(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "retry"))
        .await
        .unwrap();
    publish(&mut client, event("shop.order.placed")).await;
    let d1 = sub.next().await;
    assert_eq!(d1.attempt, 1);
    sub.nack(&[d1.sequence], Duration::ZERO, "try again").await;
    let d2 = sub.next().await;
    assert_eq!((d2.sequence, d2.attempt), (d1.sequence, 2));
    // With a delay, not before it.
    sub.nack(&[d2.sequence], Duration::from_millis(400), "later")
        .await;
    assert!(sub.try_next(Duration::from_millis(200)).await.is_none());
    let d3 = sub.next().await;
    assert_eq!((d3.sequence, d3.attempt), (d1.sequence, 3));
    sub.ack(&[d3.sequence]).await;
    assert!(sub.try_next(Duration::from_millis(300)).await.is_none());
}

async fn redelivery_after_ack_timeout(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut open = grouped(&["shop.>"], "slow");
    open.ack_timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    let mut sub = Sub::open(&mut client, open).await.unwrap();
    publish(&mut client, event("shop.order.placed")).await;
    let d1 = sub.next().await;
    let d2 = sub.next().await;
    assert_eq!((d2.sequence, d2.attempt), (d1.sequence, 2));
    sub.ack(&[d2.sequence]).await;
    assert!(sub.try_next(Duration::from_millis(500)).await.is_none());
}

async fn redelivery_after_disconnect(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut first = Sub::open(&mut client, grouped(&["shop.>"], "handover"))
        .await
        .unwrap();
    publish(&mut client, event("shop.order.placed")).await;
    let d1 = first.next().await;
    let mut second = Sub::open(&mut client, grouped(&["shop.>"], "handover"))
        .await
        .unwrap();
    drop(first);
    let d2 = second.next().await;
    assert_eq!((d2.sequence, d2.attempt), (d1.sequence, 2));
}

async fn dead_letter_and_redrive(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut open = grouped(&["shop.>"], "fragile");
    open.max_deliveries = 2;
    let mut sub = Sub::open(&mut client, open).await.unwrap();
    let poison = publish(&mut client, event_with_id("shop.order.placed", "poison")).await;
    publish(&mut client, event_with_id("shop.order.placed", "fine")).await;
    for attempt in 1..=2 {
        let d = sub.next().await;
        if d.event.as_ref().unwrap().id == "fine" {
            sub.ack(&[d.sequence]).await;
            let d = sub.next().await;
            assert_eq!(d.attempt, attempt);
            sub.nack(&[d.sequence], Duration::ZERO, "cannot parse order")
                .await;
        } else {
            assert_eq!(d.attempt, attempt);
            sub.nack(&[d.sequence], Duration::ZERO, "cannot parse order")
                .await;
        }
    }
    let letters = dead_letters_eventually(&client, "fragile").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].sequence, poison.sequence);
    assert_eq!(letters[0].attempts, 2);
    assert_eq!(letters[0].reason, "cannot parse order");
    assert_eq!(letters[0].event.as_ref().unwrap().id, "poison");
    let info = group_info(&mut client, "fragile").await;
    assert_eq!((info.dead_letters, info.ack_floor, info.lag), (1, 2, 0));
    // Not delivered again until redriven.
    let fine = sub.try_next(Duration::from_millis(200)).await;
    assert!(fine.is_none(), "{fine:?}");

    let redriven = client
        .redrive_dead_letters(pb::RedriveDeadLettersRequest {
            group: "fragile".into(),
            sequences: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven, 1);
    let d = sub.next().await;
    assert_eq!((d.sequence, d.attempt), (poison.sequence, 1));
    sub.ack(&[d.sequence]).await;
    let info = eventually("redriven event settles", || {
        let mut client = client.clone();
        async move {
            let info = group_info(&mut client, "fragile").await;
            (info.pending == 0).then_some(info)
        }
    })
    .await;
    assert_eq!(info.dead_letters, 0);
    // Settled for good: a restart does not bring it back.
    drop(sub);
    let node = node.restart().await;
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "fragile"))
        .await
        .unwrap();
    assert!(sub.try_next(Duration::from_millis(300)).await.is_none());
}

async fn purge_dead_letters(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut open = grouped(&["shop.>"], "purging");
    open.max_deliveries = 1;
    let mut sub = Sub::open(&mut client, open).await.unwrap();
    for i in 0..3 {
        publish(
            &mut client,
            event_with_id("shop.order.placed", &format!("p-{i}")),
        )
        .await;
    }
    for _ in 0..3 {
        let d = sub.next().await;
        sub.nack(&[d.sequence], Duration::ZERO, "no").await;
    }
    eventually("three dead letters", || {
        let mut client = client.clone();
        async move { (group_info(&mut client, "purging").await.dead_letters == 3).then_some(()) }
    })
    .await;
    let purged = client
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            group: "purging".into(),
            sequences: vec![2],
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 1);
    let left: Vec<u64> = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            group: "purging".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .iter()
        .map(|d| d.sequence)
        .collect();
    assert_eq!(left, [1, 3]);
    let purged = client
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            group: "purging".into(),
            sequences: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 2);
    assert_eq!(group_info(&mut client, "purging").await.dead_letters, 0);
}

async fn per_aggregate_order(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    const AGGREGATES: usize = 4;
    const PER: usize = 40;
    // Publish from several streams at once, interleaving aggregates.
    let mut publishers = Vec::new();
    for p in 0..AGGREGATES {
        let mut client = client.clone();
        publishers.push(tokio::spawn(async move {
            for chunk in 0..4 {
                let events: Vec<_> = (0..PER / 4)
                    .map(|i| {
                        let mut e = event("shop.order.updated");
                        e.aggregate_id = format!("order-{p}");
                        e.headers
                            .insert("n".into(), (chunk * (PER / 4) + i).to_string());
                        e
                    })
                    .collect();
                publish_stream(&mut client, events).await;
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Three members that ack after a varying delay; no aggregate may ever have two
    // events out at once, and each aggregate's events arrive in publish order.
    let busy = Arc::new(Mutex::new(HashSet::<String>::new()));
    let order = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
    let mut members = Vec::new();
    for m in 0..3u64 {
        let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "ordered"))
            .await
            .unwrap();
        let (busy, order) = (busy.clone(), order.clone());
        members.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            let all_seen = |order: &Mutex<HashMap<String, Vec<u64>>>| {
                order.lock().unwrap().values().map(Vec::len).sum::<usize>() >= AGGREGATES * PER
            };
            while !all_seen(&order) && tokio::time::Instant::now() < deadline {
                let Some(d) = sub.try_next(Duration::from_millis(50)).await else {
                    continue;
                };
                let e = d.event.unwrap();
                assert!(
                    busy.lock().unwrap().insert(e.aggregate_id.clone()),
                    "{} delivered while busy",
                    e.aggregate_id
                );
                order
                    .lock()
                    .unwrap()
                    .entry(e.aggregate_id.clone())
                    .or_default()
                    .push(e.headers["n"].parse().unwrap());
                tokio::time::sleep(Duration::from_millis((d.sequence * 7 + m) % 5)).await;
                busy.lock().unwrap().remove(&e.aggregate_id);
                sub.ack(&[d.sequence]).await;
            }
            // Stay subscribed until every member is done: a member that left with
            // an ack still on the wire would have that event redelivered.
            sub
        }));
    }
    let mut subs = Vec::new();
    for m in members {
        subs.push(m.await.unwrap());
    }
    let order = order.lock().unwrap();
    assert_eq!(order.len(), AGGREGATES);
    for (aggregate, seen) in order.iter() {
        assert_eq!(
            seen,
            &(0..PER as u64).collect::<Vec<_>>(),
            "order of {aggregate}"
        );
    }
}

async fn patterns_select_types(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let types = [
        "shop.order.placed",
        "shop.order.cancelled",
        "shop.payment.succeeded",
        "shop.order.placed.v2",
        "billing.invoice.sent",
    ];
    for ty in types {
        publish(&mut client, event(ty)).await;
    }
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["shop.order.*"],
            &["shop.order.placed", "shop.order.cancelled"],
        ),
        (
            &["shop.>"],
            &[
                "shop.order.placed",
                "shop.order.cancelled",
                "shop.payment.succeeded",
                "shop.order.placed.v2",
            ],
        ),
        (&["*.*.sent"], &["billing.invoice.sent"]),
        (
            &["shop.order.placed", "billing.>"],
            &["shop.order.placed", "billing.invoice.sent"],
        ),
        (&["nothing.here"], &[]),
    ];
    for (patterns, expected) in cases {
        let mut sub = Sub::open(&mut client, open(patterns)).await.unwrap();
        let got: Vec<String> = sub
            .take_acked(expected.len())
            .await
            .into_iter()
            .map(|d| d.event.unwrap().r#type)
            .collect();
        assert_eq!(&got, expected, "patterns {patterns:?}");
        let extra = sub.try_next(Duration::from_millis(200)).await;
        assert!(extra.is_none(), "patterns {patterns:?} also got {extra:?}");
    }
}

async fn version_requirement_filters(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    for v in ["1.0.0", "1.4.2", "2.0.0", ""] {
        let mut e = event("shop.order.placed");
        e.schema_version = v.into();
        publish(&mut client, e).await;
    }
    let mut sub = Sub::open(&mut client, open(&["shop.order.placed@^1"]))
        .await
        .unwrap();
    let got: Vec<String> = sub
        .take_acked(2)
        .await
        .into_iter()
        .map(|d| d.event.unwrap().schema_version)
        .collect();
    assert_eq!(got, ["1.0.0", "1.4.2"]);
    assert!(sub.try_next(Duration::from_millis(200)).await.is_none());
}

async fn chain_in_order_with_causation(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let placed = publish(&mut client, event_with_id("shop.order.placed", "c-placed")).await;
    publish(&mut client, event("unrelated.thing.happened")).await;
    let mut paid = event_with_id("shop.payment.succeeded", "c-paid");
    paid.correlation_id = placed.correlation_id.clone();
    paid.causation_id = placed.event_id.clone();
    publish(&mut client, paid).await;
    let mut shipped = event_with_id("shop.shipment.scheduled", "c-shipped");
    shipped.correlation_id = placed.correlation_id.clone();
    shipped.causation_id = "c-paid".into();
    publish(&mut client, shipped).await;
    let chain = client
        .get_chain(pb::GetChainRequest {
            correlation_id: placed.correlation_id.clone(),
            limit: 0,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let got: Vec<(u64, String, String)> = chain
        .into_iter()
        .map(|c| {
            let e = c.event.unwrap();
            (c.sequence, e.id, e.causation_id)
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "c-placed".to_owned(), String::new()),
            (3, "c-paid".to_owned(), "c-placed".to_owned()),
            (4, "c-shipped".to_owned(), "c-paid".to_owned()),
        ]
    );
    let none = client
        .get_chain(pb::GetChainRequest {
            correlation_id: "nobody".into(),
            limit: 0,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty());
}

async fn seek_group(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    for _ in 0..5 {
        publish(&mut client, event("shop.order.placed")).await;
    }
    let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "seeker"))
        .await
        .unwrap();
    sub.take_acked(5).await;
    let seek = |to: pb::start_position::Position| {
        let mut client = client.clone();
        async move {
            client
                .seek_group(pb::SeekGroupRequest {
                    group: "seeker".into(),
                    position: Some(pb::StartPosition { position: Some(to) }),
                })
                .await
                .unwrap()
                .into_inner()
                .group
                .unwrap()
        }
    };
    let info = seek(pb::start_position::Position::Sequence(3)).await;
    assert_eq!((info.ack_floor, info.lag), (2, 3));
    let again: Vec<u64> = sub.take_acked(3).await.iter().map(|d| d.sequence).collect();
    assert_eq!(again, [3, 4, 5]);
    let info = seek(pb::start_position::Position::Latest(())).await;
    assert_eq!((info.ack_floor, info.lag), (5, 0));
    let info = seek(pb::start_position::Position::Earliest(())).await;
    assert_eq!(info.ack_floor, 0);
    assert_eq!(sub.take_acked(5).await.len(), 5);
}

/// Lag is what the group's patterns select and it has not settled: with members and
/// without, after a seek, and after dead letters are redriven.
async fn lag_counts_what_the_group_selects(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    async fn publish_types(
        client: &pb::mesh_client::MeshClient<tonic::transport::Channel>,
        types: &[&str],
    ) {
        let mut client = client.clone();
        for ty in types {
            publish(&mut client, event(ty)).await;
        }
    }
    async fn info_when(
        client: &pb::mesh_client::MeshClient<tonic::transport::Channel>,
        group: &str,
        what: &str,
        done: fn(&pb::GroupInfo) -> bool,
    ) -> pb::GroupInfo {
        eventually(what, || {
            let mut client = client.clone();
            async move {
                let info = group_info(&mut client, group).await;
                done(&info).then_some(info)
            }
        })
        .await
    }
    const MINE: &str = "lag.mine.a";
    const OTHER: &str = "lag.other.x";
    // 3 of 10 selected, interleaved with others.
    publish_types(
        &client,
        &[
            OTHER, MINE, OTHER, OTHER, MINE, OTHER, OTHER, OTHER, MINE, OTHER,
        ],
    )
    .await;

    // Created and left at once: nothing settled, no member.
    let sub = Sub::open(&mut client, grouped(&["lag.mine.*"], "lagging"))
        .await
        .unwrap();
    drop(sub);
    let info = info_when(&client, "lagging", "the member leaves", |i| i.members == 0).await;
    assert_eq!((info.lag, info.pending), (3, 0), "{info:?}");

    // With a member: one acked, one delivered and not yet acked.
    let mut one_at_a_time = grouped(&["lag.mine.*"], "lagging");
    one_at_a_time.max_in_flight = 1;
    let mut sub = Sub::open(&mut client, one_at_a_time).await.unwrap();
    let first = sub.next().await;
    sub.ack(&[first.sequence]).await;
    let held = sub.next().await;
    let info = info_when(&client, "lagging", "one acked, one held", |i| {
        i.pending == 1
    })
    .await;
    assert_eq!((info.lag, info.members), (2, 1), "{info:?}");
    sub.ack(&[held.sequence]).await;
    let _third = sub.next().await;
    drop(sub);
    let info = info_when(&client, "lagging", "the member leaves", |i| i.members == 0).await;
    assert_eq!((info.lag, info.pending), (1, 0), "{info:?}");

    // More events while nobody is connected.
    publish_types(&client, &[MINE, OTHER, OTHER, MINE]).await;
    let info = group_info(&mut client, "lagging").await;
    assert_eq!((info.lag, info.head_sequence), (3, 14), "{info:?}");

    // Seeks count again from the new floor.
    let seek = |to: pb::start_position::Position| {
        let mut client = client.clone();
        async move {
            client
                .seek_group(pb::SeekGroupRequest {
                    group: "lagging".into(),
                    position: Some(pb::StartPosition { position: Some(to) }),
                })
                .await
                .unwrap()
                .into_inner()
                .group
                .unwrap()
        }
    };
    let info = seek(pb::start_position::Position::Earliest(())).await;
    assert_eq!((info.ack_floor, info.lag), (0, 5), "{info:?}");
    let info = seek(pb::start_position::Position::Sequence(6)).await;
    assert_eq!((info.ack_floor, info.lag), (5, 3), "{info:?}");
    let info = seek(pb::start_position::Position::Latest(())).await;
    assert_eq!((info.ack_floor, info.lag), (14, 0), "{info:?}");

    // Dead letters are settled; redriven, they are lag again until acked.
    let mut open = grouped(&["lag.mine.*"], "fragile");
    open.max_deliveries = 1;
    let mut sub = Sub::open(&mut client, open).await.unwrap();
    for _ in 0..5 {
        let d = sub.next().await;
        sub.nack(&[d.sequence], Duration::ZERO, "broken").await;
    }
    drop(sub);
    let info = info_when(&client, "fragile", "five dead letters", |i| {
        i.dead_letters == 5 && i.members == 0
    })
    .await;
    assert_eq!((info.lag, info.pending), (0, 0), "{info:?}");
    let redriven = client
        .redrive_dead_letters(pb::RedriveDeadLettersRequest {
            group: "fragile".into(),
            sequences: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven, 5);
    let info = group_info(&mut client, "fragile").await;
    assert_eq!(
        (info.lag, info.pending, info.dead_letters),
        (5, 0, 0),
        "{info:?}"
    );
    let mut sub = Sub::open(&mut client, grouped(&["lag.mine.*"], "fragile"))
        .await
        .unwrap();
    sub.take_acked(5).await;
    let info = info_when(&client, "fragile", "the redriven events settle", |i| {
        i.lag == 0
    })
    .await;
    assert_eq!((info.pending, info.dead_letters), (0, 0), "{info:?}");
}

async fn start_positions(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    for _ in 0..3 {
        publish(&mut client, event("shop.order.placed")).await;
    }
    // Times are kept to the millisecond, and a start time includes its own
    // millisecond: leave one clear of both groups.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..2 {
        publish(&mut client, event("shop.order.placed")).await;
    }
    use pb::start_position::Position as P;
    let first_of = |position: P| {
        let mut client = client.clone();
        async move {
            let mut o = open(&["shop.>"]);
            o.start = Some(pb::StartPosition {
                position: Some(position),
            });
            let mut sub = Sub::open(&mut client, o).await.unwrap();
            // Latest gets nothing: wait briefly; the others get an event: wait long.
            let wait = if matches!(position, P::Latest(())) {
                Duration::from_millis(300)
            } else {
                PATIENCE
            };
            sub.try_next(wait).await.map(|d| d.sequence)
        }
    };
    assert_eq!(first_of(P::Earliest(())).await, Some(1));
    assert_eq!(first_of(P::Sequence(4)).await, Some(4));
    assert_eq!(first_of(P::Time(between.into())).await, Some(4));
    assert_eq!(first_of(P::Latest(())).await, None);
}

async fn patterns_of_live_group_are_fixed(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let sub = Sub::open(&mut client, grouped(&["shop.>"], "fixed"))
        .await
        .unwrap();
    let err = Sub::open(&mut client, grouped(&["billing.>"], "fixed"))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("shop.>"), "{}", err.message());
    drop(sub);
    // Once the members are gone, the group takes the new patterns.
    let info = eventually("member left", || {
        let mut client = client.clone();
        async move {
            let info = group_info(&mut client, "fixed").await;
            (info.members == 0).then_some(info)
        }
    })
    .await;
    assert_eq!(info.patterns, ["shop.>"]);
    Sub::open(&mut client, grouped(&["billing.>"], "fixed"))
        .await
        .unwrap();
    assert_eq!(
        group_info(&mut client, "fixed").await.patterns,
        ["billing.>"]
    );
}

async fn bounded_in_flight(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut o = grouped(&["shop.>"], "bounded");
    o.max_in_flight = 3;
    let mut sub = Sub::open(&mut client, o).await.unwrap();
    let events: Vec<_> = (0..20).map(|_| event("shop.order.placed")).collect();
    publish_stream(&mut client, events).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(sub.next().await.sequence);
    }
    assert_eq!(held, [1, 2, 3]);
    assert!(
        sub.try_next(Duration::from_millis(300)).await.is_none(),
        "no more than max_in_flight unacked"
    );
    sub.ack(&[1]).await;
    assert_eq!(sub.next().await.sequence, 4);
    let info = group_info(&mut client, "bounded").await;
    assert_eq!(info.pending, 3);
}

async fn graceful_stop_ends_open_streams(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, grouped(&["shop.>"], "stopping"))
        .await
        .unwrap();
    // A publish stream that stays open, with events acked on it.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut acks = client
        .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(pb::PublishRequest {
            event: Some(event_with_id("shop.order.placed", &format!("open-{i}"))),
        })
        .await
        .unwrap();
        ack_of(&acks.message().await.unwrap().unwrap());
    }
    let d = sub.next().await;
    sub.ack(&[d.sequence]).await;
    eventually("the ack is applied", || {
        let mut client = client.clone();
        async move { (group_info(&mut client, "stopping").await.ack_floor == 1).then_some(()) }
    })
    .await;
    // Stopping does not wait for the clients to hang up.
    let dir = node.stop().await;
    let ended = tokio::time::timeout(PATIENCE, acks.message())
        .await
        .expect("publish stream ends");
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");
    drop(tx);
    // What was acked is there, and the group kept its ack.
    let node = TestNode::start_in(backend, dir.as_ref().unwrap().path()).await;
    let mut client = node.client().await;
    let info = group_info(&mut client, "stopping").await;
    assert_eq!((info.ack_floor, info.head_sequence), (1, 3));
}

/// Sequences follow the order of a publish stream, however its requests are batched.
async fn one_stream_keeps_its_order(backend: Backend) {
    let node = TestNode::start(backend).await;
    let mut client = node.client().await;
    // A second stream at the same time, so that batches of both interleave.
    let mut other = client.clone();
    let noise = tokio::spawn(async move {
        let events: Vec<_> = (0..2000).map(|_| event("noise.event")).collect();
        publish_stream(&mut other, events).await
    });
    let events: Vec<_> = (0..3000).map(|_| event("ordered.event")).collect();
    let sequences: Vec<u64> = publish_stream(&mut client, events)
        .await
        .iter()
        .map(|r| ack_of(r).sequence)
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "sequences out of stream order"
    );
    noise.await.unwrap();
}
