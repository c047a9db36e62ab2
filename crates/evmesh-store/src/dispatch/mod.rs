//! Group dispatch, one implementation for every backend: [`core`], the state
//! machine that decides (no I/O), and [`task`], the task that drives it over a
//! backend's [`GroupLog`].

mod core;
mod registry;
mod task;

pub(crate) use core::{ParkedChange, ParkedRow};
pub(crate) use registry::{GroupCatalog, GroupRegistry};
pub(crate) use task::{Checkpoint, Command, GroupHandle, GroupLog, GroupRow, Restored, Tenure};
#[cfg(test)]
pub(crate) use task::{Groups, spawn_durable};
