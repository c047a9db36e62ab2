//! The payment service of the crash tests, as a process of its own so that a test
//! can kill it: `crash_consumer NODE_URL DATABASE`. With `EVMESH_CLIENT_CRASH_AT`
//! set, it aborts at that point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_client::{Context, Mesh};
use evmesh_tests::shop::{OrderPlaced, PaymentSucceeded};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (url, db) = (
        args.next().expect("NODE_URL"),
        args.next().expect("DATABASE"),
    );
    let options = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePool::connect_with(options).await.unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS charges (order_id TEXT NOT NULL, event_id TEXT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mesh = Mesh::connect(&url).await.unwrap();
    mesh.resolve::<PaymentSucceeded>().await.unwrap();
    let _consumer = mesh
        .consumer("payment")
        .database(pool)
        .on(|ctx: Context, order: OrderPlaced| async move {
            sqlx::query("INSERT INTO charges (order_id, event_id) VALUES (?, ?)")
                .bind(&order.order_id)
                .bind(&ctx.event().id)
                .execute(&mut *ctx.tx().await)
                .await?;
            ctx.publish(
                &PaymentSucceeded {
                    order_id: order.order_id,
                    amount_cents: order.total_cents,
                },
                &ctx.event().aggregate_id,
            );
            Ok(())
        })
        .start()
        .await
        .unwrap();
    println!("ready");
    std::future::pending::<()>().await;
}
