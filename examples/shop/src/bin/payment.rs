//! The payment service of the shop: `payment [--server URL] [--data DIR]`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evmesh_shop::run_service(evmesh_shop::Service::Payment).await
}
