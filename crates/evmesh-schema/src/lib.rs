//! evmesh schemas: what an event schema is (a self-contained descriptor set and the
//! name of its payload message), how two versions compare, and which semver a new
//! version needs.
//!
//! Pure: no I/O, nothing here can fail on I/O, and the checker returns every change
//! it finds, not the first. The registry service and the CLI build on it. This crate
//! has no feature flags.
#![forbid(unsafe_code)]

mod check;
mod descriptors;
pub mod fixtures;
mod policy;
mod schema;
mod source;

pub use check::{Bump, Change, Verdict, compare};
pub use descriptors::{SchemaLimits, quoted};
pub use policy::{
    Decision, Held, MAX_VERSION_LEN, MAX_VERSION_PART, Outcome, Registered, Violation, decide,
    declared_bump, parse_version,
};
pub use schema::{Schema, SchemaError};
pub use source::proto_source;
