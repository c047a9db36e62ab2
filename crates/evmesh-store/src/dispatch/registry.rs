//! A store's live groups, for every backend: the task of each durable group by name,
//! started on first use from the group's stored state (or created by a first
//! subscribe), asked again when it retired as it was asked; ephemeral
//! subscriptions; and every task, awaited when the store stops.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;

use super::task::{
    Command, GroupHandle, GroupLog, GroupRow, Groups, Tenure, spawn_durable, spawn_ephemeral,
};
use crate::{GroupTally, Result, StartPosition, StoreError, Subscription, SubscriptionSpec};

/// What a backend adds to its [`GroupLog`] for the registry: groups by name, and
/// where a start position puts a new group's floor.
pub(crate) trait GroupCatalog: GroupLog {
    /// A durable group's stored configuration, when it exists.
    fn group_row(&self, name: &str) -> impl Future<Output = Result<Option<GroupRow>>> + Send;
    /// Stores a new group; the row to use, which is another's when a group of that
    /// name was made first.
    fn create_group(&self, row: GroupRow) -> impl Future<Output = Result<GroupRow>> + Send;
    /// The floor a group starting at `position` gets: everything up to it is settled.
    fn floor_for(&self, position: StartPosition) -> impl Future<Output = Result<u64>> + Send;
    /// Whether the store is shutting down.
    fn stopping(&self) -> bool;
}

/// How often a call on a group tries again when its dispatcher retired meanwhile.
const RETRIES: usize = 3;

fn unreachable_group(group: &str) -> StoreError {
    StoreError::FailedPrecondition(format!(
        "group {group:?} keeps stopping as it is called; the node's log says why"
    ))
}

/// The store's dispatcher tasks, awaited at shutdown. Ephemeral subscriptions come
/// and go: finished tasks are swept when the list has doubled since the last sweep,
/// so a subscribe costs O(1) amortised, however many are live.
#[derive(Default)]
struct Tasks {
    handles: Vec<JoinHandle<()>>,
    sweep_at: usize,
}

impl Tasks {
    fn push(&mut self, task: JoinHandle<()>) {
        if self.handles.len() >= self.sweep_at {
            self.handles.retain(|t| !t.is_finished());
            self.sweep_at = (2 * self.handles.len()).max(64);
        }
        self.handles.push(task);
    }
}

/// A store's groups. Cloning shares them.
pub(crate) struct GroupRegistry<L> {
    log: Arc<L>,
    groups: Groups,
    tasks: Arc<Mutex<Tasks>>,
    /// Each durable group's counts on this node, across its dispatchers.
    tallies: Arc<std::sync::Mutex<HashMap<String, Arc<GroupTally>>>>,
}

impl<L> Clone for GroupRegistry<L> {
    fn clone(&self) -> Self {
        Self {
            log: self.log.clone(),
            groups: self.groups.clone(),
            tasks: self.tasks.clone(),
            tallies: self.tallies.clone(),
        }
    }
}

impl<L: GroupCatalog> GroupRegistry<L> {
    pub(crate) fn new(log: Arc<L>) -> Self {
        Self {
            log,
            groups: Groups::default(),
            tasks: Arc::default(),
            tallies: Arc::default(),
        }
    }

    /// The handle of a durable group's dispatcher, spawning it when not running.
    /// `create` makes the group when it does not exist.
    async fn group(
        &self,
        name: &str,
        create: Option<&SubscriptionSpec>,
    ) -> Result<(GroupHandle, bool)> {
        self.handle(name, create, Tenure::default()).await
    }

    /// As `group`, a dispatcher spawned now dispatching only as `tenure` says.
    pub(crate) async fn handle(
        &self,
        name: &str,
        create: Option<&SubscriptionSpec>,
        tenure: Tenure,
    ) -> Result<(GroupHandle, bool)> {
        let mut groups = self.groups.lock().await;
        if let Some(handle) = groups.get(name)
            && !handle.is_closed()
        {
            return Ok((handle.clone(), false));
        }
        if self.log.stopping() {
            return Err(StoreError::ShuttingDown);
        }
        let (row, created) = match (self.log.group_row(name).await?, create) {
            (Some(row), _) => (row, false),
            (None, Some(spec)) => {
                let row = GroupRow {
                    name: name.to_owned(),
                    patterns: spec.patterns.clone(),
                    ack_timeout: spec.ack_timeout,
                    max_deliveries: spec.max_deliveries,
                    ack_floor: self.log.floor_for(spec.start).await?,
                };
                (self.log.create_group(row).await?, true)
            }
            (None, None) => return Err(StoreError::NotFound(format!("group {name:?}"))),
        };
        let tally = self.tally(name);
        let (handle, task) =
            spawn_durable(self.log.clone(), row, self.groups.clone(), tenure, tally).await?;
        self.tasks.lock().await.push(task);
        groups.insert(name.to_owned(), handle.clone());
        Ok((handle, created))
    }

