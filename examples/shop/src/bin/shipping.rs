//! The shipping service of the shop: `shipping [--server URL] [--data DIR]`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    evmesh_shop::run_service(evmesh_shop::Service::Shipping).await
}
