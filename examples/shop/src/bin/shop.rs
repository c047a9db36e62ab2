//! `shop`: the shop choreography against a running node.
//!
//! - `shop run --orders 3`: registers the schemas, starts every service in this one
//!   process, places the orders, and prints where each one ends up (and its
//!   correlation id, for `evmesh chain` and Jaeger); with `--keep-running` the
//!   services go on until Ctrl-C.
//! - `shop status ORDER_ID`: asks the order-status projection.
//!
//! Each service is also a binary of its own: `order`, `payment`, `inventory`,
//! `shipping`, `order-status`.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use evmesh_client::Mesh;
use evmesh_shop::events::{LineItem, OrderPlaced};

/// The shop choreography against a running node: every service in one process, or
/// where an order is.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: evmesh_shop::Args,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every service, and a few orders through them.
    Run {
        /// How many orders to place; every third is over the payment limit.
        #[arg(long, default_value_t = 3)]
        orders: u32,
        /// Keep the services running after the orders are through, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Where is this order?
    Status {
        /// The order's id, as `run` or `order` printed it.
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
    let mesh = Mesh::connect(&cli.args.server).await?;
    std::fs::create_dir_all(&cli.args.data)?;
    let db = |name: &str| cli.args.data.join(format!("{name}.db"));
    match cli.command {
        Command::Run {
            orders,
            keep_running,
        } => {
            evmesh_shop::register_all(&mesh).await?;
            let shop = evmesh_shop::start_all(&mesh, &cli.args.data).await?;
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
            if keep_running {
                println!("services running; Ctrl-C stops them");
                until_ctrl_c(shop.consumers).await
            } else {
                for c in shop.consumers {
                    c.stop().await?;
                }
                Ok(())
            }
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
