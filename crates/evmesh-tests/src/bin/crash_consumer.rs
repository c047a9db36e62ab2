//! The payment service of the crash tests, as a process of its own so that a test
//! can kill it: `crash_consumer NODE_URL DATABASE`. With `EVMESH_CLIENT_CRASH_AT`
//! set, it aborts at that point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use evmesh_client::Mesh;
use evmesh_tests::shop::PaymentSucceeded;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (url, db) = (
        args.next().expect("NODE_URL"),
        args.next().expect("DATABASE"),
    );
    let pool = evmesh_tests::payment_db(std::path::Path::new(&db)).await;
    let mesh = Mesh::connect(&url).await.unwrap();
    mesh.resolve::<PaymentSucceeded>().await.unwrap();
    let _consumer = evmesh_tests::payment_service(&mesh, pool).await;
    println!("ready");
    std::future::pending::<()>().await;
}
