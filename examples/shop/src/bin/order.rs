//! The order service of the shop: `order ORDER_ID [--total-cents N]` places an order.

use clap::Parser;
use evmesh_client::Mesh;
use evmesh_shop::events::{LineItem, OrderPlaced};

/// The shop's order service: places one order.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: evmesh_shop::Args,
    /// The new order's id.
    order_id: String,
    /// The order's total; payment refuses anything over 100000 (1,000.00).
    #[arg(long, default_value_t = 4_200)]
    total_cents: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = evmesh_client::telemetry::init("order")?;
    let mesh = Mesh::connect(&cli.args.server).await?;
    evmesh_shop::register_all(&mesh).await?;
    let order = OrderPlaced {
        order_id: cli.order_id,
        customer: "ada".into(),
        total_cents: cli.total_cents,
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
    telemetry.flush();
    Ok(())
}
