//! evmesh-client against a real node: typed publish, effectively-once consumers with
//! the inbox and outbox in a real SQLite file, correlation and causation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use evmesh_client::{Context, Mesh, Meta};
use evmesh_tests::shop::{OrderPlaced, PaymentSucceeded};
use evmesh_tests::*;
use sqlx::SqlitePool;

async fn strict() -> TestNode {
    TestNode::start_with(Backend::Sqlite, evmesh_node::NodeConfig::default()).await
}

async fn database(dir: &std::path::Path, name: &str) -> SqlitePool {
    payment_db(&dir.join(name)).await
}

async fn count(pool: &SqlitePool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn payment(mesh: &Mesh, pool: SqlitePool) -> evmesh_client::Consumer {
    payment_service(mesh, pool).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_publish_and_an_effectively_once_consumer() {
    let node = strict().await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    assert_eq!(mesh.register::<OrderPlaced>().await.unwrap(), "1.0.0");
    assert_eq!(mesh.register::<PaymentSucceeded>().await.unwrap(), "1.0.0");
    // Another instance of the service learns the version by content.
    let other = Mesh::connect(&node.url()).await.unwrap();
    assert_eq!(other.resolve::<OrderPlaced>().await.unwrap(), "1.0.0");

    let pool = database(dir.path(), "payment.db").await;
    let consumer = payment(&mesh, pool.clone()).await;

    // Many publishes in flight on one stream, each with its own ack.
    let publishes = (0..50).map(|i| {
        let mesh = mesh.clone();
        async move {
            let order = OrderPlaced {
                order_id: format!("o-{i}"),
                total_cents: 100 * i,
            };
            mesh.publish(
                &order,
                Meta {
                    aggregate_id: format!("o-{i}"),
                    ..Meta::default()
                },
            )
            .await
            .unwrap()
        }
    });
    let acks = futures_join(publishes).await;
    assert_eq!(acks.len(), 50);
    let first = acks[0].clone();
    assert_eq!(
        first.correlation_id.len(),
        32,
        "a new workflow's correlation id is trace-id shaped"
    );

    // Each order charged once, and a payment event per order, caused by it.
    let mut client = node.client().await;
    let mut sub = Sub::open(&mut client, open(&["shop.payment.succeeded"]))
        .await
        .unwrap();
    let mut payments = Vec::new();
    for _ in 0..50 {
        let d = sub.next().await;
        sub.ack(&[d.sequence]).await;
        payments.push(d.event.unwrap());
    }
    let paid = payments
        .iter()
        .find(|e| e.causation_id == first.event_id)
        .expect("the first order's payment");
    assert_eq!(paid.correlation_id, first.correlation_id);
    assert_eq!(paid.schema_version, "1.0.0");
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM charges").await, 50);

    // Every event delivered again (the group seeked back), and the first order
    // published twice with its id: nothing happens twice.
    seek_to_earliest(&mut client, "payment").await;
    let again = mesh
        .publish(
            &OrderPlaced {
                order_id: "o-0".into(),
                total_cents: 0,
            },
            Meta {
                id: first.event_id.clone(),
                ..Meta::default()
            },
        )
        .await
        .unwrap();
    assert!(again.duplicate);
    eventually("the group is caught up again", || {
        let mut client = client.clone();
        async move { (group_info(&mut client, "payment").await.lag == 0).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM charges").await, 50);
    assert!(
        sub.try_next(Duration::from_millis(300)).await.is_none(),
        "no payment published twice"
    );
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM evmesh_outbox").await,
        0,
        "the relay emptied the outbox"
    );
    consumer.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_retries_then_dead_letters() {
    let node = strict().await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::connect(&node.url()).await.unwrap();
    mesh.register::<OrderPlaced>().await.unwrap();
    let pool = database(dir.path(), "fragile.db").await;
    let consumer = mesh
        .consumer("fragile")
        .database(pool.clone())
        .max_deliveries(3)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .on(|ctx: Context, order: OrderPlaced| async move {
            sqlx::query("INSERT INTO charges (order_id, event_id) VALUES (?, ?)")
                .bind(&order.order_id)
                .bind(&ctx.event().id)
                .execute(&mut *ctx.tx().await)
                .await?;
            if order.order_id == "poison" {
                return Err(format!(
                    "cannot charge {} (attempt {})",
                    order.order_id,
                    ctx.event().attempt
                )
                .into());
            }
            Ok(())
        })
        .start()
        .await
        .unwrap();
    let poison = mesh
        .publish(
            &OrderPlaced {
                order_id: "poison".into(),
                total_cents: 1,
            },
            Meta::default(),
        )
        .await
        .unwrap();
    mesh.publish(
        &OrderPlaced {
            order_id: "fine".into(),
            total_cents: 1,
        },
        Meta::default(),
    )
    .await
    .unwrap();
    let mut client = node.client().await;
    let letters = dead_letters_eventually(&client, "fragile").await;
    assert_eq!(letters[0].sequence, poison.sequence);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].reason, "cannot charge poison (attempt 3)");
    // The failed attempts' writes were rolled back; the good event's stayed.
    let charged: Vec<String> = sqlx::query_scalar("SELECT order_id FROM charges")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(charged, ["fine"]);
    let _ = group_info(&mut client, "fragile").await;
    consumer.stop().await.unwrap();
}

async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<F> = futures.collect();
    let mut out = Vec::with_capacity(handles.len());
    // Poll all at once: each publish is in flight while the others are sent.
    let joined = futures_util::future::join_all(handles).await;
    out.extend(joined);
    out
}
