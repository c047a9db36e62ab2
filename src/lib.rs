//! The evmesh wire API (package `evmesh.v1`): prost types for the envelope and the
//! services, tonic client and server stubs, and the encoded descriptor set that server
//! reflection serves.
//!
//! This crate has no feature flags. Everything generated lives in [`v1`]; the rest of
//! evmesh converts to its own domain types at the edge.
#![forbid(unsafe_code)]

/// Generated code for `evmesh.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("evmesh.v1");
}

/// The encoded `FileDescriptorSet` of `proto/evmesh/v1`, with every import
/// (google.protobuf well-known types included).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/evmesh_descriptor.bin"));

/// `evmesh/v1/options.proto`, which declares `(evmesh.v1.event_type)`: what a service's
/// .proto imports to mark its payload messages. The CLI and evmesh-build provide it, so
/// nobody has to vendor it.
pub const OPTIONS_PROTO: &str = include_str!("../proto/evmesh/v1/options.proto");