    /// Asks a group's dispatcher, starting one when the group has none. A
    /// dispatcher that retired as the question was sent is asked again, fresh.
    pub(crate) async fn ask<T>(
        &self,
        group: &str,
        make: impl Fn(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        for _ in 0..RETRIES {
            let (handle, _) = self.group(group, None).await?;
            let (reply, answer) = oneshot::channel();
            if handle.send(make(reply)).await.is_ok()
                && let Ok(answer) = answer.await
            {
                return answer;
            }
            if self.log.stopping() {
                return Err(StoreError::ShuttingDown);
            }
        }
        Err(unreachable_group(group))
    }

    pub(crate) async fn seek(&self, group: &str, floor: u64) -> Result<crate::GroupInfo> {
        self.ask(group, |reply| Command::Seek { floor, reply })
            .await
    }

    pub(crate) async fn redrive(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.ask(group, |reply| Command::Redrive {
            sequences: sequences.to_vec(),
            reply,
        })
        .await
    }

    pub(crate) async fn purge(&self, group: &str, sequences: &[u64]) -> Result<u64> {
        self.ask(group, |reply| Command::Purge {
            sequences: sequences.to_vec(),
            reply,
        })
        .await
    }

    /// Joins (or creates) a durable group, or starts an ephemeral one.
    pub(crate) async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription> {
        if spec.patterns.is_empty() {
            return Err(StoreError::InvalidArgument(
                "at least one pattern is required".into(),
            ));
        }
        match spec.group.clone() {
            Some(name) => {
                for _ in 0..RETRIES {
                    let (handle, created) = self.group(&name, Some(&spec)).await?;
                    match handle.join(spec.clone(), created).await {
                        Err(StoreError::ShuttingDown) if !self.log.stopping() => {}
                        joined => return joined,
                    }
                }
                Err(unreachable_group(&name))
            }
            None => {
                if self.log.stopping() {
                    return Err(StoreError::ShuttingDown);
                }
                let floor = self.log.floor_for(spec.start).await?;
                let (handle, task) = spawn_ephemeral(self.log.clone(), &spec, floor);
                self.tasks.lock().await.push(task);
                handle.join(spec, true).await
            }
        }
    }

    /// The group's counts, kept here so that they outlive its dispatchers.
    fn tally(&self, group: &str) -> Arc<GroupTally> {
        self.tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(group.to_owned())
            .or_default()
            .clone()
    }

    /// Retention deleted the log up to `floor`, `skipped` of the group's events
    /// unsettled: counted, and told to its dispatcher when one runs (one that
    /// starts later reads its floor from the log).
    pub(crate) async fn trimmed(&self, group: &str, floor: u64, skipped: u64) {
        let tally = self.tally(group);
        GroupTally::add(&tally.skipped, skipped);
        let handle = self.groups.lock().await.get(group).cloned();
        if let Some(handle) = handle.filter(|h| !h.is_closed()) {
            // A dispatcher that retires meanwhile leaves its state to the log.
            let _ = handle.send(Command::Trimmed { floor }).await;
        }
    }

    /// Live durable dispatchers: groups with members, or used lately.
    pub(crate) async fn live(&self) -> usize {
        self.groups
            .lock()
            .await
            .values()
            .filter(|h| !h.is_closed())
            .count()
    }

    /// The durable groups whose dispatcher runs here, with their members, by name.
    pub(crate) async fn local(&self) -> Vec<(String, u32)> {
        let mut local: Vec<(String, u32)> = self
            .groups
            .lock()
            .await
            .iter()
            .filter(|(_, h)| !h.is_closed())
            .map(|(name, h)| (name.clone(), h.members()))
            .collect();
        local.sort();
        local
    }

    /// Waits for every task to end (the store has signalled its shutdown).
    pub(crate) async fn stop(&self) {
        let tasks = std::mem::take(&mut self.tasks.lock().await.handles);
        for task in tasks {
            let _ = task.await;
        }
        self.groups.lock().await.clear();
    }
}
