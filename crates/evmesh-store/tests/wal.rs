//! The embedded log's WAL, on a real SQLite file: checkpoints keep it bounded,
//! a stop leaves it empty, and what was acked is there after a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_proto::v1::Event;
use evmesh_store::Store;
use evmesh_store::sqlite::{Config, DB_FILE, SqliteStore};

fn events(from: usize, n: usize, payload: usize) -> Vec<Event> {
    (from..from + n)
        .map(|i| Event {
            id: format!("e-{i}"),
            r#type: "bench.wal.filled".into(),
            correlation_id: format!("c-{i}"),
            payload: Some(prost_types::Any {
                type_url: "type.googleapis.com/bench.v1.Payload".into(),
                value: vec![0xab; payload],
            }),
            ..Default::default()
        })
        .collect()
}

/// 192 MiB of events through the log: checkpoints copy the WAL back every few
/// MiB, and it starts over every 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_the_wal_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    let store = SqliteStore::open(Config::new(dir.path())).await.unwrap();
    let (batch, payload) = (512, 4096);
    let batches = (192 << 20) / (batch * payload);
    let mut largest = 0;
    for b in 0..batches {
        let acks = store
            .append(events(b * batch, batch, payload))
            .await
            .unwrap();
        assert_eq!(acks.len(), batch);
        assert!(acks.iter().all(|a| !a.duplicate));
        largest = largest.max(std::fs::metadata(&wal).unwrap().len());
    }
    assert!(
        largest < 80 << 20,
        "the WAL grew to {} MiB over 192 MiB of events",
        largest >> 20
    );
    assert_eq!(store.head(), (batches * batch) as u64);
    store.shutdown().await.unwrap();
    let left = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        left, 0,
        "a stopped node leaves its WAL empty for the next start"
    );

    let reopened = SqliteStore::open(Config::new(dir.path())).await.unwrap();
    assert_eq!(reopened.head(), (batches * batch) as u64);
    let again = reopened.append(events(0, 1, payload)).await.unwrap();
    assert!(again[0].duplicate, "an id from before the reopen is known");
    assert_eq!(again[0].sequence, 1);
    reopened.shutdown().await.unwrap();
}

/// A WAL that cannot be synced any more (here: removed from under the node) stops
/// every ack, with the reason, instead of acknowledging what may not be on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_stops_every_ack() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(Config::new(dir.path())).await.unwrap();
    let acks = store.append(events(0, 10, 64)).await.unwrap();
    assert_eq!(acks.last().unwrap().sequence, 10);

    std::fs::remove_file(dir.path().join(format!("{DB_FILE}-wal"))).unwrap();
    for from in [10, 20] {
        let err = store.append(events(from, 10, 64)).await.unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("could not be synced") && message.contains("restarts"),
            "{message}"
        );
    }
    assert_eq!(
        store.head(),
        10,
        "nothing past the failure reaches subscribers"
    );
    store.shutdown().await.unwrap();
}
