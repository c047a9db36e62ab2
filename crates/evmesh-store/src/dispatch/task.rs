//! A group's task: one per durable group (or ephemeral subscription), owning the
//! group's [`Core`]. It reads its backend's log into the core, hands it the members'
//! acks and nacks and the time, and persists its changes with the group's
//! checkpoints, all through [`GroupLog`], which each backend implements. Members
//! get deliveries through bounded channels; nothing here waits on a member.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::core::{Changes, Core, GroupConfig, ParkedRow};
use crate::{
    Delivery, Feedback, GroupInfo, Membership, Pattern, Result, StoreError, StoredEvent,
    Subscription, SubscriptionControl, SubscriptionSpec,
};

/// What a backend's log gives group tasks: events by sequence, the head, and where a
/// durable group's state is kept.
pub(crate) trait GroupLog: Send + Sync + 'static {
    /// Whether the log counts the events its retention deletes from under each
    /// group itself (see [`Command::Trimmed`]); otherwise a group counts the gap it
    /// finds where it reads.
    const COUNTS_TRIMS: bool = false;
    /// The last sequence in the log.
    fn head(&self) -> u64;
    /// Changes whenever the head moves.
    fn watch_head(&self) -> watch::Receiver<u64>;
    /// Turns true when the store shuts down.
    fn watch_shutdown(&self) -> watch::Receiver<bool>;
    /// How long a durable group with no member and nothing timed keeps its task.
    fn idle_group_exit(&self) -> Duration;
    /// One event, `None` when the log does not hold it.
    fn read_one(&self, seq: u64) -> impl Future<Output = Result<Option<Arc<StoredEvent>>>> + Send;
    /// Up to `n` events from `seq` on, in log order.
    fn read_from(
        &self,
        seq: u64,
        n: usize,
    ) -> impl Future<Output = Result<Vec<Arc<StoredEvent>>>> + Send;
    /// A durable group's persisted state.
    fn restore(&self, group: &str) -> impl Future<Output = Result<Restored>> + Send;
    /// Persists a group's changes; its reply, when it has one, says when they and
    /// everything before them are durable.
    fn checkpoint(&self, checkpoint: Checkpoint) -> impl Future<Output = Result<()>> + Send;
    /// Records a group's new patterns, ahead of its next checkpoint.
    fn update_patterns(
        &self,
        group: &str,
        patterns: &[Pattern],
    ) -> impl Future<Output = Result<()>> + Send;
    /// Moves dead letters (all when `sequences` is empty) back into the group;
    /// returns the sequences moved.
    fn redrive(
        &self,
        group: &str,
        sequences: Vec<u64>,
    ) -> impl Future<Output = Result<Vec<u64>>> + Send;
    /// Deletes dead letters (all when `sequences` is empty); returns how many.
    fn purge(&self, group: &str, sequences: Vec<u64>) -> impl Future<Output = Result<u64>> + Send;
    /// Deletes the group and its dead letters; returns how many dead letters went.
    fn delete_group(&self, group: &str) -> impl Future<Output = Result<u64>> + Send;
}

/// A durable group's persisted state, as [`GroupLog::restore`] reads it.
pub(crate) struct Restored {
    /// Settled sequences above the floor.
    pub settled: Vec<u64>,
    /// Redriven dead letters not settled again.
    pub redrive: Vec<u64>,
    pub dead_count: u64,
    pub parked: Vec<ParkedRow>,
}

/// A group's state changes since its last checkpoint.
pub(crate) struct Checkpoint {
    pub group: String,
    pub floor: u64,
    pub changes: Changes,
    pub reply: Option<oneshot::Sender<Result<()>>>,
}

/// Events read from the log at a time.
const READ_BATCH: usize = 256;
/// How often a group's state is checkpointed when it changed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// Feedback messages handled before dispatching again.
const FEEDBACK_BATCH: usize = 1024;
/// Events examined for the lag count per info request: a group far behind answers
/// at once, counting what it has not examined yet as lag, and is exact once caught up.
const LAG_SCAN_MAX: usize = 1 << 18;

static EPHEMERAL: AtomicU64 = AtomicU64::new(1);

/// A durable group's configuration as stored.
#[derive(Debug, Clone)]
pub(crate) struct GroupRow {
    pub name: String,
    pub patterns: Vec<Pattern>,
    pub ack_timeout: Duration,
    pub max_deliveries: u32,
    pub ack_floor: u64,
}

