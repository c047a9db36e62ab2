//! Several `evmesh serve` processes on one JetStream, and clients that move between
//! them when the node they use dies. Every process is stopped by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use evmesh_client::Mesh;
use evmesh_tests::{NatsServer, Sub, event_with_id, open, v1 as pb};

mod support;

use support::{BIN, Served, assert_ok, free_port, stored};

/// A node on the NATS server at `nats`, over a data directory of its own.
fn node(dir: &Path, name: &str, nats: &str) -> Served {
    Served::start_with(
        &dir.join(name),
        &["--allow-unregistered", "--nats", nats, "--node-name", name],
    )
}

/// Two nodes, `a` and `b`, on one nats-server of their own.
struct TwoNodes {
    runtime: tokio::runtime::Runtime,
    a: Served,
    b: Served,
    _nats: NatsServer,
    dir: tempfile::TempDir,
}

impl TwoNodes {
    fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let nats = runtime.block_on(NatsServer::start());
        let dir = tempfile::tempdir().unwrap();
        let a = node(dir.path(), "a", &nats.url());
        let b = node(dir.path(), "b", &nats.url());
        Self {
            runtime,
            a,
            b,
            _nats: nats,
            dir,
        }
    }
}

/// kill -9 of the node a client publishes through, with publishes in flight: the
/// client moves to the next node and sends what was not acknowledged again with
/// the same ids; every publish is acked, and every event is stored exactly once,
/// at the sequence its ack gave.
#[test]
fn a_publisher_moves_to_the_next_node_when_its_node_dies() {
    const TOTAL: usize = 3000;
    // Every field bound: what a pattern leaves out is dropped (stopped) at once.
    let TwoNodes {
        runtime,
        a,
        b,
        _nats,
        dir: _dir,
    } = TwoNodes::start();
    let b_url = b.url();
    let acks = runtime.block_on(async {
        let mesh = Mesh::connect(&format!("{},{}", a.url(), b.url()))
            .await
            .unwrap();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(200));
        let mut tasks = tokio::task::JoinSet::new();
        let mut a = Some(a);
        for i in 0..TOTAL {
            if i == TOTAL / 3 {
                a.take().unwrap().kill_9();
            }
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let publisher = mesh.publisher().clone();
            tasks.spawn(async move {
                let id = format!("e-{i}");
                let ack = publisher
                    .publish(event_with_id("mesh.test", &id))
                    .await
                    .unwrap_or_else(|e| panic!("publish of {id}: {e}"));
                drop(permit);
                (id, ack)
            });
        }
        let mut acks = HashMap::new();
        while let Some(done) = tasks.join_next().await {
            let (id, ack) = done.unwrap();
            acks.insert(id, ack.sequence);
        }
        acks
    });
    assert_eq!(acks.len(), TOTAL);
    let ids = runtime.block_on(stored(&b_url, "mesh.test", TOTAL));
    assert_eq!(ids.len(), TOTAL, "every id stored");
    for (id, sequence) in &ids {
        assert_eq!(*sequence, acks[id], "{id} acked at another sequence");
    }
    drop(b);
}

/// Every client command takes several nodes and uses the first that answers.
#[test]
fn commands_take_several_nodes() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let nats = runtime.block_on(NatsServer::start());
    let dir = tempfile::tempdir().unwrap();
    let live = node(dir.path(), "live", &nats.url());
    let dead = format!("127.0.0.1:{}", free_port());
    let servers = format!("{dead},{}", live.addr);
    let out = std::process::Command::new(BIN)
        .args(["groups", "list", "--server", &servers])
        .output()
        .unwrap();
    assert_ok(&out);
    // None answers: one line naming each.
    let out = std::process::Command::new(BIN)
        .args(["groups", "list"])
        .env("EVMESH_SERVER", format!("{dead},{dead}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach any node of") && stderr.contains(&dead),
        "{stderr}"
    );
}

