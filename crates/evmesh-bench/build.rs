//! The consumer scenario's event types, generated as a service would.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    evmesh_build::compile(&["proto/bench/v1/consumer.proto"], &["proto"])?;
    Ok(())
}
