//! The inventory service of the shop: `inventory [--server URL] [--data DIR]`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evmesh_shop::run_service(evmesh_shop::Service::Inventory).await
}