impl GroupRow {
    /// The patterns as stored: one a line.
    pub(crate) fn patterns_text(patterns: &[Pattern]) -> String {
        patterns
            .iter()
            .map(Pattern::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub(crate) enum Command {
    Join {
        patterns: Vec<Pattern>,
        max_in_flight: u32,
        tx: mpsc::Sender<Delivery>,
        failure: Arc<OnceLock<String>>,
        /// Deliveries the member holds from the group's previous owner, with their
        /// attempts: in flight to it from the start.
        held: Vec<(u64, u32)>,
        reply: oneshot::Sender<Result<(u64, u64)>>,
    },
    Info(oneshot::Sender<Result<GroupInfo>>),
    Seek {
        floor: u64,
        reply: oneshot::Sender<Result<GroupInfo>>,
    },
    Flush(oneshot::Sender<Result<()>>),
    /// Retention deleted the log up to `floor`: the group moves on past it (the
    /// log counted what it skipped).
    Trimmed {
        floor: u64,
    },
    Redrive {
        sequences: Vec<u64>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Purge {
        sequences: Vec<u64>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Deletes the group and its dead letters, and ends the dispatcher.
    Delete(oneshot::Sender<Result<u64>>),
    /// The node no longer owns the group: ends the dispatcher at once, with no
    /// checkpoint and nothing redelivered, answering what each member holds.
    Abdicate(oneshot::Sender<Held>),
    /// Dispatches from now on: every member that may hold deliveries from the
    /// group's last owner has joined.
    Dispatch,
}

/// What each member of a group holds: sequence and attempt by member id.
pub(crate) type Held = HashMap<u64, Vec<(u64, u32)>>;

/// A member joined to a group's dispatcher.
pub(crate) struct Joined {
    pub member: u64,
    pub start_sequence: u64,
    pub control: SubscriptionControl,
}

/// The store's live durable dispatchers by group name. A dispatcher removes itself
/// when it retires, under this lock, so the store never hands out a retired one
/// without noticing (its commands channel is closed then).
pub(crate) type Groups = Arc<tokio::sync::Mutex<HashMap<String, GroupHandle>>>;

/// How the store and members reach a dispatcher.
#[derive(Clone)]
pub(crate) struct GroupHandle {
    name: String,
    commands: mpsc::Sender<Command>,
    feedback: mpsc::Sender<(u64, Feedback)>,
    leave: mpsc::UnboundedSender<u64>,
    /// Members joined now, as the dispatcher last counted them.
    members: Arc<std::sync::atomic::AtomicU32>,
}

impl GroupHandle {
    /// Members joined now.
    pub(crate) fn members(&self) -> u32 {
        self.members.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    fn is(&self, commands: &mpsc::Sender<Command>) -> bool {
        self.commands.same_channel(commands)
    }

    pub(crate) async fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .await
            .map_err(|_| StoreError::ShuttingDown)
    }

    pub(crate) async fn join(&self, spec: SubscriptionSpec, created: bool) -> Result<Subscription> {
        let max_in_flight = spec
            .max_in_flight
            .clamp(1, SubscriptionSpec::MAX_MAX_IN_FLIGHT);
        let (tx, deliveries) = mpsc::channel(max_in_flight as usize);
        let failure = Arc::new(OnceLock::new());
        let joined = self
            .join_with(
                spec.patterns,
                max_in_flight,
                tx,
                failure.clone(),
                Vec::new(),
            )
            .await?;
        Ok(Subscription {
            group: self.name.clone(),
            member_id: joined.member.to_string(),
            created,
            start_sequence: joined.start_sequence,
            auto_ack: spec.auto_ack,
            deliveries,
            failure,
            control: joined.control,
        })
    }

    /// Joins a member whose deliveries go to `tx`, holding `held` (sequence and
    /// attempt) from the group's previous owner.
    pub(crate) async fn join_with(
        &self,
        patterns: Vec<Pattern>,
        max_in_flight: u32,
        tx: mpsc::Sender<Delivery>,
        failure: Arc<OnceLock<String>>,
        held: Vec<(u64, u32)>,
    ) -> Result<Joined> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Join {
            patterns,
            max_in_flight,
            tx,
            failure,
            held,
            reply,
        })
        .await?;
        let (member, start_sequence) = answer.await.map_err(|_| StoreError::ShuttingDown)??;
        Ok(Joined {
            member,
            start_sequence,
            control: SubscriptionControl {
                member,
                feedback: self.feedback.clone(),
                _membership: Membership::new(member, self.leave.clone()),
            },
        })
    }

    /// Lets a dispatcher spawned holding back dispatch now.
    pub(crate) async fn dispatch(&self) {
        let _ = self.send(Command::Dispatch).await;
    }

    /// Ends the dispatcher without a checkpoint: the node lost the group. What each
    /// member held, for the next owner.
    pub(crate) async fn abdicate(&self) -> Held {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Abdicate(reply)).await.is_err() {
            return Held::new();
        }
        answer.await.unwrap_or_default()
    }
}

struct Dispatcher<L> {
    core: Core<mpsc::Sender<Delivery>>,
    log: Arc<L>,
    durable: bool,
    /// For a durable group: the store's map, to leave when it retires, and its own
    /// commands sender, to know itself there.
    registry: Option<(Groups, mpsc::Sender<Command>)>,
    /// Set once the group is deleted: nothing more is checkpointed.
    deleted: bool,
    /// Since when the group has been idle.
    idle_since: Option<Instant>,
    /// Nothing is dispatched before this (a new owner waits for the members of
    /// the last one to tell what they hold).
    hold_until: Option<Instant>,
    /// Nothing is dispatched from the time this says on (a mesh owner's lease, as
    /// far as its last answered renewal vouches for it), until it moves on.
    lease: Option<watch::Receiver<Instant>>,
    /// Set once the dispatcher handed its group over: it ends with no checkpoint.
    abdicated: bool,
    /// Set once it logged that retention made it skip events.
    skip_logged: bool,
    commands: mpsc::Receiver<Command>,
    feedback: mpsc::Receiver<(u64, Feedback)>,
    leave: mpsc::UnboundedReceiver<u64>,
    members: Arc<std::sync::atomic::AtomicU32>,
}

/// The receiving ends of a dispatcher's channels.
struct Inboxes {
    commands: mpsc::Receiver<Command>,
    feedback: mpsc::Receiver<(u64, Feedback)>,
    leave: mpsc::UnboundedReceiver<u64>,
    members: Arc<std::sync::atomic::AtomicU32>,
}

fn channels(name: &str) -> (GroupHandle, Inboxes) {
    let (commands, commands_rx) = mpsc::channel(64);
    let (feedback, feedback_rx) = mpsc::channel(4096);
    let (leave, leave_rx) = mpsc::unbounded_channel();
    let members = Arc::default();
    let handle = GroupHandle {
        name: name.to_owned(),
        commands,
        feedback,
        leave,
        members: Arc::clone(&members),
    };
    let inboxes = Inboxes {
        commands: commands_rx,
        feedback: feedback_rx,
        leave: leave_rx,
        members,
    };
    (handle, inboxes)
}

impl<L: GroupLog> Dispatcher<L> {
    fn new(log: Arc<L>, row: GroupRow, durable: bool) -> (Self, GroupHandle) {
        let (
            handle,
            Inboxes {
                commands,
                feedback,
                leave,
                members,
            },
        ) = channels(&row.name);
        let config = GroupConfig {
            name: row.name,
            durable,
            patterns: row.patterns,
            ack_timeout: row.ack_timeout,
            max_deliveries: row.max_deliveries,
        };
        let dispatcher = Self {
            core: Core::new(config, row.ack_floor),
            log,
            durable,
            registry: None,
            deleted: false,
            idle_since: None,
            hold_until: None,
            lease: None,
            abdicated: false,
            skip_logged: false,
            commands,
            feedback,
            leave,
            members,
        };
        (dispatcher, handle)
    }

    fn name(&self) -> &str {
        self.core.name()
    }
}

/// When a durable group's dispatcher may dispatch: by default, always.
#[derive(Default)]
pub(crate) struct Tenure {
    /// Not before this.
    pub(crate) hold_until: Option<Instant>,
    /// Not from the time this says on (while it says so).
    pub(crate) lease: Option<watch::Receiver<Instant>>,
}

pub(crate) async fn spawn_durable<L: GroupLog>(
    log: Arc<L>,
    row: GroupRow,
    groups: Groups,
    tenure: Tenure,
    tally: Arc<crate::GroupTally>,
) -> Result<(GroupHandle, JoinHandle<()>)> {
    let restored = log.restore(&row.name).await?;
    let (mut dispatcher, handle) = Dispatcher::new(log, row, true);
    dispatcher.core.count_into(tally);
    dispatcher.registry = Some((groups, handle.commands.clone()));
    dispatcher.hold_until = tenure.hold_until;
    dispatcher.lease = tenure.lease;
    dispatcher.core.restore(
        restored.settled,
        restored.redrive,
        restored.dead_count,
        restored.parked,
        Instant::now(),
    );
    Ok((handle, tokio::spawn(dispatcher.run())))
}

pub(crate) fn spawn_ephemeral<L: GroupLog>(
    log: Arc<L>,
    spec: &SubscriptionSpec,
    floor: u64,
) -> (GroupHandle, JoinHandle<()>) {
    let row = GroupRow {
        name: format!("_ephemeral.{}", EPHEMERAL.fetch_add(1, Ordering::Relaxed)),
        patterns: spec.patterns.clone(),
        ack_timeout: spec.ack_timeout,
        max_deliveries: spec.max_deliveries,
        ack_floor: floor,
    };
    let (dispatcher, handle) = Dispatcher::new(log, row, false);
    (handle, tokio::spawn(dispatcher.run()))
}

impl<L: GroupLog> Dispatcher<L> {
    async fn run(mut self) {
        let mut shutdown = self.log.watch_shutdown();
        let mut head = self.log.watch_head();
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lease = self.lease.take();
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            if self.abdicated {
                self.forget().await;
                return;
            }
            if let Err(e) = self.fill().await {
                if e.is_corruption() {
                    self.fail_members(&e);
                    if !self.durable {
                        break;
                    }
                } else {
                    tracing::error!(group = %self.name(), error = %e, "reading the log");
                }
            }
            let now = Instant::now();
            if self.hold_until.is_some_and(|until| until <= now) {
                self.hold_until = None;
            }
            let leased = lease.as_mut().is_none_or(|l| now < *l.borrow_and_update());
            if self.hold_until.is_none() && leased {
                self.core.dispatch(now);
            }
            self.members.store(
                u32::try_from(self.core.member_count()).unwrap_or(u32::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
            if self.deleted {
                self.forget().await;
                return;
            }
            let wake = self.core.next_wake();
            self.idle_since = if self.idle() {
                self.idle_since.or_else(|| Some(Instant::now()))
            } else {
                None
            };
            let retire_at = self.idle_since.map(|at| at + self.log.idle_group_exit());
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                () = sleep_until(retire_at), if retire_at.is_some() => {
                    if self.retire().await {
                        return;
                    }
                }
                Some(member) = self.leave.recv() => {
                    // Acks a member sent before it left count: apply them first, or
                    // what it acked would be redelivered to the others.
                    while let Ok((_, feedback)) = self.feedback.try_recv() {
                        self.core.feedback(feedback, Instant::now());
                    }
                    self.core.leave(member, Instant::now());
                    if !self.durable && !self.core.has_members() {
                        break;
                    }
                }
                Some((_, feedback)) = self.feedback.recv() => {
                    let now = Instant::now();
                    self.core.feedback(feedback, now);
                    for _ in 0..FEEDBACK_BATCH {
                        match self.feedback.try_recv() {
                            Ok((_, feedback)) => self.core.feedback(feedback, now),
                            Err(_) => break,
                        }
                    }
                }
                Some(command) = self.commands.recv() => self.on_command(command).await,
                Ok(()) = head.changed(), if self.core.wants_events() => {}
                () = sleep_until(wake), if wake.is_some() => self.core.expire(Instant::now()),
                () = sleep_until(self.hold_until), if self.hold_until.is_some() => {}
                // A lease renewed: what waited for it goes out.
                Ok(()) = renewed(&mut lease), if lease.is_some() => {}
                _ = tick.tick() => {
                    if let Err(e) = self.checkpoint(None).await {
                        tracing::error!(group = %self.name(), error = %e, "checkpoint");
                    }
                }
            }
        }
        // Acks that arrived before the stop count.
        while let Ok((_, feedback)) = self.feedback.try_recv() {
            self.core.feedback(feedback, Instant::now());
        }
        if let Err(e) = self.checkpoint(None).await {
            tracing::error!(group = %self.name(), error = %e, "final checkpoint");
        }
    }

    /// A durable group with no member and nothing timed: its state is all in the
    /// log, so it needs no task until someone asks for it again.
    fn idle(&self) -> bool {
        self.registry.is_some() && self.core.is_idle()
    }

    /// Leaves the store's map and ends, its state checkpointed first, when still
    /// idle and no command waits (the loop handles it, and the group was not idle).
    /// A caller that got this dispatcher's handle before it left finds its channel
    /// closed, and asks the store again, which starts a fresh dispatcher from the
    /// log.
    async fn retire(&mut self) -> bool {
        // A dispatcher that stays starts its idle time over.
        self.idle_since = None;
        let Some((groups, own)) = self.registry.clone() else {
            return false;
        };
        let mut map = groups.lock().await;
        if !self.commands.is_empty() || !self.idle() {
            return false;
        }
        if let Err(e) = self.flush().await {
            tracing::error!(group = %self.name(), error = %e, "checkpoint before retiring; staying");
            return false;
        }
        forget(&mut map, self.core.name(), &own);
        self.commands.close();
        drop(map);
        tracing::debug!(group = %self.name(), "idle group retired");
        true
    }

    /// Leaves the store's map, when it still names this dispatcher.
    async fn forget(&self) {
        if let Some((groups, own)) = &self.registry {
            forget(&mut *groups.lock().await, self.core.name(), own);
        }
    }

    /// Loads redriven dead letters, parked events now due, and new events from the
    /// log into the core.
    async fn fill(&mut self) -> Result<()> {
        while let Some(seq) = self.core.next_to_load() {
            let event = self.log.read_one(seq).await?;
            self.core.loaded(seq, event);
        }
        while self.core.wants_events() && self.core.cursor() <= self.log.head() {
            let from = self.core.cursor();
            let batch = self.log.read_from(from, READ_BATCH).await?;
            let Some(first) = batch.first() else {
                break;
            };
            self.gap(from, first.sequence);
            for event in batch {
                self.core.read(event);
            }
        }
        Ok(())
    }

    /// Counts the events up to the head that no member has read yet, up to
    /// `LAG_SCAN_MAX` of them.
    async fn count_lag(&mut self) -> Result<()> {
        let head = self.log.head();
        let mut budget = LAG_SCAN_MAX;
        while self.core.unscanned_from() <= head && budget > 0 {
            let from = self.core.unscanned_from();
            let batch = self.log.read_from(from, READ_BATCH).await?;
            let Some(first) = batch.first() else {
                break;
            };
            self.gap(from, first.sequence);
            self.core.scan(&batch);
            budget = budget.saturating_sub(batch.len());
        }
        Ok(())
    }

    /// Reading from `from` found `first` first: retention deleted what lay between
    /// (a log loses events only at its start), and the group moves on past it.
    fn gap(&mut self, from: u64, first: u64) {
        if first <= from {
            return;
        }
        let skipped = self.core.trimmed(first - 1);
        if !L::COUNTS_TRIMS && skipped > 0 {
            self.core.count_skipped(skipped);
            if !self.skip_logged {
                self.skip_logged = true;
                tracing::warn!(group = %self.name(), skipped, first, "retention deleted events this group had not settled; it moves on past them");
            }
        }
    }

    /// The log is damaged where the group reads: every member's subscription ends
    /// with the reason (DATA_LOSS), rather than stalling. What they held goes back
    /// to be delivered again; a seek past the damage lets members in again.
    fn fail_members(&mut self, error: &StoreError) {
        let cursor = self.core.cursor();
        tracing::error!(group = %self.name(), error = %error, cursor, "the log is damaged where this group reads; ending its subscriptions");
        let reason = format!(
            "the log is damaged at or after sequence {cursor}: {error}; restore evmesh.db from a backup, or seek the group past it"
        );
        self.core.fail_members(&reason, Instant::now());
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Join {
                patterns,
                max_in_flight,
                tx,
                failure,
                held,
                reply,
            } => {
                let _ = reply.send(self.join(patterns, max_in_flight, tx, failure, held).await);
            }
            Command::Dispatch => self.hold_until = None,
            Command::Abdicate(reply) => {
                // Acks that came first count for what is handed over.
                while let Ok((_, feedback)) = self.feedback.try_recv() {
                    self.core.feedback(feedback, Instant::now());
                }
                self.abdicated = true;
                self.core.discard_changes();
                self.commands.close();
                let _ = reply.send(self.core.held());
                tracing::info!(group = %self.name(), "group handed over");
            }
            Command::Info(reply) => {
                let _ = reply.send(self.info().await);
            }
            Command::Seek { floor, reply } => {
                self.core.seek(floor);
                let result = match self.flush().await {
                    Ok(()) => self.info().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Flush(reply) => {
                let _ = reply.send(self.flush().await);
            }
            Command::Trimmed { floor } => {
                self.core.trimmed(floor);
            }
            Command::Redrive { sequences, reply } => {
                let _ = reply.send(self.redrive(sequences).await);
            }
            Command::Purge { sequences, reply } => {
                let result = self.purge(sequences).await;
                let _ = reply.send(result);
            }
            Command::Delete(reply) => {
                let _ = reply.send(self.delete().await);
            }
        }
    }

    async fn join(
        &mut self,
        patterns: Vec<Pattern>,
        max_in_flight: u32,
        tx: mpsc::Sender<Delivery>,
        failure: Arc<OnceLock<String>>,
        held: Vec<(u64, u32)>,
    ) -> Result<(u64, u64)> {
        if self.core.changes_patterns(&patterns)? && self.durable {
            self.log
                .update_patterns(self.core.name(), &patterns)
                .await?;
        }
        let mut events = Vec::with_capacity(held.len());
        for (seq, attempts) in held {
            if let Some(event) = self.log.read_one(seq).await? {
                events.push((event, attempts));
            }
        }
        let (member, start) = self.core.join(patterns, max_in_flight, tx, failure)?;
        if !events.is_empty() {
            let taken = self.core.adopt(member, events, Instant::now());
            tracing::debug!(group = %self.name(), member, adopted = taken.len(), "deliveries held from the last owner");
        }
        Ok((member, start))
    }

    async fn info(&mut self) -> Result<GroupInfo> {
        self.count_lag().await?;
        Ok(self.core.info(self.log.head()))
    }

    async fn flush(&mut self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        self.checkpoint(Some(reply)).await?;
        done.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Sends the state changes to the writer. With a reply, always sends, so the
    /// reply says when everything before it is committed.
    async fn checkpoint(&mut self, reply: Option<oneshot::Sender<Result<()>>>) -> Result<()> {
        if !self.durable {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return Ok(());
        }
        let changes = self.core.take_changes();
        if changes.is_none() && reply.is_none() {
            return Ok(());
        }
        let changes = changes.unwrap_or_default();
        let kept = changes.clone();
        let (done, answer) = oneshot::channel();
        let checkpoint = Checkpoint {
            group: self.name().to_owned(),
            floor: self.core.floor(),
            changes,
            reply: reply.is_some().then_some(done),
        };
        let result = match self.log.checkpoint(checkpoint).await {
            Ok(()) => match reply {
                // The caller waits for it: so does the dispatcher, to keep the
                // changes should they fail.
                Some(reply) => {
                    let result = answer.await.unwrap_or(Err(StoreError::ShuttingDown));
                    if result.is_err() {
                        self.core.keep_changes(kept);
                    }
                    let _ = reply.send(result);
                    return Ok(());
                }
                None => Ok(()),
            },
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
                Err(e)
            }
        };
        if result.is_err() {
            self.core.keep_changes(kept);
        }
        result
    }

    async fn redrive(&mut self, sequences: Vec<u64>) -> Result<u64> {
        self.flush().await?;
        let moved = self.log.redrive(self.core.name(), sequences).await?;
        self.core.redriven(&moved);
        tracing::info!(group = %self.name(), count = moved.len(), "dead letters redriven");
        Ok(moved.len() as u64)
    }

    async fn delete(&mut self) -> Result<u64> {
        if self.core.has_members() {
            return Err(StoreError::FailedPrecondition(format!(
                "group {:?} has {} live member(s); a group is deleted once they leave",
                self.name(),
                self.core.member_count()
            )));
        }
        let dead = self.log.delete_group(self.core.name()).await?;
        // Deleted: no checkpoint may write it again; a closed channel tells the
        // store to start afresh for this name, and the run loop leaves its map.
        self.deleted = true;
        self.core.discard_changes();
        self.commands.close();
        tracing::info!(group = %self.name(), dead_letters = dead, "group deleted");
        Ok(dead)
    }

    async fn purge(&mut self, sequences: Vec<u64>) -> Result<u64> {
        self.flush().await?;
        let purged = self.log.purge(self.core.name(), sequences).await?;
        self.core.purged(purged);
        tracing::info!(group = %self.name(), count = purged, "dead letters purged");
        Ok(purged)
    }
}

fn forget(map: &mut HashMap<String, GroupHandle>, name: &str, own: &mpsc::Sender<Command>) {
    if map.get(name).is_some_and(|h| h.is(own)) {
        map.remove(name);
    }
}

/// Waits until `lease` changes (never when there is none).
async fn renewed(
    lease: &mut Option<watch::Receiver<Instant>>,
) -> std::result::Result<(), watch::error::RecvError> {
    match lease {
        Some(lease) => lease.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
