//! The order-status service of the shop: `order-status [--server URL] [--data DIR]`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evmesh_shop::run_service(evmesh_shop::Service::OrderStatus).await
}
