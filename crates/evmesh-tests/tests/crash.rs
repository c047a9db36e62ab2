//! Crash tests: the consumer process dies at each point of the effectively-once
//! path, is started again, and every effect still happens exactly once: one charge
//! per order, one payment event per order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use evmesh_client::{Mesh, Meta};
use evmesh_tests::shop::{OrderPlaced, PaymentSucceeded};
use evmesh_tests::*;
use sqlx::SqlitePool;
use tokio::process::Command;

const ORDERS: usize = 20;

async fn crash_at(point: &str) {
    let node = TestNode::start_with(Backend::Sqlite, evmesh_node::NodeConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("payment.db");
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    mesh.register::<OrderPlaced>().await.unwrap();
    mesh.register::<PaymentSucceeded>().await.unwrap();
    for i in 0..ORDERS {
        let order = OrderPlaced {
            order_id: format!("o-{i}"),
            total_cents: 100,
        };
        mesh.publish(&order, Meta::default()).await.unwrap();
    }

    // The first run dies at the crash point.
    let crashed = Command::new(env!("CARGO_BIN_EXE_crash_consumer"))
        .arg(node.url())
        .arg(&db)
        .env("EVMESH_CLIENT_CRASH_AT", point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let crashed = tokio::time::timeout(PATIENCE, crashed)
        .await
        .expect("it crashes in time")
        .unwrap();
    assert!(
        !crashed.status.success(),
        "{point}: the consumer should have crashed"
    );
    assert!(String::from_utf8_lossy(&crashed.stderr).contains(&format!("crashing at {point}")));

    // The second run finishes the work.
    let mut again = Command::new(env!("CARGO_BIN_EXE_crash_consumer"))
        .arg(node.url())
        .arg(&db)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut client = node.client().await;
    let mut payments: HashMap<String, usize> = HashMap::new();
    let mut sub = Sub::open(&mut client, open(&["shop.payment.succeeded"]))
        .await
        .unwrap();
    while payments.len() < ORDERS {
        let d = sub.next().await;
        sub.ack(&[d.sequence]).await;
        *payments.entry(d.event.unwrap().causation_id).or_default() += 1;
    }
    // Nothing more comes: no payment twice.
    assert!(
        sub.try_next(Duration::from_millis(500)).await.is_none(),
        "{point}: a payment was published twice"
    );
    assert!(payments.values().all(|&n| n == 1), "{point}: {payments:?}");
    eventually("the group is caught up", || {
        let mut client = client.clone();
        async move { (group_info(&mut client, "payment").await.lag == 0).then_some(()) }
    })
    .await;
    let pool = SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let charges: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM charges")
        .fetch_one(&pool)
        .await
        .unwrap();
    let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT order_id) FROM charges")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (charges, distinct),
        (ORDERS as i64, ORDERS as i64),
        "{point}: each order charged once"
    );
    let _ = again.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit() {
    crash_at("before_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_ack() {
    crash_at("before_ack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_before_relay() {
    crash_at("relay_before_publish").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_relay_before_outbox_delete() {
    crash_at("relay_before_delete").await;
}
