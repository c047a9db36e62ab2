//! Real processes for evmesh's tests and its benchmark harness: nats-servers, one or
//! a cluster, each over a store directory of its own and stopped by its PID. What
//! fails here panics with the reason: a test or a bench run that cannot start its
//! servers has nothing to measure.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

mod nats;
mod pki;
pub use nats::{NatsCluster, NatsServer, Sync};
pub use pki::{Issued, Pki};

/// How long something that should happen at once may take.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Finds a tool on PATH, or fails loudly: tests never skip.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: run the test command from the README, which installs it")
        })
}
