//! The whole shop over a real node: orders reach "shipped" (or "payment failed"),
//! every event of a workflow shares its correlation id and names its cause; and with
//! every event delivered twice, each side effect still happens once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use evmesh_client::Mesh;
use evmesh_shop::events::{LineItem, OrderPlaced};
use evmesh_tests::v1 as pb;
use evmesh_tests::{Backend, TestNode, eventually};

fn order(id: &str, total_cents: i64) -> OrderPlaced {
    OrderPlaced {
        order_id: id.into(),
        customer: "ada".into(),
        total_cents,
        items: vec![LineItem {
            sku: "book".into(),
            quantity: 2,
        }],
    }
}

async fn status_of(shop: &evmesh_shop::Shop, order_id: &str, want: &str) {
    eventually(&format!("{order_id} is {want}"), || async move {
        let now = evmesh_shop::status(&shop.status_db, order_id)
            .await
            .unwrap();
        (now.as_ref().map(|s| s.0.as_str()) == Some(want)).then_some(())
    })
    .await;
}

async fn count(dir: &std::path::Path, db: &str, table: &str) -> i64 {
    let pool = evmesh_shop::database(&dir.join(db)).await.unwrap();
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn chain(node: &TestNode, correlation: &str) -> Vec<pb::Event> {
    let mut client = node.client().await;
    client
        .get_chain(pb::GetChainRequest {
            correlation_id: correlation.into(),
            limit: 0,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|c| c.event.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_flow_through_the_choreography_once() {
    let node = TestNode::start_with(Backend::Sqlite, evmesh_node::NodeConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    evmesh_shop::register_all(&mesh).await.unwrap();
    let shop = evmesh_shop::start_all(&mesh, dir.path()).await.unwrap();

    let ok = evmesh_shop::place_order(&mesh, order("o-1", 4_200))
        .await
        .unwrap();
    let refused =
        evmesh_shop::place_order(&mesh, order("o-2", evmesh_shop::PAYMENT_LIMIT_CENTS + 1))
            .await
            .unwrap();
    status_of(&shop, "o-1", "shipped").await;
    status_of(&shop, "o-2", "payment failed").await;

    // One workflow: four events, one correlation id, each caused by the one before.
    let events = chain(&node, &ok.correlation_id).await;
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        types,
        [
            "shop.order.placed",
            "shop.payment.succeeded",
            "shop.inventory.reserved",
            "shop.shipment.scheduled"
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.correlation_id == ok.correlation_id && e.aggregate_id == "o-1")
    );
    assert_eq!(events[0].causation_id, "");
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].causation_id, pair[0].id,
            "{} is caused by {}",
            pair[1].r#type, pair[0].r#type
        );
    }
    let failed: Vec<String> = chain(&node, &refused.correlation_id)
        .await
        .into_iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(failed, ["shop.order.placed", "shop.payment.failed"]);

    // Every event delivered again: each group seeked back to the start, and the
    // first order published again with its id. No effect happens twice.
    let mut client = node.client().await;
    for group in ["payment", "inventory", "shipping", "order-status"] {
        evmesh_tests::seek_to_earliest(&mut client, group).await;
    }
    let again = mesh
        .publish(
            &order("o-1", 4_200),
            evmesh_client::Meta {
                id: ok.event_id.clone(),
                aggregate_id: "o-1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    eventually("every group caught up again", || {
        let mut client = client.clone();
        async move {
            let groups = client
                .list_groups(pb::ListGroupsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .groups;
            groups
                .iter()
                .all(|g| g.lag == 0 && g.pending == 0)
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(dir.path(), "payment.db", "payments").await, 2);
    assert_eq!(count(dir.path(), "inventory.db", "reservations").await, 1);
    assert_eq!(count(dir.path(), "shipping.db", "shipments").await, 1);
    assert_eq!(
        chain(&node, &ok.correlation_id).await.len(),
        4,
        "no event published twice"
    );
    let mut by_type: HashMap<String, usize> = HashMap::new();
    for e in chain(&node, &refused.correlation_id).await {
        *by_type.entry(e.r#type).or_default() += 1;
    }
    assert!(by_type.values().all(|&n| n == 1), "{by_type:?}");
    for c in shop.consumers {
        c.stop().await.unwrap();
    }
}