/// kill -9 of the node an effectively-once consumer is joined through, while it
/// handles: it joins its group again through the next node, the events its dead
/// node had out come again, and every order is charged once and paid once.
#[test]
fn a_consumer_joins_its_group_again_through_the_next_node() {
    const ORDERS: usize = 300;
    let TwoNodes {
        runtime,
        a,
        b,
        _nats,
        dir,
    } = TwoNodes::start();
    let b_url = b.url();
    runtime.block_on(async {
        let pool = evmesh_tests::payment_db(&dir.path().join("payment.db")).await;
        let service = Mesh::connect(&format!("{},{}", a.url(), b.url()))
            .await
            .unwrap();
        let consumer = evmesh_tests::payment_service(&service, pool.clone()).await;
        let shop = Mesh::connect(&b_url).await.unwrap();
        for i in 0..ORDERS {
            support::place_order(&shop, i).await;
        }
        let charged = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM charges")
                .fetch_one(&pool)
                .await
                .unwrap()
        };
        while charged().await < (ORDERS / 3) as i64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a.kill_9();
        let deadline = tokio::time::Instant::now() + evmesh_tests::PATIENCE;
        while charged().await < ORDERS as i64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "charged {} of {ORDERS} after the node died",
                charged().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT order_id) FROM charges")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(distinct, ORDERS as i64);
        assert_eq!(charged().await, ORDERS as i64, "an order charged twice");
        // Each payment published once, relayed through the next node.
        let paid = stored(&b_url, "shop.payment.succeeded", ORDERS).await;
        assert_eq!(paid.len(), ORDERS);
        consumer.stop().await.unwrap();
    });
    drop(b);
}

/// `evmesh nodes`: every node of the mesh with the groups it serves and their
/// members there; a node that stops is gone from the list within its announcement's
/// lifetime. With the embedded log, the node alone.
#[test]
fn nodes_lists_the_mesh_and_its_groups() {
    let TwoNodes {
        runtime,
        a,
        b,
        _nats,
        dir,
    } = TwoNodes::start();
    let nodes = support::nodes_json;
    // A member of group audit joined through b.
    let _member = runtime.block_on(async {
        let mut client = pb::mesh_client::MeshClient::connect(b.url()).await.unwrap();
        Sub::open(
            &mut client,
            pb::SubscribeOpen {
                group: "audit".into(),
                ..open(&["mesh.>"])
            },
        )
        .await
        .unwrap()
    });
    let deadline = std::time::Instant::now() + evmesh_tests::PATIENCE;
    let listed = loop {
        let listed = nodes(&a.addr);
        let b_groups = listed
            .iter()
            .find(|n| n["name"] == "b")
            .map(|n| n["groups"].clone());
        if listed.len() == 2
            && b_groups == Some(serde_json::json!([{"name": "audit", "members": 1, "owner": true}]))
        {
            break listed;
        }
        assert!(std::time::Instant::now() < deadline, "{listed:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed[0]["name"], "a");
    assert_eq!(listed[0]["thisNode"], true);
    assert_eq!(listed[0]["address"], a.url());
    assert_eq!(listed[0]["groups"], serde_json::json!([]));
    assert_eq!(listed[1]["thisNode"], false);
    assert_eq!(listed[1]["address"], b.url());

    // The table, from b.
    let out = std::process::Command::new(BIN)
        .args(["nodes", "--server", &b.addr])
        .output()
        .unwrap();
    assert_ok(&out);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("b *") && table.contains("audit (1 members, owner)"),
        "{table}"
    );

    // b dies: it is gone from the list once its last announcement lapses (10 s).
    b.kill_9();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while nodes(&a.addr).len() != 1 {
        assert!(std::time::Instant::now() < deadline, "b still listed");
        std::thread::sleep(Duration::from_millis(500));
    }

    // The embedded log: the node alone.
    let alone = Served::start(&dir.path().join("alone"));
    let listed = nodes(&alone.addr);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["thisNode"], true);
}
