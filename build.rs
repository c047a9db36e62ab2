//! Compiles proto/ with protox (no protoc needed) and generates prost types and tonic
//! stubs. The encoded FileDescriptorSet, imports included, goes to OUT_DIR for server
//! reflection and payload validation.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "evmesh/v1/envelope.proto",
    "evmesh/v1/mesh.proto",
    "evmesh/v1/registry.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("evmesh_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
