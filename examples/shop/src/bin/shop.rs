//! `shop`: the shop choreography against a running node.
//!
//! - `shop run --orders 3`: registers the schemas, starts every service, places the
//!   orders, and prints where each one ends up (and its correlation id, for
//!   `evmesh chain` and Jaeger); the services keep running until Ctrl-C.
//! - `shop payment|inventory|shipping|order-status`: one service on its own.
//! - `shop place ORDER_ID --total-cents N`: the order service.
//! - `shop status ORDER_ID`: asks the order-status projection.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use evmesh_client::Mesh;
use evmesh_shop::events::{LineItem, OrderPlaced};

#[derive(Parser)]
struct Cli {
    /// The node.
    #[arg(long, env = "EVMESH_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Where the services keep their databases.
    #[arg(long, default_value = "./shop-data")]
    data: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every service, and a few orders through them.
    Run {
        #[arg(long, default_value_t = 3)]
        orders: u32,
    },
    Payment,
    Inventory,
    Shipping,
    OrderStatus,
    /// Place one order.
    Place {
        order_id: String,
        #[arg(long, default_value_t = 4_200)]
        total_cents: i64,
    },
    /// Where is this order?
    Status {
        order_id: String,
    },
}

async fn until_ctrl_c(consumers: Vec<evmesh_client::Consumer>) -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await?;
    for c in consumers {
        c.stop().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = evmesh_client::telemetry::init("shop").context("setting up tracing")?;
    let mesh = Mesh::connect(&cli.server).await?;
    std::fs::create_dir_all(&cli.data)?;
    let db = |name: &str| cli.data.join(format!("{name}.db"));
    match cli.command {
        Command::Run { orders } => {
            evmesh_shop::register_all(&mesh).await?;
            let shop = evmesh_shop::start_all(&mesh, &cli.data).await?;
            let mut placed = Vec::new();
            for i in 0..orders {
                // Every third order is over the payment limit.
                let total_cents = if i % 3 == 2 {
                    evmesh_shop::PAYMENT_LIMIT_CENTS + 1
                } else {
                    1_500 + i64::from(i)
                };
                let order = OrderPlaced {
                    order_id: format!("order-{}-{i}", std::process::id()),
                    customer: "ada".into(),
                    total_cents,
                    items: vec![LineItem {
                        sku: "book".into(),
                        quantity: 1 + i,
                    }],
                };
                let ack = evmesh_shop::place_order(&mesh, order.clone()).await?;
                placed.push((order.order_id, ack.correlation_id));
            }
            for (order_id, correlation) in &placed {
                let mut last = String::new();
                for _ in 0..100 {
                    if let Some((status, _)) =
                        evmesh_shop::status(&shop.status_db, order_id).await?
                    {
                        last = status;
                        if last == "shipped" || last == "payment failed" {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                println!("{order_id}: {last}  (evmesh chain {correlation})");
            }
            println!("services running; Ctrl-C stops them");
            until_ctrl_c(shop.consumers).await
        }
        Command::Payment => {
            evmesh_shop::register_all(&mesh).await?;
            let c =
                evmesh_shop::payment(&mesh, evmesh_shop::database(&db("payment")).await?).await?;
            until_ctrl_c(vec![c]).await
        }
        Command::Inventory => {
            evmesh_shop::register_all(&mesh).await?;
            let c = evmesh_shop::inventory(&mesh, evmesh_shop::database(&db("inventory")).await?)
                .await?;
            until_ctrl_c(vec![c]).await
        }
        Command::Shipping => {
            evmesh_shop::register_all(&mesh).await?;
            let c =
                evmesh_shop::shipping(&mesh, evmesh_shop::database(&db("shipping")).await?).await?;
            until_ctrl_c(vec![c]).await
        }
        Command::OrderStatus => {
            evmesh_shop::register_all(&mesh).await?;
            let c =
                evmesh_shop::order_status(&mesh, evmesh_shop::database(&db("order-status")).await?)
                    .await?;
            until_ctrl_c(vec![c]).await
        }
        Command::Place {
            order_id,
            total_cents,
        } => {
            evmesh_shop::register_all(&mesh).await?;
            let order = OrderPlaced {
                order_id,
                customer: "ada".into(),
                total_cents,
                items: vec![LineItem {
                    sku: "book".into(),
                    quantity: 1,
                }],
            };
            let ack = evmesh_shop::place_order(&mesh, order).await?;
            println!(
                "placed: sequence {}, correlation id {}",
                ack.sequence, ack.correlation_id
            );
            Ok(())
        }
        Command::Status { order_id } => {
            let pool = evmesh_shop::database(&db("order-status")).await?;
            match evmesh_shop::status(&pool, &order_id).await? {
                Some((status, correlation)) => {
                    println!("{order_id}: {status}  (evmesh chain {correlation})")
                }
                None => {
                    anyhow::bail!("order {order_id} is not known to the order-status projection")
                }
            }
            Ok(())
        }
    }
}
