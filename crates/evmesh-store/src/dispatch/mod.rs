//! Group dispatch, one implementation for every backend: [`core`], the state
//! machine that decides (no I/O), and [`task`], the task that drives it over a
//! backend's [`GroupLog`].

mod core;
mod task;

pub(crate) use core::{ParkedChange, ParkedRow};
pub(crate) use task::{
    Checkpoint, Command, GroupHandle, GroupLog, GroupRow, Groups, Restored, spawn_durable,
    spawn_ephemeral,
};
