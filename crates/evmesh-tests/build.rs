//! Generates the test services' event types with evmesh-build, as a service would.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    evmesh_build::compile(&["protos/shop/v1/shop.proto"], &["protos"])?;
    Ok(())
}
