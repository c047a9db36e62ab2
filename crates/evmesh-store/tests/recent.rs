//! The recent events kept in memory for live subscribers are bounded in bytes as
//! well as in count (robustness issue, item 2): large events make the ring hold
//! fewer, and a subscriber reads the rest from the log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_proto::v1::Event;
use evmesh_store::sqlite::{Config, SqliteStore};
use evmesh_store::{Pattern, StartPosition, Store, SubscriptionSpec};

fn big(i: usize) -> Event {
    Event {
        id: format!("big-{i}"),
        r#type: "ring.big".into(),
        correlation_id: format!("c-{i}"),
        payload: Some(prost_types::Any {
            type_url: "type.googleapis.com/ring.v1.Big".into(),
            value: vec![0xcd; 1024 * 1024],
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_do_not_grow_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.recent_bytes = 16 * 1024 * 1024;
    let store = SqliteStore::open(config).await.unwrap();
    for batch in 0..10 {
        let events = (batch * 10..batch * 10 + 10).map(big).collect();
        store.append(events).await.unwrap();
        assert!(
            store.recent_bytes() <= 16 * 1024 * 1024,
            "the ring holds {} bytes",
            store.recent_bytes()
        );
    }
    assert!(
        store.recent_bytes() > 8 * 1024 * 1024,
        "and it still holds some"
    );
    let mut spec = SubscriptionSpec::new(vec![Pattern::parse("ring.>").unwrap()]);
    spec.start = StartPosition::Earliest;
    spec.auto_ack = true;
    let mut sub = store.subscribe(spec).await.unwrap();
    for expected in 1..=100 {
        let delivery = sub
            .next()
            .await
            .expect("every event, from the log or the ring");
        assert_eq!(delivery.event.sequence, expected);
    }
    store.shutdown().await.unwrap();
}
